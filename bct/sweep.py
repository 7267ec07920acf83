"""Accuracy against compression over weight widths and block sizes (``bct sweep``).

For every weight width ``b`` and block size ``B`` the config is the base config with
``weight_bits = b``, ``act_bits = 8``, ``weight_block_size = B`` and
``block_size = min(base.block_size, B)``: weights and embedding tables use blocks of ``B``; the
activation / vector block cannot exceed the model's head width (32 for MiniLM), so for ``B``
above the base block size only the weight blocks grow. The FP32 baseline runs once; each config
is quantized and evaluated on the same dev rows (:mod:`bct.model.evaluate`).

Outputs in the output directory (each written atomically, and rewritten after every config so an
interrupted sweep keeps its finished rows): ``sweep.json`` (every result), ``sweep.md`` (a
markdown table) and ``sweep.png`` (metric drop against compression ratio, one line per weight
width).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from bct.config import Config

__all__ = ["BITS", "BLOCKS", "sweep_configs", "run_sweep", "markdown", "plot"]

#: Default weight widths and block sizes of the sweep.
BITS = (8, 6, 4)
BLOCKS = (8, 16, 32, 64, 128)


def sweep_configs(base: Config, bits=BITS, blocks=BLOCKS) -> list[Config]:
    """The sweep's configs, weight width major, block size minor (see the module docstring).

    Raises
    ------
    bct.config.ConfigError
        If a combination is not a valid config.
    """
    return [
        base.replace(weight_bits=b, act_bits=8, weight_block_size=B, block_size=min(base.block_size, B))
        for b in bits
        for B in blocks
    ]


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def markdown(result: dict) -> str:
    """The sweep as a markdown table (one row per config)."""
    main = result["main_metric"]
    metrics = list(result["fp32"])
    head = (
        ["weight bits", "weight block", "act block", "compression (weights+emb)", "compression (whole)"]
        + [f"BCT {m}" for m in metrics]
        + [f"drop {main} (points)", "agreement"]
    )
    lines = [
        f"# {result['task']} dev ({result['rows']} rows): FP32 "
        + ", ".join(f"{m} {100 * v:.2f}" for m, v in result["fp32"].items()),
        "",
        "| " + " | ".join(head) + " |",
        "|" + " --- |" * len(head),
    ]
    for r in result["rows_results"]:
        c = r["config"]
        cells = [
            str(c["weight_bits"]),
            str(c["weight_block_size"]),
            str(c["block_size"]),
            f"{r['compression']['weights_embeddings']:.3f}x",
            f"{r['compression']['whole_model']:.3f}x",
            *(f"{100 * r['bct'][m]:.2f}" for m in metrics),
            f"{r['drop_points'][main]:+.2f}",
            f"{100 * r['agreement']:.2f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """PNG of the main metric's drop (points) against the weights+embeddings compression ratio."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = result["main_metric"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    by_bits: dict = {}
    for r in result["rows_results"]:
        by_bits.setdefault(r["config"]["weight_bits"], []).append(r)
    for bits, rows in sorted(by_bits.items(), reverse=True):
        rows = sorted(rows, key=lambda r: r["compression"]["weights_embeddings"])
        x = [r["compression"]["weights_embeddings"] for r in rows]
        y = [r["drop_points"][main] for r in rows]
        ax.plot(x, y, "o-", label=f"W{bits} A8")
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(f"B{r['config']['weight_block_size']}", (xi, yi), textcoords="offset points",
                        xytext=(3, 4), fontsize=7)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("compression ratio vs FP32 (weights + embeddings, exponents included)")
    ax.set_ylabel(f"{main} drop vs FP32 (points)")
    ax.set_title(f"{result['task']} dev, {result['rows']} rows, config base {result['base_config_hash']}")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def run_sweep(
    task: str,
    base: Config,
    model_dir: str | os.PathLike,
    out: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    bits=BITS,
    blocks=BLOCKS,
    limit: int | None = None,
    batch_size: int = 32,
    max_len: int = 128,
    progress: bool = False,
) -> dict:
    """Evaluate every sweep config on a task's dev split; write JSON, markdown and PNG.

    Parameters
    ----------
    task : str
    base : Config
        Fields other than the swept ones (e.g. ``weight_exp_bits``) come from here.
    model_dir : str or os.PathLike
        Fine-tuned checkpoint of ``task``.
    out : str or os.PathLike
        Output directory (created).
    data_dir : str or os.PathLike, optional
    bits, blocks : sequence of int
        Weight widths and block sizes.
    limit : int, optional
        Only the first ``limit`` dev rows.
    batch_size, max_len : int
    progress : bool

    Returns
    -------
    dict
        The content of ``sweep.json``.
    """
    from bct.model.evaluate import prepare, evaluate_config

    configs = sweep_configs(base, bits, blocks)  # validate before the slow part
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(task, model_dir, data_dir, limit=limit, batch_size=batch_size, max_len=max_len,
                   progress=progress)
    result = {
        "task": prep.spec.name,
        "split": "dev",
        "rows": prep.rows,
        "model": str(prep.model_dir),
        "max_len": max_len,
        "batch_size": batch_size,
        "main_metric": prep.spec.main_metric,
        "base_config_hash": base.hash,
        "bits": list(bits),
        "blocks": list(blocks),
        "fp32": prep.fp32_metrics,
        "fp32_seq_per_s": prep.rows / prep.fp32_seconds if prep.fp32_seconds > 0 else None,
        "complete": False,
        "rows_results": [],
    }
    for i, cfg in enumerate(configs):
        result["rows_results"].append(evaluate_config(prep, cfg, progress=progress))
        result["complete"] = i == len(configs) - 1
        _atomic_write(out / "sweep.json", (json.dumps(result, indent=2) + "\n").encode())
        _atomic_write(out / "sweep.md", markdown(result).encode())
        plot(result, out / "sweep.png")
    return result
