"""Peak memory of reading and checking a large CSV stream with `load_tasks`.

    python benchmarks/read_memory.py                 # a ~1 GB CSV (the default)
    python benchmarks/read_memory.py --size-mb 200   # quicker

Writes a CSV of generated texts (columns task, split, text, label; 4 tasks x 4 labels, one row
in five a test row) into a temporary folder, reads it with `load_tasks` in a fresh Python
process, and deletes it. The child reports its peak resident memory (VmHWM from
/proc/self/status) before and after reading, and the size of the texts it holds. The reading is
streamed (row by row), so the peak is the tasks (texts, Example objects, lists) plus a little,
never the file a second time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("news", "reviews", "tickets", "emails")
LABELS = ("alpha", "beta", "gamma", "delta")
POOL = 4096  # distinct texts; a row number makes every text unique


def vm_kib(field: str) -> int:
    """A `Vm*` figure of this process, in KiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_csv(path: Path, size_bytes: int, text_chars: int, seed: int) -> tuple[int, int]:
    """Rows of generated text until the file is `size_bytes` long; returns (rows, bytes)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(3000)]
    pool = []
    for _ in range(POOL):
        text = []
        while sum(len(w) + 1 for w in text) < text_chars:
            text.append(rng.choice(words))
        text[len(text) // 2] += ","  # some quoting, as real text needs
        pool.append(" ".join(text))
    rows = 0
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "split", "text", "label"])
        while handle.tell() < size_bytes:
            for _ in range(10_000):
                writer.writerow([TASKS[rows % len(TASKS)], "test" if rows % 5 == 4 else "train",
                                 f"{pool[rows % POOL]} {rows}",
                                 LABELS[(rows // len(TASKS)) % len(LABELS)]])
                rows += 1
    return rows, path.stat().st_size


def child(path: Path) -> None:
    """Read `path` and print the figures as one JSON line (runs in its own process)."""
    from continual_transformer.data.source import load_tasks

    before = vm_kib("VmHWM")
    start = time.perf_counter()
    tasks = load_tasks(path)
    seconds = time.perf_counter() - start
    peak, rss = vm_kib("VmHWM"), vm_kib("VmRSS")
    rows = text_bytes = 0
    for task in tasks:
        for example in (*task.train, *task.test):
            rows += 1
            text_bytes += sys.getsizeof(example.text)
    print(json.dumps({"rows": rows, "tasks": len(tasks), "seconds": round(seconds, 1),
                      "hwm_before_mib": round(before / 1024, 1), "hwm_after_mib": round(peak / 1024, 1),
                      "rss_after_mib": round(rss / 1024, 1),
                      "text_objects_mib": round(text_bytes / 2**20, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="CSV size in MiB (default 1024)")
    parser.add_argument("--text-chars", type=int, default=300, help="characters per text")
    parser.add_argument("--tmp-dir", type=Path, default=None, help="where the CSV is written")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    folder = Path(tempfile.mkdtemp(prefix="ctt-read-memory-", dir=args.tmp_dir))
    try:
        path = folder / "big.csv"
        start = time.perf_counter()
        rows, size = write_csv(path, args.size_mb * 2**20, args.text_chars, args.seed)
        print(f"wrote {path}: {size / 2**20:.0f} MiB, {rows:,} rows, in "
              f"{time.perf_counter() - start:.0f} s")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
        result = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            sys.exit(f"the reading process failed:\n{result.stderr}")
        figures = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    read = figures["hwm_after_mib"] - figures["hwm_before_mib"]
    texts = figures["text_objects_mib"]
    print(f"read and checked {figures['rows']:,} rows ({figures['tasks']} tasks) in "
          f"{figures['seconds']} s")
    print(f"peak RSS (VmHWM): {figures['hwm_before_mib']:.0f} MiB before reading (Python and "
          f"imports), {figures['hwm_after_mib']:.0f} MiB after: +{read:.0f} MiB for a "
          f"{size / 2**20:.0f} MiB file")
    print(f"of which the texts themselves (str objects) are {texts:.0f} MiB; the other "
          f"{read - texts:.0f} MiB ({(read - texts) * 2**20 / figures['rows']:.0f} bytes a row) are "
          "the Example objects and lists of the tasks, and the reading")
    print(json.dumps({"file_mib": round(size / 2**20, 1), **figures}))


if __name__ == "__main__":
    main()
