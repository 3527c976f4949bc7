import json

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.backbone import BackboneError
from continual_transformer.checkpoint import CheckpointError


@pytest.fixture
def trained(tiny_config, toy_stream):
    tasks = load_stream(toy_stream)
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    for task in tasks:
        learner.learn(task)
    return learner, tasks


def test_round_trip_gives_identical_predictions(trained, tmp_path):
    learner, tasks = trained
    learner.save(tmp_path / "m")
    loaded = ContinualLearner.load(tmp_path / "m", device="cpu")
    assert list(loaded.tasks) == list(learner.tasks)
    assert loaded.tasks["kinds"].labels == learner.tasks["kinds"].labels
    for task in tasks:
        texts = [e.text for e in task.test]
        assert torch.equal(torch.stack(loaded.logits(texts, task.name)),
                           torch.stack(learner.logits(texts, task.name)))
        assert loaded.predict(texts, task.name) == learner.predict(texts, task.name)


def test_directory_holds_only_json_and_safetensors(trained, tmp_path):
    from safetensors import safe_open

    learner, _ = trained
    learner.save(tmp_path / "m")
    files = sorted(p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*")
                   if p.is_file())
    assert files[0] == "manifest.json"
    assert files[1].startswith("shared-") and files[1].endswith(".safetensors")
    assert all(f.startswith("tasks/") and f.endswith(".safetensors") for f in files[2:])
    assert len(files) == 4
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files[1:])
    # a reference to the backbone, never a copy of its weights: only router statistics are shared
    with safe_open(tmp_path / "m" / files[1], "pt") as shared:
        assert list(shared.keys()) == ["router.gram_upper"]
    for name in files[2:]:
        with safe_open(tmp_path / "m" / name, "pt") as task_file:
            keys = list(task_file.keys())
        assert all(k.startswith(("adapter.", "head.", "router.")) for k in keys)
        assert (tmp_path / "m" / name).stat().st_size < 50_000


def test_saving_a_new_task_keeps_old_task_files(trained, tmp_path, toy_stream):
    learner, tasks = trained
    learner.delete("topics")
    learner.save(tmp_path / "m")
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m" / "tasks").iterdir()}
    learner.learn(tasks[1])
    learner.save(tmp_path / "m")
    second = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "m" / "tasks").iterdir()}
    assert all(second[name] == mtime for name, mtime in first.items())
    assert len(second) == 2


def test_deleted_task_files_are_removed_on_save(trained, tmp_path):
    learner, _ = trained
    learner.save(tmp_path / "m")
    learner.delete("kinds")
    learner.save(tmp_path / "m")
    assert [p.name.split("-")[0] for p in (tmp_path / "m" / "tasks").iterdir()] == ["topics"]
    assert list(ContinualLearner.load(tmp_path / "m", device="cpu").tasks) == ["topics"]


def test_altered_or_truncated_file_is_refused(trained, tmp_path):
    learner, _ = trained
    learner.save(tmp_path / "m")
    target = next((tmp_path / "m" / "tasks").iterdir())
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{target.name}: SHA-256 does not match"):
        ContinualLearner.load(tmp_path / "m", device="cpu")
    target.write_bytes(bytes(data[:-10]))
    with pytest.raises(CheckpointError, match="truncated"):
        ContinualLearner.load(tmp_path / "m", device="cpu")


def test_missing_manifest_and_wrong_version(trained, tmp_path):
    learner, _ = trained
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        ContinualLearner.load(tmp_path / "absent")
    learner.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99 is not supported"):
        ContinualLearner.load(tmp_path / "m")


def test_different_backbone_weights_are_refused(trained, tmp_path, tiny_backbone_dir):
    import shutil

    learner, _ = trained
    learner.save(tmp_path / "m")
    copy = tmp_path / "backbone-copy"
    shutil.copytree(tiny_backbone_dir, copy)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["backbone"]["name"] = str(copy)
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    assert ContinualLearner.load(tmp_path / "m", device="cpu").tasks  # same weights: fine
    from transformers import BertModel

    model = BertModel.from_pretrained(copy)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[0] += 1
    model.save_pretrained(copy)
    with pytest.raises(BackboneError, match="refusing to load"):
        ContinualLearner.load(tmp_path / "m", device="cpu")
