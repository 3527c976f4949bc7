"""Load test for `ctt serve`: N concurrent clients for T seconds on loopback.

    python benchmarks/load_test.py MODEL_DIR --clients 32 --duration 60             # single and mixed
    python benchmarks/load_test.py MODEL_DIR --clients 32 --duration 60 --learn     # learn while serving

Starts `ctt serve MODEL_DIR` on a free port of 127.0.0.1 (or uses --url with --key), gives each
client its own API key and connection, and sends prediction requests back to back. Texts come
from the test splits of the model's tasks in a stream file (default: the bundled stream).

- `mixed`: items are random (task, text) pairs from every task, so the server's batches mix
  tasks. `single`: the same texts, all under one task (`--task`, default the model's first), so
  that the two differ only in whether batches mix tasks, not in text lengths.
  The two take turns in windows of `--interleave` seconds.
- `--learn` (mixed traffic, on a copy of MODEL_DIR): before the load, each text is predicted
  alone (the reference); a few seconds into the load a new task is uploaded through the API
  (POST /v1/tasks); the load goes on until the job has ended and at least T seconds have
  passed. During the load every answer for an old task is compared with the reference (labels
  must match; probabilities may differ by float rounding when a text is padded to a longer
  batch-mate); after the load every text is predicted alone again and must equal the
  reference bit for bit.

Prints requests/s, items/s, latency p50/p95/p99/max, errors, and the server's batch sizes; with
`--json PATH` also writes the figures as JSON. Errors are non-200 answers and transport failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


# -- the server ----------------------------------------------------------------------------------
@dataclass
class Server:
    url: str
    admin_key: str
    keys: list[str]
    process: subprocess.Popen | None = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model: Path, clients: int, env_extra: dict[str, str], log: Path,
                 extra_args: tuple[str, ...] = (), like: Server | None = None) -> Server:
    """`ctt serve MODEL` with one key per client (`like`: the same keys as that server)."""
    admin = like.admin_key if like else "admin-" + secrets.token_hex(16)
    keys = like.keys if like else ["client-" + secrets.token_hex(16) for _ in range(clients)]
    port = free_port()
    env = {**os.environ, "CTT_ADMIN_KEY": admin, "CTT_API_KEYS": ",".join(keys),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env_extra}
    command = [sys.executable, "-m", "continual_transformer.cli", "serve", str(model),
               "--port", str(port), "--no-access-log", *extra_args]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise SystemExit(f"ctt serve exited with {process.returncode}; see {log}")
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"ctt serve was not ready after 180 s; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return Server(url, admin, keys, process)
        except httpx.TransportError:
            pass
        time.sleep(0.2)


# -- traffic -------------------------------------------------------------------------------------
def load_texts(stream: Path, tasks: list[str], per_task: int, seed: int) -> dict[str, list[str]]:
    from continual_transformer.data.stream import load_stream

    by_name = {t.name: t for t in load_stream(stream)}
    missing = [name for name in tasks if name not in by_name]
    if missing:
        raise SystemExit(f"tasks {missing} of the model are not in {stream}; pass --stream")
    rng = random.Random(seed)
    return {name: rng.sample([e.text for e in by_name[name].test], min(per_task, len(by_name[name].test)))
            for name in tasks}


@dataclass
class Sample:
    start: float
    latency: float
    status: int  # 0: transport error
    items: list[tuple[str, str]]  # (task, text)
    answer: list[dict] | None


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)


async def client_loop(url: str, key: str, pool: list[tuple[str, str]], items: int, stop_at,
                      measure_from: float, run: Run, rng: random.Random, keep_answers: bool) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
        while time.perf_counter() < stop_at():
            chosen = [rng.choice(pool) for _ in range(items)]
            body = {"items": [{"text": text, "task": task} for task, text in chosen]}
            start = time.perf_counter()
            try:
                response = await client.post("/v1/predict", json=body)
                status = response.status_code
                answer = response.json()["predictions"] if status == 200 and keep_answers else None
            except httpx.HTTPError as exc:
                status, answer = 0, None
                run.errors[type(exc).__name__] = run.errors.get(type(exc).__name__, 0) + 1
            end = time.perf_counter()
            if status not in (0, 200):
                run.errors[f"HTTP {status}"] = run.errors.get(f"HTTP {status}", 0) + 1
            if start >= measure_from:
                run.samples.append(Sample(start, end - start, status, chosen, answer))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_summary(samples: list[Sample]) -> dict:
    ms = [1000 * s.latency for s in samples if s.status == 200]
    return {"p50_ms": round(percentile(ms, 50), 1), "p95_ms": round(percentile(ms, 95), 1),
            "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms, default=float("nan")), 1)}


def scrape(url: str, key: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in COUNTERS:
            values[name] = float(value)
    return values


def run_load(server: Server, pool: list[tuple[str, str]], args, duration: float, warmup: float,
             stop_at=None, keep_answers: bool = False, during=None) -> tuple[Run, float]:
    """Run the clients for `warmup` + `duration` seconds (or until `stop_at()`); measure after warm-up.

    `during(t0)` is an optional coroutine run beside the clients (the learning job).
    """
    run = Run()
    t0 = time.perf_counter()
    measure_from = t0 + warmup
    fixed_end = measure_from + duration
    stop = stop_at or (lambda: fixed_end)

    async def main():
        rngs = [random.Random(args.seed * 1000 + i + int(t0)) for i in range(args.clients)]
        tasks = [client_loop(server.url, server.keys[i], pool, args.items, stop, measure_from, run,
                             rngs[i], keep_answers) for i in range(args.clients)]
        if during is not None:
            tasks.append(during(t0))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    return run, time.perf_counter() - measure_from


COUNTERS = ("ctt_inference_batch_rows_sum", "ctt_inference_batch_rows_count",
            "ctt_inference_batch_requests_sum", "ctt_inference_batch_requests_count")


def delta(before: dict, after: dict) -> dict:
    return {name: after[name] - before[name] for name in COUNTERS}


def summarise(name: str, run: Run, seconds: float, counters: dict) -> dict:
    ok = [s for s in run.samples if s.status == 200]
    passes = counters["ctt_inference_batch_rows_count"]
    batches = counters["ctt_inference_batch_requests_count"]
    return {
        "traffic": name,
        "seconds": round(seconds, 1),
        "requests": len(run.samples),
        "requests_per_s": round(len(ok) / seconds, 1),
        "items_per_s": round(sum(len(s.items) for s in ok) / seconds, 1),
        **latency_summary(run.samples),
        "errors": sum(run.errors.values()),
        "error_kinds": run.errors,
        "requests_per_batch": round(counters["ctt_inference_batch_requests_sum"] / batches, 1) if batches else None,
        "texts_per_forward_pass": round(counters["ctt_inference_batch_rows_sum"] / passes, 1) if passes else None,
    }


def print_row(result: dict) -> None:
    print(f"{result['traffic']:>8}: {result['requests_per_s']:7.1f} req/s  {result['items_per_s']:7.1f} items/s  "
          f"p50 {result['p50_ms']:7.1f} ms  p95 {result['p95_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
          f"max {result['max_ms']:7.1f} ms  errors {result['errors']}  "
          f"({result['requests']} requests in {result['seconds']} s; {result['requests_per_batch']} "
          f"requests per batch, {result['texts_per_forward_pass']} texts per forward pass)", flush=True)


# -- learn while serving -------------------------------------------------------------------------
def new_task_body(stream: Path, tasks: list[str], name: str, per_label: int, epochs: int, seed: int) -> dict:
    """A task the model does not know: which corpus (old task) a training text comes from."""
    from continual_transformer.data.stream import load_stream

    rng = random.Random(seed)
    by_name = {t.name: t for t in load_stream(stream)}
    train, test = [], []
    for task in tasks:
        texts = [e.text for e in by_name[task].train]
        rng.shuffle(texts)
        train += [{"text": t, "label": task} for t in texts[:per_label]]
        test += [{"text": t, "label": task} for t in texts[per_label: per_label + per_label // 3]]
    rng.shuffle(train)
    return {"name": name, "train": train, "test": test, "epochs": epochs}


def predict_alone(server: Server, pool: list[tuple[str, str]]) -> dict[tuple[str, str], dict]:
    """Each text in its own request, one after another: the batch is the text alone."""
    answers = {}
    with httpx.Client(base_url=server.url, timeout=60,
                      headers={"Authorization": f"Bearer {server.admin_key}"}) as client:
        for task, text in pool:
            response = client.post("/v1/predict", json={"items": [{"text": text, "task": task}]})
            response.raise_for_status()
            answers[(task, text)] = response.json()["predictions"][0]
    return answers


def learn_while_serving(server: Server, pool, model_tasks: list[str], args) -> dict:
    reference = predict_alone(server, pool)
    body = new_task_body(args.stream, model_tasks, args.learn_name, args.learn_per_label,
                         args.learn_epochs, args.seed)
    job: dict = {}
    timeline: dict[str, float] = {}
    state = {"done": False, "done_at": None}

    async def learner(t0: float):
        await asyncio.sleep(args.warmup + args.learn_after)
        headers = {"Authorization": f"Bearer {server.admin_key}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as client:
            response = await client.post("/v1/tasks", json=body)
            if response.status_code != 202:
                raise SystemExit(f"learning request refused: {response.status_code} {response.text}")
            timeline["submitted"] = time.perf_counter()
            job_id = response.json()["id"]
            while True:
                current = (await client.get(f"/v1/jobs/{job_id}")).json()
                if current["state"] == "running" and "running" not in timeline:
                    timeline["running"] = time.perf_counter()
                if current["state"] in ("succeeded", "failed"):
                    timeline["ended"] = time.perf_counter()
                    job.update(current)
                    state["done"], state["done_at"] = True, time.perf_counter()
                    return
                await asyncio.sleep(0.5)

    t_start = time.perf_counter()
    fixed_end = t_start + args.warmup + args.duration

    def stop_at():
        if not state["done"]:
            return float("inf")
        return max(fixed_end, state["done_at"] + 5.0)

    scraped = scrape(server.url, server.admin_key)
    run, seconds = run_load(server, pool, args, args.duration, args.warmup, stop_at=stop_at,
                            keep_answers=True, during=learner)
    result = summarise("learn+mixed", run, seconds, delta(scraped, scrape(server.url, server.admin_key)))

    # answers for old tasks during the load: labels must match the reference
    mismatched, max_diff, compared = 0, 0.0, 0
    for sample in run.samples:
        if sample.answer is None:
            continue
        for (task, text), answer in zip(sample.items, sample.answer):
            expected = reference[(task, text)]
            compared += 1
            mismatched += answer["label"] != expected["label"]
            max_diff = max(max_diff, max(abs(answer["probabilities"][k] - v)
                                         for k, v in expected["probabilities"].items()))
    after = predict_alone(server, pool)
    identical_after = after == reference
    during = [s for s in run.samples if timeline.get("running", float("inf")) <= s.start < timeline.get("ended", 0)]
    outside = [s for s in run.samples if not timeline.get("running", float("inf")) <= s.start < timeline.get("ended", 0)]
    new_answer = httpx.post(f"{server.url}/v1/predict", timeout=60,
                            headers={"Authorization": f"Bearer {server.admin_key}"},
                            json={"items": [{"text": pool[0][1], "task": args.learn_name}]})
    tasks_after = httpx.get(f"{server.url}/v1/tasks", timeout=60,
                            headers={"Authorization": f"Bearer {server.admin_key}"}).json()["tasks"]
    result.update({
        "job": {k: job.get(k) for k in ("state", "step", "total_steps", "train_examples",
                                        "test_examples", "test_accuracy", "error")},
        "job_seconds": round(timeline["ended"] - timeline["submitted"], 1),
        "old_task_answers_compared": compared,
        "old_task_label_mismatches": mismatched,
        "old_task_max_probability_difference_under_load": max_diff,
        "old_task_answers_bit_identical_after": identical_after,
        "latency_while_learning": {"requests": len(during), **latency_summary(during)},
        "latency_otherwise": {"requests": len(outside), **latency_summary(outside)},
        "new_task_answers": new_answer.status_code == 200,
        "tasks_after": [t["name"] for t in tasks_after],
    })
    return result


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, nargs="?", help="Model directory to serve (or --url).")
    parser.add_argument("--url", help="An already running server (needs --key, an admin key with --learn).")
    parser.add_argument("--key", help="API key for --url.")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0, help="Measured seconds per traffic kind.")
    parser.add_argument("--warmup", type=float, default=5.0, help="Unmeasured seconds first.")
    parser.add_argument("--interleave", type=float, default=10.0,
                        help="Traffic kinds take turns in windows of this many seconds (0: one after the other).")
    parser.add_argument("--items", type=int, default=1, help="Items per request.")
    parser.add_argument("--traffic", default="single,mixed", help="single, mixed or both (comma).")
    parser.add_argument("--task", help="Task of single-task traffic (default: the model's first).")
    parser.add_argument("--stream", type=Path, default=None, help="Where the texts come from.")
    parser.add_argument("--texts-per-task", type=int, default=100)
    parser.add_argument("--learn", action="store_true", help="Learn a new task during mixed traffic.")
    parser.add_argument("--learn-after", type=float, default=5.0, help="Seconds into the load.")
    parser.add_argument("--learn-name", default="corpus")
    parser.add_argument("--learn-per-label", type=int, default=40)
    parser.add_argument("--learn-epochs", type=int, default=1)
    parser.add_argument("--rate-limit", default="6000", help="CTT_RATE_LIMIT_PER_MINUTE per client key.")
    parser.add_argument("--set", action="append", default=[], metavar="CTT_NAME=VALUE",
                        help="A server setting, e.g. --set CTT_INFERENCE_THREADS=1 (repeatable).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    from continual_transformer.data.stream import default_stream_path

    args.stream = args.stream or default_stream_path()
    if args.url:
        if not args.key:
            parser.error("--url needs --key")
        server = Server(args.url.rstrip("/"), args.key, [args.key] * args.clients)
    elif args.model:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / "ctt-load-test-server.log"
        if args.learn:  # learning writes to the served directory: serve a copy
            copy = Path(tempfile.mkdtemp(prefix="ctt-load-test-")) / "model"
            args.model = Path(shutil.copytree(args.model, copy))
        settings = {"CTT_RATE_LIMIT_PER_MINUTE": args.rate_limit}
        for item in args.set:
            name, _, value = item.partition("=")
            if not name.startswith("CTT_") or not value:
                parser.error(f"--set takes CTT_NAME=VALUE, got {item!r}")
            settings[name] = value
        server = start_server(args.model, args.clients, settings, log)
        print(f"ctt serve {args.model} at {server.url} (log: {log})", flush=True)
    else:
        parser.error("give MODEL_DIR or --url")

    results = []
    try:
        tasks = [t["name"] for t in httpx.get(f"{server.url}/v1/tasks", timeout=30,
                                              headers={"Authorization": f"Bearer {server.keys[0]}"}).json()["tasks"]]
        texts = load_texts(args.stream, tasks, args.texts_per_task, args.seed)
        mixed_pool = [(task, text) for task in tasks for text in texts[task]]
        single_task = args.task or tasks[0]
        print(f"{args.clients} clients, {args.items} item(s) per request, {args.duration:g} s after "
              f"{args.warmup:g} s warm-up; tasks {tasks}", flush=True)
        if args.learn:
            result = learn_while_serving(server, mixed_pool, tasks, args)
            print_row(result)
            print(json.dumps({k: v for k, v in result.items() if k not in ("traffic",)}, indent=2))
            results.append(result)
        else:
            kinds = [t.strip() for t in args.traffic.split(",") if t.strip()]
            pools = {kind: [(single_task, text) for _, text in mixed_pool] if kind == "single"
                     else mixed_pool for kind in kinds}
            run_load(server, pools[kinds[0]], args, 0.0, args.warmup)  # warm-up, not measured
            # Kinds take turns in windows, so that a change in the machine's other load
            # affects each kind alike (this machine is shared).
            window = args.interleave if args.interleave > 0 else args.duration
            runs = {kind: Run() for kind in kinds}
            seconds = {kind: 0.0 for kind in kinds}
            counters = {kind: dict.fromkeys(COUNTERS, 0.0) for kind in kinds}
            while any(seconds[kind] < args.duration - 1e-6 for kind in kinds):
                for kind in kinds:
                    span = min(window, args.duration - seconds[kind])
                    if span <= 1e-6:
                        continue
                    before = scrape(server.url, server.admin_key)
                    run, took = run_load(server, pools[kind], args, span, 0.0)
                    change = delta(before, scrape(server.url, server.admin_key))
                    runs[kind].samples += run.samples
                    for name, count in run.errors.items():
                        runs[kind].errors[name] = runs[kind].errors.get(name, 0) + count
                    seconds[kind] += took
                    counters[kind] = {k: counters[kind][k] + change[k] for k in COUNTERS}
            for kind in kinds:
                result = summarise(kind, runs[kind], seconds[kind], counters[kind])
                print_row(result)
                results.append(result)
            if len(results) == 2:
                ratio = results[1]["requests_per_s"] / results[0]["requests_per_s"]
                print(f"{results[1]['traffic']} / {results[0]['traffic']} throughput: {100 * ratio:.1f} %")
    finally:
        server.stop()
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
