"""Output-stationary processing-element array for the blockwise matmul (docs/arithmetic.md, 3).

:class:`MatmulArray` computes one ``R x C`` output tile ``acc[m0:m0+R, n0:n0+C]`` of
:func:`bct.model.matmul.matmul` over the whole reduction K, bit for bit. Each PE ``(r, c)`` owns
one output: per cycle it multiplies one activation ``qx[m0+r, k]`` by one operand
``qw[n0+c, k]`` into the block product ``P`` (``Config.block_product_bits``). At the end of every
K-block, ``round_shift(P, dx[m] + dw[n])`` is added into the PE's accumulator
(``Config.acc_bits``) by a rounding shifter that a segment of up to ``B`` rows of a column
shares: the block products leave the segment one row per cycle through a readout chain, and
the segment's accumulators turn as a ring through the shifter's adder (the shifter is used
once per block, so one per PE would idle ``B - 1`` cycles in ``B``).
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

    Latency: the first row of a tile is valid :attr:`latency` (``17 + S``, :meth:`timing`)
    cycles after the transfer of its last beat; every stage is register to register (the
    measured Fmax is in docs/synthesis.md). Back-to-back tiles of reduction ``K`` keep every PE
    busy on every cycle when ``K >= R + admit_gap`` (the drain of ``R`` rows hides under the
    next tile); in general the steady-state utilisation is ``K / max(K, R + admit_gap)``. The output
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
        #: First-row latency and the minimum spacing of tiles' last beats beyond ``R``
        #: (:meth:`timing`).
        self.latency, self.admit_gap = self.timing(cfg)
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

    @staticmethod
    def segments(cfg: Config) -> list[tuple[int, int]]:
        """Row segments ``(first row, rows)`` that share one rounding shifter and accumulator
        ring per column: ``ceil(R / B)`` segments of ``n <= B`` rows, as equal as possible
        (earlier segments one row longer), so each is read out before the next block ends."""
        R, B = cfg.array_rows, cfg.block_size
        count = -(-R // B)
        sizes = [R // count + (k < R % count) for k in range(count)]
        return [(sum(sizes[:k]), n) for k, n in enumerate(sizes)]

    @classmethod
    def timing(cls, cfg: Config) -> tuple[int, int]:
        """``(latency, admit_gap)`` of the array for ``cfg`` (:attr:`latency`, :attr:`admit_gap`).

        ``latency``: register stages from the last ``act``/``weight`` transfer of a tile to its
        first output row, ``17 + S`` with ``S`` the longest row segment (:meth:`segments`):
        input, per-PE operand copies, operands, product, product copy in the fabric, block
        accumulate (into the readout chain), ``S`` readout steps, the shifter's four stages
        (operand, coarse, fine, round), the last ring step, the drain load, bias shift
        amount, coarse, fine and rounded bias term, sum, output FIFO.

        ``admit_gap``: cycles from admitting a tile's last beat until the drain registers can
        take another finish, minus ``R`` (its ``R`` rows pop one per cycle): ``10 + S`` to
        the drain registers, 1 to the first pop. Tiles' last beats are thus at least
        ``R + admit_gap`` cycles apart (``bct.estimate.matmul_run_cycles``), which only
        binds when ``K < R + admit_gap``.
        """
        S = max(n for _, n in cls.segments(cfg))
        return 17 + S, 11 + S

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
        # Stage 1's shift fields as copies: the row's activation shift per PE, the column's
        # weight shift per segment and column, read when the block product is complete.
        # sd_* load under sm_valid, which sd_valid copies, so a plain copy equals a copy
        # under sd_valid.
        s1_ashift = [[Signal.like(sd_ashift[r], name=f"ash_{r}_{c}", reset_less=True,
                                  attrs=replica) for c in range(C)] for r in range(R)]
        m.d.sync += [s1_ashift[r][c].eq(sd_ashift[r]) for r in range(R) for c in range(C)]
        segs = self.segments(cfg)
        s1_wshift = {r0: [Signal.like(sd_wshift[c], name=f"wsh_{r0}_{c}", reset_less=True,
                                      attrs=replica) for c in range(C)] for r0, _ in segs}
        m.d.sync += [x.eq(sd_wshift[c]) for row in s1_wshift.values() for c, x in enumerate(row)]

        # Block-end pulses (``t_L``: the cycle at which muld holds a block's last product) and
        # their delay lines: ``bl`` every block end, ``fl`` the first block of a tile, ``tl``
        # the last one. The segments' windows and the drain load are taps of these lines.
        S = max(n for _, n in segs)
        tile_first = Signal(init=1)  # the next block to end is a tile's first
        with m.If(s1_block_last):
            m.d.sync += tile_first.eq(s1_last)

        def delay_line(pulse, name, length):
            line = [pulse]
            for k in range(1, length + 1):
                line.append(Signal(name=f"{name}{k}"))
                m.d.sync += line[k].eq(line[k - 1])
            return line

        bl = delay_line(s1_block_last, "bl", max(4, 2 + S))
        fl = delay_line(s1_block_last & tile_first, "fl", 4)
        tl = delay_line(s1_block_last & s1_last, "tl", 5 + S)

        # Stage 2: accumulate the block product P in each PE; at the block's end the finished
        # P and its row's activation shift load into the segment's readout chain (q, qa).
        W = cfg.block_product_bits + G + 1  # width of (P << G+1) - (P < 0)
        PB = cfg.block_product_bits
        prod = [[Signal(signed(PB), name=f"p_{r}_{c}", reset_less=True) for c in range(C)]
                for r in range(R)]
        sm_first = Signal()
        m.d.sync += sm_first.eq(s0_first)
        first_pe = spread(sm_first, "first")  # the block's first product is in muld
        block_last_pe = spread(sm_block_last, "blast")  # = s1_block_last (t_L), per PE
        # A segment of rows shares one rounding shifter per column (docs/hardware.md, "Matmul
        # array"): at t_L every PE of the segment loads its P into the chain q (its row's
        # activation shift into qa, the column's weight shift into wl), and the chain shifts
        # one row per cycle into the shifter (row r0 first): a segment of n <= B rows is
        # read out in n cycles, before the next block ends.
        q = [[Signal(signed(PB), name=f"q_{r}_{c}", reset_less=True) for c in range(C)]
             for r in range(R)]
        qa = [[Signal.like(sd_ashift[r], name=f"qa_{r}_{c}", reset_less=True) for c in range(C)]
              for r in range(R)]
        for r in range(R):
            for c in range(C):
                total = Mux(first_pe[r][c], 0, prod[r][c]) + muld[r][c]
                m.d.sync += prod[r][c].eq(total)
                last_row = any(r == r0 + n - 1 for r0, n in segs)
                nq = 0 if last_row else q[r + 1][c]
                na = 0 if last_row else qa[r + 1][c]
                m.d.sync += [q[r][c].eq(Mux(block_last_pe[r][c], total, nq)),
                             qa[r][c].eq(Mux(block_last_pe[r][c], s1_ashift[r][c], na))]

        # Stages 3a, 3b, 3 and 4, once per segment and column, one row per cycle:
        # round_shift(P << G, u) = (((P << G+1) - (P < 0)) >>> u) + 1) >>> 1 (round_shift_hw):
        # the operand and u = qa + wl, the arithmetic shift by u & ~7, by u & 7, the rounding.
        # Each shift stage's amount has two copies, each driving the multiplexers of half the
        # stage's bits. Stage 5: the segment's accumulators form a ring that turns once per
        # block (``rot``, n cycles): the head row's accumulator plus its term enters at the
        # tail, so after n steps every row is back in place; the first block of a tile adds
        # to 0 instead (``clr``), so the accumulators need no reset.
        acc = [[Signal(signed(cfg.acc_bits), name=f"acc_{r}_{c}", reset_less=True)
                for c in range(C)] for r in range(R)]
        h = W // 2
        ub = (2 * self.shift_max).bit_length()
        C0 = Const(0, 3)
        rot_src = {}
        for n in sorted({n for _, n in segs}):
            # t_L + 3 .. t_L + 2 + n (the ring steps at t_L + 5 .. t_L + 4 + n)
            rot_src[n] = Signal(name=f"rot_src{n}")
            m.d.sync += rot_src[n].eq(bl[2] | (rot_src[n] & ~bl[2 + n]))
        rot_pe = [[None] * C for _ in range(R)]  # per PE: its segment's rot_src, 2 cycles on
        for r0, n in segs:
            for r in range(r0, r0 + n):
                row = Signal(name=f"rot_r{r}", attrs=replica)
                m.d.sync += row.eq(rot_src[n])
                for c in range(C):
                    rot_pe[r][c] = Signal(name=f"rot_{r}_{c}", attrs=replica)
                    m.d.sync += rot_pe[r][c].eq(row)
        for k, (r0, n) in enumerate(segs):
            for c in range(C):
                wl = Signal.like(sd_wshift[c], name=f"wl_{k}_{c}", reset_less=True)
                with m.If(block_last_pe[r0][c]):
                    m.d.sync += wl.eq(s1_wshift[r0][c])
                opnd = Signal(signed(W), name=f"so_{k}_{c}", reset_less=True)
                uc = [Signal(ub - 3, name=f"uc{i}_{k}_{c}", reset_less=True, attrs=replica)
                      for i in range(2)]
                uf = [Signal(3, name=f"uf{i}_{k}_{c}", reset_less=True, attrs=replica)
                      for i in range(2)]
                coarse = Signal(signed(W), name=f"sc_{k}_{c}", reset_less=True)
                fined = Signal(signed(W), name=f"sf_{k}_{c}", reset_less=True)
                term = Signal(signed(W), name=f"t_{k}_{c}", reset_less=True)
                p, u = q[r0][c], qa[r0][c] + wl
                m.d.sync += [opnd.eq((p << (G + 1)) - (p < 0)),
                             *[x.eq(u[3:]) for x in uc],
                             coarse[:h].eq((opnd >> Cat(C0, uc[0]))[:h]),
                             coarse[h:].eq((opnd >> Cat(C0, uc[1]))[h:]),
                             fined[:h].eq((coarse >> uf[0])[:h]),
                             fined[h:].eq((coarse >> uf[1])[h:]),
                             term.eq((fined + 1) >> 1)]
                # the fine shift amount of the row now in the coarse stage
                uf_in = Signal(3, name=f"ufi_{k}_{c}", reset_less=True)
                m.d.sync += [uf_in.eq(u[:3]), *[x.eq(uf_in) for x in uf]]
                clr = Signal(name=f"clr_{k}_{c}", attrs=replica)
                with m.If(bl[4]):
                    m.d.sync += clr.eq(fl[4])
                rows = range(r0, r0 + n)
                rot = [rot_pe[r][c] for r in rows]
                with m.If(rot[-1]):
                    m.d.sync += acc[r0 + n - 1][c].eq(Mux(clr, 0, acc[r0][c]) + term)
                for i in range(n - 1):
                    with m.If(rot[i]):
                        m.d.sync += acc[r0 + i][c].eq(acc[r0 + i + 1][c])

        # A finished tile is copied from the accumulators into the drain registers.
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
        # combinational, one cycle earlier. The state has two copies per row that shifts,
        # each driving only the copies of pop of half that row (a net of C / 2 loads inside
        # the row, not one across the whole array), each with its own copies of xfer, finish
        # and the returned credit; every copy sees the same inputs, so they never differ.
        pop = Signal()
        pop_pe = [[Signal(name=f"pop_{r}_{c}", attrs=replica) for c in range(C)]
                  for r in range(R - 1)]
        finish = tl[5 + S]  # the drain registers load now
        depth = self.out_depth
        level = Signal(range(depth + 1))  # rows in the output FIFO
        back = self.out.valid & self.out.ready  # a row leaves the FIFO: its credit returns
        back_r = Signal()
        accept = self.bias.valid & ~bin_full

        def control(tag, attrs, full_=None):
            """One copy of the drain state; returns its ``full`` register and the next state of
            full, bias_full, pop and pop_last. A credit comes back one cycle after its row left the
            FIFO (back_r), so the credit test starts at registers: credits_n == 0 only if no credit
            comes back and either none is left or the last one is taken (zero / one: flags of
            credits; the candidates credits - 1, + 1 and their tests come from registers, pop_c only
            selects among them)."""
            full_ = Signal(name=f"full{tag}", attrs=attrs) if full_ is None else full_
            if attrs:  # a row's copy: its own copies of the shared control inputs
                xfer_d_, finish_, back_r_ = (Signal(name=f"{n}{tag}", attrs=attrs)
                                             for n in ("xfer_d", "finish", "back_r"))
                m.d.sync += [xfer_d_.eq(xfer), finish_.eq(tl[4 + S]), back_r_.eq(back)]
            else:
                xfer_d_, finish_, back_r_ = xfer_d, finish, back_r
            bias_full_ = Signal(name=f"bias_full{tag}", attrs=attrs)
            row = Signal(range(R), name=f"row{tag}", attrs=attrs)
            rlast = Signal(init=R == 1, name=f"rlast{tag}", attrs=attrs)  # row == R - 1
            credits = Signal(range(depth + 1), init=depth, name=f"credits{tag}", attrs=attrs)
            zero = Signal(name=f"zero{tag}", attrs=attrs)
            one = Signal(init=depth == 1, name=f"one{tag}", attrs=attrs)
            pop_c = full_ & bias_full_ & ~zero
            pop_last_c = pop_c & rlast
            full_n = Mux(finish_, 1, Mux(pop_last_c, 0, full_))  # (admission: never both)
            bias_full_n = Mux(xfer_d_, 1, Mux(pop_last_c, 0, bias_full_))
            row_n = Mux(pop_c, Mux(rlast, 0, row + 1), row)
            rlast_n = Mux(pop_c, (row == R - 2) | (R == 1), rlast)
            dec, inc = pop_c & ~back_r_, back_r_ & ~pop_c
            credits_n = Mux(dec, credits - 1, Mux(inc, credits + 1, credits))
            zero_n = Mux(dec, credits == 1, Mux(inc, 0, credits == 0))
            one_n = Mux(dec, credits == 2, Mux(inc, credits == 0, credits == 1))
            credits_nz = ~((zero | (one & pop_c)) & ~back_r_)
            pop_n = full_n & bias_full_n & credits_nz
            m.d.sync += [full_.eq(full_n), bias_full_.eq(bias_full_n), row.eq(row_n),
                         rlast.eq(rlast_n), credits.eq(credits_n), zero.eq(zero_n),
                         one.eq(one_n)]
            return full_, full_n, bias_full_n, pop_n, pop_n & rlast_n

        _, full_n, bias_full_n, pop_n, pop_last_n = control("", {}, full)
        # two copies per shifting row, each driving the pop copies of half the row's PEs
        half = (C + 1) // 2
        for r in range(R - 1):
            for k, cols in enumerate((range(half), range(half, C))):
                if cols:
                    row_pop_n = control(f"_r{r}_{k}", replica)[3]
                    m.d.sync += [pop_pe[r][c].eq(row_pop_n) for c in cols]
        bin_full_n = Mux(accept, 1, Mux(xfer, 0, bin_full))
        # xfer next cycle if the bias registers are free then or their tile's last row pops
        # then (o1 samples it at that edge); they load one cycle later, and bias_full (hence
        # the first pop of the new tile) follows the load
        xfer_n = bin_full_n & (~bias_full_n | pop_last_n)
        m.d.sync += [bin_full.eq(bin_full_n), *[f.eq(~bin_full_n) for f in bin_free_c],
                     xfer.eq(xfer_n), xfer_d.eq(xfer), *[x.eq(xfer) for x in xfer_c]]
        m.d.sync += [back_r.eq(back), pop.eq(pop_n),
                     inflight.eq(Mux(take & self.act.payload.last, 1,
                                     Mux(finish, 0, inflight)))]

        # The drain registers load a cycle after the last ring step of a tile's last block
        # (``fin``, per PE).
        fin_pe = spread(tl[3 + S], "fin")
        for r in range(R):
            for c in range(C):
                with m.If(fin_pe[r][c]):
                    m.d.sync += drain[r][c].eq(acc[r][c])

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
