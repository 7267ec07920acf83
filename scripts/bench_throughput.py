"""Print flat JSON: integer-model throughput against torch FP32 on the same real sentences.

Both models run the same length-sorted batches (padding per batch to its longest row, as
``bct eval`` does) with the same thread count (torch intra-op threads, the numpy BLAS pool and
the integer block GEMMs' threads, :func:`bct.model.matmul.set_threads`, are all set to
``--threads``). After one untimed warm-up pass each, the two models alternate
pass by pass for ``--repeat`` rounds, so a changing machine load hits both alike; ``ratio`` is
best against best, ``ratio_median_of_rounds`` the median of the per-round ratios. The integer
forward is also timed per stage (the kernels :mod:`bct.model.integer` calls, wrapped by timers)
in a separate pass (``--gemm-path float`` times the float block GEMMs instead of the default
choice, for comparison), and ``--profile N`` adds the N functions with the largest own time under
cProfile (a further pass; profiling overhead is not in the throughput figures).

``--malloc-keep`` sets glibc's malloc (``mallopt``, before anything is loaded) to keep freed
memory in the process (trim threshold 1 GiB, top pad 256 MiB, mmap threshold 32 MiB) instead of
returning it to the kernel and faulting fresh zeroed pages in again; both models run under it
(otherwise the integer model's int64 arrays cost 10,000-36,000 page faults per pass here). Off by default;
``malloc_keep`` in the output says which.

Sentences: the first ``--rows`` rows of SST-2 dev from ``$BCT_GLUE_DIR``, or a built-in list
(repeated to ``--rows``) when the variable is unset. Model: ``--model`` (default: the built-in
all-MiniLM-L6-v2); FP32 is ``transformers.BertModel`` of the same checkpoint (last hidden state).

    BCT_GLUE_DIR=/work/shared/glue python scripts/bench_throughput.py --rows 128
    python scripts/bench_throughput.py --set weight_bits=4 --set weight_block_size=128
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", metavar="NAME")
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N")
    p.add_argument("--gemm-path", choices=("auto", "int8", "float"), default="auto",
                   help="block GEMM path of the integer model (all give the same integers)")
    p.add_argument("--malloc-keep", action="store_true",
                   help="glibc malloc keeps freed memory (mallopt), for both models")
    return p.parse_args()


def malloc_keep() -> bool:
    """Raise glibc's trim, top-pad and mmap thresholds (see the module docstring); False when
    the C library has no ``mallopt`` or refuses a setting."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD
    return all(mallopt(k, v) == 1 for k, v in ((-1, 1 << 30), (-2, 1 << 28), (-3, 1 << 25)))


_ARGS = _parse() if __name__ == "__main__" else None
_MALLOC_KEEP = False
if _ARGS is not None:  # the BLAS pool size is read when numpy loads
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(_ARGS.threads)
    _MALLOC_KEEP = _ARGS.malloc_keep and malloc_keep()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import time  # noqa: E402


BUILTIN = [
    "The quick brown fox jumps over the lazy dog near the quiet river bank today.",
    "A man is playing a guitar on the stage tonight.",
    "Blockwise compression keeps accuracy without retraining.",
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the "
    "production 's austere locales .",
    "the movie is a disaster from start to finish, with wooden performances and a plot that "
    "makes no sense at all.",
    "A short one.",
]


def sentences(rows: int) -> tuple[list[str], str]:
    """The benchmark's sentences and where they come from."""
    if os.environ.get("BCT_GLUE_DIR"):
        from bct.model.glue import load_task

        data = load_task("SST-2", "dev", limit=rows)
        return list(data.text_a), f"SST-2 dev, first {len(data.text_a)} rows"
    return [BUILTIN[i % len(BUILTIN)] for i in range(rows)], "built-in sentences"


def batches(tok, texts, batch_size: int, max_len: int):
    """Length-sorted batches, each padded to its longest row (as bct eval does)."""
    from bct.model.evaluate import length_batches

    full = tok.encode(texts, max_len=max_len, padding="longest")
    return length_batches(full, batch_size)[0], int(full.attention_mask.sum())


def paired_times(fns, repeat: int) -> list[list[float]]:
    """Wall seconds of each function, ``repeat`` rounds after one warm-up round; the functions
    alternate within a round so a changing machine load hits them alike."""
    for fn in fns:
        fn()  # warm-up (allocations, lazy imports, derived constants)
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def stage_breakdown(qm, encs) -> dict:
    """Wall seconds per kernel called by :func:`bct.model.integer.forward` (one pass)."""
    from bct.model import integer

    names = ["linear", "matmul", "add", "add_requantize", "aligned_requantize", "requantize",
             "reblock_transposed", "softmax", "gelu", "gelu_acc", "layernorm", "add_layernorm",
             "aligned_layernorm", "_residual_scale", "round_shift", "round_div",
             "to_fixed", "encode", "tanh_fixed", "mean_pool"]
    acc = {n: 0.0 for n in names}
    saved = {}

    def wrap(name, f):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[name] += time.perf_counter() - t0
        return timed

    for n in names:
        if hasattr(integer, n):
            saved[n] = getattr(integer, n)
            setattr(integer, n, wrap(n, saved[n]))
    try:
        t0 = time.perf_counter()
        for enc in encs:
            integer.forward(qm, enc)
        total = time.perf_counter() - t0
    finally:
        for n, f in saved.items():
            setattr(integer, n, f)
    out = {f"stage_s.{n}": round(v, 4) for n, v in acc.items() if n in saved and v > 0}
    out["stage_s.total"] = round(total, 4)
    out["stage_s.other"] = round(total - sum(acc.values()), 4)
    return out


def profile(qm, encs, top: int) -> dict:
    import cProfile
    import pstats

    from bct.model import integer

    pr = cProfile.Profile()
    pr.enable()
    for enc in encs:
        integer.forward(qm, enc)
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    out = {}
    for (file, line, fn), (cc, nc, tt, ct, _) in rows:
        key = f"profile_tottime_s.{os.path.basename(file)}:{line}:{fn}"
        out[key] = round(tt, 4)
    return out


def main() -> None:
    args = _ARGS
    import torch
    import transformers

    from bct.cli import config_from_args
    from bct.model import integer
    from bct.model.checkpoint import default_model_path, load_bert, load_tokenizer

    torch.set_num_threads(args.threads)
    from bct.model.matmul import set_threads

    set_threads(args.threads)  # the integer block GEMMs' own threads
    from bct.model import matmul as matmul_module

    matmul_module._GEMM_PATH = args.gemm_path
    load_start = os.getloadavg()
    cfg = config_from_args(args)
    model_dir = args.model or str(default_model_path())
    texts, source = sentences(args.rows)
    tok = load_tokenizer(model_dir)
    encs, tokens = batches(tok, texts, args.batch_size, args.max_len)
    rows = sum(len(e.input_ids) for e in encs)

    qm = integer.quantize(load_bert(model_dir), cfg)
    fp = transformers.BertModel.from_pretrained(model_dir, dtype=torch.float32, add_pooling_layer=False)
    fp.eval()
    tenc = [{k: torch.from_numpy(v) for k, v in zip(
        ("input_ids", "token_type_ids", "attention_mask"), e)} for e in encs]

    def run_fp32():
        with torch.inference_mode():
            for a in tenc:
                fp(**a)

    def run_int():
        for e in encs:
            integer.forward(qm, e)

    fp_all, int_all = paired_times([run_fp32, run_int], args.repeat)
    fp_s, int_s = min(fp_all), min(int_all)
    load_end = os.getloadavg()
    paired = sorted(f / i for f, i in zip(fp_all, int_all))
    out = {
        "config_hash": cfg.hash,
        "model": os.path.basename(model_dir.rstrip("/")),
        "sentences": source,
        "rows": rows,
        "real_tokens": tokens,
        "batch_size": args.batch_size,
        "batches": len(encs),
        "padded_lengths": ",".join(str(e.input_ids.shape[1]) for e in encs),
        "torch_threads": torch.get_num_threads(),
        "blas_threads_env": int(os.environ["OPENBLAS_NUM_THREADS"]),
        "cpu_count": os.cpu_count(),
        "repeat": args.repeat,
        "gemm_path": args.gemm_path,
        "malloc_keep": _MALLOC_KEEP,
        "integer_seq_per_s": rows / int_s,
        "fp32_seq_per_s": rows / fp_s,
        "ratio": fp_s / int_s,
        "ratio_median_of_rounds": paired[len(paired) // 2],
        "integer_best_s": int_s,
        "fp32_best_s": fp_s,
        "integer_all_s": ",".join(f"{t:.3f}" for t in int_all),
        "fp32_all_s": ",".join(f"{t:.3f}" for t in fp_all),
        "loadavg_1m_start": load_start[0],
        "loadavg_1m_end": load_end[0],
    }
    out.update(stage_breakdown(qm, encs))
    if args.profile:
        out.update(profile(qm, encs, args.profile))
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
