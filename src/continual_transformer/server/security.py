"""Who is calling (static bearer keys checked in constant time, or a verified JWT: `tokens.py`),
what they may do, and a token-bucket rate limit per caller."""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Literal

from .tokens import SCOPES, TaskScope

Role = Literal["admin", "reader", "public", "token"]
# What the static keys may do: the admin key everything, reader keys read and predict.
ROLE_SCOPES = {"admin": frozenset(SCOPES), "reader": frozenset({"read", "predict"}),
               "public": frozenset({"predict"})}


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison's time independent of the key's length.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Caller:
    """Who sent a request: `id` keys the rate limit and is what logs show (never the key or
    token itself); `scopes` what they may do; `tasks` the tasks they may see (None: all)."""

    id: str
    role: Role
    scopes: frozenset[str] = frozenset()
    tasks: TaskScope | None = None

    def __post_init__(self) -> None:
        if not self.scopes and self.role in ROLE_SCOPES:
            object.__setattr__(self, "scopes", ROLE_SCOPES[self.role])

    def may(self, scope: str) -> bool:
        return scope in self.scopes

    def sees(self, task: str) -> bool:
        return self.tasks is None or self.tasks.allows(task)


class KeyRing:
    """The admin key and the reader keys; `caller(key)` is None for an unknown key."""

    def __init__(self, admin_key: str | None, reader_keys: tuple[str, ...]):
        self._keys: list[tuple[bytes, Role]] = []
        if admin_key is not None:
            self._keys.append((_digest(admin_key), "admin"))
        self._keys += [(_digest(key), "reader") for key in reader_keys]

    def caller(self, key: str) -> Caller | None:
        presented = _digest(key)
        role: Role | None = None
        for digest, key_role in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(presented, digest) and role is None:
                role = key_role
        if role is None:
            return None
        return Caller(f"key:{presented.hex()[:12]}", role)


class RateLimiter:
    """A token bucket per caller: `burst` requests at once, refilled at `per_minute`."""

    MAX_CALLERS = 10_000  # public callers are keyed by address; idle full buckets are dropped

    def __init__(self, per_minute: int, burst: int):
        if per_minute < 0 or burst < 1:
            raise ValueError(f"rate limit needs per_minute >= 0 and burst >= 1, got {per_minute}, {burst}")
        self.rate = per_minute / 60.0  # tokens per second; 0 = no limit
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller id -> (tokens, last time)
        self._lock = threading.Lock()

    def retry_after(self, caller_id: str, now: float | None = None) -> int | None:
        """Take one token; None when allowed, else the whole seconds until a token is back."""
        if self.rate == 0:
            return None
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(caller_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[caller_id] = (tokens - 1.0, now)
                if len(self._buckets) > self.MAX_CALLERS:
                    self._drop_idle(now)
                return None
            self._buckets[caller_id] = (tokens, now)
            return max(1, math.ceil((1.0 - tokens) / self.rate))

    def _drop_idle(self, now: float) -> None:
        for caller_id, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.rate >= self.burst:
                del self._buckets[caller_id]
