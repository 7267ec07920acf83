"""cocotb test of `bct.hw.gelu.GeluUnit`: the host side (`tests/test_hw_gelu.py`) writes the input
blocks and `bct.model.nonlinear.gelu`'s output blocks; `tb_blockify.check_stream` drives them
with random stalls and compares every block exactly."""

import cocotb
from tb_blockify import check_stream


@cocotb.test()
async def gelu_blocks_match_model(dut):
    """Every output block equals the software model's GELU, bit for bit, under random stalls."""
    await check_stream(dut)
