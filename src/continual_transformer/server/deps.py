"""Typed dependencies: settings, the served model, the job runner, and who is calling.

Every route that needs a caller names the scope it needs: `PredictorDep` (predict), `ReaderDep`
(read), `LearnerDep` (learn), `DeleterDep` (delete) or `AdminDep` (admin). Each checks the
bearer credential (a static key, compared in constant time, or a JWT: `tokens.py`), then the
scope, then the caller's rate limit, and leaves the caller's id in `request.state` for the log.
Which tasks a caller may touch is the routes' business (`Caller.sees`).
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
from .tokens import TokenError, TokenVerifier, looks_like_jwt

bearer = HTTPBearer(auto_error=False, description="`Authorization: Bearer <credential>`: "
                    "CTT_ADMIN_KEY, one of CTT_API_KEYS, or a JWT with scopes (docs/serving.md).")


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
    credential = credentials.credentials
    verifier: TokenVerifier | None = request.app.state.tokens
    if verifier is not None and looks_like_jwt(credential):
        try:
            claims = verifier.verify(credential)
        except TokenError as exc:
            raise _unauthorized(str(exc)) from None
        caller = Caller(f"token:{claims.subject}", "token", claims.scopes, claims.tasks)
    else:
        keys: KeyRing = request.app.state.keys
        caller = keys.caller(credential)
        if caller is None:
            raise _unauthorized("invalid key")
    request.state.caller = caller.id
    return caller


def _forbidden(caller: Caller, scope: str) -> HTTPException:
    if caller.role == "token":
        return HTTPException(status.HTTP_403_FORBIDDEN, f"this token lacks the scope {scope!r}")
    return HTTPException(status.HTTP_403_FORBIDDEN, "this needs the admin key (CTT_ADMIN_KEY)")


def requires(scope: str):
    """The dependency of a route that needs `scope`."""

    async def dependency(request: Request, credentials: Credentials) -> Caller:
        caller = _caller(request, credentials)
        if caller is None:
            raise _unauthorized("missing key: send 'Authorization: Bearer <key>'")
        if not caller.may(scope):
            raise _forbidden(caller, scope)
        return _limit(request, caller)

    dependency.__name__ = f"require_{scope}"
    return dependency


require_read = requires("read")


async def require_predictor(request: Request, credentials: Credentials, settings: SettingsDep) -> Caller:
    caller = _caller(request, credentials)
    if caller is None:
        if not settings.public_predict:
            raise _unauthorized("missing key: send 'Authorization: Bearer <key>' "
                                "(or the operator sets CTT_PUBLIC_PREDICT=true)")
        host = request.client.host if request.client else "unknown"
        caller = Caller(f"address:{host}", "public")
        request.state.caller = caller.id
    elif not caller.may("predict"):
        raise _forbidden(caller, "predict")
    return _limit(request, caller)


async def require_metrics_reader(request: Request, credentials: Credentials, settings: SettingsDep) -> Caller | None:
    if settings.public_metrics and _caller(request, credentials) is None:
        return None
    caller = await require_read(request, credentials)
    if caller.tasks is not None:  # the series are labelled with every task's name
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            "/metrics names every task: it needs a token for all tasks")
    return caller


ReaderDep = Annotated[Caller, Depends(require_read)]
LearnerDep = Annotated[Caller, Depends(requires("learn"))]
DeleterDep = Annotated[Caller, Depends(requires("delete"))]
AdminDep = Annotated[Caller, Depends(requires("admin"))]
PredictorDep = Annotated[Caller, Depends(require_predictor)]
MetricsReaderDep = Annotated[Caller | None, Depends(require_metrics_reader)]
