"""Kill `ctt run` with SIGKILL at random and at chosen moments; check that it always resumes.

    python benchmarks/kill_test.py --jobs 2            # 50 trials (304 s on 2 cores, 2026-12-07)
    python benchmarks/kill_test.py --quick             # 7 trials (the slow test in CI)
    python benchmarks/kill_test.py --json results.json
    python benchmarks/kill_test.py --quick --jobs 2    # two trials at a time (CI: about 1 minute)
    python benchmarks/kill_test.py --fresh-processes   # every child exec'd, not forked (slower)

Every trial runs `ctt run` on a small stream (three tasks, a tiny random BERT, so a run takes
seconds) in a subprocess, kills it with SIGKILL, checks what is on disk at that moment (the
model directory, if any, loads and holds a prefix of the stream equal to the uninterrupted
run's), then runs the same command again to the end and checks that the final model and
report equal an uninterrupted run's (tensors bit for bit; the report but for timings).

Kinds of trial:

- random: killed at a uniformly random moment of the run (one or two kills in a row); the
  phase it was in (startup / train / evaluate / save-model / save-state / report; "(after)":
  just after that phase's last event) is read from a log the child writes as it goes.
- targeted: killed at a chosen occurrence (drawn at random) of one phase: a batch's forward
  pass, an evaluation, a file write of the model, of the run state or of the report; writes are
  either cut in half (a torn temporary file, as a kill during `write` leaves it) or completed
  and then killed (e.g. a task file written but not yet the manifest, the manifest written but
  stale files not yet removed).
- saver: a process that saves three different models into one directory in a loop, killed at
  a random moment; the directory must load and equal one of the three.
- rollback / prune: a directory whose versions 1-3 are those three models; a process rolls it
  back in a loop (to version 1, 2, 3, 1, ...), or rolls back to the previous version and prunes
  to the newest two in a loop, killed at a random moment; every kept version must load and
  equal one of the three, and the current one too.

The child is this file run with `child`: it wraps a few library functions to log the phase
(and, for targeted trials, to SIGKILL itself at the chosen point) and then runs the real CLI.
The library has no kill hooks of its own. Children are forked from fork servers that imported
PyTorch and transformers once ("launching", below): the quick mode with `--jobs 2` took 57 s
against 109 s with `--fresh-processes` (2026-12-07, 2 cores, one thread per child).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # this checkout's library, whatever is installed
PHASES = ("train", "evaluate", "save-model", "save-state", "report")
WORDS = {
    "animal": ["cat", "dog", "horse", "cow", "sheep", "tiger", "lion", "wolf"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "pasta", "cake", "salad"],
    "color": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white"],
    "sport": ["football", "tennis", "golf", "hockey", "rugby", "cricket", "boxing", "rowing"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "pliers", "spade", "axe"],
    "weather": ["rain", "snow", "wind", "fog", "hail", "storm", "sun", "frost"],
}
TASKS = (("kinds", ("animal", "food")), ("topics", ("color", "sport")), ("things", ("tool", "weather")))


# -- setup --------------------------------------------------------------------------------------
def build_backbone(folder: Path) -> Path:
    """A 2-layer, 32-wide BERT with random weights and MiniLM's tokenizer (as tests/conftest.py)."""
    import torch
    from transformers import BertConfig, BertModel

    from continual_transformer.model.backbone import default_model_dir

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_dir() / name, folder / name)
    return folder


def build_stream(path: Path, n_train: int = 32, n_test: int = 16) -> Path:
    rng = random.Random(0)
    rows = []
    for task, labels in TASKS:
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                label = labels[i % 2]
                a, b, c = rng.sample(WORDS[label], 3)
                rows.append({"task": task, "split": split, "label": label,
                             "text": f"{a} and {b} with {c}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            # One thread per child: trials run side by side (`--jobs`), and two children of two
            # busy threads each on two cores spend their time waiting for each other (a run
            # took 30 s beside another against 6 s alone). Every run of a trial, the reference
            # included, uses the same one thread, so their sums are comparable bit for bit.
            "OMP_NUM_THREADS": "1"}


# -- launching: fresh processes, or forks of a process that imported the library once ----------
# Every child is a real process, killed with SIGKILL. A fresh Python process spends about half
# of a small run importing PyTorch and transformers (7 of 13-15 s on 2 cores), so by default
# children are forked from a fork server that imported them once. There are two servers (two
# processes, two hash seeds): the reference and the killed runs come from one, the runs that
# resume them to the end from the other, so whatever two fresh processes would do differently
# (an order of iteration, say) still shows as a mismatch. `--fresh-processes` starts every child
# with exec instead, as a shell would.


def command_line(command: list[str]) -> list[str]:
    """The fresh process for `command` (what `run_command` runs in a fork)."""
    if command[0] == "cli":
        return [sys.executable, "-m", "continual_transformer.cli", *command[1:]]
    return [sys.executable, __file__, *command]


def run_command(command: list[str]) -> None:
    """Run `command` in this process: `child ...`, `saver ...`, `versioner ...` or `cli ARGS`."""
    kind, rest = command[0], command[1:]
    if kind == "cli":
        from continual_transformer import cli

        cli.app(args=rest, prog_name="ctt")
    elif kind == "child":
        parser = argparse.ArgumentParser()
        parser.add_argument("--log", type=Path, required=True)
        parser.add_argument("--out", type=Path, required=True)
        parser.add_argument("--kill")
        parser.add_argument("rest", nargs=argparse.REMAINDER)
        options = parser.parse_args(rest)
        child(options.log, options.out, options.kill, [a for a in options.rest if a != "--"])
    elif kind == "saver":
        saver(Path(rest[0]), Path(rest[1]), Path(rest[2]))
    elif kind == "versioner":
        versioner(rest[0], Path(rest[1]), Path(rest[2]), rest[3] or None)
    else:
        raise SystemExit(f"unknown command {kind!r}")


def read_line(connection: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(1)
        if not chunk:
            raise ConnectionError("the fork server closed the connection")
        data += chunk
    return data


class Forked:
    """A child of a `ForkServer`, driven as the trials drive a `subprocess.Popen`."""

    def __init__(self, connection: socket.socket, pid: int, stderr_path: Path):
        self.connection, self.pid, self.stderr_path = connection, pid, stderr_path
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self.connection], [], [], 0)[0]:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self.connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout)
            self._finish()
        return self.returncode

    def _finish(self) -> None:
        self.returncode = int(read_line(self.connection))  # -N: ended by signal N
        self.connection.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # it ended (and was reaped) a moment ago
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    @property
    def stderr(self) -> io.BytesIO:
        return io.BytesIO(self.stderr_path.read_bytes() if self.stderr_path.exists() else b"")

    def communicate(self) -> tuple[None, bytes]:
        self.wait()
        return None, self.stderr.read()


class ForkServer:
    """A process that imports the library once, then forks one child per command it is sent
    over a Unix socket, and answers with the child's pid and, when it ends, its exit status."""

    def __init__(self, work: Path, name: str):
        self.work, self.name = work, name
        self.path = work / f"{name}.sock"
        self.numbers = itertools.count()
        self.path.unlink(missing_ok=True)  # a server of an earlier run in this folder is gone
        with open(work / f"{name}.err", "wb") as errors:
            self.process = subprocess.Popen([sys.executable, __file__, "fork-server", str(self.path),
                                             str(os.getpid())],
                                            env=env(), stdout=subprocess.DEVNULL, stderr=errors)

    def start(self, command: list[str]) -> Forked:
        while not self.path.exists():
            if self.process.poll() is not None:
                raise SystemExit(f"fork server {self.name!r} failed:\n"
                                 f"{(self.work / f'{self.name}.err').read_text()}")
            time.sleep(0.02)
        stderr_path = self.work / f"{self.name}-{next(self.numbers)}.err"
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(str(self.path))
        connection.sendall(json.dumps({"command": command, "stderr": str(stderr_path)}).encode() + b"\n")
        return Forked(connection, int(read_line(connection)), stderr_path)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


def fork_server(path: Path, parent: int) -> None:
    """Serve `ForkServer.start` requests until the `parent` process is gone."""
    # What every child imports, paid for once here; nothing runs, so no thread pool starts.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the run's plots)
    import transformers.models.bert.modeling_bert  # noqa: F401  (the tiny backbone's model: 3.7 s)
    from transformers import AutoModel, AutoTokenizer, BertTokenizerFast  # noqa: F401

    import continual_transformer.experiment.run  # noqa: F401
    import continual_transformer.learner  # noqa: F401
    from continual_transformer import cli  # noqa: F401
    from continual_transformer.experiment.evaluate import StreamEvaluation  # noqa: F401

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{path}.new")
    server.listen(64)
    os.rename(f"{path}.new", path)  # clients connect once the path exists: it listens by then
    waiting: dict[int, socket.socket] = {}  # pid -> the connection awaiting its exit status
    while os.getppid() == parent:
        if select.select([server], [], [], 0.02)[0]:
            connection, _ = server.accept()
            request = json.loads(read_line(connection))
            pid = os.fork()
            if pid == 0:
                server.close()
                for other in [connection, *waiting.values()]:
                    other.close()
                forked_child(request["command"], Path(request["stderr"]))
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid)
            try:
                connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:  # its trial is gone
                pass
            connection.close()


def forked_child(command: list[str], stderr_path: Path) -> None:
    """In a new fork: stdin and stdout on /dev/null, stderr to its file; run `command`; exit."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    code = 1
    try:
        sys.argv = [__file__, *command]
        run_command(command)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class Launcher:
    """Starts the trials' commands: forked by two fork servers (`kills`: the reference, the
    killed runs, savers, versioners; `reruns`: the runs that resume a killed one), or in fresh
    processes."""

    def __init__(self, work: Path, fork: bool):
        self.servers = {role: ForkServer(work, role) for role in ("kills", "reruns")} if fork else {}

    def start(self, command: list[str], role: str = "kills"):
        if self.servers:
            return self.servers[role].start(command)
        return subprocess.Popen(command_line(command), env=env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    def run(self, command: list[str], role: str) -> subprocess.CompletedProcess:
        process = self.start(command, role)
        _, err = process.communicate()
        return subprocess.CompletedProcess(command, process.returncode, "", err.decode(errors="replace"))

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


# -- the child: the real CLI, with phase logging and an optional self-kill ---------------------------
def child(log: Path, out: Path, kill: str | None, ctt_args: list[str]) -> None:
    from continual_transformer import cli
    from continual_transformer.experiment.evaluate import StreamEvaluation
    from continual_transformer.io import store
    from continual_transformer.learner import ContinualLearner
    from continual_transformer.methods import GradientMethod

    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    counts: Counter = Counter()
    phase, at, mode = (kill.split(":") + ["", ""])[:3] if kill else (None, 0, "")
    at = int(at or 0)

    def event(name: str) -> bool:
        """Log a phase event; True when this is the occurrence to die at."""
        os.write(handle, f"{name} {time.time():.4f}\n".encode())  # unbuffered: survives SIGKILL
        counts[name] += 1
        return name == phase and counts[name] == at

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, attribute: str, name: str):
        original = getattr(owner, attribute)

        def wrapped(*args, **kwargs):
            if event(name):
                die()
            result = original(*args, **kwargs)
            os.write(handle, f"{name}-done {time.time():.4f}\n".encode())
            return result

        setattr(owner, attribute, wrapped)

    wrap(StreamEvaluation, "after_task", "evaluate")  # the stream's evaluation after each task
    wrap(ContinualLearner, "evaluate_unlearned", "evaluate")
    original_loss = GradientMethod.loss

    def loss(self, *args, **kwargs):  # every batch's forward pass: the training phase
        if event("train"):
            die()
        return original_loss(self, *args, **kwargs)

    GradientMethod.loss = loss
    original_write = store.atomic_write

    def atomic_write(path: Path, data: bytes) -> None:
        where = Path(path).resolve().relative_to(out.resolve()).parts[0]
        name = {"model": "save-model", "resume": "save-state"}.get(where, "report")
        if event(name):
            if mode == "torn":  # what a kill during write() leaves: a half-written temp file
                store.make_dirs(Path(path).parent)
                fd, _ = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                die()
            original_write(path, data)
            die()  # "after": the file is in place, whatever was to follow it is not
        original_write(path, data)
        os.write(handle, f"{name}-done {time.time():.4f}\n".encode())

    store.atomic_write = atomic_write
    event("start")
    try:
        cli.app(args=ctt_args, prog_name="ctt")
    finally:
        event("exit")


def three_states(references: Path) -> list:
    """Three different models (saved as `references/state<i>`)."""
    from continual_transformer import ContinualLearner, TrainConfig, load_stream
    from continual_transformer.config import BackboneConfig

    stream = load_stream(references / "stream.jsonl")
    config = BackboneConfig(str(references / "tiny"), max_length=32)
    states = []
    for seed, count in ((0, 1), (0, 2), (1, 3)):
        learner = ContinualLearner(config, train=TrainConfig(epochs=1, batch_size=8, seed=seed), device="cpu")
        for task in stream[:count]:
            learner.learn(task)
        learner.save(references / f"state{len(states)}")
        states.append(learner)
    return states


def saver(directory: Path, references: Path, log_path: Path) -> None:
    """Save three different models (`references/state<i>`, built by the parent) into
    `directory` in a loop, until killed."""
    from continual_transformer import ContinualLearner

    states = [ContinualLearner.load(references / f"state{i}", device="cpu") for i in range(3)]
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(log, b"start\n")
    for i in range(10**9):
        os.write(log, f"save {i % 3}\n".encode())
        states[i % 3].save(directory)
        os.write(log, b"saved\n")


def versioner(operation: str, directory: Path, log_path: Path, kill: str | None) -> None:
    """Roll `directory` back in a loop (to version 1, 2, 3, 1, ...), or roll back to the
    previous version and prune to the newest two in a loop, until killed; with `kill`
    ('<prune>:<deletion>'), die just after that deletion (of a manifest or a file) of that prune,
    or the first deletion after it if that prune deletes fewer."""
    from continual_transformer.io import store, versions

    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    at_prune, at_deletion = map(int, kill.split(":")) if kill else (-1, -1)
    prunes, deletions, remove = -1, 0, store.remove_files

    def remove_files(paths):
        nonlocal deletions
        for path in paths:  # one at a time: each deletion is a moment to die after
            remove([path])
            deletions += 1
            if at_prune >= 0 and (prunes, deletions) >= (at_prune, at_deletion):
                os.kill(os.getpid(), signal.SIGKILL)

    store.remove_files = remove_files
    os.write(log, b"start\n")
    for i in range(10**9):
        if operation == "rollback":
            os.write(log, f"rollback {i}\n".encode())
            versions.rollback(directory, i % 3 + 1)
            os.write(log, b"done\n")
        else:
            kept = [v.number for v in versions.list_versions(directory)]
            os.write(log, f"rollback {i}\n".encode())
            versions.rollback(directory, kept[-2])
            os.write(log, f"prune {i}\n".encode())
            prunes, deletions = i, 0
            versions.prune(directory, keep=2)
            os.write(log, b"done\n")


# -- the parent ---------------------------------------------------------------------------------
def read_events(log: Path) -> list[tuple[str, float]]:
    """(phase event, time) pairs the child logged; a line cut by the kill is dropped."""
    events = []
    for line in (log.read_text().splitlines() if log.exists() else []):
        parts = line.split()
        if len(parts) == 2:
            events.append((parts[0], float(parts[1])))
    return events


def strip_timings(value, timing: frozenset):
    if isinstance(value, dict):
        return {k: strip_timings(v, timing) for k, v in value.items() if k not in timing}
    if isinstance(value, list):
        return [strip_timings(v, timing) for v in value]
    return value


def model_tensors(directory: Path) -> dict:
    from continual_transformer import ContinualLearner

    learner = ContinualLearner.load(directory, device="cpu")
    return {name: learner.method.task_tensors(learner.model, name) for name in learner.tasks}


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return list(a) == list(b) and all(
        a[t].keys() == b[t].keys() and all(torch.equal(a[t][k], b[t][k]) for k in a[t]) for t in a)


def max_difference(a: dict, b: dict) -> float:
    return max((float((a[t][k] - b[t][k]).abs().max()) for t in a if t in b for k in a[t]), default=0.0)


class Bench:
    def __init__(self, work: Path, seed: int, launcher: Launcher):
        self.work, self.launcher = work, launcher
        self.rng = random.Random(seed)
        self.tiny = build_backbone(work / "tiny")
        self.stream = build_stream(work / "stream.jsonl")
        self.trial = 0
        self.lock = threading.Lock()

    def next_trial(self) -> int:
        """A fresh trial number (trials may run at once, in threads)."""
        with self.lock:
            self.trial += 1
            return self.trial

    def args(self, out: Path) -> list[str]:
        return ["run", str(self.stream), "--out", str(out), "--backbone", str(self.tiny),
                "--max-length", "32", "--batch-size", "4", "--epochs", "2", "--device", "cpu",
                "--save-every", "3"]

    def start_child(self, out: Path, log: Path, kill: str | None = None):
        command = ["child", "--log", str(log), "--out", str(out)]
        command += (["--kill", kill] if kill else []) + ["--"] + self.args(out)
        return self.launcher.start(command)

    def plain_run(self, out: Path) -> subprocess.CompletedProcess:
        """`ctt run` to its end (from the other fork server than the killed runs')."""
        return self.launcher.run(["cli", *self.args(out)], "reruns")

    @staticmethod
    def wait_for_start(process: subprocess.Popen, log: Path, skip: int) -> None:
        while "start" not in [name for name, _ in read_events(log)[skip:]]:
            if process.poll() is not None:
                return
            time.sleep(0.005)

    def measure(self, events: list[tuple[str, float]]) -> None:
        """Length of a run from the CLI's start to its exit: the window random kills aim at
        (re-measured from every run that was not killed, as the machine's load changes)."""
        times = dict(events)
        if "start" in times and "exit" in times:
            self.duration = times["exit"] - times["start"]

    def reference(self, twice: bool) -> None:
        """An uninterrupted run under the logging child (counts the phase events), and a second,
        plain one, to see how far two uninterrupted runs differ (on a CPU: not at all)."""
        out, log = self.work / "ref", self.work / "ref.log"
        process = self.start_child(out, log)
        _, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"reference run failed:\n{err.decode()}")
        events = read_events(log)
        self.measure(events)
        self.counts = Counter(name for name, _ in events if name in PHASES)
        self.ref_tensors = model_tensors(out / "model")
        self.ref_report = json.loads((out / "report.json").read_text())
        self.tolerance = 0.0
        self.references_identical = None
        if twice:
            again = self.work / "ref2"
            result = self.plain_run(again)
            if result.returncode != 0:
                raise SystemExit(f"second reference run failed:\n{result.stderr}")
            other = model_tensors(again / "model")
            self.references_identical = (same_tensors(other, self.ref_tensors)
                                         and self.report_matches(again / "report.json"))
            self.tolerance = max_difference(other, self.ref_tensors)

    def report_matches(self, path: Path) -> bool:
        from continual_transformer.experiment.report import TIMING_FIELDS

        report = json.loads(path.read_text())
        return strip_timings(report, TIMING_FIELDS) == strip_timings(self.ref_report, TIMING_FIELDS)

    def check_on_disk(self, out: Path) -> str | None:
        """After a kill: the model (if any) loads and is a prefix of the reference run."""
        from continual_transformer.io import runstate

        if (out / "model" / "manifest.json").is_file():
            tensors = model_tensors(out / "model")
            names = list(self.ref_tensors)[: len(tensors)]
            if list(tensors) != names or not same_tensors(tensors, {n: self.ref_tensors[n] for n in names}):
                return f"model after the kill holds {list(tensors)}, not a prefix of the reference"
        runstate.read(out)  # raises if the run state does not verify
        return None

    def run_trial(self, kind: str, kill: str | None, kills: int = 1) -> dict:
        trial = self.next_trial()
        out, log = self.work / f"t{trial}", self.work / f"t{trial}.log"
        phases = []
        problem = None
        for k in range(kills):
            for attempt in range(4):
                started = len(read_events(log))
                process = self.start_child(out, log, kill)
                if kill is None:  # a random moment of the run, from when the CLI starts
                    self.wait_for_start(process, log, started)
                    time.sleep(self.rng.uniform(0, self.duration))
                    process.send_signal(signal.SIGKILL)
                _, err = process.communicate()
                events = read_events(log)[started:]
                if process.returncode == 0:
                    self.measure(events)
                if kill is None and k == 0 and process.returncode == 0 and attempt < 3:
                    shutil.rmtree(out)  # finished before the kill: try again, from scratch
                    continue
                break
            if process.returncode not in (0, -signal.SIGKILL):
                problem = problem or f"child failed ({process.returncode}): {err.decode().strip()[-400:]}"
            last = events[-1][0] if events else "start"
            phase = "startup" if last == "start" else last.removesuffix("-done") + (
                "(after)" if last.endswith("-done") else "")
            phases.append(phase if process.returncode == -signal.SIGKILL else "finished")
            try:
                problem = problem or self.check_on_disk(out)
            except Exception as exc:  # a load failure is the result being measured
                problem = f"after the kill: {type(exc).__name__}: {exc}"
        result = self.plain_run(out)
        matched = False
        if result.returncode != 0:
            problem = problem or f"rerun failed ({result.returncode}): {result.stderr.strip()[-400:]}"
        else:
            try:
                tensors = model_tensors(out / "model")
                matched = same_tensors(tensors, self.ref_tensors) and self.report_matches(out / "report.json")
                if not matched:
                    problem = problem or (f"differs from the uninterrupted run (max |diff| "
                                          f"{max_difference(tensors, self.ref_tensors):.3g})")
            except Exception as exc:
                problem = problem or f"final model: {type(exc).__name__}: {exc}"
        ok = matched and problem is None
        shutil.rmtree(out, ignore_errors=True)
        return {"kind": kind, "kill": kill, "phases": phases, "ok": ok, "problem": problem}

    def history(self) -> Path:
        """A model directory whose versions 1, 2, 3 are the three states (built once, before
        trials run at once; the states are also `work/state<i>`, which savers load)."""
        directory = self.work / "history"
        if not directory.exists():
            states = three_states(self.work)
            for learner in states:
                learner.save(directory)
            self.state_tensors = [model_tensors(self.work / f"state{i}") for i in range(3)]
        return directory

    def saver_trial(self) -> dict:
        trial = self.next_trial()
        directory = self.work / f"saver{trial}"
        log = self.work / f"saver{trial}.log"
        process = self.launcher.start(["saver", str(directory), str(self.work), str(log)])
        while not (log.exists() and "start" in log.read_text()):
            if process.poll() is not None:
                raise SystemExit(f"saver failed:\n{process.stderr.read().decode()}")
            time.sleep(0.01)
        time.sleep(self.rng.uniform(0.05, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        lines = log.read_text().splitlines()
        phase = "between-saves" if lines[-1] in ("saved", "start") else "during-save"
        problem = None
        try:
            tensors = model_tensors(directory)
            if not any(same_tensors(tensors, state) for state in self.state_tensors):
                problem = "loads, but equals none of the three saved states"
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        saves = sum(line.startswith("save ") for line in lines)
        shutil.rmtree(directory, ignore_errors=True)
        return {"kind": "saver", "kill": None, "phases": [phase], "saves_before_kill": saves,
                "ok": problem is None, "problem": problem}


def version_tensors(directory: Path, number: int) -> dict:
    from continual_transformer import ContinualLearner
    from continual_transformer.io import checkpoint

    learner = ContinualLearner.from_state(checkpoint.read(directory, number), device="cpu")
    return {name: learner.method.task_tensors(learner.model, name) for name in learner.tasks}


def check_versions(directory: Path, states: list[dict]) -> str | None:
    """Every kept version and the current model load and equal one of `states`; no foreign file."""
    from continual_transformer.io import checkpoint, versions

    foreign = checkpoint.foreign_entries(directory)
    if foreign:
        return f"foreign entries {foreign}"
    for version in versions.list_versions(directory):
        tensors = version_tensors(directory, version.number)
        if not any(same_tensors(tensors, state) for state in states):
            return f"version {version.number} loads, but equals none of the three saved states"
    if not any(same_tensors(model_tensors(directory), state) for state in states):
        return "the current model loads, but equals none of the three saved states"
    return None


def versions_trial(bench: "Bench", operation: str) -> dict:
    """A directory whose versions 1-3 are the three states, rolled back (and pruned) in a loop
    by a child killed at a random moment (rollback), or just after a drawn deletion of a drawn
    prune (prune: the rollbacks between prunes take most of the time)."""
    from continual_transformer.io import versions

    trial = bench.next_trial()
    directory = bench.work / f"{operation}{trial}"
    shutil.copytree(bench.history(), directory)
    log = bench.work / f"{operation}{trial}.log"
    # a prune here deletes 1-2 manifests, then 0-2 files; past its last: the next prune's first
    kill = f"{bench.rng.randint(0, 5)}:{bench.rng.randint(1, 3)}" if operation == "prune" else None
    process = bench.launcher.start(["versioner", operation, str(directory), str(log), kill or ""])
    while not (log.exists() and "start" in log.read_text()):
        if process.poll() is not None:
            raise SystemExit(f"versioner failed:\n{process.stderr.read().decode()}")
        time.sleep(0.01)
    if kill is None:
        time.sleep(bench.rng.uniform(0.05, 1.5))
        process.send_signal(signal.SIGKILL)
    try:
        process.wait(timeout=600)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    lines = log.read_text().splitlines()
    last = lines[-1].split()[0]
    phase = "between" if last in ("done", "start") else f"during-{last}"
    problem, kept = None, None
    try:
        problem = check_versions(directory, bench.state_tensors)
        kept = len(versions.list_versions(directory))
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    operations = sum(line == "done" for line in lines)
    shutil.rmtree(directory, ignore_errors=True)
    if process.returncode != -signal.SIGKILL:
        problem = problem or f"versioner ended by itself ({process.returncode}): {process.stderr.read().decode()[-400:]}"
    return {"kind": operation, "kill": kill, "phases": [phase], "operations_before_kill": operations,
            "versions_kept": kept, "ok": problem is None, "problem": problem}


def plan(bench: Bench, random_trials: int, per_phase: int, phases: tuple[str, ...],
         rng: random.Random) -> list[tuple]:
    trials = [("random", None, rng.choice((1, 2))) for _ in range(random_trials)]
    for p, phase in enumerate(phases):
        modes = ("torn", "after") if phase.startswith("save") or phase == "report" else ("",)
        for k in range(per_phase):
            at = rng.randint(1, bench.counts[phase])
            mode = modes[(k + p + 1) % len(modes)]
            trials.append((f"targeted:{phase}" + (f"/{mode}" if mode else ""),
                           f"{phase}:{at}" + (f":{mode}" if mode else ""), 1))
    return trials


def describe(result: dict) -> str:
    verdict = "ok" if result["ok"] else "FAIL: " + str(result["problem"])
    kind, kill, phase = result["kind"], str(result["kill"] or ""), result["phases"][0]
    if kind == "saver":
        return f"saver{'':19s} {'':22s} killed {phase:14s} after {result['saves_before_kill']} saves: {verdict}"
    if kind in ("rollback", "prune"):
        return (f"{kind:24s} {kill:22s} killed {phase:16s} after {result['operations_before_kill']} "
                f"{kind}s, {result['versions_kept']} versions kept: {verdict}")
    return f"{kind:24s} {kill:22s} killed in {','.join(result['phases']):32s} {verdict}"


def trials_run(args, phases: tuple[str, ...], work: Path, launcher: Launcher,
               rng: random.Random) -> tuple[list[dict], Bench]:
    bench = Bench(work, args.seed, launcher)
    bench.reference(twice=not args.quick)
    print(f"uninterrupted run: {bench.duration:.1f}s; phase events {dict(bench.counts)}; "
          f"two uninterrupted runs identical: {bench.references_identical} "
          f"(max |diff| {bench.tolerance:g})", flush=True)
    if args.saver or args.rollback or args.prune:
        bench.history()  # before trials run at once: savers and versioners read it
    trials = [(bench.run_trial, (kind, kill, kills))
              for kind, kill, kills in plan(bench, args.random, args.per_phase, phases, rng)]
    trials += [(bench.saver_trial, ())] * args.saver
    trials += [(versions_trial, (bench, op)) for op in ["rollback"] * args.rollback + ["prune"] * args.prune]
    results = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each trial is its own processes
        for result in pool.map(lambda trial: trial[0](*trial[1]), trials):
            results.append(result)
            print(f"{len(results):3d} {describe(result)}", flush=True)
    return results, bench


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random", type=int, default=12, help="random-moment trials")
    parser.add_argument("--per-phase", type=int, default=4, help="targeted trials per phase")
    parser.add_argument("--saver", type=int, default=6, help="kill-a-saving-process trials")
    parser.add_argument("--rollback", type=int, default=6, help="kill-a-rolling-back-process trials")
    parser.add_argument("--prune", type=int, default=6, help="kill-a-pruning-process trials")
    parser.add_argument("--phases", default=",".join(PHASES), help="phases for targeted trials")
    parser.add_argument("--quick", action="store_true", help="7 trials, for CI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once (each in its own processes)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--fresh-processes", action="store_true",
                        help="start every child with exec, not from a fork server (slower)")
    args = parser.parse_args(argv)
    if args.quick:
        args.random, args.per_phase, args.saver, args.rollback, args.prune = 1, 1, 1, 1, 1
        args.phases = "train,save-model,save-state"
    phases = tuple(args.phases.split(","))
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phases {unknown}; known: {list(PHASES)}")
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctt-kill-") as tmp:
        launcher = Launcher(Path(tmp), fork=not args.fresh_processes)
        try:
            results, bench = trials_run(args, phases, Path(tmp), launcher, rng)
        finally:
            launcher.close()
    by_phase: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for result in results:
        key = (f"{result['kind']} (killed in {result['phases'][0]})"
               if result["kind"] in ("random", "rollback", "prune") else result["kind"])
        by_phase[key][0] += 1
        by_phase[key][1] += result["ok"]
    print("\ntrials per phase (matched / trials):")
    for key in sorted(by_phase):
        print(f"  {key:40s} {by_phase[key][1]:3d} / {by_phase[key][0]}")
    total, matched = len(results), sum(r["ok"] for r in results)
    print(f"  {'all':40s} {matched:3d} / {total}   ({time.perf_counter() - started:.0f}s)")
    summary = {"trials": total, "matched": matched, "by_phase": dict(by_phase), "results": results,
               "references_identical": bench.references_identical, "tolerance": bench.tolerance}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "fork-server":
        fork_server(Path(sys.argv[2]), int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] in ("child", "saver", "versioner"):
        run_command(sys.argv[1:])
    else:
        summary = main()
        sys.exit(0 if summary["matched"] == summary["trials"] else 1)
