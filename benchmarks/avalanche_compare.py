"""Avalanche's own Naive, EWC, LwF and Replay strategies beside ours, in one process, on the
same stream, backbone, trainable parameters, epochs and evaluation.

    benchmarks/.venv-avalanche/bin/python benchmarks/avalanche_compare.py [STREAM]
        [--methods finetune,ewc,lwf,replay] [--max-train N] [--epochs 3] [--seed 0]

It needs Avalanche (PyPI `avalanche-lib`), which needs torchvision: run it from its own virtual
environment (see benchmarks/README.md).

What is the same for both sides: the stream (task-incremental: the task of every example is
known), the frozen backbone, the trainable parameters (one shared activation-scaling entry and
a head per task, with the same initial values), AdamW with the same learning rates per group
and no weight decay, a fresh optimiser state per task, the warm-up + linear-decay schedule
restarted per task, gradient clipping at norm 1, float32 training, batch size, epochs, the method hyperparameters
(converted where the two define them differently, see `DIFFERENCES`), and the evaluation: after
each task, one function computes the test accuracy of every task seen, for both.

What differs is printed with the results (`DIFFERENCES`).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from continual_transformer.experiment import metrics
from continual_transformer.config import TrainConfig
from continual_transformer.data.stream import default_stream_path, load_stream
from continual_transformer.types import Task
from continual_transformer.learner import ContinualLearner
from continual_transformer.methods import make_method
from continual_transformer.methods.base import task_seed
from continual_transformer.methods.shared_adapter import SHARED
from continual_transformer.model.batching import collated
from continual_transformer.training.loop import warmup_linear

OURS_TO_AVALANCHE = {"finetune": "Naive", "ewc": "EWC", "lwf": "LwF", "replay": "Replay"}
EVAL_BATCH = 64
PAD_LOGIT = -1000.0  # logits of label slots a task does not have (Avalanche's masking value)

DIFFERENCES = [
    "batching: ours groups texts of similar length into a batch (length-bucketed shuffling); "
    "Avalanche's data loader shuffles uniformly, so its batches carry more padding",
    "ewc: ours takes the Fisher as the mean of per-example squared gradients over up to 512 "
    "examples, penalty (lambda/2)*sum F*d^2; Avalanche takes the mean over minibatches of the "
    "squared minibatch gradient (about F/B), penalty lambda*sum F*d^2: its lambda is set to "
    "ours * B / 2 to weigh the same (online mode, decay 1, as ours)",
    "lwf: ours computes the teacher's logits once per task, before training; Avalanche keeps a "
    "deep copy of the model and runs it on every batch, then runs the student again for all "
    "heads (three backbone passes per batch instead of one); ours multiplies the KL term by "
    "T^2, so Avalanche's alpha is set to ours * T^2",
    "replay: ours keeps a reservoir sample of all examples seen (1000) and draws 32 of them per "
    "batch; Avalanche's Replay keeps an experience-balanced buffer of the same size and batch "
    "size. Both train earlier heads on their replayed rows",
    "loss of replayed batches: both the mean cross-entropy over all rows; Avalanche pads a "
    f"task's logits to the largest label count with {PAD_LOGIT} (no effect on the loss)",
    "training loop: Avalanche's (its callbacks, plugins and data loaders); ours: train.fit",
]


# -- the model, as Avalanche wants it ---------------------------------------------------------
def avalanche_model(learner: ContinualLearner, tasks: list[Task]):
    """Our frozen backbone with the shared scale entry, and our heads, as an Avalanche
    `MultiTaskModule`: `x` is (B, 2, T) token ids and attention mask, task labels index tasks."""
    from avalanche.models import MultiTaskModule

    class SharedScaledEncoder(MultiTaskModule):
        def __init__(self):
            super().__init__()
            # Not registered as submodules: the backbone is frozen, and Avalanche's optimiser
            # bookkeeping should see exactly the trainable parameters.
            self.__dict__["backbone"] = learner.backbone
            self.__dict__["adapter"] = learner.model.adapter
            self.scales = nn.ParameterList(learner.model.adapter.parameters_of(SHARED))
            self.heads = learner.model.heads
            self.names = [t.name for t in tasks]
            self.widths = [len(t.labels) for t in tasks]

        def pooled(self, x: torch.Tensor) -> torch.Tensor:  # (B, 2, T) -> (B, H)
            with self.adapter.select([SHARED] * x.shape[0]):
                return self.backbone(input_ids=x[:, 0], attention_mask=x[:, 1])

        def forward(self, x, task_labels):
            if task_labels is None:  # every head (Avalanche's LwF asks for this)
                return self.forward_all_tasks(x)
            if isinstance(task_labels, int):
                return self.forward_single_task(x, task_labels)
            pooled = self.pooled(x)  # one backbone pass for a batch that mixes tasks
            out = pooled.new_full((x.shape[0], max(self.widths)), PAD_LOGIT)
            for t in torch.unique(task_labels).tolist():
                rows = task_labels == t
                out[rows, : self.widths[t]] = self.heads(pooled[rows], self.names[t])
            return out

        def forward_single_task(self, x, task_label):
            return self.heads(self.pooled(x), self.names[task_label])

        def forward_all_tasks(self, x):
            pooled = self.pooled(x)
            return {t: self.heads(pooled, self.names[t]) for t in self.known_train_tasks_labels}

    return SharedScaledEncoder()


def avalanche_benchmark(learner: ContinualLearner, tasks: list[Task]):
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_classification_dataset,
    )

    pad = learner.backbone.tokenizer.pad_token_id or 0

    def collate(items):
        xs, ys, ts = zip(*items)
        longest = max(len(x) for x in xs)
        batch = torch.full((len(xs), 2, longest), pad, dtype=torch.long)
        batch[:, 1] = 0
        for i, x in enumerate(xs):
            batch[i, 0, : len(x)] = x
            batch[i, 1, : len(x)] = 1
        return batch, torch.tensor(ys), torch.tensor(ts)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, ids, labels):
            self.ids, self.targets = [torch.tensor(r) for r in ids], labels

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return self.ids[i], self.targets[i]

    train = []
    for t, task in enumerate(tasks):
        index = task.label_index()
        rows = Rows(learner.backbone.tokenize([e.text for e in task.train]),
                    [index[e.label] for e in task.train])
        train.append(_make_taskaware_classification_dataset(
            rows, targets=rows.targets, task_labels=[t] * len(rows), collate_fn=collate))
    return with_classes_timeline(with_task_labels(benchmark_from_datasets(train=train)))


def avalanche_plugins(config: TrainConfig):
    from avalanche.training.plugins import SupervisedPlugin

    class WarmupLinear(SupervisedPlugin):
        """Our schedule (`train.warmup_linear`), restarted for every experience."""

        base_lrs: list[float] | None = None

        def before_training_exp(self, strategy, **kwargs):
            steps = math.ceil(len(strategy.experience.dataset) / strategy.train_mb_size)
            factor = warmup_linear(steps * strategy.train_epochs, config.warmup_ratio)
            groups = strategy.optimizer.param_groups
            if self.base_lrs is None:
                self.base_lrs = [group["lr"] for group in groups]
            for group, lr in zip(groups, self.base_lrs):  # the last task's schedule ended at 0
                group["lr"] = lr
                group.pop("initial_lr", None)
            self.schedule = torch.optim.lr_scheduler.LambdaLR(strategy.optimizer, factor)

        def after_update(self, strategy, **kwargs):
            self.schedule.step()

    class ClipGradients(SupervisedPlugin):
        def before_update(self, strategy, **kwargs):
            params = [p for g in strategy.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)

    return [WarmupLinear(), ClipGradients()]


def avalanche_strategy(name: str, model, config: TrainConfig, ours):
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    optimizer = torch.optim.AdamW(
        [{"params": list(model.scales), "lr": config.lr},
         {"params": list(model.heads.parameters()), "lr": config.head_lr}],
        weight_decay=config.weight_decay)
    common = dict(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
                  train_mb_size=config.batch_size, train_epochs=config.epochs,
                  eval_mb_size=EVAL_BATCH, device="cpu", evaluator=EvaluationPlugin(),
                  plugins=avalanche_plugins(config))
    if name == "finetune":
        return Naive(**common), {}
    if name == "ewc":
        lam = ours.ewc_lambda * config.batch_size / 2
        return EWC(ewc_lambda=lam, mode="online", decay_factor=ours.decay, **common), {"ewc_lambda": lam}
    if name == "lwf":
        alpha = ours.alpha * ours.temperature**2
        return LwF(alpha=alpha, temperature=ours.temperature, **common), {"alpha": alpha,
                                                                         "temperature": ours.temperature}
    if name == "replay":
        return Replay(mem_size=ours.buffer.capacity, **common), {"mem_size": ours.buffer.capacity}
    raise ValueError(f"no Avalanche counterpart for {name!r}; known: {sorted(OURS_TO_AVALANCHE)}")


# -- evaluation, the same for both -------------------------------------------------------------
@torch.inference_mode()
def accuracy(learner: ContinualLearner, task: Task) -> float:
    ids = learner.backbone.tokenize([e.text for e in task.test])
    index = task.label_index()
    gold = [index[e.label] for e in task.test]
    correct = 0
    for rows, batch in collated(learner.backbone, ids, max_rows=EVAL_BATCH):
        with learner.model.adapter.select([SHARED] * len(rows)):
            predicted = learner.model.heads(learner.backbone(**batch), task.name).argmax(-1).tolist()
        correct += sum(p == gold[i] for p, i in zip(predicted, rows))
    return correct / len(task.test)


def run_ours(name: str, tasks: list[Task], config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    learner = ContinualLearner(method=make_method(name, {"train": config.to_dict()}), device="cpu")
    R = np.full((len(tasks), len(tasks)), np.nan)
    train_seconds = 0.0
    for i, task in enumerate(tasks):
        start = time.perf_counter()
        learner.learn(task)
        train_seconds += time.perf_counter() - start
        for j in range(i + 1):
            R[i, j] = accuracy(learner, tasks[j])
    return {"R": R, "train_seconds": train_seconds, "hyperparameters": learner.method.hyperparameters()}


def run_avalanche(name: str, tasks: list[Task], config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    ours = make_method(name, {"train": config.to_dict()})
    learner = ContinualLearner(method=make_method("finetune", {"train": config.to_dict()}), device="cpu")
    learner.model.adapter.add(SHARED)
    for task in tasks:  # the same initial heads as ours
        learner.model.heads.add(task.name, task.labels, task_seed(config.seed, task.name), "cpu")
    model = avalanche_model(learner, tasks)
    benchmark = avalanche_benchmark(learner, tasks)
    strategy, settings = avalanche_strategy(name, model, config, ours)
    R = np.full((len(tasks), len(tasks)), np.nan)
    train_seconds = 0.0
    for i, experience in enumerate(benchmark.train_stream):
        start = time.perf_counter()
        strategy.train(experience, reset_optimizer_state=True)
        train_seconds += time.perf_counter() - start
        for j in range(i + 1):
            R[i, j] = accuracy(learner, tasks[j])
    return {"R": R, "train_seconds": train_seconds, "hyperparameters": settings}


def summary(R: np.ndarray) -> dict:
    return {"acc": metrics.average_accuracy(R), "bwt": metrics.backward_transfer(R),
            "forgetting": metrics.forgetting(R)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stream", nargs="?", default=None)
    parser.add_argument("--methods", default="finetune,ewc,lwf,replay")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-test", type=int, default=None,
                        help="At most N test examples per task (the first N; for quick checks).")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in OURS_TO_AVALANCHE]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {list(OURS_TO_AVALANCHE)}")
    import avalanche

    # float32 on both sides: Avalanche's loop has no autocast, and ours would take bfloat16
    # where the CPU computes it natively (`precision="auto"`), about twice as fast.
    config = TrainConfig(epochs=args.epochs, seed=args.seed, precision="fp32")
    stream = args.stream or default_stream_path()
    tasks = [t.subsample_train(args.max_train, args.seed) for t in load_stream(stream)]
    if args.max_test is not None:
        tasks = [Task(t.name, t.labels, t.train, t.test[: args.max_test]) for t in tasks]
    print(f"stream {stream}: {len(tasks)} tasks, {sum(len(t.train) for t in tasks)} training "
          f"examples (max-train {args.max_train or 'all'}), {sum(len(t.test) for t in tasks)} test "
          f"examples; epochs {config.epochs}, seed "
          f"{config.seed}; torch {torch.__version__}, avalanche {avalanche.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in methods:
        for side, run in (("ours", run_ours), ("avalanche", run_avalanche)):
            label = name if side == "ours" else f"Avalanche {OURS_TO_AVALANCHE[name]}"
            print(f"running {label} ...", flush=True)
            result = run(name, tasks, config)
            row = {"method": name, "side": side, "label": label, **summary(result["R"]),
                   "train_seconds": result["train_seconds"], "R": result["R"],
                   "hyperparameters": result["hyperparameters"]}
            rows.append(row)
            print(f"  ACC {100 * row['acc']:.1f}  BWT {100 * row['bwt']:+.1f}  forgetting "
                  f"{100 * row['forgetting']:.1f}  train {row['train_seconds']:.0f}s", flush=True)
    print()
    print("| method | implementation | ACC % | BWT | forgetting | train s | settings |")
    print("|---|---|---:|---:|---:|---:|---|")
    for row in rows:
        settings = {k: v for k, v in row["hyperparameters"].items() if k != "train"}
        print(f"| {row['method']} | {row['label']} | {100 * row['acc']:.1f} | "
              f"{100 * row['bwt']:+.1f} | {100 * row['forgetting']:.1f} | "
              f"{row['train_seconds']:.0f} | {settings} |")
    print()
    print("Where the setups differ:")
    for line in DIFFERENCES:
        print(f"- {line}")


if __name__ == "__main__":
    main()
