"""The GELU unit: one activation block (or accumulator row) in, its GELU as one activation
block out, per cycle.

:class:`GeluUnit` is the hardware form of :func:`bct.model.nonlinear.gelu` (docs/arithmetic.md,
section 4): conversion to fixed point, ``GELU(x) = max(x, 0) - h(|x|)`` with the correction
``h`` read from a table (:func:`bct.model.constants.derive`) and linearly interpolated, and the
:class:`~bct.hw.blockify.Blockifier` back to the block format.
"""

from __future__ import annotations

from amaranth import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from bct.config import Config
from bct.hw.blockify import Blockifier, pipeline_enables, round_shift_saturate, shift_code
from bct.hw.layouts import block_layout
from bct.model.constants import derive

__all__ = ["GeluUnit"]


def _round_shift_const(m: Module, v, s: int, name: str) -> Signal:
    """``round_shift(v, s)`` for a signed ``v`` and a constant ``s >= 0``: one adder whose
    carry-in is the sign (``v + 2**(s-1) - (v < 0)``) and a fixed arithmetic shift."""
    out = Signal(signed(len(v) + 1), name=name)
    m.d.comb += out.eq(v if s == 0 else (v + (1 << (s - 1)) - v[-1]).shift_right(s))
    return out


class GeluUnit(wiring.Component):
    """GELU of one activation block per cycle, exactly :func:`bct.model.nonlinear.gelu`.

    Per lane: ``x = to_fixed(q * 2**e)`` with ``cfg.gelu_frac`` fraction bits, saturated to
    ``cfg.gelu_bits`` (one rounding shift, :func:`bct.hw.blockify.round_shift_saturate`); then
    ``a = |x|``, segment ``idx = a >> seg_shift`` and weight ``f`` (the low ``seg_shift`` bits);
    a constant ROM of ``gelu_segments`` entries holds ``(lo, d) = (h[idx], h[idx+1] - h[idx])``
    from ``derive(cfg).gelu_table`` (``h = 0`` past the table); ``h = lo + RHAZ(d * f)`` and
    ``y = RHAZ((max(x, 0) << g) - h, g)`` with ``g`` the table's guard bits. ``y`` enters the
    :class:`~bct.hw.blockify.Blockifier` with scale ``-gelu_frac``.

    Pipeline (one block per cycle at steady state, latency 6 cycles = 3 + the Blockifier's 3):

    1. input conversion (per block: the shift ``-(e + gelu_frac)``; per lane: one rounding
       adder, one barrel shifter, saturation), registered;
    2. ``|x|``, ROM read (``lo``, ``d``; zero past the table), registered;
    3. one multiplier per lane (``d * f``: signed ``bitlen(max |d|) + 1`` by unsigned
       ``seg_shift`` bits), two rounding adders, registered;
    4. to 6. the Blockifier.

    Resources per lane: **one multiplier**, one ROM read port (the ROM is a constant table,
    ``gelu_segments`` words), three rounding adders, one barrel shifter in the input conversion
    and the Blockifier's per-lane shifter. Verilator ``--lint-only -Wall``: the Blockifier's four
    waivers (``WIDTHEXPAND``, ``WIDTHTRUNC``, ``UNUSEDSIGNAL``, ``PROCASSINIT``) and
    ``DECLFILENAME`` (Amaranth writes the Blockifier submodule into the top module's file), all
    for the way Amaranth writes Verilog; ``tests/test_hw_gelu.py`` runs the lint with exactly
    these.

    With ``acc = (value_bits, scale_bits)`` the unit reads matmul accumulator rows instead
    (``Config.gelu_direct``, :func:`bct.model.nonlinear.gelu_acc`): ``B`` signed
    ``value_bits`` lanes with one row scale, converted by
    :func:`~bct.model.nonlinear.fixed_to_frac` in stage 1 (the same rounding shifter with the
    shift ``-(scale + gelu_frac)``: a right shift rounds half away from zero, a left shift
    saturates at ``+-(2**(gelu_bits-1) - 1)``, which is exactly ``fixed_to_frac``'s
    comparison before shifting); the rest of the pipeline is unchanged.

    Parameters
    ----------
    cfg : Config
    acc : tuple of int, optional
        ``(value_bits, scale_bits)``: the accumulator input (default: an activation block).

    Attributes
    ----------
    i, o : stream.Interface
        In: :func:`bct.hw.layouts.block_layout` ``(cfg.act_format)``, or with ``acc`` the
        fields ``value`` (``B`` lanes) and ``scale``; out: an activation block.
    latency : int
        6 (register stages from ``i`` to ``o``).
    """

    front_latency = 3
    latency = front_latency + Blockifier.latency

    def __init__(self, cfg: Config, acc=None):
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be a Config, not {type(cfg).__name__}")
        if acc is not None and not (isinstance(acc, tuple) and len(acc) == 2 and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 2 for n in acc)):
            raise ValueError(f"acc must be None or (value_bits, scale_bits), each an int >= 2, "
                             f"not {acc!r}")
        self.cfg, self.acc = cfg, acc
        layout = block_layout(cfg.act_format)
        if acc is not None:  # gelu_direct: accumulator rows with their scale
            layout = data.StructLayout({"value": data.ArrayLayout(signed(acc[0]), cfg.block_size),
                                        "scale": signed(acc[1])})
        super().__init__({"i": In(stream.Signature(layout)),
                          "o": Out(stream.Signature(block_layout(cfg.act_format)))})

    def elaborate(self, platform):
        m = Module()
        cfg, c = self.cfg, derive(self.cfg)
        fmt, B, w = cfg.act_format, cfg.block_size, cfg.gelu_bits
        lim = (1 << (w - 1)) - 1
        seg_shift, guard = c.gelu_seg_shift, c.gelu_table_frac - cfg.gelu_frac
        table = c.gelu_table
        diffs = [hi - lo for lo, hi in zip(table, table[1:])]
        rom_layout = data.StructLayout({
            "lo": unsigned(max(table).bit_length()),
            "d": signed(max(abs(d) for d in diffs).bit_length() + 1),
        })
        m.submodules.rom = rom = Memory(shape=rom_layout, depth=cfg.gelu_segments,
                                        init=[{"lo": lo, "d": d} for lo, d in zip(table, diffs)])

        m.submodules.blockify = blk = Blockifier(cfg, w, cfg.gelu_frac.bit_length() + 1, fmt)
        wiring.connect(m, wiring.flipped(self.o), blk.o)
        load = pipeline_enables(m, self.i, blk.i, self.front_latency)
        m.d.comb += blk.i.payload.scale.eq(-cfg.gelu_frac)

        # stage 1: to fixed point, saturated to gelu_bits (a block: to_fixed of the mantissas
        # at -(exp + gelu_frac); an accumulator row: fixed_to_frac at -(scale + gelu_frac))
        max_left = lim.bit_length()
        if self.acc is None:
            lanes, shift, max_right = self.i.payload.mant, self.i.payload.exp, fmt.bits + 1
        else:
            lanes, shift, max_right = self.i.payload.value, self.i.payload.scale, self.acc[0] + 1
        code = shift_code(m, -(shift + cfg.gelu_frac), max_left, max_right)
        x1 = Signal(data.ArrayLayout(signed(w), B))
        with m.If(load[0]):
            m.d.sync += [x1[k].eq(round_shift_saturate(m, lanes[k], code, max_left, lim))
                         for k in range(B)]

        # stage 2: |x|, segment, interpolation weight, table read
        lane2 = data.StructLayout({"pos": unsigned(w - 1), "lo": rom_layout["lo"].shape,
                                   "d": rom_layout["d"].shape, "f": unsigned(max(seg_shift, 1))})
        s2 = Signal(data.ArrayLayout(lane2, B))
        for k in range(B):
            x = x1[k]
            a = Signal(unsigned(w - 1), name=f"abs{k}")
            port = rom.read_port(domain="comb")
            inside = a.shift_right(seg_shift) < cfg.gelu_segments
            m.d.comb += [a.eq(Mux(x < 0, -x, x)), port.addr.eq(a.shift_right(seg_shift))]
            with m.If(load[1]):
                m.d.sync += [
                    s2[k].pos.eq(Mux(x < 0, 0, x)),
                    s2[k].lo.eq(Mux(inside, port.data.lo, 0)),
                    s2[k].d.eq(Mux(inside, port.data.d, 0)),
                    s2[k].f.eq(a[:seg_shift]),
                ]

        # stage 3: h = lo + RHAZ(d * f); y = RHAZ((max(x, 0) << g) - h, g)
        for k in range(B):
            lane = s2[k]
            prod = Signal(signed(len(lane.d) + seg_shift), name=f"prod{k}")
            m.d.comb += prod.eq(lane.d * lane.f)
            h = Signal(signed(len(lane.lo) + 2), name=f"h{k}")
            m.d.comb += h.eq(lane.lo + _round_shift_const(m, prod, seg_shift, f"interp{k}"))
            u = Signal(signed(w + guard + 1), name=f"u{k}")
            m.d.comb += u.eq(lane.pos.shift_left(guard) - h)
            with m.If(load[2]):
                m.d.sync += blk.i.payload.value[k].eq(_round_shift_const(m, u, guard, f"y{k}"))
        return m
