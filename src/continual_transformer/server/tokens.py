"""Scoped bearer tokens (JWT, verified with PyJWT) and the tasks a caller may touch.

A token is a JWT signed with HS256 (a shared secret, `CTT_JWT_SECRET`), or RS256 / ES256 (a
public key in PEM, `CTT_JWT_PUBLIC_KEY`, or a JWKS file, `CTT_JWT_JWKS`; nothing is fetched over
the network). Its claims:

    exp, nbf, iat     checked (exp required), with `CTT_JWT_LEEWAY_SECONDS` of clock skew
    iss, aud          must equal `CTT_JWT_ISSUER` / `CTT_JWT_AUDIENCE` when those are set
    sub               who is calling: logged, and keys the rate limit
    scope             "predict read learn delete admin" (space-separated, or a list); admin
                      implies every other scope
    tasks             the tenant: task names, and prefixes written "team-a/*" or "team-a-*";
                      absent or ["*"]: every task (the claim's name: `CTT_JWT_TASKS_CLAIM`)

The algorithm is taken from the token's header only to pick which configured key verifies it:
an HS token is checked only against the secret, an RS/ES token only against the public keys,
and `none` is never accepted, so a public key can never be used as an HMAC secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

SCOPES = ("predict", "read", "learn", "delete", "admin")
HMAC_ALGORITHMS = ("HS256",)
KEY_ALGORITHMS = ("RS256", "ES256")


class TokenError(ValueError):
    """A token that is refused; the message says why (never the token itself)."""


@dataclass(frozen=True)
class TaskScope:
    """The tasks a caller may see and act on: exact names and name prefixes; None: all."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> "TaskScope | None":
        names, prefixes = set(), []
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise TokenError(f"claim 'tasks' must list non-empty strings, got {entry!r:.40}")
            if entry == "*":
                return None
            if entry.endswith("*"):
                prefixes.append(entry[:-1])
            else:
                names.add(entry)
        return cls(frozenset(names), tuple(prefixes))

    def allows(self, task: str) -> bool:
        return task in self.names or any(task.startswith(p) for p in self.prefixes)


@dataclass(frozen=True)
class Claims:
    subject: str
    scopes: frozenset[str]
    tasks: TaskScope | None


def _read(path: Path, setting: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{setting}: cannot read {path}: {exc}") from None


class TokenVerifier:
    """Verifies JWTs against the configured secret and keys; built once, at start-up.

    Raises ValueError naming the setting when a key does not parse, so a server with a broken
    configuration refuses to start instead of refusing every caller.
    """

    def __init__(self, *, secret: str | None = None, public_key: Path | None = None,
                 jwks: Path | None = None, issuer: str | None = None,
                 audience: str | None = None, leeway_seconds: float = 0.0,
                 tasks_claim: str = "tasks"):
        import jwt
        from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        self._jwt = jwt
        self.secret = secret
        self.issuer, self.audience, self.leeway = issuer, audience, leeway_seconds
        self.tasks_claim = tasks_claim
        self._keys: list[tuple[str | None, str, object]] = []  # (kid, algorithm family, key)
        if public_key is not None:
            text = _read(public_key, "CTT_JWT_PUBLIC_KEY")
            try:
                key = load_pem_public_key(text.encode())
            except ValueError:
                raise ValueError(f"CTT_JWT_PUBLIC_KEY: {public_key} is not a public key in PEM "
                                 "format ('-----BEGIN PUBLIC KEY-----')") from None
            family = ("RS" if isinstance(key, RSAPublicKey)
                      else "ES" if isinstance(key, EllipticCurvePublicKey) else None)
            if family is None:
                raise ValueError(f"CTT_JWT_PUBLIC_KEY: {public_key} holds a {type(key).__name__}; "
                                 "RSA and EC keys are accepted")
            self._keys.append((None, family, key))
        if jwks is not None:
            text = _read(jwks, "CTT_JWT_JWKS")
            try:
                keys = jwt.PyJWKSet.from_json(text).keys
            except Exception as exc:
                raise ValueError(f"CTT_JWT_JWKS: {jwks} is not a usable JWKS: {exc}") from None
            for item in keys:
                family = {"RSA": "RS", "EC": "ES"}.get(item.key_type)
                if family is None:
                    raise ValueError(f"CTT_JWT_JWKS: key {item.key_id!r} has type {item.key_type!r}; "
                                     "RSA and EC keys are accepted")
                self._keys.append((item.key_id, family, item.key))
        if not self.configured:
            raise ValueError("no JWT key: set CTT_JWT_SECRET, CTT_JWT_PUBLIC_KEY or CTT_JWT_JWKS")

    @property
    def configured(self) -> bool:
        return self.secret is not None or bool(self._keys)

    def _key(self, header: dict) -> tuple[object, list[str]]:
        algorithm = header.get("alg")
        if algorithm in HMAC_ALGORITHMS and self.secret is not None:
            return self.secret, [algorithm]
        if algorithm in KEY_ALGORITHMS:
            kid = header.get("kid")
            for key_id, family, key in self._keys:
                if algorithm.startswith(family) and (key_id is None or kid is None or key_id == kid):
                    return key, [algorithm]
        accepted = ([*HMAC_ALGORITHMS] if self.secret is not None else []) + sorted(
            {a for _, family, _ in self._keys for a in KEY_ALGORITHMS if a.startswith(family)})
        raise TokenError(f"algorithm {str(algorithm)[:20]!r} is not accepted here "
                         f"(accepted: {', '.join(accepted)})")

    def verify(self, token: str) -> Claims:
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        key, algorithms = self._key(header)
        options = {"require": ["exp"] + (["iss"] if self.issuer else []) + (["aud"] if self.audience else [])}
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token not yet valid (nbf / iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenError("token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise TokenError("token from another issuer") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks the claim {exc.claim!r}") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        return self._claims(claims)

    def _claims(self, claims: dict) -> Claims:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise TokenError("token lacks a 'sub' claim (a non-empty string)")
        raw = claims.get("scope", claims.get("scp", ""))
        scopes = raw.split() if isinstance(raw, str) else raw
        if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
            raise TokenError("claim 'scope' must be a space-separated string or a list of strings")
        granted = frozenset(SCOPES) if "admin" in scopes else frozenset(s for s in scopes if s in SCOPES)
        tasks_claim = claims.get(self.tasks_claim)
        if tasks_claim is None:
            tasks = None
        elif isinstance(tasks_claim, list):
            tasks = TaskScope.parse(tasks_claim)
        else:
            raise TokenError(f"claim {self.tasks_claim!r} must be a list of task names or prefixes")
        return Claims(subject[:200], granted, tasks)


def looks_like_jwt(credential: str) -> bool:
    parts = credential.split(".")
    return len(parts) == 3 and all(parts[:2])

