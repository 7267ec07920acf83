"""cocotb tests of `bct.hw.softmax.SoftmaxUnit`: exact outputs under random stalls, latency and
steady-state row period without stalls.

Stimulus and expected payloads come from the JSON file named by the ``vectors`` parameter
(written by tests/test_hw_softmax.py from the software model); every output is compared exactly.
"""

import json

import cocotb
from cocotb.simtime import get_sim_time
from cocotb.triggers import ReadOnly, RisingEdge

from bct.sim import tb
from bct.sim.stream import Driver, Monitor, Scoreboard

PERIOD_NS = 10


def _load():
    p = tb.params()
    with open(p["vectors"]) as f:
        return p, json.load(f)


def _fmt(p):
    """Render an output payload as (lanes, last) for mismatch messages."""
    width, lanes = p["p_bits"], p["lanes"]

    def fmt(word):
        return ([(word >> (k * width)) & ((1 << width) - 1) for k in range(lanes)],
                word >> (lanes * width))
    return fmt


async def _watch_accepts(dut, times):
    """Record the time (ns) of every accepted input beat."""
    while True:
        await ReadOnly()
        if dut.i__valid.value and dut.i__ready.value:
            times.append(get_sim_time("ns"))
        await RisingEdge(dut.clk)


async def _start(dut, valid_prob, ready_prob):
    """Reset, then attach a driver, a monitor and an input-accept watcher."""
    p, _ = _load()
    await tb.reset(dut)
    driver = Driver(dut, "i", valid_prob=valid_prob)
    monitor = Monitor(dut, "o", ready_prob=ready_prob)
    await tb.assert_outputs_resolvable(dut)
    accepts = []
    cocotb.start_soon(_watch_accepts(dut, accepts))
    return p, driver, monitor, accepts


@cocotb.test()
async def exact_with_stalls(dut):
    """Every row (random, edge cases, real attention scores) bit-exact, random valid/ready."""
    p, driver, monitor, _ = await _start(dut, *tb.params()["stalls"])
    vec = _load()[1]
    scoreboard = Scoreboard(monitor, vec["outputs"], fmt=_fmt(p))
    cocotb.start_soon(driver.send(vec["inputs"]))
    await scoreboard.finish(timeout_cycles=p["timeout_cycles"])


@cocotb.test()
async def latency_and_period(dut):
    """For each row length L: an idle unit answers after ``latency(L)`` cycles, and
    back-to-back rows of L blocks leave every ``row_period(L)`` cycles (no stalls)."""
    p, driver, monitor, accepts = await _start(dut, 1.0, 1.0)
    vec = _load()[1]
    await RisingEdge(dut.clk)  # start every group in the same phase as the monitor samples
    expected = []
    for group in vec["timing"]:
        first_in, first_out = len(accepts), len(monitor.values)
        expected += group["outputs"]
        await driver.send(group["inputs"])
        while len(monitor.values) < len(expected):
            await RisingEdge(dut.clk)
        blocks = group["blocks"]
        latency = round((monitor.times_ns[first_out] - accepts[first_in]) / PERIOD_NS)
        starts = monitor.times_ns[first_out::blocks][-3:]
        periods = {round((b - a) / PERIOD_NS) for a, b in zip(starts, starts[1:])}
        dut._log.info("L=%d: latency %d, row period %s", blocks, latency, periods)
        assert (latency, periods) == (group["latency"], {group["period"]}), (
            f"L={blocks}: latency {latency}, row periods {periods}; expected "
            f"{group['latency']}, {group['period']}")
    Scoreboard(monitor, expected, fmt=_fmt(p)).check()
