from datetime import date, timedelta

import duckdb
import polars as pl
import pytest
from pandera.errors import SchemaErrors

from clinical_ml.codes import encounter_class_sql
from clinical_ml.deid import date_shift_days, deidentify, pseudonym
from clinical_ml.features import (MODEL_FEATURES, FeatureMatrixSchema, FeatureSpec, build_feature_matrix,
                                  classify_mentions, landmark_summary, resolve_landmarks)
from clinical_ml.ingest import land_ndjson
from tests.conftest import TEST_KEY, read_resources


def fresh_deid(export) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    land_ndjson(con, export)
    deidentify(con, TEST_KEY)
    return con


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
        "No chest pain but has hypertension and type 2 diabetes; former smoker. Rule out CKD. Obese. "
        "No family history of hyperlipidemia.",
    ])
    assert statuses == [
        [("htn", "negated")], [("htn", "negated"), ("htn", "family")], [("htn", "negated")],
        # a history is not a current, affirmed mention
        [("htn", "historical")], [("htn", "affirmed")], [("htn", "family")], [],
        # every condition of the model, each in its own scope; a negated family history is not one
        [("htn", "affirmed"), ("diabetes", "affirmed"), ("smoking", "historical"), ("ckd", "hypothetical"),
         ("obesity", "affirmed"), ("hyperlipidemia", "other")],
    ]


def test_note_features_count_only_notes_before_the_landmark(small_export):
    """One planted note per kind of mention, dated the day before a landmark, moves that
    landmark's note features and not the earlier one's; a note dated on the landmark counts only later."""
    con = fresh_deid(small_export)
    spec = FeatureSpec()
    plan = resolve_landmarks(con, spec)
    first, second = plan.landmarks[-3], plan.landmarks[-2]
    before = build_feature_matrix(con, spec, plan=plan)
    patient = (before.filter(pl.col("landmark_date").is_in([first, second])).group_by("patient_key").len()
               .filter(pl.col("len") == 2)["patient_key"].sort()[0])
    text = ("Type 2 diabetes, on metformin. Denies chest pain or CKD. Mother with hyperlipidemia. "
            "History of obesity. Screen for hypertension. Current smoker.")
    for day in (second - timedelta(days=1), second):
        con.execute("""INSERT INTO deid.document_reference (document_key, patient_key, document_date, note_text)
                       VALUES (?, ?, ?, ?)""", [f"test-note-{day}", patient, day, text])
    after = build_feature_matrix(con, spec, plan=plan)

    def row(frame, landmark):
        return frame.filter((pl.col("patient_key") == patient) & (pl.col("landmark_date") == landmark)).to_dicts()[0]

    assert row(after, first) == row(before, first)
    new, old = row(after, second), row(before, second)
    delta = {k: new[k] - old[k] for k in new if k.startswith("note_") and new[k] != old[k]}
    # the historical obesity and the hypothetical hypertension change nothing
    assert delta == {"note_diabetes_affirmed": 1, "note_ckd_negated": 1, "note_smoking_affirmed": 1,
                     "note_family_history_hyperlipidemia": 1}


def test_landmarks_come_from_the_data_span(deid_con):
    spec = FeatureSpec()
    plan = resolve_landmarks(deid_con, spec)
    assert plan.derived and 2 <= len(plan.landmarks) <= spec.max_landmarks
    assert plan.landmarks[-1] <= plan.data_end - timedelta(days=spec.horizon_days)
    assert plan.landmarks[0] >= plan.data_start + timedelta(days=spec.lookback_days)
    assert all(d.day == 1 for d in plan.landmarks)
    assert all((b.year * 12 + b.month) - (a.year * 12 + a.month) == 12 for a, b in zip(plan.landmarks, plan.landmarks[1:]))
    # another interval, and pinned dates, are honoured
    assert len(resolve_landmarks(deid_con, FeatureSpec(landmark_interval_months=6)).landmarks) == spec.max_landmarks
    pinned = (date(2021, 1, 1), date(2020, 1, 1))
    assert resolve_landmarks(deid_con, FeatureSpec(landmarks=pinned)).landmarks == tuple(sorted(pinned))


def test_landmark_cohort_labels_exclusions_and_censoring(deid_con, small_export):
    spec = FeatureSpec()
    plan = resolve_landmarks(deid_con, spec)
    frame = build_feature_matrix(deid_con, spec, plan=plan)
    assert set(MODEL_FEATURES) <= set(frame.columns)
    assert frame.select("patient_key", "landmark_date").is_unique().all()
    assert set(frame["landmark_date"].unique()) <= set(plan.landmarks)
    assert frame["patient_key"].n_unique() < frame.height  # patients recur across landmarks
    assert not [c for c in MODEL_FEATURES if frame[c].cast(pl.Float64).is_nan().any()]  # missing is NULL, not NaN
    assert 0.02 < frame["label"].mean() < 0.4

    # Ground truth from the raw export, shifted like the de-identified data.
    onsets, last_seen = {}, {}
    for c in read_resources(small_export, "Condition"):
        if c["code"]["coding"][0]["code"] in ("59621000", "38341003"):
            pid = c["subject"]["reference"].split("/")[1]
            day = date.fromisoformat(c["onsetDateTime"][:10]) + timedelta(days=date_shift_days(TEST_KEY, pid, 365))
            key = pseudonym(TEST_KEY, "Patient", pid)
            onsets[key] = min(day, onsets.get(key, day))
    for e in read_resources(small_export, "Encounter"):
        pid = e["subject"]["reference"].split("/")[1]
        day = date.fromisoformat(e["period"]["start"][:10]) + timedelta(days=date_shift_days(TEST_KEY, pid, 365))
        key = pseudonym(TEST_KEY, "Patient", pid)
        last_seen[key] = max(day, last_seen.get(key, day))
    horizon = timedelta(days=spec.horizon_days)
    for key, landmark, label in frame.select("patient_key", "landmark_date", "label").iter_rows():
        onset = onsets.get(key)
        assert onset is None or onset > landmark, "a patient diagnosed before the landmark is in the cohort"
        assert last_seen[key] >= landmark + horizon, "a patient not observed through the horizon counted as known"
        assert label == int(onset is not None and onset <= landmark + horizon)
    # censored, not negative: someone whose record ends inside the horizon is absent at that landmark
    censored = [(k, lm) for k in last_seen for lm in plan.landmarks if lm < last_seen[k] < lm + horizon
                and (onsets.get(k) is None or onsets[k] > lm)]
    assert censored
    present = set(frame.select("patient_key", "landmark_date").iter_rows())
    assert not present & set(censored)

    summary = landmark_summary(frame, plan)
    assert summary["landmark_date"].to_list() == list(plan.landmarks)
    assert summary["eligible"].sum() == frame.height and summary["positives"].sum() == frame["label"].sum()


def test_a_value_after_one_landmark_changes_only_later_landmarks(small_export):
    con = fresh_deid(small_export)
    spec = FeatureSpec()
    plan = resolve_landmarks(con, spec)
    before = build_feature_matrix(con, spec, plan=plan)
    first, second = plan.landmarks[-3], plan.landmarks[-2]
    both = (before.filter(pl.col("landmark_date").is_in([first, second])).group_by("patient_key").len()
            .filter(pl.col("len") == 2)["patient_key"].sort())
    patient = both[0]
    # a systolic reading of 250 dated after the first landmark, before the second
    con.execute("INSERT INTO deid.observation (patient_key, effective_date, code, value_num) VALUES (?, ?, '8480-6', 250)",
                [patient, first + timedelta(days=10)])
    after = build_feature_matrix(con, spec, plan=plan)

    def row(frame, landmark):
        return frame.filter((pl.col("patient_key") == patient) & (pl.col("landmark_date") == landmark)).to_dicts()[0]

    assert row(after, first) == row(before, first)
    assert row(after, second)["sbp_max_3y"] == 250 and row(before, second)["sbp_max_3y"] != 250
    assert after.filter(pl.col("patient_key") != patient).equals(before.filter(pl.col("patient_key") != patient))


def test_data_from_the_last_landmark_on_changes_no_feature(small_export):
    def matrix(mutate_future: bool) -> pl.DataFrame:
        con = fresh_deid(small_export)
        spec = FeatureSpec()
        plan = resolve_landmarks(con, spec)
        last = plan.landmarks[-1]
        if mutate_future:
            con.execute("UPDATE deid.observation SET value_num = value_num + 50 WHERE effective_date >= ?", [last])
            con.execute("UPDATE deid.document_reference SET note_text = 'History of hypertension.' WHERE document_date >= ?",
                        [last])
            con.execute("""UPDATE deid.condition SET code = '44054006'
                           WHERE onset_date >= ? AND code NOT IN ('59621000', '38341003')""", [last])
            con.execute("UPDATE deid.medication_request SET rxnorm_code = '259255' WHERE authored_date >= ?", [last])
        return build_feature_matrix(con, spec, plan=plan).drop("label")

    assert matrix(False).equals(matrix(True))


def test_schema_rejects_an_impossible_feature_matrix(deid_con):
    frame = build_feature_matrix(deid_con, FeatureSpec())
    broken = frame.with_columns(pl.lit(500.0).alias("sbp_last"), pl.lit(2).alias("label"))
    with pytest.raises(SchemaErrors) as err:
        FeatureMatrixSchema.validate(broken, lazy=True)
    assert {"sbp_last", "label"} <= set(err.value.failure_cases["column"].to_list())
    duplicated = pl.concat([frame.head(1), frame.head(1)])
    with pytest.raises(SchemaErrors):
        FeatureMatrixSchema.validate(duplicated, lazy=True)


def test_conditions_count_only_when_known_at_the_landmark(small_export):
    """Refuted diagnoses are ignored, back-dated entries recorded after the landmark are not
    features, and an undated hypertension diagnosis takes the patient out of every landmark."""
    con = fresh_deid(small_export)
    spec = FeatureSpec()
    plan = resolve_landmarks(con, spec)
    idx = plan.landmarks[-3]
    before = build_feature_matrix(con, spec, plan=plan)
    at_idx = before.filter(pl.col("landmark_date") == idx)
    negatives = at_idx.filter((pl.col("label") == 0) & (pl.col("dx_diabetes") == 0))["patient_key"].to_list()
    late, refuted, undated = negatives[:3]
    rows = [
        # diabetes with an onset before the landmark, but entered into the record after it
        (late, "44054006", idx - timedelta(days=365), idx + timedelta(days=150), None),
        # hypertension before the landmark, refuted
        (refuted, "59621000", idx - timedelta(days=365), idx - timedelta(days=365), "refuted"),
        # hypertension with no date at all
        (undated, "59621000", None, None, None),
    ]
    for patient_key, code, onset, recorded, verification in rows:
        con.execute("""INSERT INTO deid.condition (condition_key, patient_key, code_system, code, onset_date,
                                                   recorded_date, verification_status)
                       VALUES ('test-' || ?, ?, 'http://snomed.info/sct', ?, ?, ?, ?)""",
                    [patient_key, patient_key, code, onset, recorded, verification])
    after = build_feature_matrix(con, spec, plan=plan)
    row = lambda key: after.filter((pl.col("patient_key") == key) & (pl.col("landmark_date") == idx)).to_dicts()  # noqa: E731
    assert row(late)[0]["dx_diabetes"] == 0
    assert row(refuted)[0]["label"] == 0
    assert after.filter(pl.col("patient_key") == undated).height == 0
    assert before.filter(pl.col("patient_key") == undated).height > 0


def test_encounter_classes_as_act_codes_or_plain_words():
    con = duckdb.connect()
    raw = ["AMB", "EMER", "IMP", "ambulatory", "Emergency", "inpatient", "wellness", "urgentcare", "ACUTE", "VR",
           "daytime", None]
    mapped = con.execute(f"SELECT list_transform(?::VARCHAR[], c -> {encounter_class_sql('c')})", [raw]).fetchone()[0]
    assert mapped == ["AMB", "EMER", "IMP", "AMB", "EMER", "IMP", "AMB", "AMB", "IMP", "VR", "UNK", None]


def test_rebuilding_the_matrix_gives_identical_bits(small_export):
    """DuckDB aggregates in parallel with no fixed order; float sums and same-day "last" values
    must not depend on it, or every re-run would carry a new training-data hash. Enough rows
    (1.2M readings) for DuckDB to split the aggregation across threads."""
    from clinical_ml.training import frame_hash

    con = duckdb.connect(config={"threads": 4})
    land_ndjson(con, small_export)
    deidentify(con, TEST_KEY)
    con.execute("""INSERT INTO deid.observation (patient_key, effective_date, code, value_num)
                   SELECT p.patient_key, DATE '2016-01-01' + (hash(p.patient_key, i) % 2500)::INTEGER,
                          '8480-6', 90 + (hash(i, p.patient_key) % 9000) / 97.0
                   FROM deid.patient p, range(3000) r(i)""")
    assert con.execute("SELECT count(*) FROM deid.observation").fetchone()[0] > 1_000_000
    hashes = {frame_hash(build_feature_matrix(con, FeatureSpec())) for _ in range(3)}
    assert len(hashes) == 1


def test_year_generalized_dates_get_landmarks_on_1_january(small_export):
    con = duckdb.connect()
    land_ndjson(con, small_export)
    deidentify(con, TEST_KEY, date_mode="year")
    plan = resolve_landmarks(con, FeatureSpec())
    assert plan.landmarks and all((d.month, d.day) == (1, 1) for d in plan.landmarks)
    frame = build_feature_matrix(con, FeatureSpec(), plan=plan)
    assert frame.height > 0
    with pytest.raises(ValueError, match="1 January"):
        resolve_landmarks(con, FeatureSpec(landmark_interval_months=6))
    with pytest.raises(ValueError, match="1 January"):
        resolve_landmarks(con, FeatureSpec(landmarks=(date(2020, 7, 1),)))


def test_a_diagnosis_back_dated_before_the_landmark_but_recorded_after_it_is_a_new_case(small_export):
    con = fresh_deid(small_export)
    spec = FeatureSpec()
    plan = resolve_landmarks(con, spec)
    landmark = plan.landmarks[-3]
    before = build_feature_matrix(con, spec, plan=plan)
    patient = before.filter((pl.col("landmark_date") == landmark) & (pl.col("label") == 0))["patient_key"][0]
    con.execute("""INSERT INTO deid.condition (condition_key, patient_key, code_system, code, onset_date, recorded_date)
                   VALUES ('late-entry', ?, 'http://snomed.info/sct', '59621000', ?, ?)""",
                [patient, landmark - timedelta(days=200), landmark + timedelta(days=100)])
    after = build_feature_matrix(con, spec, plan=plan)
    row = after.filter((pl.col("patient_key") == patient) & (pl.col("landmark_date") == landmark))
    assert row["label"].to_list() == [1]  # looked undiagnosed at the landmark; recorded within the horizon
