import os

from dagster import AssetSelection, define_asset_job
from dagster_dask import dask_executor

ALL_ASSETS = AssetSelection.all()
BATCH_ASSETS = AssetSelection.assets("raw_fhir", "deidentified_fhir", "feature_matrix")
# Everything trained and judged on the window of landed batches (not partitioned).
MODEL_ASSETS = AssetSelection.assets("trained_model", "validation_report", "model_card", "model_promotion",
                                     "audit_record")

clinical_pipeline_job = define_asset_job(
    "clinical_pipeline",
    selection=ALL_ASSETS,
    description="Everything for one data batch (partition): land, de-identify and featurize it, train on the "
    "window of landed batches, validate, judge for promotion, report drift, audit.",
)

ingest_batch_job = define_asset_job(
    "ingest_batch",
    selection=BATCH_ASSETS | AssetSelection.assets("drift_report"),
    description="A new data batch (partition): land, de-identify, featurize, and compare it with the training data "
    "of the model in service (psi_drift_sensor retrains when it drifted).",
)

retrain_job = define_asset_job(
    "retrain",
    # The drift report is not re-run: it would compare the batch with the data it now trains on.
    selection=MODEL_ASSETS,
    description="Retrain on the window of landed batches (the drifted one included), validate, judge the "
    "challenger against the champion, audit.",
    tags={"purpose": "retrain"},
)


def dask_cluster() -> dict:
    """The Dask cluster of ``clinical_pipeline_dask``: an existing scheduler when
    DASK_SCHEDULER_ADDRESS is set (tcp://host:8786), else a local cluster of DASK_LOCAL_WORKERS
    (default 2) worker processes with one thread each (Dagster steps are not thread-safe)."""
    address = os.environ.get("DASK_SCHEDULER_ADDRESS")
    if address:
        return {"existing": {"address": address}}
    return {"local": {"n_workers": int(os.environ.get("DASK_LOCAL_WORKERS", "2")), "threads_per_worker": 1,
                      "processes": True, "dashboard_address": None}}


clinical_pipeline_dask_job = define_asset_job(
    "clinical_pipeline_dask",
    selection=ALL_ASSETS,
    executor_def=dask_executor.configured({"cluster": dask_cluster()}),
    description="clinical_pipeline with each step run by a Dask worker process (a local cluster, or the scheduler "
    "at DASK_SCHEDULER_ADDRESS). Workers share the DuckDB files through the filesystem; a step waits for the "
    "file lock of a database another step is writing (docs/distributed.md).",
)
