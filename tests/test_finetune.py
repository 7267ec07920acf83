"""Tests of bct.model.finetune: a tiny real fine-tune, the cache, atomic writes, bad arguments."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from bct.model import finetune as ft  # noqa: E402
from bct.model.checkpoint import default_model_path, load_bert, load_tokenizer  # noqa: E402
from bct.model.glue import GlueError  # noqa: E402
from bct.model.reference import forward  # noqa: E402

GOOD = ["a great film", "wonderful and moving", "i loved it", "brilliant acting", "a joy"]
BAD = ["a dull mess", "boring and slow", "i hated it", "terrible acting", "a chore"]


def _write_sst2(root, rows=64, seed=0):
    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = int(rng.integers(0, 2))
        words = GOOD if label else BAD
        lines.append(f"{words[i % len(words)]} , number {i} \t{label}")
    (root / "SST-2").mkdir(parents=True, exist_ok=True)
    (root / "SST-2" / "train.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny fine-tune shared by the tests below (64 rows, 1 epoch, max_len 32)."""
    root = tmp_path_factory.mktemp("ft")
    data = root / "glue"
    _write_sst2(data)
    cache = root / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv(ft.CACHE_ENV_VAR, str(cache))
    kwargs = dict(subset=None, epochs=1, batch_size=32, max_len=32, seed=0, progress=False)
    path = ft.finetune("SST-2", data, **kwargs)
    yield path, data, cache, kwargs, mp
    mp.undo()


def test_checkpoint_written_and_loadable(tuned):
    path, data, cache, kwargs, _ = tuned
    assert path.parent == cache / "finetune"
    assert path.name.startswith("SST-2-")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    manifest = json.loads((path / ft.MANIFEST).read_text())
    assert manifest["task"] == "SST-2" and manifest["train_rows"] == 64 and manifest["steps"] == 2
    assert manifest["max_len"] == 32 and manifest["lr"] == 5e-5
    assert np.isfinite(manifest["final_loss"])
    # No temporary directories are left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    w = load_bert(path)
    assert w.has_classifier and w.num_labels == 2
    assert w.problem_type == "single_label_classification"
    base = load_bert()
    # Training moved the encoder weights (and the tokenizer was saved with them).
    assert not np.array_equal(w.encoder[5].ffn2_w, base.encoder[5].ffn2_w)
    assert np.abs(w.encoder[5].ffn2_w - base.encoder[5].ffn2_w).max() < 0.05
    enc = load_tokenizer(path).encode(["a great film", "a dull mess"], max_len=16)
    logits = forward(w, enc).logits
    assert logits.shape == (2, 2) and np.all(np.isfinite(logits))
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["id2label"] == {"0": "0", "1": "1"}


def test_second_call_is_a_cache_hit(tuned, monkeypatch):
    path, data, cache, kwargs, _ = tuned

    def no_training(*a, **k):
        raise AssertionError("training ran again despite the cache")

    monkeypatch.setattr(ft, "_train", no_training)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ft.finetune("SST-2", data, **kwargs) == path
    assert ft.finetune("sst2", data, default_model_path(), **{**kwargs, "progress": True}) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_cache_key_depends_on_arguments_and_data(tuned, tmp_path, monkeypatch):
    path, data, cache, kwargs, _ = tuned
    seen = []

    def fake_train(spec, data_root, model_dir, out, args, progress, num_threads):
        seen.append(args)
        (out / "config.json").write_text("{}")
        return {"train_rows": 0}

    monkeypatch.setattr(ft, "_train", fake_train)
    other = ft.finetune("SST-2", data, **{**kwargs, "seed": 1})
    assert other != path and other.parent == path.parent and seen[-1]["seed"] == 1
    assert ft.finetune("SST-2", data, **{**kwargs, "lr": 3e-5}) not in (path, other)
    # Same arguments, different training data -> different key.
    data2 = tmp_path / "glue2"
    _write_sst2(data2, seed=1)
    assert ft.finetune("SST-2", data2, **kwargs) not in (path, other)
    assert len(seen) == 3


def test_failed_training_leaves_nothing(tuned, monkeypatch):
    path, data, cache, kwargs, _ = tuned
    before = sorted(p.name for p in path.parent.iterdir())

    def boom(spec, data_root, model_dir, out, *rest):
        (out / "partial").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(ft, "_train", boom)
    with pytest.raises(RuntimeError, match="boom"):
        ft.finetune("SST-2", data, **{**kwargs, "seed": 99})
    assert sorted(p.name for p in path.parent.iterdir()) == before


def test_cache_root_default(monkeypatch):
    import platformdirs

    monkeypatch.delenv(ft.CACHE_ENV_VAR, raising=False)
    assert ft.cache_root() == ft.Path(platformdirs.user_cache_dir("bct-gen"))
    monkeypatch.setenv(ft.CACHE_ENV_VAR, "/some/where")
    assert str(ft.cache_root()) == "/some/where"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"batch_size": 2.5}, "batch_size must be a positive integer, got 2.5"),
        ({"subset": 0}, "subset must be a positive integer or None, got 0"),
        ({"max_len": 2}, "max_len must be an integer >= 3, got 2"),
        ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
        ({"warmup": 1.0}, "warmup must be in [0, 1), got 1.0"),
        ({"grad_clip": 0}, "grad_clip must be > 0, got 0"),
    ],
)
def test_bad_arguments(tmp_path, kw, message):
    with pytest.raises(ft.FinetuneError) as e:
        ft.finetune("SST-2", tmp_path, **kw)
    assert str(e.value) == message


def test_missing_train_file(tmp_path):
    with pytest.raises(GlueError) as e:
        ft.finetune("RTE", tmp_path)
    assert str(e.value) == f"no train.tsv for RTE: {tmp_path / 'RTE' / 'train.tsv'} does not exist"
