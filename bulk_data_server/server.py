"""A FHIR Bulk Data Access (v2) server on loopback, for client tests and as a demo data source.

It serves system, Patient and Group level ``$export`` from an in-memory store, with SMART Backend
Services authorization (``private_key_jwt``, RS384/ES384) and switches that inject the faults a
Bulk Data client must survive: throttling, server errors, slow responses, failing downloads and
connections dropped mid-body. It runs on the standard library's ``ThreadingHTTPServer`` over real
sockets, so a dropped connection is a real one.

As strict as the SMART reference server (smart-on-fhir/bulk-data-server) where our client must
conform: the client assertion's header must carry ``kid`` (the key is picked from the client's
registered JWKS by it) and ``typ: JWT``; scopes must be SMART v1 (``system/*.read``) or v2
(``system/*.rs``); kick-off and status can be rate limited per client with ``Retry-After`` as an
HTTP-date; types can fail into the manifest's ``error`` list; an export's files can expire (410).

Each kick-off snapshots the store and serializes the export at once; status polls only count down
``polls_before_complete`` before the manifest is served. Finished exports stay in memory until the
client deletes them (``DELETE`` on the status URL), as the specification asks clients to do.
Patient and Group level exports serve every resource type in the store: the data is one cohort,
so there is no compartment filtering and every Group id (but ``unknown``) is that cohort.
"""

from __future__ import annotations

import math
import re
import secrets
from email.utils import format_datetime
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.message import Message
from gzip import compress as gzip_compress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

BASE_PATH = "/fhir"
FHIR_JSON = "application/fhir+json"
FHIR_NDJSON = "application/fhir+ndjson"
OUTPUT_FORMATS = frozenset({"application/fhir+ndjson", "application/ndjson", "ndjson"})
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SIGNING_ALGORITHMS = ["RS384", "ES384"]
MAX_ASSERTION_LIFETIME_SECONDS = 300  # SMART Backend Services: exp at most five minutes ahead
MAX_REQUEST_BODY_BYTES = 1 << 20
DEFAULT_RETRY_AFTER = "1"
UNKNOWN_GROUP_ID = "unknown"  # the one Group id that answers 404, to exercise that path

_RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]+")
# SMART scopes: v1 "system/Patient.read" (or .write, .*), v2 "system/Patient.rs" (cruds subsets).
_SCOPE = re.compile(r"system/(\*|[A-Z][A-Za-z]+)\.(read|write|\*|(?=[cruds])c?r?u?d?s?)")
# "<ResourceType>.<anything>.ndjson" (or "<ResourceType>.ndjson"); "log.ndjson" does not match.
_RESOURCE_FILE = re.compile(r"([A-Z][A-Za-z]+)(?:\..+)?\.ndjson")


# -- time -------------------------------------------------------------------------------------


def parse_instant(text: str) -> datetime:
    """A FHIR instant (``2024-05-01T12:00:00.000Z``) as an aware UTC datetime; ValueError if none."""
    value = datetime.fromisoformat(text)  # Python 3.11 accepts "Z" and any fractional precision
    if value.tzinfo is None:
        raise ValueError(f"instant without a time zone: {text!r}")
    return _to_millis(value)


def format_instant(value: datetime) -> str:
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _to_millis(value: datetime) -> datetime:
    # Served instants carry milliseconds; comparing at the same precision keeps a resource's
    # `meta.lastUpdated` and the server's `_since` decision consistent.
    if value.tzinfo is None:
        raise ValueError("naive datetime: pass a time-zone-aware datetime")
    value = value.astimezone(timezone.utc)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _now() -> datetime:
    return _to_millis(datetime.now(timezone.utc))


# -- configuration and data -------------------------------------------------------------------


@dataclass
class ServerFaults:
    """Faults to inject; mutable while the server runs. Counters count down as they fire."""

    kickoff_429: int = 0  # next N kick-offs answer 429
    status_429: int = 0  # next N status polls answer 429
    status_500: int = 0  # next N status polls answer 503 (a transient server error)
    retry_after: str | None = None  # Retry-After value, sent verbatim; "1" when None
    file_500: dict[str, int] = field(default_factory=dict)  # file name -> next N downloads answer 500
    drop_mid_download: dict[str, int] = field(default_factory=dict)  # file name -> next N downloads cut short
    slow_seconds: float = 0.0  # sleep before every response
    expire_exports: int = 0  # the next N exports' files answer 410 Gone (expired on the server)
    trickle_seconds: dict[str, float] = field(default_factory=dict)  # file name -> pause between 16-byte pieces
    # A hostile or broken server (tests only): rewrites each manifest before it is served; puts
    # the status URL, the advertised token endpoint or a token redirect on another origin.
    manifest_rewrite: Any = None  # Callable[[dict], dict] | None
    status_url_base: str | None = None  # Content-Location = <this>/status/<job>
    advertised_token_endpoint: str | None = None  # in .well-known/smart-configuration
    token_redirect: str | None = None  # POST /token answers 307 to this URL


class ResourceStore:
    """``{resource_type: {id: (resource, last_updated)}}`` plus deletion times, behind a lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.resources: dict[str, dict[str, tuple[dict[str, Any], datetime]]] = {}
        self.deleted: dict[str, dict[str, datetime]] = {}

    def upsert(self, resource: Mapping[str, Any], last_updated: datetime) -> None:
        """Add or replace a resource; its served ``meta.lastUpdated`` becomes ``last_updated``."""
        when = _to_millis(last_updated)
        resource_type, resource_id = resource["resourceType"], resource["id"]
        # A copy, so the store never shares a mutable top level with the caller or older exports.
        served = {**resource, "meta": {**resource.get("meta", {}), "lastUpdated": format_instant(when)}}
        with self._lock:
            self.resources.setdefault(resource_type, {})[resource_id] = (served, when)
            self.deleted.get(resource_type, {}).pop(resource_id, None)

    def delete(self, resource_type: str, resource_id: str, when: datetime) -> None:
        """Remove a resource and remember when, for the ``deleted`` part of later exports."""
        deleted_at = _to_millis(when)
        with self._lock:
            if self.resources.get(resource_type, {}).pop(resource_id, None) is None:
                raise KeyError(f"{resource_type}/{resource_id} is not in the store")
            self.deleted.setdefault(resource_type, {})[resource_id] = deleted_at

    def counts(self) -> dict[str, int]:
        """Number of resources per type (types with none left out)."""
        with self._lock:
            return {t: len(by_id) for t, by_id in self.resources.items() if by_id}

    def snapshot(
        self, types: set[str] | None, since: datetime | None
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
        """Resources of ``types`` (all when None) updated after ``since``, and, only when ``since``
        is given, the ids deleted after it."""
        with self._lock:
            wanted = self.resources.keys() if types is None else types & self.resources.keys()
            resources = {
                t: [r for r, updated in self.resources[t].values() if since is None or updated > since]
                for t in wanted
            }
            deleted: dict[str, list[str]] = {}
            if since is not None:
                for t, by_id in self.deleted.items():
                    if types is None or t in types:
                        deleted[t] = [i for i, when in by_id.items() if when > since]
        return {t: rs for t, rs in resources.items() if rs}, {t: ids for t, ids in deleted.items() if ids}

    def load(self, resources: Iterable[Mapping[str, Any]], loaded_at: datetime) -> None:
        """Upsert resources, keeping their ``meta.lastUpdated`` or stamping ``loaded_at``."""
        for resource in resources:
            stamp = resource.get("meta", {}).get("lastUpdated")
            self.upsert(resource, parse_instant(stamp) if stamp else loaded_at)


def _read_ndjson_directory(directory: Path) -> Iterable[dict[str, Any]]:
    for path in sorted(directory.iterdir()):
        if not (path.is_file() and _RESOURCE_FILE.fullmatch(path.name)):
            continue
        with path.open("rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                resource = orjson.loads(line)
                if not (isinstance(resource, dict) and isinstance(resource.get("resourceType"), str)
                        and isinstance(resource.get("id"), str)):
                    raise ValueError(f"{path}:{line_number}: not a FHIR resource with resourceType and id")
                yield resource


# -- HTTP plumbing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    method: str
    target: str  # the raw request-target, query included, as the client sent it
    path: str  # percent-decoded path without the query
    query: dict[str, list[str]]
    headers: Message
    body: bytes


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None  # send only this many body bytes, then close the connection
    trickle: float | None = None  # send the body 16 bytes at a time, pausing this long between pieces


@dataclass
class _ExportJob:
    manifest: dict[str, Any]
    files: dict[str, bytes]
    polls: int = 0
    expired: bool = False


@dataclass(frozen=True)
class RateLimit:
    """At most ``requests`` kick-off/status requests per ``window_seconds`` per client; past
    that, every such request answers 429 for ``penalty_seconds``, ``Retry-After`` an HTTP-date."""

    requests: int = 60
    window_seconds: float = 60.0
    penalty_seconds: float = 300.0


def _json(status: int, document: Any, content_type: str = "application/json", **headers: str) -> _Response:
    return _Response(status, orjson.dumps(document), content_type, dict(headers))


def _outcome(status: int, diagnostics: str, code: str = "invalid", **headers: str) -> _Response:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return _json(status, {"resourceType": "OperationOutcome", "issue": [issue]}, FHIR_JSON, **headers)


def _oauth_error(status: int, error: str, description: str) -> _Response:
    return _json(status, {"error": error, "error_description": description}, **{"Cache-Control": "no-store"})


def _header_values(value: str | None) -> list[str]:
    """The lower-cased items of a comma-separated header, parameters (``;q=...``) stripped."""
    return [item.split(";")[0].strip().lower() for item in (value or "").split(",") if item.strip()]


def _accepts_gzip(accept_encoding: str | None) -> bool:
    for item in (accept_encoding or "").split(","):
        coding, *params = [part.strip().lower() for part in item.split(";")]
        if coding == "gzip":
            return "q=0" not in params and "q=0.0" not in params
    return False


def _thumbprint(key: RSAPublicKey | EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint of a public key (the kid a client derives by default)."""
    import base64
    import hashlib
    import json

    if isinstance(key, RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
        members = ("e", "kty", "n")
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True)
        members = ("crv", "kty", "x", "y")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def _ndjson(documents: Iterable[Any]) -> bytes:
    return b"".join(orjson.dumps(d) + b"\n" for d in documents)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: BulkDataServer) -> None:
        self.app = app
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        # Idle keep-alive connections would otherwise keep handler threads blocked in recv.
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away mid-response: its business, not a server error
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do; every response has a length
    server_version = "bulk_data_server"
    # Headers and body go out in separate writes: without this, Nagle's algorithm and the
    # client's delayed ACK add ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._write(_outcome(400, "invalid Content-Length"))
            return
        if length > MAX_REQUEST_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            self._write(_outcome(413, "request body too large", "too-long"))
            return
        target = urlsplit(self.path)
        request = _Request(
            method=self.command,
            target=self.path,
            path=unquote(target.path),
            query=parse_qs(target.query, keep_blank_values=True),
            headers=self.headers,
            body=self.rfile.read(length) if length else b"",
        )
        self._write(self.server.app._respond(request))

    def _write(self, response: _Response) -> None:
        self.send_response(response.status)
        if response.content_type:
            self.send_header("Content-Type", response.content_type)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if response.trickle is not None:
            for start in range(0, len(response.body), 16):  # a server that stalls but never stops
                self.wfile.write(response.body[start:start + 16])
                self.wfile.flush()
                time.sleep(response.trickle)
            return
        if response.drop_after is None:
            self.wfile.write(response.body)
            return
        self.wfile.write(response.body[: response.drop_after])
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Called by send_response, so the request is recorded before the client has the response.
        path = unquote(urlsplit(getattr(self, "path", "")).path)
        self.server.app._record(self.command or "", path, int(code))

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: requests are recorded in ``BulkDataServer.requests`` instead of on stderr."""


# -- the server -------------------------------------------------------------------------------


class BulkDataServer:
    """A Bulk Data (v2) server on a background thread; use as a context manager."""

    def __init__(
        self,
        store: ResourceStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        require_auth: bool = False,
        token_ttl_seconds: int = 300,
        polls_before_complete: int = 1,
        requires_access_token: bool | None = None,
        error_file: bool = False,
        failing_types: Iterable[str] = (),
        rate_limit: RateLimit | None = None,
        gzip: bool = True,
        max_lines_per_file: int = 50_000,
        faults: ServerFaults | None = None,
    ) -> None:
        if max_lines_per_file < 1:
            raise ValueError("max_lines_per_file must be at least 1")
        self.store = store
        self.host = host
        self.port = port
        self.require_auth = require_auth
        self.token_ttl_seconds = token_ttl_seconds
        self.polls_before_complete = polls_before_complete
        self.requires_access_token = require_auth if requires_access_token is None else requires_access_token
        self.error_file = error_file
        self.failing_types = frozenset(failing_types)  # exported as errors, not as output
        self.rate_limit = rate_limit
        self.gzip = gzip
        self.max_lines_per_file = max_lines_per_file
        self.faults = faults or ServerFaults()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.authorization_headers: list[str] = []  # every Authorization header received, verbatim
        self.cancelled_jobs: set[str] = set()

        self._lock = threading.Lock()  # guards jobs, clients, tokens, used jtis, faults, requests
        self._jobs: dict[str, _ExportJob] = {}
        self._clients: dict[str, dict[str, RSAPublicKey | EllipticCurvePublicKey]] = {}  # client -> kid -> key
        self._tokens: dict[str, float] = {}  # access token -> time.monotonic() expiry
        self._token_clients: dict[str, str] = {}  # access token -> client id (for the rate limit)
        self._request_times: dict[str, list[float]] = {}  # client -> recent kick-off/status times
        self._penalty_until: dict[str, float] = {}  # client -> epoch seconds
        self._used_jtis: dict[tuple[str, str], float] = {}  # (iss, jti) -> assertion exp (epoch)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._origin: str | None = None

    @classmethod
    def from_directory(cls, path: str | Path, **options: Any) -> BulkDataServer:
        """Serve the ``<ResourceType>.*.ndjson`` files of a directory."""
        directory = Path(path)
        if not directory.is_dir():
            raise NotADirectoryError(directory)
        store = ResourceStore()
        store.load(_read_ndjson_directory(directory), loaded_at=_now())
        return cls(store, **options)

    @classmethod
    def from_synthetic(cls, n_patients: int = 200, seed: int = 1, **options: Any) -> BulkDataServer:
        """Serve the project's deterministic synthetic cohort."""
        # Imported here so the server itself does not depend on the platform package.
        from clinical_ml.synthetic import CohortSpec, generate_patient

        spec = CohortSpec(n_patients=n_patients, seed=seed)
        store = ResourceStore()
        loaded_at = _now()
        for index in range(n_patients):
            for resources in generate_patient(spec, index).values():
                store.load(resources, loaded_at)
        return cls(store, **options)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> BulkDataServer:
        if self._httpd is not None:
            raise RuntimeError("server already running")
        self._httpd = _HTTPServer((self.host, self.port), self)
        bound_host, bound_port = self._httpd.server_address[:2]
        self._origin = f"http://{bound_host}:{bound_port}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},  # stop() waits up to one poll interval
            name=f"bulk-data-server:{bound_port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection, cutting off any response still in flight."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        thread.join(timeout=5)
        self._httpd = self._thread = None

    def __enter__(self) -> BulkDataServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._origin is None:
            raise RuntimeError("server not started: its port is chosen at start()")
        return self._origin + BASE_PATH

    @property
    def token_url(self) -> str:
        return self.base_url + "/token"

    # -- administration -----------------------------------------------------------------------

    def register_client(self, client_id: str, public_key_pem: str | bytes | None = None, *,
                        jwks: Mapping[str, Any] | None = None, kid: str | None = None) -> None:
        """Allow ``client_id`` to obtain tokens with assertions signed by one of its keys: a JWKS
        (``{"keys": [...]}``, each with a ``kid``), as EHRs register clients, or one PEM public
        key, whose ``kid`` is ``kid`` or else its RFC 7638 thumbprint."""
        keys: dict[str, RSAPublicKey | EllipticCurvePublicKey] = {}
        if jwks is not None:
            for jwk in jwks.get("keys", []):
                if not jwk.get("kid"):
                    raise ValueError("every key of a registered JWKS needs a kid")
                if any(member in jwk for member in ("d", "p", "q")):
                    raise ValueError("a JWKS to register holds public keys only")
                keys[jwk["kid"]] = jwt.PyJWK(dict(jwk)).key
        if public_key_pem is not None:
            pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
            key = load_pem_public_key(pem)
            keys[kid or _thumbprint(key)] = key
        if not keys or not all(isinstance(k, RSAPublicKey | EllipticCurvePublicKey) for k in keys.values()):
            raise ValueError("register RSA (RS384) or EC (ES384) public keys, as a JWKS or a PEM")
        with self._lock:
            self._clients.setdefault(client_id, {}).update(keys)

    def expire_tokens(self) -> None:
        """Invalidate every access token issued so far."""
        with self._lock:
            self._tokens.clear()

    # -- request handling ---------------------------------------------------------------------

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def _respond(self, request: _Request) -> _Response:
        if request.headers.get("Authorization"):
            with self._lock:
                self.authorization_headers.append(request.headers["Authorization"])
        if self.faults.slow_seconds > 0:
            time.sleep(self.faults.slow_seconds)
        if not request.path.startswith(BASE_PATH + "/"):
            return _outcome(404, f"not found: {request.path}", "not-found")
        match (request.method, request.path[len(BASE_PATH) + 1 :].split("/")):
            case ("GET", [".well-known", "smart-configuration"]):
                return self._smart_configuration()
            case ("GET", ["metadata"]):
                return self._capability_statement()
            case ("POST", ["token"]):
                return self._issue_token(request)
            case ("GET", ["$export"] | ["Patient", "$export"]):
                return self._kickoff(request, group_id=None)
            case ("GET", ["Group", group_id, "$export"]):
                return self._kickoff(request, group_id=group_id)
            case ("GET", ["status", job_id]):
                return self._status(request, job_id)
            case ("DELETE", ["status", job_id]):
                return self._cancel(request, job_id)
            case ("GET", ["files", job_id, name]):
                return self._download(request, job_id, name)
        return _outcome(404, f"no {request.method} {request.path} on this server", "not-found")

    def _take_fault(self, counter: str) -> bool:
        """Consume one firing of an integer fault counter, if any is left."""
        with self._lock:
            remaining = getattr(self.faults, counter)
            if remaining <= 0:
                return False
            setattr(self.faults, counter, remaining - 1)
            return True

    def _take_file_fault(self, counters: str, file_name: str) -> bool:
        """Consume one firing of a per-file fault counter, if any is left."""
        with self._lock:
            by_file: dict[str, int] = getattr(self.faults, counters)
            remaining = by_file.get(file_name, 0)
            if remaining <= 0:
                return False
            by_file[file_name] = remaining - 1
            return True

    def _retry_after(self) -> str:
        value = self.faults.retry_after
        return DEFAULT_RETRY_AFTER if value is None else value

    def _token_error(self, request: _Request) -> _Response | None:
        """A 401 response unless the request carries a valid, unexpired access token."""
        scheme, _, token = (request.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return _outcome(401, "a Bearer access token is required", "login", **{"WWW-Authenticate": "Bearer"})
        with self._lock:
            expiry = self._tokens.get(token.strip())
        if expiry is None or expiry <= time.monotonic():
            return _outcome(
                401, "access token is invalid or expired", "login",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return None

    def _rate_limited(self, request: _Request) -> _Response | None:
        """429 with an HTTP-date Retry-After when the client is over its rate limit."""
        if self.rate_limit is None:
            return None
        token = (request.headers.get("Authorization") or "").partition(" ")[2].strip()
        now = time.time()
        with self._lock:
            client = self._token_clients.get(token, "anonymous")
            if now < self._penalty_until.get(client, 0.0):
                until = self._penalty_until[client]
            else:
                recent = [t for t in self._request_times.get(client, []) if t > now - self.rate_limit.window_seconds]
                recent.append(now)
                self._request_times[client] = recent
                if len(recent) <= self.rate_limit.requests:
                    return None
                until = self._penalty_until[client] = now + self.rate_limit.penalty_seconds
                self._request_times[client] = []
        retry_at = format_datetime(datetime.fromtimestamp(math.ceil(until), timezone.utc), usegmt=True)
        return _outcome(429, "Too many requests. Please try again later.", "throttled", **{"Retry-After": retry_at})

    def _smart_configuration(self) -> _Response:
        return _json(200, {
            "token_endpoint": self.faults.advertised_token_endpoint or self.token_url,
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": SIGNING_ALGORITHMS,
            "scopes_supported": ["system/*.read", "system/*.rs"],
            "capabilities": ["client-confidential-asymmetric"],
        })

    def _capability_statement(self) -> _Response:
        bulk = "http://hl7.org/fhir/uv/bulkdata"

        def export_operation(definition: str) -> list[dict[str, str]]:
            return [{"name": "export", "definition": f"{bulk}/OperationDefinition/{definition}"}]

        rest: dict[str, Any] = {
            "mode": "server",
            "resource": [
                {"type": "Patient", "operation": export_operation("patient-export")},
                {"type": "Group", "operation": export_operation("group-export")},
            ],
            "operation": export_operation("export"),
        }
        if self.require_auth:
            security_services = "http://terminology.hl7.org/CodeSystem/restful-security-service"
            rest["security"] = {
                "service": [{"coding": [{"system": security_services, "code": "SMART-on-FHIR"}]}],
                "extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": self.token_url}],
                }],
            }
        return _json(200, {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "date": format_instant(_now()),
            "kind": "instance",
            "instantiates": [f"{bulk}/CapabilityStatement/bulk-data"],
            "software": {"name": "bulk_data_server"},
            "implementation": {"description": "FHIR Bulk Data test server", "url": self.base_url},
            "fhirVersion": "4.0.1",
            "format": ["json"],
            "rest": [rest],
        }, FHIR_JSON)

    def _issue_token(self, request: _Request) -> _Response:
        if self.faults.token_redirect:
            return _Response(307, headers={"Location": self.faults.token_redirect})
        form = {k: v[0] for k, v in parse_qs(request.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "grant_type must be client_credentials")
        if form.get("client_assertion_type") != JWT_BEARER or not form.get("client_assertion"):
            return _oauth_error(
                400, "invalid_request", f"client_assertion_type must be {JWT_BEARER}, with a client_assertion"
            )
        if not form.get("scope"):
            return _oauth_error(400, "invalid_scope", "scope is required")
        if bad := [s for s in form["scope"].split() if not _SCOPE.fullmatch(s)]:
            return _oauth_error(400, "invalid_scope", f"not SMART system scopes: {' '.join(bad)[:200]}")
        assertion = form["client_assertion"]
        try:
            header = jwt.get_unverified_header(assertion)
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
        except jwt.PyJWTError as error:
            return _oauth_error(401, "invalid_client", f"malformed client assertion: {error}")
        # SMART Backend Services: kid and typ are required in the JOSE header (as the reference
        # server enforces: "Invalid JWT token header. Missing 'kid' property.").
        if not header.get("kid"):
            return _oauth_error(400, "invalid_request",
                                "Invalid registration token: Invalid JWT token header. Missing 'kid' property.")
        if header.get("typ") != "JWT":
            return _oauth_error(400, "invalid_request", "Invalid JWT token header: typ must be 'JWT'.")
        with self._lock:
            keys = self._clients.get(issuer, {}) if isinstance(issuer, str) else {}
            key = keys.get(header["kid"])
        if not keys:
            return _oauth_error(401, "invalid_client", f"unknown client {issuer!r}")
        if key is None:
            return _oauth_error(401, "invalid_client", "no registered key of this client has that kid")
        try:
            claims = jwt.decode(
                assertion, key, algorithms=SIGNING_ALGORITHMS, audience=self.token_url, issuer=issuer,
                options={"require": ["iss", "sub", "aud", "exp", "jti"]},
            )
        except jwt.PyJWTError as error:
            return _oauth_error(401, "invalid_client", f"client assertion rejected: {error}")
        if claims["sub"] != issuer:
            return _oauth_error(401, "invalid_client", "sub must equal iss (the client_id)")
        now = time.time()
        if claims["exp"] > now + MAX_ASSERTION_LIFETIME_SECONDS:
            return _oauth_error(401, "invalid_client", "exp is more than five minutes in the future")
        jti = (issuer, str(claims["jti"]))
        token = secrets.token_urlsafe(32)
        with self._lock:
            # A jti only needs remembering until its assertion expires: it cannot be replayed after.
            self._used_jtis = {k: exp for k, exp in self._used_jtis.items() if exp >= now}
            if jti in self._used_jtis:
                return _oauth_error(401, "invalid_client", "jti already used")
            self._used_jtis[jti] = float(claims["exp"])
            clock = time.monotonic()
            self._tokens = {t: expiry for t, expiry in self._tokens.items() if expiry > clock}
            self._token_clients = {t: c for t, c in self._token_clients.items() if t in self._tokens}
            self._tokens[token] = clock + self.token_ttl_seconds
            self._token_clients[token] = issuer
        return _json(200, {
            "access_token": token,
            "token_type": "bearer",
            "expires_in": self.token_ttl_seconds,
            "scope": form["scope"],
        }, **{"Cache-Control": "no-store", "Pragma": "no-cache"})

    def _kickoff(self, request: _Request, group_id: str | None) -> _Response:
        # Throttling comes first, as a gateway in front of a real server would answer it.
        if self._take_fault("kickoff_429"):
            return _outcome(429, "too many requests", "throttled", **{"Retry-After": self._retry_after()})
        if (limited := self._rate_limited(request)) is not None:
            return limited
        if self.require_auth and (denied := self._token_error(request)) is not None:
            return denied
        if FHIR_JSON not in _header_values(request.headers.get("Accept")):
            return _outcome(400, f"the Accept header must be {FHIR_JSON}")
        if "respond-async" not in _header_values(request.headers.get("Prefer")):
            return _outcome(400, "the Prefer header must be respond-async")
        if group_id == UNKNOWN_GROUP_ID:
            return _outcome(404, f"Group/{group_id} not found", "not-found")

        output_format = request.query.get("_outputFormat", [FHIR_NDJSON])[-1]
        if output_format not in OUTPUT_FORMATS:
            return _outcome(400, f"unsupported _outputFormat {output_format!r}; use {FHIR_NDJSON}")
        types = {t.strip() for value in request.query.get("_type", []) for t in value.split(",") if t.strip()}
        if bad_types := sorted(t for t in types if not _RESOURCE_TYPE.fullmatch(t)):
            return _outcome(400, f"not resource types in _type: {', '.join(bad_types)}")
        since: datetime | None = None
        if "_since" in request.query:
            # An unencoded "+01:00" offset arrives as " 01:00" after form decoding: put the "+" back.
            text = request.query["_since"][-1].replace(" ", "+")
            try:
                since = parse_instant(text)
            except ValueError:
                return _outcome(400, f"_since must be a FHIR instant with a time zone, got {text!r}")

        transaction_time = _now()
        resources, deleted = self.store.snapshot(types or None, since)
        job_id = uuid.uuid4().hex
        job = self._build_job(job_id, request.target, transaction_time, resources, deleted)
        job.expired = self._take_fault("expire_exports")
        with self._lock:
            self._jobs[job_id] = job
        status_base = self.faults.status_url_base or self.base_url
        return _Response(202, headers={"Content-Location": f"{status_base}/status/{job_id}"})

    def _build_job(
        self,
        job_id: str,
        target: str,
        transaction_time: datetime,
        resources: dict[str, list[dict[str, Any]]],
        deleted: dict[str, list[str]],
    ) -> _ExportJob:
        files: dict[str, bytes] = {}

        def add_file(name: str, documents: list[Any], document_type: str) -> dict[str, Any]:
            files[name] = _ndjson(documents)
            return {"type": document_type, "url": f"{self.base_url}/files/{job_id}/{name}", "count": len(documents)}

        output, failed = [], []
        for resource_type, items in sorted(resources.items()):
            if resource_type in self.failing_types:
                failed.append((resource_type, len(items)))
                continue
            for part, start in enumerate(range(0, len(items), self.max_lines_per_file)):
                chunk = items[start : start + self.max_lines_per_file]
                output.append(add_file(f"{resource_type}.{part:03d}.ndjson", chunk, resource_type))
        manifest: dict[str, Any] = {
            "transactionTime": format_instant(transaction_time),
            "request": f"{self._origin}{target}",
            "requiresAccessToken": self.requires_access_token,
            "output": output,
            "error": [],
        }
        if deleted:
            # Bulk Data v2: deletions are transaction Bundles of DELETE entries, one per type here.
            bundles = [
                {
                    "resourceType": "Bundle",
                    "id": uuid.uuid4().hex,
                    "meta": {"lastUpdated": format_instant(transaction_time)},
                    "type": "transaction",
                    "entry": [{"request": {"method": "DELETE", "url": f"{t}/{i}"}} for i in ids],
                }
                for t, ids in sorted(deleted.items())
            ]
            manifest["deleted"] = [add_file("deleted.000.ndjson", bundles, "Bundle")]
        outcomes = [{
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "processing", "expression": [resource_type],
                       "diagnostics": f"Failed to export {n} {resource_type} resources"}],
        } for resource_type, n in failed]
        if self.error_file:
            outcomes.append({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "processing",
                           "diagnostics": "simulated failure to export one resource"}],
            })
        if outcomes:
            manifest["error"] = [add_file("error.000.ndjson", outcomes, "OperationOutcome")]
        return _ExportJob(manifest=manifest, files=files)

    def _status(self, request: _Request, job_id: str) -> _Response:
        if self._take_fault("status_429"):
            return _outcome(429, "too many requests", "throttled", **{"Retry-After": self._retry_after()})
        if self._take_fault("status_500"):
            return _outcome(503, "service temporarily unavailable", "transient", **{"Retry-After": self._retry_after()})
        if (limited := self._rate_limited(request)) is not None:
            return limited
        if self.require_auth and (denied := self._token_error(request)) is not None:
            return denied
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return _outcome(404, f"no export job {job_id}", "not-found")
            job.polls += 1
            polls = job.polls
        if polls <= self.polls_before_complete:
            progress = 100 * polls // (self.polls_before_complete + 1)
            return _Response(202, headers={"X-Progress": f"{progress}% complete", "Retry-After": self._retry_after()})
        rewrite = self.faults.manifest_rewrite
        return _json(200, rewrite(orjson.loads(orjson.dumps(job.manifest))) if rewrite else job.manifest)

    def _cancel(self, request: _Request, job_id: str) -> _Response:
        if self.require_auth and (denied := self._token_error(request)) is not None:
            return denied
        with self._lock:
            if self._jobs.pop(job_id, None) is None:
                return _outcome(404, f"no export job {job_id}", "not-found")
            self.cancelled_jobs.add(job_id)
        return _Response(202)

    def _download(self, request: _Request, job_id: str, name: str) -> _Response:
        if self.requires_access_token and (denied := self._token_error(request)) is not None:
            return denied
        with self._lock:
            job = self._jobs.get(job_id)
        body = job.files.get(name) if job is not None else None
        if body is None:
            return _outcome(404, f"no file {name} in export job {job_id}", "not-found")
        if job.expired:
            return _outcome(410, f"the files of export {job_id} have expired; start a new export", "expired")
        if self._take_file_fault("file_500", name):
            return _outcome(500, f"simulated failure serving {name}", "exception")
        headers = {"Vary": "Accept-Encoding"} if self.gzip else {}
        if self.gzip and _accepts_gzip(request.headers.get("Accept-Encoding")):
            body = gzip_compress(body, compresslevel=5, mtime=0)
            headers["Content-Encoding"] = "gzip"
        drop_after = len(body) // 2 if self._take_file_fault("drop_mid_download", name) else None
        trickle = self.faults.trickle_seconds.get(name)
        return _Response(200, body, FHIR_NDJSON, headers, drop_after, trickle)
