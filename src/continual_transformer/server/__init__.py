"""The HTTP server: every task of one model over HTTP, learning new tasks while serving.

    app.py       create_app(settings): lifespan (loads the model), middleware, error handlers
    routes.py    one router per resource: operations, predict, tasks, jobs
    deps.py      typed dependencies: settings, the served model, jobs, who is calling
    schemas.py   request and response bodies (the OpenAPI schema)
    settings.py  CTT_* settings (pydantic-settings), read once by get_settings()
    serving.py   the live model: one inference thread with dynamic batching, atomic changes
    jobs.py      learning jobs, each trained in its own process
    security.py  bearer keys (constant-time) and per-caller rate limits
    prometheus.py Prometheus metrics and the request-timing middleware

Importing this package loads no model and reads no settings.
"""
