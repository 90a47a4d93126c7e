import os

from dagster import (AssetKey, DefaultSensorStatus, EventLogEntry, RunRequest, SensorEvaluationContext, SkipReason,
                     asset_sensor)

from sensors.jobs import retrain_job


def psi_exceeds(metadata: dict, threshold: float) -> tuple[bool, float]:
    entry = metadata.get("max_psi")
    max_psi = float(entry.value) if entry is not None else 0.0
    return max_psi > threshold, max_psi


def build_psi_drift_sensor(threshold: float | None = None):
    threshold = float(os.environ.get("PSI_RETRAIN_THRESHOLD", "0.2")) if threshold is None else threshold

    @asset_sensor(
        asset_key=AssetKey("drift_report"),
        job=retrain_job,
        name="psi_drift_sensor",
        minimum_interval_seconds=30,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Requests `retrain` when a drift report's max feature PSI exceeds {threshold}.",
    )
    def psi_drift_sensor(context: SensorEvaluationContext, asset_event: EventLogEntry):
        # Cheap on purpose: reads the metadata the drift asset computed, never the warehouse.
        materialization = asset_event.asset_materialization
        drifted, max_psi = psi_exceeds(materialization.metadata, threshold)
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
