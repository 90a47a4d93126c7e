"""The warehouse side of a promotion decision: gates from the validation report, both models
scored on the same held-out rows, and the decision kept in ``ml.promotions``."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

import duckdb
import orjson
import polars as pl

from clinical_ml.audit import table_hash
from clinical_ml.db import transaction
from clinical_ml.model_store import StoredModel, model_by_version
from clinical_ml.policy import ClinicalPolicy
from clinical_ml.promotion import GATE_METRICS, Approval, Comparison, Decision, compare, decide
from clinical_ml.training import load_model
from clinical_ml.training import test_mask as held_out_mask


def validation_gates(con: duckdb.DuckDBPyConnection, model_version: int) -> tuple[dict[str, bool], dict[str, str]]:
    rows = {metric: (value, rule, passed) for metric, value, rule, passed in con.execute(
        "SELECT metric, value, rule, passed FROM ml.validation_report WHERE model_version = ?",
        [model_version]).fetchall()}
    gates, described = {}, {}
    for metric in GATE_METRICS:
        value, rule, passed = rows.get(metric, (None, None, False))
        gates[metric] = bool(passed)
        described[metric] = "not validated" if rule is None else f"{metric} {value:.4f}; rule {rule}"
    return gates, described


# A model's training rows (its window of landed batches, with a ``batch_key`` column).
TrainingRows = Callable[[StoredModel], pl.DataFrame]


def shared_holdout_comparison(con: duckdb.DuckDBPyConnection, challenger: StoredModel, champion: StoredModel,
                              policy: ClinicalPolicy, training_rows: TrainingRows) -> tuple[Comparison | None, str]:
    """Both models on the challenger's held-out rows of patients the champion never trained on
    either: patients outside the champion's training window (a newer batch) or in its test split."""
    if champion.feature_names != challenger.feature_names:
        return None, "not comparable: the champion uses other features"
    if not champion.params or "split_seed" not in champion.params:
        return None, "not comparable: the champion's train/test split is not recorded"
    features = training_rows(challenger).select("patient_key", "landmark_date", "batch_key", *challenger.feature_names)
    frame = test_predictions_frame(con, challenger.model_version).join(
        features, on=["patient_key", "landmark_date"], how="inner").sort("patient_key", "landmark_date")
    champion_patients = training_rows(champion)["patient_key"].unique()
    in_champion_window = frame["patient_key"].is_in(champion_patients.implode())
    champion_held_out = held_out_mask(frame["patient_key"], champion.params["test_fraction"],
                                      champion.params["split_seed"])
    new_patients = int(frame.filter(~in_champion_window)["patient_key"].n_unique())
    frame = frame.filter(~in_champion_window | pl.Series(champion_held_out))
    if frame.height == 0 or frame["y_true"].n_unique() < 2:
        return None, "not comparable: no held-out patients with both outcomes that neither model trained on"
    champion_score = load_model(champion.model_cbm).predict_proba(
        frame.select(challenger.feature_names).to_pandas().astype("float64"))[:, 1]
    comparison = compare(frame["y_true"].to_numpy(), frame["score"].to_numpy(), champion_score,
                         frame["patient_key"].to_numpy(), policy.promotion)
    return comparison, (f"AUROC {comparison.challenger_auroc:.4f} vs champion {comparison.champion_auroc:.4f} on "
                        f"{comparison.rows} rows of {comparison.patients} patients neither trained on ({new_patients} "
                        f"from batches newer than the champion's); difference "
                        f"{comparison.difference:+.4f} (95% CI {comparison.ci_low:+.4f} to {comparison.ci_high:+.4f}); "
                        f"margin {comparison.margin}")


def test_predictions_frame(con: duckdb.DuckDBPyConnection, model_version: int) -> pl.DataFrame:
    return con.execute("SELECT patient_key, landmark_date, y_true, score FROM ml.test_predictions "
                       "WHERE model_version = ?", [model_version]).pl()


def judge_challenger(con: duckdb.DuckDBPyConnection, challenger: StoredModel, champion_version, policy: ClinicalPolicy,
                     training_rows: TrainingRows, approval: Approval | None = None) -> tuple[Decision, dict]:
    """``champion_version``: the registry's champion (an MLflow ModelVersion) or None."""
    gates, described = validation_gates(con, challenger.model_version)
    comparison, comparison_text, champion = None, "no champion yet: the first model is judged by the gates alone", None
    if champion_version is not None:
        champion = model_by_version(con, int(champion_version.tags["warehouse_model_version"]))
        comparison, comparison_text = shared_holdout_comparison(con, challenger, champion, policy, training_rows)
    decision = decide(gates, comparison, has_champion=champion is not None, approval=approval)
    evidence = {
        "gates": described,
        "comparison": comparison_text,
        "challenger": {"model_version": challenger.model_version, "registry_version": challenger.registry_version,
                       "model_sha256": challenger.model_sha256, "training_data_sha256": challenger.training_data_hash,
                       "mlflow_run_id": challenger.mlflow_run_id, "training_window": challenger.training_window},
        "champion": None if champion is None else {
            "model_version": champion.model_version, "registry_version": champion_version.version,
            "model_sha256": champion.model_sha256, "training_data_sha256": champion.training_data_hash},
        "validation_report_sha256": table_hash(
            con, f"(SELECT * FROM ml.validation_report WHERE model_version = {int(challenger.model_version)})"),
    }
    return decision, evidence


def save_decision(con: duckdb.DuckDBPyConnection, challenger: StoredModel, decision: Decision, policy_version: str,
                  audit_sequence: int) -> None:
    con.execute("""CREATE TABLE IF NOT EXISTS ml.promotions (
        decided_at TIMESTAMPTZ, model_version INTEGER, registry_version VARCHAR, promoted BOOLEAN,
        reasons JSON, approval JSON, policy_version VARCHAR, audit_sequence BIGINT)""")
    with transaction(con):
        con.execute("INSERT INTO ml.promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            datetime.now(timezone.utc), challenger.model_version, challenger.registry_version, decision.promote,
            orjson.dumps(decision.reasons + decision.notes).decode(),
            orjson.dumps(decision.as_dict()["approval"]).decode(), policy_version, audit_sequence])
