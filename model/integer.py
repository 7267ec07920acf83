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

The wide residual path (``cfg.residual_bits`` set): the residual stream (``embed.sum``, each
``attn_res`` / ``ffn_res`` and the residual copy of each LayerNorm output) is kept in
``cfg.residual_format`` and aligned with ``cfg.residual_guard_bits`` (:func:`residual_add`);
each LayerNorm output is rounded twice from its one fixed-point result
(:func:`~bct.model.nonlinear.layernorm_wide`): to the activation format for the next matmuls
(the usual stage name) and to the residual format (stage name + ``_wide``: ``embed.ln_wide``,
``layer<i>.attn_ln_wide``, ``layer<i>.out_wide``). ``hidden`` and the pooled embedding are the
residual copies. Every matmul operand stays in the activation format.

``cfg.gelu_direct``: GELU reads the FFN1 accumulator (:func:`~bct.model.nonlinear.gelu_acc`);
the ``ffn1`` stage (traced only) is then that accumulator in activation blocks, which no later
stage reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from bct.config import Config, ConfigError
from bct.model.blocks import BlockTensor, encode, reblock_transposed, requantize, to_fixed
from bct.model.checkpoint import BertWeights, Encoding, named_parameters
from bct.model.equalize import equalize, hidden_order
from bct.model.fixed import round_div, round_shift
from bct.model.matmul import Fixed, add_requantize, aligned_requantize, linear, matmul
from bct.model.nonlinear import (
    add_layernorm, aligned_layernorm, gelu, gelu_acc, softmax, tanh_fixed,
)

__all__ = [
    "QuantLayer", "QuantBert", "IntegerOutput", "quantize", "forward", "trace", "mean_pool",
    "residual_add",
]

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
    """A BERT with every parameter in block format, bound to the config that encoded it.

    ``hidden_order`` (``Config.weight_equalize`` with ``hidden_perm``): hidden channel ``j`` of
    every stored tensor and intermediate is checkpoint channel ``hidden_order[j]``; None: the
    checkpoint's order.
    """

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
    hidden_order: tuple[int, ...] | None = None

    def __post_init__(self):
        o = self.hidden_order
        if o is not None and sorted(o) != list(range(self.hidden)):
            raise ValueError(f"hidden_order is not a permutation of the {self.hidden} hidden channels")

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
    order = hidden_order(weights, cfg)  # hidden_perm's channel order (None: not permuted)
    weights = equalize(weights, cfg)  # Config.weight_equalize (None: weights unchanged)
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
        hidden_order=None if order is None else tuple(int(i) for i in order),
    )


@dataclass(frozen=True, eq=False)
class IntegerOutput:
    """Result of :func:`forward`.

    Attributes
    ----------
    hidden : BlockTensor
        Last hidden state ``(B, T, H)`` (``T`` padded to a multiple of the block size); in
        ``cfg.residual_format`` (the activation format unless ``cfg.residual_bits`` is set),
        hidden channels in the stored order (:attr:`QuantBert.hidden_order`).
    embedding : numpy.ndarray
        Masked mean of ``hidden`` over tokens, decoded to float64 ``(B, H)``, in the
        checkpoint's channel order (un-permuted when ``hidden_order`` is set).
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

    wide = cfg.residual_bits is not None
    rf = cfg.residual_format  # == af unless wide

    def residual(a, b):  # requantize(*residual_add(a, b)), fused
        if wide:
            return aligned_requantize((a, b), _residual_scale((a, b), cfg), rf)
        return add_requantize(a, b, cfg=cfg, fmt=af)

    def norm(name, x, g, b):  # -> (matmul operand, residual copy)
        if wide:  # layernorm_wide(residual_add(x)), fused
            y, yr = aligned_layernorm(x, _residual_scale((x,), cfg), g, b, cfg, (af, rf))
            keep(name + "_wide", yr)
            return keep(name, y), yr
        y = keep(name, add_layernorm(x, g, b, cfg))  # layernorm(add(x)), fused
        return y, y

    pos = qm.pos_emb[np.arange(T)]
    word, typ = qm.word_emb[ids], qm.type_emb[tt]
    pos = BlockTensor(
        np.broadcast_to(pos.mant, word.shape).copy(), np.broadcast_to(pos.exp, word.exp.shape).copy(), pos.fmt
    )
    x = keep("embed.sum", add_requantize(word, pos, typ, cfg=cfg, fmt=rf))
    x, xr = norm("embed.ln", x, qm.emb_ln_g, qm.emb_ln_b)
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
        attn_res = keep(p + "attn_res", residual(attn_out, xr))
        h, hr = norm(p + "attn_ln", attn_res, lw.attn_ln_g, lw.attn_ln_b)
        if cfg.gelu_direct:
            acc = matmul(rows(h), lw.ffn1_w, cfg, lw.ffn1_b)
            if trace:
                keep(p + "ffn1", unrows(requantize(*acc, af)))
            g = keep(p + "gelu", unrows(gelu_acc(acc, cfg)))
        else:
            f1 = keep(p + "ffn1", lin(h, lw.ffn1_w, lw.ffn1_b))
            g = keep(p + "gelu", gelu(f1, cfg))
        f2 = keep(p + "ffn2", lin(g, lw.ffn2_w, lw.ffn2_b))
        res = keep(p + "ffn_res", residual(f2, hr))
        x, xr = norm(p + "out", res, lw.out_ln_g, lw.out_ln_b)
    keep("hidden", xr)
    emb = keep("embedding", mean_pool(xr, mask, cfg))
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
    embedding = emb.decode()
    if qm.hidden_order is not None:  # back to the checkpoint's channel order
        embedding = embedding[:, np.argsort(qm.hidden_order)]
    return IntegerOutput(
        hidden=xr,
        embedding=embedding,
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


def residual_add(*terms: BlockTensor, cfg: Config) -> Fixed:
    """Sum of residual-stream terms on the wide path, aligned by magnitude.

    Like :func:`~bct.model.matmul.add` (which it equals when ``residual_bits == act_bits``),
    but operands may be in ``cfg.residual_format``. A block's top bit is ``e + bits - 1``, so
    the row's scale is ``max(e + bits - act_bits) - acc_guard_bits`` over every block of every
    term (``bits`` its term's width) and each term becomes ``round_shift(q, scale - e)``: the
    row keeps ``act_bits - 1 + acc_guard_bits`` bits below its top bit, as ``add`` does. A
    residual term is then at most ``qmax_r * 2**g``, ``g = cfg.residual_guard_bits =
    acc_guard_bits - (residual_bits - act_bits) >= 0``, an activation term at most
    ``qmax_a * 2**acc_guard_bits``; both are below ``2**(act_bits - 1 + acc_guard_bits)``, so
    the sum of one of each stays within ``Config.add_bound`` and LayerNorm reads it at today's
    width. (Aligning to the largest raw exponent instead would round a wide residual to the
    grid of a narrow term whose exponent is larger though its values are smaller.)

    Parameters
    ----------
    *terms : BlockTensor
        One or two tensors of one shape, each in the activation or the residual format.

    Returns
    -------
    Fixed
    """
    scale = _residual_scale(terms, cfg)
    s = scale[..., None, None]
    value = sum(round_shift(t.blocks, s - t.exp[..., None]) for t in terms)
    return Fixed(value.reshape(terms[0].shape), scale)


def _residual_scale(terms: tuple, cfg: Config) -> np.ndarray:
    """:func:`residual_add`'s checks of its operands and its row scales."""
    if not 1 <= len(terms) <= 2:
        raise ValueError(f"residual_add takes 1 or 2 terms, not {len(terms)}")
    first = terms[0]
    for t in terms:
        if t.shape != first.shape:
            raise ValueError(f"cannot add {first.shape} and {t.shape}")
        if t.fmt not in (cfg.act_format, cfg.residual_format):
            raise ConfigError(
                f"residual operand format {t.fmt} is neither the activation nor the residual format")
    top = np.max([t.exp.max(axis=-1) + (t.fmt.bits - cfg.act_bits) for t in terms], axis=0)
    return (top - cfg.acc_guard_bits).astype(np.int64)


def mean_pool(x: BlockTensor, mask: np.ndarray, cfg: Config) -> BlockTensor:
    """Masked mean over tokens, integer-only: align every token's blocks to the largest exponent
    of the sequence minus the guard bits, sum, divide by the token count (RHAZ), re-encode to
    ``x``'s format (the residual format on the wide path)."""
    if x.fmt not in (cfg.act_format, cfg.residual_format):
        raise ConfigError(f"mean_pool operand format {x.fmt} is neither the activation nor the residual format")
    nb, T, H = x.shape
    e = np.where(mask[:, :, None], x.exp, np.iinfo(np.int64).min // 2)
    scale = e.max(axis=(1, 2)) - cfg.acc_guard_bits  # (B,)
    s = scale[:, None, None, None] - x.exp[..., None]
    terms = np.where(mask[:, :, None, None], round_shift(x.blocks, s), 0)
    total = terms.sum(axis=1).reshape(nb, H)
    count = mask.sum(axis=1)[:, None]
    return requantize(round_div(total, np.maximum(count, 1)), scale, x.fmt)


def trace(qm: QuantBert, enc: Encoding) -> dict:
    """Every intermediate of :func:`forward` keyed by stage name (block format; ``logits`` is
    the accumulator :class:`~bct.model.matmul.Fixed`)."""
    return forward(qm, enc, trace=True).stages
