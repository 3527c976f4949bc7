"""The worker protocol, on real processes: events, result, failures, death, termination."""

import os
import signal
import threading
import time

import pytest

from continual_transformer.experiment.workers import Worker, WorkerDied, WorkerFailed


# Targets are module-level: a spawned child imports them by name.
def _count(send, n, word):
    print("library noise")
    os.write(1, b"C-level noise\n")
    for i in range(n):
        send("step", i, word)
    return {"pid": os.getpid(), "word": word * 2}


def _raise(send, text):
    send("before")
    print("not quiet")
    raise ValueError(text)


class _Stubborn(Exception):
    def __init__(self, code: int, text: str):  # unpickles as _Stubborn(text): a TypeError
        super().__init__(text)
        self.code = code


def _raise_unpicklable(send):
    raise _Stubborn(7, "bad input")


def _exit(send, code):
    send("before")
    os._exit(code)


def _sleep(send):
    send("started")
    time.sleep(60)


def test_events_arrive_in_order_and_the_result_comes_back(capfd):
    events = []
    result = Worker(_count, 50, "ab", quiet=True).start().wait(lambda *e: events.append(e))
    assert events == [("step", i, "ab") for i in range(50)]
    assert result["word"] == "abab" and result["pid"] != os.getpid()  # another process
    assert "noise" not in capfd.readouterr().out  # quiet: Python's and C's prints are gone


def test_a_raising_target_gives_its_exception_and_traceback(capfd):
    events = []
    with pytest.raises(WorkerFailed) as failed:
        Worker(_raise, "no labels in 'spam'").start().wait(lambda *e: events.append(e))
    assert events == [("before",)]
    error = failed.value.error
    assert type(error) is ValueError and str(error) == "no labels in 'spam'"
    assert "in _raise" in failed.value.traceback and "ValueError: no labels" in failed.value.traceback
    assert "not quiet" in capfd.readouterr().out  # without quiet the child's stdout is kept


def test_an_exception_that_cannot_be_pickled_keeps_its_builtin_class_and_name():
    with pytest.raises(WorkerFailed) as failed:
        Worker(_raise_unpicklable).start().wait()
    error = failed.value.error
    assert type(error) is Exception and str(error) == "_Stubborn: bad input"


def test_a_process_that_exits_without_a_result_gives_its_exit_code():
    events = []
    with pytest.raises(WorkerDied, match=r"ended without a result \(exit code 3\)") as died:
        Worker(_exit, 3).start().wait(lambda *e: events.append(e))
    assert died.value.exitcode == 3 and events == [("before",)]


def test_terminate_from_another_thread_ends_the_wait():
    started = threading.Event()
    worker = Worker(_sleep).start()

    def stop():
        started.wait(30)
        worker.terminate()

    stopper = threading.Thread(target=stop)
    stopper.start()
    begun = time.monotonic()
    with pytest.raises(WorkerDied) as died:
        worker.wait(lambda kind: started.set())
    stopper.join()
    assert died.value.exitcode == -signal.SIGTERM and time.monotonic() - begun < 30


def test_an_error_while_waiting_ends_the_child():
    def on_event(kind):
        raise KeyboardInterrupt

    worker = Worker(_sleep).start()
    begun = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        worker.wait(on_event)
    assert time.monotonic() - begun < 30  # not left to sleep its 60 s
    with pytest.raises(ProcessLookupError):  # ended and reaped, not left running
        os.kill(worker.pid, 0)
