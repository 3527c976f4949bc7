"""Tamper with a saved model in every way loading must refuse, and print each refusal.

    python benchmarks/tamper_report.py

Saves a two-task model (tiny random BERT, seconds), then for each corruption copies it, applies
the corruption and loads it; prints the corruption and the error (type and message). The same
cases are asserted in tests/test_checkpoint.py; this prints them for a reader.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # kill_test's builders; it puts this checkout's src/ first

from kill_test import build_backbone, build_stream  # noqa: E402


def edit_manifest(change):
    def apply(directory: Path) -> None:
        path = directory / "manifest.json"
        manifest = json.loads(path.read_text())
        change(manifest)
        path.write_text(json.dumps(manifest))
    return apply


def task_file(directory: Path) -> Path:
    return sorted((directory / "tasks").iterdir())[0]


def flip_last_byte(directory: Path) -> None:
    path = task_file(directory)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def other_backbone(tiny: Path):
    def apply(directory: Path) -> None:
        import torch
        from transformers import BertModel

        copy = directory.parent / "other-backbone"
        shutil.copytree(tiny, copy)
        model = BertModel.from_pretrained(copy)
        with torch.no_grad():
            model.embeddings.word_embeddings.weight[0] += 1
        model.save_pretrained(copy)
        edit_manifest(lambda m: m["backbone"].__setitem__("name", str(copy)))(directory)
    return apply


def cases(tiny: Path) -> list[tuple[str, object]]:
    return [
        ("task file deleted", lambda d: task_file(d).unlink()),
        ("task file truncated by 10 bytes", lambda d: task_file(d).write_bytes(task_file(d).read_bytes()[:-10])),
        ("task file altered (last byte flipped)", flip_last_byte),
        ("foreign file in the directory (a pickle)", lambda d: (d / "model.pkl").write_bytes(b"\x80\x04K\x01.")),
        ("foreign file among the task files", lambda d: (d / "tasks" / "kinds.pt").write_bytes(b"x")),
        ("manifest lists a foreign file", edit_manifest(lambda m: m["files"].__setitem__(
            "tasks/model.pkl", {"size": 1, "sha256": "0" * 64}))),
        ("manifest lists a path outside the directory", edit_manifest(lambda m: m["files"].__setitem__(
            "../x-0123456789ab.safetensors", {"size": 1, "sha256": "0" * 64}))),
        ("manifest missing", lambda d: (d / "manifest.json").unlink()),
        ("manifest not JSON (cut short)", lambda d: (d / "manifest.json").write_text(
            (d / "manifest.json").read_text()[:-20])),
        ("manifest of another format", edit_manifest(lambda m: m.__setitem__("format", "other/checkpoint"))),
        ("manifest of format version 2", edit_manifest(lambda m: m.__setitem__("format_version", 2))),
        ("different backbone weights (hash mismatch)", other_backbone(tiny)),
        ("field missing: backbone.sha256", edit_manifest(lambda m: m["backbone"].pop("sha256"))),
        ("field malformed: tasks[0].labels a string", edit_manifest(lambda m: m["tasks"][0].__setitem__("labels", "a,b"))),
        ("field malformed: train_examples true", edit_manifest(lambda m: m["tasks"][0].__setitem__("train_examples", True))),
        ("field malformed: negative head_parameters", edit_manifest(lambda m: m["tasks"][0].__setitem__("head_parameters", -1))),
        ("field malformed: unknown method", edit_manifest(lambda m: m["method"].__setitem__("name", "pickle"))),
        ("field malformed: unknown hyperparameter", edit_manifest(lambda m: m["method"]["hyperparameters"]["train"].__setitem__("momentum", 0.9))),
        ("field malformed: task name '../../etc'", edit_manifest(lambda m: m["tasks"][0].__setitem__("name", "../../etc"))),
        ("field malformed: a task named twice", edit_manifest(lambda m: m["tasks"][1].__setitem__("name", m["tasks"][0]["name"]))),
        ("field malformed: sha256 not hex", edit_manifest(lambda m: next(iter(m["files"].values())).__setitem__("sha256", "xyz"))),
        ("file listed but used by no task", edit_manifest(lambda m: m["tasks"].pop())),
    ]


def main() -> None:
    from continual_transformer import ContinualLearner, TrainConfig, load_stream
    from continual_transformer.config import BackboneConfig

    with tempfile.TemporaryDirectory(prefix="ctt-tamper-") as tmp:
        work = Path(tmp)
        tiny = build_backbone(work / "tiny")
        learner = ContinualLearner(BackboneConfig(str(tiny), max_length=32),
                                   train=TrainConfig(epochs=1, batch_size=8), device="cpu")
        for task in load_stream(build_stream(work / "stream.jsonl"))[:2]:
            learner.learn(task)
        good = learner.save(work / "good")
        ContinualLearner.load(good, device="cpu")
        refused = 0
        all_cases = cases(tiny)
        for i, (name, corrupt) in enumerate(all_cases):
            directory = shutil.copytree(good, work / f"case{i}" / "model")
            corrupt(directory)
            try:
                ContinualLearner.load(directory, device="cpu")
                outcome = "LOADED (not refused)"
            except Exception as exc:  # the refusal is what is being reported
                refused += 1
                outcome = f"{type(exc).__name__}: {str(exc).replace(str(directory), 'model')}"
            print(f"- {name}\n    {outcome}")
        print(f"\n{refused} of {len(all_cases)} corruptions refused")
        sys.exit(0 if refused == len(all_cases) else 1)


if __name__ == "__main__":
    main()
