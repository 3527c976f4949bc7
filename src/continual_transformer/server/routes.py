"""The HTTP routes: one router per resource. Each parses, calls the model service, formats."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..data.source import ReadOptions, tasks_from_upload
from ..data.stream import check_row, tasks_from_rows
from ..extras import MissingExtra
from ..task_free import TaskFreeAnswer
from ..types import StreamError, Task, check_task_name
from .deps import (DeleterDep, JobsDep, LearnerDep, MetricsDep, MetricsReaderDep, PredictorDep,
                   ReaderDep, ServiceDep, SettingsDep)
from .jobs import Job, JobRejected
from .schemas import (CandidateOut, ErrorOut, Health, JobOut, JobsResponse, PredictionOut, PredictRequest,
                      PredictResponse, Ready, TaskDeletion, TaskOut, TasksResponse, TaskUpload)
from .security import Caller
from .serving import PredictionRefused, UnknownTask
from .settings import Settings


def _sees(caller: Caller):
    """The filter a tenant's requests go through (None: the caller sees every task)."""
    return None if caller.tasks is None else caller.sees


def _involve(request: Request, tasks, job: str | None = None) -> None:
    """Name the tasks (and job) a request touched, for its log line."""
    request.state.tasks = sorted({t for t in tasks if t is not None})
    if job is not None:
        request.state.job = job


def _errors(*codes: int) -> dict:
    why = {400: "the body could not be parsed (not UTF-8 JSON, broken multipart)",
           401: "missing or invalid key or token", 403: "the key or token lacks the scope (or task)",
           404: "not found",
           409: "conflicts with a task or job", 413: "over a size limit (named in the message)",
           415: "a file format this server cannot read (an optional package is not installed)",
           422: "invalid input (the message names the problem or the limit)",
           429: "rate limited or too many jobs (see Retry-After)", 503: "not ready"}
    return {code: {"model": ErrorOut, "description": why[code]} for code in codes}


AUTH = (401, 403, 429)  # 403: the key or token lacks the scope

# -- operations --------------------------------------------------------------------------------
ops = APIRouter(tags=["operations"])


@ops.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive."""
    return Health(status="ok")


@ops.get("/readyz", response_model=Ready, responses=_errors(503))
async def readyz(service: ServiceDep, settings: SettingsDep) -> Ready:
    """The model is loaded and its inference worker is serving; which version of it."""
    if not service.ready:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the inference worker is not running")
    version, names = service.served_version()
    role = settings.role if settings.writes or settings.role == "reader" else "read-only"
    return Ready(status="ready", tasks=len(names), version=version,
                 precision=service.learner.prediction_precision(), role=role)


@ops.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}},
                                                        **_errors(*AUTH)})
async def metrics(_: MetricsReaderDep, metrics: MetricsDep) -> Response:
    """Prometheus text format: requests, latency, predictions by task, jobs, tasks loaded."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# -- predictions -------------------------------------------------------------------------------
predictions = APIRouter(prefix="/v1", tags=["predict"])


@predictions.post("/predict", response_model=PredictResponse, responses=_errors(*AUTH, 400, 413, 422))
async def predict(body: PredictRequest, caller: PredictorDep, service: ServiceDep, settings: SettingsDep,
                  metrics: MetricsDep, request: Request) -> PredictResponse:
    """Label and label probabilities per item; items may mix tasks (one forward pass). An item
    without a task is routed among the tasks the caller may see."""
    if len(body.items) > settings.max_items:
        raise HTTPException(413,
                            f"{len(body.items)} items, more than the limit of {settings.max_items} "
                            "per request (CTT_MAX_ITEMS)")
    for i, item in enumerate(body.items):
        if len(item.text) > settings.max_text_chars:
            raise HTTPException(422,
                                f"items[{i}].text has {len(item.text)} characters, more than the limit "
                                f"of {settings.max_text_chars} (CTT_MAX_TEXT_CHARS)")
    _involve(request, [i.task for i in body.items])
    try:
        results = await service.predict([i.text for i in body.items], [i.task for i in body.items],
                                        _sees(caller), TaskFreeAnswer(body.top_k, body.min_task_confidence,
                                                                       body.joint_k))
    except (UnknownTask, PredictionRefused) as exc:
        raise HTTPException(422, str(exc)) from None
    _involve(request, [p.task for p in results])
    for p in results:
        metrics.predictions.labels(p.task or "(ambiguous)").inc()
    return PredictResponse(predictions=[PredictionOut(
        status=p.status, task=p.task, label=p.label, probabilities=p.probabilities,
        task_probability=p.task_probability,
        candidates=[CandidateOut(task=t, probability=q) for t, q in p.candidates]) for p in results])


# -- tasks -------------------------------------------------------------------------------------
tasks = APIRouter(prefix="/v1", tags=["tasks"])


@tasks.get("/tasks", response_model=TasksResponse, responses=_errors(*AUTH))
async def list_tasks(caller: ReaderDep, service: ServiceDep) -> TasksResponse:
    """Tasks served (those the caller may see), with labels, footprint, when learned and test
    accuracy if known."""
    return TasksResponse(tasks=[
        TaskOut(name=r.name, labels=list(r.labels), learned_at=r.learned_at,
                train_examples=r.train_examples, adapter_parameters=r.adapter_parameters,
                head_parameters=r.head_parameters, bytes_added=r.bytes_added,
                test_accuracy=r.stats.get("test_accuracy"))
        for r in service.records(_sees(caller))
    ])


def _check_limits(task: Task, settings: Settings) -> None:
    if len(task.train) > settings.max_train_examples:
        raise StreamError(f"task {task.name!r} has {len(task.train)} train examples, more than the "
                          f"limit of {settings.max_train_examples} (CTT_MAX_TRAIN_EXAMPLES)")
    for split, examples in (("train", task.train), ("test", task.test)):
        for i, example in enumerate(examples):
            if len(example.text) > settings.max_text_chars:
                raise StreamError(f"task {task.name!r}: {split} example {i} has {len(example.text)} "
                                  f"characters, more than the limit of {settings.max_text_chars} "
                                  "(CTT_MAX_TEXT_CHARS)")


def _submit(task: Task, epochs: int | None, settings: Settings, jobs, response: Response,
            caller: Caller, request: Request) -> JobOut:
    _involve(request, [task.name])
    if not caller.sees(task.name):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            f"this token may not learn task {task.name!r}: it is outside the token's tasks")
    try:
        _check_limits(task, settings)
        job = jobs.submit(task, epochs)
    except StreamError as exc:
        raise HTTPException(422, str(exc)) from None
    except JobRejected as exc:
        headers = {"Retry-After": "60"} if exc.status == 429 else None
        raise HTTPException(exc.status, str(exc), headers=headers) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    request.state.job = job.id
    return _job_out(job)


LEARN_ERRORS = _errors(*AUTH, 400, 403, 409, 413, 422)
FILE_ERRORS = _errors(*AUTH, 400, 403, 409, 413, 415, 422)


# Learning and deleting: served only with CTT_ENABLE_WRITES=true (the default); the admin key,
# or a token with the scope `learn` / `delete` for tasks among its own.
task_writes = APIRouter(prefix="/v1", tags=["tasks"])


@task_writes.post("/tasks", response_model=JobOut, status_code=status.HTTP_202_ACCEPTED,
            responses=LEARN_ERRORS)
async def learn_task(body: TaskUpload, caller: LearnerDep, settings: SettingsDep, jobs: JobsDep,
                     response: Response, request: Request) -> JobOut:
    """Learn a new task from JSON examples, in the background; returns the job (see /v1/jobs/{id}).

    Checked like a stream file, with the same messages; locations read `train[i]` / `test[i]`.
    """
    try:
        check_task_name(body.name, "name")
        rows = [(f"{split}[{i}]", check_row({"task": body.name, "split": split, "text": e.text,
                                             "label": e.label}, f"{split}[{i}]"))
                for split, examples in (("train", body.train), ("test", body.test))
                for i, e in enumerate(examples)]
        (task,) = tasks_from_rows(rows, "upload", require_test=False)
    except StreamError as exc:
        raise HTTPException(422, str(exc)) from None
    return _submit(task, body.epochs, settings, jobs, response, caller, request)


def _column(what: str):
    return Form(min_length=1, max_length=200, description=f"Column of the {what}.")


@task_writes.post("/tasks/file", response_model=JobOut, status_code=status.HTTP_202_ACCEPTED,
            responses=FILE_ERRORS)
async def learn_task_file(file: Annotated[UploadFile, File(description="A stream file holding one "
                                                           "task: JSONL (plain or gzip), CSV, TSV "
                                                           "or Parquet.")],
                          caller: LearnerDep, settings: SettingsDep, jobs: JobsDep,
                          response: Response, request: Request,
                          epochs: Annotated[int | None, Form(ge=1, le=100)] = None,
                          file_format: Annotated[str | None, Form(
                              alias="format", description="jsonl, csv, tsv or parquet; default: "
                              "from the file name, else the part's content type, else jsonl.")] = None,
                          text_column: Annotated[str | None, _column("texts [text]")] = None,
                          label_column: Annotated[str | None, _column("labels [label]")] = None,
                          task_column: Annotated[str | None, _column("task name [task]")] = None,
                          split_column: Annotated[str | None, _column("split [split]")] = None,
                          task_name: Annotated[str | None, Form(
                              description="The task, for a file without a task column "
                              "[default: the file's name].")] = None) -> JobOut:
    """Learn a new task from a stream file: JSONL lines `{task, split, text, label}`, or a CSV,
    TSV or Parquet table with those columns (other names: the `*_column` fields).

    Validated exactly like `ctt run` validates a stream; test rows are optional here, and a
    table without a split column is all train rows.
    """
    source = (file.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:100] or "upload"
    data = await file.read()
    try:
        given = {"format": file_format, "text_column": text_column, "label_column": label_column,
                 "task_column": task_column, "split_column": split_column, "task_name": task_name}
        options = ReadOptions(**{k: v for k, v in given.items() if v is not None})
        # in a worker thread: checking a large file must not hold up the event loop's requests
        found = await run_in_threadpool(tasks_from_upload, data, source, options,
                                        content_type=file.content_type)
    except ValueError as exc:  # StreamError included
        raise HTTPException(422, str(exc)) from None
    except MissingExtra as exc:
        raise HTTPException(415, str(exc)) from None
    if len(found) != 1:
        raise HTTPException(422,
                            f"{source} holds {len(found)} tasks {[t.name for t in found]}; "
                            "upload one task per request")
    return _submit(found[0], epochs, settings, jobs, response, caller, request)


@task_writes.delete("/tasks/{name}", status_code=status.HTTP_204_NO_CONTENT,
              responses=_errors(*AUTH, 400, 403, 404, 413, 422))
async def delete_task(name: str, caller: DeleterDep, service: ServiceDep, request: Request,
                      body: TaskDeletion | None = None) -> Response:
    """Remove a task (its vectors and head); it stops answering, other tasks are unchanged.

    Without a body, the router's shared statistics keep the task's training rows as background
    data. With `{"train_texts": [...]}` (the task's training texts, in the order it learned
    them) their share goes too: the router is then the one that never learned the task. The
    texts are checked first; if they are not the task's, nothing is deleted (422). Their
    trunk pass shares the backbone with predictions, which wait for it.
    """
    _involve(request, [name])
    texts = body.train_texts if body is not None else None
    try:
        await run_in_threadpool(service.delete_task, name, _sees(caller), texts)
    except UnknownTask as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except ValueError as exc:  # texts that are not the task's, or a method without a router
        raise HTTPException(422, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- jobs --------------------------------------------------------------------------------------
jobs_router = APIRouter(prefix="/v1", tags=["jobs"])


def _job_out(job: Job) -> JobOut:
    return JobOut(**vars(job))


@jobs_router.get("/jobs", response_model=JobsResponse, responses=_errors(*AUTH))
async def list_jobs(caller: ReaderDep, jobs: JobsDep) -> JobsResponse:
    """Learning jobs since the server started (the latest 1000 finished ones), oldest first;
    those of the caller's tasks."""
    return JobsResponse(jobs=[_job_out(j) for j in jobs.list() if caller.sees(j.task)])


@jobs_router.get("/jobs/{job_id}", response_model=JobOut, responses=_errors(*AUTH, 404))
async def get_job(job_id: str, caller: ReaderDep, jobs: JobsDep, request: Request) -> JobOut:
    """A learning job's state and progress."""
    job = jobs.get(job_id)
    if job is None or not caller.sees(job.task):  # another tenant's job does not exist
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown job {job_id!r}")
    _involve(request, [job.task], job.id)
    return _job_out(job)


READ_ROUTERS = (ops, predictions, tasks, jobs_router)
