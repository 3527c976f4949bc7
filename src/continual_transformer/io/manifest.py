"""The checkpoint manifest (`manifest.json`): its format, as pydantic models, and its validation.

The models below are the format's reference: every field loading relies on, its type and its
checks. Types are strict (JSON as written: no "3" for 3, no true for 1). `validate_manifest`
reports the first bad field the way every checkpoint error reads:

    model/manifest.json: field 'tasks[0].labels' must be 2 or more distinct strings, got ['a']

Fields are checked in the order they are declared, so `files` comes before the fields that name
files, and the first error pydantic reports is the one to show.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from ..config import BackboneConfig
from ..methods import METHODS
from ..types import TASK_NAME, TaskRecord
from .store import CheckpointError

TASKS_DIR = "tasks"

# Names of the files a manifest lists (relative to the checkpoint directory); each carries the
# first 12 hex digits of its content's SHA-256.
TASK_FILE = re.compile(r"^tasks/([A-Za-z0-9][A-Za-z0-9_-]{0,63})-([0-9a-f]{12})\.safetensors$")
SHARED_FILE = re.compile(r"^shared-([0-9a-f]{12})\.safetensors$")
SHARED_JSON_FILE = re.compile(r"^shared-([0-9a-f]{12})\.json$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")

# The kept manifests of earlier versions: `versions/<number, 6 digits or more>.json` (see
# `checkpoint.commit`).
VERSIONS_DIR = "versions"
VERSION_FILE = re.compile(r"^versions/([0-9]{6,})\.json$")


def version_file(number: int) -> str:
    """The name of version `number`'s manifest, relative to the checkpoint directory."""
    return f"{VERSIONS_DIR}/{number:06d}.json"


class _Problem(ValueError):
    """A check's finding. `at` extends the checked value's location to the field it is about;
    None: the finding is about the manifest as a whole and names no field."""

    def __init__(self, problem: str, at: tuple[str | int, ...] | None = ()):
        super().__init__(problem)
        self.at = at


def _sha256(value: str) -> str:
    if not SHA256.match(value):
        raise _Problem(f"must be 64 lowercase hex digits, got {value!r:.70}")
    return value


def _listed_name(name: str) -> str:
    if not (TASK_FILE.match(name) or SHARED_FILE.match(name) or SHARED_JSON_FILE.match(name)):
        raise _Problem(f"lists foreign file {name!r} (expected "
                       f"{TASKS_DIR}/<task>-<hash>.safetensors, shared-<hash>.safetensors or "
                       "shared-<hash>.json)", at=None)
    return name


Sha256 = Annotated[str, AfterValidator(_sha256)]
Count = Annotated[int, Field(ge=0)]
FileName = Annotated[str, AfterValidator(_listed_name)]


class _Strict(BaseModel):
    # Strict: a manifest holds the JSON types this library writes, so "3" is no int, true no int.
    model_config = ConfigDict(strict=True, use_attribute_docstrings=True)


class BackboneEntry(_Strict):
    """The backbone, by reference: the tasks' files hold no backbone weights."""

    name: str
    """'default' (the bundled MiniLM package), a local folder or a hub id: what loading loads."""
    sha256: Sha256
    """Of the backbone's config and weight files; loading refuses a backbone that differs."""
    config: dict[str, Any]
    """A `BackboneConfig` (pooling, max_length); its `name` is replaced by the `name` above."""
    source: str | None = None
    """'package', 'path' or 'hub'; for the reader, loading does not read it."""
    model_type: str | None = None
    """The transformer's architecture ('bert'); for the reader."""
    parameters: int | None = None
    """The backbone's parameter count; for the reader."""

    @field_validator("config")
    @classmethod
    def _buildable(cls, config: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        if "name" in info.data:  # else the name's own error comes first
            try:
                BackboneConfig(**{**config, "name": info.data["name"]})
            except (TypeError, ValueError) as exc:
                raise _Problem(f"is not a backbone configuration: {exc}") from None
        return config


class MethodEntry(_Strict):
    """The continual-learning method that learned the tasks."""

    name: str
    """A key of `methods.METHODS` ('ia3', 'analytic', 'ewc', ...)."""
    hyperparameters: dict[str, Any]
    """The method's keyword arguments; `make_method` checks them when loading."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in METHODS:
            raise _Problem(f"names unknown method {name!r}; known: {sorted(METHODS)}")
        return name


class FileEntry(_Strict):
    """One listed file; loading reads it only if its size and SHA-256 match."""

    size: Count
    """In bytes."""
    sha256: Sha256
    """Of the file's bytes; its first 12 digits are the hash in the file's name."""


class TaskEntry(_Strict):
    """One learned task: a `TaskRecord` (the fields up to `stats`) plus the task's file."""

    # A key beyond TaskRecord's fields and `file` means a manifest this library did not write.
    model_config = ConfigDict(extra="allow")

    name: str
    """1-64 letters, digits, '_' or '-', starting with a letter or digit; unique in the model."""
    labels: list[str]
    """The task's labels, 2 or more, distinct, in the order of the head's outputs."""
    learned_at: str
    """When the task was learned (ISO 8601)."""
    train_examples: Count
    """Training examples the task was learned from."""
    train_seconds: float
    """Time spent learning the task."""
    adapter_parameters: Count
    """Scale parameters the task added."""
    head_parameters: Count
    """Parameters of the task's classification head."""
    bytes_added: Count
    """The task's own state as stored."""
    stats: dict[str, Any]
    """Training statistics (steps, losses, restores), for the reader."""
    file: str
    """The task's tensors: `tasks/<name>-<hash12>.safetensors`, listed in `files`."""

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not TASK_NAME.match(name):
            raise _Problem(f"is not a valid task name: {name!r:.70}")
        return name

    @field_validator("labels")
    @classmethod
    def _distinct(cls, labels: list[str]) -> list[str]:
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise _Problem(f"must be 2 or more distinct strings, got {labels!r:.70}")
        return labels

    @model_validator(mode="after")
    def _no_unknown_keys(self) -> TaskEntry:
        unknown = sorted(set(self.model_extra) - set(TaskRecord.__dataclass_fields__))
        if unknown:
            raise _Problem(f"has unknown keys {unknown}")
        return self


class Manifest(_Strict):
    """`manifest.json`: the whole truth about a checkpoint directory."""

    # Keys a later version may add are kept; the format version says what a reader must know.
    model_config = ConfigDict(extra="allow")

    format: str
    """'continual-tiny-transformer/checkpoint' (checked by `read_format_json` before this)."""
    format_version: int
    """1 or 2. Version 1 predates `adapt_layers`: its gradient methods adapted every layer."""
    library_version: str | None = None
    """The writer's versions (library, torch, python), for the reader."""
    torch_version: str | None = None
    """See `library_version`."""
    python_version: str | None = None
    """See `library_version`."""
    backbone: BackboneEntry
    method: MethodEntry
    router: dict[str, Any] | None = None
    """The router's hyperparameters; null: the defaults, or none for methods that route
    themselves."""
    # Before the fields that name files: their checks look the names up here.
    files: dict[FileName, FileEntry]
    """Every file of the model, by name; each is used exactly once by the fields below."""
    shared_file: str | None
    """`shared-<hash12>.safetensors`: state all tasks share (the router's), or null."""
    shared_json_file: str | None = None
    """`shared-<hash12>.json`: shared state that is not tensors (replay's texts), or null;
    absent from manifests written before it existed."""
    tasks: list[TaskEntry]
    """In the order the tasks were learned."""
    version: Count | None = None
    """This manifest's version number (`versions/<number>.json` holds the same bytes); absent
    from manifests written before versions, which are version 0."""
    saved_at: str | None = None
    """When this version was written (ISO 8601, UTC); absent before versions."""
    change: str | None = None
    """What this version changed: 'learned X', 'deleted Y', 'rollback to N', ...; absent
    before versions."""

    @field_validator("files")
    @classmethod
    def _named_by_hash(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name, entry in files.items():
            if not name.rsplit(".", 1)[0].endswith(f"-{entry.sha256[:12]}"):
                raise _Problem(f"names a file whose hash prefix is not its SHA-256 "
                               f"{entry.sha256[:12]}…", at=(name,))
        return files

    @field_validator("shared_file", "shared_json_file")
    @classmethod
    def _listed_shared(cls, name: str | None, info: ValidationInfo) -> str | None:
        pattern, what = {"shared_file": (SHARED_FILE, "shared file"),
                         "shared_json_file": (SHARED_JSON_FILE, "shared JSON file"),
                         }[info.field_name]
        files = info.data.get("files", {})  # if `files` is bad, its own error comes first
        if name is not None and not (pattern.match(name) and name in files):
            raise _Problem(f"names {name!r:.70}, which is not a listed {what}")
        return name

    @field_validator("tasks")
    @classmethod
    def _unique_with_own_files(cls, tasks: list[TaskEntry], info: ValidationInfo
                               ) -> list[TaskEntry]:
        files = info.data.get("files", {})  # if `files` is bad, its own error comes first
        seen: set[str] = set()
        for i, task in enumerate(tasks):
            if task.name in seen:
                raise _Problem(f"repeats task {task.name!r}", at=(i, "name"))
            seen.add(task.name)
            match = TASK_FILE.match(task.file)
            if not match or match.group(1) != task.name or task.file not in files:
                raise _Problem(f"names {task.file!r}, which is not a listed file of task "
                               f"{task.name!r}", at=(i, "file"))
        return tasks

    @model_validator(mode="after")
    def _files_used_once(self) -> Manifest:
        used = [name for name in (self.shared_file, self.shared_json_file) if name is not None]
        used += [task.file for task in self.tasks]
        unused = sorted(set(self.files) - set(used))
        if unused or len(used) != len(set(used)):
            raise _Problem(f"lists files no task uses once: {unused or sorted(used)}",
                           at=("files",))
        return self


_TYPE_NAMES = {"string_type": "str", "int_type": "int", "float_type": "int or float",
               "list_type": "list", "dict_type": "dict", "model_type": "dict"}


def _checkpoint_error(path: Path, error: dict) -> CheckpointError:
    """pydantic's error in the words of every checkpoint error: the path, the field, the problem."""
    loc, value, found = error["loc"], error["input"], error.get("ctx", {}).get("error")
    if isinstance(found, _Problem):
        if found.at is None:
            return CheckpointError(f"{path}: {found}")
        loc, problem = loc + found.at, str(found)
    elif error["type"] == "missing":
        problem = "is missing"
    elif error["type"] == "greater_than_equal":
        problem = f"must be >= {error['ctx']['ge']}, got {value!r:.60}"
    elif error["type"] in _TYPE_NAMES:
        problem = f"must be {_TYPE_NAMES[error['type']]}, got {type(value).__name__} {value!r:.60}"
    else:
        problem = error["msg"]
    if not loc:
        return CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    # ('tasks', 0, 'name') -> tasks[0].name; ('files', 'tasks/x-….safetensors', 'size') ->
    # files['tasks/x-….safetensors'].size: a file's name is a key, not a field.
    field = loc[0]
    for i, part in enumerate(loc[1:], 1):
        keyed = isinstance(part, int) or (i == 1 and loc[0] == "files")
        field += f"[{part!r}]" if keyed else f".{part}"
    return CheckpointError(f"{path}: field {field!r} {problem}")


def validate_manifest(manifest: object, path: Path) -> dict:
    """`manifest` itself if it is a valid manifest; else `CheckpointError` naming `path` and the
    first bad field."""
    try:
        Manifest.model_validate(manifest)
    except ValidationError as exc:
        raise _checkpoint_error(path, exc.errors()[0]) from None
    return manifest
