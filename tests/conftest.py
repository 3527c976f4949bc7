"""Shared fixtures: a tiny randomly initialised BERT (fast) and small streams."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    from continual_transformer.model.backbone import default_model_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_backbone_dir):
    from continual_transformer.config import BackboneConfig

    return BackboneConfig(str(tiny_backbone_dir), max_length=32)


WORDS = {
    "animal": ["cat", "dog", "horse", "cow", "sheep", "tiger", "lion", "wolf"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "salad"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "sport": ["football", "tennis", "golf", "hockey", "rugby", "cricket", "boxing", "rowing"],
}


def toy_rows(seed: int = 0, n_train: int = 24, n_test: int = 8) -> list[dict]:
    """Two two-label tasks, separable by their vocabulary."""
    rng = random.Random(seed)
    rows = []
    for task, labels in (("kinds", ("animal", "food")), ("topics", ("color", "sport"))):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                label = labels[i % 2]
                words = rng.sample(WORDS[label], 3)
                rows.append({"task": task, "split": split, "label": label,
                             "text": f"{words[0]} and {words[1]} with {words[2]}"})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def toy_stream(tmp_path) -> Path:
    return write_jsonl(tmp_path / "toy.jsonl", toy_rows())
