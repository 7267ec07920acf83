import numpy as np

from bct.config import Config
from bct.hw.layouts import block_layout
from bct.sim.bits import pack_block, unpack_block


def test_block_layout_matches_software_packing():
    fmt = Config(block_size=8, exp_bits=6).act_format
    layout = block_layout(fmt)
    assert layout.size == 8 * 8 + 6
    assert layout["mant"].offset == 0 and layout["exp"].offset == 64
    rng = np.random.default_rng(0)
    for _ in range(50):
        mant = rng.integers(-fmt.qmax, fmt.qmax + 1, fmt.block).tolist()
        exp = int(rng.integers(fmt.e_min, fmt.e_max + 1))
        word = pack_block(mant, exp, fmt.bits, fmt.exp_bits)
        assert 0 <= word < 1 << layout.size
        assert unpack_block(word, fmt.bits, fmt.exp_bits, fmt.block) == (mant, exp)
