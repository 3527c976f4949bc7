"""Per-task (or shared) modules injected into the frozen backbone."""

from .ia3 import IA3, TARGETS

__all__ = ["IA3", "TARGETS"]
