"""`--track mlflow | tensorboard`: a run's settings, per-task metrics as tasks finish, the final
metrics and the report's files land in a real local store."""

import json

import pytest
from typer.testing import CliRunner

from continual_transformer.cli import app
from continual_transformer.experiment.tracking import flatten

runner = CliRunner()


def _args(toy_stream, tiny_backbone_dir, out):
    return ["run", str(toy_stream), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu"]


def test_run_tracked_in_mlflow(toy_stream, tiny_backbone_dir, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "run"
    result = runner.invoke(app, _args(toy_stream, tiny_backbone_dir, out)
                           + ["--track", "mlflow", "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("continual-tiny-transformer")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["method"] == "ia3" and run.data.params["train.epochs"] == "1"
    assert run.data.metrics["acc"] == pytest.approx(report["metrics"]["acc"])
    assert run.data.metrics["task_free_acc"] == pytest.approx(report["metrics"]["task_free_acc"])
    # per task, as tasks finished: R[i, j] at step i
    history = client.get_metric_history(run.info.run_id, "acc/kinds")
    R = report["accuracy_matrix"]
    assert [(m.step, m.value) for m in history] == [(0, pytest.approx(R[0][0])),
                                                    (1, pytest.approx(R[1][0]))]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "acc/topics")] == [1]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "accuracy_matrix.png", "task_free_accuracy_matrix.png"} <= artifacts


def test_bench_tracked_in_mlflow_one_child_run_per_method(toy_stream, tiny_backbone_dir, tmp_path,
                                                          monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", str(toy_stream), "--methods", "ia3,analytic", "--epochs", "1", "--out", str(out),
        "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu",
        "--in-process", "--track", "mlflow", "--tracking-uri", uri], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    bench = json.loads((out / "bench.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("continual-tiny-transformer")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "bench"]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == ["analytic", "ia3"]
    for row in bench["methods"]:
        child = children[row["method"]]
        assert child.info.status == "FINISHED"
        assert child.data.metrics["acc"] == pytest.approx(row["acc"])
        assert len(client.get_metric_history(child.info.run_id, "acc_seen")) == 2  # one per task
        assert "report.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"bench.json", "bench.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["methods"] == '["ia3", "analytic"]'


def test_run_tracked_in_tensorboard(toy_stream, tiny_backbone_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    result = runner.invoke(app, _args(toy_stream, tiny_backbone_dir, out) + ["--track", "tensorboard"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("acc/kinds")] == [
        (0, pytest.approx(report["accuracy_matrix"][0][0])),
        (1, pytest.approx(report["accuracy_matrix"][1][0]))]
    assert events.Scalars("acc")[-1].value == pytest.approx(report["metrics"]["acc"])
    assert "accuracy_matrix" in events.Tags()["images"]


def test_an_unknown_tracker_is_refused_before_training(toy_stream, tiny_backbone_dir, tmp_path):
    result = runner.invoke(app, _args(toy_stream, tiny_backbone_dir, tmp_path / "o") + ["--track", "wandb"])
    assert result.exit_code == 2
    assert "unknown tracker 'wandb'; known: ['mlflow', 'tensorboard']" in result.output
    assert not (tmp_path / "o" / "report.json").exists()


def test_a_missing_extra_names_the_install_command():
    from continual_transformer.extras import MissingExtra, import_extra

    with pytest.raises(MissingExtra, match=r"pip install 'continual-tiny-transformer\[mlflow\]'"):
        import_extra("mlflow_is_not_this", "mlflow")


def test_settings_are_flattened_for_trackers():
    assert flatten({"method": "ia3", "train": {"lr": 0.03, "epochs": 3}, "router": {}}) == {
        "method": "ia3", "train.lr": 0.03, "train.epochs": 3, "router": {}}
