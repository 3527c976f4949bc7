"""Learning jobs: a queue, one job at a time, each trained in its own process.

A job's process loads its own copy of the frozen backbone (verified by hash against the served
one), builds an empty learner with the served model's method and hyperparameters, learns the
task and sends back the task's record and tensors (safetensors bytes). For `ia3` this gives the
same numbers as learning the task in place: a task's training depends only on the backbone, its
data and its seed. Running it in a process, at a lower priority and with its own thread count,
keeps training off the serving process's CPU, GIL and model; a job that crashes or is killed
changes nothing. The served model only changes in `ModelService.add_task`, once training ended.

This module imports nothing heavy at import time: the learning process imports it first.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from ..experiment.workers import Send, Worker, WorkerDied, WorkerFailed
from .logs import event

if TYPE_CHECKING:
    from ..types import Task
    from .prometheus import Metrics
    from .serving import ModelService

log = logging.getLogger("continual_transformer.server")

KEEP_FINISHED = 1000  # finished jobs remembered for GET /v1/jobs/{id}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Job:
    id: str
    task: str
    train_examples: int
    test_examples: int
    epochs: int | None
    state: str = "queued"  # queued -> running -> succeeded | failed
    created_at: str = field(default_factory=_now)
    started_at: str | None = None
    finished_at: str | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    test_accuracy: float | None = None
    error: str | None = None


class JobRejected(Exception):
    """A job that cannot be queued; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JobRunner:
    """Queues jobs and runs them one after another in a worker thread."""

    def __init__(self, service: "ModelService", metrics: "Metrics", *, max_pending: int,
                 threads: int, nice: int, device: str):
        self.service = service
        self.metrics = metrics
        self.max_pending = max_pending
        self.threads = threads
        self.nice = nice
        self.device = device
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Job, "Task"] | None] = queue.SimpleQueue()
        self._worker: Worker | None = None  # the running job's learning process
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="ctt-learning", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Fail queued jobs, end a running job's process (the model stays as it was), join."""
        with self._lock:
            self._stopping = True
            worker = self._worker
        if worker is not None:
            worker.terminate()
        self._queue.put(None)
        self._thread.join()

    # -- reading -------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else Job(**vars(job))  # a snapshot

    def list(self) -> list[Job]:
        with self._lock:
            return [Job(**vars(job)) for job in self._jobs.values()]

    def running_pid(self) -> int | None:
        with self._lock:
            return self._worker.pid if self._worker is not None else None

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, task: "Task", epochs: int | None) -> Job:
        with self._lock:
            if self._stopping:
                raise JobRejected(503, "the server is shutting down")
            method = self.service.learner.method
            if method.shares_state or method.shared_tensors(self.service.learner):
                # A task is learned apart and imported alone; these methods' tasks change
                # state that every task shares, so a task cannot be added that way.
                raise JobRejected(409, f"this model's method {method.name!r} shares state between "
                                       f"tasks ({method.shares}); the server learns new tasks only "
                                       "for methods whose tasks own their state (ia3 without a "
                                       "pool). Learn it with `ctt run`")
            if task.name in self.service.task_names():
                raise JobRejected(409, f"task {task.name!r} is already learned; delete it first")
            active = [j for j in self._jobs.values() if j.state in ("queued", "running")]
            for other in active:
                if other.task == task.name:
                    raise JobRejected(409, f"task {task.name!r} is already being learned by job "
                                           f"{other.id} ({other.state})")
            if len(active) >= self.max_pending:
                raise JobRejected(429, f"{len(active)} learning jobs are queued or running, the "
                                       f"limit (CTT_MAX_PENDING_JOBS={self.max_pending}); retry later")
            job = Job(uuid.uuid4().hex, task.name, len(task.train), len(task.test), epochs)
            self._jobs[job.id] = job
            self._forget_old()
            self.metrics.jobs.labels("queued").inc()
        self._queue.put((job, task))
        return job

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state in ("succeeded", "failed")]
        for job_id in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job_id]

    # -- running -------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            job, task = item
            if self._stopping:
                self._finish(job, "failed", "the server shut down before the job started")
                continue
            self._run(job, task)

    def _set(self, job: Job, **changes) -> None:
        with self._lock:
            if "state" in changes and changes["state"] != job.state:
                self.metrics.jobs.labels(job.state).dec()
                self.metrics.jobs.labels(changes["state"]).inc()
            for key, value in changes.items():
                setattr(job, key, value)

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        self._set(job, state=state, error=error, finished_at=_now())
        event(f"job.{state}", f"learning job {job.id} {state}",
              logging.WARNING if state == "failed" else logging.INFO,
              job=job.id, tasks=[job.task], state=state, error=error)

    def _run(self, job: Job, task: "Task") -> None:
        start = time.perf_counter()
        self._set(job, state="running", started_at=_now())
        event("job.started", f"learning job {job.id} started", job=job.id, tasks=[job.task],
              state="running")
        learner = self.service.learner
        spec = {
            "learner": learner.spec(),
            "backbone_sha256": learner.backbone.ref.sha256,
            "epochs": job.epochs,
            "threads": self.threads,
            "nice": self.nice,
            "device": self.device,
        }
        worker = Worker(learn_in_process, spec, task, name=f"ctt-learn-{task.name}")
        with self._lock:  # stop() either sees this worker or this job sees `_stopping`
            stopping = self._stopping
            if not stopping:
                self._worker = worker.start()
        if stopping:
            self._finish(job, "failed", "the server shut down before the job started")
            return
        outcome = self._follow(job, worker)
        if isinstance(outcome, str):
            self._finish(job, "failed", outcome)
        else:
            self._commit(job, outcome)
        self.metrics.job_seconds.labels(job.state).observe(time.perf_counter() - start)

    def _follow(self, job: Job, worker: Worker) -> tuple | str:
        """The learned task (record, tensors, shared increment), or why there is none."""
        try:
            return worker.wait(lambda _progress, step, total, loss:
                               self._set(job, step=step, total_steps=total, loss=loss))
        except WorkerFailed as failure:
            return _failure_text(failure.error)
        except WorkerDied as died:
            why = "the server shut down" if self._stopping else f"exit code {died.exitcode}"
            return f"the learning process ended without a result ({why})"
        finally:
            with self._lock:
                self._worker = None

    def _commit(self, job: Job, outcome: tuple) -> None:
        from ..learner import unpack_learned

        record, tensors, increment = unpack_learned(outcome)
        try:
            self.service.add_task(record, tensors, increment)
        except Exception as exc:  # the model is as it was (add_task undoes itself); say why
            log.exception("learning job %s: adding task %r failed", job.id, job.task)
            self._finish(job, "failed", f"the trained task could not be saved: {type(exc).__name__}: {exc}")
            return
        self._set(job, test_accuracy=record.stats.get("test_accuracy"))
        self._finish(job, "succeeded")


def _failure_text(exc: BaseException) -> str:
    """What the API shows for a job whose learning raised `exc`: a bad input's message alone
    (ValueError, KeyError), anything else with its type."""
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    if not isinstance(exc, (ValueError, KeyError)):
        message = f"{type(exc).__name__}: {message}"
    return message


def learn_in_process(send: Send, spec: dict, task: "Task") -> tuple[dict, bytes, bytes]:
    """Entry point of a learning process: learn `task`; send ("progress", step, total, loss);
    return its record, its tensors and the shared increment (safetensors bytes)."""
    os.nice(spec["nice"])
    import torch

    from dataclasses import replace

    from ..learner import ContinualLearner, pack_learned
    from ..model.backbone import Backbone, BackboneError

    torch.set_num_threads(spec["threads"])
    learner_spec = spec["learner"]
    backbone = Backbone.load(learner_spec.backbone, spec["device"])
    if backbone.ref.sha256 != spec["backbone_sha256"]:
        raise BackboneError(
            f"backbone {backbone.ref.name!r} changed on disk since the server loaded it "
            f"(SHA-256 {backbone.ref.sha256[:12]}…, served {spec['backbone_sha256'][:12]}…)"
        )
    if spec["epochs"] is not None:
        hyperparameters = learner_spec.hyperparameters
        learner_spec = replace(learner_spec, hyperparameters={
            **hyperparameters, "train": {**hyperparameters["train"], "epochs": spec["epochs"]}})
    learner = ContinualLearner.from_spec(learner_spec, backbone=backbone)
    record = learner.learn(task, lambda step, total, loss: send("progress", step, total, loss))
    if spec["epochs"] is not None:
        record.stats["epochs"] = spec["epochs"]
    if task.test:
        record.stats["test_accuracy"] = learner.evaluate(task)
    return pack_learned(learner.take_out(task.name))
