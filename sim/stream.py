"""cocotb building blocks for ``amaranth.lib.stream`` interfaces.

A stream member ``x`` of a component appears in Amaranth's Verilog as the
ports ``x__valid``, ``x__ready`` and ``x__payload``; structured payloads
(``data.ArrayLayout``, ``data.StructLayout``) are flattened into the single
``x__payload`` port (array element ``i`` of width ``w`` at bits
``[i*w, (i+1)*w)``, struct fields in declaration order from bit 0), so
payloads are plain non-negative integers here; see `bct.sim.bits`.

Handshake timing: values are driven after a rising edge and the handshake is
evaluated in the ``ReadOnly`` phase before the next one, so a beat is
transferred at the rising edge that follows a ``ReadOnly`` with
``valid & ready``.

Random stalls are drawn from a private ``random.Random`` per interface,
seeded from ``cocotb.RANDOM_SEED`` (set by `bct.sim.run`'s ``seed``) and the
interface name, and logged.
"""

import logging
import random
from collections.abc import Callable, Sequence

import cocotb
from cocotb.handle import SimHandleBase
from cocotb.simtime import get_sim_time
from cocotb.triggers import ReadOnly, RisingEdge

_log = logging.getLogger("cocotb.bct.stream")


def _rng(seed: int | None, name: str, role: str) -> random.Random:
    seed = cocotb.RANDOM_SEED if seed is None else seed
    _log.info("%s %s: seed %d", role, name, seed)
    return random.Random(f"{seed}/{name}")


class Driver:
    """Send payloads into a stream input of the DUT, with random valid gaps.

    Follows the stream rules: once ``valid`` is raised it stays high, with
    the payload unchanged, until the DUT accepts it.  While ``valid`` is low
    the payload port carries random garbage, to catch designs that sample it
    without a handshake.

    Parameters
    ----------
    dut : cocotb.handle.SimHandleBase
        Top-level handle.
    name : str
        Stream member name (``"i"`` for ports ``i__valid``/``i__ready``/``i__payload``).
    valid_prob : float
        Probability of presenting the next beat in a given cycle (1.0: no gaps).
    seed : int, optional
        Seed for the gap pattern; ``cocotb.RANDOM_SEED`` when omitted.
    clk : cocotb.handle.SimHandleBase, optional
        Clock; ``dut.clk`` when omitted.
    """

    def __init__(self, dut: SimHandleBase, name: str, *, valid_prob: float = 0.7,
                 seed: int | None = None, clk: SimHandleBase | None = None):
        self.name = name
        self.valid_prob = valid_prob
        self._clk = dut.clk if clk is None else clk
        self._valid = getattr(dut, f"{name}__valid")
        self._ready = getattr(dut, f"{name}__ready")
        self._payload = getattr(dut, f"{name}__payload")
        self._width = len(self._payload)
        self._rng = _rng(seed, name, "driver")
        self._valid.value = 0

    async def send(self, payloads: Sequence[int]) -> None:
        """Transfer ``payloads`` in order; returns after the last one is accepted.

        Must be started in a writable phase (e.g. after `bct.sim.tb.reset`
        or a ``RisingEdge``); returns right after a rising edge.

        Parameters
        ----------
        payloads : sequence of int
            Non-negative packed payload values (see `bct.sim.bits.pack_signed`).
        """
        for value in payloads:
            while self._rng.random() >= self.valid_prob:
                self._valid.value = 0
                self._payload.value = self._rng.getrandbits(self._width)
                await RisingEdge(self._clk)
            self._valid.value = 1
            self._payload.value = value
            await ReadOnly()
            while not self._ready.value:
                await RisingEdge(self._clk)
                await ReadOnly()
            await RisingEdge(self._clk)
        self._valid.value = 0


class Monitor:
    """Collect payloads from a stream output of the DUT, with random back-pressure.

    Starts running when constructed.  Every cycle it drives ``ready`` high
    with probability ``ready_prob`` and records each transferred payload with
    its cycle number (rising edges since construction) and time in ns.  It
    also checks the stream rules: ``valid`` must not be X/Z, and once
    ``valid`` is high it must stay high with a stable payload until the
    transfer; a violation fails the test.

    Parameters
    ----------
    dut : cocotb.handle.SimHandleBase
        Top-level handle.
    name : str
        Stream member name (``"o"`` for ports ``o__valid``/``o__ready``/``o__payload``).
    ready_prob : float
        Probability of ``ready`` being high in a given cycle (1.0: no back-pressure).
    seed : int, optional
        Seed for the back-pressure pattern; ``cocotb.RANDOM_SEED`` when omitted.
    clk : cocotb.handle.SimHandleBase, optional
        Clock; ``dut.clk`` when omitted.

    Attributes
    ----------
    values : list of int
        Transferred payloads, in order.
    cycles : list of int
        Cycle number of each transfer.
    times_ns : list of float
        Simulation time (ns) of each transfer.
    cycle : int
        Current cycle number.
    clk : cocotb.handle.SimHandleBase
        The clock.
    """

    def __init__(self, dut: SimHandleBase, name: str, *, ready_prob: float = 0.7,
                 seed: int | None = None, clk: SimHandleBase | None = None):
        self.name = name
        self.ready_prob = ready_prob
        self.values: list[int] = []
        self.cycles: list[int] = []
        self.times_ns: list[float] = []
        self.cycle = 0
        self.clk = dut.clk if clk is None else clk
        self._valid = getattr(dut, f"{name}__valid")
        self._ready = getattr(dut, f"{name}__ready")
        self._payload = getattr(dut, f"{name}__payload")
        self._rng = _rng(seed, name, "monitor")
        self._ready.value = 0
        cocotb.start_soon(self._run())

    async def _run(self) -> None:
        stalled = None  # payload offered but not taken in the previous cycle
        while True:
            ready = self._rng.random() < self.ready_prob
            self._ready.value = int(ready)
            await ReadOnly()
            valid = self._valid.value
            assert valid.is_resolvable, (
                f"{self.name}__valid is {valid} at cycle {self.cycle} ({get_sim_time('ns')} ns)")
            payload = self._payload.value
            if stalled is not None:
                assert valid and payload == stalled, (
                    f"{self.name}: valid dropped or payload changed before the transfer at "
                    f"cycle {self.cycle} ({get_sim_time('ns')} ns): offered {stalled}, "
                    f"now valid={valid} payload={payload}")
            if valid and ready:
                self.values.append(payload.to_unsigned())
                self.cycles.append(self.cycle)
                self.times_ns.append(get_sim_time("ns"))
            stalled = payload if valid and not ready else None
            await RisingEdge(self.clk)
            self.cycle += 1


class Scoreboard:
    """Compare a Monitor's collected payloads against expected ones, exactly.

    Parameters
    ----------
    monitor : Monitor
        Source of the received payloads.
    expected : sequence of int
        Expected packed payloads, in order.
    fmt : callable, optional
        Renders a payload for error messages (e.g. unpacking lanes with
        `bct.sim.bits.unpack_signed`); ``hex`` when omitted.
    """

    def __init__(self, monitor: Monitor, expected: Sequence[int], *,
                 fmt: Callable[[int], object] | None = None):
        self.monitor = monitor
        self.expected = list(expected)
        self.fmt = hex if fmt is None else fmt

    async def finish(self, timeout_cycles: int, drain_cycles: int = 10) -> None:
        """Wait for all expected payloads, then check them (and that no more arrive).

        Parameters
        ----------
        timeout_cycles : int
            Maximum number of cycles to wait for the expected count.
        drain_cycles : int
            Cycles to keep watching afterwards for unexpected extra payloads.

        Raises
        ------
        AssertionError
            On timeout or any mismatch (see `check`).
        """
        for _ in range(timeout_cycles):
            if len(self.monitor.values) >= len(self.expected):
                break
            await RisingEdge(self.monitor.clk)
        else:
            self.check()
        for _ in range(drain_cycles):
            await RisingEdge(self.monitor.clk)
        self.check()

    def check(self) -> None:
        """Compare received against expected payloads.

        Raises
        ------
        AssertionError
            At the first differing index, with expected and received values and
            the cycle/time of the transfer; or if the counts differ.
        """
        got = self.monitor.values
        for i, (want, have) in enumerate(zip(self.expected, got)):
            if want != have:
                raise AssertionError(
                    f"{self.monitor.name}: first mismatch at index {i} "
                    f"(cycle {self.monitor.cycles[i]}, {self.monitor.times_ns[i]} ns): "
                    f"expected {self.fmt(want)}, got {self.fmt(have)}")
        if len(got) != len(self.expected):
            raise AssertionError(
                f"{self.monitor.name}: expected {len(self.expected)} payloads, got {len(got)} "
                f"by cycle {self.monitor.cycle} ({get_sim_time('ns')} ns)")
