"""Data-free weight transforms that leave the float network unchanged (``Config.weight_equalize``).

Each transform rewrites a :class:`~bct.model.checkpoint.BertWeights` into another one that
computes the same function in real arithmetic (in float64 the outputs differ by rounding only,
~1e-14), but whose weights lose less in the block format: blocks of ``weight_block_size`` run
along the *input-feature* axis of every weight matrix and share one power-of-two exponent, so
a block's step is ``2**e`` whatever its values. No data and no retraining: only the weights are
read. The transforms (:data:`~bct.config.WEIGHT_EQUALIZE_TRANSFORMS`, applied in that order):

``hidden_perm``
    Permute the hidden channels of the whole network (:func:`hidden_permutation`: by decreasing
    largest ``|gamma| + |beta|`` over every LayerNorm, a stable sort): the columns of the three
    embedding tables, every LayerNorm's gamma and beta, the input rows of the query, key, value,
    FFN1 and pooler weights, the output columns and biases of the attention output and FFN2
    projections. Exact in float (LayerNorm is invariant under a permutation of its row); the
    residual stream, hence every hidden state, is then held in the permuted order, so the
    channels that carry BERT's outliers share a few blocks of every activation, table and
    weight instead of setting the exponent of one block in twelve. The pooler's output and the
    classifier are not permuted (logits are unchanged); the sentence embedding is un-permuted by
    :func:`bct.model.integer.forward` from :attr:`~bct.model.integer.QuantBert.hidden_order`.
``qk_scale``
    Per query/key channel ``j`` (each output channel of the query and key projections), a
    factor ``s_j = 2**(i / SCALE_STEPS)``, ``0 <= i < SCALE_STEPS``: ``q_w[:, j]`` and ``q_b[j]``
    times ``s_j``, ``k_w[:, j]`` and ``k_b[j]`` divided by it. The attention scores
    ``sum_j q_j k_j`` are unchanged. A power of two only shifts the exponents of a row's blocks,
    so one octave holds every distinct choice; ``s_j`` is the one of least summed relative
    squared encoding error of the two rows (query row with the ``1 / sqrt(head_dim)`` that
    :func:`bct.model.integer.quantize` folds into it), the smallest on ties. It moves each
    row's values onto the power-of-two grid where its blocks round best.
``ffn_perm``
    Permute each layer's FFN intermediate channels (columns of ``ffn1_w`` and entries of
    ``ffn1_b``, rows of ``ffn2_w``; exact, GELU is elementwise) by decreasing largest magnitude
    of their ``ffn2_w`` row, so the inputs of the second FFN matmul that share a block are of
    similar size (a stable sort: no float changes at all).

The hook is :func:`equalize`, called on the float checkpoint right before block encoding.
Tried and not kept (no gain in the block format, docs/evaluation.md): per-head Hadamard
rotations of V/O and Q/K, power-of-two and searched V/O channel scaling, a permutation of the
hidden channels by activation statistics (needs data; measured below ``hidden_perm``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from bct.config import Config, WEIGHT_EQUALIZE_TRANSFORMS, BlockFormat
from bct.model.blocks import encode
from bct.model.checkpoint import BertWeights, LayerWeights

__all__ = ["SCALE_STEPS", "equalize", "hidden_order", "hidden_permutation", "permute_hidden", "qk_scales",
           "ffn_permutation"]

#: Candidate channel factors ``2**(i / SCALE_STEPS)``, ``i = 0 .. SCALE_STEPS - 1``.
SCALE_STEPS = 32


def _row_rel_err(wt: np.ndarray, fmt: BlockFormat, search: str) -> np.ndarray:
    """Squared block-format encoding error of every row of ``wt`` ``(out, in)`` over the row's
    squared norm (0 for an all-zero row)."""
    t = encode(wt, fmt, search)
    dq = np.ldexp(t.mant.astype(np.float64).reshape(t.exp.shape + (-1,)), t.exp[..., None])
    err = ((dq.reshape(wt.shape) - wt) ** 2).sum(axis=1)
    norm = (wt**2).sum(axis=1)
    return np.divide(err, norm, out=np.zeros_like(err), where=norm > 0)


def qk_scales(lw: LayerWeights, head_dim: int, fmt: BlockFormat, search: str) -> np.ndarray:
    """The ``qk_scale`` factor of every query/key channel of one layer (see the module doc).

    Parameters
    ----------
    lw : LayerWeights
    head_dim : int
        Width of one attention head (the query row is encoded times ``1 / sqrt(head_dim)``).
    fmt : BlockFormat
        The weight format.
    search : str
        ``Config.weight_exp_search``.

    Returns
    -------
    numpy.ndarray of float64, shape (hidden,)
        Factors in ``[1, 2)``.
    """
    cand = 2.0 ** (np.arange(SCALE_STEPS) / SCALE_STEPS)
    qt, kt = lw.q_w.T * (1.0 / math.sqrt(head_dim)), lw.k_w.T
    err = np.stack([_row_rel_err(qt * c, fmt, search) + _row_rel_err(kt / c, fmt, search)
                    for c in cand])
    return cand[np.argmin(err, axis=0)]


def ffn_permutation(lw: LayerWeights) -> np.ndarray:
    """The ``ffn_perm`` order of one layer's intermediate channels: by decreasing largest
    ``|ffn2_w|`` of the channel's row (stable)."""
    return np.argsort(-np.abs(lw.ffn2_w).max(axis=1), kind="stable")


def hidden_permutation(weights: BertWeights) -> np.ndarray:
    """The ``hidden_perm`` order: position ``j`` of the permuted network holds checkpoint
    channel ``order[j]``, by decreasing largest ``|gamma| + |beta|`` over every LayerNorm
    (embedding, each layer's attention and output LayerNorm; stable)."""
    ln = [(weights.emb_ln_g, weights.emb_ln_b)] + [
        (g, b) for lw in weights.encoder for g, b in ((lw.attn_ln_g, lw.attn_ln_b), (lw.out_ln_g, lw.out_ln_b))]
    score = np.max([np.abs(g) + np.abs(b) for g, b in ln], axis=0)
    return np.argsort(-score, kind="stable")


def hidden_order(weights: BertWeights, cfg: Config) -> np.ndarray | None:
    """:func:`hidden_permutation` when ``cfg.weight_equalize`` names ``hidden_perm``, else None."""
    if cfg.weight_equalize is None or "hidden_perm" not in cfg.weight_equalize.split("+"):
        return None
    return hidden_permutation(weights)


def permute_hidden(w: BertWeights, p: np.ndarray) -> BertWeights:
    """The same network with checkpoint hidden channel ``p[j]`` at position ``j`` (the
    ``hidden_perm`` rewrite for any order ``p``; pooler output and classifier unchanged)."""
    layers = tuple(
        dataclasses.replace(
            lw, q_w=_ro(lw.q_w[p]), k_w=_ro(lw.k_w[p]), v_w=_ro(lw.v_w[p]), o_w=_ro(lw.o_w[:, p]),
            o_b=_ro(lw.o_b[p]), attn_ln_g=_ro(lw.attn_ln_g[p]), attn_ln_b=_ro(lw.attn_ln_b[p]),
            ffn1_w=_ro(lw.ffn1_w[p]), ffn2_w=_ro(lw.ffn2_w[:, p]), ffn2_b=_ro(lw.ffn2_b[p]),
            out_ln_g=_ro(lw.out_ln_g[p]), out_ln_b=_ro(lw.out_ln_b[p]))
        for lw in w.encoder
    )
    pooler = {} if w.pooler_w is None else {"pooler_w": _ro(w.pooler_w[p])}
    return dataclasses.replace(
        w, word_emb=_ro(w.word_emb[:, p]), pos_emb=_ro(w.pos_emb[:, p]), type_emb=_ro(w.type_emb[:, p]),
        emb_ln_g=_ro(w.emb_ln_g[p]), emb_ln_b=_ro(w.emb_ln_b[p]), encoder=layers, **pooler)


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def equalize(weights: BertWeights, cfg: Config) -> BertWeights:
    """Apply ``cfg.weight_equalize`` to every encoder layer of a float checkpoint.

    Parameters
    ----------
    weights : BertWeights
    cfg : Config
        Its ``weight_equalize`` names the transforms; ``weight_format`` and
        ``weight_exp_search`` are the encoding ``qk_scale`` optimises for.

    Returns
    -------
    BertWeights
        ``weights`` itself when ``cfg.weight_equalize`` is None, else the same network with
        rewritten (read-only float64) tensors.

    Raises
    ------
    bct.config.ConfigError
        When ``qk_scale`` cannot block the query/key rows (``hidden`` not a multiple of the
        weight block), as :func:`bct.model.integer.quantize` would.

    Notes
    -----
    With ``hidden_perm`` the result computes the same function with its hidden channels in the
    order :func:`hidden_order` returns (pooler output and logits in the checkpoint's order).
    """
    if cfg.weight_equalize is None:
        return weights
    names = cfg.weight_equalize.split("+")
    assert all(n in WEIGHT_EQUALIZE_TRANSFORMS for n in names)  # validated by Config
    fmt, search = cfg.weight_format, cfg.weight_exp_search
    order = hidden_order(weights, cfg)
    if order is not None:
        weights = permute_hidden(weights, order)
    layers = []
    for lw in weights.encoder:
        new = {}
        if "qk_scale" in names:
            s = qk_scales(lw, weights.head_dim, fmt, search)
            new.update(q_w=lw.q_w * s, q_b=lw.q_b * s, k_w=lw.k_w / s, k_b=lw.k_b / s)
        if "ffn_perm" in names:
            p = ffn_permutation(lw)
            new.update(ffn1_w=lw.ffn1_w[:, p], ffn1_b=lw.ffn1_b[p], ffn2_w=lw.ffn2_w[p])
        layers.append(dataclasses.replace(lw, **{k: _ro(v) for k, v in new.items()}))
    return dataclasses.replace(weights, encoder=tuple(layers))
