"""Output-stationary processing-element array for the blockwise matmul (docs/arithmetic.md, 3).

:class:`MatmulArray` computes one ``R x C`` output tile ``acc[m0:m0+R, n0:n0+C]`` of
:func:`bct.model.matmul.matmul` over the whole reduction K, bit for bit. Each PE ``(r, c)`` owns
one output: per cycle it multiplies one activation ``qx[m0+r, k]`` by one operand
``qw[n0+c, k]`` into the block product ``P`` (``Config.block_product_bits``); at the end of every
K-block it adds ``round_shift(P, dx[m] + dw[n])`` into its accumulator (``Config.acc_bits``).
The bias term is added per output row while the finished tile drains, one row of ``C``
accumulators per beat, overlapped with the next tile's computation (docs/hardware.md,
"Matmul array").

The host (a test driver or the controller) derives the shift fields from the block exponents
with :func:`shifts` and packs the beats of a tile with :func:`tile_payloads`; both reuse the
model's definitions of the row scale and of the weight-block expansion.

All shifts travel offset by the guard bits ``G`` so that they are non-negative: the PE
computes ``round_shift(P * 2**G, u)`` with ``u = s + G >= 0``, which equals
``round_shift(P, s)`` for every ``s >= -G``. A shift ``u >= block_product_bits + G`` rounds every
block product to 0, so the host clamps each part to that value (:attr:`MatmulArray.shift_max`).

Lint: ``verilator --lint-only -Wall`` reports nothing but waived Amaranth / Yosys output style:
``WIDTH`` (operands narrower than their context), ``PROCASSINIT`` (registers declared with their
reset value) and ``UNUSEDSIGNAL`` on Yosys' ``$`` temporaries (deliberately truncated
intermediates) and on Amaranth's per-field alias wires; ``tests/test_hw_matmul.py::test_lint``
holds the waivers and runs the check.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from bct.config import Config
from bct.model.blocks import BlockTensor
from bct.model.matmul import act_blocks, check_operands, row_scale

__all__ = ["MatmulArray", "Shifts", "shifts", "tile_payloads"]


def round_shift_hw(v, u):
    """RHAZ ``round_shift(v, u)`` of a signed value by an unsigned amount, as Amaranth logic.

    ``(((2 v - (v < 0)) >>> u) + 1) >>> 1``: one arithmetic barrel shift and one incrementer.
    It equals ``(v + 2**(u-1) - (v < 0)) >>> u`` for ``u > 0`` and ``v`` for ``u = 0``, and is
    exact for every ``u`` (a shift past the width leaves the sign, which rounds to 0).
    """
    return ((((v << 1) - (v < 0)) >> u) + 1) >> 1


class Shifts(NamedTuple):
    """Host-side shift fields of one blockwise matmul (all non-negative, clamped).

    Attributes
    ----------
    scale : numpy.ndarray, (M,)
        The model's row scale (``Fixed.scale`` of :func:`bct.model.matmul.matmul`).
    act : numpy.ndarray, (M, K // B)
        ``dx[m, j] + G = scale[m] - ex[m, j] - max(ew) + G``, clamped to ``shift_max``.
    weight : numpy.ndarray, (N, K // B)
        ``dw[n, j] = max(ew) - ew[n, j]`` per K-block (weight blocks expanded), clamped.
    bias_row : numpy.ndarray, (M,)
        ``scale[m] - max(eb) + G``, clamped to ``bias_shift_max`` (0 without bias).
    bias_col : numpy.ndarray, (N,)
        ``max(eb) - eb[n]``, clamped to ``bias_shift_max`` (0 without bias).
    """

    scale: np.ndarray
    act: np.ndarray
    weight: np.ndarray
    bias_row: np.ndarray
    bias_col: np.ndarray


def shifts(x: BlockTensor, w: BlockTensor, cfg: Config, bias: BlockTensor | None = None) -> Shifts:
    """Shift fields of ``x @ w.T (+ bias)`` for :class:`MatmulArray` (see :class:`Shifts`).

    Parameters
    ----------
    x, w, bias, cfg
        As for :func:`bct.model.matmul.matmul`, 2-D: whole matrices (the scale of a row depends
        on every weight exponent, not only those of one tile).

    Returns
    -------
    Shifts
        The block term of ``(m, n, j)`` is ``round_shift(P * 2**G, act[m, j] + weight[n, j])``
        and the bias term ``round_shift(qb[n] * 2**G, bias_row[m] + bias_col[n])``.
    """
    check_operands(x, w, bias, cfg)
    if x.mant.ndim != 2:
        raise ValueError(f"shifts takes 2-D operands (one per batch element), not {x.shape}")
    G = cfg.acc_guard_bits
    limit, bias_limit = MatmulArray.limits(cfg)
    scale = row_scale(x, w, bias, cfg)
    ew_max = w.exp.max()
    act = np.minimum(scale[:, None] - x.exp - ew_max + G, limit)
    weight = np.minimum(ew_max - act_blocks(w, cfg.block_size)[1], limit)
    if bias is None:
        bias_row = np.zeros_like(scale)
        bias_col = np.zeros(w.shape[0], dtype=np.int64)
    else:
        eb_max = bias.exp.max()
        bias_row = np.minimum(scale - eb_max + G, bias_limit)
        bias_col = np.minimum(eb_max - bias.block_exp(), bias_limit)
    return Shifts(scale, act, weight, bias_row, bias_col)


class MatmulArray(wiring.Component):
    """``R x C`` output-stationary array computing one tile of the blockwise matmul.

    A tile is streamed as ``K`` beat pairs (one K-element per cycle: ``R`` activations and
    ``C`` operands, with the K-block's shift fields repeated on every beat of the block, and
    ``last`` on the final beat) plus one bias beat; it comes out as ``R`` beats of ``C``
    accumulators, rows in order, equal to ``matmul(x, w, cfg, bias).value`` of the tile.
    ``K`` must be a multiple of ``B = cfg.block_size``. Tiles follow each other back to back.

    Latency: the first row of a tile is valid 3 cycles after the transfer of its last beat
    (input register, MAC, shift-accumulate). Back-to-back tiles of reduction ``K`` keep every
    PE busy on every cycle when ``K >= R`` (the drain of ``R`` rows hides under the next tile);
    in general the steady-state utilisation is ``K / max(K, R)``.

    Parameters
    ----------
    cfg : Config
        ``array_rows`` (R), ``array_cols`` (C), the block formats and derived widths.

    Attributes
    ----------
    act : stream.Interface, in
        ``{"x": R x signed(act_bits), "shift": R x unsigned, "last": 1}``: column ``k`` of the
        tile's activations, ``Shifts.act`` of its K-block, end-of-tile flag.
    weight : stream.Interface, in
        ``{"w": C x signed(operand bits), "shift": C x unsigned}``: column ``k`` of the tile's
        second operand (weights, or activations for ``Q K^T``), ``Shifts.weight`` of its block.
    bias : stream.Interface, in
        ``{"b": C x signed(vector_bits), "col_shift": C x unsigned, "row_shift": R x unsigned}``,
        one beat per tile (zeros without bias).
    out : stream.Interface, out
        ``C x signed(acc_bits)``: one output row per beat.
    shift_max : int
        ``block_product_bits + G``: a block shift this large gives 0 (the clamp of the fields).
    bias_shift_max : int
        ``vector_bits + G``: the same for the bias term.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.shift_max, self.bias_shift_max = self.limits(cfg)
        R, C = cfg.array_rows, cfg.array_cols
        operand_bits = max(cfg.weight_format.bits, cfg.act_format.bits)
        super().__init__({
            "act": In(stream.Signature(data.StructLayout({
                "x": data.ArrayLayout(signed(cfg.act_format.bits), R),
                "shift": data.ArrayLayout(unsigned(self.shift_max.bit_length()), R),
                "last": 1,
            }))),
            "weight": In(stream.Signature(data.StructLayout({
                "w": data.ArrayLayout(signed(operand_bits), C),
                "shift": data.ArrayLayout(unsigned(self.shift_max.bit_length()), C),
            }))),
            "bias": In(stream.Signature(data.StructLayout({
                "b": data.ArrayLayout(signed(cfg.vector_format.bits), C),
                "col_shift": data.ArrayLayout(unsigned(self.bias_shift_max.bit_length()), C),
                "row_shift": data.ArrayLayout(unsigned(self.bias_shift_max.bit_length()), R),
            }))),
            "out": Out(stream.Signature(data.ArrayLayout(signed(cfg.acc_bits), C))),
        })

    @staticmethod
    def limits(cfg: Config) -> tuple[int, int]:
        """``(shift_max, bias_shift_max)``: the offset shifts at which a block product
        (``|P| < 2**(block_product_bits - 1)``) or a bias (``|qb| < 2**(vector_bits - 1)``)
        rounds to 0."""
        G = cfg.acc_guard_bits
        return cfg.block_product_bits + G, cfg.vector_format.bits + G

    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        R, C, B, G = cfg.array_rows, cfg.array_cols, cfg.block_size, cfg.acc_guard_bits

        # Global pipeline enable: everything advances unless a finished tile waits for the
        # drain registers. The two operand streams are joined (ready needs the other's valid).
        en = Signal()
        m.d.comb += [self.act.ready.eq(en & self.weight.valid),
                     self.weight.ready.eq(en & self.act.valid)]
        take = en & self.act.valid & self.weight.valid

        # Stage 0: input registers (broadcast along rows / columns from here).
        s0_valid = Signal()
        s0_act = Signal.like(self.act.payload)
        s0_wgt = Signal.like(self.weight.payload)
        s0_first = Signal()  # first beat of a K-block
        s0_block_last = Signal()
        kpos = Signal(range(B))  # position inside the K-block (B is a power of two: wraps)
        with m.If(en):
            m.d.sync += s0_valid.eq(take)
            with m.If(take):
                m.d.sync += [s0_act.eq(self.act.payload), s0_wgt.eq(self.weight.payload),
                             s0_first.eq(kpos == 0), s0_block_last.eq(kpos == B - 1),
                             kpos.eq(kpos + 1)]

        # Stage 1: multiply-accumulate the block products; the shifts of a finished block
        # move on with it.
        prod = [[Signal(signed(cfg.block_product_bits), name=f"p_{r}_{c}") for c in range(C)]
                for r in range(R)]
        s1_done = Signal()  # prod holds a finished K-block
        s1_tile_last = Signal()
        s1_ashift = Signal.like(s0_act.shift)
        s1_wshift = Signal.like(s0_wgt.shift)
        with m.If(en):
            m.d.sync += s1_done.eq(s0_valid & s0_block_last)
            with m.If(s0_valid):
                for r in range(R):
                    for c in range(C):
                        m.d.sync += prod[r][c].eq(
                            Mux(s0_first, 0, prod[r][c]) + s0_act.x[r] * s0_wgt.w[c])
                with m.If(s0_block_last):
                    m.d.sync += [s1_ashift.eq(s0_act.shift), s1_wshift.eq(s0_wgt.shift),
                                 s1_tile_last.eq(s0_act.last)]

        # Stage 2: align each finished block into the accumulator; a finished tile is
        # copied into the drain registers.
        acc = [[Signal(signed(cfg.acc_bits), name=f"acc_{r}_{c}") for c in range(C)]
               for r in range(R)]
        drain = [[Signal(signed(cfg.acc_bits), name=f"drain_{r}_{c}") for c in range(C)]
                 for r in range(R)]
        tile_first = Signal(init=1)
        full = Signal()  # the drain registers hold a tile
        row = Signal(range(R))
        bias_full = Signal()
        b_val = Signal.like(self.bias.payload.b)
        b_col = Signal.like(self.bias.payload.col_shift)
        b_row = Signal.like(self.bias.payload.row_shift)

        pop = self.out.valid & self.out.ready
        pop_last = pop & (row == R - 1)
        drain_free = ~full | pop_last
        finish = s1_done & s1_tile_last
        m.d.comb += en.eq(~finish | drain_free)

        # Drain: rows leave from row 0 (the registers shift up), the bias term added per row.
        m.d.comb += self.out.valid.eq(full & bias_full)
        for c in range(C):
            u = Signal(range(2 * self.bias_shift_max + 1), name=f"ub_{c}")
            m.d.comb += [u.eq(b_row[0] + b_col[c]),
                         self.out.payload[c].eq(drain[0][c] + round_shift_hw(b_val[c] << G, u))]
        with m.If(pop):
            m.d.sync += row.eq(Mux(row == R - 1, 0, row + 1))
            for r in range(R - 1):
                m.d.sync += b_row[r].eq(b_row[r + 1])
                for c in range(C):
                    m.d.sync += drain[r][c].eq(drain[r + 1][c])
            with m.If(row == R - 1):
                m.d.sync += [full.eq(0), bias_full.eq(0)]
        with m.If(en & s1_done):
            m.d.sync += tile_first.eq(s1_tile_last)
            for r in range(R):
                for c in range(C):
                    u = Signal(range(2 * self.shift_max + 1), name=f"u_{r}_{c}")
                    m.d.comb += u.eq(s1_ashift[r] + s1_wshift[c])
                    total = Mux(tile_first, 0, acc[r][c]) + round_shift_hw(prod[r][c] << G, u)
                    m.d.sync += acc[r][c].eq(total)
                    with m.If(s1_tile_last):
                        m.d.sync += drain[r][c].eq(total)

        with m.If(en & finish):
            m.d.sync += full.eq(1)

        m.d.comb += self.bias.ready.eq(~bias_full | pop_last)
        with m.If(self.bias.valid & self.bias.ready):
            m.d.sync += [bias_full.eq(1), b_val.eq(self.bias.payload.b),
                         b_col.eq(self.bias.payload.col_shift),
                         b_row.eq(self.bias.payload.row_shift)]
        return m


def tile_payloads(array: MatmulArray, x: BlockTensor, w: BlockTensor, sh: Shifts,
                  m0: int, n0: int, bias: BlockTensor | None = None
                  ) -> tuple[list[int], list[int], int]:
    """Payload integers of one tile: ``(act beats, weight beats, bias beat)``.

    Parameters
    ----------
    array : MatmulArray
        Gives the payload layouts.
    x, w, bias : BlockTensor
        The whole operands (as given to :func:`shifts`).
    sh : Shifts
        ``shifts(x, w, array.cfg, bias)``.
    m0, n0 : int
        Tile origin; the tile must lie inside the output.

    Returns
    -------
    tuple
        ``K`` activation payloads, ``K`` weight payloads and one bias payload.
    """
    cfg = array.cfg
    R, C, B = cfg.array_rows, cfg.array_cols, cfg.block_size
    M, N = x.shape[0], w.shape[0]
    if not (0 <= m0 <= M - R and 0 <= n0 <= N - C):
        raise ValueError(f"tile ({m0}, {n0}) of {R}x{C} does not fit the {M}x{N} output")
    rows, cols = slice(m0, m0 + R), slice(n0, n0 + C)
    K = x.shape[1]
    act_layout = array.act.payload.shape()
    wgt_layout = array.weight.payload.shape()
    xt, wt = x.mant[rows].T.tolist(), w.mant[cols].T.tolist()
    xs, ws = sh.act[rows].T.tolist(), sh.weight[cols].T.tolist()
    act = [act_layout.const({"x": xt[k], "shift": xs[k // B], "last": k == K - 1})
           .as_value().value for k in range(K)]
    wgt = [wgt_layout.const({"w": wt[k], "shift": ws[k // B]}).as_value().value
           for k in range(K)]
    b = [0] * C if bias is None else bias.mant[cols].tolist()
    bias_word = array.bias.payload.shape().const({
        "b": b, "col_shift": sh.bias_col[cols].tolist(), "row_shift": sh.bias_row[rows].tolist(),
    }).as_value().value
    return act, wgt, bias_word
