"""Trained models and their held-out predictions, stored in DuckDB (schema ``ml``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone

import duckdb
import orjson
import polars as pl

from clinical_ml.db import transaction
from clinical_ml.training import TrainingResult

_DDL = """
CREATE SCHEMA IF NOT EXISTS ml;
CREATE TABLE IF NOT EXISTS ml.models (
    model_version INTEGER PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL,
    mlflow_run_id VARCHAR,
    training_data_hash VARCHAR NOT NULL,
    model_sha256 VARCHAR NOT NULL,
    feature_names VARCHAR[] NOT NULL,
    params JSON NOT NULL,
    metrics JSON NOT NULL,
    model_cbm BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS ml.test_predictions (
    model_version INTEGER NOT NULL,
    patient_key VARCHAR NOT NULL,
    landmark_date DATE,
    sex VARCHAR, age_group VARCHAR, race VARCHAR,
    y_true INTEGER NOT NULL,
    score DOUBLE NOT NULL,
    baseline_score DOUBLE NOT NULL
);
-- warehouses made before the landmark cohort: predictions gain their landmark
ALTER TABLE ml.test_predictions ADD COLUMN IF NOT EXISTS landmark_date DATE;
-- the MLflow Model Registry version of each model (the registry says which one serves)
ALTER TABLE ml.models ADD COLUMN IF NOT EXISTS registry_version VARCHAR;
ALTER TABLE ml.test_predictions ADD COLUMN IF NOT EXISTS ethnicity VARCHAR;
-- which landed batches (and landmarks) trained the model: the drift reference and the lineage
ALTER TABLE ml.models ADD COLUMN IF NOT EXISTS training_window JSON;
"""


@dataclass
class StoredModel:
    model_version: int
    mlflow_run_id: str | None
    training_data_hash: str
    model_sha256: str
    feature_names: list[str]
    metrics: dict
    model_cbm: bytes
    params: dict = None
    registry_version: str | None = None
    training_window: dict | None = None  # batches, months, landmarks, rows (see clinical_ml.batches)


def save_model(con: duckdb.DuckDBPyConnection, result: TrainingResult, mlflow_run_id: str | None,
               data_hash: str, registry_version: str | None = None,
               training_window: dict | None = None) -> StoredModel:
    """Store a new model version and its test predictions in one transaction."""
    con.execute(_DDL)
    blob = result.model_bytes()
    model_sha = hashlib.sha256(blob).hexdigest()
    with transaction(con):
        version = con.execute("SELECT coalesce(max(model_version), 0) + 1 FROM ml.models").fetchone()[0]
        con.execute(
            """INSERT INTO ml.models (model_version, created_at, mlflow_run_id, training_data_hash, model_sha256,
                                      feature_names, params, metrics, model_cbm, registry_version, training_window)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            [version, datetime.now(timezone.utc), mlflow_run_id, data_hash, model_sha, result.feature_names,
             orjson.dumps(result.params).decode(), orjson.dumps(result.metrics).decode(), blob, registry_version,
             orjson.dumps(training_window).decode() if training_window else None],
        )
        predictions = result.test_predictions.select(
            pl.lit(version, dtype=pl.Int32).alias("model_version"), "patient_key", "landmark_date", "sex", "age_group",
            "race", "ethnicity", "y_true", "score", "baseline_score")
        con.register("new_predictions", predictions.to_arrow())
        con.execute("INSERT INTO ml.test_predictions BY NAME SELECT * FROM new_predictions")
        con.unregister("new_predictions")
    return StoredModel(version, mlflow_run_id, data_hash, model_sha, result.feature_names, result.metrics, blob,
                       result.params, registry_version, training_window)


def latest_model(con: duckdb.DuckDBPyConnection) -> StoredModel:
    """The model trained last (the challenger), not the one in service: that is the registry's
    `champion` alias."""
    return _model(con, "ORDER BY model_version DESC LIMIT 1", [])


def model_by_version(con: duckdb.DuckDBPyConnection, model_version: int) -> StoredModel:
    return _model(con, "WHERE model_version = ?", [model_version])


def _model(con: duckdb.DuckDBPyConnection, where: str, params: list) -> StoredModel:
    con.execute(_DDL)
    row = con.execute(
        f"""SELECT model_version, mlflow_run_id, training_data_hash, model_sha256, feature_names, metrics, model_cbm,
                   params, registry_version, training_window FROM ml.models {where}""", params).fetchone()
    if row is None:
        raise LookupError("no such trained model in the warehouse: materialize trained_model first")
    return StoredModel(row[0], row[1], row[2], row[3], list(row[4]), orjson.loads(row[5]), bytes(row[6]),
                       orjson.loads(row[7]), row[8], orjson.loads(row[9]) if row[9] else None)


def test_predictions(con: duckdb.DuckDBPyConnection, model_version: int) -> pl.DataFrame:
    return con.execute(
        "SELECT * FROM ml.test_predictions WHERE model_version = ? ORDER BY patient_key, landmark_date", [model_version]
    ).pl()


def serving_model(con: duckdb.DuckDBPyConnection, champion_registry_version) -> StoredModel:
    """The model in service: the registry's champion (an MLflow ModelVersion carrying the
    ``warehouse_model_version`` tag), or, before any champion, the latest model."""
    if champion_registry_version is not None:
        return model_by_version(con, int(champion_registry_version.tags["warehouse_model_version"]))
    return latest_model(con)
