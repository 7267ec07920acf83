"""Tests of bct.generate (``bct generate``): one Verilog file per unit stamped with the config
hash, params.json, a clean ``verilator --lint-only -Wall`` with the listed waivers only, atomic
replacement of the output directory and refusal of another config's output."""

from __future__ import annotations

import json
import os
import re

import pytest

from bct.cli import main
from bct.config import Config, ConfigError
from bct.generate import (LINT_FILE, PARAMS_FILE, UNITS, GenOptions, _REASONS, generate, lint,
                          load_params)

#: Units built but never converted (the tests that generate one unit only) warn when collected.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

#: A small config and sizes: quick to convert and lint.
SMALL = ["--set", "block_size=8", "--set", "array_rows=4", "--set", "array_cols=4",
         "--set", "max_reduction=512", "--ln-width", "64", "--ln-sets", "2", "--max-len", "64"]
SMALL_CFG = Config(block_size=8, array_rows=4, array_cols=4, max_reduction=512)


@pytest.fixture(scope="module")
def small_out(tmp_path_factory):
    """``bct generate --json`` on the small config: (out dir, exit code, stdout JSON)."""
    out = tmp_path_factory.mktemp("gen") / "rtl"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["generate", "--out", str(out), *SMALL, "--json"])
    return out, code, json.loads(buf.getvalue())


def test_files_headers_and_params(small_out):
    out, code, summary = small_out
    cfg = SMALL_CFG
    assert code == 0
    assert summary["config_hash"] == cfg.hash
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{top}.v" for top in UNITS] + [LINT_FILE, PARAMS_FILE])
    for top in UNITS:
        first = (out / f"{top}.v").read_text().split("\n", 1)[0]
        assert first == f"// bct-gen config {cfg.hash} top {top}"
        assert re.search(rf"^module {top}\(", (out / f"{top}.v").read_text(), re.M)
    params = load_params(out, cfg)
    assert params["config"] == cfg.to_dict() and params["config_hash"] == cfg.hash
    assert params["options"] == {"ln_width": 64, "ln_sets": 2, "max_len": 64,
                                 "softmax_div_bits": 1}
    units = params["units"]
    assert list(units) == list(UNITS)
    for top, unit in units.items():
        assert unit["latency_cycles"] > 0 and unit["throughput"]
        assert {p["name"] for p in unit["ports"]} >= {"clk", "rst"}
        assert unit["lint_waivers"] and all(unit["lint_waivers"].values())
    # the documented figures of the units themselves
    assert units["bct_blockify_acc"]["latency_cycles"] == 3
    assert units["bct_gelu"]["latency_cycles"] == 6
    assert units["bct_softmax"]["throughput"] == "1 block per cycle for rows of any length"
    ln = units["bct_layernorm"]
    assert ln["parameters"]["sets"] == 2
    assert set(ln["streams"]) == {"i", "o", "param"}
    assert set(ln["streams"]["o"]["fields"]) == {"value", "scale", "last"}
    # the LayerNorm output and its Blockifier's input are the same payload
    assert (units["bct_blockify_ln"]["streams"]["i"]["fields"]
            == ln["streams"]["o"]["fields"])
    width = {p["name"]: p["width"] for p in ln["ports"]}
    assert width["i__payload"] == ln["streams"]["i"]["payload_width"]


def test_lint_is_clean_with_listed_waivers_only(small_out):
    """``verilator --lint-only -Wall lint.vlt <file>`` passes for every unit, and every rule
    switched off in lint.vlt is listed with its reason in params.json."""
    out = small_out[0]
    results = lint(out)
    assert list(results) == list(UNITS)
    for top, r in results.items():
        assert r["clean"], f"{top}: {r['output']}"
    params = json.loads((out / PARAMS_FILE).read_text())
    for line in (out / LINT_FILE).read_text().splitlines():
        if line.startswith("lint_off"):
            rule, top = re.match(r'lint_off -rule (\w+) -file "\*(\w+)\.v"', line).groups()
            assert params["units"][top]["lint_waivers"][rule].startswith(_REASONS[rule])


def test_lint_reports_warnings_without_waivers(small_out, tmp_path):
    """The lint really runs: with an empty waiver file the units are not clean."""
    out = tmp_path / "copy"
    out.mkdir()
    for name in ("bct_blockify_acc.v", PARAMS_FILE):
        (out / name).write_bytes((small_out[0] / name).read_bytes())
    (out / LINT_FILE).write_text("`verilator_config\n")
    params = json.loads((out / PARAMS_FILE).read_text())
    params["units"] = {"bct_blockify_acc": params["units"]["bct_blockify_acc"]}
    (out / PARAMS_FILE).write_text(json.dumps(params))
    result = lint(out)["bct_blockify_acc"]
    assert not result["clean"] and "%Warning-PROCASSINIT" in result["output"]


def test_refuses_other_config_and_modified_files(small_out, tmp_path):
    out = small_out[0]
    other = SMALL_CFG.replace(act_bits=6)
    with pytest.raises(ConfigError, match=f"was made for config {SMALL_CFG.hash}, but the "
                                          f"current config is {other.hash}"):
        load_params(out, other)
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    gelu = copy / "bct_gelu.v"
    gelu.write_text(gelu.read_text() + "// edited\n")
    with pytest.raises(ConfigError, match="bct_gelu.v was modified after generation"):
        load_params(copy, SMALL_CFG)
    gelu.write_text(gelu.read_text().replace(SMALL_CFG.hash, other.hash, 1))
    with pytest.raises(ConfigError, match="bct_gelu.v: header .* does not match config"):
        load_params(copy, SMALL_CFG)


@pytest.fixture
def gelu_only(monkeypatch):
    """Generate only the GELU unit (fast), to exercise the directory handling."""
    import bct.generate as gen

    real = gen._units
    monkeypatch.setattr(gen, "_units", lambda cfg, opt: {
        k: v for k, v in real(cfg, opt).items() if k == "bct_gelu"})


def test_atomic_replacement(gelu_only, tmp_path):
    out = tmp_path / "rtl"
    cfg8 = Config(block_size=8)
    generate(cfg8, out, GenOptions(ln_width=64, max_len=64))
    assert load_params(out, cfg8)["config_hash"] == cfg8.hash
    # a second run replaces the whole directory, leaving nothing else behind
    (out / "stale.v").write_text("// from an older run\n")
    cfg16 = Config(block_size=16)
    generate(cfg16, out, GenOptions(ln_width=64, max_len=64))
    assert load_params(out, cfg16)["config_hash"] == cfg16.hash
    assert not (out / "stale.v").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rtl"]


def test_failure_leaves_old_output(gelu_only, tmp_path, monkeypatch):
    out = tmp_path / "rtl"
    cfg = Config(block_size=8)
    generate(cfg, out, GenOptions(ln_width=64, max_len=64))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr("bct.sim.runner.build_verilog", broken)
    with pytest.raises(RuntimeError, match="conversion failed"):
        generate(Config(block_size=16), out, GenOptions(ln_width=64, max_len=64))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rtl"]


def test_refuses_foreign_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["generate", "--out", str(out), *SMALL]) == 2
    assert "is not an earlier bct generate output" in capsys.readouterr().err
    assert os.listdir(out) == ["notes.txt"]


def test_cli_lint_flag(gelu_only, tmp_path, capsys):
    """``--lint`` runs the lint and reports it per unit (exit 0 when clean)."""
    assert main(["generate", "--out", str(tmp_path / "rtl"), *SMALL, "--lint", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lint_clean"] == {"bct_gelu": True}


def test_bad_options_are_config_errors(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "x"), "--ln-width", "100"]) == 2
    assert "LayerNorm width 100 is not a multiple of block_size 32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BCT_SLOW") != "1", reason="slow tier (BCT_SLOW=1)")
def test_default_config_lint(tmp_path):
    """The default config (8x8 array, B = 32, LayerNorm 384, softmax rows of 512) lints clean."""
    generate(Config(), tmp_path / "rtl")
    assert all(r["clean"] for r in lint(tmp_path / "rtl").values())
