"""cocotb tests of `bct.hw.layer.LayerAccelerator`: the testbench lives in the package
(`bct.sim.tb_layer`, also used by `bct demo`); this module makes it discoverable here."""

from bct.sim.tb_layer import layer_bit_exact  # noqa: F401
