"""Tests of bct.sim.bench (``bct bench sim``): the figures come from a real full-rate
simulation whose outputs are checked against the model. The units run at configs the unit tests
also simulate, so the Verilator builds are shared (content-addressed cache)."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from bct.cli import main
from bct.config import Config
from bct.sim.bench import UNITS, bench_sim

#: tests/test_hw_matmul.py's 4x4 array ("4x4-a8w8-b8").
MATMUL_CFG = Config(array_rows=4, array_cols=4, block_size=8, max_reduction=512)


def test_matmul_utilisation_back_to_back():
    """Four 4x4 tiles of K = 32 (>= R + admit_gap) back to back: every PE busy on every input
    cycle; the whole run takes ``T K + latency + R - 1`` cycles (fill and drain)."""
    from bct.hw.matmul import MatmulArray

    latency, gap = MatmulArray.timing(MATMUL_CFG)
    assert 32 >= 4 + gap
    r = bench_sim(MATMUL_CFG, seed=1, units=("matmul",), quick=True)
    u = r["units"]["matmul"]
    assert r["config_hash"] == MATMUL_CFG.hash
    assert (u["tiles"], u["K"], u["pes"]) == (4, 32, 16)
    assert u["bit_exact"] and u["utilisation"] == 1.0
    assert r["mac_utilisation"] == 1.0 and r["mac_utilisation_ok"]
    assert u["simulated_cycles"] == 4 * 32 + latency + 4 - 1
    assert u["phases"][0]["first_row_latency_cycles"] == latency
    assert u["phases"][0]["macs_per_cycle"] == 16.0
    assert u["cycles_per_wall_second"] > 0


def test_cli_gelu_json():
    """``bct bench sim --unit gelu --quick --json`` (tests/test_hw_gelu.py's b8-a6 config):
    one block per cycle, latency 6."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["bench", "sim", "--unit", "gelu", "--quick", "--json",
                     "--set", "block_size=8", "--set", "act_bits=6"])
    assert code == 0
    r = json.loads(buf.getvalue())
    u = r["units"]["gelu"]
    assert list(r["units"]) == ["gelu"] and "mac_utilisation" not in r
    assert u["blocks_per_cycle"] == 1.0 and u["elements_per_cycle"] == 8.0
    assert u["phases"][0]["latency_cycles"] == 6
    assert u["simulated_cycles"] == 64 + 6
    assert u["sim_cycles_total"] >= u["simulated_cycles"]


def test_unknown_unit():
    with pytest.raises(ValueError, match="^unknown unit\\(s\\) fft; choose from "
                                         + ", ".join(UNITS) + "$"):
        bench_sim(units=("fft",))
