"""cocotb testbench of :class:`bct.hw.layer.LayerAccelerator` (runs inside the simulator).

Parameters (`bct.sim.tb.params`): ``data``, the JSON file written by
:func:`bct.sim.layer.prepare` (the layer input words, ``seq_len``, the expected words and the
block format of every stage, the op names), and ``report``, the JSON file this testbench writes: cycles, array beats,
MAC utilisation, the cycle at which every op started, every stage's equality and its first
mismatch (index, both values, the cycle the word was written).
"""

import json

import cocotb
from cocotb.triggers import FallingEdge, First, RisingEdge, Timer
from cocotb.utils import get_sim_time

from bct.sim import tb
from bct.sim.layer import compare_words

PERIOD_NS = 10


async def _op_log(dut, log):
    while True:
        await dut.op_index.value_change
        log.append([int(dut.op_index.value), int(get_sim_time("ns")) // PERIOD_NS])


async def _read(dut, addr):
    dut.dbg_addr.value = addr  # registered, then read: two cycles
    await RisingEdge(dut.clk)
    await RisingEdge(dut.clk)
    await FallingEdge(dut.clk)
    return dut.dbg_data.value.to_unsigned(), dut.dbg_cycle.value.to_unsigned()


@cocotb.test()
async def layer_bit_exact(dut):
    """Load the layer input, run the program, compare every stage with the model (==)."""
    p = tb.params()
    with open(p["data"]) as f:
        d = json.load(f)
    dut.start.value = 0
    dut.load_en.value = 0
    dut.dbg_addr.value = 0
    await tb.reset(dut, period_ns=PERIOD_NS)
    await tb.assert_outputs_resolvable(dut)
    for part in d["inputs"]:  # the layer input (and its residual copy on the wide path)
        for n, w in enumerate(part["words"]):
            dut.load_en.value = 1
            dut.load_addr.value = part["base"] + n
            dut.load_data.value = w
            await RisingEdge(dut.clk)
    dut.load_en.value = 0
    dut.seq_len.value = d["seq_len"]
    dut.start.value = 1
    await RisingEdge(dut.clk)
    t0 = int(get_sim_time("ns")) // PERIOD_NS
    dut.start.value = 0
    log = [[0, t0]]  # op 0 starts at once; the log records every later change of op_index
    cocotb.start_soon(_op_log(dut, log))
    await First(RisingEdge(dut.done), Timer(d["max_cycles"] * PERIOD_NS, "ns"))
    await FallingEdge(dut.clk)
    assert dut.done.value == 1, f"the program did not finish within {d['max_cycles']} cycles"
    cycles, beats = dut.cycles.value.to_unsigned(), dut.mac_beats.value.to_unsigned()
    stages, mismatches = {}, []
    for name, e in d["expected"].items():
        bits, exp_bits, block = d["fmts"].get(name, d["fmt"])
        got, when = [], []
        for n in range(len(e["words"])):
            w, c = await _read(dut, e["base"] + n)
            got.append(w)
            when.append(c)
        msg = compare_words(name, e["words"], got, when, bits, exp_bits, block,
                            d["blocks_per_row"][name])
        stages[name] = msg is None
        if msg:
            mismatches.append(msg)
            dut._log.error(msg)
        else:
            dut._log.info("%s: %d words equal", name, len(got))
    ops = [{"op": d["ops"][i], "start_cycle": c - t0} for i, c in log if i < len(d["ops"])]
    report = {"cycles": cycles, "mac_beats": beats, "utilisation": beats / max(cycles, 1),
              "seq_len": d["seq_len"], "ops": ops, "stages": stages, "mismatches": mismatches,
              "bit_exact": not mismatches}
    with open(p["report"], "w") as f:
        json.dump(report, f)
    assert not mismatches, mismatches[0]
