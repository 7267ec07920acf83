"""Tests of `bct demo` (bct/demo.py): the command, the clock it states, and (BCT_SLOW=1) the
whole job end to end as JSON."""

import json
import os
import subprocess
import sys

import pytest

from bct.cli import build_parser
from bct.config import Config, ConfigError
from bct.demo import _clock
from bct.hw.program import STAGES

SLOW = pytest.mark.skipif(os.environ.get("BCT_SLOW") != "1", reason="BCT_SLOW=1 runs it")


def test_demo_registered():
    args = build_parser().parse_args(["demo", "--json", "--layers", "2"])
    assert args.json and args.layers == 2 and args.func.__module__ == "bct.demo"


def test_clock_without_report_is_an_assumption():
    mhz, note = _clock(Config(clock_mhz=150.0), None)
    assert mhz == 150.0 and "assumed clock 150.0 MHz" in note and "not a synthesised Fmax" in note


def test_clock_from_synthesis_report(tmp_path):
    cfg = Config()
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"config_hash": cfg.hash, "fmax_mhz": 61.5, "target": "ecp5-85k"}))
    mhz, note = _clock(cfg, f)
    assert mhz == 61.5 and "Fmax 61.5 MHz after place and route (ecp5-85k" in note
    f.write_text(json.dumps({"config_hash": "0123456789abcdef", "fmax_mhz": 61.5}))
    with pytest.raises(ConfigError, match="was made for config 0123456789abcdef"):
        _clock(cfg, f)
    f.write_text(json.dumps({"config_hash": cfg.hash, "fmax_mhz": None}))
    assert _clock(cfg, f)[0] == cfg.clock_mhz


@pytest.mark.slow
@SLOW
def test_demo_json_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "bct.cli", "demo", "--json"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    s = json.loads(r.stdout)
    # every layer stage, the re-blocked V and the on-chip sentence embedding
    assert s["bit_exact"] and s["tokens"] >= 16 and s["stages_compared"] == len(STAGES) + 2
    assert s["mac_utilisation"] >= 0.8 and s["compression_ratio"] > 3.5
    assert s["embedding_cosine_vs_fp32"] > 0.99
    assert s["latency_us"] == pytest.approx(s["cycles"] / s["clock_mhz"])
    assert not list(tmp_path.iterdir())


def test_demo_refuses_foreign_images(tmp_path, capsys):
    """`bct demo --images DIR` refuses, before any simulation, images of another config and
    images of another checkpoint, with a clear error and status 2."""
    from bct.cli import main
    from bct.model.checkpoint import load_bert
    from bct.model.images import write_images
    from bct.model.integer import quantize
    from tinybert import tiny_classifier

    tiny = load_bert(tiny_classifier(tmp_path / "ckpt"))
    write_images(quantize(tiny, Config(acc_guard_bits=7)), tmp_path / "other-config")
    write_images(quantize(tiny, Config()), tmp_path / "other-model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--images", str(tmp_path / "other-config")]) == 2
    assert "was made for config" in capsys.readouterr().err
    assert main(["demo", "--images", str(tmp_path / "other-model")]) == 2
    err = capsys.readouterr().err
    assert "bct: error: the images in" in err and "the demo runs" in err
