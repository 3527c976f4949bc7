"""Replicas on one model directory: how soon a reader serves what the writer learned, under load.

    python benchmarks/replicas.py MODEL_DIR --clients 16 --new-tasks 3

On a copy of MODEL_DIR, starts a writer (`ctt serve --role writer`) and a reader (`ctt serve
--role reader`) as real processes on 127.0.0.1. `--clients` clients send prediction requests to
the reader back to back (`--items` texts each: old tasks named, and some routed), while new
tasks are learned one after another through the writer (POST /v1/tasks). For each new task:

- `saved`: when the writer's new manifest appeared in the directory (watched every 5 ms);
- `served`: when the reader's /readyz first reported that version (polled every 10 ms);
- the reader's delay: served - saved (the target is at most 2 s).

Every request during the whole run is counted; a failed request is a non-200 answer or a
transport error. Answers for named old tasks are checked against the reader's answers before
the load (labels must match). At the end the reader and the writer must give the same answers
(JSON equal) to the same requests, new tasks and routed texts included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import ROOT, Run, client_loop, latency_summary, load_texts, new_task_body, start_server  # noqa: E402


def manifest_version(model: Path) -> int:
    from continual_transformer.io.checkpoint import read_manifest

    return read_manifest(model).get("version", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="Model directory (copied; the copy is served).")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--items", type=int, default=8, help="Texts per request.")
    parser.add_argument("--routed", type=float, default=0.25, help="Share of texts sent without a task.")
    parser.add_argument("--new-tasks", type=int, default=3)
    parser.add_argument("--per-label", type=int, default=40, help="Training texts per label of a new task.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--reload-interval-ms", type=float, default=250.0, help="The reader's CTT_RELOAD_INTERVAL_MS.")
    parser.add_argument("--stream", type=Path, default=ROOT / "data" / "default_stream.jsonl.gz")
    parser.add_argument("--texts-per-task", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from continual_transformer.io.checkpoint import read_manifest

    work = Path(tempfile.mkdtemp(prefix="ctt-replicas-"))
    model = Path(shutil.copytree(args.model, work / "model"))
    old_tasks = [t["name"] for t in read_manifest(model)["tasks"]]
    texts = load_texts(args.stream, old_tasks, args.texts_per_task, args.seed)
    rng = random.Random(args.seed)
    pool = [(None if rng.random() < args.routed else task, text)
            for task, group in texts.items() for text in group]
    env = {"CTT_RATE_LIMIT_PER_MINUTE": "0", "CTT_RELOAD_INTERVAL_MS": str(args.reload_interval_ms)}
    writer = start_server(model, args.clients, env, work / "writer.log", ("--role", "writer"))
    reader = start_server(model, args.clients, env, work / "reader.log", ("--role", "reader"), like=writer)
    admin = {"Authorization": f"Bearer {writer.admin_key}"}
    try:
        named = [(task, text) for task, text in pool if task is not None]
        with httpx.Client(base_url=reader.url, headers=admin, timeout=120) as client:
            reference = {(task, text): client.post("/v1/predict", json={"items": [{"text": text, "task": task}]}
                                                   ).json()["predictions"][0]["label"]
                         for task, text in named}
        run, delays, jobs = Run(), [], []
        state = {"done": False}

        async def learn_new_tasks(t0: float) -> None:
            await asyncio.sleep(3.0)  # the clients are at full speed first
            async with httpx.AsyncClient(headers=admin, timeout=120) as client:
                for k in range(args.new_tasks):
                    body = new_task_body(args.stream, old_tasks, f"corpus{k}", args.per_label,
                                         args.epochs, args.seed + k)
                    before = manifest_version(model)
                    answer = await client.post(f"{writer.url}/v1/tasks", json=body)
                    if answer.status_code != 202:
                        raise SystemExit(f"learning refused: {answer.status_code} {answer.text}")
                    while (version := manifest_version(model)) == before:
                        await asyncio.sleep(0.005)
                    saved = time.perf_counter()
                    while (await client.get(f"{reader.url}/readyz")).json()["version"] != version:
                        await asyncio.sleep(0.01)
                    served = time.perf_counter()
                    job = (await client.get(f"{writer.url}/v1/jobs/{answer.json()['id']}")).json()
                    delays.append(served - saved)
                    jobs.append(job["state"])
                    print(f"task corpus{k}: version {version} saved; reader served it "
                          f"{served - saved:.3f} s later (job {job['state']})", flush=True)
            await asyncio.sleep(2.0)  # some requests on the last version
            state["done"] = True

        async def go():
            t0 = time.perf_counter()
            stop_at = lambda: 0.0 if state["done"] else float("inf")  # noqa: E731
            clients = [client_loop(reader.url, reader.keys[i], pool, args.items, stop_at, t0, run,
                                   random.Random(args.seed * 1000 + i), True) for i in range(args.clients)]
            await asyncio.gather(learn_new_tasks(t0), *clients)

        started = time.perf_counter()
        asyncio.run(go())
        seconds = time.perf_counter() - started
        failed = [s for s in run.samples if s.status != 200]
        mismatches = sum(answer["label"] != reference[(task, text)]
                         for s in run.samples if s.answer is not None
                         for (task, text), answer in zip(s.items, s.answer) if task is not None)

        # The same requests to both replicas: the same answers, new tasks and routing included.
        probe = [{"text": text, "task": task} for task, text in pool[:64]]
        probe += [{"text": text, "task": f"corpus{k}"} for k in range(args.new_tasks) for _, text in pool[:8]]
        answers = [httpx.post(f"{server.url}/v1/predict", json={"items": probe[i:i + 8]}, headers=admin,
                              timeout=120).json() for server in (writer, reader) for i in range(0, len(probe), 8)]
        half = len(answers) // 2
        result = {
            "clients": args.clients, "items_per_request": args.items,
            "reload_interval_ms": args.reload_interval_ms,
            "delays_s": [round(d, 3) for d in delays],
            "delay_median_s": round(statistics.median(delays), 3), "delay_max_s": round(max(delays), 3),
            "jobs": jobs, "requests": len(run.samples), "failed_requests": len(failed),
            "error_kinds": run.errors, "old_task_label_mismatches": mismatches,
            "requests_per_s": round(len(run.samples) / seconds, 1), **latency_summary(run.samples),
            "replicas_answer_identically": answers[:half] == answers[half:],
        }
    finally:
        reader.stop()
        writer.stop()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
