"""A model is a directory: a JSON manifest plus safetensors files, written atomically.

    model/
      manifest.json                      written last; lists every file with size and SHA-256
      tasks/<task>-<hash12>.safetensors  one per task: its scale vectors and head
      shared-<hash12>.safetensors        state shared by all tasks (only for methods that share)
      shared-<hash12>.json               shared state that is not tensors (replay's stored texts)

Saving. Every file is written to a temporary file in its own directory, flushed, fsynced and
renamed into place (then the directory is fsynced). File names carry a prefix of their content
hash, so a save never rewrites a file that an older manifest points to; the manifest is written
last, and its rename is the one moment the directory switches from the complete old state to
the complete new state. Only then are files the new manifest does not list deleted.

What loading accepts. The manifest is the whole truth: every file it lists must be present with
the listed size and SHA-256, and must be named like a file this module writes. A process killed
during a save can leave files the manifest does not list: files written for a manifest that was
never switched in, files an interrupted clean-up did not delete yet, and temporary files
(`.<name>.<random>.tmp`). Those carry names this module writes, are never read, and are removed
by the next save. Any other file or folder in the directory is foreign (nothing here wrote it,
so something else is changing the model) and loading refuses it, naming the file; so does saving.

Nothing is pickled: only the manifest (JSON) and safetensors files are read, and the backbone is
stored as a reference (package, path or hub id) plus the hash of its weights, which must match
the backbone found at load time.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..config import BackboneConfig
from ..types import TaskRecord
from . import store
from .store import (
    CheckpointError,
    content_name,
    parse_tensors,
    put,
    read_format_json,
    read_verified,
    tensor_file,
)
from .manifest import SHARED_FILE, SHARED_JSON_FILE, TASK_FILE, TASKS_DIR, validate_manifest

FORMAT = "continual-tiny-transformer/checkpoint"
# Version 2 records `adapt_layers` with every gradient method; a version-1 checkpoint (written
# before the trunk/top split) adapted every layer, and is read as such.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# Names this module writes (relative to the checkpoint directory).
TEMP_FILE = re.compile(r"^(tasks/)?\.[^/]+\.[a-z0-9_]+\.tmp$")  # see `store.atomic_write`


@dataclass
class SavedTask:
    """One task as a checkpoint stores it: its record and the tensors it owns."""

    record: TaskRecord
    tensors: dict[str, torch.Tensor]
    file: str | None = None  # the file it was read from, relative to the model directory


@dataclass
class SavedModel:
    """A model as plain data, what `write` stores and `read` returns: the backbone as a
    reference (never its weights), the method and router settings, every task's own tensors
    and the state tasks share. `ContinualLearner.state()` makes one, `from_state` rebuilds
    the learner from one."""

    backbone: dict  # the backbone's reference (name, sha256, ...), "config", "parameters"
    method: dict  # {"name", "hyperparameters"}, as the method reports them
    router: dict | None  # the router's options; None for methods that route themselves
    tasks: list[SavedTask]
    shared_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    shared_json: dict | None = None  # shared state that is not tensors (replay's texts)
    format_version: int = FORMAT_VERSION
    directory: Path | None = None  # where it was read from (errors name its files)
    files: dict[str, str] = field(default_factory=dict)  # "shared", "shared_json": file names

    @property
    def backbone_config(self) -> BackboneConfig:
        # The stored reference: the package name for the default, else the folder or hub id.
        return BackboneConfig(**{**self.backbone["config"], "name": self.backbone["name"]})

    def method_hyperparameters(self, depth: int) -> dict:
        """The method's hyperparameters as this library reads them: a version-1 checkpoint's
        gradient methods adapted every one of the backbone's `depth` layers."""
        from ..methods import METHODS, GradientMethod

        hyperparameters = dict(self.method["hyperparameters"])
        if (self.format_version == 1 and issubclass(METHODS[self.method["name"]], GradientMethod)
                and "adapt_layers" not in hyperparameters):
            hyperparameters["adapt_layers"] = depth
        return hyperparameters

    def where(self, name: str | None = None) -> str:
        """The file `name` of the checkpoint (default: the manifest), for error messages."""
        if self.directory is None:
            return "(model in memory)"
        return str(self.directory / (name or MANIFEST))


def _is_own_name(name: str) -> bool:
    return bool(name == MANIFEST or TASK_FILE.match(name) or SHARED_FILE.match(name)
                or SHARED_JSON_FILE.match(name)
                or TEMP_FILE.match(name))


def foreign_entries(directory: Path) -> list[str]:
    """Entries of a checkpoint directory that this module never writes (relative names)."""
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name == TASKS_DIR and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                name = f"{TASKS_DIR}/{inner.name}"
                if not (inner.is_file() and not inner.is_symlink() and _is_own_name(name)):
                    foreign.append(name + ("/" if inner.is_dir() else ""))
        elif not (entry.is_file() and not entry.is_symlink() and _is_own_name(entry.name)):
            foreign.append(entry.name + ("/" if entry.is_dir() else ""))
    return foreign


def _refuse_foreign(directory: Path) -> None:
    foreign = foreign_entries(directory)
    if foreign:
        raise CheckpointError(
            f"{directory / foreign[0]}: foreign file in a checkpoint directory (a checkpoint holds "
            f"only {MANIFEST}, {TASKS_DIR}/*.safetensors, shared-*.safetensors and shared-*.json); "
            f"{len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}: {foreign[:5]}"
        )


def write(directory: Path, saved: SavedModel) -> Path:
    """Store `saved` in `directory` (created if needed), replacing what is there atomically."""
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory")
        _refuse_foreign(directory)
    files: dict[str, dict] = {}
    tasks = []
    for task in saved.tasks:
        name, data = tensor_file(f"{TASKS_DIR}/{task.record.name}", task.tensors)
        files[name] = put(directory, name, data)
        tasks.append({**task.record.to_dict(), "file": name})
    shared_file = None
    if saved.shared_tensors:
        shared_file, data = tensor_file("shared", saved.shared_tensors)
        files[shared_file] = put(directory, shared_file, data)
    shared_json_file = None
    if saved.shared_json is not None:
        data = json.dumps(saved.shared_json, sort_keys=True).encode()
        shared_json_file = content_name("shared", data, ".json")
        files[shared_json_file] = put(directory, shared_json_file, data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "backbone": saved.backbone,
        "method": saved.method,
        "router": saved.router,
        "shared_file": shared_file,
        "shared_json_file": shared_json_file,
        "tasks": tasks,
        "files": files,
    }
    store.atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    _remove_unlisted(directory, files)
    return directory


def _remove_unlisted(directory: Path, files: dict[str, dict]) -> None:
    """Delete our files the new manifest no longer lists (deleted or re-learned tasks, files of
    an interrupted save, temporary files). Assumes one writer per directory."""
    candidates = [p for p in directory.iterdir() if p.is_file()]
    if (directory / TASKS_DIR).is_dir():
        candidates += [p for p in (directory / TASKS_DIR).iterdir() if p.is_file()]
    for path in candidates:
        name = path.relative_to(directory).as_posix()
        if name != MANIFEST and name not in files and _is_own_name(name):
            path.unlink(missing_ok=True)


# -- reading --------------------------------------------------------------------------------------
def read_manifest(directory: Path) -> dict:
    """The validated manifest of a checkpoint directory (the tensor files are not read)."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a checkpoint directory")
    return validate_manifest(read_format_json(path, FORMAT, READABLE_VERSIONS, "manifest"), path)


def read_tensors(directory: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Read one listed safetensors file after checking its size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{directory / MANIFEST}: file {name!r} is not listed")
    return parse_tensors(directory / name, read_verified(directory / name, entry))


def read(directory: Path) -> SavedModel:
    """The model stored in `directory`: every listed file verified and parsed, nothing else
    read; `CheckpointError` names the first file or field that is wrong."""
    manifest = read_manifest(directory)
    _refuse_foreign(directory)
    shared = manifest["shared_file"]
    shared_tensors = read_tensors(directory, shared, manifest) if shared else {}
    shared_json = manifest.get("shared_json_file")
    shared_data = None
    if shared_json:
        path = directory / shared_json
        try:
            shared_data = json.loads(read_verified(path, manifest["files"][shared_json]))
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    tasks = [SavedTask(TaskRecord.from_dict({k: v for k, v in entry.items() if k != "file"}),
                       read_tensors(directory, entry["file"], manifest), entry["file"])
             for entry in manifest["tasks"]]
    return SavedModel(
        backbone=manifest["backbone"], method=manifest["method"], router=manifest.get("router"),
        tasks=tasks, shared_tensors=shared_tensors, shared_json=shared_data,
        format_version=manifest["format_version"], directory=directory,
        files={"shared": shared, "shared_json": shared_json},
    )
