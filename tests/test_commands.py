"""Tests of bct.commands: `bct quantize`, `bct finetune`, `bct eval`, `bct sweep` end to end on a
tiny checkpoint, the fine-tune cache shared by finetune and eval, and the parse / input errors."""

from __future__ import annotations

import json
import os

import pytest

from bct.cli import main
from bct.config import Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GLUE = os.environ.get("BCT_GLUE_DIR")
needs_glue = pytest.mark.skipif(not GLUE, reason="BCT_GLUE_DIR not set")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("torch")
    from tinybert import tiny_classifier

    return tiny_classifier(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval"], "the following arguments are required: --task"),
        (["eval", "--task", "cola"], "unknown GLUE task 'cola': expected one of SST-2, STS-B, MRPC, RTE"),
        (["eval", "--task", "sst2", "--limit", "0"], "argument --limit: expected a positive integer, not '0'"),
        (["finetune", "--task", "rte", "--subset", "some"], "expected a positive integer, not 'some'"),
        (["finetune", "--task", "rte", "--epochs", "-1"], "expected a positive integer, not '-1'"),
        (["quantize"], "the following arguments are required: --out"),
        (["sweep", "--bits", "8,x"], "expected comma-separated integers, not '8,x'"),
    ],
)
def test_parse_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "--task", "sst2", "--set", "block_size=12"], "block_size must be a power of two, not 12"),
        (["sweep", "--blocks", "12", "--model", "x"], "block_size must be a power of two, not 12"),
        (["quantize", "--out", "x", "--model", "/nonexistent/ckpt"],
         "checkpoint directory does not exist: /nonexistent/ckpt"),
    ],
)
def test_input_errors_exit_2_with_message(capsys, empty_cwd, args, message):
    assert main(args) == 2
    assert f"bct: error: {message}" in capsys.readouterr().err


def test_quantize_writes_verified_images(capsys, ckpt, tmp_path):
    from bct.model.images import read_images

    out = tmp_path / "img"
    assert main(["quantize", "--model", str(ckpt), "--out", str(out), "--verify", "--set", "block_size=16"]) == 0
    r = json.loads(capsys.readouterr().out)
    cfg = Config(block_size=16)
    assert r["verified"] is True and r["config_hash"] == cfg.hash and r["out"] == str(out)
    assert r["memories"]["layer1_w_mant"] == {"width": 16 * 8, "depth": 4 * 64 * 4 + 128 * 4 + 64 * 8}
    assert read_images(out, cfg).cfg.hash == cfg.hash
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x").write_text("")
    assert main(["quantize", "--model", str(ckpt), "--out", str(tmp_path / "mine")]) == 2
    assert "refusing to overwrite it" in capsys.readouterr().err


@needs_glue
def test_finetune_then_eval_share_the_cache(capsys, ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("BCT_CACHE_DIR", str(cache))
    common = ["--task", "sst2", "--base-model", str(ckpt), "--subset", "16", "--no-progress"]
    assert main(["finetune", *common, "--json"]) == 0
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["train_rows"] == 16 and tuned["task"] == "SST-2"
    assert os.path.dirname(tuned["path"]) == str(cache / "finetune")
    assert main(["eval", *common, "--limit", "5", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"] == tuned["path"] and r["rows"] == 5 and set(r["bct"]) == {"accuracy"}
    assert len(os.listdir(cache / "finetune")) == 1  # the eval reused the fine-tune
    assert main(["eval", *common, "--limit", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("SST-2 dev, 5 rows") and "agreement with FP32" in text
    # a baseline fine-tuned at another truncation is found by --train-max-len
    assert main(["finetune", *common, "--max-len", "32", "--json"]) == 0
    short = json.loads(capsys.readouterr().out)["path"]
    assert len(os.listdir(cache / "finetune")) == 2
    assert main(["eval", *common, "--train-max-len", "32", "--limit", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == short
    assert len(os.listdir(cache / "finetune")) == 2


@needs_glue
def test_eval_and_sweep_on_a_given_model(capsys, ckpt, tmp_path):
    assert main(["eval", "--task", "mrpc", "--model", str(ckpt), "--limit", "4", "--json", "--no-progress"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert list(r["fp32"]) == ["accuracy", "f1"] and r["task"] == "MRPC"
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", str(ckpt), "--out", str(out), "--bits", "8", "--blocks", "32",
                 "--limit", "4", "--no-progress"]) == 0
    assert "| 8 | 32 | 32 |" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["sweep.json", "sweep.md", "sweep.png"]
    assert main(["eval", "--task", "sst2", "--model", str(ckpt), "--data", str(tmp_path / "none")]) == 2
    assert f"GLUE data directory does not exist: {tmp_path / 'none'}" in capsys.readouterr().err
