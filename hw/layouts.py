"""Payload layouts shared by the hardware units, derived from the config's block formats.

A block travels as one stream payload: ``B`` signed mantissas and the shared exponent
(:func:`block_layout`). The software view of the same payload integer is
:func:`bct.sim.bits.pack_block` / :func:`bct.sim.bits.unpack_block`.
"""

from __future__ import annotations

from amaranth import signed
from amaranth.lib import data

from bct.config import BlockFormat

__all__ = ["block_layout"]


def block_layout(fmt: BlockFormat) -> data.StructLayout:
    """``{"mant": ArrayLayout(signed(bits), block), "exp": signed(exp_bits)}``: mantissa ``i``
    at bits ``[i*bits, (i+1)*bits)``, the exponent above them (Amaranth's field order)."""
    return data.StructLayout(
        {"mant": data.ArrayLayout(signed(fmt.bits), fmt.block), "exp": signed(fmt.exp_bits)}
    )
