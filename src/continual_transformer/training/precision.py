"""Which floating-point precision a computation runs in."""

from __future__ import annotations

import functools

import torch

from ..config import PRECISIONS


@functools.cache
def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return handle.read()
    except OSError:  # not Linux: no cheap way to tell
        return ""


def native_bf16(device: torch.device) -> bool:
    """Whether the device computes bfloat16 matrix products in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether `precision` ("fp32", "bf16" or "auto") means bfloat16 autocast on `device`."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def training_autocast(precision: str, device: torch.device):
    """A context-manager factory for training forward passes in the configured precision."""
    enabled = uses_bf16(precision, device)
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def resolved(precision: str, device: torch.device) -> str:
    """The precision `precision` means on `device`: "bf16" or "fp32" ("auto" decides)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return "bf16" if uses_bf16(precision, device) else "fp32"
