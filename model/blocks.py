"""The BCT block format: B integers along the reduction axis share one power-of-two exponent.

A :class:`BlockTensor` of logical shape ``(..., K)`` holds ``mant`` (``int64``, shape ``(..., K)``,
each in ``[-qmax, qmax]``) and ``exp`` (``int64``, shape ``(..., K // B)``); element ``i`` of block
``j`` is ``mant[..., j*B + i] * 2**exp[..., j]``.

Encoding picks, per block, the **smallest** exponent ``e`` in ``[e_min, e_max]`` for which the
block's largest magnitude ``m`` rounds to at most ``qmax`` (``m * 2**-e < qmax + 1/2``), rounds
every element with the project's rule (:mod:`bct.model.fixed`) and saturates. An all-zero block
therefore gets ``e_min``. The same rule applies to floats (:func:`encode`) and to fixed-point
integers (:func:`requantize`, integer-only); both give identical results on the same values.

:func:`encode` can instead search the exponent (``exp_search="mse"``, used for weights by
``Config.weight_exp_search``): among that exponent and the :data:`MSE_SEARCH_DEPTH` below it, the
one with the smallest squared error of the block, clipping the few largest elements to
``+-qmax`` in exchange for a finer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bct.config import BlockFormat, ConfigError
from bct.model.fixed import (
    bit_length, round_half_away, round_half_away_float, round_shift_numpy,
)

__all__ = [
    "BlockTensor",
    "encode",
    "requantize",
    "requantize_numpy",
    "reblock_transposed",
    "to_fixed",
    "shared_exponent",
    "mse_exponent",
    "block_sq_error",
    "EXP_SEARCHES",
    "MSE_SEARCH_DEPTH",
]

#: The ways :func:`encode` chooses a block's shared exponent (see :func:`encode`).
EXP_SEARCHES = ("max", "mse")

#: Exponents below the no-clipping one that the ``"mse"`` search tries.
MSE_SEARCH_DEPTH = 2


@dataclass(frozen=True, eq=False)
class BlockTensor:
    """Integers and shared exponents of a tensor in block format.

    Parameters
    ----------
    mant : numpy.ndarray of int64, shape (..., K)
    exp : numpy.ndarray of int64, shape (..., K // fmt.block)
    fmt : BlockFormat
    """

    mant: np.ndarray
    exp: np.ndarray
    fmt: BlockFormat

    def __post_init__(self):
        B = self.fmt.block
        if self.mant.dtype != np.int64 or self.exp.dtype != np.int64:
            raise TypeError("BlockTensor mant and exp must be int64 arrays")
        if self.mant.ndim < 1 or self.mant.shape[-1] % B:
            raise ConfigError(
                f"last axis {self.mant.shape[-1:]} is not a multiple of block size {B}"
            )
        if self.exp.shape != self.mant.shape[:-1] + (self.mant.shape[-1] // B,):
            raise ValueError(f"exp shape {self.exp.shape} does not match mant shape {self.mant.shape}")

    @property
    def shape(self) -> tuple:
        """Logical shape (that of :attr:`mant`)."""
        return self.mant.shape

    @property
    def blocks(self) -> np.ndarray:
        """``mant`` viewed as ``(..., K // B, B)``."""
        return self.mant.reshape(self.exp.shape + (self.fmt.block,))

    def block_exp(self) -> np.ndarray:
        """Exponent of every element, shape (..., K)."""
        return np.repeat(self.exp, self.fmt.block, axis=-1)

    def decode(self) -> np.ndarray:
        """Exact float64 values (``mant * 2**exp``; exact while ``|e| < 900``)."""
        return np.ldexp(self.mant.astype(np.float64), self.block_exp())

    def __getitem__(self, rows) -> "BlockTensor":
        """Select along the leading (non-blocked) axes."""
        return BlockTensor(self.mant[rows], self.exp[rows], self.fmt)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, BlockTensor)
            and self.fmt == other.fmt
            and np.array_equal(self.mant, other.mant)
            and np.array_equal(self.exp, other.exp)
        )

    def check(self) -> None:
        """Raise if any integer or exponent is outside the format's range."""
        q = self.fmt.qmax
        if self.mant.size and np.abs(self.mant).max() > q:
            raise ValueError(f"mantissa outside [-{q}, {q}]")
        if self.exp.size and (self.exp.min() < self.fmt.e_min or self.exp.max() > self.fmt.e_max):
            raise ValueError(f"exponent outside [{self.fmt.e_min}, {self.fmt.e_max}]")


def _blocked(x: np.ndarray, B: int) -> np.ndarray:
    if x.ndim < 1 or x.shape[-1] % B:
        raise ConfigError(f"last axis {x.shape[-1:]} is not a multiple of block size {B}")
    return x.reshape(x.shape[:-1] + (x.shape[-1] // B, B))


def shared_exponent(m: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Smallest exponent in ``[e_min, e_max]`` with ``m * 2**-e < qmax + 1/2``.

    ``m`` holds non-negative float64 block maxima (exact values). The comparison
    ``2*m*2**-e < 2*qmax + 1`` is exact in binary floating point.
    """
    lim = 2.0 * fmt.qmax + 1.0
    _, k = np.frexp(m)  # m = f * 2**k, f in [0.5, 1): log2(m) in [k-1, k)
    # 2*m*2**-e < lim  <=>  e > log2(2m/lim); the answer is within [k - kq, k - kq + 1]
    kq = int(np.frexp(lim)[1]) - 1
    e = k.astype(np.int64) - kq
    ok_lower = np.ldexp(2.0 * m, -(e - 1)) < lim  # one smaller also fits?
    e = np.where(ok_lower, e - 1, e)
    e = np.where(np.ldexp(2.0 * m, -e) < lim, e, e + 1)
    e = np.where(m == 0, fmt.e_min, e)
    return np.clip(e, fmt.e_min, fmt.e_max)


def block_sq_error(xb: np.ndarray, e: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Squared encoding error of every block at the given exponents, in units of ``4**e``.

    Parameters
    ----------
    xb : numpy.ndarray of float64, shape (..., B)
        Blocks of values.
    e : numpy.ndarray of int64, shape (...)
        One exponent per block (in the format's range).
    fmt : BlockFormat

    Returns
    -------
    numpy.ndarray of float64, shape (...)
        ``sum((x * 2**-e - q)**2)`` with ``q = clamp(RHAZ(x * 2**-e), -qmax, qmax)``, the
        integers :func:`encode` stores at exponent ``e``. Each residual ``x * 2**-e - q`` is exact
        in float64 (``q`` is an integer on the grid of ``x * 2**-e`` or ``+-qmax`` below it); only
        the squares and their sum are rounded (deterministically).
    """
    y = np.ldexp(xb, -e[..., None])
    r = y - np.clip(round_half_away_float(y), -fmt.qmax, fmt.qmax)
    return np.einsum("...i,...i->...", r, r)


def mse_exponent(xb: np.ndarray, fmt: BlockFormat, depth: int = MSE_SEARCH_DEPTH) -> np.ndarray:
    """Per block, the exponent among ``e0, e0 - 1, ..., e0 - depth`` (not below ``e_min``) with
    the smallest squared encoding error, ``e0`` being :func:`shared_exponent` of the block max.

    A smaller exponent halves the step and saturates the elements above ``(qmax + 1/2) * 2**e``.
    Errors at different exponents are compared exactly scaled to ``e0`` (``err(e) =
    4**(e - e0) * block_sq_error(e)``, a power-of-two factor); a smaller exponent is taken only
    when its error is strictly smaller, so ties keep the larger exponent. All-zero blocks keep
    ``e_min``.

    Parameters
    ----------
    xb : numpy.ndarray of float64, shape (..., B)
        Finite values, blocked along the last axis.
    fmt : BlockFormat
    depth : int
        How many exponents below ``e0`` to try (``0`` gives ``e0``).

    Returns
    -------
    numpy.ndarray of int64, shape (...)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, not {depth!r}")
    e0 = shared_exponent(np.abs(xb).max(axis=-1), fmt)
    best_e, best_err = e0, block_sq_error(xb, e0, fmt)
    for d in range(1, depth + 1):
        e = np.maximum(e0 - d, fmt.e_min)
        err = np.ldexp(block_sq_error(xb, e, fmt), 2 * (e - e0))
        better = err < best_err
        best_e = np.where(better, e, best_e)
        best_err = np.where(better, err, best_err)
    return best_e


def encode(x, fmt: BlockFormat, exp_search: str = "max") -> BlockTensor:
    """Encode float values into block format along the last axis.

    Parameters
    ----------
    x : array_like of float, shape (..., K)
        ``K`` must be a multiple of ``fmt.block``; NaN and infinities are refused.
    fmt : BlockFormat
    exp_search : {"max", "mse"}
        How each block's exponent is chosen: ``"max"``, the smallest exponent at which the
        block's largest magnitude does not saturate (:func:`shared_exponent`); ``"mse"``, the one
        of smallest squared error among that exponent and the :data:`MSE_SEARCH_DEPTH` below it
        (:func:`mse_exponent`). The integers are rounded by the same rule either way.

    Returns
    -------
    BlockTensor
    """
    if exp_search not in EXP_SEARCHES:
        raise ValueError(f"exp_search must be 'max' or 'mse', not {exp_search!r}")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("cannot encode NaN or infinite values")
    xb = _blocked(x, fmt.block)
    if exp_search == "mse":
        e = mse_exponent(xb, fmt)
    else:
        e = shared_exponent(np.abs(xb).max(axis=-1), fmt)
    q = round_half_away(np.ldexp(xb, -e[..., None]))
    q = np.clip(q, -fmt.qmax, fmt.qmax)
    return BlockTensor(q.reshape(x.shape), e, fmt)


def _min_shift(m: np.ndarray, qmax: int) -> np.ndarray:
    """Smallest ``sh`` with ``round_shift(m, sh) <= qmax``, i.e. ``2m < (2 qmax + 1) * 2**sh``.

    With ``L = bitlen(2m)`` and ``Q = bitlen(2 qmax + 1)`` the answer is ``L - Q`` or
    ``L - Q + 1``; ``(2m >> (L - Q)) < 2 qmax + 1`` decides exactly (the right side is an
    integer, so truncating the left side does not change the comparison).
    """
    lim = 2 * qmax + 1
    v = 2 * m
    d = bit_length(v) - lim.bit_length()
    fits = np.where(
        d >= 0,
        np.right_shift(v, np.clip(d, 0, 62)) < lim,
        np.left_shift(v, np.clip(-d, 0, 62)) < lim,
    )
    return np.where(fits, d, d + 1)


def requantize(y, scale, fmt: BlockFormat) -> BlockTensor:
    """Encode fixed-point integers ``y * 2**scale`` into block format, integer-only.

    This is the blockifier the hardware implements: block max, shared exponent by bit lengths,
    one rounding shift, saturation. It gives exactly what :func:`encode` gives on the same values.

    Parameters
    ----------
    y : array_like of int64, shape (..., K)
        ``|y| < 2**62``.
    scale : int or array_like of int
        Power-of-two scale of ``y``: broadcastable to ``y.shape[:-1]`` (one per row), or of
        ``y``'s full shape (one per element, e.g. when re-blocking a transposed tensor whose
        rows had different scales; the block exponent is then the largest of the elements'
        smallest exponents).
    fmt : BlockFormat

    Notes
    -----
    One compiled pass over the blocks (numba, :func:`_requantize_kernels`), rows shared among
    the :func:`bct.model.matmul.set_threads` threads when large; :func:`requantize_numpy` is
    the same definition in numpy passes (the tests' cross-check).
    """
    from bct.model.nonlinear import _split_rows  # (imports this module)

    y = np.asarray(y, dtype=np.int64)
    yb = _blocked(y, fmt.block)
    scale = np.asarray(scale, dtype=np.int64)
    rows, elems = _requantize_kernels()[:2]
    R = int(np.prod(yb.shape[:-2], dtype=np.int64))
    y3 = np.ascontiguousarray(yb).reshape(R, yb.shape[-2], fmt.block)
    q = np.empty(y3.shape, dtype=np.int64)
    e = np.empty(y3.shape[:2], dtype=np.int64)
    args = (fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
    if scale.ndim == y.ndim and scale.ndim > 0 and scale.shape[-1] == y.shape[-1] != 1:
        sb = np.ascontiguousarray(np.broadcast_to(scale, y.shape)).reshape(y3.shape)
        kernel = elems
    else:
        sb = np.ascontiguousarray(np.broadcast_to(scale, y.shape[:-1])).reshape(R)
        kernel = rows
    _split_rows(R, y3.shape[1] * fmt.block, lambda r0, r1: kernel(
        y3[r0:r1], sb[r0:r1], q[r0:r1], e[r0:r1], *args))
    return BlockTensor(q.reshape(y.shape), e.reshape(yb.shape[:-1]), fmt)


_KERNELS = None


def _requantize_kernels():
    """The compiled blockifier (numba; compiled on first use, cached on disk): ``rows`` takes
    one scale per row, ``elems`` one per element. Per block: the block max (or each element)
    gives the smallest exponent by exact integer bit lengths (:func:`_min_shift`), clamped to
    the format's range; then one rounding shift (the rule of :func:`bct.model.fixed.round_shift`)
    and saturation to ``+-qmax``. ``shift_rows`` is that shift and saturation alone, one shift
    per block (:func:`to_fixed`)."""
    global _KERNELS, _nb_bitlen, _nb_rs, _nb_min_shift, _nb_shift_sat, _nb_elems
    if _KERNELS is None:
        import numba

        from bct.model import fixed

        # kernels call kernels through these globals, never closures, and name the stamp of
        # fixed.py, whose kernels their compiled code contains (bct.model.fixed.kernel_stamp)
        _nb_bitlen, _nb_rs = fixed.scalar_kernels().bit_length, fixed.scalar_kernels().round_shift
        stamp = fixed.kernel_stamp(fixed)

        @numba.njit(nogil=True, cache=True)
        def min_shift(m, qmax):
            stamp  # noqa: B018 (the cache key)
            lim = 2 * qmax + 1
            v = 2 * m
            d = _nb_bitlen(v) - _nb_bitlen(lim)
            if d >= 0:
                fits = (v >> min(d, 62)) < lim
            else:
                fits = (v << min(-d, 62)) < lim
            return d if fits else d + 1

        @numba.njit(nogil=True, cache=True)
        def shift_sat(x, sh, qmax):  # round_shift(x, sh) saturated to +-qmax
            stamp  # noqa: B018
            return min(max(_nb_rs(x, sh), -qmax), qmax)

        _nb_min_shift, _nb_shift_sat = min_shift, shift_sat

        @numba.njit(nogil=True, cache=True)
        def rows(y, s, q, e, qmax, e_min, e_max, bits):
            stamp  # noqa: B018
            R, nk, B = y.shape
            for r in range(R):
                for k in range(nk):
                    m = 0
                    for i in range(B):
                        m = max(m, abs(y[r, k, i]))
                    ek = e_min if m == 0 else s[r] + _nb_min_shift(m, qmax)
                    ek = min(max(ek, e_min), e_max)
                    e[r, k] = ek
                    sh = max(ek - s[r], -(bits + 1))
                    for i in range(B):
                        q[r, k, i] = _nb_shift_sat(y[r, k, i], sh, qmax)

        @numba.njit(nogil=True, cache=True)
        def elems(y, sb, q, e, qmax, e_min, e_max, bits):
            stamp  # noqa: B018
            R, nk, B = y.shape
            for r in range(R):
                for k in range(nk):
                    # the largest smallest exponent: with every non-zero |y| aligned to the
                    # block's smallest scale lo (exact: round_shift(a << d, sh + d) ==
                    # round_shift(a, sh), and min_shift grows with a), one min_shift of the
                    # largest aligned value; per element when that could pass 2**61
                    yk, sk = y[r, k], sb[r, k]
                    lo, hi, amax = np.int64(1) << 62, -(np.int64(1) << 62), np.int64(0)
                    for i in range(B):
                        a = abs(yk[i])
                        if a != 0:
                            lo = min(lo, sk[i])
                            hi = max(hi, sk[i])
                        amax = max(amax, a)
                    if amax == 0:
                        ek = e_min
                    elif _nb_bitlen(amax) + (hi - lo) <= 61:
                        m = np.int64(0)
                        for i in range(B):
                            a = abs(yk[i])
                            m = max(m, a << (sk[i] - lo) if a != 0 else np.int64(0))
                        ek = lo + _nb_min_shift(m, qmax)
                    else:
                        ek = e_min
                        for i in range(B):
                            a = abs(yk[i])
                            if a != 0:
                                ek = max(ek, sk[i] + _nb_min_shift(a, qmax))
                    ek = min(max(ek, e_min), e_max)
                    e[r, k] = ek
                    for i in range(B):
                        q[r, k, i] = _nb_shift_sat(y[r, k, i], max(ek - sb[r, k, i], -(bits + 1)),
                                                   qmax)

        @numba.njit(nogil=True, cache=True)
        def shift_rows(x, sh, qmax, out):  # out[r] = round_shift(x[r], sh[r]) saturated
            stamp  # noqa: B018
            R, B = x.shape
            for r in range(R):
                for i in range(B):
                    out[r, i] = _nb_shift_sat(x[r, i], sh[r], qmax)

        _nb_elems = elems

        @numba.njit(nogil=True, cache=True)
        def transposed(mant, exp, q, e, qmax, e_min, e_max, bits):
            # per matrix r and column d: column d of mant[r] (T, D) and its elements' exponents
            # (blocks of D // exp.shape[2] along D) gathered into one row, then elems
            stamp  # noqa: B018
            R, T, D = mant.shape
            Bi = D // exp.shape[2]
            nk, Bo = q.shape[2], q.shape[3]
            y = np.empty((1, nk, Bo), dtype=np.int64)
            sb = np.empty((1, nk, Bo), dtype=np.int64)
            yf, sf = y.reshape(T), sb.reshape(T)
            for r in range(R):
                for d in range(D):
                    k = d // Bi
                    for t in range(T):
                        yf[t] = mant[r, t, d]
                        sf[t] = exp[r, t, k]
                    _nb_elems(y, sb, q[r, d:d + 1], e[r, d:d + 1], qmax, e_min, e_max, bits)

        _KERNELS = rows, elems, shift_rows, transposed
    return _KERNELS


def requantize_numpy(y, scale, fmt: BlockFormat) -> BlockTensor:
    """:func:`requantize` computed with numpy array passes (the cross-check of the tests)."""
    y = np.asarray(y, dtype=np.int64)
    yb = _blocked(y, fmt.block)
    scale = np.asarray(scale, dtype=np.int64)
    if scale.ndim == y.ndim and scale.ndim > 0 and scale.shape[-1] == y.shape[-1] != 1:
        sb = _blocked(np.broadcast_to(scale, y.shape), fmt.block)
        a = np.abs(yb)
        e = np.where(a == 0, fmt.e_min, sb + _min_shift(a, fmt.qmax)).max(axis=-1)
        e = np.clip(e, fmt.e_min, fmt.e_max)
        q = round_shift_numpy(yb, np.maximum(e[..., None] - sb, -(fmt.bits + 1)))
    else:
        s = np.broadcast_to(scale, y.shape[:-1])[..., None]
        m = np.abs(yb).max(axis=-1)
        e = np.where(m == 0, fmt.e_min, s + _min_shift(m, fmt.qmax))
        e = np.clip(e, fmt.e_min, fmt.e_max)
        q = round_shift_numpy(yb, np.maximum(e - s, -(fmt.bits + 1))[..., None])
    q = np.clip(q, -fmt.qmax, fmt.qmax)
    return BlockTensor(q.reshape(y.shape), e, fmt)


def reblock_transposed(t: BlockTensor, fmt: BlockFormat) -> BlockTensor:
    """Swap the last two axes, re-blocking along the new last axis (integer-only).

    Used for ``V``: produced blocked along the hidden axis, consumed by ``P V`` blocked along
    tokens.
    """
    if t.mant.ndim < 2:
        raise ValueError(f"reblock_transposed takes a tensor of 2 or more dimensions, not {t.shape}")
    T, D = t.shape[-2:]
    if T < 2 or T % fmt.block or t.mant.size == 0:
        return requantize(np.swapaxes(t.mant, -1, -2), np.swapaxes(t.block_exp(), -1, -2), fmt)
    # requantize's per-element kernel on each matrix's transpose, gathered in the kernel
    # (no transposed copies; matrices shared among the set_threads threads)
    from bct.model.nonlinear import _split_rows  # (imports this module)

    lead = t.shape[:-2]
    R = int(np.prod(lead, dtype=np.int64))
    mant = np.ascontiguousarray(t.mant).reshape(R, T, D)
    exp = np.ascontiguousarray(t.exp).reshape(R, T, -1)
    q = np.empty((R, D, T // fmt.block, fmt.block), dtype=np.int64)
    e = np.empty((R, D, T // fmt.block), dtype=np.int64)
    kernel = _requantize_kernels()[3]
    args = (fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
    _split_rows(R, T * D, lambda r0, r1: kernel(mant[r0:r1], exp[r0:r1], q[r0:r1], e[r0:r1], *args))
    return BlockTensor(q.reshape(lead + (D, T)), e.reshape(lead + (D, T // fmt.block)), fmt)


def to_fixed(t: BlockTensor, frac: int, bits: int) -> np.ndarray:
    """Convert to fixed point with ``frac`` fraction bits, saturated to signed ``bits`` bits.

    ``round(mant * 2**(exp + frac))`` with the project's rounding; exact whenever
    ``exp >= -frac``. (A left shift past ``bits`` saturates any non-zero lane, so it is clamped
    there: int64 never wraps.)
    """
    m = (1 << (bits - 1)) - 1
    R = int(np.prod(t.exp.shape, dtype=np.int64))
    sh = np.ascontiguousarray(np.maximum(-(t.exp + frac), -bits)).reshape(R)
    out = np.empty((R, t.fmt.block), dtype=np.int64)
    _requantize_kernels()[2](np.ascontiguousarray(t.blocks).reshape(R, t.fmt.block), sh, m, out)
    return out.reshape(t.shape)
