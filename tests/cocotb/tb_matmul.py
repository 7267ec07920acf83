"""cocotb tests of `bct.hw.matmul.MatmulArray`: tiles streamed back to back, compared exactly.

Parameters (`bct.sim.tb.params`): ``data``, a JSON file written by tests/test_hw_matmul.py with
the payload integers of every tile (``act``, ``weight``: one list of beats per tile; ``bias``:
one beat per tile; ``expected``: ``R`` output rows per tile, in order), ``acc_bits``, ``cols``,
``pes``; ``report``, a JSON file this module writes its measurements into; ``valid_prob`` /
``ready_prob`` for the stalled test.
"""

import json

import cocotb
from cocotb.triggers import ReadOnly, RisingEdge

from bct.sim import tb
from bct.sim.bits import unpack_signed
from bct.sim.stream import Driver, Monitor, Scoreboard


async def _watch(dut, beats: list[int], rows: list[int]) -> None:
    """Record the cycle of every transferred activation beat (each one is a MAC in every PE)
    and of every transferred output row."""
    cycle = 0
    while True:
        await ReadOnly()
        if dut.act__valid.value and dut.act__ready.value:
            beats.append(cycle)
        if dut.out__valid.value and dut.out__ready.value:
            rows.append(cycle)
        await RisingEdge(dut.clk)
        cycle += 1


async def _run_tiles(dut, valid_prob: float, ready_prob: float):
    """Stream every tile of the data file; return it and the cycles of input beats and
    output rows."""
    p = tb.params()
    with open(p["data"]) as f:
        d = json.load(f)
    await tb.reset(dut)
    drivers = [Driver(dut, name, valid_prob=valid_prob) for name in ("act", "weight", "bias")]
    monitor = Monitor(dut, "out", ready_prob=ready_prob)
    await tb.assert_outputs_resolvable(dut)
    beats: list[int] = []
    rows: list[int] = []
    cocotb.start_soon(_watch(dut, beats, rows))
    expected = [row for tile in d["expected"] for row in tile]
    scoreboard = Scoreboard(monitor, expected,
                            fmt=lambda v: unpack_signed(v, d["acc_bits"], d["cols"]))
    for driver, name in zip(drivers, ("act", "weight", "bias")):
        payloads = d[name] if name == "bias" else [b for tile in d[name] for b in tile]
        cocotb.start_soon(driver.send(payloads))
    total = sum(len(t) for t in d["act"])
    await scoreboard.finish(timeout_cycles=int(4 * total / min(valid_prob, ready_prob)) + 200)
    assert len(beats) == total, (len(beats), total)
    return d, beats, rows


@cocotb.test()
async def tiles_with_stalls(dut):
    """Every tile equals the model's accumulators, with random valid/ready stalls everywhere."""
    p = tb.params()
    await _run_tiles(dut, p["valid_prob"], p["ready_prob"])


@cocotb.test()
async def tiles_back_to_back(dut):
    """Without stalls: exact results, first-row latency and MAC utilisation (written out)."""
    p = tb.params()
    d, beats, rows = await _run_tiles(dut, 1.0, 1.0)
    cycles_in = beats[-1] - beats[0] + 1
    cycles_all = rows[-1] - beats[0] + 1
    report = {
        "beats": len(beats),
        "pes": d["pes"],
        "input_cycles": cycles_in,
        "total_cycles": cycles_all,
        # busy PE-cycles / (PEs x cycles); each beat keeps all PEs busy for one cycle
        "utilisation": len(beats) / cycles_in,
        "utilisation_with_fill_drain": len(beats) / cycles_all,
        "latency_first_row": rows[0] - beats[len(d["act"][0]) - 1],
    }
    with open(p["report"], "w") as f:
        json.dump(report, f)
    assert report["utilisation"] >= 0.95, report
