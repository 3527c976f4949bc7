"""`finetune`: the shared scale entry is trained on each task in turn with nothing to protect
what earlier tasks need: the lower bound, and the baseline that shows forgetting.

Defaults: those of `TrainConfig` (AdamW, lr 3e-2 for the scale vectors and 5e-2 for the heads,
3 epochs, batch 32, 6% warm-up then linear decay), the same as `ia3`'s.
"""

from __future__ import annotations

from .shared_adapter import SharedAdapterMethod


class FinetuneMethod(SharedAdapterMethod):
    name = "finetune"
