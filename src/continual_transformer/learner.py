"""`ContinualLearner`: one frozen backbone that learns tasks one after another.

    learner = ContinualLearner()                      # MiniLM-L6, method "ia3"
    for task in load_stream("stream.jsonl"):
        learner.learn(task)
    learner.predict(["the match ended 2-1"], task="news")
    learner.save("model/"); ContinualLearner.load("model/")
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Collection, Sequence

import torch

from .config import BackboneConfig, LearnerSpec, TrainConfig
from .io import checkpoint
from .io.checkpoint import SavedModel, SavedTask
from .io.store import CheckpointError
from .methods import GradientMethod, Method, make_method
from .methods.base import task_seed
from .model.adapted import AdaptedModel
from .model.backbone import Backbone, BackboneError, masked_mean
from .model.batching import collated
from .model.joint_decision import joint_logits
from .model.router import SOLUTION as ROUTER_SOLUTION
from .model.router import LEXICAL_ALPHA, LEXICAL_COLUMNS
from .model.router import Router
from .model.memory import release_freed_memory, release_freed_memory_at_most_every
from .model.trunk import TrunkStates
from .task_free import TaskFreeAnswer
from .training import distributed
from .training.loop import Checkpointing, Progress
from .training.precision import resolved
from .types import Prediction, Task, TaskRecord, check_task_name


# Seconds between hand-backs of freed memory while predicting (see model/memory.py): a
# hand-back takes ~5 ms, so this bounds its cost to 5 %; 32-text predictions hand back each time.
RELEASE_SECONDS = 0.1


class ContinualLearner:
    """A frozen backbone, per-task state owned by a method, and predict/evaluate/save/load."""

    def __init__(
        self,
        backbone: str | BackboneConfig | Backbone = "default",
        *,
        method: str | Method = "ia3",
        train: TrainConfig | None = None,
        device: str | None = None,
        router: dict | None = None,
    ):
        if isinstance(backbone, Backbone):
            self.backbone = backbone
        else:
            config = backbone if isinstance(backbone, BackboneConfig) else BackboneConfig(backbone)
            self.backbone = Backbone.load(config, device)
        if isinstance(method, str):
            method = make_method(method, {"train": train.to_dict()} if train else None)
        elif train is not None:
            raise ValueError("pass `train` only with a method name, not with a Method object")
        if train is not None and not isinstance(method, GradientMethod):
            raise ValueError(f"method {method.name!r} is not trained by gradient; `train` does not apply")
        self.method = method
        self.backbone_parameters = self.backbone.num_parameters()
        # The top layers carry the tasks' scale vectors; the trunk below them is shared.
        # The method learns on this model and sees nothing else of the learner.
        self.model = AdaptedModel(self.backbone, method.resolve_adapt_layers(self.backbone.num_layers))
        # Methods that classify over all tasks' labels route themselves; the others get a router.
        self.router = None if method.routes_itself else self._new_router(router or {})
        self.tasks: dict[str, TaskRecord] = {}
        # Predictions compute as training does (`--precision` of a run covers both);
        # `load` and callers may set another.
        self.precision = method.train.precision if isinstance(method, GradientMethod) else "auto"

    @property
    def precision(self) -> str:
        """The precision predictions run in unless a call says otherwise: "auto" (bfloat16
        where the hardware computes it natively, float32 elsewhere), "fp32" or "bf16". The same
        model, precision and input give the same answers bit for bit."""
        return self._precision

    @precision.setter
    def precision(self, value: str) -> None:
        resolved(value, self.device)  # checks the name
        self._precision = value

    def prediction_precision(self, precision: str | None = None) -> str:
        """"fp32" or "bf16": what `precision` (default: this learner's) means here."""
        return resolved(self.precision if precision is None else precision, self.device)

    # -- learning ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def learn(
        self, task: Task, progress: Progress | None = None,
        checkpointing: Checkpointing | None = None,
    ) -> TaskRecord:
        """Learn one task. On any failure the learner is left exactly as it was before.

        With `checkpointing`, a gradient method saves its training state every
        `checkpointing.every` steps and, given `checkpointing.resume_from`, continues from it.
        """
        check_task_name(task.name)
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} is already learned; delete it first")
        _check_task(task)
        if self.method.learns_jointly:
            raise ValueError(
                f"method {self.method.name!r} learns all tasks at once, not one after another: "
                "use ContinualLearner.learn_jointly(tasks) (`ctt run --method joint` does)")
        self._check_data_parallel()
        resumed = checkpointing.resume_from if checkpointing else None
        start = time.perf_counter() - (resumed.seconds if resumed else 0.0)
        try:
            ids = self.backbone.tokenize([e.text for e in task.train])
            with self.model.training_kernels():
                states = self.trunk_states(ids)
                stats = self.method.learn(self.model, task, states, progress, checkpointing)
            stats["trunk_cache"] = {"texts": len(states), "stored": states.stored,
                                    "bytes": states.stored_bytes}
            # The stored trunk output and the training activations are garbage now; handing
            # them back before the router's solve keeps the two from adding up.
            states.drop_stored()
            release_freed_memory()
            if self.router is not None:
                self.router.partial_fit(states.features, task.name, ids)
        except BaseException:
            self._undo(task.name)
            raise
        finally:
            states = None
            release_freed_memory()
        adapter_parameters, head_parameters = self.method.footprint(self.model, task.name)
        branch = self.model.lexical.get(task.name)
        record = TaskRecord(
            name=task.name,
            labels=tuple(task.labels),
            learned_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            train_examples=len(task.train),
            train_seconds=round(time.perf_counter() - start, 3),
            adapter_parameters=adapter_parameters,
            head_parameters=head_parameters,
            bytes_added=self.task_bytes(adapter_parameters, head_parameters, task.name)
            + (branch.nbytes() if branch is not None else 0),
            stats=stats,
        )
        self.tasks[task.name] = record
        return record

    def learn_jointly(self, tasks: Sequence[Task], progress: Progress | None = None) -> list[TaskRecord]:
        """Learn all `tasks` at once, for methods that train on their union (`joint`).

        Each task's record gets the share of the training time of its training examples.
        On any failure the learner is left as it was (empty).
        """
        if not self.method.learns_jointly:
            raise ValueError(f"method {self.method.name!r} learns tasks one after another; use learn()")
        if self.tasks:
            raise ValueError(f"joint training starts from an empty model; it knows {list(self.tasks)}")
        names = [t.name for t in tasks]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"joint training needs distinct tasks, got {names}")
        for task in tasks:
            check_task_name(task.name)
            _check_task(task)
        self._check_data_parallel()
        start = time.perf_counter()
        try:
            ids = [row for task in tasks for row in self.backbone.tokenize([e.text for e in task.train])]
            with self.model.training_kernels():
                states = self.trunk_states(ids)
                stats = self.method.learn_jointly(self.model, list(tasks), states, progress)
            if self.router is not None:
                first = 0
                for task in tasks:
                    rows = slice(first, first + len(task.train))
                    self.router.partial_fit(states.features[rows], task.name, ids[rows])
                    first += len(task.train)
        except BaseException:
            for task in tasks:
                self._undo(task.name)
            raise
        seconds = time.perf_counter() - start
        total = sum(len(t.train) for t in tasks)
        learned_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for task in tasks:
            adapter_parameters, head_parameters = self.method.footprint(self.model, task.name)
            self.tasks[task.name] = TaskRecord(
                name=task.name, labels=tuple(task.labels), learned_at=learned_at,
                train_examples=len(task.train),
                train_seconds=round(seconds * len(task.train) / total, 3),
                adapter_parameters=adapter_parameters, head_parameters=head_parameters,
                bytes_added=self.task_bytes(adapter_parameters, head_parameters, task.name),
                stats={**stats, "joint_train_seconds": round(seconds, 3)},
            )
        return [self.tasks[name] for name in names]

    def delete(self, task: str, texts: Sequence[str] | None = None) -> None:
        """Remove a learned task: everything it owns, and what the router knows of it.

        The router's shared statistics keep the task's training rows as background data,
        unless its training `texts` are given (all of them, in the order it learned them):
        then their share goes too, and the router is the one that never learned the task (to
        float64 rounding). The texts are checked first against the fingerprint of what the
        task added; if they differ, a ValueError says so and nothing is deleted."""
        self.require(task)
        features = None
        if texts is not None:
            if self.router is None:
                raise ValueError(f"method {self.method.name!r} has no router to take texts out "
                                 "of; delete the task without them")
            with self.model.training_kernels():  # the pass `learn` made, in its precision
                features = self.trunk_states(self.backbone.tokenize(list(texts)), store=False).features
            self.router.check_forget(task, features)
        self.method.delete(self.model, task)
        if self.router is not None:
            self.router.remove(task, features)
        del self.tasks[task]

    def task_state(self, task: str) -> tuple[TaskRecord, dict[str, torch.Tensor]]:
        """A learned task's record and tensors (CPU copies), as `import_task` takes them back."""
        record = self.require(task)
        return record, self.task_tensors(task)

    def import_task(
        self,
        record: TaskRecord,
        tensors: dict[str, torch.Tensor],
        shared_increment: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a task learned by another learner on the same backbone and method.

        This is how a server learns while it serves: a separate learner (its own copy of the
        frozen backbone and its own adapter entries) trains the task, and only its finished
        tensors come here; nothing another task uses is touched. `shared_increment` is what the
        task added to shared statistics (the router's, and for `analytic` the method's): the
        `shared_tensors()` of a learner that learned only this task, or the sum of several such
        learners' (federated learning). It is added, so the result is bit-identical to learning
        the task here (for a sum of several, equal up to the order of the additions). For
        methods whose tasks own all their learned state (`ia3`) or whose shared state is sums
        of statistics (`analytic`). On failure the learner is left exactly as it was.
        """
        check_task_name(record.name)
        if record.name in self.tasks:
            raise ValueError(f"task {record.name!r} is already learned; delete it first")
        sums = self.method.sums_statistics
        if not sums:
            self._check_isolated()
        router_before = self.router.snapshot() if self.router is not None else None
        shared_before = ({k: v.clone() for k, v in self.method.shared_tensors(self.model).items()}
                         if sums else None)
        try:
            self.load_task_tensors(record, tensors)
            if shared_increment and self.router is not None:
                self.router.add_shared_tensors(shared_increment)
            own = {k: v for k, v in (shared_increment or {}).items() if not k.startswith("router.")}
            if own:
                self.method.add_shared_tensors(self.model, own)
        except BaseException:
            self.method.rollback(self.model, record.name)
            self.tasks.pop(record.name, None)
            if router_before is not None:
                self.router.restore(router_before)
            if shared_before is not None:
                self.method.load_shared_tensors(self.model, shared_before)
            raise

    def take_out(self, task: str) -> "LearnedTask":
        """Remove `task`, the only task this learner holds, and return what `import_task`
        takes to add it to another learner: its record, its tensors and what it added to the
        shared statistics (here, all of them). The learner is left as it was built, so a
        process that learns tasks for another (a server's learning job, a parallel run's
        worker) loads its backbone once and learns the next task from the same start."""
        if list(self.tasks) != [task]:
            raise ValueError(f"take_out needs a learner that holds only task {task!r}; this one "
                             f"holds {list(self.tasks)}")
        self._check_isolated()
        record, tensors = self.task_state(task)
        increment = self.shared_tensors()
        self.delete(task)
        if self.router is not None:  # deleting keeps a task's examples in the shared statistics
            hold_out, reads_words = self.router.hold_out, self.router.reads_words
            self.router = self._new_router(self.router.hyperparameters())
            self.router.hold_out, self.router.reads_words = hold_out, reads_words
        return record, tensors, increment

    # -- the trunk ---------------------------------------------------------------------------
    def trunk_states(self, ids: Sequence[Sequence[int]], store: bool = True) -> TrunkStates:
        """The trunk run once over tokenised texts, in the method's training precision: the
        router's features, and (with `store`, for methods that train) the stored trunk output
        the top trains on. In a data-parallel run the processes share the passes out."""
        return self.model.trunk_states(
            ids, precision=self.method.precision,
            cache_mb=self.method.trunk_cache_mb if store else 0,
            with_features=self.router is not None, parallel=distributed.current())

    def _check_data_parallel(self) -> None:
        if distributed.current() is None:
            return
        why = self.method.data_parallel_refusal()
        if why is not None:
            raise ValueError(f"method {self.method.name!r} cannot learn data-parallel (torchrun): "
                             f"{why}; run it in one process")

    def _new_router(self, options: dict) -> Router:
        """A router of `options` on this backbone; its words skip the tokenizer's special ids."""
        return Router(self.backbone.hidden_size, skip=self.model.special_ids, **options)

    # -- inference ---------------------------------------------------------------------------
    def route(self, features: torch.Tensor, among: Sequence[Collection[str] | None] | None = None,
              ids: Sequence[Sequence[int]] | None = None) -> list[str]:
        """The task the router picks for each row of trunk features (N, H) with its token
        `ids`; `among` (per row, None: any task) limits a row to some tasks."""
        if self.router is None:
            raise ValueError(f"method {self.method.name!r} predicts tasks itself; it has no router")
        if not self.tasks:
            raise ValueError("no task given and no task learned yet")
        return self.router.predict(features, among, ids)

    def row_logits(
        self, batch: dict[str, torch.Tensor], tasks: Sequence[str | None],
        among: Sequence[Collection[str] | None] | None = None, top_k: int = 1,
        ids: Sequence[Sequence[int]] | None = None,
    ) -> tuple[list[str], list[torch.Tensor], list[list[tuple[str, float]] | None]]:
        """Logits per row in one pass, each row under its own task: the trunk runs once for
        all rows, then the top with each row's own scales. Returns each row's task, logits and,
        for a routed row, its `top_k` candidate tasks with their probabilities, the task it was
        routed to first (None: task given).

        Rows whose task is None are routed: the router reads the trunk's pooled output inside
        this pass, before any task-specific layer runs (methods that classify over all tasks'
        labels name the task from the pooled output instead); `among[i]`, when given, is the
        set of tasks row i may be routed to; `ids` are the rows' token ids (the router reads
        their words). Pooling and heads run in float32 whatever the precision the layers run
        in (`AdaptedModel.inference`).
        """
        tasks = list(tasks)
        ranked: list[list[tuple[str, float]] | None] = [None] * len(tasks)
        missing = [i for i, t in enumerate(tasks) if t is None]
        if missing and not self.tasks:
            raise ValueError("no task given and no task learned yet")
        inputs = self.model.trunk(batch)
        limits = None if among is None or not missing else [among[i] for i in missing]
        if self.router is None:  # the method classifies over all tasks on the plain backbone
            pooled = self.model.top_pooled(inputs, [None] * len(tasks), torch.float32)  # (B, H)
            if missing:
                for i, (name, chance) in zip(missing, self.method.infer_tasks(self.model, pooled[missing], limits)):
                    tasks[i], ranked[i] = name, [(name, chance)]
        else:
            if missing:
                features = masked_mean(inputs.hidden.float(), inputs.attention_mask)[missing]  # (M, H)
                words = None if ids is None else [ids[i] for i in missing]
                for i, candidates in zip(missing, self.router.rank(features, limits, top_k, words)):
                    tasks[i], ranked[i] = candidates[0][0], candidates
            pooled = self.model.top_pooled(inputs, [self.method.adapter_key(t) for t in tasks],
                                           torch.float32)
        return tasks, self.head_logits(pooled, tasks), ranked

    def head_logits(self, pooled: torch.Tensor, tasks: list[str]) -> list[torch.Tensor]:
        """The method's head logits for pooled rows (B, H), each under its task, in float32
        whatever precision the encoder ran in."""
        with torch.autocast(self.device.type, enabled=False):
            return self.method.head_logits(self.model, pooled.float(), tasks)

    def _run(self, ids: Sequence[Sequence[int]], row_tasks: list[str | None],
             among: Sequence[Collection[str] | None] | None = None, precision: str | None = None,
             top_k: int = 1, joint_k: int = 1,
             ) -> tuple[list[str], list[torch.Tensor], list[list[tuple[str, float]] | None]]:
        tasks: list[str | None] = list(row_tasks)
        out: list[torch.Tensor | None] = [None] * len(ids)
        chances: list[list[tuple[str, float]] | None] = [None] * len(ids)
        read = self.backbone.encoder_view(ids)  # the encoder's (and router's) part of each row
        with self.model.inference(self.prediction_precision(precision)):
            for rows, batch in collated(self.backbone, read):
                given = [row_tasks[i] for i in rows]
                limits = None if among is None else [among[i] for i in rows]
                batch_read, batch_ids = [read[i] for i in rows], [ids[i] for i in rows]
                if joint_k > 1 and None in given:  # candidates weighed by their heads
                    if self.router is None:
                        raise ValueError(f"method {self.method.name!r} names tasks itself; the "
                                         "joint decision needs a router")
                    resolved, logits, routed = joint_logits(
                        self.model, self.router, self.method.adapter_key, self.head_logits, batch,
                        batch_read, batch_ids, given, limits, joint_k, top_k)
                else:
                    resolved, logits, routed = self.row_logits(batch, given, limits, top_k, batch_read)
                    logits = self.model.fused_logits(resolved, batch_ids, logits)
                for i, name, row, chance in zip(rows, resolved, logits, routed):
                    tasks[i], out[i], chances[i] = name, row.float().cpu(), chance
        return tasks, out, chances  # type: ignore[return-value]

    def logits(self, texts: Sequence[str], task: str | Sequence[str],
               precision: str | None = None) -> list[torch.Tensor]:
        """The scores `predict` takes the softmax of, for each text under its task (one name
        for all, or one per text): the head's logits, fused with the task's lexical branch
        where it has one (`model/lexical.py`)."""
        row_tasks = self._row_tasks(texts, task)
        return self._run(self.backbone.tokenize_whole(list(texts)), row_tasks, precision=precision)[1]

    def predict(
        self, texts: Sequence[str], task: str | Sequence[str | None] | None = None,
        among: Collection[str] | Sequence[Collection[str] | None] | None = None,
        precision: str | None = None, *, top_k: int = 1, min_task_confidence: float | None = None,
        joint_k: int = 1,
    ) -> list[Prediction]:
        """Label and label probabilities for each text.

        `task` is one task name for all texts, one name (or None) per text, or None: texts
        without a task are routed to the task the model predicts for them (the prediction
        gives that task's probability, and its `top_k` candidate tasks with theirs). `among`
        limits routing to some tasks: one collection of task names for all texts, or one (or
        None: any task) per text; it never changes a row whose task is given. A routed row
        whose task probability is below `min_task_confidence` is answered with status
        "ambiguous" and its candidate tasks (at least 2), no task and no label. With `joint_k`
        > 1, a routed row's `joint_k` most likely tasks each answer it and the row goes to the
        one with the highest router probability x head certainty (`model/joint_decision.py`; then the chosen
        task is the first candidate). `precision` ("auto", "fp32", "bf16"; default: the learner's `precision`) is what the
        encoder computes in.
        """
        row_tasks = self._row_tasks(texts, task)
        return self.predict_ids(self.backbone.tokenize_whole(list(texts)), row_tasks, among, precision,
                                top_k=top_k, min_task_confidence=min_task_confidence, joint_k=joint_k)

    def predict_ids(
        self, ids: Sequence[Sequence[int]], task: str | Sequence[str | None] | None = None,
        among: Collection[str] | Sequence[Collection[str] | None] | None = None,
        precision: str | None = None, *, top_k: int = 1, min_task_confidence: float | None = None,
        joint_k: int = 1, hand_back_memory: bool = True,
    ) -> list[Prediction]:
        """`predict` for texts already tokenised by `backbone.tokenize_whole` (the server
        tokenises a request once, to batch it, and predicts from those ids). The encoder and
        the router read each row's `backbone.encoder_view`; lexical branches fitted on whole
        texts read all of it (rows from `backbone.tokenize` give them the encoder's part).
        `hand_back_memory=False`: the caller hands freed memory back itself (the server does
        it when it falls idle: under load, the next pass would take the pages right back)."""
        row_tasks = self._row_tasks(ids, task)
        answer = TaskFreeAnswer(top_k, min_task_confidence, joint_k)
        tasks, logits, ranked = self._run(ids, row_tasks, self._row_among(row_tasks, among), precision,
                                          answer.candidates_needed, joint_k)
        predictions = [answer.prediction(name, self.tasks[name].labels, row, candidates)
                       for name, row, candidates in zip(tasks, logits, ranked)]
        if hand_back_memory:
            release_freed_memory_at_most_every(RELEASE_SECONDS)  # a predicting process stays flat
        return predictions

    def evaluate(self, task: Task, precision: str | None = None) -> float:
        """Accuracy on the task's test examples, with the task given."""
        self.require(task.name)
        if not task.test:
            raise ValueError(f"task {task.name!r} has no test examples")
        predictions = self.predict([e.text for e in task.test], task=task.name, precision=precision)
        return sum(p.label == e.label for p, e in zip(predictions, task.test)) / len(task.test)

    def evaluate_task_free(self, task: Task, precision: str | None = None) -> tuple[float, list[str]]:
        """Accuracy on the task's test examples *without* naming the task (a label counts only
        if the row was routed to this task), and the task each row was routed to."""
        if not task.test:
            raise ValueError(f"task {task.name!r} has no test examples")
        predictions = self.predict([e.text for e in task.test], task=None, precision=precision)
        correct = sum(p.task == task.name and p.label == e.label for p, e in zip(predictions, task.test))
        return correct / len(task.test), [p.task for p in predictions]

    @torch.inference_mode()
    def evaluate_unlearned(self, task: Task) -> float:
        """Test accuracy of the model as it stands *before* learning `task`.

        The task's head is the freshly initialised one that learning would start from, and its
        rows go through the method's current state: this is R[i-1, i] of the accuracy matrix,
        the quantity forward transfer is measured with.
        """
        if task.name in self.tasks:
            raise ValueError(f"task {task.name!r} is already learned")
        probe = _probe_task(self.method, task.name)
        self.model.heads.add(probe, task.labels, _head_seed(self.method, task.name), self.device)
        try:
            ids = self.backbone.tokenize([e.text for e in task.test])
            index = task.label_index()
            correct = 0
            key = self.method.adapter_key(probe)
            if key not in self.model.adapter.entries():
                key = None  # an entry that does not exist yet starts at 1: the plain backbone
            for rows, batch in collated(self.backbone, ids):
                pooled = self.model.top_pooled(self.model.trunk(batch), [key] * len(rows))  # (B, H)
                predicted = self.model.heads(pooled, probe).argmax(-1).tolist()
                correct += sum(p == index[task.test[i].label] for p, i in zip(predicted, rows))
        finally:
            self.model.heads.remove(probe)
        return correct / len(task.test)

    # -- footprint ---------------------------------------------------------------------------
    def footprint(self, task: str) -> dict:
        """Numbers and bytes a task added, also as a share of the backbone.

        Scale vectors and heads are float32; class and routing statistics are float64 sums.
        """
        record = self.require(task)
        adapter, head = record.adapter_parameters, record.head_parameters
        router = self.router.state_numbers()["per_class"] if self.router is not None else 0
        return {
            "adapter_parameters": adapter,
            "head_parameters": head,
            "router_numbers": router,
            "router_bytes": self.router.task_bytes(task) if self.router is not None else 0,
            "lexical_bytes": (self.model.lexical[task].nbytes() if task in self.model.lexical else 0),
            "bytes_added": record.bytes_added,
            "adapter_percent_of_backbone": 100.0 * adapter / self.backbone_parameters,
            "total_percent_of_backbone": 100.0 * (adapter + head) / self.backbone_parameters,
        }

    def shared_state_numbers(self) -> dict:
        """Numbers every task shares (constant in the number of examples): router, method."""
        return {
            "router": self.router.state_numbers()["shared"] if self.router is not None else 0,
            "method": self.method.shared_numbers(self.model),
        }

    # -- checkpoint state --------------------------------------------------------------------
    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        tensors = dict(self.method.task_tensors(self.model, task))
        if self.router is not None:
            tensors.update(self.router.task_tensors(task))
        return tensors

    def load_task_tensors(self, record: TaskRecord, tensors: dict[str, torch.Tensor]) -> None:
        if self.router is not None:
            self.router.load_task_tensors(record.name, tensors)
        own = {k: v for k, v in tensors.items() if not k.startswith("router.")}
        self.method.load_task_tensors(self.model, record.name, record.labels, own)
        self.tasks[record.name] = record

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.method.shared_tensors(self.model))
        if self.router is not None:
            tensors.update(self.router.shared_tensors())
        return tensors

    def load_shared_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.router is not None:
            self.router.load_shared_tensors(tensors)
        self.method.load_shared_tensors(
            self.model, {k: v for k, v in tensors.items() if not k.startswith("router.")})

    # -- building and persistence ---------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: LearnerSpec, *, device: str | None = None,
                  backbone: Backbone | None = None) -> "ContinualLearner":
        """The one factory: a learner built from plain data (`spec()` gives it back). Pass
        `backbone` to reuse one already loaded (it must be the spec's)."""
        method = make_method(spec.method, spec.hyperparameters)
        return cls(backbone if backbone is not None else spec.backbone, method=method,
                   device=device, router=spec.router)

    def spec(self) -> LearnerSpec:
        """What this learner was built from (without its tasks)."""
        return LearnerSpec(
            backbone=self.backbone.config, method=self.method.name,
            hyperparameters=self.method.hyperparameters(),
            router=self.router.hyperparameters() if self.router is not None else None)

    def state(self, router_solution: bool = False) -> SavedModel:
        """Everything learned, as plain data (the checkpoint format writes it); with
        `router_solution`, also the solved router (see `_router_solution`)."""
        return SavedModel(
            backbone={**self.backbone.ref.to_dict(), "config": self.backbone.config.to_dict(),
                      "parameters": self.backbone_parameters},
            method={"name": self.method.name, "hyperparameters": self.method.hyperparameters()},
            router=self.router.hyperparameters() if self.router is not None else None,
            tasks=[SavedTask(record, self.task_tensors(name)) for name, record in self.tasks.items()],
            shared_tensors={**self.shared_tensors(), **(self._router_solution() if router_solution else {})},
            shared_json=self.method.shared_json(self.model),
        )

    @classmethod
    def from_state(cls, saved: SavedModel, device: str | None = None) -> "ContinualLearner":
        """A learner rebuilt from `state()` (or `checkpoint.read`): its backbone is loaded
        from the stored reference and must have the stored weights' hash."""
        backbone = Backbone.load(saved.backbone_config, device)
        _check_backbone(saved, backbone)
        try:
            spec = LearnerSpec(saved.backbone_config, saved.method["name"],
                               saved.method_hyperparameters(backbone.num_layers), saved.router)
            learner = cls.from_spec(spec, backbone=backbone)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{saved.where()}: field 'method.hyperparameters': {exc}") from None
        learner._install(saved)
        return learner

    def load_state(self, saved: SavedModel) -> None:
        """Install `saved`'s tasks in this learner, which must know no tasks yet and have the
        same backbone, method and router settings (a resumed run rebuilds its learner so)."""
        if self.tasks:
            raise ValueError(f"load_state needs a learner without tasks; this one has {list(self.tasks)}")
        _check_backbone(saved, self.backbone)
        stored = {"name": saved.method["name"],
                  "hyperparameters": saved.method_hyperparameters(self.backbone.num_layers)}
        now = {"name": self.method.name, "hyperparameters": self.method.hyperparameters()}
        if json.loads(json.dumps(now)) != stored:
            raise CheckpointError(
                f"{saved.where()}: saved with method {stored['name']!r} {stored['hyperparameters']}, "
                f"but the learner has {now['name']!r} {now['hyperparameters']}"
            )
        router = self.router.hyperparameters() if self.router is not None else None
        stored_router = saved.router
        if stored_router is not None and "lexical_alpha" not in stored_router:
            # saved before the router read words: its tasks hold no counts, so it weighs none
            stored_router = {**stored_router, "lexical_alpha": LEXICAL_ALPHA,
                             "lexical_columns": LEXICAL_COLUMNS}
        if json.loads(json.dumps(router)) != stored_router:
            raise CheckpointError(
                f"{saved.where()}: saved with router {saved.router}, but the learner has {router}")
        self._install(saved)

    def _router_solution(self) -> dict[str, torch.Tensor]:
        """The solved router (solved now if need be), saved so that a loaded model (a reader
        replica, a restart) need not solve it again and routes exactly as the saver does. It is
        derived data, and its last bits depend on the solving process's thread count, so only
        a server saves it (its replicas must agree with it); `ctt run` leaves it out, so that a
        run's files depend only on what it learned. Its columns follow the router's task order,
        which is the saved tasks' order; if they ever differ it is left out (and the loaded
        model solves it itself)."""
        if self.router is None or self.router.tasks != list(self.tasks):
            return {}
        return self.router.solution_tensors()

    def _install(self, saved: SavedModel) -> None:
        shared = dict(saved.shared_tensors)
        solution = {k: shared.pop(k) for k in list(shared) if k.startswith(ROUTER_SOLUTION)}
        try:
            if shared:
                self.load_shared_tensors(shared)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{saved.where(saved.files.get('shared'))}: {exc}") from None
        try:
            if saved.shared_json is not None:
                self.method.load_shared_json(self.model, saved.shared_json)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{saved.where(saved.files.get('shared_json'))}: {exc}") from None
        for task in saved.tasks:
            try:
                self.load_task_tensors(task.record, task.tensors)
            except (KeyError, ValueError) as exc:
                raise CheckpointError(f"{saved.where(task.file)}: {exc}") from None
        try:
            if solution and self.router is not None:  # after the tasks: they reset it
                self.router.load_solution_tensors(solution)
        except ValueError as exc:
            raise CheckpointError(f"{saved.where(saved.files.get('shared'))}: {exc}") from None

    def save(self, directory: str | Path, keep_versions: int | None = None, *,
             router_solution: bool = False) -> Path:
        """Write the model to `directory` (see `io/checkpoint.py`) as a new version; old
        versions' files stay, or, with `keep_versions`, only the newest that many versions
        (`io/versions.prune`). `router_solution`: save the solved router too (`state`)."""
        written = checkpoint.write(Path(directory), self.state(router_solution))
        if keep_versions is not None:
            from .io.versions import prune

            prune(Path(directory), keep_versions)
        return written

    @classmethod
    def load(cls, directory: str | Path, device: str | None = None,
             precision: str = "auto") -> "ContinualLearner":
        """The model saved in `directory`, predicting in `precision` (see `precision`)."""
        learner = cls.from_state(checkpoint.read(Path(directory)), device)
        learner.precision = precision
        return learner

    # -- helpers -----------------------------------------------------------------------------
    def task_bytes(self, adapter_parameters: int, head_parameters: int, task: str | None = None) -> int:
        """A task's own state as stored: float32 scales, the method's head numbers, and the
        router's per-task statistics (float64), calibration sample (float32) and words (counts
        and the sample's token ids)."""
        return (4 * adapter_parameters + self.method.head_number_bytes * head_parameters
                + (self.router.task_bytes(task) if self.router is not None else 0))

    def _check_isolated(self) -> None:
        """Tasks move between learners only for methods whose tasks own all they learn."""
        if self.method.shares_state or self.method.shared_tensors(self.model):
            raise ValueError(
                f"method {self.method.name!r} shares state between tasks; a task learned "
                "elsewhere cannot be imported alone"
            )

    def _undo(self, task: str) -> None:
        """Take back a learn of `task` that did not finish: the method's state and the
        router's statistics of it, as before it began."""
        self.method.rollback(self.model, task)
        if self.router is not None:
            self.router.remove(task)

    def require(self, task: str) -> TaskRecord:
        """The record of a learned task; KeyError naming the known ones otherwise."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known: {list(self.tasks)}")
        return self.tasks[task]

    def _row_among(self, row_tasks: list[str | None], among) -> list[Collection[str] | None] | None:
        """`among` as one entry per row; each routed row must have a learned task to go to."""
        if among is None:
            return None
        if isinstance(among, str):
            raise TypeError("among must be a collection of task names, not one string")
        rows = list(among)
        if not rows or all(isinstance(r, str) for r in rows):  # one collection for every row
            rows = [frozenset(rows)] * len(row_tasks)
        elif len(rows) != len(row_tasks):
            raise ValueError(f"{len(row_tasks)} texts but {len(rows)} entries of 'among'")
        checked: set[int] = set()
        for task, names in zip(row_tasks, rows):
            if task is None and names is not None and id(names) not in checked:
                checked.add(id(names))
                if not any(t in self.tasks for t in names):
                    raise ValueError(f"no learned task to route to among {sorted(names)[:10]}")
        return rows

    def _row_tasks(self, texts: Sequence[str], task: str | Sequence[str | None] | None) -> list[str | None]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        row_tasks = [task] * len(texts) if task is None or isinstance(task, str) else list(task)
        if len(row_tasks) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(row_tasks)} task names")
        for name in dict.fromkeys(row_tasks):
            if name is not None:
                self.require(name)
        return row_tasks


# A task learned apart (`take_out`): its record, its tensors and its increment to the shared
# statistics, as `import_task` takes them.
LearnedTask = tuple[TaskRecord, dict[str, torch.Tensor], dict[str, torch.Tensor]]


def pack_learned(learned: LearnedTask) -> tuple[dict, bytes, bytes]:
    """A task taken out of a learner as plain data and safetensors bytes: what crosses from the
    process that learned it to the one that imports it (`unpack_learned`); nothing pickled."""
    from safetensors.torch import save

    record, tensors, increment = learned
    return record.to_dict(), save(tensors), save(increment)


def unpack_learned(packed: tuple[dict, bytes, bytes]) -> LearnedTask:
    from safetensors.torch import load

    record, tensors, increment = packed
    return TaskRecord.from_dict(record), load(tensors), load(increment)


def _check_backbone(saved: SavedModel, backbone: Backbone) -> None:
    stored = saved.backbone
    if backbone.ref.sha256 != stored["sha256"]:
        raise BackboneError(
            f"{saved.where()}: backbone {stored['name']!r} has SHA-256 {backbone.ref.sha256[:12]}…, "
            f"but this model was trained on {stored['sha256'][:12]}…; refusing to load"
        )


def _check_task(task: Task) -> None:
    if len(task.labels) < 2:
        raise ValueError(f"task {task.name!r} needs at least 2 labels, got {list(task.labels)}")
    if len(set(task.labels)) != len(task.labels):
        raise ValueError(f"task {task.name!r} has duplicate labels {list(task.labels)}")
    known = set(task.labels)
    for i, example in enumerate(task.train):
        if example.label not in known:
            raise ValueError(
                f"task {task.name!r}: train example {i} has label {example.label!r} "
                f"outside {list(task.labels)}"
            )
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples")


def _probe_task(method: Method, task: str) -> str:
    return f"__probe__{task}"


def _head_seed(method: Method, task: str) -> int:
    seed = getattr(getattr(method, "train", None), "seed", 0)
    return task_seed(seed, task)
