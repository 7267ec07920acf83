"""Benchmarks that print flat JSON: accuracy of the integer units against float64 and kernel speed.

``bct bench units --json`` runs :func:`bench_units`; ``bct bench sim`` runs :func:`bench_sim_command`
(the RTL units on Verilator, :mod:`bct.sim.bench`). Every figure comes with the bound it is held
to, so a reader (or CI) can check ``figure <= bound`` without knowing the project.
"""

from __future__ import annotations

import json
import math
import time

import numpy as np

from bct.config import Config
from bct.model.blocks import encode
from bct.model.matmul import Fixed, matmul, matmul_pyint
from bct.model.nonlinear import gelu_fixed, layernorm_fixed, softmax_fixed

__all__ = ["bench_units", "bench_sim_command", "BOUNDS"]

#: The bounds each figure is held to (from the project's issue #2).
BOUNDS = {
    "gelu_max_abs_error": 0.01,  # on [-8, 8]; I-BERT's i-GELU reaches 0.018
    "softmax_max_abs_error": 1 / 256,  # per probability
    "layernorm_max_abs_error": 1 / 64,  # on the standardised output
    "encode_max_error_steps": 0.5,  # |decode(encode(x)) - x| in units of the block's step
}


def _gelu_error(cfg: Config) -> float:
    one = 1 << cfg.gelu_frac
    x = np.arange(-8 * one, 8 * one + 1, dtype=np.int64)
    y = gelu_fixed(x, cfg) / one
    xf = x / one
    ref = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in xf])
    return float(np.abs(y - ref).max())


def _softmax_error(cfg: Config, rng: np.random.Generator) -> float:
    one = 1 << cfg.softmax_frac
    worst = 0.0
    for length in (8, 32, 128, 512):
        for spread in (1.0, 4.0, 16.0):
            s = rng.uniform(-spread, spread, size=(64, length))
            s[0] = s[0, 0]  # a row of equal scores
            x = np.round(s * one).astype(np.int64)
            p = softmax_fixed(x, cfg) / (1 << cfg.softmax_out_frac)
            xf = x / one
            e = np.exp(xf - xf.max(axis=-1, keepdims=True))
            worst = max(worst, float(np.abs(p - e / e.sum(axis=-1, keepdims=True)).max()))
    return worst


def _layernorm_error(cfg: Config, rng: np.random.Generator, width: int = 384) -> float:
    worst = 0.0
    for magnitude in (4, 64, 1024, cfg.add_bound // 8):
        v = np.round(rng.standard_normal((64, width)) * magnitude).astype(np.int64)
        v[1, 7] = cfg.add_bound  # an outlier feature, as BERT's residual stream has
        v[2] = v[2, 0] + (np.arange(width) % 2)  # a near-constant row
        v = np.clip(v, -cfg.add_bound, cfg.add_bound)
        scale = np.full(v.shape[0], -cfg.acc_guard_bits - 4, dtype=np.int64)
        y = layernorm_fixed(Fixed(v, scale), cfg) / (1 << cfg.ln_frac)
        vf = np.ldexp(v.astype(np.float64), scale[:, None])
        ref = (vf - vf.mean(-1, keepdims=True)) / np.sqrt(vf.var(-1, keepdims=True) + cfg.ln_eps)
        worst = max(worst, float(np.abs(y - ref).max()))
    return worst


def _encode_error(cfg: Config, rng: np.random.Generator) -> float:
    worst = 0.0
    for fmt in (cfg.weight_format, cfg.act_format, cfg.vector_format):
        x = rng.standard_normal((256, 8 * fmt.block)) * np.exp(rng.uniform(-8, 8, (256, 1)))
        t = encode(x, fmt)
        step = np.ldexp(1.0, t.block_exp())
        worst = max(worst, float((np.abs(t.decode() - x) / step).max()))
    return worst


def _time(fn, min_seconds: float = 0.5) -> float:
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n


def bench_units(cfg: Config | None = None, seed: int = 0, shape=(128, 384, 1536)) -> dict:
    """Measure the integer units' error against float64 and the matmul's exactness and speed.

    Parameters
    ----------
    cfg : Config, optional
        Defaults to ``Config()``.
    seed : int
        Seed of every random input.
    shape : (M, K, N)
        The matmul problem ``(M x K) @ (K x N)``.

    Returns
    -------
    dict
        Flat JSON-serialisable figures, each error next to its ``*_bound``.
    """
    cfg = cfg or Config()
    rng = np.random.default_rng(seed)
    out: dict = {"config_hash": cfg.hash, "seed": seed}
    figures = {
        "gelu_max_abs_error": _gelu_error(cfg),
        "softmax_max_abs_error": _softmax_error(cfg, rng),
        "layernorm_max_abs_error": _layernorm_error(cfg, rng),
        "encode_max_error_steps": _encode_error(cfg, rng),
    }
    for name, value in figures.items():
        out[name] = value
        out[f"{name}_bound"] = BOUNDS[name]
    M, K, N = shape
    x = encode(rng.standard_normal((M, K)), cfg.act_format)
    w = encode(rng.standard_normal((N, K)) * 0.05, cfg.weight_format)
    bias = encode(rng.standard_normal(N) * 0.1, cfg.vector_format)
    fast = matmul(x, w, cfg, bias)
    start = time.perf_counter()
    ref = matmul_pyint(x, w, cfg, bias)
    pyint_seconds = time.perf_counter() - start
    x32 = x.decode().astype(np.float32)
    w32 = w.decode().astype(np.float32).T.copy()
    macs = M * K * N
    t_int = _time(lambda: matmul(x, w, cfg, bias))
    t_f32 = _time(lambda: x32 @ w32)
    out.update(
        {
            "matmul_shape": f"{M}x{K} @ {K}x{N}",
            "matmul_bit_exact": bool(
                np.array_equal(fast.value, ref.value) and np.array_equal(fast.scale, ref.scale)
            ),
            "matmul_acc_bits": cfg.acc_bits,
            "matmul_max_abs_acc": int(np.abs(fast.value).max()),
            "matmul_acc_bound": cfg.acc_bound,
            "matmul_int_seconds": t_int,
            "matmul_int_gmacs": macs / t_int / 1e9,
            "matmul_numpy_f32_seconds": t_f32,
            "matmul_numpy_f32_gmacs": macs / t_f32 / 1e9,
            "matmul_int_vs_f32": t_f32 / t_int,
            "matmul_pyint_seconds": pyint_seconds,
        }
    )
    out["all_within_bounds"] = bool(
        all(figures[k] <= BOUNDS[k] for k in BOUNDS) and out["matmul_bit_exact"]
    )
    return out


def bench_sim_command(cfg: Config, seed: int = 0, *, as_json: bool = False, quick: bool = False,
                      units=None) -> int:
    """``bct bench sim``: run :func:`bct.sim.bench.bench_sim` and print its figures.

    Returns
    -------
    int
        0, or 1 when the MAC array's utilisation misses its 95 % target.
    """
    from bct.sim.bench import UNITS, bench_sim

    result = bench_sim(cfg, seed, units=tuple(units or UNITS), quick=quick)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(f"BCT RTL units on Verilator (cocotb), config {result['config_hash']}, "
              "valid/ready always high, every output bit-exact with the model")
        for name, u in result["units"].items():
            rate = (f"MAC utilisation {u['utilisation']:.4f} "
                    f"({u['utilisation_with_fill_drain']:.4f} with fill/drain)"
                    if name == "matmul" else
                    f"{u['blocks_per_cycle']:.3f} blocks/cycle ({u['elements_per_cycle']:.1f} "
                    "elements/cycle)")
            print(f"  {name:<10} {u['simulated_cycles']:>6} cycles  {rate}  "
                  f"{u['cycles_per_wall_second']:.0f} cycles/s")
    return 0 if result.get("mac_utilisation_ok", True) else 1
