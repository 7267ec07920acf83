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
