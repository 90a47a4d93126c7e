"""The inference service against a registry the real pipeline filled: champion v1 from the
whole graph, challenger v2 trained on the same data with another seed (judged by nobody)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import duckdb
import numpy as np
import orjson
import pytest
import schemathesis
from dagster import materialize
from hypothesis import HealthCheck, given, settings
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from clinical_assets.definitions import ASSETS
from clinical_ml.deid import date_shift_days, pseudonym
from clinical_ml.features import MODEL_FEATURES, FeatureSpec
from serving.app import create_app
from serving.auth import TokenStore
from serving.fhir_features import DeidSettings, bundle_features
from serving.settings import ServingSettings
from serving.trace import verify_audit_record
from tests.test_pipeline_e2e import INITIAL, Pipeline

pytestmark = pytest.mark.slow

E2E_KEY = "e2e-test-key-0123456789abcdef"
RESOURCE_TABLES = {"Encounter": "encounter", "Condition": "condition", "Observation": "observation",
                   "MedicationRequest": "medication_request", "DocumentReference": "document_reference"}


class Served:
    def __init__(self, pipeline: Pipeline, settings: ServingSettings, tokens: dict[str, str]):
        self.pipeline, self.settings, self.tokens = pipeline, settings, tokens
        self.client = TestClient(create_app(settings))
        self.client.__enter__()  # runs the lifespan: models loaded from the registry

    def auth(self, who: str = "admin") -> dict:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def control(self, **changes):
        response = self.client.post("/admin/control", json=changes, headers=self.auth())
        assert response.status_code == 200, response.text
        return response.json()

    def predict(self, features: dict, **extra):
        return self.client.post("/predict", json={"features": features, **extra}, headers=self.auth("ehr"))

    def log_records(self) -> list[dict]:
        return [orjson.loads(line) for path in sorted((self.settings.log_dir / "predictions").glob("*/*.ndjson"))
                for line in path.read_bytes().splitlines()]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("E2E_DEID_KEY", E2E_KEY)
        mp.setenv("DEID_SECRET_KEY", E2E_KEY)  # the service reads the pipeline's key from the environment
        mp.setenv("CLINICAL_HOME", str(tmp_path_factory.mktemp("home")))
        pipeline = Pipeline(tmp_path_factory.mktemp("pipeline"))
        pipeline.batch = pipeline.register(INITIAL, "initial")
        assert pipeline.run("clinical_pipeline", partition_key=pipeline.batch).success
        # a second model, registered as challenger with its card, not judged
        second = materialize(ASSETS, selection=["trained_model", "validation_report", "model_card"],
                             resources=pipeline.resources, instance=pipeline.instance,
                             run_config={"ops": {"trained_model": {"config": {"seed": 7, "iterations": 200}}}})
        assert second.success
        home = tmp_path_factory.mktemp("serving")
        settings = ServingSettings(tracking_uri=pipeline.tracking_uri, home=home, reload_seconds=0,
                                   control_poll_seconds=0)
        store = TokenStore(settings.token_path)
        tokens = {"admin": store.create("ops", ["predict", "feedback", "read", "metrics", "admin"]),
                  "ehr": store.create("ehr-gateway", ["predict", "feedback"]),
                  "reader": store.create("dashboard", ["read", "metrics", "predict", "feedback"])}
        s = Served(pipeline, settings, tokens)
        yield s
        s.client.__exit__(None, None, None)


@pytest.fixture
def production(served):
    served.control(mode="production", kill_switch=False)
    yield served
    served.control(mode="production", kill_switch=False)


def feature_rows(served: Served, n: int = 5) -> list[dict]:
    rows = served.pipeline.sql(f"SELECT {', '.join(MODEL_FEATURES)} FROM features.feature_matrix "
                               "ORDER BY patient_key, landmark_date LIMIT ?", [n], batch=served.pipeline.batch)
    return [dict(zip(MODEL_FEATURES, row)) for row in rows]


def registry(served: Served) -> MlflowClient:
    uri = served.settings.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# -- authentication -----------------------------------------------------------------------

def test_liveness_is_open_and_everything_else_needs_a_token(served):
    client = served.client
    assert client.get("/health").json() == {"status": "ok"}
    for method, path in [("get", "/ready"), ("post", "/predict"), ("post", "/predict/fhir"), ("get", "/model-card"),
                         ("get", "/metrics"), ("get", "/openapi.json"), ("get", "/docs"), ("get", "/admin/control"),
                         ("post", "/feedback/" + "0" * 32), ("get", f"/predictions/{'0' * 32}/trace")]:
        for headers in ({}, {"Authorization": "Bearer cmp_not-a-token"}, {"Authorization": served.tokens["admin"]}):
            response = getattr(client, method)(path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json() == {"detail": "authentication required"}
            assert response.headers["www-authenticate"] == "Bearer"


def test_a_token_without_the_scope_is_forbidden(served):
    ehr = served.auth("ehr")
    assert served.client.post("/admin/control", json={"kill_switch": True}, headers=ehr).status_code == 403
    assert served.client.get("/metrics", headers=ehr).status_code == 403
    assert served.client.get("/model-card", headers=ehr).status_code == 403
    assert served.client.get("/admin/control", headers=served.auth()).json()["kill_switch"] is False


def test_tokens_are_stored_hashed(served):
    stored = served.settings.token_path.read_text()
    assert all(token not in stored for token in served.tokens.values())
    assert hashlib.sha256(served.tokens["ehr"].encode()).hexdigest() in stored


# -- predictions ----------------------------------------------------------------------------

def test_the_champion_answers_with_the_threshold_of_its_model_card(production):
    served = production
    champion = registry(served).get_model_version_by_alias("hypertension-risk", "champion")
    card = json.loads(Path(registry(served).download_artifacts(champion.run_id, "model_card/model_card.json")).read_text())
    import mlflow

    model = mlflow.catboost.load_model(f"models:/hypertension-risk/{champion.version}")
    for features in feature_rows(served):
        response = served.predict(features)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = model.predict_proba(np.array([[np.nan if features[n] is None else features[n]
                                                  for n in model.feature_names_]], dtype=float))[0, 1]
        assert body["probability"] == pytest.approx(expected, abs=1e-9)
        assert body["threshold"] == card["operating_point"]["threshold"]
        assert body["alert"] == (body["probability"] >= body["threshold"])
        assert body["model"] == {"name": "hypertension-risk", "version": str(champion.version), "alias": "champion"}
        assert body["served_by"] == "champion" and body["mode"] == "production"


def test_explanations_name_the_models_features(production):
    body = production.predict(feature_rows(production, 1)[0], explain=True).json()
    assert len(body["contributions"]) == 5
    assert {c["feature"] for c in body["contributions"]} <= set(MODEL_FEATURES)


def test_missing_unknown_or_malformed_fields_are_422_without_echoing_the_input(production):
    features = feature_rows(production, 1)[0]
    missing = {k: v for k, v in features.items() if k != "sbp_last"}
    response = production.predict(missing)
    assert response.status_code == 422
    assert any(e["loc"][-1] == "sbp_last" and e["type"] == "missing" for e in response.json()["detail"])
    response = production.predict({**features, "patient_name": "Jane Q Smith"})
    assert response.status_code == 422
    assert "Jane" not in response.text
    response = production.predict({**features, "age_at_index": "Jane Q Smith"})
    assert response.status_code == 422 and "Jane" not in response.text
    assert production.predict({**features, "sbp_last": 1e300}).status_code == 422


def test_shadow_scores_both_models_logs_both_and_returns_the_champion(served):
    served.control(mode="shadow")
    try:
        before = len(served.log_records())
        body = served.predict(feature_rows(served, 1)[0]).json()
        assert body["served_by"] == "champion" and body["mode"] == "shadow"
        new = served.log_records()[before:]
        assert {(r["alias"], r["served"]) for r in new} == {("champion", True), ("challenger", False)}
        assert {r["prediction_id"] for r in new} == {body["prediction_id"]}
        assert len({r["model_version"] for r in new}) == 2
    finally:
        served.control(mode="production")


def test_a_canary_sends_its_share_of_patients_to_the_challenger_and_keeps_each_patient_on_one_model(served):
    served.control(mode="canary", canary_percent=30)
    try:
        features = feature_rows(served, 1)[0]
        answers = {f"pt-{i}": served.predict(features, patient_id=f"pt-{i}").json()["served_by"] for i in range(400)}
        share = sum(a == "challenger" for a in answers.values()) / len(answers)
        assert 0.24 <= share <= 0.36, share
        again = {p: served.predict(features, patient_id=p).json()["served_by"] for p in list(answers)[:40]}
        assert all(again[p] == answers[p] for p in again)
        # the answer is labelled with the model that gave it
        body = next(served.predict(features, patient_id=p).json() for p, a in answers.items() if a == "challenger")
        assert body["model"]["alias"] == "challenger"
    finally:
        served.control(mode="production", canary_percent=10)


def test_the_kill_switch_turns_answers_into_503_and_back(served):
    features = feature_rows(served, 1)[0]
    served.control(kill_switch=True, reason="incident 42")
    try:
        response = served.predict(features)
        assert response.status_code == 503
        assert "kill switch" in response.json()["detail"] and "probability" not in response.text
        assert served.client.get("/health").status_code == 200
        metrics = served.client.get("/metrics", headers=served.auth()).text
        assert "clinical_kill_switch_engaged 1.0" in metrics
    finally:
        served.control(kill_switch=False)
    assert served.predict(features).status_code == 200


def test_the_kill_switch_is_a_setting_too(served):
    """Written by hand (or by config management) into the control file: no API call needed."""
    features = feature_rows(served, 1)[0]
    path = served.settings.control_path
    original = path.read_bytes()
    try:
        path.write_bytes(orjson.dumps({**orjson.loads(original), "kill_switch": True}))
        assert served.predict(features).status_code == 503
        path.write_text("{not json")  # unreadable: fail closed
        assert served.predict(features).status_code == 503
        path.write_bytes(orjson.dumps({**orjson.loads(original), "kill_switch": 0}))  # not a boolean: unreadable
        assert served.predict(features).status_code == 503
    finally:
        path.write_bytes(original)
    assert served.predict(features).status_code == 200


def test_an_alias_change_is_picked_up_without_a_restart(production):
    client = registry(production)
    champion = client.get_model_version_by_alias("hypertension-risk", "champion").version
    challenger = client.get_model_version_by_alias("hypertension-risk", "challenger").version
    features = feature_rows(production, 1)[0]
    try:
        client.set_registered_model_alias("hypertension-risk", "champion", challenger)
        reload = production.client.post("/admin/reload", headers=production.auth()).json()
        assert reload["champion"] == str(challenger) and reload["challenger"] is None
        assert production.predict(features).json()["model"]["version"] == str(challenger)
    finally:
        client.set_registered_model_alias("hypertension-risk", "champion", champion)
        production.client.post("/admin/reload", headers=production.auth())
    assert production.predict(features).json()["model"]["version"] == str(champion)


def test_readiness_model_card_and_metrics(production):
    ready = production.client.get("/ready", headers=production.auth("reader")).json()
    assert ready["ready"] and ready["prediction_log_writable"] and ready["champion"]
    card = production.client.get("/model-card", headers=production.auth("reader")).json()
    assert card["operating_point"]["target_specificity"] == 0.9
    markdown = production.client.get("/model-card?format=markdown", headers=production.auth("reader")).text
    assert markdown.startswith("# Model card") and "## Operating point" in markdown
    production.predict(feature_rows(production, 1)[0])
    metrics = production.client.get("/metrics", headers=production.auth("reader")).text
    assert 'clinical_requests_total{endpoint="/predict",method="POST",mode="production",status="200"}' in metrics
    assert "clinical_request_latency_seconds_bucket" in metrics
    assert f'clinical_model_version{{alias="champion"}} {float(ready["champion"])}' in metrics


def test_an_oversized_body_is_refused_before_parsing(production):
    response = production.client.post("/predict", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                                      headers={**production.auth("ehr"), "content-type": "application/json"})
    assert response.status_code == 413


# -- FHIR bundles: the batch pipeline's code, the same features ------------------------------

def patient_bundles(served: Served, n: int) -> list[tuple[str, date, dict, dict]]:
    """(patient id, batch landmark, batch feature row, Bundle of the patient's raw resources)
    for ``n`` patients of the batch's feature matrix (read back from the batch's raw tables)."""
    batch_path = served.pipeline.warehouse.batch_store().path(served.pipeline.batch)
    con = duckdb.connect(str(batch_path), read_only=True)
    try:
        rows = con.execute(f"SELECT patient_key, landmark_date, {', '.join(MODEL_FEATURES)} FROM features.feature_matrix "
                           "ORDER BY hash(patient_key), landmark_date").fetchall()
        raw_patients = {r[0]: r[1] for r in con.execute("SELECT id, resource FROM raw.patient").fetchall()}
        key_of = {pseudonym(E2E_KEY.encode(), "Patient", pid): pid for pid in raw_patients}
        chosen, seen = [], set()
        for row in rows:
            if row[0] in seen:
                continue
            seen.add(row[0])
            chosen.append(row)
            if len(chosen) == n:
                break
        out = []
        for row in chosen:
            pid = key_of[row[0]]
            entries = [{"fullUrl": f"urn:uuid:{pid}", "resource": json.loads(raw_patients[pid])}]
            for table in RESOURCE_TABLES.values():
                for (resource,) in con.execute(
                        f"SELECT resource FROM raw.{table} WHERE regexp_extract(coalesce(resource->'subject'->>'reference', "
                        "resource->'patient'->>'reference'), '([^/:]+)$', 1) = ?", [pid]).fetchall():
                    entries.append({"resource": json.loads(resource)})
            out.append((pid, row[1], dict(zip(MODEL_FEATURES, row[2:])),
                        {"resourceType": "Bundle", "type": "collection", "entry": entries}))
        return out
    finally:
        con.close()


def records_unit_free(served: Served, prediction_id: str, word: str) -> bool:
    """The care unit reaches the log only as a keyed pseudonym."""
    [record] = [r for r in served.log_records() if r["prediction_id"] == prediction_id]
    return len(record["care_unit_key"]) == 24 and word not in orjson.dumps(served.log_records()).decode()


def as_of_for(pid: str, landmark: date) -> date:
    return landmark - timedelta(days=date_shift_days(E2E_KEY.encode(), pid, 365))


def test_features_from_a_bundle_equal_the_batch_pipelines(served):
    deid = DeidSettings(E2E_KEY.encode(), 365, "shift", None, False)
    spec = FeatureSpec()
    checked = 0
    for pid, landmark, batch_row, bundle in patient_bundles(served, 8):
        found = bundle_features(bundle, as_of_for(pid, landmark), deid, spec, tuple(MODEL_FEATURES))
        assert found.landmark_date == landmark
        for name in MODEL_FEATURES:
            assert found.features[name] == pytest.approx(batch_row[name], abs=1e-9, nan_ok=True), (name, pid)
        checked += 1
    assert checked == 8


def test_a_bundle_is_scored_like_its_feature_row_and_no_identifier_reaches_the_log(production):
    pid, landmark, batch_row, bundle = patient_bundles(production, 1)[0]
    response = production.client.post("/predict/fhir", headers=production.auth("ehr"),
                                      json={"as_of": as_of_for(pid, landmark).isoformat(), "bundle": bundle})
    assert response.status_code == 200, response.text
    from_bundle = response.json()
    from_features = production.predict(batch_row).json()
    assert from_bundle["probability"] == pytest.approx(from_features["probability"], abs=1e-12)
    records = {r["prediction_id"]: r for r in production.log_records() if r["served"]}
    logged = records[from_bundle["prediction_id"]]
    assert logged["feature_sha256"] == records[from_features["prediction_id"]]["feature_sha256"]
    assert logged["endpoint"] == "fhir" and len(logged["patient_key"]) == 24
    unit = production.predict(batch_row, care_unit="Ward 7 Smithfield").json()
    assert records_unit_free(production, unit["prediction_id"], "Smithfield")
    patient = bundle["entry"][0]["resource"]
    identifiers = {pid, patient["name"][0]["family"], *patient["name"][0]["given"], patient["birthDate"]}
    log_text = "\n".join(p.read_text() for p in (production.settings.log_dir).rglob("*.ndjson"))
    assert not [i for i in identifiers if i in log_text]


def test_a_bundle_the_model_cannot_score_gets_a_clear_422(production):
    pid, landmark, _, bundle = patient_bundles(production, 1)[0]
    no_patient = {**bundle, "entry": bundle["entry"][1:]}
    response = production.client.post("/predict/fhir", headers=production.auth("ehr"),
                                      json={"as_of": as_of_for(pid, landmark).isoformat(), "bundle": no_patient})
    assert response.status_code == 422 and "exactly one Patient" in response.json()["detail"]
    long_ago = production.client.post("/predict/fhir", headers=production.auth("ehr"),
                                      json={"as_of": "1950-01-01", "bundle": bundle})
    assert long_ago.status_code == 422 and "intended population" in long_ago.json()["detail"]
    assert pid not in long_ago.text


# -- traces and feedback -------------------------------------------------------------------

def test_a_prediction_traces_to_model_run_data_hash_and_audit_record(production):
    prediction = production.predict(feature_rows(production, 1)[0]).json()
    trace = production.client.get(f"/predictions/{prediction['prediction_id']}/trace",
                                  headers=production.auth("reader")).json()
    version = registry(production).get_model_version("hypertension-risk", prediction["model"]["version"])
    assert trace["prediction"]["prediction_id"] == prediction["prediction_id"]
    assert trace["model_version"]["version"] == str(version.version)
    assert trace["training_run"]["mlflow_run_id"] == version.run_id
    [(data_hash,)] = production.pipeline.sql("SELECT training_data_hash FROM ml.models WHERE registry_version = ?",
                                             [str(version.version)])
    assert trace["training_run"]["training_data_sha256"] == data_hash
    audit = trace["audit_record"]
    assert audit["decision"] == "promoted"
    assert verify_audit_record(production.pipeline.warehouse.path, audit["sequence"],
                               audit["record_hash"]).startswith("verified")
    assert verify_audit_record(production.pipeline.warehouse.path, audit["sequence"], "0" * 64).startswith("MISMATCH")


def test_audit_verification_says_not_verified_when_the_duckdb_settings_are_invalid(monkeypatch, tmp_path):
    monkeypatch.setenv("CLINICAL_DUCKDB_THREADS", "two")
    assert verify_audit_record(str(tmp_path / "warehouse.duckdb"), 1, "0" * 64).startswith(
        "not verified: the warehouse settings are invalid")


def test_feedback_is_stored_next_to_the_prediction_and_linked(production):
    prediction = production.predict(feature_rows(production, 1)[0], patient_id="pt-feedback").json()
    response = production.client.post(f"/feedback/{prediction['prediction_id']}", headers=production.auth("ehr"),
                                      json={"outcome": "overridden", "reason_code": "clinical_judgement",
                                            "observed_label": 1})
    assert response.status_code == 201
    trace = production.client.get(f"/predictions/{prediction['prediction_id']}/trace",
                                  headers=production.auth("reader")).json()
    [feedback] = trace["feedback"]
    assert feedback["feedback_id"] == response.json()["feedback_id"]
    assert feedback["outcome"] == "overridden" and feedback["observed_label"] == 1
    assert feedback["patient_key"] == trace["prediction"]["patient_key"] != "pt-feedback"
    assert feedback["model_version"] == prediction["model"]["version"]
    unknown = production.client.post(f"/feedback/{'f' * 32}", headers=production.auth("ehr"),
                                     json={"outcome": "confirmed", "reason_code": "agree"})
    assert unknown.status_code == 404
    free_text = production.client.post(f"/feedback/{prediction['prediction_id']}", headers=production.auth("ehr"),
                                       json={"outcome": "confirmed", "reason_code": "agree", "note": "Jane Smith"})
    assert free_text.status_code == 422


# -- the OpenAPI contract, property-based ----------------------------------------------------

def test_no_generated_request_gets_a_server_error(production):
    """Schemathesis generates requests for every operation of the service's own OpenAPI spec
    (valid and invalid bodies, parameters, paths). A token with every scope but admin: the
    admin operations are exercised as refusals, and the kill switch (whose 503s are by design)
    is never engaged."""
    headers = production.auth("reader")
    schema = schemathesis.openapi.from_asgi("/openapi.json", production.client.app, headers=headers)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "POST /predict/fhir", "POST /feedback/{prediction_id}",
                                               "GET /predictions/{prediction_id}/trace", "POST /admin/control"}
    failures, statuses = [], {op.label: Counter() for op in operations}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def call(case):
            response = case.call(headers=headers)
            statuses[case.operation.label][response.status_code] += 1
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))
            elif response.status_code >= 400:
                assert "detail" in response.json()
        call()
    assert failures == []
    # the generated requests reach the model, not only the validation in front of it
    assert statuses["POST /predict"][200] >= 5, statuses["POST /predict"]
    assert statuses["POST /admin/control"] == Counter({403: sum(statuses["POST /admin/control"].values())})


def test_implausible_values_in_a_bundle_are_a_422_that_quotes_no_value(production, caplog):
    pid, landmark, _, bundle = patient_bundles(production, 1)[0]
    entries = []
    for entry in bundle["entry"]:
        resource = json.loads(json.dumps(entry["resource"]))
        for part in [resource, *resource.get("component", [])]:
            if isinstance(part.get("valueQuantity"), dict):
                part["valueQuantity"]["value"] = 987654.25
        entries.append({**entry, "resource": resource})
    response = production.client.post("/predict/fhir", headers=production.auth("ehr"), json={
        "as_of": as_of_for(pid, landmark).isoformat(), "bundle": {**bundle, "entry": entries}})
    assert response.status_code == 422, response.text
    assert "implausible feature values" in response.json()["detail"]
    assert "987654" not in response.text and "987654" not in caplog.text
