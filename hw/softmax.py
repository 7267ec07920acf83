"""Row-wise softmax unit: block-format scores in, fixed-point probabilities out.

Computes exactly :func:`bct.model.nonlinear.softmax_fixed` of
``bct.model.blocks.to_fixed(scores, cfg.softmax_frac, cfg.softmax_bits)`` (docs/arithmetic.md
section 5), one block of ``B`` lanes per beat. The dataflow, buffering, latency and resources are
described in docs/hardware.md ("Softmax unit").
"""

from __future__ import annotations

from amaranth import Array, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bct.config import Config
from bct.hw.layouts import block_layout
from bct.model.constants import LOG2E_FRAC, derive
from bct.model.fixed import round_div_int

__all__ = ["SoftmaxUnit"]

#: Row buffers of raw input blocks: one being written while the other is read (double buffer).
_X_SLOTS = 2
#: Row buffers of exponentials: written by *exp*, held through *div*, read by *norm*. Four keep
#: every stage busy at ``row_period`` (a row's slot is busy for ``2 L + div_cycles`` plus a few
#: cycles); a power of two, so slot pointers wrap by overflow and every slot index is valid.
_E_SLOTS = 4


def _comb(m, value, name, shape=None):
    """``value`` as a named combinational signal (``shape``: its own by default), computed once
    and shared by every user."""
    sig = Signal(value.shape() if shape is None else shape, name=name)
    m.d.comb += sig.eq(value)
    return sig


def _tree(m, values, op, name):
    """Reduce ``values`` pairwise with ``op`` (a balanced tree, depth ``ceil(log2(len))``)."""
    values = list(values)
    level = 0
    while len(values) > 1:
        values = [_comb(m, op(values[i], values[i + 1]), f"{name}_{level}_{i // 2}")
                  if i + 1 < len(values) else values[i] for i in range(0, len(values), 2)]
        level += 1
    return values[0]


def _set(m, slots, index, value):
    """``slots[index] <= value`` as one comparison per slot (Verilator flags the incomplete
    ``case`` that assigning through an ``Array`` produces)."""
    for k, sig in enumerate(slots):
        with m.If(index == k):
            m.d.sync += sig.eq(value)


def _round_shift_pos(x, s):
    """``round_shift(x, s)`` of a non-negative ``x`` by a variable ``s >= 0``: halving once
    fewer and rounding the last bit, ``(((x << 1) >> s) + 1) >> 1``, is exact for ``s = 0`` too."""
    return (((x << 1) >> s) + 1) >> 1


class SoftmaxUnit(wiring.Component):
    """Softmax over rows of block-format scores, bit-exact with ``softmax_fixed``.

    A row is a sequence of 1 .. ``max_len / B`` input beats, each one block of ``B`` scores in
    ``cfg.act_format`` with one mask bit per lane (1: included, as the model's ``mask``; 0:
    probability 0) and ``last`` on the row's final block. A row that reaches ``max_len / B``
    blocks ends there whether or not ``last`` is set. The output is one beat per input block:
    ``B`` probabilities with ``cfg.softmax_out_frac`` fraction bits and ``last`` on the row's
    final block. A row without any included lane (which the model refuses) gives all zeros.

    Four stages work on four different rows at once, all ``B`` lanes in parallel:

    1. *in*: converts each block to fixed point (one shared barrel shift, saturation), takes
       the running maximum over included lanes and stores the raw block in a double-buffered
       row memory;
    2. *exp*: reads the row back, ``u = round_shift((max - x) * LOG2E, 16)``,
       ``e = round_shift(LUT[u mod 2**f], u >> f)`` (``B`` LUT ROMs, ``B`` constant
       multipliers), writes ``e`` into a four-slot row memory and sums the row;
    3. *div*: ``recip = round_div(2**(recip_shift + out_frac), sum)``, a restoring divider
       retiring ``div_bits`` quotient bits per cycle;
    4. *norm*: reads ``e`` back, ``p = round_shift(e * recip, recip_shift)`` (``B``
       multipliers), with back-pressure from the output.

    Latency (first block accepted to first output valid, idle unit, ``L`` blocks):
    ``2 L + div_cycles + 9`` cycles (:meth:`latency`). Steady state: one row per
    ``max(L, div_cycles + 1)`` cycles (:meth:`row_period`), i.e. one block per cycle once
    ``L > div_cycles``; shorter rows are bound by the divider (``div_bits`` trades adder depth
    for cycles). All ``B`` lanes are parallel: the per-lane cost (a LUT read port, a constant
    multiplier, a ``16 x 24``-bit multiplier at default, three small barrel shifters) is what
    one block per cycle needs, and the row buffers, sized by ``max_len``, dominate the area
    anyway; see docs/hardware.md for the resource count.

    ``verilator --lint-only -Wall`` is clean except four waivers, all for the way Amaranth and
    Yosys write Verilog (tests/test_hw_softmax.py, ``LINT_WAIVERS``): ``WIDTHEXPAND`` /
    ``WIDTHTRUNC`` (operands narrower / wider than their context), ``PROCASSINIT`` (reset values
    as declaration initialisers) and ``UNUSEDSIGNAL`` (an unread alias wire per named signal and
    layout field, unread high bits of intermediate results).

    Parameters
    ----------
    cfg : Config
    max_len : int
        Longest row in scores: a multiple of ``cfg.block_size`` up to ``cfg.max_reduction``.
    div_bits : int
        Quotient bits the divider retires per cycle (1 .. its quotient width): more bits mean
        fewer cycles per row (:attr:`div_cycles`) for a longer adder chain.

    Attributes
    ----------
    i : stream.Interface, in
        Payload :meth:`input_layout` ``{"block", "mask", "last"}``.
    o : stream.Interface, out
        Payload :meth:`output_layout` ``{"p", "last"}``.
    div_cycles : int
        Cycles the divider spends on one row.

    Raises
    ------
    TypeError
        If ``cfg`` is not a :class:`~bct.config.Config` or ``max_len`` / ``div_bits`` is not an
        int.
    ValueError
        If ``max_len`` or ``div_bits`` is out of range (:class:`~bct.config.ConfigError`).
    """

    def __init__(self, cfg: Config, max_len: int, div_bits: int = 1):
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be a bct.config.Config, not {type(cfg).__name__}")
        for name, value in (("max_len", max_len), ("div_bits", div_bits)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if max_len < cfg.block_size:
            raise ValueError(
                f"max_len must be at least block_size {cfg.block_size}, not {max_len}")
        cfg.check_reduction(max_len, "max_len")
        self.cfg = cfg
        self.max_len = max_len
        self.max_blocks = max_len // cfg.block_size
        c = derive(cfg)
        lim = (1 << (cfg.softmax_bits - 1)) - 1
        self._lim = lim
        #: ``max - x`` of included lanes, ``0 .. 2 lim``
        self._diff_bits = (2 * lim).bit_length()
        #: ``u = round_shift(d * LOG2E, LOG2E_FRAC) >= 0``
        self._u_bits = ((2 * lim * c.log2e + (1 << (LOG2E_FRAC - 1))) >> LOG2E_FRAC).bit_length()
        #: exponentials ``e <= max(LUT)``; a right shift by ``n >= e_bits + 1`` always gives 0
        self._e_bits = max(c.exp2_lut).bit_length()
        self._sum_bits = (max_len * max(c.exp2_lut)).bit_length()
        #: numerator of the reciprocal; the smallest sum of a row is ``LUT[0]`` (its maximum)
        self._numer = 1 << (c.recip_shift + cfg.softmax_out_frac)
        self._q_bits = round_div_int(self._numer, c.exp2_lut[0]).bit_length()
        if not 1 <= div_bits <= self._q_bits:
            raise ValueError(f"div_bits must be in 1..{self._q_bits}, not {div_bits}")
        self.div_bits = div_bits
        self.div_cycles = -(-self._q_bits // div_bits)
        super().__init__({
            "i": In(stream.Signature(self.input_layout(cfg))),
            "o": Out(stream.Signature(self.output_layout(cfg))),
        })

    @staticmethod
    def input_layout(cfg: Config) -> data.StructLayout:
        """``{"block": block_layout(act_format), "mask": B x unsigned(1), "last": 1}``."""
        return data.StructLayout({
            "block": block_layout(cfg.act_format),
            "mask": data.ArrayLayout(unsigned(1), cfg.block_size),
            "last": unsigned(1),
        })

    @staticmethod
    def output_layout(cfg: Config) -> data.StructLayout:
        """``{"p": B x unsigned(softmax_out_frac + 1), "last": 1}``.

        ``p <= 2**softmax_out_frac`` (1.0, reached by a row with one non-zero exponential):
        ``e <= S`` and ``recip <= 2**(recip_shift + out_frac) / S + 1/2``.
        """
        return data.StructLayout({
            "p": data.ArrayLayout(unsigned(cfg.softmax_out_frac + 1), cfg.block_size),
            "last": unsigned(1),
        })

    def latency(self, blocks: int) -> int:
        """Cycles from accepting a row's first block to its first output beat being valid,
        for a row of ``blocks`` blocks entering an idle unit with the output ready."""
        return 2 * blocks + self.div_cycles + _LATENCY_FIXED

    def row_period(self, blocks: int) -> int:
        """Cycles per row at steady state, for back-to-back rows of ``blocks`` blocks with
        the output always ready: the slowest stage, the divider's ``div_cycles + 1`` (load)
        or a pass over the row."""
        return max(blocks, self.div_cycles + 1)

    # --------------------------------------------------------------------------------------
    def _to_fixed(self, m, block, name):
        """Scores of ``block`` as saturated ``softmax_bits`` fixed point (one shared shift)."""
        cfg = self.cfg
        sb = cfg.softmax_bits
        shift = Signal(signed(cfg.exp_bits + 1), name=f"{name}_shift")
        m.d.comb += shift.eq(block.exp + cfg.softmax_frac)
        # a left shift by >= sb - 1 saturates every non-zero mantissa; a right shift by
        # >= act_bits rounds every mantissa (|q| < 2**(act_bits-1)) to 0
        left = Signal(range(sb), name=f"{name}_left")
        right = Signal(range(1, cfg.act_bits + 1), name=f"{name}_right")
        m.d.comb += [
            left.eq(Mux(shift >= sb - 1, sb - 1, shift)),
            right.eq(Mux(-shift >= cfg.act_bits, cfg.act_bits, -shift)),
        ]
        half = (Const(1, cfg.act_bits + 1) << right) >> 1
        out = []
        for k in range(cfg.block_size):
            q = block.mant[k]
            wide = _comb(m, Mux(shift >= 0, q << left, (q + half - (q < 0)) >> right),
                         f"{name}_wide{k}")
            out.append(_comb(m, Mux(wide > self._lim, self._lim,
                                    Mux(wide < -self._lim, -self._lim, wide)), f"{name}_x{k}",
                             signed(sb)))
        return out

    def elaborate(self, platform):
        m = Module()
        cfg, B, L = self.cfg, self.cfg.block_size, self.max_blocks
        c = derive(self.cfg)
        sb, lim = cfg.softmax_bits, self._lim

        def addr(slot, index):
            return slot * L + index

        m.submodules.xbuf = xbuf = Memory(shape=self.i.payload.shape(), depth=_X_SLOTS * L, init=[])
        m.submodules.ebuf = ebuf = Memory(
            shape=data.ArrayLayout(unsigned(self._e_bits), B), depth=_E_SLOTS * L, init=[])
        m.submodules.lut = lut = Memory(shape=unsigned(self._e_bits), depth=len(c.exp2_lut),
                                        init=c.exp2_lut)
        x_wr, x_rd = xbuf.write_port(), xbuf.read_port()
        e_wr, e_rd = ebuf.write_port(), ebuf.read_port()
        lut_rd = [lut.read_port() for _ in range(B)]

        # per-slot state: a row is in xbuf[s] while x_full[s]; in ebuf[s] while e_full[s],
        # with its reciprocal once r_ready[s]
        x_full = Array(Signal(name=f"x_full{s}") for s in range(_X_SLOTS))
        x_max = Array(Signal(signed(sb), name=f"x_max{s}") for s in range(_X_SLOTS))
        x_len = Array(Signal(range(L), name=f"x_len{s}") for s in range(_X_SLOTS))  # blocks - 1
        e_full = Array(Signal(name=f"e_full{s}") for s in range(_E_SLOTS))
        e_sum = Array(Signal(self._sum_bits, name=f"e_sum{s}") for s in range(_E_SLOTS))
        e_len = Array(Signal(range(L), name=f"e_len{s}") for s in range(_E_SLOTS))
        r_ready = Array(Signal(name=f"r_ready{s}") for s in range(_E_SLOTS))
        recip = Array(Signal(self._q_bits, name=f"recip{s}") for s in range(_E_SLOTS))

        # ---- stage 1, in: register the beat, then store it and update the row maximum -----
        in_slot = Signal(range(_X_SLOTS))
        in_idx = Signal(range(L))
        in_end = self.i.payload.last | (in_idx == L - 1)
        m.d.comb += self.i.ready.eq(~x_full[in_slot])
        beat = Signal(self.i.payload.shape())
        beat_valid, beat_end = Signal(), Signal()
        beat_slot, beat_idx = Signal(range(_X_SLOTS)), Signal(range(L))
        m.d.sync += [
            beat_valid.eq(self.i.valid & self.i.ready),
            beat.eq(self.i.payload), beat_end.eq(in_end),
            beat_slot.eq(in_slot), beat_idx.eq(in_idx),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += in_idx.eq(Mux(in_end, 0, in_idx + 1))
            with m.If(in_end):
                m.d.sync += in_slot.eq(in_slot + 1)

        xs = self._to_fixed(m, beat.block, "in")
        block_max = _tree(m, (Mux(beat.mask[k], xs[k], -lim) for k in range(B)),
                          lambda a, b: Mux(a > b, a, b), "in_max")
        run_max = Signal(signed(sb))
        new_max = _comb(m, Mux((beat_idx == 0) | (block_max > run_max), block_max, run_max),
                        "in_new_max")
        m.d.comb += [x_wr.addr.eq(addr(beat_slot, beat_idx)), x_wr.data.eq(beat),
                     x_wr.en.eq(beat_valid)]
        with m.If(beat_valid):
            m.d.sync += run_max.eq(new_max)
            with m.If(beat_end):
                _set(m, x_full, beat_slot, 1)
                _set(m, x_max, beat_slot, new_max)
                _set(m, x_len, beat_slot, beat_idx)

        # ---- stage 2, exp: one block per cycle through a 5-cycle pipeline -----------------
        xr = Signal(range(_X_SLOTS))
        ew = Signal(range(_E_SLOTS))
        ex_idx = Signal(range(L))
        ex_go = x_full[xr] & ~e_full[ew]
        ex_last = ex_idx == x_len[xr]
        m.d.comb += x_rd.addr.eq(addr(xr, ex_idx))
        with m.If(ex_go):
            m.d.sync += ex_idx.eq(Mux(ex_last, 0, ex_idx + 1))
            with m.If(ex_last):
                m.d.sync += [xr.eq(xr + 1), ew.eq(ew + 1)]
                _set(m, x_full, xr, 0)
        tag = data.StructLayout({"valid": 1, "last": 1, "slot": range(_E_SLOTS), "idx": range(L)})
        tags = [Signal(tag, name=f"ex_tag{k}") for k in range(4)]
        m.d.sync += [tags[0].valid.eq(ex_go), tags[0].last.eq(ex_last), tags[0].slot.eq(ew),
                     tags[0].idx.eq(ex_idx)]
        m.d.sync += [tags[k + 1].eq(tags[k]) for k in range(3)]
        row_max = Signal(signed(sb))
        m.d.sync += row_max.eq(x_max[xr])
        # t1: row data arrives; d = max - x on included lanes
        diff = Signal(data.ArrayLayout(unsigned(self._diff_bits), B))
        mask1, mask2 = Signal(B, name="ex_mask1"), Signal(B, name="ex_mask2")
        xs = self._to_fixed(m, x_rd.data.block, "ex")
        m.d.sync += [diff[k].eq(Mux(x_rd.data.mask[k], row_max - xs[k], 0)) for k in range(B)]
        m.d.sync += [mask1.eq(x_rd.data.mask), mask2.eq(mask1)]
        # t2: u = round_shift(d * LOG2E, 16); its fraction addresses the LUT, n its shift
        n_max = self._e_bits + 1
        shift = Signal(data.ArrayLayout(range(n_max + 1), B))
        for k in range(B):
            u = Signal(self._u_bits, name=f"u{k}")
            m.d.comb += [u.eq((diff[k] * c.log2e + (1 << (LOG2E_FRAC - 1))) >> LOG2E_FRAC),
                         lut_rd[k].addr.eq(u[:cfg.softmax_frac])]
            n = u[cfg.softmax_frac:]
            m.d.sync += shift[k].eq(Mux(n > n_max, n_max, n))
        # t3: e = round_shift(LUT[r], n), 0 on excluded lanes
        exps = Signal(data.ArrayLayout(unsigned(self._e_bits), B))
        m.d.sync += [exps[k].eq(Mux(mask2[k], _round_shift_pos(lut_rd[k].data, shift[k]), 0))
                     for k in range(B)]
        # t4: store e, accumulate the row sum
        t4 = tags[3]
        acc = Signal(self._sum_bits)
        new_acc = _comb(m, _tree(m, (exps[k] for k in range(B)), lambda a, b: a + b, "ex_sum")
                        + Mux(t4.idx == 0, 0, acc), "ex_acc", self._sum_bits)
        m.d.comb += [e_wr.addr.eq(addr(t4.slot, t4.idx)), e_wr.data.eq(exps),
                     e_wr.en.eq(t4.valid)]
        with m.If(t4.valid):
            m.d.sync += acc.eq(new_acc)
            with m.If(t4.last):
                _set(m, e_full, t4.slot, 1)
                _set(m, e_sum, t4.slot, new_acc)
                _set(m, e_len, t4.slot, t4.idx)

        # ---- stage 3, div: recip = floor((2N + S) / 2S), div_bits quotient bits a cycle ----
        steps = self.div_cycles * self.div_bits
        dv = Signal(range(_E_SLOTS))
        dv_busy = Signal()
        dv_count = Signal(range(self.div_cycles))
        rem = Signal((2 * self._numer + (1 << self._sum_bits)).bit_length())
        den = Signal(self._sum_bits + steps)  # 2 S << (bit being decided)
        quo = Signal(steps)
        with m.If(~dv_busy & e_full[dv] & ~r_ready[dv]):
            m.d.sync += [dv_busy.eq(1), dv_count.eq(0), quo.eq(0),
                         rem.eq(2 * self._numer + e_sum[dv]),
                         den.eq(e_sum[dv] << steps)]
        with m.Elif(dv_busy):
            r, d, q = rem, den, quo
            for _ in range(self.div_bits):
                fits = r >= d
                r, d, q = Mux(fits, r - d, r), d >> 1, (q << 1) | fits
            m.d.sync += [rem.eq(r), den.eq(d), quo.eq(q), dv_count.eq(dv_count + 1)]
            with m.If(dv_count == self.div_cycles - 1):
                m.d.sync += [dv_busy.eq(0), dv.eq(dv + 1)]
                _set(m, r_ready, dv, 1)
                _set(m, recip, dv, q)

        # ---- stage 4, norm: p = round_shift(e * recip, recip_shift), stalled by o.ready ----
        nr = Signal(range(_E_SLOTS))
        nr_idx = Signal(range(L))
        advance = ~self.o.valid | self.o.ready
        nr_go = r_ready[nr] & advance
        nr_last = nr_idx == e_len[nr]
        m.d.comb += [e_rd.addr.eq(addr(nr, nr_idx)), e_rd.en.eq(advance)]
        with m.If(nr_go):
            m.d.sync += nr_idx.eq(Mux(nr_last, 0, nr_idx + 1))
            with m.If(nr_last):
                m.d.sync += nr.eq(nr + 1)
                _set(m, e_full, nr, 0)
                _set(m, r_ready, nr, 0)
        v1, last1, v2, last2 = Signal(), Signal(), Signal(), Signal()
        recip1 = Signal(self._q_bits)
        prod = Signal(data.ArrayLayout(unsigned(self._e_bits + self._q_bits), B))
        with m.If(advance):
            m.d.sync += [v1.eq(nr_go), last1.eq(nr_last), recip1.eq(recip[nr]),
                         v2.eq(v1), last2.eq(last1),
                         self.o.valid.eq(v2), self.o.payload.last.eq(last2)]
            m.d.sync += [prod[k].eq(e_rd.data[k] * recip1) for k in range(B)]
            m.d.sync += [self.o.payload.p[k].eq(_round_shift_pos(prod[k], c.recip_shift))
                         for k in range(B)]
        return m


#: Cycles of :meth:`SoftmaxUnit.latency` besides the two passes over the row and the divider.
_LATENCY_FIXED = 9
