import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bct.config import Config, ConfigError
from bct.model.blocks import BlockTensor, encode
from bct.model import matmul as matmul_module
from bct.model.matmul import (
    Fixed, _block_float, add, add_requantize, linear, matmul, matmul_pyint, row_scale, set_threads,
)

CONFIGS = [
    Config(),
    Config(weight_bits=4, block_size=16),
    Config(weight_bits=4, act_bits=6, block_size=128, acc_guard_bits=4),
    Config(block_size=8, acc_guard_bits=0, exp_bits=5),
    Config(weight_bits=4, weight_block_size=128, weight_exp_bits=5),
]


def _operands(cfg, M, K, N, rng, spread=2.0):
    X = rng.standard_normal((M, K)) * np.exp(spread * rng.standard_normal((M, K)))
    X[0, : cfg.block_size] = 0  # an all-zero block
    W = rng.standard_normal((N, K)) * 0.05 * np.exp(rng.standard_normal((N, K)))
    b = rng.standard_normal(N) * 10.0 ** rng.integers(-4, 3)
    return (
        encode(X, cfg.act_format),
        encode(W, cfg.weight_format),
        encode(b, cfg.vector_format),
    )


def assert_same(a, b):
    """Exact comparison that names the first differing index and both values."""
    for name in ("value", "scale"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, f"{name}: shapes {x.shape} != {y.shape}"
        diff = np.argwhere(x != y)
        assert diff.size == 0, (
            f"{name} differs at {tuple(diff[0])}: {x[tuple(diff[0])]} != {y[tuple(diff[0])]}"
        )


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"w{c.weight_bits}a{c.act_bits}b{c.block_size}wb{c.weight_format.block}g{c.acc_guard_bits}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_bit_exact_against_python_ints(cfg, with_bias):
    rng = np.random.default_rng(cfg.block_size + with_bias)
    x, w, b = _operands(cfg, 6, 2 * max(cfg.weight_format.block, 32), 64 if cfg.block_size <= 32 else 128, rng)
    bias = b if with_bias else None
    got, ref = matmul(x, w, cfg, bias), matmul_pyint(x, w, cfg, bias)
    assert_same(got, ref)
    assert np.abs(got.value).max() <= cfg.acc_bound


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 4), st.floats(0, 6))
def test_bit_exact_random_shapes(seed, M, nb, spread):
    cfg = Config(block_size=8, weight_bits=5)
    rng = np.random.default_rng(seed)
    x, w, b = _operands(cfg, M, 8 * nb, 8, rng, spread)
    assert_same(matmul(x, w, cfg, b), matmul_pyint(x, w, cfg, b))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(4, 12), st.floats(0, 4))
def test_wide_exponent_spread_exact(seed, spread, wspread):
    """Activation and weight exponents spread far beyond G: most block terms need rounding and
    the block GEMMs' shift clamps are active."""
    cfg = Config()
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((6, 96)) * np.exp(spread * rng.standard_normal((6, 96)))
    W = rng.standard_normal((40, 96)) * np.exp(wspread * rng.standard_normal((40, 96)))
    W[3] = 0  # an all-zero weight row
    x, w = encode(X, cfg.act_format), encode(W, cfg.weight_format)
    assert_same(matmul(x, w, cfg), matmul_pyint(x, w, cfg))


def test_wide_operands_take_the_float64_path_exactly():
    """12-bit activations, K = 1024: block products up to 32 * 2047 * 127 exceed float32's exact
    range (2**22), so the block GEMMs run in float64."""
    cfg = Config(act_bits=12, acc_guard_bits=8, max_reduction=1024)
    rng = np.random.default_rng(3)
    x, w, b = _operands(cfg, 3, 1024, 64, rng, spread=4.0)
    assert _block_float(x, w)[0] is np.float64
    assert_same(matmul(x, w, cfg, b), matmul_pyint(x, w, cfg, b))


@pytest.mark.parametrize("B", [32, 128])
def test_float32_path_ties_and_clamps_exact(B):
    """8-bit operands at blocks of 32 and 128 (block products up to 2.06e6 < 2**22: float32).
    Products at +-qmax, exponents spread over the whole format so every shift from -G to past
    the clamps occurs, and odd small products whose scaled values are exact halves (ties)."""
    cfg = Config(block_size=B, max_reduction=4096)
    rng = np.random.default_rng(B)
    fa, fw = cfg.act_format, cfg.weight_format
    K, M, N = 4 * B, 24, 2 * B
    xm = rng.choice([-fa.qmax, -1, 0, 1, 3, fa.qmax], size=(M, K))
    wm = rng.choice([-fw.qmax, -1, 1, fw.qmax], size=(N, K))
    xm[0] = fa.qmax
    wm[0] = fw.qmax
    xe = rng.integers(fa.e_min, fa.e_max + 1, size=(M, K // B))
    we = rng.integers(fw.e_min, fw.e_max + 1, size=(N, K // B))
    xe[1] = rng.integers(-3, 3, size=K // B)  # a row with shifts around 0 (ties of odd products)
    we[1] = we.max()
    x = BlockTensor(xm.astype(np.int64), xe.astype(np.int64), fa)
    w = BlockTensor(wm.astype(np.int64), we.astype(np.int64), fw)
    assert _block_float(x, w)[0] is np.float32
    assert_same(matmul(x, w, cfg), matmul_pyint(x, w, cfg))


def test_full_problem_bit_exact():
    """The issue's (128 x 384) @ (384 x 1536) problem, against plain Python ints."""
    cfg = Config()
    rng = np.random.default_rng(7)
    x, w, b = _operands(cfg, 128, 384, 1536, rng)
    assert_same(matmul(x, w, cfg, b), matmul_pyint(x, w, cfg, b))


@pytest.mark.parametrize("cfg", [Config(max_reduction=4096), Config(weight_bits=4, max_reduction=256, block_size=16)])
def test_worst_case_accumulator_reaches_bound_without_wrapping(cfg):
    """Every product at +qmax*qmax with equal exponents and the largest bias: |acc| == bound."""
    K, B = cfg.max_reduction, cfg.block_size
    qa, qv = cfg.act_format.qmax, cfg.vector_format.qmax
    nb = K // B
    # the right operand is a weight, or an activation (K in Q K^T): the bound covers both
    for fmt in (cfg.weight_format, cfg.act_format):
        for sign in (1, -1):
            x = BlockTensor(np.full((1, K), qa, dtype=np.int64), np.zeros((1, nb), dtype=np.int64), cfg.act_format)
            w = BlockTensor(np.full((B, K), sign * fmt.qmax, dtype=np.int64), np.zeros((B, nb), dtype=np.int64), fmt)
            bias = BlockTensor(np.full(B, sign * qv, dtype=np.int64), np.zeros(1, dtype=np.int64), cfg.vector_format)
            y = matmul(x, w, cfg, bias)
            assert (y.value == sign * ((K * qa * fmt.qmax + qv) << cfg.acc_guard_bits)).all()
            assert_same(y, matmul_pyint(x, w, cfg, bias))
    assert (y.value == -cfg.acc_bound).all()  # the activation operand attains the bound
    assert cfg.acc_bound < 2 ** (cfg.acc_bits - 1) <= 2 * cfg.acc_bound  # fits, and tightly


def test_accuracy_against_float():
    cfg = Config()
    rng = np.random.default_rng(3)
    x, w, b = _operands(cfg, 16, 384, 96, rng, spread=0.5)
    y = matmul(x, w, cfg, b)
    got = np.ldexp(y.value.astype(np.float64), y.scale[:, None])
    ref = x.decode() @ w.decode().T + b.decode()
    # each block term loses at most half an accumulator LSB; 12 blocks + bias
    lsb = np.ldexp(1.0, y.scale)[:, None]
    assert (np.abs(got - ref) <= 13 * lsb / 2).all()


def test_linear_requantizes_along_outputs():
    cfg = Config()
    rng = np.random.default_rng(4)
    x, w, b = _operands(cfg, 4, 64, 64, rng, spread=0.5)
    out = linear(x, w, cfg, b)
    assert out.shape == (4, 64) and out.exp.shape == (4, 2) and out.fmt == cfg.act_format
    ref = x.decode() @ w.decode().T + b.decode()
    step = np.ldexp(1.0, out.block_exp())
    assert (np.abs(out.decode() - ref) <= step).all()


def test_add_is_exact_with_guard_bits():
    cfg = Config()
    rng = np.random.default_rng(5)
    a = encode(rng.standard_normal((3, 64)), cfg.act_format)
    b = encode(rng.standard_normal((3, 64)) * 3, cfg.act_format)
    c = encode(rng.standard_normal((3, 64)) * 0.01, cfg.act_format)
    s = add(a, b, c, cfg=cfg)
    got = np.ldexp(s.value.astype(np.float64), s.scale[:, None])
    lsb = np.ldexp(1.0, s.scale)[:, None]
    assert (np.abs(got - (a.decode() + b.decode() + c.decode())) <= 1.5 * lsb).all()
    assert np.abs(s.value).max() <= cfg.add_bound


def test_int8_pass_rounds_every_product_like_round_shift():
    """The int8 path's compiled pass (block terms as P * 2**-s rounded in float32) equals
    round_shift on every |P| <= 2**16, on every tie and its neighbours and the extremes up to
    128 * 127**2, for splits s = sx + sw from -16 to past the clamps (factors built as the path
    builds them, G = 0, 8, 16; every P and shift was also checked once outside the suite)."""
    from bct.model.fixed import round_shift_numpy

    shift_sum = matmul_module._shift_sum()
    top = 128 * 127 * 127
    ties = np.array([(1 << k) + d for k in range(22) for d in (-1, 0, 1)]
                    + [(3 << k) >> 1 for k in range(1, 21)] + [top, top - 1], dtype=np.int64)
    ties = ties[ties <= top]
    P = np.unique(np.concatenate([np.arange(-(1 << 16), (1 << 16) + 1), ties, -ties]))
    P = np.concatenate([P, np.zeros(-len(P) % 256, dtype=np.int64)])
    p = P.astype(np.int32).reshape(1, -1, 256)
    R = p.shape[1]
    z = np.zeros(0, np.int64)
    q0, e0 = np.empty((0, 0, 0, 0), np.int64), np.empty((0, 0, 0), np.int64)
    out = np.empty((R, 256), dtype=np.int64)
    for G in (0, 8, 16):
        for sx in sorted({-G, -G + 1, -1, 0, 1, 2, 7, 19, 23, 24, 25, 30}):
            for sw in sorted({0, 1, 5, 21, 22, 23, 24, 25, 24 + G, 24 + G + 1, 70}):
                fx = np.full((1, R, 1), np.ldexp(np.float32(1), -min(sx, 24)), dtype=np.float32)
                fw = np.full((1, 1, 256), np.ldexp(np.float32(1), -min(sw, 24 + G)), dtype=np.float32)
                want = round_shift_numpy(P, sx + sw)
                # the int64 accumulator; the int32 one where the terms fit it (as the segments
                # are sized), every other product set to 0
                small = np.abs(want) < 1 << 31
                for acc_type, pp in ((np.int64, p), (np.int32, np.where(small, P, 0))):
                    acc = np.full((R, 256), 99, dtype=acc_type)
                    shift_sum(pp.astype(np.int32).reshape(1, R, 256), R, acc, out, 0, 0, 0, 0, 1, fx,
                              fw, z, z, np.zeros((1, R), np.int64), q0, e0, 0, 0, 0, 0)
                    expect = want if acc_type is np.int64 else np.where(small, want, 0)
                    assert np.array_equal(out.reshape(-1), expect), (G, sx, sw, acc_type)
                    assert np.array_equal(acc.reshape(-1), expect), (G, sx, sw, acc_type)


def _add_terms(rng, fmt, n_terms, zero_row=False):
    """Random block terms ``(2, 3, 2 blocks)`` of ``fmt`` with exponent gaps up to the whole
    exponent range (one block at ``e_min``, one at ``e_max``), optionally an all-zero row."""
    terms = []
    for _ in range(n_terms):
        mant = rng.integers(-fmt.qmax, fmt.qmax + 1, (2, 3, 2 * fmt.block))
        exp = rng.integers(fmt.e_min, fmt.e_max + 1, (2, 3, 2))
        exp[0, 0] = fmt.e_min
        exp[1, 2, 1] = fmt.e_max
        if zero_row:
            mant[1, 1] = 0
        terms.append(BlockTensor(mant, exp, fmt))
    return terms


def _add_reference(terms, cfg):
    """The definition of ``add`` in numpy passes: ``(value, scale)``, each term's blocks
    ``round_shift_numpy``-ed to the common scale (largest exponent minus the guard bits)."""
    from bct.model.fixed import round_shift_numpy

    scale = np.max([t.exp.max(axis=-1) for t in terms], axis=0) - cfg.acc_guard_bits
    value = sum(round_shift_numpy(t.blocks, scale[..., None, None] - t.exp[..., None])
                for t in terms).reshape(terms[0].shape)
    return value, scale


def _add_cases(rng, n_terms, **kw):
    """``(cfg, terms, reference sum, its scale)`` for the default and the 4-bit config, each
    with operands in its activation and its weight format (:func:`_add_terms`)."""
    for cfg in (Config(), Config(weight_bits=4, weight_block_size=128, weight_exp_bits=6)):
        for fmt in (cfg.act_format, cfg.weight_format):
            terms = _add_terms(rng, fmt, n_terms, **kw)
            yield (cfg, terms, *_add_reference(terms, cfg))


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_add_compiled_equals_round_shift_definition(n_terms, monkeypatch):
    """The compiled add == the definition in numpy passes (round_shift_numpy per block), on
    both formats, batched shapes, exponent gaps past 62 bits and split among threads."""
    rng = np.random.default_rng(40 + n_terms)
    monkeypatch.setattr(matmul_module, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    try:
        for cfg, terms, want, scale in _add_cases(rng, n_terms):
            for n in (1, 2):
                set_threads(n)
                got = add(*terms, cfg=cfg)
                assert got.value.dtype == np.int64 and np.array_equal(got.value, want)
                assert np.array_equal(got.scale, scale)
    finally:
        set_threads(before)


@pytest.mark.parametrize("n_terms", [1, 2, 3])
def test_add_requantize_equals_requantize_numpy_of_the_sum(n_terms, monkeypatch):
    """add_requantize (sum and re-encoding per row in one compiled pass) == requantize_numpy
    of the numpy definition of the sum: both operand formats (weight blocks of 128 re-encoded
    to activation blocks of 32), exponent gaps past 62 bits, batched shapes, 1 and 2 threads;
    and add's errors."""
    from bct.model.blocks import requantize_numpy

    rng = np.random.default_rng(50 + n_terms)
    monkeypatch.setattr(matmul_module, "_PAR_MIN", 64)
    before = matmul_module._THREADS
    try:
        for cfg, terms, value, scale in _add_cases(rng, n_terms, zero_row=True):
            for out_fmt in (cfg.act_format, cfg.residual_format):
                want = requantize_numpy(value, scale, out_fmt)
                for n in (1, 2):
                    set_threads(n)
                    assert add_requantize(*terms, cfg=cfg, fmt=out_fmt) == want
        with pytest.raises(ValueError, match="too many terms"):
            add_requantize(*terms, *terms, *terms, *terms, cfg=cfg, fmt=cfg.act_format)
    finally:
        set_threads(before)


def test_matmul_errors():
    cfg = Config()
    x = encode(np.ones((2, 64)), cfg.act_format)
    w = encode(np.ones((4, 64)), cfg.weight_format)
    with pytest.raises(ValueError, match=r"reduction lengths differ: \(2, 64\) and \(4, 32\)"):
        matmul(x, encode(np.ones((4, 32)), cfg.weight_format), cfg)
    with pytest.raises(ConfigError, match="left operand format"):
        matmul(encode(np.ones((2, 64)), x.fmt.__class__(6, 32, 8)), w, cfg)
    with pytest.raises(ConfigError, match="reduction length 64 exceeds max_reduction 32"):
        matmul(x, w, cfg.replace(max_reduction=32))
    with pytest.raises(ValueError, match="bias shape"):
        matmul(x, w, cfg, encode(np.ones(32), cfg.vector_format))
    with pytest.raises(ConfigError, match="bias format"):
        matmul(x, w, cfg, encode(np.ones(4 * 8), cfg.act_format.__class__(4, 32, 8)))
    with pytest.raises(ValueError, match="too many terms"):
        add(x, x, x, x, cfg=cfg)


def test_weight_block_spanning_several_activation_blocks():
    """A weight block of k*B elements acts as k blocks of B sharing one exponent."""
    cfg = Config(weight_block_size=128)
    rng = np.random.default_rng(8)
    x, w, b = _operands(cfg, 4, 256, 32, rng)
    assert w.fmt.block == 128 and w.exp.shape == (32, 2)
    split = BlockTensor(w.mant, np.repeat(w.exp, 4, axis=1), cfg.act_format)
    assert_same(matmul(x, w, cfg, b), matmul(x, split, cfg, b))
    assert_same(matmul(x, w, cfg, b), matmul_pyint(x, w, cfg, b))
    with pytest.raises(ValueError, match="is not a multiple of block size 128"):
        encode(np.ones((1, 96)), cfg.weight_format)


def test_batched_matmul_equals_each_slice():
    cfg = Config()
    rng = np.random.default_rng(13)
    X = rng.standard_normal((3, 2, 5, 64)) * np.exp(rng.standard_normal((3, 2, 5, 64)))
    W = rng.standard_normal((3, 2, 32, 64))
    x, w = encode(X, cfg.act_format), encode(W, cfg.act_format)
    b = encode(rng.standard_normal(32), cfg.vector_format)
    got = matmul(x, w, cfg, b)
    assert got.value.shape == (3, 2, 5, 32) and got.scale.shape == (3, 2, 5)
    for i in range(3):
        for j in range(2):
            assert_same(Fixed(got.value[i, j], got.scale[i, j]), matmul_pyint(x[i, j], w[i, j], cfg, b))
    with pytest.raises(ValueError, match="batch dimensions differ"):
        matmul(x, w[:2], cfg)


@pytest.mark.parametrize("chunk", [1, 700, 1 << 16])
def test_chunks_and_threads_do_not_change_the_result(monkeypatch, chunk):
    """Rows or batch elements split into many chunks over one or two threads: same integers."""
    cfg = Config()
    rng = np.random.default_rng(chunk)
    x, w, b = _operands(cfg, 40, 128, 64, rng)
    X = rng.standard_normal((6, 40, 64)) * np.exp(rng.standard_normal((6, 40, 64)))
    xa, wa = encode(X, cfg.act_format), encode(X[:, :32], cfg.act_format)
    ref, ref_a = matmul(x, w, cfg, b), matmul(xa, wa, cfg)
    monkeypatch.setattr(matmul_module, "_CHUNK", chunk)
    before = matmul_module._THREADS
    try:
        for n in (1, 2):
            set_threads(n)
            assert_same(matmul(x, w, cfg, b), ref)
            assert_same(matmul(xa, wa, cfg), ref_a)
    finally:
        set_threads(before)
    assert_same(matmul(x[:3], w, cfg, b), matmul_pyint(x[:3], w, cfg, b))


def test_set_threads_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive int"):
            set_threads(bad)


# --- the int8 block GEMM path (torch._int_mm + integer round_shift) against the float path ---


def _paths(monkeypatch, fn):
    """``fn()`` on the int8 and on the float block-GEMM path; asserts which path ran."""
    taken = []
    for name in ("_blocked_gemm_int8", "_blocked_gemm_float"):
        orig = getattr(matmul_module, name)

        def spy(*a, _orig=orig, _name=name, **k):
            taken.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(matmul_module, name, spy)
    out = {}
    for path in ("int8", "float"):
        taken.clear()
        monkeypatch.setattr(matmul_module, "_GEMM_PATH", path)
        out[path] = fn()
        assert taken and set(taken) == {f"_blocked_gemm_{path}"}, (path, taken)
    monkeypatch.setattr(matmul_module, "_GEMM_PATH", "auto")
    return out["int8"], out["float"]


def test_int8_backend_is_exact_here():
    torch = matmul_module._int8_torch()
    assert torch is not None  # torch is a dependency; its _int_mm passed the extreme-operand check
    rng = np.random.default_rng(21)
    for M, K, N in ((1, 8, 1), (13, 40, 7), (70, 128, 33)):
        a = rng.integers(-127, 128, size=(M, K)).astype(np.int8)
        b = rng.integers(-127, 128, size=(K, N)).astype(np.int8)
        a[0], b[:, 0] = 127, -127
        got = torch._int_mm(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        assert (got.astype(np.int64) == a.astype(np.int64) @ b.astype(np.int64)).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"w{c.weight_bits}a{c.act_bits}b{c.block_size}wb{c.weight_format.block}g{c.acc_guard_bits}")
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_path_equals_float_path_and_python_ints(monkeypatch, cfg, with_bias):
    """Shapes that are not multiples of 8 (M = 13, N = 3 * B + 5 without bias), a row of zeros."""
    rng = np.random.default_rng(100 + cfg.block_size + with_bias)
    K = 2 * max(cfg.weight_format.block, 32)
    x, w, b = _operands(cfg, 13, K, 2 * cfg.block_size, rng, spread=3.0)
    if not with_bias:
        b = None
        w = encode(rng.standard_normal((3 * cfg.block_size + 5, K)), cfg.weight_format)
    i8, fl = _paths(monkeypatch, lambda: matmul(x, w, cfg, b))
    assert_same(i8, fl)
    assert_same(i8, matmul_pyint(x, w, cfg, b))


@pytest.mark.parametrize("B", [8, 32, 128])
def test_int8_path_shift_extremes(monkeypatch, B):
    """Mantissas at +-qmax and odd small ones, exponents over the whole format: shifts from -G
    (exact left shifts) through ties to far beyond 62 (every term rounds to 0), the float
    path's clamps active; a bias whose exponent is above and below the products'."""
    cfg = Config(block_size=B, max_reduction=4096)
    rng = np.random.default_rng(B + 1)
    fa, fw, fv = cfg.act_format, cfg.weight_format, cfg.vector_format
    K, M, N = 4 * B, 21, 2 * B
    xm = rng.choice([-fa.qmax, -3, -1, 0, 1, 3, fa.qmax], size=(M, K))
    wm = rng.choice([-fw.qmax, -1, 1, 5, fw.qmax], size=(N, K))
    xm[0], wm[0] = fa.qmax, fw.qmax
    xm[2], wm[2] = -fa.qmax, fw.qmax
    xe = rng.integers(fa.e_min, fa.e_max + 1, size=(M, K // B))
    we = rng.integers(fw.e_min, fw.e_max + 1, size=(N, K // B))
    xe[1] = rng.integers(-3, 3, size=K // B)  # shifts around 0: ties of odd products
    we[1] = we.max()
    xe[3] = fa.e_min  # a row far below the weights' top: large positive shifts
    xe[5] = [0, -8, -9, -12]  # with weight row 1 at the top: shifts -G, 0, 1 and 4 (ties)
    x = BlockTensor(xm.astype(np.int64), xe.astype(np.int64), fa)
    w = BlockTensor(wm.astype(np.int64), we.astype(np.int64), fw)
    shifts = (row_scale(x, w, None, cfg)[:, None, None] - xe[:, None, :] - we[None]).ravel()
    assert shifts.min() == -cfg.acc_guard_bits and shifts.max() > 62 and (shifts == 1).any()
    assert (shifts == 0).any() and (shifts == 4).any()
    for be in (fv.e_max, 0, fv.e_min):
        bias = BlockTensor(rng.choice([-fv.qmax, -1, 1, fv.qmax], size=N).astype(np.int64),
                           np.full(N // B, be, dtype=np.int64), fv)
        i8, fl = _paths(monkeypatch, lambda: matmul(x, w, cfg, bias))
        assert_same(i8, fl)
        assert_same(i8, matmul_pyint(x, w, cfg, bias))


def test_int8_path_worst_case_accumulator(monkeypatch):
    """Every product at +-qmax**2 with equal exponents and the largest bias: |acc| == bound on
    the int8 path too (int32 block products at their largest)."""
    cfg = Config(block_size=128, max_reduction=4096)
    K, B, qa, qv = cfg.max_reduction, cfg.block_size, cfg.act_format.qmax, cfg.vector_format.qmax
    nb = K // B
    x = BlockTensor(np.full((3, K), qa, dtype=np.int64), np.zeros((3, nb), dtype=np.int64), cfg.act_format)
    for sign in (1, -1):
        w = BlockTensor(np.full((B, K), sign * qa, dtype=np.int64), np.zeros((B, nb), dtype=np.int64), cfg.act_format)
        bias = BlockTensor(np.full(B, sign * qv, dtype=np.int64), np.zeros(1, dtype=np.int64), cfg.vector_format)
        i8, fl = _paths(monkeypatch, lambda: matmul(x, w, cfg, bias))
        assert (i8.value == sign * cfg.acc_bound).all()
        assert_same(i8, fl)


def test_int8_path_batched_attention_shapes(monkeypatch):
    """Q K^T and P V shaped batches (activation right operand, odd token counts)."""
    cfg = Config()
    rng = np.random.default_rng(22)
    X = rng.standard_normal((2, 3, 19, 64)) * np.exp(2 * rng.standard_normal((2, 3, 19, 64)))
    Y = rng.standard_normal((2, 3, 23, 64)) * np.exp(rng.standard_normal((2, 3, 23, 64)))
    x, y = encode(X, cfg.act_format), encode(Y, cfg.act_format)
    i8, fl = _paths(monkeypatch, lambda: matmul(x, y, cfg))
    assert i8.value.shape == (2, 3, 19, 23)
    assert_same(i8, fl)
    assert_same(Fixed(i8.value[1, 2], i8.scale[1, 2]), matmul_pyint(x[1, 2], y[1, 2], cfg))


@pytest.mark.parametrize("rows, group", [(1, 1), (5, 3 * 64), (7, 1 << 16), (128, 1 << 16)])
def test_int8_chunks_groups_and_threads_do_not_change_the_result(monkeypatch, rows, group):
    """Chunks of few rows (the last one padded), one or several K-blocks per compiled pass, one
    or two threads: the same integers; torch's thread count is restored."""
    import torch

    cfg = Config()
    rng = np.random.default_rng(rows)
    x, w, b = _operands(cfg, 30, 128, 64, rng, spread=3.0)
    ref = matmul_pyint(x, w, cfg, b)
    monkeypatch.setattr(matmul_module, "_GEMM_PATH", "int8")
    monkeypatch.setattr(matmul_module, "_INT8_ROWS", rows)
    monkeypatch.setattr(matmul_module, "_INT8_GROUP", group)
    before, torch_before = matmul_module._THREADS, torch.get_num_threads()
    try:
        for n in (1, 2):
            set_threads(n)
            torch.set_num_threads(2)
            assert_same(matmul(x, w, cfg, b), ref)
            assert torch.get_num_threads() == 2
    finally:
        set_threads(before)
        torch.set_num_threads(torch_before)


@pytest.mark.parametrize("segment", [0, 1, 2, 3, 16])
def test_int8_accumulator_segments_do_not_change_the_result(monkeypatch, segment):
    """The int8 pass sums each segment of K-blocks in int32 (int64 when the segment size is 0)
    and widens it into the int64 rows: any segment size, with several K-blocks per compiled
    pass or one, the same integers (matmul and the fused linear)."""
    from bct.model.blocks import requantize

    cfg = Config()
    assert matmul_module._int8_segment(32, 127, 127, 8) == 16  # 16 * 32 * 127**2 << 8 < 2**31
    assert matmul_module._int8_segment(128, 127, 127, 16) == 0
    rng = np.random.default_rng(60 + segment)
    x, w, b = _operands(cfg, 30, 7 * 32, 64, rng, spread=3.0)
    ref = matmul_pyint(x, w, cfg, b)
    monkeypatch.setattr(matmul_module, "_GEMM_PATH", "int8")
    monkeypatch.setattr(matmul_module, "_INT8_ROWS", 8)
    monkeypatch.setattr(matmul_module, "_int8_segment", lambda *a: segment)
    for group in (1, 2 * 8 * 64, 1 << 16):
        monkeypatch.setattr(matmul_module, "_INT8_GROUP", group)
        assert_same(matmul(x, w, cfg, b), ref)
        assert linear(x, w, cfg, b) == requantize(ref.value, ref.scale, cfg.act_format)


def test_path_choice(monkeypatch):
    """auto: int8 for large 8-bit matrices only; operands wider than int8 always take the float
    path, and so does everything when the int8 backend is unavailable."""
    cfg = Config()
    rng = np.random.default_rng(23)
    big = _operands(cfg, 64, 64, 256, rng)
    small = _operands(cfg, 4, 64, 32, rng)
    assert matmul_module._int8_fits(big[0], big[1])
    assert not matmul_module._int8_fits(small[0], small[1])
    monkeypatch.setattr(matmul_module, "_GEMM_PATH", "int8")
    assert matmul_module._int8_fits(small[0], small[1])
    wide = Config(act_bits=12, max_reduction=1024)
    xw, ww, _ = _operands(wide, 64, 64, 256, rng)
    assert not matmul_module._int8_fits(xw, ww)
    monkeypatch.setattr(matmul_module, "_TORCH", False)
    assert not matmul_module._int8_fits(big[0], big[1])
    assert_same(matmul(*big[:2], cfg, big[2]), matmul_pyint(*big[:2], cfg, big[2]))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(1, 4), st.integers(1, 40), st.floats(0, 8))
def test_int8_path_random_shapes(seed, M, nb, N, spread):
    cfg = Config(block_size=8, weight_bits=5)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((M, 8 * nb)) * np.exp(spread * rng.standard_normal((M, 8 * nb)))
    W = rng.standard_normal((N, 8 * nb)) * np.exp(spread / 2 * rng.standard_normal((N, 8 * nb)))
    x, w = encode(X, cfg.act_format), encode(W, cfg.weight_format)
    b = encode(rng.standard_normal(N) * 100, cfg.vector_format) if N % 8 == 0 else None
    with pytest.MonkeyPatch.context() as mp:
        i8, fl = _paths(mp, lambda: matmul(x, w, cfg, b))
    assert_same(i8, fl)
    assert_same(i8, matmul_pyint(x, w, cfg, b))


@pytest.mark.parametrize("cfg", [Config(), Config(weight_bits=4, weight_block_size=128, weight_exp_bits=6, block_size=32),
                                 Config(block_size=8, vector_bits=16)],
                         ids=["default", "w4b128", "b8v16"])
def test_linear_int8_fused_requantize(monkeypatch, cfg):
    """linear on the int8 path re-encodes each row inside the compiled pass: equal to requantize
    of the plain-int matmul, and to the float path, with and without bias, at 1 and 2 threads."""
    from bct.model.blocks import requantize

    rng = np.random.default_rng(24 + cfg.block_size)
    x, w, b = _operands(cfg, 37, 256, 96, rng, spread=3.0)
    monkeypatch.setattr(matmul_module, "_INT8_ROWS", 16)
    before = matmul_module._THREADS
    try:
        for bias in (b, None):
            ref = matmul_pyint(x, w, cfg, bias)
            ref = requantize(ref.value, ref.scale, cfg.act_format)
            for n in (1, 2):
                set_threads(n)
                i8, fl = _paths(monkeypatch, lambda: linear(x, w, cfg, bias))
                assert i8 == ref and fl == ref
    finally:
        set_threads(before)
