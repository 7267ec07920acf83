"""Save, or compare against a saved copy, every integer trace of the whole model on real sentences.

A refactor or a speed-up of the integer model (``bct.model``) must leave every intermediate
integer tensor as it was. ``save DIR`` writes ``bct.model.integer.trace`` of several configs
(default W8A8, the 4-bit weight config, the block-8 wide config) on 20 real sentences (10 SST-2
and 5 STS-B dev pairs from ``$BCT_GLUE_DIR``, two padded batches of 10 and one single sentence)
into ``DIR/<config>_<batch>.npz``; ``compare DIR`` recomputes them with the code as it is now
and compares every array with ``numpy.array_equal`` (shape and dtype too). It prints flat JSON
(traces, arrays compared, mismatches with their first ten names) and exits 1 on any mismatch.

    python scripts/trace_diff.py save /tmp/traces-before        # on the old code
    python scripts/trace_diff.py compare /tmp/traces-before     # on the new code
    python scripts/trace_diff.py compare DIR --classifier ~/.cache/bct-gen/finetune/SST-2-...

``--classifier PATH`` adds the same configs on a fine-tuned ``BertForSequenceClassification``
checkpoint (``bct finetune``), so the pooler and classifier stages are traced too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from bct.config import PRESETS

#: Configs traced (name -> Config fields).
CONFIGS = {
    "default": {},
    "w4b128": dict(weight_bits=4, weight_block_size=128, weight_exp_bits=6,
                   weight_exp_search="mse"),
    "wide_b8": dict(block_size=8, weight_block_size=8, vector_bits=16, ln_out_frac=12,
                    gelu_frac=12, residual_bits=16, gelu_direct=True),
    "w8-wide": PRESETS["w8-wide"],  # the wide path at block 32 with hidden_perm
}


def _arrays(trace: dict) -> dict:
    from bct.model.blocks import BlockTensor
    from bct.model.matmul import Fixed

    out = {}
    for k, v in trace.items():
        if isinstance(v, BlockTensor):
            out[k + "|mant"], out[k + "|exp"] = v.mant, v.exp
        elif isinstance(v, Fixed):
            out[k + "|value"], out[k + "|scale"] = np.asarray(v.value), np.asarray(v.scale)
        else:
            out[k + "|raw"] = np.asarray(v)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("save", "compare"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--classifier", type=Path, help="a fine-tuned checkpoint to trace too")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from bct.config import Config
    from bct.model import integer
    from bct.model.checkpoint import default_model_path, load_bert, load_tokenizer
    from bct.model.glue import load_task

    sst = list(load_task("SST-2", "dev", limit=10).text_a)
    sts = load_task("STS-B", "dev", limit=5)
    texts = sst + list(sts.text_a) + list(sts.text_b)
    models = [("", Path(default_model_path()))]
    if args.classifier is not None:
        models.append(("cls_", args.classifier))
    if args.mode == "save":
        args.dir.mkdir(parents=True, exist_ok=True)
    traces = compared = 0
    bad = []
    for prefix, model_dir in models:
        tok = load_tokenizer(model_dir)
        weights = load_bert(model_dir)
        encs = [tok.encode(texts[:10], max_len=128, padding="longest"),
                tok.encode(texts[10:], max_len=128, padding="longest"),
                tok.encode(texts[5:6], max_len=128, padding="longest")]
        for name, fields in CONFIGS.items():
            qm = integer.quantize(weights, Config(**fields))
            for b, enc in enumerate(encs):
                arrs = _arrays(integer.trace(qm, enc))
                path = args.dir / f"{prefix}{name}_{b}.npz"
                traces += 1
                if args.mode == "save":
                    np.savez_compressed(path, **arrs)
                    continue
                ref = np.load(path)
                for k in sorted(set(ref.files) | set(arrs)):
                    compared += 1
                    if not (k in ref.files and k in arrs and ref[k].shape == arrs[k].shape
                            and ref[k].dtype == arrs[k].dtype and np.array_equal(ref[k], arrs[k])):
                        bad.append(f"{prefix}{name}_{b}:{k}")
    print(json.dumps({"mode": args.mode, "dir": str(args.dir), "traces": traces,
                      "arrays_compared": compared, "mismatches": len(bad),
                      "first_mismatches": bad[:10]}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
