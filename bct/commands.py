"""The model-level commands: ``bct quantize``, ``bct finetune``, ``bct eval``, ``bct sweep``.

Registered through :data:`bct.cli._COMMAND_MODULES`; heavy imports (torch, transformers, the
model) happen inside the command functions so ``bct --help`` stays fast. Errors about data,
checkpoints, images or arguments print ``bct: error: ...`` and exit with status 2 (config errors
are handled by :func:`bct.cli.main` the same way).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

__all__ = ["register"]

#: Default number of training rows for the fine-tuned baselines (as in /work/shared/findings.md).
DEFAULT_SUBSET = 8000


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, not {text!r}")
    return value


def _subset(text: str):
    return None if text == "all" else _positive(text)


def _task(text: str) -> str:
    from bct.model.glue import GlueError, task_spec

    try:
        return task_spec(text).name
    except GlueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    return values


def _errors(func):
    """Report the model layer's input errors as ``bct: error: ...`` with status 2."""

    @functools.wraps(func)
    def run(args) -> int:
        from bct.model.checkpoint import CheckpointError
        from bct.model.finetune import FinetuneError
        from bct.model.glue import GlueError
        from bct.model.images import ImageError

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            return func(args)
        except (CheckpointError, FinetuneError, GlueError, ImageError) as e:
            print(f"bct: error: {e}", file=sys.stderr)
            return 2

    return run


# ---------------------------------------------------------------------------------------------
# quantize


@_errors
def _cmd_quantize(args) -> int:
    from bct.cli import config_from_args
    from bct.model.checkpoint import load_bert
    from bct.model.images import read_images, read_manifest, write_images
    from bct.model.integer import quantize

    cfg = config_from_args(args)
    qm = quantize(load_bert(args.model), cfg)
    out = write_images(qm, args.out)
    manifest = read_manifest(out)
    verified = None
    if args.verify:
        back = read_images(out, cfg)
        a, b = qm.tensors(), back.tensors()
        verified = list(a) == list(b) and all(a[k] == b[k] for k in a)
    summary = {
        "out": str(out),
        "config_hash": cfg.hash,
        "model": qm.source,
        "tensors": len(manifest["tensors"]),
        "stored_bits": qm.storage_bits(),
        "memories": {n: {"width": m["width"], "depth": m["depth"]} for n, m in manifest["memories"].items()},
        "verified": verified,
    }
    print(json.dumps(summary, indent=2))
    return 1 if verified is False else 0


# ---------------------------------------------------------------------------------------------
# finetune


def _finetune(args, progress: bool, **training):
    from bct.model.finetune import finetune

    return finetune(
        args.task, args.data, args.base_model, subset=args.subset, epochs=args.epochs,
        seed=args.seed, progress=progress, **training,
    )


@_errors
def _cmd_finetune(args) -> int:
    from bct.model.finetune import MANIFEST

    path = _finetune(args, not args.no_progress, batch_size=args.batch_size, lr=args.lr,
                     max_len=args.max_len, num_threads=args.threads)
    if args.json:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        print(json.dumps({"path": str(path), **manifest}, indent=2))
    else:
        print(path)
    return 0


def _model_dir(args):
    """``--model``, else the cached fine-tune of ``--task`` (trained on first use)."""
    if args.model is not None:
        return args.model
    return _finetune(args, progress=not args.no_progress, max_len=args.train_max_len)


# ---------------------------------------------------------------------------------------------
# eval


def _print_eval(r: dict) -> None:
    print(f"{r['task']} dev, {r['rows']} rows, model {r['model']}, config {r['config_hash']}")
    for m in r["fp32"]:
        print(f"  {m:<9} FP32 {100 * r['fp32'][m]:6.2f}   BCT {100 * r['bct'][m]:6.2f}   "
              f"drop {r['drop_points'][m]:+.2f} points", end="")
        b = r["drop_bootstrap"].get(m)
        print(f" (bootstrap SE {b['se']:.2f}, 95% {b['ci95'][0]:+.2f}..{b['ci95'][1]:+.2f})"
              if b else "")
    print(f"  agreement with FP32 {100 * r['agreement']:.2f}%")
    c = r["compression"]
    print(f"  compression {c['whole_model']:.3f}x whole model, {c['weights_embeddings']:.3f}x weights+embeddings")
    t = r["throughput"]
    print(f"  throughput {t['bct_integer_seq_per_s']:.2f} seq/s integer vs {t['torch_fp32_seq_per_s']:.2f} "
          f"seq/s torch FP32 ({100 * t['ratio']:.1f}%)")


@_errors
def _cmd_eval(args) -> int:
    from bct.cli import config_from_args
    from bct.model.evaluate import evaluate

    cfg = config_from_args(args)
    model = _model_dir(args)
    r = evaluate(args.task, cfg, model, args.data, limit=args.limit, batch_size=args.batch_size,
                 max_len=args.max_len, progress=not args.no_progress)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print_eval(r)
    return 0


# ---------------------------------------------------------------------------------------------
# sweep


@_errors
def _cmd_sweep(args) -> int:
    from bct.cli import config_from_args
    from bct.sweep import run_sweep, sweep_configs

    cfg = config_from_args(args)
    sweep_configs(cfg, args.bits, args.blocks)  # refuse a bad combination before any work
    model = _model_dir(args)
    out = args.out or f"bct-sweep-{args.task}"
    r = run_sweep(args.task, cfg, model, out, args.data, bits=args.bits, blocks=args.blocks,
                  limit=args.limit, batch_size=args.batch_size, max_len=args.max_len,
                  progress=not args.no_progress)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        from bct.sweep import markdown

        print(markdown(r), end="")
        print(f"wrote {os.path.join(out, 'sweep.json')}, sweep.md, sweep.png")
    return 0


# ---------------------------------------------------------------------------------------------
# registration


def _add_finetune_options(p: argparse.ArgumentParser, *, for_eval: bool) -> None:
    what = "the fine-tuned baseline (when --model is not given)" if for_eval else "the run"
    p.add_argument("--subset", type=_subset, default=DEFAULT_SUBSET, metavar="N",
                   help=f"training rows of {what}: a seeded sample of N rows, or 'all' "
                        f"(default {DEFAULT_SUBSET})")
    p.add_argument("--epochs", type=_positive, default=1, help="training epochs (default 1)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--base-model", metavar="PATH", default=None,
                   help="checkpoint to fine-tune (default: all-MiniLM-L6-v2)")
    if for_eval:  # bct finetune's own --max-len; the other training settings are its defaults
        p.add_argument("--train-max-len", type=_positive, default=64, metavar="N",
                       help="truncation the baseline was fine-tuned with (bct finetune --max-len, "
                            "default 64)")


def _add_eval_options(p: argparse.ArgumentParser, add_config_options) -> None:
    p.add_argument("--model", metavar="PATH", default=None,
                   help="fine-tuned classification checkpoint (default: the cached `bct finetune` of the task)")
    p.add_argument("--data", metavar="DIR", default=None, help="GLUE root (default $BCT_GLUE_DIR)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="only the first N dev rows")
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--max-len", type=_positive, default=128, help="truncation in tokens (default 128)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_finetune_options(p, for_eval=True)
    add_config_options(p)


def register(subparsers, add_config_options) -> None:
    """Add ``quantize``, ``finetune``, ``eval`` and ``sweep`` to the ``bct`` parser."""
    p = subparsers.add_parser("quantize", help="write the memory images of a checkpoint (docs/images.md)")
    p.add_argument("--model", metavar="PATH", default=None, help="BERT checkpoint (default: all-MiniLM-L6-v2)")
    p.add_argument("--out", metavar="DIR", required=True, help="image directory (written atomically)")
    p.add_argument("--verify", action="store_true", help="read the images back and compare bit for bit")
    add_config_options(p)
    p.set_defaults(func=_cmd_quantize)

    p = subparsers.add_parser("finetune", help="fine-tune the FP32 baseline of a GLUE task (cached)")
    p.add_argument("--task", type=_task, required=True, help="SST-2, STS-B, MRPC or RTE")
    p.add_argument("--data", metavar="DIR", default=None, help="GLUE root (default $BCT_GLUE_DIR)")
    _add_finetune_options(p, for_eval=False)
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-len", type=_positive, default=64, help="truncation in tokens (default 64)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the checkpoint's manifest as JSON")
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("eval", help="FP32 vs BCT on a GLUE dev split")
    p.add_argument("--task", type=_task, required=True, help="SST-2, STS-B, MRPC or RTE")
    _add_eval_options(p, add_config_options)
    p.set_defaults(func=_cmd_eval)

    p = subparsers.add_parser("sweep", help="accuracy vs compression over weight bits x block size")
    p.add_argument("--task", type=_task, default="SST-2", help="GLUE task (default SST-2)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default bct-sweep-TASK)")
    p.add_argument("--bits", type=_int_list, default=(8, 6, 4), metavar="B,..",
                   help="weight widths (default 8,6,4)")
    p.add_argument("--blocks", type=_int_list, default=(8, 16, 32, 64, 128), metavar="N,..",
                   help="block sizes (default 8,16,32,64,128)")
    _add_eval_options(p, add_config_options)
    p.set_defaults(func=_cmd_sweep)
