from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.batches import BatchSource
from clinical_ml.bulk_client import BulkDataClient, ExportRequest, ExportResult, SmartBackendAuth, smart_scope
from clinical_ml.synthetic import CohortSpec, write_bulk_export
from resources.settings import data_home


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _env(name: str) -> Optional[str]:
    return os.environ.get(name) or None


@dataclass
class SourceBatch:
    """What the raw asset lands: a folder, and whether it replaces or merges into the tables."""

    directory: Path
    mode: str  # "replace" (full export) or "merge" (incremental _since export)
    export: ExportResult | None = None


class FhirSource(ConfigurableResource):
    """Where raw FHIR comes from, in order of precedence:

    1. ``FHIR_BASE_URL``: a FHIR Bulk Data server ($export, SMART Backend Services when
       ``FHIR_CLIENT_ID`` and ``FHIR_PRIVATE_KEY`` are set);
    2. ``FHIR_NDJSON_DIR``: a folder of Bulk Data / Synthea NDJSON;
    3. the built-in deterministic synthetic generator.
    The private key itself is never part of this config: only the variable is read, at use time."""

    base_url: Optional[str] = Field(default_factory=lambda: _env("FHIR_BASE_URL"))
    client_id: Optional[str] = Field(default_factory=lambda: _env("FHIR_CLIENT_ID"))
    private_key_env_var: str = Field(default="FHIR_PRIVATE_KEY",
                                     description="Environment variable with the PEM, or the path of a PEM file.")
    token_url: Optional[str] = Field(default_factory=lambda: _env("FHIR_TOKEN_URL"),
                                     description="Else discovered from .well-known/smart-configuration.")
    key_id: Optional[str] = Field(default_factory=lambda: _env("FHIR_KEY_ID"),
                                  description="kid of the client's key as registered; default: its RFC 7638 thumbprint.")
    jku: Optional[str] = Field(default_factory=lambda: _env("FHIR_JKU"),
                               description="URL of the client's JWKS, sent as jku in the assertion header (optional).")
    scope: Optional[str] = Field(default_factory=lambda: _env("FHIR_SCOPE"),
                                 description="Token scope; default: SMART system scopes for the exported types.")
    scope_version: str = Field(default_factory=lambda: os.environ.get("FHIR_SCOPE_VERSION", "v2"),
                               description="v2 (system/<Type>.rs) or v1 (system/<Type>.read) for the default scope.")
    token_origins: Optional[str] = Field(
        default_factory=lambda: _env("FHIR_TOKEN_ORIGINS"),
        description="Comma-separated origins, besides the FHIR server's own, allowed to receive the access token "
        "with file downloads (e.g. a storage host the EHR serves files from).")
    min_poll_seconds: float = Field(default_factory=lambda: float(os.environ.get("FHIR_MIN_POLL_SECONDS", "2")),
                                    description="Never poll the export status faster than this.")
    max_file_bytes: int = Field(default_factory=lambda: _env_int("FHIR_MAX_FILE_BYTES", 50 * 1024**3),
                                description="Ceiling on one downloaded file (decompressed).")
    file_timeout_seconds: float = Field(default_factory=lambda: float(os.environ.get("FHIR_FILE_TIMEOUT_SECONDS", "7200")),
                                        description="Time limit for one file download.")
    max_export_errors: int = Field(
        default_factory=lambda: _env_int("FHIR_MAX_EXPORT_ERRORS", 0),
        description="Server-reported export errors accepted before the blocking completeness check fails "
        "(0: any error stops the pipeline; raise it only where partial data is acceptable).")
    export_types: Optional[str] = Field(default_factory=lambda: _env("FHIR_EXPORT_TYPES"),
                                        description="Comma-separated resource types (_type).")
    export_level: str = Field(default_factory=lambda: os.environ.get("FHIR_EXPORT_LEVEL", "system"),
                              description="system, patient, or group:<id>.")
    incremental: bool = Field(default_factory=lambda: os.environ.get("FHIR_INCREMENTAL") == "1",
                              description="Export only changes since the last landed export (_since) and merge.")
    validation: str = Field(default_factory=lambda: os.environ.get("FHIR_VALIDATION", "none"),
                            description="Check resources against the fhir.resources R4B models: none, sample or all.")
    ndjson_dir: Optional[str] = Field(default_factory=lambda: _env("FHIR_NDJSON_DIR"),
                                      description="Read this folder of <Type>.ndjson files instead of generating.")
    synthetic_patients: int = Field(default_factory=lambda: _env_int("SYNTHETIC_PATIENTS", 5000))
    synthetic_seed: int = Field(default_factory=lambda: _env_int("SYNTHETIC_SEED", 42))
    export_root: str = Field(default_factory=lambda: str(data_home() / "exports"),
                             description="Where generated and downloaded exports are written.")

    def describe(self) -> str:
        if self.base_url:
            return f"FHIR Bulk Data server {self.base_url}"
        if self.ndjson_dir:
            return f"directory {self.ndjson_dir}"
        return f"synthetic generator ({self.synthetic_patients} patients, seed {self.synthetic_seed})"

    # -- Bulk Data server ----------------------------------------------------------------------
    def _bulk_state_path(self) -> Path:
        return Path(self.export_root) / "bulk" / "last_transaction_time.json"

    def bulk_client(self, log: Callable[[str], None] = lambda m: None) -> BulkDataClient:
        auth = None
        if self.client_id:
            private_key = os.environ.get(self.private_key_env_var)
            if not private_key:
                raise ValueError(f"FHIR_CLIENT_ID is set but {self.private_key_env_var} is empty: set it to the PEM "
                                 "private key registered with the server, or to the path of its file.")
            auth = SmartBackendAuth.from_setting(self.client_id, private_key, token_url=self.token_url,
                                                 scope=self.smart_scope(), key_id=self.key_id, jku=self.jku)
        origins = tuple(o.strip() for o in (self.token_origins or "").split(",") if o.strip())
        return BulkDataClient(self.base_url, auth, log=log, min_poll_interval_s=self.min_poll_seconds,
                              max_file_bytes=self.max_file_bytes, file_timeout_s=self.file_timeout_seconds,
                              token_origins=origins)

    def smart_scope(self) -> str:
        return self.scope or smart_scope(self.export_request().types, self.scope_version)

    def export_request(self) -> ExportRequest:
        level, _, group = self.export_level.partition(":")
        since = None
        if self.incremental and self._bulk_state_path().exists():
            since = json.loads(self._bulk_state_path().read_text()).get(self.base_url)
        types = tuple(t.strip() for t in (self.export_types or "").split(",") if t.strip())
        return ExportRequest(level=level, group_id=group or None, types=types, since=since)

    def record_landed_export(self, export: ExportResult) -> None:
        """Remember the export's transactionTime: the next incremental export starts there."""
        path = self._bulk_state_path()
        state = json.loads(path.read_text()) if path.exists() else {}
        state[self.base_url] = export.transaction_time
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(state, indent=1))

    # -- what to land ------------------------------------------------------------------------------
    def fetch(self, log: Callable[[str], None] = lambda m: None) -> SourceBatch:
        if self.base_url:
            request = self.export_request()
            with self.bulk_client(log) as client:
                result = client.export(request, Path(self.export_root) / "bulk" / "current")
            return SourceBatch(result.directory, "merge" if request.since else "replace", result)
        if self.ndjson_dir:
            path = Path(self.ndjson_dir)
            if not path.is_dir():
                raise FileNotFoundError(f"FHIR_NDJSON_DIR does not exist or is not a folder: {path}")
            return SourceBatch(path, "replace")
        spec = CohortSpec(n_patients=self.synthetic_patients, seed=self.synthetic_seed)
        return SourceBatch(self.generate(spec), "replace")

    def fetch_batch(self, source: BatchSource, log: Callable[[str], None] = lambda m: None) -> SourceBatch:
        """What a registered batch lands: its own folder or generator settings, else this source."""
        if source.kind == "synthetic":
            spec = CohortSpec(n_patients=source.synthetic_patients, seed=source.synthetic_seed, drift=source.drift)
            return SourceBatch(self.generate(spec), "replace")
        if source.kind == "directory":
            path = Path(source.directory)
            if not path.is_dir():
                raise FileNotFoundError(f"the batch's folder does not exist or is not a folder: {path}")
            return SourceBatch(path, "replace")
        return self.fetch(log)

    def generate(self, spec: CohortSpec) -> Path:
        name = f"synthetic-n{spec.n_patients}-seed{spec.seed}{'-drift' if spec.drift else ''}"
        return write_bulk_export(Path(self.export_root) / name, spec).directory
