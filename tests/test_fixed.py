import math
import os
import subprocess
import sys

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from bct.model.fixed import (
    bit_length,
    round_div,
    round_div_int,
    round_half_away,
    round_shift,
    round_shift_int,
    round_shift_numpy,
    sqrt_round_int,
)

ints = st.integers(-(2**61), 2**61)


def _rhaz(num: int, den: int) -> int:
    """Reference: num / den rounded half away from zero, with Fractions-free integer maths."""
    q, r = divmod(abs(num), den)
    if 2 * r >= den:
        q += 1
    return q if num >= 0 else -q


@given(ints, st.integers(0, 70))
def test_round_shift_matches_reference(x, s):
    expect = _rhaz(x, 1 << s)
    assert round_shift_int(x, s) == expect
    assert int(round_shift(np.int64(x), s)) == expect
    assert int(round_shift(np.array([x]), np.array([s]))[0]) == expect


@given(st.integers(-(2**40), 2**40), st.integers(-20, 0))
def test_round_shift_left_is_exact(x, s):
    assert int(round_shift(np.int64(x), s)) == x << -s == round_shift_int(x, s)
    assert int(round_shift(np.array([x]), np.array([s]))[0]) == x << -s


def test_round_shift_ties_go_away_from_zero_and_are_symmetric():
    x = np.array([5, -5, 3, -3, 1, -1, 2, -2, 6, -6])
    assert round_shift(x, 1).tolist() == [3, -3, 2, -2, 1, -1, 1, -1, 3, -3]
    assert round_shift(x, 2).tolist() == [1, -1, 1, -1, 0, 0, 1, -1, 2, -2]


@given(st.floats(-1e15, 1e15, allow_nan=False))
def test_round_half_away_float(y):
    r = int(round_half_away(np.array([y]))[0])
    assert abs(r - y) <= 0.5
    if abs(r - y) == 0.5:
        assert abs(r) > abs(y)


def test_round_half_away_exact_ties():
    y = np.array([0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999999999999994, 4503599627370495.5])
    assert round_half_away(y).tolist() == [1, -1, 2, -2, 3, -3, 0, 4503599627370496]


@given(st.integers(-(2**50), 2**50), st.integers(1, 2**40))
def test_round_div(n, d):
    assert round_div_int(n, d) == _rhaz(n, d) == int(round_div(np.int64(n), np.int64(d)))


@given(st.integers(0, 2**62 - 1))
def test_bit_length(x):
    assert int(bit_length(np.array([x]))[0]) == x.bit_length()


@given(st.integers(0, 2**60 - 1))
def test_sqrt_round(d):
    r = int(sqrt_round_int(np.array([d]))[0])
    assert r == (math.isqrt(4 * d) + 1) // 2
    # round(sqrt(d)) half away: (r - 1/2)**2 <= d < (r + 1/2)**2
    assert (2 * r - 1) ** 2 <= 4 * d < (2 * r + 1) ** 2 or d == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=12),
       st.lists(st.integers(-20, 70), min_size=1, max_size=6), st.booleans())
def test_round_shift_arrays_broadcast_every_path(xs, ss, wide_shift):
    """Arrays of shifts (all right, all left, mixed signs, beyond 62) broadcast against the
    values give element-wise exactly the Python-int rule."""
    x = np.array(xs, dtype=np.int64)[:, None]
    s = np.array(ss if wide_shift else [min(v, 40) for v in ss], dtype=np.int64)[None, :]
    got = round_shift(x, s)
    assert got.shape == (len(xs), len(ss))
    assert np.array_equal(round_shift_numpy(x, s), got)  # the numpy passes, same rule
    for i, v in enumerate(xs):
        for j, k in enumerate(s[0].tolist()):
            assert int(got[i, j]) == round_shift_int(v, k)
    for sel in (s > 0, s <= 0):  # all-right and all-left shift arrays
        if sel.any():
            sub = s[sel][None, :]
            assert np.array_equal(round_shift(x, sub), got[:, sel[0]])


# Kernels of the four modules with compiled code (fixed, blocks, matmul, nonlinear), some
# calling another file's kernels; prints a checksum of the results.
_CACHED_RUN = """
import numpy as np
from bct.config import Config
from bct.model import blocks, fixed, matmul, nonlinear
cfg = Config()
y = np.arange(-96, 96, dtype=np.int64).reshape(2, 96) * 1237
t = blocks.requantize(y, 3, cfg.act_format)
s = matmul.add(t, t, cfg=cfg)
f = nonlinear.fixed_to_frac(s, 8, 16)
r = blocks.reblock_transposed(blocks.BlockTensor(t.mant.reshape(1, 2, 96)[:, [0, 1] * 16],
                                                 t.exp.reshape(1, 2, 3)[:, [0, 1] * 16], t.fmt), cfg.act_format)
a = matmul.add_requantize(t, t, cfg=cfg, fmt=cfg.act_format)
g = blocks.encode(np.linspace(0.5, 2, 96), cfg.vector_format)
n = nonlinear.add_layernorm(t, g, g, cfg)
print(int(fixed.round_shift(y, 5).sum()), int(t.mant.sum()), int(s.value.sum()), int(f.sum()),
      int(r.mant.sum()), int(a.mant.sum()), int(n.mant.sum()))
"""


def test_compiled_kernels_load_from_the_disk_cache_in_a_new_process(tmp_path):
    """A second process finds every compiled kernel in numba's disk cache: it writes nothing
    (no new entry, no rewritten index) and computes the same. A kernel whose cache key
    differs between processes (e.g. one capturing another kernel in its closure, whose pickle
    carries a per-process uuid) would be compiled again and added to the cache every time."""
    cache = tmp_path / "numba"
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}

    def run():
        out = subprocess.run([sys.executable, "-c", _CACHED_RUN], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        files = {p.relative_to(cache).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
                 for p in cache.rglob("*") if p.is_file()}
        return out.stdout, files

    first, files1 = run()
    names = " ".join(files1)
    for kernel in ("fixed._round_shift_ufunc", "blocks._requantize_kernels.locals.rows",
                   "matmul._add_kernel", "nonlinear._kernels.locals.to_frac",
                   "blocks._requantize_kernels.locals.transposed", "matmul._add_kernel.locals.add_rows",
                   "nonlinear._kernels.locals.layernorm_aligned"):
        assert kernel in names  # compiled and cached
    second, files2 = run()
    assert second == first
    assert files2 == files1
