from dagster import (AssetKey, DefaultSensorStatus, EventLogEntry, RunRequest, SensorEvaluationContext, SkipReason,
                     asset_sensor)

from clinical_ml.policy import current_policy
from sensors.jobs import retrain_job


def psi_exceeds(metadata: dict) -> tuple[bool, float, float]:
    """(drifted, max PSI, threshold) as the drift report judged it: the sensor acts on the
    threshold the report and its check used (recorded in its metadata), never on another one."""
    entry, recorded = metadata.get("max_psi"), metadata.get("psi_threshold")
    max_psi = float(entry.value) if entry is not None else 0.0
    threshold = float(recorded.value) if recorded is not None else current_policy().psi_retrain_threshold
    return max_psi > threshold, max_psi, threshold


def build_psi_drift_sensor():
    @asset_sensor(
        asset_key=AssetKey("drift_report"),
        job=retrain_job,
        name="psi_drift_sensor",
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description="Requests `retrain` when a drift report's max feature PSI exceeds the clinical policy's "
        "retrain threshold (the one recorded with the report).",
    )
    def psi_drift_sensor(context: SensorEvaluationContext, asset_event: EventLogEntry):
        # Cheap on purpose: reads the metadata the drift asset computed, never the warehouse.
        materialization = asset_event.asset_materialization
        drifted, max_psi, threshold = psi_exceeds(materialization.metadata)
        if not drifted:
            return SkipReason(f"max PSI {max_psi:.3f} <= {threshold}")
        # One run per drift report: its id as the run key makes re-evaluation idempotent.
        report = materialization.metadata.get("report_id")
        report_id = report.value if report is not None else f"{asset_event.run_id}-{asset_event.timestamp}"
        return RunRequest(
            run_key=f"psi-drift-{report_id}",
            tags={"trigger": "psi_drift", "max_psi": f"{max_psi:.4f}", "psi_threshold": str(threshold)},
        )

    return psi_drift_sensor


psi_drift_sensor = build_psi_drift_sensor()
