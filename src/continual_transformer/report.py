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
    from .checkpoint import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path


def matrix_rows(R, names: list[str]) -> list[list[str]]:
    """Rows of strings for printing a (partial) accuracy matrix, in percent."""
    R = np.asarray(R, dtype=float)
    rows = []
    for i, name in enumerate(names):
        cells = ["" if np.isnan(v) else f"{100 * v:.1f}" for v in R[i]]
        rows.append([name] + cells)
    return rows
