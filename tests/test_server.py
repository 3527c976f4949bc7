"""The HTTP server, against a real uvicorn on 127.0.0.1 (a random free port) and an HTTP client.

The model is the tiny random BERT with the two toy tasks; learning jobs run in their own
processes exactly as in production.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.io.checkpoint import read_manifest
from continual_transformer.server.app import create_app
from continual_transformer.server.settings import Settings
from continual_transformer.training.precision import resolved
from conftest import WORDS, toy_rows, write_jsonl

ADMIN = "admin-key-0123456789abcdef"
# What the server predicts in by default (CTT_PRECISION=auto), as /readyz reports it.
PRECISION = resolved("auto", torch.device("cpu"))
READER = "reader-key-0123456789abcdef"
OTHER_READER = "reader-two-0123456789abcdef"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
AS_READER = {"Authorization": f"Bearer {READER}"}

PROBE = {"items": [{"text": "cat and dog with cow", "task": "kinds"},
                   {"text": "bread and soup with rice", "task": "kinds"},
                   {"text": "red and blue with green", "task": "topics"},
                   {"text": "golf and tennis with rugby", "task": "topics"}]}

BEASTS = {"items": [{"text": "tiger and lion with wolf", "task": "beasts"}]}


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, tiny_config):
    folder = tmp_path_factory.mktemp("served")
    stream = write_jsonl(folder / "toy.jsonl", toy_rows())
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    for task in load_stream(stream):
        learner.learn(task)
    return learner.save(folder / "model")


@pytest.fixture
def model_dir(trained_dir, tmp_path) -> Path:
    return Path(shutil.copytree(trained_dir, tmp_path / "model"))


def make_settings(model_dir: Path, **overrides) -> Settings:
    values = dict(model_dir=model_dir, admin_key=ADMIN, api_keys=f"{READER},{OTHER_READER}",
                  device="cpu", learn_nice=0, rate_limit_per_minute=0)  # limits: own test
    values.update(overrides)
    return Settings(_env_file=None, **values)


class Served:
    def __init__(self, app, server: uvicorn.Server):
        self.app = app
        port = server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def predict(self, body: dict, headers=AS_READER) -> httpx.Response:
        return self.client.post("/v1/predict", json=body, headers=headers)

    def wait_for_job(self, job_id: str, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}", headers=AS_READER).json()
            if job["state"] in ("succeeded", "failed"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


@contextmanager
def serving(model_dir: Path, **overrides):
    """A real uvicorn on 127.0.0.1, port chosen by the OS, in a thread of this process."""
    app = create_app(make_settings(model_dir, **overrides))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    served = Served(app, server)
    try:
        yield served
    finally:
        served.client.close()
        server.should_exit = True
        thread.join(60)


def upload_body(name: str, n_train: int = 40, n_test: int = 10, epochs: int | None = None) -> dict:
    """A task the toy model has not seen: animals versus sports."""
    import random

    rng = random.Random(name)
    rows = {"train": [], "test": []}
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            label = ("animal", "sport")[i % 2]
            rows[split].append({"text": " and ".join(rng.sample(WORDS[label], 3)), "label": label})
    body = {"name": name, **rows}
    if epochs is not None:
        body["epochs"] = epochs
    return body


# -- settings and start-up ---------------------------------------------------------------------
def test_refuses_to_start_with_writes_and_no_admin_key(model_dir, monkeypatch, tmp_path):
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from continual_transformer.cli import app

    with pytest.raises(ValidationError, match="CTT_ADMIN_KEY is not set and the write endpoints"):
        Settings(_env_file=None, model_dir=model_dir, api_keys=READER)
    with pytest.raises(ValidationError, match="CTT_ADMIN_KEY has 5 characters; use at least 16"):
        Settings(_env_file=None, model_dir=model_dir, admin_key="short")
    with pytest.raises(ValidationError, match="CTT_API_KEYS: key 2 has 3 characters"):
        Settings(_env_file=None, model_dir=model_dir, admin_key=ADMIN, api_keys=f"{READER},abc")
    # read-only serving needs no admin key
    assert Settings(_env_file=None, model_dir=model_dir, enable_writes=False, api_keys=READER)

    monkeypatch.chdir(tmp_path)  # no .env here
    for name in [n for n in os.environ if n.startswith("CTT_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(app, ["serve", str(model_dir), "--port", "1"])
    assert result.exit_code == 2
    assert "CTT_ADMIN_KEY is not set" in result.output.replace("\n", "")
    result = CliRunner().invoke(app, ["serve", str(tmp_path / "nowhere")],
                                env={"CTT_ADMIN_KEY": ADMIN})
    assert result.exit_code == 2 and "no such checkpoint directory" in result.output.replace("\n", "")


def test_settings_come_from_environment_and_dotenv(model_dir, monkeypatch, tmp_path):
    from continual_transformer.server import settings as settings_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"CTT_ADMIN_KEY={ADMIN}\nCTT_MAX_ITEMS=7\n")
    monkeypatch.setenv("CTT_MODEL_DIR", str(model_dir))
    monkeypatch.setenv("CTT_API_KEYS", f" {READER} , {OTHER_READER} ")
    monkeypatch.setenv("CTT_PUBLIC_PREDICT", "true")
    settings_module.get_settings.cache_clear()
    try:
        settings = settings_module.get_settings()
        assert settings is settings_module.get_settings()  # read once
    finally:
        settings_module.get_settings.cache_clear()
    assert settings.model_dir == model_dir and settings.max_items == 7 and settings.public_predict
    assert settings.admin_key.get_secret_value() == ADMIN
    assert settings.reader_keys() == (READER, OTHER_READER)
    assert ADMIN not in repr(settings) and READER not in repr(settings)


def test_importing_the_server_loads_no_model_and_reads_no_settings(tmp_path):
    code = ("import os, sys; import continual_transformer.server.app as app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "app.create_app  # building the app needs settings; importing it does not")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTT_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)


# -- auth ----------------------------------------------------------------------------------------
# (method, path, body, what a reader gets, what the admin gets). Bodies that pass auth are
# chosen not to change anything: an unknown task to delete, an invalid task to learn.
ROUTES = [
    ("GET", "/healthz", None, 200, 200),
    ("GET", "/readyz", None, 200, 200),
    ("GET", "/metrics", None, 200, 200),
    ("POST", "/v1/predict", PROBE, 200, 200),
    ("GET", "/v1/tasks", None, 200, 200),
    ("POST", "/v1/tasks", {"name": "x", "train": [{"text": "a", "label": "b"}]}, 403, 422),
    ("POST", "/v1/tasks/file", "FILE", 403, 422),
    ("DELETE", "/v1/tasks/{name}", None, 403, 404),
    ("GET", "/v1/jobs", None, 200, 200),
    ("GET", "/v1/jobs/{job_id}", None, 404, 404),
    ("GET", "/v1/versions", None, 403, 200),
    ("POST", "/v1/versions/{version}/rollback", None, 403, 404),
]
PUBLIC = {"/healthz", "/readyz"}


def _call(served: Served, method: str, path: str, body, headers: dict) -> httpx.Response:
    url = path.replace("{name}", "nosuchtask").replace("{job_id}", "nosuchjob").replace("{version}", "99")
    if body == "FILE":
        return served.client.post(url, files={"file": ("t.jsonl", b'{"task": "x"}\n')}, headers=headers)
    return served.client.request(method, url, json=body, headers=headers)


def test_every_route_checks_the_key(model_dir):
    with serving(model_dir) as served:
        paths = served.client.get("/openapi.json").json()["paths"]
        routes = {(method.upper(), path) for path, methods in paths.items() for method in methods}
        assert routes == {(m, p) for m, p, *_ in ROUTES}, "a route without an auth expectation"
        for method, path, body, as_reader, as_admin in ROUTES:
            for headers, expected in (({}, 401), ({"Authorization": "Bearer not-a-key-0123456789"}, 401),
                                      ({"Authorization": f"Basic {ADMIN}"}, 401),
                                      ({"Authorization": ADMIN}, 401),
                                      (AS_READER, as_reader), (AS_ADMIN, as_admin)):
                if path in PUBLIC and expected == 401:
                    expected = 200
                response = _call(served, method, path, body, headers)
                assert response.status_code == expected, (method, path, headers, response.text)
                if expected == 401:
                    assert response.headers["www-authenticate"] == "Bearer"
                if expected == 403:
                    assert response.json() == {"detail": "this needs the admin key (CTT_ADMIN_KEY)"}


def test_public_predict_and_read_only_server(model_dir):
    with serving(model_dir, public_predict=True, public_metrics=True, enable_writes=False,
                 admin_key=None) as served:
        assert served.predict(PROBE, headers={}).status_code == 200
        assert served.predict(PROBE, headers={"Authorization": "Bearer wrong-key-0123456789"}).status_code == 401
        assert served.client.get("/v1/tasks").status_code == 401  # reading still needs a key
        assert served.client.get("/metrics").status_code == 200
        # no write routes at all: nothing to authorise
        assert served.client.post("/v1/tasks", json=upload_body("new"), headers=AS_READER).status_code == 405
        assert served.client.delete("/v1/tasks/kinds", headers=AS_READER).status_code == 404
        paths = served.client.get("/openapi.json").json()["paths"]
        assert "/v1/tasks/file" not in paths and "post" not in paths["/v1/tasks"]


# -- rate limits and input limits ------------------------------------------------------------
def test_rate_limit_per_key(model_dir):
    with serving(model_dir, rate_limit_per_minute=6, rate_limit_burst=3) as served:
        assert [served.predict(PROBE).status_code for _ in range(3)] == [200] * 3
        limited = served.client.get("/v1/tasks", headers=AS_READER)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        assert "6 requests per minute per key (CTT_RATE_LIMIT_PER_MINUTE)" in limited.json()["detail"]
        # another key has its own bucket
        other = {"Authorization": f"Bearer {OTHER_READER}"}
        assert served.predict(PROBE, headers=other).status_code == 200


def test_input_limits_name_the_limit(model_dir, tmp_path):
    with serving(model_dir, max_items=4, max_text_chars=50, max_body_bytes=2048,
                 max_upload_bytes=4096, max_train_examples=10) as served:
        too_many = {"items": PROBE["items"] + PROBE["items"][:1]}
        response = served.predict(too_many)
        assert response.status_code == 413
        assert response.json()["detail"] == "5 items, more than the limit of 4 per request (CTT_MAX_ITEMS)"

        response = served.predict({"items": [{"text": "x" * 51, "task": "kinds"}]})
        assert response.status_code == 422
        assert response.json()["detail"] == ("items[0].text has 51 characters, more than the limit of "
                                             "50 (CTT_MAX_TEXT_CHARS)")

        big = json.dumps({"items": [{"text": "y" * 3000, "task": "kinds"}]}).encode()
        message = "request body over the limit of 2048 bytes (CTT_MAX_BODY_BYTES)"
        response = served.client.post("/v1/predict", content=big, headers={**AS_READER, "content-type": "application/json"})
        assert (response.status_code, response.json()["detail"]) == (413, message)
        chunks = (big[i:i + 512] for i in range(0, len(big), 512))  # no Content-Length: streamed
        response = served.client.post("/v1/predict", content=chunks, headers={**AS_READER, "content-type": "application/json"})
        assert (response.status_code, response.json()["detail"]) == (413, message)

        response = served.client.post("/v1/tasks", json=upload_body("many", n_train=11, n_test=0),
                                      headers=AS_ADMIN)
        assert response.status_code == 422
        assert response.json()["detail"] == ("task 'many' has 11 train examples, more than the limit "
                                             "of 10 (CTT_MAX_TRAIN_EXAMPLES)")
        body = upload_body("long", n_train=4, n_test=0)
        body["train"][2]["text"] = "z" * 51
        response = served.client.post("/v1/tasks", json=body, headers=AS_ADMIN)
        assert response.json()["detail"] == ("task 'long': train example 2 has 51 characters, more "
                                             "than the limit of 50 (CTT_MAX_TEXT_CHARS)")

        response = served.client.post("/v1/tasks/file", files={"file": ("big.jsonl", b"x" * 5000)},
                                      headers=AS_ADMIN)
        assert response.status_code == 413
        assert response.json()["detail"] == "request body over the limit of 4096 bytes (CTT_MAX_UPLOAD_BYTES)"

        lone_surrogate = b'{"items": [{"text": "bad \\ud800 text", "task": "kinds"}]}'
        response = served.client.post("/v1/predict", content=lone_surrogate,
                                      headers={**AS_READER, "content-type": "application/json"})
        assert response.status_code == 422  # pydantic refuses a lone surrogate
        assert response.json()["detail"][0]["loc"] == ["body", "items", 0, "text"]
        assert served.predict({"items": []}).status_code == 422
        assert served.predict({"items": [{"text": "a", "task": "kinds", "extra": 1}]}).status_code == 422
        for response in (served.predict(too_many), served.predict({"items": "nope"})):
            assert "Traceback" not in response.text and "File \"" not in response.text


def test_uploads_are_checked_like_stream_files(model_dir, tmp_path):
    from continual_transformer.types import StreamError

    with serving(model_dir) as served:
        def learn(body):
            return served.client.post("/v1/tasks", json=body, headers=AS_ADMIN)

        body = upload_body("fresh", n_train=4, n_test=2)
        body["train"][1]["text"] = "   "
        assert learn(body).json()["detail"] == "train[1]: empty text"
        body = upload_body("fresh", n_train=4, n_test=2)
        body["test"][0]["label"] = "plant"
        assert learn(body).json()["detail"] == (
            "test[0]: test label 'plant' of task 'fresh' never appears in its train split; "
            "train labels: ['animal', 'sport']")
        body = upload_body("one-label", n_train=1, n_test=0)
        assert learn(body).json()["detail"] == (
            "upload: task 'one-label' has 1 label(s) in its train split ['animal']; a task needs at least 2")
        body = upload_body("bad name", n_train=2, n_test=0)
        assert learn(body).json()["detail"].startswith("name: invalid task name 'bad name'")
        response = learn(upload_body("kinds"))
        assert (response.status_code, response.json()["detail"]) == (
            409, "task 'kinds' is already learned; delete it first")

        # a file: exactly the message `ctt run` gives for the same file, line number included
        lines = [json.dumps({"task": "fresh", "split": "train", "text": "cat", "label": "animal"}),
                 json.dumps({"task": "fresh", "split": "dev", "text": "golf", "label": "sport"})]
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join(lines) + "\n")
        with pytest.raises(StreamError) as expected:
            load_stream(bad)
        response = served.client.post("/v1/tasks/file", files={"file": ("bad.jsonl", bad.read_bytes())},
                                      headers=AS_ADMIN)
        assert response.status_code == 422
        assert response.json()["detail"] == str(expected.value).replace(str(bad), "bad.jsonl")
        assert response.json()["detail"] == "bad.jsonl:2: unknown split 'dev'; expected one of ['train', 'test']"
        assert served.client.get("/v1/jobs", headers=AS_READER).json() == {"jobs": []}


def test_csv_and_parquet_uploads_with_their_own_columns(model_dir):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    body = upload_body("beasts", n_train=20, n_test=4)
    rows = [(e["text"], e["label"], split) for split in ("train", "test") for e in body[split]]
    columns = {"text_column": "body", "label_column": "y", "split_column": "part"}
    with serving(model_dir) as served:
        def upload(name: str, data: bytes, fields: dict, content_type: str | None = None):
            part = (name, data, content_type) if content_type else (name, data)
            return served.client.post("/v1/tasks/file", files={"file": part}, data=fields,
                                      headers=AS_ADMIN)

        # Parquet, its columns named by form fields: a bad row is named by its index
        bad = [(t if i != 3 else " ", y, s) for i, (t, y, s) in enumerate(rows)]
        buffer = io.BytesIO()
        pq.write_table(pa.table({"body": [r[0] for r in bad], "y": [r[1] for r in bad],
                                 "part": [r[2] for r in bad]}), buffer)
        response = upload("beasts.parquet", buffer.getvalue(), {**columns, "task_name": "beasts"})
        assert (response.status_code, response.json()["detail"]) == (422, "beasts.parquet row 3: empty text")
        # CSV told by its content type; a missing column names the columns found
        csv_text = "body,y,part\n" + "".join(f"{t},{y},{s}\n" for t, y, s in rows)
        response = upload("upload", csv_text.encode(), {"task_name": "beasts"}, "text/csv")
        assert (response.status_code, response.json()["detail"]) == (
            422, "upload: no text column 'text'; columns: ['body', 'y', 'part']")
        response = upload("beasts.csv", csv_text.encode(), {"format": "xlsx"})
        assert response.status_code == 422 and response.json()["detail"].startswith("unknown format 'xlsx'")
        assert served.client.get("/v1/jobs", headers=AS_READER).json() == {"jobs": []}

        # a good CSV without a task column: the task is named after the file
        response = upload("beasts.csv", csv_text.encode(), columns)
        assert response.status_code == 202, response.text
        job = served.wait_for_job(response.json()["id"])
        assert job["state"] == "succeeded", job
        listed = {t["name"]: t for t in served.client.get("/v1/tasks", headers=AS_READER).json()["tasks"]}
        assert listed["beasts"]["train_examples"] == 20 and listed["beasts"]["labels"] == ["animal", "sport"]
        assert served.predict(BEASTS).json()["predictions"][0]["task"] == "beasts"


# -- predicting ----------------------------------------------------------------------------------
def test_mixed_task_request_and_dynamic_batching(model_dir):
    with serving(model_dir, batch_max_wait_ms=200) as served:
        mixed = served.predict(PROBE).json()["predictions"]
        assert [p["task"] for p in mixed] == ["kinds", "kinds", "topics", "topics"]
        learner = ContinualLearner.load(model_dir, device="cpu")
        expected = learner.predict([i["text"] for i in PROBE["items"]], task=[i["task"] for i in PROBE["items"]])
        assert [p["label"] for p in mixed] == [e.label for e in expected]
        assert [p["probabilities"] for p in mixed] == [e.probabilities for e in expected]  # same batch: exact

        # 12 concurrent single-item requests: each gets its own answer, and every request goes
        # through the batcher exactly once. How many batches they form depends on when they
        # arrive; the exact grouping is asserted in test_waiting_requests_are_batched_by_rows.
        singles = [{"items": [item]} for item in PROBE["items"]] * 3
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda body: served.predict(body), singles))
        assert all(a.status_code == 200 for a in answers)
        for body, answer in zip(singles, answers):
            solo = [e for e, i in zip(expected, PROBE["items"]) if i == body["items"][0]][0]
            assert answer.json()["predictions"][0]["label"] == solo.label
        metrics = served.client.get("/metrics", headers=AS_READER).text
        assert _sample(metrics, "ctt_inference_batch_requests_sum") == 13

        # items without a task are routed, in the same request (and pass) as named ones
        routed = served.predict({"items": [{"text": "cat and dog"}, {"text": "red", "task": "topics"}]})
        assert routed.status_code == 200
        answers = routed.json()["predictions"]
        local = learner.predict(["cat and dog", "red"], task=[None, "topics"])
        assert [a["task"] for a in answers] == [p.task for p in local]
        assert [a["label"] for a in answers] == [p.label for p in local]
        assert answers[1]["task"] == "topics"
        unknown = served.predict({"items": [{"text": "cat", "task": "spam"}]})
        assert unknown.json()["detail"] == "unknown task 'spam'; known: ['kinds', 'topics']"


def test_candidate_tasks_and_ambiguous_answers(model_dir):
    # A model whose router is unsure of everything (a huge temperature, saved with its
    # solution as a server saves it): every routed answer is below 0.9.
    unsure = ContinualLearner.load(model_dir, device="cpu")
    unsure.router._temperature = 1e15  # toy decision scores are huge: a huge T
    unsure.save(model_dir, router_solution=True)
    learner = ContinualLearner.load(model_dir, device="cpu")
    assert learner.router.temperature == 1e15
    texts = ["cat and dog", "red and blue"]
    bodies = [{"items": [{"text": t} for t in texts], "top_k": 2},
              {"items": [{"text": t} for t in texts], "min_task_confidence": 0.9},
              {"items": [{"text": t} for t in texts]},
              {"items": [{"text": t} for t in texts], "joint_k": 2}]
    with serving(model_dir, batch_max_wait_ms=200) as served:
        # requests asking differently, served together (the joint decision in a pass of its own)
        with ThreadPoolExecutor(4) as pool:
            ranked, strict, plain, joint = [a.json()["predictions"] for a in pool.map(served.predict, bodies)]
        for answer, p in zip(joint, learner.predict(texts, joint_k=2)):
            assert (answer["task"], answer["label"]) == (p.task, p.label)
        local = learner.predict(texts, top_k=2)
        for answer, p in zip(ranked, local):
            assert answer["status"] == "ok" and answer["task"] == p.task
            assert [c["task"] for c in answer["candidates"]] == [t for t, _ in p.candidates]
            # other requests' texts may share the pass (padding): equal up to rounding
            assert [c["probability"] for c in answer["candidates"]] == pytest.approx(
                [q for _, q in p.candidates], abs=1e-5)
        assert all(len(a["candidates"]) == 1 and a["status"] == "ok" for a in plain)
        for answer, p in zip(strict, local):
            assert answer["status"] == "ambiguous" and answer["task"] is None and answer["label"] is None, (answer["task_probability"], answer["candidates"], [r["task_probability"] for r in ranked])
            assert [c["task"] for c in answer["candidates"]] == [t for t, _ in p.candidates]
        bad = served.predict({"items": [{"text": "cat"}], "top_k": 0})
        assert bad.status_code == 422 and "top_k" in bad.text
        bad = served.predict({"items": [{"text": "cat"}], "joint_k": 0})
        assert bad.status_code == 422 and "joint_k" in bad.text


@pytest.mark.parametrize("max_items, batches", [
    (5, [2, 5, 5, 1]),  # the probe's 4 rows + 1 single; 5 singles; 5 singles; the last single
    (64, [13]),  # everything waiting fits in one batch
])
def test_waiting_requests_are_batched_by_rows(model_dir, max_items, batches):
    """Requests already waiting when the inference thread starts are grouped in arrival order,
    each batch closing at `batch_max_items` rows; a batch is one forward pass whatever tasks its
    rows name. Nothing here depends on timing: every request is queued before the thread runs,
    and the window is 0, so the grouping is exact."""
    import asyncio

    from continual_transformer.server.prometheus import Metrics
    from continual_transformer.server.serving import ModelService

    learner = ContinualLearner.load(model_dir, device="cpu")
    metrics = Metrics()
    service = ModelService(learner, model_dir, batch_max_items=max_items, batch_max_wait_s=0.0,
                           metrics=metrics)
    requests = [PROBE["items"]] + [[item] for item in PROBE["items"]] * 3

    async def submit_all_then_start():
        pending = [asyncio.create_task(service.predict([i["text"] for i in items],
                                                       [i["task"] for i in items]))
                   for items in requests]
        # Tasks run in the order they were created, each queueing its request before it first
        # waits, so the thread starts with all 13 requests already in its queue.
        asyncio.get_running_loop().call_soon(service.start)
        return await asyncio.gather(*pending)

    try:
        answers = asyncio.run(submit_all_then_start())
    finally:
        service.stop()
    expected = {i["text"]: p.label for i, p in zip(PROBE["items"], learner.predict(
        [i["text"] for i in PROBE["items"]], task=[i["task"] for i in PROBE["items"]]))}
    assert [[p.label for p in answer] for answer in answers] == [
        [expected[i["text"]] for i in items] for items in requests]

    def sample(name, **labels):
        return metrics.registry.get_sample_value(name, labels)

    assert sample("ctt_inference_batch_requests_count") == len(batches)
    assert sample("ctt_inference_batch_requests_sum") == 13
    for bound in (1, 2, 4, 8, 16):  # the histogram of requests per batch, bucket by bucket
        assert (sample("ctt_inference_batch_requests_bucket", le=f"{bound:.1f}")
                == sum(b <= bound for b in batches))
    # each batch is a single forward pass over its rows (these short texts need no length cut)
    assert sample("ctt_inference_batch_rows_count") == len(batches)
    assert sample("ctt_inference_batch_rows_sum") == 16


def test_each_pass_takes_the_oldest_text_and_those_nearest_its_length(model_dir):
    """Continuous batching's choice of a pass: the pool's oldest row always goes; then shorter
    rows (they pad to its width), then longer ones, within the padded-token budget and 64 rows."""
    from continual_transformer.server.prometheus import Metrics
    from continual_transformer.server.serving import ModelService, _Pending, _Row

    learner = ContinualLearner.load(model_dir, device="cpu")
    multiple = learner.backbone.length_multiple
    service = ModelService(learner, model_dir, batch_max_items=256, batch_max_wait_s=0.0,
                           metrics=Metrics(), batch_max_tokens=8 * 4 * multiple)
    request = _Pending([], [], None, None)

    def pool(widths):  # rows in arrival order, each `width` multiples long
        return [_Row(request, i, [0] * (w * multiple)) for i, w in enumerate(widths)]

    def chosen(widths):
        rows = pool(widths)
        return sorted(rows.index(r) for r in service._next_pass(rows))

    # oldest is 4 wide: up to 8 rows of width 4; shorter rows first, the 5- and 6-wide ones wait
    assert chosen([4, 1, 6, 2, 5, 4, 3, 1, 1, 2, 1]) == [0, 1, 3, 5, 6, 7, 8, 9]
    # oldest is short: longer rows join while the budget (32 multiples) allows
    assert chosen([1, 8, 2, 2, 3]) == [0, 2, 3, 4]
    # a row wider than the budget goes alone
    assert chosen([40, 1, 1]) == [0]
    # never more than 64 rows, the oldest among them
    assert len(chosen([1] * 100)) == 32 and chosen([1] * 100)[0] == 0
    service.batch_max_tokens = 10_000
    assert chosen([1] * 100) == list(range(64))


def test_memory_is_handed_back_when_the_server_falls_idle_not_after_each_pass(model_dir, monkeypatch):
    """Freed memory goes back to the system once no request has come for a moment, once per
    idle spell; the passes themselves hand nothing back (the next pass would fault the pages
    right back in)."""
    import asyncio

    import continual_transformer.learner as learner_module
    from continual_transformer.server import serving
    from continual_transformer.server.prometheus import Metrics

    learner = ContinualLearner.load(model_dir, device="cpu")
    service = serving.ModelService(learner, model_dir, batch_max_items=4, batch_max_wait_s=0.0,
                                   metrics=Metrics())
    handed_back, by_predictions = [], []
    monkeypatch.setattr(serving, "release_freed_memory", lambda: handed_back.append(time.monotonic()))
    monkeypatch.setattr(learner_module, "release_freed_memory_at_most_every",
                        lambda seconds: by_predictions.append(seconds))
    texts, tasks = [i["text"] for i in PROBE["items"]], [i["task"] for i in PROBE["items"]]

    async def burst():  # several passes back to back (4 rows each), then silence
        answers = await asyncio.gather(*(service.predict(texts, tasks) for _ in range(3)))
        finished = time.monotonic()
        await asyncio.sleep(10 * serving.IDLE_HAND_BACK_SECONDS)
        return answers, finished

    service.start()
    try:
        (answers, first_done), (_, second_done) = asyncio.run(burst()), asyncio.run(burst())
    finally:
        service.stop()
    assert by_predictions == []
    assert [p.label for p in answers[0]] == [p.label for p in learner.predict(texts, task=tasks)]
    assert len(handed_back) == 2  # one per idle spell, after it began
    assert first_done <= handed_back[0] <= second_done <= handed_back[1]


def _sample(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of the first sample called `name` whose labels contain `labels`."""
    for line in metrics_text.splitlines():
        metric, _, value = line.rpartition(" ")
        if not line.startswith("#") and metric.split("{", 1)[0] == name and labels in metric:
            return float(value)
    raise AssertionError(f"no sample {name}{{{labels}}} in the metrics")


# -- learning while serving, deleting, restarting ------------------------------------------------
def test_learn_while_serving_then_delete_then_restart(model_dir):
    with serving(model_dir, batch_max_wait_ms=5) as served:
        before = served.predict(PROBE).json()
        files_before = {t["name"]: t["file"] for t in read_manifest(model_dir)["tasks"]}

        response = served.client.post("/v1/tasks", json=upload_body("beasts", 200, 20, epochs=10),
                                      headers=AS_ADMIN)
        assert response.status_code == 202
        job_id = response.json()["id"]
        assert response.headers["location"] == f"/v1/jobs/{job_id}"

        # Identical requests from several clients while the job runs: a batch of copies of the
        # probe is the probe's own batch, so every answer must be bit-identical to `before`.
        stop = threading.Event()
        failures, answers, seen = [], [], []

        def client_loop():
            with httpx.Client(base_url=served.url, timeout=30) as client:
                while not stop.is_set():
                    r = client.post("/v1/predict", json=PROBE, headers=AS_READER)
                    (answers if r.status_code == 200 else failures).append(r)

        threads = [threading.Thread(target=client_loop) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            while True:
                job = served.client.get(f"/v1/jobs/{job_id}", headers=AS_READER).json()
                seen.append((job["state"], job["step"], job["total_steps"], len(answers)))
                if job["state"] in ("succeeded", "failed"):
                    break
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert job["state"] == "succeeded", job
        assert failures == []
        assert all(a.json() == before for a in answers)
        training = [s for s in seen if s[0] == "running" and s[2] and 0 < s[1] < s[2]]
        assert training and training[-1][3] > training[0][3], "no answers while it trained"
        # 10 epochs of batches of 8 over the 170 texts left after the 15 % validation split
        assert job["step"] == job["total_steps"] == 10 * 22 and job["test_accuracy"] is not None

        # the new task answers, old ones are unchanged, and it is on disk
        assert served.predict(PROBE).json() == before
        new = served.predict(BEASTS)
        assert new.status_code == 200 and new.json()["predictions"][0]["task"] == "beasts"
        manifest = read_manifest(model_dir)
        assert [t["name"] for t in manifest["tasks"]] == ["kinds", "topics", "beasts"]
        assert {t["name"]: t["file"] for t in manifest["tasks"][:2]} == files_before
        listed = served.client.get("/v1/tasks", headers=AS_READER).json()["tasks"]
        assert [t["name"] for t in listed] == ["kinds", "topics", "beasts"]
        assert listed[2]["test_accuracy"] == job["test_accuracy"] and listed[2]["labels"] == ["animal", "sport"]

        # delete: it stops answering at once, the others are unchanged, the disk follows
        assert served.client.delete("/v1/tasks/topics", headers=AS_ADMIN).status_code == 204
        gone = served.predict({"items": [{"text": "red", "task": "topics"}]})
        assert gone.json()["detail"] == "unknown task 'topics'; known: ['kinds', 'beasts']"
        kinds_only = {"items": PROBE["items"][:2]}
        kept = served.predict(kinds_only).json()
        assert kept["predictions"] == before["predictions"][:2]
        assert [t["name"] for t in read_manifest(model_dir)["tasks"]] == ["kinds", "beasts"]
        beasts_before = served.predict(BEASTS).json()

    # a restart serves every task that had appeared, with the same answers
    with serving(model_dir) as served:
        tasks = served.client.get("/v1/tasks", headers=AS_READER).json()["tasks"]
        assert [t["name"] for t in tasks] == ["kinds", "beasts"]
        assert served.predict(kinds_only).json() == kept
        assert served.predict(BEASTS).json() == beasts_before


def test_delete_with_the_training_texts_takes_their_router_share_out_too(model_dir, tiny_config):
    """DELETE with the task's training texts gives the router that never learned the task;
    texts that are not the task's are a 422 that deletes nothing."""
    topics_train = [r["text"] for r in toy_rows() if r["task"] == "topics" and r["split"] == "train"]
    never = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    never.learn(load_stream(write_jsonl(model_dir.parent / "kinds.jsonl",
                                        [r for r in toy_rows() if r["task"] == "kinds"]))[0])
    with serving(model_dir) as served:
        before = served.predict(PROBE).json()
        wrong = served.client.request("DELETE", "/v1/tasks/topics", headers=AS_ADMIN,
                                      json={"train_texts": topics_train[::-1]})
        assert wrong.status_code == 422
        assert wrong.json()["detail"].startswith(
            f"the {len(topics_train)} texts given are not the ones task 'topics' was learned from")
        assert served.predict(PROBE).json() == before  # nothing was deleted
        empty = served.client.request("DELETE", "/v1/tasks/topics", headers=AS_ADMIN,
                                      json={"train_texts": []})
        assert empty.status_code == 422
        deleted = served.client.request("DELETE", "/v1/tasks/topics", headers=AS_ADMIN,
                                        json={"train_texts": topics_train})
        assert deleted.status_code == 204
        router = served.app.state.service.learner.router.classifier
        kept = {"items": PROBE["items"][:2]}
        assert served.predict(kept).json()["predictions"] == before["predictions"][:2]
    expected = never.router.classifier
    assert router.classes_ == expected.classes_ == ["kinds"]
    assert torch.equal(router.sums_, expected.sums_) and torch.equal(router.counts_, expected.counts_)
    assert torch.allclose(router.gram_upper_, expected.gram_upper_, rtol=1e-12, atol=1e-9)
    reloaded = ContinualLearner.load(model_dir, device="cpu").router.classifier  # saved for readers
    assert torch.allclose(reloaded.gram_upper_, expected.gram_upper_, rtol=1e-12, atol=1e-9)


def test_failed_job_leaves_the_model_exactly_as_it_was(model_dir):
    with serving(model_dir) as served:
        before = served.predict(PROBE).json()
        manifest_before = (model_dir / "manifest.json").read_bytes()
        files_before = sorted(p.name for p in (model_dir / "tasks").iterdir())
        job_id = served.client.post("/v1/tasks", json=upload_body("doomed", 200, 0, epochs=50),
                                    headers=AS_ADMIN).json()["id"]
        jobs = served.app.state.jobs
        deadline = time.monotonic() + 60
        while served.client.get(f"/v1/jobs/{job_id}", headers=AS_READER).json()["step"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(jobs.running_pid(), signal.SIGKILL)  # the learning process dies mid-training
        job = served.wait_for_job(job_id)
        assert job["state"] == "failed"
        assert job["error"] == "the learning process ended without a result (exit code -9)"
        assert (model_dir / "manifest.json").read_bytes() == manifest_before
        assert sorted(p.name for p in (model_dir / "tasks").iterdir()) == files_before
        assert served.predict(PROBE).json() == before
        assert [t["name"] for t in served.client.get("/v1/tasks", headers=AS_READER).json()["tasks"]] == ["kinds", "topics"]
        assert served.predict({"items": [{"text": "cat", "task": "doomed"}]}).status_code == 422
        # the name is free again
        assert served.client.post("/v1/tasks", json=upload_body("doomed", 4, 0), headers=AS_ADMIN).status_code == 202
        metrics = served.client.get("/metrics", headers=AS_READER).text
        assert _sample(metrics, "ctt_learning_jobs", 'state="failed"') == 1
        assert _sample(metrics, "ctt_learning_job_duration_seconds_count", 'outcome="failed"') == 1


def test_a_save_that_fails_leaves_the_served_model_as_it_was(model_dir, tmp_path, tiny_config):
    """The commit point is the save: if it fails, the task is taken out again (and a delete undone)."""
    from continual_transformer.server.prometheus import Metrics
    from continual_transformer.server.serving import ModelService

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    service = ModelService(ContinualLearner.load(model_dir, device="cpu"), blocker / "model",
                           batch_max_items=8, batch_max_wait_s=0.0, metrics=Metrics())
    side = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    side.learn(load_stream(_write_task(tmp_path))[0])
    record, tensors = side.task_state("beasts")
    with pytest.raises(OSError):
        service.add_task(record, tensors, side.shared_tensors())
    assert service.task_names() == ("kinds", "topics")
    assert list(service.learner.tasks) == ["kinds", "topics"]
    assert service.learner.model.adapter.entries() == ["kinds", "topics"] and "beasts" not in service.learner.model.heads
    with pytest.raises(OSError):
        service.delete_task("kinds")
    assert service.task_names() == ("kinds", "topics") and list(service.learner.tasks) == ["kinds", "topics"]
    router = service.learner.router.classifier
    gram, counts = router.gram_upper_.clone(), router.counts_.clone()
    with pytest.raises(OSError):  # with its texts, the router's shared statistics come back too
        service.delete_task("kinds", texts=[r["text"] for r in toy_rows()
                                            if r["task"] == "kinds" and r["split"] == "train"])
    router = service.learner.router.classifier
    assert list(service.learner.tasks) == ["kinds", "topics"] and router.classes_ == ["kinds", "topics"]
    assert torch.equal(router.gram_upper_, gram) and torch.equal(router.counts_, counts)


def _write_task(tmp_path: Path) -> Path:
    body = upload_body("beasts", 8, 2)
    rows = [{"task": "beasts", "split": split, **e} for split in ("train", "test") for e in body[split]]
    return write_jsonl(tmp_path / "beasts.jsonl", rows)


# -- metrics -------------------------------------------------------------------------------------
def test_metrics_are_exposed(model_dir):
    with serving(model_dir) as served:
        for _ in range(3):
            served.predict(PROBE)
        served.predict({"items": [{"text": "x", "task": "spam"}]})
        served.client.get("/v1/tasks", headers=AS_READER)
        response = served.client.get("/metrics", headers=AS_READER)
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        assert _sample(text, "ctt_http_requests_total", 'route="/v1/predict",status="200"') == 3
        assert _sample(text, "ctt_http_requests_total", 'route="/v1/predict",status="422"') == 1
        assert _sample(text, "ctt_http_request_duration_seconds_count", 'route="/v1/tasks",status="200"') == 1
        assert 'ctt_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/predict",status="200"}' in text
        assert _sample(text, "ctt_predictions_total", 'task="kinds"') == 6
        assert _sample(text, "ctt_predictions_total", 'task="topics"') == 6
        assert _sample(text, "ctt_tasks_loaded") == 2
        for state in ("queued", "running", "succeeded", "failed"):
            assert _sample(text, "ctt_learning_jobs", f'state="{state}"') == 0
        assert "ctt_learning_job_duration_seconds" in text and "_created" not in text
        assert served.client.get("/metrics").status_code == 401


# -- the command line ------------------------------------------------------------------------------
def test_ctt_serve_starts_uvicorn_and_stops_cleanly(model_dir, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTT_")}
    env.update(CTT_ADMIN_KEY=ADMIN, CTT_API_KEYS=READER, CTT_DEVICE="cpu",
               PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-m", "continual_transformer.cli", "serve",
                                str(model_dir), "--port", str(port), "--no-access-log"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            assert time.monotonic() < deadline, "ctt serve did not become ready"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").json() == {
                        "status": "ready", "tasks": 2, "version": 1, "precision": PRECISION, "role": "writer"}:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/predict", json=PROBE, headers=AS_READER)
        assert answer.status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "Application startup complete" in output and "Traceback" not in output


def test_a_model_whose_method_shares_state_refuses_learning_up_front(tmp_path, tiny_config):
    stream = write_jsonl(tmp_path / "toy.jsonl", toy_rows())
    learner = ContinualLearner(tiny_config, method="finetune",
                               train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    learner.learn(load_stream(stream)[0])
    model = learner.save(tmp_path / "model")
    with serving(model) as served:
        response = served.client.post("/v1/tasks", json=upload_body("beasts"), headers=AS_ADMIN)
        assert response.status_code == 409
        assert response.json()["detail"].startswith(
            "this model's method 'finetune' shares state between tasks")
        assert served.predict({"items": [{"text": "cat and dog", "task": "kinds"}]}).status_code == 200


def test_a_parquet_upload_without_the_data_extra_is_a_415_naming_it(model_dir, monkeypatch):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["a cat", "a dog"], "label": ["animal", "animal"],
                             "split": ["train", "train"]}), buffer)
    with serving(model_dir) as served:
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if it were not installed
        monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
        response = served.client.post("/v1/tasks/file", data={"task_name": "pets"}, headers=AS_ADMIN,
                                      files={"file": ("pets.parquet", buffer.getvalue())})
        assert response.status_code == 415
        assert "pip install 'continual-tiny-transformer[data]'" in response.json()["detail"]
        assert served.client.get("/v1/jobs", headers=AS_READER).json() == {"jobs": []}
