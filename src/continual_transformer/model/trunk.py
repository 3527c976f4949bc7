"""Trunk and top: the frozen encoder, split where per-task adaptation begins.

Every layer of the backbone is frozen and tasks adapt only the top K layers (`adapt_layers`),
so the embedding layer and the layers below the top (the *trunk*) compute the same thing for a
text whatever task reads it. Whatever the trunk computes is therefore computed once and shared:

- Learning a task runs the trunk once per training text (`TrunkStates`) and trains the top on
  the stored trunk output for every epoch; nothing flows back into the trunk.
- The router reads the trunk's pooled output (`TrunkStates.features` while learning; inside
  the same pass when predicting): its features cost no extra pass.
- A prediction batch that mixes tasks, or lets the router choose them, runs the trunk once for
  all rows, then the top with each row's own scales (`ContinualLearner.row_logits`).

With K = all layers the trunk is the embedding layer alone: nothing is stored, and the method
is exactly the all-layer `ia3` it generalises.

Memory. The stored trunk output of a text is (tokens x hidden) numbers, kept in the training
precision (bfloat16 when training runs in bfloat16), packed without padding: on MiniLM 768 bytes
per token in bfloat16. Measured on the bundled stream: 14.6 MB per 1,000 texts on WordNet
glosses (19 tokens a text), 64.4 MB per 1,000 on State of the Union paragraphs (84 tokens). `cache_bytes` bounds it: texts beyond the bound are
not stored, and their trunk output is recomputed in each batch that holds them (the same
numbers, more compute).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .backbone import Backbone, LayerCall, masked_mean
from .batching import collated

if TYPE_CHECKING:
    from ..training.distributed import DataParallel


@dataclass
class TopInput:
    """A batch as the top layers receive it: the trunk's output and what each layer needs."""

    hidden: torch.Tensor  # (B, T, H) trunk output (the embedding output when the trunk is empty)
    call: LayerCall  # attention mask and position information for this batch
    attention_mask: torch.Tensor  # (B, T)


class TrunkStates:
    """The trunk run once over a fixed list of tokenised texts.

    `features` (N, H): the mean over tokens of each text's trunk output, in float32 (what the
    router reads). `batch(indices)`: those texts as a `TopInput`, from the stored trunk output
    where it is stored.

    `autocast` is the precision context the trunk runs in (the training precision); stored
    states keep its dtype (`store_dtype`) and are handed to the top in float32.

    With `parallel` (a data-parallel run), this process runs the trunk on its share of the
    passes and the processes combine their results: every process ends with all of `features`
    and the stored output, the numbers one process computes (see training/distributed.py).
    """

    def __init__(
        self,
        backbone: Backbone,
        ids: Sequence[Sequence[int]],
        trunk_layers: int,
        *,
        autocast: Callable | None = None,
        store_dtype: torch.dtype = torch.float32,
        cache_bytes: int = 0,
        with_features: bool = True,
        parallel: "DataParallel | None" = None,
    ):
        if not 0 <= trunk_layers <= backbone.num_layers:
            raise ValueError(f"trunk_layers must be in [0, {backbone.num_layers}], got {trunk_layers}")
        self.backbone = backbone
        self.ids = [list(row) for row in ids]
        self.trunk_layers = trunk_layers
        self._autocast = autocast or (lambda: torch.autocast(backbone.device.type, enabled=False))
        self.store_dtype = store_dtype
        self.features: torch.Tensor | None = None
        # Packed storage: the rows of text i are _states[_offsets[i] : _offsets[i] + len(ids[i])].
        self._states: torch.Tensor | None = None
        self._offsets: list[int | None] = [None] * len(self.ids)
        store = trunk_layers > 0 and cache_bytes > 0
        if store or with_features:
            self._run(store, cache_bytes, with_features, parallel)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(row) for row in self.ids]

    @property
    def stored(self) -> int:
        """How many texts have their trunk output stored."""
        return sum(offset is not None for offset in self._offsets)

    @property
    def stored_bytes(self) -> int:
        return 0 if self._states is None else self._states.numel() * self._states.element_size()

    def _run(self, store: bool, cache_bytes: int, with_features: bool,
             parallel: "DataParallel | None") -> None:
        hidden_size = self.backbone.hidden_size
        # Combined processes sum their parts: what a process does not compute must be zero.
        blank = torch.empty if parallel is None else torch.zeros
        if store:  # which texts fit the budget, in order
            per_token = hidden_size * torch.empty((), dtype=self.store_dtype).element_size()
            used = 0
            for i, row in enumerate(self.ids):
                if used + len(row) * per_token > cache_bytes:
                    break
                self._offsets[i] = used // per_token
                used += len(row) * per_token
            self._states = blank(used // per_token, hidden_size, dtype=self.store_dtype)
        features = blank(len(self.ids), hidden_size) if with_features else None
        # Inference only: the encoder's own attention (fused where it has one) whatever the
        # training passes use, so that no (B, heads, T, T) scores are made.
        with torch.inference_mode(), self._autocast(), self.backbone.default_attention():
            for k, (chunk, batch) in enumerate(collated(self.backbone, self.ids)):
                if parallel is not None and not parallel.owns(k):
                    continue
                hidden, call = self.backbone.start(**batch)
                hidden = self.backbone.run_layers(hidden, call, 0, self.trunk_layers)  # (B, T, H)
                if features is not None:
                    features[chunk] = masked_mean(hidden.float(), batch["attention_mask"]).cpu()
                if store:
                    for row, i in enumerate(chunk):
                        offset = self._offsets[i]
                        if offset is not None:
                            n = len(self.ids[i])
                            self._states[offset : offset + n] = hidden[row, :n].to("cpu", self.store_dtype)
        if parallel is not None:
            for part in (features, self._states if store else None):
                if part is not None:
                    parallel.combine(part)
        self.features = features

    def subset(self, rows: Sequence[int]) -> "TrunkStates":
        """These states for the texts `rows` only (in that order), sharing the storage."""
        out = object.__new__(TrunkStates)
        out.backbone, out.trunk_layers = self.backbone, self.trunk_layers
        out._autocast, out.store_dtype = self._autocast, self.store_dtype
        out.ids = [self.ids[i] for i in rows]
        out.features = None if self.features is None else self.features[list(rows)]
        out._states = self._states
        out._offsets = [self._offsets[i] for i in rows]
        return out

    def drop_stored(self) -> None:
        """Free the stored trunk output (`features` stay); batches compute it again."""
        self._states = None
        self._offsets = [None] * len(self.ids)

    def batch(self, indices: Sequence[int]) -> TopInput:
        """The texts `indices` as one batch for the top layers (padded to the longest)."""
        return gather([(self, i) for i in indices])

    def _stored(self, i: int) -> torch.Tensor | None:
        offset = self._offsets[i]
        if offset is None or self._states is None:
            return None
        return self._states[offset : offset + len(self.ids[i])]  # (T_i, H)


def gather(rows: Sequence[tuple[TrunkStates, int]]) -> TopInput:
    """One top-layer batch from rows of one or more `TrunkStates` of the same backbone and
    trunk: stored trunk outputs are copied in, the others computed now."""
    first = rows[0][0]
    backbone, trunk_layers = first.backbone, first.trunk_layers
    if any(s.backbone is not backbone or s.trunk_layers != trunk_layers for s, _ in rows):
        raise ValueError("rows of one batch must come from the same backbone and trunk")
    ids = [s.ids[i] for s, i in rows]
    batch = backbone.collate(ids)
    hidden, call = backbone.start(**batch)  # the embedding output; the mask the top needs
    if trunk_layers == 0:
        return TopInput(hidden, call, batch["attention_mask"])
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)  # (B, T, H)
    missing = []
    for row, (states, i) in enumerate(rows):
        stored = states._stored(i)
        if stored is None:
            missing.append(row)
        else:
            out[row, : len(stored)] = stored.to(out.device, torch.float32)
    if missing:
        sub = backbone.collate([ids[row] for row in missing])
        with torch.no_grad(), first._autocast(), backbone.default_attention():  # as `_run`
            sub_hidden, sub_call = backbone.start(**sub)
            sub_hidden = backbone.run_layers(sub_hidden, sub_call, 0, trunk_layers)
        out[missing, : sub_hidden.shape[1]] = sub_hidden.to(first.store_dtype).float()
    return TopInput(out, call, batch["attention_mask"])
