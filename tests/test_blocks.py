import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bct.config import BlockFormat, Config, ConfigError
from fractions import Fraction

from bct.model.blocks import (
    MSE_SEARCH_DEPTH,
    BlockTensor,
    block_sq_error,
    encode,
    mse_exponent,
    reblock_transposed,
    requantize,
    requantize_numpy,
    shared_exponent,
    to_fixed,
)
from bct.model.fixed import round_half_away

FORMATS = [BlockFormat(8, 32, 8), BlockFormat(4, 8, 8), BlockFormat(6, 128, 5), BlockFormat(2, 16, 4)]


def _smallest_exponent_brute(m: float, fmt: BlockFormat) -> int:
    for e in range(fmt.e_min, fmt.e_max + 1):
        if abs(m) * 2.0**-e < fmt.qmax + 0.5:
            return e
    return fmt.e_max


@pytest.mark.parametrize("fmt", FORMATS)
def test_encode_rule_seeded(fmt):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4 * fmt.block)) * np.exp(rng.uniform(-6, 6, (64, 1)))
    t = encode(x, fmt)
    t.check()
    for row in range(8):
        for j in range(4):
            blk = x[row, j * fmt.block:(j + 1) * fmt.block]
            assert t.exp[row, j] == _smallest_exponent_brute(np.abs(blk).max(), fmt)
    step = np.ldexp(1.0, t.block_exp())
    inside = t.block_exp() < fmt.e_max  # blocks at e_max may saturate
    assert inside.mean() > 0.5
    assert (np.abs(t.decode() - x)[inside] <= step[inside] / 2).all()  # half a step, never more
    # the block maximum uses the upper half of the range (the exponent is the smallest)
    in_range = (t.exp > fmt.e_min) & (t.exp < fmt.e_max)
    assert (np.abs(t.blocks).max(axis=-1)[in_range] > fmt.qmax // 2).all()


float_blocks = hnp.arrays(
    np.float64, (3, 32), elements=st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False)
)


@settings(max_examples=200, deadline=None)
@given(float_blocks)
def test_encode_properties(x):
    fmt = Config().act_format
    t = encode(x, fmt)
    t.check()
    step = np.ldexp(1.0, t.block_exp())
    assert (np.abs(t.decode() - x) <= step / 2).all()
    # decode is exact and re-encoding is the identity
    assert encode(t.decode(), fmt) == t
    # symmetric: encode(-x) == -encode(x)
    n = encode(-x, fmt)
    assert np.array_equal(n.mant, -t.mant) and np.array_equal(n.exp, t.exp)


@settings(max_examples=300, deadline=None)
@given(
    hnp.arrays(np.int64, (2, 16), elements=st.integers(-(2**45), 2**45)),
    st.integers(-150, 40),
    st.sampled_from(FORMATS[1:2] + [BlockFormat(8, 16, 8), BlockFormat(3, 16, 6)]),
)
def test_requantize_equals_float_encode(y, scale, fmt):
    """The integer-only blockifier and the float encoder agree on the same exact values."""
    a = requantize(y, scale, fmt)
    b = encode(np.ldexp(y.astype(np.float64), scale), fmt)
    assert a == b


@pytest.mark.parametrize("fmt", FORMATS)
def test_integer_round_trip(fmt):
    """Decoding to fixed point (exact) and re-encoding with the integer blockifier is the identity."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 4 * fmt.block)) * np.exp(rng.uniform(-4, 4, (32, 4 * fmt.block)))
    x[0, : fmt.block] = 0  # an all-zero block
    t = encode(x, fmt)
    live = t.exp[t.exp > fmt.e_min]
    frac = -int(live.min())
    assert int(live.max()) + frac + fmt.bits < 62
    assert requantize(to_fixed(t, frac, 63), -frac, fmt) == t


def test_zero_block_gets_e_min_and_zeros():
    fmt = Config().act_format
    x = np.zeros((2, 64))
    x[1, 40] = 3.0
    t = encode(x, fmt)
    assert t.exp.tolist() == [[-128, -128], [-128, -5]]
    assert (t.mant[0] == 0).all() and (t.mant[1, :32] == 0).all()
    r = requantize(np.zeros((1, 32), dtype=np.int64), 7, fmt)
    assert r.exp.tolist() == [[-128]] and not r.mant.any()


def test_saturation_at_e_max_and_underflow_at_e_min():
    fmt = BlockFormat(8, 8, 4)  # exponents -8..7
    big = np.full(8, 1e9)
    t = encode(big, fmt)
    assert t.exp.tolist() == [7] and t.mant.tolist() == [127] * 8
    tiny = np.array([1e-6, 2**-10, 2**-9 * 1.5, -(2**-9), 0, 0, 0, 0])
    t = encode(tiny, fmt)
    # e clamps to e_min = -8: values round on the 2**-8 grid, halves away from zero
    assert t.exp.tolist() == [-8] and t.mant.tolist() == [0, 0, 1, -1, 0, 0, 0, 0]


def test_rounding_boundary_picks_smallest_exponent():
    fmt = BlockFormat(8, 8, 8)
    # 127.49 rounds to 127 at e=0; 127.5 would round to 128 and needs e=1
    assert encode(np.array([127.49] + [0] * 7), fmt).exp.tolist() == [0]
    assert encode(np.array([127.5] + [0] * 7), fmt).exp.tolist() == [1]
    assert encode(np.array([-127.5] + [0] * 7), fmt).mant.tolist()[0] == -64
    assert shared_exponent(np.array([0.0, 1.0, 254.9]), fmt).tolist() == [-128, -6, 1]


def test_to_fixed_rounds_and_saturates():
    fmt = BlockFormat(8, 8, 8)
    t = BlockTensor(np.array([[3, -3, 127, -127, 1, 0, 0, 0]], dtype=np.int64), np.array([[-2]]), fmt)
    assert to_fixed(t, 1, 16).tolist() == [[2, -2, 64, -64, 1, 0, 0, 0]]  # 1.5 -> 2, 0.5 -> 1
    assert to_fixed(t, 4, 8).tolist() == [[12, -12, 127, -127, 4, 0, 0, 0]]  # saturated at 127


def test_errors():
    fmt = Config().act_format
    with pytest.raises(ConfigError, match=r"last axis \(30,\) is not a multiple of block size 32"):
        encode(np.zeros(30), fmt)
    with pytest.raises(ValueError, match="cannot encode NaN or infinite values"):
        encode(np.full(32, np.nan), fmt)
    with pytest.raises(ValueError, match="cannot encode NaN or infinite values"):
        encode(np.full(32, np.inf), fmt)
    with pytest.raises(TypeError, match="must be int64"):
        BlockTensor(np.zeros(32, dtype=np.int32), np.zeros(1, dtype=np.int64), fmt)
    with pytest.raises(ValueError, match="exp shape"):
        BlockTensor(np.zeros(32, dtype=np.int64), np.zeros(2, dtype=np.int64), fmt)
    bad = BlockTensor(np.full(32, 200, dtype=np.int64), np.zeros(1, dtype=np.int64), fmt)
    with pytest.raises(ValueError, match=r"mantissa outside \[-127, 127\]"):
        bad.check()


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(np.int64, (2, 16), elements=st.integers(-(2**40), 2**40)),
    hnp.arrays(np.int64, (2, 16), elements=st.integers(-140, 30)),
)
def test_requantize_per_element_scale_equals_float_encode(y, scale):
    fmt = BlockFormat(8, 8, 8)
    assert requantize(y, scale, fmt) == encode(np.ldexp(y.astype(np.float64), scale), fmt)


def test_reblock_transposed_matches_float_encode_of_the_transpose():
    fmt = Config().act_format
    rng = np.random.default_rng(12)
    v = encode(rng.standard_normal((64, 96)) * np.exp(rng.uniform(-3, 3, (64, 1))), fmt)
    t = reblock_transposed(v, fmt)
    assert t.shape == (96, 64) and t.exp.shape == (96, 2)
    assert t == encode(v.decode().T, fmt)
    with pytest.raises(ValueError, match="takes a tensor of 2 or more dimensions"):
        reblock_transposed(encode(np.ones(32), fmt), fmt)


@pytest.mark.parametrize("threads", [1, 2])
def test_reblock_transposed_kernel_equals_requantize_numpy_of_the_transpose(monkeypatch, threads):
    """The compiled transposing pass == requantize_numpy of the swapped axes with every
    element's exponent: batched (heads) shapes, input blocks narrower and wider than the output
    blocks, all-zero blocks, +-qmax, exponents at e_min / e_max (gaps past 62 bits), ties of
    the rounding; and the fallback for a token count that is not a multiple of the block."""
    from bct.model import matmul as matmul_module
    from bct.model import nonlinear

    monkeypatch.setattr(nonlinear, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    rng = np.random.default_rng(70 + threads)
    try:
        matmul_module.set_threads(threads)
        for fin, fout, shape in ((BlockFormat(8, 32, 8), BlockFormat(8, 32, 8), (2, 3, 64, 32)),
                                 (BlockFormat(8, 8, 8), BlockFormat(8, 32, 8), (5, 32, 16)),
                                 (BlockFormat(6, 16, 6), BlockFormat(8, 8, 8), (16, 48)),
                                 (BlockFormat(16, 8, 8), BlockFormat(4, 8, 5), (3, 8, 24))):
            mant = rng.integers(-fin.qmax, fin.qmax + 1, shape)
            nk = shape[-1] // fin.block
            exp = rng.integers(fin.e_min, fin.e_max + 1, shape[:-1] + (nk,))
            mant[..., 0, :fin.block] = 0  # an all-zero input block
            mant[..., 1, :] = fin.qmax
            mant[..., 2, ::2] = -fin.qmax
            mant[..., 3, :] = rng.choice([1, -1, 3, -3], shape[-1])  # ties after small shifts
            exp[..., 1, 0], exp[..., 2, -1] = fin.e_min, fin.e_max
            exp[..., 4:6, :] = fout.e_max + 3  # saturating exponents
            t = BlockTensor(mant, exp, fin)
            want = requantize_numpy(np.swapaxes(mant, -1, -2), np.swapaxes(t.block_exp(), -1, -2), fout)
            assert reblock_transposed(t, fout) == want
        odd = encode(rng.standard_normal((20, 32)), BlockFormat(8, 32, 8))  # 20 tokens: fallback
        with pytest.raises(ConfigError, match="not a multiple of block size"):
            reblock_transposed(odd, BlockFormat(8, 32, 8))
    finally:
        matmul_module.set_threads(before)


def test_huge_scales_saturate_instead_of_wrapping():
    fmt = Config().act_format
    y = np.array([[3, -1] + [0] * (fmt.block - 2)])
    big = requantize(y, fmt.e_max + 70, fmt)
    assert big.exp.tolist() == [[fmt.e_max]] and big.mant[0, :3].tolist() == [fmt.qmax, -fmt.qmax, 0]
    t = BlockTensor(y.astype(np.int64), np.array([[fmt.e_max]]), fmt)
    assert to_fixed(t, 8, 17)[0, :3].tolist() == [2**16 - 1, -(2**16 - 1), 0]


# ------------------------------------------------------------------------------------------------
# Exponent search (exp_search="mse", Config.weight_exp_search)


def _exact_block_error(blk, e: int, fmt: BlockFormat) -> Fraction:
    """Exact squared error of one block stored at exponent ``e`` (clamped RHAZ integers)."""
    total = Fraction(0)
    for v in blk:
        v = Fraction(float(v))
        y = v / Fraction(2) ** e
        q = int(abs(y) + Fraction(1, 2)) * (1 if y >= 0 else -1)  # RHAZ on exact rationals
        q = max(-fmt.qmax, min(fmt.qmax, q))
        total += (v - q * Fraction(2) ** e) ** 2
    return total


def _mse_exponent_brute(blk, fmt: BlockFormat) -> int:
    """The smallest exact error among e0, e0-1, e0-2 (not below e_min); ties keep the larger."""
    e0 = _smallest_exponent_brute(np.abs(blk).max(), fmt) if np.abs(blk).max() > 0 else fmt.e_min
    best, best_err = e0, _exact_block_error(blk, e0, fmt)
    for e in range(e0 - 1, max(e0 - MSE_SEARCH_DEPTH, fmt.e_min) - 1, -1):
        err = _exact_block_error(blk, e, fmt)
        if err < best_err:
            best, best_err = e, err
    return best


SEARCH_FORMATS = [BlockFormat(4, 32, 6), BlockFormat(4, 128, 6), BlockFormat(8, 32, 8), BlockFormat(3, 8, 4)]


def _search_data(fmt: BlockFormat, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Gaussian and heavy-tailed (Student t) blocks over a range of scales, some with one outlier
    x = rng.standard_normal((24, 4 * fmt.block))
    x[8:16] = rng.standard_t(3, (8, 4 * fmt.block))
    x[16:, :: fmt.block] *= 20.0
    return x * np.exp2(rng.integers(-6, 6, (24, 1)))


@pytest.mark.parametrize("fmt", SEARCH_FORMATS)
def test_mse_search_equals_exact_brute_force(fmt):
    x = _search_data(fmt, 1)
    t = encode(x, fmt, "mse")
    t.check()
    blocks = x.reshape(x.shape[0], -1, fmt.block)
    brute = np.array([[_mse_exponent_brute(b, fmt) for b in row] for row in blocks])
    assert t.exp.tolist() == brute.tolist()
    # the integers are those of the one rounding rule at the chosen exponent
    q = np.clip(round_half_away(np.ldexp(blocks, -t.exp[..., None])), -fmt.qmax, fmt.qmax)
    assert np.array_equal(t.blocks, q)
    # both choices occur on this data, so the test can tell the search from either extreme
    e0 = encode(x, fmt).exp
    assert (t.exp == e0).any() and (t.exp < e0).any()


@pytest.mark.parametrize("fmt", SEARCH_FORMATS)
def test_mse_search_never_increases_any_block_error(fmt):
    x = _search_data(fmt, 2)
    a, b = encode(x, fmt), encode(x, fmt, "mse")
    d = b.exp - a.exp
    assert ((d <= 0) & (d >= -MSE_SEARCH_DEPTH)).all()
    blocks = x.reshape(x.shape[0], -1, fmt.block)
    for r in range(x.shape[0]):
        for j in range(blocks.shape[1]):
            ea = _exact_block_error(blocks[r, j], int(a.exp[r, j]), fmt)
            eb = _exact_block_error(blocks[r, j], int(b.exp[r, j]), fmt)
            assert eb <= ea
            assert (eb < ea) == (b.exp[r, j] != a.exp[r, j])  # a change is a strict gain
    assert (d < 0).any()


@settings(max_examples=50, deadline=None)
@given(float_blocks)
def test_mse_search_properties(x):
    fmt = BlockFormat(4, 32, 6)
    a, b = encode(x, fmt), encode(x, fmt, "mse")
    b.check()
    for r in range(x.shape[0]):
        ea = _exact_block_error(x[r], int(a.exp[r, 0]), fmt)
        assert _exact_block_error(x[r], int(b.exp[r, 0]), fmt) <= ea
        assert b.exp[r, 0] == _mse_exponent_brute(x[r], fmt)


def test_max_search_is_the_block_max_rule():
    fmt = BlockFormat(4, 32, 6)
    x = _search_data(fmt, 3)
    t = encode(x, fmt, "max")
    assert t == encode(x, fmt)
    blocks = x.reshape(x.shape[0], -1, fmt.block)
    assert np.array_equal(t.exp, shared_exponent(np.abs(blocks).max(axis=-1), fmt))
    assert np.array_equal(t.blocks, np.clip(round_half_away(np.ldexp(blocks, -t.exp[..., None])), -7, 7))
    assert np.array_equal(mse_exponent(blocks, fmt, depth=0), t.exp)


def test_mse_search_hand_made_blocks():
    fmt = BlockFormat(4, 128, 6)  # qmax 7
    # one 4.0 and 127 x 0.3: at e0 = 0 each 0.3 costs 0.09; at e = -1 the 4.0 clips to 3.5
    # (cost 0.25) and each 0.3 costs 0.04: 0.25 + 127 * 0.04 < 127 * 0.09, so e = -1
    x = np.full((5, 128), 0.3)
    x[0, 5] = 4.0
    # one 3.9 (e0 = 0) and 127 x 0.3: e = -2 clips it to 1.75 (cost 4.62) but each 0.3 costs
    # 0.0025 (1.2 -> 1): 4.94 total beats 5.24 at e = -1 and 11.44 at e0
    x[4, 0] = 3.9
    # a lone outlier: clipping it costs more than the finer step gains, so e0 stays
    x[1] = 0.0
    x[1, 0] = 7.0
    x[2] = 0.0  # all zero: e_min either way
    x[3] = 2.0**-40  # below e_min = -32: every candidate is e_min
    t = encode(x, fmt, "mse")
    assert t.exp.tolist() == [[-1], [0], [-32], [-32], [-2]]
    assert mse_exponent(x.reshape(5, 1, 128), fmt, depth=1).tolist() == [[-1], [0], [-32], [-32], [-1]]
    assert t.mant[0, 5] == 7 and t.mant[0, 0] == 1 and t.mant[1, 0] == 7
    # errors in units of 4**e: at e = -1 the 4.0 leaves 8 - 7 = 1, each 0.3 leaves 0.6 - 1 = -0.4
    err = block_sq_error(x[:2].reshape(2, 1, 128), np.array([[-1], [0]]), fmt)
    assert err[0, 0] == pytest.approx(1 + 127 * 0.16) and err[1, 0] == 0.0
    exact = [_exact_block_error(x[0], e, fmt) for e in (0, -1, -2)]
    assert exact[1] < exact[0] and exact[1] < exact[2]  # e - 2 is tried and loses (5.38 > 5.33)


def test_exp_search_errors():
    fmt = BlockFormat(4, 32, 6)
    with pytest.raises(ValueError, match="exp_search must be 'max' or 'mse', not 'min'"):
        encode(np.zeros(32), fmt, "min")
    with pytest.raises(ValueError, match="depth must be a non-negative int, not -1"):
        mse_exponent(np.zeros((1, 32)), fmt, depth=-1)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 50), st.booleans())
def test_compiled_requantize_equals_numpy_passes(seed, width, per_element):
    """The compiled blockifier and its numpy definition agree on rows and element scales, with
    zero blocks, single nonzero lanes and magnitudes up to 2**50."""
    rng = np.random.default_rng(seed)
    fmt = BlockFormat(8, 32, 8)
    y = rng.integers(-(2**width), 2**width + 1, (3, 4, 96), dtype=np.int64)
    y[0, 0, :32] = 0
    y[1, 1, 32:64] = 0
    y[1, 1, 40] = 2**width
    y[2] >>= rng.integers(0, width + 1, (4, 1))
    shape = y.shape if per_element else y.shape[:-1]
    scale = rng.integers(fmt.e_min - 60, fmt.e_max + 20, shape)
    assert requantize(y, scale, fmt) == requantize_numpy(y, scale, fmt)
    assert requantize(y[0, 0], -3, fmt) == requantize_numpy(y[0, 0], -3, fmt)
