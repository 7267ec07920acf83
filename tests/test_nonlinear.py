import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bct.config import BlockFormat, Config, ConfigError
from bct.model.blocks import BlockTensor, encode
from bct.model.constants import LOG2E_FRAC, derive
from bct.model.fixed import round_div_int, round_shift_int
from bct.model.matmul import Fixed
from bct.model.blocks import requantize, requantize_numpy, to_fixed
from bct.model.nonlinear import (
    fixed_to_frac,
    fixed_to_frac_numpy,
    gelu,
    gelu_acc,
    gelu_acc_numpy,
    gelu_fixed,
    gelu_fixed_numpy,
    gelu_numpy,
    layernorm,
    layernorm_affine,
    layernorm_affine_numpy,
    layernorm_fixed,
    layernorm_fixed_numpy,
    layernorm_wide,
    softmax,
    softmax_fixed,
    softmax_fixed_numpy,
    softmax_numpy,
    tanh_fixed,
)

CFG = Config()


def gelu_scalar(x: int, cfg: Config) -> int:
    """One input, plain Python ints: the algorithm as docs/arithmetic.md states it."""
    c = derive(cfg)
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    x = max(-lim, min(lim, x))
    a = abs(x)
    i, f = a >> c.gelu_seg_shift, a & ((1 << c.gelu_seg_shift) - 1)
    h = 0
    if i < cfg.gelu_segments:
        lo, hi = c.gelu_table[i], c.gelu_table[i + 1]
        h = lo + round_shift_int((hi - lo) * f, c.gelu_seg_shift)
    g = c.gelu_table_frac - cfg.gelu_frac
    return round_shift_int((max(x, 0) << g) - h, g)


def softmax_scalar(row: list, cfg: Config) -> list:
    c = derive(cfg)
    lim = (1 << (cfg.softmax_bits - 1)) - 1
    row = [max(-lim, min(lim, v)) for v in row]
    m = max(row)
    es = []
    for v in row:
        u = -round_shift_int((v - m) * c.log2e, LOG2E_FRAC)
        es.append(round_shift_int(c.exp2_lut[u & ((1 << cfg.softmax_frac) - 1)], u >> cfg.softmax_frac))
    recip = round_div_int(1 << (c.recip_shift + cfg.softmax_out_frac), sum(es))
    return [round_shift_int(e * recip, c.recip_shift) for e in es]


def _gelu_float(x):
    return np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in np.ravel(x)]).reshape(np.shape(x))


@pytest.mark.parametrize("cfg", [CFG, Config(gelu_frac=10, gelu_segments=128), Config(gelu_segments=32, gelu_int_bits=4)])
def test_gelu_error_bound_on_whole_grid(cfg):
    one = 1 << cfg.gelu_frac
    x = np.arange(-8 * one, 8 * one + 1)
    err = np.abs(gelu_fixed(x, cfg) / one - _gelu_float(x / one)).max()
    assert err <= 0.01
    if cfg == CFG:
        assert err < 0.0025  # measured 0.00234: interpolation 4e-4 + output rounding 2**-9


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**20), 2**20))
def test_gelu_matches_scalar_reference(x):
    assert int(gelu_fixed(np.array([x]), CFG)[0]) == gelu_scalar(x, CFG)


@pytest.mark.parametrize("cfg", [CFG, Config(gelu_frac=10, gelu_segments=128), Config(gelu_segments=32, gelu_int_bits=4)])
def test_gelu_matches_scalar_reference_on_every_input(cfg):
    """Every input of the saturated range (and just past it), against the Python-int algorithm."""
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    x = np.arange(-lim - 2, lim + 3)
    assert gelu_fixed(x, cfg).tolist() == [gelu_scalar(v, cfg) for v in x.tolist()]


def test_gelu_edges():
    one = 1 << CFG.gelu_frac
    lim = (1 << (CFG.gelu_bits - 1)) - 1
    x = np.array([0, 4 * one, 10 * one, -10 * one, 10**9, -(10**9)])
    assert gelu_fixed(x, CFG).tolist() == [0, 4 * one, 10 * one, 0, lim, 0]
    assert gelu_fixed(np.array([-one]), CFG)[0] == round(-0.15865525393 * one)


def test_gelu_block_wrapper():
    rng = np.random.default_rng(0)
    t = encode(rng.standard_normal((4, 64)) * 3, CFG.act_format)
    out = gelu(t, CFG)
    assert out.fmt == CFG.act_format and out.shape == t.shape
    step = np.ldexp(1.0, out.block_exp())
    assert (np.abs(out.decode() - _gelu_float(t.decode())) <= step / 2 + 0.003).all()


def _softmax_float(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("length", [8, 32, 128, 512])
def test_softmax_error_bound(length):
    rng = np.random.default_rng(length)
    one = 1 << CFG.softmax_frac
    x = np.round(rng.uniform(-20, 20, (64, length)) * one).astype(np.int64)
    p = softmax_fixed(x, CFG)
    assert np.abs(p / (1 << CFG.softmax_out_frac) - _softmax_float(x / one)).max() <= 1 / 256
    # rows sum to one within one output LSB per element
    assert (np.abs(p.sum(axis=-1) - (1 << CFG.softmax_out_frac)) <= length).all()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-(2**13), 2**13), min_size=1, max_size=40))
def test_softmax_matches_scalar_reference(row):
    assert softmax_fixed(np.array([row]), CFG)[0].tolist() == softmax_scalar(row, CFG)


def test_softmax_equal_scores_and_masks():
    one = 1 << CFG.softmax_out_frac
    p = softmax_fixed(np.full((2, 16), 77), CFG)
    assert (p == p[0, 0]).all() and abs(int(p[0, 0]) - one / 16) <= 1
    mask = np.arange(16) < 5
    p = softmax_fixed(np.full((1, 16), -300), CFG, mask=mask)
    assert (p[0, 5:] == 0).all() and (p[0, :5] == p[0, 0]).all()
    big = softmax_fixed(np.array([[10**6, -(10**6), 0, 0]]), CFG)  # saturated scores
    assert big[0].tolist() == [one, 0, 0, 0]
    with pytest.raises(ValueError, match="a row has no unmasked element"):
        softmax_fixed(np.zeros((1, 4)), CFG, mask=np.zeros(4, dtype=bool))


def test_softmax_block_wrapper():
    rng = np.random.default_rng(2)
    s = encode(rng.standard_normal((3, 64)) * 4, CFG.act_format)
    p = softmax(s, CFG)
    step = np.ldexp(1.0, p.block_exp())
    assert (np.abs(p.decode() - _softmax_float(s.decode())) <= step / 2 + 1 / 256).all()


def _ln_float(v, scale, eps):
    x = np.ldexp(v.astype(np.float64), scale)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize("magnitude", [3, 100, 5000, CFG.add_bound // 4])
def test_layernorm_error_bound(magnitude):
    rng = np.random.default_rng(magnitude)
    v = np.clip(np.round(rng.standard_normal((32, 384)) * magnitude), -CFG.add_bound, CFG.add_bound).astype(np.int64)
    v[0, 3] = CFG.add_bound  # outlier feature
    v[1] = 5 + (np.arange(384) % 3 == 0)  # near-constant row
    scale = np.full(32, -12)
    y = layernorm_fixed(Fixed(v, scale), CFG) / (1 << CFG.ln_frac)
    assert np.abs(y - _ln_float(v, -12, CFG.ln_eps)).max() <= 1 / 64


def test_layernorm_constant_row_gives_beta_exactly():
    rng = np.random.default_rng(9)
    gamma = encode(rng.uniform(0.5, 2, 64), CFG.vector_format)
    beta = encode(rng.standard_normal(64), CFG.vector_format)
    v = np.full((2, 64), 1234, dtype=np.int64)
    y = layernorm_fixed(Fixed(v, np.array([-10, -10])), CFG)
    assert not y.any()
    out = layernorm(Fixed(v, np.array([-10, -10])), gamma, beta, CFG)
    assert out == encode(np.tile(beta.decode(), (2, 1)), CFG.act_format)


def test_layernorm_is_scale_invariant_exactly_without_eps():
    cfg = CFG.replace(ln_eps=0.0)
    rng = np.random.default_rng(10)
    v = rng.integers(-5000, 5000, (8, 128))
    a = layernorm_fixed(Fixed(v, np.full(8, -9)), cfg)
    b = layernorm_fixed(Fixed(4 * v, np.full(8, -11)), cfg)
    assert np.array_equal(a, b)


def test_layernorm_eps_matters_at_its_scale():
    cfg = CFG.replace(ln_eps=1e-2)
    v = np.array([[1, -1] * 16])  # variance 1 unit**2 -> 2**-20 at scale -10: eps dominates
    y = layernorm_fixed(Fixed(v, np.array([-10])), cfg) / (1 << cfg.ln_frac)
    ref = _ln_float(v, -10, 1e-2)
    assert np.abs(y - ref).max() <= 1 / 256 and np.abs(y).max() < 0.02


def test_layernorm_block_wrapper_and_errors():
    rng = np.random.default_rng(11)
    v = rng.integers(-3000, 3000, (4, 64))
    gamma = encode(rng.uniform(0.5, 2, 64), CFG.vector_format)
    beta = encode(rng.standard_normal(64) * 0.1, CFG.vector_format)
    out = layernorm(Fixed(v, np.full(4, -8)), gamma, beta, CFG)
    ref = _ln_float(v, -8, CFG.ln_eps) * gamma.decode() + beta.decode()
    step = np.ldexp(1.0, out.block_exp())
    assert (np.abs(out.decode() - ref) <= step / 2 + 0.02).all()
    with pytest.raises(ValueError, match=r"LayerNorm gamma must be a \(64,\) tensor"):
        layernorm(Fixed(v, np.full(4, -8)), encode(np.ones(32), CFG.vector_format), beta, CFG)
    with pytest.raises(ConfigError, match="LayerNorm width 48 is not a multiple of block_size 32"):
        layernorm_fixed(Fixed(np.ones((1, 48), dtype=np.int64), np.zeros(1)), CFG)
    with pytest.raises(ValueError, match="exceeds the config's bound"):
        layernorm_fixed(Fixed(np.full((1, 32), CFG.add_bound + 1), np.zeros(1)), CFG)


def test_tanh_error_and_symmetry():
    one = 1 << CFG.softmax_frac
    x = np.arange(-12 * one, 12 * one + 1)
    y = tanh_fixed(x, CFG)
    assert np.array_equal(y, -y[::-1])  # odd
    err = np.abs(y / (1 << CFG.softmax_out_frac) - np.tanh(x / one)).max()
    assert err <= 1 / 1024
    assert tanh_fixed(np.array([0, 10**9]), CFG).tolist() == [0, 1 << CFG.softmax_out_frac]


def test_layernorm_wide_gives_the_activation_copy_and_a_residual_copy():
    cfg = Config(residual_bits=16, ln_out_frac=12)
    rng = np.random.default_rng(3)
    v = np.round(rng.standard_normal((4, 64)) * 3000).astype(np.int64)
    v[1, 5] = cfg.add_bound  # an outlier feature
    x = Fixed(v, np.full(4, -8))
    gamma = encode(rng.uniform(0.2, 2, 64), cfg.vector_format)
    beta = encode(rng.uniform(-1, 1, 64), cfg.vector_format)
    a, r = layernorm_wide(x, gamma, beta, cfg)
    assert a == layernorm(x, gamma, beta, cfg) and a.fmt == cfg.act_format
    assert r.fmt == cfg.residual_format and r.fmt.bits == 16
    r.check()
    # one fixed-point result, rounded to each format: the residual copy is the finer one
    exact = np.ldexp(layernorm_fixed(x, cfg).astype(float), -cfg.ln_frac) * gamma.decode() + beta.decode()
    assert np.abs(r.decode() - exact).max() < np.abs(a.decode() - exact).max() / 16


def fixed_to_frac_scalar(v: int, scale: int, frac: int, bits: int) -> int:
    lim = (1 << (bits - 1)) - 1
    return max(-lim, min(lim, round_shift_int(v, -(scale + frac))))


@settings(max_examples=300, deadline=None)
@given(st.integers(-(1 << 40), 1 << 40), st.integers(-60, 30), st.sampled_from([(8, 17), (12, 21), (16, 33)]))
def test_fixed_to_frac_matches_python_ints(v, scale, fb):
    frac, bits = fb
    got = fixed_to_frac(Fixed(np.array([[v]], dtype=np.int64), np.array([scale])), frac, bits)
    assert int(got[0, 0]) == fixed_to_frac_scalar(v, scale, frac, bits)


def test_gelu_acc_reads_the_accumulator_once():
    cfg = Config(gelu_frac=12)
    rng = np.random.default_rng(4)
    acc = Fixed(rng.integers(-(1 << 30), 1 << 30, size=(3, 64)), np.array([-30, -28, -27]))  # |x| < 8
    out = gelu_acc(acc, cfg)
    want = requantize(gelu_fixed(fixed_to_frac(acc, 12, cfg.gelu_bits), cfg), -12, cfg.act_format)
    assert out == want and out.fmt == cfg.act_format
    # closer to float GELU than rounding the accumulator to activation blocks first
    x = np.ldexp(acc.value.astype(float), acc.scale[:, None])
    ref = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    blocks = requantize(acc.value, acc.scale, cfg.act_format)  # what gelu() reads without it
    via_blocks = gelu_fixed(to_fixed(blocks, 12, cfg.gelu_bits), cfg)
    direct = gelu_fixed(fixed_to_frac(acc, 12, cfg.gelu_bits), cfg)
    err = lambda y: np.abs(np.ldexp(y.astype(float), -12) - ref).max()  # noqa: E731
    assert err(direct) < err(via_blocks) / 4


# ------------------------------------------------------------------------------------------------
# The compiled kernels against their numpy definitions (``==`` on seeded random and edge inputs)
COMPILED_CFGS = [
    CFG,
    Config(block_size=8, weight_block_size=8, vector_bits=16, ln_out_frac=12, gelu_frac=12,
           residual_bits=16, gelu_direct=True),
    Config(gelu_frac=10, gelu_segments=128, softmax_frac=10, ln_sqrt_bits=12, ln_frac=8),
]


def _same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
def test_compiled_gelu_equals_numpy(cfg):
    rng = np.random.default_rng(20)
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    every = np.arange(-lim - 3, lim + 4)  # the whole saturated range and just past it
    assert _same(gelu_fixed(every, cfg), gelu_fixed_numpy(every, cfg))
    x = rng.integers(-(1 << 40), 1 << 40, size=(7, 3, 64))
    x[0, 0, :6] = [0, lim, -lim, 1 << 62, -(1 << 62), -1]
    assert _same(gelu_fixed(x, cfg), gelu_fixed_numpy(x, cfg))
    assert _same(gelu_fixed(x[:, 1, ::3], cfg), gelu_fixed_numpy(x[:, 1, ::3], cfg))  # strided
    assert _same(gelu_fixed(np.int64(-5), cfg), gelu_fixed_numpy(np.int64(-5), cfg))  # 0-d
    assert _same(gelu_fixed(np.zeros((0, 4), np.int64), cfg), gelu_fixed_numpy(np.zeros((0, 4), np.int64), cfg))


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
def test_compiled_softmax_equals_numpy(cfg):
    rng = np.random.default_rng(21)
    lim = (1 << (cfg.softmax_bits - 1)) - 1
    for L in (1, 8, 37, 64):
        x = rng.integers(-2 * lim, 2 * lim, size=(3, 2, 5, L))
        x[0, 0, 0] = lim  # one saturated row, one all-equal row
        x[0, 0, 1] = -7
        key = rng.random((3, 1, 1, L)) < 0.6
        key[..., 0] = True
        assert _same(softmax_fixed(x, cfg), softmax_fixed_numpy(x, cfg))
        assert _same(softmax_fixed(x, cfg, key), softmax_fixed_numpy(x, cfg, key))
        rowmask = rng.random(x.shape) < 0.3  # a full-shape mask, one unmasked element per row
        rowmask[..., L - 1] = True
        assert _same(softmax_fixed(x, cfg, rowmask), softmax_fixed_numpy(x, cfg, rowmask))
    with pytest.raises(ValueError, match="a row has no unmasked element"):
        softmax_fixed(np.zeros((2, 4)), cfg, mask=np.array([[True], [False]]))


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
def test_compiled_layernorm_equals_numpy(cfg):
    rng = np.random.default_rng(22)
    N = 4 * cfg.block_size
    v = rng.integers(-cfg.add_bound, cfg.add_bound + 1, size=(3, 9, N))
    v[0, 0] = cfg.add_bound  # constant rows (variance 0: eps alone), an outlier, tiny rows
    v[0, 1] = 0
    v[0, 2] = 0
    v[0, 2, 5] = -cfg.add_bound
    v[0, 3] = rng.integers(-2, 3, size=N)
    scales = rng.integers(-30, 6, size=(3, 9))
    for x in (Fixed(v, scales), Fixed(v, np.int64(-12)), Fixed(v[0, 3], np.int64(-20))):
        y = layernorm_fixed(x, cfg)
        assert _same(y, layernorm_fixed_numpy(x, cfg))
        gamma = encode(rng.uniform(-3, 3, N), cfg.vector_format)
        beta = encode(rng.standard_normal(N) * 4, cfg.vector_format)
        assert _same(layernorm_affine(y, gamma, beta, cfg), layernorm_affine_numpy(y, gamma, beta, cfg))
    big = encode(np.full(N, 1e6), cfg.vector_format)  # saturating gamma and beta
    y = layernorm_fixed(Fixed(v, scales), cfg)
    assert _same(layernorm_affine(y, big, big, cfg), layernorm_affine_numpy(y, big, big, cfg))
    with pytest.raises(ValueError, match="exceeds the config's bound"):
        layernorm_fixed(Fixed(np.full((1, N), -cfg.add_bound - 1), np.zeros(1)), cfg)


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_layernorm_equals_the_three_numpy_passes(cfg, threads, monkeypatch):
    """layernorm (one fused compiled pass per row) == requantize_numpy of
    layernorm_affine_numpy of layernorm_fixed_numpy (and layernorm_wide's two copies, on the
    wide config): constant rows, an outlier at the bound,
    tiny rows, per-row and shared scales, saturating gamma and beta, batched shapes, rows split
    among threads; the same errors (bound, gamma shape) as the unfused path."""
    from bct.model import matmul as matmul_module
    from bct.model import nonlinear

    rng = np.random.default_rng(30 + threads)
    N = 4 * cfg.block_size
    v = rng.integers(-cfg.add_bound, cfg.add_bound + 1, size=(3, 9, N))
    v[0, 0] = cfg.add_bound
    v[0, 1] = 0
    v[0, 2] = 0
    v[0, 2, 5] = -cfg.add_bound
    v[0, 3] = rng.integers(-2, 3, size=N)
    v[1] >>= 20
    scales = rng.integers(-30, 6, size=(3, 9))
    gamma = encode(rng.uniform(-3, 3, N), cfg.vector_format)
    beta = encode(rng.standard_normal(N) * 4, cfg.vector_format)
    big = encode(np.full(N, 1e6), cfg.vector_format)
    monkeypatch.setattr(nonlinear, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    try:
        matmul_module.set_threads(threads)
        for x in (Fixed(v, scales), Fixed(v, np.int64(-12)), Fixed(v[0, 3], np.int64(-20))):
            for g, b in ((gamma, beta), (big, big)):
                y = layernorm_affine_numpy(layernorm_fixed_numpy(x, cfg), g, b, cfg)
                want = requantize_numpy(y, -cfg.ln_out_frac, cfg.act_format)
                assert layernorm(x, g, b, cfg) == want
                if cfg.residual_bits is not None:  # the wide path: one pass per format
                    assert layernorm_wide(x, g, b, cfg) == (
                        want, requantize_numpy(y, -cfg.ln_out_frac, cfg.residual_format))
        with pytest.raises(ValueError, match="exceeds the config's bound"):
            layernorm(Fixed(np.full((4, N), -cfg.add_bound - 1), np.zeros(4)), gamma, beta, cfg)
        with pytest.raises(ValueError, match=r"LayerNorm beta must be a"):
            layernorm(Fixed(v, scales), gamma, encode(np.ones(2 * N), cfg.vector_format), cfg)
    finally:
        matmul_module.set_threads(before)


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_add_layernorm_equals_layernorm_of_the_aligned_rows(cfg, threads, monkeypatch):
    """add_layernorm (add's alignment fused into LayerNorm's pass) == the numpy definitions:
    round_shift_numpy alignment to max(row exponents) - G, then the three LayerNorm passes;
    rows of +-qmax, zero rows and blocks, exponent gaps past 62 bits, batched shapes, 1 and 2
    threads; add's format error and LayerNorm's shape error."""
    from bct.model import matmul as matmul_module
    from bct.model import nonlinear
    from bct.model.fixed import round_shift_numpy
    from bct.model.nonlinear import add_layernorm

    rng = np.random.default_rng(40 + threads)
    fmt = cfg.act_format
    N = 4 * cfg.block_size
    mant = rng.integers(-fmt.qmax, fmt.qmax + 1, (3, 5, N))
    exp = rng.integers(-12, 4, (3, 5, N // fmt.block))
    mant[0, 0] = fmt.qmax
    mant[0, 1] = 0
    mant[0, 2, :fmt.block] = 0
    mant[1, 0, ::3] = -fmt.qmax
    exp[2, 0, 0], exp[2, 0, -1] = fmt.e_min, fmt.e_max
    x = BlockTensor(mant, exp, fmt)
    gamma = encode(rng.uniform(-3, 3, N), cfg.vector_format)
    beta = encode(rng.standard_normal(N) * 4, cfg.vector_format)
    scale = exp.max(axis=-1) - cfg.acc_guard_bits
    v = round_shift_numpy(x.blocks, scale[..., None, None] - exp[..., None]).reshape(mant.shape)
    want = requantize_numpy(layernorm_affine_numpy(layernorm_fixed_numpy(Fixed(v, scale), cfg), gamma,
                                                   beta, cfg), -cfg.ln_out_frac, fmt)
    monkeypatch.setattr(nonlinear, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    try:
        matmul_module.set_threads(threads)
        assert add_layernorm(x, gamma, beta, cfg) == want
        assert add_layernorm(x[1], gamma, beta, cfg) == layernorm(Fixed(v[1], scale[1]), gamma, beta, cfg)
        with pytest.raises(ValueError, match=r"LayerNorm gamma must be a"):
            add_layernorm(x, BlockTensor(beta.mant[:cfg.block_size], beta.exp[:1], beta.fmt), beta, cfg)
        with pytest.raises(ConfigError, match="neither the activation nor the weight format"):
            add_layernorm(encode(rng.standard_normal((2, N)), BlockFormat(3, cfg.block_size, 5)), gamma, beta, cfg)
    finally:
        matmul_module.set_threads(before)


def test_compiled_layernorm_affine_split_among_threads(monkeypatch):
    """The affine pass with its rows shared among 2 threads == numpy."""
    from bct.model import matmul as matmul_module
    from bct.model import nonlinear

    cfg = Config()
    rng = np.random.default_rng(23)
    N = 4 * cfg.block_size
    y = layernorm_fixed(Fixed(rng.integers(-cfg.add_bound, cfg.add_bound + 1, size=(7, 5, N)),
                              rng.integers(-30, 6, size=(7, 5))), cfg)
    gamma = encode(rng.uniform(-3, 3, N), cfg.vector_format)
    beta = encode(rng.standard_normal(N) * 4, cfg.vector_format)
    monkeypatch.setattr(nonlinear, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    try:
        matmul_module.set_threads(2)
        assert _same(layernorm_affine(y, gamma, beta, cfg), layernorm_affine_numpy(y, gamma, beta, cfg))
    finally:
        matmul_module.set_threads(before)


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
def test_compiled_fixed_to_frac_equals_numpy(cfg):
    rng = np.random.default_rng(23)
    v = rng.integers(-(1 << 45), 1 << 45, size=(40, 16))
    v[0, :4] = [0, 1, -1, (1 << 45)]
    scale = rng.integers(-70, 40, size=40)
    for frac, bits in ((cfg.gelu_frac, cfg.gelu_bits), (8, 17), (16, 33)):
        for x in (Fixed(v, scale), Fixed(v, np.int64(-20)), Fixed(v.reshape(4, 10, 16), scale.reshape(4, 10))):
            assert _same(fixed_to_frac(x, frac, bits), fixed_to_frac_numpy(x, frac, bits))


@pytest.mark.parametrize("cfg", COMPILED_CFGS + [Config(gelu_frac=16, gelu_table_range=16)])
def test_compiled_gelu_table_edges(cfg):
    """The table's span and one past it on both sides, and the saturation limits."""
    from bct.model.nonlinear import _gelu_lut
    span, lut = _gelu_lut(cfg)
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    x = np.array([v for d in (-2, -1, 0, 1, 2) for v in (span + d, -span + d, lim + d, -lim + d)])
    assert _same(gelu_fixed(x, cfg), gelu_fixed_numpy(x, cfg))
    assert lut.size == 2 * span + 1


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_fused_gelu_equals_numpy(cfg, threads):
    """gelu / gelu_acc (one fused pass, rows shared among threads) == their numpy definitions."""
    from bct.model import matmul
    rng = np.random.default_rng(24)
    t = encode(rng.standard_normal((3, 130, 8 * cfg.block_size)) * 3, cfg.act_format)
    t.mant[0, 0] = 0  # an all-zero row
    acc = Fixed(rng.integers(-(1 << 38), 1 << 38, size=(3, 130, 8 * cfg.block_size)),
                rng.integers(-40, -20, size=(3, 130)))
    before = matmul._THREADS
    matmul.set_threads(threads)
    try:
        assert gelu(t, cfg) == gelu_numpy(t, cfg)
        assert gelu(t[0], cfg) == gelu_numpy(t[0], cfg)
        assert gelu_acc(acc, cfg) == gelu_acc_numpy(acc, cfg)
    finally:
        matmul.set_threads(before)


@pytest.mark.parametrize("cfg", COMPILED_CFGS)
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_fused_softmax_equals_numpy(cfg, threads):
    """softmax (one fused pass, rows shared among threads) == its numpy definition, with key
    masks, full masks and none; the same error for a fully masked row."""
    from bct.model import matmul
    rng = np.random.default_rng(25)
    L = 4 * cfg.block_size
    s = encode(rng.standard_normal((4, 3, 70, L)) * rng.uniform(0.1, 30, (4, 3, 70, 1)), cfg.act_format)
    key = rng.random((4, 1, 1, L)) < 0.5
    key[:, :, :, 1] = True
    full = rng.random(s.shape) < 0.2
    full[..., -1] = True
    before = matmul._THREADS
    matmul.set_threads(threads)
    try:
        for mask in (None, key, full):
            assert softmax(s, cfg, mask) == softmax_numpy(s, cfg, mask)
        with pytest.raises(ValueError, match="a row has no unmasked element"):
            softmax(s, cfg, np.zeros(L, dtype=bool))
    finally:
        matmul.set_threads(before)
