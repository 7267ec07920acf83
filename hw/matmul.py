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
from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from bct.config import Config
from bct.hw import REPLICA_ATTR
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

    Latency: the first row of a tile is valid :attr:`latency` (17) cycles after the transfer of
    its last beat (input register, per-PE operand copies, operand and product registers, a
    fabric copy of the product, block accumulate, four
    rounding-shift stages, accumulate, five output stages, FIFO); every stage is register to
    register (the measured Fmax is in docs/synthesis.md). Back-to-back tiles of reduction ``K``
    keep every PE busy on every cycle when ``K >= R`` (the drain of ``R`` rows hides under the
    next tile); in general the steady-state utilisation is ``K / max(K, R)``. The output
    side runs on credits (:attr:`out_depth` rows in flight behind the drain registers), so
    ``out.ready`` never reaches the array's pipeline enable.

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
        #: Depth of the output FIFO; also the number of output rows in flight after the drain
        #: registers (credits): a row's credit is back 8 cycles after it left, so 10 keep one
        #: row per cycle flowing, and R let a whole tile drain at once.
        self.out_depth = self.output_depth(cfg)
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
    def output_depth(cfg: Config) -> int:
        """Rows of the output FIFO (:attr:`out_depth`): ``max(10, R)``."""
        return max(10, cfg.array_rows)

    @staticmethod
    def limits(cfg: Config) -> tuple[int, int]:
        """``(shift_max, bias_shift_max)``: the offset shifts at which a block product
        (``|P| < 2**(block_product_bits - 1)``) or a bias (``|qb| < 2**(vector_bits - 1)``)
        rounds to 0."""
        G = cfg.acc_guard_bits
        return cfg.block_product_bits + G, cfg.vector_format.bits + G

    #: Register stages from the last ``act``/``weight`` transfer of a tile to its first output
    #: row: input, per-PE operand copies, operands, product, product copy in the fabric, block
    #: accumulate, rounding shift (operand, coarse, fine,
    #: round), accumulate (and drain copy), bias shift amount, coarse, fine and rounded bias
    #: term, sum, output FIFO.
    latency = 17

    #: Cycles from admitting a tile's last beat until the drain registers can take another
    #: finish, minus ``R`` (its ``R`` rows pop one per cycle): 10 to the accumulators, 1 to
    #: the first pop. Tiles' last beats are thus at least ``R + admit_gap`` cycles apart
    #: (``bct.estimate.matmul_run_cycles``), which only binds when ``K < R + admit_gap``.
    admit_gap = 11


    def elaborate(self, platform):
        m = Module()
        cfg = self.cfg
        R, C, B, G = cfg.array_rows, cfg.array_cols, cfg.block_size, cfg.acc_guard_bits
        operand_bits = max(cfg.weight_format.bits, cfg.act_format.bits)

        # No pipeline enable: every PE register advances every cycle (a valid flag travels
        # with the data), so no control net fans out to the thousands of PE flip-flops. The
        # only stall is at the input: a tile's last beat is taken only when its finish will
        # find the drain registers free, i.e. when they are empty now and no other tile's
        # finish is in flight (``inflight``); nothing else can fill them before it arrives.
        # The two operand streams are joined (ready needs the other's valid).
        # Data registers are ``reset_less`` (their contents matter only under a valid flag),
        # so the reset reaches only the flags, the control state and the accumulators.
        full = Signal()  # the drain registers hold a tile
        inflight = Signal()  # a taken last beat has not reached the accumulators yet
        admit = ~self.act.payload.last | (~inflight & ~full)
        m.d.comb += [self.act.ready.eq(admit & self.weight.valid),
                     self.weight.ready.eq(admit & self.act.valid)]
        take = admit & self.act.valid & self.weight.valid
        replica = {REPLICA_ATTR: 1}  # see "Control fan-out" below

        # Input registers (si). They sample the payloads on every cycle (no enable: ``take``,
        # which depends on the input valids, reaches only a few flags); ``si_valid`` says when
        # they hold a beat. The product
        # register of a cycle without a beat is cleared (a per-PE copy of the bubble flag at
        # its synchronous reset), so the block product adds 0 and needs no enable either.
        si_valid = Signal()
        si_act = Signal.like(self.act.payload, reset_less=True)
        si_wgt = Signal.like(self.weight.payload, reset_less=True)
        si_first = Signal()  # first beat of a K-block
        si_block_last = Signal()
        kpos = Signal(range(B))  # position inside the K-block (B is a power of two: wraps)
        m.d.sync += [si_valid.eq(take), si_first.eq(take & (kpos == 0)),
                     si_block_last.eq(take & (kpos == B - 1)),
                     si_act.eq(self.act.payload), si_wgt.eq(self.weight.payload)]
        with m.If(take):
            m.d.sync += kpos.eq(kpos + 1)
        # Stage 0: each PE's own copy of its row's activation and its column's operand (an
        # input register drove every DSP block of its row or column: nets of C or R loads
        # across the die); the flags and shift fields move along with them (the operand
        # fields of s0_act / s0_wgt are not read, synthesis drops them).
        s0_valid, s0_first, s0_block_last = Signal(), Signal(), Signal()
        s0_act = Signal.like(self.act.payload, reset_less=True)
        s0_wgt = Signal.like(self.weight.payload, reset_less=True)
        m.d.sync += [s0_valid.eq(si_valid), s0_first.eq(si_first),
                     s0_block_last.eq(si_block_last), s0_act.eq(si_act), s0_wgt.eq(si_wgt)]
        x_pe = [[Signal.like(si_act.x[r], name=f"xo_{r}_{c}", reset_less=True, attrs=replica)
                 for c in range(C)] for r in range(R)]
        w_pe = [[Signal.like(si_wgt.w[c], name=f"wo_{r}_{c}", reset_less=True, attrs=replica)
                 for c in range(C)] for r in range(R)]
        m.d.sync += [x_pe[r][c].eq(si_act.x[r]) for r in range(R) for c in range(C)]
        m.d.sync += [w_pe[r][c].eq(si_wgt.w[c]) for r in range(R) for c in range(C)]

        # Control fan-out: a flag that reaches a PE's data registers comes from that PE's own
        # copy at the end of a two-level register tree (one copy per row, then one per PE), so
        # no flag net drives more than one PE's flip-flops (tens of loads, not thousands). The
        # copies carry REPLICA_ATTR so that synthesis keeps them apart (bct.synth).

        def spread(flag, name, init=0):
            """Per-PE copies of ``flag``, two cycles later."""
            rows = [Signal(name=f"{name}_r{r}", attrs=replica, init=init) for r in range(R)]
            pes = [[Signal(name=f"{name}_{r}_{c}", attrs=replica, init=init) for c in range(C)]
                   for r in range(R)]
            for r in range(R):
                m.d.sync += rows[r].eq(flag)
                m.d.sync += [pes[r][c].eq(rows[r]) for c in range(C)]
            return pes

        # Stage 1: one product per PE, two register stages (operands, product): one DSP block
        # with its input and output registers, the product register cleared (synchronous
        # reset) when the operands came from a bubble. A synthesis platform may provide
        # ``registered_multiplier(m, a, b, out, en, clear)`` (called with ``en = 1``) that
        # instantiates the device's DSP primitive with exactly these two registers (bct.synth
        # does for ECP5, whose Yosys flow does not pack registers into MULT18X18D); otherwise
        # it is inferred.
        mul = [[Signal(signed(cfg.act_format.bits + operand_bits), name=f"mul_{r}_{c}",
                       reset_less=True) for c in range(C)] for r in range(R)]
        hook = getattr(platform, "registered_multiplier", None)
        sm_valid, sm_block_last, sm_last = Signal(), Signal(), Signal()
        sm_ashift = Signal.like(s0_act.shift, reset_less=True)
        sm_wshift = Signal.like(s0_wgt.shift, reset_less=True)
        m.d.sync += [sm_valid.eq(s0_valid), sm_block_last.eq(s0_block_last)]
        with m.If(s0_valid):
            m.d.sync += [sm_last.eq(s0_act.last), sm_ashift.eq(s0_act.shift),
                         sm_wshift.eq(s0_wgt.shift)]
        bubble_pe = spread(~si_valid, "bubble", init=1)  # the operand registers hold a bubble
        for r in range(R):
            for c in range(C):
                if hook is not None:
                    hook(m, x_pe[r][c], w_pe[r][c], mul[r][c], 1, bubble_pe[r][c])
                    continue
                xa = Signal(x_pe[r][c].shape(), name=f"xa_{r}_{c}", reset_less=True)
                wb = Signal(w_pe[r][c].shape(), name=f"wb_{r}_{c}", reset_less=True)
                m.d.sync += [xa.eq(x_pe[r][c]), wb.eq(w_pe[r][c]),
                             mul[r][c].eq(Mux(bubble_pe[r][c], 0, xa * wb))]
        # Stage 1b: a fabric register after each product (``muld``), so that the route from
        # the DSP block to the PE's adder is a register-to-register path of its own.
        muld = [[Signal.like(mul[r][c], name=f"muld_{r}_{c}", reset_less=True) for c in range(C)]
                for r in range(R)]
        m.d.sync += [muld[r][c].eq(mul[r][c]) for r in range(R) for c in range(C)]
        sd_valid, sd_block_last, sd_last = Signal(), Signal(), Signal()
        sd_ashift = Signal.like(s0_act.shift, reset_less=True)
        sd_wshift = Signal.like(s0_wgt.shift, reset_less=True)
        m.d.sync += [sd_valid.eq(sm_valid), sd_block_last.eq(sm_block_last)]
        with m.If(sm_valid):
            m.d.sync += [sd_last.eq(sm_last), sd_ashift.eq(sm_ashift), sd_wshift.eq(sm_wshift)]
        s1_block_last, s1_last = Signal(), Signal()
        m.d.sync += s1_block_last.eq(sd_block_last)
        with m.If(sd_valid):
            m.d.sync += s1_last.eq(sd_last)
        # Stage 1's shift fields as per-PE copies (the row's activation shift and the column's
        # weight shift), so each PE's shift adder reads flip-flops of its own. sd_* load under
        # sm_valid, which sd_valid copies, so a plain copy equals a copy under sd_valid.
        s1_ashift = [[Signal.like(sd_ashift[r], name=f"ash_{r}_{c}", reset_less=True,
                                  attrs=replica) for c in range(C)] for r in range(R)]
        s1_wshift = [[Signal.like(sd_wshift[c], name=f"wsh_{r}_{c}", reset_less=True,
                                  attrs=replica) for c in range(C)] for r in range(R)]
        m.d.sync += [s1_ashift[r][c].eq(sd_ashift[r]) for r in range(R) for c in range(C)]
        m.d.sync += [s1_wshift[r][c].eq(sd_wshift[c]) for r in range(R) for c in range(C)]

        # Stage 2: accumulate the block product P; at the block's end, each PE's total shift.
        W = cfg.block_product_bits + G + 1  # width of (P << G+1) - (P < 0)
        prod = [[Signal(signed(cfg.block_product_bits), name=f"p_{r}_{c}", reset_less=True)
                 for c in range(C)] for r in range(R)]
        ushift = [[Signal(range(2 * self.shift_max + 1), name=f"u_{r}_{c}", reset_less=True)
                   for c in range(C)] for r in range(R)]
        s2_done, s2_last = Signal(), Signal()  # prod holds a finished K-block
        m.d.sync += s2_done.eq(s1_block_last)
        sm_first = Signal()
        m.d.sync += sm_first.eq(s0_first)
        first_pe = spread(sm_first, "first")  # the block's first product is in muld
        block_last_pe = spread(sm_block_last, "blast")  # = s1_block_last, per PE
        for r in range(R):
            for c in range(C):
                m.d.sync += prod[r][c].eq(Mux(first_pe[r][c], 0, prod[r][c]) + muld[r][c])
                with m.If(block_last_pe[r][c]):
                    m.d.sync += ushift[r][c].eq(s1_ashift[r][c] + s1_wshift[r][c])
        with m.If(s1_block_last):
            m.d.sync += s2_last.eq(s1_last)

        # Stages 3a, 3b, 3 and 4: round_shift(P << G, u) = (((P << G+1) - (P < 0)) >>> u) + 1)
        # >>> 1 (round_shift_hw): the operand, the arithmetic shift by u & ~7, by u & 7, the
        # rounding. (u is read through copies: it changes only at the next block's end, B >= 8
        # beats later.) One stage each, so that no path holds more than a carry chain or a 3-level
        # multiplexer. The data registers have no enable (each copies its predecessor every
        # cycle; only the done flags, a parallel delay line, say when they hold a block).
        def regs(prefix):
            return [[Signal(signed(W), name=f"{prefix}_{r}_{c}", reset_less=True) for c in range(C)]
                    for r in range(R)]
        opnd, coarse, fined, term = regs("so"), regs("sc"), regs("sf"), regs("t")
        sa_done, sa_last, sb_done, sb_last = Signal(), Signal(), Signal(), Signal()
        s3_done, s3_last, s4_done, s4_last = Signal(), Signal(), Signal(), Signal()
        m.d.sync += [sa_done.eq(s2_done), sb_done.eq(sa_done), s3_done.eq(sb_done)]
        with m.If(s2_done):
            m.d.sync += sa_last.eq(s2_last)
        with m.If(sa_done):
            m.d.sync += sb_last.eq(sa_last)
        with m.If(sb_done):
            m.d.sync += s3_last.eq(sb_last)
        # Each shift stage reads two copies of its part of u (copied a cycle after u loads,
        # still a block ahead of the next load), each driving the multiplexers of half the
        # stage's bits: u itself drove every multiplexer of both stages (about 3 W loads).
        h = W // 2
        ub = len(ushift[0][0])
        C0 = Const(0, 3)
        for r in range(R):
            for c in range(C):
                p, u = prod[r][c], ushift[r][c]
                uc = [Signal(ub - 3, name=f"uc{k}_{r}_{c}", reset_less=True, attrs=replica)
                      for k in range(2)]
                uf = [Signal(3, name=f"uf{k}_{r}_{c}", reset_less=True, attrs=replica)
                      for k in range(2)]
                m.d.sync += [*[x.eq(u[3:]) for x in uc], *[x.eq(u[:3]) for x in uf]]
                m.d.sync += [opnd[r][c].eq((p << (G + 1)) - (p < 0)),
                             coarse[r][c][:h].eq((opnd[r][c] >> Cat(C0, uc[0]))[:h]),
                             coarse[r][c][h:].eq((opnd[r][c] >> Cat(C0, uc[1]))[h:]),
                             fined[r][c][:h].eq((coarse[r][c] >> uf[0])[:h]),
                             fined[r][c][h:].eq((coarse[r][c] >> uf[1])[h:]),
                             term[r][c].eq((fined[r][c] + 1) >> 1)]

        # Stage 5: accumulate; a finished tile is copied into the drain registers.
        acc = [[Signal(signed(cfg.acc_bits), name=f"acc_{r}_{c}") for c in range(C)]
               for r in range(R)]
        drain = [[Signal(signed(cfg.acc_bits), name=f"drain_{r}_{c}", reset_less=True)
                  for c in range(C)] for r in range(R)]
        # the bias as the shifters take it: (qb << G+1) - (qb < 0) (round_shift_hw's operand)
        b_t = [Signal(signed(cfg.vector_format.bits + G + 2), name=f"bt_{c}", reset_less=True)
               for c in range(C)]
        b_col = Signal.like(self.bias.payload.col_shift, reset_less=True)
        b_row = Signal.like(self.bias.payload.row_shift, reset_less=True)
        # Bias input: the holding register ``bin`` samples the bus on every cycle it is free
        # (enable: per-column copies of ``~bin_full``; ``ready`` is ``~bin_full``)
        # and moves into the bias registers a cycle after ``xfer`` (a register computed a
        # cycle ahead, driving only the control and its C + 1 load-enable copies ``xfer_c``),
        # so neither the input valid nor a LUT sits in front of those enables.
        bin_ = Signal.like(self.bias.payload, reset_less=True)
        bin_full = Signal()
        bin_free_c = [Signal(init=1, name=f"bin_free_{c}", attrs=replica) for c in range(C + 1)]
        xfer = Signal()
        xfer_d = Signal()  # the bias registers load now (= xfer_c)
        xfer_c = [Signal(name=f"xfer_{c}", attrs=replica) for c in range(C + 1)]

        # Control, all registers: pop (a drain row leaves: it has its bias and a credit) and
        # xfer are computed from the next state of full, bias_full, bin_full, row, credits
        # and the stage-4 flags, so each is the same function of the state as if it were
        # combinational, one cycle earlier. The state has one copy per row that shifts, each
        # driving only that row's copies of pop (a net of C loads inside the row, not one
        # across the whole array); every copy sees the same inputs, so they never differ.
        pop = Signal()
        pop_pe = [[Signal(name=f"pop_{r}_{c}", attrs=replica) for c in range(C)]
                  for r in range(R - 1)]
        finish = s4_done & s4_last
        depth = self.out_depth
        level = Signal(range(depth + 1))  # rows in the output FIFO
        back = self.out.valid & self.out.ready  # a row leaves the FIFO: its credit returns
        back_r = Signal()
        accept = self.bias.valid & ~bin_full
        s4_last_n = Mux(s3_done, s3_last, s4_last)

        def control(tag, attrs, full_=None):
            """One copy of the drain state; returns its ``full`` register and the next
            state of full, bias_full, pop and pop_last. A credit comes back one cycle after its row left the
            FIFO (back_r), so the credit test starts at registers: credits_n == 0 only if no
            credit comes back and either none is left or the last one is taken (zero / one:
            flags of credits; the candidates credits - 1, + 1 and their tests come from
            registers, pop_c only selects among them)."""
            full_ = Signal(name=f"full{tag}", attrs=attrs) if full_ is None else full_
            bias_full_ = Signal(name=f"bias_full{tag}", attrs=attrs)
            row = Signal(range(R), name=f"row{tag}", attrs=attrs)
            credits = Signal(range(depth + 1), init=depth, name=f"credits{tag}", attrs=attrs)
            zero = Signal(name=f"zero{tag}", attrs=attrs)
            one = Signal(init=depth == 1, name=f"one{tag}", attrs=attrs)
            pop_c = full_ & bias_full_ & ~zero
            pop_last_c = pop_c & (row == R - 1)
            full_n = Mux(finish, 1, Mux(pop_last_c, 0, full_))  # (admission: never both)
            bias_full_n = Mux(xfer_d, 1, Mux(pop_last_c, 0, bias_full_))
            row_n = Mux(pop_c, Mux(row == R - 1, 0, row + 1), row)
            dec, inc = pop_c & ~back_r, back_r & ~pop_c
            credits_n = Mux(dec, credits - 1, Mux(inc, credits + 1, credits))
            zero_n = Mux(dec, credits == 1, Mux(inc, 0, credits == 0))
            one_n = Mux(dec, credits == 2, Mux(inc, credits == 0, credits == 1))
            credits_nz = ~((zero | (one & pop_c)) & ~back_r)
            pop_n = full_n & bias_full_n & credits_nz
            m.d.sync += [full_.eq(full_n), bias_full_.eq(bias_full_n), row.eq(row_n),
                         credits.eq(credits_n), zero.eq(zero_n), one.eq(one_n)]
            return full_, full_n, bias_full_n, pop_n, pop_n & (row_n == R - 1)

        _, full_n, bias_full_n, pop_n, pop_last_n = control("", {}, full)
        for r in range(R - 1):
            row_pop_n = control(f"_r{r}", replica)[3]
            m.d.sync += [p.eq(row_pop_n) for p in pop_pe[r]]
        bin_full_n = Mux(accept, 1, Mux(xfer, 0, bin_full))
        # xfer next cycle if the bias registers are free then or their tile's last row pops
        # then (o1 samples it at that edge); they load one cycle later, and bias_full (hence
        # the first pop of the new tile) follows the load
        xfer_n = bin_full_n & (~bias_full_n | pop_last_n)
        m.d.sync += [bin_full.eq(bin_full_n), *[f.eq(~bin_full_n) for f in bin_free_c],
                     xfer.eq(xfer_n), xfer_d.eq(xfer), *[x.eq(xfer) for x in xfer_c]]
        m.d.sync += [back_r.eq(back), s4_done.eq(s3_done), s4_last.eq(s4_last_n),
                     pop.eq(pop_n),
                     inflight.eq(Mux(take & self.act.payload.last, 1,
                                     Mux(finish, 0, inflight)))]

        # The accumulators restart from 0 after the tile's last block (a synchronous reset of
        # the register, no multiplexer in front of the adder). Per-PE flags: ``add`` = s4_done,
        # ``fin`` = s4_done & s4_last (from stage 3b, two cycles earlier).
        add_pe = spread(sb_done, "add")
        fin_pe = spread(sb_done & sb_last, "fin")
        for r in range(R):
            for c in range(C):
                total = acc[r][c] + term[r][c]
                with m.If(add_pe[r][c]):
                    m.d.sync += acc[r][c].eq(Mux(fin_pe[r][c], 0, total))
                with m.If(fin_pe[r][c]):
                    m.d.sync += drain[r][c].eq(total)

        # Drain: rows leave from row 0 (the registers shift up) into the output pipeline:
        # o1 (total bias shift per column), o2 (the aligned bias term), o3 (the sum), then
        # the FIFO. Each popped row takes a credit, returned when it leaves the FIFO, so the
        # pipeline never needs to stall.
        with m.If(xfer_c[C]):
            m.d.sync += b_row.eq(bin_.row_shift)
        with m.Elif(pop):
            m.d.sync += [b_row[r].eq(b_row[r + 1]) for r in range(R - 1)]
        for r in range(R - 1):
            for c in range(C):
                with m.If(pop_pe[r][c]):
                    m.d.sync += drain[r][c].eq(drain[r + 1][c])

        m.d.comb += self.bias.ready.eq(~bin_full)
        with m.If(bin_free_c[C]):
            m.d.sync += bin_.row_shift.eq(self.bias.payload.row_shift)
        for c in range(C):
            with m.If(bin_free_c[c]):
                m.d.sync += [bin_.b[c].eq(self.bias.payload.b[c]),
                             bin_.col_shift[c].eq(self.bias.payload.col_shift[c])]
            with m.If(xfer_c[c]):
                qb = bin_.b[c]
                m.d.sync += [b_col[c].eq(bin_.col_shift[c]), b_t[c].eq((qb << (G + 1)) - (qb < 0))]

        # o1: the row and its total bias shifts; o2 / o3: round_shift(qb << G, u) in the PE's
        # two shift stages; o4 (the FIFO's write data): the sum. Like the PE's rounding stages
        # these registers have no enable: each copies its predecessor every cycle, and the
        # valid flags say when they hold a row (o1 samples drain row 0 and its bias shift on
        # every cycle, so it holds the popped row the cycle after a pop).
        o1_valid, o2_valid, o3_valid, o4_valid = Signal(), Signal(), Signal(), Signal()
        ub = range(2 * self.bias_shift_max + 1)
        d = [[Signal(signed(cfg.acc_bits), name=f"o{i}d_{c}", reset_less=True) for c in range(C)]
             for i in (1, 2, 3, 4)]
        o1_t = [Signal.like(b_t[c], name=f"o1t_{c}", reset_less=True) for c in range(C)]
        o1_u = [Signal(ub, name=f"o1u_{c}", reset_less=True) for c in range(C)]
        o2_t = [Signal.like(b_t[c], name=f"o2t_{c}", reset_less=True) for c in range(C)]
        o2_f = [Signal(3, name=f"o2f_{c}", reset_less=True) for c in range(C)]
        o3_t = [Signal.like(b_t[c], name=f"o3t_{c}", reset_less=True) for c in range(C)]
        o4_t = [Signal.like(b_t[c], name=f"o4t_{c}", reset_less=True) for c in range(C)]
        m.d.sync += [o1_valid.eq(pop), o2_valid.eq(o1_valid), o3_valid.eq(o2_valid),
                     o4_valid.eq(o3_valid)]
        for c in range(C):
            m.d.sync += [d[0][c].eq(drain[0][c]), o1_t[c].eq(b_t[c]),
                         o1_u[c].eq(b_row[0] + b_col[c]),
                         d[1][c].eq(d[0][c]), o2_t[c].eq(o1_t[c] >> (o1_u[c] >> 3 << 3)),
                         o2_f[c].eq(o1_u[c][:3]),
                         d[2][c].eq(d[1][c]), o3_t[c].eq(o2_t[c] >> o2_f[c]),
                         d[3][c].eq(d[2][c]), o4_t[c].eq((o3_t[c] + 1) >> 1)]

        # Output FIFO: LUT RAM with an asynchronous read port (first word fall-through); its
        # space is guaranteed by the credits. One memory per column, each with its own copies
        # of the write enable and of both addresses, so that no address register drives every
        # LUT RAM of the FIFO; the fourth output stage registers straight into the write ports.
        # ``out.ready`` meets each column's own copy of ``nonempty`` in one LUT in front of
        # that column's read pointer, so it never drives a net across all columns.
        wrote = Signal()  # a row was written (level's increment)
        m.d.sync += wrote.eq(o4_valid)
        # level_n != 0 without the sum: a row came in, or more than one row (or one that
        # does not leave now) was there
        nonempty_n = wrote | (level > 1) | ((level == 1) & ~self.out.ready)
        nonempty_c = [Signal(name=f"nonempty_{c}", attrs=replica) for c in range(C)]
        m.d.sync += [self.out.valid.eq(nonempty_n), *[n.eq(nonempty_n) for n in nonempty_c]]
        for c in range(C):
            mem = memory.Memory(shape=signed(cfg.acc_bits), depth=depth, init=[])
            m.submodules[f"out_mem_{c}"] = mem
            wp, rp = mem.write_port(), mem.read_port(domain="comb")
            we, wa, ra = wp.en, wp.addr, rp.addr  # registers: this column's copies
            for copy in (we, wa, ra):
                copy.attrs.update(replica)
            m.d.comb += self.out.payload[c].eq(rp.data)
            m.d.sync += [we.eq(o4_valid), wp.data.eq(d[3][c] + o4_t[c])]
            with m.If(we):
                m.d.sync += wa.eq(Mux(wa == depth - 1, 0, wa + 1))
            with m.If(nonempty_c[c] & self.out.ready):
                m.d.sync += ra.eq(Mux(ra == depth - 1, 0, ra + 1))
        m.d.sync += level.eq(level + wrote - back)
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
