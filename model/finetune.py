"""Fine-tune the FP32 baseline of a GLUE task on CPU, with a content-keyed on-disk cache.

:func:`finetune` trains a ``BertForSequenceClassification`` (regression head for STS-B) from a
BERT checkpoint and saves it, with its tokenizer, as a ``transformers`` checkpoint directory that
:func:`bct.model.checkpoint.load_bert` reads. The directory lives under :func:`cache_root`
(``$BCT_CACHE_DIR`` or ``platformdirs.user_cache_dir("bct-gen")``) in ``finetune/``, named by a
hash of every argument that affects the result, the bytes of the training file and of the base
checkpoint; a second call with the same arguments returns the cached directory without training.
The directory is written under a temporary name next to its final place and renamed into place,
so a half-written checkpoint is never visible.

Training recipe: AdamW (no weight decay on biases and LayerNorm), linear warm-up over the first
``warmup`` fraction of steps then linear decay to 0, gradient-norm clipping, dropout as in the
checkpoint's config, a seeded shuffle every epoch, and per-batch dynamic padding (to the longest
row of the batch, at most ``max_len`` tokens).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from .checkpoint import WEIGHT_FILES, _check_dir, load_tokenizer
from .glue import GlueError, glue_dir, load_task, task_spec

__all__ = ["CACHE_ENV_VAR", "FinetuneError", "MANIFEST", "cache_root", "finetune"]

#: Environment variable that overrides the cache root (used by the tests).
CACHE_ENV_VAR = "BCT_CACHE_DIR"

#: File written into every fine-tuned checkpoint: its arguments and training statistics.
MANIFEST = "bct_finetune.json"

#: Bump when the training code changes what a given set of arguments produces.
RECIPE_VERSION = 1


class FinetuneError(ValueError):
    """Invalid fine-tuning arguments."""


def cache_root() -> Path:
    """Root of BCT-Gen's cache: ``$BCT_CACHE_DIR``, else ``platformdirs.user_cache_dir("bct-gen")``.

    Returns
    -------
    pathlib.Path
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("bct-gen"))


def _file_digest(path: Path, h) -> None:
    h.update(path.name.encode())
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def _model_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    _file_digest(model_dir / "config.json", h)
    for name in WEIGHT_FILES:
        if (model_dir / name).is_file():
            _file_digest(model_dir / name, h)
            if name.endswith(".index.json"):
                index = json.loads((model_dir / name).read_text(encoding="utf-8"))
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    _file_digest(model_dir / shard, h)
            break
    return h.hexdigest()


def finetune(
    task: str,
    data_dir: str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    *,
    subset: int | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 5e-5,
    max_len: int = 64,
    seed: int = 0,
    warmup: float = 0.1,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    progress: bool = True,
    num_threads: int | None = None,
) -> Path:
    """Fine-tune a BERT checkpoint on a GLUE task's train split; return the checkpoint directory.

    Parameters
    ----------
    task : str
        GLUE task (see :data:`bct.model.glue.TASKS`).
    data_dir : str or os.PathLike, optional
        GLUE root directory; defaults to ``$BCT_GLUE_DIR``.
    model_path : str or os.PathLike, optional
        Base checkpoint; defaults to :func:`bct.model.checkpoint.default_model_path`.
    subset : int, optional
        Train on a seeded random sample of this many training rows (all rows if None or
        larger than the split).
    epochs : int, optional
    batch_size : int, optional
    lr : float, optional
        Peak learning rate of AdamW.
    max_len : int, optional
        Truncation length in tokens.
    seed : int, optional
        Seeds the head initialisation, dropout, the subset and the shuffling.
    warmup : float, optional
        Fraction of the optimiser steps spent in linear warm-up.
    weight_decay : float, optional
        AdamW weight decay (not applied to biases and LayerNorm parameters).
    grad_clip : float, optional
        Maximum global gradient norm.
    progress : bool, optional
        Show a tqdm progress bar. Does not affect the result or the cache key.
    num_threads : int, optional
        ``torch.set_num_threads`` for the run (restored afterwards); None keeps torch's
        setting. Does not affect the cache key.

    Returns
    -------
    pathlib.Path
        A directory with ``config.json``, the weights, the tokenizer files and
        :data:`MANIFEST`.

    Raises
    ------
    FinetuneError
        On an invalid argument.
    bct.model.glue.GlueError, bct.model.checkpoint.CheckpointError
        If the data or the base checkpoint cannot be read.
    """
    spec = task_spec(task)
    _check_args(subset, epochs, batch_size, lr, max_len, warmup, weight_decay, grad_clip)
    data_root = glue_dir(data_dir)
    train_file = data_root / spec.name / "train.tsv"
    if not train_file.is_file():
        raise GlueError(f"no train.tsv for {spec.name}: {train_file} does not exist")
    model_dir, _ = _check_dir(model_path)

    args = {
        "recipe": RECIPE_VERSION,
        "task": spec.name,
        "subset": subset,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "max_len": max_len,
        "seed": seed,
        "warmup": warmup,
        "weight_decay": weight_decay,
        "grad_clip": grad_clip,
    }
    h = hashlib.sha256()
    _file_digest(train_file, h)
    data_digest = h.hexdigest()
    model_digest = _model_digest(model_dir)
    key_src = json.dumps({**args, "data": data_digest, "model": model_digest}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    final = cache_root() / "finetune" / f"{spec.name}-{key}"
    if (final / MANIFEST).is_file():
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        stats = _train(spec, data_root, model_dir, tmp, args, progress, num_threads)
        manifest = {
            **args,
            "data_dir": str(data_root),
            "data_sha256": data_digest,
            "model_path": str(model_dir),
            "model_sha256": model_digest,
            "key": key,
            **stats,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _check_args(subset, epochs, batch_size, lr, max_len, warmup, weight_decay, grad_clip) -> None:
    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if subset is not None and (not is_int(subset) or subset < 1):
        raise FinetuneError(f"subset must be a positive integer or None, got {subset!r}")
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if not is_int(v) or v < 1:
            raise FinetuneError(f"{name} must be a positive integer, got {v!r}")
    if not is_int(max_len) or max_len < 3:
        raise FinetuneError(f"max_len must be an integer >= 3, got {max_len!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise FinetuneError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(warmup, (int, float)) and 0 <= warmup < 1):
        raise FinetuneError(f"warmup must be in [0, 1), got {warmup!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise FinetuneError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not (isinstance(grad_clip, (int, float)) and grad_clip > 0):
        raise FinetuneError(f"grad_clip must be > 0, got {grad_clip!r}")


def _train(spec, data_root: Path, model_dir: Path, out: Path, args: dict, progress: bool,
           num_threads: int | None) -> dict:
    """Train and save into ``out``; return statistics for the manifest."""
    import torch
    import transformers
    from tqdm.auto import tqdm

    data = load_task(spec.name, "train", data_root)
    rng = np.random.default_rng(args["seed"])
    n_all = len(data)
    if n_all == 0:
        raise GlueError(f"{spec.name} train split is empty")
    idx = np.arange(n_all)
    if args["subset"] is not None and args["subset"] < n_all:
        idx = np.sort(rng.choice(n_all, size=args["subset"], replace=False))
    text_a = [data.text_a[i] for i in idx]
    text_b = None if data.text_b is None else [data.text_b[i] for i in idx]
    labels = data.labels[idx]

    tok = load_tokenizer(model_dir)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(args["seed"])
        kwargs = {"num_labels": spec.num_labels}
        if spec.is_regression:
            kwargs["problem_type"] = "regression"
        else:
            kwargs["problem_type"] = "single_label_classification"
            kwargs["id2label"] = dict(enumerate(spec.label_names))
            kwargs["label2id"] = {name: i for i, name in enumerate(spec.label_names)}
        model = transformers.BertForSequenceClassification.from_pretrained(
            str(model_dir), dtype=torch.float32, **kwargs
        )
        model.train()

        no_decay = ("bias", "LayerNorm.weight", "LayerNorm.bias")
        groups = [
            {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
             "weight_decay": args["weight_decay"]},
            {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)],
             "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=args["lr"])
        bs = args["batch_size"]
        steps_per_epoch = math.ceil(len(idx) / bs)
        total = steps_per_epoch * args["epochs"]
        warm = int(round(args["warmup"] * total))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.0, (total - step) / max(1, total - warm))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        label_t = torch.tensor(labels, dtype=torch.float32 if spec.is_regression else torch.long)

        t0 = time.perf_counter()
        losses: list[float] = []
        bar = tqdm(total=total, desc=f"finetune {spec.name}", disable=not progress, unit="step")
        for _ in range(args["epochs"]):
            order = rng.permutation(len(idx))
            for s in range(steps_per_epoch):
                sel = order[s * bs:(s + 1) * bs]
                enc = tok.encode(
                    [text_a[i] for i in sel],
                    None if text_b is None else [text_b[i] for i in sel],
                    max_len=args["max_len"],
                    padding="longest",
                )
                y = label_t[sel]
                result = model(
                    input_ids=torch.from_numpy(enc.input_ids),
                    token_type_ids=torch.from_numpy(enc.token_type_ids),
                    attention_mask=torch.from_numpy(enc.attention_mask),
                    labels=y.unsqueeze(1) if spec.is_regression else y,
                )
                opt.zero_grad(set_to_none=True)
                result.loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args["grad_clip"])
                opt.step()
                sched.step()
                losses.append(float(result.loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        bar.close()
        seconds = time.perf_counter() - t0

        model.eval()
        model.save_pretrained(str(out))
        tok.hf.save_pretrained(str(out))
    finally:
        if num_threads is not None:
            torch.set_num_threads(old_threads)
    return {
        "train_rows": int(len(idx)),
        "steps": int(total),
        "train_seconds": round(seconds, 3),
        "first_loss": losses[0],
        "final_loss": float(np.mean(losses[-min(20, len(losses)):])),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
