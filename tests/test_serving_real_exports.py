"""The service's Bundle path on exports the project did not make: one patient's resources as a
Bundle give the same features as the batch computation over the whole export."""

from __future__ import annotations

import json
from datetime import date, timedelta

import duckdb
import pytest

from clinical_ml.deid import date_shift_days, deidentify, pseudonym
from clinical_ml.features import MODEL_FEATURES, FeatureSpec, scoring_features
from clinical_ml.ingest import land_ndjson
from serving.fhir_features import DeidSettings, bundle_features
from tests.conftest import shared_sample

pytestmark = pytest.mark.slow
KEY = b"real-export-check-key-0123456789abcdef"
PATIENT_TABLES = ("encounter", "condition", "observation", "medication_request", "document_reference")


def patient_bundle(con: duckdb.DuckDBPyConnection, patient_id: str, medications: dict[str, dict]) -> dict:
    """The patient's resources from the raw tables, with the Medications they reference."""
    entries = [{"resource": json.loads(con.execute("SELECT resource FROM raw.patient WHERE id = ?",
                                                    [patient_id]).fetchone()[0])}]
    for table in PATIENT_TABLES:
        for (text,) in con.execute(
                f"SELECT resource FROM raw.{table} WHERE regexp_extract(coalesce(resource->'subject'->>'reference', "
                "resource->'patient'->>'reference'), '([^/:]+)$', 1) = ?", [patient_id]).fetchall():
            resource = json.loads(text)
            entries.append({"resource": resource})
            referenced = (resource.get("medicationReference") or {}).get("reference", "").rsplit("/", 1)[-1]
            if referenced in medications:
                entries.append({"resource": medications[referenced]})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


@pytest.mark.parametrize("sample,landmark", [("synthea-stu3-1461p", date(2016, 1, 1)),
                                             ("synthea-2019-40p", date(2015, 1, 1))])
def test_a_patients_bundle_gives_the_batch_features(sample, landmark):
    con = duckdb.connect()
    land_ndjson(con, shared_sample(sample))
    deidentify(con, KEY)
    spec = FeatureSpec()
    batch = scoring_features(con, spec, landmark)
    assert batch.height >= 10
    medications = {}
    if con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'raw' AND table_name = 'medication'"
                   ).fetchone()[0]:
        medications = {i: json.loads(r) for i, r in con.execute("SELECT id, resource FROM raw.medication").fetchall()}
    patient_ids = {pseudonym(KEY, "Patient", i): i for (i,) in con.execute("SELECT id FROM raw.patient").fetchall()}
    deid = DeidSettings(KEY, 365, "shift", None, False)
    for row in batch.head(12).iter_rows(named=True):
        patient_id = patient_ids[row["patient_key"]]
        as_of = landmark - timedelta(days=date_shift_days(KEY, patient_id, 365))
        found = bundle_features(patient_bundle(con, patient_id, medications), as_of, deid, spec, tuple(MODEL_FEATURES))
        assert found.patient_key == row["patient_key"]
        for name in MODEL_FEATURES:
            assert found.features[name] == pytest.approx(row[name], abs=1e-9, nan_ok=True), (sample, name)
