"""Co-simulation of encoder layers on :class:`bct.hw.layer.LayerAccelerator` (host side).

:func:`simulate` quantizes nothing itself: it takes a :class:`~bct.model.integer.QuantBert` and
an encoded sentence, traces the integer model, generates the program and the memory images,
refuses images that do not match (:func:`bct.hw.program.check_images`) before anything is
simulated, builds the RTL and runs ``tests/cocotb/tb_layer.py``-style testbenches, which load
the layer input, run the program and compare every stage written on chip with the trace,
exactly (``==``), reporting the first mismatch of each stage with its index, both values and
the cycle at which the word was written. The accelerator's last op, ``pool``, is compared
too: ``embedding`` is the model's own ``mean_pool`` of the last on-chip layer's ``out``
(:func:`pooled`; with every layer on chip it is checked to equal the trace's ``embedding``).
On the wide residual path (``cfg.residual_bits``) the residual copies (``embed.ln_wide``,
loaded with ``embed.ln``; ``attn_ln_wide``, ``out_wide``) are compared too, each stage in its
own block format, and the pool is that of ``out_wide``. With ``cfg.gelu_direct`` the FFN1 op
hands its accumulator rows to the GELU unit: ``ffn1`` (traced by the model only, read by no
later stage) is not written on chip and not compared (:func:`bct.hw.program.layer_stages`).

:func:`stage_words` / :func:`compare_words` are shared by the host and the testbench.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bct.hw.program import (ROMS, LayerShape, Program, build_program, check_images,
                            layer_stages, pack_word)
from bct.model.images import MANIFEST, content_digest, write_images
from bct.model.blocks import BlockTensor, reblock_transposed
from bct.sim.bits import unpack_block

__all__ = ["stage_words", "expected_stages", "pooled", "compare_words", "prepare", "simulate",
           "TB_MODULE"]

#: The testbench module (inside the package, so `bct demo` needs no test files).
TB_MODULE = Path(__file__).resolve().parent / "tb_layer.py"


def stage_words(prog: Program, t: BlockTensor, kind: str) -> list[int]:
    """The memory words of one traced tensor in the program's layout.

    ``kind``: ``"rows"`` for ``(1, T, X)`` tensors (row ``t``, block ``j``), ``"heads"`` for
    ``(1, A, R, X)`` tensors (row ``h * R + r``).
    """
    f = t.fmt
    mant, exp = t.blocks, t.exp
    if kind == "heads":
        mant = mant.reshape((-1,) + mant.shape[-2:])
        exp = exp.reshape((-1,) + exp.shape[-1:])
    else:
        mant, exp = mant[0], exp[0]
    return [pack_word(mm, e, f.bits, f.exp_bits)
            for mm, e in zip(mant.reshape(-1, f.block).tolist(), exp.reshape(-1).tolist())]


def _heads(t: BlockTensor, A: int) -> BlockTensor:
    from bct.model.integer import _heads as heads
    return heads(t, A, t.shape[-1] // A)


def expected_stages(prog: Program, stages: dict, layers: list[int], seq_len: int) -> dict:
    """``{name: {"base", "words"}}`` of every stage the accelerator keeps for ``layers``
    (the scratch regions hold the last layer's stages; each layer's ``out`` is kept), plus
    the re-blocked V (``layer{i}.vt``, not a model stage: ``reblock_transposed`` of V) and
    ``embedding``: the model's own ``mean_pool`` of the last on-chip layer's ``out`` over
    the first ``seq_len`` tokens (the sentence embedding when every layer runs on chip)."""
    A = prog.shape.heads
    last = max(layers)
    out = {}
    wide = prog.cfg.residual_bits is not None
    for i in layers:
        names = layer_stages(prog.cfg) if i == last else ("out", "out_wide") if wide else ("out",)
        for s in names:
            t = stages[f"layer{i}.{s}"]
            kind = "heads" if s in ("scores", "probs") else "rows"
            r = prog.stage_region(i, s)
            out[f"layer{i}.{s}"] = {"base": r.base, "words": stage_words(prog, t, kind)}
        if i == last:
            vt = reblock_transposed(_heads(stages[f"layer{i}.v"], A), prog.cfg.act_format)
            out[f"layer{i}.vt"] = {"base": prog.regions["vt"].base,
                                   "words": stage_words(prog, vt, "heads")}
    out["embedding"] = {"base": prog.regions["embedding"].base,
                        "words": stage_words(prog, pooled(prog, stages, last, seq_len), "rows")}
    return out


def pooled(prog: Program, stages: dict, layer: int, seq_len: int) -> BlockTensor:
    """``bct.model.integer.mean_pool`` of ``layer{layer}.out`` (on the wide residual path its
    residual copy ``out_wide``) over the first ``seq_len`` tokens: what the accelerator's
    ``pool`` op writes to the ``embedding`` region."""
    from bct.model.integer import mean_pool

    wide = prog.cfg.residual_bits is not None
    x = stages[f"layer{layer}.out" + ("_wide" if wide else "")]
    mask = (np.arange(x.shape[1]) < seq_len)[None]
    return mean_pool(x, mask, prog.cfg)


def compare_words(name: str, expected: list[int], got: list[int], cycles: list[int] | None,
                  bits: int, exp_bits: int, block: int, blocks_per_row: int) -> str | None:
    """``None`` when equal, else a message naming the first differing word (row, block),
    lane, both values and the cycle at which the accelerator wrote it."""
    for n, (e, g) in enumerate(zip(expected, got)):
        if e != g:
            em, ee = unpack_block(e, bits, exp_bits, block)
            gm, ge = unpack_block(g, bits, exp_bits, block)
            row, j = divmod(n, blocks_per_row)
            where = f"cycle {cycles[n]}" if cycles is not None else "cycle ?"
            if ee != ge:
                what = f"exponent: rtl {ge}, model {ee}"
            else:
                lane = next(k for k in range(block) if em[k] != gm[k])
                what = (f"element {j * block + lane} (lane {lane}): rtl {gm[lane]}, "
                        f"model {em[lane]}")
            return f"{name}: first mismatch at word {n} (row {row}, block {j}), {what}; written at {where}"
    if len(expected) != len(got):
        return f"{name}: {len(got)} words read, {len(expected)} expected"
    return None


def prepare(qm, enc, *, layers: int = 1, work_dir, image_root=None, images=None,
            trace=None) -> dict:
    """Program, checked images, the testbench's data file and the accelerator.

    Parameters
    ----------
    qm : QuantBert
    enc : Encoding
        One sentence (batch 1); padded to a multiple of the block size by the model.
    layers : int
        Encoder layers run on chip (1 .. qm.layers).
    work_dir : path
        Where the data and report files go.
    image_root : path, optional
        Without ``images``: the ``bct quantize`` images of ``qm`` are written (once) into a
        content-addressed directory under it (:func:`bct.model.images.content_digest`).
    images : path, optional
        A ``bct quantize`` image directory holding ``qm`` (``bct demo --images``); it is
        checked against the program, not rewritten.
    trace : dict, optional
        ``bct.model.integer.trace(qm, enc)`` if already computed.

    Returns
    -------
    dict
        ``prog``, ``component``, ``images``, ``params`` (for the testbench), ``trace``.
    """
    from bct.hw.layer import LayerAccelerator
    from bct.model.integer import trace as model_trace

    cfg = qm.cfg
    ids = np.asarray(enc.input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"the co-simulation takes one sentence, not input_ids of shape {ids.shape}")
    if not 1 <= layers <= qm.layers:
        raise ValueError(f"layers must be in 1..{qm.layers}, not {layers}")
    stages = model_trace(qm, enc) if trace is None else trace
    T = stages["embed.ln"].shape[1]
    mask = np.asarray(enc.attention_mask)[0]
    seq_len = int(mask.sum())
    if not (mask[:seq_len] == 1).all():
        raise ValueError("the co-simulation takes an attention mask of leading valid tokens "
                         "(ones, then zeros): the accelerator masks by seq_len")
    shape = LayerShape(qm.hidden, qm.heads, qm.ffn, T, layers)
    prog = build_program(cfg, shape, qm)
    if images is None:
        if image_root is None:
            raise ValueError("prepare needs an image directory (images) or an image_root")
        images = Path(image_root) / f"{cfg.hash}-{content_digest(qm)}"
        if not (images / MANIFEST).is_file():
            write_images(qm, images)
    img_dir = Path(images)
    roms = check_images(img_dir, prog)
    manifest = img_dir / MANIFEST
    files = json.loads(manifest.read_text())["memories"]
    prog.weights_digest = hashlib.sha256("".join(
        files[f"layer{i}_{g}_{k}"]["sha256"] for i in range(layers)
        for g, k in ROMS.values()).encode()).hexdigest()[:16]
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    prog.write(work_dir / "program.json")
    x = stages["embed.ln"]
    expected = expected_stages(prog, stages, list(range(layers)), seq_len)
    if layers == qm.layers and "embedding" in stages:  # the on-chip pool is the model's head
        e, want = pooled(prog, stages, layers - 1, seq_len), stages["embedding"]
        if not (np.array_equal(e.mant, want.mant) and np.array_equal(e.exp, want.exp)):
            raise ValueError("the trace's embedding is not mean_pool of its last layer's out "
                             "over the first seq_len tokens")
    af = cfg.act_format
    inputs = [{"base": prog.regions["x"].base, "words": stage_words(prog, x, "rows")}]
    if cfg.residual_bits is not None:  # the residual copy of the embedding LayerNorm
        inputs.append({"base": prog.regions["x_wide"].base,
                       "words": stage_words(prog, stages["embed.ln_wide"], "rows")})
    data = {
        "inputs": inputs,
        "seq_len": seq_len,
        "expected": expected,
        "blocks_per_row": {k: _blocks_per_row(prog, k) for k in expected},
        "fmt": [af.bits, af.exp_bits, af.block],
        # each stage's own block format (the residual format on the wide path's regions)
        "fmts": {k: _stage_format(prog, k) for k in expected},
        "ops": [o["note"] for o in prog.ops],
        "max_cycles": 40 * sum(max(1, o["rows"]) * max(1, o["nbk"]) * max(1, o["ncols"])
                               for o in prog.ops) // max(1, cfg.array_rows * cfg.array_cols)
                      + 100000,
    }
    (work_dir / "data.json").write_text(json.dumps(data))
    params = {"data": str(work_dir / "data.json"), "report": str(work_dir / "report.json")}
    return {"prog": prog, "component": LayerAccelerator(prog, roms), "images": roms,
            "params": params, "trace": stages, "manifest": str(manifest)}


def _stage_region(prog: Program, name: str):
    if name == "embedding":
        return prog.regions["embedding"]
    stage = name.split(".", 1)[1]
    return prog.regions["vt"] if stage == "vt" else prog.stage_region(
        int(name[5:name.index(".")]), stage)


def _stage_format(prog: Program, name: str) -> list:
    f = prog.region_format(_stage_region(prog, name).name)
    return [f.bits, f.exp_bits, f.block]


def _blocks_per_row(prog: Program, name: str) -> int:
    return _stage_region(prog, name).blocks


def _content_file(base_dir, stem: str, suffix: str, text: str) -> Path:
    """``text`` in ``base_dir/<stem>-<digest><suffix>`` (content-addressed, written once,
    atomically)."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = Path(base_dir) / f"{stem}-{digest}{suffix}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def rom_source(component, base_dir) -> Path:
    """The accelerator's image ROMs (:meth:`~bct.hw.layer.LayerAccelerator.rom_verilog`) in a
    content-addressed file."""
    return _content_file(base_dir, "bct_image_roms", ".v", component.rom_verilog())


def _port_config(component, base_dir) -> Path:
    """A Verilator control file making only the top-level ports visible to cocotb (VPI)."""
    names = ["clk", "rst"] + ["__".join(map(str, path))
                              for path, _, _ in component.signature.flatten(component)]
    text = "`verilator_config\n" + "".join(
        f'public_flat_rw -module "bct_layer" -var "{n}"\n' for n in names)
    return _content_file(base_dir, "bct_layer_ports", ".vlt", text)


@contextmanager
def _lean_verilator():
    """Build the accelerator lean: without cocotb's ``--public-flat-rw`` (the testbench only
    touches top-level ports; making every internal signal public makes Verilator re-evaluate
    all combinational logic on every input change and triples the C++), and with
    ``OPT_FAST=-O1`` (the single large C++ file compiles several times faster than at
    ``-Os``)."""
    from cocotb_tools import runner as cocotb_runner

    from bct.sim import runner as sim_runner

    class LeanVerilator(cocotb_runner.Verilator):
        def _build_command(self):
            cmds = super()._build_command()
            cmds[0] = [a for a in cmds[0] if a != "--public-flat-rw"]
            return cmds

    def get_runner(simulator):
        return LeanVerilator() if simulator == "verilator" else cocotb_runner.get_runner(simulator)

    saved_runner, saved_flags = sim_runner.get_runner, os.environ.get("MAKEFLAGS")
    sim_runner.get_runner = get_runner
    os.environ["MAKEFLAGS"] = "OPT_FAST=-O1"
    try:
        yield
    finally:
        sim_runner.get_runner = saved_runner
        if saved_flags is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = saved_flags


def simulate(qm, enc, *, layers: int = 1, work_dir, tb_module=TB_MODULE, base_dir=None, seed: int = 0,
             trace=None, images=None) -> dict:
    """Run ``layers`` encoder layers of ``qm`` on the accelerator for one sentence.

    Returns
    -------
    dict
        The testbench's report (``cycles``, ``mac_beats``, ``utilisation``, ``ops``,
        ``mismatches``, ``bit_exact``, ``stages``) plus ``program`` and ``manifest`` paths and
        ``wall_seconds``.

    Raises
    ------
    bct.hw.program.ImageError
        Before the simulation, when the images do not match the program.
    bct.sim.SimulationFailure
        When the build fails, or any stage differs from the model (the message holds the
        first mismatch); the report is still written.
    """
    import time

    from bct.sim.runner import default_base_dir, run

    base = Path(base_dir or default_base_dir())
    p = prepare(qm, enc, layers=layers, work_dir=work_dir, image_root=base / "images", images=images,
                trace=trace)
    t0 = time.monotonic()
    report_path = Path(p["params"]["report"])
    report_path.unlink(missing_ok=True)
    error = None
    try:
        with _lean_verilator():
            run(p["component"], tb_module, name="bct_layer", params=p["params"], seed=seed,
                config_hash=qm.cfg.hash, base_dir=base,
                build_args=["-Wno-ASCRANGE", str(rom_source(p["component"], base / "rtl")),
                            str(_port_config(p["component"], base / "rtl"))])
    except AssertionError as e:  # SimulationFailure
        error = e
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    report.update(program=str(Path(work_dir) / "program.json"), manifest=p["manifest"],
                  wall_seconds=time.monotonic() - t0)
    if error is not None:
        report.setdefault("bit_exact", False)
        report["error"] = str(error)
        (Path(work_dir) / "report.json").write_text(json.dumps(report))
        raise error
    return report
