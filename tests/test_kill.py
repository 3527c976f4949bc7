"""SIGKILL `ctt run` at random and chosen moments; it must resume to the uninterrupted result.

The full benchmark (50 trials, rollbacks and prunes among them) is `python benchmarks/kill_test.py`; CI runs its
quick mode, two trials at a time (each trial has its own processes and directories), its
children forked from two fork servers that imported the library once.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
    results = tmp_path / "kill.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kill_test.py"), "--quick", "--jobs", "2",
                           "--json", str(results)], env=env, capture_output=True, text=True)
    assert results.is_file(), done.stdout + done.stderr
    summary = json.loads(results.read_text())
    failed = [r for r in summary["results"] if not r["ok"]]
    assert not failed, done.stdout
    assert summary["trials"] == 7 and summary["matched"] == 7
    kinds = {r["kind"] for r in summary["results"]}
    assert {"random", "saver", "targeted:train", "targeted:save-model/torn",
            "targeted:save-state/after", "rollback", "prune"} <= kinds
    # every targeted trial was really killed where it was aimed
    for r in summary["results"]:
        if r["kind"].startswith("targeted:"):
            assert r["phases"] == [r["kind"].split(":")[1].split("/")[0]], r
    assert done.returncode == 0
