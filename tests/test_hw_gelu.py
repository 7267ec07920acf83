"""Tests of `bct.hw.gelu.GeluUnit`: cycle-accurate co-simulation (Verilator + cocotb) against
`bct.model.nonlinear.gelu` on seeded random blocks, edge cases and real FFN1 outputs of
all-MiniLM-L6-v2 (integer model, `bct.model.integer.trace`), and a Verilator lint.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_hw_blockify import LINT_WAIVERS, STALLS, lint

from bct.config import Config
from bct.hw.gelu import GeluUnit
from bct.model.blocks import BlockTensor
from bct.model.nonlinear import gelu
from bct.sim import build_verilog, run
from bct.sim.bits import pack_block

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TB_DIR = Path(__file__).parent / "cocotb"
SENTENCE = "A man is playing a flute near the river bank."
#: Most real blocks per config (the sentence's tokens, in order).
MAX_REAL_BLOCKS = 480

CASES = [
    pytest.param(Config(), 21, id="default"),
    pytest.param(Config(weight_bits=4, block_size=16), 22, id="w4-b16"),
    pytest.param(Config(block_size=8, act_bits=6), 23, id="b8-a6"),
]


@pytest.fixture(scope="module")
def real_inputs():
    """``cfg -> (mant, exp)``: layer 0's FFN1 output blocks for the real tokens of `SENTENCE`,
    computed by the integer model on the real checkpoint (nothing cached on disk)."""
    from bct.model.checkpoint import load_bert, load_tokenizer
    from bct.model.integer import quantize, trace

    weights = load_bert()
    enc = load_tokenizer().encode([SENTENCE], max_len=32)
    tokens = int(enc.attention_mask.sum())

    def blocks(cfg):
        t = trace(quantize(weights, cfg), enc)["layer0.ffn1"]
        assert t.fmt == cfg.act_format
        mant = t.blocks[0, :tokens].reshape(-1, cfg.block_size)[:MAX_REAL_BLOCKS]
        return mant, t.exp[0, :tokens].reshape(-1)[:MAX_REAL_BLOCKS]

    return blocks


def stimulus(cfg, rng: np.random.Generator):
    """Random blocks and the edge cases; returns ``(mant, exp)``: shape (n, B) and (n,)."""
    fmt, B = cfg.act_format, cfg.block_size
    q = fmt.qmax
    near = (max(fmt.e_min, -cfg.gelu_frac - fmt.bits - 2), min(fmt.e_max, cfg.gelu_int_bits + 2))
    ms, es = [], []

    def add(mant, *exps):
        for e in exps:
            ms.append(np.broadcast_to(np.asarray(mant, dtype=np.int64), (B,)))
            es.append(int(e))

    for _ in range(200):  # random mantissas, sparsity, exponents around the GELU input range
        mant = rng.integers(-q, q, B, endpoint=True) * (rng.random(B) < 0.85)
        full = rng.random() < 0.1
        add(mant, int(rng.integers(*((fmt.e_min, fmt.e_max) if full else near), endpoint=True)))
    add(0, fmt.e_min, 0, fmt.e_max)  # all-zero blocks
    for mant in (q, -q, [q, -q] * (B // 2), rng.integers(-q, q, B, endpoint=True)):
        add(mant, fmt.e_min, fmt.e_max, cfg.gelu_int_bits - 1, cfg.gelu_int_bits)  # extremes
    odd = (2 * rng.integers(-(q // 2), q // 2, B) + 1)
    add(odd, -cfg.gelu_frac - 1)  # ties at .5 in the input conversion
    add(4 * rng.integers(-(q // 4), q // 4, B) + 2, -cfg.gelu_frac - 2)
    sweep = np.arange(-q, q + 1)  # every mantissa at exponents spanning the table
    sweep = np.concatenate([sweep, np.zeros(-len(sweep) % B, dtype=np.int64)]).reshape(-1, B)
    range_exp = cfg.gelu_table_range.bit_length() - 1 - (fmt.bits - 2)  # 2**(bits-2) -> range
    for e in sorted({-cfg.gelu_frac, range_exp - 1, range_exp, range_exp + 1}):
        for row in sweep:
            add(row, e)
    edge = 1 << (fmt.bits - 2)  # |x| = table range exactly, and one step inside
    add([edge, edge - 1, -edge, -(edge - 1)] * (B // 4), range_exp)
    return np.stack(ms), np.array(es, dtype=np.int64)


@pytest.mark.parametrize("cfg, seed", CASES)
def test_gelu_matches_model(cfg, seed, real_inputs, tmp_path):
    fmt = cfg.act_format
    print(f"stimulus seed {seed}, cocotb seed {seed}")
    mant, exp = stimulus(cfg, np.random.default_rng(seed))
    real_mant, real_exp = real_inputs(cfg)
    mant, exp = np.concatenate([mant, real_mant]), np.concatenate([exp, real_exp])
    want = gelu(BlockTensor(mant.copy(), exp[:, None], fmt), cfg)
    # the output side reaches the exponent clamp and saturation too
    assert fmt.e_min in want.exp and (np.abs(want.mant) == fmt.qmax).any()
    vectors = {
        "inputs": [pack_block(m.tolist(), int(e), fmt.bits, fmt.exp_bits)
                   for m, e in zip(mant, exp)],
        "expected": [pack_block(m.tolist(), int(e), fmt.bits, fmt.exp_bits)
                     for m, e in zip(want.mant, want.exp[:, 0])],
    }
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(vectors))
    params = dict(vectors=str(path), bits=fmt.bits, exp_bits=fmt.exp_bits, block=fmt.block,
                  **STALLS)
    run(GeluUnit(cfg), TB_DIR / "tb_gelu.py", name="gelu", params=params, seed=seed,
        config_hash=cfg.hash)


def test_gelu_parameter_check_and_lint(tmp_path):
    with pytest.raises(TypeError, match=r"^cfg must be a Config, not dict$"):
        GeluUnit({})
    unit = GeluUnit(Config(block_size=8, act_bits=6))
    assert unit.latency == 6
    verilog = build_verilog(unit, name="gelu", base_dir=tmp_path)
    result = lint(verilog, list(LINT_WAIVERS))
    assert result.returncode == 0, result.stderr[-3000:]


def _run_gelu_acc(cfg, value, scale, seed):
    """The accumulator-input GeluUnit (``gelu_direct``) on the Amaranth simulator: one row of
    ``B`` lanes and its scale per beat, random input gaps and output stalls (seeded); returns
    the output blocks ``(mant, exp)`` in order."""
    from amaranth.sim import Simulator

    from bct.hw.layer import _exp_width
    from bct.sim.bits import unpack_block

    fmt, B = cfg.act_format, cfg.block_size
    unit = GeluUnit(cfg, acc=(cfg.acc_bits, _exp_width(cfg)))
    rng = np.random.default_rng(seed)
    out = []

    async def feed(ctx):
        for row, s in zip(value.tolist(), scale.tolist()):
            while rng.random() < 0.2:  # a gap
                ctx.set(unit.i.valid, 0)
                await ctx.tick()
            ctx.set(unit.i.valid, 1)
            ctx.set(unit.i.payload.scale, s)
            for k in range(B):
                ctx.set(unit.i.payload.value[k], row[k])
            await ctx.tick().until(unit.i.ready)
        ctx.set(unit.i.valid, 0)

    async def drain(ctx):
        while len(out) < len(value):
            ready = int(rng.random() >= 0.3)  # a stall
            ctx.set(unit.o.ready, ready)
            await ctx.delay(1e-9)  # settle before sampling the handshake
            if ready and ctx.get(unit.o.valid):
                out.append(unpack_block(ctx.get(unit.o.payload.as_value()), fmt.bits,
                                        fmt.exp_bits, B))
            await ctx.tick()

    sim = Simulator(unit)
    sim.add_clock(1e-8)
    sim.add_testbench(feed)
    sim.add_testbench(drain)
    sim.run()
    return np.array([m for m, _ in out]), np.array([e for _, e in out])


@pytest.mark.parametrize("cfg, seed", [
    pytest.param(Config(gelu_direct=True), 31, id="default"),
    pytest.param(Config(block_size=8, weight_block_size=8, vector_bits=16, ln_out_frac=12,
                        gelu_frac=12, residual_bits=16, gelu_direct=True), 32, id="b8-g12"),
])
def test_gelu_acc_input_matches_model(cfg, seed):
    """``gelu_direct``: the unit's accumulator input (``B`` lanes of ``acc_bits`` and a row
    scale) == :func:`bct.model.nonlinear.gelu_acc` (``fixed_to_frac`` to ``gelu_frac``: RHAZ
    right shifts incl. ties and shifts past the lane width, saturating left shifts, lanes at
    the accumulator's extremes) under input gaps and output stalls."""
    from bct.hw.layer import _exp_width
    from bct.model.matmul import Fixed
    from bct.model.nonlinear import gelu_acc

    B, lim = cfg.block_size, (1 << (cfg.acc_bits - 1)) - 1
    smax = (1 << (_exp_width(cfg) - 1)) - 1
    rng = np.random.default_rng(seed)
    rows, scales = [], []
    for _ in range(150):  # values of every magnitude, scales around -gelu_frac
        bits = int(rng.integers(1, cfg.acc_bits))
        rows.append(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), B, endpoint=True)
                    * (rng.random(B) < 0.9))
        scales.append(int(rng.integers(-cfg.gelu_frac - bits - 2, cfg.gelu_int_bits + 2)))
    for s in (-smax - 1, -cfg.gelu_frac - cfg.acc_bits - 2, -cfg.gelu_frac - 1, -cfg.gelu_frac,
              -cfg.gelu_frac + 1, 0, cfg.gelu_bits, smax):  # extremes of the scale
        rows.append(np.array([lim, -lim, 1, -1, 0, 3, -3, lim // 3] * (B // 8)))
        scales.append(s)
    for s in (1, 2, 5):  # ties at .5 of the right shift
        rows.append((2 * rng.integers(-1000, 1000, B) + 1) << (s - 1))
        scales.append(-cfg.gelu_frac + s)
    value, scale = np.stack(rows).astype(np.int64), np.array(scales, dtype=np.int64)
    want = gelu_acc(Fixed(value, scale), cfg)
    mant, exp = _run_gelu_acc(cfg, value, scale, seed)
    assert (mant == want.mant).all() and (exp == want.exp[:, 0]).all()
    assert (np.abs(want.mant) == cfg.act_format.qmax).any() and (want.mant == 0).any()


def test_gelu_acc_parameter_check_and_lint(tmp_path):
    verilog = build_verilog(GeluUnit(Config(gelu_direct=True), acc=(35, 12)), name="gelu_acc",
                            base_dir=tmp_path)
    result = lint(verilog, list(LINT_WAIVERS))
    assert result.returncode == 0, result.stderr[-3000:]
    for bad in ((35,), (35, 1), (35.0, 8), [35, 8], (True, 8)):
        with pytest.raises(ValueError, match=r"^acc must be None or \(value_bits, scale_bits\), "
                                             r"each an int >= 2, not "):
            GeluUnit(Config(gelu_direct=True), acc=bad)
    unit = GeluUnit(Config(), acc=(35, 12))
    unit._MustUse__silence = True
    assert unit.latency == 6 and unit.acc == (35, 12)
