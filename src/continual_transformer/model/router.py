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

Lexical evidence (`lexical_router.py`): per task, a naive Bayes over the hashed token n-grams of
its training texts (the same rows as the statistics; its own, deleted with it). A text's mean
log-likelihood per n-gram under each task (one scale for a tweet and a long document) is added to
the decision scores with one weight, chosen among `LEXICAL_WEIGHTS` as the one whose tempered
probabilities give the calibration samples the least negative log-likelihood (0, words ignored,
is a choice), and the temperature is fitted on the sum. Measured at 100 overlapping tasks
(benchmarks/routing_scale.py; README, "Task-free prediction"): the trunk alone routes 59.3 % of test texts
right; choosing the weight by right routes on raw log-likelihood sums reached 64.6 % but left the
calibration error at 0.064 (the sums grow with a text's length, so one temperature cannot fit
short and long texts); the per-n-gram mean with the weight chosen by likelihood routes 63.7 %
at 0.036. A task that holds no counts (saved before the router read words, or learned on a
federated client, whose words stay there) turns the evidence off for the whole router
(weight 0), so old models route exactly as before.

The words are the encoder's ids (its first `max_length` tokens, a word the vocabulary lacks as
the one unknown token). Measured and left out: reading the whole text's ids instead, each such
word kept apart (`Backbone.tokenize_whole`, as lexical branches read them; held-out texts' ids
cut at 512), with the same trunk features and heads. Routing at 100 tasks 63.82 % against
63.70 %; task-free ACC on seven tasks in other scripts 54.46 against 54.19, on sixteen in
Latin and Cyrillic languages 56.72 against 56.99, on the bundled stream 76.48 against 76.49, on
the long-document stream 97.31 both; and up to 13 KB more a task for the held-out texts' ids.

The classes are tasks, not (task, label) pairs. Measured and left out (2026-12-07, the trunk
features of benchmarks/routing_scale.py, trunk alone, routing at 10 / 25 / 50 / 100 tasks):
one class per task 94.33 / 83.67 / 70.60 / 59.90; one per (task, label), a task scored by the
largest or the log-sum-exp of its labels' scores, 93.00 / 76.40 / 64.80-64.90 / 54.95-54.97;
the tasks' shared covariance with the labels' means, 94.50 / 77.47 / 63.53 / 53.75. Labels'
means are noisier (fewer texts each) and tell labels apart, not tasks.
"""

from __future__ import annotations

import hashlib
from typing import Collection, Sequence

import torch

from .calibration import fit_confidence_map, fit_temperature, map_confidence, negative_log_likelihood
from .closed_form import AnalyticClassifier
from .lexical_router import PREFIX as LEXICAL_PREFIX
from .lexical_router import MAX_COLUMNS as LEXICAL_COLUMNS
from .lexical_router import LexicalRouter

PREFIX = "router."
SOLUTION = PREFIX + "solution."  # saved shared tensors: the solved router, not statistics
CALIBRATION = PREFIX + "calibration"  # a task's held-out features (m, H) float32
TEMPERATURE = SOLUTION + "temperature"
CONFIDENCE_MAP = SOLUTION + "confidence_map"  # (a, b): see calibration.fit_confidence_map
LEXICAL_WEIGHT = SOLUTION + "lexical_weight"  # what the words' log-likelihoods are multiplied by
# A task's held-out texts' token ids, concatenated (int32), and each text's length (int32).
CALIBRATION_IDS = PREFIX + "calibration_ids"
CALIBRATION_LENGTHS = PREFIX + "calibration_lengths"
# SHA-256 of the trunk features a task's training texts gave the router (uint8, 32): what lets
# `remove` take exactly their share out of the shared statistics, given those texts again.
FINGERPRINT = PREFIX + "fingerprint"
LEXICAL_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
LEXICAL_ALPHA = 0.1  # the words' naive Bayes smoothing, by default
PREDICT_ROWS = 2048
# Held out of each task's statistics for calibration: at most this many rows, and at most a
# fifth of the task's rows (a task of fewer than 5 texts holds none out).
CALIBRATION_ROWS = 32


def fingerprint(features: torch.Tensor, hold_out: bool) -> bytes:
    """SHA-256 of trunk features (n, H) as float32, their shape and whether rows are held out."""
    rows = features.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(f"{tuple(rows.shape)} {hold_out}".encode())
    digest.update(rows.numpy().tobytes())
    return digest.digest()


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
                 shrinkage: float | None = None, seed: int = 0, lexical_alpha: float | None = LEXICAL_ALPHA,
                 lexical_columns: int = LEXICAL_COLUMNS, skip: frozenset[int] = frozenset()):
        """`lexical_alpha`: the naive Bayes smoothing of the lexical evidence (None: no lexical
        evidence); `lexical_columns`: the most n-gram columns a task keeps; `skip`: token ids
        the words never include (the tokenizer's special ids)."""
        self.classifier = AnalyticClassifier(in_dim=in_dim, n_features=n_features, solver=solver,
                                             shrinkage=shrinkage, seed=seed)
        self.lexical = (LexicalRouter(alpha=lexical_alpha, max_columns=lexical_columns)
                        if lexical_alpha is not None else None)
        self.skip = frozenset(skip)
        self.samples_: dict[str, torch.Tensor] = {}  # task -> held-out features (m, H) float32
        self.sample_ids_: dict[str, list[list[int]]] = {}  # task -> held-out texts' token ids
        self.fingerprints_: dict[str, bytes] = {}  # task -> `fingerprint` of its features
        # A federated client sets these False: its texts' features and words stay on the
        # client, and its statistics then sum with other clients' to those of all their texts.
        self.hold_out = True
        self.reads_words = True
        self._changed()

    def _changed(self) -> None:
        """Forget what is fitted on the statistics: refitted when first needed."""
        self._weight: float | None = None  # the lexical weight, chosen first
        self._temperature: float | None = None  # then the temperature on the weighted scores
        self._map: tuple[float, float] | None = None  # then the map, after the temperature
        self._parts: tuple | None = None  # the calibration sample's scores, computed once

    def hyperparameters(self) -> dict:
        options = self.classifier.hyperparameters()
        del options["in_dim"]  # a property of the backbone
        options["lexical_alpha"] = self.lexical.alpha if self.lexical is not None else None
        if self.lexical is not None:
            options["lexical_columns"] = self.lexical.max_columns
        return options

    @property
    def tasks(self) -> list[str]:
        return list(self.classifier.classes_)

    def partial_fit(self, features: torch.Tensor, task: str,
                    ids: Sequence[Sequence[int]] | None = None) -> None:
        """Add one task's training features (n, H) and the texts' token `ids` (n rows; None:
        no lexical evidence for this task): most to the statistics, a few (see
        `calibration_rows`) kept as its calibration sample."""
        if ids is not None and len(ids) != len(features):
            raise ValueError(f"task {task!r}: {len(ids)} rows of token ids for {len(features)} feature rows")
        held = calibration_rows(len(features)) if self.hold_out else []
        keep = sorted(set(range(len(features))) - set(held))
        words = self.lexical is not None and self.reads_words and ids is not None
        if words:
            self.lexical.partial_fit([ids[i] for i in keep], task, self.skip)
        self.classifier.partial_fit(features[keep], [task] * len(keep))
        if held:
            self.samples_[task] = features[held].detach().to("cpu", torch.float32).clone()
            if words:
                self.sample_ids_[task] = [list(map(int, ids[i])) for i in held]
        self.fingerprints_[task] = fingerprint(features, self.hold_out)
        self._changed()

    @property
    def lexical_weight(self) -> float:
        """What the words' mean log-likelihoods are multiplied by before they join the decision
        scores (0: words ignored)."""
        if self._weight is None:
            self._weight = self._fit_weight()
        return self._weight

    def _reads_words(self) -> bool:
        """Whether every task holds word counts, and its calibration sample (if any) its ids."""
        if self.lexical is None:
            return False
        return all(t in self.lexical.tasks_ and (t not in self.samples_ or t in self.sample_ids_)
                   for t in self.classifier.classes_)

    def _fit_weight(self) -> float:
        """The weight of `LEXICAL_WEIGHTS` whose sum, divided by its own fitted temperature,
        gives the calibration texts' tasks the least mean negative log-likelihood (the smaller
        weight on a tie); 0 without a calibration sample of at least 2 tasks. Likelihood, not
        right routes: a weight that buys a few routes with overconfident scores is not chosen."""
        if not self._reads_words():
            return 0.0
        sample = self._calibration_sample(weight=0.0)
        if sample is None:
            return 0.0
        scores, truth, words = sample
        losses, temperatures = [], []
        for w in LEXICAL_WEIGHTS:
            summed = scores + w * words
            temperatures.append(fit_temperature(summed, truth))
            losses.append(round(negative_log_likelihood(summed, truth, temperatures[-1]), 9))
        best = losses.index(min(losses))
        if self._temperature is None:  # the chosen sum's temperature: what _fit_temperature fits
            self._temperature = temperatures[best]
        return LEXICAL_WEIGHTS[best]

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
            self._parts = None  # its last use: (S, K) float64 twice, 100 MB at 1,000 tasks
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
        return 1.0 if sample is None else fit_temperature(*sample[:2])

    def _calibration_sample(self, weight: float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The calibration texts' decision scores (S, K) at `weight` (default: the chosen
        one), their tasks (S,), and their words' log-likelihoods (S, K) when words are read."""
        if self._parts is None:
            self._parts = self._calibration_parts()
        if not self._parts:
            return None
        scores, truth, words = self._parts
        weight = self.lexical_weight if weight is None else weight
        if weight:
            scores = scores + weight * words
        return scores, truth, words

    def _calibration_parts(self) -> tuple:
        """`_calibration_sample` at weight 0, computed once per change of the router; () when
        fewer than 2 tasks hold a sample."""
        tasks = [t for t in self.classifier.classes_ if t in self.samples_]
        if len(tasks) < 2 or len(self.classifier.classes_) < 2:
            return ()
        index = {t: i for i, t in enumerate(self.classifier.classes_)}
        truth = torch.tensor([index[t] for t in tasks for _ in range(len(self.samples_[t]))])
        scores = self.classifier.scores(torch.cat([self.samples_[t] for t in tasks]))  # (S, K)
        words = None
        if self._reads_words():
            words = self.lexical.log_likelihoods(
                [row for t in tasks for row in self.sample_ids_[t]], self.skip,
                self.classifier.classes_, mean=True).to(scores.dtype)  # (S, K)
        return scores, truth, words

    def _fit_map(self) -> tuple[float, float]:
        sample = self._calibration_sample()
        if sample is None:
            return 1.0, 0.0
        scores, truth, _ = sample
        confidence, chosen = torch.softmax(scores.double() / self.temperature, dim=1).max(1)
        return fit_confidence_map(confidence, chosen == truth)

    def predict(self, features: torch.Tensor,
                among: Sequence[Collection[str] | None] | None = None,
                ids: Sequence[Sequence[int]] | None = None) -> list[str]:
        """The most likely task per row (n, H) -> n names; `among` (one entry per row, None:
        every task) limits a row to some tasks: a caller that may see only those. `ids`: the
        rows' token ids, needed when the router weighs words (`lexical_weight` > 0)."""
        return [name for name, _ in self.choose(features, among, ids)]

    def choose(self, features: torch.Tensor,
               among: Sequence[Collection[str] | None] | None = None,
               ids: Sequence[Sequence[int]] | None = None) -> list[tuple[str, float]]:
        """`predict`'s task per row with its (calibrated) probability among the tasks the row
        may go to."""
        return [ranked[0] for ranked in self.rank(features, among, 1, ids)]

    def rank(self, features: torch.Tensor, among: Sequence[Collection[str] | None] | None = None,
             k: int = 1, ids: Sequence[Sequence[int]] | None = None) -> list[list[tuple[str, float]]]:
        """Per row (n, H), its `k` most likely tasks, most likely first, with their calibrated
        probabilities among the tasks the row may go to (fewer when fewer are allowed).
        `ids`: the rows' token ids, needed when the router weighs words."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k!r}")
        if len(self.classifier.classes_) == 1:
            return [[(self.classifier.classes_[0], 1.0)]] * len(features)
        weight = self.lexical_weight
        if weight and ids is None:
            raise ValueError(f"this router weighs the texts' words (lexical weight {weight}); "
                             "pass their token ids (`ids`)")
        if ids is not None and len(ids) != len(features):
            raise ValueError(f"{len(ids)} rows of token ids for {len(features)} feature rows")
        out = []
        for start in range(0, len(features), PREDICT_ROWS):  # expanded rows: float64, 16 KiB each
            scores = self.classifier.scores(
                features[start : start + PREDICT_ROWS],
                None if among is None else among[start : start + PREDICT_ROWS])  # (n, K)
            if weight:  # -inf (a task not allowed) stays -inf
                scores = scores + weight * self.lexical.log_likelihoods(
                    ids[start : start + PREDICT_ROWS], self.skip,
                    self.classifier.classes_, mean=True).to(scores.dtype)  # (n, K)
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
            # fitted now too (the lexical weight first), not in the first request
            self._temperature = self.temperature
            self._map = self.confidence_map

    def solution_tensors(self) -> dict[str, torch.Tensor]:
        """The solved router (solved now if need be), to save beside its statistics: a model
        loaded with it routes at once and exactly as the one that saved it."""
        if len(self.classifier.classes_) < 2:
            return {}
        return {**{SOLUTION + k: v for k, v in self.classifier.solution_state().items()},
                LEXICAL_WEIGHT: torch.tensor([self.lexical_weight], dtype=torch.float64),
                TEMPERATURE: torch.tensor([self.temperature], dtype=torch.float64),
                CONFIDENCE_MAP: torch.tensor(self.confidence_map, dtype=torch.float64)}

    def load_solution_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install `solution_tensors()` saved with the statistics now loaded (a solution saved
        before calibration has no temperature, one saved before words were read no lexical
        weight: they are fitted on first use)."""
        tensors = dict(tensors)
        weight = tensors.pop(LEXICAL_WEIGHT, None)
        temperature = tensors.pop(TEMPERATURE, None)
        confidence_map = tensors.pop(CONFIDENCE_MAP, None)
        self.classifier.load_solution_state({k[len(SOLUTION):]: v for k, v in tensors.items()})
        self._parts = None  # scored by the solution now installed
        if weight is not None:
            if weight.shape != (1,) or not float(weight[0]) >= 0:
                raise ValueError(f"solution 'lexical_weight' is {weight.tolist()}, expected one number >= 0")
            if float(weight[0]) and not self._reads_words():
                raise ValueError(f"solution 'lexical_weight' is {float(weight[0])}, but not every "
                                 "task holds word counts")
            self._weight = float(weight[0])
        if temperature is not None:
            if temperature.shape != (1,) or not float(temperature[0]) > 0:
                raise ValueError(f"solution 'temperature' is {temperature.tolist()}, expected one number > 0")
            self._temperature = float(temperature[0])
        if confidence_map is not None:
            if confidence_map.shape != (2,) or not float(confidence_map[0]) > 0:
                raise ValueError(f"solution 'confidence_map' is {confidence_map.tolist()}, "
                                 "expected (a, b) with a > 0")
            self._map = (float(confidence_map[0]), float(confidence_map[1]))

    def check_forget(self, task: str, features: torch.Tensor) -> None:
        """Raise ValueError unless `features` (n, H) are the very rows `task` was learned from
        here, so that `remove(task, features)` takes out exactly what they added."""
        if task not in self.classifier.classes_:
            raise ValueError(f"the router does not know task {task!r}; known: {self.tasks}")
        known = self.fingerprints_.get(task)
        if known is None:
            raise ValueError(
                f"task {task!r} has no fingerprint of the features it added to the router (it "
                "was saved before fingerprints, or its statistics came from federated clients): "
                "it can be deleted only without its texts, its rows staying as background data")
        if fingerprint(features, self.hold_out) != known:
            raise ValueError(
                f"the {len(features)} texts given are not the ones task {task!r} was learned "
                "from, in the same order, on this backbone and precision (the fingerprint of "
                "their trunk features differs): nothing was deleted")

    def remove(self, task: str, features: torch.Tensor | None = None) -> None:
        """Remove everything of `task`. Given the features its training texts gave the router
        (checked by `check_forget`), their share of the shared statistics goes too: the router
        is then the one that never learned the task, to float64 rounding; without them, those
        rows stay in the shared statistics as background data."""
        if features is not None:
            self.check_forget(task, features)
            held = set(calibration_rows(len(features)) if self.hold_out else [])
            keep = [i for i in range(len(features)) if i not in held]
            self.classifier.remove_classes([task], features[keep])
        elif task in self.classifier.classes_:
            self.classifier.remove_classes([task])
        self.samples_.pop(task, None)
        self.sample_ids_.pop(task, None)
        self.fingerprints_.pop(task, None)
        if self.lexical is not None:
            self.lexical.remove(task)
        self._changed()

    def task_tensors(self, task: str) -> dict[str, torch.Tensor]:
        tensors = {PREFIX + k: v for k, v in self.classifier.class_state([task]).items()}
        if task in self.samples_:
            tensors[CALIBRATION] = self.samples_[task].clone()
        if task in self.sample_ids_:
            rows = self.sample_ids_[task]
            tensors[CALIBRATION_IDS] = torch.tensor([t for row in rows for t in row], dtype=torch.int32)
            tensors[CALIBRATION_LENGTHS] = torch.tensor([len(row) for row in rows], dtype=torch.int32)
        if self.lexical is not None and task in self.lexical.tasks_:
            tensors.update(self.lexical.task_tensors(task))
        if task in self.fingerprints_:
            tensors[FINGERPRINT] = torch.frombuffer(bytearray(self.fingerprints_[task]), dtype=torch.uint8)
        return tensors

    def load_task_tensors(self, task: str, tensors: dict[str, torch.Tensor]) -> None:
        mine = (CALIBRATION, CALIBRATION_IDS, CALIBRATION_LENGTHS, FINGERPRINT)
        digest = tensors.get(FINGERPRINT)
        if digest is not None and (digest.dtype != torch.uint8 or tuple(digest.shape) != (32,)):
            raise ValueError(f"router fingerprint of task {task!r} is {digest.dtype} "
                             f"{tuple(digest.shape)}, expected uint8 (32,)")
        state = {k[len(PREFIX):]: v for k, v in tensors.items()
                 if k.startswith(PREFIX) and k not in mine and not k.startswith(LEXICAL_PREFIX)}
        sample = tensors.get(CALIBRATION)
        if sample is not None and (sample.dtype != torch.float32 or sample.ndim != 2
                                   or sample.shape[1] != self.classifier.in_dim):
            raise ValueError(f"router calibration sample of task {task!r} is {sample.dtype} "
                             f"{tuple(sample.shape)}, expected float32 (m, {self.classifier.in_dim})")
        sample_ids = None
        if CALIBRATION_IDS in tensors:
            flat, lengths = tensors[CALIBRATION_IDS], tensors.get(CALIBRATION_LENGTHS)
            if (lengths is None or flat.dtype != torch.int32 or lengths.dtype != torch.int32
                    or sample is None or len(lengths) != len(sample)
                    or int(lengths.sum()) != len(flat) or bool((lengths < 0).any())):
                raise ValueError(
                    f"router calibration ids of task {task!r}: {flat.dtype} {tuple(flat.shape)} with "
                    f"lengths {None if lengths is None else tuple(lengths.shape)}; expected int32 ids "
                    f"and one int32 length per calibration row ({0 if sample is None else len(sample)}) "
                    "summing to the ids' count")
            bounds = [0, *torch.cumsum(lengths, 0).tolist()]
            sample_ids = [flat[a:b].tolist() for a, b in zip(bounds, bounds[1:])]
        words = {k: v for k, v in tensors.items() if k.startswith(LEXICAL_PREFIX)}
        lexical_before = dict(self.lexical.tasks_) if self.lexical is not None else None
        if words and self.lexical is not None:
            self.lexical.load_task_tensors(task, words)
        try:
            self.classifier.load_class_state([task], state)
        except BaseException:
            if lexical_before is not None:
                self.lexical.tasks_ = lexical_before
            raise
        if sample is not None:
            self.samples_[task] = sample.clone()
        if sample_ids is not None:
            self.sample_ids_[task] = sample_ids
        if digest is not None:
            self.fingerprints_[task] = bytes(digest.tolist())
        self._changed()

    def shared_tensors(self) -> dict[str, torch.Tensor]:
        return {PREFIX + k: v for k, v in self.classifier.shared_state().items()}

    def load_shared_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        state = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        self.classifier.load_shared_state(state)
        self._changed()

    def add_shared_tensors(self, increment: dict[str, torch.Tensor]) -> None:
        """Add shared statistics gathered elsewhere (by a router that saw only new data)."""
        state = {k[len(PREFIX):]: v for k, v in increment.items() if k.startswith(PREFIX)}
        self.classifier.add_shared_state(state)
        self._changed()

    def snapshot(self) -> tuple:
        """Everything `restore` needs to undo later changes (copies)."""
        words = dict(self.lexical.tasks_) if self.lexical is not None else None
        return (self.classifier.snapshot(), dict(self.samples_), dict(self.sample_ids_), words,
                dict(self.fingerprints_))

    def restore(self, snapshot: tuple) -> None:
        classifier, samples, sample_ids, words, fingerprints = snapshot
        self.classifier.restore(classifier)
        self.samples_, self.sample_ids_ = dict(samples), dict(sample_ids)
        self.fingerprints_ = dict(fingerprints)
        if self.lexical is not None:
            self.lexical.tasks_ = dict(words)
        self._changed()

    def state_numbers(self) -> dict[str, int]:
        """Numbers held: shared (the Gram matrix) and per task (its statistics, float64),
        besides which a task holds at most `CALIBRATION_ROWS` x H float32 sample numbers."""
        return self.classifier.state_numbers()

    def task_bytes(self, task: str | None = None) -> int:
        """Bytes `task` holds here: statistics (float64), its sample (float32), its words
        (counts and the sample's ids), its fingerprint (32); without a task (or one not held),
        the most a task can hold but for its words, which follow its vocabulary."""
        sample = (self.samples_[task].numel() if task in self.samples_ else
                  0 if task in self.classifier.classes_ else CALIBRATION_ROWS * self.classifier.in_dim)
        digest = (len(self.fingerprints_.get(task, b"")) if task in self.classifier.classes_
                  else 32)
        return (8 * self.classifier.state_numbers()["per_class"] + 4 * sample
                + self._word_bytes(task) + digest)

    def _word_bytes(self, task: str | None) -> int:
        rows = self.sample_ids_.get(task, [])
        counts = self.lexical.nbytes(task) if self.lexical is not None and task in self.lexical.tasks_ else 0
        return counts + 4 * (sum(map(len, rows)) + len(rows))

    def nbytes(self) -> dict[str, int]:
        """Bytes held now: shared, and per task (statistics float64, sample float32, words)."""
        c = self.classifier
        per_task = {t: 8 * (c.dim + 1) + (self.samples_[t].numel() * 4 if t in self.samples_ else 0)
                    + self._word_bytes(t) + len(self.fingerprints_.get(t, b"")) for t in c.classes_}
        return {"shared": c.gram_upper_.numel() * 8, "tasks": sum(per_task.values()),
                "per_task_max": max(per_task.values(), default=0)}
