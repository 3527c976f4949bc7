"""Request and response bodies of the HTTP API (they are the OpenAPI schema at /docs).

Limits that the operator sets (items per request, characters per text, examples per task) are
checked in the routes, which name the setting in the message; the schema checks the shapes.
Uploaded examples are checked by the stream-file rules (`data.check_row`), so that an upload
gets the same messages as `ctt run`; the schema documents those rules without enforcing them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..types import TASK_NAME

TASK_NAME_RULE = {"pattern": TASK_NAME.pattern}  # documented; checked with the stream message
NOT_BLANK_RULE = {"minLength": 1, "pattern": r"\S"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- predict -----------------------------------------------------------------------------------
class PredictItem(Strict):
    text: str = Field(min_length=1, description="The text to classify.")
    task: str | None = Field(None, description="Task to answer for; leave out to let the model route.",
                             json_schema_extra=TASK_NAME_RULE)


class PredictRequest(Strict):
    items: list[PredictItem] = Field(min_length=1, description="Items may name different tasks.")
    top_k: int = Field(1, ge=1, le=100, description="For items without a task: how many candidate "
                       "tasks to name, most likely first, with their probabilities.")
    min_task_confidence: float | None = Field(
        None, ge=0.0, le=1.0, description="For items without a task: below this probability of the "
        "routed task, the answer is status 'ambiguous' with its candidate tasks (at least 2), no "
        "task and no label. The router's probabilities are calibrated (see the README).")
    joint_k: int = Field(1, ge=1, le=10, description="For items without a task: how many of the "
                         "router's most likely tasks answer the item; it goes to the one with the highest "
                         "router probability x head certainty (1: the router alone).")


class CandidateOut(BaseModel):
    task: str
    probability: float


class PredictionOut(BaseModel):
    status: Literal["ok", "ambiguous"] = Field(
        "ok", description="'ambiguous': the routed task's probability was below min_task_confidence.")
    task: str | None = Field(description="null only when status is 'ambiguous'.")
    label: str | None = Field(description="null only when status is 'ambiguous'.")
    probabilities: dict[str, float]
    task_probability: float | None = Field(
        None, description="For an item without a task: the probability of the task it was routed to.")
    candidates: list[CandidateOut] = Field(
        default_factory=list, description="For an item without a task: its top_k most likely tasks.")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]


# -- tasks -------------------------------------------------------------------------------------
class TaskOut(BaseModel):
    name: str
    labels: list[str]
    learned_at: str
    train_examples: int
    adapter_parameters: int
    head_parameters: int
    bytes_added: int = Field(description="Footprint: bytes this task added to the model.")
    test_accuracy: float | None = Field(None, description="On the test examples given when it was learned.")


class TasksResponse(BaseModel):
    tasks: list[TaskOut]


class ExampleIn(Strict):
    text: str = Field(json_schema_extra=NOT_BLANK_RULE)
    label: str = Field(json_schema_extra=NOT_BLANK_RULE)


class TaskUpload(Strict):
    name: str = Field(description="1-64 letters, digits, '_' or '-', starting with a letter or digit.",
                      json_schema_extra=TASK_NAME_RULE)
    train: list[ExampleIn] = Field(min_length=1)
    test: list[ExampleIn] = Field(default_factory=list, description="Optional; gives the task's test accuracy.")
    epochs: int | None = Field(None, ge=1, le=100, description="Overrides the model's epochs for this task.")


class TaskDeletion(Strict):
    train_texts: list[str] = Field(
        min_length=1,
        description="The task's training texts, all of them, in the order it learned them: their "
        "share of the router's shared statistics is taken out too, so the router becomes the one "
        "that never learned the task. Checked first against the task's fingerprint; if they "
        "differ, nothing is deleted (422).")


# -- jobs --------------------------------------------------------------------------------------
class JobOut(BaseModel):
    id: str
    task: str
    state: Literal["queued", "running", "succeeded", "failed"]
    created_at: str
    started_at: str | None
    finished_at: str | None
    step: int = Field(description="Training steps done.")
    total_steps: int | None
    loss: float | None = Field(description="Loss of the last step.")
    train_examples: int
    test_examples: int
    epochs: int | None
    test_accuracy: float | None
    error: str | None = Field(description="Why the job failed; the model is then as it was.")


class JobsResponse(BaseModel):
    jobs: list[JobOut]


# -- operations --------------------------------------------------------------------------------
class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    tasks: int
    version: int | None = Field(description="The model directory's version served (`ctt versions`); "
                                "0: written before versions; null: not saved yet.")
    precision: Literal["fp32", "bf16"] = Field(description="What predictions compute in (CTT_PRECISION, resolved).")
    role: Literal["writer", "reader", "read-only"] = Field(
        description="writer: learns and deletes here; reader: serves each version the writer saves; "
        "read-only: a writer with CTT_ENABLE_WRITES=false (serves the version it loaded).")


# -- versions ----------------------------------------------------------------------------------
class VersionOut(BaseModel):
    version: int
    saved_at: str | None = Field(description="ISO 8601; null: written before versions.")
    change: str | None = Field(description="'learned X', 'deleted Y', 'rollback to N'; null before versions.")
    tasks: list[str]
    current: bool


class VersionsResponse(BaseModel):
    versions: list[VersionOut] = Field(description="Every kept version, oldest first.")


class RollbackOut(BaseModel):
    version: int = Field(description="The version now served: a new one holding the old one's content "
                         "(or the current one, if it already held it).")
    restored: int = Field(description="The version rolled back to.")
    tasks: list[str]


class ErrorOut(BaseModel):
    detail: str | list[dict]
