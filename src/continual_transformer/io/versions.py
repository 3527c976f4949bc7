"""A model directory's versions: list them, roll back to one, prune old ones.

Every save that changes a model is a numbered version whose manifest is kept in
`versions/<NNNNNN>.json` (see `checkpoint.py`); `manifest.json` is the current one. The history
only grows: rolling back to version 3 from version 7 writes version 8 with version 3's content
(and the change 'rollback to 3'). Task and shared files are content-addressed and shared by the
versions that list them; none is deleted while a kept version lists it.

Crash safety, as for every write here: a rollback verifies the old version's files, then commits
its manifest exactly as a save does (the next version's file, then `manifest.json`); a prune
removes old versions' manifests first (oldest first, fsynced), then the files no kept version
lists. Killed at any moment, every kept version loads.

One writer per directory: `ctt rollback` and `ctt prune` take the directory's writer lock
(`writer_lock.py`), so they refuse a directory a running server writes to (the server has its own
rollback endpoint and `CTT_KEEP_VERSIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import checkpoint, store
from .checkpoint import UnknownVersion, read_manifest, version_numbers
from .manifest import version_file

__all__ = ["Pruned", "UnknownVersion", "Version", "current_version", "list_versions", "prune",
           "rollback"]


@dataclass(frozen=True)
class Version:
    """One kept version of a model directory."""

    number: int
    saved_at: str | None  # None: written before versions (version 0)
    change: str | None  # 'learned X', 'deleted Y', 'rollback to N'; None before versions
    tasks: tuple[str, ...]
    current: bool


@dataclass(frozen=True)
class Pruned:
    """What `prune` kept and removed."""

    kept: tuple[int, ...]
    removed: tuple[int, ...]
    files_removed: tuple[str, ...]  # relative names
    bytes_freed: int


def current_version(directory: Path) -> int:
    """The number of the version `manifest.json` holds (0: written before versions)."""
    return read_manifest(Path(directory)).get("version", 0)


def _kept(directory: Path, current: int) -> list[int]:
    """The kept versions' numbers, ascending: never one above the current (a killed save's)."""
    numbers = [n for n in version_numbers(directory) if n <= current]
    return numbers if current in numbers else numbers + [current]  # version 0, never copied yet


def list_versions(directory: Path) -> list[Version]:
    """Every kept version of `directory`, oldest first; the last is the current one."""
    directory = Path(directory)
    current = current_version(directory)
    found = []
    for number in _kept(directory, current):
        manifest = read_manifest(directory, number)
        found.append(Version(number, manifest.get("saved_at"), manifest.get("change"),
                             tuple(t["name"] for t in manifest["tasks"]), number == current))
    return found


def rollback(directory: Path, version: int) -> int:
    """Make `version`'s content current again, as a new version (its number is returned; the
    current one's if `version` holds the current content). Its files are verified first."""
    directory = Path(directory)
    target = read_manifest(directory, version)  # UnknownVersion names the kept ones
    for name, entry in target["files"].items():
        store.read_verified(directory / name, entry)
    manifest = {k: v for k, v in target.items() if k not in checkpoint.VERSION_FIELDS}
    return checkpoint.commit(directory, manifest, change=f"rollback to {version}")


def prune(directory: Path, keep: int) -> Pruned:
    """Keep the `keep` newest versions (the current one always), remove the others' manifests,
    then every file no kept version lists (and files a killed save left behind)."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer of 1 or more (the current version is always "
                         f"kept), got {keep!r}")
    directory = Path(directory)
    current = current_version(directory)
    kept = _kept(directory, current)[-keep:]
    # Read every kept manifest before removing anything: a damaged one stops the prune here.
    referenced = {name for number in kept for name in read_manifest(directory, number)["files"]}
    referenced |= set(read_manifest(directory)["files"])
    removed = [n for n in version_numbers(directory) if n not in kept]
    store.remove_files([directory / version_file(n) for n in removed])  # oldest first, fsynced
    files = checkpoint.remove_unreferenced(directory, referenced)
    return Pruned(tuple(kept), tuple(n for n in removed if n <= current), tuple(files),
                  sum(files.values()))
