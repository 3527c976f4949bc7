"""Learn a stream's tasks in parallel on a Ray actor pool; the model is the sequential run's.

    report = run_stream_parallel(tasks, learner, "runs/x", workers=2)   # `ctt run --workers 2`

Each worker (a Ray actor) loads the frozen backbone once and learns whole tasks, one at a time,
on a learner of its own, with one CPU thread by default. Only a finished task comes back: its
record, its tensors and what it added to the router's shared statistics
(`ContinualLearner.take_out`, safetensors bytes). The run imports the tasks in stream order
where a sequential run learns them (`run_stream(pool=...)`), then evaluates and saves as that
run does. A task's learning depends only on the backbone, its data and its seed
(`methods.base.task_seed`), never on the tasks before it, and the router's shared statistics
are per-task sums added in stream order, so the model, the predictions and the report (but for
times) are the sequential run's bit for bit, when that run uses as many threads as a worker,
on the same CPU kind and software. (The thread count changes float sums in the lexical
branch's fit, so a run on more threads differs there by rounding.)

Tasks go out in stream order, the order in which the run imports and evaluates them, so its
evaluations overlap the workers' learning. (Handed out longest first, the first tasks of the
stream came back last and every evaluation waited for the end: 452 s against 423 s for a
sequential run, measured.) While the pool learns on this machine (no cluster address given),
the run's own process computes with the CPU threads the workers leave free (at least one), so
its evaluations do not oversubscribe the cores; it takes its threads back when the workers
have nothing left to learn.

Once the run has taken the last task, the workers and the local cluster stop in the background
(`release`) while the run evaluates that task and writes its report.

A worker that dies while it learns (killed, out of memory) is restarted by Ray, which loads the
backbone again and runs its tasks again (`RETRIES` times at most); the run ends with the same
model. A killed run continues with `--resume` as a sequential one does: finished tasks are kept,
the others are learned again from their start.

Only methods whose tasks own all they learn (`ia3`) can learn tasks apart; the others are
refused, saying what they share (`refusal`). Ray is an optional extra
(`pip install 'continual-tiny-transformer[ray]'`), imported only when a pool starts.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..extras import import_extra
from ..learner import ContinualLearner, LearnedTask, pack_learned, unpack_learned
from .run import RunEvents, run_stream

if TYPE_CHECKING:
    from ..config import LearnerSpec
    from ..types import Task, TaskRecord

RETRIES = 3  # restarts of a dead worker, and runs again of the tasks it held, at most

# What a worker runs to learn one task on its learner: a module-level function (it is pickled
# to the workers), `learn(learner, task) -> TaskRecord`.
LearnFunction = Callable[[ContinualLearner, "Task"], "TaskRecord"]


class TaskLost(RuntimeError):
    """A task's worker died more often than Ray restarts it (`RETRIES`)."""


def refusal(learner: ContinualLearner) -> str | None:
    """Why `learner`'s tasks cannot be learned in parallel to give the sequential model (None:
    they can)."""
    method = learner.method
    if method.shares_state or method.learns_jointly:
        return (f"method {method.name!r} cannot learn tasks in parallel: {method.shares}, so a "
                "task's learning depends on the tasks before it. Only methods whose tasks own all "
                "they learn (ia3) learn tasks apart; run it without --workers")
    if method.hyperparameters().get("search"):
        return ("ia3 with --search cannot learn tasks in parallel: each task's study stops on a "
                "time budget, so what a task learns depends on how fast its worker runs and no "
                "run could promise the sequential model. Run it without --workers or without "
                "--search")
    if learner.device.type != "cpu":
        return (f"--workers learns on CPU workers, and a run on {learner.device} computes other "
                "numbers; run it with --device cpu, or without --workers")
    return None


def torch_threads(n: int) -> int:
    """Set this process's torch CPU threads to `n`; the number before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


def learn_task(learner: ContinualLearner, task: "Task") -> "TaskRecord":
    """What a worker runs by default: learn the task."""
    return learner.learn(task)


class _Worker:
    """A Ray actor: one learner on one loaded backbone, learning one task at a time."""

    def __init__(self, spec: "LearnerSpec", backbone_sha256: str, threads: int,
                 learn: LearnFunction):
        import torch

        from ..model.backbone import BackboneError

        torch.set_num_threads(threads)
        self.learner = ContinualLearner.from_spec(spec, device="cpu")
        found = self.learner.backbone.ref.sha256
        if found != backbone_sha256:
            raise BackboneError(f"backbone {self.learner.backbone.ref.name!r} on this worker has "
                                f"SHA-256 {found[:12]}…, the run's has {backbone_sha256[:12]}…")
        self.learn_function = learn

    def learn(self, task: "Task") -> tuple[tuple[dict, bytes, bytes], dict]:
        """The learned task, packed, and where it was learned (pid; whether Ray restarted this
        worker before)."""
        import ray

        self.learn_function(self.learner, task)
        packed = pack_learned(self.learner.take_out(task.name))
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        return packed, {"pid": os.getpid(), "restarted": bool(restarted)}


class RayTaskPool:
    """`workers` Ray actors learning submitted tasks, each taking the next task in stream order
    when it is free; `learned(name)` waits for a task and gives it as `import_task` takes it.

    Without `address`, a local Ray cluster of `workers * threads` CPUs is started and stopped
    with the pool; with one, the pool joins that cluster (`ray.init(address=...)`); a process
    where Ray already runs uses it. Use as a context manager (or `close()`).
    """

    def __init__(self, learner: ContinualLearner, workers: int, *, address: str | None = None,
                 threads: int = 1, learn: LearnFunction = learn_task):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads per worker must be a whole number >= 1, got {threads!r}")
        why = refusal(learner)
        if why is not None:
            raise ValueError(why)
        self._ray = ray = import_extra("ray", "ray")
        self._owns_cluster = not ray.is_initialized()
        if self._owns_cluster:
            ray.init(address=address, num_cpus=None if address else workers * threads,
                     include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        actor = ray.remote(_Worker).options(num_cpus=threads, max_restarts=RETRIES,
                                            max_task_retries=RETRIES)
        spec, sha256 = learner.spec(), learner.backbone.ref.sha256
        self._actors = [actor.remote(spec, sha256, threads, learn) for _ in range(workers)]
        self._free = deque(self._actors)
        self._waiting: deque["Task"] = deque()
        self._running: dict = {}  # Ray object ref -> (actor, task)
        self._results: dict[str, tuple | BaseException] = {}
        self.history: list[dict] = []  # per finished task: task, pid, restarted, in that order
        self._changed = threading.Condition()
        self._closing = False
        self._stopper: threading.Thread | None = None  # stops the workers (`release`)
        # The run's process evaluates while the workers learn: with the workers on this machine
        # (no address given) it keeps to the CPUs they leave (at least one) until every task is
        # back (`_give_threads_back`).
        self._local = address is None
        self._driver_threads = max(1, (os.cpu_count() or 1) - workers * threads)
        self._threads_before: int | None = None
        # Results are collected as they come, so a free worker takes the next task at once, even
        # while the run evaluates or saves.
        self._collector = threading.Thread(target=self._collect, name="ctt-ray-pool", daemon=True)
        self._collector.start()

    def submit(self, tasks: list["Task"]) -> None:
        with self._changed:
            if self._stopper is not None:
                raise ValueError("this pool's workers were released; start a new pool")
            self._waiting.extend(tasks)
            if self._local and self._waiting and self._threads_before is None:
                self._threads_before = torch_threads(self._driver_threads)
            self._dispatch()
            self._changed.notify_all()

    def learned(self, task: str) -> LearnedTask:
        """The task once learned (its record, tensors and shared increment); what its worker
        raised, if it raised."""
        with self._changed:
            while task not in self._results:
                pending = {t.name for t in self._waiting} | {t.name for _, t in self._running.values()}
                if task not in pending:
                    raise KeyError(f"task {task!r} was not submitted to this pool")
                self._changed.wait()
            result = self._results.pop(task)
            if not (self._waiting or self._running):  # the workers are done: all CPUs are free
                self._give_threads_back()
        if isinstance(result, BaseException):
            raise result
        return unpack_learned(result)

    def release(self) -> None:
        """Every task the run needs is back: stop the workers (and the local cluster the pool
        started) in the background, while the run finishes its evaluation and report; `close`
        waits for it. (Ray's shutdown takes about 1.4 s here, all of it waiting.)"""
        with self._changed:
            pending = [t.name for _, t in self._running.values()] + [t.name for t in self._waiting]
            if pending:
                raise ValueError(f"tasks {pending} are not learned yet; close the pool to stop "
                                 "them")
            self._start_stopping()

    def close(self) -> None:
        """Stop the workers (and the local cluster the pool started), learning or not; wait
        until they are."""
        with self._changed:
            self._start_stopping()
        self._stopper.join()
        self._give_threads_back()

    def _start_stopping(self) -> None:
        if self._stopper is None:  # the caller holds the lock
            self._stopper = threading.Thread(target=self._stop, name="ctt-ray-stop", daemon=True)
            self._stopper.start()

    def _stop(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._collector.join()
        for actor in self._actors:
            self._ray.kill(actor)
        if self._owns_cluster:
            self._ray.shutdown()

    def __enter__(self) -> "RayTaskPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _give_threads_back(self) -> None:
        if self._threads_before is not None:
            torch_threads(self._threads_before)
            self._threads_before = None

    def _dispatch(self) -> None:
        """Give waiting tasks, in stream order, to free workers (the caller holds the lock)."""
        while self._free and self._waiting:
            actor, task = self._free.popleft(), self._waiting.popleft()
            self._running[actor.learn.remote(task)] = (actor, task)

    def _collect(self) -> None:
        ray = self._ray
        while True:
            with self._changed:
                while not self._running and not self._closing:
                    self._changed.wait()
                if self._closing:
                    return
                refs = list(self._running)
            ready, _ = ray.wait(refs, num_returns=1, timeout=1.0)
            for ref in ready:
                info = None
                try:
                    result, info = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the task raised: that exception
                    result = exc.cause if isinstance(exc.cause, BaseException) else exc
                except ray.exceptions.RayActorError as exc:
                    result = TaskLost(f"its worker died or could not start, and Ray restarts a "
                                      f"worker {RETRIES} times at most: {exc}")
                except Exception as exc:  # anything else Ray raises names itself
                    result = exc
                with self._changed:
                    actor, task = self._running.pop(ref)
                    if isinstance(result, TaskLost):
                        result = TaskLost(f"task {task.name!r}: {result}")
                    self._results[task.name] = result
                    if info is not None:
                        self.history.append({"task": task.name, **info})
                    self._free.append(actor)
                    self._dispatch()
                    self._changed.notify_all()


def run_stream_parallel(
    tasks: list["Task"],
    learner: ContinualLearner,
    out: str | Path | None = None,
    events: RunEvents | None = None,
    run_config: dict | None = None,
    *,
    workers: int,
    address: str | None = None,
    threads: int = 1,
    resume: bool = False,
    keep_versions: int | None = None,
) -> dict:
    """`run_stream` with the tasks learned by `workers` Ray workers of `threads` CPU threads
    each (see the module's text); the same model, predictions and report (but for times)."""
    with RayTaskPool(learner, workers, address=address, threads=threads) as pool:
        return run_stream(tasks, learner, out, events, run_config, resume=resume,
                          keep_versions=keep_versions, pool=pool)
