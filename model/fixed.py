"""Integer primitives shared by every kernel: the project's ONE rounding rule lives here.

The rule is *round half away from zero* (RHAZ). On a two's complement integer ``x`` scaled by
``2**-s`` (``s > 0``) it is ``(x + 2**(s-1) - (x < 0)) >> s`` with an arithmetic shift: one adder
whose carry-in is the sign bit, which is also how the hardware does it. It is symmetric
(``r(-x) == -r(x)``), so symmetric integer ranges stay symmetric.

All array functions work on ``int64`` numpy arrays; callers keep magnitudes below ``2**62``
(every width in the project is derived from :class:`bct.config.Config`, which checks this).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "round_shift",
    "round_shift_int",
    "round_shift_numpy",
    "round_half_away",
    "round_half_away_float",
    "round_div",
    "round_div_int",
    "saturate",
    "bit_length",
    "sqrt_round_int",
]

_MAX_SHIFT = 62


def round_shift(x, s):
    """``x * 2**-s`` rounded half away from zero, element-wise.

    Parameters
    ----------
    x : array_like of int
        Values (``int64``; ``|x| < 2**62``).
    s : array_like of int
        Shift amounts, broadcast against ``x``. ``s > 0`` divides with rounding; ``s <= 0`` is the
        exact left shift ``x * 2**-s`` (the caller guarantees it does not overflow).

    Returns
    -------
    numpy.ndarray of int64

    Notes
    -----
    One compiled pass (a numba ufunc, :func:`_round_shift_ufunc`); :func:`round_shift_numpy`
    is the same rule in numpy passes (kept as a cross-check for the tests).
    """
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    return np.asarray(_round_shift_ufunc()(x, s))


_SCALAR = None


def scalar_kernels():
    """The rounding rules of this module on one int64 element, compiled (numba; on first use,
    cached on disk) for the other modules' kernels: ``round_shift(x, s)`` (``(x + 2**(s-1) -
    (x < 0)) >> s`` for ``1 <= s <= 62``, 0 for larger ``s``, ``x << -s`` for ``s <= 0``, 0 for
    shifts of 64 or more, like numpy), ``round_div(n, d)`` (``d > 0``) and ``bit_length(v)``
    (``v >= 0``)."""
    global _SCALAR
    if _SCALAR is None:
        from types import SimpleNamespace

        import numba

        @numba.njit(nogil=True, cache=True, inline="always")
        def round_shift_one(x, s):
            if s <= 0:
                return x << -s if s > -64 else np.int64(0)
            if s > _MAX_SHIFT:
                return np.int64(0)
            return (x + (np.int64(1) << (s - 1)) - (x < 0)) >> s

        @numba.njit(nogil=True, cache=True)
        def round_div_one(n, d):
            q = (2 * abs(n) + d) // (2 * d)
            return -q if n < 0 else q

        @numba.njit(nogil=True, cache=True)
        def bit_length_one(v):  # by halving the width
            n = 0
            for w in (32, 16, 8, 4, 2, 1):
                if v >> w:
                    v >>= w
                    n += w
            return n + (v > 0)

        _SCALAR = SimpleNamespace(round_shift=round_shift_one, round_div=round_div_one,
                                  bit_length=bit_length_one)
    return _SCALAR


def kernel_stamp(*modules) -> str:
    """The cache stamp of compiled kernels that call kernels of other modules: the sha256 of
    ``modules``' source files.

    Numba's on-disk cache (``cache=True``) keys a kernel by its bytecode and a pickle of its
    closure cells, and drops a file's entries only when that file's own source changes. So the
    kernels of this package (1) never capture other kernels in their closure (a pickled
    dispatcher carries a per-process uuid, so the key would differ in every process: nothing
    would ever load from the cache and every process would append new entries); they call them
    through module-level globals (``_nb_*``, set by the factory before the first call;
    numba resolves globals when it compiles and they are not part of the key), and (2) a
    kernel that calls, directly or through a kernel of its own file, a kernel of another file
    names this stamp of those files (a closure cell holding a string: a stable pickle), so
    that it is recompiled when they change rather than keeping their old code inlined.
    """
    import hashlib
    from pathlib import Path

    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()


_UFUNC = None


def _round_shift_ufunc():
    """:func:`round_shift` on one element (:func:`scalar_kernels`), as a numpy ufunc."""
    global _UFUNC, _nb_round_shift
    if _UFUNC is None:
        import numba

        _nb_round_shift = scalar_kernels().round_shift  # a global, not a closure: kernel_stamp

        @numba.vectorize(["int64(int64, int64)"], nopython=True, cache=True)
        def round_shift_one(x, s):
            return _nb_round_shift(x, s)

        _UFUNC = round_shift_one
    return _UFUNC


def round_shift_numpy(x, s):
    """:func:`round_shift` computed with numpy array passes (the cross-check of the tests)."""
    x = np.asarray(x, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    if s.ndim == 0:  # fast scalar-shift path, the common case
        s = int(s)
        if s <= 0:
            return np.left_shift(x, -s)
        if s > _MAX_SHIFT:
            return np.zeros_like(x)
        t = np.right_shift(x, 63)  # -1 where x < 0, else 0
        t += x
        t += 1 << (s - 1)
        t >>= s
        return t
    if s.size:
        lo, hi = int(s.min()), int(s.max())
        if hi <= 0:
            return np.left_shift(x, -s)
        if hi <= _MAX_SHIFT:
            shape = np.broadcast_shapes(x.shape, s.shape)
            if lo > 0:  # all right shifts (requantisation)
                t = np.right_shift(np.broadcast_to(x, shape), 63)
                t += x
                t += np.left_shift(np.int64(1), s - 1)
                t >>= s
                return t
            # mixed: left shift by max(-s, 0), then round right by max(s, 0); the rounding
            # addend 2**(r-1) and the sign term apply only where r > 0 (masks on the small s)
            r = np.maximum(s, 0)
            y = np.broadcast_to(x, shape)
            if lo < 0:
                y = np.left_shift(y, np.maximum(-s, 0))
            t = np.right_shift(y, 63)
            t &= -(r > 0).astype(np.int64)
            t += y
            t += np.where(r > 0, np.left_shift(np.int64(1), np.maximum(r - 1, 0)), 0)
            t >>= r
            return t
    sr = np.clip(s, 1, _MAX_SHIFT)
    right = np.right_shift(x + (np.left_shift(np.int64(1), sr - 1) - (x < 0)), sr)
    right = np.where(s > _MAX_SHIFT, 0, right)
    left = np.left_shift(x, np.clip(-s, 0, _MAX_SHIFT))
    return np.where(s > 0, right, left)


def round_shift_int(x: int, s: int) -> int:
    """Pure-Python-int version of :func:`round_shift` (no width limit); the reference."""
    if s <= 0:
        return x << -s
    return (x + (1 << (s - 1)) - (x < 0)) >> s


def round_half_away(y) -> np.ndarray:
    """Round float64 values to the nearest integer, halves away from zero, exactly.

    ``floor(|y|)`` and ``|y| - floor(|y|)`` are exact in binary floating point, so the tie test is
    exact for every finite ``y`` (unlike ``floor(y + 0.5)``).
    """
    return round_half_away_float(y).astype(np.int64)


def round_half_away_float(y) -> np.ndarray:
    """:func:`round_half_away` kept in float64 (integral values), for exact float64 kernels."""
    y = np.asarray(y, dtype=np.float64)
    a = np.abs(y)
    r = np.floor(a)
    r += (a - r) >= 0.5
    return np.copysign(r, y, out=r)


def round_div(n, d):
    """``n / d`` rounded half away from zero, for integer ``n`` and positive integer ``d``."""
    n = np.asarray(n, dtype=np.int64)
    d = np.asarray(d, dtype=np.int64)
    a = np.abs(n)
    q = (2 * a + d) // (2 * d)
    return np.where(n < 0, -q, q)


def round_div_int(n: int, d: int) -> int:
    """Pure-Python-int version of :func:`round_div`."""
    q = (2 * abs(n) + d) // (2 * d)
    return -q if n < 0 else q


def saturate(x, bits: int):
    """Clamp to the symmetric signed range ``[-(2**(bits-1)-1), 2**(bits-1)-1]``."""
    m = (1 << (bits - 1)) - 1
    return np.clip(np.asarray(x, dtype=np.int64), -m, m)


def bit_length(x) -> np.ndarray:
    """Element-wise ``int.bit_length`` of non-negative ``int64`` values (exact up to 2**62)."""
    x = np.asarray(x, dtype=np.int64)
    _, e = np.frexp(x.astype(np.float64))
    e = e.astype(np.int64)
    # float64 conversion may round up to the next power of two above 2**53: correct it.
    too_big = (e > 0) & (np.right_shift(x, np.clip(e - 1, 0, 62)) == 0)
    return e - too_big


def sqrt_round_int(d):
    """``round(sqrt(d))`` (half away from zero) for non-negative integers, exactly.

    ``floor((isqrt(4*d) + 1) / 2) == floor(sqrt(d) + 1/2)``; works element-wise on int64 arrays
    with ``d < 2**60``.
    """
    d = np.asarray(d, dtype=np.int64)
    r = np.floor(np.sqrt(4.0 * d.astype(np.float64))).astype(np.int64)  # isqrt(4d) +- 1
    four_d = 4 * d
    r = np.where(r * r > four_d, r - 1, r)
    r = np.where((r + 1) * (r + 1) <= four_d, r + 1, r)
    return (r + 1) >> 1
