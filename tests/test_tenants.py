"""Scoped tokens (JWT) and tenants: every token failure, cross-tenant access on every route, and
the request log lines. Against a real uvicorn on 127.0.0.1 with the tiny model of test_server."""

from __future__ import annotations

import base64
import json
import logging
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from continual_transformer.server.settings import Settings
from continual_transformer.server.tokens import TaskScope, TokenError, TokenVerifier
from test_server import ADMIN, AS_ADMIN, model_dir, serving, trained_dir, upload_body  # noqa: F401

SECRET = "a-shared-secret-of-at-least-32-characters!"
ISSUER, AUDIENCE = "https://auth.example", "ctt"


def make_token(key=SECRET, algorithm="HS256", *, scope="predict read learn delete",
               tasks=("kinds", "a-*"), sub="team-a", lifetime=600.0, headers=None, **claims) -> str:
    now = time.time()
    payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": int(now), "exp": int(now + lifetime),
               "scope": scope, **claims}
    if tasks is not None:
        payload["tasks"] = list(tasks)
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(private) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the verifier ---------------------------------------------------------------------------------
def test_every_token_failure_is_refused_with_its_reason(tmp_path, rsa_key):
    public = tmp_path / "public.pem"
    public.write_bytes(pem(rsa_key))
    verifier = TokenVerifier(secret=SECRET, public_key=public, issuer=ISSUER, audience=AUDIENCE)
    good = verifier.verify(make_token())
    assert good.subject == "team-a" and good.scopes == {"predict", "read", "learn", "delete"}
    assert good.tasks == TaskScope(frozenset({"kinds"}), ("a-",))
    assert verifier.verify(make_token(rsa_key, "RS256")).subject == "team-a"

    header, payload, signature = make_token().split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["tasks"] = ["*"]
    tampered = ".".join([header, base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("="),
                         signature])
    unsigned = jwt.encode({"sub": "x", "exp": time.time() + 60, "iss": ISSUER, "aud": AUDIENCE},
                          None, algorithm="none")
    public_pem = pem(rsa_key).decode()
    # HS256 signed with the public key as its secret: the classic algorithm-confusion attack
    confused = ".".join(
        [base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).decode().rstrip("="),
         base64.urlsafe_b64encode(json.dumps({"sub": "x", "exp": int(time.time()) + 60, "iss": ISSUER,
                                              "aud": AUDIENCE}).encode()).decode().rstrip("=")])
    import hashlib
    import hmac
    confused += "." + base64.urlsafe_b64encode(
        hmac.new(public_pem.encode(), confused.encode(), hashlib.sha256).digest()).decode().rstrip("=")
    attacks = {
        "expired": (make_token(lifetime=-120), "token expired"),
        "not yet valid": (make_token(nbf=int(time.time()) + 3600), "not yet valid"),
        "wrong audience": (make_token(aud="other"), "another audience"),
        "wrong issuer": (make_token(iss="https://evil.example"), "another issuer"),
        "wrong key": (make_token("another-secret-that-is-32-characters-long"), "does not verify"),
        "tampered": (tampered, "does not verify"),
        "alg none": (unsigned, "algorithm 'none' is not accepted"),
        "HS with the public key": (confused, "does not verify"),
        "no expiry": (jwt.encode({"sub": "x", "iss": ISSUER, "aud": AUDIENCE}, SECRET, "HS256"),
                      "lacks the claim 'exp'"),
        "no subject": (make_token(sub=""), "'sub'"),
        "garbage": ("a.b.c", "malformed token"),
    }
    for name, (token, reason) in attacks.items():
        with pytest.raises(TokenError, match=reason):
            verifier.verify(token)
    # a verifier without a secret refuses every HS token, whatever it was signed with
    keys_only = TokenVerifier(public_key=public, issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(TokenError, match="algorithm 'HS256' is not accepted here"):
        keys_only.verify(confused)


def test_es256_and_jwks_keys_are_chosen_by_kid(tmp_path, rsa_key):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key())), "kid": "r1", "use": "sig"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "e1", "use": "sig"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    verifier = TokenVerifier(jwks=path, issuer=ISSUER, audience=AUDIENCE)
    assert verifier.verify(make_token(ec_key, "ES256", headers={"kid": "e1"})).subject == "team-a"
    assert verifier.verify(make_token(rsa_key, "RS256", headers={"kid": "r1"})).subject == "team-a"
    with pytest.raises(TokenError, match="does not verify|not accepted"):
        verifier.verify(make_token(ec.generate_private_key(ec.SECP256R1()), "ES256", headers={"kid": "e1"}))


def test_a_key_file_that_does_not_parse_refuses_to_start(model_dir, tmp_path, rsa_key):
    from pydantic import ValidationError

    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    private = tmp_path / "private.pem"
    private.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    broken_jwks = tmp_path / "jwks.json"
    broken_jwks.write_text("{\"keys\": [{\"kty\": \"RSA\"}]}")
    for values, message in (({"jwt_public_key": bad}, "CTT_JWT_PUBLIC_KEY: .*bad.pem is not a public key"),
                            ({"jwt_public_key": private}, "CTT_JWT_PUBLIC_KEY: .*is not a public key"),
                            ({"jwt_public_key": tmp_path / "missing.pem"}, "CTT_JWT_PUBLIC_KEY: cannot read"),
                            ({"jwt_jwks": broken_jwks}, "CTT_JWT_JWKS: .*is not a usable JWKS"),
                            ({"jwt_secret": "short"}, "CTT_JWT_SECRET has 5 characters")):
        with pytest.raises(ValidationError, match=message):
            Settings(_env_file=None, model_dir=model_dir, admin_key=ADMIN, **values)
    # tokens alone may authorise writes: no admin key needed
    assert Settings(_env_file=None, model_dir=model_dir, jwt_secret=SECRET).jwt_enabled


# -- tenants over HTTP ----------------------------------------------------------------------------
class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_tenants_see_only_their_tasks_on_every_route(model_dir):
    """Team A owns `kinds` (and names `a-*`), team B owns `topics`; neither learns anything of
    the other's, even whether it exists."""
    settings = dict(jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    team_a = bearer(make_token(tasks=("kinds", "a-*")))
    team_b = bearer(make_token(sub="team-b", tasks=("topics",)))
    predict_only = bearer(make_token(scope="predict", tasks=("kinds",)))
    every_task = bearer(make_token(sub="ops", scope="read", tasks=None))
    lines = Lines()
    access = logging.getLogger("continual_transformer.access")
    with serving(model_dir, **settings) as served:
        access.addHandler(lines)
        c = served.client

        def get(path, headers):
            return c.get(path, headers=headers)

        names = lambda headers: [t["name"] for t in get("/v1/tasks", headers).json()["tasks"]]  # noqa: E731
        assert names(team_a) == ["kinds"] and names(team_b) == ["topics"]
        assert names(every_task) == ["kinds", "topics"] and names(AS_ADMIN) == ["kinds", "topics"]

        # predicting with another tenant's task reads exactly like a task that does not exist
        foreign = served.predict({"items": [{"text": "red and blue", "task": "topics"}]}, team_a)
        absent = served.predict({"items": [{"text": "red and blue", "task": "nothing"}]}, team_a)
        assert foreign.status_code == absent.status_code == 422
        assert foreign.json()["detail"] == "unknown task 'topics'; known: ['kinds']"
        assert absent.json()["detail"] == "unknown task 'nothing'; known: ['kinds']"
        # routed rows go only to the caller's tasks, whatever the text looks like
        texts = ["red and blue with green", "golf and tennis with rugby", "cat and dog with cow"]
        routed = served.predict({"items": [{"text": t} for t in texts]}, team_a).json()["predictions"]
        assert {p["task"] for p in routed} == {"kinds"}
        routed = served.predict({"items": [{"text": t} for t in texts]}, team_b).json()["predictions"]
        assert {p["task"] for p in routed} == {"topics"}
        # ... and the same row answers as with its task given (to float rounding: the batch
        # it is padded with differs)
        given = served.predict({"items": [{"text": texts[0], "task": "topics"}]}, team_b).json()
        answer = given["predictions"][0]
        assert (answer["task"], answer["label"]) == (routed[0]["task"], routed[0]["label"])
        assert answer["probabilities"] == pytest.approx(routed[0]["probabilities"], abs=1e-5)

        # deleting: another tenant's task is "unknown", and stays served
        response = c.delete("/v1/tasks/topics", headers=team_a)
        assert response.status_code == 404 and response.json()["detail"] == "unknown task 'topics'; known: ['kinds']"
        assert names(team_b) == ["topics"]
        # learning: only names inside the token's tasks
        response = c.post("/v1/tasks", json=upload_body("b-beasts"), headers=team_a)
        assert response.status_code == 403 and "outside the token's tasks" in response.json()["detail"]
        response = c.post("/v1/tasks", json=upload_body("a-beasts", epochs=1), headers=team_a)
        assert response.status_code == 202, response.text
        job = response.json()["id"]
        assert [j["id"] for j in get("/v1/jobs", team_a).json()["jobs"]] == [job]
        assert get("/v1/jobs", team_b).json() == {"jobs": []}
        missing = get("/v1/jobs/0123", team_b)
        hidden = get(f"/v1/jobs/{job}", team_b)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["detail"] == f"unknown job {job!r}"
        deadline = time.monotonic() + 300
        while get(f"/v1/jobs/{job}", team_a).json()["state"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert get(f"/v1/jobs/{job}", team_a).json()["state"] == "succeeded"
        assert names(team_a) == ["kinds", "a-beasts"] and names(team_b) == ["topics"]

        # scopes
        assert c.post("/v1/tasks", json=upload_body("kinds2"), headers=predict_only).status_code == 403
        response = get("/v1/tasks", predict_only)
        assert response.status_code == 403 and response.json()["detail"] == "this token lacks the scope 'read'"
        assert c.delete("/v1/tasks/kinds", headers=bearer(make_token(scope="read"))).status_code == 403
        assert served.predict({"items": [{"text": "cat", "task": "kinds"}]}, every_task).status_code == 403
        # /metrics labels series with every task: a tenant token may not read it
        assert get("/metrics", team_a).status_code == 403
        assert get("/metrics", every_task).status_code == 200
        # a bad token is a 401 that says why; the static keys keep working
        response = get("/v1/tasks", bearer(make_token(lifetime=-120)))
        assert response.status_code == 401 and response.json()["detail"] == "token expired"
        assert get("/v1/tasks", AS_ADMIN).status_code == 200

        # the log: one line per request, request id echoed, the caller, tasks and job, and never
        # the token or the texts
        response = c.post("/v1/predict", json={"items": [{"text": "secret words here", "task": "kinds"}]},
                          headers={**team_a, "X-Request-ID": "req-42"})
        assert response.headers["x-request-id"] == "req-42"
        assert len(get("/healthz", {}).headers["x-request-id"]) == 32
        access.removeHandler(lines)
    from continual_transformer.server.logs import JsonFormatter

    formatted = [JsonFormatter().format(r) for r in lines.records]
    line = json.loads(next(f for f in formatted if '"req-42"' in f))
    assert line == {**line, "event": "request", "method": "POST", "route": "/v1/predict", "status": 200,
                    "caller": "token:team-a", "tasks": ["kinds"]} and line["latency_ms"] > 0
    learn = [json.loads(f) for f in formatted if '"route": "/v1/tasks"' in f and '"status": 202' in f]
    assert learn[0]["job"] == job and learn[0]["tasks"] == ["a-beasts"]
    everything = "\n".join(formatted)
    for secret in ("secret words", team_a["Authorization"][7:], SECRET, ADMIN, "golf and tennis"):
        assert secret not in everything
