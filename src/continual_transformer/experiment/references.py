"""Reference rows for `ctt bench`: a separate model per task, to measure the methods against.

    tfidf        TF-IDF (word 1-2-grams + character 2-5-grams) and logistic regression, C chosen
                 by 5-fold cross-validation on the training split: the floor a user tries first
    independent  the whole backbone fine-tuned per task, with a linear head on its pooled output:
                 the ceiling of this backbone, at the price of a backbone per task
    lora         LoRA adapters (the `peft` library) on the backbone per task, with a linear head:
                 the standard parameter-efficient alternative

They are not continual methods. Each task gets its own model and nothing is shared, so nothing is
forgotten by construction and every input needs its task id (no router: task-free accuracy does
not apply). Learning a task never changes another task's model, so R[i, j] for i >= j is the
accuracy of task j's own model, measured once, on task j's test split, right after training it.
The models are not saved (an `independent` one is a whole backbone).

Footprint, in bytes per task, as each stores its numbers: `independent` every encoder parameter
and the head (float32); `lora` the adapter matrices and the head (float32); `tfidf` the
vectorizers' vocabularies (UTF-8 bytes of each term + a 4-byte column index), their idf vectors
and the classifier's coefficients and intercepts (float64), without Python object overhead and
without the terms pruned by `min_df` (sklearn's `stop_words_`, which prediction never reads).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from ..config import BackboneConfig, TrainConfig
from ..extras import import_extra
from ..methods.base import task_seed
from ..training.loop import Progress
from ..types import Task, TaskRecord
from .metrics import summary
from .report import (FWT_BY_CONSTRUCTION, backbone_json, json_default, library_versions,
                     matrix_json, write_outputs)
from .resources import peak_rss_mb
from .run import RunEvents

MATRIX_NOTE = (
    "one model per task, trained apart: R[i, j] (i >= j) is the accuracy of task j's own model, "
    "which no later task changes; task-free accuracy does not apply (no router)"
)


@dataclass
class Learned:
    """One task's trained model: its predictor (texts -> labels) and its record."""

    predict: Callable[[list[str]], list[str]]
    record: TaskRecord
    model: object = field(repr=False, default=None)  # the fitted model itself, for inspection


def _record(task: Task, seconds: float, adapter: int, head: int, nbytes: int, stats: dict) -> TaskRecord:
    return TaskRecord(task.name, tuple(task.labels),
                      datetime.now(timezone.utc).isoformat(timespec="seconds"), len(task.train),
                      round(seconds, 3), adapter, head, nbytes, stats)


class Reference:
    """A per-task learner: `learn(task)` returns the task's own `Learned` model."""

    name: ClassVar[str]
    requires: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module, extra that installs it)

    @classmethod
    def require(cls) -> None:
        """Raise `MissingExtra` naming the extra to install when a package it needs is missing."""
        for module, extra in cls.requires:
            import_extra(module, extra)

    def hyperparameters(self) -> dict:
        raise NotImplementedError

    def learn(self, task: Task, progress: Progress | None = None) -> Learned:
        raise NotImplementedError

    def description(self) -> dict:
        """The report's `backbone` and `device` fields."""
        return {"backbone": None, "device": "cpu"}


# -- tfidf ------------------------------------------------------------------------------------------
class TfidfReference(Reference):
    """TF-IDF + logistic regression per task; C by stratified k-fold cross-validation on train."""

    name = "tfidf"
    requires = (("sklearn", "sklearn"),)

    def __init__(self, *, seed: int = 0, C: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0), folds: int = 5):
        if not C or any(not c > 0 for c in C):
            raise ValueError(f"C must be a non-empty list of values > 0, got {list(C)!r}")
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds!r}")
        self.seed, self.C, self.folds = seed, tuple(float(c) for c in C), folds

    def hyperparameters(self) -> dict:
        return {"seed": self.seed, "C": list(self.C), "folds": self.folds,
                "features": "word 1-2-grams (min_df 1) + char_wb 2-5-grams (min_df 2), sublinear tf"}

    def model(self, folds: int):
        """The unfitted estimator: a grid search over C with `folds`-fold cross-validation."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import GridSearchCV
        from sklearn.pipeline import FeatureUnion, make_pipeline

        features = FeatureUnion([
            ("words", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)),
            ("chars", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2,
                                      sublinear_tf=True)),
        ])
        pipeline = make_pipeline(features, LogisticRegression(max_iter=2000, random_state=self.seed))
        return GridSearchCV(pipeline, {"logisticregression__C": list(self.C)}, cv=folds, n_jobs=1)

    def learn(self, task: Task, progress: Progress | None = None) -> Learned:
        counts = {label: 0 for label in task.labels}
        for example in task.train:
            counts[example.label] += 1
        folds = min(self.folds, min(counts.values()))
        if folds < 2:
            rare = [label for label, n in counts.items() if n < 2]
            raise ValueError(f"task {task.name!r}: label(s) {rare} have fewer than 2 training "
                             "examples; choosing C by cross-validation needs at least 2 per label")
        start = time.perf_counter()
        search = self.model(folds).fit([e.text for e in task.train], [e.label for e in task.train])
        seconds = time.perf_counter() - start
        best = search.best_estimator_
        classifier = best.named_steps["logisticregression"]
        features = best.named_steps["featureunion"].transformer_list
        vocabulary = sum(len(term.encode()) + 4 for _, v in features for term in v.vocabulary_)
        idf = sum(v.idf_.nbytes for _, v in features)
        coefficients = classifier.coef_.nbytes + classifier.intercept_.nbytes
        stats = {"C": search.best_params_["logisticregression__C"], "folds": folds,
                 "cv_accuracy": float(search.best_score_),
                 "terms": sum(len(v.vocabulary_) for _, v in features),
                 "bytes": {"vocabulary": vocabulary, "idf": idf, "classifier": coefficients}}
        record = _record(task, seconds, 0, int(classifier.coef_.size + classifier.intercept_.size),
                         vocabulary + idf + coefficients, stats)
        return Learned(lambda texts: [str(label) for label in best.predict(list(texts))], record, best)


# -- a backbone per task ------------------------------------------------------------------------------
class EncoderReference(Reference):
    """A copy of the backbone per task, partly or wholly trained, with a linear head on its pooled
    output (the product's pooling), trained by the product's loop, batched by its one path."""

    def __init__(self, *, backbone: BackboneConfig | None = None, device: str = "auto",
                 train: TrainConfig | None = None):
        from ..model.backbone import Backbone

        self.train = train or self.default_train()
        self.backbone = Backbone.load(backbone or BackboneConfig(), device=device)

    @classmethod
    def default_train(cls) -> TrainConfig:
        raise NotImplementedError

    def trainable(self, encoder):
        """`encoder` (a fresh copy of the backbone's) made ready to train: the module to call
        and the parameters the task owns and trains besides its head."""
        raise NotImplementedError

    def description(self) -> dict:
        return {"backbone": backbone_json(self.backbone), "device": str(self.backbone.device)}

    def learn(self, task: Task, progress: Progress | None = None) -> Learned:
        import torch
        from torch.nn import functional as F

        from ..model.batching import collated
        from ..model.heads import TaskHeads
        from ..training.loop import fit
        from ..training.precision import training_autocast

        backbone, seed = self.backbone, task_seed(self.train.seed, task.name)
        start = time.perf_counter()
        torch.manual_seed(seed)  # adapter initialisation and dropout
        encoder, owned = self.trainable(copy.deepcopy(backbone.encoder))
        heads = TaskHeads(backbone.hidden_size)
        heads.add(task.name, task.labels, seed, backbone.device)
        ids = backbone.tokenize([e.text for e in task.train])
        index = task.label_index()
        labels = torch.tensor([index[e.label] for e in task.train], device=backbone.device)
        autocast = training_autocast(self.train.precision, backbone.device)

        def logits(batch: dict) -> torch.Tensor:
            states = encoder(**batch).last_hidden_state  # (B, T, H)
            return heads(backbone.pool(states, batch["attention_mask"]), task.name)  # (B, C)

        def batch_loss(indices: list[int]) -> torch.Tensor:
            with autocast():
                batch = backbone.collate([ids[i] for i in indices])
                return F.cross_entropy(logits(batch).float(), labels[indices])

        encoder.train()  # dropout, as in fine-tuning
        result = fit([{"params": owned, "lr": self.train.lr},
                      {"params": list(heads.parameters()), "lr": self.train.head_lr}],
                     batch_loss, len(ids), self.train, seed, progress,
                     lengths=[len(row) for row in ids], length_multiple=backbone.length_multiple)
        encoder.eval()
        seconds = time.perf_counter() - start
        owned_numbers = sum(p.numel() for p in owned)
        head = heads.heads[task.name]
        nbytes = sum(p.numel() * p.element_size() for p in [*owned, *head.parameters()])

        @torch.inference_mode()
        def predict(texts: list[str]) -> list[str]:
            tokens = backbone.tokenize(list(texts))
            out = [""] * len(tokens)
            for rows, batch in collated(backbone, tokens):  # as the product predicts
                for i, row in zip(rows, logits(batch)):
                    out[i] = task.labels[int(row.argmax())]
            return out

        record = _record(task, seconds, owned_numbers, heads.num_parameters(task.name), nbytes,
                         result.stats())
        return Learned(predict, record, (encoder, heads))


class IndependentReference(EncoderReference):
    """Every encoder parameter trained, per task (full fine-tuning)."""

    name = "independent"

    @classmethod
    def default_train(cls) -> TrainConfig:
        # The usual full fine-tuning rate (BERT's paper's range), for the encoder and the head.
        return TrainConfig(lr=5e-5, head_lr=5e-5)

    def hyperparameters(self) -> dict:
        return {"train": self.train.to_dict()}

    def trainable(self, encoder):
        encoder.requires_grad_(True)
        return encoder, list(encoder.parameters())


class LoraReference(EncoderReference):
    """LoRA adapters per task through `peft`; the encoder's own weights stay frozen.

    `target_modules=None` takes peft's default for the model family: the attention query and
    value projections for BERT-likes (MiniLM), as in the LoRA paper.
    """

    name = "lora"
    requires = (("peft", "peft"),)

    def __init__(self, *, r: int = 8, alpha: float = 16, dropout: float = 0.1,
                 target_modules: list[str] | None = None, **kwargs):
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules else None
        super().__init__(**kwargs)

    @classmethod
    def default_train(cls) -> TrainConfig:
        # Chosen on a 15 % validation split of the bundled stream's first task (never its test
        # split), 3 epochs: 5e-4 gave 91.5 %, 1e-3 94.7 %, 2e-3 94.7 %, 5e-4 with the head at
        # 5e-3 93.1 %.
        return TrainConfig(lr=1e-3, head_lr=1e-3)

    def hyperparameters(self) -> dict:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout,
                "target_modules": self.target_modules, "train": self.train.to_dict()}

    def trainable(self, encoder):
        peft = import_extra("peft", "peft")
        config = peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                                 target_modules=self.target_modules)
        model = peft.get_peft_model(encoder, config)
        if self.target_modules is None:  # report what peft chose
            self.target_modules = sorted(model.peft_config["default"].target_modules)
        return model, [p for p in model.parameters() if p.requires_grad]


REFERENCES: dict[str, type[Reference]] = {
    "tfidf": TfidfReference,
    "independent": IndependentReference,
    "lora": LoraReference,
}


def make_reference(name: str, hyperparameters: dict | None = None, *,
                   backbone: BackboneConfig | None = None, device: str = "auto") -> Reference:
    """Build a reference learner by name; the encoder ones load `backbone` on `device`."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; known: {sorted(REFERENCES)}")
    cls = REFERENCES[name]
    cls.require()
    hyperparameters = dict(hyperparameters or {})
    if issubclass(cls, EncoderReference):
        train = cls.default_train().to_dict()
        train.update(hyperparameters.pop("train", {}))
        return cls(**hyperparameters, train=TrainConfig.from_dict(train), backbone=backbone,
                   device=device)
    if "train" in hyperparameters:
        raise ValueError(f"reference {name!r} is not trained by gradient; training options do not apply")
    return cls(**hyperparameters)


# -- the stream, as `run_stream` runs it ------------------------------------------------------------
def run_reference(tasks: list[Task], reference: Reference, out: str | Path | None = None,
                  events: RunEvents | None = None, run_config: dict | None = None) -> dict:
    """Learn each task's own model in stream order, evaluate it on its test split; return (and
    with `out`, write report.json and the accuracy-matrix heatmap) a report shaped like
    `run_stream`'s."""
    events = events or RunEvents()
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat in the stream: {names}")
    T = len(tasks)
    R = np.full((T, T), np.nan)
    start = time.perf_counter()
    per_task, accuracies = [], []
    for i, task in enumerate(tasks):
        if not task.test:
            raise ValueError(f"task {task.name!r} has no test examples")
        events.task_started(i, T, task)
        learned = reference.learn(task, progress=events.train_step)
        events.evaluation_started(i, tasks[: i + 1])
        eval_start = time.perf_counter()
        predicted = learned.predict([e.text for e in task.test])
        accuracy = float(np.mean([p == e.label for p, e in zip(predicted, task.test)]))
        eval_seconds = time.perf_counter() - eval_start
        accuracies.append(accuracy)
        R[i, : i + 1] = accuracies  # earlier tasks' models are untouched: their accuracy stands
        events.evaluated(task, accuracy)
        record = learned.record
        per_task.append({
            "task": task.name, "labels": list(task.labels),
            "train_examples": len(task.train), "test_examples": len(task.test),
            "train_seconds": record.train_seconds, "eval_seconds": round(eval_seconds, 3),
            "accuracy_just_learned": accuracy, "task_free_accuracy_just_learned": None,
            "accuracy_before_learning": None,
            "adapter_parameters": record.adapter_parameters,
            "head_parameters": record.head_parameters, "bytes_added": record.bytes_added,
            "peak_rss_mb": round(peak_rss_mb(), 1), "train_stats": record.stats,
        })
        del learned  # one task's model at a time (an `independent` one is a whole backbone)
        events.task_finished(i, record, R[: i + 1, : i + 1], names[: i + 1])
    metrics = {**summary(R), "fwt": 0.0, "task_free_acc": None, "task_free_bwt": None,
               "routing_acc": None}
    report = {
        "tasks": names,
        "accuracy_matrix": matrix_json(R),
        "task_free_accuracy_matrix": None,
        "matrix_note": MATRIX_NOTE,
        "routing": None,
        "metrics": metrics,
        "fwt_reference": FWT_BY_CONSTRUCTION,
        "reference_accuracy": None,
        "per_task": per_task,
        "shared_state_numbers": {"router": 0, "method": 0},
        **reference.description(),
        "method": {"name": reference.name, "hyperparameters": reference.hyperparameters()},
        "config": json.loads(json.dumps(run_config or {}, default=json_default)),
        "versions": {**library_versions(), **{module: import_extra(module, extra).__version__
                                              for module, extra in reference.requires}},
        "total_seconds": round(time.perf_counter() - start, 2),
    }
    if out is not None:
        write_outputs(Path(out), report, R, None, "accuracy of task j's own model after task i")
    return report
