from datetime import date

import duckdb
import polars as pl
import pytest
from pandera.errors import SchemaErrors

from clinical_ml.deid import deidentify, pseudonym
from clinical_ml.features import (MODEL_FEATURES, FeatureMatrixSchema, FeatureSpec, build_feature_matrix,
                                  classify_mentions)
from clinical_ml.ingest import land_ndjson
from tests.conftest import TEST_KEY, read_resources


def test_negation_family_history_and_affirmed_mentions():
    con = duckdb.connect()
    statuses = classify_mentions(con, [
        "Patient denies hypertension.",
        "Denies a history of hypertension. Mother has hypertension.",
        "No history of high blood pressure.",
        "History of hypertension, on lisinopril.",
        "Elevated blood pressure reading today; recheck advised.",
        "Family history: high blood pressure (sister).",
        "Knee pain, otherwise well.",
    ])
    assert statuses == [["negated"], ["negated", "family"], ["negated"], ["affirmed"], ["affirmed"], ["family"], []]


def test_feature_matrix_shape_labels_and_exclusions(deid_con, small_export):
    spec = FeatureSpec()
    frame = build_feature_matrix(deid_con, spec)
    assert frame.height > 150 and frame["patient_key"].is_unique().all()
    assert set(MODEL_FEATURES) <= set(frame.columns)
    assert 0.03 < frame["label"].mean() < 0.4

    # Ground truth from the raw export: onset dates (shifted like the de-identified data).
    from clinical_ml.deid import date_shift_days
    onsets = {}
    for c in read_resources(small_export, "Condition"):
        if c["code"]["coding"][0]["code"] in ("59621000", "38341003"):
            pid = c["subject"]["reference"].split("/")[1]
            onsets[pseudonym(TEST_KEY, "Patient", pid)] = (
                date.fromisoformat(c["onsetDateTime"][:10]).toordinal() + date_shift_days(TEST_KEY, pid, 365))
    index = spec.index_date.toordinal()
    for key, label in frame.select("patient_key", "label").iter_rows():
        onset = onsets.get(key)
        assert onset is None or onset > index, "a patient diagnosed before the index date is in the cohort"
        assert label == int(onset is not None and onset <= index + spec.horizon_days)


def test_features_use_only_data_before_the_index_date(small_export):
    def matrix(mutate_future: bool) -> pl.DataFrame:
        con = duckdb.connect()
        land_ndjson(con, small_export)
        deidentify(con, TEST_KEY)
        if mutate_future:
            # Change every measurement and note on or after the index date: nothing may move.
            con.execute("UPDATE deid.observation SET value_num = value_num + 50 WHERE effective_date >= DATE '2022-01-01'")
            con.execute("""UPDATE deid.document_reference SET note_text = 'History of hypertension.'
                           WHERE document_date >= DATE '2022-01-01'""")
            con.execute("""UPDATE deid.condition SET code = '44054006'
                           WHERE onset_date >= DATE '2022-01-01' AND code NOT IN ('59621000', '38341003', 'I10')""")
        return build_feature_matrix(con, FeatureSpec()).drop("label")

    assert matrix(False).equals(matrix(True))


def test_schema_rejects_an_impossible_feature_matrix(deid_con):
    frame = build_feature_matrix(deid_con, FeatureSpec())
    broken = frame.with_columns(pl.lit(500.0).alias("sbp_last"), pl.lit(2).alias("label"))
    with pytest.raises(SchemaErrors) as err:
        FeatureMatrixSchema.validate(broken, lazy=True)
    assert {"sbp_last", "label"} <= set(err.value.failure_cases["column"].to_list())


def test_conditions_count_only_when_known_at_the_index_date(small_export):
    """Refuted diagnoses are ignored, back-dated entries recorded after the index date are not
    features, and an undated hypertension diagnosis takes the patient out of the cohort."""
    con = duckdb.connect()
    land_ndjson(con, small_export)
    deidentify(con, TEST_KEY)
    spec = FeatureSpec()
    before = build_feature_matrix(con, spec)
    negatives = before.filter((pl.col("label") == 0) & (pl.col("dx_diabetes") == 0))["patient_key"].to_list()
    late, refuted, undated = negatives[:3]
    idx = spec.index_date
    rows = [
        # diabetes with an onset before the index date, but entered into the record after it
        (late, "44054006", date(idx.year - 1, 1, 1), date(idx.year, 6, 1), None),
        # hypertension before the index date, refuted
        (refuted, "59621000", date(idx.year - 1, 1, 1), date(idx.year - 1, 1, 1), "refuted"),
        # hypertension with no date at all
        (undated, "59621000", None, None, None),
    ]
    for patient_key, code, onset, recorded, verification in rows:
        con.execute("""INSERT INTO deid.condition (condition_key, patient_key, code_system, code, onset_date,
                                                   recorded_date, verification_status)
                       VALUES ('test-' || ?, ?, 'http://snomed.info/sct', ?, ?, ?, ?)""",
                    [patient_key, patient_key, code, onset, recorded, verification])
    after = build_feature_matrix(con, spec)
    row = lambda key: after.filter(pl.col("patient_key") == key).to_dicts()  # noqa: E731
    assert row(late)[0]["dx_diabetes"] == 0
    assert row(refuted)[0]["label"] == 0
    assert row(undated) == []
    assert after.height == before.height - 1
