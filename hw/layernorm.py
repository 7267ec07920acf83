"""LayerNorm unit: standardise rows of fixed-point residual sums, then apply gamma and beta.

The unit computes, bit for bit, :func:`bct.model.nonlinear.layernorm_fixed` followed by
:func:`bct.model.nonlinear.layernorm_affine` (docs/arithmetic.md section 6, docs/hardware.md
"LayerNorm unit"). Rows enter and leave one block (``B`` values) per beat.
"""

from __future__ import annotations

from math import ceil, isqrt

import numpy as np
from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bct.config import BlockFormat, Config, ConfigError
from bct.hw.blockify import Blockifier
from bct.model.blocks import BlockTensor
from bct.model.constants import LN_D_CAP, derive, ln_eps_units
from bct.model.fixed import round_shift

__all__ = ["LayerNormUnit", "ROOT_STEPS_MAX", "MAX_SETS"]

#: Most square-root / division iterations chained in one cycle (the timing budget of the
#: per-row root: each is one compare-subtract of about ``ln_sqrt_bits + 3`` bits).
ROOT_STEPS_MAX = 6

#: Most parameter sets of one unit.
MAX_SETS = 4096

#: Cycles of the per-row root unit besides its iterations: ``D`` and ``eps'``, then the shift.
_ROOT_FIXED_CYCLES = 2

#: Pipeline depth of the statistics adders (block sums, squares, accumulation into the queue).
_STATS_DEPTH = 3

#: Cycles from the reader loading a row's root to its first output beat: the first buffer
#: read, then the registers num, product, y, gamma product and output.
_NORM_DEPTH = 6


def _bits(v: int) -> int:
    """Signed width holding ``-v .. v``."""
    return int(v).bit_length() + 1


def _clip(v, lim: int):
    return Mux(v > lim, lim, Mux(v < -lim, -lim, v))


def _round_shift_right(x, s_minus_1):
    """RHAZ ``x * 2**-(s_minus_1 + 1)`` for a shift of at least one:
    ``((x - (x < 0)) >> (s - 1)) + 1) >> 1`` (arithmetic shifts), equal to
    ``(x + 2**(s-1) - (x < 0)) >> s``."""
    return (((x - x[-1]) >> s_minus_1) + 1) >> 1


class LayerNormUnit(wiring.Component):
    """Row-wise LayerNorm with affine gamma / beta, one block per cycle at steady state.

    Per row of ``N = width`` values ``x`` (``|x| <= cfg.add_bound``) with power-of-two ``scale``
    the unit outputs ``layernorm_affine(layernorm_fixed(Fixed(x, scale)), gamma, beta)``:

    1. *Statistics* (while the row streams into a row buffer): ``S1 = sum x`` and
       ``S2 = sum x**2`` with ``B`` squarers and two adder trees.
    2. *Root* (once per row, iterative): ``D' = min(N S2 - S1**2 + eps', 2**60)`` with ``eps'``
       from a table over the scale range (:func:`bct.model.constants.ln_eps_units`), the even
       normalising shift ``2t``, the rounded root ``r`` (digit by digit) and
       ``inv = round(2**(2W) / r)`` (restoring division), :attr:`root_steps` iterations per cycle.
    3. *Normalise* (reading the buffered row): ``y = round_shift((N x - S1) inv, 2W - F + t)``,
       then ``round_shift(y qg, shift) + b`` with saturation, ``B`` lanes.

    Rows are buffered in :attr:`row_slots` row slots of one memory, so rows keep streaming in
    while earlier rows wait for their root and are normalised. ``gamma`` and ``beta`` live in
    a parameter RAM of :attr:`sets` sets (one word per block: ``qg``, the gamma shift and the
    beta term ``round_shift(qb, -(eb + ln_out_frac))``, :meth:`param_words`), written through
    the ``param`` port or initialised from ``gamma`` / ``beta`` (set 0); each row selects its
    set, so one unit serves every LayerNorm of a model.

    Parameters
    ----------
    cfg : Config
    width : int
        ``N``, the row length: a multiple of ``cfg.block_size``, at most ``cfg.max_reduction``.
    gamma, beta : BlockTensor, optional
        ``(width,)`` tensors in ``cfg.vector_format``: the initial content of set 0 (both or
        neither; without them every set starts as zeros and must be written before use).
    sets : int
        Parameter sets held (1 .. 4096), e.g. ``2 * layers`` for every LayerNorm of an encoder.

    Attributes
    ----------
    i : stream.Interface, in
        Payload :attr:`in_layout`: ``value`` (``B`` x ``signed(add_bits)``, one block of the
        row), ``scale`` (the row's scale), ``last`` (the row's final block) and, when
        ``sets > 1``, ``set`` (the row's parameter set); ``scale`` and ``set`` are read on the
        row's last beat. Row boundaries are counted internally (``N / B`` beats); ``last`` is
        checked.
    o : stream.Interface, out
        Payload :attr:`out_layout`: ``value`` (``B`` x ``signed(ln_out_bits)``), ``scale``
        (always ``-ln_out_frac``) and ``last``: the Blockifier's input layout with ``last``, so
        :meth:`blockifier` connects directly.
    param : stream.Interface, in
        Writes one parameter word per beat (always ready): payload :attr:`param_layout`,
        ``addr = set * beats + block`` and ``data`` (:meth:`param_words`). A set must not be
        written while a row using it is inside the unit.
    framing_error : Signal, out
        Sticky: an input ``last`` disagreed with the beat count (cleared by reset only).
    beats : int
        ``N / B``, beats per row.
    root_steps : int
        Root / division iterations per cycle: the fewest (at most :data:`ROOT_STEPS_MAX`)
        for which :attr:`row_cycles` <= :attr:`beats`.
    row_cycles : int
        Cycles the root unit spends on one row; rows flow at one per
        ``max(beats, row_cycles)`` cycles.
    row_slots : int
        Rows the buffer holds: enough for full throughput (see docs/hardware.md).
    latency : int
        Cycles from a row's first input beat to its first output beat without stalls.

    Notes
    -----
    ``verilator --lint-only -Wall`` on the generated Verilog is clean with these waivers, all
    for the way Amaranth / Yosys write Verilog (tests/test_hw_layernorm.py runs it):
    ``WIDTH`` (operands emitted narrower than their context), ``CASEINCOMPLETE`` (the root
    FSM becomes one ``casez`` per driven signal, the arms that do not drive it pruned, after a
    default assignment), ``PROCASSINIT`` (registers carry their reset value as an initialiser),
    ``DECLFILENAME`` (submodules named ``<top>.<name>``) and ``UNUSEDSIGNAL`` (a debug wire per
    named signal and struct field, the FIFOs' unused level outputs, the dropped low bit of
    ``t_pre >> 1``).

    Raises
    ------
    ConfigError
        If ``width`` does not fit the config.
    ValueError
        If gamma / beta are not ``(width,)`` tensors in the vector format or out of range.
    """

    def __init__(self, cfg: Config, width: int, gamma: BlockTensor | None = None,
                 beta: BlockTensor | None = None, *, sets: int = 1):
        if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
            raise ConfigError(f"LayerNorm width must be a positive int, not {width!r}")
        cfg.check_reduction(width, "LayerNorm width")
        if isinstance(sets, bool) or not isinstance(sets, int) or not 1 <= sets <= MAX_SETS:
            raise ConfigError(f"LayerNorm sets must be an int in 1..{MAX_SETS}, not {sets!r}")
        if (gamma is None) != (beta is None):
            raise ValueError("LayerNorm gamma and beta must be given together")
        self.cfg = cfg
        self.width = width
        self.sets = sets
        B = cfg.block_size
        self.beats = width // B
        W = cfg.ln_sqrt_bits
        # one root iteration produces one bit; pad the counts to multiples of root_steps
        self._sqrt_iters, self._div_iters = W + 1, W + 2
        self.root_steps = next(
            (u for u in range(1, ROOT_STEPS_MAX + 1) if self._row_cycles(u) <= self.beats),
            ROOT_STEPS_MAX)
        self.row_cycles = self._row_cycles(self.root_steps)
        # cycles from a row's last input beat until its root is in the queue to the reader:
        # statistics, the queue to the root unit, its pop, the root
        ready_after = _STATS_DEPTH + 2 + self.row_cycles
        # rows flow at one per `period` cycles; a row's slot is taken from its first beat
        # until one cycle after its last read, ready_after + 2 beats + 1 cycles at least
        period = max(self.beats, self.row_cycles)
        self.row_slots = ceil((ready_after + 2 * self.beats + 1) / period)
        self.latency = self.beats + ready_after + _NORM_DEPTH

        lo, hi = cfg.act_format.e_min - cfg.acc_guard_bits, cfg.act_format.e_max - cfg.acc_guard_bits
        self._scale_shape = signed(max(_bits(hi), _bits(-lo - 1)))
        in_fields = {
            "value": data.ArrayLayout(signed(cfg.add_bits), B),
            "scale": self._scale_shape,
            "last": unsigned(1),
        }
        if sets > 1:
            in_fields["set"] = range(sets)
        self.in_layout = data.StructLayout(in_fields)
        self.out_layout = data.StructLayout({
            "value": data.ArrayLayout(signed(cfg.ln_out_bits), B),
            "scale": signed(_bits(cfg.ln_out_frac)),
            "last": unsigned(1),
        })
        lim = (1 << (cfg.ln_out_bits - 1)) - 1
        self.word_layout = data.StructLayout({
            "qg": data.ArrayLayout(signed(cfg.vector_bits), B),
            "shift": range(self._gp_shape.width + cfg.ln_out_bits + 2),
            "b": data.ArrayLayout(signed(_bits(2 * lim)), B),
        })
        self.param_layout = data.StructLayout({"addr": range(sets * self.beats),
                                               "data": self.word_layout})
        self._eps_table, self._eps_scale0 = self._eps_rom()
        self._param_init = [{}] * (sets * self.beats)
        if gamma is not None:
            self._param_init[:self.beats] = self._param_dicts(gamma, beta)
        super().__init__({
            "i": In(stream.Signature(self.in_layout)),
            "o": Out(stream.Signature(self.out_layout)),
            "param": In(stream.Signature(self.param_layout)),
            "framing_error": Out(1),
        })

    def param_words(self, gamma: BlockTensor, beta: BlockTensor) -> list[int]:
        """The parameter words of one set, in block order (``data`` of the ``param`` port at
        ``addr = set * beats + block``, or the lines of a memory image).

        Parameters
        ----------
        gamma, beta : BlockTensor
            ``(width,)`` tensors in ``cfg.vector_format``.

        Returns
        -------
        list of int
            :attr:`beats` words of :attr:`word_layout`.

        Raises
        ------
        ValueError
            If gamma / beta are not ``(width,)`` tensors in the vector format or out of range.
        """
        return [self.word_layout.const(d).as_value().value
                for d in self._param_dicts(gamma, beta)]

    def blockifier(self, fmt: BlockFormat | None = None) -> Blockifier:
        """A :class:`~bct.hw.blockify.Blockifier` whose input is this unit's output
        (``wiring.connect(m, ln.o, blk.i)``), re-encoding it into ``fmt`` (default the
        activation format) with ``last`` carried along: together exactly
        :func:`bct.model.nonlinear.layernorm`."""
        return Blockifier.for_payload(self.cfg, self.out_layout, fmt or self.cfg.act_format)

    # --------------------------------------------------------------------------------------
    # Build-time tables
    def _row_cycles(self, u: int) -> int:
        return _ROOT_FIXED_CYCLES + ceil(self._sqrt_iters / u) + ceil(self._div_iters / u)

    def _eps_rom(self) -> tuple[list[int], int]:
        """``eps'`` for every representable scale, trimmed to the scales where it changes
        (it is non-increasing in the scale: capped below the table, zero above it)."""
        c = derive(self.cfg)
        half = 1 << (self._scale_shape.width - 1)
        lo, hi = -half, half - 1
        table = [ln_eps_units(c, self.width, s, LN_D_CAP) for s in range(lo, hi + 1)]
        first = max((i for i, v in enumerate(table) if v == table[0]), default=0)
        last = min(i for i, v in enumerate(table) if v == table[-1])
        last = max(last, first)
        return table[first:last + 1], lo + first

    def _param_dicts(self, gamma: BlockTensor, beta: BlockTensor) -> list[dict]:
        """Per block: gamma mantissas, the gamma shift plus ``ln_out_bits + 1`` (so it is never
        negative) and the beta term, clamped to ``+-2 lim`` (the output saturates anyway)."""
        cfg, width = self.cfg, self.width
        for name, p in (("gamma", gamma), ("beta", beta)):
            if not isinstance(p, BlockTensor) or p.shape != (width,) or p.fmt != cfg.vector_format:
                raise ValueError(f"LayerNorm {name} must be a ({width},) tensor in the vector format")
            p.check()
        lim = (1 << (cfg.ln_out_bits - 1)) - 1
        lift = cfg.ln_out_bits + 1  # layernorm_affine clamps left shifts at this
        g_shift = np.maximum(cfg.ln_frac - cfg.ln_out_frac - gamma.exp, -lift)
        g_shift = np.minimum(g_shift, self._gp_shape.width) + lift  # beyond: the result is 0
        b = round_shift(beta.blocks, np.maximum(-(beta.exp[:, None] + cfg.ln_out_frac), -lift))
        b = np.clip(b, -2 * lim, 2 * lim)
        return [{"qg": [int(v) for v in gamma.blocks[j]], "shift": int(g_shift[j]),
                 "b": [int(v) for v in b[j]]} for j in range(self.beats)]

    @property
    def _y_shape(self):
        """``|y| <= sqrt(N) 2**F`` up to the root's and reciprocal's rounding (< 25 % for
        ``W >= 4``): twice ``ceil(sqrt(N)) 2**F`` bounds it."""
        return signed(_bits(2 * (isqrt(self.width - 1) + 1) << self.cfg.ln_frac))

    @property
    def _gp_shape(self):
        return signed(self._y_shape.width + self.cfg.vector_bits)

    # --------------------------------------------------------------------------------------
    def elaborate(self, platform):
        cfg, N, n, R = self.cfg, self.width, self.beats, self.row_slots
        B, W, F = cfg.block_size, cfg.ln_sqrt_bits, cfg.ln_frac
        u = self.root_steps
        recip_shift = derive(cfg).ln_recip_shift
        lim = (1 << (cfg.ln_out_bits - 1)) - 1
        s1_shape = signed(_bits(N * cfg.add_bound))
        s2_shape = unsigned((N * cfg.add_bound ** 2).bit_length())
        d_shape = unsigned((N * N * cfg.add_bound ** 2).bit_length())
        cap_bits = LN_D_CAP.bit_length()
        t_min, t_max = (1 - 2 * W) >> 1, (cap_bits - 2 * W + 1) >> 1
        sh_shape = unsigned((recip_shift - F + t_max - 1).bit_length())
        m = Module()

        # ---- row buffer and slot accounting --------------------------------------------
        m.submodules.buf = buf = Memory(shape=self.in_layout["value"].shape, depth=R * n, init=[])
        wp, rp = buf.write_port(), buf.read_port()
        used = Signal(range(R + 1))          # slots claimed by rows not yet fully read
        claim, release = Signal(), Signal()
        m.d.sync += used.eq(used + claim - release)

        # ---- input, statistics -------------------------------------------------------------
        wi = Signal(range(n))                # beat index in the row being written
        wa = Signal(range(R * n))
        accept = Signal()
        row_end = wi == n - 1
        m.d.comb += [
            self.i.ready.eq((wi != 0) | (used < R)),
            accept.eq(self.i.valid & self.i.ready),
            claim.eq(accept & (wi == 0)),
            wp.addr.eq(wa), wp.data.eq(self.i.payload.value), wp.en.eq(accept),
        ]
        with m.If(accept):
            m.d.sync += [wi.eq(Mux(row_end, 0, wi + 1)), wa.eq(Mux(wa == R * n - 1, 0, wa + 1))]
            with m.If(self.i.payload.last != row_end):
                m.d.sync += self.framing_error.eq(1)

        x_shape = signed(cfg.add_bits)
        xa = [Signal(x_shape) for _ in range(B)]
        sq = [Signal(unsigned(2 * cfg.add_bits - 1)) for _ in range(B)]
        s1a, s1b = Signal(s1_shape), Signal(s1_shape)
        s2b = Signal(s2_shape)
        acc1, acc2 = Signal(s1_shape), Signal(s2_shape)
        va, vb, vc = Signal(), Signal(), Signal()
        la, lb, lc = Signal(), Signal(), Signal()
        sca, scb, scc = (Signal(self._scale_shape) for _ in range(3))
        set_shape = range(max(self.sets, 2))  # one constant-0 bit for one set (no 0-bit wires)
        sea, seb, sec = (Signal(set_shape) for _ in range(3))
        if self.sets > 1:
            m.d.sync += [sea.eq(self.i.payload.set), seb.eq(sea), sec.eq(seb)]
        m.d.sync += [va.eq(accept), la.eq(row_end), sca.eq(self.i.payload.scale),
                     vb.eq(va), lb.eq(la), scb.eq(sca), vc.eq(vb), lc.eq(lb), scc.eq(scb),
                     s1a.eq(sum(xa)), s1b.eq(s1a), s2b.eq(sum(sq))]
        m.d.sync += [xa[k].eq(self.i.payload.value[k]) for k in range(B)]
        m.d.sync += [sq[k].eq(xa[k] * xa[k]) for k in range(B)]

        q1_layout = data.StructLayout({"s1": s1_shape, "s2": s2_shape, "scale": self._scale_shape,
                                       "set": set_shape})
        m.submodules.q1 = q1 = SyncFIFO(width=q1_layout.size, depth=R)
        q1_in = Signal(q1_layout)
        m.d.comb += [q1_in.s1.eq(acc1 + s1b), q1_in.s2.eq(acc2 + s2b), q1_in.scale.eq(scc),
                     q1_in.set.eq(sec),
                     q1.w_data.eq(q1_in), q1.w_en.eq(vc & lc)]
        with m.If(vc):
            m.d.sync += [acc1.eq(Mux(lc, 0, acc1 + s1b)), acc2.eq(Mux(lc, 0, acc2 + s2b))]

        # ---- root unit (once per row) ------------------------------------------------------
        q1_out = data.View(q1_layout, q1.r_data)
        m.submodules.eps = eps = Memory(shape=unsigned(cap_bits), depth=len(self._eps_table),
                                        init=self._eps_table)
        eps_rp = eps.read_port()
        s_lo = self._eps_scale0
        s_hi = s_lo + len(self._eps_table) - 1
        pop = Signal()
        m.d.comb += [
            eps_rp.addr.eq(Mux(q1_out.scale < s_lo, s_lo,
                               Mux(q1_out.scale > s_hi, s_hi, q1_out.scale)) - s_lo),
            eps_rp.en.eq(pop), q1.r_en.eq(pop),
        ]
        rs1, rs2, rset = Signal(s1_shape), Signal(s2_shape), Signal(set_shape)
        with m.If(pop):
            m.d.sync += [rs1.eq(q1_out.s1), rs2.eq(q1_out.s2), rset.eq(q1_out.set)]

        d = Signal(d_shape)
        m.d.comb += d.eq(N * rs2 - rs1 * rs1)  # >= 0 (Cauchy-Schwarz)
        d_eps = d + eps_rp.data
        de = Signal(unsigned(cap_bits))      # D' = min(D + eps', cap)
        bl = Signal(range(cap_bits + 1))     # bit length of D'
        for k in range(cap_bits):
            with m.If(de[k]):
                m.d.comb += bl.eq(k + 1)
        t_pre = Signal(signed(_bits(cap_bits)))
        t = Signal(signed(max(_bits(t_max), _bits(-t_min))))
        m.d.comb += [t_pre.eq(bl - (2 * W - 1)), t.eq(t_pre >> 1)]
        up_amt = Signal(range(2 * W + 1))    # t <= 0: exact left shift (then D' < 2**(2W-1))
        down_amt = Signal(range(2 * max(t_max, 1)))  # t > 0: 2t - 1
        m.d.comb += [up_amt.eq(Mux(t <= 0, -2 * t, 0)), down_amt.eq(Mux(t > 0, 2 * t - 1, 0))]
        dn = Mux(t <= 0, de[:2 * W] << up_amt, ((de >> down_amt) + 1) >> 1)
        rt = Signal.like(t)

        # digit-by-digit root of dn < 2**(2K), K root bits (leading zero digits are harmless)
        K = u * ceil(self._sqrt_iters / u)
        sx, sr, srem = Signal(2 * K), Signal(K), Signal(K + 2)  # remainder <= 2 * root
        sx_, sr_, srem_ = sx, sr, srem
        for j in range(u):  # one signal per step: the chain stays a chain in the netlist
            cur, ge = Signal(K + 4, name=f"sqrt_cur{j}"), Signal(name=f"sqrt_ge{j}")
            trial = Cat(Const(1, 2), sr_)
            step = [Signal.like(sx, name=f"sqrt_x{j}"), Signal.like(sr, name=f"sqrt_r{j}"),
                    Signal.like(srem, name=f"sqrt_rem{j}")]
            m.d.comb += [cur.eq(Cat(sx_[-2:], srem_)), ge.eq(cur >= trial),
                         step[0].eq(sx_ << 2), step[1].eq(Cat(ge, sr_)),
                         step[2].eq(Mux(ge, cur - trial, cur))]
            sx_, sr_, srem_ = step
        root = Signal(W + 1)                 # rounded: + (remainder > floor root)
        m.d.comb += root.eq(sr_ + (srem_ > sr_))

        # inv = floor((2**(2W+1) + r) / (2 r)) by restoring division, Q quotient bits;
        # the partial remainder starts at num >> Q < 2 r
        Q = u * ceil(self._div_iters / u)
        num0 = Signal(2 * W + 2)
        m.d.comb += num0.eq((1 << (recip_shift + 1)) + root)
        dv, dx, dq, drem = Signal(W + 2), Signal(Q), Signal(Q), Signal(W + 3)
        rzero = Signal()
        dx_, dq_, drem_ = dx, dq, drem
        for j in range(u):
            cur, ge = Signal(W + 4, name=f"div_cur{j}"), Signal(name=f"div_ge{j}")
            step = [Signal.like(dx, name=f"div_x{j}"), Signal.like(dq, name=f"div_q{j}"),
                    Signal.like(drem, name=f"div_rem{j}")]
            m.d.comb += [cur.eq(Cat(dx_[-1], drem_)), ge.eq(cur >= dv),
                         step[0].eq(dx_ << 1), step[1].eq(Cat(ge, dq_)),
                         step[2].eq(Mux(ge, cur - dv, cur))]
            dx_, dq_, drem_ = step

        q2_layout = data.StructLayout({"s1": s1_shape, "inv": unsigned(W + 2), "sh": sh_shape,
                                       "set": set_shape})
        m.submodules.q2 = q2 = SyncFIFO(width=q2_layout.size, depth=R)
        q2_in = Signal(q2_layout)
        m.d.comb += [q2_in.s1.eq(rs1), q2_in.inv.eq(Mux(rzero, 0, dq_)), q2_in.set.eq(rset),
                     q2_in.sh.eq(recip_shift - F - 1 + rt), q2.w_data.eq(q2_in)]

        count = Signal(range(max(K, Q) // u))
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += pop.eq(q1.r_rdy)
                with m.If(pop):
                    m.next = "DIFF"
            with m.State("DIFF"):    # D' = min(N S2 - S1**2 + eps', cap)
                m.d.sync += de.eq(Mux(d_eps > LN_D_CAP, LN_D_CAP, d_eps))
                m.next = "SHIFT"
            with m.State("SHIFT"):   # t and dn = round_shift(D', 2t)
                m.d.sync += [sx.eq(dn), sr.eq(0), srem.eq(0), rt.eq(t), count.eq(0)]
                m.next = "ROOT"
            with m.State("ROOT"):    # rounded square root, root_steps digits per cycle
                m.d.sync += [sx.eq(sx_), sr.eq(sr_), srem.eq(srem_), count.eq(count + 1)]
                with m.If(count == K // u - 1):
                    m.d.sync += [dv.eq(root << 1), dx.eq(num0[:Q]), drem.eq(num0 >> Q),
                                 dq.eq(0), rzero.eq(root == 0), count.eq(0)]
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):  # inv = round(2**(2W) / r), root_steps bits per cycle
                m.d.sync += [dx.eq(dx_), dq.eq(dq_), drem.eq(drem_), count.eq(count + 1)]
                with m.If(count == Q // u - 1):
                    m.d.comb += [q2.w_en.eq(1), pop.eq(q1.r_rdy)]  # next row back to back
                    m.next = "IDLE"
                    with m.If(pop):
                        m.next = "DIFF"

        # ---- normalise and affine (reads the buffered row) ---------------------------------
        advance = ~self.o.valid | self.o.ready
        q2_out = data.View(q2_layout, q2.r_data)
        active = Signal()
        ri = Signal(range(n))                # beat index in the row being read
        ra = Signal(range(R * n))
        row = Signal(q2_layout)              # parameters of the row being read
        issue = Signal()
        load = Signal()
        m.d.comb += [
            issue.eq(active & advance),
            release.eq(issue & (ri == n - 1)),
            load.eq(q2.r_rdy & (~active | release)),
            q2.r_en.eq(load),
            rp.addr.eq(ra), rp.en.eq(issue),
        ]
        with m.If(issue):
            m.d.sync += [ri.eq(Mux(release, 0, ri + 1)), ra.eq(Mux(ra == R * n - 1, 0, ra + 1)),
                         active.eq(~release)]
        with m.If(load):
            m.d.sync += [row.eq(q2_out), active.eq(1)]

        # pipeline: buffer read | N x - S1 | * inv | round -> y, parameter RAM | * qg | output
        m.submodules.affine = affine = Memory(shape=self.word_layout, depth=self.sets * n,
                                              init=self._param_init)
        arp, awp = affine.read_port(), affine.write_port()
        m.d.comb += [self.param.ready.eq(1), awp.addr.eq(self.param.payload.addr),
                     awp.data.eq(self.param.payload.data), awp.en.eq(self.param.valid)]
        num_shape = signed(_bits(2 * N * cfg.add_bound))
        v = [Signal(name=f"v{k}") for k in range(1, 6)]
        last = [Signal(name=f"last{k}") for k in range(1, 6)]
        idx = [Signal(range(self.sets * n), name=f"idx{k}") for k in range(1, 4)]  # param addr
        p1 = Signal(q2_layout)
        inv2, sh2, sh3 = Signal(W + 2), Signal(sh_shape), Signal(sh_shape)
        nums = [Signal(num_shape, name=f"num{k}") for k in range(B)]
        prods = [Signal(signed(num_shape.width + W + 2), name=f"prod{k}") for k in range(B)]
        ys = [Signal(self._y_shape, name=f"y{k}") for k in range(B)]
        gps = [Signal(self._gp_shape, name=f"gp{k}") for k in range(B)]
        shift5 = Signal.like(arp.data.shift)
        b5 = Signal.like(arp.data.b)
        lift = cfg.ln_out_bits + 1
        with m.If(advance):
            m.d.sync += [
                v[0].eq(issue), last[0].eq(ri == n - 1), idx[0].eq(row.set * n + ri), p1.eq(row),
                v[1].eq(v[0]), last[1].eq(last[0]), idx[1].eq(idx[0]), inv2.eq(p1.inv), sh2.eq(p1.sh),
                v[2].eq(v[1]), last[2].eq(last[1]), idx[2].eq(idx[1]), sh3.eq(sh2),
                v[3].eq(v[2]), last[3].eq(last[2]),
                v[4].eq(v[3]), last[4].eq(last[3]), shift5.eq(arp.data.shift), b5.eq(arp.data.b),
                self.o.valid.eq(v[4]), self.o.payload.last.eq(last[4]),
                self.o.payload.scale.eq(-cfg.ln_out_frac),
            ]
            for k in range(B):
                z = (gps[k] << (lift + 1)) - gps[k][-1]
                g = _clip(((z >> shift5) + 1) >> 1, lim)
                m.d.sync += [
                    nums[k].eq(N * rp.data[k] - p1.s1),
                    prods[k].eq(nums[k] * inv2),
                    ys[k].eq(_round_shift_right(prods[k], sh3)),
                    gps[k].eq(ys[k] * arp.data.qg[k]),
                    self.o.payload.value[k].eq(_clip(g + b5[k], lim)),
                ]
        m.d.comb += [arp.addr.eq(idx[2]), arp.en.eq(advance)]
        return m
