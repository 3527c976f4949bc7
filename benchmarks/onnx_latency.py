"""CPU latency of a model's logits: PyTorch (`ContinualLearner.logits`) against onnxruntime
running the graph `ctt export --format onnx` writes.

    python benchmarks/onnx_latency.py                       # learns 2 small tasks on MiniLM first
    python benchmarks/onnx_latency.py --model runs/latest/model --runs 30

Without `--model` it learns the bundled stream's first two tasks (`--max-train` examples each,
`--epochs`) on the default backbone. It exports every task to ONNX, checks that both sides give
the same logits, then times batches of 1, 8 and 64 texts that mix the tasks (row i under task
i mod N). Both sides start from texts (tokenising is timed too) and use the same number of
threads; they take turns in alternating blocks of calls, so that a change in the machine's load
hits both. It prints the median and the ratio PyTorch / onnxruntime per batch size, and the
largest logit difference between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROUNDS = 4  # alternating blocks per side and batch size


def learned_model(args):
    from continual_transformer import (ContinualLearner, TrainConfig, default_stream_path,
                                       load_stream)

    if args.model:
        return ContinualLearner.load(args.model, device="cpu"), None
    tasks = [t.subsample_train(args.max_train, seed=0)
             for t in load_stream(default_stream_path())[:2]]
    learner = ContinualLearner(train=TrainConfig(epochs=args.epochs), device="cpu")
    for task in tasks:
        learner.learn(task)
    return learner, tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a saved model directory (default: learn one)")
    parser.add_argument("--max-train", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per side and batch size")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--threads", type=int, help="threads per runtime (default: torch's)")
    args = parser.parse_args()

    import numpy as np
    import onnxruntime
    import torch

    from continual_transformer import default_stream_path, load_stream
    from continual_transformer.io.export import export_onnx

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    learner, tasks = learned_model(args)
    names = list(learner.tasks)
    print(f"model: {names} on {learner.backbone.ref.name} ({learner.backbone.num_layers} layers, "
          f"scales in the top {learner.model.top_layers}); "
          f"ready in {time.perf_counter() - start:.0f}s")
    # Texts from the test splits of the model's tasks (a saved model's tasks must be in the
    # bundled stream).
    stream = {t.name: t for t in (tasks or load_stream(default_stream_path()))}
    missing = [n for n in names if n not in stream]
    if missing:
        raise SystemExit(f"tasks {missing} are not in the bundled stream; no test texts for them")
    pool = [e.text for name in names for e in stream[name].test]

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        out = export_onnx(learner.model, learner.method, names, Path(folder) / "onnx")
        print(f"exported in {time.perf_counter() - start:.1f}s: model.onnx "
              f"{(out / 'model.onnx').stat().st_size / 2**20:.1f} MiB")
        info = json.loads((out / "tasks.json").read_text())
        threads = torch.get_num_threads()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(out / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        tokenizer = learner.backbone.tokenizer
        index = {t["name"]: i for i, t in enumerate(info["tasks"])}

        def ort_logits(texts, row_tasks):
            batch = tokenizer(texts, padding=True, truncation=True, max_length=info["max_length"],
                              return_tensors="np")
            return session.run(None, {
                "input_ids": batch["input_ids"].astype(np.int64),
                "attention_mask": batch["attention_mask"].astype(np.int64),
                "task": np.array([index[t] for t in row_tasks], dtype=np.int64)})[0]

        def torch_logits(texts, row_tasks):  # float32, as the exported graph computes
            return learner.logits(texts, row_tasks, precision="fp32")

        per_block = -(-args.runs // ROUNDS)
        print(f"threads: torch {threads}, onnxruntime {threads}; {ROUNDS * per_block} timed calls "
              f"each in {ROUNDS} alternating blocks (each after a warm-up call), median")
        print(f"{'batch':>5}  {'pytorch ms':>10}  {'onnxruntime ms':>14}  {'ratio':>6}  "
              f"{'max |diff|':>10}")
        for size in (int(b) for b in args.batches.split(",")):
            # Texts spread over the pool; row i under task i mod N.
            texts = [pool[(i * 7919) % len(pool)] for i in range(size)]
            row_tasks = [names[i % len(names)] for i in range(size)]
            ours = torch_logits(texts, row_tasks)
            theirs = ort_logits(texts, row_tasks)
            difference = max(float(np.abs(theirs[i, : len(o)] - o.numpy()).max())
                             for i, o in enumerate(ours))
            times = {"torch": [], "ort": []}
            sides = [("torch", torch_logits), ("ort", ort_logits)]
            for block in range(ROUNDS):
                # Blocks of calls, not single calls in turn: a runtime's worker threads may spin
                # for a while after a call (onnxruntime's do by default) and slow the other's.
                for side, call in sides if block % 2 == 0 else sides[::-1]:
                    call(texts, row_tasks)  # warm-up after the other side's block
                    for _ in range(per_block):
                        begin = time.perf_counter()
                        call(texts, row_tasks)
                        times[side].append(time.perf_counter() - begin)
            pt, ort = (1000 * statistics.median(times[s]) for s in ("torch", "ort"))
            print(f"{size:>5}  {pt:>10.1f}  {ort:>14.1f}  {pt / ort:>5.2f}x  {difference:>10.2e}")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min) at the end: {load}")


if __name__ == "__main__":
    main()
