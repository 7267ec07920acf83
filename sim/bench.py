"""``bct bench sim``: every hardware unit at full rate on Verilator, measured cycle by cycle.

:func:`bench_sim` builds each unit from the config, streams seeded random inputs through it with
``valid`` and ``ready`` always high (cocotb module :mod:`bct.sim.tb_bench`), checks every
output exactly against the software model and reports per unit: simulated cycles, measured
throughput (blocks and elements per cycle; for the matmul array its MAC utilisation on
back-to-back tiles) and the simulation speed in cycles per wall-second (Verilator driven by
cocotb, whose per-cycle Python work dominates: a figure for this harness, not for Verilator
alone).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bct.config import Config

__all__ = ["bench_sim", "UNITS"]

#: Units benchmarked, in order.
UNITS = ("matmul", "blockify", "gelu", "softmax", "layernorm")

_TB = Path(__file__).with_name("tb_bench.py")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to file descriptor 1 (the simulator build's and cocotb's logs,
    also from child processes) to stderr, so the caller's stdout stays clean JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _const(layout, value) -> int:
    return layout.const(value).as_value().value


def _matmul(cfg: Config, rng, quick: bool):
    from bct.hw.matmul import MatmulArray, shifts, tile_payloads
    from bct.model.blocks import encode
    from bct.model.matmul import matmul
    from bct.sim.bits import pack_signed

    array = MatmulArray(cfg)
    R, C, B = cfg.array_rows, cfg.array_cols, cfg.block_size
    # quick: 4 B, at least R + admit_gap for the small arrays (every PE busy on every cycle);
    # 12 B = 384 at B = 32: MiniLM's hidden size
    K = (4 if quick else 12) * B
    M, N = 2 * R, math.lcm(2 * C, B)  # the bias is blocked along N
    x = encode(rng.standard_normal((M, K)), cfg.act_format)
    w = encode(rng.standard_normal((N, K)) * 0.05, cfg.weight_format)
    bias = encode(rng.standard_normal(N) * 0.1, cfg.vector_format)
    y = matmul(x, w, cfg, bias)
    sh = shifts(x, w, cfg, bias)
    inputs = {"act": [], "weight": [], "bias": []}
    expected = []
    for m0 in range(0, M, R):
        for n0 in range(0, N, C):
            act, wgt, b = tile_payloads(array, x, w, sh, m0, n0, bias)
            inputs["act"] += act
            inputs["weight"] += wgt
            inputs["bias"].append(b)
            expected += [pack_signed(y.value[m0 + r, n0:n0 + C].tolist(), cfg.acc_bits)
                         for r in range(R)]
    phase = {"label": f"{M // R * N // C} tiles of K={K}", "inputs": inputs,
             "expected": expected}
    info = {"tiles": M // R * N // C, "K": K, "pes": R * C, "unit": "K-element beats"}
    return array, {"phases": [phase], "output": "out", "busy": "act"}, info


def _blockify(cfg: Config, rng, quick: bool):
    from bct.generate import _acc_scale_bits
    from bct.hw.blockify import Blockifier
    from bct.model.blocks import requantize

    sb = _acc_scale_bits(cfg)
    fmt = cfg.act_format
    unit = Blockifier(cfg, cfg.acc_bits, sb, fmt)
    n = 64 if quick else 512
    bits = rng.integers(0, cfg.acc_bits - 1, (n, 1))
    y = (rng.integers(-(1 << 20), 1 << 20, (n, fmt.block)) << 20 >> (40 - bits)).astype(np.int64)
    scale = rng.integers(fmt.e_min - 10, fmt.e_max - 10, n)
    t = requantize(y, scale, fmt)
    il, ol = unit.i.payload.shape(), unit.o.payload.shape()
    phase = {"label": f"{n} blocks", "inputs": {"i": [
        _const(il, {"value": y[k].tolist(), "scale": int(scale[k])}) for k in range(n)]},
        "expected": [_const(ol, {"mant": t.mant[k].tolist(), "exp": int(t.exp[k, 0])})
                     for k in range(n)]}
    return unit, {"phases": [phase], "output": "o", "busy": "i"}, {"unit": "blocks"}


def _gelu(cfg: Config, rng, quick: bool):
    from bct.hw.gelu import GeluUnit
    from bct.model.blocks import encode
    from bct.model.nonlinear import gelu

    unit = GeluUnit(cfg)
    n = 64 if quick else 512
    t = encode(rng.standard_normal((n, cfg.block_size)) * 3, cfg.act_format)
    g = gelu(t, cfg)
    lay = unit.i.payload.shape()
    phase = {"label": f"{n} blocks", "inputs": {"i": [
        _const(lay, {"mant": t.mant[k].tolist(), "exp": int(t.exp[k, 0])}) for k in range(n)]},
        "expected": [_const(lay, {"mant": g.mant[k].tolist(), "exp": int(g.exp[k, 0])})
                     for k in range(n)]}
    return unit, {"phases": [phase], "output": "o", "busy": "i"}, {"unit": "blocks"}


def _softmax(cfg: Config, rng, quick: bool, max_len: int):
    from bct.hw.softmax import SoftmaxUnit
    from bct.model.blocks import encode, to_fixed
    from bct.model.nonlinear import softmax_fixed

    unit = SoftmaxUnit(cfg, max_len)
    B = cfg.block_size
    il, ol = unit.input_layout(cfg), unit.output_layout(cfg)
    phases = []
    for blocks in sorted({1, unit.max_blocks}):
        rows = (16 if quick else 128) // blocks
        inputs, expected = [], []
        for _ in range(rows):
            t = encode(rng.normal(0, 3, blocks * B), cfg.act_format)
            p = softmax_fixed(to_fixed(t, cfg.softmax_frac, cfg.softmax_bits), cfg)
            for j in range(blocks):
                last = j == blocks - 1
                inputs.append(_const(il, {"block": {"mant": t.mant[j * B:(j + 1) * B].tolist(),
                                                    "exp": int(t.exp[j])},
                                          "mask": [1] * B, "last": last}))
                expected.append(_const(ol, {"p": p[j * B:(j + 1) * B].tolist(), "last": last}))
        phases.append({"label": f"{rows} rows of {blocks} blocks", "inputs": {"i": inputs},
                       "expected": expected})
    info = {"unit": "blocks", "max_len": max_len, "div_stages": unit.div_stages}
    return unit, {"phases": phases, "output": "o", "busy": "i"}, info


def _layernorm(cfg: Config, rng, quick: bool, width: int):
    from bct.hw.layernorm import LayerNormUnit
    from bct.model.blocks import encode
    from bct.model.matmul import Fixed
    from bct.model.nonlinear import layernorm_affine, layernorm_fixed

    gamma = encode(1 + 0.1 * rng.standard_normal(width), cfg.vector_format)
    beta = encode(0.1 * rng.standard_normal(width), cfg.vector_format)
    unit = LayerNormUnit(cfg, width, gamma, beta)
    B, n = cfg.block_size, (4 if quick else 16)
    x = np.round(rng.standard_normal((n, width)) * cfg.add_bound / 16).astype(np.int64)
    x = np.clip(x, -cfg.add_bound, cfg.add_bound)
    scale = np.full(n, -cfg.acc_guard_bits - 4, dtype=np.int64)
    y = layernorm_affine(layernorm_fixed(Fixed(x, scale), cfg), gamma, beta, cfg)
    il, ol = unit.in_layout, unit.out_layout
    inputs, expected = [], []
    for r in range(n):
        for j in range(unit.beats):
            last = j == unit.beats - 1
            inputs.append(_const(il, {"value": x[r, j * B:(j + 1) * B].tolist(),
                                      "scale": int(scale[r]), "last": last}))
            expected.append(_const(ol, {"value": y[r, j * B:(j + 1) * B].tolist(),
                                        "scale": -cfg.ln_out_frac, "last": last}))
    phase = {"label": f"{n} rows of {width}", "inputs": {"i": inputs}, "expected": expected}
    info = {"unit": "blocks", "width": width, "documented_latency_cycles": unit.latency,
            "documented_row_period_cycles": max(unit.beats, unit.row_cycles)}
    return unit, {"phases": [phase], "output": "o", "busy": "i", "idle": ["param"]}, info


def _figures(name: str, cfg: Config, report: dict, info: dict) -> dict:
    """Per-unit figures from the testbench's cycle records."""
    B = cfg.block_size
    out: dict = {k: v for k, v in info.items() if k != "unit"}
    phases = []
    for ph in report["phases"]:
        window = ph["busy_last_cycle"] - ph["busy_first_cycle"] + 1
        total = ph["last_output_cycle"] - ph["first_input_cycle"] + 1
        f = {"label": ph["label"], "input_beats": ph["input_beats"],
             "simulated_cycles": total, "input_window_cycles": window,
             "latency_cycles": ph["first_output_cycle"] - ph["first_input_cycle"]}
        if name == "matmul":
            pes = info["pes"]
            f["utilisation"] = ph["input_beats"] / window
            f["utilisation_with_fill_drain"] = ph["input_beats"] / total
            f["macs_per_cycle"] = f["utilisation"] * pes
            # first output row after the transfer of the first tile's last beat
            f["first_row_latency_cycles"] = ph["first_output_cycle"] - (
                ph["first_input_cycle"] + info["K"] - 1)
        else:
            f["blocks_per_cycle"] = ph["input_beats"] / window
            f["elements_per_cycle"] = f["blocks_per_cycle"] * B
            f["blocks_per_cycle_with_fill_drain"] = ph["input_beats"] / total
        phases.append(f)
    out["phases"] = phases
    out["simulated_cycles"] = sum(p["simulated_cycles"] for p in phases)
    main = phases[-1]
    for key in ("utilisation", "utilisation_with_fill_drain", "blocks_per_cycle",
                "elements_per_cycle"):
        if key in main:
            out[key] = min(p[key] for p in phases)
    out["bit_exact"] = True  # the testbench compared every output with the model
    out["sim_cycles_total"] = report["sim_cycles"]
    out["sim_wall_seconds"] = report["wall_seconds"]
    out["cycles_per_wall_second"] = report["sim_cycles"] / report["wall_seconds"]
    return out


def bench_sim(cfg: Config | None = None, seed: int = 0, *, units=UNITS, quick: bool = False,
              max_len: int = 128, ln_width: int = 384, base_dir: Path | None = None) -> dict:
    """Run every unit at full rate on Verilator and measure it.

    Parameters
    ----------
    cfg : Config, optional
        Defaults to ``Config()``.
    seed : int
        Seed of the random inputs and of the simulation.
    units : sequence of str
        A subset of :data:`UNITS`.
    quick : bool
        Fewer beats per unit (a smoke run).
    max_len : int
        Softmax row length (its short-row phase uses rows of one block).
    ln_width : int
        LayerNorm row length.
    base_dir : pathlib.Path, optional
        Simulation cache (`bct.sim.default_base_dir` when omitted).

    Returns
    -------
    dict
        ``{"config_hash", "seed", "units": {name: figures}, "mac_utilisation",
        "mac_utilisation_target", ...}``: flat JSON-serialisable figures.

    Raises
    ------
    bct.sim.SimulationFailure
        If a unit's output differs from the model (or the simulation fails).
    ValueError
        If ``units`` names an unknown unit.
    """
    from bct.sim.runner import run

    cfg = cfg or Config()
    unknown = sorted(set(units) - set(UNITS))
    if unknown:
        raise ValueError(f"unknown unit(s) {', '.join(unknown)}; choose from {', '.join(UNITS)}")
    rng = np.random.default_rng(seed)
    makers = {
        "matmul": lambda: _matmul(cfg, rng, quick),
        "blockify": lambda: _blockify(cfg, rng, quick),
        "gelu": lambda: _gelu(cfg, rng, quick),
        "softmax": lambda: _softmax(cfg, rng, quick, max_len),
        "layernorm": lambda: _layernorm(cfg, rng, quick, ln_width),
    }
    result: dict = {"config_hash": cfg.hash, "seed": seed, "quick": quick, "units": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bct-bench-sim-") as work:
        work = Path(work)
        for name in (u for u in UNITS if u in units):
            component, data, info = makers[name]()
            (work / f"{name}.json").write_text(json.dumps(data))
            report_path = work / f"{name}-report.json"
            built = time.perf_counter()
            # the unit's usual top name: the build is shared with its tests (same Verilog)
            with _stdout_to_stderr():
                run(component, _TB, name=name, seed=seed, config_hash=cfg.hash,
                    base_dir=base_dir, params={"data": str(work / f"{name}.json"),
                                               "report": str(report_path)})
            figures = _figures(name, cfg, json.loads(report_path.read_text()), info)
            figures["build_and_run_seconds"] = time.perf_counter() - built
            result["units"][name] = figures
    result["wall_seconds"] = time.perf_counter() - start
    if "matmul" in result["units"]:
        result["mac_utilisation"] = result["units"]["matmul"]["utilisation"]
        result["mac_utilisation_target"] = 0.95
        result["mac_utilisation_ok"] = result["mac_utilisation"] >= 0.95
    return result
