"""Tables and plots from results (report.json or an in-memory accuracy matrix)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_heatmap(R, names: list[str], path: Path, title: str) -> Path:
    """A labelled heatmap of an accuracy matrix; cells above the diagonal stay blank.

    Written atomically: a killed process leaves the old picture or the new one, never half.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(R, dtype=float)
    size = max(4.0, 1.1 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(np.ma.masked_invalid(R), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), labels=names, rotation=35, ha="right")
    ax.set_yticks(range(len(names)), labels=[f"after {n}" for n in names])
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after learning task i")
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not np.isnan(R[i, j]):
                ax.text(j, i, f"{100 * R[i, j]:.1f}", ha="center", va="center",
                        color="white" if R[i, j] < 0.6 else "black", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    from ..io import store

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    store.atomic_write(path, buffer.getvalue())
    return path


def matrix_rows(R, names: list[str]) -> list[list[str]]:
    """Rows of strings for printing a (partial) accuracy matrix, in percent."""
    R = np.asarray(R, dtype=float)
    rows = []
    for i, name in enumerate(names):
        cells = ["" if np.isnan(v) else f"{100 * v:.1f}" for v in R[i]]
        rows.append([name] + cells)
    return rows


def write_bench_plots(bench: dict, out: Path) -> list[Path]:
    """The three figures of `ctt bench`: final accuracy per method (bars), every method's
    accuracy matrix (heatmaps), accuracy on the first task after each task (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, names = bench["methods"], bench["tasks"]
    methods = [r["method"] for r in rows]
    paths = []

    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    acc = [100 * r["acc"] for r in rows]
    free = [np.nan if r["task_free_acc"] is None else 100 * r["task_free_acc"] for r in rows]
    ax.bar(x - 0.2, acc, 0.4, label="task given (ACC)")
    ax.bar(x + 0.2, free, 0.4, label="task-free")
    for xi, value in zip(x, acc):
        ax.text(xi - 0.2, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    ax.set_xticks(x, labels=methods)
    ax.set_ylim(0, 105)
    ax.set_ylabel("final accuracy over all tasks (%)")
    ax.set_title("final accuracy per method", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(_save(fig, out / "bench_final_accuracy.png"))

    columns = min(4, len(rows))
    lines = (len(rows) + columns - 1) // columns
    fig, axes = plt.subplots(lines, columns, figsize=(3.4 * columns, 3.2 * lines), squeeze=False)
    for ax, row in zip(axes.flat, rows):
        R = np.array([[np.nan if v is None else v for v in r] for r in row["accuracy_matrix"]])
        ax.imshow(np.ma.masked_invalid(R), vmin=0.0, vmax=1.0, cmap="viridis")
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                if not np.isnan(R[i, j]):
                    ax.text(j, i, f"{100 * R[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if R[i, j] < 0.6 else "black")
        ax.set_title(row["method"], fontsize=9)
        ax.set_xticks(range(len(names)), labels=[str(j + 1) for j in range(len(names))])
        ax.set_yticks(range(len(names)), labels=[str(i + 1) for i in range(len(names))])
        ax.set_xlabel("on task j", fontsize=8)
        ax.set_ylabel("after task i", fontsize=8)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("accuracy on task j after learning task i (%); tasks: "
                 + ", ".join(f"{j + 1} {n}" for j, n in enumerate(names)), fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "bench_accuracy_matrices.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(1, len(names) + 1)
    for row in rows:
        curve = np.array([np.nan if v is None else 100 * v for v in row["first_task_accuracy"]])
        marker = "o" if np.isnan(curve).sum() < len(curve) - 1 else "*"
        ax.plot(steps, curve, marker=marker, markersize=9 if marker == "*" else 5, label=row["method"])
    ax.set_xticks(steps, labels=[f"after {n}" for n in names], rotation=30, ha="right")
    ax.set_ylabel(f"accuracy on {names[0]} (%)")
    ax.set_title("accuracy on the first task as tasks arrive", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(_save(fig, out / "bench_first_task.png"))
    return paths


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
