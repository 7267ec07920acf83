"""A deliberately failing cocotb test: checks ScaleAdd against a wrong model.

Used by ``tests/test_sim_harness.py`` to prove that a failing cocotb test
makes `bct.sim.run` (and so pytest) fail with a useful message.
"""

import cocotb
from tb_scale_add import check_scale_add


@cocotb.test()
async def wrong_model(dut):
    """Expects ``offset + 1``, so the scoreboard must report a mismatch."""
    await check_scale_add(dut, lambda x, p: x * p["scale"] + p["offset"] + 1)
