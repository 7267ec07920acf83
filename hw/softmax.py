"""Row-wise softmax unit: block-format scores in, fixed-point probabilities out.

Computes exactly :func:`bct.model.nonlinear.softmax_fixed` of
``bct.model.blocks.to_fixed(scores, cfg.softmax_frac, cfg.softmax_bits)`` (docs/arithmetic.md
section 5), one block of ``B`` lanes per beat and, at steady state, one block per cycle for rows
of any length. The dataflow, buffering, latency and resources are described in
docs/hardware.md ("Softmax unit").
"""

from __future__ import annotations

from amaranth import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bct.config import Config
from bct.hw.layouts import block_layout
from bct.model.constants import LOG2E_FRAC, derive
from bct.model.fixed import round_div_int

__all__ = ["SoftmaxUnit"]

#: Cycles of :meth:`SoftmaxUnit.latency` besides the two passes over the row and the divider:
#: 1 to store the row's last beat, 1 for its descriptor to leave the row queue, 4 for the
#: exp pipeline, 1 for the divider's input register, 1 for the reciprocal queue, 3 for norm.
_LATENCY_FIXED = 9
#: Cycles a block spends in the exponential buffer besides ``L`` and the divider's stages
#: (see :attr:`SoftmaxUnit.e_depth`).
_E_EXTRA = 6
#: Cycles a block spends in the input buffer besides ``L`` (see :attr:`SoftmaxUnit.x_depth`).
_X_EXTRA = 2


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


def _round_shift_pos(x, s):
    """``round_shift(x, s)`` of a non-negative ``x`` by a variable ``s >= 0``: halving once
    fewer and rounding the last bit, ``(((x << 1) >> s) + 1) >> 1``, is exact for ``s = 0`` too."""
    return (((x << 1) >> s) + 1) >> 1


def _next(ptr, depth):
    """Ring-buffer pointer increment (wraps at ``depth``, which need not be a power of two)."""
    return Mux(ptr == depth - 1, 0, ptr + 1)


class SoftmaxUnit(wiring.Component):
    """Softmax over rows of block-format scores, bit-exact with ``softmax_fixed``.

    A row is a sequence of 1 .. ``max_len / B`` input beats, each one block of ``B`` scores in
    ``cfg.act_format`` with one mask bit per lane (1: included, as the model's ``mask``; 0:
    probability 0) and ``last`` on the row's final block. A row that reaches ``max_len / B``
    blocks ends there whether or not ``last`` is set. The output is one beat per input block:
    ``B`` probabilities with ``cfg.softmax_out_frac`` fraction bits and ``last`` on the row's
    final block. A row without any included lane (which the model refuses) gives all zeros.

    Four stages, all ``B`` lanes in parallel, connected by ring buffers of blocks and queues of
    row descriptors, so several (short) rows are in flight in every stage:

    1. *in*: converts each block to fixed point (one shared barrel shift, saturation), takes
       the running maximum over included lanes and stores the raw block in the input ring;
       at the row's end ``(max, length)`` enters the row queue;
    2. *exp*: reads the row back, ``u = round_shift((max - x) * LOG2E, 16)``,
       ``e = round_shift(LUT[u mod 2**f], u >> f)`` (``B`` LUT ROMs, ``B`` constant
       multipliers), writes ``e`` into the exponential ring and sums the row;
    3. *div*: ``recip = round_div(2**(recip_shift + out_frac), sum)``, a pipelined restoring
       divider of :attr:`div_stages` stages retiring ``div_bits`` quotient bits each, so it
       accepts one row per cycle; ``(recip, length)`` enters the reciprocal queue;
    4. *norm*: reads ``e`` back, ``p = round_shift(e * recip, recip_shift)`` (``B``
       multipliers), with back-pressure from the output.

    Latency (first block accepted to first output valid, idle unit, ``L`` blocks):
    ``2 L + div_stages + 9`` cycles (:meth:`latency`). Steady state: one block per cycle for
    back-to-back rows of any length (:meth:`row_period` is ``L``). The per-lane cost (a LUT
    read port, a constant multiplier, a ``16 x 24``-bit multiplier at default, three small
    barrel shifters) is what one block per cycle needs; see docs/hardware.md for the resource
    count.

    ``verilator --lint-only -Wall`` is clean except five waivers, all for the way Amaranth and
    Yosys write Verilog (tests/test_hw_softmax.py, ``LINT_WAIVERS``): ``WIDTHEXPAND`` /
    ``WIDTHTRUNC`` (operands narrower / wider than their context), ``PROCASSINIT`` (reset values
    as declaration initialisers), ``DECLFILENAME`` (the queues are submodules in the same file)
    and ``UNUSEDSIGNAL`` (an unread alias wire per named signal and layout field, unread high
    bits of intermediate results, the queues' unused level outputs).

    Parameters
    ----------
    cfg : Config
    max_len : int
        Longest row in scores: a multiple of ``cfg.block_size`` up to ``cfg.max_reduction``.
    div_bits : int
        Quotient bits per divider pipeline stage (1 .. its quotient width): more bits mean
        fewer stages (:attr:`div_stages`, less latency and fewer registers) for a longer adder
        chain per stage.

    Attributes
    ----------
    i : stream.Interface, in
        Payload :meth:`input_layout` ``{"block", "mask", "last"}``.
    o : stream.Interface, out
        Payload :meth:`output_layout` ``{"p", "last"}``.
    div_stages : int
        Pipeline stages of the divider, ``ceil(quotient bits / div_bits)``.
    x_depth, e_depth : int
        Blocks held by the input and exponential ring buffers (the fewest that keep one
        block per cycle flowing).

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
        self.div_stages = -(-self._q_bits // div_bits)
        self.x_depth = self.max_blocks + _X_EXTRA
        self.e_depth = self.max_blocks + self.div_stages + _E_EXTRA
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
        return 2 * blocks + self.div_stages + _LATENCY_FIXED

    def row_period(self, blocks: int) -> int:
        """Cycles per row at steady state, for back-to-back rows of ``blocks`` blocks with
        the output always ready: one block per cycle, whatever the row length."""
        return blocks

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
        XD, ED = self.x_depth, self.e_depth

        m.submodules.xbuf = xbuf = Memory(shape=self.i.payload.shape(), depth=XD, init=[])
        m.submodules.ebuf = ebuf = Memory(
            shape=data.ArrayLayout(unsigned(self._e_bits), B), depth=ED, init=[])
        m.submodules.lut = lut = Memory(shape=unsigned(self._e_bits), depth=len(c.exp2_lut),
                                        init=c.exp2_lut)
        x_wr, x_rd = xbuf.write_port(), xbuf.read_port()
        e_wr, e_rd = ebuf.write_port(), ebuf.read_port()
        lut_rd = [lut.read_port() for _ in range(B)]

        # row queues: every row queued holds at least one buffered block, so a queue as deep
        # as its ring never overflows
        xq_layout = data.StructLayout({"max": signed(sb), "len": range(L)})  # len: blocks - 1
        rq_layout = data.StructLayout({"recip": unsigned(self._q_bits), "len": range(L)})
        m.submodules.xq = xq = SyncFIFO(width=xq_layout.size, depth=XD)
        m.submodules.rq = rq = SyncFIFO(width=rq_layout.size, depth=ED)
        xq_in, rq_in = Signal(xq_layout), Signal(rq_layout)
        xq_out, rq_out = data.View(xq_layout, xq.r_data), data.View(rq_layout, rq.r_data)
        m.d.comb += [xq.w_data.eq(xq_in), rq.w_data.eq(rq_in)]

        # ---- stage 1, in: register the beat, then store it and update the row maximum -----
        x_used = Signal(range(XD + 1))       # blocks accepted and not yet read by exp
        in_idx = Signal(range(L))
        in_end = self.i.payload.last | (in_idx == L - 1)
        accept = Signal()
        m.d.comb += [self.i.ready.eq(x_used < XD), accept.eq(self.i.valid & self.i.ready)]
        beat = Signal(self.i.payload.shape())
        beat_valid, beat_end = Signal(), Signal()
        beat_idx = Signal(range(L))
        xw = Signal(range(XD))
        m.d.sync += [
            beat_valid.eq(accept),
            beat.eq(self.i.payload), beat_end.eq(in_end), beat_idx.eq(in_idx),
        ]
        with m.If(accept):
            m.d.sync += in_idx.eq(Mux(in_end, 0, in_idx + 1))

        xs = self._to_fixed(m, beat.block, "in")
        block_max = _tree(m, (Mux(beat.mask[k], xs[k], -lim) for k in range(B)),
                          lambda a, b: Mux(a > b, a, b), "in_max")
        run_max = Signal(signed(sb))
        new_max = _comb(m, Mux((beat_idx == 0) | (block_max > run_max), block_max, run_max),
                        "in_new_max")
        m.d.comb += [x_wr.addr.eq(xw), x_wr.data.eq(beat), x_wr.en.eq(beat_valid),
                     xq_in.max.eq(new_max), xq_in.len.eq(beat_idx),
                     xq.w_en.eq(beat_valid & beat_end)]
        with m.If(beat_valid):
            m.d.sync += [run_max.eq(new_max), xw.eq(_next(xw, XD))]

        # ---- stage 2, exp: one block per cycle through a 5-cycle pipeline -----------------
        e_used = Signal(range(ED + 1))       # blocks issued by exp and not yet read by norm
        xr = Signal(range(XD))
        ew = Signal(range(ED))
        ex_idx = Signal(range(L))
        ex_go = Signal()
        ex_last = ex_idx == xq_out.len
        m.d.comb += [ex_go.eq(xq.r_rdy & (e_used < ED)), x_rd.addr.eq(xr),
                     xq.r_en.eq(ex_go & ex_last)]
        with m.If(ex_go):
            m.d.sync += [ex_idx.eq(Mux(ex_last, 0, ex_idx + 1)), xr.eq(_next(xr, XD)),
                         ew.eq(_next(ew, ED))]
        tag = data.StructLayout({"valid": 1, "last": 1, "addr": range(ED), "idx": range(L)})
        tags = [Signal(tag, name=f"ex_tag{k}") for k in range(4)]
        row_max = Signal(signed(sb))
        m.d.sync += [tags[0].valid.eq(ex_go), tags[0].last.eq(ex_last), tags[0].addr.eq(ew),
                     tags[0].idx.eq(ex_idx), row_max.eq(xq_out.max)]
        m.d.sync += [tags[k + 1].eq(tags[k]) for k in range(3)]
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
        # t4: store e, accumulate the row sum; at the row's end the sum enters the divider
        t4 = tags[3]
        acc = Signal(self._sum_bits)
        new_acc = _comb(m, _tree(m, (exps[k] for k in range(B)), lambda a, b: a + b, "ex_sum")
                        + Mux(t4.idx == 0, 0, acc), "ex_acc", self._sum_bits)
        m.d.comb += [e_wr.addr.eq(t4.addr), e_wr.data.eq(exps), e_wr.en.eq(t4.valid)]
        dv_valid, dv_sum, dv_len = Signal(), Signal(self._sum_bits), Signal(range(L))
        m.d.sync += [dv_valid.eq(t4.valid & t4.last), dv_sum.eq(new_acc), dv_len.eq(t4.idx)]
        with m.If(t4.valid):
            m.d.sync += acc.eq(new_acc)

        # ---- stage 3, div: recip = floor((2N + S) / 2S), pipelined, div_bits per stage ----
        # quotient bit i (MSB first) compares the remainder with 2 S << (steps - 1 - i)
        steps = self.div_stages * self.div_bits
        rem_bits = (2 * self._numer + (1 << self._sum_bits)).bit_length()
        valid, rem, s, q, length = dv_valid, 2 * self._numer + dv_sum, dv_sum, Const(0, 1), dv_len
        for k in range(self.div_stages):
            r = rem
            for j in range(self.div_bits):
                d = s << (steps - (k * self.div_bits + j))
                fits = _comb(m, r >= d, f"div{k}_fits{j}")
                r = _comb(m, Mux(fits, r - d, r), f"div{k}_rem{j}", unsigned(rem_bits))
                q = q.shift_left(1) | fits
            regs = (Signal(name=f"div{k}_valid"), Signal(rem_bits, name=f"div{k}_rem"),
                    Signal(self._sum_bits, name=f"div{k}_sum"),
                    Signal((k + 1) * self.div_bits, name=f"div{k}_q"),
                    Signal(range(L), name=f"div{k}_len"))
            m.d.sync += [reg.eq(v) for reg, v in zip(regs, (valid, r, s, q, length))]
            valid, rem, s, q, length = regs
        m.d.comb += [rq_in.recip.eq(q), rq_in.len.eq(length), rq.w_en.eq(valid)]

        # ---- stage 4, norm: p = round_shift(e * recip, recip_shift), stalled by o.ready ----
        er = Signal(range(ED))
        nr_idx = Signal(range(L))
        advance = ~self.o.valid | self.o.ready
        nr_go = Signal()
        nr_last = nr_idx == rq_out.len
        m.d.comb += [nr_go.eq(rq.r_rdy & advance), rq.r_en.eq(nr_go & nr_last),
                     e_rd.addr.eq(er), e_rd.en.eq(advance)]
        with m.If(nr_go):
            m.d.sync += [nr_idx.eq(Mux(nr_last, 0, nr_idx + 1)), er.eq(_next(er, ED))]
        m.d.sync += [x_used.eq(x_used + accept - ex_go), e_used.eq(e_used + ex_go - nr_go)]
        v1, last1, v2, last2 = Signal(), Signal(), Signal(), Signal()
        recip1 = Signal(self._q_bits)
        prod = Signal(data.ArrayLayout(unsigned(self._e_bits + self._q_bits), B))
        with m.If(advance):
            m.d.sync += [v1.eq(nr_go), last1.eq(nr_last), recip1.eq(rq_out.recip),
                         v2.eq(v1), last2.eq(last1),
                         self.o.valid.eq(v2), self.o.payload.last.eq(last2)]
            m.d.sync += [prod[k].eq(e_rd.data[k] * recip1) for k in range(B)]
            m.d.sync += [self.o.payload.p[k].eq(_round_shift_pos(prod[k], c.recip_shift))
                         for k in range(B)]
        return m
