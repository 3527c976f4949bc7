"""A model is a directory: a JSON manifest plus safetensors files, written atomically.

    model/
      manifest.json                      the current version; lists every file with size and SHA-256
      versions/<NNNNNN>.json             every kept version's manifest (the current one included)
      tasks/<task>-<hash12>.safetensors  one per task: its scale vectors and head
      shared-<hash12>.safetensors        state shared by all tasks (only for methods that share)
      shared-<hash12>.json               shared state that is not tensors (replay's stored texts)

Saving. Every file is written to a temporary file in its own directory, flushed, fsynced and
renamed into place (then the directory is fsynced). File names carry a prefix of their content
hash, so a save never rewrites a file that an older manifest points to. The new manifest is
written last, twice: first as the next version's file, then as `manifest.json`, whose rename is
the one moment the directory switches from the complete old state to the complete new state.

Versions. Every save that changes the content (tasks, files, method, router) is a new version,
numbered one above the current one; a save of identical content is none. Numbers are never
reused: a rollback (`versions.rollback`) writes the next number with an old version's content.
A manifest written before versions has no `version` field and is version 0; the first save
after it keeps it as `versions/000000.json`. A version file above the current number is one
that a killed save wrote but never switched in: it is no version, and the next save replaces
it. Files are shared between versions and a save deletes none but temporary files; only
`versions.prune` removes old versions' manifests and then the files no kept version lists.

What loading accepts. The manifest is the whole truth: every file it lists must be present with
the listed size and SHA-256, and must be named like a file this module writes. A process killed
during a save can leave files the manifest does not list: files written for a manifest that was
never switched in, and temporary files (`.<name>.<random>.tmp`). Those carry names this module
writes and are never read; the next save removes the temporary ones, a prune the others. Any
other file or folder in the directory is foreign (nothing here wrote it, so something else is
changing the model) and loading refuses it, naming the file; so does saving.

Nothing is pickled: only the manifest (JSON) and safetensors files are read, and the backbone is
stored as a reference (package, path or hub id) plus the hash of its weights, which must match
the backbone found at load time.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from .. import __version__
from ..config import BackboneConfig
from ..types import TaskRecord
from . import store
from .store import (
    CheckpointError,
    UnknownVersion,
    content_name,
    parse_tensors,
    put,
    read_format_json,
    read_verified,
    tensor_file,
)
from .manifest import (SHARED_FILE, SHARED_JSON_FILE, TASK_FILE, TASKS_DIR, VERSION_FILE,
                       VERSIONS_DIR, validate_manifest, version_file)
from .writer_lock import LOCK_FILE

FORMAT = "continual-tiny-transformer/checkpoint"
# Version 2 records `adapt_layers` with every gradient method; a version-1 checkpoint (written
# before the trunk/top split) adapted every layer, and is read as such.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# Names this module writes (relative to the checkpoint directory).
TEMP_FILE = re.compile(r"^((tasks|versions)/)?\.[^/]+\.[a-z0-9_]+\.tmp$")  # see `store.atomic_write`
# What a version is: these fields of its manifest (the others say who wrote it, when and why).
CONTENT_FIELDS = ("format_version", "backbone", "method", "router", "shared_file",
                  "shared_json_file", "tasks", "files")
VERSION_FIELDS = ("version", "saved_at", "change")  # what `commit` writes into each version


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
    return bool(name in (MANIFEST, LOCK_FILE) or TASK_FILE.match(name) or SHARED_FILE.match(name)
                or SHARED_JSON_FILE.match(name) or VERSION_FILE.match(name)
                or TEMP_FILE.match(name))


def foreign_entries(directory: Path) -> list[str]:
    """Entries of a checkpoint directory that this module never writes (relative names)."""
    foreign = []
    for entry in sorted(directory.iterdir()):
        if entry.name in (TASKS_DIR, VERSIONS_DIR) and entry.is_dir() and not entry.is_symlink():
            for inner in sorted(entry.iterdir()):
                name = f"{entry.name}/{inner.name}"
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
            f"only {MANIFEST}, {LOCK_FILE}, {VERSIONS_DIR}/*.json, {TASKS_DIR}/*.safetensors, "
            f"shared-*.safetensors and shared-*.json); "
            f"{len(foreign)} such entr{'y' if len(foreign) == 1 else 'ies'}: {foreign[:5]}"
        )


def write(directory: Path, saved: SavedModel) -> Path:
    """Store `saved` in `directory` (created if needed), replacing what is there atomically;
    a new version unless the content is the current one's (see `commit`)."""
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
    commit(directory, manifest)
    return directory


# -- versions -------------------------------------------------------------------------------------
def commit(directory: Path, manifest: dict, change: str | None = None) -> int:
    """Make `manifest` (whose files are in place) the current version of `directory`; return
    its number: the current one's if the content is the same, else the next. `change` says what
    changed (default: the tasks learned, deleted or changed since the current version).
    Temporary files a killed writer left are removed."""
    number = _commit(directory, manifest, change)
    _remove_files(directory, TEMP_FILE.match)
    return number


def _commit(directory: Path, manifest: dict, change: str | None) -> int:
    previous = read_manifest(directory) if (directory / MANIFEST).exists() else None
    if previous is not None and content(previous) == content(manifest):
        return previous.get("version", 0)
    current = previous.get("version", 0) if previous is not None else 0
    for number in version_numbers(directory):  # above the current: a killed save's, never used
        if number == current + 1:
            store.remove_files([directory / version_file(number)])
        elif number > current:
            raise CheckpointError(f"{directory / version_file(number)}: newer than the current version "
                                  f"{current} of {directory / MANIFEST}; the directory was changed "
                                  "by something other than this library")
    if previous is not None and "version" not in previous:  # written before versions: keep it
        store.atomic_write(directory / version_file(0), (directory / MANIFEST).read_bytes())
    number = current + 1
    manifest = {**manifest, "version": number,
                "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "change": change or describe_change(previous, manifest)}
    data = json.dumps(manifest, indent=2).encode()
    store.atomic_write(directory / version_file(number), data)
    store.atomic_write(directory / MANIFEST, data)  # the commit point
    return number


def content(manifest: dict) -> dict:
    """What makes a version: the fields that say what the model is, not who wrote it when."""
    return {name: manifest.get(name) for name in CONTENT_FIELDS}


def describe_change(previous: dict | None, manifest: dict) -> str:
    """'learned X, Y; deleted Z; changed W', from the tasks of two manifests."""
    old = {t["name"]: t["file"] for t in previous["tasks"]} if previous is not None else {}
    new = {t["name"]: t["file"] for t in manifest["tasks"]}
    parts = [f"{verb} {', '.join(names)}" for verb, names in (
        ("learned", [n for n in new if n not in old]),
        ("deleted", [n for n in old if n not in new]),
        ("changed", [n for n in new if n in old and old[n] != new[n]])) if names]
    if not parts:
        parts = ["created" if previous is None else "changed shared state"]
    return "; ".join(parts)


def version_numbers(directory: Path) -> list[int]:
    """The numbers of the version files in `directory`, ascending (a killed save's included)."""
    folder = directory / VERSIONS_DIR
    if not folder.is_dir():
        return []
    names = (VERSION_FILE.match(f"{VERSIONS_DIR}/{p.name}") for p in folder.iterdir())
    return sorted(int(match.group(1)) for match in names if match)


def _own_files(directory: Path) -> list[tuple[str, Path]]:
    paths = [p for folder in (directory, directory / TASKS_DIR, directory / VERSIONS_DIR)
             if folder.is_dir() for p in folder.iterdir() if p.is_file()]
    return [(p.relative_to(directory).as_posix(), p) for p in paths]


def _remove_files(directory: Path, remove) -> dict[str, int]:
    """Delete our data and temporary files (never a manifest, version or lock file) whose
    relative name `remove(name)` is true; return their names and sizes."""
    doomed = {name: path for name, path in _own_files(directory)
              if name not in (MANIFEST, LOCK_FILE) and not VERSION_FILE.match(name) and _is_own_name(name)
              and remove(name)}
    sizes = {name: path.stat().st_size for name, path in doomed.items()}
    store.remove_files(list(doomed.values()))
    return sizes


def remove_unreferenced(directory: Path, referenced: set[str]) -> dict[str, int]:
    """Delete temporary files and our data files not in `referenced` (the files every kept
    version lists); return their names and sizes. Assumes one writer per directory."""
    return _remove_files(directory, lambda name: bool(TEMP_FILE.match(name)) or name not in referenced)


# -- reading --------------------------------------------------------------------------------------
def read_manifest(directory: Path, version: int | None = None) -> dict:
    """The validated manifest of a checkpoint directory (the tensor files are not read): the
    current one, or that of a kept `version`."""
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a checkpoint directory")
    manifest = validate_manifest(read_format_json(path, FORMAT, READABLE_VERSIONS, "manifest"), path)
    current = manifest.get("version", 0)
    if version is None or version == current and "version" not in manifest:
        return manifest
    known = [n for n in version_numbers(directory) if n <= current]
    if version not in known:
        raise UnknownVersion(f"unknown version {version!r} of {directory}; known: {known or [current]}")
    path = directory / version_file(version)
    manifest = validate_manifest(read_format_json(path, FORMAT, READABLE_VERSIONS, "manifest"), path)
    if manifest.get("version", 0) != version:
        raise CheckpointError(f"{path}: field 'version' is {manifest.get('version', 0)!r}, but the "
                              f"file is that of version {version}")
    return manifest


def read_tensors(directory: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Read one listed safetensors file after checking its size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{directory / MANIFEST}: file {name!r} is not listed")
    return parse_tensors(directory / name, read_verified(directory / name, entry))


def read(directory: Path, version: int | None = None) -> SavedModel:
    """The model stored in `directory` (its current version, or a kept `version`): every listed
    file verified and parsed, nothing else read; `CheckpointError` names the first file or field
    that is wrong."""
    manifest = read_manifest(directory, version)
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
