"""Parallel learning on a real local Ray cluster: the same model as the sequential run, bit for
bit; a worker killed mid-task; resuming; refusals; the message when Ray is missing."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")  # the [ray] extra (part of [dev])

from conftest import WORDS, write_jsonl  # noqa: E402
from continual_transformer import ContinualLearner, TrainConfig, load_stream, run_stream  # noqa: E402
from continual_transformer.config import LearnerSpec  # noqa: E402
from continual_transformer.experiment.ray_pool import RayTaskPool, learn_task  # noqa: E402
from continual_transformer.experiment.report import TIMING_FIELDS  # noqa: E402
from continual_transformer.experiment.run import RunEvents  # noqa: E402

# The killing learn function below travels to the workers by value: they cannot import tests.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TRAIN = dict(epochs=2, batch_size=8)
TASKS = (("kinds", ("animal", "food"), 24), ("topics", ("color", "sport"), 24),
         # 220 texts: 33 held out, enough for a lexical branch (its tensors are compared too)
         ("mixed", ("animal", "color", "sport"), 220), ("meals", ("food", "sport"), 24))


def rows() -> list[dict]:
    import random

    rng = random.Random(0)
    out = []
    for task, labels, n_train in TASKS:
        for split, n in (("train", n_train), ("test", 9)):
            for i in range(n):
                label = labels[i % len(labels)]
                words = rng.sample(WORDS[label], 3)
                out.append({"task": task, "split": split, "label": label,
                            "text": f"{words[0]} and {words[1]} with {words[2]}"})
    return out


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return load_stream(write_jsonl(tmp_path_factory.mktemp("stream") / "four.jsonl", rows()))


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module; the pools join it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


ROUTER = {"n_features": 256}  # a small router: its solve after each task stays quick


def learner(tiny_config, method="ia3"):
    if method == "analytic":
        return ContinualLearner(tiny_config, method="analytic", device="cpu")
    return ContinualLearner(tiny_config, method=method, train=TrainConfig(**TRAIN), device="cpu",
                            router=ROUTER)


CONFIG = {"seed": 0, "epochs": 2, "device": "cpu"}


def run_parallel(tiny_config, tasks, out, learn=learn_task, events=None, resume=False,
                 released: list | None = None):
    """A parallel run on 2 workers; returns its report and where each task was learned. With
    `released`, appends whether the workers ended before the pool was closed."""
    model = learner(tiny_config)
    with RayTaskPool(model, 2, threads=1, learn=learn) as pool:
        report = run_stream(tasks, model, out, events, CONFIG, resume=resume, pool=pool)
        if released is not None:
            released.append(ended({h["pid"] for h in pool.history}))
        return report, list(pool.history)


def ended(pids: set[int], within: float = 30.0) -> bool:
    """Whether the processes `pids` end (exit, or wait as zombies) within `within` seconds."""

    def alive(pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state, after the command's name

    deadline = time.monotonic() + within
    while any(alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def one_thread():
    """A sequential run with the workers' one thread: the numbers a task's learning gives may
    change with the thread count (the lexical branch's sums), never with the tasks around it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sequential(tiny_config, tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential") / "run"
    with one_thread():
        return out, run_stream(tasks, learner(tiny_config), out, None, CONFIG)


def stripped(report):
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(report)


def assert_same_model(a: Path, b: Path, tasks) -> None:
    """Every tensor of the two checkpoints equal bit for bit, and every prediction."""
    one, two = ContinualLearner.load(a, device="cpu"), ContinualLearner.load(b, device="cpu")
    saved_one, saved_two = one.state(), two.state()
    assert [t.record.name for t in saved_one.tasks] == [t.record.name for t in saved_two.tasks]
    for x, y in zip(saved_one.tasks, saved_two.tasks):
        assert sorted(x.tensors) == sorted(y.tensors)
        for key in x.tensors:
            assert x.tensors[key].dtype == y.tensors[key].dtype
            assert torch.equal(x.tensors[key], y.tensors[key]), (x.record.name, key)
    assert sorted(saved_one.shared_tensors) == sorted(saved_two.shared_tensors) == ["router.gram_upper"]
    for key in saved_one.shared_tensors:
        assert torch.equal(saved_one.shared_tensors[key], saved_two.shared_tensors[key]), key
    texts = [e.text for t in tasks for e in t.test]
    given = [t.name for t in tasks for _ in t.test]
    assert one.predict(texts, task=given) == two.predict(texts, task=given)
    assert one.predict(texts) == two.predict(texts)  # routed: the router's statistics too


def test_parallel_run_is_the_sequential_run_bit_for_bit(tiny_config, tasks, cluster, sequential,
                                                        tmp_path):
    seq_out, seq_report = sequential
    released = []
    report, history = run_parallel(tiny_config, tasks, tmp_path / "run", released=released)

    assert released == [True]  # the last task back, the run let the workers go before closing
    assert_same_model(tmp_path / "run" / "model", seq_out / "model", tasks)
    assert any(e["train_stats"]["lexical"] and e["train_stats"]["lexical"]["mix"] > 0
               for e in report["per_task"])  # a lexical branch was learned apart, and compared
    # evaluated after each merge in stream order: the same accuracy matrices, routing, report
    assert stripped(report) == stripped(seq_report)
    assert stripped(json.loads((tmp_path / "run" / "report.json").read_text())) == \
        stripped(json.loads((seq_out / "report.json").read_text()))
    # learned by two worker processes, not here
    assert sorted(h["task"] for h in history) == sorted(t.name for t in tasks)
    pids = {h["pid"] for h in history}
    assert len(pids) == 2 and os.getpid() not in pids


def test_tasks_go_out_in_stream_order_and_the_run_keeps_to_the_cpus_the_workers_leave(
        tiny_config, tasks, cluster):
    model = learner(tiny_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with RayTaskPool(model, 1, threads=1) as pool:  # one worker: it learns in dispatch order
            pool.submit(list(tasks))
            assert torch.get_num_threads() == 1  # 2 CPUs, 1 for the worker, while it learns
            with pytest.raises(ValueError, match=r"tasks \['kinds', 'topics', 'mixed', 'meals'\] "
                                                 "are not learned yet"):
                pool.release()  # not while tasks are learning: `close` stops those
            for task in tasks:
                pool.learned(task.name)
            assert torch.get_num_threads() == 2  # nothing left to learn: the threads come back
            order = [h["task"] for h in pool.history]
            pool.release()  # the workers end in the background, before `close`
            assert ended({h["pid"] for h in pool.history})
            with pytest.raises(ValueError, match="workers were released; start a new pool"):
                pool.submit(list(tasks))
    finally:
        torch.set_num_threads(threads)
    # the order the run imports and evaluates them in, so evaluating overlaps learning
    assert order == [t.name for t in tasks]


def learn_but_die_once(learner, task, *, victim: str, at_step: int, marker: str):
    """Learn the task; on the first attempt at `victim`, the worker process is killed (SIGKILL)
    at training step `at_step` (a marker file records that it happened)."""

    def progress(step, total, loss):
        if task.name == victim and step == at_step and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return learner.learn(task, progress)


@pytest.mark.slow
def test_a_worker_killed_mid_task_is_restarted_and_the_run_ends_with_the_same_model(
        tiny_config, tasks, cluster, sequential, tmp_path):
    seq_out, seq_report = sequential
    marker = tmp_path / "killed"
    learn = partial(learn_but_die_once, victim="mixed", at_step=5, marker=str(marker))
    report, history = run_parallel(tiny_config, tasks, tmp_path / "run", learn=learn)

    killed_pid = int(marker.read_text())  # the kill happened, mid-task
    (victim,) = [h for h in history if h["task"] == "mixed"]
    assert victim["restarted"] and victim["pid"] != killed_pid  # learned again by a new process
    assert_same_model(tmp_path / "run" / "model", seq_out / "model", tasks)
    assert stripped(report) == stripped(seq_report)


class Stop(Exception):
    pass


class StopAfter(RunEvents):
    """Stops a run once task `index` is saved and recorded (as a kill there would)."""

    def __init__(self, index):
        self.index = index

    def task_finished(self, index, record, matrix, names):
        if index == self.index:
            raise Stop


def test_a_stopped_parallel_run_resumes_without_relearning_finished_tasks(
        tiny_config, tasks, cluster, sequential, tmp_path):
    seq_out, seq_report = sequential
    out = tmp_path / "run"
    with pytest.raises(Stop):
        run_parallel(tiny_config, tasks, out, events=StopAfter(1))
    report, history = run_parallel(tiny_config, tasks, out, resume=True)

    assert sorted(h["task"] for h in history) == ["meals", "mixed"]  # the first two are kept
    assert report["sessions"] == 2
    assert_same_model(out / "model", seq_out / "model", tasks)
    assert stripped(report) == stripped(seq_report)


def test_a_parallel_run_continues_a_sequential_one(tiny_config, tasks, cluster, sequential,
                                                   tmp_path):
    seq_out, seq_report = sequential
    out = tmp_path / "run"
    with pytest.raises(Stop), one_thread():
        run_stream(tasks, learner(tiny_config), out, StopAfter(0), CONFIG)
    report, history = run_parallel(tiny_config, tasks, out, resume=True)
    assert sorted(h["task"] for h in history) == ["meals", "mixed", "topics"]
    assert_same_model(out / "model", seq_out / "model", tasks)


SHARED_ENTRY = "every task trains the one shared scale entry in turn"


@pytest.mark.parametrize("method, shares", [
    ("finetune", SHARED_ENTRY + ", from where the tasks before it left it"),
    ("ewc", SHARED_ENTRY + ", penalised towards where the tasks before it left it (their Fisher "
            "information)"),
    ("lwf", SHARED_ENTRY + ", distilled from the heads of the tasks before it"),
    ("replay", SHARED_ENTRY + ", with texts replayed from the tasks before it"),
    ("joint", "all tasks train the one shared scale entry at once"),
    ("analytic", "one classifier over every task's labels: a task adds its examples to the shared "
                 "statistics batch by batch, after the tasks before it, and its record reports the "
                 "classifier solved over all of them"),
])
def test_methods_that_share_state_are_refused_saying_why(tiny_config, method, shares):
    with pytest.raises(ValueError) as refused:
        RayTaskPool(learner(tiny_config, method), 2)
    assert str(refused.value) == (
        f"method {method!r} cannot learn tasks in parallel: {shares}, so a task's learning "
        "depends on the tasks before it. Only methods whose tasks own all they learn (ia3) "
        "learn tasks apart; run it without --workers")


def test_a_time_budgeted_search_is_refused(tiny_config):
    model = ContinualLearner.from_spec(LearnerSpec(tiny_config, "ia3", {"search": 2}, ROUTER),
                                       device="cpu")
    with pytest.raises(ValueError, match="ia3 with --search cannot learn tasks in parallel: each "
                                         "task's study stops on a time budget"):
        RayTaskPool(model, 2)


def test_without_ray_the_error_names_the_extra(tiny_backbone_dir):
    script = (
        "import sys; sys.modules['ray'] = None  # as if Ray were not installed\n"
        "from continual_transformer import ContinualLearner\n"
        "from continual_transformer.config import BackboneConfig\n"
        "from continual_transformer.experiment.ray_pool import RayTaskPool\n"
        "from continual_transformer.extras import MissingExtra\n"
        "learner = ContinualLearner(BackboneConfig(sys.argv[1], max_length=32), device='cpu')\n"
        "try:\n"
        "    RayTaskPool(learner, 2)\n"
        "except MissingExtra as exc:\n"
        "    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_backbone_dir)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("this needs the optional package 'ray', which is not "
                                   "installed: pip install 'continual-tiny-transformer[ray]'")


@pytest.mark.slow  # two runs with the full-size router
def test_ctt_run_workers_gives_the_sequential_model(tiny_backbone_dir, toy_stream, cluster,
                                                    tmp_path):
    from typer.testing import CliRunner

    from continual_transformer.cli import app

    args = ["run", str(toy_stream), "--epochs", "1", "--batch-size", "8", "--backbone",
            str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu"]
    runner = CliRunner()
    with one_thread():
        sequential = runner.invoke(app, [*args, "--out", str(tmp_path / "seq")],
                                   catch_exceptions=False)
    assert sequential.exit_code == 0, sequential.output
    parallel = runner.invoke(app, [*args, "--out", str(tmp_path / "par"), "--workers", "2"],
                             catch_exceptions=False)
    assert parallel.exit_code == 0, parallel.output
    assert "accuracy matrix so far" in parallel.output
    assert_same_model(tmp_path / "par" / "model", tmp_path / "seq" / "model", load_stream(toy_stream))
    report = json.loads((tmp_path / "par" / "report.json").read_text())
    assert report["config"]["workers"] == 2 and report["config"]["worker_threads"] == 1
    assert report["accuracy_matrix"] == json.loads((tmp_path / "seq" / "report.json").read_text())[
        "accuracy_matrix"]

    refused = runner.invoke(app, [*args, "--out", str(tmp_path / "ft"), "--method", "finetune",
                                  "--workers", "2"])
    assert refused.exit_code == 2
    assert "method 'finetune' cannot learn tasks in parallel" in " ".join(refused.output.split())
    alone = runner.invoke(app, [*args, "--out", str(tmp_path / "x"), "--worker-threads", "2"])
    assert alone.exit_code == 2
    assert "--worker-threads and --ray-address apply with --workers" in alone.output
