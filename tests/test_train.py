"""The training loop: guarded steps, out-of-memory splits, exact resume from a saved state.

Failures are injected through a real method whose loss goes wrong on chosen calls; torch and
the model are the real ones.
"""

import math

import pytest
import torch

from continual_transformer import ContinualLearner, TrainConfig, load_stream
from continual_transformer.methods.ia3 import IA3Method
from continual_transformer.training.loop import Checkpointing, TrainingError, TrainState


class FaultyIA3(IA3Method):
    """`ia3` whose loss is NaN, or whose gradient is NaN, on chosen calls (counted from 1), and
    which runs out of CUDA memory on batches of more than `oom_above` rows."""

    def __init__(self, train, nan_calls=(), nan_grad_calls=(), oom_above=None):
        super().__init__(train)
        self.nan_calls, self.nan_grad_calls = set(nan_calls), set(nan_grad_calls)
        self.oom_above = oom_above
        self.calls = 0
        self.sizes = []

    def loss(self, model, task, batch, labels):
        if self.oom_above is not None and len(labels) > self.oom_above:
            raise torch.cuda.OutOfMemoryError(f"injected: {len(labels)} rows > {self.oom_above}")
        self.calls += 1
        self.sizes.append(len(labels))
        loss = super().loss(model, task, batch, labels)
        if self.calls in self.nan_calls:
            return loss * float("nan")
        if self.calls in self.nan_grad_calls:
            # finite value (0), but d/dx sqrt(x) at 0 is inf, times 0: NaN gradients
            scale = model.adapter.parameters_of(task.name)[0]
            return loss + torch.sqrt(scale.sum() * 0)
        return loss


@pytest.fixture
def tasks(toy_stream):
    return load_stream(toy_stream)  # 2 tasks, 24 train examples each


def learner_with(tiny_config, method):
    return ContinualLearner(tiny_config, method=method, device="cpu")


def trained(learner, task) -> dict:
    return learner.method.task_tensors(learner.model, task)


def config(**kw):
    # fp32: bf16 autocast (on hardware that has it) would round micro-batch sums differently
    return TrainConfig(**{"epochs": 2, "batch_size": 8, "precision": "fp32", **kw})  # 3 steps per epoch, 6 in all


def test_non_finite_loss_and_gradient_steps_are_skipped_and_counted(tiny_config, tasks):
    method = FaultyIA3(config(), nan_calls={2}, nan_grad_calls={5})
    learner = learner_with(tiny_config, method)
    record = learner.learn(tasks[0])
    assert record.stats["skipped_steps"] == 2
    assert record.stats["restores"] == 0 and record.stats["lr_scale"] == 1.0
    assert record.stats["steps"] == 6 and method.calls == 6
    for name, value in trained(learner, tasks[0].name).items():
        assert torch.isfinite(value).all(), name
    assert any(not torch.all(p == 1) for p in learner.model.adapter.parameters_of(tasks[0].name))
    assert learner.evaluate(tasks[0]) > 0.5


def test_repeated_failures_go_back_to_the_epoch_start_with_half_the_rate(tiny_config, tasks):
    # The 5th and 6th steps (epoch 1) fail; with max_bad_steps=2 the loop then restores the
    # state at the start of epoch 1 (after 3 steps), halves the rate and does epoch 1 again.
    method = FaultyIA3(config(max_bad_steps=2), nan_calls={5, 6})
    learner = learner_with(tiny_config, method)
    seen = []

    def progress(done, total, loss):
        seen.append((done, [p.detach().clone() for p in learner.model.adapter.parameters_of(tasks[0].name)]))

    record = learner.learn(tasks[0], progress=progress)
    assert [done for done, _ in seen] == [1, 2, 3, 4, 5, 3, 4, 5, 6]
    assert method.calls == 9
    assert record.stats["restores"] == 1 and record.stats["lr_scale"] == 0.5
    assert record.stats["skipped_steps"] == 2 and record.stats["steps"] == 6
    at_epoch_start, after_restore = seen[2][1], seen[5][1]
    assert all(torch.equal(a, b) for a, b in zip(at_epoch_start, after_restore))
    # the one good step of the first try moved the parameters; the restore undid it
    assert any(not torch.equal(a, b) for a, b in zip(seen[3][1], after_restore))
    assert all(torch.equal(a, b) for a, b in zip(seen[3][1], seen[4][1]))  # a skipped step


def test_a_task_that_cannot_be_learned_fails_clearly_and_keeps_earlier_tasks(tiny_config, tasks):
    method = FaultyIA3(config(max_bad_steps=2, max_restores=2))
    learner = learner_with(tiny_config, method)
    learner.learn(tasks[0])
    texts = [e.text for e in tasks[0].test]
    before = torch.stack(learner.logits(texts, tasks[0].name))
    method.nan_calls = set(range(method.calls + 1, method.calls + 1000))
    with pytest.raises(TrainingError, match=r"loss or gradients not finite in 2 steps in a row "
                       r"\(step 2 of 6\), after 2 restore\(s\) with the learning rate lowered "
                       r"to 0.25x; 6 steps skipped in all. Lower the learning rates"):
        learner.learn(tasks[1])
    assert list(learner.tasks) == [tasks[0].name]
    assert learner.model.adapter.entries() == [tasks[0].name] and tasks[1].name not in learner.model.heads
    assert torch.equal(before, torch.stack(learner.logits(texts, tasks[0].name)))


def test_out_of_memory_splits_the_batch_and_keeps_the_update(tiny_config, tasks):
    plain = learner_with(tiny_config, FaultyIA3(config(batch_size=6)))
    plain.learn(tasks[0])
    method = FaultyIA3(config(batch_size=6), oom_above=2)
    split = learner_with(tiny_config, method)
    record = split.learn(tasks[0])
    assert record.stats["oom_splits"] == 2 and record.stats["micro_batch"] == 2  # 6 -> 3 -> 2
    assert set(method.sizes) == {2}
    assert record.stats["steps"] == plain.tasks[tasks[0].name].stats["steps"] == 8
    expected, got = trained(plain, tasks[0].name), trained(split, tasks[0].name)
    for key in expected:  # gradients summed over micro-batches: the same update, up to rounding
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)


def test_out_of_memory_on_one_example_is_a_clear_error(tiny_config, tasks):
    learner = learner_with(tiny_config, FaultyIA3(config(), oom_above=0))
    with pytest.raises(TrainingError, match="out of memory even with micro-batches of one example"):
        learner.learn(tasks[0])
    assert not learner.tasks and not learner.model.adapter.entries()


class Stop(Exception):
    pass


def test_fit_continues_exactly_from_a_saved_state(tiny_config, tasks):
    reference = learner_with(tiny_config, IA3Method(config(epochs=3)))
    reference.learn(tasks[0])

    saved: list[TrainState] = []

    def stop_at_7(done, total, loss):
        if done == 7:
            raise Stop

    interrupted = learner_with(tiny_config, IA3Method(config(epochs=3)))
    with pytest.raises(Stop):
        interrupted.learn(tasks[0], progress=stop_at_7, checkpointing=Checkpointing(2, saved.append))
    assert [s.step for s in saved] == [2, 4, 6]
    assert not interrupted.tasks  # rolled back

    # Something else uses the global RNG in between; the state brings it back.
    torch.rand(3)
    resumed = learner_with(tiny_config, IA3Method(config(epochs=3)))
    steps = []
    record = resumed.learn(tasks[0], progress=lambda d, t, loss: steps.append(d),
                           checkpointing=Checkpointing(0, saved.append, resume_from=saved[-1]))
    assert steps == [7, 8, 9]
    expected, got = trained(reference, tasks[0].name), trained(resumed, tasks[0].name)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    stats = dict(record.stats)
    assert stats == reference.tasks[tasks[0].name].stats
    assert math.isfinite(stats["first_loss"])


def test_train_state_mismatch_is_refused(tiny_config, tasks):
    saved = []
    learner = learner_with(tiny_config, IA3Method(config()))
    learner.learn(tasks[0], checkpointing=Checkpointing(2, saved.append))
    state = saved[0]
    state.tensors["param/1.0"] = torch.zeros(5, 5)  # the head's weight, in the wrong shape
    other = learner_with(tiny_config, IA3Method(config()))
    with pytest.raises(ValueError, match=r"train state tensor 'param/1.0' has shape \(5, 5\), "
                                         r"the parameter \(2, 32\)"):
        other.learn(tasks[0], checkpointing=Checkpointing(0, saved.append, resume_from=state))
    assert not other.tasks


def test_config_validates_guard_settings():
    with pytest.raises(ValueError, match="max_bad_steps must be >= 1, got 0"):
        TrainConfig(max_bad_steps=0)
    with pytest.raises(ValueError, match="max_restores must be >= 0, got -1"):
        TrainConfig(max_restores=-1)
    with pytest.raises(ValueError, match="every must be >= 0"):
        Checkpointing(-1, print)


def test_token_budget_splits_long_batches_and_keeps_the_update(tiny_config, tasks):
    whole = learner_with(tiny_config, FaultyIA3(config()))
    whole.learn(tasks[0])
    method = FaultyIA3(config())
    split = learner_with(tiny_config, method)
    split.model.pass_tokens = 24  # the toy texts have 7-9 tokens: at most 3 rows per pass
    split.learn(tasks[0])
    assert max(method.sizes) <= 3 and len(method.sizes) > 6
    expected, got = trained(whole, tasks[0].name), trained(split, tasks[0].name)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5)
