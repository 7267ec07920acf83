"""Print flat JSON: the integer model against the float64 reference on real sentences.

Modes (``--mode``):

``integer`` (default)
    The integer model (``bct.model.integer``) for a config given as ``--set KEY=VALUE``
    options (as for ``bct``): sentence-embedding cosine against float64 (mean, min), whole-model
    compression ratio (``QuantBert.storage_bits``) and, with ``--stages``, every stage's
    relative error on real tokens.
``attribute``
    Which quantisation costs what. :class:`FakeQuant` is a float64 forward with the integer
    model's error sources as switchable knobs (:data:`KNOBS`: weight matrices, embedding
    tables, bias / LayerNorm vectors, each stage's activation blocks, the fixed-point grids
    and units of GELU / softmax / LayerNorm), at the config's formats; with every knob on it
    lands within ~2e-5 of the integer model's cosine. For each knob ``1 - cos`` (mean over
    sentences) with only that knob on (``only.<knob>``) and with every knob but it
    (``all_but.<knob>``); ``--which`` picks one of the two, ``--knobs`` a subset.
``sim``
    Every knob on except ``--without K1,K2``: what a change of the integer model (e.g. wider
    intermediates that are no matmul operand) would buy before it is built.

With ``--set residual_bits=N`` (the wide residual path) the stand-in keeps the residual sums,
the embedding sum, the LayerNorm outputs' residual copies and the embedding in
``Config.residual_format``, rounds LayerNorm's and the residual adder's inputs to the row grid
of ``bct.model.integer.residual_add``, and feeds the matmuls the activation-format copies; with
``--set gelu_direct=true`` it leaves ``act.ffn1`` off.

``--perm data|weights`` permutes the hidden channels of every weight, table and LayerNorm
vector before quantising (exact in float; outlier channels then share blocks): by the largest
normalised |value| over the residual / LayerNorm stages of 64 STS-B *train* sentences, or by
LayerNorm |gamma| + |beta| (data-free: ``bct.model.equalize.hidden_permutation``, the order of
``--set weight_equalize=hidden_perm``, which the integer model also un-permutes). The cosine is taken against the reference of the same
permuted network (cosine is permutation invariant).

Sentences: ``--sentences N`` drawn without replacement (``--seed``) from both sentence columns
of STS-B dev (``$BCT_GLUE_DIR``), batched by token length (``--batch``).

    python scripts/fidelity.py --sentences 400 --set block_size=8 --set weight_block_size=32
    python scripts/fidelity.py --mode attribute --sentences 128 --which only
    python scripts/fidelity.py --mode sim --set block_size=8 --without act.attn_res,act.ffn_res
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bct.cli import config_from_args  # noqa: E402
from bct.config import Config  # noqa: E402
from bct.model import integer, reference  # noqa: E402
from bct.model.blocks import encode  # noqa: E402
from bct.model.checkpoint import BertWeights, Encoding, load_bert, load_tokenizer  # noqa: E402
from bct.model.equalize import hidden_permutation, permute_hidden  # noqa: E402
from bct.model.glue import load_task  # noqa: E402
from bct.model.nonlinear import gelu_fixed, softmax_fixed  # noqa: E402

#: Stage kinds whose activation blocks the attribution switches (``act.<kind>``).
ACT_KINDS = (
    "embed.sum", "embed.ln", "q", "k", "v", "vt", "scores", "probs", "context", "attn_out",
    "attn_res", "attn_ln", "ffn1", "gelu", "ffn2", "ffn_res", "out", "embedding",
)
#: Every knob of the attribution.
KNOBS = (
    "w.emb", "w.qkv", "w.o", "w.ffn1", "w.ffn2", "vec.bias", "vec.ln",
    *(f"act.{k}" for k in ACT_KINDS),
    "unit.softmax", "unit.gelu", "unit.ln",
)


# ------------------------------------------------------------------------------------------------
# Data
def sentences(n: int, seed: int, split: str = "dev") -> list[str]:
    """``n`` distinct sentences drawn (seeded) from both columns of an STS-B split."""
    d = load_task("STS-B", split)
    pool = sorted(set(d.text_a) | set(d.text_b))
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]


def batches(tok, texts: list[str], max_len: int, size: int) -> list[Encoding]:
    """Encodings of ``texts`` in batches of similar token length (padded to the longest)."""
    lengths = [len(e) for e in tok.hf(texts, truncation=True, max_length=max_len)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return [
        tok.encode([texts[i] for i in order[j:j + size]], max_len=max_len, padding="longest")
        for j in range(0, len(texts), size)
    ]


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# ------------------------------------------------------------------------------------------------
# Hidden-channel permutation (exact in float)
def perm_from_data(w: BertWeights, encs) -> np.ndarray:
    """Channels by decreasing largest |value| over the residual / LayerNorm stages (float)."""
    score = np.zeros(w.hidden)
    for enc in encs:
        st = reference.forward(w, enc, trace=True).stages
        m = enc.attention_mask.astype(bool)
        for name, x in st.items():
            if x.ndim == 3 and x.shape[-1] == w.hidden and name.endswith(("ln", "res", "out", "sum")):
                a = np.abs(x[m])
                score = np.maximum(score, a.max(0) / np.sqrt((a * a).mean()))
    return np.argsort(-score, kind="stable")


# ------------------------------------------------------------------------------------------------
# Float forward with switchable quantisation knobs (the attribution)
class FakeQuant:
    """A float64 BERT forward whose error sources mirror :mod:`bct.model.integer`.

    Parameters
    ----------
    weights : BertWeights
    cfg : Config
        Formats and fixed-point precisions.
    knobs : set of str
        The error sources switched on (see :data:`KNOBS`).
    dtype : numpy dtype
        Of the matrix products (float32 halves the time; its rounding is ~1e-7 relative).
    """

    def __init__(self, weights: BertWeights, cfg: Config, knobs, dtype=np.float64):
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown knob(s): {sorted(unknown)}")
        self.w, self.cfg, self.knobs, self.dtype = weights, cfg, set(knobs), dtype
        if cfg.gelu_direct:  # GELU reads the FFN1 accumulator: no activation blocks there
            self.knobs.discard("act.ffn1")
        wf, vf = cfg.weight_format, cfg.vector_format
        s = 1.0 / math.sqrt(weights.head_dim)

        def mat(a, knob):  # (in, out), blocked along in
            return encode(a.T, wf).decode().T if knob in self.knobs else a

        def vec(a, knob):
            return encode(a, vf).decode() if knob in self.knobs else a

        self.layers = []
        for lw in weights.encoder:
            self.layers.append(dict(
                q_w=mat(lw.q_w * s, "w.qkv"), q_b=vec(lw.q_b * s, "vec.bias"),
                k_w=mat(lw.k_w, "w.qkv"), k_b=vec(lw.k_b, "vec.bias"),
                v_w=mat(lw.v_w, "w.qkv"), v_b=vec(lw.v_b, "vec.bias"),
                o_w=mat(lw.o_w, "w.o"), o_b=vec(lw.o_b, "vec.bias"),
                ffn1_w=mat(lw.ffn1_w, "w.ffn1"), ffn1_b=vec(lw.ffn1_b, "vec.bias"),
                ffn2_w=mat(lw.ffn2_w, "w.ffn2"), ffn2_b=vec(lw.ffn2_b, "vec.bias"),
                attn_ln_g=vec(lw.attn_ln_g, "vec.ln"), attn_ln_b=vec(lw.attn_ln_b, "vec.ln"),
                out_ln_g=vec(lw.out_ln_g, "vec.ln"), out_ln_b=vec(lw.out_ln_b, "vec.ln"),
            ))
        emb = (lambda a: encode(a, wf).decode()) if "w.emb" in self.knobs else (lambda a: a)
        self.word, self.pos, self.type = emb(weights.word_emb), emb(weights.pos_emb), emb(weights.type_emb)
        self.emb_ln = (vec(weights.emb_ln_g, "vec.ln"), vec(weights.emb_ln_b, "vec.ln"))

    def act(self, kind: str, x: np.ndarray, fmt=None) -> np.ndarray:
        """``x`` through the activation format (or ``fmt``; blocks along the last axis) if
        switched on."""
        if f"act.{kind}" not in self.knobs:
            return x
        fmt = fmt or self.cfg.act_format
        B, n = self.cfg.block_size, x.shape[-1]
        if n % B:  # token axes: zero padding changes no block maximum
            pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -n % B)])
            return encode(pad, fmt).decode()[..., :n]
        return encode(x, fmt).decode()

    @property
    def wide(self) -> bool:
        """The wide residual path (``Config.residual_bits``) is on."""
        return self.cfg.residual_bits is not None

    def res(self, kind: str, a, xr) -> np.ndarray:
        """A residual sum (``a`` a matmul output, ``xr`` the residual copy) in the residual
        format. On the wide path each term is first rounded to the row's grid as the integer
        model aligns it (:func:`bct.model.integer.residual_add`)."""
        cfg = self.cfg
        if not self.wide:
            return self.act(kind, a + xr)
        a, xr = self.align((a, cfg.act_format), (xr, cfg.residual_format))
        return self.act(kind, a + xr, cfg.residual_format)

    def align(self, *terms):
        """Each ``(values, format)`` term rounded (half away from zero) to its row's grid
        ``2**(max(e + bits - act_bits) - acc_guard_bits)`` (``e`` each block's exponent in its
        term's format)."""
        cfg = self.cfg
        if "unit.ln" not in self.knobs:  # the alignment is part of the LN / adder unit model
            return [t for t, _ in terms]
        top = np.max([encode(t, f).exp.max(-1) + f.bits - cfg.act_bits for t, f in terms], axis=0)
        step = np.ldexp(1.0, top - cfg.acc_guard_bits)[..., None]
        return [np.trunc(t / step + np.copysign(0.5, t)) * step for t, _ in terms]

    def mm(self, a, b):
        """``a @ b`` in :attr:`dtype`, returned as float64."""
        if self.dtype == np.float64:
            return a @ b
        return (a.astype(self.dtype) @ b.astype(self.dtype)).astype(np.float64)

    def ln(self, x, g, b, kind):
        """LayerNorm; on the wide path ``(act copy, residual copy)``."""
        cfg = self.cfg
        if self.wide:
            (x,) = self.align((x, cfg.residual_format))
        mean = x.mean(-1, keepdims=True)
        c = x - mean
        y = c / np.sqrt((c * c).mean(-1, keepdims=True) + self.w.layer_norm_eps)
        if "unit.ln" in self.knobs:  # ln_frac standardised grid, ln_out_frac output grid
            grid = lambda v, f: np.trunc(np.ldexp(v, f) + np.copysign(0.5, v)) / 2.0**f  # noqa: E731
            lim = 2.0 ** cfg.ln_out_int_bits
            y = np.clip(grid(grid(y, cfg.ln_frac) * g, cfg.ln_out_frac) + grid(b, cfg.ln_out_frac), -lim, lim)
        else:
            y = y * g + b
        if self.wide:
            return self.act(kind, y), self.act(kind, y, cfg.residual_format)
        return self.act(kind, y)

    def gelu(self, x):
        if "unit.gelu" in self.knobs:
            f = self.cfg.gelu_frac
            xi = np.trunc(np.ldexp(x, f) + np.copysign(0.5, x)).astype(np.int64)
            return self.act("gelu", np.ldexp(gelu_fixed(xi, self.cfg).astype(np.float64), -f))
        return self.act("gelu", reference.gelu(x))

    def softmax(self, s, key_mask):
        cfg = self.cfg
        if "unit.softmax" in self.knobs:
            f = cfg.softmax_frac
            xi = np.trunc(np.ldexp(s, f) + np.copysign(0.5, s)).astype(np.int64)
            p = np.ldexp(softmax_fixed(xi, cfg, key_mask).astype(np.float64), -cfg.softmax_out_frac)
        else:
            z = np.where(key_mask, s, -np.inf)
            e = np.exp(z - z.max(-1, keepdims=True))
            p = e / e.sum(-1, keepdims=True)
        return self.act("probs", p)

    def forward(self, enc: Encoding) -> np.ndarray:
        """Sentence embeddings (masked mean pooling) ``(B, H)``."""
        ids, tt, mask = (np.asarray(a) for a in enc)
        mask = mask.astype(bool)
        T = ids.shape[1]
        nb, A, d = ids.shape[0], self.w.heads, self.w.head_dim
        x = self.word[ids] + self.pos[np.arange(T)] + self.type[tt]
        x = self.act("embed.sum", x, self.cfg.residual_format if self.wide else None)
        x = self.ln(x, *self.emb_ln, "embed.ln")
        x, xr = x if self.wide else (x, x)  # matmul operand, residual copy
        key_mask = mask[:, None, None, :]
        heads = lambda y: y.reshape(nb, T, A, d).transpose(0, 2, 1, 3)  # noqa: E731
        for lw in self.layers:
            q = self.act("q", self.mm(x, lw["q_w"]) + lw["q_b"])
            k = self.act("k", self.mm(x, lw["k_w"]) + lw["k_b"])
            v = self.act("v", self.mm(x, lw["v_w"]) + lw["v_b"])
            vt = self.act("vt", heads(v).transpose(0, 1, 3, 2))  # (B, A, d, T) blocked along T
            s = self.act("scores", np.where(key_mask, self.mm(heads(q), heads(k).transpose(0, 1, 3, 2)), 0.0))
            p = self.softmax(s, key_mask)
            ctx = self.act("context", self.mm(p, vt.transpose(0, 1, 3, 2)))  # blocked along d
            ctx = ctx.transpose(0, 2, 1, 3).reshape(nb, T, A * d)
            a = self.act("attn_out", self.mm(ctx, lw["o_w"]) + lw["o_b"])
            h = self.ln(self.res("attn_res", a, xr), lw["attn_ln_g"], lw["attn_ln_b"], "attn_ln")
            h, hr = h if self.wide else (h, h)
            f1 = self.act("ffn1", self.mm(h, lw["ffn1_w"]) + lw["ffn1_b"])
            f2 = self.act("ffn2", self.mm(self.gelu(f1), lw["ffn2_w"]) + lw["ffn2_b"])
            x = self.ln(self.res("ffn_res", f2, hr), lw["out_ln_g"], lw["out_ln_b"], "out")
            x, xr = x if self.wide else (x, x)
        m = mask[:, :, None]
        return self.act("embedding", (xr * m).sum(1) / np.maximum(m.sum(1), 1),
                        self.cfg.residual_format if self.wide else None)


# ------------------------------------------------------------------------------------------------
# Modes
def _stage_errors(weights, qm, enc, sums: dict) -> None:
    """Accumulate squared error and squared norm per stage on real tokens."""
    ref = reference.forward(weights, enc, trace=True)
    out = integer.forward(qm, enc, trace=True)
    valid = enc.attention_mask.astype(bool)
    T = valid.shape[1]
    for name in reference.stage_names(weights):
        if name.endswith(".q"):
            continue  # the integer query carries the folded 1/sqrt(head_dim)
        got, want = out.stages[name].decode(), ref.stages[name]
        if got.ndim == 4:  # (B, A, T, T): real query rows and keys
            got = got[:, :, :T, :T]
            m = valid[:, None, :, None] & valid[:, None, None, :]
            got, want = got[np.broadcast_to(m, got.shape)], want[np.broadcast_to(m, want.shape)]
        elif got.ndim == 3:
            got, want = got[:, :T][valid], want[valid]
        e, n = sums.get(name, (0.0, 0.0))
        sums[name] = (e + float(((got - want) ** 2).sum()), n + float((want**2).sum()))


def run_integer(cfg: Config, weights, encs, stages: bool) -> dict:
    qm = integer.quantize(weights, cfg)
    cos, sums = [], {}
    for enc in encs:
        if stages:
            _stage_errors(weights, qm, enc, sums)
        cos.append(cosine(integer.forward(qm, enc).embedding, FakeQuant(weights, cfg, ()).forward(enc)))
    cos = np.concatenate(cos)
    n = sum(a.size for a in weights.named_arrays().values())
    res = {
        "mode": "integer",
        "config_hash": cfg.hash,
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "sentences": int(cos.size),
        "compression_ratio": 32 * n / qm.storage_bits(),
    }
    for name, (e, nn) in sums.items():
        res[f"stage_rel_err.{name}"] = math.sqrt(e / nn)
    return res


def run_sim(cfg: Config, weights, encs, without=()) -> dict:
    """Every knob but ``without`` on: the float stand-in of the integer model at ``cfg``."""
    ref = np.concatenate([FakeQuant(weights, cfg, ()).forward(e) for e in encs])
    fq = FakeQuant(weights, cfg, set(KNOBS) - set(without))
    cos = cosine(np.concatenate([fq.forward(e) for e in encs]), ref)
    return {"mode": "sim", "config_hash": cfg.hash, "sentences": int(cos.size),
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def run_attribute(cfg: Config, weights, encs, knobs, which=("only", "all_but")) -> dict:
    ref = np.concatenate([FakeQuant(weights, cfg, ()).forward(e) for e in encs])

    def loss(on):
        fq = FakeQuant(weights, cfg, on)
        cos = cosine(np.concatenate([fq.forward(e) for e in encs]), ref)
        return float(1 - cos.mean()), float(1 - cos.min())

    res = {"mode": "attribute", "config_hash": cfg.hash, "sentences": int(ref.shape[0])}
    res["all.1-cos_mean"], res["all.1-cos_worst"] = loss(KNOBS)
    for k in knobs:
        if "only" in which:
            res[f"only.{k}"] = loss({k})[0]
        if "all_but" in which:
            res[f"all_but.{k}"] = loss(set(KNOBS) - {k})[0]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", metavar="NAME")
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--mode", choices=("integer", "attribute", "sim"), default="integer")
    parser.add_argument("--perm", choices=("none", "data", "weights"), default="none",
                        help="sim / attribute modes: permute hidden channels (data: 64 STS-B "
                             "train sentences; weights: LayerNorm gamma and beta)")
    parser.add_argument("--sentences", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--stages", action="store_true", help="integer mode: per-stage errors")
    parser.add_argument("--knobs", help="attribute mode: comma-separated knobs (default all)")
    parser.add_argument("--without", help="sim mode: comma-separated knobs left off")
    parser.add_argument("--which", default="only,all_but",
                        help="attribute mode: only, all_but or both (comma-separated)")
    args = parser.parse_args()
    cfg = config_from_args(args)
    weights, tok = load_bert(), load_tokenizer()
    encs = batches(tok, sentences(args.sentences, args.seed), args.max_len, args.batch)
    t0 = time.time()
    if args.perm != "none":
        if args.perm == "data":
            perm = perm_from_data(weights, batches(tok, sentences(64, args.seed, "train"), args.max_len, 32))
        else:
            perm = hidden_permutation(weights)  # = --set weight_equalize=hidden_perm
        weights = permute_hidden(weights, perm)
    if args.mode == "integer":
        res = run_integer(cfg, weights, encs, args.stages)
    elif args.mode == "sim":
        res = run_sim(cfg, weights, encs, args.without.split(",") if args.without else ())
        res["without"] = args.without or ""
    else:
        res = run_attribute(cfg, weights, encs, args.knobs.split(",") if args.knobs else KNOBS,
                            args.which.split(","))
    res["config"] = json.dumps({k: v for k, v in cfg.to_dict().items() if v != getattr(Config(), k)})
    res["perm"] = args.perm
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
