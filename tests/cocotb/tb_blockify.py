"""cocotb test of a block-format stream unit (`bct.hw.blockify.Blockifier`, `bct.hw.gelu.GeluUnit`).

The host side (pytest) computes every input and expected output payload with the software model
and writes them to a JSON file named by the ``vectors`` parameter; this module only drives the
inputs with random valid gaps, applies random back-pressure and compares every output block
exactly, in order.
"""

import json

import cocotb

from bct.sim import tb
from bct.sim.bits import unpack_block
from bct.sim.stream import Driver, Monitor, Scoreboard


async def check_stream(dut) -> None:
    """Stream the ``inputs`` of the vectors file through ``dut`` and expect its ``expected``.

    Parameters (`bct.sim.tb.params`): ``vectors`` (path of the JSON file with ``inputs`` and
    ``expected``, lists of packed payloads), ``bits``, ``exp_bits``, ``block`` (the output format,
    for mismatch messages), ``valid_prob`` and ``ready_prob``.
    """
    p = tb.params()
    with open(p["vectors"]) as f:
        vectors = json.load(f)
    dut._log.info("%d blocks from %s, seed %d", len(vectors["inputs"]), p["vectors"],
                  cocotb.RANDOM_SEED)
    await tb.reset(dut)
    driver = Driver(dut, "i", valid_prob=p["valid_prob"])
    monitor = Monitor(dut, "o", ready_prob=p["ready_prob"])
    await tb.assert_outputs_resolvable(dut)
    scoreboard = Scoreboard(monitor, vectors["expected"],
                            fmt=lambda v: unpack_block(v, p["bits"], p["exp_bits"], p["block"]))
    cocotb.start_soon(driver.send(vectors["inputs"]))
    await scoreboard.finish(timeout_cycles=20 * len(vectors["inputs"]) + 100)


@cocotb.test()
async def blocks_match_model(dut):
    """Every output block equals the software model's, bit for bit, under random stalls."""
    await check_stream(dut)
