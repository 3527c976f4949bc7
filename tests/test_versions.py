"""Model versions: numbered on every change, rolled back exactly, pruned safely, and a process
SIGKILLed at every step of a rollback or a prune leaves every kept version loadable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.cli import app
from continual_transformer.io import checkpoint
from continual_transformer.io.checkpoint import CheckpointError, UnknownVersion
from continual_transformer.io.versions import current_version, list_versions, prune, rollback

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).parent / "data"


def _logits(learner: ContinualLearner, tasks) -> dict[str, torch.Tensor]:
    return {t.name: torch.stack(learner.logits([e.text for e in t.test], t.name))
            for t in tasks if t.name in learner.tasks}


@pytest.fixture(scope="module")
def history(tmp_path_factory, tiny_config):
    """Versions 1 {kinds}, 2 {kinds, topics}, 3 {topics}, and each version's logits."""
    from conftest import toy_rows, write_jsonl

    folder = tmp_path_factory.mktemp("history")
    tasks = load_stream(write_jsonl(folder / "toy.jsonl", toy_rows()))
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    logits = {}
    learner.learn(tasks[0])
    learner.save(folder / "model")
    logits[1] = _logits(learner, tasks)
    learner.learn(tasks[1])
    learner.save(folder / "model")
    learner.save(folder / "model")  # the same content again: no new version
    logits[2] = _logits(learner, tasks)
    learner.delete("kinds")
    learner.save(folder / "model")
    logits[3] = _logits(learner, tasks)
    return folder / "model", tasks, logits


@pytest.fixture
def model(history, tmp_path) -> Path:
    return Path(shutil.copytree(history[0], tmp_path / "model"))


def _files(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def _assert_every_version_loads(directory: Path, logits: dict | None = None, tasks=None) -> None:
    for version in list_versions(directory):
        learner = ContinualLearner.from_state(checkpoint.read(directory, version.number), "cpu")
        assert tuple(learner.tasks) == version.tasks
        if logits is not None:
            expected = logits[version.number]
            got = _logits(learner, tasks)
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_every_change_is_a_numbered_version(history):
    directory, _, _ = history
    found = list_versions(directory)
    assert [(v.number, v.tasks, v.change, v.current) for v in found] == [
        (1, ("kinds",), "learned kinds", False),
        (2, ("kinds", "topics"), "learned topics", False),
        (3, ("topics",), "deleted kinds", True)]
    assert all(v.saved_at and v.saved_at.endswith("+00:00") for v in found)
    manifest = (directory / "manifest.json").read_bytes()
    assert manifest == (directory / "versions" / "000003.json").read_bytes()
    assert json.loads(manifest)["version"] == 3 == current_version(directory)
    # the deleted task's file stays: version 1 and 2 list it
    assert [p.name.split("-")[0] for p in sorted((directory / "tasks").iterdir())] == ["kinds", "topics"]


def test_rollback_restores_the_old_tasks_bit_identical(model, history):
    _, tasks, logits = history
    assert rollback(model, 2) == 4
    version = list_versions(model)[-1]
    assert (version.number, version.tasks, version.change, version.current) == (
        4, ("kinds", "topics"), "rollback to 2", True)
    old, new = (json.loads((model / "versions" / f"00000{n}.json").read_text()) for n in (2, 4))
    assert checkpoint.content(new) == checkpoint.content(old)
    learner = ContinualLearner.load(model, device="cpu")
    got = _logits(learner, tasks)
    assert got.keys() == logits[2].keys()
    assert all(torch.equal(got[name], logits[2][name]) for name in got)
    assert rollback(model, 2) == 4  # already the current content: nothing written
    assert rollback(model, 3) == 5 and list(ContinualLearner.load(model, "cpu").tasks) == ["topics"]
    with pytest.raises(UnknownVersion, match=r"unknown version 9 of .*model; known: \[1, 2, 3, 4, 5\]$"):
        rollback(model, 9)
    # a version whose files were damaged is refused before anything is written
    kinds = next((model / "tasks").glob("kinds-*"))
    kinds.write_bytes(kinds.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=f"{kinds}: size .* \\(truncated\\?\\)"):
        rollback(model, 1)
    assert current_version(model) == 5


def test_prune_keeps_the_newest_versions_and_every_kept_one_loads(model, history):
    _, tasks, logits = history
    rollback(model, 1)  # version 4 = version 1
    files = {n: set(checkpoint.read_manifest(model, n)["files"]) for n in (1, 2, 3, 4)}
    assert files[1] == files[4]
    only_old = (files[1] | files[2]) - files[3] - files[4]
    pruned = prune(model, keep=2)
    assert (pruned.kept, pruned.removed, set(pruned.files_removed)) == ((3, 4), (1, 2), only_old)
    assert [v.number for v in list_versions(model)] == [3, 4]
    _assert_every_version_loads(model, {3: logits[3], 4: logits[1]}, tasks)
    with pytest.raises(UnknownVersion, match=r"known: \[3, 4\]"):
        rollback(model, 2)
    assert prune(model, keep=5).removed == ()  # fewer than that: nothing to do
    only_3 = files[3] - files[4]
    sizes = sum((model / name).stat().st_size for name in only_3)
    pruned = prune(model, keep=1)
    assert (pruned.kept, pruned.removed, set(pruned.files_removed)) == ((4,), (3,), only_3)
    assert any(name.startswith("tasks/topics-") for name in only_3) and pruned.bytes_freed == sizes
    assert _files(model) == sorted({"manifest.json", "versions/000004.json"} | files[4])
    _assert_every_version_loads(model, {4: logits[1]}, tasks)
    learner = ContinualLearner.load(model, device="cpu")
    learner.learn(tasks[1])
    learner.save(model)
    assert current_version(model) == 5  # numbering goes on after a prune
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=f"keep must be an integer of 1 or more .*got {bad!r}"):
            prune(model, keep=bad)


def _pre_versions_copy(source: Path, target: Path) -> Path:
    """`source`'s current version as a checkpoint written before versions existed."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("versions"))
    manifest = json.loads((target / "manifest.json").read_text())
    for name in checkpoint.VERSION_FIELDS:
        del manifest[name]
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return target


def test_a_checkpoint_written_before_versions_is_version_0(history, tmp_path):
    directory, tasks, logits = history
    old = _pre_versions_copy(directory, tmp_path / "old")
    legacy = (old / "manifest.json").read_bytes()
    assert [(v.number, v.saved_at, v.change, v.tasks) for v in list_versions(old)] == [
        (0, None, None, ("topics",))]
    learner = ContinualLearner.load(old, device="cpu")
    assert torch.equal(_logits(learner, tasks)["topics"], logits[3]["topics"])
    learner.learn(tasks[0])
    learner.save(old)  # starts the history, keeping the old manifest as version 0
    assert (old / "versions" / "000000.json").read_bytes() == legacy
    assert [(v.number, v.change) for v in list_versions(old)] == [(0, None), (1, "learned kinds")]
    assert rollback(old, 0) == 2
    assert list(ContinualLearner.load(old, device="cpu").tasks) == ["topics"]
    # the bundled format-1 checkpoint (the real MiniLM's; its manifest only is read here)
    assert [(v.number, v.tasks) for v in list_versions(DATA / "checkpoint_v1")] == [
        (0, ("kinds", "topics"))]


def test_a_version_file_a_killed_save_left_is_no_version(model, history):
    _, tasks, _ = history
    # A save killed after its version file, before manifest.json: version 4 was never current.
    shutil.copy(model / "versions" / "000002.json", model / "versions" / "000004.json")
    assert [v.number for v in list_versions(model)] == [1, 2, 3]
    with pytest.raises(UnknownVersion, match=r"known: \[1, 2, 3\]"):
        checkpoint.read(model, 4)
    learner = ContinualLearner.load(model, device="cpu")
    learner.learn(tasks[0])
    learner.save(model)  # its number is free: this save is version 4
    assert json.loads((model / "versions" / "000004.json").read_text())["change"] == "learned kinds"
    # Far above the current one: not a killed save's; refused, nothing deleted
    shutil.copy(model / "versions" / "000002.json", model / "versions" / "000009.json")
    learner.delete("kinds")
    with pytest.raises(CheckpointError, match=r"000009.json: newer than the current version 4"):
        learner.save(model)
    assert (model / "versions" / "000009.json").is_file() and current_version(model) == 4


def _flat(output: str) -> str:
    # rich wraps long lines at the terminal's width, at a space or inside a long path
    return "".join(output.split())


def _has(text: str, output: str) -> bool:
    """`text` is in `output`, whitespace aside (wherever rich wrapped it)."""
    return _flat(text) in _flat(output)


def test_cli_versions_rollback_prune(model):
    runner = CliRunner()
    listing = runner.invoke(app, ["versions", str(model)])
    assert listing.exit_code == 0, listing.output
    assert _has(f"{model}: 3 versions", listing.output)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in listing.output.splitlines()
            if line.startswith("│") and "saved at" not in line]
    assert [(row[0], row[2], row[3]) for row in rows] == [
        ("1", "kinds", "learned kinds"), ("2", "kinds, topics", "learned topics"),
        ("3 *", "topics", "deleted kinds")]
    done = runner.invoke(app, ["rollback", str(model), "2"])
    assert done.exit_code == 0, done.output
    assert _has(f"{model}: version 4 = version 2 (tasks: kinds, topics)", done.output)
    bad = runner.invoke(app, ["rollback", str(model), "7"])
    assert bad.exit_code == 2
    assert _has(f"error: unknown version 7 of {model}; known: [1, 2, 3, 4]", bad.output)
    pruned = runner.invoke(app, ["prune", str(model), "--keep", "1"])
    assert pruned.exit_code == 0, pruned.output
    assert _has(f"{model}: kept versions [4]; removed versions [1, 2, 3] and ", pruned.output)
    zero = runner.invoke(app, ["prune", str(model), "--keep", "0"])
    assert zero.exit_code == 2 and _has("keep must be an integer of 1 or more", zero.output)


# -- SIGKILL at every step of a rollback and a prune ---------------------------------------------
CHILD = r"""
import os, signal, sys, tempfile
from pathlib import Path
from continual_transformer.io import store, versions

operation, directory, argument, kill_at, mode = sys.argv[1:6]
kill_at, steps = int(kill_at), 0
write, remove = store.atomic_write, store.remove_files


def step():
    global steps
    steps += 1
    return steps == kill_at


def atomic_write(path, data):
    if step() and mode == "torn":  # what a kill during the write leaves: half a temporary file
        fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)
    if steps == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)


def remove_files(paths):
    for path in paths:  # one deletion at a time, each a moment to die after
        remove([path])
        if step():
            os.kill(os.getpid(), signal.SIGKILL)


store.atomic_write, store.remove_files = atomic_write, remove_files
if operation == "rollback":
    versions.rollback(Path(directory), int(argument))
else:
    versions.prune(Path(directory), int(argument))
print(steps)
"""


def _child(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *sys.path])}
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("operation, argument", [("rollback", 1), ("prune", 1)])
def test_a_kill_at_any_step_of_a_rollback_or_prune_leaves_every_version_loadable(
        operation, argument, history, tmp_path):
    source, tasks, logits = history
    plain = _child(operation, shutil.copytree(source, tmp_path / "plain"), argument, 0, "")
    assert plain.returncode == 0, plain.stderr
    steps = int(plain.stdout)
    # rollback: 2 writes (version 4's file, manifest.json); prune: versions 1 and 2's manifests,
    # then the files only they list (kinds' task file, shared files)
    files = {n: set(checkpoint.read_manifest(source, n)["files"]) for n in (1, 2, 3)}
    assert steps == (2 if operation == "rollback" else 2 + len((files[1] | files[2]) - files[3]))
    modes = ("torn", "after") if operation == "rollback" else ("after",)
    trials = [(at, mode) for at in range(1, steps + 1) for mode in modes]
    directories = [shutil.copytree(source, tmp_path / f"killed-{at}-{mode}") for at, mode in trials]
    with ThreadPoolExecutor(max_workers=2) as pool:  # two children at a time, each its own copy
        children = list(pool.map(lambda t: _child(operation, t[1], argument, *t[0]), zip(trials, directories)))
    for (at, mode), directory, killed in zip(trials, directories, children):
        assert killed.returncode == -9, (at, mode, killed.stderr)
        expected = {**logits, 4: logits[1]}
        current = current_version(directory)
        if operation == "rollback":  # killed before its commit point: still 3; after: 4
            assert current == (4 if (at, mode) == (2, "after") else 3), (at, mode)
        else:
            assert current == 3
        _assert_every_version_loads(directory, expected, tasks)
        (rollback if operation == "rollback" else prune)(directory, argument)  # again: finishes it
        final = [v.number for v in list_versions(directory)]
        assert final == ([1, 2, 3, 4] if operation == "rollback" else [3]), (at, mode)
        _assert_every_version_loads(directory, expected, tasks)
        listed = {name for n in final for name in checkpoint.read_manifest(directory, n)["files"]}
        kept = {"manifest.json"} | {f"versions/00000{n}.json" for n in final}
        if operation == "prune":  # nothing left behind: no temporary file, no unlisted file
            assert _files(directory) == sorted(kept | listed)
        else:  # no temporary file; the unlisted files of versions 1-3 stay theirs
            assert not [name for name in _files(directory) if name.endswith(".tmp")]


def test_saving_with_keep_versions_prunes_as_it_goes(history, tmp_path):
    _, tasks, logits = history
    learner = ContinualLearner.load(history[0])
    target = tmp_path / "kept"
    learner.save(target, keep_versions=1)
    learner.delete("topics")
    learner.learn(tasks[0])  # back to {kinds}, learned again: new files
    learner.save(target, keep_versions=1)
    assert [v.number for v in list_versions(target)] == [2]
    listed = set(json.loads((target / "manifest.json").read_text())["files"])
    on_disk = {p for p in _files(target) if not p.startswith("versions/") and p != "manifest.json"}
    assert on_disk == listed  # the first version's files went with it
    assert set(ContinualLearner.load(target).tasks) == {"kinds"}


def test_cli_delete_takes_a_task_out_given_the_stream_it_learned_from(model, history):
    stream = history[0].parent / "toy.jsonl"
    runner = CliRunner()
    assert runner.invoke(app, ["rollback", str(model), "2"]).exit_code == 0  # kinds, topics
    wrong = runner.invoke(app, ["delete", str(model), "kinds", "--data", str(stream), "--max-train", "10"])
    assert wrong.exit_code == 2
    assert _has("the 10 texts given are not the ones task 'kinds' was learned from, in the same order",
                wrong.output) and current_version(model) == 4
    unknown = runner.invoke(app, ["delete", str(model), "spam"])
    assert unknown.exit_code == 2 and _has("spam", unknown.output)
    done = runner.invoke(app, ["delete", str(model), "kinds", "--data", str(stream)])
    assert done.exit_code == 0, done.output
    assert _has(f"{model}: task 'kinds' deleted, its share of the router's statistics taken out; "
                "tasks left: topics", done.output)
    assert list_versions(model)[-1].tasks == ("topics",) and list_versions(model)[-1].change == "deleted kinds"
