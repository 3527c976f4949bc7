"""Prometheus metrics (one registry per app) and the ASGI middleware that times every request."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
JOB_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_STATES = ("queued", "running", "succeeded", "failed")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ctt_http_requests_total", "HTTP requests by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("ctt_http_request_duration_seconds",
                                 "HTTP request latency by route, method and status.",
                                 ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.predictions = Counter("ctt_predictions_total", "Predicted items by task.", ["task"],
                                   registry=r)
        self.batch_rows = Histogram("ctt_inference_batch_rows",
                                    "Texts per forward pass (taken from the waiting texts of every request, by length).",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_requests = Histogram("ctt_inference_batch_requests",
                                        "Requests with texts in one forward pass (continuous batching).",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("ctt_inference_batch_seconds", "Time of one forward pass, answers included.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.jobs = Gauge("ctt_learning_jobs", "Learning jobs by state (since the server started).",
                          ["state"], registry=r)
        for state in JOB_STATES:
            self.jobs.labels(state)
        self.job_seconds = Histogram("ctt_learning_job_duration_seconds",
                                     "Learning job duration from start to end, by outcome.",
                                     ["outcome"], buckets=JOB_BUCKETS, registry=r)
        self.tasks_loaded = Gauge("ctt_tasks_loaded", "Tasks the server answers for.", registry=r)


class MetricsMiddleware:
    """Counts and times each HTTP request under its route template (not the raw path)."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # what the client gets if the app raises before responding

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            route = scope.get("route")
            labels = (getattr(route, "path", None) or "unmatched", scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
