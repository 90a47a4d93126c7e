"""The whole asset graph, in-process, on a small generated cohort and a throwaway instance."""

import json
from pathlib import Path

import duckdb
import mlflow
import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context

from clinical_assets.definitions import build_definitions
from clinical_assets.validation import VALIDATION_CHECKS
from resources.audit_store import AuditStore
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from sensors.drift_sensor import psi_drift_sensor

pytestmark = pytest.mark.slow

SMALL_BATCH = {"ops": {"drift_report": {"config": {"synthetic_patients": 300}}}}
DRIFTED_BATCH = {"ops": {"drift_report": {"config": {"synthetic_patients": 300, "drift": True}}}}


class Pipeline:
    def __init__(self, root: Path, ndjson_dir: str | None = None):
        self.root = root
        self.warehouse = DuckDBWarehouse(path=str(root / "warehouse.duckdb"))
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.resources = {
            "warehouse": self.warehouse,
            "fhir_source": FhirSource(base_url=None, ndjson_dir=ndjson_dir, synthetic_patients=700, synthetic_seed=42,
                                      export_root=str(root / "exports")),
            "deid_key": DeidKey(key_env_var="E2E_DEID_KEY"),
            "mlflow": MLflowTracking(tracking_uri=self.tracking_uri, artifact_root=str(root / "artifacts")),
            "audit_store": AuditStore(warehouse=self.warehouse),
        }
        self.defs = build_definitions(self.resources)
        self.instance = DagsterInstance.ephemeral()

    def run(self, job: str, run_config=None, **kwargs):
        return self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, run_config=run_config, **kwargs)

    def sql(self, query, params=None):
        con = duckdb.connect(self.warehouse.path, read_only=True)
        try:
            return con.execute(query, params or []).fetchall()
        finally:
            con.close()

    def latest_metadata(self, asset: str) -> dict:
        event = self.instance.get_latest_materialization_event(AssetKey(asset))
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2E_DEID_KEY", "e2e-test-key-0123456789abcdef")
        mp.setenv("CLINICAL_HOME", str(tmp_path_factory.mktemp("home")))  # drift HTML reports
        p = Pipeline(tmp_path_factory.mktemp("pipeline"))
        p.first = p.run("clinical_pipeline", SMALL_BATCH)
        yield p


def test_whole_graph_materializes(pipeline):
    assert pipeline.first.success
    materialized = {e.asset_key.to_user_string() for e in pipeline.first.get_asset_materialization_events()}
    assert materialized == {"raw_fhir", "deidentified_fhir", "feature_matrix", "trained_model",
                            "validation_report", "model_promotion", "drift_report", "audit_record"}


def test_raw_landing_reconciles(pipeline):
    md = pipeline.latest_metadata("raw_fhir")
    assert md["lines_read"] == md["loaded"] + md["quarantined"] and md["quarantined"] == 0
    assert pipeline.sql("SELECT count(*) FROM raw.patient")[0][0] == 700


def test_identifier_checks_pass_and_no_phi_reaches_logs_or_mlflow(pipeline):
    checks = {e.check_name: e.passed for e in pipeline.first.get_asset_check_evaluations()}
    assert checks["deidentified_fhir_has_no_identifiers"] and checks["feature_matrix_has_no_identifiers"]
    assert checks["lines_reconcile"] and checks["audit_chain_intact"]

    export = next((pipeline.root / "exports").iterdir())
    patients = [json.loads(line) for line in open(export / "Patient.000.ndjson")]
    secrets = {p["name"][0]["family"] for p in patients} | {p["identifier"][1]["value"] for p in patients}
    logs = "\n".join(str(e.user_message) + str(e.dagster_event) for e in
                     pipeline.instance.all_logs(pipeline.first.run_id))
    artifact_text = "\n".join(f.read_text(errors="ignore") for f in (pipeline.root / "artifacts").rglob("*")
                              if f.is_file() and f.stat().st_size < 5_000_000)
    for value in secrets:
        assert value not in logs and value not in artifact_text


def test_feature_matrix_and_model_are_recorded(pipeline):
    fm = pipeline.latest_metadata("feature_matrix")
    rows, patients, landmarks = pipeline.sql(
        "SELECT count(*), count(DISTINCT patient_key), count(DISTINCT landmark_date) FROM features.feature_matrix")[0]
    assert (fm["rows"], fm["patients"], fm["landmarks"]) == (rows, patients, landmarks)
    assert rows > patients > 200 and landmarks >= 3 and fm["landmarks_derived_from_data"]
    assert "landmark_date" in fm["landmark_table"] and "positives" in fm["landmark_table"]
    model = pipeline.latest_metadata("trained_model")
    assert model["model_version"] == 1 and 0.5 < model["test_auroc"] <= 1.0

    mlflow.set_tracking_uri(pipeline.tracking_uri)
    run = mlflow.get_run(model["mlflow_run_id"])
    assert run.info.status == "FINISHED"  # every MLflow run is closed
    assert run.data.metrics["test_auroc"] == pytest.approx(model["test_auroc"])
    assert "validation_auroc" in run.data.metrics
    assert run.data.params["iterations"] == "400" and run.data.tags["training_data_sha256"] == fm["data_sha256"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "features.json" in artifacts
    assert mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'").shape[0] == 1


def test_a_fresh_registry_gets_the_first_model_as_champion_through_the_gates(pipeline):
    mlflow.set_tracking_uri(pipeline.tracking_uri)
    client = mlflow.MlflowClient()
    first = client.get_model_version("hypertension-risk", "1")
    first_run = pipeline.sql("SELECT mlflow_run_id FROM ml.models WHERE model_version = 1")[0][0]
    assert first.tags["warehouse_model_version"] == "1" and first.run_id == first_run
    model_info = mlflow.models.get_model_info("models:/hypertension-risk/1")
    assert model_info.signature is not None and model_info.saved_input_example_info is not None
    (promoted, reasons), = pipeline.sql("SELECT promoted, reasons FROM ml.promotions WHERE model_version = 1")
    gates = {e.check_name: e.passed for e in pipeline.first.get_asset_check_evaluations()
             if e.asset_key == AssetKey("model_promotion")}
    assert promoted == all(gates.values()) and gates["non_inferior_to_champion"]  # no champion to lose against


def test_validation_checks_are_the_report(pipeline):
    evaluations = {e.check_name: e for e in pipeline.first.get_asset_check_evaluations()}
    report = {m: (v, p) for m, v, p in pipeline.sql(
        "SELECT metric, value, passed FROM ml.validation_report WHERE model_version = 1")}
    assert set(VALIDATION_CHECKS) <= set(evaluations)
    for check_name, metric in VALIDATION_CHECKS.items():
        assert evaluations[check_name].passed == report[metric][1]
    assert report["auroc"][0] == pytest.approx(pipeline.latest_metadata("validation_report")["auroc"])


def test_undrifted_batch_keeps_the_sensor_quiet(pipeline):
    md = pipeline.latest_metadata("drift_report")
    assert md["max_psi"] < 0.2 and md["drifted_features"] == [] and md["psi_threshold"] == 0.2
    assert {e.check_name: e.passed for e in pipeline.first.get_asset_check_evaluations()}["psi_within_policy"]
    assert Path(md["evidently_report"]).stat().st_size > 100_000
    result = psi_drift_sensor.evaluate_tick(build_sensor_context(instance=pipeline.instance, definitions=pipeline.defs))
    assert result.run_requests == [] and result.skip_message


def test_drifted_batch_requests_one_retrain_and_retraining_works(pipeline):
    context = build_sensor_context(instance=pipeline.instance, definitions=pipeline.defs)
    psi_drift_sensor.evaluate_tick(context)  # consume the undrifted report
    cursor = context.cursor

    drifted = pipeline.run("clinical_pipeline", DRIFTED_BATCH, asset_selection=[AssetKey("drift_report")])
    assert drifted.success
    md = pipeline.latest_metadata("drift_report")
    assert md["max_psi"] > 0.2 and "sbp_mean_3y" in md["drifted_features"]
    # the report, its check and the sensor (below) judge by the same policy threshold
    assert not {e.check_name: e.passed for e in drifted.get_asset_check_evaluations()}["psi_within_policy"]

    tick = psi_drift_sensor.evaluate_tick(build_sensor_context(
        instance=pipeline.instance, definitions=pipeline.defs, cursor=cursor))
    assert len(tick.run_requests) == 1 and psi_drift_sensor.job_name == "retrain"
    again = psi_drift_sensor.evaluate_tick(build_sensor_context(
        instance=pipeline.instance, definitions=pipeline.defs, cursor=cursor))
    assert again.run_requests[0].run_key == tick.run_requests[0].run_key  # same report, same run key
    assert psi_drift_sensor.evaluate_tick(build_sensor_context(
        instance=pipeline.instance, definitions=pipeline.defs, cursor=tick.cursor)).run_requests == []

    retrain = pipeline.run("retrain", tags=tick.run_requests[0].tags)
    assert retrain.success
    assert pipeline.latest_metadata("trained_model")["model_version"] == 2
    audit = pipeline.sql("SELECT sequence, previous_hash, record_hash, body->>'event' FROM audit.audit_log ORDER BY sequence")
    assert [r[0] for r in audit] == [1, 2, 3, 4] and all(b[1] == a[2] for a, b in zip(audit, audit[1:]))
    # per run: the promotion decision and the run's record (in either order: independent branches)
    assert sorted(map(str, (r[3] for r in audit))) == ["None", "None", "model_promotion", "model_promotion"]
    body = json.loads(pipeline.sql("SELECT body FROM audit.audit_log WHERE body->>'event' IS NULL "
                                   "ORDER BY sequence DESC LIMIT 1")[0][0])
    assert body["model"]["model_version"] == 2 and body["dagster_run_id"] == retrain.run_id
    # same data, same seed, same model: non-inferior, so the registry's champion moved to it
    mlflow.set_tracking_uri(pipeline.tracking_uri)
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("hypertension-risk", "champion")
    assert str(champion.version) == "2" and champion.tags["warehouse_model_version"] == "2"
    assert str(client.get_model_version_by_alias("hypertension-risk", "challenger").version) == "2"
    decision = json.loads(pipeline.sql("SELECT body FROM audit.audit_log WHERE body->>'event' = 'model_promotion' "
                                       "ORDER BY sequence DESC LIMIT 1")[0][0])
    assert decision["decision"]["comparison"]["difference"] == 0.0 and decision["decision"]["promote"]
    # same data, same seed: the retrained model is the same model
    hashes = pipeline.sql("SELECT DISTINCT model_sha256, training_data_hash FROM ml.models")
    assert len(hashes) == 1
