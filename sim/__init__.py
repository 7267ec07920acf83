"""bct.sim: build Amaranth components to Verilog and check them with cocotb.

Host side (pytest): `build_verilog`, `run`, `SimulationFailure`.  Inside
cocotb test modules: `bct.sim.tb` (clock/reset, X checks, parameters) and
`bct.sim.stream` (Driver, Monitor, Scoreboard).  `bct.sim.bits` packs signed
lanes into payload integers and is usable on both sides.
"""

from .bits import pack_signed, unpack_signed, wrap_signed
from .runner import SimulationFailure, build_verilog, default_base_dir, output_ports, run

__all__ = [
    "SimulationFailure",
    "build_verilog",
    "default_base_dir",
    "output_ports",
    "pack_signed",
    "run",
    "unpack_signed",
    "wrap_signed",
]
