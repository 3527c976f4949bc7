"""Choose k for the joint decision: task-free accuracy when a routed row's top-k tasks weigh in.

    ctt run STREAM --out /tmp/run                      # a learned model (DIR/model)
    python benchmarks/joint_routing.py /tmp/run/model [STREAM] [--k 1,2,3] [--validation]

For each k it predicts every test text of the stream without its task (`predict(joint_k=k)`;
k = 1 is the router alone) and prints the task-free ACC (mean over tasks of the share of a
task's texts routed to it and labelled right), the routing accuracy, the task-given ACC it is
compared with, and the seconds. With `--validation` it uses, instead of the test texts, the
validation split `ctt run` holds out of each task's training texts (15 %, as the lexical branch
chooses its mix on): the split to choose k on. Its heads are optimistic there: a task's lexical
branch, once its mix is chosen, is refitted on the fit and validation texts, so a head with a
branch has seen these texts (bundled stream: task-given ACC 98.3 on them, 79.04 on test); a
weight on the heads' certainty chosen there comes out too large (it asked for 4; on test, 1 and 2
were best).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from continual_transformer import ContinualLearner
from continual_transformer.data.split import held_out_positions
from continual_transformer.data.stream import default_stream_path, load_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("stream", nargs="?", type=Path, default=None)
    parser.add_argument("--k", default="1,2,3")
    parser.add_argument("--validation", action="store_true")
    args = parser.parse_args()
    learner = ContinualLearner.load(args.model, device="cpu", precision="fp32")
    tasks = [t for t in load_stream(args.stream or default_stream_path()) if t.name in learner.tasks]
    examples = {}
    for task in tasks:
        if args.validation:
            held = held_out_positions(task, 0.15, seed=0)
            examples[task.name] = [e for i, e in enumerate(task.train) if i in held]
        else:
            examples[task.name] = list(task.test)
    texts = [e.text for t in tasks for e in examples[t.name]]
    truth = [(t.name, e.label) for t in tasks for e in examples[t.name]]
    given = learner.predict(texts, task=[name for name, _ in truth])
    per_task = {t.name: [] for t in tasks}
    for (name, label), p in zip(truth, given):
        per_task[name].append(p.label == label)
    given_acc = sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
    print(f"{len(tasks)} tasks, {len(texts)} {'validation' if args.validation else 'test'} texts; "
          f"task-given ACC {100 * given_acc:.2f}")
    for k in [int(v) for v in args.k.split(",")]:
        start = time.perf_counter()
        predictions = learner.predict(texts, joint_k=k)
        seconds = time.perf_counter() - start
        per_task = {t.name: [] for t in tasks}
        routed = 0
        for (name, label), p in zip(truth, predictions):
            per_task[name].append(p.task == name and p.label == label)
            routed += p.task == name
        free = sum(sum(v) / len(v) for v in per_task.values()) / len(per_task)
        print(f"k={k}: task-free ACC {100 * free:.2f} (gap {100 * (given_acc - free):.2f})  "
              f"routing {100 * routed / len(texts):.2f} %  {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
