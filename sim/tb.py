"""Testbench helpers used inside cocotb test modules (run by `bct.sim.run`).

Amaranth components have a synchronous, active-high reset: the emitted
Verilog ports are ``clk`` and ``rst``.
"""

import json
import os

from cocotb.clock import Clock
from cocotb.handle import SimHandleBase
from cocotb.triggers import ClockCycles, FallingEdge

#: Environment variables set by `bct.sim.run` for the simulator process.
PARAMS_ENV = "BCT_TB_PARAMS"
OUTPUTS_ENV = "BCT_TB_OUTPUTS"


def params() -> dict:
    """Return the ``params`` mapping passed to `bct.sim.run`.

    Returns
    -------
    dict
        Decoded JSON parameters (empty if none were given).
    """
    return json.loads(os.environ.get(PARAMS_ENV, "{}"))


async def reset(dut: SimHandleBase, *, cycles: int = 2, period_ns: int = 10) -> None:
    """Start the clock on ``dut.clk`` and hold ``dut.rst`` high for some cycles.

    Returns right after the rising edge that ends reset, so the caller may
    drive inputs immediately.

    Parameters
    ----------
    dut : cocotb.handle.SimHandleBase
        Top-level handle.
    cycles : int
        Number of rising edges with reset asserted.
    period_ns : int
        Clock period in nanoseconds.
    """
    Clock(dut.clk, period_ns, unit="ns").start()
    dut.rst.value = 1
    await ClockCycles(dut.clk, cycles)
    dut.rst.value = 0


async def assert_outputs_resolvable(dut: SimHandleBase) -> None:
    """Assert that no output port carries X or Z.

    Waits for the next falling edge (mid-cycle, values settled, writes still
    allowed afterwards) and checks every output port of the component, as
    listed by `bct.sim.run`.  Verilator is two-state, so this only bites on
    four-state simulators (Icarus), e.g. when an input was left undriven.

    Parameters
    ----------
    dut : cocotb.handle.SimHandleBase
        Top-level handle.

    Raises
    ------
    AssertionError
        Naming each unresolvable output and its value.
    """
    await FallingEdge(dut.clk)
    names = [n for n in os.environ.get(OUTPUTS_ENV, "").split(",") if n]
    assert names, f"{OUTPUTS_ENV} is empty: run the test through bct.sim.run"
    bad = {n: str(getattr(dut, n).value) for n in names
           if not getattr(dut, n).value.is_resolvable}
    assert not bad, f"outputs with X/Z after reset: {bad}"
