"""The model directory's versions over HTTP (admin key only): list them, roll back to one.

Listing is served always; rolling back only with CTT_ENABLE_WRITES=true (the default). Pruning
is not served: it deletes files, so it stays with the operator (`ctt prune`, server stopped).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from ..io.store import CheckpointError, UnknownVersion
from .deps import AdminDep, ServiceDep
from .security import Caller
from .schemas import ErrorOut, RollbackOut, VersionOut, VersionsResponse

versions_read = APIRouter(prefix="/v1", tags=["versions"])
version_writes = APIRouter(prefix="/v1", tags=["versions"])

_WHY = {401: "missing or invalid key", 403: "needs the admin key",
        404: "unknown version (the message lists the kept ones)",
        409: "the version's files are damaged (named in the message); nothing changed",
        429: "rate limited (see Retry-After)"}


def _errors(*codes: int) -> dict:
    return {code: {"model": ErrorOut, "description": _WHY[code]} for code in codes}


def _every_task(caller: Caller) -> None:
    # Versions list every task of the model: a token limited to some tasks may not see them.
    if caller.tasks is not None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "versions name every task: this needs the "
                                                       "admin key or an admin token for all tasks")


@versions_read.get("/versions", response_model=VersionsResponse, responses=_errors(401, 403, 429))
async def get_versions(caller: AdminDep, service: ServiceDep) -> VersionsResponse:
    """Every kept version of the served model directory, oldest first: when, tasks, what changed."""
    _every_task(caller)
    from ..io.versions import list_versions  # not at import: it brings torch

    found = await run_in_threadpool(list_versions, service.model_dir)
    return VersionsResponse(versions=[VersionOut(version=v.number, saved_at=v.saved_at, change=v.change,
                                                 tasks=list(v.tasks), current=v.current) for v in found])


@version_writes.post("/versions/{version}/rollback", response_model=RollbackOut,
                     responses=_errors(401, 403, 404, 409, 429))
async def rollback(version: int, caller: AdminDep, service: ServiceDep) -> RollbackOut:
    """Serve an earlier version again, as a new version (the history only grows). The switch is
    atomic: each request is answered by the old version or the new one, never a mixture."""
    _every_task(caller)
    try:
        number = await run_in_threadpool(service.rollback, version)
    except UnknownVersion as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except CheckpointError as exc:  # the old version's files are damaged: nothing changed
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    _, tasks = service.served_version()
    return RollbackOut(version=number, restored=version, tasks=list(tasks))
