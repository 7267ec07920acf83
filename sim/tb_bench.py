"""cocotb module of `bct.sim.bench`: stream payloads through a unit at full rate and measure.

Parameters (`bct.sim.tb.params`): ``data``, a JSON file written by `bct.sim.bench` with
``phases`` (each ``{"label", "inputs": {stream: [payloads]}, "expected": [payloads]}``),
``output`` (the output stream), ``idle`` (input streams held idle) and ``busy`` (the input
stream whose beats count as busy cycles, e.g. ``act`` of the matmul array); ``report``, the JSON
file this module writes. Phases run one after the other, each on a drained unit, with ``valid``
and ``ready`` always high; every output is compared exactly with ``expected``.
"""

import json
import time

import cocotb
from cocotb.simtime import get_sim_time
from cocotb.triggers import ReadOnly, RisingEdge

from bct.sim import tb
from bct.sim.stream import Driver, Monitor, Scoreboard

PERIOD_NS = 10


async def _watch(dut, names, accepts, monitor):
    """Record the monitor's cycle number of every accepted beat on the input streams."""
    handles = {n: (getattr(dut, f"{n}__valid"), getattr(dut, f"{n}__ready")) for n in names}
    while True:
        await ReadOnly()
        for name, (valid, ready) in handles.items():
            if valid.value and ready.value:
                accepts[name].append(monitor.cycle)
        await RisingEdge(dut.clk)


@cocotb.test()
async def full_rate(dut):
    """Every phase at full rate: cycles, throughput and exact outputs, then wall-clock speed."""
    p = tb.params()
    with open(p["data"]) as f:
        d = json.load(f)
    start = time.perf_counter()
    await tb.reset(dut, period_ns=PERIOD_NS)
    for name in d.get("idle", []):
        getattr(dut, f"{name}__valid").value = 0
    names = sorted({n for phase in d["phases"] for n in phase["inputs"]})
    drivers = {n: Driver(dut, n, valid_prob=1.0) for n in names}
    monitor = Monitor(dut, d["output"], ready_prob=1.0)
    accepts = {n: [] for n in names}
    cocotb.start_soon(_watch(dut, names, accepts, monitor))
    report = {"phases": []}
    expected = []
    for phase in d["phases"]:
        first_in = {n: len(accepts[n]) for n in names}
        first_out = len(monitor.values)
        expected += phase["expected"]
        for name, payloads in phase["inputs"].items():
            cocotb.start_soon(drivers[name].send(payloads))
        total = sum(len(v) for v in phase["inputs"].values())
        await Scoreboard(monitor, expected).finish(timeout_cycles=20 * total + 2000,
                                                   drain_cycles=2)
        busy = accepts[d["busy"]][first_in[d["busy"]]:]
        ins = [c for n in names for c in accepts[n][first_in[n]:]]
        outs = monitor.cycles[first_out:]
        report["phases"].append({
            "label": phase["label"],
            "input_beats": len(busy),
            "output_beats": len(outs),
            "first_input_cycle": min(ins),
            "busy_first_cycle": busy[0],
            "busy_last_cycle": busy[-1],
            "first_output_cycle": outs[0],
            "last_output_cycle": outs[-1],
        })
    wall = time.perf_counter() - start
    report["sim_cycles"] = round(get_sim_time("ns") / PERIOD_NS)
    report["wall_seconds"] = wall
    with open(p["report"], "w") as f:
        json.dump(report, f)
