"""Integer-only GELU, softmax and LayerNorm (the algorithms are argued in docs/arithmetic.md).

Each unit has a fixed-point core (``*_fixed``: integers in, integers out, exactly what the
hardware computes) and a block-format wrapper (block format in, block format out). Constants come
from :func:`bct.model.constants.derive`; rounding from :mod:`bct.model.fixed`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bct.config import Config
from bct.model.blocks import BlockTensor, _requantize_kernels, requantize, requantize_numpy, to_fixed
from bct.model.constants import LN_D_CAP, LOG2E_FRAC, derive, ln_eps_units
from bct.model.fixed import bit_length, round_div, round_shift, sqrt_round_int
from bct.model.matmul import Fixed

__all__ = [
    "add_layernorm",
    "gelu_fixed",
    "gelu_fixed_numpy",
    "gelu",
    "gelu_numpy",
    "gelu_acc",
    "gelu_acc_numpy",
    "fixed_to_frac",
    "fixed_to_frac_numpy",
    "softmax_fixed",
    "softmax_fixed_numpy",
    "softmax",
    "softmax_numpy",
    "tanh_fixed",
    "layernorm_fixed",
    "layernorm_fixed_numpy",
    "layernorm_affine",
    "layernorm_affine_numpy",
    "layernorm",
    "layernorm_wide",
    "aligned_layernorm",
]


# ------------------------------------------------------------------------------------------------
# GELU
def gelu_fixed_numpy(x, cfg: Config) -> np.ndarray:
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


def gelu_numpy(t: BlockTensor, cfg: Config) -> BlockTensor:
    """GELU of an activation tensor in block format, re-encoded to block format: ``to_fixed``
    to ``cfg.gelu_frac``, :func:`gelu_fixed_numpy`, ``requantize`` (the definition of
    :func:`gelu`, which computes the same in one fused compiled pass)."""
    x = to_fixed(t, cfg.gelu_frac, cfg.gelu_bits)
    return requantize_numpy(gelu_fixed_numpy(x, cfg), -cfg.gelu_frac, cfg.act_format)


def fixed_to_frac_numpy(x: Fixed, frac: int, bits: int) -> np.ndarray:
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


def gelu_acc_numpy(x: Fixed, cfg: Config) -> BlockTensor:
    """GELU read straight from a matmul accumulator (``Config.gelu_direct``): the FFN1 output
    rounded once to ``cfg.gelu_frac`` (not first to activation blocks), re-encoded to block
    format (the definition of :func:`gelu_acc`, which computes the same in one fused compiled
    pass)."""
    v = fixed_to_frac_numpy(x, cfg.gelu_frac, cfg.gelu_bits)
    return requantize_numpy(gelu_fixed_numpy(v, cfg), -cfg.gelu_frac, cfg.act_format)


# ------------------------------------------------------------------------------------------------
# Softmax
def softmax_fixed_numpy(x, cfg: Config, mask=None) -> np.ndarray:
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


def softmax_numpy(t: BlockTensor, cfg: Config, mask=None) -> BlockTensor:
    """Softmax of block-format scores along the last axis, re-encoded to block format:
    ``to_fixed`` to ``cfg.softmax_frac``, :func:`softmax_fixed_numpy`, ``requantize`` (the
    definition of :func:`softmax`, which computes the same in one fused compiled pass)."""
    x = to_fixed(t, cfg.softmax_frac, cfg.softmax_bits)
    p = softmax_fixed_numpy(x, cfg, mask)
    return requantize_numpy(p, -cfg.softmax_out_frac, cfg.act_format)


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
def layernorm_fixed_numpy(x: Fixed, cfg: Config) -> np.ndarray:
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


def layernorm_affine_numpy(y, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> np.ndarray:
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
    re-encoded to the activation block format.

    ``requantize(layernorm_affine(layernorm_fixed(x)), -ln_out_frac)`` fused into one compiled
    pass: each row normalised, scaled and re-encoded in row buffers by the same row kernels
    (rows shared among the set_threads threads; no full-size intermediates). The same
    integers, the same errors."""
    return _layernorm_to(x, gamma, beta, cfg, (cfg.act_format,))[0]


def _layernorm_to(x: Fixed, gamma: BlockTensor, beta: BlockTensor, cfg: Config,
                  fmts: tuple) -> list:
    """:func:`layernorm`'s result re-encoded to each format of ``fmts`` (each of block size
    ``cfg.block_size``): one compiled pass per format over the same rows."""
    N = np.shape(x.value)[-1] if np.ndim(x.value) else 0
    B = cfg.block_size
    if np.ndim(x.value) == 0 or N % B or gamma.fmt.block != B or any(f.block != B for f in fmts):
        y = _layernorm_out(x, gamma, beta, cfg)
        return [requantize(y, -cfg.ln_out_frac, f) for f in fmts]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (N,) or p.fmt != cfg.vector_format:
            raise ValueError(f"LayerNorm {name} must be a ({N},) tensor in the vector format")
    v2, eps, consts = _layernorm_rows(x, cfg)
    affine = _affine_operands(gamma, beta, cfg)
    R = v2.shape[0]
    shape = np.shape(x.value)
    k = _kernels()
    out = []
    for fmt in fmts:
        q = np.empty((R, N // B, B), dtype=np.int64)
        e = np.empty((R, N // B), dtype=np.int64)
        oks = []
        _split_rows(R, N, lambda r0, r1: oks.append(k.layernorm_blocks(
            v2[r0:r1], eps[r0:r1], *consts, *affine, -cfg.ln_out_frac, fmt.qmax, fmt.e_min,
            fmt.e_max, fmt.bits, q[r0:r1], e[r0:r1])))
        _check_bound(oks, cfg)
        out.append(BlockTensor(q.reshape(shape), e.reshape(shape[:-1] + (N // B,)), fmt))
    return out


def add_layernorm(x: BlockTensor, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> BlockTensor:
    """``layernorm(add(x, cfg=cfg), gamma, beta, cfg)``: the alignment of the activation ``x``
    (:func:`bct.model.matmul.add` of one term) fused into :func:`layernorm`'s pass, each row
    aligned by add's kernel into a row buffer (no full-size aligned copy). A single aligned
    term is at most ``qmax << G <= Config.add_bound``, so LayerNorm's bound holds (the unfused
    path is taken otherwise). The same integers, the same errors."""
    from bct.model.matmul import _add_scale, add

    scale = _add_scale((x,), cfg)
    if (x.fmt.qmax << cfg.acc_guard_bits) > cfg.add_bound:
        return layernorm(add(x, cfg=cfg), gamma, beta, cfg)
    return aligned_layernorm(x, scale, gamma, beta, cfg, (cfg.act_format,))[0]


def aligned_layernorm(x: BlockTensor, scale: np.ndarray, gamma: BlockTensor, beta: BlockTensor,
                      cfg: Config, fmts: tuple) -> list:
    """``layernorm(Fixed(round_shift(x.blocks, scale - x.exp), scale))`` re-encoded to each of
    ``fmts`` (block size ``cfg.block_size``): the row's alignment fused into the compiled
    LayerNorm pass, one pass per format. ``scale`` (one per row) must keep every aligned
    element within ``Config.add_bound`` (the callers' rules do: :func:`add_layernorm`, and
    :func:`bct.model.integer.residual_add` on the wide path). The same integers as the
    unfused definition."""
    from bct.model.fixed import round_shift
    from bct.model.matmul import _add_kernel, _add_operands

    B = cfg.block_size
    N = x.shape[-1] if x.mant.ndim else 0
    scale = np.asarray(scale, dtype=np.int64)
    if (x.mant.ndim == 0 or x.exp.shape[-1] == 0 or N % B or x.fmt.block != B
            or gamma.fmt.block != B or any(f.block != B for f in fmts)):
        v = round_shift(x.blocks, scale[..., None, None] - x.exp[..., None]).reshape(x.shape)
        return _layernorm_to(Fixed(v, scale), gamma, beta, cfg, tuple(fmts))
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p.shape != (N,) or p.fmt != cfg.vector_format:
            raise ValueError(f"LayerNorm {name} must be a ({N},) tensor in the vector format")
    eps, consts = _layernorm_eps(scale, x.shape, cfg)
    affine = _affine_operands(gamma, beta, cfg)
    R, _, sc, ((m, e_in),) = _add_operands((x,), scale)
    _add_kernel()  # (its kernel is compiled into this one)
    k = _kernels()
    out = []
    for fmt in fmts:
        q = np.empty((R, N // B, B), dtype=np.int64)
        e = np.empty((R, N // B), dtype=np.int64)
        _split_rows(R, N, lambda r0, r1: k.layernorm_aligned(
            m[r0:r1], e_in[r0:r1], sc[r0:r1], eps[r0:r1], *consts[1:], *affine, -cfg.ln_out_frac,
            fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits, q[r0:r1], e[r0:r1]))
        out.append(BlockTensor(q.reshape(x.shape), e.reshape(x.shape[:-1] + (N // B,)), fmt))
    return out


def layernorm_wide(x: Fixed, gamma: BlockTensor, beta: BlockTensor,
                   cfg: Config) -> tuple[BlockTensor, BlockTensor]:
    """LayerNorm for the wide residual path (``cfg.residual_bits``): the one fixed-point output
    re-encoded twice, to the activation format (the next matmuls' operand, equal to
    :func:`layernorm`) and to ``cfg.residual_format`` (the residual stream's copy), by the
    fused compiled pass of :func:`layernorm` once per format (the same integers as
    ``requantize`` of ``_layernorm_out``, tested).

    Returns
    -------
    tuple of BlockTensor
        ``(activation copy, residual copy)``.
    """
    return tuple(_layernorm_to(x, gamma, beta, cfg, (cfg.act_format, cfg.residual_format)))



# ------------------------------------------------------------------------------------------------
# Compiled kernels: the functions the model calls. Each is one compiled pass (numba, compiled on
# first use and cached on disk, like bct.model.blocks.requantize) computing exactly its
# ``*_numpy`` definition above (the tests compare them with ``==``).
def gelu_fixed(x, cfg: Config) -> np.ndarray:
    """:func:`gelu_fixed_numpy` in one compiled pass (the same integers): each input saturated,
    then read from :func:`_gelu_lut` inside the table's range and ``max(x, 0)`` beyond it."""
    x = np.asarray(x, dtype=np.int64)
    span, lut = _gelu_lut(cfg)
    out = np.empty(x.shape, dtype=np.int64)
    _kernels().gelu(np.ascontiguousarray(x).reshape(-1), out.reshape(-1),
                    (1 << (cfg.gelu_bits - 1)) - 1, span, lut)
    return out


def fixed_to_frac(x: Fixed, frac: int, bits: int) -> np.ndarray:
    """:func:`fixed_to_frac_numpy` in one compiled pass (the same integers)."""
    v = np.asarray(x.value, dtype=np.int64)
    sc = np.asarray(x.scale, dtype=np.int64)
    if v.ndim == 0 or sc.ndim > v.ndim - 1:  # not one scale per row: the numpy definition
        return fixed_to_frac_numpy(x, frac, bits)
    s = -(np.broadcast_to(sc, v.shape[:-1]) + frac)
    R = int(np.prod(v.shape[:-1], dtype=np.int64))
    out = np.empty(v.shape, dtype=np.int64)
    _kernels().to_frac(np.ascontiguousarray(v).reshape(R, v.shape[-1]),
                       np.ascontiguousarray(s).reshape(R), out.reshape(R, v.shape[-1]),
                       (1 << (bits - 1)) - 1, bits)
    return out


def softmax_fixed(x, cfg: Config, mask=None) -> np.ndarray:
    """:func:`softmax_fixed_numpy` in one compiled pass over the rows (the same integers, the
    same error for a row without an unmasked element)."""
    c = derive(cfg)
    x = np.asarray(x, dtype=np.int64)
    L = x.shape[-1] if x.ndim else 1
    R = x.size // L if L else 0
    if mask is None:
        m2 = np.ones((1, L), dtype=np.bool_)
        step = 0
    else:
        m2 = np.ascontiguousarray(np.broadcast_to(np.asarray(mask, dtype=bool), x.shape)).reshape(R, L)
        step = 1
    out = np.empty(x.shape, dtype=np.int64)
    if L == 0 or R == 0:
        return softmax_fixed_numpy(x, cfg, mask)
    ok = _kernels().softmax(
        np.ascontiguousarray(x).reshape(R, L), m2, step, out.reshape(R, L),
        (1 << (cfg.softmax_bits - 1)) - 1, c.log2e, LOG2E_FRAC, cfg.softmax_frac,
        _exp2_lut(cfg), np.int64(1) << (c.recip_shift + cfg.softmax_out_frac), c.recip_shift)
    if not ok:
        raise ValueError("softmax: a row has no unmasked element")
    return out


@lru_cache(maxsize=64)
def _exp2_lut(cfg: Config) -> np.ndarray:
    lut = np.asarray(derive(cfg).exp2_lut, dtype=np.int64)
    lut.flags.writeable = False
    return lut


def _layernorm_rows(x: Fixed, cfg: Config):
    """``layernorm_fixed``'s operands: the rows ``(R, N)``, each row's epsilon, and the
    kernel's constants (after the width check)."""
    v = np.asarray(x.value, dtype=np.int64)
    N = v.shape[-1]
    eps, consts = _layernorm_eps(x.scale, v.shape, cfg)
    return np.ascontiguousarray(v).reshape(eps.shape[0], N), eps, consts


def _layernorm_eps(scale, shape: tuple, cfg: Config):
    """Each row's epsilon (``(R,)``, from its scale) and the LayerNorm kernel's constants, for
    rows of ``shape`` (after the width check)."""
    c = derive(cfg)
    N = shape[-1]
    cfg.check_reduction(N, "LayerNorm width")
    scales = np.broadcast_to(np.asarray(scale, dtype=np.int64), shape[:-1])
    uniq, inverse = np.unique(scales, return_inverse=True)  # few distinct row scales
    eps = np.array([ln_eps_units(c, N, int(s), LN_D_CAP) for s in uniq], dtype=np.int64)[inverse]
    R = int(np.prod(shape[:-1], dtype=np.int64))
    consts = (cfg.add_bound, LN_D_CAP, cfg.ln_sqrt_bits, c.ln_recip_shift, cfg.ln_frac)
    return np.ascontiguousarray(eps).reshape(R), consts


def _check_bound(oks: list, cfg: Config) -> None:
    if not all(oks):
        raise ValueError(f"LayerNorm input exceeds the config's bound {cfg.add_bound}")


def layernorm_fixed(x: Fixed, cfg: Config) -> np.ndarray:
    """:func:`layernorm_fixed_numpy` in one compiled pass over the rows (the same integers,
    the same errors)."""
    v2, eps, consts = _layernorm_rows(x, cfg)
    out = np.empty(np.shape(x.value), dtype=np.int64)
    o2 = out.reshape(v2.shape)
    oks = []  # each share checks the bound before computing (an error leaves ``out`` unused)
    k = _kernels()
    _split_rows(v2.shape[0], v2.shape[1], lambda r0, r1: oks.append(k.layernorm(
        v2[r0:r1], eps[r0:r1], o2[r0:r1], *consts)))
    _check_bound(oks, cfg)
    return out


def _affine_operands(gamma: BlockTensor, beta: BlockTensor, cfg: Config):
    """The affine kernel's ``gamma`` blocks, their shifts, the aligned ``beta`` and the
    saturation limit."""
    lim = (1 << (cfg.ln_out_bits - 1)) - 1
    floor = -(cfg.ln_out_bits + 1)
    g_shift = np.maximum(cfg.ln_frac - cfg.ln_out_frac - gamma.exp, floor)
    b = round_shift(beta.blocks, np.maximum(-(beta.exp[:, None] + cfg.ln_out_frac), floor))
    return tuple(np.ascontiguousarray(a) for a in (gamma.blocks, g_shift, b)) + (lim,)


def layernorm_affine(y, gamma: BlockTensor, beta: BlockTensor, cfg: Config) -> np.ndarray:
    """:func:`layernorm_affine_numpy` in one compiled pass (the same integers; rows shared
    among the set_threads threads when large)."""
    B = cfg.block_size
    y = np.asarray(y, dtype=np.int64)
    nb = y.shape[-1] // B
    R = y.size // (nb * B) if nb else 0
    g, gs, bb, lim = _affine_operands(gamma, beta, cfg)
    out = np.empty(y.shape, dtype=np.int64)
    y3, o3 = np.ascontiguousarray(y).reshape(R, nb, B), out.reshape(R, nb, B)
    affine = _kernels().affine
    _split_rows(R, nb * B, lambda r0, r1: affine(y3[r0:r1], g, gs, bb, o3[r0:r1], lim))
    return out


def gelu(t: BlockTensor, cfg: Config) -> BlockTensor:
    """GELU of an activation tensor in block format, re-encoded to block format.

    :func:`gelu_numpy` (``to_fixed``, :func:`gelu_fixed`, ``requantize``) fused into one
    compiled pass over the rows, each row's GELU read from a table of :func:`gelu_fixed` over
    every saturated input (when ``cfg.gelu_bits <= 20``) and re-encoded at once by
    ``requantize``'s compiled kernel; rows shared among
    :func:`bct.model.matmul.set_threads` threads. For mantissas of at most 8 bits the pass
    first memoises ``to_fixed`` + GELU for every mantissa and block shift (a few thousand
    entries) and reads each element from that memo. The same integers.
    """
    if t.fmt.block != cfg.act_format.block or t.mant.ndim < 1:
        return gelu_numpy(t, cfg)
    R = int(np.prod(t.shape[:-1], dtype=np.int64))
    nb = t.exp.shape[-1] if t.exp.ndim else 0
    mant = np.ascontiguousarray(t.mant).reshape(R, nb, t.fmt.block)
    exp = np.ascontiguousarray(t.exp).reshape(R, nb)
    return _gelu_rows(cfg, t.shape, R, lambda k, r0, r1, *a: k.gelu_blocks(
        mant[r0:r1], exp[r0:r1], cfg.gelu_frac, cfg.gelu_bits, t.fmt.qmax, *a))


def gelu_acc(x: Fixed, cfg: Config) -> BlockTensor:
    """GELU read straight from a matmul accumulator (``Config.gelu_direct``): the FFN1 output
    rounded once to ``cfg.gelu_frac`` (not first to activation blocks), re-encoded to block
    format.

    :func:`gelu_acc_numpy` (:func:`fixed_to_frac`, :func:`gelu_fixed`, ``requantize``) fused
    into one compiled pass over the rows, as :func:`gelu`. The same integers.
    """
    v = np.asarray(x.value, dtype=np.int64)
    sc = np.asarray(x.scale, dtype=np.int64)
    if v.ndim == 0 or sc.ndim > v.ndim - 1 or v.shape[-1] % cfg.act_format.block:
        return gelu_acc_numpy(x, cfg)
    R = int(np.prod(v.shape[:-1], dtype=np.int64))
    B = cfg.act_format.block
    v3 = np.ascontiguousarray(v).reshape(R, v.shape[-1] // B, B)
    s = np.ascontiguousarray(-(np.broadcast_to(sc, v.shape[:-1]) + cfg.gelu_frac)).reshape(R)
    return _gelu_rows(cfg, v.shape, R, lambda k, r0, r1, *a: k.gelu_acc_rows(
        v3[r0:r1], s[r0:r1], cfg.gelu_bits, *a))


def softmax(t: BlockTensor, cfg: Config, mask=None) -> BlockTensor:
    """Softmax of block-format scores along the last axis, re-encoded to block format.

    :func:`softmax_numpy` (``to_fixed``, :func:`softmax_fixed`, ``requantize``) fused into one
    compiled pass per row (rows shared among the set_threads threads). The same integers, the
    same error for a row without an unmasked element.
    """
    fmt = cfg.act_format
    if t.fmt.block != fmt.block or t.mant.ndim < 1 or t.shape[-1] == 0:
        return softmax_numpy(t, cfg, mask)
    c = derive(cfg)
    L = t.shape[-1]
    R = int(np.prod(t.shape[:-1], dtype=np.int64))
    nb = L // fmt.block
    if mask is None:
        m2, step = np.ones((1, L), dtype=np.bool_), 0
    else:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), t.shape)
        if not m.any(axis=-1).all():
            raise ValueError("softmax: a row has no unmasked element")
        m2, step = np.ascontiguousarray(m).reshape(R, L), 1
    mant = np.ascontiguousarray(t.mant).reshape(R, nb, fmt.block)
    exp = np.ascontiguousarray(t.exp).reshape(R, nb)
    q = np.empty((R, nb, fmt.block), dtype=np.int64)
    e = np.empty((R, nb), dtype=np.int64)
    k = _kernels()
    args = (cfg.softmax_frac, cfg.softmax_bits, (1 << (cfg.softmax_bits - 1)) - 1, c.log2e,
            LOG2E_FRAC, _exp2_lut(cfg), np.int64(1) << (c.recip_shift + cfg.softmax_out_frac),
            c.recip_shift, -cfg.softmax_out_frac, fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
    _split_rows(R, L, lambda r0, r1: k.softmax_blocks(
        mant[r0:r1], exp[r0:r1], m2[r0 * step:r1 * step + 1 - step], step, *args,
        q[r0:r1], e[r0:r1]))
    return BlockTensor(q.reshape(t.shape), e.reshape(t.exp.shape), fmt)


def _gelu_rows(cfg: Config, shape: tuple, R: int, call) -> BlockTensor:
    """Run a fused GELU kernel ``call(kernels, r0, r1, *gelu args)`` over rows ``[r0, r1)``
    (split among the set_threads threads) into a new activation-format BlockTensor."""
    fmt = cfg.act_format
    span, lut = _gelu_lut(cfg)
    nb = shape[-1] // fmt.block
    q = np.empty((R, nb, fmt.block), dtype=np.int64)
    e = np.empty((R, nb), dtype=np.int64)
    k = _kernels()
    args = ((1 << (cfg.gelu_bits - 1)) - 1, span, lut, -cfg.gelu_frac,
            fmt.qmax, fmt.e_min, fmt.e_max, fmt.bits)
    _split_rows(R, nb * fmt.block, lambda r0, r1: call(k, r0, r1, *args, q[r0:r1], e[r0:r1]))
    return BlockTensor(q.reshape(shape), e.reshape(shape[:-1] + (nb,)), fmt)


@lru_cache(maxsize=16)
def _gelu_lut(cfg: Config) -> tuple[int, np.ndarray]:
    """``(span, lut)``: :func:`gelu_fixed_numpy` of every input ``|x| < span`` at
    ``lut[x + span]`` (int32), ``span = gelu_segments << gelu_seg_shift`` (``= gelu_table_range
    << gelu_frac``, capped at the saturation limit + 1). Beyond it the table gives ``h = 0`` and
    GELU is exactly ``max(x, 0)`` (``round_shift(y << k, k) == y``); the tests check both."""
    c = derive(cfg)
    lim = (1 << (cfg.gelu_bits - 1)) - 1
    span = min(cfg.gelu_segments << c.gelu_seg_shift, lim + 1)
    lut = gelu_fixed_numpy(np.arange(-span, span + 1, dtype=np.int64), cfg).astype(np.int32)
    lut.flags.writeable = False
    return span, lut


#: Elements per task below which a compiled pass stays on the calling thread.
_PAR_MIN = 1 << 16


def _split_rows(R: int, per_row: int, run) -> None:
    """``run(r0, r1)`` over ``[0, R)``: in one call, or in one contiguous share per
    :func:`bct.model.matmul.set_threads` thread (the kernels release the GIL) when large."""
    from bct.model import matmul

    n = min(matmul._THREADS, R, max(1, R * per_row // _PAR_MIN))
    if n <= 1:
        run(0, R)
        return
    cuts = [R * i // n for i in range(n + 1)]
    for f in [matmul._pool().submit(run, a, b) for a, b in zip(cuts[:-1], cuts[1:])]:
        f.result()


_KERNELS = None


def _kernels():
    """The compiled nonlinear units (numba; compiled on first use, cached on disk). Scalar
    rounding is :func:`bct.model.fixed.round_shift`'s rule element by element (``_nb_rs``), the
    division :func:`~bct.model.fixed.round_div`'s, the bit length and the rounded square root
    those of :func:`~bct.model.fixed.bit_length` / :func:`~bct.model.fixed.sqrt_round_int`."""
    global _KERNELS, _nb_rs, _nb_rdiv, _nb_bitlen, _nb_requant_rows, _nb_sqrt_round
    global _nb_gelu_one, _nb_to_frac_one, _nb_softmax_row, _nb_gelu_mant, _nb_layernorm_row
    global _nb_affine_row, _nb_within, _nb_add_term
    if _KERNELS is None:
        from types import SimpleNamespace

        import numba

        from bct.model import blocks, fixed

        # kernels call kernels through these globals (_nb_*), never closures, and those that
        # reach a kernel of fixed.py or blocks.py name the stamp of those files, whose kernels
        # their compiled code contains (bct.model.fixed.kernel_stamp)
        one = fixed.scalar_kernels()
        _nb_rs, _nb_rdiv, _nb_bitlen = one.round_shift, one.round_div, one.bit_length
        _nb_requant_rows = _requantize_kernels()[0]
        stamp = fixed.kernel_stamp(fixed, blocks)

        @numba.njit(nogil=True, cache=True)
        def sqrt_round(d):  # sqrt_round_int on one element
            r = np.int64(np.floor(np.sqrt(4.0 * np.float64(d))))
            four_d = 4 * d
            if r * r > four_d:
                r -= 1
            if (r + 1) * (r + 1) <= four_d:
                r += 1
            return (r + 1) >> 1

        _nb_sqrt_round = sqrt_round

        @numba.njit(nogil=True, cache=True, inline="always")
        def gelu_one(x, lim, span, lut):  # gelu_fixed of one input by the table
            v = min(max(x, -lim), lim)
            if v >= span:
                return v
            if v <= -span:
                return np.int64(0)
            return np.int64(lut[v + span])

        _nb_gelu_one = gelu_one

        @numba.njit(nogil=True, cache=True)
        def gelu(x, out, lim, span, lut):
            for i in range(x.shape[0]):
                out[i] = _nb_gelu_one(x[i], lim, span, lut)

        @numba.njit(nogil=True, cache=True, inline="always")
        def to_frac_one(x, sr, k, room, lim):  # fixed_to_frac of one element (k, room: of sr)
            stamp  # noqa: B018 (the cache key)
            if sr > 0:
                o = _nb_rs(x, sr)
            elif abs(x) <= room:
                o = min(max(x, -room), room) << k
            else:
                o = lim if x > 0 else (-lim if x < 0 else 0)
            return min(max(o, -lim), lim)

        _nb_to_frac_one = to_frac_one

        @numba.njit(nogil=True, cache=True)
        def to_frac(v, s, out, lim, bits):
            stamp  # noqa: B018 (the cache key)
            R, N = v.shape
            for r in range(R):
                sr = s[r]
                k = min(max(-sr, 0), bits)
                room = lim >> k
                for j in range(N):
                    out[r, j] = _nb_to_frac_one(v[r, j], sr, k, room, lim)

        @numba.njit(nogil=True, cache=True)
        def softmax_row(x, mr, e, out, log2e, l2frac, frac, lut, recip_num, recip_shift):
            """softmax_fixed of one row ``x`` (already saturated to +-lim) under the mask
            row ``mr`` (at least one element set) into ``out``; ``e`` is scratch."""
            stamp  # noqa: B018 (the cache key)
            fmask = (np.int64(1) << frac) - 1
            xmax = np.int64(-(1 << 62))
            for j in range(x.shape[0]):
                if mr[j]:
                    xmax = max(xmax, x[j])
            total = np.int64(0)
            for j in range(x.shape[0]):
                if mr[j]:
                    u = -_nb_rs((x[j] - xmax) * log2e, l2frac)
                    ej = _nb_rs(lut[u & fmask], u >> frac)
                    e[j] = ej
                    total += ej
                else:
                    e[j] = 0
            recip = _nb_rdiv(recip_num, total)
            for j in range(x.shape[0]):
                out[j] = _nb_rs(e[j] * recip, recip_shift)

        _nb_softmax_row = softmax_row

        @numba.njit(nogil=True, cache=True)
        def softmax(x, m, step, out, lim, log2e, l2frac, frac, lut, recip_num, recip_shift):
            stamp  # noqa: B018 (the cache key)
            R, L = x.shape
            for r in range(R):  # every row needs an unmasked element (checked first, as numpy)
                mr = m[r * step]
                found = False
                for j in range(L):
                    if mr[j]:
                        found = True
                        break
                if not found:
                    return False
            xc = np.empty(L, dtype=np.int64)
            e = np.empty(L, dtype=np.int64)
            for r in range(R):
                for j in range(L):
                    xc[j] = min(max(x[r, j], -lim), lim)
                _nb_softmax_row(xc, m[r * step], e, out[r], log2e, l2frac, frac, lut, recip_num,
                                recip_shift)
            return True

        @numba.njit(nogil=True, cache=True)
        def layernorm_row(vr, eps, out, cap, W, recip_shift, frac):
            # one row (its bound already checked) into out
            stamp  # noqa: B018 (the cache key)
            N = vr.shape[0]
            s1 = np.int64(0)
            s2 = np.int64(0)
            for j in range(N):
                a = vr[j]
                s1 += a
                s2 += a * a
            d = min(N * s2 - s1 * s1 + eps, cap)
            t = (_nb_bitlen(d) - 2 * W + 1) >> 1
            root = _nb_sqrt_round(_nb_rs(d, 2 * t))
            one = np.int64(1) << recip_shift
            inv = _nb_rdiv(one, max(root, 1)) if root > 0 else np.int64(0)
            sh = recip_shift - frac + t
            for j in range(N):
                out[j] = _nb_rs((N * vr[j] - s1) * inv, sh)

        @numba.njit(nogil=True, cache=True)
        def affine_row(y, g, gsh, b, out, lim):  # one row: y, out (nb, B)
            stamp  # noqa: B018 (the cache key)
            nb, B = y.shape
            for k in range(nb):
                sh = gsh[k]
                for i in range(B):
                    v = min(max(_nb_rs(y[k, i] * g[k, i], sh), -lim), lim)
                    out[k, i] = min(max(v + b[k, i], -lim), lim)

        _nb_layernorm_row, _nb_affine_row = layernorm_row, affine_row

        @numba.njit(nogil=True, cache=True)
        def within(v, bound):  # every |v| <= bound
            R, N = v.shape
            for r in range(R):
                for j in range(N):
                    if abs(v[r, j]) > bound:
                        return False
            return True

        _nb_within = within

        @numba.njit(nogil=True, cache=True)
        def layernorm(v, eps, out, bound, cap, W, recip_shift, frac):
            stamp  # noqa: B018 (the cache key)
            if not _nb_within(v, bound):  # the bound is checked first, as numpy
                return False
            for r in range(v.shape[0]):
                _nb_layernorm_row(v[r], eps[r], out[r], cap, W, recip_shift, frac)
            return True

        @numba.njit(nogil=True, cache=True)
        def affine(y, g, gsh, b, out, lim):
            stamp  # noqa: B018 (the cache key)
            for r in range(y.shape[0]):
                _nb_affine_row(y[r], g, gsh, b, out[r], lim)

        from bct.model import matmul

        _nb_add_term = matmul._add_kernel()[0]
        stamp_aligned = fixed.kernel_stamp(fixed, blocks, matmul)

        @numba.njit(nogil=True, cache=True)
        def layernorm_aligned(mant, exp, sc, eps, cap, W, recip_shift, frac, g, gsh, b, lim,
                              s_out, qmax, e_min, e_max, obits, q, e):
            # add's alignment of one term, layernorm, affine and requantize's row kernel, one
            # row at a time in row buffers (the caller has shown the bound holds)
            stamp_aligned  # noqa: B018 (the cache key)
            R, nk, Bt = mant.shape
            N = nk * Bt
            nb, B = g.shape
            v = np.empty((1, N), dtype=np.int64)
            y = np.empty(N, dtype=np.int64)
            buf = np.empty((1, q.shape[1], q.shape[2]), dtype=np.int64)
            srow = np.full(1, s_out, dtype=np.int64)
            for r in range(R):
                _nb_add_term(mant[r:r + 1], exp[r:r + 1], sc[r:r + 1], v, True)
                _nb_layernorm_row(v[0], eps[r], y, cap, W, recip_shift, frac)
                _nb_affine_row(y.reshape(nb, B), g, gsh, b, buf.reshape(nb, B), lim)
                _nb_requant_rows(buf, srow, q[r:r + 1], e[r:r + 1], qmax, e_min, e_max, obits)

        @numba.njit(nogil=True, cache=True)
        def layernorm_blocks(v, eps, bound, cap, W, recip_shift, frac, g, gsh, b, lim, s_out,
                             qmax, e_min, e_max, obits, q, e):
            # layernorm, affine and requantize's row kernel, one row at a time in row buffers
            stamp  # noqa: B018 (the cache key)
            if not _nb_within(v, bound):
                return False
            R, N = v.shape
            nb, B = g.shape
            y = np.empty(N, dtype=np.int64)
            buf = np.empty((1, q.shape[1], q.shape[2]), dtype=np.int64)
            srow = np.full(1, s_out, dtype=np.int64)
            for r in range(R):
                _nb_layernorm_row(v[r], eps[r], y, cap, W, recip_shift, frac)
                _nb_affine_row(y.reshape(nb, B), g, gsh, b, buf.reshape(nb, B), lim)
                _nb_requant_rows(buf, srow, q[r:r + 1], e[r:r + 1], qmax, e_min, e_max, obits)
            return True

        @numba.njit(nogil=True, cache=True, inline="always")
        def gelu_mant(m, sh, lim, span, lut):  # gelu_fixed of to_fixed of one mantissa
            stamp  # noqa: B018 (the cache key)
            return _nb_gelu_one(min(max(_nb_rs(m, sh), -lim), lim), lim, span, lut)

        _nb_gelu_mant = gelu_mant

        @numba.njit(nogil=True, cache=True)
        def gelu_blocks(mant, exp, frac, bits, hq, lim, span, lut, s_out, qmax, e_min, e_max,
                        obits, q, e):
            stamp  # noqa: B018 (the cache key)
            R, nb, B = mant.shape
            buf = np.empty((1, nb, B), dtype=np.int64)
            srow = np.full(1, s_out, dtype=np.int64)
            # small input mantissas |m| <= hq: gelu_mant memoised for every m and every shift
            # sh <= top (rs(m, sh) == 0 for sh >= top)
            top = _nb_bitlen(hq) + 1
            W = 2 * hq + 1
            T = np.empty((bits + top + 1) * W if hq <= 255 else 0, dtype=np.int64)
            for k in range(T.shape[0] // W if W else 0):
                for m in range(-hq, hq + 1):
                    T[k * W + m + hq] = _nb_gelu_mant(np.int64(m), k - bits, lim, span, lut)
            for r in range(R):
                for j in range(nb):
                    sh = max(-(exp[r, j] + frac), -bits)  # to_fixed
                    mj, bj = mant[r, j], buf[0, j]
                    big = np.int64(0)
                    if T.shape[0]:
                        for i in range(B):
                            big = max(big, abs(mj[i]))
                    if T.shape[0] and big <= hq:
                        base = (min(sh, top) + bits) * W + hq
                        for i in range(B):
                            bj[i] = T[base + mj[i]]
                    else:
                        for i in range(B):
                            bj[i] = _nb_gelu_mant(mj[i], sh, lim, span, lut)
                _nb_requant_rows(buf, srow, q[r:r + 1], e[r:r + 1], qmax, e_min, e_max, obits)

        @numba.njit(nogil=True, cache=True)
        def gelu_acc_rows(v, s, bits, lim, span, lut, s_out, qmax, e_min, e_max, obits, q, e):
            stamp  # noqa: B018 (the cache key)
            R, nb, B = v.shape
            buf = np.empty((1, nb, B), dtype=np.int64)
            srow = np.full(1, s_out, dtype=np.int64)
            for r in range(R):
                sr = s[r]
                kk = min(max(-sr, 0), bits)  # fixed_to_frac
                room = lim >> kk
                for j in range(nb):
                    for i in range(B):
                        o = _nb_to_frac_one(v[r, j, i], sr, kk, room, lim)
                        buf[0, j, i] = _nb_gelu_one(o, lim, span, lut)
                _nb_requant_rows(buf, srow, q[r:r + 1], e[r:r + 1], qmax, e_min, e_max, obits)

        @numba.njit(nogil=True, cache=True)
        def softmax_blocks(mant, exp, m, step, frac, bits, lim, log2e, l2frac, lut, recip_num,
                           recip_shift, s_out, qmax, e_min, e_max, obits, q, e):
            stamp  # noqa: B018 (the cache key)
            R, nb, B = mant.shape
            x = np.empty(nb * B, dtype=np.int64)
            scratch = np.empty(nb * B, dtype=np.int64)
            buf = np.empty((1, nb, B), dtype=np.int64)
            probs = buf.reshape(nb * B)
            srow = np.full(1, s_out, dtype=np.int64)
            for r in range(R):
                for j in range(nb):  # to_fixed, saturated as softmax_fixed does
                    sh = max(-(exp[r, j] + frac), -bits)
                    for i in range(B):
                        x[j * B + i] = min(max(_nb_rs(mant[r, j, i], sh), -lim), lim)
                _nb_softmax_row(x, m[r * step], scratch, probs, log2e, l2frac, frac, lut,
                                recip_num, recip_shift)
                _nb_requant_rows(buf, srow, q[r:r + 1], e[r:r + 1], qmax, e_min, e_max, obits)

        _KERNELS = SimpleNamespace(gelu=gelu, to_frac=to_frac, softmax=softmax,
                                   layernorm=layernorm, affine=affine, gelu_blocks=gelu_blocks,
                                   layernorm_blocks=layernorm_blocks,
                                   layernorm_aligned=layernorm_aligned,
                                   gelu_acc_rows=gelu_acc_rows,
                                   softmax_blocks=softmax_blocks)
    return _KERNELS
