"""Typed dependencies: settings, the served model, the job runner, and who is calling.

Every route that needs a caller names one of `ReaderDep`, `AdminDep` or `PredictorDep`; each
checks the bearer key (constant time), then the caller's rate limit.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .jobs import JobRunner
from .prometheus import Metrics
from .security import Caller, KeyRing, RateLimiter
from .serving import ModelService
from .settings import Settings

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <key>`: CTT_ADMIN_KEY or one of CTT_API_KEYS.")


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_service(request: Request) -> ModelService:
    return request.app.state.service


async def get_jobs(request: Request) -> JobRunner:
    return request.app.state.jobs


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ServiceDep = Annotated[ModelService, Depends(get_service)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"})


def _limit(request: Request, caller: Caller) -> Caller:
    limiter: RateLimiter = request.app.state.rate_limiter
    wait = limiter.retry_after(caller.id)
    if wait is not None:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            f"rate limit exceeded: {limiter.rate * 60:g} requests per minute per key "
            f"(CTT_RATE_LIMIT_PER_MINUTE), bursts of {limiter.burst:g} (CTT_RATE_LIMIT_BURST); "
            f"retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    return caller


def _caller(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Caller | None:
    if credentials is None:
        if request.headers.get("authorization"):
            raise _unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        return None
    keys: KeyRing = request.app.state.keys
    caller = keys.caller(credentials.credentials)
    if caller is None:
        raise _unauthorized("invalid key")
    return caller


async def require_reader(request: Request, credentials: Credentials) -> Caller:
    caller = _caller(request, credentials)
    if caller is None:
        raise _unauthorized("missing key: send 'Authorization: Bearer <key>'")
    return _limit(request, caller)


async def require_admin(request: Request, credentials: Credentials) -> Caller:
    caller = await require_reader(request, credentials)
    if caller.role != "admin":
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this needs the admin key (CTT_ADMIN_KEY)")
    return caller


async def require_predictor(request: Request, credentials: Credentials, settings: SettingsDep) -> Caller:
    caller = _caller(request, credentials)
    if caller is None:
        if not settings.public_predict:
            raise _unauthorized("missing key: send 'Authorization: Bearer <key>' "
                                "(or the operator sets CTT_PUBLIC_PREDICT=true)")
        host = request.client.host if request.client else "unknown"
        caller = Caller(f"address:{host}", "public")
    return _limit(request, caller)


async def require_metrics_reader(request: Request, credentials: Credentials, settings: SettingsDep) -> Caller | None:
    if settings.public_metrics and _caller(request, credentials) is None:
        return None
    return await require_reader(request, credentials)


ReaderDep = Annotated[Caller, Depends(require_reader)]
AdminDep = Annotated[Caller, Depends(require_admin)]
PredictorDep = Annotated[Caller, Depends(require_predictor)]
MetricsReaderDep = Annotated[Caller | None, Depends(require_metrics_reader)]
