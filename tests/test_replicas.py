"""Replicas on one model directory: exactly one writer (a lock on the directory), and readers
that serve each version the writer saves without failing a request. Real uvicorns on 127.0.0.1,
as in test_server.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from continual_transformer.cli import app
from continual_transformer.io.checkpoint import read_manifest
from continual_transformer.io.versions import current_version
from continual_transformer.io.writer_lock import WriterBusy, WriterLock
from test_server import (ADMIN, AS_ADMIN, AS_READER, BEASTS, PRECISION, PROBE, READER, model_dir,  # noqa: F401
                         serving, trained_dir, upload_body)


def _tasks(client: httpx.Client) -> list[str]:
    return [t["name"] for t in client.get("/v1/tasks", headers=AS_READER).json()["tasks"]]


def test_a_second_writer_is_refused_with_the_holder_named(model_dir):  # noqa: F811
    with serving(model_dir):
        env = {"CTT_ADMIN_KEY": ADMIN, "CTT_API_KEYS": READER}
        refused = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "1"], env=env)
        output = " ".join(refused.output.split())
        assert refused.exit_code == 2, output
        assert f"{model_dir} already has a writer: process {os.getpid()} on" in output
        assert "(ctt serve, since" in output and "serve more replicas with --role reader" in output
        for command in (["rollback", str(model_dir), "1"], ["prune", str(model_dir), "--keep", "1"]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2 and "already has a writer" in result.output, result.output
        # A reader needs no lock: it starts beside the writer.
        with serving(model_dir, role="reader") as reader:
            assert reader.client.get("/readyz").json()["role"] == "reader"
    # The writer stopped: the lock is free again, and the lock file is no foreign file.
    WriterLock(model_dir, "test").acquire().release()
    assert CliRunner().invoke(app, ["prune", str(model_dir), "--keep", "1"]).exit_code == 0
    assert (model_dir / "writer.lock").is_file()


def test_a_killed_writer_leaves_no_stale_lock(model_dir, tmp_path):  # noqa: F811
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from continual_transformer.io.writer_lock import "
         "WriterLock; WriterLock(sys.argv[1], 'holder').acquire(); print('held', flush=True); "
         "time.sleep(600)", str(model_dir)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WriterBusy, match=f"process {holder.pid} on .* \\(holder, since"):
            WriterLock(model_dir, "second").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    WriterLock(model_dir, "second").acquire().release()  # the kernel dropped the dead one's lock


def test_a_reader_serves_each_version_the_writer_saves_without_failing_a_request(model_dir):  # noqa: F811
    with serving(model_dir) as writer, serving(model_dir, role="reader", reload_interval_ms=20) as reader:
        assert reader.client.get("/readyz").json() == {
            "status": "ready", "tasks": 2, "version": 1, "precision": PRECISION, "role": "reader"}
        before = reader.predict(PROBE).json()
        assert before == writer.predict(PROBE).json()

        # A reader changes nothing, and says where changes go.
        for method, path, body in (("POST", "/v1/tasks", upload_body("beasts")),
                                   ("DELETE", "/v1/tasks/kinds", None),
                                   ("POST", "/v1/versions/1/rollback", None)):
            refused = reader.client.request(method, path, json=body, headers=AS_ADMIN)
            assert refused.status_code == 409, refused.text
            assert "is a reader of" in refused.json()["detail"] and "to the writer" in refused.json()["detail"]

        # Clients keep predicting on the reader while the writer learns and the reader switches.
        answers, stop = [], threading.Event()

        def client_loop():
            with httpx.Client(base_url=reader.url, timeout=30) as own:
                while not stop.is_set():
                    response = own.post("/v1/predict", json=PROBE, headers=AS_READER)
                    answers.append((response.status_code, response.json()))

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            job = writer.client.post("/v1/tasks", json=upload_body("beasts"), headers=AS_ADMIN).json()
            assert writer.wait_for_job(job["id"])["state"] == "succeeded"
            saved = time.monotonic()
            while "beasts" not in _tasks(reader.client):
                assert time.monotonic() - saved < 30, "the reader never served the new task"
                time.sleep(0.01)
            time.sleep(0.2)  # a few more requests on the new version
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
        assert len(answers) > 8
        assert all(answer == (200, before) for answer in answers)  # old tasks: the same answers
        ready = reader.client.get("/readyz").json()
        assert ready["version"] == 2 == current_version(model_dir) and ready["tasks"] == 3
        assert reader.predict(BEASTS).json() == writer.predict(BEASTS).json()
        routed = {"items": [{"text": item["text"]} for item in PROBE["items"] + BEASTS["items"]]}
        assert reader.predict(routed).json() == writer.predict(routed).json()

        # A deletion reaches the reader too.
        assert writer.client.delete("/v1/tasks/beasts", headers=AS_ADMIN).status_code == 204
        deadline = time.monotonic() + 30
        while "beasts" in _tasks(reader.client):
            assert time.monotonic() < deadline, "the reader still serves a deleted task"
            time.sleep(0.01)
        gone = reader.predict(BEASTS)
        assert gone.status_code == 422
        assert gone.json()["detail"] == "unknown task 'beasts'; known: ['kinds', 'topics']"
        assert reader.client.get("/readyz").json()["version"] == 3
        assert [t["name"] for t in read_manifest(model_dir)["tasks"]] == ["kinds", "topics"]
