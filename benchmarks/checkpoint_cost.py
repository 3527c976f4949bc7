"""What checkpointing costs: wall time of `ctt run` with and without saves within tasks.

    # the full measurement (the default stream, default settings: ~7 min per run on 2 cores)
    python benchmarks/checkpoint_cost.py
    # a quick sanity check
    python benchmarks/checkpoint_cost.py --max-train 200 --epochs 1

Runs `ctt run` once per `--save-every` value (0 = saves after each task only; the default 50
adds saves every 50 training steps), `--repeats` times in alternation so that drift in the
machine's load hits every setting alike, and prints wall times. It also times one save of the
training state on its own (the write a run makes every K steps) and gives its size, so the cost
per save can be read without the noise of whole runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def one_run(args: argparse.Namespace, save_every: int, out: Path) -> dict:
    command = [sys.executable, "-m", "continual_transformer.cli", "run", "--out", str(out),
               "--save-every", str(save_every), "--device", args.device, "--backbone", args.backbone]
    if args.stream:
        command.insert(4, str(args.stream))
    for option in ("max_train", "epochs", "batch_size"):
        if getattr(args, option) is not None:
            command += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    started = time.perf_counter()
    done = subprocess.run(command, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ctt run failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    steps = [row["train_stats"]["steps"] for row in report["per_task"]]
    saves = sum((s - 1) // save_every for s in steps) if save_every else 0
    return {"save_every": save_every, "wall_seconds": wall, "run_seconds": report["total_seconds"],
            "train_seconds": sum(row["train_seconds"] for row in report["per_task"]),
            "intra_task_saves": saves, "acc": report["metrics"]["acc"]}


def one_save(backbone: str, device: str, repeats: int = 20) -> dict:
    """Time `runstate.write` of an ia3 task's training state, as a run does every K steps."""
    import torch

    from continual_transformer import ContinualLearner, TrainConfig
    from continual_transformer.io import runstate
    from continual_transformer.config import BackboneConfig
    from continual_transformer.types import Example, Task
    from continual_transformer.io.runstate import RunState
    from continual_transformer.training.loop import Checkpointing

    learner = ContinualLearner(BackboneConfig(backbone), train=TrainConfig(epochs=2, batch_size=2),
                               device=device)
    task = Task("probe", ("a", "b"), (Example("one text", "a"), Example("another", "b")) * 2)
    states = []
    # saved at step 3, in the second epoch: the epoch-start snapshot holds AdamW moments too,
    # as in any save after the first epoch
    learner.learn(task, checkpointing=Checkpointing(3, states.append))
    state = states[-1]
    with tempfile.TemporaryDirectory() as tmp:
        run = RunState(config={}, identity={}, current={"task": "probe", "before": None})
        times = []
        for i in range(repeats):
            state.tensors["param/1.1"] = state.tensors["param/1.1"] + 1  # a new file each time
            started = time.perf_counter()
            run.rng = runstate.encode_rng({"rng/cpu": torch.get_rng_state()})
            runstate.write(Path(tmp), run, state)
            times.append(time.perf_counter() - started)
        size = sum(p.stat().st_size for p in (Path(tmp) / runstate.STATE_DIR).iterdir())
    return {"median_ms": 1000 * statistics.median(times), "max_ms": 1000 * max(times), "bytes": size,
            "tensors": sum(t.numel() for t in state.tensors.values() if t.dtype == torch.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stream", nargs="?", type=Path, help="stream file (default: the bundled one)")
    parser.add_argument("--save-every", default="0,50", help="comma-separated values to compare")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    values = [int(v) for v in args.save_every.split(",")]

    sys.path.insert(0, str(ROOT / "src"))
    save = one_save(args.backbone, args.device)
    print(f"one save of the training state: median {save['median_ms']:.1f} ms, max "
          f"{save['max_ms']:.1f} ms, {save['bytes']:,} bytes on disk "
          f"({save['tensors']:,} float32 numbers)", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ctt-cost-") as tmp:
        for r in range(args.repeats):
            for k in values:
                result = one_run(args, k, Path(tmp) / f"r{r}-k{k}")
                runs.append(result)
                print(f"save_every={k:<4d} wall {result['wall_seconds']:7.1f}s  run "
                      f"{result['run_seconds']:7.1f}s  training {result['train_seconds']:7.1f}s  "
                      f"{result['intra_task_saves']:3d} saves within tasks  ACC {100 * result['acc']:.2f}",
                      flush=True)
    print("\nmedian over repeats:")
    base = None
    for k in values:
        wall = statistics.median(r["wall_seconds"] for r in runs if r["save_every"] == k)
        base = wall if base is None else base
        print(f"  save_every={k:<4d} {wall:7.1f}s wall  ({100 * (wall / base - 1):+.1f}% vs "
              f"save_every={values[0]})")
    if args.json:
        args.json.write_text(json.dumps({"one_save": save, "runs": runs, "args": vars(args)},
                                        indent=2, default=str))


if __name__ == "__main__":
    main()
