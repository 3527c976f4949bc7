"""Schemathesis against `ctt serve`: generated requests for every operation of /openapi.json.

    python benchmarks/fuzz_api.py MODEL_DIR [--max-examples 100] [--seed 0] [--tenant TASK]

Serves a copy of MODEL_DIR (generated requests learn and delete tasks) on a free port with a
fresh admin key, and runs `schemathesis run` with every check except two that this API cannot
pass by design:

- `positive_data_acceptance`: a request valid for the schema may still be refused with 422,
  e.g. an item naming a task the model does not have, or an upload whose examples all carry
  one label; no static schema can say which tasks exist.
- `allow_header_conformance`: GET and POST /v1/tasks are two routes (the POST exists only with
  writes enabled), and Starlette's 405 lists the methods of the first matching route only.

With `--tenant TASK`, the server also verifies JWTs (a fresh HS256 secret) and schemathesis
calls it with a tenant's token: scopes predict, read, learn and delete, for the task TASK and
names starting `fuzz-`; every other task must stay out of its sight.

Prints schemathesis's summary (cases generated, failures); `not_a_server_error` is the check
that counts server errors (5xx). Needs `pip install schemathesis`.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import start_server  # noqa: E402

EXCLUDED = "positive_data_acceptance,allow_header_conformance"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--max-examples", type=int, default=100, help="Cases per operation and phase.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-dir", type=Path, default=Path("schemathesis-report"))
    parser.add_argument("--tenant", metavar="TASK", help="Call with a tenant's JWT for TASK and 'fuzz-*'.")
    args = parser.parse_args()

    schemathesis = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    with tempfile.TemporaryDirectory() as work:
        model = Path(shutil.copytree(args.model, Path(work) / "model"))
        env = {"CTT_RATE_LIMIT_PER_MINUTE": "0"}
        secret = secrets.token_urlsafe(48)
        if args.tenant:
            env["CTT_JWT_SECRET"] = secret
        server = start_server(model, 1, env, Path(work) / "server.log")
        credential = server.admin_key
        if args.tenant:
            import jwt

            credential = jwt.encode({"sub": "fuzz-tenant", "exp": int(time.time()) + 24 * 3600,
                                     "scope": "predict read learn delete",
                                     "tasks": [args.tenant, "fuzz-*"]}, secret, "HS256")
        try:
            command = [schemathesis, "run", f"{server.url}/openapi.json",
                       "-H", f"Authorization: Bearer {credential}",
                       "--checks", "all", "--exclude-checks", EXCLUDED,
                       "--max-examples", str(args.max_examples), "--seed", str(args.seed),
                       "--no-color", "--report", "junit", "--report-dir", str(args.report_dir)]
            code = subprocess.call(command)
        finally:
            server.stop()
        log = (Path(work) / "server.log").read_text()
        tracebacks = log.count("Traceback")
    print(f"server log: {tracebacks} traceback(s)")
    sys.exit(code)


if __name__ == "__main__":
    main()
