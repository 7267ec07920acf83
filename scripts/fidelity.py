"""Print JSON: the integer model against the float64 reference on real sentences.

Per-stage relative error (real tokens only), sentence-embedding cosine and the whole-model
compression ratio, for a config given as ``--set KEY=VALUE`` options (as for ``bct``).

    python scripts/fidelity.py --set block_size=8 --set weight_block_size=32
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bct.cli import config_from_args  # noqa: E402
from bct.model import integer, reference  # noqa: E402
from bct.model.checkpoint import load_bert, load_tokenizer  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the stage tonight.",
    "Blockwise compression keeps accuracy without retraining.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE")
    parser.add_argument("--max-len", type=int, default=32)
    args = parser.parse_args()
    cfg = config_from_args(args)
    weights, tok = load_bert(), load_tokenizer()
    enc = tok.encode(SENTENCES, max_len=args.max_len)
    ref = reference.forward(weights, enc, trace=True)
    qm = integer.quantize(weights, cfg)
    out = integer.forward(qm, enc, trace=True)
    valid = enc.attention_mask.astype(bool)
    T = valid.shape[1]
    stages = {}
    for name in reference.stage_names(weights):
        got, want = out.stages[name].decode(), ref.stages[name]
        if name.endswith(".q"):
            continue  # the integer query carries the folded 1/sqrt(head_dim)
        if got.ndim == 4:  # (B, A, T, T): compare real query rows and keys
            got = got[:, :, :T, :T]
            m = valid[:, None, :, None] & valid[:, None, None, :]
            got, want = got[np.broadcast_to(m, got.shape)], want[np.broadcast_to(m, want.shape)]
        elif got.ndim == 3:
            got, want = got[:, :T][valid], want[valid]
        stages[name] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    e, r = out.embedding, ref.embedding
    cos = (e * r).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(r, axis=1)
    n = sum(a.size for a in weights.named_arrays().values())
    print(json.dumps({
        "config_hash": cfg.hash,
        "embedding_cosine": cos.tolist(),
        "embedding_cosine_mean": float(cos.mean()),
        "compression_ratio": 32 * n / qm.storage_bits(),
        "stage_relative_error": stages,
    }, indent=2))


if __name__ == "__main__":
    main()
