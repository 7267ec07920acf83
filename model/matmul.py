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

The fast path is one float64 GEMM of the operands pre-scaled by (clamped) powers of two, plus
exact corrections for the few block terms that need rounding; every value it forms is a
multiple of ``2**-F`` below ``2**(53 - F)``, hence exact (see ``_gemm_with_corrections``).
:func:`matmul_pyint` is the same definition in plain Python ints, the oracle of the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bct.config import EXACT_FLOAT_BITS, MAX_ADD_TERMS, Config, ConfigError
from bct.model.blocks import BlockTensor, requantize
from bct.model.fixed import round_half_away_float, round_shift, round_shift_int

__all__ = [
    "Fixed", "matmul", "matmul_pyint", "linear", "add", "row_scale", "act_blocks", "check_operands",
]

# A shift this large rounds any block product (|P| < 2**37) to 0, so larger ones are clamped.
_SHIFT_CLAMP = 64


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
    acc = _gemm_with_corrections(x, w, scale, _exact_frac_bits(cfg, x.shape[-1]))
    if bias is not None:
        shift = scale[..., None, None] - bias.exp[:, None]  # (..., M, nbN, 1)
        acc += round_shift(bias.blocks, shift).reshape(acc.shape)
    return Fixed(acc, scale)


def _exact_frac_bits(cfg: Config, K: int) -> int:
    """Fraction bits a float64 sum of the aligned block terms can carry exactly.

    Every term is ``P * 2**-s'`` with ``s' >= -G`` and ``sum |P| <= K * qa * qop``, so any partial
    sum (with the bounded corrections added) is below ``2 * acc_bound + K``; a float64 holds
    every multiple of ``2**-F`` below ``2**(53 - F)`` exactly. ``F >= 0`` is all the method
    needs (fewer bits only mean more corrections); the valid configs of a grid over operand
    widths, guard bits and ``max_reduction`` all leave ``F >= 11`` (LayerNorm's width check
    binds first), and a negative ``F`` is refused rather than computed inexactly.
    """
    qa = cfg.act_format.qmax
    bound = ((K * qa * cfg.operand_qmax) << cfg.acc_guard_bits) * 2 + K
    frac = EXACT_FLOAT_BITS - 1 - bound.bit_length()
    if frac < 0:
        raise ConfigError(f"a reduction of {K} leaves no exact float64 fraction bits for the matmul")
    return frac


def _gemm_with_corrections(x: BlockTensor, w: BlockTensor, scale: np.ndarray, frac: int) -> np.ndarray:
    """Blockwise matmul as ONE float64 GEMM plus sparse exact corrections.

    The term of block ``j`` is ``round(P * 2**-s)`` with ``s = sx[m,j] + sw[n,j]`` (separable).
    The GEMM computes ``sum_j P * 2**-s'`` with the shifts clamped, ``s' = min(sx, a) +
    min(sw, b)`` (``a + b = frac``): exact, because every term is a multiple of ``2**-frac`` and
    every partial sum is in range. That equals the definition except where the term needs
    rounding (``s > 0``) or a clamp was active; those (row, column, block) triples are
    recomputed per block and corrected by ``round(P * 2**-s) - P * 2**-s'``, also exact: one
    small GEMM per group of columns sharing a weight shift when such triples are few, or the
    block's whole row set at once when they are many (GELU outputs against FFN2's weights
    need rounding in most triples).
    """
    B = x.fmt.block
    wm, we = act_blocks(w, B)  # (..., N, nb, B), (..., N, nb)
    ew_max = w.exp.max(axis=(-2, -1))[..., None, None]
    sx = np.minimum(scale[..., None] - x.exp - ew_max, _SHIFT_CLAMP)  # (..., M, nb), >= -G
    sw = np.minimum(ew_max - we, _SHIFT_CLAMP)  # (..., N, nb), >= 0
    b = frac // 2
    a = frac - b
    xb = x.blocks.astype(np.float64)  # (..., M, nb, B)
    wb = wm.astype(np.float64)
    xs = np.ldexp(xb, -np.minimum(sx, a)[..., None]).reshape(x.shape)
    ws = np.ldexp(wb, -np.minimum(sw, b)[..., None]).reshape(w.shape[:-2] + (w.shape[-2], -1))
    y = np.matmul(xs, np.swapaxes(ws, -1, -2))  # (..., M, N), exact
    x_nz = (x.blocks != 0).any(axis=-1)  # (..., M, nb): an all-zero block contributes 0
    w_nz = (wm != 0).any(axis=-1)
    fx, fw = np.ldexp(1.0, -sx), np.ldexp(1.0, -sw)  # exact powers of two
    cx, cw = np.ldexp(1.0, -np.minimum(sx, a)), np.ldexp(1.0, -np.minimum(sw, b))
    for idx in np.ndindex(*x.shape[:-2]):
        yi = y[idx]
        for j in range(sx.shape[-1]):
            at = idx + (slice(None), j)
            sxj, swj, xnz, wnz = sx[at], sw[at], x_nz[at], w_nz[at]
            groups = []  # (rows, cols) of the triples to correct, one per weight shift value
            for v in np.unique(swj[wnz]):
                rows = np.flatnonzero(xnz & ((sxj + v > 0) | (sxj > a) | (v > b)))
                if rows.size:
                    groups.append((rows, np.flatnonzero(wnz & (swj == v))))
            if not groups:
                continue
            rows = np.unique(np.concatenate([r for r, _ in groups]))
            if 4 * sum(r.size * c.size for r, c in groups) < rows.size * yi.shape[-1]:
                for rows, cols in groups:  # few triples: correct them where they are
                    p = xb[idx + (rows, j)] @ wb[idx + (cols, j)].T
                    yi[np.ix_(rows, cols)] += _correction(
                        p, fx[at][rows], fw[at][cols], cx[at][rows], cw[at][cols])
            else:  # many: correct the whole row set (the correction is 0 where not needed)
                if rows.size == yi.shape[0]:
                    rows = slice(None)
                p = xb[idx + (rows, j)] @ wb[idx + (slice(None), j)].T
                yi[rows] += _correction(p, fx[at][rows], fw[at], cx[at][rows], cw[at])
    return y.astype(np.int64)


def _correction(p, fx, fw, cx, cw) -> np.ndarray:
    """``round(p * fx fw) - p * cx cw`` for block products ``p`` (rows x cols), exactly.

    ``fx fw = 2**-s`` and ``cx cw = 2**-s'`` are powers of two, so both products are exact;
    the rounding is the project's one rule (:func:`~bct.model.fixed.round_half_away_float`,
    the identity on integers), so the result is 0 where ``s' == s <= 0``. ``p`` is overwritten.
    """
    t = np.multiply(p, np.multiply.outer(fx, fw), out=p)
    r = round_half_away_float(t)
    t *= np.multiply.outer(cx / fx, cw / fw)  # now p * 2**-s' (ratios are powers of two)
    r -= t
    return r


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
    """``x @ w.T + bias`` re-encoded to the activation block format (blocks along N)."""
    y = matmul(x, w, cfg, bias)
    return requantize(y.value, y.scale, cfg.act_format)


def add(*terms: BlockTensor, cfg: Config) -> Fixed:
    """Sum of up to ``MAX_ADD_TERMS`` activations (residuals, the embedding sum), aligned to
    ``max(row exponents) - G``.

    Each operand becomes ``round_shift(q, scale - e)`` with ``scale - e >= -G``, so
    ``|value| <= terms * qmax * 2**G <= Config.add_bound``. Operands are activations or
    embedding rows (weight format).
    """
    if not 1 <= len(terms) <= MAX_ADD_TERMS:
        raise ValueError(f"add takes 1..{MAX_ADD_TERMS} terms, not {len(terms)} (too many terms)")
    first = terms[0]
    for t in terms:
        if t.shape != first.shape or t.fmt != first.fmt:
            raise ValueError(f"cannot add {first.shape} {first.fmt} and {t.shape} {t.fmt}")
        if t.fmt not in (cfg.act_format, cfg.weight_format):
            raise ConfigError(f"add operand format {t.fmt} is neither the activation nor the weight format")
    top = np.max([t.exp.max(axis=-1) for t in terms], axis=0)
    scale = (top - cfg.acc_guard_bits).astype(np.int64)
    s = scale[..., None, None]
    value = sum(round_shift(t.blocks, s - t.exp[..., None]) for t in terms)
    return Fixed(value.reshape(first.shape), scale)
