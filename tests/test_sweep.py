"""Tests of bct.sweep: the config grid, the markdown table, the plot, a small real-data sweep."""

from __future__ import annotations

import json
import os

import pytest

from bct.config import Config, ConfigError
from bct.sweep import BITS, BLOCKS, markdown, plot, run_sweep, sweep_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GLUE = os.environ.get("BCT_GLUE_DIR")


def test_grid_holds_activations_at_8_bits_and_caps_the_activation_block():
    base = Config(weight_exp_bits=6, act_bits=6)
    cfgs = sweep_configs(base)
    assert len(cfgs) == len(BITS) * len(BLOCKS) == 15
    got = [(c.weight_bits, c.weight_format.block, c.block_size) for c in cfgs]
    assert got[:5] == [(8, 8, 8), (8, 16, 16), (8, 32, 32), (8, 64, 32), (8, 128, 32)]
    assert [g[0] for g in got] == [8] * 5 + [6] * 5 + [4] * 5
    for c in cfgs:
        assert c.act_bits == 8 and c.weight_exp_bits == 6 and c.exp_bits == base.exp_bits
    assert [c.block_size for c in sweep_configs(Config(block_size=8), (4,), (8, 128))] == [8, 8]


def test_bad_grid_is_refused():
    with pytest.raises(ConfigError) as e:
        sweep_configs(Config(), (8,), (12,))
    assert str(e.value) == "block_size must be a power of two, not 12"
    with pytest.raises(ConfigError) as e:
        sweep_configs(Config(), (1,), (32,))
    assert str(e.value) == "weight_bits must be in 2..16, not 1"


def _fake_result():
    rows = []
    for bits, block, acc, ratio in [(8, 32, 0.88, 3.88), (4, 32, 0.87, 7.5), (4, 128, 0.86, 7.9)]:
        rows.append({
            "config": {"weight_bits": bits, "weight_block_size": block, "block_size": 32},
            "bct": {"accuracy": acc},
            "drop_points": {"accuracy": 100 * (0.88 - acc)},
            "agreement": 0.99,
            "compression": {"weights_embeddings": ratio, "whole_model": ratio - 0.1},
        })
    return {"task": "SST-2", "rows": 100, "main_metric": "accuracy", "fp32": {"accuracy": 0.88},
            "base_config_hash": Config().hash, "rows_results": rows}


def test_markdown_table():
    md = markdown(_fake_result()).splitlines()
    assert md[0] == "# SST-2 dev (100 rows): FP32 accuracy 88.00"
    assert md[2] == ("| weight bits | weight block | act block | compression (weights+emb) | "
                     "compression (whole) | BCT accuracy | drop accuracy (points) | agreement |")
    assert md[4] == "| 8 | 32 | 32 | 3.880x | 3.780x | 88.00 | +0.00 | 99.00% |"
    assert md[6] == "| 4 | 128 | 32 | 7.900x | 7.800x | 86.00 | +2.00 | 99.00% |"
    assert len(md) == 7


def test_plot_writes_a_png_atomically(tmp_path):
    plot(_fake_result(), tmp_path / "sweep.png")
    assert [p.name for p in tmp_path.iterdir()] == ["sweep.png"]
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not GLUE, reason="BCT_GLUE_DIR not set")
def test_small_sweep_on_real_rows(tmp_path):
    pytest.importorskip("torch")
    from tinybert import tiny_classifier

    from bct.model.evaluate import evaluate

    ckpt = tiny_classifier(tmp_path / "ckpt")
    out = tmp_path / "sweep"
    r = run_sweep("SST-2", Config(), ckpt, out, bits=(8, 4), blocks=(16, 32), limit=6, max_len=32)
    assert r["complete"] is True and r["rows"] == 6 and r["bits"] == [8, 4] and r["blocks"] == [16, 32]
    assert json.loads((out / "sweep.json").read_text()) == json.loads(json.dumps(r))
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    assert len((out / "sweep.md").read_text().splitlines()) == 4 + 4
    got = [(x["config"]["weight_bits"], x["config"]["weight_block_size"]) for x in r["rows_results"]]
    assert got == [(8, 16), (8, 32), (4, 16), (4, 32)]
    # Each row is what a plain evaluation of that config gives.
    w4 = r["rows_results"][3]
    single = evaluate("SST-2", Config(weight_bits=4, weight_block_size=32), ckpt, limit=6, max_len=32)
    assert single["config_hash"] == w4["config_hash"]
    assert single["bct"] == w4["bct"] and single["compression"] == w4["compression"]
