"""Tests of the `bct.sim` harness, using the `bct.hw._example.ScaleAdd` component.

Simulation tests build into the harness cache (`bct.sim.default_base_dir`,
overridable with ``BCT_SIM_DIR``), keyed by the generated Verilog, so reruns
reuse the Verilator build.
"""

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bct.hw._example import ScaleAdd
from bct.sim import (SimulationFailure, build_verilog, output_ports, pack_signed, run,
                     unpack_signed, wrap_signed)

TB_DIR = Path(__file__).parent / "cocotb"
PARAM_SETS = [pytest.param(4, 8, id="4x8"), pytest.param(3, 5, id="3x5")]


def run_scale_add(lanes, width, module="tb_scale_add.py", **kwargs):
    params = dict(lanes=lanes, width=width, scale=3, offset=1, count=200,
                  valid_prob=0.6, ready_prob=0.6)
    return run(ScaleAdd(lanes, width), TB_DIR / module, name="scale_add", params=params,
               **kwargs)


@pytest.mark.parametrize("lanes, width", PARAM_SETS)
def test_scale_add_verilator(lanes, width, empty_cwd):
    run_dir = run_scale_add(lanes, width, seed=lanes * 100 + width)
    assert (run_dir / "results.xml").is_file()
    assert run_dir.parent.parent.name == "verilator"


def test_failing_cocotb_test_fails(empty_cwd):
    with pytest.raises(SimulationFailure) as info:
        run_scale_add(4, 8, module="tb_failing.py", seed=7)
    message = str(info.value)
    assert "wrong_model failed" in message
    assert "first mismatch at index 0" in message
    assert "expected [-126, -126, -126, -126], got [-127, -127, -127, -127]" in message
    assert "ns)" in message and "seed 7" in message
    assert "run dir:" in message and "BCT_WAVES=1" in message


def test_waves_from_env(monkeypatch):
    monkeypatch.setenv("BCT_WAVES", "1")
    run_dir = run_scale_add(3, 5, seed=1)
    assert run_dir.parent.parent.name == "verilator-waves"
    assert {p.name for p in run_dir.iterdir()} & {"dump.fst", "dump.vcd"}


@pytest.mark.skipif(shutil.which("iverilog") is None, reason="iverilog not installed")
def test_scale_add_icarus(empty_cwd):
    run_dir = run_scale_add(3, 5, simulator="icarus", seed=2)
    assert run_dir.parent.parent.name == "icarus"


def test_build_verilog_cache_key_and_header(tmp_path, monkeypatch, empty_cwd):
    monkeypatch.setenv("BCT_SIM_DIR", str(tmp_path / "cache"))
    first = build_verilog(ScaleAdd(4, 8), name="scale_add", config_hash="abc123")
    assert first.is_relative_to(tmp_path / "cache")
    assert first.read_text().splitlines()[0] == "// bct-gen config abc123 top scale_add"
    assert build_verilog(ScaleAdd(4, 8), name="scale_add", config_hash="abc123") == first
    others = {build_verilog(ScaleAdd(4, 8), name="scale_add", config_hash="other"),
              build_verilog(ScaleAdd(4, 6), name="scale_add", config_hash="abc123"),
              build_verilog(ScaleAdd(4, 8, offset=2), name="scale_add", config_hash="abc123")}
    assert len({p.parent for p in others | {first}}) == 4


def test_output_ports_match_verilog(tmp_path):
    component = ScaleAdd(2, 4)
    text = build_verilog(component, name="scale_add", base_dir=tmp_path).read_text()
    module_line = next(line for line in text.splitlines() if line.startswith("module "))
    assert output_ports(component) == ["i__ready", "o__payload", "o__valid"]
    for port in [*output_ports(component), "i__payload", "i__valid", "o__ready", "clk", "rst"]:
        assert port in module_line
    assert "output [7:0] o__payload;" in text


@given(st.integers(1, 24).flatmap(
    lambda w: st.tuples(st.just(w), st.lists(st.integers(-(1 << (w - 1)), (1 << (w - 1)) - 1),
                                             max_size=16))))
def test_pack_unpack_roundtrip(width_values):
    width, values = width_values
    word = pack_signed(values, width)
    assert 0 <= word < 1 << (width * len(values)) or not values
    assert unpack_signed(word, width, len(values)) == values


def test_pack_layout_and_wrap():
    assert pack_signed([1, -1], 4) == 0xF1
    assert unpack_signed(0x8F, 4, 2) == [-1, -8]
    assert wrap_signed(-128 * 3 + 1, 8) == -127
    with pytest.raises(ValueError, match="element 1"):
        pack_signed([0, 8], 4)
