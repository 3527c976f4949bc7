"""Every method on the same stream, backbone, seed and epochs, side by side (`ctt bench`).

    DIR/bench.json                    one row per method: metrics, footprint, time, peak memory,
                                      accuracy matrix; the settings and library versions
    DIR/bench.md                      the table, in Markdown
    DIR/bench_final_accuracy.png      final accuracy (ACC) per method
    DIR/bench_accuracy_matrices.png   every method's accuracy matrix
    DIR/bench_first_task.png          accuracy on the first task after each task, per method
    DIR/<method>/                     that method's own run: report.json, heatmaps, model

With several seeds (`ctt bench --seeds 0,1,2`, `run_seeds`), each seed's bench is a whole bench
in DIR/seed-<s>/, and DIR/bench_seeds.json and DIR/bench_seeds.md give each method's figures
over the seeds (mean, standard deviation, range) and its ACC minus the first method's, seed by
seed (paired: both saw the same validation split, batches and initialisation seed). A seed
changes everything drawn at random (the validation split, batch order, initialisations, the
training subsample with --max-train), never the stream's test split.

Besides the continual methods, the bench runs reference rows (references.py: `tfidf`,
`independent`, `lora`): a separate model per task, the floor and ceilings to measure against,
on the same tasks, splits and seed, with reports of the same shape.

Each method runs in a fresh Python process, so the peak resident memory reported for it is its own
(a process's peak never goes down: measured in one process, every method after the largest
would report the largest). The processes run one after another, never side by side, so their
times are comparable.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..data.source import ReadOptions
from .workers import Send, Worker, WorkerDied, WorkerFailed

DEFAULT_METHODS = ("ia3", "analytic", "finetune", "ewc", "lwf", "replay", "joint", "tfidf")
JOINT = "joint"


def known_methods() -> list[str]:
    """Every name `ctt bench` runs: the continual methods, then the reference rows."""
    from ..methods import METHODS
    from .references import REFERENCES

    return [*METHODS, *REFERENCES]


class BenchError(RuntimeError):
    """A method's run failed; the message carries its traceback."""


@dataclass(frozen=True)
class BenchConfig:
    """What `run_bench` compares, and on what. `epochs=None` keeps `TrainConfig`'s default."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    stream: str | None = None  # None: the bundled default stream
    data: ReadOptions = field(default_factory=ReadOptions)  # how the stream file is read
    max_train: int | None = None
    max_test: int | None = None  # at most N test examples per task (stratified): a quicker bench
    epochs: int | None = None
    seed: int = 0
    backbone: str = "default"
    max_length: int = 128
    device: str = "auto"
    isolate: bool = True  # each method in a fresh process (honest peak memory)
    adapt_layers: int | str | None = None  # gradient methods' top layers (None: the default)
    hyperparameters: dict = field(default_factory=dict)  # method -> overrides, e.g. {"ewc": {...}}

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # as to_dict() wrote it, e.g. into a method's process
            object.__setattr__(self, "data", ReadOptions.from_dict(self.data))
        if not self.methods:
            raise ValueError("methods must name at least one method")
        known = known_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(known)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods must not repeat, got {list(self.methods)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.max_train is not None and self.max_train < 1:
            raise ValueError(f"max_train must be >= 1, got {self.max_train!r}")
        if self.max_test is not None and self.max_test < 1:
            raise ValueError(f"max_test must be >= 1, got {self.max_test!r}")
        extra = sorted(set(self.hyperparameters) - set(self.methods))
        if extra:
            raise ValueError(f"hyperparameters given for methods not benchmarked: {extra}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["methods"] = list(self.methods)
        return data


class BenchEvents:
    """Hooks a front end overrides to show progress; the defaults do nothing. Arguments are
    plain values: they cross from a method's worker process."""

    def seed_started(self, index: int, total: int, seed: int) -> None: ...  # run_seeds only

    def method_started(self, index: int, total: int, method: str) -> None: ...

    def task_started(self, method: str, index: int, total: int, task: str, train_examples: int) -> None: ...

    def train_step(self, done: int, total: int, loss: float) -> None: ...

    def evaluating(self, method: str, tasks: int) -> None: ...

    def task_finished(self, method: str, index: int, accuracies: list[float | None]) -> None: ...

    def method_finished(self, method: str, row: dict) -> None: ...


def load_tasks(config: BenchConfig) -> list:
    from ..data import source
    from ..data.stream import default_stream_path

    stream = config.stream or default_stream_path()
    return [t.subsample_train(config.max_train, config.seed).subsample_test(config.max_test, config.seed)
            for t in source.load_tasks(stream, config.data, seed=config.seed)]


def run_bench(config: BenchConfig, out: str | Path, events: BenchEvents | None = None,
              resume: bool = False) -> dict:
    """Run every method of `config` on the same stream; write and return the comparison.

    With `resume`, a method whose run in `out` finished under the same settings is not run
    again (a long bench that was interrupted goes on where it stopped).
    """
    from ..data.stream import describe
    from .references import REFERENCES

    events = events or BenchEvents()
    out = Path(out)
    tasks = load_tasks(config)  # validates the stream before anything trains
    for name in config.methods:  # a missing optional package fails now, not after hours
        if name in REFERENCES:
            REFERENCES[name].require()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for index, method in enumerate(config.methods):
        events.method_started(index, len(config.methods), method)
        spec = {"config": config.to_dict(), "method": method, "out": str(out / method)}
        finished = out / method / RESULT
        result = _finished_result(finished, spec) if resume else None
        if not resume and (out / method).exists():
            raise ValueError(f"{out / method} exists: continue that bench with --resume, or use a new --out")
        if result is None:  # an interrupted run of the method continues from its saved state
            if config.isolate:
                result = _run_isolated(spec, events)
            else:
                result = run_method(_dispatch(events), spec)
            finished.write_text(json.dumps({"spec": spec, "result": result}, indent=2))
        report = json.loads((out / method / "report.json").read_text())
        row = summarize(method, report, result)
        rows.append(row)
        events.method_finished(method, row)
    reports = [json.loads((out / m / "report.json").read_text()) for m in config.methods]
    # tfidf has no backbone: the description comes from the first row that has one
    first = next((r for r in reports if r["backbone"] is not None), reports[0])
    bench = {
        "tasks": [t.name for t in tasks],
        "stream": str(config.stream or "default"),
        "stream_summary": describe(tasks),
        "config": config.to_dict(),
        "backbone": first["backbone"],
        "device": first["device"],
        "versions": first["versions"],
        "methods": rows,
        "notes": NOTES,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "bench.json").write_text(json.dumps(bench, indent=2))
    (out / "bench.md").write_text(markdown(bench))
    from .plots import write_bench_plots

    write_bench_plots(bench, out)
    return bench


def run_seeds(config: BenchConfig, seeds: Sequence[int], out: str | Path,
              events: BenchEvents | None = None, resume: bool = False) -> dict:
    """`run_bench` once per seed (`config.seed` is replaced), each into DIR/seed-<s>/; then
    each method's spread over the seeds, written to DIR/bench_seeds.json and .md, and returned."""
    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"seeds must name at least 2 seeds (one seed is --seed), got {seeds}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must not repeat, got {seeds}")
    out, events = Path(out), events or BenchEvents()
    benches = []
    for index, seed in enumerate(seeds):
        events.seed_started(index, len(seeds), seed)
        benches.append(run_bench(replace(config, seed=seed), out / f"seed-{seed}", events, resume))
    summary = seed_summary(benches, seeds)
    (out / "bench_seeds.json").write_text(json.dumps(summary, indent=2))
    (out / "bench_seeds.md").write_text(seeds_markdown(summary))
    return summary


def _spread(values: list[float | None]) -> dict | None:
    """Mean, sample standard deviation, smallest and largest of a figure over the seeds (None
    when a seed has no value for it, as task-free ACC for the reference rows)."""
    if any(v is None for v in values):
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values),
            "min": min(values), "max": max(values), "values": values}


def seed_summary(benches: list[dict], seeds: list[int]) -> dict:
    """Per method, over the seeds' benches (in `seeds` order): ACC, task-free ACC, each task's
    final accuracy, train seconds, bytes per task; and ACC minus the first method's ACC per seed."""
    methods = [r["method"] for r in benches[0]["methods"]]
    rows = {seed: {r["method"]: r for r in b["methods"]} for seed, b in zip(seeds, benches)}
    first = methods[0]
    summary = []
    for method in methods:
        per_seed = [rows[s][method] for s in seeds]
        summary.append({
            "method": method,
            "acc": _spread([r["acc"] for r in per_seed]),
            "task_free_acc": _spread([r["task_free_acc"] for r in per_seed]),
            "final_accuracy": [_spread([r["final_accuracy"][j] for r in per_seed])
                               for j in range(len(benches[0]["tasks"]))],
            "acc_minus_first": _spread([r["acc"] - rows[s][first]["acc"]
                                        for s, r in zip(seeds, per_seed)]),
            "train_seconds": _spread([r["train_seconds"] for r in per_seed]),
            "bytes_per_task": _spread([r["bytes_per_task"] for r in per_seed]),
        })
    return {"seeds": seeds, "tasks": benches[0]["tasks"], "stream": benches[0]["stream"],
            "first_method": first, "methods": summary,
            "benches": [f"seed-{s}" for s in seeds]}


def _mean_std(spread: dict | None, scale: float = 100.0, sign: str = "") -> str:
    if spread is None:
        return "n/a"
    return f"{spread['mean'] * scale:{sign}.2f} ± {spread['std'] * scale:.2f}"


def seed_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Per method: ACC, each task's final accuracy and ACC minus the first method's, as
    mean ± standard deviation over the seeds (percent)."""
    header = ["method", "ACC %", *summary["tasks"], f"ACC - {summary['first_method']}",
              "task-free ACC %", "ACC per seed"]
    rows = [[r["method"], _mean_std(r["acc"]), *[_mean_std(t) for t in r["final_accuracy"]],
             _mean_std(r["acc_minus_first"], sign="+"), _mean_std(r["task_free_acc"]),
             " / ".join(f"{100 * v:.2f}" for v in r["acc"]["values"])]
            for r in summary["methods"]]
    return header, rows


def seeds_markdown(summary: dict) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"# ctt bench over seeds {seeds}: {len(summary['tasks'])} tasks", "",
             f"Stream {summary['stream']}. Mean ± sample standard deviation over the seeds "
             f"(percent); each seed's whole bench is in {', '.join(summary['benches'])}. "
             f"`ACC - {summary['first_method']}` is each method's ACC minus "
             f"{summary['first_method']}'s in the same seed, then averaged.", "",
             *_markdown_table(*seed_rows(summary))]
    return "\n".join(lines) + "\n"


RESULT = "bench_result.json"  # in DIR/<method>/, written when the method's run has finished


def _finished_result(path: Path, spec: dict) -> dict | None:
    """The figures of a finished run of `spec`, or None if it has not finished."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    compared = [k for k in spec["config"] if k != "methods"]
    differing = [k for k in compared if saved["spec"]["config"].get(k) != spec["config"][k]]
    if differing:
        raise ValueError(f"{path}: that run used other settings ({', '.join(differing)}); "
                         "use another --out directory or run without --resume")
    return saved["result"]


NOTES = {
    "acc": "ACC: mean accuracy over all tasks after the last one, task given (percent)",
    "bwt": "BWT: mean change on earlier tasks from just after learning them to the end "
           "(points; < 0 is forgetting)",
    "forgetting": "forgetting: mean drop from each earlier task's best accuracy to its final one "
                  "(points)",
    "task_free_acc": "task-free ACC: as ACC, with the task not given: a row counts only if "
                     "routed to its own task (the router, or analytic's own classifier)",
    "bytes_per_task": "footprint per task: bytes a task adds (its own scale vectors, head, "
                      "router statistics, or analytic's class columns; for the reference rows, "
                      "the task's own model: see references)",
    "shared_numbers": "shared: numbers the method keeps for all tasks (the baselines' shared "
                      "scale entry; ewc adds Fisher and anchor; analytic its statistics); "
                      "replay also keeps its buffer of texts. The router's shared statistics are "
                      "the same for every method but analytic and are not counted",
    "train_seconds": "train s: time spent learning tasks; total s: the whole run with "
                     "evaluation after every task",
    "peak_rss_mb": "peak RSS: peak resident memory of the method's own process (MiB)",
    "references": "tfidf, independent, lora: reference rows, a separate model per task (TF-IDF + "
                  "logistic regression; the whole backbone fine-tuned; LoRA adapters through "
                  "peft), each with its own head; nothing shared, so BWT is 0 by construction; "
                  "they need the task id (task-free n/a). Footprint: independent every encoder "
                  "parameter + head, lora the adapter matrices + head (float32); tfidf the "
                  "vocabularies (UTF-8 terms + 4-byte indices), idf and coefficients (float64)",
    "joint": "joint trains once on all tasks: only its accuracy after all tasks exists, so BWT "
             "and forgetting do not apply (n/a)",
}


def summarize(method: str, report: dict, result: dict) -> dict:
    """One table row from a method's report.json and its process's figures."""
    metrics, per_task = report["metrics"], report["per_task"]
    R = report["accuracy_matrix"]
    return {
        "method": method,
        "acc": metrics["acc"],
        "bwt": metrics["bwt"],
        "forgetting": metrics["forgetting"],
        "fwt": metrics.get("fwt"),
        "task_free_acc": metrics.get("task_free_acc"),
        "routing_acc": metrics.get("routing_acc"),
        "bytes_per_task": sum(t["bytes_added"] for t in per_task) / len(per_task),
        "adapter_parameters_per_task": sum(t["adapter_parameters"] for t in per_task) / len(per_task),
        "head_parameters_per_task": sum(t["head_parameters"] for t in per_task) / len(per_task),
        "shared_numbers": report["shared_state_numbers"]["method"],
        "train_seconds": round(sum(t["train_seconds"] for t in per_task), 1),
        "total_seconds": report["total_seconds"],
        "peak_rss_mb": result.get("peak_rss_mb"),
        "hyperparameters": report["method"]["hyperparameters"],
        "accuracy_matrix": R,
        "first_task_accuracy": [row[0] for row in R],
        "final_accuracy": R[-1],
    }


def format_figure(value, spec: str, scale: float = 1.0) -> str:
    """A figure for a table: `value * scale` in `spec` format, "n/a" when it is missing."""
    return "n/a" if value is None else format(value * scale, spec)


def table_rows(bench: dict) -> tuple[list[str], list[list[str]]]:
    header = ["method", "ACC %", "BWT", "forgetting", "task-free ACC %", "KiB/task",
              "shared numbers", "train s", "total s", "peak RSS MiB"]
    rows = []
    for r in bench["methods"]:
        rows.append([
            r["method"], format_figure(r["acc"], ".1f", 100), format_figure(r["bwt"], "+.1f", 100),
            format_figure(r["forgetting"], ".1f", 100), format_figure(r["task_free_acc"], ".1f", 100),
            f"{r['bytes_per_task'] / 1024:,.1f}", f"{r['shared_numbers']:,}",
            f"{r['train_seconds']:.0f}", f"{r['total_seconds']:.0f}",
            format_figure(r["peak_rss_mb"], ".0f"),
        ])
    return header, rows


def task_rows(bench: dict) -> tuple[list[str], list[list[str]]]:
    """Each method's accuracy on each task after the last one (%), and their mean (ACC)."""
    header = ["method", *bench["tasks"], "ACC %"]
    rows = [[r["method"], *[format_figure(v, ".1f", 100) for v in r["final_accuracy"]],
             format_figure(r["acc"], ".1f", 100)] for r in bench["methods"]]
    return header, rows


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
            *["| " + " | ".join(row) + " |" for row in rows]]


def markdown(bench: dict) -> str:
    config = bench["config"]
    epochs = config["epochs"] or "default (3)"
    train = "all" if config["max_train"] is None else f"at most {config['max_train']}"
    test = "" if config.get("max_test") is None else f", at most {config['max_test']} test examples"
    backbone = bench["backbone"]["name"] if bench["backbone"] else "none (tfidf only)"
    names = bench["tasks"]
    first_task = [[r["method"], *[format_figure(v, ".1f", 100) for v in r["first_task_accuracy"]]]
                  for r in bench["methods"]]
    lines = [
        f"# ctt bench: {len(bench['tasks'])} tasks ({', '.join(bench['tasks'])})",
        "",
        f"Stream {bench['stream']}; backbone {backbone}; device "
        f"{bench['device']}; seed {config['seed']}; epochs {epochs}; {train} training examples"
        f"{test} per task; each method in its own process: {config['isolate']}.",
        "",
        *_markdown_table(*table_rows(bench)),
        "",
        "Accuracy on each task after the last one (%):",
        "",
        *_markdown_table(*task_rows(bench)),
        "",
        "Accuracy on the first task after each task (%):",
        "",
        *_markdown_table(["method", *[f"after {n}" for n in names]], first_task),
        "",
        "Notes:",
        "",
        *[f"- {text}" for text in bench["notes"].values()],
    ]
    return "\n".join(lines) + "\n"


# -- one method, in this process or a fresh one ----------------------------------------------
def _dispatch(events: BenchEvents) -> Send:
    return lambda kind, *args: getattr(events, kind)(*args)


def run_method(send: Send, spec: dict) -> dict:
    """Learn the stream with one method; write DIR/<method>/; return process figures."""
    import torch

    from ..config import BackboneConfig, LearnerSpec
    from ..learner import ContinualLearner
    from ..methods import METHODS, GradientMethod
    from .references import REFERENCES, EncoderReference, make_reference, run_reference
    from .resources import peak_rss_mb
    from .run import RunEvents, run_joint, run_stream

    config = BenchConfig(**{**spec["config"], "methods": tuple(spec["config"]["methods"])})
    name = spec["method"]
    tasks = load_tasks(config)
    torch.manual_seed(config.seed)
    hyperparameters = dict(config.hyperparameters.get(name, {}))
    kind = REFERENCES[name] if name in REFERENCES else METHODS[name]
    if issubclass(kind, (GradientMethod, EncoderReference)):
        train = {"seed": config.seed, **({"epochs": config.epochs} if config.epochs else {})}
        hyperparameters["train"] = {**train, **hyperparameters.get("train", {})}
        if issubclass(kind, GradientMethod):
            hyperparameters.setdefault("adapt_layers", config.adapt_layers)
    else:
        hyperparameters.setdefault("seed", config.seed)
    backbone = BackboneConfig(config.backbone, max_length=config.max_length)
    if name in REFERENCES:
        model = make_reference(name, hyperparameters, backbone=backbone, device=config.device)
        runner = run_reference
    else:
        model = ContinualLearner.from_spec(LearnerSpec(backbone, name, hyperparameters),
                                           device=config.device)
        runner = run_joint if name == JOINT else run_stream

    class Forward(RunEvents):
        def task_started(self, index, total, task):
            send("task_started", name, index, total, task.name, len(task.train))

        def train_step(self, done, total, loss):
            send("train_step", done, total, loss)

        def evaluation_started(self, index, seen):
            send("evaluating", name, len(seen))

        def task_finished(self, index, record, matrix, names):
            row = [None if v != v else float(v) for v in matrix[-1]]  # NaN -> None
            send("task_finished", name, index, row)

    run_config = {"bench": config.to_dict(), "method": name, "hyperparameters": hyperparameters}
    start = time.perf_counter()
    runner(tasks, model, spec["out"], Forward(), run_config)
    return {"wall_seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1) if config.isolate else None}


def _run_isolated(spec: dict, events: BenchEvents) -> dict:
    """Run one method in a fresh process; its stdout is silenced (libraries' prints would tear
    the progress display)."""
    worker = Worker(run_method, spec, name=f"ctt-bench-{spec['method']}", quiet=True)
    try:
        return worker.start().wait(_dispatch(events))
    except WorkerFailed as failure:
        raise BenchError(f"method {spec['method']!r} failed:\n{failure.traceback}") from None
    except WorkerDied as died:
        raise BenchError(f"method {spec['method']!r}: its process exited with code {died.exitcode} "
                         "without a result") from None
