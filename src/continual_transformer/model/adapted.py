"""`AdaptedModel`: the frozen backbone, the scale entries of its top layers and the task heads.

This is everything a method learns on and nothing more: methods receive an `AdaptedModel`,
never the learner, so they cannot depend on how the learner keeps its records, routes or saves.

    model = AdaptedModel(backbone, top_layers=3)     # scales in the top 3 layers
    inputs = model.trunk(batch)                       # shared by every task
    pooled = model.top_pooled(inputs, ["news"] * B)   # (B, H), each row under its own entry
    logits = model.heads(pooled, "news")              # (B, C_news)
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Sequence

import torch

from ..training.precision import training_autocast, uses_bf16
from .backbone import Backbone
from .heads import TaskHeads
from .lexical import LexicalBranch, fuse
from .scaling import IA3
from .trunk import TopInput, TrunkStates

if TYPE_CHECKING:
    from ..training.distributed import DataParallel

LENGTH_MULTIPLE = 16  # batch lengths above a trunk: at most 8 shapes at 128 tokens
PASS_TOKENS = 1024  # training pass size above a trunk: bounds its activation memory


class AdaptedModel:
    """A frozen backbone whose top `top_layers` layers carry scale entries, plus task heads."""

    def __init__(self, backbone: Backbone, top_layers: int):
        depth = backbone.num_layers
        if not 0 <= top_layers <= depth:
            raise ValueError(f"top_layers must be in [0, {depth}], got {top_layers}")
        self.backbone = backbone
        self.top_layers = top_layers
        self.trunk_layers = depth - top_layers
        self.adapter = IA3(backbone.encoder, backbone.ref.model_type,
                           layers=range(self.trunk_layers, depth))
        # Training passes of at most this many padded tokens (a longer batch is computed in
        # micro-batches with the same update); None: whole batches.
        self.pass_tokens: int | None = None
        if self.trunk_layers and self.top_layers:
            # The trunk/top split runs its own kernels (see `training_kernels` too); with every
            # layer adapted the passes stay exactly those of the all-layer method.
            backbone.length_multiple = LENGTH_MULTIPLE
            self.adapter.in_activation_dtype = True
            self.pass_tokens = PASS_TOKENS
        self.heads = TaskHeads(backbone.hidden_size)
        # Per task, optionally: a bag of token n-grams fused with the head (see lexical.py).
        self.lexical: dict[str, LexicalBranch] = {}
        self.special_ids = frozenset(backbone.tokenizer.all_special_ids)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def hidden_size(self) -> int:
        return self.backbone.hidden_size

    def trunk_states(self, ids: Sequence[Sequence[int]], *, precision: str = "fp32",
                     cache_mb: float = 0, with_features: bool = True,
                     parallel: "DataParallel | None" = None) -> TrunkStates:
        """The trunk run once over tokenised texts in `precision`: the router's features (with
        `with_features`) and, within `cache_mb` MiB, the stored trunk output the top trains on;
        shared out among the processes of a data-parallel run with `parallel`."""
        bf16 = uses_bf16(precision, self.device)
        return TrunkStates(
            self.backbone, ids, self.trunk_layers,
            autocast=training_autocast(precision, self.device),
            store_dtype=torch.bfloat16 if bf16 else torch.float32,
            cache_bytes=int(cache_mb * 2**20),
            with_features=with_features,
            parallel=parallel,
        )

    @contextlib.contextmanager
    def inference(self, precision: str):
        """The context prediction runs in: `precision` ("fp32" or "bf16", see
        `training.precision.resolved`). In bf16 the encoder computes in bfloat16 on bfloat16
        copies of its weights, as the encoder cast to bfloat16 would (the bare forward this
        hardware runs fastest), the scales multiplying in bfloat16 too; callers pool and run
        the heads in float32. Measured against autocast over the float32 weights: 4-10 %
        faster, the same accuracy on the bundled tasks (benchmarks/predict.py).

        Attention runs as plain matrix products ("eager") in bf16: on this kind of CPU the
        fused attention kernel ran the short rows of prediction batches 1.5-3x slower in
        bfloat16 (32 rows x 64 tokens: 5.5 against 1.8 ms; 20 % of a pass's time against
        about 10 %). fp32 keeps the encoder's own attention, and so its answers."""
        if precision == "fp32":
            with torch.inference_mode():
                yield
            return
        if precision != "bf16":
            raise ValueError(f"prediction runs in 'fp32' or 'bf16', not {precision!r}")
        in_activation_dtype = self.adapter.in_activation_dtype
        self.adapter.in_activation_dtype = True
        try:
            with torch.inference_mode(), self.backbone.bf16_weights(), self.backbone.attention("eager"):
                yield
        finally:
            self.adapter.in_activation_dtype = in_activation_dtype

    def training_kernels(self):
        """The context learning runs in. With a trunk below the adapted top, attention runs as
        plain matrix products ("eager"): on a CPU the fused attention's backward pass made a
        top-3 training step 2.3x slower (197 vs 87 ms; MiniLM, 32 texts). With every layer
        adapted (no trunk) the pass stays the original one, so that it reproduces the all-layer
        method bit for bit."""
        if self.trunk_layers == 0 or self.top_layers == 0:
            return contextlib.nullcontext()
        return self.backbone.attention("eager")

    def trunk(self, batch: dict[str, torch.Tensor]) -> TopInput:
        """The trunk's output for a batch of token ids (no task's scales apply there)."""
        hidden, call = self.backbone.start(**batch)
        hidden = self.backbone.run_layers(hidden, call, 0, self.trunk_layers)  # (B, T, H)
        return TopInput(hidden, call, batch["attention_mask"])

    def top_pooled(self, inputs: TopInput, keys: Sequence[str | None],
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """The top layers on a trunk output, row i under adapter entry `keys[i]` (None: the
        plain backbone), pooled (in `dtype`, default the layers' own): (B, H).
        Differentiable (used in training)."""
        try:
            self._select(keys)
            hidden = self.backbone.run_layers(inputs.hidden, inputs.call, self.trunk_layers,
                                              self.backbone.num_layers)  # (B, T, H)
        finally:
            self.adapter.clear()
        if dtype is not None:
            hidden = hidden.to(dtype)
        return self.backbone.pool(hidden, inputs.attention_mask)

    def _select(self, keys: Sequence[str | None]) -> None:
        if all(k is None for k in keys):
            return
        if any(k is None for k in keys):
            raise ValueError("cannot mix adapter-free and adapted tasks in one batch")
        self.adapter.route(list(keys))

    def fused_logits(self, tasks: Sequence[str], ids: Sequence[Sequence[int]],
                     logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each row's head logits, fused with its task's lexical branch where it has one
        (`ids`: the rows' whole token ids; a branch fitted on the encoder's part of texts reads
        that part). Rows of tasks without a branch keep their logits."""
        out = list(logits)
        for task in dict.fromkeys(tasks):
            branch = self.lexical.get(task)
            if branch is None:
                continue
            rows = [i for i, t in enumerate(tasks) if t == task]
            neural = torch.stack([out[i].float() for i in rows])  # (R, C)
            words = [ids[i] for i in rows]
            if not branch.whole_text:
                words = self.backbone.encoder_view(words)
            elif not branch.unknown_words:
                words = self.backbone.known_ids(words)
            fused = fuse(neural.cpu(), branch.log_probs(words, self.special_ids), branch.mix)
            for i, row in zip(rows, fused.to(neural.device)):
                out[i] = row
        return out
