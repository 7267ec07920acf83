"""Integer-only GELU, softmax and LayerNorm (the algorithms are argued in docs/arithmetic.md).

Each unit has a fixed-point core (``*_fixed``: integers in, integers out, exactly what the
hardware computes) and a block-format wrapper (block format in, block format out). Constants come
from :func:`bct.model.constants.derive`; rounding from :mod:`bct.model.fixed`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bct.config import Config
from bct.model.blocks import BlockTensor, requantize, to_fixed
from bct.model.constants import LN_D_CAP, LOG2E_FRAC, derive, ln_eps_units
from bct.model.fixed import bit_length, round_div, round_shift, sqrt_round_int
from bct.model.matmul import Fixed

__all__ = [
    "gelu_fixed",
    "gelu",
    "gelu_acc",
    "fixed_to_frac",
    "softmax_fixed",
    "softmax",
    "tanh_fixed",
    "layernorm_fixed",
    "layernorm_affine",
    "layernorm",
    "layernorm_wide",
]


# ------------------------------------------------------------------------------------------------
# GELU
def gelu_fixed(x, cfg: Config) -> np.ndarray:
    """GELU of fixed-point integers with ``cfg.gelu_frac`` fraction bits (same format out).

    ``GELU(x) = max(x, 0) - h(|x|)`` with ``h(a) = a * Phi(-a)``: ``h`` is small, smooth and
    vanishes for large ``a``, so a short table of ``h`` with linear interpolation over
    ``[0, gelu_table_range)`` (``h = 0`` beyond) gives the whole curve. One multiplier.

    Parameters
    ----------
    x : array_like of int
        Inputs, saturated to ``cfg.gelu_bits`` signed bits.
    """
    c = derive(cfg)
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    x = np.clip(np.asarray(x, dtype=np.int64), -lim, lim)
    a = np.abs(x)
    idx = np.minimum(np.right_shift(a, c.gelu_seg_shift), cfg.gelu_segments)
    lo, slope = _gelu_segments(cfg)  # index gelu_segments (outside the table) gives h = 0
    a &= (1 << c.gelu_seg_shift) - 1  # the position inside the segment
    a *= slope[idx]
    h = round_shift(a, c.gelu_seg_shift)
    h += lo[idx]
    k = c.gelu_table_frac - cfg.gelu_frac
    y = np.maximum(x, 0)
    y <<= k
    y -= h
    return round_shift(y, k)


@lru_cache(maxsize=64)
def _gelu_segments(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Start value and rise of every GELU table segment, plus one all-zero entry for ``|x|``
    beyond the table (where ``h = 0``)."""
    t = np.asarray(derive(cfg).gelu_table, dtype=np.int64)[: cfg.gelu_segments + 1]
    lo = np.append(t[:-1], 0)
    slope = np.append(np.diff(t), 0)
    lo.flags.writeable = slope.flags.writeable = False
    return lo, slope


def gelu(t: BlockTensor, cfg: Config) -> BlockTensor:
    """GELU of an activation tensor in block format, re-encoded to block format."""
    x = to_fixed(t, cfg.gelu_frac, cfg.gelu_bits)
    return requantize(gelu_fixed(x, cfg), -cfg.gelu_frac, cfg.act_format)


def fixed_to_frac(x: Fixed, frac: int, bits: int) -> np.ndarray:
    """Fixed-point rows (``value * 2**scale``, e.g. a matmul accumulator) to ``frac`` fraction
    bits, rounded with the project's rule and saturated to signed ``bits`` bits.

    A left shift saturates every element above ``lim >> k`` (``lim = 2**(bits-1) - 1``), so it
    is decided before shifting and int64 never wraps, whatever the accumulator's width.
    """
    lim = (1 << (bits - 1)) - 1
    v = np.asarray(x.value, dtype=np.int64)
    s = np.broadcast_to(-(np.asarray(x.scale, dtype=np.int64)[..., None] + frac), v.shape)
    k = np.clip(-s, 0, bits)  # the left shift; beyond bits every non-zero value saturates
    room = np.right_shift(lim, k)
    left = np.where(np.abs(v) <= room, np.left_shift(np.clip(v, -room, room), k), np.sign(v) * lim)
    out = np.where(s > 0, round_shift(v, np.maximum(s, 1)), left)
    return np.clip(out, -lim, lim)


def gelu_acc(x: Fixed, cfg: Config) -> BlockTensor:
    """GELU read straight from a matmul accumulator (``Config.gelu_direct``): the FFN1 output
    rounded once to ``cfg.gelu_frac`` (not first to activation blocks), re-encoded to block
    format."""
    v = fixed_to_frac(x, cfg.gelu_frac, cfg.gelu_bits)
    return requantize(gelu_fixed(v, cfg), -cfg.gelu_frac, cfg.act_format)


# ------------------------------------------------------------------------------------------------
# Softmax
def softmax_fixed(x, cfg: Config, mask=None) -> np.ndarray:
    """Row-wise softmax over the last axis of fixed-point scores (``cfg.softmax_frac``).

    Base 2: ``t = log2(e) * (x - max) <= 0`` in fixed point; ``2**t`` = a direct LUT on the
    fractional bits of ``-t`` shifted right by its integer part; one reciprocal of the row sum
    per row; each probability is one multiply and one rounding shift.

    Parameters
    ----------
    x : array_like of int, shape (..., L)
        Scores, saturated to ``cfg.softmax_bits`` signed bits.
    mask : array_like of bool, shape broadcastable to x, optional
        ``False`` entries are excluded (probability 0). Every row needs one ``True``.

    Returns
    -------
    numpy.ndarray of int64
        Probabilities with ``cfg.softmax_out_frac`` fraction bits.
    """
    c = derive(cfg)
    lim = (1 << (cfg.softmax_bits - 1)) - 1
    x = np.clip(np.asarray(x, dtype=np.int64), -lim, lim)
    if mask is None:
        mask = np.ones(x.shape, dtype=bool)
    mask = np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)
    if not mask.any(axis=-1).all():
        raise ValueError("softmax: a row has no unmasked element")
    xmax = np.where(mask, x, -lim).max(axis=-1, keepdims=True)
    u = -round_shift((x - xmax) * c.log2e, LOG2E_FRAC)  # -t >= 0, softmax_frac fraction bits
    n = np.right_shift(u, cfg.softmax_frac)
    r = u & ((1 << cfg.softmax_frac) - 1)
    e = round_shift(np.asarray(c.exp2_lut, dtype=np.int64)[r], n)
    e = np.where(mask, e, 0)
    total = e.sum(axis=-1, keepdims=True)  # >= 2**softmax_exp_frac (the max contributes 1)
    recip = round_div(np.int64(1) << (c.recip_shift + cfg.softmax_out_frac), total)
    return round_shift(e * recip, c.recip_shift)


def softmax(t: BlockTensor, cfg: Config, mask=None) -> BlockTensor:
    """Softmax of block-format scores along the last axis, re-encoded to block format."""
    x = to_fixed(t, cfg.softmax_frac, cfg.softmax_bits)
    p = softmax_fixed(x, cfg, mask)
    return requantize(p, -cfg.softmax_out_frac, cfg.act_format)


def tanh_fixed(x, cfg: Config) -> np.ndarray:
    """``tanh`` of fixed-point integers (``cfg.softmax_frac`` fraction bits in, saturated to
    ``cfg.softmax_bits``; ``cfg.softmax_out_frac`` out), sharing the softmax unit's exp2 LUT.

    ``tanh(|x|) = (1 - t) / (1 + t)`` with ``t = e**(-2|x|) = 2**(-2|x| log2 e)`` from the LUT
    and a shift, one rounding division; odd symmetry restores the sign. Used by the BERT pooler.
    """
    c = derive(cfg)
    lim = (1 << (cfg.softmax_bits - 1)) - 1
    x = np.clip(np.asarray(x, dtype=np.int64), -lim, lim)
    u = round_shift(2 * np.abs(x) * c.log2e, LOG2E_FRAC)
    one = np.int64(1) << cfg.softmax_exp_frac
    t = round_shift(np.asarray(c.exp2_lut, dtype=np.int64)[u & ((1 << cfg.softmax_frac) - 1)],
                    np.right_shift(u, cfg.softmax_frac))
    y = round_div((one - t) << cfg.softmax_out_frac, one + t)
    return np.where(x < 0, -y, y)


# ------------------------------------------------------------------------------------------------
# LayerNorm
def layernorm_fixed(x: Fixed, cfg: Config) -> np.ndarray:
    """Standardise rows of fixed-point integers: ``(x - mean) / sqrt(var + eps)``.

    Integer-only and free of the mean's rounding: with ``S1 = sum(x)``, ``S2 = sum(x**2)`` and
    ``D = N*S2 - S1**2`` (``= N**2 * var``), ``y = (N*x - S1) / sqrt(D + eps')``. ``D + eps'`` is
    normalised by an even shift ``2t`` into ``[2**(2W-2), 2**(2W))``, its root ``r`` rounded
    (``W = ln_sqrt_bits`` bits), ``inv = round(2**(2W) / r)`` once per row and
    ``y = round_shift((N*x - S1) * inv, 2W - F + t)``.

    Parameters
    ----------
    x : Fixed
        Values (last axis = the normalised row, ``|value| <= cfg.add_bound``) and per-row scale.

    Returns
    -------
    numpy.ndarray of int64
        The standardised values with ``cfg.ln_frac`` fraction bits (``|y| <= sqrt(N)``).
    """
    c = derive(cfg)
    v = np.asarray(x.value, dtype=np.int64)
    N = v.shape[-1]
    cfg.check_reduction(N, "LayerNorm width")
    if np.abs(v).max(initial=0) > cfg.add_bound:
        raise ValueError(f"LayerNorm input exceeds the config's bound {cfg.add_bound}")
    s1 = v.sum(axis=-1, keepdims=True)
    s2 = (v * v).sum(axis=-1, keepdims=True)
    d = N * s2 - s1 * s1
    scales = np.broadcast_to(np.asarray(x.scale, dtype=np.int64), v.shape[:-1])
    uniq, inverse = np.unique(scales, return_inverse=True)  # few distinct row scales
    eps = np.array([ln_eps_units(c, N, int(s), LN_D_CAP) for s in uniq], dtype=np.int64)[inverse]
    d = np.minimum(d + eps.reshape(scales.shape)[..., None], LN_D_CAP)
    W = cfg.ln_sqrt_bits
    t = (bit_length(d) - 2 * W + 1) >> 1  # ceil((bitlen - 2W) / 2), may be negative
    dn = round_shift(d, 2 * t)
    r = sqrt_round_int(dn)
    inv = np.where(r > 0, round_div(np.int64(1) << c.ln_recip_shift, np.maximum(r, 1)), 0)
    num = N * v - s1
    return round_shift(num * inv, c.ln_recip_shift - cfg.ln_frac + t)


def layernorm_affine(y, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> np.ndarray:
    """``y * gamma + beta`` into ``cfg.ln_out_frac`` fraction bits, saturated to
    ``cfg.ln_out_bits``; ``y`` has ``cfg.ln_frac`` fraction bits."""
    B = cfg.block_size
    y = np.asarray(y, dtype=np.int64)
    shape = y.shape[:-1] + (y.shape[-1] // B, B)
    lim = (1 << (cfg.ln_out_bits - 1)) - 1
    # a left shift past the output width saturates anyway: clamp it so int64 cannot overflow
    floor = -(cfg.ln_out_bits + 1)
    g_shift = np.maximum(cfg.ln_frac - cfg.ln_out_frac - gamma.exp[:, None], floor)
    g = np.clip(round_shift(y.reshape(shape) * gamma.blocks, g_shift), -lim, lim)
    b = round_shift(beta.blocks, np.maximum(-(beta.exp[:, None] + cfg.ln_out_frac), floor))
    return np.clip(g + b, -lim, lim).reshape(y.shape)


def _layernorm_out(x: Fixed, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> np.ndarray:
    """The LayerNorm output in fixed point (``cfg.ln_out_frac`` fraction bits)."""
    N = x.value.shape[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (N,) or p.fmt != cfg.vector_format:
            raise ValueError(f"LayerNorm {name} must be a ({N},) tensor in the vector format")
    return layernorm_affine(layernorm_fixed(x, cfg), gamma, beta, cfg)


def layernorm(x: Fixed, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> BlockTensor:
    """LayerNorm of fixed-point rows with block-format ``gamma`` / ``beta`` (vector format),
    re-encoded to the activation block format."""
    return requantize(_layernorm_out(x, gamma, beta, cfg), -cfg.ln_out_frac, cfg.act_format)


def layernorm_wide(x: Fixed, gamma: BlockTensor, beta: BlockTensor,
                   cfg: Config) -> tuple[BlockTensor, BlockTensor]:
    """LayerNorm for the wide residual path (``cfg.residual_bits``): the one fixed-point output
    re-encoded twice, to the activation format (the next matmuls' operand, equal to
    :func:`layernorm`) and to ``cfg.residual_format`` (the residual stream's copy).

    Returns
    -------
    tuple of BlockTensor
        ``(activation copy, residual copy)``.
    """
    y = _layernorm_out(x, gamma, beta, cfg)
    return (requantize(y, -cfg.ln_out_frac, cfg.act_format),
            requantize(y, -cfg.ln_out_frac, cfg.residual_format))

