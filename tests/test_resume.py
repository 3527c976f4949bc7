"""Runs that stop part-way continue where they stopped and end as an uninterrupted run ends.

Here a run is stopped by an exception from its progress hooks (the same on-disk state a kill
leaves behind between two writes); benchmarks/kill_test.py and test_kill.py use SIGKILL.
"""

import json
import shutil

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream, run_stream
from continual_transformer.io.checkpoint import CheckpointError
from continual_transformer.experiment.report import TIMING_FIELDS
from continual_transformer.experiment.run import RunEvents
from continual_transformer.io.runstate import STATE, state_dir


class Stop(Exception):
    pass


class Recorder(RunEvents):
    """Counts training steps and evaluations; raises `Stop` at a chosen point."""

    def __init__(self, stop_at=None):
        self.stop_at = stop_at  # ("train", task index, step) or ("evaluate", task index, j)
        self.steps, self.index, self.resumes, self.evaluations = [], None, [], 0

    def task_started(self, index, total, task):
        self.index = index

    def train_step(self, done, total, loss):
        self.steps.append((self.index, done))
        if self.stop_at == ("train", self.index, done):
            raise Stop

    def evaluated(self, task, accuracy):
        self.evaluations += 1
        if self.stop_at == ("evaluate", self.index, self.evaluations):
            raise Stop

    def resumed(self, done, task, step):
        self.resumes.append((done, task, step))


TRAIN = dict(epochs=2, batch_size=4)  # 6 steps per epoch, 12 per task


def run(tiny_config, tasks, out, events=None, save_every=5, train=None, **kw):
    learner = ContinualLearner(tiny_config, train=TrainConfig(**(train or TRAIN)), device="cpu")
    config = {"seed": 0, "epochs": 2, "device": "cpu", **kw.pop("config", {})}
    return run_stream(tasks, learner, out, events, config, save_every=save_every, **kw)


def stripped(report):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(report)


def model_tensors(directory):
    learner = ContinualLearner.load(directory, device="cpu")
    return {t: learner.method.task_tensors(learner.model, t) for t in learner.tasks}


def assert_same_model(a, b):
    ta, tb = model_tensors(a), model_tensors(b)
    assert list(ta) == list(tb)
    for task in ta:
        for key in ta[task]:
            assert torch.equal(ta[task][key], tb[task][key]), (task, key)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from conftest import toy_rows, write_jsonl

    return load_stream(write_jsonl(tmp_path_factory.mktemp("stream") / "toy.jsonl", toy_rows()))


@pytest.fixture(scope="module")
def reference(tiny_config, tasks, tmp_path_factory):
    """An uninterrupted run (shared: copy it before changing it)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    report = run(tiny_config, tasks, out)
    return out, report


def copy_of(reference, tmp_path):
    shutil.copytree(reference[0], tmp_path / "copy")
    return tmp_path / "copy"


@pytest.mark.parametrize("stop_at", [("train", 1, 8), ("train", 0, 3), ("evaluate", 1, 2)])
def test_stopped_run_continues_to_the_uninterrupted_result(tiny_config, tasks, tmp_path, reference,
                                                           stop_at):
    ref_out, ref_report = reference
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(stop_at))
    again = Recorder()
    report = run(tiny_config, tasks, out, again)

    kind, index, at = stop_at
    done = [t.name for t in tasks[:index]]
    if kind == "train":  # continues from the last save (every 5 steps), not from the start
        saved = at // 5 * 5
        assert again.resumes == [(done, tasks[index].name, saved or None)]  # None: from the start
        assert again.steps == [(i, s) for i in range(index, 2) for s in range(1, 13)][saved:]
    else:  # stopped while evaluating after task 1's training: the task is learned again
        assert again.resumes == [(done, tasks[index].name, 10)]
        assert again.steps == [(1, 11), (1, 12)]
    assert stripped(report) == stripped(ref_report)
    assert report["sessions"] == 2
    assert stripped(json.loads((out / "report.json").read_text())) == stripped(
        json.loads((ref_out / "report.json").read_text()))
    assert_same_model(out / "model", ref_out / "model")
    assert list((state_dir(out)).iterdir()) == [state_dir(out) / STATE]  # no training state left


def test_task_saved_to_the_model_but_not_recorded_is_only_evaluated(tiny_config, tasks, tmp_path,
                                                                     reference):
    """Killed after saving the model for task 2 but before the run state recorded it."""
    ref_out, ref_report = reference
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(("train", 1, 11)))
    shutil.rmtree(out / "model")
    shutil.copytree(ref_out / "model", out / "model")  # the model as the killed run saved it
    again = Recorder()
    report = run(tiny_config, tasks, out, again)
    assert again.steps == [] and again.evaluations == 2
    assert stripped(report) == stripped(ref_report)


def test_finished_run_is_not_redone(tiny_config, tasks, reference, tmp_path):
    out, ref_report = copy_of(reference, tmp_path), reference[1]
    again = Recorder()
    report = run(tiny_config, tasks, out, again)
    assert again.resumes == [([t.name for t in tasks], None, None)]
    assert again.steps == [] and again.evaluations == 0
    assert stripped(report) == stripped(ref_report)


def test_other_settings_are_refused_naming_the_fields(tiny_config, tasks, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(("train", 0, 7)))
    with pytest.raises(ValueError, match=r"started with other settings; epochs: saved 2, now 3; "
                                         r"seed: saved 0, now 1\. Use the saved settings"):
        run(tiny_config, tasks, out, config={"seed": 1, "epochs": 3})
    with pytest.raises(ValueError, match=r"method.hyperparameters.train.lr: saved 0.03, now 0.01"):
        run(tiny_config, tasks, out, train={**TRAIN, "lr": 0.01})
    fewer = [tasks[0].subsample_train(10, 0), tasks[1]]
    with pytest.raises(ValueError, match=r"tasks_sha256: saved '[0-9a-f]+', now '[0-9a-f]+'"):
        run(tiny_config, fewer, out)
    # where and how often are free to change
    run(tiny_config, tasks, out, save_every=3, config={"device": "auto"})


def test_resume_requires_a_saved_run_and_a_fresh_run_needs_a_fresh_directory(tiny_config, tasks,
                                                                             tmp_path, reference):
    with pytest.raises(ValueError, match="no saved run to resume"):
        run(tiny_config, tasks, tmp_path / "empty", resume=True)
    out = copy_of(reference, tmp_path)
    shutil.rmtree(state_dir(out))
    with pytest.raises(ValueError, match="model exists, but .* holds no saved run to continue"):
        run(tiny_config, tasks, out)


def test_model_changed_behind_the_runs_back_is_refused(tiny_config, tasks, tmp_path, reference):
    ref_out, _ = reference
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(("train", 1, 3)))
    learner = ContinualLearner.load(ref_out / "model", device="cpu")
    learner.delete(tasks[1].name)
    learner.tasks[tasks[0].name].learned_at = "2000-01-01T00:00:00+00:00"
    learner.save(out / "model")
    with pytest.raises(ValueError, match="manifest.json changed since this run saved it"):
        run(tiny_config, tasks, out)


def test_damaged_training_state_is_refused(tiny_config, tasks, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(("train", 0, 7)))
    train_file = next(p for p in state_dir(out).iterdir() if p.name.startswith("train-"))
    train_file.write_bytes(train_file.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match=f"{train_file.name}: size .* \\(truncated\\?\\)"):
        run(tiny_config, tasks, out)
    (state_dir(out) / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="notes.txt: foreign file in a run-state directory"):
        run(tiny_config, tasks, out)


def test_no_intra_task_saves_with_save_every_zero(tiny_config, tasks, tmp_path, reference):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run(tiny_config, tasks, out, Recorder(("train", 1, 8)), save_every=0)
    assert [p.name for p in state_dir(out).iterdir()] == [STATE]
    again = Recorder()
    report = run(tiny_config, tasks, out, again, save_every=0)
    assert again.resumes == [([tasks[0].name], tasks[1].name, None)]
    assert again.steps == [(1, s) for s in range(1, 13)]
    assert stripped(report) == stripped(reference[1])
