"""Prediction precision: bfloat16 where asked, float32 where asked, each exact within itself."""

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.training.precision import resolved

from conftest import toy_rows, write_jsonl


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return load_stream(write_jsonl(tmp_path_factory.mktemp("s") / "toy.jsonl", toy_rows()))


@pytest.fixture(scope="module")
def learned(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=2, batch_size=8), device="cpu")
    learner.learn(tasks[0])
    return learner


def _texts(tasks):
    return [e.text for t in tasks for e in t.test]


def test_precision_names_are_checked_and_auto_follows_the_hardware(learned):
    with pytest.raises(ValueError, match="precision must be one of"):
        learned.precision = "fp16"
    with pytest.raises(ValueError, match="precision must be one of"):
        learned.predict(["cat"], task="kinds", precision="int4")
    cpu = torch.device("cpu")
    assert resolved("fp32", cpu) == "fp32" and resolved("bf16", cpu) == "bf16"
    assert resolved("auto", cpu) in ("fp32", "bf16")
    assert learned.prediction_precision("fp32") == "fp32"


def test_bf16_prediction_computes_what_the_encoder_cast_to_bf16_computes(learned, tasks):
    import copy

    backbone = learned.backbone
    batch = backbone.collate(backbone.tokenize(_texts(tasks)[:12]))
    weights = {n: p.clone() for n, p in backbone.encoder.named_parameters()}
    cast = copy.deepcopy(backbone.encoder).to(torch.bfloat16)
    with torch.inference_mode():
        fp32 = backbone.encoder(**batch).last_hidden_state
        bare = cast(**batch).last_hidden_state
        with backbone.bf16_weights():
            ours = backbone.encoder(**batch).last_hidden_state
    assert bare.dtype == ours.dtype == torch.bfloat16
    assert torch.equal(bare, ours)  # the bare bfloat16 forward, bit for bit
    assert not torch.equal(fp32, bare.float())
    for name, parameter in backbone.encoder.named_parameters():  # the float32 weights are back
        assert parameter.dtype == torch.float32 and torch.equal(parameter, weights[name]), name


def test_bf16_prediction_runs_attention_as_matrix_products_and_fp32_keeps_the_encoders(learned, tasks):
    import copy

    backbone = learned.backbone
    loaded = backbone.encoder.config._attn_implementation
    batch = backbone.collate(backbone.tokenize(_texts(tasks)[:12]))
    eager = copy.deepcopy(backbone.encoder).to(torch.bfloat16)
    eager.config._attn_implementation = "eager"
    fused = copy.deepcopy(backbone.encoder).to(torch.bfloat16)
    with torch.inference_mode():
        expected = eager(**batch).last_hidden_state
        with learned.model.inference("bf16"):
            ours = backbone.encoder(**batch).last_hidden_state
        with learned.model.inference("fp32"):
            assert backbone.encoder.config._attn_implementation == loaded
    assert torch.equal(ours, expected)
    if loaded != "eager":  # the encoder's own kernel rounds differently in bfloat16
        assert not torch.equal(ours, fused(**batch).last_hidden_state)
    assert backbone.encoder.config._attn_implementation == loaded


def test_each_precision_is_exact_and_close_to_the_other(learned, tasks, tmp_path):
    texts = _texts(tasks[:1])
    fp32 = torch.stack(learned.logits(texts, "kinds", precision="fp32"))
    bf16 = torch.stack(learned.logits(texts, "kinds", precision="bf16"))
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # the layers really computed in bfloat16
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)
    assert torch.equal(bf16, torch.stack(learned.logits(texts, "kinds", precision="bf16")))
    learned.save(tmp_path / "model")
    for precision, expected in (("bf16", bf16), ("fp32", fp32)):
        again = ContinualLearner.load(tmp_path / "model", device="cpu", precision=precision)
        assert torch.equal(torch.stack(again.logits(texts, "kinds")), expected), precision


def test_learning_a_task_leaves_an_old_tasks_bf16_answers_unchanged(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    learner.precision = "bf16"
    learner.learn(tasks[0])
    texts = _texts(tasks[:1])
    before = torch.stack(learner.logits(texts, tasks[0].name))
    learner.learn(tasks[1])
    assert torch.equal(before, torch.stack(learner.logits(texts, tasks[0].name)))


def test_routed_predictions_give_the_tasks_probability(tiny_config, tasks):
    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8), device="cpu")
    for task in tasks:
        learner.learn(task)
    texts = _texts(tasks)
    for precision in ("fp32", "bf16"):
        routed = learner.predict(texts, precision=precision)
        assert all(0.5 / len(tasks) < p.task_probability <= 1.0 for p in routed)
        given = learner.predict(texts, task=tasks[0].name, precision=precision)
        assert all(p.task_probability is None for p in given)
        # The probability is the router's choice: the most probable task among those allowed.
        among = learner.predict(texts, among=[tasks[1].name], precision=precision)
        assert {p.task for p in among} == {tasks[1].name} and all(p.task_probability == 1.0 for p in among)
    analytic = ContinualLearner(tiny_config, method="analytic", device="cpu")
    for task in tasks:
        analytic.learn(task)
    routed = analytic.predict(texts)
    assert all(0 < p.task_probability <= 1.0 for p in routed)


def test_a_run_reports_each_tasks_accuracy_in_fp32_and_as_predicted(tiny_config, tasks):
    from continual_transformer.experiment.run import run_stream

    learner = ContinualLearner(tiny_config, train=TrainConfig(epochs=1, batch_size=8, precision="bf16"),
                               device="cpu")
    assert learner.precision == "bf16"  # a run predicts as it trains
    report = run_stream(tasks, learner)
    compared = report["precision"]
    assert compared["prediction"] == "bf16"
    final = report["accuracy_matrix"][-1]
    for task, acc in zip(tasks, final):
        row = compared["per_task"][task.name]
        assert row["bf16"] == acc
        assert row["fp32"] == learner.evaluate(task, precision="fp32")
    assert compared["largest_difference"] == max(abs(r["bf16"] - r["fp32"]) for r in compared["per_task"].values())
