"""``bct demo``: the main job end to end on the built-in default model.

Quantize all-MiniLM-L6-v2 blockwise (no retraining), measure its fidelity against the FP32
(float64) reference, generate the encoder-layer accelerator's RTL and memory images, co-simulate a
real sentence through one (``--layers``) encoder layer on Verilator with every stage compared
exactly against the integer model, and print a short summary (``--json``: the same as JSON).

Every figure is measured, except the latency, which is the simulated cycle count at a clock:
the Fmax of a ``bct synth`` report when one is given (``--synth-report``), otherwise the
config's ``clock_mhz``, stated as an assumption.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["register", "run_demo", "DEMO_SENTENCE"]

#: The sentence co-simulated by default (18 tokens with [CLS] / [SEP]).
DEMO_SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank today."


def register(subparsers, add_config_options) -> None:
    """Add the ``demo`` subcommand."""
    p = subparsers.add_parser("demo", help="run the main job on the built-in default model: "
                              "quantize, generate the RTL, co-simulate a layer, summarise")
    add_config_options(p)
    p.add_argument("--sentence", default=DEMO_SENTENCE, help="the sentence to co-simulate")
    p.add_argument("--layers", type=int, default=1, help="encoder layers on chip (default 1)")
    p.add_argument("--synth-report", metavar="FILE",
                   help="a bct synth JSON report whose fmax_mhz gives the latency's clock")
    p.add_argument("--images", metavar="DIR",
                   help="co-simulate these `bct quantize` images of the default model (default: "
                   "quantize it and write its images into the cache)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_demo)


def _clock(cfg, report_path):
    if report_path:
        rep = json.loads(Path(report_path).read_text())
        if rep.get("config_hash") not in (None, cfg.hash):
            cfg.check_hash(rep["config_hash"], f"synthesis report {report_path}")
        if rep.get("fmax_mhz"):
            return float(rep["fmax_mhz"]), (f"Fmax {rep['fmax_mhz']} MHz after place and route "
                                            f"({rep.get('target', '?')}, {report_path})")
    return float(cfg.clock_mhz), (f"assumed clock {cfg.clock_mhz} MHz (Config.clock_mhz; no "
                                  "synthesis report given, not a synthesised Fmax)")


def run_demo(cfg, *, sentence: str = DEMO_SENTENCE, layers: int = 1, synth_report=None,
             seed: int = 0, work_dir=None, images=None) -> dict:
    """Run the demo; returns the summary (see the module docstring).

    ``images``: a ``bct quantize`` image directory of the default model, loaded (and checked)
    instead of quantizing; the accelerator's ROMs are initialised from its files.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    import platformdirs

    from bct.model import integer, reference
    from bct.model.checkpoint import load_bert, load_tokenizer
    from bct.sim.layer import simulate

    t0 = time.monotonic()
    weights, tok = load_bert(), load_tokenizer()
    # padded by the model to a multiple of the block size (one block of 32 at default)
    enc = tok.encode([sentence], max_len=weights.max_positions, padding="longest")
    if images is None:
        qm = integer.quantize(weights, cfg)
    else:
        from bct.model.images import ImageError, read_images
        qm = read_images(images, cfg)
        if qm.source != weights.source:
            raise ImageError(f"the images in {images} hold {qm.source}, the demo runs "
                             f"{weights.source}")
    n = sum(a.size for a in weights.named_arrays().values())
    out = integer.forward(qm, enc, trace=True)
    ref = reference.forward(weights, enc)
    e, r = out.embedding[0], ref.embedding[0]
    cosine = float(e @ r / np.linalg.norm(e) / np.linalg.norm(r))
    t_model = time.monotonic() - t0
    work = Path(work_dir or Path(platformdirs.user_cache_dir("bct-gen")) / "demo")
    rep = simulate(qm, enc, layers=layers, work_dir=work, seed=seed, trace=out.stages,
                   images=images)
    mhz, clock_note = _clock(cfg, synth_report)
    return {
        "config_hash": cfg.hash,
        "model": weights.source,
        "sentence": sentence,
        "tokens": int(enc.attention_mask.sum()),
        "padded_tokens": int(out.stages["embed.ln"].shape[1]),
        "compression_ratio": 32 * n / qm.storage_bits(),
        "embedding_cosine_vs_fp32": cosine,
        "layers_on_chip": layers,
        "bit_exact": bool(rep["bit_exact"]),
        "stages_compared": len(rep["stages"]),
        "cycles": rep["cycles"],
        "mac_beats": rep["mac_beats"],
        "mac_utilisation": rep["utilisation"],
        "array": f"{cfg.array_rows}x{cfg.array_cols}",
        "clock_mhz": mhz,
        "clock_source": clock_note,
        "latency_us": rep["cycles"] / mhz,
        "program": rep["program"],
        "images": str(Path(rep["manifest"]).parent),
        "model_seconds": t_model,
        "cosim_seconds": rep["wall_seconds"],
    }


@contextmanager
def _stdout_to_stderr(active: bool):
    """With ``--json``, the simulator's and the build tools' logs (written by child processes
    to file descriptor 1) go to stderr, so stdout holds the JSON alone."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _cmd_demo(args) -> int:
    from bct.cli import config_from_args
    from bct.model.images import ImageError
    from bct.sim import SimulationFailure

    cfg = config_from_args(args)
    try:
        with _stdout_to_stderr(args.json):
            s = run_demo(cfg, sentence=args.sentence, layers=args.layers,
                         synth_report=args.synth_report, seed=args.seed, images=args.images)
    except SimulationFailure as e:
        print(f"bct demo: the co-simulation FAILED:\n{e}")
        return 1
    except ImageError as e:
        print(f"bct: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s, indent=2))
        return 0 if s["bit_exact"] else 1
    print(f"BCT-Gen demo, config {s['config_hash']} ({s['model']})")
    print(f"  compression        {s['compression_ratio']:.2f}x vs FP32 (whole model, exponents included)")
    print(f"  fidelity vs FP32   sentence-embedding cosine {s['embedding_cosine_vs_fp32']:.5f}")
    print(f"  co-simulation      {s['layers_on_chip']} encoder layer(s) on Verilator, "
          f"{s['tokens']} tokens (padded to {s['padded_tokens']}), {s['array']} array")
    print(f"  bit-exact          {'yes' if s['bit_exact'] else 'NO'} "
          f"({s['stages_compared']} stages compared with the integer model)")
    print(f"  cycles             {s['cycles']:,}  (MAC utilisation {100 * s['mac_utilisation']:.1f} %)")
    print(f"  latency            {s['latency_us']:,.0f} us at {s['clock_mhz']:g} MHz: {s['clock_source']}")
    print(f"  program / images   {s['program']}  {s['images']}")
    return 0 if s["bit_exact"] else 1
