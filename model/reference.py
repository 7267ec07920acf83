"""Float64 numpy forward pass of BERT, with exactly the structure of the integer model.

This is the golden reference every compressed / integer result is compared against. Its
operations, in order, are those the integer model implements (no fused or reordered steps)::

    embed.sum   = word[ids] + position[0..T-1] + type[token_type_ids]
    embed.ln    = LayerNorm(embed.sum)
    for each layer i (x = previous layer's out, or embed.ln):
        layer{i}.q, .k, .v = x @ {q,k,v}_w + {q,k,v}_b
        layer{i}.scores    = Q_h K_h^T / sqrt(head_dim) + mask     (per head)
        layer{i}.probs     = softmax(scores) over keys
        layer{i}.context   = probs V_h, heads merged back
        layer{i}.attn_out  = context @ o_w + o_b
        layer{i}.attn_res  = attn_out + x
        layer{i}.attn_ln   = LayerNorm(attn_res)
        layer{i}.ffn1      = attn_ln @ ffn1_w + ffn1_b
        layer{i}.gelu      = GELU(ffn1)                            (exact erf GELU)
        layer{i}.ffn2      = gelu @ ffn2_w + ffn2_b
        layer{i}.ffn_res   = ffn2 + attn_ln
        layer{i}.out       = LayerNorm(ffn_res)
    hidden    = last layer's out
    embedding = masked mean of hidden over tokens (sentence embedding, sentence-transformers style)
    pooled    = tanh(hidden[:, 0] @ pooler_w + pooler_b)               (when the model has a pooler)
    logits    = pooled @ classifier_w + classifier_b                   (with a classification head)

Stage names and shapes (``B`` batch, ``T`` tokens, ``H`` hidden, ``A`` heads, ``F`` FFN width)::

    embed.sum, embed.ln                                  (B, T, H)
    layer{i}.q, layer{i}.k, layer{i}.v                   (B, T, H)   heads not yet split
    layer{i}.scores, layer{i}.probs                      (B, A, T, T)
    layer{i}.context                                     (B, T, H)   heads merged
    layer{i}.attn_out, .attn_res, .attn_ln               (B, T, H)
    layer{i}.ffn1, layer{i}.gelu                         (B, T, F)
    layer{i}.ffn2, .ffn_res, .out                        (B, T, H)
    hidden                                               (B, T, H)
    embedding                                            (B, H)
    pooled                                               (B, H)      only with a pooler
    logits                                               (B, L)      only with a classifier

Head ``h`` of Q, K, V and context is columns ``h*head_dim:(h+1)*head_dim``. The attention mask
is additive: :data:`MASK_VALUE` on padded keys, 0 elsewhere (``scores`` includes it). Padded
query rows are computed like the others (as ``transformers`` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checkpoint import BertWeights, Encoding

__all__ = ["MASK_VALUE", "ReferenceOutput", "forward", "gelu", "layer_norm", "stage_names", "trace"]

#: Additive attention-mask value on padded keys (the original BERT constant; exp() of it
#: underflows to exactly 0 in float64).
MASK_VALUE = -10000.0

_LAYER_STAGES = (
    "q", "k", "v", "scores", "probs", "context", "attn_out", "attn_res", "attn_ln",
    "ffn1", "gelu", "ffn2", "ffn_res", "out",
)


def stage_names(weights: BertWeights) -> list[str]:
    """The stage names :func:`trace` returns for ``weights``, in computation order.

    Parameters
    ----------
    weights : BertWeights

    Returns
    -------
    list of str
    """
    names = ["embed.sum", "embed.ln"]
    for i in range(weights.layers):
        names += [f"layer{i}.{s}" for s in _LAYER_STAGES]
    names += ["hidden", "embedding"]
    if weights.has_pooler:
        names.append("pooled")
    if weights.has_classifier:
        names.append("logits")
    return names


@dataclass(frozen=True, eq=False)
class ReferenceOutput:
    """Result of :func:`forward`.

    Attributes
    ----------
    hidden : numpy.ndarray
        Last hidden state ``(B, T, H)``.
    embedding : numpy.ndarray
        Masked mean of ``hidden`` over tokens ``(B, H)``.
    pooled : numpy.ndarray or None
        BERT pooler output ``(B, H)``, None without a pooler.
    logits : numpy.ndarray or None
        Classifier output ``(B, num_labels)``, None without a classifier.
    stages : dict of str to numpy.ndarray or None
        Every intermediate (see the module docstring) when traced, else None.
    """

    hidden: np.ndarray
    embedding: np.ndarray
    pooled: np.ndarray | None
    logits: np.ndarray | None
    stages: dict[str, np.ndarray] | None


def layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis with the biased (population) variance.

    Parameters
    ----------
    x : numpy.ndarray
    gamma, beta : numpy.ndarray
        Scale and shift, shape ``x.shape[-1:]``.
    eps : float

    Returns
    -------
    numpy.ndarray
    """
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(centred * centred, axis=-1, keepdims=True)
    return centred / np.sqrt(var + eps) * gamma + beta


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))``, in float64.

    numpy has no vectorised ``erf``; torch's float64 ``erf`` is used on a zero-copy view.

    Parameters
    ----------
    x : numpy.ndarray

    Returns
    -------
    numpy.ndarray
    """
    import torch

    x = np.ascontiguousarray(x, dtype=np.float64)
    erf = torch.special.erf(torch.from_numpy(x / math.sqrt(2.0))).numpy()
    return 0.5 * x * (1.0 + erf)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _inputs(weights, input_ids, token_type_ids, attention_mask):
    if isinstance(input_ids, Encoding):
        if token_type_ids is not None or attention_mask is not None:
            raise ValueError("pass either an Encoding or separate arrays, not both")
        input_ids, token_type_ids, attention_mask = input_ids
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a 2-D integer array, got shape {ids.shape} of {ids.dtype}")
    b, t = ids.shape
    if t > weights.max_positions:
        raise ValueError(
            f"sequence length {t} exceeds the position table ({weights.max_positions} positions)"
        )
    if ids.size and (ids.min() < 0 or ids.max() >= weights.vocab):
        raise ValueError(f"input_ids out of range [0, {weights.vocab})")
    tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if tt.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(
            f"token_type_ids {tt.shape} and attention_mask {mask.shape} must match input_ids {ids.shape}"
        )
    if tt.size and (tt.min() < 0 or tt.max() >= weights.type_vocab):
        raise ValueError(f"token_type_ids out of range [0, {weights.type_vocab})")
    if not np.all((mask == 0) | (mask == 1)):
        raise ValueError("attention_mask must hold only 0 and 1")
    return ids, tt, mask.astype(np.float64)


def forward(
    weights: BertWeights,
    input_ids,
    token_type_ids=None,
    attention_mask=None,
    *,
    trace: bool = False,
) -> ReferenceOutput:
    """Run BERT in float64.

    Parameters
    ----------
    weights : BertWeights
    input_ids : numpy.ndarray or Encoding
        Token ids ``(B, T)``, or a whole :class:`~bct.model.checkpoint.Encoding`.
    token_type_ids : numpy.ndarray, optional
        Segment ids ``(B, T)``; zeros by default.
    attention_mask : numpy.ndarray, optional
        1 for real tokens, 0 for padding ``(B, T)``; all ones by default.
    trace : bool, optional
        Keep every intermediate in :attr:`ReferenceOutput.stages`.

    Returns
    -------
    ReferenceOutput

    Raises
    ------
    ValueError
        On malformed inputs (shapes, id ranges, mask values, too long).
    """
    ids, tt, mask = _inputs(weights, input_ids, token_type_ids, attention_mask)
    b, t = ids.shape
    a, d = weights.heads, weights.head_dim
    eps = weights.layer_norm_eps
    stages: dict[str, np.ndarray] = {}

    def keep(name: str, value: np.ndarray) -> np.ndarray:
        if trace:
            stages[name] = value
        return value

    x = keep("embed.sum", weights.word_emb[ids] + weights.pos_emb[np.arange(t)] + weights.type_emb[tt])
    x = keep("embed.ln", layer_norm(x, weights.emb_ln_g, weights.emb_ln_b, eps))
    additive = ((1.0 - mask) * MASK_VALUE)[:, None, None, :]  # (B, 1, 1, T) over keys
    scale = 1.0 / math.sqrt(d)
    for i, lw in enumerate(weights.encoder):
        p = f"layer{i}."
        q = keep(p + "q", x @ lw.q_w + lw.q_b)
        k = keep(p + "k", x @ lw.k_w + lw.k_b)
        v = keep(p + "v", x @ lw.v_w + lw.v_b)
        qh = q.reshape(b, t, a, d).transpose(0, 2, 1, 3)
        kh = k.reshape(b, t, a, d).transpose(0, 2, 1, 3)
        vh = v.reshape(b, t, a, d).transpose(0, 2, 1, 3)
        scores = keep(p + "scores", (qh @ kh.transpose(0, 1, 3, 2)) * scale + additive)
        probs = keep(p + "probs", _softmax(scores))
        ctx = keep(p + "context", (probs @ vh).transpose(0, 2, 1, 3).reshape(b, t, a * d))
        attn_out = keep(p + "attn_out", ctx @ lw.o_w + lw.o_b)
        attn_res = keep(p + "attn_res", attn_out + x)
        h = keep(p + "attn_ln", layer_norm(attn_res, lw.attn_ln_g, lw.attn_ln_b, eps))
        f1 = keep(p + "ffn1", h @ lw.ffn1_w + lw.ffn1_b)
        g = keep(p + "gelu", gelu(f1))
        f2 = keep(p + "ffn2", g @ lw.ffn2_w + lw.ffn2_b)
        res = keep(p + "ffn_res", f2 + h)
        x = keep(p + "out", layer_norm(res, lw.out_ln_g, lw.out_ln_b, eps))
    hidden = keep("hidden", x)
    counts = np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
    embedding = keep("embedding", (hidden * mask[:, :, None]).sum(axis=1) / counts)
    pooled = logits = None
    if weights.has_pooler:
        pooled = keep("pooled", np.tanh(hidden[:, 0] @ weights.pooler_w + weights.pooler_b))
    if weights.has_classifier:
        logits = keep("logits", pooled @ weights.classifier_w + weights.classifier_b)
    return ReferenceOutput(
        hidden=hidden, embedding=embedding, pooled=pooled, logits=logits,
        stages=stages if trace else None,
    )


def trace(
    weights: BertWeights, input_ids, token_type_ids=None, attention_mask=None
) -> dict[str, np.ndarray]:
    """Every intermediate of :func:`forward`, keyed by stage name (see the module docstring).

    Parameters
    ----------
    weights : BertWeights
    input_ids, token_type_ids, attention_mask
        As for :func:`forward`.

    Returns
    -------
    dict of str to numpy.ndarray
        Ordered as :func:`stage_names`.
    """
    return forward(weights, input_ids, token_type_ids, attention_mask, trace=True).stages
