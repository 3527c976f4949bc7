"""One task learned by 2 data-parallel processes (torchrun) against 1 process, on the real MiniLM.

    python benchmarks/distributed.py                     # bible_genre, 600 texts, 2 epochs, auto and fp32
    python benchmarks/distributed.py --task sotu_era --max-train 300 --precisions fp32

For each precision it writes the task (from the bundled stream) to a one-task stream, runs
`ctt run` on it in one process and under `torchrun --nproc-per-node 2` (same seed, same global
batch; gloo on the CPU), and prints from the two checkpoints and reports: the largest absolute
difference of the scale vectors, the head and the lexical branch, whether the router's
statistics are equal bit for bit, and each run's accuracy (task given and routed) and training
seconds. Every process runs one thread (OMP_NUM_THREADS=1, as torchrun sets it), so a 2-core
machine gives each process a core of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def one_task_stream(name: str, path: Path) -> Path:
    from continual_transformer import default_stream_path, load_stream

    tasks = {t.name: t for t in load_stream(default_stream_path())}
    if name not in tasks:
        raise SystemExit(f"unknown task {name!r}; known: {sorted(tasks)}")
    task = tasks[name]
    rows = [{"task": name, "split": split, "text": e.text, "label": e.label}
            for split, examples in (("train", task.train), ("test", task.test)) for e in examples]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ctt_run(processes: int, stream: Path, out: Path, args, precision: str) -> None:
    options = ["run", str(stream), "--out", str(out), "--device", "cpu", "--seed", str(args.seed),
               "--epochs", str(args.epochs), "--max-train", str(args.max_train),
               "--batch-size", str(args.batch_size), "--precision", precision,
               "--backbone", args.backbone]
    if processes == 1:
        command = [sys.executable, "-m", "continual_transformer", *options]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc-per-node", str(processes), "--master-addr", "127.0.0.1",
                   "--master-port", str(free_port()), "-m", "continual_transformer", *options]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stdout[-4000:]}")


def compare(one: Path, two: Path) -> dict:
    from continual_transformer.io import checkpoint

    a, b = checkpoint.read(one / "model"), checkpoint.read(two / "model")
    (ta,), (tb,) = a.tasks, b.tasks
    if ta.tensors.keys() != tb.tensors.keys():
        raise SystemExit(f"the two models hold different tensors: {sorted(ta.tensors.keys() ^ tb.tensors.keys())}")

    def largest(prefix: str) -> float | None:
        keys = [k for k in ta.tensors if k.startswith(prefix) and ta.tensors[k].is_floating_point()]
        if not keys:
            return None
        return max((ta.tensors[k].double() - tb.tensors[k].double()).abs().max().item() for k in keys)

    router = all(torch.equal(ta.tensors[k], tb.tensors[k]) for k in ta.tensors if k.startswith("router.")) \
        and all(torch.equal(v, b.shared_tensors[k]) for k, v in a.shared_tensors.items())
    scales = [ta.tensors[k] for k in ta.tensors if k.startswith("adapter.")]
    figures = {"scales": largest("adapter."), "head": largest("head."), "lexical": largest("lexical."),
               "router_bitwise": router,
               "scale_spread": max((s - 1).abs().max().item() for s in scales)}
    for name, path in (("one", one), ("two", two)):
        report = json.loads((path / "report.json").read_text())
        row = report["per_task"][0]
        figures[name] = {"acc": 100 * report["accuracy_matrix"][-1][0],
                         "task_free": 100 * report["task_free_accuracy_matrix"][-1][0],
                         "train_s": row["train_seconds"], "steps": row["train_stats"]["steps"],
                         "mix": (row["train_stats"].get("lexical") or {}).get("mix")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="bible_genre")
    parser.add_argument("--max-train", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["auto", "fp32"])
    parser.add_argument("--backbone", default="default", help="'default' (MiniLM-L6) or a model folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ctt-distributed-") as tmp:
        tmp = Path(tmp)
        stream = one_task_stream(args.task, tmp / f"{args.task}.jsonl")
        print(f"task {args.task}: at most {args.max_train} training texts, {args.epochs} epochs, "
              f"global batch {args.batch_size}, seed {args.seed}; 1 process vs torchrun 2 processes (gloo)")
        for precision in args.precisions:
            one, two = tmp / f"one-{precision}", tmp / f"two-{precision}"
            ctt_run(1, stream, one, args, precision)
            ctt_run(2, stream, two, args, precision)
            f = compare(one, two)
            print(f"\nprecision {precision}: {f['one']['steps']} steps")
            print(f"  largest |difference|: scales {f['scales']:.3g} (scales lie within "
                  f"{f['scale_spread']:.3g} of 1), head {f['head']:.3g}, lexical branch "
                  f"{'none' if f['lexical'] is None else format(f['lexical'], '.3g')}; router "
                  f"statistics {'equal bit for bit' if f['router_bitwise'] else 'DIFFERENT'}")
            for name, label in (("one", "1 process"), ("two", "2 processes")):
                r = f[name]
                print(f"  {label:12s} accuracy {r['acc']:.2f} % (task given), {r['task_free']:.2f} % "
                      f"(routed); lexical mix {r['mix']}; train {r['train_s']:.1f} s")


if __name__ == "__main__":
    main()
