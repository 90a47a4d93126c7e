"""FHIR Bulk Data Access (v2) client: kick-off, status polling, manifest, downloads.

- Kick-off at system, Patient or Group level with ``_type``, ``_since`` and ``_outputFormat``.
- Polling honours ``Retry-After`` (delta-seconds or HTTP-date, clamped to a sane range) and
  logs ``X-Progress``, under an overall deadline.
- 429, 5xx and connection errors are retried with exponential backoff and full jitter (or the
  server's Retry-After); other 4xx raise ``BulkDataError`` carrying the OperationOutcome text.
- Downloads stream to ``<name>.part`` (never whole files in memory), several at once, gzip
  accepted, and are renamed into place only when complete, with SHA-256 recorded. A rerun
  resumes an unfinished export (same status URL) and skips files already complete and verified.
- SMART Backend Services: a client-credentials grant with a signed JWT assertion (RS384 or
  ES384) whose header names the key (``kid``, by default its RFC 7638 thumbprint) and ``typ: JWT``;
  the token is cached, refreshed before expiry, and once more on a 401. ``python -m
  clinical_ml.bulk_client jwks --key key.pem`` prints the public JWKS to register with the EHR.
- A hostile or broken manifest cannot do harm: file types are validated before they become
  file names, the access token goes only to the FHIR server's own origin (or an allowed list)
  and only when the manifest asks for it, and each download has a size ceiling and a time limit.
- A file the server has expired (410) starts the export over once; a status endpoint's rate
  limit (429, Retry-After in seconds or as an HTTP-date) is waited out until the deadline.
- Interrupting an export (Ctrl-C, a cancelled Dagster run) sends DELETE to the status URL.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import re
import random
import shutil
import threading
import time
import uuid
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Callable, Literal
from urllib.parse import urlsplit

import httpx
import jwt

FHIR_JSON = "application/fhir+json"
NDJSON_FORMATS = ("application/fhir+ndjson", "application/ndjson", "ndjson")
RETRYABLE_STATUS = {429, 500, 502, 503, 504}
STATE_FILE = "_export_state.json"
# A FHIR resource type name; anything else in a manifest's `type` is refused before it can
# become part of a file name ("../../x" must never leave the export folder).
RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
SCOPE_VERSIONS = ("v2", "v1")


def smart_scope(types: tuple[str, ...] = (), version: str = "v2") -> str:
    """SMART system scopes for an export: v2 ``system/Patient.rs`` (read + search), v1
    ``system/Patient.read``; ``*`` when no types are named."""
    if version not in SCOPE_VERSIONS:
        raise ValueError(f"SMART scope version must be one of {SCOPE_VERSIONS}, not {version!r}")
    suffix = "rs" if version == "v2" else "read"
    return " ".join(f"system/{t}.{suffix}" for t in (types or ("*",)))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(private_key) -> dict:
    """The public half of an RSA or EC private key as a JWK (no private members)."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    public = private_key.public_key()
    if isinstance(private_key, rsa.RSAPrivateKey):
        return jwt.algorithms.RSAAlgorithm.to_jwk(public, as_dict=True)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return jwt.algorithms.ECAlgorithm.to_jwk(public, as_dict=True)
    raise ValueError("SMART Backend Services needs an RSA (RS384) or EC P-384 (ES384) key")


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url): the default key id."""
    required = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def load_private_key(private_key: str | bytes):
    """A PEM private key from its text or the path of its file."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if isinstance(private_key, str):
        private_key = (private_key if "-----BEGIN" in private_key else Path(private_key).read_text()).encode()
    return load_pem_private_key(private_key, password=None)


def jwks_document(private_key, key_id: str | None = None) -> dict:
    """The JWKS to register with an EHR for this private key: public members, ``kid``
    (default: the thumbprint), ``alg``, ``use: sig``."""
    jwk = public_jwk(private_key)
    alg = "RS384" if jwk["kty"] == "RSA" else "ES384"
    return {"keys": [{**jwk, "kid": key_id or jwk_thumbprint(jwk), "alg": alg, "use": "sig"}]}


class BulkDataError(RuntimeError):
    """A request the server refused; the message carries its OperationOutcome diagnostics."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code


def operation_outcome_text(response: httpx.Response) -> str:
    """The diagnostics of an OperationOutcome body, or a short excerpt of whatever came back,
    on one line and at most 500 characters (it goes into error messages and logs)."""
    return re.sub(r"[\x00-\x1f\x7f\s]+", " ", _server_text(response)).strip()[:500]


def _server_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome":
        parts = [i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code", "")
                 for i in body.get("issue", [])]
        return "; ".join(p for p in parts if p) or "OperationOutcome without diagnostics"
    if isinstance(body, dict) and "error" in body:  # OAuth error response
        return f"{body['error']}: {body.get('error_description', '')}".strip()
    return json.dumps(body)[:300]


def parse_retry_after(value: str | None, now: datetime | None = None,
                      minimum: float = 1.0, maximum: float = 120.0) -> float | None:
    """Seconds to wait from a Retry-After header, clamped to [minimum, maximum].

    Absurd values (days) are capped so a misbehaving server cannot stall a run; past dates
    and negative numbers become the minimum; unparseable values give None (use backoff)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    if not math.isfinite(seconds):  # "inf", "nan", "1e999": not a delay
        return None
    return min(max(seconds, minimum), maximum)


@dataclass(frozen=True)
class ExportRequest:
    level: Literal["system", "patient", "group"] = "system"
    group_id: str | None = None
    types: tuple[str, ...] = ()
    since: str | None = None
    output_format: str = "application/fhir+ndjson"

    def path(self) -> str:
        if self.level == "patient":
            return "Patient/$export"
        if self.level == "group":
            if not self.group_id:
                raise ValueError("a Group-level export needs a group id")
            return f"Group/{self.group_id}/$export"
        return "$export"

    def params(self) -> dict[str, str]:
        params = {"_outputFormat": self.output_format}
        if self.types:
            params["_type"] = ",".join(self.types)
        if self.since:
            params["_since"] = self.since
        return params


class SmartBackendAuth:
    """SMART Backend Services (client-credentials with a private-key JWT assertion)."""

    def __init__(self, client_id: str, private_key_pem: str | bytes, token_url: str | None = None,
                 scope: str = "system/*.rs", algorithm: str | None = None, refresh_margin_s: float = 60.0,
                 key_id: str | None = None, jku: str | None = None):
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        self.client_id = client_id
        self.token_url = token_url
        self.scope = scope
        self.refresh_margin_s = refresh_margin_s
        self._key = load_private_key(private_key_pem)
        # SMART Backend Services: the assertion's header must name the signing key (kid), so
        # the server can pick it from the client's registered JWKS; jku is optional.
        self.key_id = key_id or jwk_thumbprint(public_jwk(self._key))
        self.jku = jku
        if algorithm is None:
            if isinstance(self._key, rsa.RSAPrivateKey):
                algorithm = "RS384"
            elif isinstance(self._key, ec.EllipticCurvePrivateKey):
                algorithm = "ES384"
            else:
                raise ValueError("SMART Backend Services needs an RSA (RS384) or EC P-384 (ES384) private key")
        self.algorithm = algorithm
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        self.token_retries = 4
        self.sleep: Callable[[float], None] = time.sleep  # replaceable in tests

    def _request_token(self, http: httpx.Client) -> httpx.Response:
        """POST the client assertion; a busy or failing token endpoint (429, 5xx, connection
        error) is retried with backoff, a refusal is a clear error. The assertion (a bearer
        credential for five minutes) never goes into a message."""
        for attempt in range(self.token_retries + 1):
            try:
                response = http.post(self.token_url, data={
                    "grant_type": "client_credentials",
                    "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    "client_assertion": self.assertion(),
                    "scope": self.scope,
                }, headers={"Accept": "application/json"}, follow_redirects=False)
            except httpx.TransportError as err:
                if attempt == self.token_retries:
                    raise BulkDataError(f"token endpoint unreachable: {type(err).__name__}") from None
                self.sleep(min(2.0 ** attempt, 30.0))
                continue
            if response.status_code == 200:
                return response
            if response.is_redirect:
                # a 307/308 would re-send the assertion (a bearer credential for minutes) to
                # wherever the Location points: never follow it
                raise BulkDataError(f"token endpoint answered a redirect ({response.status_code}); not following it "
                                    "with the client assertion: set FHIR_TOKEN_URL to the real endpoint",
                                    response.status_code)
            if response.status_code in RETRYABLE_STATUS and attempt < self.token_retries:
                delay = parse_retry_after(response.headers.get("Retry-After"))
                self.sleep(min(2.0 ** attempt, 30.0) if delay is None else delay)
                continue
            raise BulkDataError(f"token request refused ({response.status_code}): "
                                f"{operation_outcome_text(response)}", response.status_code)
        raise BulkDataError("token request: no attempts left")

    @staticmethod
    def from_setting(client_id: str, private_key: str, **kwargs) -> "SmartBackendAuth":
        """``private_key`` is a PEM string or the path of a PEM file."""
        pem = private_key if "-----BEGIN" in private_key else Path(private_key).read_text()
        return SmartBackendAuth(client_id, pem, **kwargs)

    def jwks(self) -> dict:
        return jwks_document(self._key, self.key_id)

    def discover(self, http: httpx.Client, base_url: str) -> None:
        if self.token_url:
            return
        response = http.get(f"{base_url}/.well-known/smart-configuration", headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise BulkDataError(f"SMART configuration discovery failed ({response.status_code}): "
                                f"{operation_outcome_text(response)}", response.status_code)
        token_url = response.json().get("token_endpoint")
        if not isinstance(token_url, str) or not (urlsplit(token_url).scheme == "https"
                                                  or _origin(token_url) == _origin(base_url)):
            raise BulkDataError("the SMART configuration names a token endpoint that is neither https nor on the FHIR "
                                f"server's origin ({_safe_url(str(token_url))}): set FHIR_TOKEN_URL if it is right")
        self.token_url = token_url

    def assertion(self) -> str:
        now = int(time.time())
        claims = {"iss": self.client_id, "sub": self.client_id, "aud": self.token_url,
                  "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())}
        headers = {"typ": "JWT", "kid": self.key_id, **({"jku": self.jku} if self.jku else {})}
        return jwt.encode(claims, self._key, algorithm=self.algorithm, headers=headers)

    def token(self, http: httpx.Client, force_refresh: bool = False) -> str:
        with self._lock:
            if not force_refresh and self._token and time.time() < self._expires_at - self.refresh_margin_s:
                return self._token
            response = self._request_token(http)
            body = response.json()
            self._token = body["access_token"]
            self._expires_at = time.time() + float(body.get("expires_in", 300))
            return self._token


@dataclass
class DownloadedFile:
    kind: Literal["output", "deleted", "error"]
    resource_type: str
    url: str
    path: str
    sha256: str
    bytes: int
    skipped_as_complete: bool = False


@dataclass
class ExportResult:
    directory: Path
    transaction_time: str
    request_url: str
    files: list[DownloadedFile] = field(default_factory=list)
    resumed: bool = False

    def count(self, kind: str) -> int:
        return sum(1 for f in self.files if f.kind == kind)


class BulkDataClient:
    def __init__(
        self,
        base_url: str,
        auth: SmartBackendAuth | None = None,
        *,
        overall_timeout_s: float = 6 * 3600,
        request_timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        retry_after_bounds: tuple[float, float] = (1.0, 300.0),
        min_poll_interval_s: float = 2.0,
        max_parallel_downloads: int = 4,
        max_file_bytes: int = 50 * 1024**3,
        file_timeout_s: float = 2 * 3600,
        token_origins: tuple[str, ...] = (),
        log: Callable[[str], None] = lambda message: None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        """``min_poll_interval_s``: never poll the status URL faster than this, whatever the
        server says. ``max_file_bytes`` / ``file_timeout_s``: a ceiling on each downloaded file
        (decompressed) and on the time it may take. ``token_origins``: origins besides the FHIR
        server's own that may receive the access token with a file download."""
        self.base_url = base_url.rstrip("/")
        self.min_poll_interval_s = min_poll_interval_s
        self.max_file_bytes = max_file_bytes
        self.file_timeout_s = file_timeout_s
        self.token_origins = {_origin(self.base_url), *(_origin(o) for o in token_origins)}
        self.auth = auth
        self.overall_timeout_s = overall_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_bounds = retry_after_bounds
        self.max_parallel_downloads = max_parallel_downloads
        self.log = log
        self.sleep = sleep
        self.http = httpx.Client(timeout=request_timeout_s, follow_redirects=True,
                                 limits=httpx.Limits(max_connections=max_parallel_downloads + 2))
        self._rng = random.Random()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "BulkDataClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one request with auth, retries and clear errors --------------------------------------
    def _headers(self, extra: dict | None, with_auth: bool, force_refresh: bool = False) -> dict:
        headers = dict(extra or {})
        if with_auth and self.auth is not None:
            self.auth.discover(self.http, self.base_url)
            headers["Authorization"] = f"Bearer {self.auth.token(self.http, force_refresh)}"
        return headers

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))

    def _wait_before_retry(self, attempt: int, response: httpx.Response | None, what: str) -> None:
        delay = parse_retry_after(response.headers.get("Retry-After") if response is not None else None,
                                  minimum=self.retry_after_bounds[0], maximum=self.retry_after_bounds[1])
        delay = self._backoff(attempt) if delay is None else delay
        self.log(f"{what}: retrying in {delay:.1f}s (attempt {attempt + 1} of {self.max_retries})")
        self.sleep(delay)

    def request(self, method: str, url: str, *, headers: dict | None = None, with_auth: bool = True,
                params: dict | None = None, accept_status: tuple[int, ...] = (200,),
                throttled_until: float | None = None) -> httpx.Response:
        """A request whose status is in ``accept_status``, after retries; else BulkDataError.
        With ``throttled_until`` (a monotonic deadline), 429s are waited out until then without
        using up retries: a rate limit is a pace to keep, not a failure."""
        refreshed = False
        attempt = -1
        throttled, throttled_wait = 0, 0.0
        while attempt < self.max_retries:
            attempt += 1
            try:
                response = self.http.request(method, url, params=params,
                                             headers=self._headers(headers, with_auth))
            except httpx.TransportError as err:
                if attempt == self.max_retries:
                    raise BulkDataError(f"{method} {_safe_url(url)}: connection failed after {attempt + 1} attempts: "
                                        f"{type(err).__name__}") from None
                self._wait_before_retry(attempt, None, f"{method} {url}: {type(err).__name__}")
                continue
            if response.status_code in accept_status:
                return response
            if response.status_code == 401 and with_auth and self.auth is not None and not refreshed:
                refreshed = True  # expired or revoked token: get a new one once, then retry
                self.auth.token(self.http, force_refresh=True)
                attempt -= 1  # the refresh does not use up a retry
                continue
            if response.status_code == 429 and throttled_until is not None:
                # A rate limit is a pace to keep: wait (Retry-After, else a growing backoff, never
                # below the poll floor) without using up retries, until the run's time budget is spent.
                delay = parse_retry_after(response.headers.get("Retry-After"), minimum=self.retry_after_bounds[0],
                                          maximum=self.retry_after_bounds[1])
                delay = max(self.min_poll_interval_s, self._backoff(min(throttled, 8)) if delay is None else delay)
                remaining = throttled_until - time.monotonic()
                if remaining <= 0 or throttled_wait + delay > self.overall_timeout_s:
                    raise BulkDataError(f"{method} {_safe_url(url)}: still rate limited (HTTP 429) after waiting "
                                        f"{throttled_wait:.0f}s", 429)
                throttled, throttled_wait = throttled + 1, throttled_wait + min(delay, remaining)
                self.log(f"{method} {_safe_url(url)}: rate limited (HTTP 429); waiting {min(delay, remaining):.1f}s")
                self.sleep(min(delay, remaining))
                attempt -= 1
                continue
            if response.status_code in RETRYABLE_STATUS and attempt < self.max_retries:
                self._wait_before_retry(attempt, response, f"{method} {url}: HTTP {response.status_code}")
                continue
            raise BulkDataError(f"{method} {_safe_url(url)} failed with HTTP {response.status_code}: "
                                f"{operation_outcome_text(response)}", response.status_code)
        raise BulkDataError(f"{method} {url}: no attempts left")  # only reachable with max_retries < 0

    # -- the export flow ---------------------------------------------------------------------
    def kickoff(self, export: ExportRequest, deadline: float | None = None) -> str:
        url = f"{self.base_url}/{export.path()}"
        response = self.request("GET", url, params=export.params(), accept_status=(202,),
                                headers={"Accept": FHIR_JSON, "Prefer": "respond-async"}, throttled_until=deadline)
        status_url = response.headers.get("Content-Location")
        if not status_url:
            raise BulkDataError("kick-off accepted without a Content-Location status URL", 202)
        if _origin(status_url) not in self.token_origins:
            # polling and cancelling carry the access token: only to the server's own origin
            raise BulkDataError(f"kick-off answered a status URL on another origin ({_origin(status_url)}): not "
                                "sending the access token there (allow it with FHIR_TOKEN_ORIGINS if it is yours)", 202)
        self.log(f"export started: {export.path()} {export.params()}")
        return status_url

    def poll(self, status_url: str, deadline: float) -> dict:
        """Wait for the manifest, honouring Retry-After between polls."""
        while True:
            if time.monotonic() > deadline:
                raise BulkDataError(f"export not complete within {self.overall_timeout_s:.0f}s: {status_url}")
            response = self.request("GET", status_url, accept_status=(200, 202), headers={"Accept": "application/json"},
                                    throttled_until=deadline)
            if response.status_code == 200:
                return response.json()
            progress = response.headers.get("X-Progress")
            delay = parse_retry_after(response.headers.get("Retry-After"), minimum=self.retry_after_bounds[0],
                                      maximum=self.retry_after_bounds[1])
            # never faster than the floor, whatever the server says (rate limits are per client)
            delay = max(self.min_poll_interval_s, self.retry_after_bounds[0] if delay is None else delay)
            self.log(f"export in progress{f' ({progress})' if progress else ''}; next poll in {delay:.0f}s")
            self.sleep(min(delay, max(deadline - time.monotonic(), 0)))

    def cancel(self, status_url: str) -> None:
        try:
            self.request("DELETE", status_url, accept_status=(200, 202, 204, 404))
            self.log("export cancelled on the server")
        except BulkDataError as err:  # cancelling is best effort; the original error matters more
            self.log(f"could not cancel the export: {err}")

    def _download(self, kind: str, rtype: str, url: str, target: Path, requires_token: bool,
                  known: dict[str, dict]) -> DownloadedFile:
        """Stream one file to ``target``; ``requires_token`` was checked against the allowed
        origins before any download started."""
        record = known.get(url)
        if record and target.exists() and _sha256_file(target) == record["sha256"]:
            return DownloadedFile(kind, rtype, url, str(target), record["sha256"], target.stat().st_size, True)
        partial = target.with_name(target.name + ".part")
        started = time.monotonic()  # the time limit covers every attempt at this file
        shown = _safe_url(url)  # pre-signed file URLs carry their credential in the query
        for attempt in range(self.max_retries + 1):
            digest, size = hashlib.sha256(), 0
            try:
                headers = self._headers({"Accept": "application/fhir+ndjson", "Accept-Encoding": "gzip"}, requires_token)
                with self.http.stream("GET", url, headers=headers) as response:
                    if response.status_code == 401 and requires_token and self.auth is not None:
                        self.auth.token(self.http, force_refresh=True)
                        raise httpx.ReadError("token expired during download")
                    if response.status_code != 200:
                        if response.status_code in RETRYABLE_STATUS and attempt < self.max_retries:
                            response.read()
                            self._wait_before_retry(attempt, response, f"download {target.name}: HTTP {response.status_code}")
                            continue
                        response.read()
                        raise BulkDataError(f"download of {shown} failed with HTTP {response.status_code}: "
                                            f"{operation_outcome_text(response)}", response.status_code)
                    with open(partial, "wb") as handle:
                        # decompressed, streamed as it arrives (no fixed chunk size: a trickling
                        # server must not hide behind a buffer while the time limit runs out)
                        for chunk in response.iter_bytes():
                            size += len(chunk)
                            if size > self.max_file_bytes:
                                raise _FileLimit(f"download of {shown} stopped: larger than {self.max_file_bytes} "
                                                 "bytes (max_file_bytes)")
                            if time.monotonic() - started > self.file_timeout_s:
                                raise _FileLimit(f"download of {shown} stopped: not complete within "
                                                 f"{self.file_timeout_s:.0f}s (file_timeout_s)")
                            handle.write(chunk)
                            digest.update(chunk)
            except _FileLimit as err:
                partial.unlink(missing_ok=True)
                raise BulkDataError(str(err)) from None
            except httpx.TransportError as err:  # dropped connection, incomplete body, timeout
                if attempt == self.max_retries:
                    raise BulkDataError(f"download of {shown} failed after {attempt + 1} attempts: "
                                        f"{type(err).__name__}") from None
                self._wait_before_retry(attempt, None, f"download {target.name}: {type(err).__name__}")
                continue
            partial.replace(target)
            return DownloadedFile(kind, rtype, url, str(target), digest.hexdigest(), size)
        raise AssertionError("unreachable")

    def export(self, export: ExportRequest, directory: str | Path) -> ExportResult:
        """Run (or resume) an export into ``directory``: outputs as ``<Type>.<nnn>.ndjson``,
        deletions under ``deleted/``, server errors under ``error/``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state_path = directory / STATE_FILE
        request_key = json.dumps({"base": self.base_url, "path": export.path(), "params": export.params()}, sort_keys=True)
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        resumed = state.get("request_key") == request_key and not state.get("complete")
        fresh = {"request_key": request_key, "status_url": None, "manifest": None, "files": {}, "complete": False}

        def start_over() -> dict:
            for old in directory.iterdir():  # a new export never mixes with an older one's files
                shutil.rmtree(old) if old.is_dir() else old.unlink()
            return json.loads(json.dumps(fresh))

        if not resumed:
            state = start_over()
        deadline = time.monotonic() + self.overall_timeout_s
        try:
            try:
                result = self._run(export, directory, state, state_path, deadline)
            except BulkDataError as err:
                # The server forgot the export we were resuming (its status or file URLs answer
                # 404/410), or expired the files of this one (410 Gone: the IG's remedy is a new
                # export). Start one new export; fail if that does too.
                if not ((resumed and err.status_code in (404, 410)) or err.status_code == 410):
                    raise
                self.log(f"the export's files are gone on the server (HTTP {err.status_code}): starting a new export")
                state, resumed = start_over(), False
                _write_json(state_path, state)
                try:
                    result = self._run(export, directory, state, state_path, deadline)
                except BulkDataError as again:
                    if again.status_code in (404, 410):
                        raise BulkDataError(f"the export was started again after its files were gone, and the new "
                                            f"export's files are gone too: {again}", again.status_code) from None
                    raise
        except Exception:
            raise  # keep the state: the next run resumes this export
        except BaseException:
            if state.get("status_url") and not state.get("complete"):
                self.cancel(state["status_url"])  # interrupted on purpose: free the server's work
                state_path.unlink(missing_ok=True)
            raise
        state["complete"] = True
        _write_json(state_path, state)
        result.resumed = resumed
        return result

    def _run(self, export: ExportRequest, directory: Path, state: dict, state_path: Path,
             deadline: float) -> ExportResult:
        """Kick off (unless resuming), poll, download; every step recorded in ``state``."""
        if not state.get("status_url"):
            state["status_url"] = self.kickoff(export, deadline)
            _write_json(state_path, state)
        state["manifest"] = state.get("manifest") or self.poll(state["status_url"], deadline)
        _write_json(state_path, state)
        return self._download_all(state["manifest"], directory, state, state_path)

    def _download_all(self, manifest: dict, directory: Path, state: dict, state_path: Path) -> ExportResult:
        requires_token = manifest.get("requiresAccessToken") is True
        jobs = []
        for kind, sub in (("output", ""), ("deleted", "deleted"), ("error", "error")):
            counters: dict[str, int] = {}
            for item in manifest.get(kind, []) or []:
                rtype, url = item.get("type"), item.get("url")
                if not isinstance(rtype, str) or not RESOURCE_TYPE.fullmatch(rtype):
                    raise BulkDataError(f"manifest {kind} entry has an invalid type {str(rtype)[:80]!r}: "
                                        "nothing was downloaded")
                if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
                    raise BulkDataError(f"manifest {kind} entry for {rtype} has no http(s) url: nothing was downloaded")
                if requires_token and _origin(url) not in self.token_origins:
                    raise BulkDataError(
                        f"manifest asks for the access token at {_origin(url)}, which is not the FHIR server's "
                        f"origin: refusing to send it (allow that origin with FHIR_TOKEN_ORIGINS if it is yours)")
                n = counters.get(rtype, 0)
                counters[rtype] = n + 1
                target = directory / sub / f"{rtype}.{n:03d}.ndjson"
                target.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((kind, rtype, url, target))
        lock = threading.Lock()

        def run(job) -> DownloadedFile:
            done = self._download(*job[:4], requires_token, state["files"])
            with lock:  # record each verified file at once, so a crash later keeps it
                state["files"][done.url] = {"sha256": done.sha256, "path": done.path}
                _write_json(state_path, state)
            return done

        pool = ThreadPoolExecutor(max_workers=self.max_parallel_downloads)
        try:
            futures = [pool.submit(run, job) for job in jobs]
            wait(futures, return_when=FIRST_EXCEPTION)
            files = [future.result() for future in futures]  # raises the first fatal error
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # and the queued downloads never start
            raise
        pool.shutdown(wait=True)
        self.log(f"downloaded {sum(not f.skipped_as_complete for f in files)} files, "
                 f"{sum(f.skipped_as_complete for f in files)} already complete")
        return ExportResult(directory=directory, transaction_time=manifest.get("transactionTime", ""),
                            request_url=manifest.get("request", ""), files=files)


class _FileLimit(Exception):
    """A download went over its size ceiling or time limit (not retried)."""


def _safe_url(url: str) -> str:
    """A URL for messages and logs: no query, fragment or user info (pre-signed URLs carry a
    credential there)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str))
    tmp.replace(path)


def result_summary(result: ExportResult) -> dict:
    return {"transaction_time": result.transaction_time, "request": result.request_url, "resumed": result.resumed,
            "files": [asdict(f) for f in result.files]}


def main(argv: list[str] | None = None) -> None:
    """``python -m clinical_ml.bulk_client jwks --key key.pem [--kid ID]``: print the public JWKS
    to register with an EHR (never any private member)."""
    parser = argparse.ArgumentParser(prog="python -m clinical_ml.bulk_client",
                                     description="FHIR Bulk Data client utilities")
    commands = parser.add_subparsers(dest="command", required=True)
    jwks = commands.add_parser("jwks", help="print the public JWKS of a private key, to register the client")
    jwks.add_argument("--key", required=True, help="PEM private key file (RSA for RS384, EC P-384 for ES384)")
    jwks.add_argument("--kid", default=None, help="key id (default: the RFC 7638 thumbprint, as the client sends)")
    args = parser.parse_args(argv)
    print(json.dumps(jwks_document(load_private_key(Path(args.key).read_bytes()), args.kid), indent=2))


if __name__ == "__main__":
    main()
