"""The blockifier: fixed-point lanes in, one block of the BCT block format out.

:class:`Blockifier` is the hardware form of :func:`bct.model.blocks.requantize` for one block
with one (per-row) scale: block maximum, shared exponent from bit lengths, one rounding shift per
lane, saturation. The module also holds the two building blocks it shares with the other units
that end in a rounding shift (:func:`shift_code`, :func:`round_shift_saturate`) and the
valid/ready control of their pipelines (:func:`pipeline_enables`).
"""

from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from bct.config import BlockFormat, Config, ConfigError
from bct.hw.layouts import block_layout

__all__ = ["Blockifier", "pipeline_enables", "shift_code", "round_shift_saturate"]

#: Widest fixed-point input: :func:`bct.model.blocks.requantize` needs ``|y| < 2**62``.
MAX_IN_WIDTH = 62
#: Widest scale input.
MAX_SCALE_BITS = 32


def pipeline_enables(m: Module, i, o, depth: int) -> list:
    """Valid/ready control of a ``depth``-stage pipeline from stream ``i`` to stream ``o``.

    Stage ``k`` holds a valid flag and loads the previous stage when it is empty or its own
    content moves on in the same cycle (``load[k] = ~valid[k] | load[k+1]``, with
    ``load[depth] = o.ready`` and ``i.ready = load[0]``). So bubbles are squeezed out, the
    pipeline moves one beat per cycle while ``o.ready`` is high, ``o.valid`` is the last stage's
    register (it never depends on ``o.ready``) and ``i.ready`` depends combinationally on
    ``o.ready``.

    Parameters
    ----------
    m : amaranth.hdl.Module
        Module to add the control logic to.
    i, o : object with ``valid`` and ``ready`` signals
        The input and output handshakes (e.g. :class:`amaranth.lib.stream.Interface`).
    depth : int
        Number of register stages (at least 1).

    Returns
    -------
    list of amaranth.hdl.Signal
        ``load[k]`` for ``k = 0 .. depth - 1``: the data registers of stage ``k`` must load
        (``m.d.sync``) exactly when it is high.
    """
    valid = [Signal(name=f"stage{k}_valid") for k in range(depth)]
    load = [Signal(name=f"stage{k}_load") for k in range(depth)]
    for k in range(depth):
        nxt = o.ready if k == depth - 1 else load[k + 1]
        m.d.comb += load[k].eq(~valid[k] | nxt)
        with m.If(load[k]):
            m.d.sync += valid[k].eq(i.valid if k == 0 else valid[k - 1])
    m.d.comb += [i.ready.eq(load[0]), o.valid.eq(valid[-1])]
    return load


def shift_code(m: Module, s, max_left: int, max_right: int) -> Signal:
    """Encode a run-time shift ``s`` for :func:`round_shift_saturate`.

    Parameters
    ----------
    m : amaranth.hdl.Module
        Module to add the (combinational) logic to.
    s : amaranth Value, signed
        The shift of ``round_shift(x, s)`` (positive: right shift with rounding).
    max_left, max_right : int
        The largest left and right shifts that can change the result; larger ones are clamped
        (``max_left = lim.bit_length()`` and ``max_right = len(x) + 1`` make the clamp exact,
        see :func:`round_shift_saturate`).

    Returns
    -------
    amaranth.hdl.Signal, unsigned
        ``clamp(s, -max_left, max_right) + max_left``, in ``0 .. max_left + max_right``.
    """
    shift = Signal.like(s, name="shift")
    code = Signal(range(max_left + max_right + 1), name="shift_code")
    m.d.comb += [
        shift.eq(s),
        code.eq(Mux(shift < -max_left, 0,
                    Mux(shift > max_right, max_left + max_right, shift + max_left))),
    ]
    return code


def round_shift_saturate(m: Module, x, code, max_left: int, lim: int) -> Signal:
    """``clamp(round_shift(x, s), -lim, lim)`` for a signed lane ``x`` and a run-time shift.

    ``x`` is pre-shifted left by ``max_left`` and shifted right by ``code`` (from
    :func:`shift_code`) with the project's rounding: one adder (rounding constant
    ``2**(code-1) - 1`` plus a carry-in of ``x >= 0``) and one arithmetic barrel shifter. The
    clamp of ``s`` in :func:`shift_code` is exact: a left shift by ``lim.bit_length()`` already
    saturates every non-zero lane, and a right shift by ``len(x) + 1`` already gives 0 for every
    ``|x| <= 2**(len(x)-1)``.

    Parameters
    ----------
    m : amaranth.hdl.Module
        Module to add the (combinational) logic to.
    x : amaranth Value, signed
    code : amaranth Value, unsigned
        From :func:`shift_code` with the same ``max_left``.
    max_left : int
    lim : int
        Saturation bound.

    Returns
    -------
    amaranth.hdl.Signal, signed
        ``signed(lim.bit_length() + 1)``.
    """
    z = x.shift_left(max_left)
    # 2**(code-1) - 1 (ones below bit code-1) and a carry-in of x >= 0 (none for code 0)
    bias = Cat(*(code > k + 1 for k in range(len(z))))
    carry = ~z[-1] & (code != 0)
    t = Signal(signed(len(z) + 1), name="rounded")
    out = Signal(signed(lim.bit_length() + 1), name="saturated")
    m.d.comb += [
        t.eq((z + bias + carry) >> code),
        out.eq(Mux(t > lim, lim, Mux(t < -lim, -lim, t))),
    ]
    return out


class Blockifier(wiring.Component):
    """Encode one block of fixed-point integers per cycle into the block format.

    Exactly :func:`bct.model.blocks.requantize` ``(y, scale, fmt)`` for a block ``y`` with one
    scale: ``M = max |y|``; the shift ``sh`` is the smallest with ``round_shift(M, sh) <= qmax``:
    with ``v = 2 M``, ``L = bitlen(v)`` and ``Q = bitlen(2 qmax + 1) = bits``, ``sh = L - Q + 1``
    when the ``Q`` bits of ``v`` below its leading one (included) are all ones, else ``L - Q``
    (``v < 2 qmax + 1 = 2**Q - 1`` after the shift); the exponent is ``scale + sh`` clamped to
    ``[e_min, e_max]`` (``e_min`` for an all-zero block), and every lane is
    ``clamp(round_shift(y, e - scale), -qmax, qmax)`` (a left shift when ``e < scale``).

    Pipeline (one block per cycle at steady state, latency 3 cycles: a block accepted at a
    rising edge is on ``o`` after the third rising edge from it, with ``o.ready`` high):

    1. ``|y|`` per lane and the block maximum (a comparator tree), registered with ``y`` and the
       scale;
    2. the leading one of ``2 M``, the all-ones test, the exponent and its clamp, and the lane
       shift, registered;
    3. per lane one rounding adder and one barrel shifter (:func:`round_shift_saturate`) and the
       saturation, registered: the output payload.

    No multipliers. ``o.valid`` comes from a register; ``i.ready`` depends combinationally on
    ``o.ready`` (:func:`pipeline_enables`).

    Verilator ``--lint-only -Wall`` on the generated Verilog is clean with four waivers, all for
    how Amaranth writes Verilog, not for the design: ``WIDTHEXPAND`` / ``WIDTHTRUNC`` (operands
    narrower than their context such as ``$signed(1'h0)``, 1-bit tests ``!x`` of wider values),
    ``UNUSEDSIGNAL`` (debug wires for every field of a payload view, unused high bits of
    intermediates) and ``PROCASSINIT`` (every register gets its reset value at its
    declaration); ``tests/test_hw_blockify.py`` runs the lint with exactly these.

    Parameters
    ----------
    cfg : Config
        Configuration; ``fmt`` must be one of its block formats.
    in_width : int
        Signed width of each input lane, 2..62.
    scale_bits : int
        Signed width of the scale input, 1..32.
    fmt : BlockFormat
        The output block format (``fmt.block`` lanes).
    last : bool
        Carry a ``last`` bit (row end) from the input payload to the output payload, so a
        unit whose output stream marks its rows (LayerNorm, softmax) connects directly
        (:meth:`for_payload`).
    wide : BlockFormat, optional
        A second, wider output format of the config (the residual format of the wide residual
        path: same block and exponent width, more bits), chosen per block by the input's
        ``wide`` bit: the output lanes are then ``wide.bits`` wide (a block encoded to ``fmt``
        has its lanes within ``+-fmt.qmax``), and the output payload carries the ``wide`` bit.
        Without it the unit is exactly the one-format Blockifier.

    Attributes
    ----------
    i : stream.Interface, in
        ``{"value": ArrayLayout(signed(in_width), B), "scale": signed(scale_bits)}`` (and
        ``"last": 1`` with ``last``, ``"wide": 1`` with ``wide``): the block
        ``value * 2**scale``.
    o : stream.Interface, out
        :func:`bct.hw.layouts.block_layout` ``(fmt)`` (``(wide)`` and ``"wide": 1`` with
        ``wide``; ``"last": 1`` with ``last``).
    latency : int
        3 (register stages from ``i`` to ``o``).
    """

    latency = 3

    @classmethod
    def for_payload(cls, cfg: Config, layout: data.StructLayout, fmt: BlockFormat) -> "Blockifier":
        """A Blockifier whose input payload layout equals ``layout``, so that
        ``wiring.connect(m, producer.o, blockifier.i)`` works.

        Parameters
        ----------
        cfg : Config
        layout : amaranth.lib.data.StructLayout
            ``{"value": ArrayLayout(signed(w), fmt.block), "scale": signed(s)}`` with an
            optional ``"last": 1`` (e.g. :attr:`bct.hw.layernorm.LayerNormUnit.out_layout`).
        fmt : BlockFormat

        Raises
        ------
        ConfigError
            If ``layout`` has other fields, or lanes that are not ``fmt.block`` signed ints.
        """
        fields = dict(layout)
        if set(fields) - {"last"} != {"value", "scale"}:
            raise ConfigError(f"a Blockifier input needs fields value, scale (and last), "
                              f"not {', '.join(fields)}")
        value = fields["value"].shape
        if (not isinstance(value, data.ArrayLayout) or value.length != fmt.block
                or not value.elem_shape.signed):
            raise ConfigError(f"value must be {fmt.block} signed lanes, not {value!r}")
        blk = cls(cfg, value.elem_shape.width, fields["scale"].shape.width, fmt,
                  last="last" in fields)
        if blk.i.payload.shape() != layout:
            raise ConfigError(f"the Blockifier's input layout {blk.i.payload.shape()!r} "
                              f"differs from {layout!r} (field order or widths)")
        return blk

    def __init__(self, cfg: Config, in_width: int, scale_bits: int, fmt: BlockFormat, *,
                 last: bool = False, wide: BlockFormat | None = None):
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be a Config, not {type(cfg).__name__}")
        for name, value, hi in (("in_width", in_width, MAX_IN_WIDTH),
                                ("scale_bits", scale_bits, MAX_SCALE_BITS)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an int, not {type(value).__name__}")
            lo = 2 if name == "in_width" else 1
            if not lo <= value <= hi:
                raise ConfigError(f"{name} must be in {lo}..{hi}, not {value}")
        formats = (cfg.act_format, cfg.vector_format, cfg.weight_format, cfg.residual_format)
        if fmt not in formats:
            raise ConfigError(f"fmt {fmt} is not one of the config's block formats")
        if wide is not None:
            if wide not in formats:
                raise ConfigError(f"wide {wide} is not one of the config's block formats")
            if (wide.block, wide.exp_bits) != (fmt.block, fmt.exp_bits) or wide.bits < fmt.bits:
                raise ConfigError(f"wide {wide} must have the block size and exponent width "
                                  f"of {fmt} and at least its bits")
        self.cfg = cfg
        self.in_width = in_width
        self.scale_bits = scale_bits
        self.fmt = fmt
        self.last = bool(last)
        self.wide = wide
        in_fields = {"value": data.ArrayLayout(signed(in_width), fmt.block),
                     "scale": signed(scale_bits)}
        out_fields = dict(block_layout(fmt if wide is None else wide))
        out_fields = {name: field.shape for name, field in out_fields.items()}
        if self.last:
            in_fields["last"] = out_fields["last"] = unsigned(1)
        if wide is not None:
            in_fields["wide"] = out_fields["wide"] = unsigned(1)
        super().__init__({
            "i": In(stream.Signature(data.StructLayout(in_fields))),
            "o": Out(stream.Signature(data.StructLayout(out_fields))),
        })

    def elaborate(self, platform):
        m = Module()
        fmt, w, B = self.fmt, self.in_width, self.fmt.block
        wide = self.wide
        q = fmt.bits  # bitlen(2 qmax + 1)
        out_fmt = fmt if wide is None else wide
        # a wide output's clamp of the lane shift covers the narrow format too: a left shift
        # by more than bitlen(fmt.qmax) saturates there anyway
        max_left, max_right = out_fmt.qmax.bit_length(), w + 1
        load = pipeline_enables(m, self.i, self.o, self.latency)

        # stage 1: block maximum of |y|
        y1 = Signal(self.i.payload.shape())
        max1 = Signal(unsigned(w))
        mags = [Signal(unsigned(w), name=f"mag{k}") for k in range(B)]
        m.d.comb += [mag.eq(Mux(v < 0, -v, v)) for mag, v in zip(mags, self.i.payload.value)]
        while len(mags) > 1:  # comparator tree
            level = [Signal(unsigned(w), name="max") for _ in range(len(mags) // 2)]
            m.d.comb += [c.eq(Mux(a > b, a, b)) for c, a, b in zip(level, mags[0::2], mags[1::2])]
            mags = level
        with m.If(load[0]):
            m.d.sync += [y1.eq(self.i.payload), max1.eq(mags[0])]

        # stage 2: shift from bit lengths, exponent, lane shift code
        v = Cat(Const(0, 1), max1)  # 2 M
        qs = [q] if wide is None else [q, wide.bits]
        shs = [Signal(range(2 - qq, w + 3 - qq), name="sh" if wide is None else f"sh{qq}")
               for qq in qs]
        for p in range(1, w + 1):  # later assignments win: the leading one decides
            with m.If(v[p]):
                for qq, sh_q in zip(qs, shs):
                    ones = v[p - qq + 1 : p + 1].all() if p >= qq - 1 else Const(0)
                    m.d.comb += sh_q.eq(p + 1 - qq + ones)
        if wide is None:
            sh = shs[0]
        else:
            sh = Signal(range(2 - wide.bits, w + 3 - q), name="sh")
            m.d.comb += sh.eq(Mux(y1.wide, shs[1], shs[0]))
        e_raw = Signal(signed(max(self.scale_bits, len(sh)) + 1))
        m.d.comb += e_raw.eq(y1.scale + sh)
        e = Signal(signed(fmt.exp_bits))
        with m.If(max1 == 0):
            m.d.comb += e.eq(fmt.e_min)
        with m.Else():
            m.d.comb += e.eq(Mux(e_raw < fmt.e_min, fmt.e_min,
                                 Mux(e_raw > fmt.e_max, fmt.e_max, e_raw)))
        y2 = Signal(data.ArrayLayout(signed(w), B))
        e2 = Signal(signed(fmt.exp_bits))
        code2 = Signal(range(max_left + max_right + 1))
        with m.If(load[1]):
            m.d.sync += [y2.eq(y1.value), e2.eq(e),
                         code2.eq(shift_code(m, e - y1.scale, max_left, max_right))]

        # stage 3: one rounding shift and saturation per lane
        if self.last:  # rides along with the block (stage 1 holds it in y1)
            last2 = Signal(name="last2")
            with m.If(load[1]):
                m.d.sync += last2.eq(y1.last)
            with m.If(load[2]):
                m.d.sync += self.o.payload.last.eq(last2)
        if wide is not None:  # the format select rides along too
            wide2 = Signal(name="wide2")
            with m.If(load[1]):
                m.d.sync += wide2.eq(y1.wide)
            with m.If(load[2]):
                m.d.sync += self.o.payload.wide.eq(wide2)
        with m.If(load[2]):
            m.d.sync += self.o.payload.exp.eq(e2)
            for k in range(B):
                r = round_shift_saturate(m, y2[k], code2, max_left, out_fmt.qmax)
                if wide is not None:  # clamp(clamp(t, qmax_wide), qmax) = clamp(t, qmax)
                    r = Mux(wide2, r, Mux(r > fmt.qmax, fmt.qmax, Mux(r < -fmt.qmax, -fmt.qmax, r)))
                m.d.sync += self.o.payload.mant[k].eq(r)
        return m
