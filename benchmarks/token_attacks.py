"""Token and tenant attacks against a real `ctt serve`: each one tried, its answer printed.

    python benchmarks/token_attacks.py MODEL_DIR [--json out.json]

Serves a copy of MODEL_DIR with a fresh HS256 secret and an RSA public key (JWTs of both kinds
verify), then sends each attack below with `httpx` and prints a table: the attack, the HTTP
status, the answer's detail, and whether it was refused without naming a task outside the
attacker's own. Tenant A's token is for the model's first task and names `a-*`; tenant B's for
its second task. A request naming B's task must be answered exactly as one naming a task that
does not exist. Exits 1 if any attack was let through or leaked.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_test import start_server  # noqa: E402


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    manifest = json.loads((args.model / "manifest.json").read_text())
    tasks = [t["name"] for t in manifest["tasks"]]
    mine, theirs = tasks[0], tasks[1]
    secret = secrets.token_urlsafe(48)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(signing=secret, algorithm="HS256", lifetime=600, **claims):
        payload = {"sub": "tenant-a", "exp": int(time.time() + lifetime), "iss": "auth", "aud": "ctt",
                   "scope": "predict read learn delete", "tasks": [mine, "a-*"], **claims}
        return jwt.encode(payload, signing, algorithm=algorithm)

    header, body, _ = token().split(".")
    forged = json.loads(base64.urlsafe_b64decode(body + "=="))
    forged["tasks"] = ["*"]
    tampered = f"{header}.{b64(json.dumps(forged).encode())}.{token().split('.')[2]}"
    forged_body = b64(json.dumps(forged).encode())
    unsigned = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode()) + "." + forged_body + "."
    confused_head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + forged_body
    confused = f"{confused_head}.{b64(hmac.new(public, confused_head.encode(), hashlib.sha256).digest())}"
    tenant_b = token(sub="tenant-b", tasks=[theirs])
    with tempfile.TemporaryDirectory() as work:
        model = Path(shutil.copytree(args.model, Path(work) / "model"))
        (Path(work) / "public.pem").write_bytes(public)
        env = {"CTT_JWT_SECRET": secret, "CTT_JWT_PUBLIC_KEY": str(Path(work) / "public.pem"),
               "CTT_JWT_ISSUER": "auth", "CTT_JWT_AUDIENCE": "ctt", "CTT_RATE_LIMIT_PER_MINUTE": "0"}
        server = start_server(model, 1, env, Path(work) / "server.log")
        client = httpx.Client(base_url=server.url, timeout=60)
        item = {"items": [{"text": "a test sentence"}]}

        def call(method, path, credential, body=None):
            headers = {"Authorization": f"Bearer {credential}"}
            return client.request(method, path, headers=headers, json=body)

        a = token()
        attacks = [
            ("expired token", "GET", "/v1/tasks", token(lifetime=-3600), None),
            ("not yet valid (nbf in an hour)", "GET", "/v1/tasks", token(nbf=int(time.time()) + 3600), None),
            ("wrong audience", "GET", "/v1/tasks", token(aud="other"), None),
            ("wrong issuer", "GET", "/v1/tasks", token(iss="evil"), None),
            ("wrong key (another secret)", "GET", "/v1/tasks", token(signing=secrets.token_urlsafe(48)), None),
            ("tampered payload (tasks: *)", "GET", "/v1/tasks", tampered, None),
            ("alg none", "GET", "/v1/tasks", unsigned, None),
            ("HS256 signed with the RSA public key", "GET", "/v1/tasks", confused, None),
            ("RS256 signed by another RSA key", "GET", "/v1/tasks",
             token(signing=rsa.generate_private_key(public_exponent=65537, key_size=2048), algorithm="RS256"), None),
            ("missing scope: learn with a predict-only token", "POST", "/v1/tasks",
             token(scope="predict"), {"name": "a-x", "train": [{"text": "t", "label": "l"}]}),
            ("missing scope: list with a predict-only token", "GET", "/v1/tasks", token(scope="predict"), None),
            ("tenant A predicts with B's task", "POST", "/v1/predict", a,
             {"items": [{"text": "a test sentence", "task": theirs}]}),
            ("tenant A deletes B's task", "DELETE", f"/v1/tasks/{theirs}", a, None),
            ("tenant A learns a name outside its tasks", "POST", "/v1/tasks", a,
             {"name": theirs, "train": [{"text": "t", "label": "l"}, {"text": "u", "label": "m"}]}),
            ("tenant A reads /metrics (names every task)", "GET", "/metrics", a, None),
            ("tenant A lists versions (name every task)", "GET", "/v1/versions", token(scope="admin"), None),
            ("tenant A reads an unknown job id", "GET", "/v1/jobs/0123456789", a, None),
        ]
        rows, failures = [], 0
        for name, method, path, credential, body in attacks:
            response = call(method, path, credential, body)
            detail = response.json().get("detail") if response.headers.get("content-type", "").startswith(
                "application/json") else response.text[:80]
            sent = path + json.dumps(body)  # a name the attacker sent is no leak
            leaked = [t for t in tasks if t != mine and t in json.dumps(detail) and t not in sent]
            if method != "GET" and theirs in sent:  # the answer must read as for a missing task
                absent = call(method, path.replace(theirs, "a-absent"),
                              credential, json.loads(json.dumps(body).replace(theirs, "a-absent"))
                              if body else None)
                if "learn" not in name and (absent.status_code != response.status_code or
                                            absent.json()["detail"] != str(detail).replace(theirs, "a-absent")):
                    leaked.append(f"differs from a missing task: {absent.status_code} {absent.json()}")
            refused = response.status_code in (401, 403, 404, 422)
            failures += (not refused) or bool(leaked)
            rows.append({"attack": name, "status": response.status_code, "detail": detail,
                         "refused": refused, "leaked": leaked})
        # what a tenant does see
        listed = [t["name"] for t in call("GET", "/v1/tasks", a).json()["tasks"]]
        routed = call("POST", "/v1/predict", a, {"items": [{"text": "In the beginning"}] * 4}).json()
        routed_tasks = sorted({p["task"] for p in routed["predictions"]})
        b_listed = [t["name"] for t in call("GET", "/v1/tasks", tenant_b).json()["tasks"]]
        server.stop()
    width = max(len(r["attack"]) for r in rows)
    for r in rows:
        verdict = "refused" if r["refused"] else "LET THROUGH"
        verdict += ", leaked " + str(r["leaked"]) if r["leaked"] else ", no task named"
        print(f"{r['attack']:<{width}}  {r['status']}  {verdict:<28} {str(r['detail'])[:90]}")
    print(f"tenant A lists {listed}; its routed predictions went to {routed_tasks}; "
          f"tenant B lists {b_listed}")
    failures += listed != [mine] or routed_tasks != [mine] or b_listed != [theirs]
    if args.json:
        args.json.write_text(json.dumps({"attacks": rows, "tenant_a_lists": listed,
                                         "tenant_a_routed": routed_tasks, "tenant_b_lists": b_listed},
                                        indent=2))
    print("ok: every attack refused, no other tenant's task named" if not failures else
          f"{failures} attack(s) let through or leaking")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
