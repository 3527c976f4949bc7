"""`ctt bench` and `run_bench`: every method on the same stream, one table."""

import json

import pytest
from typer.testing import CliRunner

from continual_transformer.experiment.bench import DEFAULT_METHODS, BenchConfig, run_bench
from continual_transformer.cli import app


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def test_bench_in_process_compares_every_method(tiny_backbone_dir, toy_stream, tmp_path):
    config = BenchConfig(stream=str(toy_stream), epochs=1, backbone=str(tiny_backbone_dir),
                         max_length=32, device="cpu", isolate=False)
    events = Recorder()
    bench = run_bench(config, tmp_path / "bench", events)
    rows = {r["method"]: r for r in bench["methods"]}
    assert list(rows) == list(DEFAULT_METHODS)
    assert rows["ia3"]["bwt"] == 0.0 and rows["ia3"]["forgetting"] == 0.0
    assert rows["tfidf"]["bwt"] == 0.0 and rows["tfidf"]["task_free_acc"] is None
    assert rows["joint"]["bwt"] is None and rows["joint"]["first_task_accuracy"][0] is None
    assert rows["finetune"]["shared_numbers"] == 2 * (32 + 32 + 64)
    assert rows["ewc"]["shared_numbers"] == 3 * 2 * (32 + 32 + 64)  # entry, Fisher, anchor
    assert rows["ia3"]["adapter_parameters_per_task"] == 2 * (32 + 32 + 64)
    assert rows["finetune"]["adapter_parameters_per_task"] == 0
    assert all(r["peak_rss_mb"] is None for r in rows.values())  # one process: not per method
    assert all(0 <= r["acc"] <= 1 and r["train_seconds"] >= 0 for r in rows.values())
    # progress arrived for every method, task and step
    kinds = [c[0] for c in events.calls]
    assert kinds.count("method_started") == 8 and kinds.count("method_finished") == 8
    assert kinds.count("task_finished") == 7 * 2 + 1 and "train_step" in kinds
    out = tmp_path / "bench"
    saved = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in saved["methods"]] == list(DEFAULT_METHODS)
    table = (out / "bench.md").read_text()
    assert "| method | ACC % | BWT |" in table and "| joint |" in table and "n/a" in table
    for name in ("bench_final_accuracy.png", "bench_accuracy_matrices.png", "bench_first_task.png"):
        assert (out / name).stat().st_size > 5000, name
    assert (out / "ewc" / "model" / "manifest.json").is_file()

    # resume: nothing runs again, the same table comes back
    events = Recorder()
    again = run_bench(config, out, events, resume=True)
    assert [c[0] for c in events.calls].count("train_step") == 0
    assert [r["acc"] for r in again["methods"]] == [r["acc"] for r in bench["methods"]]
    with pytest.raises(ValueError, match="that run used other settings \\(seed\\)"):
        run_bench(BenchConfig(**{**config.to_dict(), "methods": DEFAULT_METHODS, "seed": 1}), out,
                  resume=True)


def test_bench_config_is_validated():
    with pytest.raises(ValueError, match="unknown method\\(s\\) \\['nope'\\]"):
        BenchConfig(methods=("ia3", "nope"))
    with pytest.raises(ValueError, match="methods must not repeat"):
        BenchConfig(methods=("ia3", "ia3"))
    with pytest.raises(ValueError, match="epochs must be >= 1, got 0"):
        BenchConfig(epochs=0)
    with pytest.raises(ValueError, match="max_test must be >= 1, got 0"):
        BenchConfig(max_test=0)


def test_cli_bench_runs_each_method_in_its_own_process(tiny_backbone_dir, toy_stream, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", str(toy_stream), "--methods", "ia3,finetune", "--epochs", "1", "--out", str(out),
        "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu", "--max-test", "6"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    assert bench["config"]["max_test"] == 6 and "at most 6 test examples per task" in (out / "bench.md").read_text()
    routed = json.loads((out / "ia3" / "report.json").read_text())["routing"]["confusion"]
    assert [sum(row) for row in routed] == [6, 6]  # of each task's 8 test texts, 6 were scored
    assert "method 1/2: ia3" in result.output and "method 2/2: finetune" in result.output
    assert "finetune: ACC" in result.output and "peak RSS" in result.output
    rows = json.loads((out / "bench.json").read_text())["methods"]
    assert all(r["peak_rss_mb"] > 50 for r in rows)  # measured in the method's own process
    bad = CliRunner().invoke(app, ["bench", str(toy_stream), "--methods", "ia3,sgd"])
    assert bad.exit_code == 2 and "unknown method(s) ['sgd']" in bad.output


def test_bench_over_seeds_gives_each_method_its_spread_and_paired_differences(
        tiny_backbone_dir, toy_stream, tmp_path):
    from continual_transformer.experiment.bench import run_seeds

    config = BenchConfig(methods=("ia3", "finetune"), stream=str(toy_stream), epochs=1,
                         backbone=str(tiny_backbone_dir), max_length=32, device="cpu",
                         isolate=False)
    events = Recorder()
    summary = run_seeds(config, [0, 3], tmp_path / "b", events)
    out = tmp_path / "b"
    per_seed = {s: {r["method"]: r for r in json.loads((out / f"seed-{s}" / "bench.json").read_text())["methods"]}
                for s in (0, 3)}
    assert [c[1:] for c in events.calls if c[0] == "seed_started"] == [(0, 2, 0), (1, 2, 3)]
    # each seed's bench is a whole bench with that seed
    assert json.loads((out / "seed-3" / "bench.json").read_text())["config"]["seed"] == 3
    assert per_seed[3]["ia3"]["hyperparameters"]["train"]["seed"] == 3
    rows = {r["method"]: r for r in summary["methods"]}
    accs = [per_seed[s]["finetune"]["acc"] for s in (0, 3)]
    assert rows["finetune"]["acc"]["values"] == accs
    assert rows["finetune"]["acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert rows["finetune"]["acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
    assert rows["finetune"]["acc_minus_first"]["values"] == pytest.approx(
        [per_seed[s]["finetune"]["acc"] - per_seed[s]["ia3"]["acc"] for s in (0, 3)])
    assert rows["ia3"]["acc_minus_first"]["values"] == [0.0, 0.0]
    assert len(rows["ia3"]["final_accuracy"]) == len(summary["tasks"])
    table = (out / "bench_seeds.md").read_text()
    assert "| method | ACC % |" in table and "ACC - ia3" in table and " ± " in table
    assert json.loads((out / "bench_seeds.json").read_text())["seeds"] == [0, 3]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        run_seeds(config, [1], tmp_path / "c")
    with pytest.raises(ValueError, match="must not repeat"):
        run_seeds(config, [1, 1], tmp_path / "c")


def test_cli_bench_seeds_prints_the_spread_and_refuses_what_it_cannot_do(
        tiny_backbone_dir, toy_stream, tmp_path):
    runner = CliRunner()
    out = tmp_path / "b"
    result = runner.invoke(app, [
        "bench", str(toy_stream), "--methods", "ia3,finetune", "--epochs", "1", "--out", str(out),
        "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu",
        "--in-process", "--seeds", "0,1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "seed 1 (2/2)" in result.output and "bench over seeds 0, 1" in result.output
    assert (out / "seed-0" / "bench.md").is_file() and (out / "bench_seeds.md").is_file()
    for args, message in ((["--seeds", "0,1", "--seed", "2"], "give --seed or --seeds, not both"),
                          (["--seeds", "0,x"], "--seeds must be comma-separated whole numbers"),
                          (["--seeds", "4"], "at least 2 different seeds"),
                          (["--seeds", "0,1", "--track", "mlflow"], "with --seed N --track instead")):
        result = runner.invoke(app, ["bench", str(toy_stream), "--out", str(tmp_path / "x"), *args])
        assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
