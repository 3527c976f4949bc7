"""Packed layers: a padded batch's transformer layers computed on its real tokens only.

A batch of texts of different lengths is padded to its longest row (`Backbone.collate`), and
the encoder's layers then compute every padding position too. On a CPU the linear layers take
most of a layer's time (85 % on MiniLM), and they act on each token alone, so they need not see
the padding at all. Here the real tokens of a batch are packed into one row, (1, N, H) with N
the batch's real tokens in row-major order of its attention mask; the linear layers, layer
norms and scales run on those N tokens, and only attention is computed per text, on the
texts padded again (`packed_attention`).

It works through the encoder's own layers, unchanged: Hugging Face encoders hand attention to
a registered attention function (`AttentionInterface`), which here is `packed_attention`, given
the packing in place of the attention mask. An encoder whose layers do more between tokens than
that attention (relative position biases, for example) would compute something else, so
`packs_like_padded` checks each encoder on a probe batch before packing is used for it.

Used for bfloat16 prediction (`AdaptedModel.inference`); fp32 keeps the padded layers. What it
gains grows with the padding: measured in benchmarks/README.md (Prediction).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "continual_transformer_packed"  # the name `packed_attention` is registered under


@dataclass(frozen=True)
class PackedRows:
    """Where a padded batch's real tokens go when packed into one row."""

    index: torch.Tensor  # (N,) position in the flattened (B * T) batch of each real token
    rows: torch.Tensor  # (N,) the batch row each real token belongs to
    keys: torch.Tensor  # (B, 1, 1, T) bool: the positions each row's tokens attend to
    batch_rows: int
    length: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> "PackedRows":
        """The packing of a batch with this attention mask (B, T) of 1s then 0s per row."""
        batch_rows, length = attention_mask.shape
        index = attention_mask.reshape(-1).nonzero().squeeze(1)  # (N,)
        keys = attention_mask.bool()[:, None, None, :]
        return cls(index, torch.div(index, length, rounding_mode="floor"), keys, batch_rows, length)

    def pack(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, N, ...): the real tokens only."""
        flat = hidden.reshape(self.batch_rows * self.length, *hidden.shape[2:])
        return flat.index_select(0, self.index).unsqueeze(0)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(1, N, ...) -> (B, T, ...), zeros at the padding positions."""
        out = packed.new_zeros(self.batch_rows * self.length, *packed.shape[2:])
        out.index_copy_(0, self.index, packed[0])
        return out.view(self.batch_rows, self.length, *packed.shape[2:])

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, 1, T): 0 where a row's token may be attended to, -inf at its padding."""
        bias = torch.zeros(self.keys.shape, dtype=dtype, device=self.keys.device)
        return bias.masked_fill_(~self.keys, float("-inf"))


def packed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: PackedRows, scaling: float | None = None, dropout: float = 0.0,
                     **_kwargs) -> tuple[torch.Tensor, None]:
    """Attention over packed tokens, as an `AttentionInterface` function: query, key and value
    (1, heads, N, d) are padded per text again, (B, heads, T, d), attended with each row's own
    tokens as keys, and packed back: (1, N, heads, d), the layout these functions return."""
    if not isinstance(attention_mask, PackedRows):
        raise TypeError("packed attention runs inside `run_packed` only")
    rows = attention_mask
    if scaling is None:
        scaling = query.shape[-1] ** -0.5

    def padded(t: torch.Tensor) -> torch.Tensor:  # (1, heads, N, d) -> (B, heads, T, d)
        return rows.unpack(t.transpose(1, 2)).transpose(1, 2)

    # Plain matrix products: on a CPU in bfloat16 they ran the short rows of these batches
    # 1.5-3x faster than the fused attention kernel (B 32 x T 64: 1.8 against 5.5 ms).
    scores = torch.matmul(padded(query * scaling), padded(key).transpose(-1, -2))  # (B, heads, T, T)
    weights = torch.softmax(scores + rows.key_bias(scores.dtype), dim=-1)
    if dropout:
        weights = F.dropout(weights, p=dropout)
    out = torch.matmul(weights, padded(value))  # (B, heads, T, d)
    return rows.pack(out.transpose(1, 2)), None  # (1, N, heads, d)


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, packed_attention)


def run_packed(config, layers: Sequence[nn.Module], hidden: torch.Tensor, rows: PackedRows) -> torch.Tensor:
    """`layers` in order on the real tokens of `hidden` (B, T, H); the result padded again
    (zeros at the padding positions). `config` is the encoder's: its attention implementation
    is `packed_attention` while the layers run."""
    _register()
    before = config._attn_implementation
    config._attn_implementation = ATTENTION
    try:
        packed = rows.pack(hidden)  # (1, N, H)
        for layer in layers:
            out = layer(packed, rows)
            packed = out[0] if isinstance(out, tuple) else out
    finally:
        config._attn_implementation = before
    return rows.unpack(packed)


def packs_like_padded(encoder: nn.Module, layers: Sequence[nn.Module], hidden: torch.Tensor,
                      call_args: tuple, call_kwargs: dict, attention_mask: torch.Tensor) -> str | None:
    """None if the packed layers compute the padded layers' hidden states on the real tokens
    of a probe batch (`hidden`, the embedding output, with the layers' padded arguments), or
    why not."""
    with torch.inference_mode():
        padded = hidden
        for layer in layers:
            out = layer(padded, *call_args, **call_kwargs)
            padded = out[0] if isinstance(out, tuple) else out
        try:
            packed = run_packed(encoder.config, layers, hidden, PackedRows.of(attention_mask))
        except (TypeError, ValueError, RuntimeError, KeyError, IndexError, AttributeError) as exc:
            return f"its layers do not run on packed tokens ({type(exc).__name__}: {exc})"
    real = attention_mask.bool()
    tolerance = 1e-4 if hidden.dtype == torch.float32 else 3e-2  # rounding of the precision
    if packed.shape != padded.shape or not torch.allclose(packed[real], padded[real], rtol=tolerance,
                                                          atol=tolerance):
        return "its layers compute something else on packed tokens (more than per-token maps and attention)"
    return None
