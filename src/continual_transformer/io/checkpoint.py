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

import functools
import hashlib
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .. import __version__
from ..model.backbone import Backbone, BackboneError
from ..config import BackboneConfig
from .manifest import (CheckpointError, SHARED_FILE, SHARED_JSON_FILE, TASK_FILE, TASKS_DIR,
                       validate_manifest)

if TYPE_CHECKING:
    from ..learner import ContinualLearner

FORMAT = "continual-tiny-transformer/checkpoint"
# Version 2 records `adapt_layers` with every gradient method; a version-1 checkpoint (written
# before the trunk/top split) adapted every layer, and is read as such.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"

# Names this module writes (relative to the checkpoint directory).
TEMP_FILE = re.compile(r"^(tasks/)?\.[^/]+\.[a-z0-9_]+\.tmp$")  # see `atomic_write`


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def make_dirs(directory: Path) -> None:
    """Create `directory` (and parents) so that the new entries survive a power cut too."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _fsync_dir(folder.parent)


@functools.cache
def _file_mode() -> int:
    # mkstemp creates 0600 files; give ours the mode open() would (0666 less the umask), which
    # can only be read by setting it, so it is read once, on the first write.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory."""
    make_dirs(path.parent)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, _file_mode())
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def tensor_file(prefix: str, tensors: dict[str, torch.Tensor]) -> tuple[str, bytes]:
    data = st_save({k: v.contiguous() for k, v in sorted(tensors.items())})
    return f"{prefix}-{sha256_bytes(data)[:12]}.safetensors", data


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


def save(learner: "ContinualLearner", directory: Path) -> Path:
    if directory.exists():
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: exists and is not a directory")
        _refuse_foreign(directory)
    files: dict[str, dict] = {}
    tasks = []

    def put(name: str, data: bytes) -> None:
        target = directory / name
        digest = sha256_bytes(data)
        # Content-addressed: a file with this name normally holds exactly these bytes already;
        # rewrite it only if it does not (a damaged copy must not end up listed).
        if not (target.is_file() and target.stat().st_size == len(data)
                and sha256_bytes(target.read_bytes()) == digest):
            atomic_write(target, data)
        files[name] = {"size": len(data), "sha256": digest}

    for record in learner.tasks.values():
        name, data = tensor_file(f"{TASKS_DIR}/{record.name}", learner.task_tensors(record.name))
        put(name, data)
        tasks.append({**record.to_dict(), "file": name})
    shared = learner.shared_tensors()
    shared_file = None
    if shared:
        shared_file, data = tensor_file("shared", shared)
        put(shared_file, data)
    shared_json = learner.method.shared_json(learner.model)
    shared_json_file = None
    if shared_json is not None:
        data = json.dumps(shared_json, sort_keys=True).encode()
        shared_json_file = f"shared-{sha256_bytes(data)[:12]}.json"
        put(shared_json_file, data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "backbone": {**learner.backbone.ref.to_dict(), "config": learner.backbone.config.to_dict(),
                     "parameters": learner.backbone_parameters},
        "method": {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()},
        "router": learner.router.hyperparameters() if learner.router is not None else None,
        "shared_file": shared_file,
        "shared_json_file": shared_json_file,
        "tasks": tasks,
        "files": files,
    }
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
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


def read_format_json(path: Path, format: str, version: int | tuple[int, ...], what: str) -> dict:
    """A JSON object whose `format` field must be `format`, and `format_version` one of
    `version`."""
    versions = version if isinstance(version, tuple) else (version,)
    try:
        document = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != format:
        raise CheckpointError(f"{path}: not a {format} {what}")
    if document.get("format_version") not in versions:
        readable = " or ".join(map(str, versions))
        raise CheckpointError(
            f"{path}: format version {document.get('format_version')!r} is not supported "
            f"(this library reads version {readable})"
        )
    return document


def method_hyperparameters(manifest: dict, backbone: Backbone) -> dict:
    """The method's hyperparameters as this library reads them: a version-1 manifest's gradient
    methods adapted every layer of the backbone."""
    from ..methods import METHODS, GradientMethod

    hyperparameters = dict(manifest["method"]["hyperparameters"])
    if (manifest["format_version"] == 1 and issubclass(METHODS[manifest["method"]["name"]], GradientMethod)
            and "adapt_layers" not in hyperparameters):
        hyperparameters["adapt_layers"] = backbone.num_layers
    return hyperparameters


def read_verified(path: Path, entry: dict) -> bytes:
    """A file's bytes after checking them against its manifest entry (size, SHA-256)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    data = path.read_bytes()
    if len(data) != entry["size"]:
        raise CheckpointError(f"{path}: size {len(data)} bytes, manifest says {entry['size']} (truncated?)")
    if sha256_bytes(data) != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match the manifest (file altered)")
    return data


def parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None


def read_tensors(directory: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Read one listed safetensors file after checking its size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{directory / MANIFEST}: file {name!r} is not listed")
    return parse_tensors(directory / name, read_verified(directory / name, entry))


def _read_all(directory: Path, manifest: dict) -> tuple[dict | None, object, list[dict]]:
    """Every listed file, verified and parsed, before anything is installed in a learner."""
    _refuse_foreign(directory)
    shared = manifest["shared_file"]
    shared_tensors = read_tensors(directory, shared, manifest) if shared else None
    shared_json = manifest.get("shared_json_file")
    shared_data = None
    if shared_json:
        path = directory / shared_json
        try:
            shared_data = json.loads(read_verified(path, manifest["files"][shared_json]))
        except ValueError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    tasks = [read_tensors(directory, t["file"], manifest) for t in manifest["tasks"]]
    return shared_tensors, shared_data, tasks


def _install(learner: "ContinualLearner", directory: Path, manifest: dict) -> None:
    from ..types import TaskRecord

    shared_tensors, shared_data, task_tensors = _read_all(directory, manifest)
    try:
        if shared_tensors is not None:
            learner.load_shared_tensors(shared_tensors)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{directory / manifest['shared_file']}: {exc}") from None
    try:
        if shared_data is not None:
            learner.method.load_shared_json(learner.model, shared_data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / manifest['shared_json_file']}: {exc}") from None
    for entry, tensors in zip(manifest["tasks"], task_tensors):
        record = TaskRecord.from_dict({k: v for k, v in entry.items() if k != "file"})
        try:
            learner.load_task_tensors(record, tensors)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{directory / entry['file']}: {exc}") from None


def _check_backbone(directory: Path, spec: dict, backbone: Backbone) -> None:
    if backbone.ref.sha256 != spec["sha256"]:
        raise BackboneError(
            f"{directory / MANIFEST}: backbone {spec['name']!r} has SHA-256 {backbone.ref.sha256[:12]}…, "
            f"but this model was trained on {spec['sha256'][:12]}…; refusing to load"
        )


def load(directory: Path, device: str | None = None) -> "ContinualLearner":
    from ..learner import ContinualLearner
    from ..methods import make_method

    manifest = read_manifest(directory)
    spec = manifest["backbone"]
    # The stored reference: the package name for the default, else the folder or hub id.
    config = BackboneConfig(**{**spec["config"], "name": spec["name"]})
    backbone = Backbone.load(config, device)
    _check_backbone(directory, spec, backbone)
    try:
        method = make_method(manifest["method"]["name"], method_hyperparameters(manifest, backbone))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / MANIFEST}: field 'method.hyperparameters': {exc}") from None
    learner = ContinualLearner(backbone, method=method, router=manifest.get("router"))
    _install(learner, directory, manifest)
    return learner


def load_into(learner: "ContinualLearner", directory: Path) -> dict:
    """Load a checkpoint's tasks into `learner`, which must know no tasks yet and must have the
    checkpoint's backbone and method; return the manifest."""
    manifest = read_manifest(directory)
    if learner.tasks:
        raise ValueError(f"load_into needs a learner without tasks; this one has {list(learner.tasks)}")
    _check_backbone(directory, manifest["backbone"], learner.backbone)
    saved = {"name": manifest["method"]["name"],
             "hyperparameters": method_hyperparameters(manifest, learner.backbone)}
    now = {"name": learner.method.name, "hyperparameters": learner.method.hyperparameters()}
    if json.loads(json.dumps(now)) != saved:
        raise CheckpointError(
            f"{directory / MANIFEST}: saved with method {saved['name']!r} {saved['hyperparameters']}, "
            f"but the learner has {now['name']!r} {now['hyperparameters']}"
        )
    router = learner.router.hyperparameters() if learner.router is not None else None
    if json.loads(json.dumps(router)) != manifest.get("router"):
        raise CheckpointError(
            f"{directory / MANIFEST}: saved with router {manifest.get('router')}, "
            f"but the learner has {router}"
        )
    _install(learner, directory, manifest)
    return manifest
