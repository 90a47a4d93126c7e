"""The whole asset graph, in-process, on a small generated cohort and a throwaway instance."""

import json
from pathlib import Path

import duckdb
import mlflow
import pytest
from dagster import AssetKey, DagsterInstance, build_sensor_context

from clinical_assets.batches import register_batch
from clinical_assets.definitions import build_definitions
from clinical_assets.deidentified import PATIENT_BUCKETS
from clinical_assets.drift_loop import run_drift_loop
from clinical_ml.batches import BatchSource
from clinical_assets.validation import VALIDATION_CHECKS
from resources.audit_store import AuditStore
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from sensors.drift_sensor import psi_drift_sensor

pytestmark = pytest.mark.slow

INITIAL = BatchSource(kind="synthetic", synthetic_patients=700, synthetic_seed=42)
DRIFTED = BatchSource(kind="synthetic", synthetic_patients=300, synthetic_seed=7, drift=True)


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

    def register(self, source: BatchSource, label: str) -> str:
        return register_batch(self.instance, self.warehouse, source, label)

    def run(self, job: str, run_config=None, **kwargs):
        return self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, run_config=run_config, **kwargs)

    def sql(self, query, params=None, batch: str | None = None):
        """On the warehouse, or on a batch's own file."""
        path = self.warehouse.batch_store().path(batch) if batch else self.warehouse.path
        con = duckdb.connect(str(path), read_only=True)
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
        p.batch = p.register(INITIAL, "initial")
        p.first = p.run("clinical_pipeline", partition_key=p.batch)
        yield p


def test_whole_graph_materializes(pipeline):
    assert pipeline.first.success
    materialized = {e.asset_key.to_user_string() for e in pipeline.first.get_asset_materialization_events()}
    assert materialized == {"raw_fhir", "deidentified_fhir", "feature_matrix", "trained_model",
                            "validation_report", "model_card", "model_promotion", "drift_report", "audit_record"}


def test_raw_landing_reconciles(pipeline):
    md = pipeline.latest_metadata("raw_fhir")
    assert md["lines_read"] == md["loaded"] + md["quarantined"] and md["quarantined"] == 0
    assert pipeline.batch == "b0001-initial" and md["batch"] == pipeline.batch
    assert pipeline.sql("SELECT count(*) FROM raw.patient", batch=pipeline.batch)[0][0] == 700
    # the batch's PHI lives in its own file: the warehouse proper holds no raw schema
    assert pipeline.sql("SELECT count(*) FROM duckdb_tables() WHERE schema_name IN ('raw', 'deid')")[0][0] == 0


def test_deidentification_reports_where_its_time_goes(pipeline):
    # this run's materialization (the module's later tests start other runs)
    md = {k: v.value for k, v in next(e for e in pipeline.first.get_asset_materialization_events()
                                      if e.asset_key.to_user_string() == "deidentified_fhir").materialization.metadata.items()}
    assert md["deidentification_seconds"] > 0 and md["leak_check_seconds"] > 0
    # the buckets' times are their steps' own (steps of a graph asset: plan, buckets, combine)
    stamps = {}
    for e in pipeline.instance.all_logs(pipeline.first.run_id):
        if e.dagster_event and e.dagster_event.event_type_value in ("STEP_START", "STEP_SUCCESS"):
            stamps.setdefault(e.dagster_event.step_key, {})[e.dagster_event.event_type_value] = e.timestamp
    buckets = {k: v["STEP_SUCCESS"] - v["STEP_START"] for k, v in stamps.items()
               if k.startswith("deidentified_fhir.deidentify_patient_bucket_")}
    assert len(buckets) == md["patient_buckets"] == PATIENT_BUCKETS
    assert md["deidentification_seconds"] + md["leak_check_seconds"] <= sum(buckets.values())
    assert {"deidentified_fhir.plan_patient_buckets", "deidentified_fhir.combine_patient_buckets"} <= set(stamps)


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
        "SELECT count(*), count(DISTINCT patient_key), count(DISTINCT landmark_date) FROM features.feature_matrix",
        batch=pipeline.batch)[0]
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
    # one batch in the window: the training data is that batch's feature matrix (with its batch key)
    assert run.data.tags["training_batches"] == pipeline.batch and model["training_window"].startswith("1 batch(es)")
    assert run.data.params["iterations"] == "400" and run.data.tags["training_data_sha256"] == model["training_data_sha256"]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"features.json", "training_window.json"} <= artifacts
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


def test_a_batch_compared_with_the_data_it_trained_keeps_the_sensor_quiet(pipeline):
    md = pipeline.latest_metadata("drift_report")
    assert md["batch"] == pipeline.batch and md["batch_in_reference"] and md["reference_model_version"] == 1
    assert md["max_psi"] < 0.2 and md["drifted_features"] == [] and md["psi_threshold"] == 0.2
    assert "data:image/png;base64," in md["psi_chart"]
    assert {e.check_name: e.passed for e in pipeline.first.get_asset_check_evaluations()}["psi_within_policy"]
    assert Path(md["evidently_report"]).stat().st_size > 100_000
    result = psi_drift_sensor.evaluate_tick(build_sensor_context(instance=pipeline.instance, definitions=pipeline.defs))
    assert result.run_requests == [] and result.skip_message


def test_a_drifted_batch_triggers_a_retrain_that_learns_from_it(pipeline):
    before = pipeline.sql("SELECT training_data_hash, model_sha256 FROM ml.models WHERE model_version = 1")[0]
    report = run_drift_loop(pipeline.defs, pipeline.instance, DRIFTED)
    assert report.batch == "b0002-drifted" and report.psi_before > 0.2 and report.retrain_requested
    drift = pipeline.latest_metadata("drift_report")
    assert drift["batch"] == report.batch and not drift["batch_in_reference"] and "sbp_mean_3y" in drift["drifted_features"]
    # the retrain trained on a window that includes the drifted batch: other data, other model
    challenger = report.challenger
    assert challenger.model_version == 2 and challenger.batches == ["b0001-initial", "b0002-drifted"]
    assert (challenger.training_data_hash, challenger.model_sha256) != before
    assert pipeline.latest_metadata("trained_model")["rows_by_batch"]["b0002-drifted"] > 0
    # the batch the challenger learnt from drifts less against its training data than against the old one
    assert report.psi_against_challenger < report.psi_before

    # the registry's aliases are the promotion decision
    mlflow.set_tracking_uri(pipeline.tracking_uri)
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("hypertension-risk", "challenger").version) == "2"
    champion = client.get_model_version_by_alias("hypertension-risk", "champion")
    (promoted, reasons), = pipeline.sql("SELECT promoted, reasons FROM ml.promotions WHERE model_version = 2")
    assert promoted == report.promoted and str(champion.version) == ("2" if promoted else "1")
    assert report.champion_after.model_version == (2 if promoted else 1)
    # both models scored on held-out patients neither trained on, the drifted batch's among them
    assert "neither trained on" in report.comparison and "from batches newer than the champion's" in report.comparison
    if not promoted:
        assert json.loads(reasons) == report.reasons and report.reasons

    audit = pipeline.sql("SELECT sequence, previous_hash, record_hash, body->>'event' FROM audit.audit_log ORDER BY sequence")
    assert all(b[1] == a[2] for a, b in zip(audit, audit[1:]))
    assert [r[3] for r in audit].count("model_promotion" if promoted else "model_rejection") >= 1
    body = json.loads(pipeline.sql("SELECT body FROM audit.audit_log WHERE body->>'event' IS NULL "
                                   "ORDER BY sequence DESC LIMIT 1")[0][0])
    # the run's audit record ties the model to the hashes of every batch it trained on
    assert body["model"]["model_version"] == 2 and set(body["batches"]) == {"b0001-initial", "b0002-drifted"}
    assert body["model"]["training_data_hash"] == challenger.training_data_hash
