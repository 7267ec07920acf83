"""Packing of signed integer arrays into flat payload bit vectors.

Amaranth flattens a ``data.ArrayLayout(signed(w), n)`` payload into one
``n * w``-bit port with element ``i`` at bits ``[i*w, (i+1)*w)``; these helpers
convert between that integer and a list of Python ints.
"""

from collections.abc import Iterable


def pack_signed(values: Iterable[int], width: int) -> int:
    """Pack signed integers into one unsigned bit vector.

    Parameters
    ----------
    values : iterable of int
        Elements; element ``i`` goes to bits ``[i*width, (i+1)*width)``.
    width : int
        Bit width of each element (two's complement).

    Returns
    -------
    int
        The non-negative packed value.

    Raises
    ------
    ValueError
        If an element does not fit in ``width`` signed bits.
    """
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    mask = (1 << width) - 1
    word = 0
    for i, value in enumerate(values):
        if not lo <= value <= hi:
            raise ValueError(f"element {i} = {value} does not fit in signed({width})")
        word |= (value & mask) << (i * width)
    return word


def unpack_signed(word: int, width: int, count: int) -> list[int]:
    """Unpack a bit vector into signed integers (inverse of `pack_signed`).

    Parameters
    ----------
    word : int
        Packed non-negative value (e.g. ``handle.value.to_unsigned()``).
    width : int
        Bit width of each element.
    count : int
        Number of elements.

    Returns
    -------
    list of int
        Elements in two's complement interpretation.
    """
    mask = (1 << width) - 1
    sign = 1 << (width - 1)
    out = []
    for i in range(count):
        field = (word >> (i * width)) & mask
        out.append(field - (1 << width) if field & sign else field)
    return out


def wrap_signed(value: int, width: int) -> int:
    """Wrap an integer to ``width`` bits, two's complement (like HDL truncation).

    Parameters
    ----------
    value : int
        Any integer.
    width : int
        Target bit width.

    Returns
    -------
    int
        ``value`` modulo ``2**width``, reinterpreted as signed.
    """
    return unpack_signed(value, width, 1)[0]


def pack_block(mant: Iterable[int], exp: int, bits: int, exp_bits: int) -> int:
    """One block as the payload integer of :func:`bct.hw.layouts.block_layout`: the mantissas
    (``bits`` wide each) from bit 0, the exponent (``exp_bits`` wide) above them."""
    mant = list(mant)
    return pack_signed(mant, bits) | (pack_signed([exp], exp_bits) << (bits * len(mant)))


def unpack_block(word: int, bits: int, exp_bits: int, block: int) -> tuple[list[int], int]:
    """Inverse of :func:`pack_block`: ``(mantissas, exponent)``."""
    mant = unpack_signed(word, bits, block)
    (exp,) = unpack_signed(word >> (bits * block), exp_bits, 1)
    return mant, exp
