import json
import subprocess
import sys

import pytest

from bct import __version__
from bct.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "bct.cli", *args], capture_output=True, text=True)


def test_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("demo", "bench", "config"):
        assert cmd in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"bct-gen {__version__}"


def test_config_prints_hash_and_applies_overrides(capsys, tmp_path):
    assert main(["config", "--set", "block_size=64", "--set", "ln_eps=1e-5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["block_size"] == 64 and out["ln_eps"] == 1e-5 and len(out["hash"]) == 16
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"weight_bits": 4}))
    assert main(["config", "--config", str(f)]) == 0
    assert json.loads(capsys.readouterr().out)["weight_bits"] == 4
    for text, value in (("true", True), ("False", False)):
        assert main(["config", "--set", f"gelu_direct={text}"]) == 0
        assert json.loads(capsys.readouterr().out).get("gelu_direct", False) is value


def test_presets_apply_and_are_overridden(capsys, tmp_path):
    from bct.config import PRESETS, Config

    for name, fields in PRESETS.items():
        assert main(["config", "--preset", name]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["hash"] == Config(**fields).hash and Config.from_dict(
            {k: v for k, v in out.items() if k != "hash"}) == Config(**fields)
    assert PRESETS["default"] == {} and len({Config(**f).hash for f in PRESETS.values()}) == len(PRESETS)
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"ln_out_frac": 10}))
    assert main(["config", "--preset", "w8-wide-b8", "--config", str(f), "--set", "block_size=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["block_size"], out["ln_out_frac"], out["weight_block_size"], out["residual_bits"]) == (16, 10, 16, 16)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "fast"], "unknown preset 'fast'; presets: default, w8-wide, w8-wide-b8, w4"),
        (["--set", "block_size=12"], "block_size must be a power of two, not 12"),
        (["--set", "blocksize=32"], "unknown config field: blocksize"),
        (["--set", "block_size"], "--set takes KEY=VALUE"),
        (["--set", "block_size=big"], "block_size: cannot parse 'big' as int"),
        (["--set", "gelu_direct=1"], "gelu_direct: cannot parse '1' as bool"),
    ],
)
def test_config_errors_exit_2_with_message(capsys, args, message):
    assert main(["config", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_units_json(capsys):
    assert main(["bench", "units", "--json", "--shape", "8,64,32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["matmul_bit_exact"] is True and r["all_within_bounds"] is True
    assert r["matmul_shape"] == "8x64 @ 64x32"
    for k in ("gelu", "softmax", "layernorm"):
        assert r[f"{k}_max_abs_error"] <= r[f"{k}_max_abs_error_bound"]
