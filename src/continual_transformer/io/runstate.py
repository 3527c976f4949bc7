"""What a run has done so far, saved so that a killed run continues where it stopped.

    OUT/resume/state.json                          written last; lists its files (size, SHA-256)
    OUT/resume/train-<task>-<hash12>.safetensors   the interrupted task's `TrainState` tensors

`state.json` holds the run's settings (compared when a run is continued), the accuracy-matrix
row and report entry of every finished task, the task in progress (its accuracy before
learning, its training position) and the RNG state. It follows the checkpoint's rules: atomic
writes, content-addressed tensor files, the JSON file renamed in last, unlisted files of our
own removed afterwards, anything else refused; only JSON and safetensors are read.

The model itself is not here: finished tasks live in OUT/model, which is saved before the run
state records a task as finished. A run killed between the two finds the task in the model
and only re-evaluates it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import store
from .store import CheckpointError, parse_tensors, read_format_json, read_verified, tensor_file
from ..training.loop import TrainState

FORMAT = "continual-tiny-transformer/run-state"
FORMAT_VERSION = 1
STATE_DIR = "resume"
STATE = "state.json"
TRAIN_FILE = re.compile(r"^train-[A-Za-z0-9][A-Za-z0-9_-]{0,63}-[0-9a-f]{12}\.safetensors$")

# Settings that change where or how often a run works, not what it learns; a run may be
# continued with other values (a parallel run's workers learn what a sequential run does). `stream_summary` is derived from the tasks, which the
# identity's `tasks_sha256` compares exactly; so are the tasks that `data` (how the stream file
# is read: format, columns, test fraction) reads, and runs saved before it existed continue.
NOT_COMPARED = frozenset({"device", "stream", "data", "save_every", "stream_summary", "workers",
                          "worker_threads", "ray_address"})


@dataclass
class RunState:
    config: dict  # the run's settings as its front end gave them
    identity: dict  # what is learned: the tasks' content, the method, the backbone's weights
    reference: list | None = None  # b_i, for methods that share state (see experiment/report.py)
    completed: list[dict] = field(default_factory=list)  # {"row", "before", "entry"} per task;
    # the last one also "routes": every evaluated test text's routed task, to resume from
    current: dict | None = None  # {"task", "before", "train": TrainState meta or None}
    rng: dict = field(default_factory=dict)  # base64 RNG states at the last write
    model_manifest_sha256: str | None = None  # of OUT/model/manifest.json after the last task
    sessions: int = 1  # processes that worked on the run
    seconds: float = 0.0  # wall time of the run, summed over sessions

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def state_dir(out: Path) -> Path:
    return out / STATE_DIR


def encode_rng(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: base64.b64encode(v.numpy().tobytes()).decode() for k, v in tensors.items()}


def decode_rng(data: dict, where: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, text in data.items():
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where}: field 'rng.{key}' is not base64 ({exc})") from None
        out[key] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return out


def tasks_digest(tasks) -> str:
    """SHA-256 of the tasks' names, labels and examples: the data a run learns, exactly."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.name, list(task.labels),
                                  [[e.text, e.label] for e in task.train],
                                  [[e.text, e.label] for e in task.test]]).encode())
    return digest.hexdigest()


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def differences(saved: dict, now: dict, ignore: frozenset = frozenset()) -> list[str]:
    """`field: saved X, now Y` for every (nested) field that differs, in a stable order."""
    a = {k: v for k, v in _flatten(saved).items() if k.split(".")[0] not in ignore}
    b = {k: v for k, v in _flatten(now).items() if k.split(".")[0] not in ignore}
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key, missing), b.get(key, missing)
        if old != new:
            show = lambda v: "(absent)" if v is missing else repr(v)  # noqa: E731
            out.append(f"{key}: saved {show(old)}, now {show(new)}")
    return out


def write(out: Path, state: RunState, train: TrainState | None = None) -> None:
    """Save the run state (and the task's training state, if any) atomically."""
    directory = state_dir(out)
    files = {}
    data = state.to_dict()
    if train is not None:
        if state.current is None:
            raise ValueError("a training state needs a current task")
        name, blob = tensor_file(f"train-{state.current['task']}", train.tensors)
        files[name] = store.put(directory, name, blob)
        data["current"] = {**state.current, "train": train.meta(), "file": name}
    elif state.current is not None:
        data["current"] = {**state.current, "train": None, "file": None}
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, **data, "files": files}
    store.atomic_write(directory / STATE, json.dumps(document, indent=1).encode())
    for path in directory.iterdir():
        if path.name != STATE and path.name not in files and (
                TRAIN_FILE.match(path.name) or store.TEMP_FILE.match(path.name)):
            path.unlink(missing_ok=True)


def _need(document: dict, key: str, kind, path: Path):
    if key not in document or not isinstance(document[key], kind):
        raise CheckpointError(f"{path}: field {key!r} is missing or not {getattr(kind, '__name__', kind)}")
    return document[key]


def read(out: Path) -> tuple[RunState, TrainState | None] | None:
    """The saved run state in `out` (None when there is none), verified like a checkpoint."""
    directory = state_dir(out)
    path = directory / STATE
    if not path.is_file():
        return None
    for entry in directory.iterdir():
        if not (entry.name == STATE or TRAIN_FILE.match(entry.name) or store.TEMP_FILE.match(entry.name)) \
                or not entry.is_file():
            raise CheckpointError(f"{entry}: foreign file in a run-state directory")
    document = read_format_json(path, FORMAT, FORMAT_VERSION, "file")
    values = {
        "config": _need(document, "config", dict, path),
        "identity": _need(document, "identity", dict, path),
        "reference": _need(document, "reference", (list, type(None)), path),
        "completed": _need(document, "completed", list, path),
        "current": _need(document, "current", (dict, type(None)), path),
        "rng": _need(document, "rng", dict, path),
        "model_manifest_sha256": _need(document, "model_manifest_sha256", (str, type(None)), path),
        "sessions": _need(document, "sessions", int, path),
        "seconds": _need(document, "seconds", (int, float), path),
    }
    files = _need(document, "files", dict, path)
    for i, done in enumerate(values["completed"]):
        if not (isinstance(done, dict) and isinstance(done.get("row"), list)
                and len(done["row"]) == i + 1 and isinstance(done.get("entry"), dict)
                and "before" in done):
            raise CheckpointError(f"{path}: field 'completed[{i}]' is not a finished task's record")
        routes = done.get("routes", [])
        if not (isinstance(routes, list) and all(type(r) is int and r >= 0 for r in routes)):
            raise CheckpointError(f"{path}: field 'completed[{i}].routes' is not a list of task "
                                  "indices")
    current = values["current"]
    train = None
    if current is not None:
        if not isinstance(current.get("task"), str) or "before" not in current:
            raise CheckpointError(f"{path}: field 'current' does not name a task")
        file = current.pop("file", None)
        meta = current.pop("train", None)
        if meta is not None:
            if file not in files or not TRAIN_FILE.match(file):
                raise CheckpointError(f"{path}: field 'current.file' names {file!r}, which is not listed")
            tensors = parse_tensors(directory / file, read_verified(directory / file, files[file]))
            try:
                train = TrainState.from_meta(meta, tensors)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: field 'current.train': {exc}") from None
    return RunState(**values), train


def read_config(out: Path) -> dict | None:
    """The settings a saved run in `out` was started with (None when there is none)."""
    saved = read(out)
    return saved[0].config if saved else None
