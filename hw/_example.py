"""Tiny example component used to exercise the simulation harness.

Not part of the accelerator: it exists so that ``bct.sim`` has a real
stream-in / stream-out design to build and simulate.
"""

from amaranth import Module, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out


class ScaleAdd(wiring.Component):
    """Registered stream stage computing ``o[k] = i[k] * scale + offset`` per lane.

    Lanes are signed ``width``-bit integers; the result wraps to ``width``
    bits (two's complement), exactly like ``((x * scale + offset) mod 2**width)``
    reinterpreted as signed.

    The output is a single pipeline register: ``o.valid`` comes straight from
    a flip-flop (it never depends on ``o.ready``), and the input is accepted
    whenever the register is empty or being drained in the same cycle.

    Parameters
    ----------
    lanes : int
        Number of lanes in each payload.
    width : int
        Bit width of each signed lane.
    scale : int
        Multiplier applied to every lane.
    offset : int
        Constant added after the multiplication.

    Attributes
    ----------
    i : stream.Interface, in
        Input stream with an ``ArrayLayout(signed(width), lanes)`` payload.
    o : stream.Interface, out
        Output stream with the same payload layout.
    """

    def __init__(self, lanes: int, width: int, scale: int = 3, offset: int = 1):
        self.lanes = lanes
        self.width = width
        self.scale = scale
        self.offset = offset
        layout = data.ArrayLayout(signed(width), lanes)
        super().__init__({
            "i": In(stream.Signature(layout)),
            "o": Out(stream.Signature(layout)),
        })

    def elaborate(self, platform):
        m = Module()
        accept = self.i.valid & self.i.ready
        m.d.comb += self.i.ready.eq(~self.o.valid | self.o.ready)
        with m.If(accept):
            m.d.sync += self.o.valid.eq(1)
            for k in range(self.lanes):
                m.d.sync += self.o.payload[k].eq(self.i.payload[k] * self.scale + self.offset)
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        return m
