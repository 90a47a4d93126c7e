"""The learning loop, end to end, in one command (`make demo-drift`):

    python -m clinical_assets.drift_loop [--patients N] [--seed S] [--no-drift]

A new (by default drifted) synthetic batch arrives as a partition; `ingest_batch` lands,
de-identifies and featurizes it and reports its drift against the model in service;
`psi_drift_sensor` is evaluated on that report exactly as the daemon would, and the retrain it
requests runs (training on the window that now includes the batch); the challenger is judged
against the champion. Prints what changed. Runs go to the Dagster instance (DAGSTER_HOME), so
the UI shows them.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from dagster import DagsterInstance, Definitions, build_sensor_context

from clinical_assets.batches import register_batch
from clinical_ml.batches import BatchSource, model_window, read_only
from clinical_ml.db import table_exists
from clinical_ml.drift import drift_table
from clinical_ml.features import MODEL_FEATURES, read_feature_matrix
from clinical_ml.model_store import StoredModel, latest_model, serving_model
from clinical_ml.policy import current_policy
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from sensors.drift_sensor import psi_drift_sensor

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the summary below says what happened
REPORTED_METRICS = ("auroc", "sensitivity_at_90_specificity", "calibration_slope", "subgroup_auroc_gap", "cv_auroc_std")


@dataclass
class ModelSnapshot:
    registry_version: str | None
    model_version: int
    training_data_hash: str
    model_sha256: str
    batches: list[str]
    metrics: dict[str, float]

    @classmethod
    def of(cls, warehouse: DuckDBWarehouse, model: StoredModel) -> "ModelSnapshot":
        with warehouse.connect() as con:
            metrics = dict(con.execute("SELECT metric, value FROM ml.validation_report WHERE model_version = ?",
                                       [model.model_version]).fetchall())
        return cls(model.registry_version, model.model_version, model.training_data_hash, model.model_sha256,
                   list((model.training_window or {}).get("batches", [])),
                   {m: metrics[m] for m in REPORTED_METRICS if m in metrics})


@dataclass
class LoopReport:
    batch: str
    champion_before: ModelSnapshot
    psi_before: float
    retrain_requested: bool
    sensor_message: str
    challenger: ModelSnapshot | None = None
    champion_after: ModelSnapshot | None = None
    psi_against_challenger: float | None = None
    promoted: bool | None = None
    reasons: list[str] = field(default_factory=list)
    comparison: str = ""  # the challenger against the champion on held-out patients neither trained on


def batch_max_psi(warehouse: DuckDBWarehouse, batch: str, model: StoredModel) -> float:
    """Max feature PSI of ``batch`` against the training data of ``model``."""
    reference = model_window(warehouse.batch_store(), model.training_window).frame
    with read_only(warehouse.batch_store().path(batch), warehouse.duckdb_settings()) as con:
        current = read_feature_matrix(con)
    return float(drift_table(reference, current, MODEL_FEATURES, current_policy().psi_retrain_threshold)["psi"].max())


def _serving(warehouse: DuckDBWarehouse, mlflow: MLflowTracking) -> StoredModel:
    with warehouse.connect() as con:
        return serving_model(con, mlflow.alias_version("champion"))


def run_drift_loop(defs: Definitions, instance: DagsterInstance, source: BatchSource, label: str = "drifted") -> LoopReport:
    resources = defs.resources
    warehouse, mlflow = resources["warehouse"], resources["mlflow"]
    champion = _serving(warehouse, mlflow)
    before = ModelSnapshot.of(warehouse, champion)

    # the daemon's view of drift_report before this batch: only reports from now on count
    cursor = psi_drift_sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs)).cursor
    batch = register_batch(instance, warehouse, source, label)
    ingest = defs.resolve_job_def("ingest_batch").execute_in_process(instance=instance, partition_key=batch,
                                                                    run_config=QUIET)
    if not ingest.success:
        raise RuntimeError(f"ingest_batch failed for {batch}: see run {ingest.run_id} in the Dagster UI")
    tick = psi_drift_sensor.evaluate_tick(build_sensor_context(instance=instance, definitions=defs, cursor=cursor))
    report = LoopReport(batch, before, batch_max_psi(warehouse, batch, champion), bool(tick.run_requests),
                        tick.skip_message or "retrain requested")
    if not tick.run_requests:
        return report

    request = tick.run_requests[0]
    # what the daemon does with the request (the tags carry the trigger, the PSI and the threshold)
    retrain = defs.resolve_job_def(psi_drift_sensor.job_name).execute_in_process(
        instance=instance, tags={**request.tags, "dagster/run_key": request.run_key}, raise_on_error=False,
        run_config=QUIET)
    with warehouse.connect() as con:
        challenger = latest_model(con)
        decision = con.execute("SELECT promoted, reasons, audit_sequence FROM ml.promotions WHERE model_version = ? "
                               "ORDER BY decided_at DESC LIMIT 1", [challenger.model_version]).fetchone()
        evidence = con.execute("SELECT body->'evidence'->>'comparison' FROM audit.audit_log WHERE sequence = ?",
                               [decision[2]]).fetchone() if decision else None
    report.challenger = ModelSnapshot.of(warehouse, challenger)
    report.champion_after = ModelSnapshot.of(warehouse, _serving(warehouse, mlflow))
    report.psi_against_challenger = batch_max_psi(warehouse, batch, challenger)
    if decision:
        import orjson

        report.promoted, report.reasons = bool(decision[0]), list(orjson.loads(decision[1]))
        report.comparison = evidence[0] if evidence else ""
    elif not retrain.success:
        report.reasons = [f"the retrain run {retrain.run_id} failed before a promotion decision"]
    return report


def _model_line(name: str, snapshot: ModelSnapshot) -> str:
    metrics = ", ".join(f"{k} {v:.3f}" for k, v in snapshot.metrics.items())
    return (f"{name:<16} registry v{snapshot.registry_version} (model {snapshot.model_version}), trained on "
            f"{', '.join(snapshot.batches)}\n{'':<17}data {snapshot.training_data_hash[:16]}…  model "
            f"{snapshot.model_sha256[:16]}…\n{'':<17}{metrics}")


def format_report(report: LoopReport) -> str:
    threshold = current_policy().psi_retrain_threshold
    lines = [f"\nnew batch        {report.batch}",
             f"drift            max PSI {report.psi_before:.3f} against the serving model's training data "
             f"(threshold {threshold}): {report.sensor_message}",
             _model_line("champion before", report.champion_before)]
    if report.challenger:
        lines += [_model_line("challenger", report.challenger),
                  f"{'':<17}data hash {'differs' if report.challenger.training_data_hash != report.champion_before.training_data_hash else 'UNCHANGED'}"
                  f"; batch {report.batch} {'is' if report.batch in report.challenger.batches else 'is NOT'} in its training data",
                  f"drift after      max PSI {report.psi_against_challenger:.3f} against the challenger's training data",
                  f"promotion        {'promoted to champion' if report.promoted else 'not promoted'}"
                  + "".join(f"\n{'':<17}- {r}" for r in report.reasons)
                  + (f"\n{'':<17}- {report.comparison}" if report.comparison else ""),
                  _model_line("champion now", report.champion_after)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clinical_assets.drift_loop")
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-drift", action="store_true", help="an undrifted batch (the sensor stays quiet)")
    args = parser.parse_args(argv)
    from clinical_assets.definitions import defs

    with defs.resources["warehouse"].connect() as con:
        if not table_exists(con, "ml", "models"):
            raise SystemExit("no model yet: run `make demo` first (the loop needs a model in service to drift from)")
    source = BatchSource(kind="synthetic", synthetic_patients=args.patients, synthetic_seed=args.seed,
                         drift=not args.no_drift)
    print(format_report(run_drift_loop(defs, DagsterInstance.get(), source, "undrifted" if args.no_drift else "drifted")))


if __name__ == "__main__":
    main()
