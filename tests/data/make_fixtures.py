"""How the fixtures in tests/data were made (run once, with the library of commit f566835, the
last one before the trunk/top split): they pin what the all-layer `ia3` method computed then.

    golden_all_layers.json     tiny random BERT (tests/conftest.py), toy stream, 2 epochs,
                               fp32 and bf16: SHA-256 of each task's tensors (scales, head,
                               routing statistics), of the shared router statistics, and the
                               routed predictions on the test texts
    checkpoint_v1/             a model saved by that library on the real MiniLM (toy stream,
                               1 epoch, router on 64 random features to keep it small)
    checkpoint_v1_predictions.json  its logits and routed tasks on fixed texts

    python tests/data/make_fixtures.py OUT_DIR   # writes the three into OUT_DIR
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import toy_rows, write_jsonl  # noqa: E402

PROBE_TEXTS = ["cat and dog with lion", "red and blue with green", "bread and soup with rice",
               "tennis and golf with rugby", "a sentence about nothing in particular"]


def sha(tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save

    return hashlib.sha256(save({k: v.contiguous() for k, v in sorted(tensors.items())})).hexdigest()


def tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    from continual_transformer.model.backbone import default_model_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    return folder


def golden(out: Path, work: Path) -> None:
    from continual_transformer import ContinualLearner, load_stream
    from continual_transformer.config import BackboneConfig, TrainConfig

    config = BackboneConfig(str(tiny_bert(work / "tiny-bert")), max_length=32)
    tasks = load_stream(write_jsonl(work / "toy.jsonl", toy_rows()))
    texts = [e.text for t in tasks for e in t.test]
    result = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        learner = ContinualLearner(config, train=TrainConfig(epochs=2, precision=precision),
                                   device="cpu")
        for task in tasks:
            learner.learn(task)
        result[precision] = {
            "tasks": {t.name: sha(learner.task_tensors(t.name)) for t in tasks},
            "shared": sha(learner.shared_tensors()),
            "routed": [[p.task, p.label] for p in learner.predict(texts)],
        }
    (out / "golden_all_layers.json").write_text(json.dumps(result, indent=1) + "\n")


def old_checkpoint(out: Path, work: Path) -> None:
    from continual_transformer import ContinualLearner, load_stream
    from continual_transformer.config import TrainConfig

    tasks = load_stream(write_jsonl(work / "toy.jsonl", toy_rows()))
    torch.manual_seed(0)
    learner = ContinualLearner(train=TrainConfig(epochs=1, precision="fp32"), device="cpu",
                               router={"n_features": 64})
    for task in tasks:
        learner.learn(task)
    learner.save(out / "checkpoint_v1")
    given = {t.name: [row.tolist() for row in learner.logits(PROBE_TEXTS, t.name)] for t in tasks}
    routed = learner.predict(PROBE_TEXTS)
    (out / "checkpoint_v1_predictions.json").write_text(json.dumps({
        "texts": PROBE_TEXTS, "logits": given,
        "routed": [[p.task, p.label, p.probabilities] for p in routed]}, indent=1) + "\n")


if __name__ == "__main__":
    import tempfile

    target = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        golden(target, Path(tmp))
        old_checkpoint(target, Path(tmp))
