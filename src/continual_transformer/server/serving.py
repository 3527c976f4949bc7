"""The live model: one inference thread with continuous batching, and the changes made to it.

Why one thread owns every forward pass: the activation-scaling layers read which entry each
row uses from one selection object shared by the whole encoder (`IA3.select`), so two forward
passes must never interleave inside one model. Serialising them costs little: the texts of
concurrent requests wait in one pool, each pass takes the oldest text and those nearest its
length, whatever tasks they name (a pass that mixes tasks is still one pass), and a request is
answered as soon as its last text is (`_serve_forever`). The model lock is taken per pass, so
a change to the model waits for one pass at most.

Why learning does not happen in this model: training a task would hold the model for whole
training steps and share the selection object with serving. A learning job trains in its own
process, on its own copy of the frozen backbone (see `jobs.py`), and only the finished task's
tensors come here (`add_task`). The live model is locked for the few microseconds it takes to
add a new adapter entry and head; no existing tensor is written, so every old task's
predictions stay bit-identical (for the same batch: padding a text to a longer batch-mate
changes float rounding at the 1e-7 level, never the parameters).

A task appears to clients atomically, and only once it is on disk: it is added to the model
but not yet served, the checkpoint is saved (the manifest's rename is the commit point), then
the set of served task names is swapped in one assignment. A failed save takes it out again.

A rollback (`rollback`) builds the old version's learner completely, beside the live one, commits
the rollback on disk, then swaps the learner, its task names and the version number at once,
between two forward passes: every request is answered by exactly one version.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from ..task_free import TaskFreeAnswer
from ..model.batching import padded
from ..model.memory import release_freed_memory
from .logs import event

if TYPE_CHECKING:
    import torch

    from ..learner import ContinualLearner
    from ..types import Prediction, TaskRecord
    from .prometheus import Metrics


class UnknownTask(KeyError):
    """A task name the server does not serve (the message lists the ones it does)."""

    def __str__(self) -> str:
        return str(self.args[0])


class PredictionRefused(ValueError):
    """The model cannot answer these items (e.g. no task given and no router); a 422."""


# How long the inference thread waits without a request before it hands the memory its passes
# freed back to the system (`_serve_forever`). Not during passes: under load the next pass
# takes the pages right back, and handing back after each pass cost ~8 % of the server's
# throughput at 32 clients (system time 8 % -> 4 % of the CPU).
IDLE_HAND_BACK_SECONDS = 0.05


@dataclass
class _Pending:
    texts: list[str]
    tasks: list[str | None]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    among: frozenset[str] | None = None  # the tasks routed rows may go to (None: any)
    answer: TaskFreeAnswer = field(default_factory=TaskFreeAnswer)  # how routed rows are stated
    results: list = field(default_factory=list)
    left: int = 0  # rows not answered yet
    failed: bool = False  # answered with an error: its other rows are dropped


@dataclass(eq=False)
class _Row:
    """One text of a waiting request, tokenised: what a forward pass is made of."""

    request: _Pending
    index: int  # in the request
    ids: list[int]  # the whole text's (`Backbone.tokenize_whole`)


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():  # the client went away and the request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ModelService:
    """Serves a `ContinualLearner` loaded from `model_dir` and keeps that directory in step."""

    def __init__(self, learner: "ContinualLearner", model_dir: Path, *, batch_max_items: int,
                 batch_max_wait_s: float, metrics: "Metrics", batch_max_tokens: int = 1024,
                 keep_versions: int | None = None, follow_interval_s: float | None = None):
        self.learner = learner
        self.model_dir = Path(model_dir)
        self.batch_max_items = batch_max_items
        self.batch_max_wait_s = batch_max_wait_s
        self.batch_max_tokens = batch_max_tokens
        self.keep_versions = keep_versions  # None: every version stays until `ctt prune`
        from ..model.batching import BATCH_ROWS  # more rows than this, and predict() cuts them again

        self._max_rows_per_pass = BATCH_ROWS
        self.metrics = metrics
        self._model_lock = threading.Lock()  # held by each forward pass and each model change
        self._write_lock = threading.Lock()  # one change (with its save) at a time
        self._view_lock = threading.Lock()  # the learner, its task names and version change together
        self._served: tuple[str, ...] = tuple(learner.tasks)  # replaced whole, never mutated
        self.version: int | None = None  # of the model directory's manifest; None: not saved yet
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve_forever, name="ctt-inference", daemon=True)
        # A reader follows the directory its writer saves to: every `follow_interval_s`, it
        # looks at the current version and, when it changed, serves the new one (`_follow`).
        self.follow_interval_s = follow_interval_s
        self._stopping = threading.Event()
        self._follower = threading.Thread(target=self._follow_forever, name="ctt-follower", daemon=True)
        self._publish()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._prepare(self.learner)  # the first routed request does not pay for the solve
        self._thread.start()
        if self.follow_interval_s is not None:
            self._follower.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._follower.is_alive():
            self._follower.join()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    @property
    def ready(self) -> bool:
        return self._thread.is_alive()

    # -- reading -------------------------------------------------------------------------------
    def task_names(self, sees: Callable[[str], bool] | None = None) -> tuple[str, ...]:
        """The tasks served; with `sees`, only those a caller may see (a tenant's tasks)."""
        served = self._served
        return served if sees is None else tuple(t for t in served if sees(t))

    def records(self, sees: Callable[[str], bool] | None = None) -> list["TaskRecord"]:
        with self._view_lock:  # names and learner of one version, even during a rollback
            learner, served = self.learner, self._served
        return [learner.tasks[name] for name in served if sees is None or sees(name)]

    def served_version(self) -> tuple[int | None, tuple[str, ...]]:
        """The version served and its task names, read together."""
        with self._view_lock:
            return self.version, self._served

    def check_tasks(self, tasks: list[str | None], sees: Callable[[str], bool] | None = None) -> tuple[str, ...]:
        """The tasks the caller sees, after checking that every named one is among them; a
        task the caller may not see is answered exactly as one that does not exist."""
        known = self.task_names(sees)
        if not known and any(name is None for name in tasks):
            raise PredictionRefused("no task given and no task learned yet")
        for name in dict.fromkeys(tasks):
            if name is not None and name not in known:
                raise UnknownTask(f"unknown task {name!r}; known: {list(known)}")
        return known

    # -- predicting ----------------------------------------------------------------------------
    async def predict(self, texts: list[str], tasks: list[str | None],
                      sees: Callable[[str], bool] | None = None,
                      answer: TaskFreeAnswer | None = None) -> list["Prediction"]:
        """Predictions for `texts` (task None: the model routes, or refuses), batched with others.
        With `sees`, named tasks must be visible to it and routed rows go only to such tasks.
        `answer`: how many candidate tasks a routed row names, and its ambiguity threshold."""
        known = self.check_tasks(tasks, sees)
        loop = asyncio.get_running_loop()
        pending = _Pending(list(texts), list(tasks), loop, loop.create_future(),
                           None if sees is None else frozenset(known), answer or TaskFreeAnswer())
        self._queue.put(pending)
        return await pending.future

    def _serve_forever(self) -> None:
        """Continuous batching: rows of waiting requests form a pool; each forward pass takes
        the pool's oldest row and the rows nearest its length (`_next_pass`), and a request is
        answered as soon as its last row is. New requests join the pool between passes, so
        under load every pass is full and of one length, whatever the clients' request sizes.
        Memory the passes freed goes back to the system once the server has been idle for
        `IDLE_HAND_BACK_SECONDS`."""
        pool: list[_Row] = []
        stopping = False
        handed_back = True  # no pass since memory was last handed back
        while True:
            if not pool:
                if stopping:
                    return
                first = self._next_request(handed_back)
                handed_back = True
                if first is None:
                    return
                self._admit(first, pool)
                # From idle, wait briefly for others: requests sent together share passes.
                deadline = time.monotonic() + self.batch_max_wait_s
                while len(pool) < self.batch_max_items:
                    try:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    self._admit(item, pool)
            elif not stopping:  # under load: take what arrived during the last pass
                while len(pool) < self.batch_max_items:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    self._admit(item, pool)
            if not pool:
                continue
            rows = self._next_pass(pool)
            handed_back = False
            try:
                self._run_pass(rows)
            except Exception as exc:  # a bug here must answer its requests with a 500, not hang them
                self._fail({id(r.request): r.request for r in rows}.values(), exc)
            done = {id(r) for r in rows}
            pool[:] = [r for r in pool if id(r) not in done and not r.request.failed]

    def _next_request(self, handed_back: bool) -> "_Pending | None":
        """The next request (None: stop), waited for; with memory not handed back since the
        last pass, it is handed back first if no request comes within `IDLE_HAND_BACK_SECONDS`."""
        if not handed_back:
            try:
                return self._queue.get(timeout=IDLE_HAND_BACK_SECONDS)
            except queue.Empty:
                release_freed_memory()
        return self._queue.get()

    def _admit(self, request: _Pending, pool: list["_Row"]) -> None:
        try:
            ids = self.learner.backbone.tokenize_whole(request.texts)
        except Exception as exc:
            self._fail([request], exc)
            return
        request.results = [None] * len(ids)
        request.left = len(ids)
        pool.extend(_Row(request, i, ids[i]) for i in range(len(ids)))

    def _next_pass(self, pool: list["_Row"]) -> list["_Row"]:
        """The pool's oldest row, with the rows nearest its padded length, while the pass stays
        within `batch_max_tokens` padded tokens and the rows-per-pass limit. Rows join one at a
        time: the oldest of the next shorter width or of the next longer one, whichever adds
        less padding (a shorter row pads itself to the pass's width; a longer one pads every
        row already in)."""
        multiple = self.learner.backbone.length_multiple
        limit = self.learner.backbone.config.max_length  # the encoder reads at most this of a row

        def width(row: _Row) -> int:
            return padded(min(len(row.ids), limit), multiple)

        groups: dict[int, deque[int]] = {}  # padded width -> its rows, oldest first
        for k, row in enumerate(pool):
            groups.setdefault(width(row), deque()).append(k)
        sizes = sorted(groups)
        top = sizes.index(width(pool[0]))  # the pass's width, as an index
        taken = [groups[sizes[top]].popleft()]  # the oldest row
        budget = self.batch_max_tokens
        while (rows := len(taken)) < self._max_rows_per_pass:
            width = sizes[top]
            left = next((i for i in range(top, -1, -1) if groups[sizes[i]]), None)
            right = next((i for i in range(top + 1, len(sizes)) if groups[sizes[i]]), None)
            shorter = width - sizes[left] if left is not None and (rows + 1) * width <= budget else None
            longer = ((sizes[right] - width) * rows
                      if right is not None and (rows + 1) * sizes[right] <= budget else None)
            if shorter is None and longer is None:
                break
            if longer is None or (shorter is not None and shorter <= longer):
                taken.append(groups[sizes[left]].popleft())
            else:
                taken.append(groups[sizes[right]].popleft())
                top = right
        return [pool[k] for k in taken]

    def _run_pass(self, rows: list["_Row"]) -> None:
        """One forward pass over `rows`, whatever tasks they name; rows without a task are
        routed inside it. Requests are re-checked first: a task deleted since a request was
        accepted no longer answers."""
        start = time.perf_counter()
        requests = list({id(r.request): r.request for r in rows}.values())
        with self._model_lock:
            known = self.learner.tasks
            for request in requests:
                missing = [t for t in request.tasks if t is not None and t not in known]
                listed = [t for t in self._served if request.among is None or t in request.among]
                if missing:
                    self._fail([request], UnknownTask(f"unknown task {missing[0]!r}; known: {listed}"))
                elif not listed and None in request.tasks:
                    self._fail([request], PredictionRefused("no task given and no task learned yet"))
            rows = [r for r in rows if not r.request.failed]
            if not rows:
                return
            # One pass serves requests that ask for different top_k: rank for the largest, and
            # state each row as its request asks (`restate`, below). Requests asking for a
            # joint decision over a different number of candidates get a pass each.
            answers: list = [None] * len(rows)
            try:
                for joint_k in sorted({r.request.answer.joint_k for r in rows}):
                    part = [i for i, r in enumerate(rows) if r.request.answer.joint_k == joint_k]
                    for i, answer in zip(part, self._predict_rows([rows[i] for i in part], joint_k)):
                        answers[i] = answer
            except (ValueError, KeyError) as exc:
                message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
                error_type = UnknownTask if isinstance(exc, KeyError) else PredictionRefused
                self._fail(requests, error_type(message))
                return
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_requests.observe(len(requests))
        self.metrics.batch_rows.observe(len(rows))
        for row, answer in zip(rows, answers):
            request = row.request
            request.results[row.index] = request.answer.restate(answer)
            request.left -= 1
            if request.left == 0:
                request.loop.call_soon_threadsafe(_settle, request.future, request.results)

    def _predict_rows(self, rows: list[_Row], joint_k: int) -> list["Prediction"]:
        """The learner's predictions for `rows`, one forward pass, routed rows ranked for the
        largest number of candidates any of their requests needs."""
        among = [r.request.among for r in rows]
        return self.learner.predict_ids(
            [r.ids for r in rows], task=[r.request.tasks[r.index] for r in rows],
            among=None if all(a is None for a in among) else among,
            top_k=max(r.request.answer.candidates_needed for r in rows), joint_k=joint_k,
            hand_back_memory=False)

    @staticmethod
    def _fail(requests, error: BaseException) -> None:
        for request in requests:
            if not request.failed:
                request.failed = True
                request.loop.call_soon_threadsafe(_settle, request.future, None, error)

    # -- changing the model --------------------------------------------------------------------
    def add_task(self, record: "TaskRecord", tensors: dict[str, "torch.Tensor"],
                 shared_increment: dict[str, "torch.Tensor"] | None = None) -> None:
        """Add a task trained elsewhere; it is served once it is saved to `model_dir`.

        `shared_increment` is what the task adds to the router's shared statistics; adding it
        changes where task-free inputs are routed (that is the point), never the predictions
        for a named task.
        """
        with self._write_lock:
            with self._model_lock:  # new entries, plus one addition to the router's statistics
                self.learner.import_task(record, tensors, shared_increment)
            try:
                self._prepare(self.learner)  # outside the model lock; saved for the readers
                self.learner.save(self.model_dir, self.keep_versions, router_solution=True)
            except BaseException as exc:
                with self._model_lock:
                    self.learner.delete(record.name)
                event("model.failed", f"adding task {record.name!r} failed", 40,
                      tasks=[record.name], error=f"{type(exc).__name__}: {exc}")
                raise
            self._publish()
            event("model.learned", f"task {record.name!r} added", tasks=[record.name])

    def delete_task(self, name: str, sees: Callable[[str], bool] | None = None,
                    texts: Sequence[str] | None = None) -> None:
        """Stop answering for `name` at once, remove its state and save; undone if saving fails.

        With the task's training `texts`, their share of the router's shared statistics goes
        too (`ContinualLearner.delete`); texts that are not the task's raise ValueError and
        nothing changes."""
        with self._write_lock:
            self.check_tasks([name], sees)
            order = list(self.learner.tasks)
            record, tensors = self.learner.task_state(name)
            router = self.learner.router
            # Taken for every delete: re-importing the task alone would put its class last.
            router_before = router.snapshot() if router is not None else None
            served = self._served
            self._served = tuple(t for t in served if t != name)
            try:
                with self._model_lock:  # the texts' trunk pass shares the backbone with predictions
                    self.learner.delete(name, texts)
            except BaseException:  # checked before anything changed: the task answers again
                self._served = served
                raise
            try:
                self._prepare(self.learner)  # outside the model lock; saved for the readers
                self.learner.save(self.model_dir, self.keep_versions, router_solution=True)
            except BaseException:
                with self._model_lock:
                    self.learner.import_task(record, tensors)
                    if router_before is not None:  # the shared statistics, as they were
                        router.restore(router_before)
                    restored = self.learner.tasks
                    self.learner.tasks = {t: restored[t] for t in order}
                self._publish()
                event("model.failed", f"deleting task {name!r} failed", 40, tasks=[name])
                raise
            self._publish()
            self.metrics.predictions.remove(name)
            event("model.deleted", f"task {name!r} deleted", tasks=[name])

    def rollback(self, version: int) -> int:
        """Serve `version` of the model directory again, as its new current version (returned)."""
        from ..io import checkpoint, versions

        with self._write_lock:
            # Built completely before anything changes; a failure leaves the served model as it was.
            learner = self._built(checkpoint.read(self.model_dir, version))
            number = versions.rollback(self.model_dir, version)
            if self.keep_versions is not None:
                versions.prune(self.model_dir, self.keep_versions)
            self._swap(learner, number)
            event("model.rolled_back", f"rolled back to version {version} as version {number}",
                  tasks=list(learner.tasks), version=number)
            return number

    # -- following a writer (a reader replica) -------------------------------------------------
    def _follow_forever(self) -> None:
        while not self._stopping.wait(self.follow_interval_s):
            try:
                self._follow()
            except Exception as exc:  # e.g. a version pruned while being read: next look retries
                event("model.reload_failed", f"loading the new version of {self.model_dir} failed; "
                      "retrying", 30, error=f"{type(exc).__name__}: {exc}")

    def _follow(self) -> bool:
        """Serve the directory's current version if it is not the one served; True if it was
        swapped in. The new learner is built and warmed up beside the live one, then swapped in
        between two forward passes: no request waits for the load or fails because of it."""
        from ..io import checkpoint

        number = checkpoint.read_manifest(self.model_dir).get("version", 0)
        if number == self.version:
            return False
        started = time.perf_counter()
        self._swap(self._built(checkpoint.read(self.model_dir, number)), number)
        event("model.reloaded", f"serving version {number} of {self.model_dir}",
              tasks=list(self._served), version=number,
              load_s=round(time.perf_counter() - started, 3))
        return True

    def _built(self, saved) -> "ContinualLearner":
        """A learner for `saved` like the live one, with the first prediction's one-off work
        (the router's solution, the bf16 weights) done, so it answers at full speed at once."""
        from ..learner import ContinualLearner

        learner = ContinualLearner.from_state(saved, str(self.learner.device))
        learner.precision = self.learner.precision
        self._prepare(learner)
        if learner.tasks:
            learner.predict(["warm-up"], task=next(iter(learner.tasks)))
        return learner

    @staticmethod
    def _prepare(learner: "ContinualLearner") -> None:
        """Solve the router now, outside the model lock, not in the first routed request's
        forward pass (seconds at 2048 features); a no-op when the saved model carried it."""
        if learner.router is not None:
            learner.router.prepare()

    def _swap(self, learner: "ContinualLearner", version: int) -> None:
        with self._model_lock, self._view_lock:  # between two forward passes
            old, self.learner = self.learner, learner
            self._served, self.version = tuple(learner.tasks), version
        self._publish()
        for name in set(old.tasks) - set(learner.tasks):
            self.metrics.predictions.remove(name)

    def _publish(self) -> None:
        from ..io.versions import current_version

        version = current_version(self.model_dir) if (self.model_dir / "manifest.json").is_file() else None
        with self._view_lock:
            self._served, self.version = tuple(self.learner.tasks), version
        self.metrics.tasks_loaded.set(len(self._served))
        for name in self._served:  # every served task has a series, from 0
            self.metrics.predictions.labels(name)

