"""`ctt`: the command-line edge. Each command parses, calls the library, prints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli_output import (BenchProgress, RunProgress, console, figures_table, pool_entry,
                         print_confused, print_summary, search_choice, setting_error)
from .config import DEFAULT_SAVE_EVERY

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Continual learning of text-classification tasks on a frozen tiny transformer.")
errors = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=2)


@app.callback()
def _one_process_unless_run(ctx: typer.Context) -> None:
    """Continual learning of text-classification tasks on a frozen tiny transformer."""
    from .training.distributed import launched

    if ctx.invoked_subcommand == "run":
        return
    try:
        launch = launched()
    except ValueError:  # not a torchrun launch (`run` says what is wrong with the environment)
        return
    if launch is not None and launch.world_size > 1:
        _fail(f"`ctt {ctx.invoked_subcommand}` runs in one process; of the commands only "
              "`ctt run` learns data-parallel under torchrun")


def _user_errors():
    from .model.backbone import BackboneError
    from .io.checkpoint import CheckpointError

    from .extras import MissingExtra
    from .io.writer_lock import WriterBusy

    return (ValueError, KeyError, BackboneError, CheckpointError, FileNotFoundError, MissingExtra,
            WriterBusy)


# How to read a stream file; `ctt run` and `ctt bench` take the same options (data/source.py).
_FORMAT = typer.Option(None, "--format", help="Stream format: jsonl, csv, tsv, parquet or datasets (a folder written by save_to_disk) [default: from the name].")
_TEXT_COLUMN = typer.Option(None, help="Column of the texts [default: text].")
_LABEL_COLUMN = typer.Option(None, help="Column of the labels [default: label].")
_TASK_COLUMN = typer.Option(None, help="Column of the task names [default: task; a file without one is one task].")
_SPLIT_COLUMN = typer.Option(None, help="Column of the splits, train or test [default: split].")
_TASK_NAME = typer.Option(None, help="The task of every row, for a file without a task column [default: the file's name].")
_TEST_FRACTION = typer.Option(None, help="Draw this fraction of each task's rows as its test split, stratified by label and reproducible by --seed (for a file without a split column).")
PRECISION_HELP = "What predictions compute in: auto (bfloat16 where the hardware has it), fp32 or bf16."
_STREAM_HELP = "Stream file: JSONL (.jsonl, .jsonl.gz), CSV, TSV, Parquet or a datasets folder; default: the bundled stream."


def _read_options(saved: dict | None, **given):
    """The stream's read options: those given, else the saved run's, else the defaults."""
    from .data.source import ReadOptions

    return ReadOptions(**{**(saved or {}), **{k: v for k, v in given.items() if v is not None}})


@app.command()
def run(
    ctx: typer.Context,
    stream: Optional[Path] = typer.Argument(None, help=_STREAM_HELP),
    data_format: Optional[str] = _FORMAT,
    text_column: Optional[str] = _TEXT_COLUMN,
    label_column: Optional[str] = _LABEL_COLUMN,
    task_column: Optional[str] = _TASK_COLUMN,
    split_column: Optional[str] = _SPLIT_COLUMN,
    task_name: Optional[str] = _TASK_NAME,
    test_fraction: Optional[float] = _TEST_FRACTION,
    method: Optional[str] = typer.Option(None, help="Learning method: ia3, analytic, or a baseline: "
                                                    "finetune, ewc, lwf, replay, joint [default: ia3]."),
    out: Path = typer.Option(Path("runs/latest"), help="Output directory."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per task."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of the scale vectors."),
    head_lr: Optional[float] = typer.Option(None, help="Learning rate of the heads."),
    batch_size: Optional[int] = typer.Option(None, help="Training batch size."),
    precision: Optional[str] = typer.Option(None, help="Precision of training and evaluation: auto (bf16 where the hardware has it), fp32 or bf16; the report also gives each task's accuracy in fp32."),
    adapt_layers: Optional[str] = typer.Option(None, help="Top layers that carry each task's scales (a number or 'all'); the layers below are a shared trunk run once per text [default: 3]."),
    lexical: Optional[bool] = typer.Option(None, "--lexical/--no-lexical", help="ia3: learn a lexical branch per task, weighed on a validation split held out from training [default: on]."),
    search: Optional[int] = typer.Option(None, help="ia3: per task, an Optuna study of N trials over rates, epochs and adapted layers, scored on the validation split (extra: search) [default: off]."),
    search_budget: Optional[float] = typer.Option(None, help="ia3 with --search: stop a task's study after this many seconds [default: 4x its first trial, which runs the defaults]."),
    pool_size: Optional[int] = typer.Option(None, min=1, help="ia3: tasks share at most P scale entries; a full pool reuses or merges (docs/pool.md) [default: one entry per task]."),
    max_train: Optional[int] = typer.Option(None, help="At most N training examples per task (stratified)."),
    max_test: Optional[int] = typer.Option(None, min=1, help="At most N test examples per task (stratified): a quicker evaluation, of that subsample [default: all]."),
    seed: Optional[int] = typer.Option(None, help="Random seed: same seed, same numbers [default: 0]."),
    backbone: Optional[str] = typer.Option(None, help="'default' (MiniLM-L6), a model folder or a hub id [default: default]."),
    max_length: Optional[int] = typer.Option(None, help="Maximum tokens per text [default: 128]."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda[:N]'."),
    save_every: int = typer.Option(DEFAULT_SAVE_EVERY, help="Save the training state every K steps within a task (0: only after each task)."),
    keep_versions: Optional[int] = typer.Option(None, min=1, help="Keep only the newest N versions of the model directory (each task saved is one; about 17 MB each with the router); default: all (`ctt prune` later)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run saved in --out; options not given take its saved values."),
    track: Optional[str] = typer.Option(None, "--track", help="Track the run in 'mlflow' or 'tensorboard' (optional extras)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI [default: ./mlruns, SQLite + files] or TensorBoard log folder [default: OUT/tensorboard]."),
    workers: Optional[int] = typer.Option(None, min=1, help="Learn the tasks in parallel on N Ray workers (extra: ray); the same model as without. ia3 only."),
    worker_threads: Optional[int] = typer.Option(None, min=1, help="With --workers: CPU threads per worker [default: 1]."),
    ray_address: Optional[str] = typer.Option(None, help="With --workers: the Ray cluster to join [default: a local one of N workers' CPUs]."),
):
    """Learn every task of a stream in order; write the model, report.json and a heatmap.

    Killed runs continue: run the same command again (or `--resume --out DIR`), and finished
    tasks are kept, the interrupted one continues from its last save.

    Launched by torchrun (`torchrun --nproc-per-node N -m continual_transformer run ...`), the
    N processes learn each task data-parallel; only rank 0 writes and prints.
    """
    import contextlib

    import torch

    from .config import BackboneConfig, LearnerSpec, TrainConfig
    from .data.source import load_tasks
    from .data.stream import default_stream_path, describe
    from .experiment.run import run_joint, run_stream
    from .learner import ContinualLearner
    from .io.runstate import read_config
    from .training.distributed import process_group
    from .training.loop import TrainingError
    from .experiment.ray_pool import TaskLost

    try:
        # Joined for the whole command, left when it ends (also on an error).
        parallel = ctx.with_resource(process_group(device))
        main = parallel is None or parallel.is_main
        saved = read_config(out) if resume else None
        if resume and saved is None:
            _fail(f"{out}: no saved run to resume")
        saved = saved or {}

        def given(value, key, default):
            return value if value is not None else saved.get(key, default)

        stream = stream or (Path(saved["stream"]) if "stream" in saved else default_stream_path())
        method, seed = given(method, "method", "ia3"), given(seed, "seed", 0)
        backbone, max_length = given(backbone, "backbone", "default"), given(max_length, "max_length", 128)
        max_train, max_test = given(max_train, "max_train", None), given(max_test, "max_test", None)
        data = _read_options(saved.get("data"), format=data_format, text_column=text_column,
                             label_column=label_column, task_column=task_column,
                             split_column=split_column, task_name=task_name,
                             test_fraction=test_fraction)
        tasks = [t.subsample_train(max_train, seed).subsample_test(max_test, seed)
                 for t in load_tasks(stream, data, seed=seed)]
        overrides = {k: v for k, v in {"epochs": epochs, "lr": lr, "head_lr": head_lr,
                                       "batch_size": batch_size, "precision": precision}.items()
                     if v is not None}
        config = BackboneConfig(backbone, max_length=max_length)
        torch.manual_seed(seed)
        adapt_layers = _adapt_layers(given(adapt_layers, "adapt_layers", None))
        lexical = given(lexical, "lexical", None)
        if lexical is not None and method != "ia3":
            raise ValueError(f"--lexical/--no-lexical applies to method 'ia3', not {method!r}")
        # Saved in the run's config only when given: runs saved before them resume unchanged.
        searched = {k: v for k, v in {"search": given(search, "search", None),
                                      "search_budget": given(search_budget, "search_budget", None)}.items()
                    if v is not None}
        pooled = {"pool_size": p} if (p := given(pool_size, "pool_size", None)) is not None else {}
        if pooled and method != "ia3":
            raise ValueError(f"--pool-size applies to method 'ia3', not {method!r}")
        if searched and method != "ia3":
            raise ValueError(f"--search applies to method 'ia3', not {method!r}")
        if workers is None and (worker_threads is not None or ray_address is not None):
            raise ValueError("--worker-threads and --ray-address apply with --workers")
        if method == "analytic":
            if overrides or adapt_layers is not None:
                raise ValueError(f"method 'analytic' is not trained by gradient; "
                                 f"{sorted([*overrides, *(['adapt_layers'] if adapt_layers else [])])} "
                                 "do not apply")
            train = None
            spec = LearnerSpec(config, "analytic", {"seed": seed})
        else:
            train = TrainConfig.from_dict({**(saved.get("train") or {}), **overrides, "seed": seed})
            spec = LearnerSpec(config, method, {"train": train.to_dict(), "adapt_layers": adapt_layers,
                                                **({"lexical": lexical} if lexical is not None else {}),
                                                **searched, **pooled})
        learner = ContinualLearner.from_spec(spec, device=device)
    except _user_errors() as exc:
        _fail(str(exc))
    top = (f"; scales in the top {learner.model.top_layers} of {learner.backbone.num_layers} layers"
           if learner.model.top_layers else "")
    together = f"; {parallel.world_size} processes, data-parallel" if parallel is not None else ""
    if main:
        console.print(f"stream [bold]{stream}[/]: {len(tasks)} tasks; backbone "
                      f"{learner.backbone.ref.name} ({learner.backbone_parameters:,} parameters) "
                      f"on {learner.device}; method {method}{top}{together}")
    run_config = {"stream": str(Path(stream).resolve()), "data": data.to_dict(),
                  "method": method, "seed": seed,
                  "adapt_layers": adapt_layers,
                  **({"lexical": lexical} if lexical is not None else {}),  # runs saved before it resume
                  **searched, **pooled,
                  "max_train": max_train, "train": train.to_dict() if train else None,
                  **({"max_test": max_test} if max_test is not None else {}),  # as `lexical`
                  "backbone": backbone, "max_length": max_length, "device": device,
                  "save_every": save_every, "stream_summary": describe(tasks),
                  **({"workers": workers, "worker_threads": worker_threads or 1,
                      "ray_address": ray_address} if workers else {})}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn()]
    tracker = _open_tracker(track, out.name, out, tracking_uri, run_config) if main else None
    report = None
    try:
        shown = Progress(*columns, console=console, transient=True) if main else contextlib.nullcontext()
        with shown as progress:
            events = RunProgress(progress, out) if main else None
            if tracker is not None:
                from .experiment.tracking import TrackedRun

                events = TrackedRun(events, tracker)
            if workers:
                from .experiment.ray_pool import run_stream_parallel

                report = run_stream_parallel(tasks, learner, out, events, run_config,
                                             workers=workers, address=ray_address,
                                             threads=worker_threads or 1, resume=resume,
                                             keep_versions=keep_versions)
            elif method == "joint":  # one training run over all tasks: nothing to resume between tasks
                if resume:
                    _fail("method 'joint' learns all tasks at once; a killed joint run is rerun, "
                          "not resumed")
                report = run_joint(tasks, learner, out, events, run_config)
            else:
                report = run_stream(tasks, learner, out, events, run_config,
                                    save_every=save_every, resume=resume,
                                    keep_versions=keep_versions)
    except (TrainingError, TaskLost) as exc:
        kept = list(learner.tasks)
        _fail(f"{exc}. The model in {out / 'model'} keeps the {len(kept)} task(s) learned "
              f"before: {kept}")
    except _user_errors() as exc:
        _fail(str(exc))
    finally:
        if tracker is not None:
            if report is not None:
                from .experiment.tracking import log_report

                log_report(tracker, report, out)
            tracker.end(ok=report is not None)
    if main:
        print_summary(report, out)


def _open_tracker(kind: str | None, name: str, out: Path, uri: str | None, params: dict):
    """The tracker `--track` asks for, with the run's settings logged; None without it."""
    if kind is None:
        return None
    from .experiment.tracking import open_tracker

    try:
        tracker = open_tracker(kind, name, out, uri)
    except _user_errors() as exc:
        _fail(str(exc))
    tracker.log_params(params)
    return tracker


def _adapt_layers(value: str | int | None) -> int | str | None:
    if value is None or value == "all" or isinstance(value, int):
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--adapt-layers must be a number >= 1 or 'all', got {value!r}")
    return int(value)


@app.command()
def bench(
    stream: Optional[Path] = typer.Argument(None, help=_STREAM_HELP),
    data_format: Optional[str] = _FORMAT,
    text_column: Optional[str] = _TEXT_COLUMN,
    label_column: Optional[str] = _LABEL_COLUMN,
    task_column: Optional[str] = _TASK_COLUMN,
    split_column: Optional[str] = _SPLIT_COLUMN,
    task_name: Optional[str] = _TASK_NAME,
    test_fraction: Optional[float] = _TEST_FRACTION,
    methods: str = typer.Option("ia3,analytic,finetune,ewc,lwf,replay,joint,tfidf",
                                help="Comma-separated methods to compare; besides the continual "
                                     "methods, the reference rows tfidf, independent (the whole "
                                     "backbone fine-tuned per task) and lora (per-task LoRA)."),
    out: Path = typer.Option(Path("runs/bench"), help="Output directory."),
    epochs: Optional[int] = typer.Option(None, help="Epochs per task, for every gradient method."),
    adapt_layers: Optional[str] = typer.Option(None, help="Top layers with scales, for every gradient method (a number or 'all') [default: 3]."),
    max_train: Optional[int] = typer.Option(None, help="At most N training examples per task (stratified)."),
    max_test: Optional[int] = typer.Option(None, min=1, help="At most N test examples per task (stratified) [default: all]."),
    seed: int = typer.Option(0, help="Random seed: same seed, same numbers."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds (instead of --seed): the whole bench once per seed (OUT/seed-N), then each method's mean ± standard deviation over them (OUT/bench_seeds.md)."),
    backbone: str = typer.Option("default", help="'default' (MiniLM-L6), a model folder or a hub id."),
    max_length: int = typer.Option(128, help="Maximum tokens per text."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda[:N]'."),
    isolate: bool = typer.Option(True, "--isolate/--in-process",
                                 help="Run each method in a fresh process (honest peak memory)."),
    resume: bool = typer.Option(False, help="Keep methods that already finished in --out with the same settings."),
    track: Optional[str] = typer.Option(None, "--track", help="Track the bench (one run per method) in 'mlflow' or 'tensorboard' (optional extras)."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI [default: ./mlruns, SQLite + files] or TensorBoard log folder [default: OUT/tensorboard]."),
):
    """Run every method on the same stream, backbone, seed and epochs; write a comparison."""
    from .experiment.bench import BenchError, run_bench, table_rows, task_rows

    options = dict(stream=stream, data_format=data_format, text_column=text_column,
                   label_column=label_column, task_column=task_column, split_column=split_column,
                   task_name=task_name, test_fraction=test_fraction, methods=methods,
                   epochs=epochs, adapt_layers=adapt_layers, max_train=max_train, max_test=max_test,
                   backbone=backbone, max_length=max_length, device=device, isolate=isolate)
    if seeds is not None:
        _bench_seeds(seeds, seed, track, out, resume, options)
        return
    try:
        config = _bench_config(seed=seed, **options)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"bench: {', '.join(config.methods)} on {stream or 'the bundled stream'}; "
                  f"seed {seed}, epochs {epochs or 'default'}, max-train {max_train or 'all'}")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn()]
    from .experiment.tracking import TrackedBench

    tracker = _open_tracker(track, out.name, out, tracking_uri, config.to_dict())
    events, result = None, None
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            events = BenchProgress(progress)
            if tracker is not None:
                events = TrackedBench(events, tracker, out)
            result = run_bench(config, out, events, resume=resume)
    except (*_user_errors(), BenchError) as exc:
        _fail(str(exc))
    finally:
        if tracker is not None:
            if result is not None:
                from .experiment.tracking import bench_artifacts

                tracker.log_artifacts(bench_artifacts(out))
            if isinstance(events, TrackedBench):
                events.close(ok=result is not None)
            else:  # the bench failed before it began
                tracker.end(ok=False)
    for title, (header, rows) in ((f"bench: {len(result['tasks'])} tasks, seed {seed}", table_rows(result)),
                                  ("accuracy on each task after the last one (%)", task_rows(result))):
        console.print(figures_table(title, header, rows))
    console.print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench_final_accuracy.png'}, "
                  f"{out / 'bench_accuracy_matrices.png'}, {out / 'bench_first_task.png'}")


def _bench_config(*, seed: int, stream, data_format, text_column, label_column, task_column,
                  split_column, task_name, test_fraction, methods: str, epochs, adapt_layers,
                  max_train, max_test, backbone, max_length, device, isolate):
    """`ctt bench`'s options as a `BenchConfig` (raises ValueError on a bad one)."""
    from .experiment.bench import BenchConfig

    return BenchConfig(methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
                       stream=str(stream) if stream else None, max_train=max_train, max_test=max_test,
                       epochs=epochs, seed=seed, backbone=backbone, max_length=max_length,
                       device=device, isolate=isolate, adapt_layers=_adapt_layers(adapt_layers),
                       data=_read_options(None, format=data_format, text_column=text_column,
                                          label_column=label_column, task_column=task_column,
                                          split_column=split_column, task_name=task_name,
                                          test_fraction=test_fraction))


def _bench_seeds(seeds: str, seed: int, track: str | None, out: Path, resume: bool,
                 options: dict) -> None:
    """`ctt bench --seeds`: the bench once per seed, then the spread table."""
    from .experiment.bench import BenchError, run_seeds, seed_rows

    try:
        if seed != 0:
            raise ValueError("give --seed or --seeds, not both")
        if track is not None:
            raise ValueError("--track records one bench; with --seeds, track each seed's bench "
                             "with --seed N --track instead")
        try:
            chosen = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds must be comma-separated whole numbers, got {seeds!r}") from None
        config = _bench_config(seed=0, **options)  # each bench gets its seed (run_seeds)
        if len(chosen) < 2 or len(set(chosen)) != len(chosen):
            raise ValueError(f"--seeds must name at least 2 different seeds, got {seeds!r}")
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"bench: {', '.join(config.methods)} on {options['stream'] or 'the bundled stream'}; "
                  f"seeds {', '.join(map(str, chosen))}, epochs {options['epochs'] or 'default'}, "
                  f"max-train {options['max_train'] or 'all'}")
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[loss]}"), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            summary = run_seeds(config, chosen, out, BenchProgress(progress), resume=resume)
    except (*_user_errors(), BenchError) as exc:
        _fail(str(exc))
    console.print(figures_table(f"bench over seeds {', '.join(map(str, chosen))}: mean ± std (%)",
                                 *seed_rows(summary)))
    console.print(f"wrote {out / 'bench_seeds.json'}, {out / 'bench_seeds.md'}; each seed's "
                  f"bench in {', '.join(str(out / b) for b in summary['benches'])}")


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model directory written by `ctt run` (DIR/model)."),
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to classify (or --input FILE)."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="Task to predict for; without it, the router picks one per text."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda[:N]'."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="Score every row of a file: plain text (.txt, one per line), JSONL, CSV/TSV or Parquet."),
    output: Optional[Path] = typer.Option(None, help="Where --input's predictions go: .csv or .jsonl [default: JSON lines on stdout]."),
    text_column: str = typer.Option("text", help="Column (or JSONL field) of the texts, with --input."),
    task_column: Optional[str] = typer.Option(None, help="Column naming each row's task, with --input."),
    input_format: Optional[str] = typer.Option(None, "--format", help="Format of --input: text, jsonl, csv, tsv or parquet [default: from the name]."),
    skip_bad_rows: bool = typer.Option(False, help="With --input: leave out rows without a text or with an unknown task, and count them."),
    precision: str = typer.Option("auto", help=PRECISION_HELP),
    top_k: int = typer.Option(1, "--top-k", min=1, help="Without --task: name each text's K most likely tasks with their probabilities."),
    min_task_confidence: Optional[float] = typer.Option(
        None, "--min-task-confidence", min=0.0, max=1.0,
        help="Without --task: below this probability of the routed task, answer 'ambiguous' with the candidate tasks instead of a label."),
    joint_k: int = typer.Option(1, "--joint-k", min=1, help="Without --task: each text's K most likely tasks answer it, and it goes to the one with the highest router probability x head certainty (1: the router alone)."),
):
    """Predict labels for texts, or for every row of a file (--input), with a saved model."""
    from .learner import ContinualLearner

    if (input_file is None) == (not texts):
        _fail("give texts to classify, or --input FILE (not both)")
    try:
        learner = ContinualLearner.load(model, device=device, precision=precision)
        if input_file is not None:
            _score(learner, input_file, output, task, text_column, task_column, input_format,
                   skip_bad_rows)
            return
        predictions = learner.predict(texts, task=task, top_k=top_k,
                                      min_task_confidence=min_task_confidence, joint_k=joint_k)
    except _user_errors() as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    if as_json:
        for text, p in zip(texts, predictions):
            print(json.dumps({"text": text, "status": p.status, "task": p.task, "label": p.label,
                              "probabilities": p.probabilities,
                              "task_probability": p.task_probability,
                              "candidates": [{"task": t, "probability": q} for t, q in p.candidates]}))
        return
    table = Table()
    ranked = task is None and (top_k > 1 or min_task_confidence is not None)
    for column in ("text", "task", "task p", "label", "p", *(["candidate tasks"] if ranked else [])):
        table.add_column(column)
    for text, p in zip(texts, predictions):
        routed = "given" if p.task_probability is None else f"{p.task_probability:.3f}"
        label = (p.label, f"{p.probabilities[p.label]:.3f}") if p.label is not None else ("-", "-")
        candidates = [", ".join(f"{t} {q:.3f}" for t, q in p.candidates)] if ranked else []
        table.add_row(text[:60], p.task or p.status, routed, *label, *candidates)
    console.print(table)


def _score(learner, input_file, output, task, text_column, task_column, input_format,
           skip_bad_rows) -> None:
    from .experiment.score import ScoreOptions, score_file

    options = ScoreOptions(text_column=text_column, task_column=task_column, task=task,
                           format=input_format, skip_bad_rows=skip_bad_rows)
    if output is None:  # JSON lines on stdout: nothing else may be printed there
        score_file(learner, input_file, None, options)
        return
    columns = [TextColumn("{task.description}"), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        bar = progress.add_task(f"scoring {input_file.name}", total=None)
        result = score_file(learner, input_file, output, options,
                            progress=lambda done: progress.update(bar, completed=done))
    rate = result.rows / result.seconds if result.seconds else float("nan")
    skipped = f"; {result.skipped:,} bad rows left out" if result.skipped else ""
    console.print(f"wrote {output}: {result.rows:,} predictions in {result.seconds:.1f}s "
                  f"({rate:,.0f} rows/s){skipped}")


@app.command()
def tasks(model: Path = typer.Argument(..., help="Model directory.")):
    """List the tasks a saved model knows, with labels and footprint."""
    from .io.checkpoint import read_manifest

    try:
        manifest = read_manifest(model)
    except _user_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"{model}: method {manifest['method']['name']}, backbone {manifest['backbone']['name']}")
    searched = any("search" in (t.get("stats") or {}) for t in manifest["tasks"])
    pooled = any("pool" in (t.get("stats") or {}) for t in manifest["tasks"])
    columns = ("task", "labels", *(["pool entry"] if pooled else []), "scale params",
               "head params", "lexical mix", *(["searched choice"] if searched else []),
               "bytes", "learned at")
    for column in columns:
        table.add_column(column)
    for t in manifest["tasks"]:
        stats = t.get("stats") or {}
        lexical = stats.get("lexical")
        mix = "-" if not lexical else f"{lexical['mix']:g}"
        choice = [search_choice(stats.get("search"))] if searched else []
        pool = [pool_entry(stats["pool"]) if "pool" in stats else "-"] if pooled else []
        table.add_row(t["name"], ", ".join(t["labels"]), *pool, f"{t['adapter_parameters']:,}",
                      f"{t['head_parameters']:,}", mix, *choice, f"{t['bytes_added']:,}",
                      t["learned_at"])
    console.print(table)
    # A model written by `ctt run` has the run's report beside it (DIR/model, DIR/report.json).
    report = model.parent / "report.json"
    if report.is_file():
        routing = json.loads(report.read_text()).get("routing") or {}
        console.print(f"routing, from {report}:")
        print_confused(routing)


@app.command()
def versions(model: Path = typer.Argument(..., help="Model directory.")):
    """List a model's versions, oldest first: when, its tasks, what changed (* = current)."""
    from .io.versions import list_versions

    try:
        found = list_versions(model)
    except _user_errors() as exc:
        _fail(str(exc))
    table = Table(title=f"{model}: {len(found)} version{'s' * (len(found) != 1)}")
    for column in ("version", "saved at", "tasks", "change"):
        table.add_column(column)
    for v in found:
        table.add_row(f"{v.number}{' *' if v.current else ''}", v.saved_at or "-",
                      ", ".join(v.tasks) or "-", v.change or "(written before versions)")
    console.print(table)


@app.command()
def rollback(model: Path = typer.Argument(..., help="Model directory."),
             version: int = typer.Argument(..., help="The version to restore (see `ctt versions`).")):
    """Make an earlier version's tasks current again, as a new version (the history only grows).

    Refused while a server writes to MODEL: roll a served model back with its admin endpoint."""
    from .io.versions import current_version, list_versions
    from .io.versions import rollback as roll_back
    from .io.writer_lock import WriterLock

    try:
        before = current_version(model)
        with WriterLock(model, "ctt rollback"):
            number = roll_back(model, version)
        tasks = list_versions(model)[-1].tasks
    except _user_errors() as exc:
        _fail(str(exc))
    if number == before:
        console.print(f"{model}: version {before} already holds version {version}'s content; "
                      "nothing written", highlight=False)
    else:
        console.print(f"{model}: version {number} = version {version} (tasks: "
                      f"{', '.join(tasks) or 'none'})", highlight=False)


@app.command()
def delete(model: Path = typer.Argument(..., help="Model directory."),
           task: str = typer.Argument(..., help="The task to remove."),
           data: Optional[Path] = typer.Option(None, help="The stream the task was learned from: with its training texts the router forgets the task exactly (checked against the task's fingerprint) [default: the texts' rows stay in the router's shared statistics as background data]."),
           max_train: Optional[int] = typer.Option(None, help="With --data: the --max-train the task was learned with."),
           seed: int = typer.Option(0, help="With --data: the --seed the task was learned with.")):
    """Remove a task from a saved model, as a new version (`ctt rollback` brings it back).

    Refused while a server writes to MODEL: delete a served task with DELETE /v1/tasks/NAME."""
    from .data.source import load_tasks
    from .io.writer_lock import WriterLock
    from .learner import ContinualLearner

    try:
        with WriterLock(model, "ctt delete"):
            learner = ContinualLearner.load(model, device="cpu")
            texts = None
            if data is not None:
                found = {t.name: t for t in load_tasks(data, seed=seed)}
                if task not in found:
                    raise ValueError(f"{data} holds no task {task!r}; it holds {sorted(found)}")
                texts = [e.text for e in found[task].subsample_train(max_train, seed).train]
            learner.delete(task, texts)
            learner.save(model)
    except _user_errors() as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    how = ("its share of the router's statistics taken out" if texts is not None else
           "its training rows stay in the router's shared statistics as background data "
           "(--data to take them out)")
    console.print(f"{model}: task {task!r} deleted, {how}; tasks left: "
                  f"{', '.join(learner.tasks) or 'none'}", highlight=False)


@app.command()
def prune(model: Path = typer.Argument(..., help="Model directory."),
          keep: int = typer.Option(..., "--keep", help="Versions to keep, the newest (>= 1).")):
    """Remove all but the newest KEEP versions, then the files no kept version lists.

    Refused while a server writes to MODEL (it holds the directory's writer lock)."""
    from .io.versions import prune as prune_versions
    from .io.writer_lock import WriterLock

    try:
        with WriterLock(model, "ctt prune"):
            pruned = prune_versions(model, keep)
    except _user_errors() as exc:
        _fail(str(exc))
    console.print(f"{model}: kept versions {list(pruned.kept)}; removed versions "
                  f"{list(pruned.removed)} and {len(pruned.files_removed)} files "
                  f"({pruned.bytes_freed:,} bytes)", highlight=False)


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Model directory written by `ctt run` (DIR/model)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    device: Optional[str] = typer.Option(None, help="'auto', 'cpu' or 'cuda[:N]' (default: CTT_DEVICE or auto)."),
    access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="Log every request (one line each; CTT_LOG_FORMAT=json for JSON lines)."),
    precision: Optional[str] = typer.Option(None, help=f"{PRECISION_HELP} Default: CTT_PRECISION or auto."),
    role: Optional[str] = typer.Option(None, help="writer: the one server that learns, deletes and rolls back MODEL (it locks the directory); reader: predicts and serves each new version the writer saves, within CTT_RELOAD_INTERVAL_MS. Default: CTT_ROLE or writer."),
):
    """Serve every task over HTTP and learn new ones while serving.

    Settings come from CTT_* environment variables or a .env file: CTT_ADMIN_KEY (learn, delete,
    everything), CTT_API_KEYS (comma-separated; read and predict), scoped JWTs (CTT_JWT_SECRET,
    CTT_JWT_PUBLIC_KEY or CTT_JWT_JWKS), CTT_PUBLIC_PREDICT, CTT_LOG_FORMAT, limits and
    batching; see docs/serving.md. API documentation: http://HOST:PORT/docs.
    """
    import uvicorn
    from pydantic import ValidationError

    from .io.checkpoint import read_manifest
    from .io.writer_lock import WriterLock
    from .server.app import create_app
    from .server.settings import Settings

    try:
        given = {"device": device} if device else {}
        if precision:
            given["precision"] = precision
        if not access_log:
            given["access_log"] = False
        if role:
            given["role"] = role
        settings = Settings(model_dir=model, **given)
        read_manifest(model)
        if settings.writes:  # a second writer stops here, naming the first (the app takes the lock)
            WriterLock(model, "ctt serve").acquire().release()
    except ValidationError as exc:
        _fail("; ".join(setting_error(e) for e in exc.errors()))
    except _user_errors() as exc:
        _fail(str(exc))
    # The app logs each request itself (request id, caller, tasks; CTT_LOG_FORMAT=json for
    # JSON lines), so uvicorn's own access log is off.
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False,
                log_level="info", timeout_graceful_shutdown=10)


@app.command()
def export(
    model: Path = typer.Argument(..., help="Model directory written by `ctt run` (DIR/model)."),
    out: Path = typer.Argument(..., help="Folder to write (new or empty)."),
    kind: str = typer.Option(..., "--format", help="'peft': one task as a PEFT IA3 adapter + its "
                                                     "head; 'onnx': tasks in one ONNX graph."),
    task: Optional[List[str]] = typer.Option(None, "--task", "-t", help="Task to export (repeat "
                                             "for several; onnx default: every task)."),
):
    """Export tasks for other runtimes: a PEFT IA3 adapter, or an ONNX model for onnxruntime."""
    from .io.export import ExportError, export_onnx, export_peft
    from .learner import ContinualLearner

    try:
        if kind not in ("peft", "onnx"):
            raise ValueError(f"unknown export format {kind!r}; expected 'peft' or 'onnx'")
        if kind == "peft" and len(task or []) != 1:
            raise ValueError(f"--format peft exports one task: give one --task, got {task or []}")
        learner = ContinualLearner.load(model, device="cpu")
        tasks = task or list(learner.tasks)
        for name in tasks:
            learner.require(name)
        if kind == "peft":
            written = export_peft(learner.model, learner.method, tasks[0], out)
        else:
            written = export_onnx(learner.model, learner.method, tasks, out)
    except (*_user_errors(), ExportError) as exc:
        _fail(str(exc.args[0]) if isinstance(exc, KeyError) else str(exc))
    files = ", ".join(sorted(p.name for p in written.iterdir()))
    console.print(f"wrote {written}: {files} ({kind}; tasks {tasks})", highlight=False)
    lexical = [name for name in tasks if name in learner.model.lexical]
    if lexical:
        console.print(f"note: {lexical} also have a lexical branch, which the export does not "
                      "hold: the exported graph gives their neural answers, not `ctt predict`'s "
                      "fused ones", highlight=False)


federated_app = typer.Typer(no_args_is_help=True, help="Learn one task across clients that keep "
                            "their texts (Flower; extra: federated). See docs/federated.md.")
app.add_typer(federated_app, name="federated")


@federated_app.command("simulate")
def federated_simulate(
    stream: Path = typer.Argument(..., help="Stream file holding the task (its test split tests it)."),
    task: str = typer.Option(..., help="The task to learn."),
    clients: int = typer.Option(4, min=1, help="Clients, each with a label-skewed shard."),
    rounds: int = typer.Option(5, min=1, help="Rounds (analytic: always 1)."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    mu: float = typer.Option(0.0, min=0.0, help="FedProx proximal weight (0: FedAvg)."),
    alpha: float = typer.Option(0.5, help="Dirichlet skew of labels over clients (small: strong)."),
    max_train: Optional[int] = typer.Option(None, help="At most N training texts in all, before sharding."),
    method: str = typer.Option("ia3", help="ia3 or analytic."),
    model: Optional[Path] = typer.Option(None, help="Model directory the task joins [default: OUT/model]."),
    out: Path = typer.Option(Path("runs/federated"), help="Output directory: shards/, model/, result.json."),
    min_clients: int = typer.Option(2, min=1, help="Usable replies a round needs."),
    backbone: str = typer.Option("default", help="Backbone of a new model."),
    adapt_layers: int = typer.Option(0, min=0, help="Top layers with scales, new ia3 model (0: default)."),
    seed: int = typer.Option(0, help="Random seed."),
    cpus: int = typer.Option(2, min=1, help="CPUs the simulation engine (Ray) may use."),
):
    """Learn TASK across CLIENTS simulated clients (Flower's simulation engine) into a model."""
    try:
        from .federated.apps import FederatedConfig, simulate_stream

        config = FederatedConfig(model=str(model) if model else FederatedConfig.model, task=task,
                                 rounds=rounds, epochs=epochs, mu=mu, min_clients=min_clients,
                                 method=method, backbone=backbone, adapt_layers=adapt_layers, seed=seed)
        result = simulate_stream(stream, config, clients, out, alpha=alpha, union_max_train=max_train,
                                 cpus=cpus)
    except (*_user_errors(), RuntimeError) as exc:
        _fail(str(exc))
    record = result.record
    console.print(f"task {record['name']!r} learned from {record['stats']['federated']['clients']} "
                  f"clients ({record['train_examples']} texts) in {record['train_seconds']:.1f} s",
                  highlight=False)
    for rnd, accuracy in result.accuracy_per_round.items():
        sent = result.bytes_per_client_round.get(rnd, [])
        console.print(f"round {rnd}: test accuracy {100 * accuracy:.2f} %; bytes sent per client "
                      f"{sent}", highlight=False)
    for refusal in result.refused:
        console.print(f"refused in round {refusal['round']}: {refusal['reason']}", highlight=False)
    console.print(f"wrote {out / 'result.json'}", highlight=False)


@federated_app.command("shard")
def federated_shard(
    stream: Path = typer.Argument(..., help="Stream file holding the task."),
    task: str = typer.Option(..., help="The task to cut."),
    clients: int = typer.Option(2, min=1, help="Number of shards."),
    alpha: float = typer.Option(0.5, help="Dirichlet skew of labels over clients (small: strong)."),
    max_train: Optional[int] = typer.Option(None, help="At most N training texts in all."),
    out: Path = typer.Option(Path("shards"), help="Directory for client-<i>.jsonl."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Cut a task's training texts into label-skewed shards, one file per client."""
    try:
        from .data.source import load_tasks
        from .federated.shards import label_skewed, write_shards

        tasks = {t.name: t for t in load_tasks(stream, seed=seed)}
        if task not in tasks:
            raise ValueError(f"{stream}: no task {task!r}; tasks: {list(tasks)}")
        chosen = tasks[task].subsample_train(max_train, seed)
        paths = write_shards(chosen, label_skewed(chosen, clients, alpha, seed), out)
    except _user_errors() as exc:
        _fail(str(exc))
    for path in paths:
        console.print(str(path), highlight=False)


if __name__ == "__main__":  # pragma: no cover
    app()
