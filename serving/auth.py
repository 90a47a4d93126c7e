"""Bearer tokens, stored hashed, with scopes.

The token file holds only SHA-256 digests (tokens are 256-bit random strings, so a plain digest
cannot be brute-forced); a token is shown once, when it is created. The file is re-read when it
changes, so creating or revoking a token needs no restart.

    python -m serving.tokens create --name ehr-gateway --scopes predict,feedback
    python -m serving.tokens list
    python -m serving.tokens revoke --name ehr-gateway
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import orjson

# predict: /predict*; feedback: /feedback; read: model card, readiness, traces, OpenAPI;
# metrics: /metrics (for the Prometheus scraper); admin: the kill switch, rollout mode, reload.
SCOPES = ("predict", "feedback", "read", "metrics", "admin")
TOKEN_PREFIX = "cmp_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class TokenStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, Principal] = {}

    def _entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return orjson.loads(self.path.read_bytes()).get("tokens", [])

    def _refresh(self) -> None:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        with self._lock:
            self._by_hash = {e["sha256"]: Principal(e["name"], frozenset(e["scopes"])) for e in self._entries()}
            self._stamp = stamp

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``, or None. Digests are compared in constant time."""
        self._refresh()
        digest = hash_token(token)
        found = None
        for stored, principal in self._by_hash.items():
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def create(self, name: str, scopes: list[str]) -> str:
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be among {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entries = [e for e in self._entries() if e["name"] != name]
        entries.append({"name": name, "sha256": hash_token(token), "scopes": sorted(set(scopes)),
                        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        self._write(entries)
        return token

    def revoke(self, name: str) -> bool:
        entries = self._entries()
        kept = [e for e in entries if e["name"] != name]
        self._write(kept)
        return len(kept) < len(entries)

    def list(self) -> list[dict]:
        return [{k: e[k] for k in ("name", "scopes", "created_at") if k in e} for e in self._entries()]

    def _write(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({"tokens": entries}, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.path)
