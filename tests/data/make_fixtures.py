"""How the fixtures in tests/data were made (run once, with the library of commit f566835, the
last one before the trunk/top split): they pin what the all-layer `ia3` method computed then.

    golden_all_layers.safetensors  tiny random BERT (tests/conftest.py), toy stream, 2 epochs,
                               fp32 and bf16: each task's tensors (scales, head, routing
                               statistics) and the shared router statistics (the Gram
                               matrix sampled, see sample()), as
                               "<precision>/<task or shared>/<name>"
    golden_all_layers.json     the routed predictions on the test texts, per precision
    checkpoint_v1/             a model saved by that library on the real MiniLM (toy stream,
                               1 epoch, router on 64 random features to keep it small)
    checkpoint_v1_predictions.json  its logits and routed tasks on fixed texts

    python tests/data/make_fixtures.py OUT_DIR   # writes them into OUT_DIR

Tensors, not hashes, are kept: a newer transformers or numpy moves the last float bits, which
changes a hash but not what the method computes; the tests compare within float rounding.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import toy_rows, write_jsonl  # noqa: E402

GRAM_STRIDE = 512
PROBE_TEXTS = ["cat and dog with lion", "red and blue with green", "bread and soup with rice",
               "tennis and golf with rugby", "a sentence about nothing in particular"]


def sample(name: str, value: torch.Tensor) -> torch.Tensor:
    """The router's shared Gram matrix (2M numbers) is kept as every 512th entry and its sum,
    enough to catch any change; every other tensor is kept whole."""
    if name.endswith("gram_upper"):
        return torch.cat([value[::GRAM_STRIDE], value.sum().reshape(1)]).contiguous()
    return value.contiguous()


def tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    try:
        from continual_transformer.model.backbone import default_model_dir
    except ImportError:  # the library of f566835, which these fixtures pin
        from continual_transformer.backbone import default_model_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    return folder


def golden(out: Path, work: Path) -> None:
    from safetensors.torch import save_file

    from continual_transformer import ContinualLearner, load_stream
    from continual_transformer.config import BackboneConfig, TrainConfig

    config = BackboneConfig(str(tiny_bert(work / "tiny-bert")), max_length=32)
    tasks = load_stream(write_jsonl(work / "toy.jsonl", toy_rows()))
    texts = [e.text for t in tasks for e in t.test]
    result, tensors = {}, {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        learner = ContinualLearner(config, train=TrainConfig(epochs=2, precision=precision),
                                   device="cpu")
        for task in tasks:
            learner.learn(task)
        for owner, named in [(t.name, learner.task_tensors(t.name)) for t in tasks] + [
                ("shared", learner.shared_tensors())]:
            tensors.update({f"{precision}/{owner}/{k}": sample(k, v) for k, v in named.items()})
        result[precision] = {"routed": [[p.task, p.label] for p in learner.predict(texts)]}
    save_file(tensors, out / "golden_all_layers.safetensors")
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
    # Run with the old library first on the path: PYTHONPATH=<checkout of f566835>/src
    import tempfile

    target = Path(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        golden(target, Path(tmp))
        old_checkpoint(target, Path(tmp))
