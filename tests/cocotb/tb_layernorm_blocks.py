"""cocotb test of a LayerNorm unit chained into its Blockifier (`LayerNormUnit.blockifier`).

The host test (tests/test_hw_layernorm.py) writes the input beats, the parameter words and the
expected output blocks (:func:`bct.model.nonlinear.layernorm`, with ``last``) into a JSON file;
the parameters go in through the ``param`` port first, then the rows under random stalls, and
every output block is compared exactly.
"""

import json

import cocotb
from tb_layernorm import load_params

from bct.sim import tb
from bct.sim.bits import unpack_block
from bct.sim.stream import Driver, Monitor, Scoreboard


@cocotb.test()
async def blocks_match_model(dut):
    """Parameter sets loaded through the port; every output block (and its ``last``) equals
    ``layernorm`` of the row with its set's gamma / beta."""
    p = tb.params()
    with open(p["vectors"]) as f:
        vec = json.load(f)
    await tb.reset(dut)
    await load_params(dut, p)
    driver = Driver(dut, "i", valid_prob=p["valid_prob"])
    monitor = Monitor(dut, "o", ready_prob=p["ready_prob"])
    await tb.assert_outputs_resolvable(dut)
    bits, exp_bits, block = p["bits"], p["exp_bits"], p["block"]
    scoreboard = Scoreboard(monitor, vec["expected"], fmt=lambda v: (
        unpack_block(v, bits, exp_bits, block), v >> (bits * block + exp_bits)))
    cocotb.start_soon(driver.send(vec["inputs"]))
    await scoreboard.finish(timeout_cycles=10 * len(vec["inputs"]) + 1000)
