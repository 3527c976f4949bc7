"""The lexical branch: chosen on a validation split, isolated per task, saved and loaded."""

import random

import numpy as np
import pytest
import torch

from continual_transformer import ContinualLearner
from continual_transformer.config import TrainConfig
from continual_transformer.methods import make_method
from continual_transformer.model import lexical
from continual_transformer.types import Example, Task


def _word_task(name: str, seed: int, n: int = 240) -> Task:
    # The label is decided by one word among common ones: a bag of words sees it at once.
    rng = random.Random(seed)
    cue = {"red": ["crimson", "scarlet", "ruby"], "blue": ["azure", "cobalt", "navy"],
           "green": ["emerald", "olive", "jade"]}
    filler = "the a of to and in is it that was for on are with as".split()

    def example(label: str) -> Example:
        words = rng.sample(filler, 6) + [rng.choice(cue[label])]
        rng.shuffle(words)
        return Example(" ".join(words), label)

    labels = tuple(cue)
    train = tuple(example(labels[i % 3]) for i in range(n))
    test = tuple(example(labels[i % 3]) for i in range(60))
    return Task(name, labels, train, test)


def _learner(tiny_config, lexical_on=True):
    torch.manual_seed(0)
    method = make_method("ia3", {"train": TrainConfig(epochs=1, precision="fp32").to_dict(),
                                 "lexical": lexical_on})
    return ContinualLearner(tiny_config, method=method, device="cpu")


def test_branch_is_chosen_on_validation_and_lifts_a_word_task(tiny_config, tmp_path):
    learner = _learner(tiny_config)
    task = _word_task("colours", 0)
    record = learner.learn(task)
    chosen = record.stats["lexical"]
    assert chosen["validation_texts"] == 36  # 15 % of 240, stratified
    assert chosen["mix"] > 0 and "colours" in learner.model.lexical
    assert record.stats["steps"] == -(-204 // TrainConfig().batch_size)  # the scales saw 204 texts
    assert learner.evaluate(task) >= 0.95  # a random tiny encoder alone is near chance here
    branch = learner.model.lexical["colours"]
    assert branch.columns.dtype == torch.int32 and len(branch.columns) <= lexical.COLUMNS
    assert learner.footprint("colours")["lexical_bytes"] == branch.nbytes()
    assert record.bytes_added > branch.nbytes()

    texts = [e.text for e in task.test]
    before = learner.predict(texts, task="colours")
    learner.save(tmp_path / "m")
    loaded = ContinualLearner.load(tmp_path / "m", precision="fp32")  # as it was trained and predicted
    assert [p.probabilities for p in loaded.predict(texts, task="colours")] == [p.probabilities for p in before]

    # Isolation: a second task with a branch of its own changes nothing of the first.
    learner.learn(_word_task("colours_again", 1))
    assert [p.probabilities for p in learner.predict(texts, task="colours")] == [p.probabilities for p in before]
    learner.delete("colours")
    assert "colours" not in learner.model.lexical and "colours_again" in learner.model.lexical


def test_the_branch_reads_the_whole_text_beyond_what_the_encoder_reads(tiny_config, tmp_path):
    # The deciding word comes after 40 filler words: past the encoder's 32 tokens.
    rng = random.Random(3)
    filler = "the a of to and in is it that was for on are with as".split()
    base = _word_task("late", 0)

    def late(example: Example) -> Example:
        cue = [w for w in example.text.split() if w not in filler]
        return Example(" ".join(rng.choices(filler, k=40) + cue), example.label)

    task = Task("late", base.labels, tuple(map(late, base.train)), tuple(map(late, base.test)))
    learner = _learner(tiny_config)
    texts = [e.text for e in task.test]
    whole = learner.backbone.tokenize_whole(texts)
    assert min(map(len, whole)) > 32
    assert learner.backbone.encoder_view(whole) == learner.backbone.tokenize(texts)
    record = learner.learn(task)
    assert record.stats["lexical"]["mix"] > 0 and learner.model.lexical["late"].whole_text
    assert learner.evaluate(task) >= 0.95  # the encoder alone never sees the word

    # Saved and loaded, over the one batching path (`predict_ids` with whole ids) and the
    # task-free path, the answers are the same; a branch saved before whole texts reads the
    # encoder's part, as it did then.
    predicted = [p.label for p in learner.predict(texts, task="late")]
    learner.save(tmp_path / "m")
    loaded = ContinualLearner.load(tmp_path / "m", precision="fp32")
    assert [p.label for p in loaded.predict(texts, task="late")] == predicted
    assert [p.label for p in loaded.predict(texts)] == predicted  # the only task: routed to it
    tensors = {k: v for k, v in learner.model.lexical["late"].tensors().items() if k != "lexical.whole_text"}
    loaded.model.lexical["late"] = lexical.LexicalBranch.from_tensors(tensors)
    assert not loaded.model.lexical["late"].whole_text
    assert loaded.evaluate(task) < 0.8


def test_the_branch_tells_apart_words_the_vocabulary_lacks(tiny_config, tmp_path):
    # Each label's cue is a Chinese character MiniLM's vocabulary lacks: the encoder reads all
    # three as the one unknown token, the branch reads each as a word of its own.
    cue = {"red": "这", "blue": "是", "green": "个"}
    base = _word_task("rare", 0)

    def rare(example: Example) -> Example:
        words = [cue[example.label] if w in {"crimson", "scarlet", "ruby", "azure", "cobalt", "navy",
                                             "emerald", "olive", "jade"} else w for w in example.text.split()]
        return Example(" ".join(words), example.label)

    task = Task("rare", base.labels, tuple(map(rare, base.train)), tuple(map(rare, base.test)))
    learner = _learner(tiny_config)
    backbone, texts = learner.backbone, [e.text for e in task.test]
    whole, unknown = backbone.tokenize_whole(texts), backbone.tokenizer.unk_token_id
    assert backbone.encoder_view(whole) == backbone.tokenize(texts)  # the encoder reads [UNK]
    assert all(unknown in row for row in backbone.tokenize(texts)) and not any(unknown in row for row in whole)
    assert len({backbone.word_id(c) for c in cue.values()}) == 3
    assert all(backbone.word_id(c) >= backbone.unknown_base for c in cue.values())
    with pytest.raises(ValueError, match="above the vocabulary"):
        backbone.collate(whole)  # the encoder never reads them
    learner.learn(task)
    assert learner.model.lexical["rare"].unknown_words
    assert learner.evaluate(task) >= 0.95

    learner.save(tmp_path / "m")
    loaded = ContinualLearner.load(tmp_path / "m", precision="fp32")
    assert loaded.model.lexical["rare"].unknown_words and loaded.evaluate(task) >= 0.95
    # A branch saved before reads those words as the unknown token, as it was fitted on them.
    tensors = {k: v for k, v in learner.model.lexical["rare"].tensors().items() if k != "lexical.unknown_words"}
    loaded.model.lexical["rare"] = lexical.LexicalBranch.from_tensors(tensors)
    assert not loaded.model.lexical["rare"].unknown_words
    assert loaded.evaluate(task) < 0.8


def test_without_the_branch_every_training_text_trains_the_scales(tiny_config):
    learner = _learner(tiny_config, lexical_on=False)
    record = learner.learn(_word_task("colours", 0))
    assert record.stats["lexical"] is None and not learner.model.lexical
    assert record.stats["steps"] == -(-240 // TrainConfig().batch_size)


def test_fusion_mixes_log_probabilities():
    neural = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    words = torch.log(torch.tensor([[0.1, 0.9], [0.1, 0.9]]))
    fused = lexical.fuse(neural, words, 0.5)
    assert fused.argmax(1).tolist() == [1, 1]  # words win the first row: 0.9 vs a 2-logit margin
    assert torch.equal(lexical.fuse(neural, words, 0.0).argmax(1), neural.argmax(1))


def test_cli_turns_the_branch_off_and_refuses_it_for_other_methods(tmp_path, tiny_backbone_dir):
    import json

    from typer.testing import CliRunner

    from continual_transformer.cli import app

    stream = tmp_path / "s.jsonl"
    task = _word_task("colours", 0, n=240)
    with stream.open("w") as f:
        for split, examples in (("train", task.train), ("test", task.test)):
            for e in examples:
                f.write(json.dumps({"task": "colours", "split": split, "text": e.text, "label": e.label}) + "\n")
    common = [str(stream), "--backbone", str(tiny_backbone_dir), "--epochs", "1", "--precision", "fp32"]
    runner = CliRunner()
    result = runner.invoke(app, ["run", *common, "--out", str(tmp_path / "off"), "--no-lexical"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "off" / "report.json").read_text())
    assert report["per_task"][0]["train_stats"]["lexical"] is None
    assert report["per_task"][0]["lexical_bytes"] == 0
    result = runner.invoke(app, ["run", *common, "--out", str(tmp_path / "on")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "on" / "report.json").read_text())
    assert report["per_task"][0]["lexical_bytes"] > 0
    result = runner.invoke(app, ["run", *common, "--out", str(tmp_path / "x"), "--method", "ewc",
                                 "--no-lexical"])
    assert result.exit_code == 2 and "applies to method 'ia3', not 'ewc'" in " ".join(result.output.split())


def test_int8_weights_predict_as_the_float_weights_and_old_branches_still_load():
    torch.manual_seed(0)
    weight = torch.randn(3, 50)
    quantized, scale = lexical.quantize(weight)
    assert quantized.dtype == torch.int8 and scale.shape == (3,)
    assert quantized.abs().amax(dim=1).tolist() == [127, 127, 127]
    torch.testing.assert_close(quantized.float() * scale[:, None], weight, rtol=0, atol=float(scale.max()) / 2)

    idf = torch.ones(50, dtype=torch.float16)
    ids = [[1, 2, 3], [4, 5], [2, 2, 7, 9]]
    # 50 sorted columns: every column these texts hash to, then others they never hit.
    hit = np.unique(np.concatenate([lexical.row_features(row, frozenset())[0] for row in ids]))
    other = np.setdiff1d(np.arange(1000, 1100), hit)[:50 - len(hit)]
    columns = torch.from_numpy(np.sort(np.concatenate([hit, other])).astype(np.int32))
    new = lexical.LexicalBranch(columns, idf, quantized, torch.zeros(3), 0.5, scale)
    # A branch saved before int8 weights: float16 weights, float32 idf, no scale.
    old = lexical.LexicalBranch.from_tensors({k: v for k, v in lexical.LexicalBranch(
        columns, idf.float(), weight.half(), torch.zeros(3), 0.5).tensors().items()})
    assert old.scale is None and "lexical.scale" not in old.tensors()
    again = lexical.LexicalBranch.from_tensors(new.tensors())
    assert torch.equal(again.weight, quantized) and torch.equal(again.scale, scale)
    torch.testing.assert_close(new.log_probs(ids, frozenset()), old.log_probs(ids, frozenset()),
                               rtol=0, atol=0.05)
    assert new.nbytes() == 50 * (4 + 2 + 3) + 3 * 4 * 2 + 4


def test_columns_that_tell_labels_apart_weigh_more():
    # Token 7 occurs in label 0's texts only, token 9 in every text of both labels: naive
    # Bayes weighting lifts 7 above its idf and takes 9, which tells the labels nothing,
    # to a small fraction of 7's weight relative to its idf.
    ids = [[7, 9, 11] for _ in range(10)] + [[9, 12] for _ in range(10)]
    y = np.array([0] * 10 + [1] * 10)
    rows = lexical._Rows(ids, frozenset())
    columns, weights = lexical._select(rows, y, 2)
    seen, df = np.unique(rows.col, return_counts=True)
    idf = dict(zip(seen.tolist(), (np.log(21 / (1 + df)) + 1).tolist()))
    ratio = dict(zip(columns.tolist(), (weights / [idf[c] for c in columns.tolist()]).tolist()))
    cue, shared = lexical.row_features([7], frozenset())[0][0], lexical.row_features([9], frozenset())[0][0]
    assert ratio[cue] > 1.2 and ratio[shared] < 0.5 * ratio[cue]


def test_n_grams_of_a_single_text_are_not_kept():
    # Token 7 (and its bigram) occurs in one text, token 8 in two: both are label 0's alone,
    # but an n-gram of one text is as likely noise as a cue, so only 8's columns are kept.
    ids = [[7, 9], [8, 9], [8, 9], [10, 9], [10, 9], [10, 9]]
    y = np.array([0, 0, 0, 1, 1, 1])
    columns, _ = lexical._select(lexical._Rows(ids, frozenset()), y, 2)
    kept = set(columns.tolist())

    def grams(row):
        return set(lexical.row_features(row, frozenset())[0].tolist())

    assert grams([8, 9]) | grams([10, 9]) <= kept
    assert not (grams([7, 9]) - grams([9])) & kept  # neither 7 nor its bigram with 9
    # When no n-gram repeats, every column is kept rather than none.
    lone = [[1], [2], [3], [4]]
    columns, _ = lexical._select(lexical._Rows(lone, frozenset()), np.array([0, 0, 1, 1]), 2)
    assert len(columns) == 4
