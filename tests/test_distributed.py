"""Data-parallel learning of one task (training/distributed.py): real processes on 127.0.0.1,
launched as torchrun launches them, against one process on the same stream, seed and batches.

Tolerance: the 2-process scales and heads must be within TOLERANCE (absolute) of the
1-process ones. The processes sum the gradients of their halves of each batch where one
process sums the whole batch's, and pad each half to its own longest text: the same numbers,
added in another order (measured on this test's run: at most 2.4e-7 after 16 steps a task). Everything computed
once over the training texts (the stored trunk output, the router's statistics) is equal bit
for bit, and so are the accuracies.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import continual_transformer
from continual_transformer.io import checkpoint
from continual_transformer.training.distributed import DataParallel, launched

TOLERANCE = 1e-5
HERE = Path(__file__).parent
SRC = Path(continual_transformer.__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1"}  # as torchrun sets it: the same kernels in every process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_args(stream, backbone, *extra) -> list[str]:
    # 40 texts a task in batches of 5 (two uneven shares of 2 and 3 rows), 2 epochs: 16 steps.
    return [str(stream), "--backbone", str(backbone), "--max-length", "32", "--device", "cpu",
            "--epochs", "2", "--batch-size", "5", "--precision", "fp32", "--adapt-layers", "1",
            "--max-train", "40", *extra]


def _torchrun(out: Path, logs: Path, args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
               "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), "--log-dir", str(logs), "--redirects", "3",
               str(HERE / "data" / "run_per_rank.py"), str(out), *args]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + "".join(
        p.read_text() for p in sorted(logs.rglob("*.log")))


def _one_process(out: Path, args: list[str]) -> str:
    command = [sys.executable, "-m", "continual_transformer", "run", *args, "--out", str(out)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def stream(tmp_path):
    from conftest import toy_rows, write_jsonl

    return write_jsonl(tmp_path / "toy.jsonl", toy_rows(n_train=40))


def test_two_processes_learn_what_one_learns_and_only_rank_0_writes(tiny_backbone_dir, stream, tmp_path):
    args = _run_args(stream, tiny_backbone_dir)
    _torchrun(tmp_path / "two", tmp_path / "logs", args)
    shown = " ".join(_one_process(tmp_path / "one", args).split())  # the console wraps long paths
    assert "2 tasks" in shown and "data-parallel" not in shown

    rank0, rank1 = tmp_path / "two" / "rank0", tmp_path / "two" / "rank1"
    assert not rank1.exists()  # rank 1 learned every task (it took part in every step) but wrote nothing
    assert sorted(p.name for p in rank0.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    (log1,) = (tmp_path / "logs").rglob("1/stdout.log")
    (log0,) = (tmp_path / "logs").rglob("0/stdout.log")
    assert log1.read_text() == ""  # and said nothing
    assert "2 processes, data-parallel" in " ".join(log0.read_text().split())

    two, one = checkpoint.read(rank0 / "model"), checkpoint.read(tmp_path / "one" / "model")
    assert [t.record.name for t in two.tasks] == [t.record.name for t in one.tasks] == ["kinds", "topics"]
    assert two.tasks[0].record.stats["steps"] == 16
    for a, b in zip(two.tasks, one.tasks):
        assert a.tensors.keys() == b.tensors.keys()
        for key, value in a.tensors.items():
            if key.startswith("router."):  # summed over every training text: bit for bit
                assert torch.equal(value, b.tensors[key]), key
            else:
                assert key.startswith(("adapter.", "head.")), key
                difference = (value - b.tensors[key]).abs().max().item()
                assert difference <= TOLERANCE, (key, difference)
        changed = (a.tensors["head.weight"] - a.tensors["head.weight"].mean()).abs().max()
        assert changed > 100 * TOLERANCE  # a head far from constant: the comparison means something
    assert two.shared_tensors.keys() == one.shared_tensors.keys()
    assert all(torch.equal(v, one.shared_tensors[k]) for k, v in two.shared_tensors.items())
    report_two = json.loads((rank0 / "report.json").read_text())
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report_two["accuracy_matrix"] == report_one["accuracy_matrix"]
    assert report_two["task_free_accuracy_matrix"] == report_one["task_free_accuracy_matrix"]


def test_analytic_statistics_of_two_processes_equal_those_of_one(tiny_backbone_dir, stream, tmp_path):
    args = [str(stream), "--backbone", str(tiny_backbone_dir), "--max-length", "32",
            "--device", "cpu", "--method", "analytic", "--max-train", "40"]
    _torchrun(tmp_path / "two", tmp_path / "logs", args)
    _one_process(tmp_path / "one", args)
    assert not (tmp_path / "two" / "rank1").exists()
    two = checkpoint.read(tmp_path / "two" / "rank0" / "model")
    one = checkpoint.read(tmp_path / "one" / "model")
    for a, b in zip(two.tasks, one.tasks):
        assert all(torch.equal(v, b.tensors[k]) for k, v in a.tensors.items())
    assert all(torch.equal(v, one.shared_tensors[k]) for k, v in two.shared_tensors.items())


def test_a_batch_is_shared_in_contiguous_runs_differing_by_at_most_one_row():
    def shares(batch, world_size):
        return [DataParallel(r, world_size, torch.device("cpu")).rows(batch) for r in range(world_size)]

    assert shares(list(range(10, 17)), 2) == [[10, 11, 12], [13, 14, 15, 16]]
    assert shares(list(range(7)), 3) == [[0, 1], [2, 3], [4, 5, 6]]
    assert shares([4, 9], 3) == [[], [4], [9]]  # fewer rows than processes: one adds nothing


def test_the_launch_is_read_from_torchruns_environment():
    assert launched({}) is None
    assert launched({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
    with pytest.raises(ValueError, match=r"\['RANK', 'WORLD_SIZE'\] set but \['LOCAL_RANK'\] not"):
        launched({"RANK": "1", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2, LOCAL_RANK=0: expected 0 <= RANK < WORLD_SIZE"):
        launched({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_methods_that_cannot_share_a_batch_are_refused(tiny_config, toy_stream, tmp_path):
    import torch.distributed as dist

    from continual_transformer import ContinualLearner, TrainConfig, load_stream
    from continual_transformer.methods.ia3 import IA3Method

    task = load_stream(toy_stream)[0]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        replay = ContinualLearner(tiny_config, method="replay", device="cpu")
        with pytest.raises(ValueError, match="method 'replay' cannot learn data-parallel"):
            replay.learn(task)
        searched = ContinualLearner(tiny_config, method=IA3Method(TrainConfig(), search=2), device="cpu")
        with pytest.raises(ValueError, match="--search stops its study on a time budget"):
            searched.learn(task)
        assert not replay.tasks and not searched.tasks
    finally:
        dist.destroy_process_group()


def test_only_run_is_data_parallel(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from continual_transformer.cli import app

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["tasks", str(tmp_path)])
    assert result.exit_code == 2
    assert "`ctt tasks` runs in one process; of the commands only `ctt run` learns data-parallel" in result.output
