"""Tests of `bct.estimate`: the cycle model against a cycle-accurate simulation of the matmul
array (exact), the encoder-layer bookkeeping, and the resource model against synthesis
reports (tolerances below, also in docs/synthesis.md)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bct.config import Config
from bct.estimate import encoder_layer_cycles, estimate, matmul_resources, matmul_run_cycles
from bct.hw.matmul import MatmulArray

BASELINES = json.loads((Path(__file__).parent / "synth_baselines.json").read_text())

#: Tolerances of the resource model against Yosys' counts (relative): DSPs exact, FFs within
#: 10 %, LUTs within 30 %.
TOL = {"dsp": 0.0, "ff": 0.10, "lut": 0.30}


def _simulate_run(cfg: Config, tiles: int, K: int, seed: int = 0) -> tuple[int, bool]:
    """Stream ``tiles`` tiles of reduction K back to back through MatmulArray in Amaranth's
    simulator (inputs always valid, output always ready); return (cycles from the first input
    beat to the last output row, all rows equal to the model)."""
    from amaranth.sim import Simulator

    from bct.hw.matmul import MatmulArray, shifts, tile_payloads
    from bct.model.blocks import encode
    from bct.model.matmul import matmul
    from bct.sim.bits import pack_signed

    R, C = cfg.array_rows, cfg.array_cols
    rng = np.random.default_rng(seed)
    N = -(-tiles * C // cfg.block_size) * cfg.block_size
    x = encode(rng.standard_normal((R, K)) * 3, cfg.act_format)
    w = encode(rng.standard_normal((N, K)) * 0.1, cfg.weight_format)
    b = encode(rng.standard_normal(N), cfg.vector_format)
    array = MatmulArray(cfg)
    sh = shifts(x, w, cfg, b)
    y = matmul(x, w, cfg, b).value
    acts, wgts, biases, expected = [], [], [], []
    for t in range(tiles):
        a, wt, bb = tile_payloads(array, x, w, sh, 0, t * C, b)
        acts += a
        wgts += wt
        biases.append(bb)
        expected += [pack_signed(y[r, t * C:(t + 1) * C].tolist(), cfg.acc_bits)
                     for r in range(R)]
    got: list[int] = []
    cycles = {}

    async def bench(ctx):
        ctx.set(array.out.ready, 1)
        ctx.set(array.bias.valid, 1)
        ctx.set(array.bias.payload.as_value(), biases[0])
        i, nb, cycle = 0, 0, 0
        while len(got) < len(expected):
            if i < len(acts):
                ctx.set(array.act.valid, 1)
                ctx.set(array.weight.valid, 1)
                ctx.set(array.act.payload.as_value(), acts[i])
                ctx.set(array.weight.payload.as_value(), wgts[i])
            else:
                ctx.set(array.act.valid, 0)
                ctx.set(array.weight.valid, 0)
            if nb < len(biases):
                ctx.set(array.bias.payload.as_value(), biases[nb])
            else:
                ctx.set(array.bias.valid, 0)
            took = i < len(acts) and ctx.get(array.act.ready)
            if took and i == 0:
                cycles["first"] = cycle
            bias_took = nb < len(biases) and ctx.get(array.bias.ready)
            if ctx.get(array.out.valid):
                got.append(ctx.get(array.out.payload.as_value()))
                cycles["last"] = cycle
            await ctx.tick()
            i += bool(took)
            nb += bool(bias_took)
            cycle += 1
            assert cycle < 10 * len(acts) + 100

    sim = Simulator(array)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    mask = (1 << (C * cfg.acc_bits)) - 1
    ok = [g & mask for g in got] == expected
    return cycles["last"] - cycles["first"] + 1, ok


@pytest.mark.parametrize("rows,cols,B,K,tiles", [(2, 2, 8, 8, 3), (4, 4, 8, 8, 3), (2, 3, 8, 16, 2),
                                                 (4, 4, 8, 24, 3), (9, 2, 8, 32, 2)])
def test_matmul_run_cycles_equal_simulation(rows, cols, B, K, tiles):
    """Tolerance 0: the estimate equals the simulated cycle count exactly (also for tiles
    shorter than R + admit_gap, whose last beats wait for the drain)."""
    cfg = Config(array_rows=rows, array_cols=cols, block_size=B, max_reduction=64)
    cycles, ok = _simulate_run(cfg, tiles, K)
    assert ok
    assert cycles == matmul_run_cycles(cfg, tiles, K)


def test_matmul_run_cycles_checks_arguments():
    with pytest.raises(ValueError, match="tiles and K must be positive, not 0, 8"):
        matmul_run_cycles(Config(), 0, 8)


def test_encoder_layer_bookkeeping():
    cfg = Config()
    e = encoder_layer_cycles(cfg, seq_len=128)
    L, H, F, heads = 128, 384, 1536, 12
    assert e["macs"] == L * H * 3 * H + 2 * heads * L * L * (H // heads) + L * H * H + 2 * L * H * F
    assert e["qkv_tiles"] == (L // 8) * (3 * H // 8)
    assert e["qkv_cycles"] == matmul_run_cycles(cfg, e["qkv_tiles"], H)
    assert e["matmul_cycles"] == sum(e[f"{k}_cycles"] for k in
                                     ("qkv", "scores", "context", "attn_out", "ffn1", "ffn2"))
    assert e["layer_cycles_serial"] == e["matmul_cycles"] + e["nonlinear_cycles"]
    # every K here is >= R: the array is busy all but the fill / drain of each run
    assert 0.99 < e["mac_utilisation"] <= 1.0
    # a 16x16 array needs a quarter of the cycles, up to fill and drain, for the long runs
    # (the context's 24 short runs pay fill and drain 2 % over); the scores (K = 32 < 16 +
    # admit_gap) wait for the drain
    cfg16 = cfg.replace(array_rows=16, array_cols=16)
    e16 = encoder_layer_cycles(cfg16)
    for k in ("qkv", "attn_out", "ffn1", "ffn2"):
        assert math.isclose(e16[f"{k}_cycles"], e[f"{k}_cycles"] / 4, rel_tol=0.01), k
    assert 32 < 16 + MatmulArray.timing(cfg16)[1]
    assert e16["scores_cycles"] > 1.2 * e["scores_cycles"] / 4


def test_encoder_layer_checks_dimensions():
    with pytest.raises(ValueError, match="seq_len 100 is not a multiple of block_size 32"):
        encoder_layer_cycles(Config(), seq_len=100)


def test_estimate_is_flat_json():
    e = estimate(Config(), "ecp5")
    assert all(isinstance(v, (int, float, str)) for v in e.values())
    json.dumps(e)


def _cfg(b: dict) -> Config:
    return Config.from_dict(b["config"])


@pytest.mark.parametrize("key", sorted(BASELINES))
def test_resources_against_synthesis(key):
    """The resource model against stored synthesis reports (`bct synth`, refreshed by
    tests/test_synth.py's slow tier): DSPs exact, FFs within 10 %, LUTs within 30 %."""
    b = BASELINES[key]
    if b["unit"] != "matmul":
        pytest.skip("the resource model covers the matmul array")
    family = b["family"]
    if b["target"] == "ice40-hx8k":
        family = "ice40-nodsp"
    est = matmul_resources(_cfg(b), family)
    for k, tol in TOL.items():
        got = b["report"][k]
        assert abs(est[k] - got) <= tol * got, (key, k, est[k], got)
