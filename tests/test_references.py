"""The bench's reference rows: a model per task (tfidf, independent, lora), trained for real."""

import json
import sys

import numpy as np
import pytest
import torch

from continual_transformer.config import BackboneConfig, TrainConfig
from continual_transformer.data.stream import load_stream
from continual_transformer.experiment.bench import BenchConfig, run_bench
from continual_transformer.experiment.references import (IndependentReference, LoraReference,
                                                         TfidfReference, make_reference)
from continual_transformer.extras import MissingExtra

# The tiny BERT of conftest: 2 layers, hidden 32, feed-forward 64, 30,522 word pieces.
TINY_ENCODER = (30522 + 128 + 2) * 32 + 2 * 32 + 2 * (4 * (32 * 32 + 32) + 2 * 32
                                                        + 32 * 64 + 64 + 64 * 32 + 32 + 2 * 32)
HEAD = 32 * 2 + 2  # a two-label head


def test_reference_rows_in_the_bench(tiny_backbone_dir, toy_stream, tmp_path):
    config = BenchConfig(methods=("tfidf", "independent", "lora"), stream=str(toy_stream),
                         epochs=1, backbone=str(tiny_backbone_dir), max_length=32, device="cpu",
                         isolate=False)
    bench = run_bench(config, tmp_path / "bench")
    rows = {r["method"]: r for r in bench["methods"]}
    assert list(rows) == ["tfidf", "independent", "lora"]
    for row in rows.values():
        R = row["accuracy_matrix"]
        assert R[0][1] is None and R[1][0] == R[0][0]  # task 0's own model, unchanged
        assert row["bwt"] == 0.0 and row["forgetting"] == 0.0 and row["fwt"] == 0.0
        assert row["task_free_acc"] is None and row["final_accuracy"] == R[1]
        assert row["acc"] == pytest.approx(np.mean(R[1]))
    assert rows["tfidf"]["acc"] >= 0.9  # the toy tasks' labels have disjoint vocabularies
    # every parameter of the encoder is the task's own; LoRA: rank 8 on query and value
    assert rows["independent"]["bytes_per_task"] == 4 * (TINY_ENCODER + HEAD)
    assert rows["lora"]["adapter_parameters_per_task"] == 2 * 2 * 8 * (32 + 32)
    assert rows["lora"]["bytes_per_task"] == 4 * (2 * 2 * 8 * (32 + 32) + HEAD)
    assert bench["backbone"]["name"] == str(tiny_backbone_dir)  # from the first row with one
    report = json.loads((tmp_path / "bench" / "lora" / "report.json").read_text())
    assert report["method"]["hyperparameters"]["target_modules"] == ["query", "value"]
    assert report["versions"]["peft"] and report["task_free_accuracy_matrix"] is None
    assert (tmp_path / "bench" / "lora" / "accuracy_matrix.png").is_file()
    table = (tmp_path / "bench" / "bench.md").read_text()
    assert "| method | kinds | topics | ACC % |" in table and "| tfidf | 100.0 | " in table


def test_tfidf_footprint_is_its_arrays_and_vocabulary(toy_stream):
    task = load_stream(toy_stream)[0]
    learned = TfidfReference(seed=0).learn(task)
    pipeline = learned.model
    vectorizers = [v for _, v in pipeline.named_steps["featureunion"].transformer_list]
    classifier = pipeline.named_steps["logisticregression"]
    terms = sum(len(t.encode("utf-8")) + 4 for v in vectorizers for t in v.vocabulary_)
    arrays = (sum(v.idf_.nbytes for v in vectorizers) + classifier.coef_.nbytes
              + classifier.intercept_.nbytes)
    assert learned.record.bytes_added == terms + arrays
    assert classifier.coef_.dtype == np.float64 and learned.record.stats["C"] in (1, 3, 10, 30)
    assert learned.predict(["cat and dog with horse", "bread and soup with rice"]) == ["animal", "food"]


def test_encoder_references_train_their_own_copy(tiny_config, toy_stream):
    task = load_stream(toy_stream)[0]
    train = TrainConfig(epochs=1, lr=1e-3, head_lr=1e-3, precision="fp32")
    independent = IndependentReference(backbone=tiny_config, device="cpu", train=train)
    before = {k: v.clone() for k, v in independent.backbone.encoder.state_dict().items()}
    encoder, _ = independent.learn(task).model
    after = independent.backbone.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the shared backbone: untouched
    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any("layer.0." in k for k in changed) and any("embeddings" in k for k in changed)

    lora = LoraReference(backbone=tiny_config, device="cpu", train=train)
    model, _ = lora.learn(task).model
    trained = dict(model.named_parameters())
    assert all(torch.equal(trained[k], v) for k, v in trained.items() if "lora_" not in k
               and k.replace("base_model.model.", "").replace(".base_layer", "") in before)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())  # B starts at 0


def test_reference_settings_are_checked(tiny_config, monkeypatch, toy_stream, tmp_path):
    with pytest.raises(ValueError, match="C must be a non-empty list of values > 0, got \\[0.0\\]"):
        TfidfReference(C=(0.0,))
    with pytest.raises(ValueError, match="reference 'tfidf' is not trained by gradient"):
        make_reference("tfidf", {"train": {"epochs": 1}})
    with pytest.raises(ValueError, match="unknown TrainConfig fields \\['rank'\\]"):
        make_reference("lora", {"train": {"rank": 4}}, backbone=tiny_config, device="cpu")
    with pytest.raises(ValueError, match="unknown method\\(s\\) \\['lorra'\\]; known: .*'lora'"):
        BenchConfig(methods=("lorra",))
    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    config = BenchConfig(methods=("tfidf", "lora"), stream=str(toy_stream), isolate=False)
    with pytest.raises(MissingExtra, match=r"pip install 'continual-tiny-transformer\[peft\]'"):
        run_bench(config, tmp_path / "bench")
    assert not (tmp_path / "bench" / "tfidf").exists()  # refused before anything ran
