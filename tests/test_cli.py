import json

from typer.testing import CliRunner

from continual_transformer import ContinualLearner, load_stream
from continual_transformer.cli import app

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    return result


def test_run_writes_model_report_and_plot(tiny_backbone_dir, toy_stream, tmp_path):
    out = tmp_path / "run"
    args = ["run", str(toy_stream), "--out", str(out), "--epochs", "1", "--batch-size", "8",
            "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu"]
    result = _run(args)
    assert result.exit_code == 0, result.output
    assert "accuracy matrix so far" in result.output
    assert "ACC" in result.output and "BWT +0.00" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == ["kinds", "topics"]
    R = report["accuracy_matrix"]
    assert R[0][1] is None and R[1][0] == R[0][0]  # task 1 unchanged by task 2
    assert report["metrics"]["bwt"] == 0.0
    assert report["config"]["seed"] == 0 and report["versions"]["torch"]
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    assert (out / "model" / "manifest.json").is_file()

    # same seed, same numbers
    again = _run(args[:3] + [str(tmp_path / "run2")] + args[4:])
    assert again.exit_code == 0
    report2 = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert report2["accuracy_matrix"] == R

    # `ctt predict` returns what the saved model returns in memory
    texts = [e.text for e in load_stream(toy_stream)[0].test[:3]]
    result = _run(["predict", str(out / "model"), "--task", "kinds", "--json", "--device", "cpu", *texts])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    expected = ContinualLearner.load(out / "model", device="cpu").predict(texts, task="kinds")
    assert [line["label"] for line in lines] == [p.label for p in expected]
    assert [line["probabilities"] for line in lines] == [p.probabilities for p in expected]

    tasks = _run(["tasks", str(out / "model")])
    assert "kinds" in tasks.output and "topics" in tasks.output


def test_invalid_stream_fails_before_training(tmp_path, tiny_backbone_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "t", "split": "train", "text": "a", "label": "x"}\n{"task": "t"}\n')
    result = _run(["run", str(bad), "--out", str(tmp_path / "o"), "--backbone", str(tiny_backbone_dir)])
    assert result.exit_code == 2
    assert "bad.jsonl:2: missing field 'split'" in result.output.replace("\n", "")
    assert not (tmp_path / "o").exists()


def test_predict_unknown_task_is_a_clear_error(tiny_backbone_dir, toy_stream, tmp_path):
    out = tmp_path / "run"
    _run(["run", str(toy_stream), "--out", str(out), "--epochs", "1", "--backbone",
          str(tiny_backbone_dir), "--device", "cpu"])
    result = _run(["predict", str(out / "model"), "--task", "spam", "hello"])
    assert result.exit_code == 2
    assert "unknown task 'spam'; known: ['kinds', 'topics']" in result.output.replace("\n", "")
