"""Versions over HTTP: listing and rollback are admin-only, a rollback is atomic for requests in
flight, and /readyz names the version served. A real uvicorn, as in test_server.py."""

from __future__ import annotations

import threading
import time

import httpx

from test_server import AS_ADMIN, AS_READER, PRECISION, PROBE, model_dir, serving, trained_dir  # noqa: F401

KINDS = {"items": [item for item in PROBE["items"] if item["task"] == "kinds"]}


def _tasks(client: httpx.Client) -> tuple[str, ...]:
    return tuple(t["name"] for t in client.get("/v1/tasks", headers=AS_READER).json()["tasks"])


def test_versions_are_listed_and_rolled_back_by_the_admin_only(model_dir):  # noqa: F811
    with serving(model_dir) as served:
        client = served.client
        assert client.get("/readyz").json() == {"status": "ready", "tasks": 2, "version": 1, "precision": PRECISION, "role": "writer"}
        before, kinds = served.predict(PROBE).json(), served.predict(KINDS).json()
        assert client.delete("/v1/tasks/topics", headers=AS_ADMIN).status_code == 204
        assert client.get("/readyz").json() == {"status": "ready", "tasks": 1, "version": 2, "precision": PRECISION, "role": "writer"}
        for method, path in (("GET", "/v1/versions"), ("POST", "/v1/versions/1/rollback")):
            refused = client.request(method, path, headers=AS_READER)
            assert refused.status_code == 403
            assert refused.json() == {"detail": "this needs the admin key (CTT_ADMIN_KEY)"}
        listing = client.get("/v1/versions", headers=AS_ADMIN).json()["versions"]
        assert [(v["version"], v["tasks"], v["change"], v["current"]) for v in listing] == [
            (1, ["kinds", "topics"], "learned kinds, topics", False), (2, ["kinds"], "deleted topics", True)]

        # Readers and predictors keep going while the rollback swaps the model under them.
        seen, answers, stop = [], [], threading.Event()

        def read():
            with httpx.Client(base_url=served.url, timeout=30) as own:
                while not stop.is_set():
                    seen.append(_tasks(own))
                    response = own.post("/v1/predict", json=KINDS, headers=AS_READER)
                    answers.append((response.status_code, response.json()))

        threads = [threading.Thread(target=read) for _ in range(3)]
        for thread in threads:
            thread.start()
        rolled = client.post("/v1/versions/1/rollback", headers=AS_ADMIN)
        after, deadline = len(seen), time.monotonic() + 60
        while len(seen) < after + 6 and time.monotonic() < deadline:  # some from the new version
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(60)
        assert rolled.status_code == 200, rolled.text
        assert rolled.json() == {"version": 3, "restored": 1, "tasks": ["kinds", "topics"]}
        assert set(seen) <= {("kinds",), ("kinds", "topics")} and ("kinds", "topics") in seen
        assert all(answer == (200, kinds) for answer in answers)  # kinds is the same in both
        assert client.get("/readyz").json() == {"status": "ready", "tasks": 2, "version": 3, "precision": PRECISION, "role": "writer"}
        assert _tasks(client) == ("kinds", "topics")
        assert served.predict(PROBE).json() == before  # topics is back, bit for bit
        unknown = client.post("/v1/versions/99/rollback", headers=AS_ADMIN)
        assert unknown.status_code == 404
        assert unknown.json() == {"detail": f"unknown version 99 of {model_dir}; known: [1, 2, 3]"}
        listing = client.get("/v1/versions", headers=AS_ADMIN).json()["versions"]
        assert [(v["version"], v["change"], v["current"]) for v in listing][-1] == (3, "rollback to 1", True)

    with serving(model_dir, enable_writes=False) as served:  # a restart serves version 3
        assert served.client.get("/readyz").json() == {"status": "ready", "tasks": 2, "version": 3, "precision": PRECISION, "role": "read-only"}
        assert served.client.get("/v1/versions", headers=AS_ADMIN).status_code == 200
        # without writes there is no rollback route at all
        assert served.client.post("/v1/versions/1/rollback", headers=AS_ADMIN).status_code == 404
