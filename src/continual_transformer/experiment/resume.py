"""Start a run in DIR, or continue the one saved there.

A run writing to DIR can be killed at any moment and continued by running it again on the same
DIR: finished tasks are not redone, the interrupted task continues from its last save (every
`save_every` training steps), and the result equals an uninterrupted run's. A run is continued
only with the settings it was started with: the same tasks, method, backbone weights and
run config (but for `runstate.NOT_COMPARED`). What is saved: `io/runstate.py`.
"""

from __future__ import annotations

from pathlib import Path

from ..io import runstate
from ..io.runstate import RunState
from ..learner import ContinualLearner
from ..training.loop import TrainState, restore_rng, rng_tensors
from ..types import Task
from .report import FWT_REFERENCE, fwt_reference


def run_identity(tasks: list[Task], learner: ContinualLearner) -> dict:
    """What a run learns: the exact data, the method and its settings, the backbone's weights."""
    config = learner.backbone.config.to_dict()
    config.pop("name")  # a moved folder is the same backbone; its hash says whether it is
    return {
        "tasks": [t.name for t in tasks],
        "tasks_sha256": runstate.tasks_digest(tasks),
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "backbone": {"sha256": learner.backbone.ref.sha256, "config": config},
    }


def open_run(tasks: list[Task], learner: ContinualLearner, out: Path | None, config: dict,
             resume: bool, measure: bool = True) -> tuple[RunState, TrainState | None, bool]:
    """The state of the run writing to `out`: a new one, or the one saved there, checked to be
    this run and loaded into `learner` (`resume=True` requires one). Without `measure` a new
    run leaves out the accuracies it reports before learning (a process that does not report).

    Returns the state, the interrupted task's training state (None: no task was interrupted
    mid-training, or nothing is saved) and whether a saved run was continued."""
    identity = run_identity(tasks, learner)
    saved = runstate.read(out) if out is not None else None
    if saved is None:
        if resume:
            raise ValueError(f"{out}: no saved run to resume ({runstate.state_dir(out) / runstate.STATE} "
                             "does not exist)")
        return _start(tasks, learner, out, config, identity, measure), None, False
    state, train_state = saved
    _continue(tasks, learner, out, state, config, identity)
    if train_state is None:
        # With a training state, the RNG is restored from it when its task resumes.
        restore_rng(runstate.decode_rng(state.rng, runstate.state_dir(out)))
    return state, train_state, True


def save_progress(out: Path, state: RunState, train: TrainState | None = None) -> None:
    """Record the run so far, with the RNG as it is now (and the interrupted task's training
    state), so that a killed run continues from here."""
    state.rng = runstate.encode_rng(rng_tensors())
    runstate.write(out, state, train)


def manifest_sha256(out: Path) -> str:
    """Of DIR/model/manifest.json: a run continues only on the model it last wrote."""
    from ..io.store import sha256_bytes

    return sha256_bytes((out / "model" / "manifest.json").read_bytes())


def _start(tasks: list[Task], learner: ContinualLearner, out: Path | None, config: dict,
           identity: dict, measure: bool) -> RunState:
    if out is not None:
        if learner.tasks:
            raise ValueError(f"a run writing to {out} needs a learner without tasks; this one has "
                             f"{list(learner.tasks)}")
        if (out / "model").exists():
            raise ValueError(f"{out / 'model'} exists, but {out} holds no saved run to continue; "
                             "use a new --out (or remove that directory)")
    # Only methods with a measured FWT need b_i, measured now, before anything is learned.
    reference = ([learner.evaluate_unlearned(t) for t in tasks]
                 if measure and fwt_reference(learner) == FWT_REFERENCE else None)
    return RunState(config=config, identity=identity, reference=reference)


def _continue(tasks: list[Task], learner: ContinualLearner, out: Path, state: RunState,
              config: dict, identity: dict) -> None:
    """Check that the saved run is this run, and load its finished tasks into `learner`."""
    from ..io import checkpoint

    changed = (runstate.differences(state.config, config, runstate.NOT_COMPARED)
               or runstate.differences(state.identity, identity))
    if changed:
        raise ValueError(
            f"cannot continue the run saved in {out}: it was started with other settings; "
            + "; ".join(changed) + ". Use the saved settings, or a new --out"
        )
    names = [t.name for t in tasks]
    done = len(state.completed)
    model = out / "model"
    if (model / "manifest.json").is_file():
        learner.load_state(checkpoint.read(model))
    have = list(learner.tasks)
    current = state.current["task"] if state.current else None
    if have == names[:done]:
        if done and manifest_sha256(out) != state.model_manifest_sha256:
            raise ValueError(f"{model / 'manifest.json'} changed since this run saved it; "
                             "refusing to continue on a model the run did not write")
    elif not (have == names[: done + 1] and current == names[done]):
        raise ValueError(f"{model} holds tasks {have}, but the run in {out} has finished "
                         f"{names[:done]}; refusing to continue")
    state.sessions += 1
