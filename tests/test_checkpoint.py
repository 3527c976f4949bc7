import json
import re

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.model.backbone import BackboneError
from continual_transformer.io.checkpoint import CheckpointError


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
    assert files[0] == "manifest.json" and files[-1] == "versions/000001.json"
    assert files[1].startswith("shared-") and files[1].endswith(".safetensors")
    assert all(f.startswith("tasks/") and f.endswith(".safetensors") for f in files[2:-1])
    assert len(files) == 5
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert set(manifest["files"]) == set(files[1:-1])
    assert (tmp_path / "m" / "versions" / "000001.json").read_text() == json.dumps(manifest, indent=2)
    files = files[:-1]
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


def test_deleted_task_files_stay_for_the_old_version_until_pruned(trained, tmp_path):
    from continual_transformer.io.versions import prune

    learner, _ = trained
    learner.save(tmp_path / "m")
    learner.delete("kinds")
    learner.save(tmp_path / "m")
    assert list(ContinualLearner.load(tmp_path / "m", device="cpu").tasks) == ["topics"]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "m" / "tasks").iterdir()) == ["kinds", "topics"]
    prune(tmp_path / "m", keep=1)
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


# -- verified loading: one tampering per test case, each refused with the file and the problem --
@pytest.fixture(scope="module")
def saved_once(tiny_config, tmp_path_factory):
    """A saved two-task checkpoint, trained once for the module (copy it before changing it)."""
    from conftest import toy_rows, write_jsonl

    stream = write_jsonl(tmp_path_factory.mktemp("stream") / "toy.jsonl", toy_rows())
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    for task in load_stream(stream):
        learner.learn(task)
    return learner.save(tmp_path_factory.mktemp("saved") / "m")


@pytest.fixture
def saved(saved_once, tmp_path):
    import shutil

    directory = shutil.copytree(saved_once, tmp_path / "m")
    return directory, json.loads((directory / "manifest.json").read_text())


def _saved(trained, tmp_path):
    learner, _ = trained
    directory = learner.save(tmp_path / "m")
    return directory, json.loads((directory / "manifest.json").read_text())


def _task_file(directory, task="kinds"):
    return next((directory / "tasks").glob(f"{task}-*.safetensors"))


def test_missing_file_is_refused(saved):
    directory, _ = saved
    target = _task_file(directory)
    target.unlink()
    with pytest.raises(CheckpointError, match=f"{target}: missing"):
        ContinualLearner.load(directory, device="cpu")


def test_foreign_files_are_refused_and_never_read(saved):
    directory, _ = saved
    for name in ("notes.txt", "tasks/kinds.pt", "pytorch_model.bin", "extra/"):
        path = directory / name
        path.mkdir() if name.endswith("/") else path.write_bytes(b"\x80\x04K\x01.")  # a pickle
        with pytest.raises(CheckpointError, match=f"{directory / name.rstrip('/')}: foreign file in "
                                                  "a checkpoint directory"):
            ContinualLearner.load(directory, device="cpu")
        path.rmdir() if name.endswith("/") else path.unlink()
    assert ContinualLearner.load(directory, device="cpu").tasks


def test_saving_into_a_directory_with_foreign_files_is_refused(trained, tmp_path):
    learner, _ = trained
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("years of work")
    with pytest.raises(CheckpointError, match="thesis.tex: foreign file"):
        learner.save(tmp_path / "home")
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["thesis.tex"]


def test_leftovers_of_an_interrupted_save_load_and_are_cleaned_up(trained, tmp_path):
    learner, tasks = trained
    directory, _ = _saved(trained, tmp_path)
    kept = ContinualLearner.load(directory, device="cpu")
    # An interrupted save: a new task file written, the manifest not yet switched; a torn
    # temporary manifest; a file an interrupted clean-up did not delete.
    (directory / "tasks" / "kinds-0123456789ab.safetensors").write_bytes(b"half a file")
    (directory / ".manifest.json.k2j4_x9a.tmp").write_bytes(b'{"format": "contin')
    (directory / "tasks" / ".topics-9d2ed0fa88a5.safetensors.abcd1234.tmp").write_bytes(b"x")
    loaded = ContinualLearner.load(directory, device="cpu")
    assert list(loaded.tasks) == list(kept.tasks)
    texts = [e.text for e in tasks[0].test]
    assert torch.equal(torch.stack(loaded.logits(texts, "kinds")), torch.stack(kept.logits(texts, "kinds")))
    from continual_transformer.io.versions import prune

    learner.save(directory)  # the same content: no new version; temporary files go
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    listed = sorted(json.loads((directory / "manifest.json").read_text())["files"])
    assert names == sorted(["manifest.json", "tasks/kinds-0123456789ab.safetensors",
                            "versions/000001.json", *listed])
    prune(directory, keep=1)  # and a prune the files no version lists
    names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    assert names == sorted(["manifest.json", "versions/000001.json", *listed])


def test_a_listed_file_that_is_not_safetensors_is_refused(saved):
    from continual_transformer.io.store import sha256_bytes

    directory, manifest = saved
    data = b"\x80\x04\x95 not safetensors, perhaps a pickle"
    name = f"tasks/kinds-{sha256_bytes(data)[:12]}.safetensors"
    real = _task_file(directory)  # found before the foreign file joins it in the folder
    (directory / name).write_bytes(data)
    real.unlink()
    old = manifest["tasks"][0]["file"]
    manifest["files"][name] = {"size": len(data), "sha256": sha256_bytes(data)}
    del manifest["files"][old]
    manifest["tasks"][0]["file"] = name
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"{directory / name}: not a safetensors file"):
        ContinualLearner.load(directory, device="cpu")


def test_manifest_that_is_not_json_or_not_ours_is_refused(saved):
    directory, manifest = saved
    path = directory / "manifest.json"
    path.write_text(json.dumps(manifest)[:-20])
    with pytest.raises(CheckpointError, match=f"{path}: not valid JSON"):
        ContinualLearner.load(directory, device="cpu")
    path.write_text(json.dumps({**manifest, "format": "someone-else/checkpoint"}))
    with pytest.raises(CheckpointError, match=f"{path}: not a continual-tiny-transformer/checkpoint manifest"):
        ContinualLearner.load(directory, device="cpu")


def _set(manifest, dotted, value):
    """Set (or with value=KeyError, delete) a field given as 'a.b' or 'tasks.0.labels'."""
    *parents, last = dotted.split(".")
    target = manifest
    for key in parents:
        target = target[int(key)] if isinstance(target, list) else target[key]
    key = int(last) if isinstance(target, list) else last
    if value is KeyError:
        del target[key]
    else:
        target[key] = value


@pytest.mark.parametrize("field, value, message", [
    ("backbone.sha256", KeyError, "field 'backbone.sha256' is missing"),
    ("backbone.sha256", "abc", "field 'backbone.sha256' must be 64 lowercase hex digits, got 'abc'"),
    ("backbone.config", {"pooling": "max"}, "field 'backbone.config' is not a backbone configuration: pooling must be one of"),
    ("method.name", "pickle", "field 'method.name' names unknown method 'pickle'; known: \\[.*'ia3'.*\\]"),
    ("method.hyperparameters", {"train": {"lr": 1, "momentum": 0.9}}, "field 'method.hyperparameters': unknown TrainConfig fields \\['momentum'\\]"),
    ("tasks", {"kinds": 1}, "field 'tasks' must be list, got dict"),
    ("tasks.0.labels", "animal,food", "field 'tasks\\[0\\].labels' must be list, got str 'animal,food'"),
    ("tasks.0.labels", ["animal"], "field 'tasks\\[0\\].labels' must be 2 or more distinct strings"),
    ("tasks.0.name", "../../etc", "field 'tasks\\[0\\].name' is not a valid task name"),
    ("tasks.1.name", "kinds", "field 'tasks\\[1\\].name' repeats task 'kinds'"),
    ("tasks.0.train_examples", True, "field 'tasks\\[0\\].train_examples' must be int, got bool True"),
    ("tasks.0.train_seconds", "0.5", "field 'tasks\\[0\\].train_seconds' must be int or float, got str '0.5'"),
    ("tasks.0.bytes_added", KeyError, "field 'tasks\\[0\\].bytes_added' is missing"),
    ("tasks.0.head_parameters", -1, "field 'tasks\\[0\\].head_parameters' must be >= 0, got -1"),
    ("tasks.0.owner", "me", "field 'tasks\\[0\\]' has unknown keys \\['owner'\\]"),
    ("tasks.0.file", "tasks/topics-0123456789ab.safetensors", "field 'tasks\\[0\\].file' names 'tasks/topics-0123456789ab.safetensors', which is not a listed file of task 'kinds'"),
    ("files.tasks/model.pkl", {"size": 1, "sha256": "0" * 64}, "lists foreign file 'tasks/model.pkl'"),
    ("files.../x-0123456789ab.safetensors", {"size": 1, "sha256": "0" * 64}, "lists foreign file '../x-0123456789ab.safetensors'"),
    ("shared_file", "shared-0123456789ab.safetensors", "field 'shared_file' names 'shared-0123456789ab.safetensors', which is not a listed shared file"),
    ("shared_json_file", "shared-0123456789ab.json", "field 'shared_json_file' names 'shared-0123456789ab.json', which is not a listed shared JSON file"),
])
def test_malformed_manifest_fields_are_refused(saved, field, value, message):
    directory, manifest = saved
    if field.startswith("files."):
        manifest["files"][field[len("files."):]] = value
    else:
        _set(manifest, field, value)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"{directory / 'manifest.json'}: {message}"):
        ContinualLearner.load(directory, device="cpu")


def test_file_entries_must_agree_with_names_and_be_used(saved):
    import copy

    directory, original = saved
    manifest = copy.deepcopy(original)
    name = manifest["tasks"][0]["file"]
    manifest["files"][name]["sha256"] = "f" * 64
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="hash prefix is not its SHA-256 ffffffffffff"):
        ContinualLearner.load(directory, device="cpu")
    manifest = copy.deepcopy(original)
    manifest["files"][name]["size"] = "61112"
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=re.escape(f"""field "files['{name}'].size" must be int, got str '61112'""")):
        ContinualLearner.load(directory, device="cpu")
    manifest = copy.deepcopy(original)
    del manifest["tasks"][1]
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="field 'files' lists files no task uses once: \\['tasks/topics-"):
        ContinualLearner.load(directory, device="cpu")


def test_a_manifest_written_before_shared_json_file_loads(saved):
    directory, manifest = saved
    assert manifest.pop("shared_json_file") is None
    (directory / "manifest.json").write_text(json.dumps(manifest))
    assert list(ContinualLearner.load(directory, device="cpu").tasks) == ["kinds", "topics"]


def test_save_rewrites_a_damaged_file_of_the_same_name(trained, tmp_path):
    learner, _ = trained
    directory, _ = _saved(trained, tmp_path)
    target = _task_file(directory)
    good = target.read_bytes()
    target.write_bytes(bytes(b ^ 1 for b in good))  # same name, same size, wrong bytes
    learner.save(directory)
    assert target.read_bytes() == good
    assert ContinualLearner.load(directory, device="cpu").tasks


def test_load_state_checks_the_method(saved, tiny_config):
    from continual_transformer.io import checkpoint

    directory, _ = saved
    other = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    with pytest.raises(CheckpointError, match="saved with method 'ia3'"):
        other.load_state(checkpoint.read(directory))
    assert not other.tasks
    same = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    same.load_state(checkpoint.read(directory))
    assert list(same.tasks) == ["kinds", "topics"]
