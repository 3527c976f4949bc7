"""Per-task search: an Optuna study on the validation split; the chosen trial is what is kept."""

import json

import pytest
import torch
from typer.testing import CliRunner

from continual_transformer import ContinualLearner
from continual_transformer.cli import app
from continual_transformer.config import TrainConfig
from continual_transformer.methods import make_method
from continual_transformer.training.search import SearchConfig, run_search

from conftest import toy_rows, write_jsonl
from test_lexical import _word_task


def _searching_learner(tiny_config, trials: int, **options):
    torch.manual_seed(0)
    method = make_method("ia3", {"train": TrainConfig(epochs=1, precision="fp32").to_dict(),
                                 "search": trials, **options})
    return ContinualLearner(tiny_config, method=method, device="cpu")


def test_search_keeps_the_best_trial_and_reports_every_trial(tiny_config, tmp_path):
    learner = _searching_learner(tiny_config, trials=6)
    task = _word_task("colours", 0)
    record = learner.learn(task)
    search = record.stats["search"]
    assert search["trials"] == 6 and len(search["history"]) == 6
    assert search["validation_texts"] == 36
    complete = [t for t in search["history"] if t["state"] == "complete"]
    assert search["best_score"] == max(t["score"] for t in complete)
    best = next(t for t in complete if t["trial"] == search["best_trial"])
    assert best["params"] == search["best"]
    assert best["params"]["epochs"] == 1 and 1 <= best["params"]["top_layers"] <= 2
    # What is kept is that trial's model: its validation score is the one recorded.
    assert record.stats["lexical"]["val_accuracy"] == search["best_score"]
    # Only the best trial's task is left: one adapter entry, one head, one branch.
    assert learner.model.adapter.entries() == ["colours"] and list(learner.model.heads.heads) == ["colours"]
    assert learner.evaluate(task) >= 0.9

    # Saved with the task, and shown by `ctt tasks`.
    learner.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["tasks"][0]["stats"]["search"]["best"] == search["best"]
    shown = CliRunner().invoke(app, ["tasks", str(tmp_path / "m")])
    assert shown.exit_code == 0, shown.output
    assert "trials)" in shown.output and "layers" in shown.output  # the narrow table wraps cells
    loaded = ContinualLearner.load(tmp_path / "m")
    texts = [e.text for e in task.test]
    assert [p.label for p in loaded.predict(texts, task="colours")] == \
        [p.label for p in learner.predict(texts, task="colours")]


def test_search_is_seeded(tiny_config):
    first = _searching_learner(tiny_config, trials=4).learn(_word_task("colours", 0)).stats["search"]
    again = _searching_learner(tiny_config, trials=4).learn(_word_task("colours", 0)).stats["search"]
    assert [t["params"] for t in first["history"]] == [t["params"] for t in again["history"]]
    assert first["best"] == again["best"]


def test_trained_layers_are_the_top_ones_and_the_rest_stay_at_one(tiny_config):
    learner = _searching_learner(tiny_config, trials=1)
    task = _word_task("colours", 0)
    record = learner.learn(task)
    top = record.stats["search"]["best"]["top_layers"]
    state = learner.model.adapter.state_of("colours")
    untouched = [name for name, v in state.items() if torch.equal(v, torch.ones_like(v))]
    assert len(untouched) == (2 - top) * 3  # 3 scaled modules per layer, 2 adapted layers


def test_successive_halving_stops_most_trials_early():
    calls = []

    def space(trial):
        return {"x": trial.suggest_float("x", 0.0, 1.0)}

    def evaluate(params, report):
        for epoch in range(1, 4):
            calls.append(epoch)
            report(epoch, params["x"])
        return params["x"]

    result = run_search(SearchConfig(trials=12, seed=0), space, evaluate)
    pruned = [t for t in result.trials if t["state"] == "pruned"]
    assert pruned and all(t["score"] is None for t in pruned)
    assert result.best_score == max(t["score"] for t in result.trials if t["state"] == "complete")
    assert len(calls) < 12 * 3


@pytest.mark.parametrize("options, message", [
    ({"search": 0, "search_budget": 10.0}, "search_budget needs search"),
    ({"search": -1}, "search trials must be a whole number >= 1"),
    ({"search": 3, "search_budget": 0}, "search budget must be > 0 seconds"),
])
def test_bad_search_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        make_method("ia3", options)


def test_cli_refuses_search_for_other_methods(tmp_path, tiny_backbone_dir):
    stream = write_jsonl(tmp_path / "s.jsonl", toy_rows())
    result = CliRunner().invoke(app, ["run", str(stream), "--method", "ewc", "--search", "3",
                                      "--backbone", str(tiny_backbone_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code != 0
    assert "--search applies to method 'ia3', not 'ewc'" in result.output


def test_the_first_trial_runs_the_given_configuration_and_sets_the_budget(monkeypatch):
    import time

    from continual_transformer.training import search as search_module

    monkeypatch.setattr(search_module, "MIN_DEFAULT_BUDGET", 0.0)  # seconds, not minutes, here

    def space(trial):
        return {"x": trial.suggest_float("x", 0.0, 1.0)}

    def evaluate(params, report):
        for point in range(1, 4):
            time.sleep(0.05)
            if report is not None:  # the given first trial reports nothing
                report(point, params["x"])
        return params["x"]

    result = run_search(SearchConfig(trials=200, seed=0), space, evaluate, first={"x": 0.25})
    assert result.trials[0]["params"] == {"x": 0.25} and result.trials[0]["state"] == "complete"
    first = result.trials[0]["seconds"]
    # Without a budget in seconds the study stops at 4 first trials (a trial running then stops
    # at its next report: one more trial's time at most, with slack for a busy machine).
    assert len(result.trials) < 200
    assert result.seconds < 5 * first + 0.5, (result.seconds, first)
    assert result.summary()["stopped"] <= 1
    # The defaults are kept when nothing beats them.
    kept = run_search(SearchConfig(trials=3, seed=0), space, lambda p, r: 1.0 - abs(p["x"] - 0.25),
                      first={"x": 0.25})
    assert kept.best == {"x": 0.25} and kept.best_trial == 0


def test_searching_ia3_tries_its_defaults_first(tiny_config):
    learner = _searching_learner(tiny_config, trials=2)
    search = learner.learn(_word_task("colours", 0)).stats["search"]
    train = learner.method.train
    assert search["history"][0]["params"] == {"lr": train.lr, "head_lr": train.head_lr,
                                              "epochs": train.epochs, "top_layers": 2}
