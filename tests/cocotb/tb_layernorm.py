"""cocotb tests of `bct.hw.layernorm.LayerNormUnit`.

The host test (tests/test_hw_layernorm.py) writes the rows, their scales (and parameter sets)
and the model's expected outputs into an ``.npz`` file and passes its path and the unit's widths
as parameters; optionally a JSON file of parameter words (``[addr, word]`` pairs) that each test
writes through the ``param`` port before the rows.
"""

import json

import cocotb
import numpy as np
from cocotb.triggers import RisingEdge

from bct.sim import tb
from bct.sim.bits import pack_signed, unpack_signed
from bct.sim.stream import Driver, Monitor, Scoreboard


def _stimulus(rows: int | None = None, last_at: int | None = None):
    """Input beats and expected output payloads of the first ``rows`` rows (all by default);
    ``last_at`` moves every row's ``last`` flag to that beat (a framing error)."""
    p = tb.params()
    f = np.load(p["stim"])
    x, scale, y = f["x"][:rows], f["scale"][:rows], f["expected"][:rows]
    sets = f["sets"][:rows] if "sets" in f else [0] * len(x)
    B, xb, sb, ob = p["block"], p["x_bits"], p["scale_bits"], p["out_bits"]
    osb = p["out_scale_bits"]
    out_scale = pack_signed([p["out_scale"]], osb) << (B * ob)
    n = x.shape[1] // B
    inputs, outputs = [], []
    for row, s, k, out in zip(x.tolist(), scale.tolist(), list(sets), y.tolist()):
        for j in range(n):
            last = j == (n - 1 if last_at is None else last_at)
            inputs.append(pack_signed(row[j * B:(j + 1) * B], xb)
                          | pack_signed([s], sb) << (B * xb) | int(last) << (B * xb + sb)
                          | int(k) << (B * xb + sb + 1))
            outputs.append(pack_signed(out[j * B:(j + 1) * B], ob) | out_scale
                           | int(j == n - 1) << (B * ob + osb))
    return p, inputs, outputs


def _fmt(p):
    B, ob = p["block"], p["out_bits"]
    return lambda v: (unpack_signed(v, ob, B), v >> (B * ob))


async def load_params(dut, p):
    """Write the parameter words of ``p["param_words"]`` (if any) through the ``param`` port,
    with random valid gaps; otherwise keep it idle."""
    dut.param__valid.value = 0
    if p.get("param_words"):
        with open(p["param_words"]) as f:
            words = json.load(f)
        await Driver(dut, "param", valid_prob=0.5).send(
            [addr | word << p["param_addr_bits"] for addr, word in words])


async def _run(dut, p, inputs, outputs, valid_prob, ready_prob):
    await tb.reset(dut)
    await load_params(dut, p)
    driver = Driver(dut, "i", valid_prob=valid_prob)
    monitor = Monitor(dut, "o", ready_prob=ready_prob)
    await tb.assert_outputs_resolvable(dut)
    scoreboard = Scoreboard(monitor, outputs, fmt=_fmt(p))
    cocotb.start_soon(driver.send(inputs))
    slowdown = 2 / min(valid_prob, ready_prob)
    await scoreboard.finish(timeout_cycles=int(slowdown * len(inputs) * p["period"] / p["beats"]
                                               + 4 * p["latency"]))
    return monitor


@cocotb.test()
async def stalls(dut):
    """Every row, exactly, with random valid gaps and back-pressure; no X after reset."""
    p, inputs, outputs = _stimulus()
    await _run(dut, p, inputs, outputs, p["valid_prob"], p["ready_prob"])
    assert dut.framing_error.value == 0


@cocotb.test()
async def full_rate(dut):
    """Without stalls: the documented latency, then one row per ``max(beats, row_cycles)``
    cycles with no gap inside a row."""
    rows = tb.params()["full_rate_rows"]
    p, inputs, outputs = _stimulus(rows)
    monitor = await _run(dut, p, inputs, outputs, 1.0, 1.0)
    n, period = p["beats"], p["period"]
    want = [p["latency"] + (i // n) * period + i % n for i in range(rows * n)]
    assert monitor.cycles == want, f"output cycles {monitor.cycles}, expected {want}"


@cocotb.test()
async def framing(dut):
    """A ``last`` flag on the wrong beat raises the sticky ``framing_error``; rows are still
    delimited by the beat count."""
    p, inputs, outputs = _stimulus(2, last_at=0 if tb.params()["beats"] > 1 else -1)
    await _run(dut, p, inputs, outputs, 0.8, 0.8)
    await RisingEdge(dut.clk)
    assert dut.framing_error.value == 1
