"""Learn a long stream (the 100-task scale stream) and measure how costs grow with the tasks.

    python scripts/build_scale_stream.py --install          # once: data/scale/scale_stream.jsonl.gz
    python benchmarks/scale.py                               # about 1 h on 2 cores
    python benchmarks/scale.py STREAM --milestones 1,2,5 --out /tmp/scale   # any stream

One process learns the stream task after task with the library's defaults (`ia3`, the top
`adapt_layers` layers adapted) and evaluates after each task as `ctt run` does (task given and
task-free, linear in the stream). After the tasks numbered in `--milestones` it saves the model
and starts a fresh process (the `probe`) that plays a serving process holding those tasks:

- load seconds (`ContinualLearner.load`), and seconds to the first routed answer (the router's
  solution is computed on first use);
- latency of `predict` for batches of `--batch` texts: p50 / p99 over `--batches` batches of
  one task with the task given ("single"), and of texts of random tasks without a task
  ("routed"); texts are the test texts of the tasks held;
- the probe's RSS after those predictions (current and peak).

At each milestone it also measures task-free prediction over the tasks seen: routing accuracy,
task-free ACC and its gap to task-given ACC, the router's expected calibration error, and, as a
reference computed in the same run, a TF-IDF (word 1-2 + char_wb 2-5 grams) + logistic-regression
task classifier retrained on all training texts seen so far (`routing_scale.reference_accuracy`;
`--no-reference` skips it). `--max-train N --max-test M` cap each task's texts (the first N / M)
for a shorter run.

After the stream, the task at position `--relearn` is learned again under a new name: the same
data at position N+1, so that learn time at the end of the stream is compared with the same
task's time near the start.

Prints a table per milestone and writes `scale.json` and `scale.png` (curves) into `--out`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from continual_transformer.experiment.resources import peak_rss_mb
from continual_transformer.model.memory import release_freed_memory

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STREAM = ROOT / "data" / "scale" / "scale_stream.jsonl.gz"


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# -- the probe: a fresh process that loads the model and predicts --------------------------------
def probe(model: Path, stream: Path, held: int, batch: int, batches: int, seed: int) -> dict:
    import torch

    from continual_transformer import ContinualLearner, load_stream

    rng = random.Random(seed)
    tasks = load_stream(stream)[:held]
    # The probe keeps only the test texts it sends: a serving process holds no stream.
    tasks = [SimpleNamespace(name=t.name, test=t.test) for t in tasks]
    gc.collect()
    release_freed_memory()
    started = time.perf_counter()
    learner = ContinualLearner.load(model)
    load_s = time.perf_counter() - started
    texts = [(t.name, e.text) for t in tasks for e in t.test]
    started = time.perf_counter()
    learner.predict([rng.choice(texts)[1]])  # routed: the router solves its statistics here
    first_routed_s = time.perf_counter() - started
    latencies: dict[str, list[float]] = {"single": [], "routed": []}
    with torch.inference_mode():
        for _ in range(batches):  # the two kinds take turns, so that load drift hits both
            task = rng.choice(tasks)
            chosen = [e.text for e in rng.sample(task.test, min(batch, len(task.test)))]
            started = time.perf_counter()
            learner.predict(chosen, task=task.name)
            latencies["single"].append(time.perf_counter() - started)
            chosen = [text for _, text in rng.sample(texts, batch)]
            started = time.perf_counter()
            learner.predict(chosen)
            latencies["routed"].append(time.perf_counter() - started)
    result = {"tasks": len(learner.tasks), "load_s": round(load_s, 3),
              "first_routed_s": round(first_routed_s, 3),
              "rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    for kind, values in latencies.items():
        result[f"{kind}_p50_ms"] = round(1000 * percentile(values, 50), 1)
        result[f"{kind}_p99_ms"] = round(1000 * percentile(values, 99), 1)
    return result


def run_probe(model: Path, args, held: int) -> dict:
    command = [sys.executable, __file__, "--probe", str(model), str(args.stream), "--held", str(held),
               "--batch", str(args.batch), "--batches", str(args.batches)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"probe failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def directory_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# -- the stream ----------------------------------------------------------------------------------
def learn_stream(args) -> dict:
    import torch

    from continual_transformer import ContinualLearner, load_stream
    from continual_transformer.types import Task
    from continual_transformer.experiment.evaluate import StreamEvaluation

    tasks = load_stream(args.stream)
    if args.tasks:
        tasks = tasks[: args.tasks]
    if args.max_train or args.max_test:
        tasks = [Task(t.name, t.labels, t.train[: args.max_train or None], t.test[: args.max_test or None])
                 for t in tasks]
    milestones = sorted({m for m in args.milestones if m <= len(tasks)} | {len(tasks)})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    learner = ContinualLearner()
    print(f"{len(tasks)} tasks; backbone {learner.backbone.ref.name}, adapt_layers "
          f"{learner.model.top_layers} of {learner.backbone.num_layers}", flush=True)
    evaluation = StreamEvaluation(learner, tasks)
    per_task, points = [], []
    for i, task in enumerate(tasks):
        record = learner.learn(task)
        started = time.perf_counter()
        row = evaluation.after_task(i)
        eval_s = time.perf_counter() - started
        seen = row.confusion[: i + 1, : i + 1]
        routing = float(seen.trace() / seen.sum())
        tokens = sum(len(ids) for ids in learner.backbone.tokenize([e.text for e in task.train]))
        per_task.append({
            "position": i + 1, "task": task.name, "labels": len(task.labels),
            "train_texts": len(task.train), "train_tokens": tokens,
            "learn_s": record.train_seconds, "eval_s": round(eval_s, 2),
            "accuracy": row.given[-1], "routing_acc": routing,
            "task_free_acc_mean": sum(row.free) / len(row.free),
            "acc_mean": sum(row.given) / len(row.given),
            "peak_rss_mb": round(peak_rss_mb(), 1), "rss_mb": round(rss_mb(), 1),
        })
        line = per_task[-1]
        print(f"{i + 1:3d} {task.name:<32} {len(task.train):5d} texts {len(task.labels):2d} labels  "
              f"learn {line['learn_s']:6.1f}s  eval {eval_s:5.1f}s  acc {100 * line['accuracy']:5.1f}  "
              f"routing {100 * routing:5.1f}  RSS {line['rss_mb']:.0f} (peak {line['peak_rss_mb']:.0f}) MiB",
              flush=True)
        if i + 1 in milestones:
            model = args.out / f"model-{i + 1}"
            if model.exists():
                shutil.rmtree(model)
            started = time.perf_counter()
            learner.save(model)
            save_s = time.perf_counter() - started
            point = {"tasks": i + 1, "checkpoint_bytes": directory_bytes(model),
                     "save_s": round(save_s, 2), "learner_peak_rss_mb": line["peak_rss_mb"],
                     "routing_acc": routing, "acc_mean": line["acc_mean"],
                     "task_free_acc_mean": line["task_free_acc_mean"],
                     "task_free_gap": line["acc_mean"] - line["task_free_acc_mean"],
                     "routing_ece": row.routing_ece,
                     "router_bytes": learner.router.nbytes(),
                     **{f"probe_{k}": v for k, v in run_probe(model, args, i + 1).items()}}
            if not args.no_reference:
                started = time.perf_counter()
                point["reference_routing_acc"] = reference_routing(tasks[: i + 1])
                point["reference_s"] = round(time.perf_counter() - started, 1)
            points.append(point)
            print("   milestone", json.dumps(point), flush=True)
            if i + 1 != len(tasks):
                shutil.rmtree(model)
    again = None
    if args.relearn and args.relearn <= len(tasks):
        original = tasks[args.relearn - 1]
        copy = Task(f"{original.name[:50]}-again", original.labels, original.train, original.test)
        record = learner.learn(copy)
        again = {"task": original.name, "position_first": args.relearn,
                 "position_again": len(tasks) + 1,
                 "learn_s_first": per_task[args.relearn - 1]["learn_s"],
                 "learn_s_again": record.train_seconds}
        again["ratio"] = round(again["learn_s_again"] / again["learn_s_first"], 3)
        print("relearned", json.dumps(again), flush=True)
    return {"stream": str(args.stream), "per_task": per_task, "milestones": points,
            "relearn": again}


def reference_routing(seen) -> float:
    """TF-IDF + logistic regression over task ids, trained on all training texts of `seen`,
    accuracy on their test texts (the non-streaming reference of `routing_scale.py`)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from routing_scale import reference_accuracy

    fit = [(k, e.text) for k, t in enumerate(seen) for e in t.train]
    test = [(k, e.text) for k, t in enumerate(seen) for e in t.test]
    return reference_accuracy([x for _, x in fit], [k for k, _ in fit],
                              [x for _, x in test], [k for k, _ in test])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_task, points = result["per_task"], result["milestones"]
    x = [r["position"] for r in per_task]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    ax = axes[0, 0]
    ax.plot(x, [1000 * r["learn_s"] / r["train_tokens"] for r in per_task], ".", ms=4)
    ax.set(title="learn seconds per 1,000 training tokens", xlabel="task position")
    ax = axes[0, 1]
    ax.plot(x, [r["peak_rss_mb"] for r in per_task], label="learner peak")
    ax.plot([p["tasks"] for p in points], [p["probe_rss_mb"] for p in points], "o-",
            label="serving process (probe)")
    ax.set(title="RSS (MiB)", xlabel="tasks", ylim=(0, None))
    ax.legend()
    ax = axes[0, 2]
    ax.plot([p["tasks"] for p in points], [p["checkpoint_bytes"] / 2**20 for p in points], "o-")
    ax.set(title="checkpoint size (MiB)", xlabel="tasks", ylim=(0, None))
    ax = axes[1, 0]
    ax.plot([p["tasks"] for p in points], [p["probe_load_s"] for p in points], "o-", label="load")
    ax.plot([p["tasks"] for p in points],
            [p["probe_load_s"] + p["probe_first_routed_s"] for p in points], "o-",
            label="load + first routed answer")
    ax.set(title="model load (s)", xlabel="tasks", ylim=(0, None))
    ax.legend()
    ax = axes[1, 1]
    for kind in ("single", "routed"):
        for q, style in (("p50", "o-"), ("p99", "s--")):
            ax.plot([p["tasks"] for p in points], [p[f"probe_{kind}_{q}_ms"] for p in points], style,
                    label=f"{kind} {q}")
    ax.set(title="predict latency per batch (ms)", xlabel="tasks", ylim=(0, None))
    ax.legend()
    ax = axes[1, 2]
    ax.plot(x, [100 * r["routing_acc"] for r in per_task], label="routing")
    ax.plot(x, [100 * r["acc_mean"] for r in per_task], label="ACC (task given)")
    ax.plot(x, [100 * r["task_free_acc_mean"] for r in per_task], label="ACC (task-free)")
    with_reference = [p for p in points if "reference_routing_acc" in p]
    if with_reference:
        ax.plot([p["tasks"] for p in with_reference],
                [100 * p["reference_routing_acc"] for p in with_reference], "s--",
                label="routing reference: TF-IDF + LR, all texts at once")
    ax.set(title="accuracy over the tasks seen (%)", xlabel="tasks", ylim=(0, 100))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stream", nargs="?", type=Path, default=DEFAULT_STREAM)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "scale")
    parser.add_argument("--milestones", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 5, 10, 25, 50, 100])
    parser.add_argument("--tasks", type=int, help="only the first N tasks")
    parser.add_argument("--max-train", type=int, default=0, help="at most N training texts a task (0: all)")
    parser.add_argument("--max-test", type=int, default=0, help="at most M test texts a task (0: all)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the TF-IDF + LR routing reference at the milestones")
    parser.add_argument("--relearn", type=int, default=10,
                        help="learn the task at this position again after the stream (0: no)")
    parser.add_argument("--batch", type=int, default=32, help="texts per predict call")
    parser.add_argument("--batches", type=int, default=200, help="predict calls per kind")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--held", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.stream, args.held, args.batch, args.batches, 0)))
        return
    if not args.stream.is_file():
        raise SystemExit(f"{args.stream}: no such stream; build it with "
                         "python scripts/build_scale_stream.py --install")
    result = learn_stream(args)
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "scale.png")
    print("\n| tasks | learner peak RSS MiB | checkpoint MiB | load s | first routed s | "
          "serving RSS MiB | single p50/p99 ms | routed p50/p99 ms | routing % |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in result["milestones"]:
        print(f"| {p['tasks']} | {p['learner_peak_rss_mb']:.0f} | {p['checkpoint_bytes'] / 2**20:.1f} | "
              f"{p['probe_load_s']:.2f} | {p['probe_first_routed_s']:.2f} | {p['probe_rss_mb']:.0f} | "
              f"{p['probe_single_p50_ms']:.0f} / {p['probe_single_p99_ms']:.0f} | "
              f"{p['probe_routed_p50_ms']:.0f} / {p['probe_routed_p99_ms']:.0f} | "
              f"{100 * p['routing_acc']:.1f} |")
    print("\n| tasks | routing % | reference % | ACC task given | ACC task-free | gap | router ECE | router bytes shared / tasks |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in result["milestones"]:
        reference = p.get("reference_routing_acc")
        print(f"| {p['tasks']} | {100 * p['routing_acc']:.2f} | "
              f"{'' if reference is None else f'{100 * reference:.2f}'} | {100 * p['acc_mean']:.2f} | "
              f"{100 * p['task_free_acc_mean']:.2f} | {100 * p['task_free_gap']:.2f} | "
              f"{p['routing_ece']} | {p['router_bytes']['shared']:,} / {p['router_bytes']['tasks']:,} |")
    learn = [r["learn_s"] for r in result["per_task"]]
    print(f"\nlearn s per task: median {statistics.median(learn):.1f}, max {max(learn):.1f}")
    if result["relearn"]:
        r = result["relearn"]
        print(f"task {r['task']!r}: {r['learn_s_first']:.1f}s at position {r['position_first']}, "
              f"{r['learn_s_again']:.1f}s at position {r['position_again']} ({r['ratio']:.2f}x)")
    print(f"wrote {args.out / 'scale.json'}, {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
