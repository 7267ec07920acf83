"""Every constant of the integer units, derived from a :class:`bct.config.Config` in one place.

The software model (:mod:`bct.model.nonlinear`) and the hardware generators read the tables and
numbers from :func:`derive`; nothing is typed twice. Floats appear only here, at build time, to
compute the tables; inference never touches them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from bct.config import Config
from bct.model.fixed import round_shift_int

__all__ = ["Constants", "derive", "ln_eps_units", "GELU_TABLE_GUARD", "LOG2E_FRAC", "LN_D_CAP"]

#: Extra fraction bits of the GELU correction table and its interpolation, below ``gelu_frac``.
GELU_TABLE_GUARD = 4
#: Fraction bits of the fixed-point ``log2(e)`` multiplier of the softmax unit.
LOG2E_FRAC = 16
#: Cap of LayerNorm's ``N * sum(x^2) - sum(x)^2 + eps'`` (keeps the epsilon term in int64).
LN_D_CAP = 1 << 60


def _round_half_away(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def _gelu_correction(a: float) -> float:
    """``h(a) = a * Phi(-a)``, so that ``GELU(x) = max(x, 0) - h(|x|)``."""
    return a * 0.5 * math.erfc(a / math.sqrt(2.0))


@dataclass(frozen=True)
class Constants:
    """The integer constants of the GELU, softmax and LayerNorm units.

    Attributes
    ----------
    gelu_table : tuple of int
        ``gelu_segments + 1`` samples of ``h(a) = a * Phi(-a)`` at ``a = i * range / segments``,
        with ``gelu_table_frac`` fraction bits.
    gelu_table_frac : int
    gelu_seg_shift : int
        ``log2`` of the segment width in input LSBs: ``index = |x| >> gelu_seg_shift``.
    log2e : int
        ``round(log2(e) * 2**LOG2E_FRAC)``.
    exp2_lut : tuple of int
        ``round(2**(-r / 2**softmax_frac) * 2**softmax_exp_frac)`` for ``r`` in
        ``0 .. 2**softmax_frac - 1``.
    recip_shift : int
        The softmax reciprocal is ``round(2**(recip_shift + softmax_out_frac) / sum)`` and each
        probability ``round_shift(e * recip, recip_shift)``.
    ln_recip_shift : int
        ``Q``: the LayerNorm reciprocal root is ``round(2**Q / r)``.
    eps_mant, eps_exp : int
        ``ln_eps == eps_mant * 2**eps_exp`` exactly.
    """

    gelu_table: tuple
    gelu_table_frac: int
    gelu_seg_shift: int
    log2e: int
    exp2_lut: tuple
    recip_shift: int
    ln_recip_shift: int
    eps_mant: int
    eps_exp: int


@lru_cache(maxsize=64)
def derive(cfg: Config) -> Constants:
    """Derive (and cache) the constants of ``cfg``."""
    table_frac = cfg.gelu_frac + GELU_TABLE_GUARD
    step = cfg.gelu_table_range / cfg.gelu_segments
    table = tuple(
        _round_half_away(_gelu_correction(i * step) * 2.0**table_frac)
        for i in range(cfg.gelu_segments + 1)
    )
    seg_shift = cfg.gelu_frac + cfg.gelu_table_range.bit_length() - cfg.gelu_segments.bit_length()
    exp2_lut = tuple(
        _round_half_away(2.0 ** (-r / (1 << cfg.softmax_frac)) * (1 << cfg.softmax_exp_frac))
        for r in range(1 << cfg.softmax_frac)
    )
    eps_frac, eps_e = math.frexp(cfg.ln_eps)
    eps_mant = int(eps_frac * (1 << 53))
    eps_exp = eps_e - 53
    while eps_mant and not eps_mant & 1:
        eps_mant >>= 1
        eps_exp += 1
    assert eps_mant * 2.0**eps_exp == cfg.ln_eps
    return Constants(
        gelu_table=table,
        gelu_table_frac=table_frac,
        gelu_seg_shift=seg_shift,
        log2e=_round_half_away(math.log2(math.e) * (1 << LOG2E_FRAC)),
        exp2_lut=exp2_lut,
        recip_shift=cfg.softmax_exp_frac + cfg.softmax_recip_bits,
        ln_recip_shift=2 * cfg.ln_sqrt_bits,
        eps_mant=eps_mant,
        eps_exp=eps_exp,
    )


def ln_eps_units(consts: Constants, n: int, scale: int, cap: int) -> int:
    """``round(eps * n**2 * 2**(-2*scale))``, the epsilon in units of ``N * sum(x^2) - sum(x)^2``
    for inputs with power-of-two ``scale``, capped at ``cap``."""
    v = round_shift_int(consts.eps_mant * n * n, 2 * scale - consts.eps_exp)
    return min(v, cap)
