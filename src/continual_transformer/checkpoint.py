"""A model is a directory: a JSON manifest plus safetensors files, written atomically.

    model/
      manifest.json                      written last; lists every file with size and SHA-256
      tasks/<task>-<hash12>.safetensors  one per task: its scale vectors and head
      shared-<hash12>.safetensors        state shared by all tasks (only for methods that share)
      shared-<hash12>.json               shared state that is not tensors (replay's stored texts)

File names carry a prefix of their content hash, so a save never rewrites a file an older
manifest points to: a directory is always the complete old state or the complete new state,
and the switch between them is the atomic rename of `manifest.json`. Nothing is pickled, and
the backbone is stored as a reference (package, path or hub id) plus the hash of its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import __version__
from .backbone import Backbone, BackboneError
from .config import BackboneConfig

if TYPE_CHECKING:
    from .learner import ContinualLearner

FORMAT = "continual-tiny-transformer/checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded, naming the file and the problem."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _tensor_file(prefix: str, tensors: dict[str, torch.Tensor]) -> tuple[str, bytes]:
    data = st_save({k: v.contiguous() for k, v in sorted(tensors.items())})
    return f"{prefix}-{sha256_bytes(data)[:12]}.safetensors", data


def save(learner: "ContinualLearner", directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    tasks = []

    def put(name: str, data: bytes) -> None:
        target = directory / name
        digest = sha256_bytes(data)
        # Content-addressed: an existing file with this name already holds exactly these bytes.
        if not (target.is_file() and target.stat().st_size == len(data)):
            atomic_write(target, data)
        files[name] = {"size": len(data), "sha256": digest}

    for record in learner.tasks.values():
        name, data = _tensor_file(f"tasks/{record.name}", learner.task_tensors(record.name))
        put(name, data)
        tasks.append({**record.to_dict(), "file": name})
    shared = learner.shared_tensors()
    shared_file = None
    if shared:
        shared_file, data = _tensor_file("shared", shared)
        put(shared_file, data)
    shared_json = learner.method.shared_json(learner)
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
    """Delete tensor files the new manifest no longer lists (deleted or re-learned tasks)."""
    for path in (list(directory.glob("*.safetensors")) + list(directory.glob("tasks/*.safetensors"))
                 + list(directory.glob("shared-*.json"))):
        if path.relative_to(directory).as_posix() not in files:
            path.unlink(missing_ok=True)


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a checkpoint directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')!r} is not supported "
            f"(this library reads version {FORMAT_VERSION})"
        )
    return manifest


def read_tensors(directory: Path, name: str, manifest: dict) -> dict[str, torch.Tensor]:
    """Read one listed safetensors file after checking its size and SHA-256."""
    return st_load(read_listed(directory, name, manifest))


def read_listed(directory: Path, name: str, manifest: dict) -> bytes:
    """The bytes of one listed file after checking its size and SHA-256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise CheckpointError(f"{directory / MANIFEST}: file {name!r} is not listed")
    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    data = path.read_bytes()
    if len(data) != entry["size"]:
        raise CheckpointError(f"{path}: size {len(data)} bytes, manifest says {entry['size']} (truncated?)")
    if sha256_bytes(data) != entry["sha256"]:
        raise CheckpointError(f"{path}: SHA-256 does not match the manifest (file altered)")
    return data


def load(directory: Path, device: str | None = None) -> "ContinualLearner":
    from .learner import ContinualLearner, TaskRecord
    from .methods import make_method

    manifest = read_manifest(directory)
    spec = manifest["backbone"]
    # The stored reference: the package name for the default, else the folder or hub id.
    config = BackboneConfig(**{**spec["config"], "name": spec["name"]})
    backbone = Backbone.load(config, device)
    if backbone.ref.sha256 != spec["sha256"]:
        raise BackboneError(
            f"{directory / MANIFEST}: backbone {spec['name']!r} has SHA-256 {backbone.ref.sha256[:12]}…, "
            f"but this model was trained on {spec['sha256'][:12]}…; refusing to load"
        )
    method = make_method(manifest["method"]["name"], manifest["method"]["hyperparameters"])
    learner = ContinualLearner(backbone, method=method, router=manifest.get("router"))
    if manifest.get("shared_file"):
        learner.load_shared_tensors(read_tensors(directory, manifest["shared_file"], manifest))
    if manifest.get("shared_json_file"):
        data = read_listed(directory, manifest["shared_json_file"], manifest)
        learner.method.load_shared_json(learner, json.loads(data))
    for entry in manifest["tasks"]:
        record = TaskRecord.from_dict({k: v for k, v in entry.items() if k != "file"})
        learner.load_task_tensors(record, read_tensors(directory, entry["file"], manifest))
    return learner
