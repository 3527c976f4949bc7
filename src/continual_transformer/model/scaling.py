"""Activation scaling (IA3): learned per-entry vectors that rescale a frozen encoder's activations.

Each attention key, attention value and FFN intermediate activation of the adapted layers (every
layer, or only the top K: see `trunk.py`) is multiplied by a vector that starts at 1. An *entry* is one set of those vectors; the `ia3` method keeps one
entry per task, the baselines share one. The backbone's weights are never touched.

A batch may mix entries: `select(keys)` gives every row its own entry, and each wrapped layer
gathers one vector per row, so a mixed batch is one forward pass, never a loop over entries.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Collection

import torch
from torch import nn

# Module-name suffixes to wrap, per architecture: (attention key, attention value, FFN down
# projection). Keys and values are scaled on their output; the FFN on its input, which is the
# intermediate activation after the nonlinearity.
TARGETS: dict[str, tuple[str, str, str]] = {
    "bert": (r"attention\.self\.key", r"attention\.self\.value", r"layer\.\d+\.output\.dense"),
    "roberta": (r"attention\.self\.key", r"attention\.self\.value", r"layer\.\d+\.output\.dense"),
    "xlm-roberta": (r"attention\.self\.key", r"attention\.self\.value", r"layer\.\d+\.output\.dense"),
    "camembert": (r"attention\.self\.key", r"attention\.self\.value", r"layer\.\d+\.output\.dense"),
    "electra": (r"attention\.self\.key", r"attention\.self\.value", r"layer\.\d+\.output\.dense"),
    "distilbert": (r"attention\.k_lin", r"attention\.v_lin", r"ffn\.lin2"),
    "mpnet": (r"attention\.attn\.k", r"attention\.attn\.v", r"layer\.\d+\.output\.dense"),
    "deberta-v2": (r"attention\.self\.key_proj", r"attention\.self\.value_proj",
                   r"layer\.\d+\.output\.dense"),
}


def _layer_index(name: str) -> int:
    match = LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot tell which transformer layer module {name!r} belongs to")
    return int(match.group(1))


@dataclass
class _Selection:
    """Which entry each row of the current batch uses; shared by all wrapped layers."""

    keys: list[str] | None = None  # distinct entries in the batch
    rows: torch.Tensor | None = None  # (B,) index into `keys`; None when all rows share keys[0]
    # Multiply in the activations' dtype (bfloat16 under autocast) instead of promoting them
    # to the scales' float32: half the memory and no casts back and forth.
    in_activation_dtype: bool = False


class ScaledLinear(nn.Module):
    """A frozen `nn.Linear` whose input or output is scaled by the selected entry's vector."""

    def __init__(self, base: nn.Linear, scale_input: bool, selection: _Selection):
        super().__init__()
        self.base = base
        self.scale_input = scale_input
        self.dim = base.in_features if scale_input else base.out_features
        self.scales = nn.ParameterDict()
        self._selection = selection

    def _row_scales(self) -> torch.Tensor | None:
        keys, rows = self._selection.keys, self._selection.rows
        if keys is None:
            return None
        if rows is None:
            return self.scales[keys[0]]  # (D,)
        stacked = torch.stack([self.scales[k] for k in keys])  # (K, D)
        return stacked[rows].unsqueeze(1)  # (B, 1, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, D_in)
        scale = self._row_scales()
        if scale is None:
            return self.base(x)
        if self.scale_input:
            if self._selection.in_activation_dtype:
                scale = scale.to(x.dtype)
            return self.base(x * scale)
        out = self.base(x)
        if self._selection.in_activation_dtype:
            scale = scale.to(out.dtype)
        return out * scale


LAYER_INDEX = re.compile(r"(?:^|\.)layer\.(\d+)\.")  # transformer layer of a module name


def layer_key(module_name: str) -> str:
    """The key of a wrapped module in `IA3.layers` and `state_of` (a ModuleDict key cannot hold
    dots): "encoder.layer.5.attention.self.key" -> "encoder__layer__5__attention__self__key"."""
    return module_name.replace(".", "__")


def module_name(key: str) -> str:
    """The encoder's name of the module behind an `IA3.layers` key (inverse of `layer_key`)."""
    return key.replace("__", ".")


class IA3(nn.Module):
    """Injects `ScaledLinear` wrappers into an encoder and manages their entries.

    `layers` are the indices of the transformer layers to adapt (None: all of them; empty: none,
    for methods that adapt nothing).
    """

    def __init__(self, encoder: nn.Module, model_type: str, layers: Collection[int] | None = None):
        super().__init__()
        if model_type not in TARGETS:
            raise ValueError(
                f"activation scaling does not know architecture {model_type!r}; "
                f"known: {sorted(TARGETS)}"
            )
        if any(isinstance(m, ScaledLinear) for m in encoder.modules()):
            raise ValueError(
                "this encoder already carries activation scaling (one Backbone per learner): "
                "load a fresh Backbone"
            )
        key_re, value_re, ffn_re = (re.compile(rf"(^|\.){p}$") for p in TARGETS[model_type])
        self._selection = _Selection()
        self.layers = nn.ModuleDict()
        targets = [
            (name, module, bool(ffn_re.search(name)))
            for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear)
            and (key_re.search(name) or value_re.search(name) or ffn_re.search(name))
        ]
        if not targets:
            raise ValueError(f"no key/value/FFN layers found in the {model_type!r} encoder")
        if layers is not None:
            chosen = set(layers)
            targets = [t for t in targets if _layer_index(t[0]) in chosen]
        for name, module, scale_input in targets:
            wrapped = ScaledLinear(module, scale_input, self._selection)
            parent_name, _, child = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name), child, wrapped)
            self.layers[layer_key(name)] = wrapped
        self._entries: list[str] = []

    @property
    def in_activation_dtype(self) -> bool:
        return self._selection.in_activation_dtype

    @in_activation_dtype.setter
    def in_activation_dtype(self, value: bool) -> None:
        self._selection.in_activation_dtype = value

    # -- entries -------------------------------------------------------------------------------
    def entries(self) -> list[str]:
        return list(self._entries)

    def add(self, key: str) -> None:
        if key in self._entries:
            raise ValueError(f"adapter entry {key!r} already exists")
        for layer in self.layers.values():
            device = layer.base.weight.device
            layer.scales[key] = nn.Parameter(torch.ones(layer.dim, device=device))
        self._entries.append(key)

    def remove(self, key: str) -> None:
        self._require(key)
        for layer in self.layers.values():
            del layer.scales[key]
        self._entries.remove(key)

    def parameters_of(self, key: str, top_layers: int | None = None) -> list[nn.Parameter]:
        """The entry's vectors; with `top_layers`, only those of that many top scaled layers."""
        self._require(key)
        names = list(self.layers)
        if top_layers is not None:
            depths = sorted({_layer_index(module_name(name)) for name in names})
            if not 1 <= top_layers <= len(depths):
                raise ValueError(f"top_layers must be in [1, {len(depths)}], got {top_layers!r}")
            names = [n for n in names if _layer_index(module_name(n)) >= depths[-top_layers]]
        return [self.layers[name].scales[key] for name in names]

    def num_parameters(self, key: str) -> int:
        return sum(p.numel() for p in self.parameters_of(key))

    def state_of(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's vectors, keyed by layer, detached and on the CPU (for saving)."""
        self._require(key)
        return {name: layer.scales[key].detach().cpu() for name, layer in self.layers.items()}

    def load_state_of(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        expected = set(self.layers)
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"adapter entry {key!r} does not fit this backbone: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        if key not in self._entries:
            self.add(key)
        with torch.no_grad():
            for name, layer in self.layers.items():
                if tensors[name].shape != (layer.dim,):
                    raise ValueError(
                        f"adapter entry {key!r}, layer {name}: shape {tuple(tensors[name].shape)}, "
                        f"expected ({layer.dim},)"
                    )
                layer.scales[key].copy_(tensors[name])

    def _require(self, key: str) -> None:
        if key not in self._entries:
            raise KeyError(f"unknown adapter entry {key!r}; known: {self._entries}")

    # -- routing rows to entries ---------------------------------------------------------------
    def route(self, row_keys: list[str]) -> None:
        """Until `clear()`, row i of every forward pass is scaled by entry `row_keys[i]`."""
        distinct = list(dict.fromkeys(row_keys))
        for key in distinct:
            self._require(key)
        self._selection.keys = distinct
        self._selection.rows = None
        if len(distinct) > 1:
            index = {key: i for i, key in enumerate(distinct)}
            device = self._device()
            self._selection.rows = torch.tensor([index[k] for k in row_keys], device=device)

    def _device(self) -> torch.device:
        layer = next(iter(self.layers.values()), None)
        return layer.base.weight.device if layer is not None else torch.device("cpu")

    def clear(self) -> None:
        self._selection.keys = None
        self._selection.rows = None

    @contextmanager
    def select(self, row_keys: list[str]):
        """Within the block, row i of every forward pass is scaled by entry `row_keys[i]`."""
        self.route(row_keys)
        try:
            yield
        finally:
            self.clear()
