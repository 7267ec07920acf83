"""GLUE evaluation of the integer model against its FP32 baseline.

:func:`prepare` tokenises a task's dev split once and runs the fine-tuned checkpoint in torch
FP32 (the baseline, timed); :func:`evaluate_config` quantizes the same checkpoint under one
:class:`~bct.config.Config`, runs the integer-only forward pass over the same batches (timed) and
reports the task's GLUE metrics for both, the drop in points, the agreement with the FP32
predictions, the compression ratio and the throughputs. :func:`evaluate` is the two in one call;
a sweep calls :func:`prepare` once and :func:`evaluate_config` per config.

Rows are sorted by token length before batching (padding is per batch, to the longest row), so
both models see the same, tightly padded batches; results are put back into file order. The
integer model's result for one sequence does not depend on its batch (padded keys are masked and
every reduction is per sequence).

Compression counts every stored integer and exponent (:meth:`QuantBert.storage_bits`, including
the classifier's padding rows) against 32 bits per parameter of the checkpoint; the
``weights_embeddings`` ratio counts only the embedding tables and the weight matrices.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bct.config import Config

from .checkpoint import BertWeights, CheckpointError, Encoding, load_bert, load_tokenizer
from .glue import GlueError, TaskSpec, compute_metrics, load_task, pearson, task_spec

__all__ = ["Prepared", "bct_logits", "compression", "drop_bootstrap", "evaluate", "evaluate_config",
           "is_weight", "prepare"]


@dataclass(frozen=True, eq=False)
class Prepared:
    """A task's dev split tokenised into batches, with the FP32 baseline's outputs.

    Attributes
    ----------
    spec : TaskSpec
    model_dir : pathlib.Path
        The fine-tuned checkpoint.
    weights : BertWeights
        Its float64 weights (quantized per config).
    batches : list of Encoding
        Length-sorted batches.
    order : numpy.ndarray
        File-order index of each sorted row (``sorted_row i`` is dev row ``order[i]``).
    labels : numpy.ndarray
        Gold labels in file order.
    fp32_logits : numpy.ndarray
        Torch FP32 outputs in file order, ``(N, num_labels)``.
    fp32_seconds : float
        Wall time of the FP32 forward passes (no tokenisation).
    max_len, batch_size : int
    """

    spec: TaskSpec
    model_dir: Path
    weights: BertWeights
    batches: list
    order: np.ndarray
    labels: np.ndarray
    fp32_logits: np.ndarray
    fp32_seconds: float
    max_len: int
    batch_size: int

    @property
    def rows(self) -> int:
        """Number of dev rows."""
        return len(self.labels)

    @property
    def fp32_metrics(self) -> dict:
        """The task's metrics of the FP32 baseline."""
        return compute_metrics(self.spec.name, self.fp32_logits, self.labels)


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not progress, leave=False)



def length_batches(full: Encoding, batch_size: int) -> tuple[list[Encoding], np.ndarray]:
    """Rows sorted by length (stable) in batches of ``batch_size``, each cut to its longest row
    (the order the FP32 and the integer passes both use), and that row order."""
    lengths = full.attention_mask.sum(axis=1)
    order = np.argsort(lengths, kind="stable")
    out = []
    for s in range(0, len(order), batch_size):
        sel = order[s:s + batch_size]
        t = int(lengths[sel].max())
        out.append(Encoding(*(np.ascontiguousarray(a[sel, :t]) for a in full)))
    return out, order

def prepare(
    task: str,
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_len: int = 128,
    progress: bool = False,
) -> Prepared:
    """Tokenise a dev split and run the FP32 baseline over it.

    Parameters
    ----------
    task : str
        GLUE task.
    model_dir : str or os.PathLike
        A fine-tuned ``*ForSequenceClassification`` checkpoint for ``task``
        (e.g. from :func:`bct.model.finetune.finetune`).
    data_dir : str or os.PathLike, optional
        GLUE root; defaults to ``$BCT_GLUE_DIR``.
    limit : int, optional
        Only the first ``limit`` dev rows (file order).
    batch_size : int, optional
    max_len : int, optional
        Truncation length in tokens.
    progress : bool, optional
        Show a progress bar on stderr.

    Returns
    -------
    Prepared

    Raises
    ------
    CheckpointError
        If the checkpoint has no classification head, or its number of outputs does not
        match the task.
    bct.model.glue.GlueError
        If the data cannot be read.
    """
    spec = task_spec(task)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    model_dir = Path(model_dir)
    weights = load_bert(model_dir)
    if not weights.has_classifier:
        raise CheckpointError(
            f"{model_dir} has no classification head: fine-tune it first (bct finetune --task {spec.name})"
        )
    if weights.num_labels != spec.num_labels:
        raise CheckpointError(
            f"{model_dir} has {weights.num_labels} outputs, but {spec.name} needs {spec.num_labels}"
        )
    data = load_task(spec.name, "dev", data_dir, limit=limit)
    if len(data) == 0:
        raise CheckpointError(f"{spec.name} dev split has no rows to evaluate")
    tok = load_tokenizer(model_dir)
    full = tok.encode(data.text_a, data.text_b, max_len=max_len, padding="longest")
    batches, order = length_batches(full, batch_size)
    logits, seconds = _torch_fp32(model_dir, batches, progress)
    return Prepared(
        spec=spec, model_dir=model_dir, weights=weights, batches=batches, order=order,
        labels=data.labels, fp32_logits=_unsort(logits, order), fp32_seconds=seconds,
        max_len=max_len, batch_size=batch_size,
    )


def _unsort(sorted_rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(sorted_rows)
    out[order] = sorted_rows
    return out


def _torch_fp32(model_dir: Path, batches: list, progress: bool) -> tuple[np.ndarray, float]:
    import torch
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    outs = []
    seconds = 0.0
    bar = _bar(sum(len(b.input_ids) for b in batches), "FP32 (torch)", progress)
    with torch.inference_mode():
        for enc in batches:
            args = {k: torch.from_numpy(v) for k, v in zip(
                ("input_ids", "token_type_ids", "attention_mask"), enc)}
            t0 = time.perf_counter()
            out = model(**args).logits
            seconds += time.perf_counter() - t0
            outs.append(out.double().numpy())
            bar.update(len(enc.input_ids))
    bar.close()
    return np.concatenate(outs), seconds


def is_weight(name: str) -> bool:
    """True for an embedding table or a weight matrix (stable tensor names)."""
    return name.startswith("embed.") and not name.startswith("embed.ln") or name.endswith(("_w", ".w"))


def compression(qm, weights: BertWeights) -> dict:
    """Compression ratios of a block-format model against FP32 storage of its checkpoint.

    Parameters
    ----------
    qm : bct.model.integer.QuantBert
    weights : BertWeights
        The float checkpoint ``qm`` was quantized from.

    Returns
    -------
    dict
        ``whole_model`` and ``weights_embeddings`` ratios (FP32 bits / stored bits, exponents
        included) and the bit counts behind them.
    """
    floats = weights.named_arrays()
    stored = qm.tensors()

    def bits(t):
        return int(t.mant.size * t.fmt.bits + t.exp.size * t.fmt.exp_bits)

    fp32_all = 32 * sum(a.size for a in floats.values())
    fp32_w = 32 * sum(a.size for n, a in floats.items() if is_weight(n))
    st_all = qm.storage_bits()
    st_w = sum(bits(t) for n, t in stored.items() if is_weight(n))
    return {
        "whole_model": fp32_all / st_all,
        "weights_embeddings": fp32_w / st_w,
        "fp32_bits": int(fp32_all),
        "stored_bits": int(st_all),
        "fp32_bits_weights_embeddings": int(fp32_w),
        "stored_bits_weights_embeddings": int(st_w),
    }


def bct_logits(prep: Prepared, qm, *, progress: bool = False) -> tuple[np.ndarray, float]:
    """Integer-only outputs of ``qm`` on the prepared batches, in file order, and the wall time
    of the forward passes."""
    from .integer import forward

    outs = []
    seconds = 0.0
    bar = _bar(prep.rows, f"BCT {qm.cfg.hash[:8]}", progress)
    for enc in prep.batches:
        t0 = time.perf_counter()
        out = forward(qm, enc)
        seconds += time.perf_counter() - t0
        outs.append(out.logits)
        bar.update(len(enc.input_ids))
    bar.close()
    return _unsort(np.concatenate(outs), prep.order), seconds


#: Resamples and seed of :func:`drop_bootstrap` in every evaluation report.
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


def drop_bootstrap(task: str, fp32, bct, labels, *, resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = BOOTSTRAP_SEED) -> dict:
    """Paired bootstrap of each metric's drop (FP32 minus BCT, in points).

    Each resample draws the dev rows with replacement (``numpy.random.default_rng(seed)``) and
    scores both models on the same rows, so the spread is that of the difference, which is
    what a target on the drop is about: with a few hundred rows a drop of a few tenths of a
    point can be a handful of flipped rows.

    Parameters
    ----------
    task : str
    fp32, bct : array_like
        Both models' predictions, as for :func:`~bct.model.glue.compute_metrics`.
    labels : array_like
    resamples, seed : int

    Returns
    -------
    dict
        Per metric: ``se`` (standard deviation of the resampled drops), ``ci95`` (2.5th and
        97.5th percentiles) and ``resamples`` (those where both metrics are defined; a
        correlation of a constant resample is not).
    """
    fp32, bct, labels = np.asarray(fp32), np.asarray(bct), np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    drops: dict[str, list[float]] = {}
    for _ in range(resamples):
        i = rng.integers(0, n, n)
        try:
            a = compute_metrics(task, fp32[i], labels[i])
            b = compute_metrics(task, bct[i], labels[i])
        except GlueError:
            continue
        for k in a:
            drops.setdefault(k, []).append(100.0 * (a[k] - b[k]))
    return {k: {"se": float(np.std(d)), "ci95": [float(np.percentile(d, 2.5)),
                                                float(np.percentile(d, 97.5))],
                "resamples": len(d)} for k, d in drops.items()}


def evaluate_config(prep: Prepared, cfg: Config, *, progress: bool = False) -> dict:
    """Quantize the prepared checkpoint under ``cfg`` and evaluate it on the prepared split.

    Returns
    -------
    dict
        ``config_hash``, ``config``, ``bct`` (metrics), ``drop_points`` (FP32 minus BCT, in
        points), ``drop_bootstrap`` (:func:`drop_bootstrap`: standard error and 95 % interval
        of each drop), ``agreement`` (classification: fraction of equal predicted classes;
        regression: Pearson of the two predictions), ``compression`` (see
        :func:`compression`), ``bct_seconds``, ``bct_seq_per_s``.
    """
    from .integer import quantize

    qm = quantize(prep.weights, cfg)
    logits, seconds = bct_logits(prep, qm, progress=progress)
    spec = prep.spec
    metrics = compute_metrics(spec.name, logits, prep.labels)
    fp32 = prep.fp32_metrics
    if spec.is_regression:
        agreement = pearson(logits[:, 0], prep.fp32_logits[:, 0])
    else:
        agreement = float(np.mean(logits.argmax(1) == prep.fp32_logits.argmax(1)))
    return {
        "config_hash": cfg.hash,
        "config": cfg.to_dict(),
        "bct": metrics,
        "drop_points": {k: 100.0 * (fp32[k] - metrics[k]) for k in metrics},
        "drop_bootstrap": drop_bootstrap(spec.name, prep.fp32_logits, logits, prep.labels),
        "agreement": agreement,
        "compression": compression(qm, prep.weights),
        "bct_seconds": seconds,
        "bct_seq_per_s": prep.rows / seconds if seconds > 0 else float("inf"),
    }


def evaluate(
    task: str,
    cfg: Config,
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_len: int = 128,
    progress: bool = False,
) -> dict:
    """FP32 against BCT on a task's dev split (see :func:`prepare`, :func:`evaluate_config`).

    Returns
    -------
    dict
        ``task``, ``split``, ``rows``, ``model``, ``max_len``, ``batch_size``, ``main_metric``,
        ``fp32`` (metrics), the fields of :func:`evaluate_config`, and ``throughput``
        (integer and torch FP32 sequences per second on this machine, and their ratio).
    """
    prep = prepare(task, model_dir, data_dir, limit=limit, batch_size=batch_size, max_len=max_len,
                   progress=progress)
    res = evaluate_config(prep, cfg, progress=progress)
    fp32_rate = prep.rows / prep.fp32_seconds if prep.fp32_seconds > 0 else float("inf")
    return {
        "task": prep.spec.name,
        "split": "dev",
        "rows": prep.rows,
        "model": str(prep.model_dir),
        "max_len": max_len,
        "batch_size": batch_size,
        "main_metric": prep.spec.main_metric,
        "fp32": prep.fp32_metrics,
        **res,
        "throughput": {
            "bct_integer_seq_per_s": res["bct_seq_per_s"],
            "torch_fp32_seq_per_s": fp32_rate,
            "ratio": res["bct_seq_per_s"] / fp32_rate,
            "torch_threads": _torch_threads(),
        },
        "fp32_seconds": prep.fp32_seconds,
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
