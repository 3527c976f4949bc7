"""Prediction against the hardware's limit: `predict`, the server and bulk scoring, each measured
against the bare backbone forward over the same texts, in one run.

    python benchmarks/predict.py runs/demo/model                  # the five-task model of `make demo`
    python benchmarks/predict.py runs/demo/model --repeats 5 --json predict.json
    python benchmarks/predict.py MODEL --skip server,bulk          # only the in-process figures

Texts: the first `--per-task` (400) test texts of each of the model's tasks in the stream file
(default: the bundled stream), 2,000 for the demo model. Every speed is a median over
`--repeats` runs; the runs of the different measurements take turns, so a slow moment of this
shared machine falls on all of them alike, and the ratios are taken within the run.

- **bare forward**: the backbone's encoder alone on the texts, tokenised beforehand, sorted by
  length, in padded batches of 64 rows, in inference mode: float32; bfloat16 with the weights
  cast to bfloat16 (`bf16`, the fastest this hardware does); bfloat16 autocast over the float32
  weights (`bf16-autocast`); and the bfloat16 encoder with attention as plain matrix products
  (`bf16-eager`), as `predict` runs it in bfloat16 (faster on a CPU than the fused kernel the
  encoder loads with): a second reference, not the limit.
- **predict** at the default precision (`auto`) and in fp32: `given` (one call per task, the task
  named), `mixed` (one call, the tasks named per row, rows shuffled so batches mix tasks),
  `routed` (one call, no task named). Tokenising, batching, the router, the heads and the
  lexical branches are all inside the timing.
- **threads**: `mixed` at the default precision with 1 and with 2 torch threads.
- **latency**: one text per call, task given and routed, p50 and p99 (and the bare forward's).
- **accuracy**: every test text of every task, task given, in fp32 and at the default precision;
  the default precision's logits computed twice and once more after reloading the model must be
  equal bit for bit.
- **server**: `ctt serve` on 127.0.0.1 (default precision and batching), 1 and 32 client threads,
  each request `--texts-per-request` (8) texts with their tasks; also 32 clients with 1 and with
  32 texts per request: requests/s, texts/s, failed requests, each load `--repeats` times (loads
  taking turns, medians). The texts are the same shuffled mix of tasks and lengths. Also the
  share of the time the server's inference thread computed passes, and the clients' own CPU
  time (they share the server's cores) as a share of one core.
- **bulk**: `ctt predict MODEL --input rows.jsonl --output out.jsonl --task-column task` on 1,000
  and 10,000 rows (the texts repeated), each in its own process: rows/s as `ctt` reports it (model
  loading excluded), wall seconds and the process's peak resident memory; each file `--repeats`
  times, the files taking turns, medians.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from load_test import start_server  # noqa: E402

PARTS = ("speed", "threads", "latency", "accuracy", "server", "bulk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model directory (`make demo` writes runs/demo/model)")
    parser.add_argument("--stream", type=Path, default=None, help="stream file [default: the bundled one]")
    parser.add_argument("--per-task", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for everything but the thread comparison")
    parser.add_argument("--texts-per-request", type=int, default=8)
    parser.add_argument("--bulk-rows", default="1000,10000")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(PARTS):
        parser.error(f"unknown parts {sorted(skip - set(PARTS))}; known: {PARTS}")
    if not (args.model / "manifest.json").is_file():
        raise SystemExit(f"{args.model}: no model here (run `make demo`, which writes runs/demo/model)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from continual_transformer.data.stream import default_stream_path, load_stream
    from continual_transformer.learner import ContinualLearner
    from continual_transformer.training.precision import native_bf16

    torch.set_num_threads(args.threads)
    learner = ContinualLearner.load(args.model, device="cpu")
    default = learner.prediction_precision()
    stream = {t.name: t for t in load_stream(args.stream or default_stream_path())}
    missing = [name for name in learner.tasks if name not in stream]
    if missing:
        raise SystemExit(f"tasks {missing} of the model are not in the stream; pass --stream")
    tasks = [stream[name] for name in learner.tasks]
    rows = [(t.name, e.text) for t in tasks for e in t.test[: args.per_task]]
    texts = [text for _, text in rows]
    mixed = list(rows)  # every part of it has the stream's mix of tasks and lengths
    random.Random(0).shuffle(mixed)
    results: dict = {
        "model": str(args.model), "texts": len(texts), "tasks": len(tasks), "threads": args.threads,
        "default_precision": default, "native_bf16": native_bf16(torch.device("cpu")),
        "torch": torch.__version__, "cpu": _cpu_name(), "repeats": args.repeats,
    }
    print(f"{len(texts):,} texts from {len(tasks)} tasks; default precision {default} "
          f"(native bfloat16: {results['native_bf16']}); {args.threads} threads; {_cpu_name()}", flush=True)

    if "speed" not in skip:
        results["speed"] = speed(learner, tasks, rows, args.repeats, default)
    if "threads" not in skip:
        results["threads_compared"] = threads(learner, rows, args.repeats, args.threads)
    if "latency" not in skip:
        results["latency_ms"] = latency(learner, rows)
    if "accuracy" not in skip:
        results["accuracy"] = accuracy(learner, tasks, args.model, default)
    del learner
    with tempfile.TemporaryDirectory(prefix="ctt-predict-bench-") as scratch:
        if "server" not in skip:
            results["server"] = server(args.model, mixed, args.texts_per_request, Path(scratch), args.repeats)
        if "bulk" not in skip:
            results["bulk"] = bulk(args.model, mixed, [int(n) for n in args.bulk_rows.split(",")], Path(scratch),
                                   args.repeats)
    summary(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


# -- speed -----------------------------------------------------------------------------------------
def speed(learner, tasks, rows, repeats: int, default: str) -> dict:
    """texts/s of the bare forward and of `predict`, runs taking turns; medians."""
    import torch

    backbone = learner.backbone
    texts = [text for _, text in rows]
    ids = backbone.tokenize(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = backbone.tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(order), 64):
        chunk = [ids[i] for i in order[start : start + 64]]
        width = max(len(r) for r in chunk)
        input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in chunk])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk])
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    encoder_bf16 = copy.deepcopy(backbone.encoder).to(torch.bfloat16)
    encoder_bf16_eager = copy.deepcopy(encoder_bf16)  # attention as plain matrix products
    encoder_bf16_eager.config._attn_implementation = "eager"

    def bare(encoder, autocast: bool):
        def run():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                for batch in batches:
                    encoder(**batch)
        return run

    by_task: dict[str, list[str]] = {}
    for name, text in rows:
        by_task.setdefault(name, []).append(text)
    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    mixed_texts, mixed_tasks = [t for _, t in shuffled], [n for n, _ in shuffled]

    def given(precision):
        return lambda: [learner.predict(ts, task=name, precision=precision) for name, ts in by_task.items()]

    runs = {
        "bare fp32": bare(backbone.encoder, False),
        "bare bf16": bare(encoder_bf16, False),
        "bare bf16-autocast": bare(backbone.encoder, True),
        "bare bf16-eager": bare(encoder_bf16_eager, False),
        f"predict given {default}": given(default),
        f"predict mixed {default}": lambda: learner.predict(mixed_texts, task=mixed_tasks, precision=default),
        f"predict routed {default}": lambda: learner.predict(texts, precision=default),
    }
    if default != "fp32":
        runs["predict given fp32"] = given("fp32")
        runs["predict mixed fp32"] = lambda: learner.predict(mixed_texts, task=mixed_tasks, precision="fp32")
    learner.predict(texts[:128], precision=default)  # kernels built, copies made
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"  [{repeat + 1}/{repeats}] {name}: {len(texts) / times[name][-1]:.1f} texts/s", flush=True)
    del encoder_bf16, encoder_bf16_eager
    rates = {name: round(len(texts) / statistics.median(seconds), 1) for name, seconds in times.items()}
    limit = "bare bf16" if default == "bf16" else "bare fp32"

    def ratios(reference: str) -> dict:  # predict at the default precision against `reference`
        return {name: round(rate / rates[reference], 3) for name, rate in rates.items()
                if name.startswith("predict") and name.endswith(default)}

    return {"texts_per_second": rates,
            "runs_texts_per_second": {n: [round(len(texts) / s, 1) for s in v] for n, v in times.items()},
            "limit": limit,
            "ratio_to_limit": ratios(limit),
            "ratio_to_bare_bf16_eager": ratios("bare bf16-eager"),
            "ratio_to_bare_bf16_autocast": ratios("bare bf16-autocast")}


def threads(learner, rows, repeats: int, usual: int) -> dict:
    import torch

    shuffled = list(rows)
    random.Random(0).shuffle(shuffled)
    texts, names = [t for _, t in shuffled], [n for n, _ in shuffled]
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for count in (1, 2):
            torch.set_num_threads(count)
            start = time.perf_counter()
            learner.predict(texts, task=names)
            times[count].append(time.perf_counter() - start)
    torch.set_num_threads(usual)
    rates = {f"{count} thread{'s' * (count > 1)}": round(len(texts) / statistics.median(s), 1)
             for count, s in times.items()}
    print(f"  threads, predict mixed: {rates}", flush=True)
    return {"predict_mixed_texts_per_second": rates}


def latency(learner, rows, calls: int = 200) -> dict:
    """One text per call: p50 and p99 in milliseconds."""
    import torch

    picked = random.Random(1).sample(rows, min(calls, len(rows)))
    backbone = learner.backbone
    out = {}
    for name, call in [
        ("predict given", lambda task, text: learner.predict([text], task=task)),
        ("predict routed", lambda task, text: learner.predict([text])),
        ("bare fp32", lambda task, text: _bare_one(backbone, text)),
    ]:
        call(*picked[0])
        seconds = []
        for task, text in picked:
            start = time.perf_counter()
            call(task, text)
            seconds.append(time.perf_counter() - start)
        out[name] = {"p50": _ms(statistics.median(seconds)), "p99": _ms(_quantile(seconds, 0.99))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with backbone.bf16_weights():
            seconds = []
            for _, text in picked:
                start = time.perf_counter()
                _bare_one(backbone, text)
                seconds.append(time.perf_counter() - start)
    out["bare bf16"] = {"p50": _ms(statistics.median(seconds)), "p99": _ms(_quantile(seconds, 0.99))}
    print(f"  latency ms: {out}", flush=True)
    return out


def _bare_one(backbone, text: str) -> None:
    import torch

    ids = backbone.tokenize([text])
    with torch.inference_mode():
        backbone.encoder(**backbone.collate(ids))


# -- accuracy and exactness -----------------------------------------------------------------------
def accuracy(learner, tasks, model: Path, default: str) -> dict:
    import torch

    from continual_transformer.learner import ContinualLearner

    per_task = {}
    for task in tasks:
        fp32 = learner.evaluate(task, precision="fp32")
        used = learner.evaluate(task, precision=default)
        per_task[task.name] = {"fp32": round(100 * fp32, 2), default: round(100 * used, 2),
                               "difference": round(100 * (used - fp32), 2)}
    texts = [e.text for t in tasks for e in t.test]
    names = [t.name for t in tasks for e in t.test]
    first = learner.logits(texts, names, precision=default)
    second = learner.logits(texts, names, precision=default)
    reloaded = ContinualLearner.load(model, device="cpu", precision=default)
    third = reloaded.logits(texts, names)
    routed = [(p.task, p.label) for p in learner.predict(texts, precision=default)]
    routed_again = [(p.task, p.label) for p in reloaded.predict(texts)]
    out = {"per_task": per_task,
           "largest_difference": max(abs(v["difference"]) for v in per_task.values()),
           "test_texts": len(texts),
           "same_logits_two_runs": all(torch.equal(a, b) for a, b in zip(first, second)),
           "same_logits_after_reload": all(torch.equal(a, b) for a, b in zip(first, third)),
           "same_routed_answers_after_reload": routed == routed_again}
    print(f"  accuracy: {out}", flush=True)
    return out


# -- the server -----------------------------------------------------------------------------------
def server(model: Path, rows, per_request: int, scratch: Path, repeats: int) -> dict:
    """Each load `repeats` times, the loads taking turns; medians (every round's figures kept)."""
    served = start_server(model, 32, {}, scratch / "serve.log")
    loads = ((1, per_request), (32, per_request), (32, 1), (32, 4 * per_request))
    try:
        rounds: dict[str, list[dict]] = {f"{c} clients x {s} texts": [] for c, s in loads}
        for repeat in range(repeats):
            for clients, size in loads:
                key = f"{clients} clients x {size} texts"
                rounds[key].append(_load(served, rows, clients, size))
                print(f"  [{repeat + 1}/{repeats}] server {key}: {rounds[key][-1]}", flush=True)
        out = {}
        for key, runs in rounds.items():
            middle = sorted(runs, key=lambda r: r["texts_per_second"])[len(runs) // 2]
            out[key] = {**middle, "failed": sum(r["failed"] for r in runs),
                        "rounds_texts_per_second": [r["texts_per_second"] for r in runs]}
        out["readyz"] = httpx.get(f"{served.url}/readyz").json()
        return out
    finally:
        served.stop()


def _load(served, rows, clients: int, per_request: int) -> dict:
    requests = [rows[i : i + per_request] for i in range(0, len(rows), per_request)]
    if per_request == 1:
        requests = requests[: max(400, len(requests) // 4)]  # 1-text requests: a quarter of them
    work = list(requests)
    lock = threading.Lock()
    failures: list[str] = []
    done = [0]

    def client(key: str) -> None:
        with httpx.Client(base_url=served.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:
            while True:
                with lock:
                    if not work:
                        return
                    items = work.pop()
                body = {"items": [{"text": text, "task": task} for task, text in items]}
                try:
                    response = http.post("/v1/predict", json=body)
                    ok = response.status_code == 200 and len(response.json()["predictions"]) == len(items)
                except httpx.HTTPError as exc:
                    ok, response = False, exc
                with lock:
                    if ok:
                        done[0] += len(items)
                    else:
                        failures.append(str(response)[:200])

    warm = httpx.post(f"{served.url}/v1/predict", headers={"Authorization": f"Bearer {served.keys[0]}"},
                      json={"items": [{"text": t, "task": n} for n, t in rows[:64]]})
    warm.raise_for_status()
    threads = [threading.Thread(target=client, args=(served.keys[i],)) for i in range(clients)]
    busy_before = _inference_seconds(served)
    cpu_start, start = time.process_time(), time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    client_cpu = time.process_time() - cpu_start
    busy = _inference_seconds(served) - busy_before
    return {"requests": len(requests), "texts": done[0], "failed": len(failures),
            # the clients run on the server's two cores too: their CPU time, as a share of one core;
            # and the share of the time the server's inference thread was computing a pass
            "client_cpu_share_of_one_core": round(client_cpu / seconds, 3),
            "inference_busy_share": round(busy / seconds, 3),
            "requests_per_second": round(len(requests) / seconds, 1),
            "texts_per_second": round(done[0] / seconds, 1), "first_failures": failures[:3]}


def _inference_seconds(served) -> float:
    """The server's summed forward-pass time so far (`ctt_inference_batch_seconds`)."""
    text = httpx.get(f"{served.url}/metrics", headers={"Authorization": f"Bearer {served.admin_key}"}).text
    found = re.search(r"^ctt_inference_batch_seconds_sum ([0-9.e+-]+)$", text, re.MULTILINE)
    if found is None:
        raise SystemExit("the server's /metrics has no ctt_inference_batch_seconds_sum")
    return float(found.group(1))


# -- bulk scoring ---------------------------------------------------------------------------------
PEAK_RSS = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stderr=subprocess.STDOUT)
_, status, usage = os.wait4(child.pid, 0)
print("peak-rss-kib", usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def bulk(model: Path, rows, sizes: list[int], scratch: Path, repeats: int) -> dict:
    """Each file `repeats` times, the files taking turns; medians (every round's figures kept).
    One 1,000-row file is one chunk of `ctt predict`, so its peak is that of one chunk's passes,
    which moved by 100 MiB between runs; a larger file's is the highest of many chunks'."""
    sources = {}
    for size in sizes:
        sources[size] = scratch / f"rows-{size}.jsonl"
        with sources[size].open("w") as handle:
            for i in range(size):
                task, text = rows[i % len(rows)]
                handle.write(json.dumps({"text": text, "task": task}) + "\n")
    rounds: dict[int, list[dict]] = {size: [] for size in sizes}
    for repeat in range(repeats):
        for size in sizes:
            rounds[size].append(_bulk_once(model, sources[size], scratch / f"out-{size}.jsonl"))
            print(f"  [{repeat + 1}/{repeats}] bulk {size:,} rows: {rounds[size][-1]}", flush=True)
    out = {}
    for size, runs in rounds.items():
        out[f"{size} rows"] = {
            "rows_written": runs[-1]["rows_written"],
            "rows_per_second": statistics.median(r["rows_per_second"] for r in runs),
            "wall_seconds_with_loading": statistics.median(r["wall_seconds_with_loading"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "rounds_peak_rss_mib": [r["peak_rss_mib"] for r in runs]}
    peaks = [v["peak_rss_mib"] for v in out.values()]
    out["peak_rss_largest_over_smallest"] = round(max(peaks) / min(peaks), 3)
    return out


def _bulk_once(model: Path, source: Path, target: Path) -> dict:
    command = [sys.executable, "-m", "continual_transformer.cli", "predict", str(model),
               "--input", str(source), "--output", str(target), "--task-column", "task"]
    start = time.perf_counter()
    # Through a small interpreter that starts `ctt` and reports its peak RSS: a child
    # started from this large process would count this process's pages in its own peak.
    process = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - start
    output, _, peak_kib = process.stdout.rpartition("peak-rss-kib ")
    if process.returncode != 0 or not peak_kib.strip().isdigit():
        raise SystemExit(f"ctt predict --input failed ({process.returncode}):\n{process.stdout}{process.stderr}")
    reported = re.search(r"\(([\d,]+) rows/s\)", output)
    if reported is None:
        raise SystemExit(f"ctt predict --input printed no rows/s:\n{output}")
    return {"rows_written": sum(1 for _ in target.open()),
            "rows_per_second": int(reported.group(1).replace(",", "")),
            "wall_seconds_with_loading": round(wall, 1), "peak_rss_mib": round(int(peak_kib) / 1024, 1)}


# -- report ---------------------------------------------------------------------------------------
def summary(results: dict) -> None:
    print("\n== summary ==")
    if "speed" in results:
        speed = results["speed"]
        for name, rate in speed["texts_per_second"].items():
            ratio = speed["ratio_to_limit"].get(name)
            extra = f"  ({ratio:.2f}x {speed['limit']})" if ratio is not None else ""
            eager = speed.get("ratio_to_bare_bf16_eager", {}).get(name)
            if eager is not None and speed["limit"] == "bare bf16":
                extra += f", {eager:.2f}x bare bf16-eager"
            print(f"{name:<28} {rate:>8.1f} texts/s{extra}")
    if "threads_compared" in results:
        print(f"predict mixed by threads: {results['threads_compared']['predict_mixed_texts_per_second']}")
    if "latency_ms" in results:
        for name, value in results["latency_ms"].items():
            print(f"one text, {name:<16} p50 {value['p50']:.1f} ms  p99 {value['p99']:.1f} ms")
    if "accuracy" in results:
        acc = results["accuracy"]
        for name, value in acc["per_task"].items():
            print(f"accuracy {name:<14} {value}")
        print(f"largest difference {acc['largest_difference']:.2f} points; same logits twice "
              f"{acc['same_logits_two_runs']}, after reload {acc['same_logits_after_reload']}")
    if "server" in results:
        speed = results.get("speed")
        for name, value in results["server"].items():
            if name != "readyz":
                references = [] if speed is None else [speed["limit"]] + (
                    ["bare bf16-eager"] if speed["limit"] == "bare bf16" else [])
                ratio = ", ".join(f"{value['texts_per_second'] / speed['texts_per_second'][r]:.2f}x {r}"
                                  for r in references)
                ratio = f" ({ratio})" if ratio else ""
                print(f"server {name:<22} {value['texts_per_second']:>7.1f} texts/s{ratio}, "
                      f"{value['requests_per_second']:.1f} requests/s, {value['failed']} failed; "
                      f"rounds {value['rounds_texts_per_second']}, inference thread busy "
                      f"{value['inference_busy_share']:.0%}, clients' CPU "
                      f"{value['client_cpu_share_of_one_core']:.0%} of a core")
    if "bulk" in results:
        for name, value in results["bulk"].items():
            if isinstance(value, dict):
                print(f"bulk {name:<12} {value['rows_per_second']} rows/s, peak RSS {value['peak_rss_mib']} MiB; "
                      f"rounds {value['rounds_peak_rss_mib']}")
        print(f"bulk peak RSS, largest / smallest file: {results['bulk']['peak_rss_largest_over_smallest']}")


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 2)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
