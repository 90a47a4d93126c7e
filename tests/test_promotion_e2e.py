"""Promotion in the graph: a challenger failing a gate of a site's policy is refused, and a
named approval promotes it by exception, on the record."""

import json

import mlflow
import pytest
from dagster import AssetKey

from clinical_ml.policy import DEFAULT_POLICY_FILE
from tests.test_pipeline_e2e import INITIAL, Pipeline

pytestmark = pytest.mark.slow

APPROVAL = {"ops": {"model_promotion": {"config": {"approved_by": "dr.okafor (CMIO)",
                                                   "approval_reason": "pilot on a strict policy, reviewed 2026-11-25"}}}}


def test_a_failing_challenger_is_refused_and_an_approval_is_recorded(tmp_path, monkeypatch):
    strict = tmp_path / "policy.toml"
    strict.write_text(DEFAULT_POLICY_FILE.read_text().replace("min_auroc = 0.85", "min_auroc = 0.999"))
    monkeypatch.setenv("CLINICAL_POLICY_FILE", str(strict))
    monkeypatch.setenv("E2E_DEID_KEY", "e2e-test-key-0123456789abcdef")
    monkeypatch.setenv("CLINICAL_HOME", str(tmp_path / "home"))
    p = Pipeline(tmp_path / "pipeline")
    batch = p.register(INITIAL, "initial")
    refused = p.run("clinical_pipeline", partition_key=batch, raise_on_error=False)
    failed = [e.step_key for e in refused.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failed == ["model_promotion"]
    gates = {e.check_name: e for e in refused.get_asset_check_evaluations() if e.asset_key == AssetKey("model_promotion")}
    assert not gates["auroc_gate_for_promotion"].passed and "rule >= 0.999" in gates["auroc_gate_for_promotion"].description
    mlflow.set_tracking_uri(p.tracking_uri)
    client = mlflow.MlflowClient()
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias("hypertension-risk", "champion")  # nothing serves

    approved = p.run("retrain", APPROVAL, asset_selection=[AssetKey("model_promotion")], raise_on_error=False)
    assert str(client.get_model_version_by_alias("hypertension-risk", "champion").version) == "1"
    md = p.latest_metadata("model_promotion")
    assert md["promoted"] is True and "approved by dr.okafor (CMIO)" in md["reasons"]
    body = json.loads(p.sql("SELECT body FROM audit.audit_log WHERE body->>'event' = 'model_promotion'")[0][0])
    assert body["decision"]["approval"] == {"approved_by": "dr.okafor (CMIO)",
                                            "reason": "pilot on a strict policy, reviewed 2026-11-25"}
    assert body["decision"]["reasons"] == ["gate auroc not met"]  # the exception does not hide the failure
    # the gates still show the failure in the UI, next to the promotion
    assert not {e.check_name: e.passed for e in approved.get_asset_check_evaluations()}["auroc_gate_for_promotion"]
