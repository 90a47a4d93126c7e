"""De-identification in patient buckets (separate steps, separate files) gives what one pass gives."""

from dataclasses import replace
from datetime import date

import duckdb
import pytest

from clinical_ml import deid_buckets
from clinical_ml.db import DuckDBSettings, open_database, table_fingerprints
from clinical_ml.deid import DeidentificationError, deidentify
from clinical_ml.deid_buckets import (bucket_path, combine_buckets, deidentify_bucket, plan_buckets,
                                      remove_stale_buckets)
from clinical_ml.ingest import add_patient_ids, land_ndjson
from tests.conftest import TEST_KEY, read_resources, shared_sample

REFERENCE = date(2026, 1, 1)


def _landed(tmp_path, export):
    batch = tmp_path / "b0001-test.duckdb"
    settings = DuckDBSettings(temp_directory=str(tmp_path / "spill"))
    with open_database(str(batch), settings) as con:
        land_ndjson(con, export)
    return batch, settings


def _bucketed(batch, settings, buckets):
    with open_database(str(batch), settings) as con:
        plan = plan_buckets(con, buckets, REFERENCE, synthetic_only=False)
    outcomes = [deidentify_bucket(batch, b, plan, TEST_KEY, settings) for b in range(buckets)]
    with open_database(str(batch), settings) as con:
        combined = combine_buckets(con, batch, plan)
        return plan, outcomes, combined, table_fingerprints(con, ["deid"])


def _one_pass(batch, settings):
    with open_database(str(batch), settings) as con:
        report = deidentify(con, TEST_KEY, reference_date=REFERENCE)
        return report, table_fingerprints(con, ["deid"])


@pytest.mark.parametrize("source,buckets", [("generated", 3), ("generated", 1), ("synthea-bulk-10p", 3),
                                            ("synthea-stu3-1461p", 3)])
def test_buckets_combined_equal_one_pass_tables_and_counts(tmp_path, small_export, source, buckets):
    """The stu3 sample names its drugs by reference to Medication resources, which every bucket
    reads whole. One bucket is the batch file itself."""
    export = small_export if source == "generated" else shared_sample(source)
    batch, settings = _landed(tmp_path, export)
    plan, outcomes, combined, bucketed = _bucketed(batch, settings, buckets=buckets)
    report, whole = _one_pass(batch, settings)
    assert bucketed == whole
    assert combined.report.removed_by_category == report.removed_by_category
    assert combined.report.orphan_rows_dropped == report.orphan_rows_dropped
    assert combined.report.medications_by_source == report.medications_by_source
    assert combined.findings == []
    assert sum(combined.rows_by_bucket.values()) == plan.patients
    assert all(n > 0 for n in combined.rows_by_bucket.values())  # the hash spreads patients
    assert {bucket_path(batch, b, buckets) for b in range(buckets)} == (
        {batch} if buckets == 1 else set((tmp_path / "b0001-test.buckets").glob("*.duckdb")))
    assert combined.outcomes == outcomes  # read back from the bucket files as the buckets made them


def test_a_bucket_finds_an_identifier_of_a_patient_in_another_bucket(tmp_path, small_export, monkeypatch):
    """The leak check of a bucket looks for every landed patient's identifiers, not only its own
    patients': another patient's SSN in a note is a leak wherever that patient's bucket is."""
    batch, settings = _landed(tmp_path, small_export)
    with open_database(str(batch), settings) as con:
        plan = plan_buckets(con, 2, REFERENCE, synthetic_only=False)
        owners = dict(con.execute(f"SELECT id, {deid_buckets.bucket_sql('patient_id', 2)} FROM raw.patient").fetchall())
    other = next(p for p in read_resources(small_export, "Patient") if owners[p["id"]] == 1)
    ssn = other["identifier"][1]["value"]

    def planting(con, *args, **kwargs):
        report = deidentify(con, *args, **kwargs)
        con.execute("UPDATE deid.document_reference SET note_text = note_text || ' ssn ' || ? WHERE rowid = 0", [ssn])
        return report

    monkeypatch.setattr(deid_buckets, "deidentify", planting)
    outcome = deidentify_bucket(batch, 0, plan, TEST_KEY, settings)
    assert outcome.findings == [
        {"table": "deid.document_reference", "column": "note_text", "category": "identifier", "hits": 1}]
    assert ssn not in repr(outcome)


def test_buckets_that_do_not_reconcile_are_refused_and_leave_the_tables_as_they_were(tmp_path, small_export):
    batch, settings = _landed(tmp_path, small_export)
    plan, outcomes, _, before = _bucketed(batch, settings, buckets=2)
    with open_database(str(bucket_path(batch, 1, 2)), settings) as con:  # a patient lost from a bucket
        con.execute("DELETE FROM deid.patient WHERE rowid = 0")
    with open_database(str(batch), settings) as con:
        with pytest.raises(DeidentificationError, match="do not reconcile"):
            combine_buckets(con, batch, plan)
        # bucket files of an earlier plan (an earlier run) are not combined with this one's
        with pytest.raises(DeidentificationError, match="bucket 1 of 2 was not made under this run's plan"):
            combine_buckets(con, batch, replace(plan, plan_id="an-earlier-run"))
        assert table_fingerprints(con, ["deid"]) == before
    bucket_path(batch, 0, 2).unlink()
    with open_database(str(batch), settings) as con:
        with pytest.raises(DeidentificationError, match=r"buckets \[1\] of 2 have no file"):
            combine_buckets(con, batch, plan)


def test_a_new_bucket_count_removes_the_files_of_the_old_one(tmp_path, small_export):
    batch, settings = _landed(tmp_path, small_export)
    _bucketed(batch, settings, buckets=3)
    assert len(list((tmp_path / "b0001-test.buckets").glob("*.duckdb"))) == 3
    with open_database(str(batch), settings) as con:
        plan = plan_buckets(con, 2, REFERENCE, synthetic_only=False)
    removed = remove_stale_buckets(batch, plan)
    assert sorted(p.name for p in removed if p.suffix == ".duckdb") == ["01-of-03.duckdb", "02-of-03.duckdb",
                                                                         "03-of-03.duckdb"]
    assert list((tmp_path / "b0001-test.buckets").iterdir()) == []  # their lock (and WAL) files too
    with open_database(str(batch), settings) as con:
        plan = plan_buckets(con, 1, REFERENCE, synthetic_only=False)
    assert remove_stale_buckets(batch, plan) == [] and batch.exists()


def test_a_failed_bucket_leaves_no_outcome_so_its_old_one_is_never_combined(tmp_path, small_export, monkeypatch):
    """A bucket that fails after writing its tables (in the leak check, say) must not leave the
    previous run's outcome beside them: the combine would report that run's passing check."""
    batch, settings = _landed(tmp_path, small_export)
    plan, _, _, _ = _bucketed(batch, settings, buckets=2)

    def failing(*args, **kwargs):
        raise DeidentificationError("leak scan failed")

    monkeypatch.setattr(deid_buckets, "find_identifier_leaks", failing)
    with pytest.raises(DeidentificationError):
        deidentify_bucket(batch, 1, plan, TEST_KEY, settings)  # the same plan: a retry of a step
    with open_database(str(batch), settings) as con:
        with pytest.raises(DeidentificationError, match="bucket 2 of 2 was not made under this run's plan"):
            combine_buckets(con, batch, plan)


def test_a_reference_to_another_patients_encounter_links_as_in_one_pass(tmp_path, small_export):
    """Buckets read every encounter id of the batch: a resource that points to an encounter of a
    patient in another bucket keeps its encounter key (one pass gives it one)."""
    batch, settings = _landed(tmp_path, small_export)
    with open_database(str(batch), settings) as con:
        bucket_of = deid_buckets.bucket_sql("patient_id", 3)
        observation, own, other = con.execute(f"""
            SELECT o.id, o.resource->'encounter'->>'reference', 'Encounter/' || e.id
            FROM raw.observation o JOIN raw.encounter e ON {bucket_of.replace('patient_id', 'e.patient_id')}
                                                        <> {bucket_of.replace('patient_id', 'o.patient_id')}
            WHERE (o.resource->'encounter') IS NOT NULL LIMIT 1""").fetchone()
        con.execute("UPDATE raw.observation SET resource = replace(resource::VARCHAR, ?, ?)::JSON WHERE id = ?",
                    [f'"{own}"', f'"{other}"', observation])
    _, _, _, bucketed = _bucketed(batch, settings, buckets=3)
    _, whole = _one_pass(batch, settings)
    assert bucketed == whole


def test_a_batch_landed_before_patient_ids_gets_them_as_landing_gives_them(tmp_path, small_export):
    batch, settings = _landed(tmp_path, small_export)
    with open_database(str(batch), settings) as con:
        landed = {t: con.execute(f"SELECT list(patient_id ORDER BY id) FROM raw.{t}").fetchone()[0]
                  for t in ("patient", "observation", "document_reference")}
        assert None not in landed["observation"]
        for table in landed:
            con.execute(f"ALTER TABLE raw.{table} DROP COLUMN patient_id")
        assert set(add_patient_ids(con)) >= set(landed)
        assert add_patient_ids(con) == []  # once
        for table, ids in landed.items():
            assert con.execute(f"SELECT list(patient_id ORDER BY id) FROM raw.{table}").fetchone()[0] == ids


def test_the_demo_key_check_and_the_bucket_count_are_decided_once_per_batch(tmp_path):
    con = duckdb.connect()
    land_ndjson(con, shared_sample("synthea-bulk-10p"))
    with pytest.raises(Exception, match="published demo key"):
        plan_buckets(con, 2, None, synthetic_only=True)
    with pytest.raises(ValueError, match="at least 1"):
        plan_buckets(con, 0, None, synthetic_only=False)
    plan = plan_buckets(con, 2, None, synthetic_only=False)
    assert plan.reference_date >= date.today()
    assert plan.patients == con.execute("SELECT count(*) FROM raw.patient").fetchone()[0] > 0
