"""Server settings, from `CTT_*` environment variables or a `.env` file (pydantic-settings).

Nothing is read at import: `get_settings()` reads once, on first use, and caches. `ctt serve`
builds its `Settings` with the model directory from the command line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTT_", env_file=".env", extra="ignore",
                                      frozen=True)

    model_dir: Path = Field(description="Model directory written by `ctt run` (DIR/model).")
    device: str = "auto"

    # -- security ------------------------------------------------------------------------------
    admin_key: SecretStr | None = Field(None, description="Authorises everything, learning and deleting included.")
    api_keys: SecretStr = Field(SecretStr(""), description="Comma-separated keys that may read and predict.")
    public_predict: bool = Field(False, description="Let callers without a key predict.")
    public_metrics: bool = Field(False, description="Let callers without a key read /metrics.")
    enable_writes: bool = Field(True, description="Serve POST /v1/tasks and DELETE /v1/tasks/{name}.")
    rate_limit_per_minute: int = Field(600, ge=0, description="Requests per minute per key (or per client address when public); 0 turns the limit off.")
    rate_limit_burst: int = Field(60, ge=1, description="Requests a key may send at once before the per-minute rate applies.")

    # -- input limits --------------------------------------------------------------------------
    max_items: int = Field(64, ge=1, description="Items per prediction request.")
    max_text_chars: int = Field(5000, ge=1, description="Characters per text (predictions and uploads).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Bytes per request body, uploads excepted.")
    max_upload_bytes: int = Field(50 << 20, ge=1024, description="Bytes per task upload (POST /v1/tasks, /v1/tasks/file).")
    max_train_examples: int = Field(100_000, ge=2, description="Training examples per uploaded task.")
    max_pending_jobs: int = Field(4, ge=1, description="Learning jobs queued or running at once.")

    # -- throughput ----------------------------------------------------------------------------
    batch_max_items: int = Field(64, ge=1, description="Most texts grouped into one forward pass.")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long the first request of a batch waits for others.")
    batch_max_tokens: int = Field(1024, ge=1, description="Padded tokens (rows x longest) per forward pass; rows are grouped by length.")
    inference_threads: int | None = Field(None, ge=1, description="CPU threads of the forward passes (default: PyTorch's, one per core).")
    learn_threads: int = Field(1, ge=1, description="CPU threads of a learning job (its own process).")
    learn_nice: int = Field(10, ge=0, le=19, description="Niceness of the learning process, so serving keeps the CPU.")

    @model_validator(mode="after")
    def _check_keys(self) -> "Settings":
        if self.enable_writes and self.admin_key is None:
            raise ValueError(
                "CTT_ADMIN_KEY is not set and the write endpoints (learning and deleting tasks) are "
                "enabled: set CTT_ADMIN_KEY to a secret of at least "
                f"{MIN_KEY_LENGTH} characters, or set CTT_ENABLE_WRITES=false to serve read-only"
            )
        if self.admin_key is not None and len(self.admin_key.get_secret_value()) < MIN_KEY_LENGTH:
            raise ValueError(
                f"CTT_ADMIN_KEY has {len(self.admin_key.get_secret_value())} characters; "
                f"use at least {MIN_KEY_LENGTH}"
            )
        for i, key in enumerate(self.reader_keys()):
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"CTT_API_KEYS: key {i + 1} has {len(key)} characters; use at least {MIN_KEY_LENGTH}"
                )
        return self

    def reader_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  (model_dir comes from CTT_MODEL_DIR)
