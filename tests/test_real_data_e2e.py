"""The whole asset graph on real Synthea exports we did not make (../shared/fhir-samples).

On the 1,461-patient set the adult landmark cohort has too few incident diagnoses to train on
(Synthea 2017 diagnoses hypertension at 18-20 and exports about ten years of encounters), so
the default run must stop at `trained_model` with the counts; the all-ages cohort then runs
every asset to the audit record. The two small sets stop the same way, after features."""

import json
import re

import pytest
from dagster import AssetKey

from tests.conftest import shared_sample
from clinical_ml.batches import BatchSource
from tests.test_pipeline_e2e import Pipeline

pytestmark = pytest.mark.slow

BEFORE_TRAINING = {"raw_fhir", "deidentified_fhir", "feature_matrix"}


def failure_message(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failures] == ["trained_model"]
    error = failures[0].step_failure_data.error
    while error.cause is not None:  # Dagster wraps the asset's own exception
        error = error.cause
    assert error.cls_name == "InsufficientDataError"
    return error.message


def materialized(result) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


@pytest.fixture(scope="module")
def real_1461(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2E_DEID_KEY", "real-data-e2e-key-0123456789abcdef")
        mp.delenv("CLINICAL_DEMO_MODE", raising=False)
        mp.setenv("CLINICAL_HOME", str(tmp_path_factory.mktemp("home")))
        p = Pipeline(tmp_path_factory.mktemp("real"))
        p.batch = p.register(BatchSource(kind="directory", directory=str(shared_sample("synthea-stu3-1461p"))), "1461p")
        p.adult = p.run("clinical_pipeline", partition_key=p.batch, raise_on_error=False)
        p.adult_features = p.latest_metadata("feature_matrix")
        p.adult_landmarks_with_rows = p.sql("SELECT count(DISTINCT landmark_date) FROM features.feature_matrix",
                                            batch=p.batch)[0][0]
        all_ages = {"ops": {"feature_matrix": {"config": {"min_age": 0}}}}
        p.all_ages = p.run("clinical_pipeline", all_ages, partition_key=p.batch, raise_on_error=False)
        # a second real export arrives as its own batch and is compared with the model's training data
        p.second = p.register(BatchSource(kind="directory", directory=str(shared_sample("synthea-2019-40p"))), "40p")
        p.ingest = p.run("ingest_batch", all_ages, partition_key=p.second, raise_on_error=False)
        yield p


def test_adult_cohort_stops_at_training_with_the_numbers(real_1461):
    result = real_1461.adult
    assert not result.success and materialized(result) == BEFORE_TRAINING
    message = failure_message(result)
    fm = real_1461.adult_features
    assert f"InsufficientDataError: {fm['positives']} positive examples" in message
    assert f"across {real_1461.adult_landmarks_with_rows} landmarks" in message
    assert "at least 50 of each needed" in message and "data runs " in message
    assert fm["landmarks"] == 10 and fm["landmarks_derived_from_data"] and 0 < fm["positives"] < 50
    # the export's own span (it ends around 2019-2020), not a fixed 2022 index date
    assert re.search(r"to about (\d{4})", fm["data_span"]).group(1) in ("2019", "2020", "2021")


def test_raw_and_deidentified_tables_are_complete(real_1461):
    raw = real_1461.latest_metadata("raw_fhir")
    assert raw["lines_read"] == raw["loaded"] and raw["quarantined"] == 0
    assert real_1461.sql("SELECT count(*) FROM raw.patient", batch=real_1461.batch)[0][0] == 1461
    checks = {e.check_name: e.passed for e in real_1461.adult.get_asset_check_evaluations()}
    assert checks["lines_reconcile"] and checks["deidentified_fhir_has_no_identifiers"]
    assert checks["feature_matrix_has_no_identifiers"]
    # every MedicationRequest names its drug through medicationReference: all resolved
    resolved, total = real_1461.sql(
        "SELECT count(rxnorm_code), count(*) FROM deid.medication_request WHERE medication_source = 'reference'",
        batch=real_1461.batch)[0]
    assert total == 5580 and resolved == total
    assert real_1461.latest_metadata("deidentified_fhir")["medication_references_unresolved"] == 0
    classes = dict(real_1461.sql("SELECT encounter_class, count(*) FROM deid.encounter GROUP BY ALL",
                                 batch=real_1461.batch))
    assert classes["AMB"] > 15000 and classes["EMER"] > 500 and classes["IMP"] > 100


def test_features_on_real_data_carry_signal_from_every_source(real_1461):
    means = dict(real_1461.sql("""SELECT 'on_statin', avg(on_statin) FROM features.feature_matrix UNION ALL
                                  SELECT 'n_distinct_medications', avg(n_distinct_medications) FROM features.feature_matrix
                                  UNION ALL SELECT 'sbp_last', avg(sbp_last) FROM features.feature_matrix UNION ALL
                                  SELECT 'ed_visits_3y', avg(ed_visits_3y) FROM features.feature_matrix""",
                                 batch=real_1461.batch))
    assert means["n_distinct_medications"] > 0.3 and means["ed_visits_3y"] > 0
    assert 100 < means["sbp_last"] < 140


def test_all_ages_cohort_runs_every_asset_to_the_audit_record(real_1461):
    result = real_1461.all_ages
    assert materialized(result) == BEFORE_TRAINING | {"trained_model", "validation_report", "model_card", "model_promotion",
                                                      "drift_report", "audit_record"}
    # the model fails clinical gates, so the promotion's blocking gates fail the run (and only them)
    failed = [e.step_key for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert not result.success and failed == ["model_promotion"]
    promotion = real_1461.latest_metadata("model_promotion")
    assert promotion["promoted"] is False and promotion["champion_now"] == "none"
    assert "gate subgroup_auroc_gap not met" in promotion["reasons"]  # no subgroup has 10 positives
    model = real_1461.latest_metadata("trained_model")
    assert 0.5 < model["test_auroc"] <= 1.0 and model["n_test"] > 500
    report = dict((m, v) for m, v in real_1461.sql(
        "SELECT metric, value FROM ml.validation_report WHERE model_version = ?", [model["model_version"]]))
    assert {"auroc", "temporal_test_auroc", "subgroup_auroc_gap"} <= set(report)
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks[name] for name in checks if name.endswith("_has_no_identifiers"))
    assert checks["audit_chain_intact"]
    body = json.loads(real_1461.sql("SELECT body FROM audit.audit_log WHERE body->>'event' IS NULL ORDER BY sequence DESC LIMIT 1")[0][0])
    assert body["model"]["model_version"] == model["model_version"]
    cohort = body["batches"][real_1461.batch]["cohort"]
    assert cohort["min_age"] == 0 and len(cohort["landmarks"]) == 10
    rejection = json.loads(real_1461.sql("SELECT body FROM audit.audit_log WHERE body->>'event' = 'model_rejection'")[0][0])
    assert rejection["decision"]["promote"] is False and rejection["evidence"]["challenger"]["model_sha256"]
    assert real_1461.instance.get_latest_materialization_event(AssetKey("audit_record")) is not None


def test_a_second_real_export_lands_as_its_own_batch_and_is_checked_for_drift(real_1461):
    assert real_1461.ingest.success
    assert materialized(real_1461.ingest) == BEFORE_TRAINING | {"drift_report"}
    drift = real_1461.latest_metadata("drift_report")
    assert drift["batch"] == real_1461.second and not drift["batch_in_reference"]
    assert drift["reference_batches"] == [real_1461.batch] and drift["current_rows"] > 0 and drift["max_psi"] >= 0
    assert real_1461.sql("SELECT count(*) FROM raw.patient", batch=real_1461.second)[0][0] == 40
    assert real_1461.sql("SELECT count(*) FROM raw.patient", batch=real_1461.batch)[0][0] == 1461  # untouched


@pytest.mark.parametrize("sample", ["synthea-bulk-10p", "synthea-2019-40p"])
def test_small_real_sets_stop_after_features_with_the_numbers(tmp_path, monkeypatch, sample):
    monkeypatch.setenv("E2E_DEID_KEY", "real-data-e2e-key-0123456789abcdef")
    monkeypatch.delenv("CLINICAL_DEMO_MODE", raising=False)
    monkeypatch.setenv("CLINICAL_HOME", str(tmp_path / "home"))
    p = Pipeline(tmp_path)
    batch = p.register(BatchSource(kind="directory", directory=str(shared_sample(sample))), sample)
    result = p.run("clinical_pipeline", partition_key=batch, raise_on_error=False)
    assert materialized(result) == BEFORE_TRAINING
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["deidentified_fhir_has_no_identifiers"] and checks["feature_matrix_has_no_identifiers"]
    message = failure_message(result)
    fm = p.latest_metadata("feature_matrix")
    assert f"InsufficientDataError: {fm['positives']} positive examples" in message and "at least 50 of each needed" in message
