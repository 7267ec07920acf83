"""GLUE tasks in the standard GLUE TSV layout, and their metrics.

The data directory holds one folder per task (``SST-2``, ``STS-B``, ``MRPC``, ``RTE``), each with
``train.tsv`` and ``dev.tsv`` starting with a header row. Files are read as UTF-8, tab-separated,
with ``csv.QUOTE_NONE`` (GLUE text contains bare quote characters that must stay literal).
Columns are found by header name, so extra columns (STS-B's genre, MRPC's ids, RTE's index) are
ignored.

The data directory is the ``data_dir`` argument, else the environment variable
:data:`ENV_VAR` (``BCT_GLUE_DIR``). Every failure raises :class:`GlueError` with a fixed message.

Labels: SST-2 and MRPC use the file's ``0``/``1``; RTE maps ``entailment`` to 0 and
``not_entailment`` to 1 (the usual GLUE order); STS-B keeps its float score in ``[0, 5]``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "ENV_VAR",
    "GlueError",
    "TASKS",
    "TaskData",
    "TaskSpec",
    "accuracy",
    "compute_metrics",
    "f1",
    "glue_dir",
    "load_task",
    "pearson",
    "spearman",
    "task_spec",
]

#: Environment variable naming the GLUE data directory when no ``data_dir`` is passed.
ENV_VAR = "BCT_GLUE_DIR"

SPLITS = ("train", "dev")


class GlueError(ValueError):
    """GLUE data cannot be found or parsed, or a task / split / metric input is invalid."""


@dataclass(frozen=True)
class TaskSpec:
    """How one GLUE task is laid out and scored.

    Attributes
    ----------
    name : str
        Canonical name, also the folder name (``"SST-2"``).
    num_labels : int
        Number of classes; 1 means regression (STS-B).
    text_columns : tuple of str
        Header names of the one or two text columns.
    label_column : str
        Header name of the label column.
    label_names : tuple of str
        The label strings in class-id order (empty for regression).
    metrics : tuple of str
        Metric names reported by :func:`compute_metrics`.
    main_metric : str
        The metric that ranks models on this task.
    """

    name: str
    num_labels: int
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str

    @property
    def is_regression(self) -> bool:
        """True for a regression task (``num_labels == 1``)."""
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        """True when each example is a sentence pair."""
        return len(self.text_columns) == 2


#: The supported tasks, by canonical name.
TASKS: dict[str, TaskSpec] = {
    "SST-2": TaskSpec("SST-2", 2, ("sentence",), "label", ("0", "1"), ("accuracy",), "accuracy"),
    "STS-B": TaskSpec(
        "STS-B", 1, ("sentence1", "sentence2"), "score", (), ("pearson", "spearman"), "pearson"
    ),
    "MRPC": TaskSpec(
        "MRPC", 2, ("#1 String", "#2 String"), "Quality", ("0", "1"), ("accuracy", "f1"), "f1"
    ),
    "RTE": TaskSpec(
        "RTE", 2, ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
        ("accuracy",), "accuracy",
    ),
}


def _norm(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


_ALIASES = {_norm(k): k for k in TASKS}


def task_spec(task: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``task`` (case, ``-`` and ``_`` ignored: ``"sst2"`` works).

    Raises
    ------
    GlueError
        If the task is unknown.
    """
    key = _ALIASES.get(_norm(task)) if isinstance(task, str) else None
    if key is None:
        raise GlueError(f"unknown GLUE task {task!r}: expected one of {', '.join(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True, eq=False)
class TaskData:
    """The examples of one split of one task.

    Attributes
    ----------
    task : str
        Canonical task name.
    split : str
        ``"train"`` or ``"dev"``.
    text_a : list of str
        First sentences.
    text_b : list of str or None
        Second sentences for pair tasks, else None.
    labels : numpy.ndarray
        int64 class ids, or float64 scores for regression.
    """

    task: str
    split: str
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)


def glue_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the GLUE data directory: ``data_dir``, else ``$BCT_GLUE_DIR``.

    Raises
    ------
    GlueError
        If neither is given, or the directory does not exist.
    """
    if data_dir is None:
        data_dir = os.environ.get(ENV_VAR) or None
        if data_dir is None:
            raise GlueError(f"no GLUE data directory: pass data_dir or set {ENV_VAR}")
    path = Path(data_dir)
    if not path.is_dir():
        raise GlueError(f"GLUE data directory does not exist: {path}")
    return path


def load_task(
    task: str, split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
) -> TaskData:
    """Read one split of a GLUE task.

    Parameters
    ----------
    task : str
        ``"SST-2"``, ``"STS-B"``, ``"MRPC"`` or ``"RTE"`` (see :func:`task_spec`).
    split : str
        ``"train"`` or ``"dev"``.
    data_dir : str or os.PathLike, optional
        GLUE root directory; defaults to ``$BCT_GLUE_DIR``.
    limit : int, optional
        Keep only the first ``limit`` examples (file order).

    Returns
    -------
    TaskData

    Raises
    ------
    GlueError
        Unknown task or split, missing directory or file, missing header column, a row with
        the wrong number of fields, or an invalid label.
    """
    spec = task_spec(task)
    if split not in SPLITS:
        raise GlueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    if limit is not None and (not isinstance(limit, (int, np.integer)) or limit < 0):
        raise GlueError(f"limit must be a non-negative integer, got {limit!r}")
    path = glue_dir(data_dir) / spec.name / f"{split}.tsv"
    if not path.is_file():
        raise GlueError(f"no {split}.tsv for {spec.name}: {path} does not exist")

    text_a: list[str] = []
    text_b: list[str] = []
    labels: list = []
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise GlueError(f"{path}: empty file (expected a header row)")
        cols = {}
        for name in (*spec.text_columns, spec.label_column):
            if name not in header:
                raise GlueError(f"{path}: header lacks column {name!r}")
            cols[name] = header.index(name)
        for row in reader:
            if limit is not None and len(labels) >= limit:
                break
            lineno = reader.line_num
            if not row or row == [""]:
                continue  # a blank line, e.g. a trailing one
            if len(row) != len(header):
                raise GlueError(
                    f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(row)}"
                )
            raw = row[cols[spec.label_column]].strip()
            labels.append(_parse_label(spec, raw, f"{path}:{lineno}"))
            text_a.append(row[cols[spec.text_columns[0]]])
            if spec.is_pair:
                text_b.append(row[cols[spec.text_columns[1]]])
    dtype = np.float64 if spec.is_regression else np.int64
    return TaskData(
        task=spec.name,
        split=split,
        text_a=text_a,
        text_b=text_b if spec.is_pair else None,
        labels=np.asarray(labels, dtype=dtype),
    )


def _parse_label(spec: TaskSpec, raw: str, where: str):
    if spec.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
        if not np.isfinite(value):
            raise GlueError(f"{where}: bad {spec.label_column} {raw!r} (expected a number)")
        return value
    if raw not in spec.label_names:
        raise GlueError(
            f"{where}: bad {spec.label_column} {raw!r} (expected one of {', '.join(spec.label_names)})"
        )
    return spec.label_names.index(raw)


# --------------------------------------------------------------------------------------------
# Metrics


def _pair(pred, gold, name: str) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(gold)
    if p.ndim != 1 or p.shape != g.shape:
        raise GlueError(f"{name}: predictions {p.shape} and labels {g.shape} must be equal 1-D shapes")
    if p.size == 0:
        raise GlueError(f"{name}: no examples")
    return p, g


def accuracy(pred, gold) -> float:
    """Fraction of ``pred == gold``.

    Parameters
    ----------
    pred, gold : array_like
        Class ids, 1-D, equal length.

    Returns
    -------
    float
    """
    p, g = _pair(pred, gold, "accuracy")
    return float(np.mean(p == g))


def f1(pred, gold, positive: int = 1) -> float:
    """F1 score of class ``positive`` (0.0 when it is never predicted nor present).

    Parameters
    ----------
    pred, gold : array_like
        Class ids, 1-D, equal length.
    positive : int, optional
        The positive class.

    Returns
    -------
    float
    """
    p, g = _pair(pred, gold, "f1")
    tp = int(np.sum((p == positive) & (g == positive)))
    fp = int(np.sum((p == positive) & (g != positive)))
    fn = int(np.sum((p != positive) & (g == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def pearson(pred, gold) -> float:
    """Pearson correlation coefficient.

    Raises
    ------
    GlueError
        If either input is constant (the coefficient is undefined).
    """
    p, g = _pair(pred, gold, "pearson")
    p = p.astype(np.float64) - np.mean(p)
    g = g.astype(np.float64) - np.mean(g)
    denom = np.sqrt(np.sum(p * p) * np.sum(g * g))
    if denom == 0:
        raise GlueError("pearson: undefined for a constant input")
    return float(np.clip(np.sum(p * g) / denom, -1.0, 1.0))


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as ``scipy.stats.rankdata``)."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = avg[np.cumsum(new) - 1]
    return ranks


def spearman(pred, gold) -> float:
    """Spearman rank correlation (Pearson of average ranks).

    Raises
    ------
    GlueError
        If either input is constant.
    """
    p, g = _pair(pred, gold, "spearman")
    return pearson(_rankdata(p), _rankdata(g))


def compute_metrics(task: str, predictions, labels) -> dict[str, float]:
    """Every metric of ``task`` (see :attr:`TaskSpec.metrics`).

    Parameters
    ----------
    task : str
    predictions : array_like
        Class ids ``(N,)`` or logits ``(N, num_labels)`` (arg-maxed) for classification;
        scores ``(N,)`` or ``(N, 1)`` for regression.
    labels : array_like
        Gold labels ``(N,)``, e.g. :attr:`TaskData.labels`.

    Returns
    -------
    dict of str to float
        Keyed by metric name, in :attr:`TaskSpec.metrics` order.
    """
    spec = task_spec(task)
    pred = np.asarray(predictions)
    if spec.is_regression:
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
    elif pred.ndim == 2:
        if pred.shape[1] != spec.num_labels:
            raise GlueError(
                f"{spec.name}: logits have {pred.shape[1]} columns, expected {spec.num_labels}"
            )
        pred = pred.argmax(axis=1)
    funcs = {"accuracy": accuracy, "f1": f1, "pearson": pearson, "spearman": spearman}
    return {m: funcs[m](pred, labels) for m in spec.metrics}
