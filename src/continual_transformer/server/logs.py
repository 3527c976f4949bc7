"""Structured logs: one line per request, and one per learning-job or model event.

`CTT_LOG_FORMAT=json` writes each as one JSON object per line (for a log shipper); `text`, the
default, as a readable line for a terminal. A request line holds:

    time, level, event ("request"), request_id, method, route (the template, e.g.
    /v1/tasks/{name}), status, latency_ms, caller ("key:<digest>", "token:<sub>",
    "address:<ip>" or null), tasks (the tasks the request touched), job (a learning job's id)

The request id is the client's `X-Request-ID` when it is a short plain token, else a new one,
and it comes back in the response's `X-Request-ID`. Never logged: the key or token, the texts,
the query string, the body.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import datetime, timezone

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
FIELDS = ("request_id", "method", "route", "status", "latency_ms", "caller", "tasks", "job",
          "state", "error", "version")

access = logging.getLogger("continual_transformer.access")
events = logging.getLogger("continual_transformer.events")


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, event or message, and the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name,
                "event": getattr(record, "event", None) or record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """A record as `time level message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        fields = " ".join(f"{name}={_text(getattr(record, name))}" for name in FIELDS
                          if getattr(record, name, None) is not None)
        text = f"{stamp} {record.levelname:<7} {record.getMessage()}" + (f" {fields}" if fields else "")
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def configure(log_format: str, level: int = logging.INFO) -> None:
    """Send the package's logs to stderr in `log_format` ('text' or 'json'), once."""
    logger = logging.getLogger("continual_transformer")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    for old in [h for h in logger.handlers if getattr(h, "_ctt", False)]:
        logger.removeHandler(old)
    handler._ctt = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def event(name: str, message: str, level: int = logging.INFO, **fields) -> None:
    """Log a learning-job or model event with its fields (job, tasks, state, error, version)."""
    events.log(level, message, extra={"event": name, **fields})


class AccessLogMiddleware:
    """Gives each request an id (echoed in `X-Request-ID`) and logs one line when it ends."""

    def __init__(self, app, enabled: bool = True):
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        start = time.perf_counter()
        status = 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                access.info(f"{scope['method']} {route} {status}", extra={
                    "event": "request", "request_id": request_id, "method": scope["method"],
                    "route": route, "status": status,
                    "latency_ms": round(1000 * (time.perf_counter() - start), 2),
                    "caller": state.get("caller"), "tasks": state.get("tasks"),
                    "job": state.get("job")})
