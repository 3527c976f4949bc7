"""What `ctt` prints: tables of figures, progress bars and the run's summary (rich).

The commands in `cli.py` parse, call the library and hand what it returns to these.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

console = Console()


def matrix_table(R, names: list[str], title: str) -> Table:
    from .experiment.plots import matrix_rows

    table = Table(title=title, title_justify="left")
    table.add_column("after \\ on", style="bold")
    for name in names:
        table.add_column(name, justify="right")
    for row in matrix_rows(R, names):
        table.add_row(*row)
    return table


def figures_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    """A table of figures: the first column names the row, the others are right-aligned."""
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


class RunProgress:
    """Progress bars and the accuracy matrix after every task."""

    def __init__(self, progress: Progress, out: Path):
        self.progress = progress
        self.out = out
        self.train_bar = None
        self.eval_bar = None

    def resumed(self, done, task, step):
        where = (f"; task {task!r} continues from step {step}" if step is not None
                 else f"; task {task!r} starts again" if task else "")
        self.progress.console.print(f"continuing the run in {self.out}: {len(done)} task(s) "
                                    f"already learned {done}{where}")

    def task_started(self, index, total, task):
        self.progress.console.rule(f"task {index + 1}/{total}: {task.name} "
                                   f"({len(task.labels)} labels, {len(task.train)} train, "
                                   f"{len(task.test)} test)")
        self.train_bar = self.progress.add_task(f"train {task.name}", total=None, loss="")

    def train_step(self, done, total, loss):
        self.progress.update(self.train_bar, completed=done, total=total, loss=f"loss {loss:.3f}")

    def evaluation_started(self, index, tasks):
        self.eval_bar = self.progress.add_task("evaluate", total=len(tasks), loss="")

    def evaluated(self, task, accuracy):
        self.progress.advance(self.eval_bar)

    def task_finished(self, index, record, matrix, names):
        self.progress.remove_task(self.train_bar)
        self.progress.remove_task(self.eval_bar)
        kib = record.bytes_added / 1024
        self.progress.console.print(
            f"learned [bold]{record.name}[/] in {record.train_seconds:.1f}s; added "
            f"{record.adapter_parameters:,} scale + {record.head_parameters:,} head numbers "
            f"({kib:.1f} KiB stored, routing statistics included)"
        )
        self.progress.console.print(matrix_table(matrix, names, "accuracy matrix so far (%)"))


def percent(value: float | None, spec: str = "{:.2f}") -> str:
    return "n/a" if value is None else spec.format(100 * value)


def print_pool(rows: list[dict]) -> None:
    table = Table(title="pool: each task's entry and what it cost earlier tasks (docs/pool.md)",
                  title_justify="left")
    for column in ("task", "entry", "decision", "start", "TransRate gain", "LEEP gain",
                   "entries", "scale numbers", "worst old-task change (points)"):
        table.add_column(column, justify="right")
    for r in rows:
        gain, leep = r["transrate_gain"], r["leep_gain"]
        table.add_row(r["task"], r["entry"], r["decision"], r["start"] or "-",
                      "-" if gain is None else f"{gain:+.3f}", "-" if leep is None else f"{leep:+.3f}",
                      str(r["entries"]), f"{r['scale_numbers']:,}",
                      f"{100 * r['worst_old_change']:+.2f}")
    console.print(table)


def print_summary(report: dict, out: Path) -> None:
    m = report["metrics"]
    names = report["tasks"]
    table = Table(title="per task (final model)", title_justify="left")
    for column in ("task", "acc %", "task-free %", "routed %", "train s", "scale params",
                   "head params", "bytes", "scales % of backbone", "peak RSS MiB"):
        table.add_column(column, justify="right")
    final, free = report["accuracy_matrix"][-1], report["task_free_accuracy_matrix"][-1]
    routed = report["routing"]["per_task"]
    for j, row in enumerate(report["per_task"]):
        table.add_row(row["task"], f"{100 * final[j]:.1f}", f"{100 * free[j]:.1f}",
                      f"{100 * routed[row['task']]:.1f}", f"{row['train_seconds']:.1f}",
                      f"{row['adapter_parameters']:,}", f"{row['head_parameters']:,}",
                      f"{row['bytes_added']:,}", f"{row['adapter_percent_of_backbone']:.4f}",
                      f"{row['peak_rss_mb']:.0f}")
    console.print(table)
    confusion = Table(title="routing: true task (rows) -> predicted task (columns)",
                      title_justify="left")
    confusion.add_column("")
    for name in names:
        confusion.add_column(name[:12], justify="right")
    for name, row in zip(names, report["routing"]["confusion"]):
        confusion.add_row(name, *[str(v) for v in row])
    console.print(confusion)
    if report.get("pool"):
        print_pool(report["pool"])
    print_confused(report["routing"])
    compared = report.get("precision")
    if compared and compared["prediction"] != "fp32":
        used = compared["prediction"]
        worst = max(compared["per_task"].items(), key=lambda kv: abs(kv[1][used] - kv[1]["fp32"]))
        console.print(
            f"predicted in {used}: accuracy within {100 * compared['largest_difference']:.2f} points "
            f"of fp32 on every task (largest on {worst[0]}: {100 * worst[1][used]:.2f} vs "
            f"{100 * worst[1]['fp32']:.2f}); --precision fp32 predicts in fp32")
    fwt, bwt = percent(m["fwt"], "{:+.2f}"), percent(m["bwt"], "{:+.2f}")
    forgetting = percent(m["forgetting"])
    console.print(
        f"ACC {100 * m['acc']:.2f}  BWT {bwt}  forgetting "
        f"{forgetting}  FWT {fwt}  |  task-free ACC {100 * m['task_free_acc']:.2f}  "
        f"routing {100 * m['routing_acc']:.2f}%  |  total {report['total_seconds']:.1f}s"
    )
    shared = report["shared_state_numbers"]
    if any(shared.values()):
        console.print(f"shared state: router {shared['router']:,} numbers, method "
                      f"{shared['method']:,} numbers (float64; constant in the number of examples)")
    console.print(f"wrote {out / 'model'}, {out / 'report.json'}, {out / 'accuracy_matrix.png'}, "
                  f"{out / 'task_free_accuracy_matrix.png'}")


class BenchProgress:
    """`ctt bench` progress: which method, which task, the training bar, a line per method."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.methods_bar = None
        self.train_bar = None

    def seed_started(self, index, total, seed):
        if self.methods_bar is not None:  # a bar of this seed's methods
            self.progress.remove_task(self.methods_bar)
            self.methods_bar = None
        self.progress.console.rule(f"seed {seed} ({index + 1}/{total})", characters="=")

    def method_started(self, index, total, method):
        if self.methods_bar is None:
            self.methods_bar = self.progress.add_task("methods", total=total, loss="")
        self.progress.console.rule(f"method {index + 1}/{total}: {method}")

    def task_started(self, method, index, total, task, train_examples):
        self._drop_train_bar()
        self.train_bar = self.progress.add_task(
            f"{method}: task {index + 1}/{total} {task} ({train_examples} train)", total=None, loss="")

    def train_step(self, done, total, loss):
        self.progress.update(self.train_bar, completed=done, total=total, loss=f"loss {loss:.3f}")

    def evaluating(self, method, tasks):
        self.progress.update(self.train_bar, loss=f"evaluating {tasks} task(s)")

    def task_finished(self, method, index, accuracies):
        cells = " ".join("  -  " if a is None else f"{100 * a:5.1f}" for a in accuracies)
        self.progress.console.print(f"{method}: after task {index + 1}, accuracy % {cells}")

    def method_finished(self, method, row):
        self._drop_train_bar()
        self.progress.advance(self.methods_bar)
        from .experiment.bench import format_figure

        self.progress.console.print(
            f"[bold]{method}[/]: ACC {format_figure(row['acc'], '.1f', 100)}  BWT {format_figure(row['bwt'], '+.1f', 100)}  "
            f"task-free {format_figure(row['task_free_acc'], '.1f', 100)}  train {row['train_seconds']:.0f}s  "
            f"peak RSS {format_figure(row['peak_rss_mb'], '.0f')} MiB")

    def _drop_train_bar(self):
        if self.train_bar is not None:
            self.progress.remove_task(self.train_bar)
            self.train_bar = None


def print_confused(routing: dict) -> None:
    """The task pairs the router confuses and its calibration error, from a run's report."""
    if routing.get("ece") is not None:
        console.print(f"router calibration error (ECE) {routing['ece']:.4f}")
    pairs = routing.get("confused_pairs")
    if pairs is None:
        return
    share = 100 * routing.get("confused_share", 0.1)
    if not pairs:
        console.print(f"no task sends {share:.0f} % or more of its test inputs to another task")
        return
    console.print(f"tasks the router confuses (>= {share:.0f} % of one task's test inputs routed to "
                  "the other; pass the task name for these):")
    for pair in pairs:
        console.print(f"  {pair['task']} -> {pair['routed_to']}: {100 * pair['share']:.1f} %")


def pool_entry(pool: dict) -> str:
    """A task's pool entry and how it got it: "entry1 (merge)"."""
    return f"{pool['entry']} ({pool['decision']})"


def search_choice(search: dict | None) -> str:
    """A task's searched configuration in one cell of `ctt tasks`."""
    if not search:
        return "-"
    if "best" not in search:
        return f"none: {search.get('why', '')}"
    best = search["best"]
    return (f"lr {best['lr']:.3g}, head_lr {best['head_lr']:.3g}, {best['epochs']} epochs, "
            f"top {best['top_layers']} layers (val {100 * search['best_score']:.1f}, "
            f"{search['trials']} trials)")


def setting_error(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error.get("loc"):
        return message
    return f"CTT_{str(error['loc'][0]).upper()}: {message}"
