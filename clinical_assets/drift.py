import os
import uuid
from typing import Optional

from dagster import (AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset,
                     build_metadata_bounds_checks)
from pydantic import Field

from clinical_assets.features import feature_matrix
from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_ml.drift import drift_table, evidently_report, save_drift_report
from clinical_ml.features import MODEL_FEATURES, read_feature_matrix, read_feature_spec
from clinical_ml.pipeline import features_for_batch
from clinical_ml.synthetic import CohortSpec
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.settings import data_home
from resources.warehouse import DuckDBWarehouse

PSI_RETRAIN_THRESHOLD = float(os.environ.get("PSI_RETRAIN_THRESHOLD", "0.2"))


class CurrentBatchConfig(Config):
    """The current (production) batch compared with the training reference."""

    ndjson_dir: Optional[str] = Field(default_factory=lambda: os.environ.get("CURRENT_BATCH_DIR") or None,
                                      description="Folder of NDJSON for the current batch; else a generated one.")
    synthetic_patients: int = 1000
    synthetic_seed: int = 7
    drift: bool = Field(default=False, description="Generate a drifted batch (BP device +8 mmHg, older population).")
    psi_threshold: float = PSI_RETRAIN_THRESHOLD


@asset(
    deps=[feature_matrix, trained_model],
    group_name="monitoring",
    kinds={"duckdb", "evidently"},
    owners=["team:clinical-ml"],
    description="PSI and KS per model feature between the training reference and a current batch "
    "(processed by the same landing, de-identification and feature code), plus an Evidently "
    "data-drift HTML report. History in `monitoring.drift_report`. `psi_drift_sensor` requests "
    "`retrain` when max PSI exceeds the threshold.",
)
def drift_report(context: AssetExecutionContext, config: CurrentBatchConfig, warehouse: DuckDBWarehouse,
                 fhir_source: FhirSource, deid_key: DeidKey) -> MaterializeResult:
    if config.ndjson_dir:
        batch_dir, batch = config.ndjson_dir, f"directory {config.ndjson_dir}"
    else:
        spec = CohortSpec(n_patients=config.synthetic_patients, seed=config.synthetic_seed, drift=config.drift)
        batch_dir = fhir_source.generate(spec)
        batch = f"synthetic n={spec.n_patients} seed={spec.seed} drift={spec.drift}"
    with warehouse.connect() as con:
        reference = read_feature_matrix(con)
        # the same cohort rules; landmarks derived from the batch's own data unless pinned
        feature_spec, _ = read_feature_spec(con)
    current = features_for_batch(batch_dir, deid_key.key(), feature_spec, deid_key.date_shift_max_days,
                                 date_mode=deid_key.date_mode, reference_date=deid_key.reference_date(),
                                 synthetic_only=deid_key.is_demo_key())
    table = drift_table(reference, current, MODEL_FEATURES, config.psi_threshold)
    report_id = str(uuid.uuid4())
    html_path = data_home() / "reports" / f"drift-{report_id}.html"
    evidently_psi = evidently_report(reference, current, MODEL_FEATURES, html_path, config.psi_threshold)
    with warehouse.connect() as con:
        save_drift_report(con, report_id, batch, table)
    drifted = table.filter("drifted")["feature"].to_list()
    context.log.info(f"Max PSI {table['psi'].max():.3f}; drifted features: {drifted or 'none'}")
    return MaterializeResult(metadata={
        "report_id": report_id,
        "batch": batch,
        "current_patients": current.height,
        "max_psi": float(table["psi"].max()),
        "psi_threshold": config.psi_threshold,
        "drifted_features": MetadataValue.json(drifted),
        "psi_by_feature": MetadataValue.json(dict(zip(table["feature"], table["psi"]))),
        "evidently_psi_by_feature": MetadataValue.json(evidently_psi),
        "drift_table": markdown_table(table),
        "evidently_report": MetadataValue.path(str(html_path)),
    })


# The max PSI as a visible check in the UI (warns; the sensor is what acts on it).
drift_report_psi_checks = build_metadata_bounds_checks(
    assets=[drift_report], metadata_key="max_psi", max_value=PSI_RETRAIN_THRESHOLD)
