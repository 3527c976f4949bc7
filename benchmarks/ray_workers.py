"""`ctt run --workers 2` against the sequential run, on a 12-task stream, in one invocation.

    python benchmarks/ray_workers.py                           # about 10-15 min on 2 cores
    python benchmarks/ray_workers.py --max-train 60 --max-test 20 --epochs 1   # a quick look

The stream: the bundled five tasks split by label into 12 (`twelve_tasks`: each task's labels,
sorted, in chunks of 3 + 2 for five labels and 2 + 2 + 2 for six; the same train and test
texts), so a fresh clone rebuilds it; each task's training texts subsampled (stratified,
`--max-train`, seed 0) and every k-th of its test texts kept (`--max-test`: the evaluation after
each task, serial work the same in every run, stays small beside the learning measured).
Method `ia3` with its defaults (lexical branch included), seed 0.

Runs, each in a fresh process, one after another:

- `sequential-1t`: `run_stream` with one torch thread;
- `sequential-2t`: with two threads (what `ctt run` uses on 2 cores);
- `workers-2`: two Ray workers of one thread each (a local cluster; its start and the workers'
  backbone loads are in the time);
- `workers-2-killed`: the same, with the worker learning task `--kill-task` killed (SIGKILL)
  at training step `--kill-step` of its first attempt; Ray restarts it and the task is
  learned again.

For each run it prints the wall time (learner built, stream learned, evaluated after every
task, saved, report written), its ratio to the sequential runs' and the learning seconds summed
over tasks; where the CPU time went: the run's own process, every process of the machine (from
`/proc/stat`) and the share of the cores left unused, and for the parallel runs Ray's processes
(the actors, its idle workers, its services). Then, for the parallel runs against
`sequential-1t` (the same one thread per task as the workers), for `sequential-2t` against
`sequential-1t` (what the thread count changes) and for `workers-2` against `sequential-2t`: whether the models are the same bit for bit (every
tensor of the two checkpoints; how many differ, which, and the largest absolute difference),
predictions (task given and routed, on `--check-texts` test texts per task; all fields, and
labels and tasks alone) and the report but for times. `--repeats N` runs the four N times and
prints medians; `--compare-only` compares the runs already in `--out` again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("sequential-1t", "sequential-2t", "workers-2", "workers-2-killed")


def twelve_tasks(tasks):
    """The bundled five tasks split by label into 12 (see the module's text)."""
    from continual_transformer.types import Task

    out = []
    for task in tasks:
        labels = sorted(task.labels)
        sizes = {5: (3, 2), 6: (2, 2, 2)}[len(labels)]
        start = 0
        for k, size in enumerate(sizes, start=1):
            chunk = tuple(labels[start : start + size])
            start += size
            out.append(Task(f"{task.name}_{k}", chunk,
                            tuple(e for e in task.train if e.label in chunk),
                            tuple(e for e in task.test if e.label in chunk)))
    return out


def stream(max_train: int | None, max_test: int | None):
    from dataclasses import replace

    from continual_transformer import default_stream_path, load_stream

    tasks = twelve_tasks(load_stream(default_stream_path()))
    if max_train:
        tasks = [t.subsample_train(max_train, 0) for t in tasks]
    if max_test:  # every k-th test text: the labels' mix kept, the evaluation's cost bounded
        tasks = [replace(t, test=t.test[:: -(-len(t.test) // max_test)]) for t in tasks]
    return tasks


def kill_once(learner, task, *, victim: str, at_step: int, marker: str):
    """A worker's learning of one task; on the first attempt at `victim`, its process is
    killed with SIGKILL at training step `at_step` (the marker file records the pid)."""

    def progress(step, total, loss):
        if task.name == victim and step == at_step and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    return learner.learn(task, progress)


def child(kind: str, out: Path, args) -> None:
    """One run, in this (fresh) process; writes out/timing.json."""
    import psutil

    busy_before, own_before = _busy_cpu_seconds(), time.process_time()
    started = time.perf_counter()
    import torch

    from continual_transformer import ContinualLearner, TrainConfig, run_stream

    torch.set_num_threads(1 if kind == "sequential-1t" else 2)
    tasks = stream(args.max_train, args.max_test)
    config = {"seed": 0, "epochs": args.epochs, "max_train": args.max_train,
              "max_test": args.max_test,
              "stream": "bundled five split into 12"}
    torch.manual_seed(0)
    learner = ContinualLearner(train=TrainConfig(epochs=args.epochs), device="cpu")
    history, ray_cpu = [], None
    if kind.startswith("workers"):
        from continual_transformer.experiment.ray_pool import RayTaskPool, learn_task

        learn = learn_task
        if kind == "workers-2-killed":
            learn = partial(kill_once, victim=tasks[args.kill_task].name, at_step=args.kill_step,
                            marker=str(out / "killed"))
        class AccountedPool(RayTaskPool):
            """Takes the Ray processes' CPU time when the run lets the workers go (they end
            in the background while the run finishes)."""
            ray_cpu = None

            def release(self):
                self.ray_cpu = _ray_cpu_seconds()
                super().release()

        with AccountedPool(learner, 2, threads=1, learn=learn) as pool:
            run_stream(tasks, learner, out / "run", None, config, pool=pool)
            history = pool.history
            ray_cpu = pool.ray_cpu
    else:
        run_stream(tasks, learner, out / "run", None, config)
    seconds = time.perf_counter() - started
    busy, own = _busy_cpu_seconds() - busy_before, time.process_time() - own_before
    (out / "timing.json").write_text(json.dumps({
        "seconds": seconds, "history": history, "run_process_cpu_s": own,
        "machine_busy_cpu_s": busy, "cpus": psutil.cpu_count(), "ray_cpu_s": ray_cpu}))


def _ray_cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the local Ray cluster's processes (all started by this run):
    the worker actors, Ray's idle workers, and its own services (raylet, GCS, agents)."""
    import psutil

    used = {"actors": 0.0, "idle workers": 0.0, "services": 0.0}
    for process in psutil.Process().children(recursive=True):
        try:
            command = " ".join(process.cmdline())
            times = process.cpu_times()
        except psutil.Error:
            continue
        kind = ("actors" if "ray::_Worker" in command else
                "idle workers" if "ray::IDLE" in command or "default_worker" in command else "services")
        used[kind] += times.user + times.system
    return {k: round(v, 1) for k, v in used.items()}


def _busy_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used since boot (all but idle and I/O wait)."""
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def run_child(kind: str, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--child-out", str(out),
               "--epochs", str(args.epochs), "--kill-task", str(args.kill_task),
               "--kill-step", str(args.kill_step)]
    for option in ("max_train", "max_test"):
        if getattr(args, option):
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out.mkdir(parents=True)
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stdout[-4000:]}")
    return finished(kind, out)


def finished(kind: str, out: Path) -> dict:
    """A finished run's figures, from its folder."""
    timing = json.loads((out / "timing.json").read_text())
    report = json.loads((out / "run" / "report.json").read_text())
    return {"seconds": timing["seconds"], "history": timing["history"],
            "train_s": sum(e["train_seconds"] for e in report["per_task"]),
            "run_process_cpu_s": timing.get("run_process_cpu_s"),
            "machine_busy_cpu_s": timing.get("machine_busy_cpu_s"), "cpus": timing.get("cpus"),
            "ray_cpu_s": timing.get("ray_cpu_s"),
            "killed_pid": int((out / "killed").read_text()) if (out / "killed").exists() else None}


def compare(a: Path, b: Path, tasks, check_texts: int) -> dict:
    """Every tensor of the two checkpoints, and predictions of a sample of test texts."""
    import torch

    from continual_transformer import ContinualLearner

    one, two = ContinualLearner.load(a, device="cpu"), ContinualLearner.load(b, device="cpu")
    x, y = one.state(), two.state()
    if ([s.record.name for s in x.tasks] != [t.record.name for t in y.tasks]
            or any(sorted(s.tensors) != sorted(t.tensors) for s, t in zip(x.tasks, y.tasks))
            or sorted(x.shared_tensors) != sorted(y.shared_tensors)):
        raise SystemExit(f"{a} and {b} do not hold the same tasks and tensor names")
    pairs = [(f"{s.record.name}/{k}", s.tensors[k], t.tensors[k])
             for s, t in zip(x.tasks, y.tasks) for k in s.tensors]
    pairs += [(k, v, y.shared_tensors[k]) for k, v in x.shared_tensors.items()]
    differing = [name for name, v, u in pairs
                 if v.dtype != u.dtype or v.shape != u.shape or not torch.equal(v, u)]
    max_diff = max((float((v.double() - u.double()).abs().max()) for _, v, u in pairs
                    if v.shape == u.shape and v.numel()), default=0.0)
    texts = [e.text for t in tasks for e in t.test[:check_texts]]
    given = [t.name for t in tasks for _ in t.test[:check_texts]]
    p1 = one.predict(texts, task=given) + one.predict(texts)
    p2 = two.predict(texts, task=given) + two.predict(texts)
    return {"tensors": len(pairs), "differing": differing, "max_abs_diff": max_diff,
            "predictions_equal": p1 == p2,
            "labels_equal": [(p.task, p.label) for p in p1] == [(p.task, p.label) for p in p2],
            "texts": len(p1)}


def stripped(report: dict) -> dict:
    from continual_transformer.experiment.report import TIMING_FIELDS

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_FIELDS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(report)


def summarise(args, tasks, results: dict[str, list[dict]]) -> None:
    """Compare the runs' models and reports, print the table."""
    # The same threads per task as the workers' (1) is what a parallel run equals bit for
    # bit; the 2-thread run shows what another thread count changes.
    pairs = [("sequential-2t", "sequential-1t"), ("workers-2", "sequential-1t"),
             ("workers-2-killed", "sequential-1t"), ("workers-2", "sequential-2t")]
    pairs = [(kind, reference) for kind, reference in pairs
             if results.get(kind) and results.get(reference)]
    rows = []
    for kind, reference in pairs:
        checks = []
        for repeat in range(len(results[kind])):
            here, there = args.out / f"{repeat}" / kind, args.out / f"{repeat}" / reference
            check = compare(here / "run" / "model", there / "run" / "model", tasks,
                            args.check_texts)
            check["report_equal"] = stripped(json.loads((here / "run" / "report.json").read_text())) \
                == stripped(json.loads((there / "run" / "report.json").read_text()))
            checks.append(check)
        rows.append((kind, reference, checks))
    ran = [kind for kind in RUNS if results.get(kind)]
    median = {kind: statistics.median(r["seconds"] for r in results[kind]) for kind in ran}

    def ratio(kind, base):
        return f"{median[kind] / median[base]:>8.2f}x" if base in median else f"{'-':>9}"

    def cpu(kind, field):
        values = [r[field] for r in results[kind] if r.get(field) is not None]
        return statistics.median(values) if values else None

    print(f"{'run':<18} {'wall s':>7} {'/ seq 1t':>9} {'/ seq 2t':>9} {'learning s':>11} "
          f"{'run CPU s':>10} {'busy CPU s':>11} {'idle':>6}")
    for kind in ran:
        learning = statistics.median(r["train_s"] for r in results[kind])
        own, busy = cpu(kind, "run_process_cpu_s"), cpu(kind, "machine_busy_cpu_s")
        cpus = results[kind][0].get("cpus")
        # CPU time the machine left unused while the run went: waits, stragglers, starts
        idle = f"{100 * (1 - busy / (cpus * median[kind])):>5.1f}%" if busy and cpus else f"{'-':>6}"
        print(f"{kind:<18} {median[kind]:>7.1f} {ratio(kind, 'sequential-1t')} "
              f"{ratio(kind, 'sequential-2t')} {learning:>11.1f} "
              f"{own if own is None else round(own, 1)!s:>10} "
              f"{busy if busy is None else round(busy, 1)!s:>11} {idle}")
    for kind in ran:
        for r in results[kind]:
            if r.get("ray_cpu_s"):
                print(f"{kind}: CPU s of Ray's processes: " +
                      ", ".join(f"{k} {v}" for k, v in r["ray_cpu_s"].items()))
    print("run CPU s: the run's own process (learning, for the sequential runs; importing, "
          "evaluating and saving, for the parallel ones); busy CPU s: every process of the machine")
    print()
    for kind, reference, checks in rows:
        first = checks[0]
        same = all(not c["differing"] for c in checks)
        differing = sorted({name.split("/")[-1] for c in checks for name in c["differing"]})
        print(f"{kind} against {reference}: bit-identical {'yes' if same else 'no'} "
              f"({max(len(c['differing']) for c in checks)} of {first['tensors']} tensors differ"
              f"{' (' + ', '.join(differing) + ')' if differing else ''}; max abs diff "
              f"{max(c['max_abs_diff'] for c in checks):.3g}); predictions "
              f"{'equal' if all(c['predictions_equal'] for c in checks) else 'differ'} on "
              f"{first['texts']} (labels and tasks "
              f"{'equal' if all(c['labels_equal'] for c in checks) else 'differ'}); report "
              f"{'equal' if all(c['report_equal'] for c in checks) else 'differs'} but for times")
    for result in results.get("workers-2-killed", []):
        victim = tasks[args.kill_task].name
        entry = next(h for h in result["history"] if h["task"] == victim)
        print(f"killed: the worker (pid {result['killed_pid']}) learning {victim!r} at step "
              f"{args.kill_step}; learned again by pid {entry['pid']} (restarted by Ray: "
              f"{entry['restarted']})")
    if results.get("workers-2"):
        pids = {h["pid"] for r in results["workers-2"] for h in r["history"]}
        print(f"workers-2: tasks learned by {len(pids)} worker processes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ray-workers"))
    parser.add_argument("--max-train", type=int, default=240, help="training texts per task at most")
    parser.add_argument("--max-test", type=int, default=80, help="test texts per task at most")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--runs", default=",".join(RUNS),
                        help="which runs, comma-separated; runs already finished in --out are kept")
    parser.add_argument("--kill-task", type=int, default=3, help="index of the task whose worker is killed")
    parser.add_argument("--kill-step", type=int, default=10)
    parser.add_argument("--check-texts", type=int, default=40, help="test texts per task predicted")
    parser.add_argument("--compare-only", action="store_true",
                        help="only compare and print the runs already in --out")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.child_out, args)
    sys.path.insert(0, str(ROOT / "src"))
    tasks = stream(args.max_train, args.max_test)
    if args.compare_only:
        return summarise(args, tasks, json.loads((args.out / "results.json").read_text()))
    runs = [kind for kind in RUNS if kind in args.runs.split(",")]
    if not runs:
        raise SystemExit(f"--runs names none of {', '.join(RUNS)}: {args.runs!r}")
    print(f"stream: {len(tasks)} tasks, {sum(len(t.train) for t in tasks)} training texts, "
          f"{sum(len(t.test) for t in tasks)} test texts; epochs {args.epochs}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at the start")
    results: dict[str, list[dict]] = {kind: [] for kind in runs}
    for repeat in range(args.repeats):
        for kind in runs:
            out = args.out / f"{repeat}" / kind
            if (out / "timing.json").exists():  # finished by an earlier invocation: kept
                result = finished(kind, out)
                results[kind].append(result)
                print(f"round {repeat + 1} {kind}: {result['seconds']:.1f} s, kept from {out}")
                continue
            if out.exists():  # an unfinished run: learned again from the start
                shutil.rmtree(out)
            result = run_child(kind, out, args)
            results[kind].append(result)
            print(f"round {repeat + 1} {kind}: {result['seconds']:.1f} s "
                  f"(learning {result['train_s']:.1f} s summed over tasks)", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"load average {os.getloadavg()[0]:.2f} at the end\n")
    summarise(args, tasks, results)


if __name__ == "__main__":
    main()
