from dagster import AssetSelection, define_asset_job

ALL_ASSETS = AssetSelection.all()

clinical_pipeline_job = define_asset_job(
    "clinical_pipeline",
    selection=ALL_ASSETS,
    description="Everything, raw FHIR to audit record.",
)

retrain_job = define_asset_job(
    "retrain",
    # Re-land the latest data and retrain, validate and audit; the drift report itself is not
    # re-run (it would compare the new reference to the batch that triggered the retrain).
    selection=ALL_ASSETS - AssetSelection.assets("drift_report"),
    description="Retrain on the latest data: ingestion through audit, without the drift report.",
    tags={"purpose": "retrain"},
)
