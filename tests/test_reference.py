"""Tests of bct.model.reference against transformers on the real all-MiniLM-L6-v2 checkpoint."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bct.model.checkpoint import default_model_path, load_bert, load_tokenizer, weights_from_torch  # noqa: E402
from bct.model.reference import MASK_VALUE, forward, gelu, layer_norm, stage_names, trace  # noqa: E402

SENTENCES = [
    "A man is playing a flute.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hi!",
    "Blockwise compression keeps BERT accurate without retraining.",
]
PAIRS = ["A man plays music.", "A fox jumps.", "Hello there, how are you today?", "It works."]
MAX_LEN = 24
TOL = 1e-4  # float64 reference vs transformers in float32


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.BertModel.from_pretrained(str(default_model_path())).eval()


@pytest.fixture(scope="module")
def weights(hf_model):
    return weights_from_torch(hf_model)


@pytest.fixture(scope="module")
def enc():
    return load_tokenizer().encode(SENTENCES, PAIRS, max_len=MAX_LEN)


def _run_hf(model, enc):
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in enc._asdict().items()})


def _hf_mean_pool(hidden, mask):
    m = mask[:, :, None].astype(np.float64)
    return (hidden * m).sum(axis=1) / m.sum(axis=1)


def test_matches_transformers_fp32(hf_model, weights, enc):
    assert enc.attention_mask.min() == 0  # the batch has padding
    assert enc.token_type_ids.max() == 1  # and sentence pairs
    out = _run_hf(hf_model, enc)
    ref = forward(weights, enc)
    hs = out.last_hidden_state.double().numpy()
    valid = enc.attention_mask == 1
    # Real tokens: the float32 run agrees with the float64 reference to 1e-4.
    assert np.abs(ref.hidden - hs)[valid].max() <= TOL
    assert np.abs(ref.embedding - _hf_mean_pool(hs, enc.attention_mask)).max() <= TOL
    assert np.abs(ref.pooled - out.pooler_output.double().numpy()).max() <= TOL
    assert np.abs(ref.hidden).max() > 1.0  # the comparison is not trivially small values


def test_matches_transformers_fp64_everywhere(hf_model, weights, enc):
    """In float64 transformers and the reference agree to rounding, padded rows included."""
    model64 = transformers.BertModel.from_pretrained(str(default_model_path()), dtype=torch.float64).eval()
    out = _run_hf(model64, enc)
    ref = forward(weights, enc)
    assert np.abs(ref.hidden - out.last_hidden_state.numpy()).max() <= 1e-9
    assert np.abs(ref.pooled - out.pooler_output.numpy()).max() <= 1e-9


def test_classifier_logits_match(enc):
    torch.manual_seed(1234)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(default_model_path()), num_labels=3
    ).eval()
    w = weights_from_torch(model)
    assert w.has_classifier and w.num_labels == 3
    logits = _run_hf(model, enc).logits.double().numpy()
    ref = forward(w, enc)
    assert ref.logits.shape == (len(SENTENCES), 3)
    assert np.abs(ref.logits - logits).max() <= TOL
    assert np.abs(np.diff(logits, axis=0)).max() > 1e-3  # rows really differ


def test_trace_stages_names_shapes_and_consistency(weights, enc):
    st = trace(weights, enc)
    names = stage_names(weights)
    assert list(st) == names
    assert names[:4] == ["embed.sum", "embed.ln", "layer0.q", "layer0.k"]
    assert names[-3:] == ["hidden", "embedding", "pooled"]
    assert len(names) == 2 + 14 * 6 + 3
    b, t, h, a, f = len(SENTENCES), MAX_LEN, 384, 12, 1536
    assert st["layer0.scores"].shape == (b, a, t, t)
    assert st["layer3.ffn1"].shape == (b, t, f)
    assert st["layer5.context"].shape == (b, t, h)
    assert st["embedding"].shape == (b, h)
    # The stages chain exactly as documented.
    lw = weights.encoder[2]
    x = st["layer1.out"]
    np.testing.assert_allclose(st["layer2.q"], x @ lw.q_w + lw.q_b, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(st["layer2.attn_res"], st["layer2.attn_out"] + x)
    np.testing.assert_array_equal(st["layer2.ffn_res"], st["layer2.ffn2"] + st["layer2.attn_ln"])
    np.testing.assert_array_equal(st["layer2.gelu"], gelu(st["layer2.ffn1"]))
    np.testing.assert_array_equal(st["hidden"], st["layer5.out"])
    probs = st["layer4.probs"]
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-12)
    pad = enc.attention_mask == 0
    assert np.all(probs.transpose(0, 1, 3, 2)[np.broadcast_to(pad[:, None, :], probs.shape[:3])] == 0)
    scores = st["layer0.scores"]
    q0 = st["layer0.q"][0, :, 32:64]
    k0 = st["layer0.k"][0, :, 32:64]
    expect = q0 @ k0.T / math.sqrt(32) + MASK_VALUE * (1 - enc.attention_mask[0])[None, :]
    np.testing.assert_allclose(scores[0, 1], expect, rtol=0, atol=1e-9)
    assert forward(weights, enc).stages is None


def test_padding_does_not_change_real_tokens(weights):
    tok = load_tokenizer()
    short = tok.encode(["A man is playing a flute."], max_len=9, padding="longest")
    padded = tok.encode(["A man is playing a flute."], max_len=MAX_LEN)
    n = int(short.attention_mask.sum())
    a = forward(weights, short)
    b = forward(weights, padded)
    np.testing.assert_allclose(b.hidden[:, :n], a.hidden[:, :n], rtol=0, atol=1e-10)
    np.testing.assert_allclose(b.embedding, a.embedding, rtol=0, atol=1e-10)


def test_minilm_embedding_semantics(weights):
    """Mean-pooled sentence embeddings rank a paraphrase above an unrelated sentence."""
    enc = load_tokenizer().encode(
        ["A man is playing a flute.", "A man plays the flute.", "The stock market fell sharply."],
        max_len=16,
    )
    e = forward(weights, enc).embedding
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_helpers():
    x = np.array([-3.0, -1.0, 0.0, 0.5, 2.0])
    expect = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(gelu(x), expect, rtol=1e-15, atol=1e-16)
    y = layer_norm(np.array([[1.0, 2.0, 3.0, 6.0]]), np.full(4, 2.0), np.full(4, 0.5), 0.0)
    np.testing.assert_allclose(y.mean(), 0.5, atol=1e-15)
    np.testing.assert_allclose(((y - 0.5) / 2).var(), 1.0, atol=1e-12)


def test_input_errors(weights):
    ids = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"^input_ids must be a 2-D integer array"):
        forward(weights, ids[0])
    with pytest.raises(ValueError, match=r"^input_ids out of range \[0, 30522\)$"):
        forward(weights, ids + 30522)
    with pytest.raises(ValueError, match=r"^sequence length 513 exceeds the position table"):
        forward(weights, np.zeros((1, 513), dtype=np.int64))
    with pytest.raises(ValueError, match=r"^attention_mask must hold only 0 and 1$"):
        forward(weights, ids, attention_mask=np.full((1, 4), 2))
    with pytest.raises(ValueError, match=r"^token_type_ids out of range \[0, 2\)$"):
        forward(weights, ids, token_type_ids=np.full((1, 4), 2))


def test_loaded_equals_converted(weights):
    loaded = load_bert()
    for name, a in loaded.named_arrays().items():
        np.testing.assert_array_equal(a, weights.named_arrays()[name], err_msg=name)
