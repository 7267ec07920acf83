"""Test support (not a test file): a seeded, randomly initialised tiny BERT classification
checkpoint with the default model's real tokenizer, so evaluation code runs on real GLUE text in
a second."""

from __future__ import annotations

import shutil
from pathlib import Path


def tiny_classifier(out: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """Save a 2-layer, 64-wide ``BertForSequenceClassification`` into ``out`` and return it."""
    import torch
    import transformers

    from bct.model.checkpoint import TOKENIZER_FILES, default_model_path

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=128, num_labels=num_labels,
    )
    if num_labels == 1:
        config.problem_type = "regression"
    transformers.BertForSequenceClassification(config).save_pretrained(str(out))
    src = default_model_path()
    for name in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, out)
    return out
