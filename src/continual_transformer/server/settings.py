"""Server settings, from `CTT_*` environment variables or a `.env` file (pydantic-settings).

Nothing is read at import: `get_settings()` reads once, on first use, and caches. `ctt serve`
builds its `Settings` with the model directory from the command line.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIN_KEY_LENGTH = 16
MIN_JWT_SECRET_LENGTH = 32  # RFC 7518: an HS256 key of at least the hash's 256 bits


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTT_", env_file=".env", extra="ignore",
                                      frozen=True)

    model_dir: Path = Field(description="Model directory written by `ctt run` (DIR/model).")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="What predictions compute in: auto (bfloat16 where the hardware has it), fp32 or bf16.")
    role: Literal["writer", "reader"] = Field(
        "writer", description="writer: the one server of a model directory that learns, deletes and rolls back (it "
        "holds the directory's lock); reader: predicts, never writes, and serves each new version the writer saves.")
    reload_interval_ms: float = Field(250.0, ge=10, le=60_000, description="How often a reader looks for a new version of the model directory.")

    # -- security ------------------------------------------------------------------------------
    admin_key: SecretStr | None = Field(None, description="Authorises everything, learning and deleting included.")
    api_keys: SecretStr = Field(SecretStr(""), description="Comma-separated keys that may read and predict.")
    public_predict: bool = Field(False, description="Let callers without a key predict.")
    public_metrics: bool = Field(False, description="Let callers without a key read /metrics.")
    enable_writes: bool = Field(True, description="Serve POST /v1/tasks and DELETE /v1/tasks/{name}.")
    # -- scoped tokens (JWT; see tokens.py and docs/serving.md) -------------------------------
    jwt_secret: SecretStr | None = Field(None, description="HS256 shared secret (32+ characters) that signs bearer JWTs.")
    jwt_public_key: Path | None = Field(None, description="PEM file of the RSA or EC public key that verifies RS256 / ES256 JWTs.")
    jwt_jwks: Path | None = Field(None, description="JWKS file (JSON) of public keys, chosen by the token's 'kid'; never fetched.")
    jwt_issuer: str | None = Field(None, description="Required 'iss' of every JWT.")
    jwt_audience: str | None = Field(None, description="Required 'aud' of every JWT.")
    jwt_leeway_seconds: float = Field(30.0, ge=0, le=600, description="Clock skew allowed on exp / nbf / iat.")
    jwt_tasks_claim: str = Field("tasks", min_length=1, description="The claim listing a token's tasks (names, or prefixes ending in '*').")
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
    # 256 texts and 2,048 tokens: measured with 32 clients of 8 texts each (benchmarks/predict.py),
    # 150 texts/s against 129 with 64 and 1,024: a larger batch sorts its texts by length better.
    batch_max_items: int = Field(256, ge=1, description="Most texts waiting in the inference worker's pool, from which each forward pass takes the oldest and those nearest its length; more requests wait in the queue.")
    batch_max_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long a request that finds the server idle waits for others to share its forward passes.")
    batch_max_tokens: int = Field(2048, ge=1, description="Padded tokens (rows x longest) per forward pass; rows are grouped by length.")
    inference_threads: int | None = Field(None, ge=1, description="CPU threads of the forward passes (default: PyTorch's, one per core).")
    learn_threads: int = Field(1, ge=1, description="CPU threads of a learning job (its own process).")
    keep_versions: int | None = Field(None, ge=1, description="Keep only the newest N versions of the model directory after each change (older manifests and files no kept version lists are removed); default: all, until `ctt prune`.")
    access_log: bool = Field(True, description="Log one line per request (see log_format).")
    log_format: Literal["text", "json"] = Field("text", description="Request and job logs: 'text' lines for a terminal, or one JSON object per line.")
    learn_nice: int = Field(10, ge=0, le=19, description="Niceness of the learning process, so serving keeps the CPU.")

    @model_validator(mode="after")
    def _check_keys(self) -> "Settings":
        if self.writes and self.admin_key is None and not self.jwt_enabled:
            raise ValueError(
                "CTT_ADMIN_KEY is not set and the write endpoints (learning and deleting tasks) are "
                "enabled: set CTT_ADMIN_KEY to a secret of at least "
                f"{MIN_KEY_LENGTH} characters (or configure JWTs: CTT_JWT_SECRET, "
                "CTT_JWT_PUBLIC_KEY or CTT_JWT_JWKS), or set CTT_ENABLE_WRITES=false to serve read-only"
            )
        if self.jwt_secret is not None and len(self.jwt_secret.get_secret_value()) < MIN_JWT_SECRET_LENGTH:
            raise ValueError(f"CTT_JWT_SECRET has {len(self.jwt_secret.get_secret_value())} "
                             f"characters; use at least {MIN_JWT_SECRET_LENGTH}")
        if self.jwt_enabled:
            self.token_verifier()  # a key file that does not parse stops the server here
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

    @property
    def writes(self) -> bool:
        """Whether this server learns, deletes and rolls back (a reader never does)."""
        return self.enable_writes and self.role == "writer"

    @property
    def jwt_enabled(self) -> bool:
        return any(v is not None for v in (self.jwt_secret, self.jwt_public_key, self.jwt_jwks))

    def token_verifier(self):
        """The JWT verifier these settings describe (None when no JWT key is configured)."""
        if not self.jwt_enabled:
            return None
        from .tokens import TokenVerifier

        return TokenVerifier(
            secret=self.jwt_secret.get_secret_value() if self.jwt_secret is not None else None,
            public_key=self.jwt_public_key, jwks=self.jwt_jwks, issuer=self.jwt_issuer,
            audience=self.jwt_audience, leeway_seconds=self.jwt_leeway_seconds,
            tasks_claim=self.jwt_tasks_claim)

    def reader_keys(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip())


@lru_cache
def get_settings() -> Settings:
    return Settings()  # type: ignore[call-arg]  (model_dir comes from CTT_MODEL_DIR)
