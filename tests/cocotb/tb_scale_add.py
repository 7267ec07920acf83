"""cocotb test of `bct.hw._example.ScaleAdd` with random stalls on both sides."""

import random
from collections.abc import Callable

import cocotb

from bct.sim import tb
from bct.sim.bits import pack_signed, unpack_signed, wrap_signed
from bct.sim.stream import Driver, Monitor, Scoreboard


async def check_scale_add(dut, model: Callable[[int, dict], int]) -> None:
    """Stream random vectors through the DUT and compare against ``model``.

    Parameters
    ----------
    dut : cocotb.handle.SimHandleBase
        ScaleAdd top level.
    model : callable
        ``model(x, params)`` gives the expected (unwrapped) lane result.
    """
    p = tb.params()
    lanes, width = p["lanes"], p["width"]
    rng = random.Random(cocotb.RANDOM_SEED)
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    vectors = [[lo] * lanes, [hi] * lanes]
    vectors += [[rng.randint(lo, hi) for _ in range(lanes)] for _ in range(p["count"])]
    expected = [pack_signed([wrap_signed(model(x, p), width) for x in v], width)
                for v in vectors]

    await tb.reset(dut)
    driver = Driver(dut, "i", valid_prob=p["valid_prob"])
    monitor = Monitor(dut, "o", ready_prob=p["ready_prob"])
    await tb.assert_outputs_resolvable(dut)
    scoreboard = Scoreboard(monitor, expected, fmt=lambda v: unpack_signed(v, width, lanes))
    cocotb.start_soon(driver.send([pack_signed(v, width) for v in vectors]))
    await scoreboard.finish(timeout_cycles=20 * len(vectors))


@cocotb.test()
async def scale_add(dut):
    """Outputs equal ``wrap(x * scale + offset)`` per lane, in order."""
    await check_scale_add(dut, lambda x, p: x * p["scale"] + p["offset"])
