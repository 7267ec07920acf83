"""Tests of bct.model.equalize (Config.weight_equalize) on the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bct.config import Config, ConfigError  # noqa: E402
from bct.model import integer, reference  # noqa: E402
from bct.model.checkpoint import load_bert, load_tokenizer  # noqa: E402
from bct.model.equalize import (  # noqa: E402
    SCALE_STEPS, _row_rel_err, equalize, ffn_permutation, hidden_order, hidden_permutation, qk_scales,
)

W4 = dict(weight_bits=4, weight_block_size=128, weight_exp_bits=6, weight_exp_search="mse")
SENTENCES = ["A man is playing a flute.", "Blockwise compression keeps BERT accurate without retraining."]
PAIRS = ["A man plays music.", "It works."]


@pytest.fixture(scope="module")
def weights():
    return load_bert()


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer().encode(SENTENCES, PAIRS, max_len=24)


@pytest.fixture(scope="module")
def both(weights):
    return equalize(weights, Config(**W4, weight_equalize="qk_scale+ffn_perm"))


def test_default_leaves_the_checkpoint_alone(weights):
    assert equalize(weights, Config()) is weights
    assert equalize(weights, Config(**W4)) is weights
    assert hidden_order(weights, Config()) is None
    assert hidden_order(weights, Config(weight_equalize="qk_scale+ffn_perm")) is None


def test_hidden_perm_keeps_the_float_model_in_permuted_order(weights, enc):
    """Every hidden state of the permuted network is the checkpoint's, channels in the new
    order; the pooler output (hence the logits) is unchanged."""
    cfg = Config(weight_equalize="hidden_perm")
    order = hidden_order(weights, cfg)
    np.testing.assert_array_equal(order, hidden_permutation(weights))
    eq = equalize(weights, cfg)
    ref, got = reference.forward(weights, enc, trace=True), reference.forward(eq, enc, trace=True)
    assert np.abs(ref.hidden[..., order] - got.hidden).max() <= 1e-12
    assert np.abs(ref.embedding[:, order] - got.embedding).max() <= 1e-12
    assert np.abs(ref.pooled - got.pooled).max() <= 1e-12
    for name in ("embed.ln", "layer2.attn_res", "layer5.out"):
        assert np.abs(ref.stages[name][..., order] - got.stages[name]).max() <= 1e-12, name
    changed = {n.split(".", 1)[1] if n.startswith("layer") else n
               for n, a in eq.named_arrays().items() if not np.array_equal(a, weights.named_arrays()[n])}
    assert changed == {"q_w", "k_w", "v_w", "o_w", "o_b", "attn_ln_g", "attn_ln_b", "ffn1_w", "ffn2_w",
                       "ffn2_b", "out_ln_g", "out_ln_b", "embed.word", "embed.position", "embed.type",
                       "embed.ln_g", "embed.ln_b", "pooler.w"}


def test_hidden_perm_groups_the_layernorm_outliers(weights):
    """The channels of largest |gamma| + |beta| come first, so they share the first blocks."""
    order = hidden_permutation(weights)
    assert sorted(order) == list(range(weights.hidden))
    lns = [(weights.emb_ln_g, weights.emb_ln_b)] + [
        p for lw in weights.encoder for p in ((lw.attn_ln_g, lw.attn_ln_b), (lw.out_ln_g, lw.out_ln_b))]
    score = np.max([np.abs(g) + np.abs(b) for g, b in lns], axis=0)[order]
    assert np.all(score[:-1] >= score[1:])
    assert score[0] > 3 * np.median(score)  # MiniLM has outlier channels to group (measured: 3.8x)


def test_integer_model_returns_the_embedding_in_checkpoint_order(weights, enc):
    cfg = Config(weight_equalize="hidden_perm")
    qm = integer.quantize(weights, cfg)
    assert qm.hidden_order == tuple(int(i) for i in hidden_permutation(weights))
    out = integer.forward(qm, enc, trace=True)
    stored = out.stages["embedding"].decode()  # the accelerator's order
    assert np.array_equal(out.embedding[:, list(qm.hidden_order)], stored)
    ref = reference.forward(weights, enc)
    cos = (out.embedding * ref.embedding).sum(1) / np.linalg.norm(out.embedding, axis=1) / np.linalg.norm(
        ref.embedding, axis=1)
    assert cos.min() > 0.99  # in the permuted order it would be far lower
    shuffled = out.embedding[:, list(qm.hidden_order)]
    assert ((shuffled * ref.embedding).sum(1) / np.linalg.norm(shuffled, axis=1)
            / np.linalg.norm(ref.embedding, axis=1)).max() < 0.9


@pytest.mark.parametrize("names", ["ffn_perm", "qk_scale+ffn_perm"])
def test_transforms_keep_the_float_model(weights, enc, both, names):
    eq = both if names == "qk_scale+ffn_perm" else equalize(weights, Config(**W4, weight_equalize=names))
    ref, got = reference.forward(weights, enc), reference.forward(eq, enc)
    for a, b in ((ref.hidden, got.hidden), (ref.embedding, got.embedding), (ref.pooled, got.pooled)):
        assert np.abs(a - b).max() <= 1e-12
    changed = [n for n, a in eq.named_arrays().items() if not np.array_equal(a, weights.named_arrays()[n])]
    touched = {"ffn_perm": {"ffn1_w", "ffn1_b", "ffn2_w"}}.get(
        names, {"q_w", "q_b", "k_w", "k_b", "ffn1_w", "ffn1_b", "ffn2_w"})
    assert {n.split(".")[1] for n in changed} == touched
    assert all(not a.flags.writeable and a.dtype == np.float64 for a in eq.named_arrays().values())


def test_float_path_still_matches_transformers(both, enc):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from bct.model.checkpoint import default_model_path

    model = transformers.BertModel.from_pretrained(str(default_model_path())).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in enc._asdict().items()})
    ref = reference.forward(both, enc)
    valid = enc.attention_mask == 1
    assert np.abs(ref.hidden - out.last_hidden_state.double().numpy())[valid].max() <= 1e-4
    assert np.abs(ref.pooled - out.pooler_output.double().numpy()).max() <= 1e-4


def test_qk_scale_never_increases_the_encoding_error(weights, both):
    fmt, d = Config(**W4).weight_format, weights.head_dim
    lw0, lw1 = weights.encoder[0], both.encoder[0]
    s = qk_scales(lw0, d, fmt, "mse")
    assert s.shape == (weights.hidden,) and s.min() >= 1.0 and s.max() < 2.0
    assert np.isin(s, 2.0 ** (np.arange(SCALE_STEPS) / SCALE_STEPS)).all()
    np.testing.assert_array_equal(lw1.q_w, lw0.q_w * s)
    np.testing.assert_array_equal(lw1.k_b, lw0.k_b / s)

    def err(lw):  # per channel: relative error of the query row (as encoded) plus the key row
        return (_row_rel_err(lw.q_w.T / math.sqrt(d), fmt, "mse") + _row_rel_err(lw.k_w.T, fmt, "mse"))

    before, after = err(lw0), err(lw1)
    assert np.all(after <= before + 1e-12)  # s = 1 is a candidate
    assert after.sum() < 0.9 * before.sum()  # measured: 0.83 of it on this layer


def test_ffn_perm_sorts_the_second_matmul_inputs(weights, both):
    for lw0, lw1 in zip(weights.encoder, both.encoder):
        p = ffn_permutation(lw0)
        assert sorted(p) == list(range(weights.ffn)) and not np.array_equal(p, np.arange(weights.ffn))
        np.testing.assert_array_equal(lw1.ffn2_w, lw0.ffn2_w[p])
        np.testing.assert_array_equal(lw1.ffn1_w, lw0.ffn1_w[:, p])
        m = np.abs(lw1.ffn2_w).max(axis=1)
        assert np.all(m[:-1] >= m[1:])


def test_qk_scale_needs_blockable_rows(tmp_path):
    from tinybert import tiny_classifier

    tiny = load_bert(tiny_classifier(tmp_path / "tiny"))  # hidden 64
    with pytest.raises(ConfigError, match=r"last axis \(64,\) is not a multiple of block size 128"):
        equalize(tiny, Config(**W4, weight_equalize="qk_scale"))
    assert equalize(tiny, Config(**W4, weight_equalize="ffn_perm")).encoder[0].ffn2_w.shape == (128, 64)


def test_quantize_encodes_the_equalized_checkpoint(weights, both):
    cfg = Config(**W4, weight_equalize="qk_scale+ffn_perm")
    got, want = integer.quantize(weights, cfg), integer.quantize(both, cfg)
    for name, t in want.tensors().items():
        u = got.tensors()[name]
        assert np.array_equal(u.mant, t.mant) and np.array_equal(u.exp, t.exp), name
