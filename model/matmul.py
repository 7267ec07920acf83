"""Blockwise integer matmul ``Y = X W^T (+ bias)`` and residual addition, integer-only.

Both operands are in block format along the reduction axis K. For output ``(m, n)`` and K-block
``j`` the integer dot product ``P[m,n,j] = sum_i qx[m,j,i] * qw[n,j,i]`` carries the exponent
``ex[m,j] + ew[n,j]``. Products are aligned into one fixed-point accumulator whose scale is

    ``scale[m] = max(max_j ex[m,j] + max_{n,j} ew[n,j], max(e_bias)) - G``

(``G = acc_guard_bits``): the row's largest activation exponent plus the matrix's largest weight
exponent, so the shift ``s = scale[m] - ex[m,j] - ew[n,j] = dx[m,j] + dw[n,j]`` is separable
(each PE adds a row shift and a column shift) and ``s >= -G``. Each block term is
``round_shift(P, s)``; the accumulator therefore never exceeds ``Config.acc_bound`` and has
``Config.acc_bits`` bits (proof in docs/arithmetic.md).

The fast path computes each K-block's integer products ``P`` with an int8 GEMM
(``torch._int_mm``, int32 results) when both operands' mantissas fit int8, then adds
``round_shift(P, s)`` per element (exactly, as ``P * 2**-s`` rounded in float32, see
``_shift_sum``); other operands (wider than 8 bits)
take one batched float GEMM over the K-blocks pre-scaled by (clamped) powers of two, giving every
block term ``P * 2**-s`` exactly (float32 when the block products fit its significand, else
float64), then the rounding and the sum over blocks, all exact (see ``_blocked_gemm``).
:func:`matmul_pyint` is the same definition in plain Python ints, the oracle of the tests.
"""

from __future__ import annotations

import os
import weakref
from typing import NamedTuple

import numpy as np

from bct.config import MAX_ADD_TERMS, Config, ConfigError
from bct.model.blocks import BlockFormat, BlockTensor, _requantize_kernels, requantize
from bct.model.fixed import round_shift, round_shift_int

__all__ = [
    "Fixed", "matmul", "matmul_pyint", "linear", "add", "add_requantize", "aligned_requantize",
    "row_scale", "act_blocks",
    "check_operands", "set_threads",
]

class Fixed(NamedTuple):
    """Fixed-point integers with a power-of-two scale per row: ``value * 2**scale[..., None]``."""

    value: np.ndarray
    scale: np.ndarray


def act_blocks(w: BlockTensor, B: int) -> tuple[np.ndarray, np.ndarray]:
    """Mantissas (..., N, K // B, B) and exponents (..., N, K // B) of ``w`` at the activation
    block size ``B`` (a weight block of ``k * B`` elements is ``k`` blocks sharing its exponent)."""
    k = w.fmt.block // B
    return w.mant.reshape(w.shape[:-1] + (-1, B)), np.repeat(w.exp, k, axis=-1)


def check_operands(x: BlockTensor, w: BlockTensor, bias: BlockTensor | None, cfg: Config):
    """Raise unless ``x @ w.T + bias`` is a valid blockwise matmul under ``cfg``."""
    if x.fmt != cfg.act_format:
        raise ConfigError(f"left operand format {x.fmt} is not the config's activation format")
    if w.fmt not in (cfg.weight_format, cfg.act_format):
        raise ConfigError(f"right operand format {w.fmt} is neither the weight nor the activation format")
    if x.mant.ndim < 2 or w.mant.ndim < 2:
        raise ValueError(f"matmul takes operands of at least 2 dimensions, not {x.shape} and {w.shape}")
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(f"reduction lengths differ: {x.shape} and {w.shape}")
    if x.shape[:-2] != w.shape[:-2]:
        raise ValueError(f"batch dimensions differ: {x.shape} and {w.shape}")
    cfg.check_reduction(x.shape[-1])
    if bias is not None:
        if bias.fmt != cfg.vector_format:
            raise ConfigError(f"bias format {bias.fmt} is not the config's vector format")
        if bias.shape != (w.shape[-2],):
            raise ValueError(f"bias shape {bias.shape} does not match {w.shape[-2]} outputs")


def row_scale(x: BlockTensor, w: BlockTensor, bias: BlockTensor | None, cfg: Config) -> np.ndarray:
    """The accumulator scale of every output row (the hardware's host-side schedule uses it)."""
    top = x.exp.max(axis=-1) + w.exp.max(axis=(-2, -1))[..., None]
    if bias is not None:
        top = np.maximum(top, bias.exp.max())
    return (top - cfg.acc_guard_bits).astype(np.int64)


def matmul(x: BlockTensor, w: BlockTensor, cfg: Config, bias: BlockTensor | None = None) -> Fixed:
    """Blockwise integer ``x @ w.T (+ bias)`` into the fixed-point accumulator.

    Parameters
    ----------
    x : BlockTensor, shape (..., M, K)
        Activations, in ``cfg.act_format``.
    w : BlockTensor, shape (..., N, K)
        Weights (``cfg.weight_format``) or activations (``cfg.act_format``); leading (batch)
        dimensions equal to ``x``'s: each batch element is an independent matmul.
    cfg : Config
    bias : BlockTensor, shape (N,), optional
        In ``cfg.vector_format`` (blocked along N).

    Returns
    -------
    Fixed
        ``value`` int64 (..., M, N), exactly ``|value| <= cfg.acc_bound``; ``scale`` int64
        (..., M).
    """
    check_operands(x, w, bias, cfg)
    scale = row_scale(x, w, bias, cfg)
    return Fixed(_blocked_gemm(x, w, scale, cfg.acc_guard_bits, bias), scale)


#: Block products per chunk (float32: 1.2 MB): one chunk's GEMM output stays in cache for the
#: rounding pass that follows it.
_CHUNK = 3 << 16


def _block_float(x: BlockTensor, w: BlockTensor) -> tuple[type, int]:
    """The float type of the block products and its significand bits ``p``.

    A block product ``|P| <= B * qx * qw`` must stay below ``2**(p - 2)`` (see
    :func:`_blocked_gemm`): float32 (``p = 24``) covers the 8-bit formats at every block size up
    to 128; wider operands take float64 (``p = 53``), which every valid config fits.
    """
    bound = x.fmt.block * x.fmt.qmax * w.fmt.qmax
    if bound < 1 << 22:
        return np.float32, 24
    if bound < 1 << 51:
        return np.float64, 53
    raise ConfigError(f"block products up to {bound} exceed the exact float64 range")


_BLAS = None


def _one_blas_thread():
    """Context limiting numpy's BLAS to one thread: the block GEMMs are many small products
    (inner length ``B``), which a second BLAS thread slows down several times on a loaded
    2-core machine; the chunks are spread over :func:`set_threads` threads of our own instead."""
    global _BLAS
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController
        _BLAS = ThreadpoolController()  # finds the loaded BLAS libraries once
    return _BLAS.limit(limits=1, user_api="blas")


_THREADS = max(1, min(2, os.cpu_count() or 1))
_POOL = None


def set_threads(n: int) -> None:
    """Number of threads the block GEMMs run on (default: 2, or 1 on a 1-core machine)."""
    global _THREADS, _POOL
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int, not {n!r}")
    if n != _THREADS and _POOL is not None:
        _POOL.shutdown()
        _POOL = None
    _THREADS = n


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor
        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="bct-gemm")
    return _POOL


_ROUND_SUM = None


def _round_sum():
    """The compiled rounding pass (numba; compiled on first use, cached on disk).

    ``round_sum(t, out, bm, be, sc)``: ``out[c, r, n] = sum_j round(t[c, j, r, n])`` for the
    block terms ``t`` of one chunk, with ``round(t) = trunc(t + copysign(1/2, t))`` in ``t``'s
    own float type (exact, see :func:`_blocked_gemm`) and the sum over blocks in float64, stored
    as int64; plus, when ``bm`` is not empty, the bias term
    ``round_shift(bm[n], sc[c, r] - be[n // Bv])`` (:func:`bct.model.fixed.round_shift` on
    scalars: the one rounding rule). ``scale_left(mant, sx, out)`` writes the left operand's
    blocks scaled by ``2**-sx`` (exact: a power of two within the float's normal range) as
    ``(L, nb, M, B)``, ``scale_right(mant, sw, out)`` the right operand's as ``(L, nb, B, N)``.
    """
    global _ROUND_SUM, _nb_rs
    if _ROUND_SUM is None:
        import math

        import numba

        from bct.model import fixed

        # a global, not a closure, and the stamp of fixed.py (bct.model.fixed.kernel_stamp)
        _nb_rs = fixed.scalar_kernels().round_shift
        stamp = fixed.kernel_stamp(fixed)

        @numba.njit(nogil=True, cache=True)
        def round_sum(t, out, bm, be, sc):
            stamp  # noqa: B018 (the cache key)
            C, nb, R, N = t.shape
            half = t.dtype.type(0.5)
            nbb = be.shape[0]
            Bv = N // nbb if nbb else 0
            acc = np.empty(N)
            for c in range(C):
                for r in range(R):
                    acc[:] = 0.0
                    for j in range(nb):
                        tj = t[c, j, r]
                        for n in range(N):
                            v = tj[n]
                            acc[n] += np.float64(np.trunc(v + np.copysign(half, v)))
                    o = out[c, r]
                    for n in range(N):
                        o[n] = np.int64(acc[n])
                    for k in range(nbb):
                        s = sc[c, r] - be[k]
                        for i in range(k * Bv, (k + 1) * Bv):
                            o[i] += _nb_rs(bm[i], s)

        @numba.njit(nogil=True, cache=True)
        def scale_left(mant, sx, out):  # out[l, j, m, :] = mant[l, m, j, :] * 2**-sx[l, m, j]
            L, M, nb, B = mant.shape
            for l in range(L):
                for m in range(M):
                    for j in range(nb):
                        f = out.dtype.type(math.ldexp(1.0, -sx[l, m, j]))
                        o = out[l, j, m]
                        for i in range(B):
                            o[i] = out.dtype.type(mant[l, m, j, i]) * f

        @numba.njit(nogil=True, cache=True)
        def scale_right(mant, sw, out):  # out[l, j, :, n] = mant[l, n, j, :] * 2**-sw[l, n, j]
            L, N, nb, B = mant.shape
            for l in range(L):
                for n in range(N):
                    for j in range(nb):
                        f = out.dtype.type(math.ldexp(1.0, -sw[l, n, j]))
                        for i in range(B):
                            out[l, j, i, n] = out.dtype.type(mant[l, n, j, i]) * f

        _ROUND_SUM = round_sum, scale_left, scale_right
    return _ROUND_SUM


_PREPARED: dict = {}  # id(weight) -> (weak reference, {key: prepared})


def _prepared(w: BlockTensor, key, build):
    """``build()``, kept per 2-D right operand ``w`` and ``key`` while that :class:`BlockTensor`
    lives (the weights, used at every call; like every BlockTensor it must not be changed in
    place once used)."""
    entry = _PREPARED.get(id(w))
    if entry is not None and entry[0]() is w and key in entry[1]:
        return entry[1][key]
    out = build()
    if w.mant.ndim == 2:
        if entry is None or entry[0]() is not w:
            ref = weakref.ref(w, lambda _, i=id(w): _PREPARED.pop(i, None))
            entry = _PREPARED[id(w)] = (ref, {})
        entry[1][key] = out
    return out


def _prepare_right(w: BlockTensor, B: int, dt: type, p: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """``w``'s blocks scaled by ``2**-sw'`` as ``(L, nb, B, N)`` and its largest exponents
    (kept per 2-D right operand: :func:`_prepared`)."""
    def build():
        wm, we = act_blocks(w, B)  # (..., N, nb, B), (..., N, nb)
        ew_max = w.exp.max(axis=(-2, -1))[..., None, None]
        sw = np.minimum(ew_max - we, p + G)  # (..., N, nb), >= 0
        N, nb = we.shape[-2:]
        ws = np.empty((int(np.prod(we.shape[:-2], dtype=np.int64)), nb, B, N), dtype=dt)
        scale_right = _round_sum()[2]
        scale_right(np.ascontiguousarray(wm).reshape(-1, N, nb, B),
                    np.ascontiguousarray(sw).reshape(-1, N, nb), ws)
        return ws, ew_max

    return _prepared(w, (B, dt, G), build)


#: Which block GEMM :func:`_blocked_gemm` runs: ``"auto"`` (int8 when :func:`_int8_fits`, else
#: float), ``"int8"`` (int8 whenever the mantissas fit int8 and ``torch._int_mm`` is exact here)
#: or ``"float"``. The tests switch it; every choice gives the same integers.
_GEMM_PATH = "auto"

#: ``"auto"`` takes the int8 path only for matrices of at least this many outputs ``M * N``:
#: one ``torch._int_mm`` call per K-block and matrix costs several microseconds, more than the
#: float path's share of a small attention head (numpy batches the heads in one call).
_INT8_MIN_OUTPUTS = 1 << 14

_TORCH = None  # torch, once imported and checked; False when the int8 GEMM is unavailable


def _int8_torch():
    """``torch`` if ``torch._int_mm`` computes exact int32 products of int8 matrices here, else
    None (imported on first use; checked once on the extreme operands ``+-127`` at inner length
    128, where a kernel with 16-bit intermediate sums would saturate, and on seeded random ones)."""
    global _TORCH
    if _TORCH is None:
        _TORCH = False
        try:
            import torch

            rng = np.random.default_rng(0)
            a = np.full((24, 128), 127, dtype=np.int8)
            a[1::2] = -127
            a[2::3, ::2] = -127
            b = rng.integers(-127, 128, size=(128, 40)).astype(np.int8)
            b[:, 0], b[:, 1], b[::2, 2] = 127, -127, -127
            b[1::2, 2] = 127
            for x, y in ((a, b), (b.T.copy(), a.T.copy()), (a[:5, :7], b[:7, :3])):
                got = torch._int_mm(torch.from_numpy(x), torch.from_numpy(y)).numpy()
                if not np.array_equal(got.astype(np.int64), x.astype(np.int64) @ y.astype(np.int64)):
                    raise ArithmeticError("torch._int_mm is not exact")
            _TORCH = torch
        except (ImportError, AttributeError, RuntimeError, ArithmeticError):
            pass
    return _TORCH or None


def _int8_fits(x: BlockTensor, w: BlockTensor) -> bool:
    """Whether :func:`_blocked_gemm` takes the int8 path for ``x @ w.T`` (see ``_GEMM_PATH``):
    both mantissa ranges within int8 (``qmax <= 127``; the symmetric ranges never hold -128),
    block products ``|P| <= B * 127 * 127 < 2**22`` (int32, and exact in float32 for the
    rounding of :func:`_shift_sum`; ``B <= 128``), and ``torch._int_mm`` exact."""
    if _GEMM_PATH == "float" or max(x.fmt.qmax, w.fmt.qmax) > 127:
        return False
    if x.fmt.block * x.fmt.qmax * w.fmt.qmax >= 1 << 22:
        return False
    if _GEMM_PATH == "auto" and x.shape[-2] * w.shape[-2] < _INT8_MIN_OUTPUTS:
        return False
    return _int8_torch() is not None


_SHIFT_SUM = None


def _shift_sum():
    """The compiled pass of the int8 path (numba; compiled on first use, cached on disk).

    ``shift_sum(p, rows, acc, out, l, m0, j0, s0, s1, fx, fw, bm, be, sc, q, e, qmax, e_min,
    e_max, bits)``: for the int32 products ``p[jj, r, n]`` of the K-blocks ``j = j0 + jj`` and
    rows ``m = m0 + r < m0 + rows`` of batch element ``l``, adds the block term
    ``round_shift(p[jj, r, n], s)`` to the segment accumulator row ``acc[r, n]`` (set to 0
    first when ``j0 == s0``, the first block of the segment ``[s0, s1)``). The shift
    ``s = sx[l, m, j] + sw[l, j, n]`` comes as the float32 factors
    ``fx[l, m, j] = 2**-min(sx, 24)`` and ``fw[l, j, n] = 2**-min(sw, 24 + G)``, and each term
    is computed as ``trunc(t + copysign(1/2, t))`` with ``t = p * (fx * fw)`` in float32 (the
    truncation is the conversion to the integer type itself): the
    rounding of :func:`_blocked_gemm_float`, exactly ``round_shift(p, s)`` by its proof
    (``|p| < 2**22``; ``fx * fw`` and ``t`` are exact powers-of-two multiples in float32's
    normal range, ``-16 <= s' <= 64``), so the one rounding rule holds. Branch-free float
    maths, so the loop over ``n`` vectorises fully (the variable-shift integer form does not).

    ``acc`` is int32 when every partial sum of a segment fits it (the caller sizes the
    segments, :func:`_int8_segment`: each term is at most ``|p| * 2**G``), else int64; the
    terms are converted to ``acc``'s type (exact: integers within its range). Half the bytes
    of an int64 row per block, and 16 lanes per vector. After the segment's last block
    (``j0 + g == s1``) the row is widened into the int64 result row ``out[r]`` (set for the
    first segment, added for the others; ``out`` of one row is a scratch row, allowed with a
    single segment only).

    After the last K-block it adds, when ``bm`` is not empty, the bias term
    ``round_shift(bm[n], sc[l, m] - be[n // Bv])`` (:func:`bct.model.fixed.round_shift` on
    scalars) to ``out[r]``, and, when ``q`` is not empty, re-encodes the finished row into
    ``q[l, m]`` (``(L, M, nk, Bq)``), ``e[l, m]`` with :func:`bct.model.blocks.requantize`'s
    compiled kernel (format ``qmax, e_min, e_max, bits``). Every array is C-contiguous.
    """
    global _SHIFT_SUM, _nb_rs, _nb_requant_rows
    if _SHIFT_SUM is None:
        import numba

        from bct.model import blocks, fixed

        # globals, not closures, and the stamp of fixed.py and blocks.py, whose kernels its
        # compiled code contains (bct.model.fixed.kernel_stamp)
        _nb_rs = fixed.scalar_kernels().round_shift
        _nb_requant_rows = _requantize_kernels()[0]
        stamp = fixed.kernel_stamp(fixed, blocks)

        @numba.njit(nogil=True, cache=True)
        def shift_sum(p, rows, acc, out, l, m0, j0, s0, s1, fx, fw, bm, be, sc, q, e, qmax,
                      e_min, e_max, bits):
            stamp  # noqa: B018 (the cache key)
            g, _, N = p.shape
            nbb = be.shape[0]
            Bv = N // nbb if nbb else 0
            narrow = acc.itemsize == 4
            seg_end = j0 + g == s1
            last = j0 + g == fw.shape[1]
            half = np.float32(0.5)
            for r in range(rows):
                m = m0 + r
                o = acc[r]
                if j0 == s0:
                    o[:] = 0
                for jj in range(g):
                    pj = p[jj, r]
                    fwj = fw[l, j0 + jj]
                    a = fx[l, m, j0 + jj]
                    if narrow:
                        for n in range(N):
                            t = np.float32(pj[n]) * (a * fwj[n])
                            o[n] += np.int32(t + np.copysign(half, t))  # truncates
                    else:
                        for n in range(N):
                            t = np.float32(pj[n]) * (a * fwj[n])
                            o[n] += np.int64(t + np.copysign(half, t))
                if not seg_end:
                    continue
                w = out[r if out.shape[0] > 1 else 0]
                if s0 == 0:
                    for n in range(N):
                        w[n] = o[n]
                else:
                    for n in range(N):
                        w[n] += o[n]
                if last:
                    for k in range(nbb):
                        s = sc[l, m] - be[k]
                        for i in range(k * Bv, (k + 1) * Bv):
                            w[i] += _nb_rs(bm[i], s)
                    if q.shape[0]:  # the finished row, re-encoded while in cache
                        _nb_requant_rows(w.reshape((1,) + q.shape[2:]), sc[l, m:m + 1],
                                         q[l, m:m + 1], e[l, m:m + 1], qmax, e_min, e_max, bits)

        _SHIFT_SUM = shift_sum
    return _SHIFT_SUM


def _int8_segment(B: int, qx: int, qw: int, G: int) -> int:
    """K-blocks per int32 segment of :func:`_shift_sum`'s accumulator: each block term is at
    most ``B * qx * qw * 2**G`` in magnitude (``|P| <= B qx qw``, shift ``s >= -G``), so the
    sum of this many stays within int32; 0 when a single term may not (the accumulator is
    then int64)."""
    return ((1 << 31) - 1) // ((B * qx * qw) << G)


_PACK = None


def _pack_left():
    """The compiled packing of the int8 path's left operand, one chunk of rows at a time (numba;
    compiled on first use, cached on disk): ``pack(mant, ex, sc, ewm, l, m0, xq, fx)`` writes
    the mantissas ``mant[l, m0:m0 + R]`` (``(L, M, nb, B)``) as int8 ``xq[j, r] =
    mant[l, m0 + r, j]`` (``(nb, R, B)``, rows past ``M`` zero) and those rows' factors
    ``fx[l, m, j] = 2**-min(sc[l, m] - ex[l, m, j] - ewm[l], 24)`` in float32 (exact powers of
    two, see :func:`_shift_sum`). Each task of :func:`_blocked_gemm_int8` packs its own chunk
    just before its GEMMs (in its thread, in cache)."""
    global _PACK
    if _PACK is None:
        import math

        import numba

        @numba.njit(nogil=True, cache=True)
        def pack(mant, ex, sc, ewm, l, m0, xq, fx):
            M, nb, B = mant.shape[1:]
            R = xq.shape[1]
            pw = np.empty(57, dtype=np.float32)  # 2**-s for s = -32..24 (s >= -G >= -16)
            for k in range(57):
                pw[k] = math.ldexp(1.0, 32 - k)
            for j in range(nb):
                for r in range(R):
                    m = m0 + r
                    o = xq[j, r]
                    if m < M:
                        src = mant[l, m, j]
                        for i in range(B):
                            o[i] = src[i]
                    else:
                        o[:] = 0
            for m in range(m0, min(m0 + R, M)):
                for j in range(nb):
                    fx[l, m, j] = pw[min(max(sc[l, m] - ex[l, m, j] - ewm[l], -32), 24) + 32]

        _PACK = pack
    return _PACK


#: Rows per chunk of the int8 path (at most; chunks as even as possible): each
#: ``torch._int_mm`` call costs some microseconds, so calls are kept large; but a chunk's
#: accumulator rows stay within ``_INT8_ACC`` elements (1 MB of int32) down to half that many
#: rows (N = 384: 512 rows, N = 1536: 256), and a matrix is cut into at least one chunk per
#: thread (of at least ``_INT8_MIN_ROWS`` rows) when the batch alone does not give every
#: thread one.
_INT8_ROWS = 512
_INT8_ACC = 1 << 18
_INT8_MIN_ROWS = 64
#: Block products per call of the int8 path's compiled pass (int32: 2 MB at most); at least
#: one K-block. (Real activations, 1 thread, CPU time: 256 rows / 1 << 17 / 1 << 18 -> these,
#: linear 0.94-0.96 -> 0.90-0.91 of the previous path.)
_INT8_GROUP = 1 << 19


def _prepare_right_int8(w: BlockTensor, B: int, G: int):
    """``w``'s mantissas as int8 blocks ``(L * nb)`` torch views of ``(B, N)``, its column
    factors ``2**-min(ew_max - ew, 24 + G)`` as float32 ``(L, nb, N)`` (see :func:`_shift_sum`)
    and its largest exponents ``(..., 1, 1)``; kept per 2-D right operand (:func:`_prepared`)."""
    def build():
        torch = _int8_torch()
        wm, we = act_blocks(w, B)  # (..., N, nb, B), (..., N, nb)
        ew_max = w.exp.max(axis=(-2, -1))[..., None, None]
        N, nb = we.shape[-2:]
        L = int(np.prod(we.shape[:-2], dtype=np.int64))
        wq = np.ascontiguousarray(wm.reshape(L, N, nb, B).transpose(0, 2, 3, 1), dtype=np.int8)
        sw = np.minimum(ew_max - we, 24 + G).reshape(L, N, nb).transpose(0, 2, 1)
        fw = np.ascontiguousarray(np.ldexp(np.float32(1), -sw).astype(np.float32))  # exact
        return torch.from_numpy(wq).view(L * nb, B, N).unbind(0), fw, ew_max

    return _prepared(w, (B, "int8", G), build)


def _chunks(L: int, M: int, per_row: int) -> list[tuple[int, int, int, int]]:
    """``(l0, l1, m0, m1)`` chunks of about ``_CHUNK`` block products: rows of one matrix, or
    whole small matrices of the batch."""
    per_row = max(per_row, 1)
    if M * per_row <= _CHUNK:  # small matrices (attention heads): chunks of batch elements
        step = max(1, _CHUNK // (M * per_row))
        return [(l0, min(l0 + step, L), 0, M) for l0 in range(0, L, step)]
    step = max(1, _CHUNK // per_row)
    return [(l, l + 1, m0, min(m0 + step, M)) for l in range(L) for m0 in range(0, M, step)]


def _run_tasks(run, tasks: list) -> None:
    """``run(part)`` over the chunks, shared among :func:`set_threads` threads."""
    threads = min(_THREADS, len(tasks))
    if threads <= 1:
        run(tasks)
    else:
        parts = [tasks[i::threads] for i in range(threads)]
        for f in [_pool().submit(run, part) for part in parts]:
            f.result()


def _bias_arrays(bias: BlockTensor | None) -> tuple[np.ndarray, np.ndarray]:
    if bias is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return bias.mant, bias.exp


def _blocked_gemm(
    x: BlockTensor, w: BlockTensor, scale: np.ndarray, G: int, bias: BlockTensor | None = None
) -> np.ndarray:
    """The accumulator ``sum_j round_shift(P[m,n,j], s)`` (plus the bias, each bias element
    ``round_shift(b, scale - e_b)``): :func:`_blocked_gemm_int8` when :func:`_int8_fits`, else
    :func:`_blocked_gemm_float`. Both give the same integers."""
    if _int8_fits(x, w):
        return _blocked_gemm_int8(x, w, scale, G, bias)
    return _blocked_gemm_float(x, w, scale, G, bias)


def _blocked_gemm_int8(
    x: BlockTensor, w: BlockTensor, scale: np.ndarray, G: int, bias: BlockTensor | None = None,
    fmt: BlockFormat | None = None,
):
    """The accumulator from int8 GEMMs of the K-blocks (exact integer block products); with
    ``fmt``, instead each finished row re-encoded by :func:`~bct.model.blocks.requantize`'s
    compiled kernel (returns ``(mantissas, exponents)``; ``N`` a multiple of ``fmt.block``; the
    accumulator then lives only in one chunk buffer per thread).

    The rows of each batch element are cut into chunks of ``R <= _INT8_ROWS`` rows (see there;
    as even as possible; the last chunk padded with zero rows). Per chunk, one ``torch._int_mm`` per
    K-block ``j`` (int8 ``(R, B) @ (B, N)``, inner length B) gives the exact block products
    ``P_j`` in int32 (``|P| <= B qx qw <= 128 * 127**2 < 2**31``; the backend is checked once by
    :func:`_int8_torch`), and the compiled pass :func:`_shift_sum` adds ``round_shift(P_j, s)``
    with the shift ``s = sx[m, j] + sw[n, j]`` (``sx = scale - ex - max ew >= -G``,
    ``sw = max ew - ew >= 0``, given as float32 powers of two) for groups of K-blocks of about
    ``_INT8_GROUP`` products (in cache), into an int32 accumulator per segment of
    :func:`_int8_segment` K-blocks (int64 when one term may pass int32), each segment widened
    into the int64 result rows, then the bias term (and the re-encoding). The chunks
    are shared among :func:`set_threads` threads; torch runs one intra-op thread in each (its
    thread count is restored afterwards).
    """
    torch = _int8_torch()
    B = x.fmt.block
    tw, fw, ew_max = _prepare_right_int8(w, B, G)  # L * nb views (B, N), (L, nb, N), (..., 1, 1)
    lead = x.shape[:-2]
    M, N = x.shape[-2], w.shape[-2]
    nb = x.exp.shape[-1]
    L = int(np.prod(lead, dtype=np.int64))
    if fmt is None:
        out = np.empty((L, M, N), dtype=np.int64)
        q, e, fargs = np.empty((0, 0, 0, 0), np.int64), np.empty((0, 0, 0), np.int64), (0, 0, 0, 0)
        done = out.reshape(lead + (M, N))
    else:
        out = None
        q = np.empty((L, M, N // fmt.block, fmt.block), dtype=np.int64)
        e = np.empty((L, M, N // fmt.block), dtype=np.int64)
        fargs = (fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
        done = q.reshape(lead + (M, N)), e.reshape(lead + (M, -1))
    if L * M * N == 0:
        return done
    rmax = max(1, min(_INT8_ROWS, max(_INT8_ROWS // 2, _INT8_ACC // N)))
    nch = -(-M // min(M, rmax))
    if L * nch < _THREADS:  # a chunk for every thread
        nch = max(nch, min(-(-_THREADS // L), M // _INT8_MIN_ROWS))
    R = -(-M // nch)  # rows per chunk, as even as possible
    g = max(1, min(nb, _INT8_GROUP // (R * N)))  # K-blocks per call of the compiled pass
    seg = _int8_segment(B, x.fmt.qmax, w.fmt.qmax, G)
    acc_type = np.int32 if seg else np.int64
    seg = min(seg, nb) if seg else nb  # K-blocks per segment of the accumulator
    sc = np.ascontiguousarray(np.broadcast_to(scale, lead + (M,)).reshape(L, M))
    xm = np.ascontiguousarray(x.blocks).reshape(L, M, nb, B)
    xe = np.ascontiguousarray(x.exp).reshape(L, M, nb)
    ewm = np.ascontiguousarray(ew_max, dtype=np.int64).reshape(L)
    fx = np.empty((L, M, nb), dtype=np.float32)
    pack = _pack_left()
    bm, be = _bias_arrays(bias)
    shift_sum = _shift_sum()
    int_mm = torch._int_mm
    tasks = [(l, c) for l in range(L) for c in range(nch)]

    def run(part):
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        p = np.empty((g, R, N), dtype=np.int32)
        tp = torch.from_numpy(p).unbind(0)
        xq = np.empty((nb, R, B), dtype=np.int8)  # the chunk's blocks: contiguous (R, B) each
        tx = torch.from_numpy(xq).unbind(0)
        acc = np.empty((R, N), dtype=acc_type)
        # the result rows: one scratch row when re-encoded at once from a single segment
        buf = np.empty((R if seg < nb else 1, N), dtype=np.int64) if out is None else None
        for l, c in part:
            m0 = c * R
            rows = min(R, M - m0)
            pack(xm, xe, sc, ewm, l, m0, xq, fx)
            res = buf if out is None else out[l, m0:m0 + rows]
            for s0 in range(0, nb, seg):
                s1 = min(s0 + seg, nb)
                for j0 in range(s0, s1, g):
                    k = min(g, s1 - j0)
                    for jj in range(k):
                        int_mm(tx[j0 + jj], tw[l * nb + j0 + jj], out=tp[jj])
                    shift_sum(p[:k], rows, acc, res, l, m0, j0, s0, s1, fx, fw, bm, be, sc, q, e,
                              *fargs)

    saved = torch.get_num_threads()
    try:
        _run_tasks(run, tasks)
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)
    return done


def _blocked_gemm_float(
    x: BlockTensor, w: BlockTensor, scale: np.ndarray, G: int, bias: BlockTensor | None = None
) -> np.ndarray:
    """The accumulator ``sum_j round(P[m,n,j] * 2**-s)`` (plus the bias, each bias element
    ``round_shift(b, scale - e_b)``) via batched float GEMMs of the K-blocks.

    Each operand block is pre-scaled by its (clamped) power of two, ``x * 2**-sx'`` and
    ``w * 2**-sw'`` with ``sx' = min(sx, p)`` and ``sw' = min(sw, p + G)``, so one GEMM per
    K-block ``j`` (inner length B) gives ``t = P * 2**-s'`` (``s' = sx' + sw'``) for every
    (row, column). Exactness, in a float of ``p`` significand bits with ``|P| < 2**(p-2)``
    (:func:`_block_float`), for any summation order and with or without FMA:

    * every product ``x_i w_i * 2**-s'`` and every partial sum of the block is a multiple of
      ``2**-s'`` below ``2**(p-2-s')`` in magnitude: representable, so ``t`` is exact (and no
      value is subnormal: ``-G <= s' <= 2p + G``);
    * the clamps change nothing: where one is active ``s, s' >= p``, so ``|t| < 1/2`` and both
      round to 0;
    * ``round(t) = trunc(fl(t + copysign(1/2, t)))`` (round half away from zero): for
      ``1 <= s' <= p - 1``, ``|t| + 1/2`` is a multiple of ``2**-s'`` below ``2**(p-1-s')``
      (representable); for ``s' >= p`` it is below ``3/4`` (so it cannot round up to 1, and
      ``|t| < 1/4`` rounds to 0 either way); for ``s' <= 0``, ``t`` is an
      integer and ``|t| + 1/2`` is representable below ``2**(p-1)``, while above it ``t`` is a
      multiple of 4 (``|P| < 2**(p-2)``) whose ulp is at least 1, so the sum rounds back to
      ``|t|`` (ties to even);
    * the rounded terms are integers; their float64 sum over the K-blocks stays below
      ``Config.acc_bound < 2**52`` (the config refuses wider accumulators), exact in any order.

    The work is cut into chunks of about ``_CHUNK`` block products (rows of one matrix, or
    whole small matrices of the batch); each chunk's GEMM (numpy BLAS, one thread) is followed
    at once by the compiled rounding-and-sum pass (:func:`_round_sum`) while its products are
    still in cache, and the chunks are shared among :func:`set_threads` threads.
    """
    B = x.fmt.block
    dt, p = _block_float(x, w)
    ws, ew_max = _prepare_right(w, B, dt, p, G)  # (L, nb, B, N)
    sx = np.minimum(scale[..., None] - x.exp - ew_max, p)  # (..., M, nb), >= -G
    lead = x.shape[:-2]
    M, N, nb = x.shape[-2], w.shape[-2], sx.shape[-1]
    L = int(np.prod(lead, dtype=np.int64))
    out = np.empty((L, M, N), dtype=np.int64)
    if out.size == 0:
        return out.reshape(lead + (M, N))
    round_sum, scale_left, _ = _round_sum()
    # (L, nb, M, B), contiguous, scaled exactly by powers of two
    xs = np.empty((L, nb, M, B), dtype=dt)
    scale_left(np.ascontiguousarray(x.blocks).reshape(L, M, nb, B),
               np.ascontiguousarray(sx).reshape(L, M, nb), xs)
    bm, be = _bias_arrays(bias)
    sc = np.ascontiguousarray(np.broadcast_to(scale, lead + (M,)).reshape(L, M))

    def run(part):
        buf = np.empty(0, dtype=dt)
        for l0, l1, m0, m1 in part:
            shape = (l1 - l0, nb, m1 - m0, N)
            size = shape[0] * nb * shape[2] * N
            if buf.size < size:
                buf = np.empty(size, dtype=dt)
            t = buf[:size].reshape(shape)
            np.matmul(xs[l0:l1, :, m0:m1], ws[l0:l1], out=t)
            round_sum(t, out[l0:l1, m0:m1], bm, be, sc[l0:l1, m0:m1])

    with _one_blas_thread():
        _run_tasks(run, _chunks(L, M, nb * N))
    return out.reshape(lead + (M, N))


def matmul_pyint(
    x: BlockTensor, w: BlockTensor, cfg: Config, bias: BlockTensor | None = None
) -> Fixed:
    """:func:`matmul` written with plain Python ints, one block at a time (the test oracle);
    2-D operands only."""
    check_operands(x, w, bias, cfg)
    if x.mant.ndim != 2:
        raise ValueError("matmul_pyint takes 2-D operands")
    B, G = cfg.block_size, cfg.acc_guard_bits
    xm, xe = x.mant.tolist(), x.exp.tolist()
    wm, we = w.mant.tolist(), act_blocks(w, B)[1].tolist()
    ew_max = max(max(r) for r in we)
    bm = bias.mant.tolist() if bias is not None else None
    be = bias.exp.tolist() if bias is not None else None
    nb = len(xe[0])
    out, scales = [], []
    for m in range(len(xm)):
        top = max(xe[m]) + ew_max
        if bias is not None:
            top = max(top, max(be))
        scale = top - G
        row = []
        for n in range(len(wm)):
            acc = 0
            for j in range(nb):
                p = sum(a * b for a, b in zip(xm[m][j * B:(j + 1) * B], wm[n][j * B:(j + 1) * B]))
                acc += round_shift_int(p, scale - xe[m][j] - we[n][j])
            if bias is not None:
                acc += round_shift_int(bm[n], scale - be[n // B])
            row.append(acc)
        out.append(row)
        scales.append(scale)
    return Fixed(np.array(out, dtype=np.int64).reshape(len(xm), len(wm)),
                 np.array(scales, dtype=np.int64))


def linear(x: BlockTensor, w: BlockTensor, cfg: Config, bias: BlockTensor | None = None) -> BlockTensor:
    """``x @ w.T + bias`` re-encoded to the activation block format (blocks along N):
    ``requantize(matmul(x, w, cfg, bias))``. On the int8 path each row is re-encoded by the
    same compiled kernel as soon as its accumulator is complete (while in cache)."""
    fmt = cfg.act_format
    check_operands(x, w, bias, cfg)
    scale = row_scale(x, w, bias, cfg)
    if _int8_fits(x, w) and w.shape[-2] % fmt.block == 0:
        q, e = _blocked_gemm_int8(x, w, scale, cfg.acc_guard_bits, bias, fmt)
        return BlockTensor(q, e, fmt)
    y = _blocked_gemm(x, w, scale, cfg.acc_guard_bits, bias)
    return requantize(y, scale, fmt)


def _add_scale(terms: tuple, cfg: Config) -> np.ndarray:
    """:func:`add`'s checks of its operands and the row scales ``max(row exponents) - G``."""
    if not 1 <= len(terms) <= MAX_ADD_TERMS:
        raise ValueError(f"add takes 1..{MAX_ADD_TERMS} terms, not {len(terms)} (too many terms)")
    first = terms[0]
    for t in terms:
        if t.shape != first.shape or t.fmt != first.fmt:
            raise ValueError(f"cannot add {first.shape} {first.fmt} and {t.shape} {t.fmt}")
        if t.fmt not in (cfg.act_format, cfg.weight_format):
            raise ConfigError(f"add operand format {t.fmt} is neither the activation nor the weight format")
    top = np.max([t.exp.max(axis=-1) for t in terms], axis=0)
    return (top - cfg.acc_guard_bits).astype(np.int64)


def _add_operands(terms: tuple, scale: np.ndarray):
    """Rows ``R``, width ``K``, the row scales ``(R,)`` and each term's ``(R, K // B, B)``
    mantissas and ``(R, K // B)`` exponents."""
    first = terms[0]
    R, K = int(np.prod(first.shape[:-1], dtype=np.int64)), first.shape[-1]
    B = first.fmt.block
    args = [(np.ascontiguousarray(t.mant).reshape(R, K // B, B),
             np.ascontiguousarray(t.exp).reshape(R, -1)) for t in terms]
    return R, K, np.ascontiguousarray(scale).reshape(R), args


def _row_steps(R: int, K: int) -> list[tuple[int, int]]:
    """Row ranges of :func:`add`: one per :func:`set_threads` thread when large."""
    step = max(1, -(-R // _THREADS)) if R * K >= _PAR_MIN else R
    return [(r0, min(r0 + step, R)) for r0 in range(0, R, step)]


def add(*terms: BlockTensor, cfg: Config) -> Fixed:
    """Sum of up to ``MAX_ADD_TERMS`` activations (residuals, the embedding sum), aligned to
    ``max(row exponents) - G``.

    Each operand becomes ``round_shift(q, scale - e)`` with ``scale - e >= -G``, so
    ``|value| <= terms * qmax * 2**G <= Config.add_bound``. Operands are activations or
    embedding rows (weight format). One compiled pass per term (:func:`_add_kernel`), rows
    shared among :func:`set_threads` threads when large.
    """
    scale = _add_scale(terms, cfg)
    first = terms[0]
    if first.mant.ndim == 0 or first.exp.shape[-1] == 0:
        s = scale[..., None, None]
        value = sum(round_shift(t.blocks, s - t.exp[..., None]) for t in terms)
        return Fixed(value.reshape(first.shape), scale)
    R, K, sc, args = _add_operands(terms, scale)
    value = np.empty((R, K), dtype=np.int64)
    kernel = _add_kernel()[0]

    def run(part):
        for r0, r1 in part:
            for i, (m, e) in enumerate(args):
                kernel(m[r0:r1], e[r0:r1], sc[r0:r1], value[r0:r1], i == 0)

    _run_tasks(run, _row_steps(R, K))
    return Fixed(value.reshape(first.shape), scale)


def add_requantize(*terms: BlockTensor, cfg: Config, fmt: BlockFormat) -> BlockTensor:
    """``requantize(*add(*terms, cfg=cfg), fmt)`` in one compiled pass over the rows: each
    row's sum (the add kernel's rule, term by term) re-encoded at once by requantize's row
    kernel from a row buffer (no full-size int64 sum; rows shared among :func:`set_threads`
    threads when large). The same integers, the same errors."""
    return aligned_requantize(terms, _add_scale(terms, cfg), fmt)


def aligned_requantize(terms: tuple, scale: np.ndarray, fmt: BlockFormat) -> BlockTensor:
    """``requantize(Fixed(sum(round_shift(t.blocks, scale - t.exp)), scale), fmt)``: up to
    three block tensors of one shape and block size (any formats) aligned to the given row
    scales, summed and re-encoded in one compiled pass over the rows (:func:`add_requantize`
    with :func:`add`'s scale; :func:`bct.model.integer.residual_add`'s on the wide path). The
    same integers as that definition."""
    first = terms[0]
    scale = np.asarray(scale, dtype=np.int64)
    if (first.mant.ndim == 0 or first.exp.shape[-1] == 0 or first.shape[-1] % fmt.block
            or len(terms) > 3 or any(t.fmt.block != first.fmt.block for t in terms)):
        s = scale[..., None, None]
        value = sum(round_shift(t.blocks, s - t.exp[..., None]) for t in terms)
        return requantize(Fixed(value.reshape(first.shape), scale), fmt)
    R, K, sc, args = _add_operands(terms, scale)
    args += [args[0]] * (3 - len(args))  # unused slots (the kernel adds the first nt terms)
    q = np.empty((R, K // fmt.block, fmt.block), dtype=np.int64)
    e = np.empty((R, K // fmt.block), dtype=np.int64)
    kernel = _add_kernel()[1]
    fargs = (fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
    flat = [a[r] for a in args for r in (0, 1)]

    def run(part):
        for r0, r1 in part:
            kernel(*(a[r0:r1] for a in flat), len(terms), sc[r0:r1], q[r0:r1], e[r0:r1], *fargs)

    _run_tasks(run, _row_steps(R, K))
    return BlockTensor(q.reshape(first.shape), e.reshape(first.shape[:-1] + (K // fmt.block,)), fmt)


#: Elements of :func:`add` below which it stays on the calling thread.
_PAR_MIN = 1 << 16

_ADD = None


def _add_kernel():
    """The compiled passes of :func:`add` (numba; compiled on first use, cached on disk):
    ``add_term(mant, exp, sc, out, first)`` sets (``first``) or adds
    ``round_shift(mant[r, k, i], sc[r] - exp[r, k])`` (:func:`bct.model.fixed.round_shift` on
    scalars, one shift per block) into ``out[r, k * B + i]``; ``add_rows(m1, e1, m2, e2, m3,
    e3, nt, sc, q, e, qmax, e_min, e_max, bits)`` does that for the first ``nt`` terms of one
    row into a row buffer and re-encodes it with requantize's row kernel (scale ``sc[r]``)
    into ``q[r]`` (``(R, K // Bq, Bq)``), ``e[r]``."""
    global _ADD, _nb_rs, _nb_add_row, _nb_requant_rows
    if _ADD is None:
        import numba

        from bct.model import blocks, fixed

        # globals, not closures, and the stamps of the files whose kernels the compiled code
        # contains (bct.model.fixed.kernel_stamp)
        _nb_rs = fixed.scalar_kernels().round_shift
        _nb_requant_rows = _requantize_kernels()[0]
        stamp = fixed.kernel_stamp(fixed)
        stamp_rows = fixed.kernel_stamp(fixed, blocks)

        @numba.njit(nogil=True, cache=True)
        def add_term(mant, exp, sc, out, first):
            stamp  # noqa: B018 (the cache key)
            R, nk, B = mant.shape
            for r in range(R):
                for k in range(nk):
                    s = sc[r] - exp[r, k]
                    m = mant[r, k]
                    o = out[r, k * B:(k + 1) * B]
                    if first:
                        for i in range(B):
                            o[i] = _nb_rs(m[i], s)
                    else:
                        for i in range(B):
                            o[i] += _nb_rs(m[i], s)

        _nb_add_row = add_term

        @numba.njit(nogil=True, cache=True)
        def add_rows(m1, e1, m2, e2, m3, e3, nt, sc, q, e, qmax, e_min, e_max, bits):
            stamp_rows  # noqa: B018 (the cache key)
            R, nk, B = m1.shape
            buf = np.empty((1, q.shape[1], q.shape[2]), dtype=np.int64)
            row = buf.reshape(1, nk * B)
            for r in range(R):
                _nb_add_row(m1[r:r + 1], e1[r:r + 1], sc[r:r + 1], row, True)
                if nt > 1:
                    _nb_add_row(m2[r:r + 1], e2[r:r + 1], sc[r:r + 1], row, False)
                if nt > 2:
                    _nb_add_row(m3[r:r + 1], e3[r:r + 1], sc[r:r + 1], row, False)
                _nb_requant_rows(buf, sc[r:r + 1], q[r:r + 1], e[r:r + 1], qmax, e_min, e_max,
                                 bits)

        _ADD = add_term, add_rows
    return _ADD
