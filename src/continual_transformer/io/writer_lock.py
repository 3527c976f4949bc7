"""One writer per model directory: a lock held on the directory for as long as the writer runs.

    lock = WriterLock(model_dir, "ctt serve --role writer").acquire()   # WriterBusy if held
    ...
    lock.release()                                                       # or: with WriterLock(...):

Readers (`ctt serve --role reader`) never write, so any number of them share a directory with
its one writer: task files are content-addressed and never rewritten, and a new version becomes
visible only by the atomic rename of `manifest.json`. Writers are what must be one: two of them
would each commit a version built from what they alone had learned.

The lock is `flock` on `<model_dir>/writer.lock`. The kernel drops it when its holder exits,
however it exits (killed included), so a crashed writer never blocks the next one; the file's
text (process id, host, command, start time) only names the holder in the error a second writer
gets. On NFS (a Kubernetes ReadWriteMany volume) Linux carries `flock` as a byte-range lock to
the server, so the lock holds across machines.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = "writer.lock"


class WriterBusy(RuntimeError):
    """Another process holds the model directory's writer lock."""


class WriterLock:
    """The writer lock of `directory`, taken by `what` (a short description of the writer)."""

    def __init__(self, directory: Path, what: str):
        self.path = Path(directory) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "WriterLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WriterBusy(f"{self.path.parent} already has a writer: {holder(self.path.parent)}; "
                             "one process at a time may learn, delete or roll back there "
                             "(serve more replicas with --role reader)") from None
        except BaseException:
            os.close(fd)
            raise
        # Name the holder only once the lock is ours, so a refused writer never overwrites it.
        text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.ftruncate(fd, 0)
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holder(directory: Path) -> str:
    """Who holds `directory`'s writer lock, as its lock file says (best effort: the text is
    written just after the lock is taken)."""
    try:
        info = json.loads((Path(directory) / LOCK_FILE).read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "a process that has not named itself yet"
    return f"process {info.get('pid')} on {info.get('host')} ({info.get('what')}, since {info.get('since')})"
