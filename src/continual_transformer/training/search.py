"""Per-task hyperparameter search on the validation split, with Optuna.

A study per task: the TPE sampler (seeded, so the same data and seed give the same trials) draws
a configuration, `evaluate` trains with it and returns its score on texts held out from
training. While it trains, a trial reports its validation score at numbered points (a method
reports a few times an epoch); successive halving (Optuna's `SuccessiveHalvingPruner`) lets
only the best third of the trials that reached a point go on to three times as many points, so
most trials stop after a fraction of an epoch and a study of N trials costs far less than N
training runs. The first trial may be given (a method gives its defaults): a study then never
chooses anything that scored below the defaults on validation, and, without a budget in
seconds, it stops at `DEFAULT_BUDGET_MULTIPLE` times that first trial's time (a trial running
at that moment stops at its next report), so a search costs about that many default runs.
Nothing here knows what is trained: the method supplies the search space and the evaluation.
Optuna is an optional engine (`pip install 'continual-tiny-transformer[search]'`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..extras import import_extra

# Successive halving: the first judgement after this many reported points; then a trial goes
# on only if it is in the best 1/REDUCTION of the trials judged at that point.
MIN_POINTS = 1
REDUCTION = 3
# A study's time, in first trials, when no budget is given: with the work outside the study
# (the trunk pass, the lexical branch) and the trial that runs past the deadline, 5 made a
# task's learning 5.4-5.6x the defaults' (MiniLM, bundled stream); 4 keeps it under 5x.
DEFAULT_BUDGET_MULTIPLE = 4
MIN_DEFAULT_BUDGET = 10.0  # seconds: a first trial of a fraction of a second would leave none


@dataclass(frozen=True)
class SearchConfig:
    """`trials` configurations at most, stopping early after `budget_seconds` (None: no limit,
    or `DEFAULT_BUDGET_MULTIPLE` first trials when the first trial is given)."""

    trials: int
    budget_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.trials, bool) or not isinstance(self.trials, int) or self.trials < 1:
            raise ValueError(f"search trials must be a whole number >= 1, got {self.trials!r}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            raise ValueError(f"search budget must be > 0 seconds, got {self.budget_seconds!r}")


class Pruned(Exception):
    """Raised inside `evaluate` by `report` when the pruner stops the trial."""


@dataclass
class SearchResult:
    """The best configuration, its validation score, and every trial (JSON-ready)."""

    best: dict
    best_score: float
    best_trial: int
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        pruned = sum(t["state"] == "pruned" for t in self.trials)
        stopped = sum(t["state"] == "stopped" for t in self.trials)
        return {"best": self.best, "best_score": self.best_score, "best_trial": self.best_trial,
                "trials": len(self.trials), "pruned": pruned, "stopped": stopped,
                "seconds": round(self.seconds, 2),
                "history": self.trials}


def run_search(
    config: SearchConfig,
    space: Callable[[Any], dict],
    evaluate: Callable[[dict, Callable[[int, float], None]], float],
    first: dict | None = None,
) -> SearchResult:
    """Maximise `evaluate(params, report)` over `params = space(trial)`.

    `space(trial)` draws a configuration with Optuna's `trial.suggest_*`; `evaluate` trains
    with it, calls `report(point, score)` at numbered points 1, 2, ... while it trains (which
    raises `Pruned` when the pruner stops the trial) and returns the final validation score
    (higher is better). `first`, when given, is the first configuration tried (with the values
    `space` would draw), evaluated with `report=None`; the study's deadline is then counted
    from its time unless the config sets one (at least `MIN_DEFAULT_BUDGET`). A trial past the
    deadline stops at its next report (the first trial never does).
    """
    optuna = import_extra("optuna", "search")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=config.seed, n_startup_trials=min(5, config.trials)),
        pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=MIN_POINTS,
                                                      reduction_factor=REDUCTION),
    )
    if first is not None:
        study.enqueue_trial(first)
    history: list[dict] = []
    start = time.perf_counter()
    deadline = start + config.budget_seconds if config.budget_seconds is not None else float("inf")

    def objective(trial) -> float:
        nonlocal deadline
        params = space(trial)
        began = time.perf_counter()
        reported: list[int] = []

        def report(point: int, score: float) -> None:
            trial.report(score, point)
            reported.append(point)
            if trial.number > 0 and time.perf_counter() > deadline:
                raise Pruned("out of time")
            if trial.should_prune():
                raise Pruned(f"pruned at point {point} at {score:.4f}")

        entry = {"trial": trial.number, "params": params}
        try:
            # The given first trial is never pruned or stopped: it reports nothing, so that it
            # costs what a run with its settings costs (the budget is counted in it).
            given_first = trial.number == 0 and first is not None
            score = float(evaluate(params, None if given_first else report))
        except Pruned as stop:
            entry.update(state="stopped" if str(stop) == "out of time" else "pruned", score=None,
                         points=reported[-1] if reported else None,
                         seconds=round(time.perf_counter() - began, 2))
            history.append(entry)
            raise optuna.TrialPruned() from None
        finally:
            if trial.number == 0 and first is not None and config.budget_seconds is None:
                deadline = start + max(MIN_DEFAULT_BUDGET,
                                          DEFAULT_BUDGET_MULTIPLE * (time.perf_counter() - start))
        entry.update(state="complete", score=score, seconds=round(time.perf_counter() - began, 2))
        history.append(entry)
        return score

    def stop_when_out_of_time(study, _trial) -> None:
        if time.perf_counter() > deadline:
            study.stop()

    study.optimize(objective, n_trials=config.trials, callbacks=[stop_when_out_of_time],
                   catch=(), gc_after_trial=True)
    completed = [t for t in history if t["state"] == "complete"]
    if not completed:
        raise RuntimeError(f"no search trial completed ({len(history)} pruned or out of time)")
    best = max(completed, key=lambda t: t["score"])  # the first of equal scores, as Optuna's
    return SearchResult(best=best["params"], best_score=best["score"], best_trial=best["trial"],
                        trials=history, seconds=time.perf_counter() - start)
