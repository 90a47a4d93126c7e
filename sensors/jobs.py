from dagster import AssetSelection, define_asset_job

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
