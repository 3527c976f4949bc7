"""The FastAPI application: `create_app(settings)`; the model loads in the lifespan, not at import.

    ctt serve MODEL_DIR                                             # or:
    CTT_MODEL_DIR=... uvicorn --factory continual_transformer.server.app:create_app
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import __version__
from ..io.writer_lock import WriterLock
from .logs import AccessLogMiddleware, configure
from .prometheus import Metrics, MetricsMiddleware
from .routes import READ_ROUTERS, task_writes
from .security import KeyRing, RateLimiter
from .settings import Settings, get_settings
from .version_routes import version_writes, versions_read

log = logging.getLogger("continual_transformer.server")

UPLOAD_ROUTES = {"/v1/tasks", "/v1/tasks/file"}


@asynccontextmanager
async def lifespan(app: FastAPI):
    from ..learner import ContinualLearner
    from .jobs import JobRunner
    from .serving import ModelService

    settings: Settings = app.state.settings
    if settings.inference_threads is not None:
        import torch

        torch.set_num_threads(settings.inference_threads)
    lock = WriterLock(settings.model_dir, "ctt serve").acquire() if settings.writes else None
    try:
        learner = await run_in_threadpool(ContinualLearner.load, settings.model_dir, settings.device,
                                          settings.precision)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    reader = settings.role == "reader"
    service = ModelService(learner, settings.model_dir, batch_max_items=settings.batch_max_items,
                           batch_max_wait_s=settings.batch_max_wait_ms / 1000.0,
                           batch_max_tokens=settings.batch_max_tokens, metrics=app.state.metrics,
                           keep_versions=settings.keep_versions,
                           follow_interval_s=settings.reload_interval_ms / 1000.0 if reader else None)
    jobs = JobRunner(service, app.state.metrics, max_pending=settings.max_pending_jobs,
                     threads=settings.learn_threads, nice=settings.learn_nice, device=settings.device)
    service.start()
    jobs.start()
    app.state.service, app.state.jobs = service, jobs
    log.info("serving %d tasks from %s as its %s", len(learner.tasks), settings.model_dir,
             settings.role if settings.writes or reader else "read-only server")
    try:
        yield
    finally:
        await run_in_threadpool(jobs.stop)
        await run_in_threadpool(service.stop)
        if lock is not None:
            lock.release()


class BodyLimitMiddleware:
    """413 for a body over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app, max_body_bytes: int, max_upload_bytes: int):
        self.app = app
        self.limits = {False: (max_body_bytes, "CTT_MAX_BODY_BYTES"),
                       True: (max_upload_bytes, "CTT_MAX_UPLOAD_BYTES")}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, setting = self.limits[scope["method"] == "POST" and scope["path"] in UPLOAD_ROUTES]
        message = f"request body over the limit of {limit} bytes ({setting})"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": message}, 413,
                                    headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0

        async def receive_limited():
            nonlocal received
            item = await receive()
            if item["type"] == "http.request":
                received += len(item.get("body", b""))
                if received > limit:
                    raise HTTPException(413, message)
            return item

        await self.app(scope, receive_limited, send)


async def _refused_by_reader(request: Request) -> None:
    raise HTTPException(status.HTTP_409_CONFLICT,
                        f"this server is a reader of {request.app.state.settings.model_dir}: it serves "
                        "every version its writer saves but changes nothing; send learning, deleting "
                        "and rollbacks to the writer (CTT_ROLE=writer)")


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Location, message and type only: the rejected input is not echoed back.
    detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": detail}, 422)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status.HTTP_500_INTERNAL_SERVER_ERROR)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app for `settings` (default: from the environment); nothing is loaded until start-up."""
    from prometheus_client import disable_created_metrics

    settings = settings or get_settings()
    configure(settings.log_format)
    disable_created_metrics()  # the `_created` series only repeat the start time
    app = FastAPI(
        title="continual-tiny-transformer",
        version=__version__,
        summary="Every task of one frozen tiny transformer over HTTP; learns new tasks while serving.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.keys = KeyRing(
        settings.admin_key.get_secret_value() if settings.admin_key is not None else None,
        settings.reader_keys(),
    )
    app.state.tokens = settings.token_verifier()  # None without CTT_JWT_* keys
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
    for router in (*READ_ROUTERS, versions_read):
        app.include_router(router)
    if settings.writes:
        app.include_router(task_writes)
        app.include_router(version_writes)
    elif settings.role == "reader":  # the same routes, each answering where to send the change
        for router in (task_writes, version_writes):
            app.include_router(router, dependencies=[Depends(_refused_by_reader)])
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)  # outermost: times it all
    return app
