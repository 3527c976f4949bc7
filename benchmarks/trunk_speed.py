"""`ctt run` on the bundled stream: this checkout against the all-layer `ia3` it replaced.

    python benchmarks/trunk_speed.py                        # 3 rounds (about 35 min on 2 cores)
    python benchmarks/trunk_speed.py --rounds 1 --max-train 300 --epochs 1   # a quick look

Each round runs, in fresh processes and in alternating order (so that drift in the machine's
load hits every side alike):

- `before`: the library as it was before the trunk/top split (git `--before-ref`, default the
  last commit before it), checked out into a temporary worktree and run with this venv;
- `default`: this checkout with its defaults (the top `adapt_layers` layers adapted, the trunk
  below them run once per text);
- `all-layers`: this checkout with `--adapt-layers all` (the original method, with this
  checkout's linear evaluation), unless `--no-all-layers`.

It prints each run's total seconds (learning + evaluation, from report.json), training and
evaluation seconds, peak RSS (the process's own, as report.json records it after each task) and ACC / task-free ACC / BWT,
then medians and the ratio before / default per round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE_REF = "f566835"  # the last commit with the all-layer method only


def run_once(src: Path, out: Path, extra: list[str], args) -> dict:
    command = [sys.executable, "-m", "continual_transformer.cli", "run", "--out", str(out), *extra]
    for option in ("max_train", "epochs"):
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ctt run failed ({src}):\n{done.stdout[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    per_task = report["per_task"]
    m = report["metrics"]
    return {
        "total_s": report["total_seconds"], "wall_s": round(wall, 1),
        "train_s": round(sum(r["train_seconds"] for r in per_task), 1),
        "eval_s": round(sum(r["eval_seconds"] for r in per_task), 1),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in per_task),
        "rss_by_task": [r["peak_rss_mb"] for r in per_task],
        "acc": round(100 * m["acc"], 2), "task_free_acc": round(100 * m["task_free_acc"], 2),
        "bwt": round(100 * m["bwt"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--no-all-layers", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", type=Path, help="copy each run's report.json into this folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="trunk-speed-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before),
                        args.before_ref], check=True, capture_output=True)
        try:
            sides = {"before": (before / "src", []), "default": (ROOT / "src", [])}
            if not args.no_all_layers:
                sides["all-layers"] = (ROOT / "src", ["--adapt-layers", "all"])
            results: dict[str, list[dict]] = {name: [] for name in sides}
            for round_ in range(args.rounds):
                names = list(sides) if round_ % 2 == 0 else list(reversed(sides))
                for name in names:
                    src, extra = sides[name]
                    result = run_once(src, tmp / f"{name}-{round_}", extra, args)
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(tmp / f"{name}-{round_}" / "report.json",
                                    args.keep / f"{name}-{round_ + 1}.json")
                    results[name].append(result)
                    print(f"round {round_ + 1} {name:>10}: total {result['total_s']:7.1f}s "
                          f"(train {result['train_s']:.1f}, eval {result['eval_s']:.1f})  "
                          f"peak RSS {result['peak_rss_mb']:.0f} MiB {result['rss_by_task']}  "
                          f"ACC {result['acc']:.2f}  task-free {result['task_free_acc']:.2f}  "
                          f"BWT {result['bwt']:+.2f}", flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           capture_output=True)
    print("\nmedians over", args.rounds, "round(s)")
    print("| run | total s | train s | eval s | peak RSS MiB | ACC | task-free ACC | BWT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("total_s", "train_s", "eval_s", "peak_rss_mb", "acc", "task_free_acc", "bwt")}
        print(f"| {name} | {med['total_s']:.1f} | {med['train_s']:.1f} | {med['eval_s']:.1f} | "
              f"{med['peak_rss_mb']:.0f} | {med['acc']:.2f} | {med['task_free_acc']:.2f} | "
              f"{med['bwt']:+.2f} |")
    ratios = [b["total_s"] / d["total_s"] for b, d in zip(results["before"], results["default"])]
    print(f"\nbefore / default total time, per round: {[round(r, 2) for r in ratios]}; "
          f"median {statistics.median(ratios):.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"rounds": results, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
