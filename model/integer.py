"""The whole BERT under BCT: every tensor in block format, integer-only inference.

:func:`quantize` turns float64 :class:`~bct.model.checkpoint.BertWeights` into a
:class:`QuantBert` (embedding tables and weights in ``cfg.weight_format``, biases and LayerNorm
gamma/beta in ``cfg.vector_format``). :func:`forward` runs it with the numeric core's kernels
only; every intermediate result is re-encoded to ``cfg.act_format`` and, with ``trace=True``,
kept under the same stage names as :mod:`bct.model.reference` (so the RTL tests and the float
model can be compared stage by stage).

Three exact rewrites of the float graph, all done once at quantize time or by construction:

* ``1 / sqrt(head_dim)`` is folded into the query weights and bias before encoding.
* ``V`` is produced blocked along the hidden axis and re-blocked along tokens
  (:func:`~bct.model.blocks.reblock_transposed`) for ``P V``.
* The attention mask excludes padded keys in the softmax (the float model adds -10000, whose
  exponential is exactly 0 in float64).

Sequences are padded to a multiple of ``cfg.block_size`` tokens (masked keys). The classifier's
outputs are padded to one block with zero rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from bct.config import Config, ConfigError
from bct.model.blocks import BlockTensor, encode, reblock_transposed, requantize, to_fixed
from bct.model.checkpoint import BertWeights, Encoding, named_parameters
from bct.model.fixed import round_div, round_shift
from bct.model.matmul import add, linear, matmul
from bct.model.nonlinear import gelu, layernorm, softmax, tanh_fixed

__all__ = ["QuantLayer", "QuantBert", "IntegerOutput", "quantize", "forward", "trace", "mean_pool"]

_MATRICES = ("q_w", "k_w", "v_w", "o_w", "ffn1_w", "ffn2_w")


@dataclass(frozen=True, eq=False)
class QuantLayer:
    """One encoder layer in block format; weights as ``(out, in)`` blocked along ``in``."""

    q_w: BlockTensor
    q_b: BlockTensor
    k_w: BlockTensor
    k_b: BlockTensor
    v_w: BlockTensor
    v_b: BlockTensor
    o_w: BlockTensor
    o_b: BlockTensor
    attn_ln_g: BlockTensor
    attn_ln_b: BlockTensor
    ffn1_w: BlockTensor
    ffn1_b: BlockTensor
    ffn2_w: BlockTensor
    ffn2_b: BlockTensor
    out_ln_g: BlockTensor
    out_ln_b: BlockTensor


@dataclass(frozen=True, eq=False)
class QuantBert:
    """A BERT with every parameter in block format, bound to the config that encoded it."""

    cfg: Config
    layers: int
    hidden: int
    heads: int
    ffn: int
    max_positions: int
    num_labels: int | None
    word_emb: BlockTensor
    pos_emb: BlockTensor
    type_emb: BlockTensor
    emb_ln_g: BlockTensor
    emb_ln_b: BlockTensor
    encoder: tuple
    pooler_w: BlockTensor | None = None
    pooler_b: BlockTensor | None = None
    classifier_w: BlockTensor | None = None
    classifier_b: BlockTensor | None = None
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> dict[str, BlockTensor]:
        """Every stored tensor under the names of ``BertWeights.named_arrays`` (image order)."""
        return named_parameters(self)

    def storage_bits(self) -> int:
        """Bits of every stored integer and exponent."""
        return sum(t.mant.size * t.fmt.bits + t.exp.size * t.fmt.exp_bits for t in self.tensors().values())


def _check_shapes(w: BertWeights, cfg: Config) -> None:
    B, WB = cfg.block_size, cfg.weight_format.block
    checks = [
        ("hidden size", w.hidden, WB),
        ("FFN width", w.ffn, WB),
        ("head width", w.head_dim, B),
    ]
    for what, n, b in checks:
        if n % b:
            raise ConfigError(f"{what} {n} is not a multiple of the block size {b}")
    for what, n in (("hidden size", w.hidden), ("FFN width", w.ffn)):
        if n > cfg.max_reduction:
            raise ConfigError(f"{what} {n} exceeds max_reduction {cfg.max_reduction}")


def quantize(weights: BertWeights, cfg: Config) -> QuantBert:
    """Encode every parameter of ``weights`` into block format (no data, no retraining).

    Weight matrices and embedding tables choose their block exponents by
    ``cfg.weight_exp_search`` (:func:`~bct.model.blocks.encode`); vectors always by the block max.

    Raises
    ------
    ConfigError
        When a dimension of the model is not a multiple of the block sizes.
    """
    _check_shapes(weights, cfg)
    wf, vf = cfg.weight_format, cfg.vector_format

    def enc_w(a):  # weight matrices and embedding tables: the config's exponent choice
        return encode(a, wf, cfg.weight_exp_search)

    q_scale = 1.0 / math.sqrt(weights.head_dim)
    layers = []
    for lw in weights.encoder:
        kw = {}
        for f in fields(QuantLayer):
            a = getattr(lw, f.name)
            if f.name.startswith("q_"):
                a = a * q_scale
            kw[f.name] = enc_w(a.T) if f.name in _MATRICES else encode(a, vf)
        layers.append(QuantLayer(**kw))
    pooler_w = pooler_b = classifier_w = classifier_b = None
    if weights.has_pooler:
        pooler_w, pooler_b = enc_w(weights.pooler_w.T), encode(weights.pooler_b, vf)
    if weights.has_classifier:
        n = weights.classifier_w.shape[1]
        rows = -(-n // cfg.block_size) * cfg.block_size
        cw = np.zeros((rows, weights.hidden))
        cw[:n] = weights.classifier_w.T
        cb = np.zeros(rows)
        cb[:n] = weights.classifier_b
        classifier_w, classifier_b = enc_w(cw), encode(cb, vf)
    return QuantBert(
        cfg=cfg,
        layers=weights.layers,
        hidden=weights.hidden,
        heads=weights.heads,
        ffn=weights.ffn,
        max_positions=weights.max_positions,
        num_labels=weights.num_labels if weights.has_classifier else None,
        word_emb=enc_w(weights.word_emb),
        pos_emb=enc_w(weights.pos_emb),
        type_emb=enc_w(weights.type_emb),
        emb_ln_g=encode(weights.emb_ln_g, vf),
        emb_ln_b=encode(weights.emb_ln_b, vf),
        encoder=tuple(layers),
        pooler_w=pooler_w,
        pooler_b=pooler_b,
        classifier_w=classifier_w,
        classifier_b=classifier_b,
        source=weights.source,
    )


@dataclass(frozen=True, eq=False)
class IntegerOutput:
    """Result of :func:`forward`.

    Attributes
    ----------
    hidden : BlockTensor
        Last hidden state ``(B, T, H)`` (``T`` padded to a multiple of the block size).
    embedding : numpy.ndarray
        Masked mean of ``hidden`` over tokens, decoded to float64 ``(B, H)``.
    logits : numpy.ndarray or None
        Classifier output decoded to float64 ``(B, num_labels)``.
    stages : dict or None
        Every intermediate (BlockTensor) under the reference's stage names when traced.
    """

    hidden: BlockTensor
    embedding: np.ndarray
    logits: np.ndarray | None
    stages: dict | None


def _stack(parts: list[BlockTensor], axis: int) -> BlockTensor:
    return BlockTensor(
        np.concatenate([p.mant for p in parts], axis=axis),
        np.concatenate([p.exp for p in parts], axis=axis),
        parts[0].fmt,
    )


def _inputs(qm: QuantBert, enc: Encoding):
    ids, tt, mask = (np.asarray(a) for a in enc)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, tokens), not {ids.shape}")
    B = qm.cfg.block_size
    t = ids.shape[1]
    padded = -(-t // B) * B
    if padded > qm.max_positions:
        raise ValueError(
            f"sequence length {t} (padded to {padded}) exceeds the position table "
            f"({qm.max_positions} positions)"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= qm.word_emb.shape[0]):
        raise ValueError(f"input_ids out of range [0, {qm.word_emb.shape[0]})")
    pad = ((0, 0), (0, padded - t))
    return np.pad(ids, pad), np.pad(tt, pad), np.pad(mask, pad).astype(bool)


def forward(qm: QuantBert, enc: Encoding, *, trace: bool = False) -> IntegerOutput:
    """Integer-only BERT forward pass.

    Parameters
    ----------
    qm : QuantBert
    enc : Encoding
        ``input_ids``, ``token_type_ids``, ``attention_mask`` (``(B, T)`` integer arrays).
    trace : bool
        Keep every intermediate (block format) in :attr:`IntegerOutput.stages`.
    """
    cfg = qm.cfg
    af = cfg.act_format
    ids, tt, mask = _inputs(qm, enc)
    nb, T = ids.shape
    A, d = qm.heads, qm.head_dim
    stages: dict = {}

    def keep(name, value):
        if trace:
            stages[name] = value
        return value

    def rows(t: BlockTensor) -> BlockTensor:  # (B, T, X) -> (B*T, X)
        return BlockTensor(t.mant.reshape(nb * T, -1), t.exp.reshape(nb * T, -1), t.fmt)

    def unrows(t: BlockTensor) -> BlockTensor:
        return BlockTensor(t.mant.reshape(nb, T, -1), t.exp.reshape(nb, T, -1), t.fmt)

    def lin(x, w, b):
        return unrows(linear(rows(x), w, cfg, b))

    def residual(a, b):
        return requantize(*add(a, b, cfg=cfg), af)

    def norm(x, g, b):
        return layernorm(add(x, cfg=cfg), g, b, cfg)

    pos = qm.pos_emb[np.arange(T)]
    word, typ = qm.word_emb[ids], qm.type_emb[tt]
    pos = BlockTensor(
        np.broadcast_to(pos.mant, word.shape).copy(), np.broadcast_to(pos.exp, word.exp.shape).copy(), pos.fmt
    )
    x = keep("embed.sum", requantize(*add(word, pos, typ, cfg=cfg), af))
    x = keep("embed.ln", norm(x, qm.emb_ln_g, qm.emb_ln_b))
    key_mask = mask[:, None, None, :]  # (B, 1, 1, T)
    for i, lw in enumerate(qm.encoder):
        p = f"layer{i}."
        q = keep(p + "q", lin(x, lw.q_w, lw.q_b))
        k = keep(p + "k", lin(x, lw.k_w, lw.k_b))
        v = keep(p + "v", lin(x, lw.v_w, lw.v_b))
        qh = _heads(q, A, d)  # (B, A, T, d)
        kh = _heads(k, A, d)
        vt = reblock_transposed(_heads(v, A, d), af)  # (B, A, d, T) blocked along tokens
        s = matmul(qh, kh, cfg)  # (B, A, T, T); masked keys are zeroed so they never set
        scores = keep(p + "scores", requantize(np.where(key_mask, s.value, 0), s.scale, af))  # an exponent
        probs = keep(p + "probs", softmax(scores, cfg, key_mask))
        ctx = requantize(*matmul(probs, vt, cfg), af)  # (B, A, T, d)
        ctx = keep(p + "context", _merge_heads(ctx))
        attn_out = keep(p + "attn_out", lin(ctx, lw.o_w, lw.o_b))
        attn_res = keep(p + "attn_res", residual(attn_out, x))
        h = keep(p + "attn_ln", norm(attn_res, lw.attn_ln_g, lw.attn_ln_b))
        f1 = keep(p + "ffn1", lin(h, lw.ffn1_w, lw.ffn1_b))
        g = keep(p + "gelu", gelu(f1, cfg))
        f2 = keep(p + "ffn2", lin(g, lw.ffn2_w, lw.ffn2_b))
        res = keep(p + "ffn_res", residual(f2, h))
        x = keep(p + "out", norm(res, lw.out_ln_g, lw.out_ln_b))
    keep("hidden", x)
    emb = keep("embedding", mean_pool(x, mask, cfg))
    logits = None
    if qm.pooler_w is not None:
        cls = x[:, 0]  # (B, H)
        pre = linear(cls, qm.pooler_w, cfg, qm.pooler_b)
        pooled = requantize(
            tanh_fixed(to_fixed(pre, cfg.softmax_frac, cfg.softmax_bits), cfg), -cfg.softmax_out_frac, af
        )
        keep("pooled", pooled)
        if qm.classifier_w is not None:
            out = matmul(pooled, qm.classifier_w, cfg, qm.classifier_b)
            keep("logits", out)
            logits = np.ldexp(out.value.astype(np.float64), out.scale[:, None])[:, : qm.num_labels]
    return IntegerOutput(
        hidden=x,
        embedding=emb.decode(),
        logits=logits,
        stages=stages if trace else None,
    )


def _heads(t: BlockTensor, A: int, d: int) -> BlockTensor:
    """(B, T, A*d) -> (B, A, T, d); head blocks are whole blocks because d % block == 0."""
    nb, T, _ = t.shape
    mant = t.mant.reshape(nb, T, A, d).transpose(0, 2, 1, 3)
    exp = t.exp.reshape(nb, T, A, -1).transpose(0, 2, 1, 3)
    return BlockTensor(np.ascontiguousarray(mant), np.ascontiguousarray(exp), t.fmt)


def _merge_heads(t: BlockTensor) -> BlockTensor:
    """(B, A, T, d) -> (B, T, A*d)."""
    nb, A, T, d = t.shape
    mant = t.mant.transpose(0, 2, 1, 3).reshape(nb, T, A * d)
    exp = t.exp.transpose(0, 2, 1, 3).reshape(nb, T, -1)
    return BlockTensor(mant, exp, t.fmt)


def mean_pool(x: BlockTensor, mask: np.ndarray, cfg: Config) -> BlockTensor:
    """Masked mean over tokens, integer-only: align every token's blocks to the largest exponent
    of the sequence minus the guard bits, sum, divide by the token count (RHAZ), re-encode."""
    nb, T, H = x.shape
    e = np.where(mask[:, :, None], x.exp, np.iinfo(np.int64).min // 2)
    scale = e.max(axis=(1, 2)) - cfg.acc_guard_bits  # (B,)
    s = scale[:, None, None, None] - x.exp[..., None]
    terms = np.where(mask[:, :, None, None], round_shift(x.blocks, s), 0)
    total = terms.sum(axis=1).reshape(nb, H)
    count = mask.sum(axis=1)[:, None]
    return requantize(round_div(total, np.maximum(count, 1)), scale, cfg.act_format)


def trace(qm: QuantBert, enc: Encoding) -> dict:
    """Every intermediate of :func:`forward` keyed by stage name (block format; ``logits`` is
    the accumulator :class:`~bct.model.matmul.Fixed`)."""
    return forward(qm, enc, trace=True).stages
