"""The router: which task does an input belong to, when the caller does not say?

It classifies the *trunk's* output (the mean over tokens of the layers below the adapted top),
expanded by fixed random features, with a streaming shared-covariance classifier over task ids
(`analytic.AnalyticClassifier`). No task changes the trunk, so the router reads it from the
prediction pass itself: routing costs no extra backbone pass, and the rows of one batch can go
to different tasks in that same pass. A model whose every layer is adapted has an empty trunk:
its router reads the embedding layer.

It learns as tasks arrive, from the trunk features of each task's training texts that learning
computed anyway; its state is constant in the number of examples.

Its probabilities are calibrated (`calibration.py`): of each task's training features, up to
`CALIBRATION_ROWS` are held out of the classifier's statistics and kept as the task's
calibration sample (its own, deleted with it; 49 KB a task at 384 dimensions); one temperature
dividing the decision scores is fitted on all tasks' samples when the router is solved. A task
loaded from a checkpoint written before samples existed has none; with fewer than two tasks
holding one, the temperature is 1 (the raw scores), and `temperature_source` says so.
"""

from __future__ import annotations

from typing import Collection, Sequence

import torch

from .calibration import fit_confidence_map, fit_temperature, map_confidence
from .closed_form import AnalyticClassifier

PREFIX = "router."
SOLUTION = PREFIX + "solution."  # saved shared tensors: the solved router, not statistics
CALIBRATION = PREFIX + "calibration"  # a task's held-out features (m, H) float32
TEMPERATURE = SOLUTION + "temperature"
CONFIDENCE_MAP = SOLUTION + "confidence_map"  # (a, b): see calibration.fit_confidence_map
PREDICT_ROWS = 2048
# Held out of each task's statistics for calibration: at most this many rows, and at most a
# fifth of the task's rows (a task of fewer than 5 texts holds none out).
CALIBRATION_ROWS = 32


def calibration_rows(n: int) -> list[int]:
    """Which of a task's n training rows are held out: evenly spaced, the same in every process."""
    m = min(CALIBRATION_ROWS, n // 5)
    if m == 0:
        return []
    step = n // m
    return [step * i + step - 1 for i in range(m)]


class Router:
    # Measured on the bundled stream (benchmarks/analytic_choices.py): LDA on 2048 random
    # features of the embedding layer routes 95.4% of test inputs right, on the raw 384
    # features 93.4%; on the 3-layer trunk's output, 96.5%.
    def __init__(self, in_dim: int, *, n_features: int = 2048, solver: str = "lda",
                 shrinkage: float | None = None, seed: int = 0):
        self.classifier = AnalyticClassifier(in_dim=in_dim, n_features=n_features, solver=solver,
                                             shrinkage=shrinkage, seed=seed)
        self.samples_: dict[str, torch.Tensor] = {}  # task -> held-out features (m, H) float32
        # A federated client sets this False: its texts' features stay on the client, and its
        # statistics then sum with other clients' to those of all their texts.
        self.hold_out = True
        self._temperature: float | None = None  # fitted when first needed after a change
        self._map: tuple[float, float] | None = None  # likewise, after the temperature

    def hyperparameters(self) -> dict:
        options = self.classifier.hyperparameters()
        del options["in_dim"]  # a property of the backbone
        return options

    @property
    def tasks(self) -> list[str]:
        return list(self.classifier.classes_)

    def partial_fit(self, features: torch.Tensor, task: str) -> None:
        """Add one task's training features (n, H): most to the statistics, a few (see
        `calibration_rows`) kept as its calibration sample."""
        held = calibration_rows(len(features)) if self.hold_out else []
        keep = sorted(set(range(len(features))) - set(held))
        self.classifier.partial_fit(features[keep], [task] * len(keep))
        if held:
            self.samples_[task] = features[held].detach().to("cpu", torch.float32).clone()
        self._temperature = self._map = None

    @property
    def temperature(self) -> float:
        """What the decision scores are divided by before their softmax (1: uncalibrated)."""
        if self._temperature is None:
            self._temperature = self._fit_temperature()
        return self._temperature

    @property
    def confidence_map(self) -> tuple[float, float]:
        """(a, b): the routed task's tempered probability p is stated as sigmoid(a logit(p) + b),
        fitted on the calibration samples' routes; (1, 0) (the identity) when they hold fewer
        than `calibration.MAP_MIN_EACH` right or wrong routes."""
        if self._map is None:
            self._map = self._fit_map()
        return self._map

    @property
    def temperature_source(self) -> str:
        tasks = [t for t in self.classifier.classes_ if t in self.samples_]
        if len(tasks) < 2:
            return "none: fewer than 2 tasks hold a calibration sample; raw scores"
        return (f"fitted on {sum(len(self.samples_[t]) for t in tasks)} held-out training texts "
                f"of {len(tasks)} tasks")

    def _fit_temperature(self) -> float:
        sample = self._calibration_sample()
        return 1.0 if sample is None else fit_temperature(*sample)

    def _calibration_sample(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        tasks = [t for t in self.classifier.classes_ if t in self.samples_]
        if len(tasks) < 2 or len(self.classifier.classes_) < 2:
            return None
        index = {t: i for i, t in enumerate(self.classifier.classes_)}
        truth = torch.tensor([index[t] for t in tasks for _ in range(len(self.samples_[t]))])
        return self.classifier.scores(torch.cat([self.samples_[t] for t in tasks])), truth  # (S, K), (S,)

    def _fit_map(self) -> tuple[float, float]:
        sample = self._calibration_sample()
        if sample is None:
            return 1.0, 0.0
        scores, truth = sample
        confidence, chosen = torch.softmax(scores.double() / self.temperature, dim=1).max(1)
        return fit_confidence_map(confidence, chosen == truth)

    def predict(self, features: torch.Tensor,
                among: Sequence[Collection[str] | None] | None = None) -> list[str]:
        """The most likely task per row (n, H) -> n names; `among` (one entry per row, None:
        every task) limits a row to some tasks: a caller that may see only those."""
        return [name for name, _ in self.choose(features, among)]

    def choose(self, features: torch.Tensor,
               among: Sequence[Collection[str] | None] | None = None) -> list[tuple[str, float]]:
        """`predict`'s task per row with its (calibrated) probability among the tasks the row
        may go to."""
        return [ranked[0] for ranked in self.rank(features, among, 1)]

    def rank(self, features: torch.Tensor, among: Sequence[Collection[str] | None] | None = None,
             k: int = 1) -> list[list[tuple[str, float]]]:
        """Per row (n, H), its `k` most likely tasks, most likely first, with their calibrated
        probabilities among the tasks the row may go to (fewer when fewer are allowed)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if len(self.classifier.classes_) == 1:
            return [[(self.classifier.classes_[0], 1.0)]] * len(features)
        out = []
        for start in range(0, len(features), PREDICT_ROWS):  # expanded rows: float64, 16 KiB each
            scores = self.classifier.scores(
                features[start : start + PREDICT_ROWS],
                None if among is None else among[start : start + PREDICT_ROWS])  # (n, K)
            probs = torch.softmax(scores / self.temperature, dim=1)  # -inf: probability 0
            # Ordered by the scores, not the probabilities: dividing by T cannot reorder them,
            # and a stable sort breaks ties as argmax does, so the first task is exactly the
            # uncalibrated classifier's route.
            top = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]  # (n, k)
            allowed = torch.isfinite(scores).sum(1)
            probs = self._mapped(probs, top[:, 0], allowed > 1)
            allowed = allowed.tolist()
            for row, (indices, n_allowed) in enumerate(zip(top.tolist(), allowed)):
                out.append([(self.classifier.classes_[i], float(probs[row, i]))
                            for i in indices[:n_allowed]])
        return out

    def _mapped(self, probs: torch.Tensor, first: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """`probs` (n, K) with each row's routed task (`first`) stated through the confidence map;
        the other tasks share what is left in their proportions, none above the routed one (the
        sum stays at most 1). Rows with no `choice` (one task allowed) keep probability 1."""
        a, b = self.confidence_map
        if (a, b) == (1.0, 0.0):
            return probs
        rows = torch.arange(len(probs))
        p = probs[rows, first].double()  # (n,)
        q = torch.where(choice, map_confidence(p, a, b), p)
        rest = torch.where(p < 1, (1 - q) / (1 - p).clamp_min(1e-300), torch.zeros_like(p))
        out = torch.minimum(probs.double() * rest[:, None], q[:, None])
        out[rows, first] = q
        return out.to(probs.dtype)

    def prepare(self) -> None:
        """Solve now what the first routed prediction would otherwise solve (seconds at 2048
        features), e.g. before a server swaps this router in."""
        if len(self.classifier.classes_) > 1:
            self.classifier.solution()
            self._temperature = self.temperature  # fitted now too, not in the first request
            self._map = self.confidence_map

    def solution_tensors(self) -> dict[str, torch.Tensor]:
        """The solved router (solved now if need be), to save beside its statistics: a model
        loaded with it routes at once and exactly as the one that saved it."""
        if len(self.classifier.classes_) < 2:
            return {}
        return {**{SOLUTION + k: v for k, v in self.classifier.solution_state().items()},
                TEMPERATURE: torch.tensor([self.temperature], dtype=torch.float64),
                CONFIDENCE_MAP: torch.tensor(self.confidence_map, dtype=torch.float64)}

    def load_solution_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install `solution_tensors()` saved with the statistics now loaded (a solution saved
        before calibration has no temperature: it is fitted on first use)."""
        tensors = dict(tensors)
        temperature = tensors.pop(TEMPERATURE, None)
        confidence_map = tensors.pop(CONFIDENCE_MAP, None)
        self.classifier.load_solution_state({k[len(SOLUTION):]: v for k, v in tensors.items()})
        if temperature is not None:
            if temperature.shape != (1,) or not float(temperature[0]) > 0:
                raise ValueError(f"solution 'temperature' is {temperature.tolist()}, expected one number > 0")
            self._temperature = float(temperature[0])
        if confidence_map is not None:
            if confidence_map.shape != (2,) or not float(confidence_map[0]) > 0:
                raise ValueError(f"solution 'confidence_map' is {confidence_map.tolist()}, "
                                 "expected (a, b) with a > 0")
            self._map = (float(confidence_map[0]), float(confidence_map[1]))
    def remove(self, task: str) -> None:
        if task in self.classifier.classes_:
            self.classifier.remove_classes([task])
        self.samples_.pop(task, None)
        self._temperature = self._map = None

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        tensors = {PREFIX + k: v for k, v in self.classifier.class_state([task]).items()}
        if task in self.samples_:
            tensors[CALIBRATION] = self.samples_[task].clone()
        return tensors

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(PREFIX) and k != CALIBRATION}
        sample = tensors.get(CALIBRATION)
        if sample is not None and (sample.dtype != torch.float32 or sample.ndim != 2
                                   or sample.shape[1] != self.classifier.in_dim):
            raise ValueError(f"router calibration sample of task {task!r} is {sample.dtype} "
                             f"{tuple(sample.shape)}, expected float32 (m, {self.classifier.in_dim})")
        self.classifier.load_class_state([task], state)
        if sample is not None:
            self.samples_[task] = sample.clone()
        self._temperature = self._map = None

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.classifier.shared_state().items()}

    def load_shared_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        self.classifier.load_shared_state(state)
        self._temperature = self._map = None

    def add_shared_tensors(self, increment: dict[str, torch.Tensor]) -> None:
        """Add shared statistics gathered elsewhere (by a router that saw only new data)."""
        state = {k[len(PREFIX):]: v for k, v in increment.items() if k.startswith(PREFIX)}
        self.classifier.add_shared_state(state)
        self._temperature = self._map = None

    def snapshot(self) -> tuple:
        """Everything `restore` needs to undo later changes (copies)."""
        return self.classifier.snapshot(), dict(self.samples_)

    def restore(self, snapshot: tuple) -> None:
        classifier, samples = snapshot
        self.classifier.restore(classifier)
        self.samples_ = dict(samples)
        self._temperature = self._map = None

    def state_numbers(self) -> dict[str, int]:
        """Numbers held: shared (the Gram matrix) and per task (its statistics, float64),
        besides which a task holds at most `CALIBRATION_ROWS` x H float32 sample numbers."""
        return self.classifier.state_numbers()

    def task_bytes(self, task: str | None = None) -> int:
        """Bytes `task` holds here: statistics (float64) and its sample (float32); without a
        task (or one not held), the most a task can hold."""
        sample = (self.samples_[task].numel() if task in self.samples_ else
                  0 if task in self.classifier.classes_ else CALIBRATION_ROWS * self.classifier.in_dim)
        return 8 * self.classifier.state_numbers()["per_class"] + 4 * sample

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: shared, and per task (statistics float64, sample float32)."""
        c = self.classifier
        per_task = {t: 8 * (c.dim + 1) + (self.samples_[t].numel() * 4 if t in self.samples_ else 0)
                    for t in c.classes_}
        return {"shared": c.gram_upper_.numel() * 8, "tasks": sum(per_task.values()),
                "per_task_max": max(per_task.values(), default=0)}
