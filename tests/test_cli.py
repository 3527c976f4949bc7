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
    assert all(line["task_probability"] is None for line in lines)  # the task was given
    # in float32 when asked, as the model predicts in float32
    result = _run(["predict", str(out / "model"), "--json", "--device", "cpu", "--precision", "fp32", *texts])
    lines = [json.loads(line) for line in result.output.strip().splitlines()]
    expected = ContinualLearner.load(out / "model", device="cpu", precision="fp32").predict(texts)
    assert [(line["task"], line["probabilities"], line["task_probability"]) for line in lines] == [
        (p.task, p.probabilities, p.task_probability) for p in expected]
    wrong = _run(["predict", str(out / "model"), "--precision", "fp16", "hello"])
    assert wrong.exit_code == 2 and "precision must be one of ['auto', 'fp32', 'bf16'], got 'fp16'" in wrong.output

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


def _base(tiny_backbone_dir, stream, out):
    return ["run", str(stream), "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--backbone", str(tiny_backbone_dir), "--max-length", "32", "--device", "cpu",
            "--save-every", "2"]


def test_run_again_continues_and_resume_takes_the_saved_options(tiny_backbone_dir, toy_stream, tmp_path):
    from continual_transformer.io.runstate import read

    reference = tmp_path / "reference"
    assert _run(_base(tiny_backbone_dir, toy_stream, reference)).exit_code == 0

    out = tmp_path / "run"
    result = _run(_base(tiny_backbone_dir, toy_stream, out)[:-2] + ["--save-every", "0", "--seed", "3"])
    assert result.exit_code == 0
    # same --out, another seed: refused, naming the field
    result = _run(_base(tiny_backbone_dir, toy_stream, out))
    assert result.exit_code == 2
    message = result.output.replace("\n", "")
    assert "it was started with other settings; seed: saved 3, now 0;" in message
    assert "train.seed: saved 3, now 0" in message

    # `--resume --out DIR` alone runs with the saved options (here: all done already)
    result = _run(["run", "--resume", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    words = " ".join(result.output.split())
    assert "continuing the run in" in words and "2 task(s) already learned ['kinds', 'topics']" in words
    state, _ = read(out)
    assert state.sessions == 2 and state.config["seed"] == 3 and state.config["train"]["epochs"] == 1

    result = _run(["run", "--resume", "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 2
    assert "no saved run to resume" in result.output


def test_a_task_that_cannot_be_learned_is_a_clear_error(tiny_backbone_dir, toy_stream, tmp_path):
    # A learning rate this high overflows the scale vectors: every step after the first is
    # non-finite, so the guard restores and halves the rate until it gives up.
    out = tmp_path / "run"
    result = _run(_base(tiny_backbone_dir, toy_stream, out) + ["--lr", "1e30", "--head-lr", "1e30"])
    assert result.exit_code == 2
    message = result.output.replace("\n", "")
    assert "loss or gradients not finite in 5 steps in a row" in message
    assert "after 3 restore(s) with the learning rate lowered to 0.125x" in message
    assert f"The model in {out / 'model'} keeps the 0 task(s) learned before: []" in message
    assert not (out / "model").exists()
