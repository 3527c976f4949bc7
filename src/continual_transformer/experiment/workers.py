"""The one way to run work in a child process: `target(send, *args)` in a fresh interpreter.

    worker = Worker(target, *args, quiet=True).start()
    result = worker.wait(on_event)     # on_event(kind, *payload) for each send(kind, *payload)

The child is spawned, never forked: a fork of a process that runs threads (a server, torch's
pools) can inherit a lock some other thread held, and a fresh interpreter's memory is its own
(its peak resident memory measures only its own work). `target` and `args` cross pickled, so
the target is a module-level function. One one-way pipe carries, in order, the events, then the
return value or the exception the target raised. A child that dies without either (killed,
`os._exit`, out of memory) closes the pipe, so the parent never waits on a dead one.

This module imports nothing heavy at import time: every child imports it first.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import traceback
from typing import Callable

Send = Callable[..., None]  # send(kind, *payload): one event to the parent
OnEvent = Callable[..., None]  # on_event(kind, *payload), in the parent

_EVENT, _RETURNED, _RAISED = "event", "returned", "raised"


class WorkerFailed(Exception):
    """The target raised. `error` is its exception as the child raised it (or, for one that
    cannot be pickled, its nearest built-in class naming its type and message); `traceback` is
    the child's traceback as text."""

    def __init__(self, error: BaseException, traceback_text: str):
        super().__init__(f"the worker raised {type(error).__name__}: {error}\n{traceback_text}")
        self.error = error
        self.traceback = traceback_text


class WorkerDied(Exception):
    """The process ended without a result. `exitcode` is its exit status (negative: killed by
    that signal)."""

    def __init__(self, exitcode: int | None):
        super().__init__(f"the worker process ended without a result (exit code {exitcode})")
        self.exitcode = exitcode


class Worker:
    """One child process running `target(send, *args)`; `quiet` sends its stdout to /dev/null
    (libraries' prints would tear a front end's progress display)."""

    def __init__(self, target: Callable, *args, name: str | None = None, quiet: bool = False):
        self._target, self._args, self._name, self._quiet = target, args, name, quiet
        self._process: multiprocessing.process.BaseProcess | None = None
        self._receiver = None

    def start(self) -> "Worker":
        context = multiprocessing.get_context("spawn")
        self._receiver, sender = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, name=self._name, daemon=True,
                                        args=(sender, self._quiet, self._target, self._args))
        try:
            self._process.start()
        finally:
            sender.close()  # the child holds the only write end: its exit is our end of file
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def terminate(self) -> None:
        """End the child (SIGTERM); `wait` then raises WorkerDied. Safe from another thread."""
        if self._process is not None and self._process.is_alive():
            self._process.terminate()

    def wait(self, on_event: OnEvent | None = None) -> object:
        """Pass each event to `on_event` until the target ends; return what it returned.

        Raises WorkerFailed if it raised, WorkerDied if the process ended without a result.
        If waiting itself fails (`on_event` raised, Ctrl-C), the child is ended first.
        """
        try:
            message = self._follow(on_event)
        except BaseException:
            self.terminate()
            raise
        finally:
            self._receiver.close()
            self._process.join()
        if message is None:
            raise WorkerDied(self._process.exitcode)
        if message[0] == _RAISED:
            raise WorkerFailed(message[1], message[2])
        return message[1]

    def _follow(self, on_event: OnEvent | None) -> tuple | None:
        """Events to `on_event` until the final message; None if the pipe closed first."""
        while True:
            try:
                message = self._receiver.recv()
            except (EOFError, OSError):  # OSError: it died in the middle of a message
                return None
            if message[0] != _EVENT:
                return message
            if on_event is not None:
                on_event(message[1], *message[2])


def _child_main(sender, quiet: bool, target: Callable, args: tuple) -> None:
    if quiet:  # at the descriptor, so C libraries' prints go too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    def send(kind: str, *payload) -> None:
        sender.send((_EVENT, kind, payload))

    try:
        sender.send((_RETURNED, target(send, *args)))  # pickled before any byte is written
    except Exception as exc:  # SystemExit and KeyboardInterrupt end the process: WorkerDied
        sender.send((_RAISED, _picklable(exc), traceback.format_exc()))
    finally:
        sender.close()


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives the trip (one whose __init__ wants other arguments than its args, or
    a compiled library's, fails to unpickle), else its nearest built-in class, so that
    `isinstance(error, ValueError)` still holds, with a message that names what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        pass
    text = f"{type(exc).__name__}: {exc}"
    builtin = next(c for c in type(exc).__mro__ if c.__module__ == "builtins")
    try:
        return builtin(text)
    except Exception:  # a built-in that wants more arguments (UnicodeDecodeError)
        return RuntimeError(text)
