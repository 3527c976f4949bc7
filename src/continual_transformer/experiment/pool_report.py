"""The report's account of a pool run (`ia3` with `pool_size`, docs/pool.md): per task, the
entry it reads, how it got it, the scores it was chosen by, and what each task cost the tasks
before it (their task-given accuracy after it, against before it)."""

from __future__ import annotations

import numpy as np


def pool_summary(per_task: list[dict], R: np.ndarray, names: list[str]) -> list[dict] | None:
    """One row per finished task of a pool run; None when the run had no pool."""
    pools = [(entry.get("train_stats") or {}).get("pool") for entry in per_task]
    if not any(pools):
        return None
    rows = []
    for i, pool in enumerate(pools):
        if pool is None:
            continue
        best = pool.get("best")
        scores = pool["scores"].get(best, {}) if best else {}
        change = {names[j]: float(R[i, j] - R[i - 1, j]) for j in range(i)
                  if not np.isnan(R[i, j]) and not np.isnan(R[i - 1, j])}
        rows.append({
            "task": names[i], "entry": pool["entry"], "decision": pool["decision"],
            "start": pool.get("start"), "best": best,
            "transrate_gain": scores.get("gain"), "leep_gain": scores.get("leep_gain"),
            "entries": pool.get("entries"), "scale_numbers": pool.get("scale_numbers"),
            "merge_old_agreement": (pool.get("merge") or {}).get("old_agreement"),
            "old_accuracy_change": change,
            "worst_old_change": min(change.values(), default=0.0),
        })
    return rows
