"""Atomic, content-addressed files: how everything the package writes reaches the disk.

Checkpoints, run states, reports and plots are written here and nowhere else:

- `atomic_write`: a temporary file in the same directory, flushed, fsynced and renamed into
  place, then the directory fsynced; a reader sees the old bytes or the new, never a mixture,
  even after a power cut.
- `put`: content-addressed files (`<prefix>-<sha256[:12]><suffix>`), written only when the
  same name does not already hold exactly those bytes, so a save never rewrites a file that an
  older manifest still points to. It returns the manifest entry (size, SHA-256).
- `read_verified`: a listed file's bytes after checking them against that entry.
- `remove_files`: deletions that are on disk before the function returns.

Temporary files are named `.<name>.<random>.tmp` (`TEMP_FILE`): a killed writer can leave one,
and the next writer of that directory removes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TEMP_FILE = re.compile(r"^\.[^/]+\.[a-z0-9_]+\.tmp$")  # see `atomic_write`


class CheckpointError(RuntimeError):
    """A stored model or run state that cannot be used, naming the file and the problem."""


class UnknownVersion(CheckpointError):
    """A version number a model directory does not hold (the message lists the ones it does)."""


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


def remove_files(paths: list[Path]) -> None:
    """Delete `paths` (those already gone are fine), then fsync their directories: these
    deletions reach the disk before any later one (after a power cut, a version's manifest
    cannot come back while the files it lists stay deleted)."""
    for path in paths:
        path.unlink(missing_ok=True)
    for directory in {path.parent for path in paths}:
        if directory.is_dir():
            _fsync_dir(directory)


def content_name(prefix: str, data: bytes, suffix: str) -> str:
    """`<prefix>-<first 12 hex digits of the SHA-256 of data><suffix>`."""
    return f"{prefix}-{sha256_bytes(data)[:12]}{suffix}"


def tensor_bytes(tensors: dict[str, "torch.Tensor"]) -> bytes:
    """safetensors bytes of `tensors`, the same bytes for the same tensors (sorted keys)."""
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sorted(tensors.items())})


def tensor_file(prefix: str, tensors: dict[str, "torch.Tensor"]) -> tuple[str, bytes]:
    """A content-addressed safetensors file: (`<prefix>-<hash12>.safetensors`, its bytes)."""
    data = tensor_bytes(tensors)
    return content_name(prefix, data, ".safetensors"), data


def put(directory: Path, name: str, data: bytes) -> dict:
    """Store `data` as `directory/name` unless that file already holds exactly these bytes;
    return its manifest entry {"size", "sha256"}.

    Content-addressed names normally hold their bytes already; a damaged copy is rewritten,
    so that no manifest ever lists a file whose bytes it does not describe.
    """
    target = directory / name
    digest = sha256_bytes(data)
    if not (target.is_file() and target.stat().st_size == len(data)
            and sha256_bytes(target.read_bytes()) == digest):
        atomic_write(target, data)
    return {"size": len(data), "sha256": digest}


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


def parse_tensors(path: Path, data: bytes) -> dict[str, "torch.Tensor"]:
    """The tensors of a safetensors file's bytes (read from `path`, named in errors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: not a safetensors file ({exc})") from None


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
