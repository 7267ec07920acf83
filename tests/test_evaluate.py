"""Tests of bct.model.evaluate on real GLUE rows (tiny random checkpoints with the real tokenizer):
metrics against direct computations, file order after length sorting, compression counts,
refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from tinybert import tiny_classifier  # noqa: E402

from bct.config import Config  # noqa: E402
from bct.model.checkpoint import CheckpointError, default_model_path, load_bert, load_tokenizer  # noqa: E402
from bct.model.evaluate import bct_logits, compression, evaluate, is_weight, prepare  # noqa: E402
from bct.model.glue import ENV_VAR, compute_metrics, load_task  # noqa: E402
from bct.model.integer import forward, quantize  # noqa: E402

GLUE = os.environ.get(ENV_VAR)
needs_glue = pytest.mark.skipif(not GLUE, reason=f"{ENV_VAR} not set")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {n: tiny_classifier(root / f"labels{n}", num_labels=n) for n in (1, 2)}


def _torch_logits(path, enc):
    import transformers

    m = transformers.BertForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.inference_mode():
        return m(**{k: torch.from_numpy(v) for k, v in enc._asdict().items()}).logits.double().numpy()


@needs_glue
def test_sst2_slice_against_direct_runs(ckpts):
    cfg = Config(block_size=16)
    n = 12
    prep = prepare("sst2", ckpts[2], limit=n, batch_size=5, max_len=64)
    data = load_task("SST-2", "dev", limit=n)
    assert prep.rows == n and np.array_equal(prep.labels, data.labels)
    assert sorted(prep.order.tolist()) == list(range(n))
    lengths = [int(b.attention_mask.sum(1).max()) for b in prep.batches]
    assert lengths == sorted(lengths) and [len(b.input_ids) for b in prep.batches] == [5, 5, 2]
    # FP32 in file order: one padded batch through torch directly.
    enc = load_tokenizer(ckpts[2]).encode(data.text_a, max_len=64, padding="longest")
    assert np.allclose(prep.fp32_logits, _torch_logits(ckpts[2], enc), atol=1e-5)
    # BCT in file order: each row alone through the integer model gives the same integers.
    qm = quantize(load_bert(ckpts[2]), cfg)
    logits, seconds = bct_logits(prep, qm)
    assert seconds > 0
    for i in (0, 5, 11):
        one = tuple(a[i:i + 1, : int(enc.attention_mask[i].sum())] for a in enc)
        assert np.array_equal(logits[i:i + 1], forward(qm, one).logits)

    r = evaluate("SST-2", cfg, ckpts[2], limit=n, batch_size=5, max_len=64)
    assert r["task"] == "SST-2" and r["rows"] == n and r["config_hash"] == cfg.hash
    assert r["fp32"] == compute_metrics("SST-2", prep.fp32_logits, data.labels)
    assert r["bct"] == compute_metrics("SST-2", logits, data.labels)
    assert r["drop_points"]["accuracy"] == pytest.approx(100 * (r["fp32"]["accuracy"] - r["bct"]["accuracy"]))
    assert r["agreement"] == np.mean(logits.argmax(1) == prep.fp32_logits.argmax(1))
    t = r["throughput"]
    assert t["bct_integer_seq_per_s"] > 0 and t["torch_fp32_seq_per_s"] > 0
    assert t["ratio"] == pytest.approx(t["bct_integer_seq_per_s"] / t["torch_fp32_seq_per_s"])


@needs_glue
@pytest.mark.parametrize("task, labels, metrics", [
    ("MRPC", 2, ["accuracy", "f1"]),
    ("STS-B", 1, ["pearson", "spearman"]),
    ("RTE", 2, ["accuracy"]),
])
def test_pair_tasks_report_their_metrics(ckpts, task, labels, metrics):
    r = evaluate(task, Config(), ckpts[labels], limit=6, max_len=64)
    assert list(r["fp32"]) == metrics and list(r["bct"]) == metrics and r["main_metric"] in metrics
    assert -1.0 <= r["agreement"] <= 1.0


def test_compression_counts_every_stored_bit(ckpts):
    w = load_bert(ckpts[2])
    cfg = Config(weight_bits=4, weight_block_size=64, weight_exp_bits=6)
    qm = quantize(w, cfg)
    c = compression(qm, w)
    n_all = sum(a.size for a in w.named_arrays().values())
    assert c["fp32_bits"] == 32 * n_all and c["stored_bits"] == qm.storage_bits()
    assert c["whole_model"] == 32 * n_all / qm.storage_bits()
    # Weights and embeddings: 4 bits + 6/64 per value, the classifier padded to 32 rows of 64.
    names = [n for n in w.named_arrays() if is_weight(n)]
    assert names == ["embed.word", "embed.position", "embed.type", *(
        f"layer{i}.{m}_w" for i in range(2) for m in ("q", "k", "v", "o", "ffn1", "ffn2")),
        "pooler.w", "classifier.w"]
    n_w = sum(w.named_arrays()[n].size for n in names)
    stored = (n_w - 64 * 2 + 32 * 64) * (4 + 6 / 64)
    assert c["stored_bits_weights_embeddings"] == stored
    assert c["weights_embeddings"] == 32 * n_w / stored


def test_refusals(ckpts, tmp_path):
    with pytest.raises(CheckpointError) as e:
        prepare("SST-2", default_model_path(), tmp_path)
    assert str(e.value) == (
        f"{default_model_path()} has no classification head: fine-tune it first (bct finetune --task SST-2)"
    )
    with pytest.raises(CheckpointError) as e:
        prepare("SST-2", ckpts[1], tmp_path)
    assert str(e.value) == f"{ckpts[1]} has 1 outputs, but SST-2 needs 2"


def test_drop_bootstrap_is_paired():
    """The bootstrap scores both models on the same resampled rows: identical predictions give
    a drop of exactly 0 in every resample; BCT wrong on k rows where FP32 is right gives drops
    >= 0 whose mean and spread are those of k/n (binomial); seeded."""
    from bct.model.evaluate import drop_bootstrap

    rng = np.random.default_rng(5)
    n, k = 400, 12
    labels = rng.integers(0, 2, n)
    fp32 = labels.copy()
    fp32[:40] ^= 1  # FP32 wrong on 40 rows
    assert drop_bootstrap("SST-2", fp32, fp32, labels) == {
        "accuracy": {"se": 0.0, "ci95": [0.0, 0.0], "resamples": 1000}}
    bct = fp32.copy()
    bct[100:100 + k] ^= 1  # BCT flips k rows FP32 has right
    b = drop_bootstrap("SST-2", fp32, bct, labels)["accuracy"]
    assert b["resamples"] == 1000 and b["ci95"][0] >= 0.0
    p = k / n
    assert abs(b["se"] - 100 * np.sqrt(p * (1 - p) / n)) < 0.1 * 100 * np.sqrt(p * (1 - p) / n)
    assert b == drop_bootstrap("SST-2", fp32, bct, labels)["accuracy"]
    assert b != drop_bootstrap("SST-2", fp32, bct, labels, seed=1)["accuracy"]
    # MRPC reports both metrics, each with its own spread
    assert set(drop_bootstrap("MRPC", fp32, bct, labels)) == {"accuracy", "f1"}


def test_drop_bootstrap_skips_undefined_resamples():
    """A correlation is undefined on a constant resample: such resamples are left out (and
    counted), not an error."""
    from bct.model.evaluate import drop_bootstrap

    gold = np.array([0.0, 5.0, 2.5])
    b = drop_bootstrap("STS-B", gold + 0.1, gold[::-1].copy(), gold, resamples=200)
    assert set(b) == {"pearson", "spearman"}
    assert 0 < b["pearson"]["resamples"] < 200  # 3 of 27 resamples draw one row 3 times
