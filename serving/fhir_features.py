"""One patient's FHIR R4 Bundle -> the model's features, by the batch pipeline's own code.

The Bundle's resources are written as NDJSON to a private in-memory folder (``/dev/shm`` where
it exists), landed by ``land_ndjson`` into an in-memory DuckDB, de-identified by ``deidentify``
with the pipeline's key and settings, and featurized by the feature matrix's SQL at the as-of
date (in de-identified time: shifted by the patient's own secret offset, or generalized to the
year), without the censoring rule. The same functions, the same SQL: training and serving
cannot drift apart. Nothing identifying leaves this module: the result is the pseudonymous
patient key and the feature values.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb
import orjson
import pandera.errors

from clinical_ml.deid import DeidentificationError, MissingSecretKey, date_shift_days, deidentify, safe_error_message
from clinical_ml.features import FeatureSpec, scoring_features
from clinical_ml.ingest import land_ndjson

_TYPE = re.compile(r"[A-Z][A-Za-z]{1,63}")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR id syntax
MAX_ENTRIES = 20_000


class BundleError(ValueError):
    """The Bundle cannot be scored; the message names positions and rules, never values."""


class NotEligible(ValueError):
    """The patient is outside the model's intended population at the as-of date."""


@dataclass(frozen=True)
class DeidSettings:
    key: bytes
    max_shift_days: int
    date_mode: str
    reference_date: date | None
    synthetic_only: bool


@dataclass(frozen=True)
class BundleFeatures:
    patient_key: str
    landmark_date: date  # de-identified time
    features: dict[str, float | int | None]
    quarantined: int


def _scratch_dir() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and shm.stat().st_mode & 0o002 else None


def split_bundle(bundle: dict) -> tuple[str, dict[str, list[dict]]]:
    """(patient id, resources by type) of a patient Bundle, or a BundleError."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise BundleError("the body must be a FHIR Bundle (resourceType 'Bundle')")
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise BundleError("the Bundle has no entries")
    if len(entries) > MAX_ENTRIES:
        raise BundleError(f"the Bundle has more than {MAX_ENTRIES} entries")
    by_type: dict[str, list[dict]] = {}
    for position, entry in enumerate(entries):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            raise BundleError(f"entry {position} has no resource object")
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str) or not _TYPE.fullmatch(rtype):
            raise BundleError(f"entry {position}: resourceType missing or not a FHIR type name")
        if not resource.get("id"):
            # transaction/collection Bundles name resources by fullUrl (references use urn:uuid:)
            full_url = entry.get("fullUrl")
            if isinstance(full_url, str) and full_url.startswith("urn:uuid:"):
                resource = {**resource, "id": full_url.removeprefix("urn:uuid:")}
        if not isinstance(resource.get("id"), str) or not _ID.fullmatch(resource["id"]):
            raise BundleError(f"entry {position} ({rtype}): id missing or not a FHIR id (and no urn:uuid fullUrl)")
        by_type.setdefault(rtype, []).append(resource)
    patients = by_type.get("Patient", [])
    if len(patients) != 1:
        raise BundleError(f"the Bundle must hold exactly one Patient (it holds {len(patients)})")
    return patients[0]["id"], by_type


def landmark_for(as_of: date, patient_id: str, deid: DeidSettings) -> date:
    """The as-of date in the patient's de-identified time, as the pipeline moved their dates."""
    if deid.date_mode == "year":
        return date(as_of.year, 1, 1)
    return date.fromordinal(as_of.toordinal() + date_shift_days(deid.key, patient_id, deid.max_shift_days))


def bundle_features(bundle: dict, as_of: date, deid: DeidSettings, spec: FeatureSpec,
                    feature_names: tuple[str, ...]) -> BundleFeatures:
    patient_id, by_type = split_bundle(bundle)
    folder = tempfile.mkdtemp(prefix="bundle-", dir=_scratch_dir())  # mode 0700
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        return _features(con, folder, by_type, patient_id, as_of, deid, spec, feature_names)
    except duckdb.Error as error:  # DuckDB quotes offending values: keep the shape only
        raise BundleError(f"the Bundle could not be processed: {safe_error_message(error)}") from None
    finally:
        con.close()
        shutil.rmtree(folder, ignore_errors=True)


def _features(con: duckdb.DuckDBPyConnection, folder: str, by_type: dict[str, list[dict]], patient_id: str,
              as_of: date, deid: DeidSettings, spec: FeatureSpec, feature_names: tuple[str, ...]) -> BundleFeatures:
    for rtype, resources in by_type.items():
        Path(folder, f"{rtype}.ndjson").write_bytes(b"\n".join(orjson.dumps(r) for r in resources) + b"\n")
    report = land_ndjson(con, folder)
    try:
        deidentify(con, deid.key, max_shift_days=deid.max_shift_days, date_mode=deid.date_mode,
                   reference_date=deid.reference_date, synthetic_only=deid.synthetic_only)
    except MissingSecretKey as error:
        raise BundleError(str(error)) from None
    except DeidentificationError as error:
        raise BundleError(str(error)) from None
    landmark = landmark_for(as_of, patient_id, deid)
    try:
        frame = scoring_features(con, spec, landmark)
    except pandera.errors.SchemaErrors as error:  # its message quotes the patient's values: names only
        columns = sorted({str(e.column_name) for e in error.schema_errors if getattr(e, "column_name", None)})
        raise BundleError(f"implausible feature values ({', '.join(columns)}): check units and values") from None
    if frame.height == 0:
        raise NotEligible(
            f"the patient is outside the model's intended population at this date: it scores adults "
            f"(age {spec.min_age}+) without a hypertension diagnosis, with at least one encounter in the "
            f"{spec.lookback_days} days before the as-of date")
    row = frame.row(0, named=True)
    return BundleFeatures(row["patient_key"], row["landmark_date"], {n: row[n] for n in feature_names},
                          report.quarantined)
