"""A rollback under load: every request answered, each answer consistent with one version.

    python benchmarks/rollback_load.py                              # tiny random BERT, 16 clients, 30 s
    python benchmarks/rollback_load.py --backbone default           # the real MiniLM
    python benchmarks/rollback_load.py --seconds 3 --clients 2      # a smoke run

Builds a model directory with three tasks (`kinds`, `topics`, `things`; the kill test's word
stream), saved after each: versions 1, 2, 3. Starts `ctt serve` on 127.0.0.1 and runs N client
threads that call /v1/predict (one item per task kinds and topics, two without a task, which the
model routes) and /v1/tasks in turn, back to back, for T seconds. Halfway, the admin rolls back
to version 2 (POST /v1/versions/2/rollback), which the server serves as version 4.

Before the load, each version's answers are computed in this process (each text predicted
alone, from that version's files). Every answer during the load is compared with both: a task
list must equal a version's; a prediction must have that version's task and label for every
item, and probabilities within 1e-4 (a text padded to a longer batch-mate rounds differently).
Reported: requests, failures (non-200 or transport errors; must be 0), answers consistent with
the old version only, the new only, both (the named tasks are the same in both) and neither
(must be 0), and clients that saw the new version and then the old one again (must be 0).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from kill_test import build_backbone, build_stream, env  # noqa: E402
from load_test import start_server  # noqa: E402

OLD, TARGET, NEW = 3, 2, 4  # serving version 3; rolled back to 2, served as version 4


def build_model(work: Path, backbone: str) -> tuple[Path, list]:
    """Versions 1-3 of a model directory (one task more each), and the stream's tasks."""
    from continual_transformer import ContinualLearner, TrainConfig, load_stream
    from continual_transformer.config import BackboneConfig

    tasks = load_stream(build_stream(work / "stream.jsonl"))
    if backbone == "tiny":
        config = BackboneConfig(str(build_backbone(work / "tiny")), max_length=32)
    else:
        config = BackboneConfig() if backbone == "default" else BackboneConfig(backbone)
    learner = ContinualLearner(config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    for task in tasks:
        learner.learn(task)
        learner.save(work / "model")
    return work / "model", tasks


def expected_answers(model: Path, texts: list[str]) -> dict[int, dict]:
    """Per version: the task list, and each text's prediction for kinds, topics and routed."""
    from continual_transformer import ContinualLearner
    from continual_transformer.io import checkpoint

    answers = {}
    for version in (OLD, TARGET):
        learner = ContinualLearner.from_state(checkpoint.read(model, version), device="cpu")
        predictions = {(text, task): learner.predict([text], task)[0]
                       for text in texts for task in ("kinds", "topics", None)}
        answers[version] = {"tasks": list(learner.tasks), "predictions": {
            key: (p.task, p.label, p.probabilities) for key, p in predictions.items()}}
    return answers


def consistent(version: dict, items: list[dict], answer: list[dict]) -> bool:
    for item, got in zip(items, answer):
        task, label, probabilities = version["predictions"][(item["text"], item.get("task"))]
        if (got["task"], got["label"]) != (task, label) or got["probabilities"].keys() != probabilities.keys():
            return False
        if any(abs(got["probabilities"][k] - v) > 1e-4 for k, v in probabilities.items()):
            return False
    return True


def client(url: str, key: str, texts: list[str], expected: dict, stop: threading.Event,
           seed: int, tally: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    seen_new = False
    local: Counter = Counter()
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {key}"}) as http:
        while not stop.is_set():
            items = [{"text": rng.choice(texts), "task": "kinds"}, {"text": rng.choice(texts), "task": "topics"},
                     {"text": rng.choice(texts)}, {"text": rng.choice(texts)}]
            for endpoint in ("predict", "tasks"):
                local["requests"] += 1
                try:
                    if endpoint == "predict":
                        response = http.post("/v1/predict", json={"items": items})
                    else:
                        response = http.get("/v1/tasks")
                except httpx.HTTPError:
                    local["failed"] += 1
                    continue
                if response.status_code != 200:
                    local["failed"] += 1
                    local[f"status {response.status_code}"] += 1
                    continue
                if endpoint == "predict":
                    answer = response.json()["predictions"]
                    match = {v for v in (OLD, TARGET) if consistent(expected[v], items, answer)}
                else:
                    names = [t["name"] for t in response.json()["tasks"]]
                    match = {v for v in (OLD, TARGET) if expected[v]["tasks"] == names}
                kind = {frozenset({OLD}): "old", frozenset({TARGET}): "new",
                        frozenset({OLD, TARGET}): "both"}.get(frozenset(match), "neither")
                local[f"{endpoint} consistent with {kind}"] += 1
                if kind == "old" and seen_new:
                    local["went back to the old version"] += 1
                seen_new = seen_new or kind == "new"
    with lock:
        tally.update(local)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (random 2-layer BERT), 'default' "
                        "(the bundled MiniLM) or a local folder / hub id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ctt-rollback-") as tmp:
        work = Path(tmp)
        model, tasks = build_model(work, args.backbone)
        texts = sorted({e.text for task in tasks for e in task.test})
        expected = expected_answers(model, texts)
        server = start_server(model, args.clients,
                              {"CTT_RATE_LIMIT_PER_MINUTE": "0", "PYTHONPATH": env()["PYTHONPATH"]},
                              work / "server.log")
        try:
            assert httpx.get(f"{server.url}/readyz").json()["version"] == OLD
            stop, lock, tally = threading.Event(), threading.Lock(), Counter()
            threads = [threading.Thread(target=client, args=(server.url, server.keys[i], texts, expected,
                                                             stop, args.seed + i, tally, lock))
                       for i in range(args.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(args.seconds / 2)
            at = time.perf_counter() - started
            rolled = httpx.post(f"{server.url}/v1/versions/{TARGET}/rollback", timeout=120,
                                headers={"Authorization": f"Bearer {server.admin_key}"})
            rollback_s = time.perf_counter() - started - at
            time.sleep(max(0.0, args.seconds - (time.perf_counter() - started)))
            stop.set()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
            ready = httpx.get(f"{server.url}/readyz").json()
        finally:
            server.stop()
            shutil.copy(work / "server.log", Path(tempfile.gettempdir()) / "rollback_load_server.log")
    summary = {"clients": args.clients, "seconds": round(elapsed, 1), "backbone": args.backbone,
               "rollback": {"status": rolled.status_code, "answer": rolled.json(), "at_s": round(at, 2),
                            "took_s": round(rollback_s, 3)},
               "readyz_after": ready, "counts": dict(sorted(tally.items()))}
    print(f"{args.clients} clients, {elapsed:.1f} s, backbone {args.backbone}; rollback to version "
          f"{TARGET} at {at:.1f} s: HTTP {rolled.status_code} {rolled.json()} in {rollback_s:.2f} s; "
          f"/readyz after: {ready}")
    for name, count in sorted(tally.items()):
        print(f"  {name:40s} {count:8d}")
    bad = tally["failed"] + tally["predict consistent with neither"] + tally["tasks consistent with neither"] \
        + tally["went back to the old version"]
    ok = bad == 0 and rolled.status_code == 200 and ready.get("version") == NEW
    print("ok: every request answered, each answer consistent with one version" if ok else "FAILED")
    summary["ok"] = ok
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
