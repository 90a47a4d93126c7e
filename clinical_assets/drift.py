import os
import uuid
from typing import Optional

from dagster import (AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetExecutionContext, Config,
                     MaterializeResult, MetadataValue, asset)
from pydantic import Field

from clinical_assets.features import feature_matrix
from clinical_assets.metadata import markdown_table
from clinical_assets.model import trained_model
from clinical_ml.drift import drift_table, evidently_report, save_drift_report
from clinical_ml.features import MODEL_FEATURES, read_feature_matrix, read_feature_spec
from clinical_ml.pipeline import features_for_batch
from clinical_ml.policy import current_policy
from clinical_ml.synthetic import CohortSpec
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.settings import data_home
from resources.warehouse import DuckDBWarehouse

class CurrentBatchConfig(Config):
    """The current (production) batch compared with the training reference."""

    ndjson_dir: Optional[str] = Field(default_factory=lambda: os.environ.get("CURRENT_BATCH_DIR") or None,
                                      description="Folder of NDJSON for the current batch; else a generated one.")
    synthetic_patients: int = 1000
    synthetic_seed: int = 7
    drift: bool = Field(default=False, description="Generate a drifted batch (BP device +8 mmHg, older population).")


@asset(
    deps=[feature_matrix, trained_model],
    group_name="monitoring",
    kinds={"duckdb", "evidently"},
    owners=["team:clinical-ml"],
    description="PSI and KS per model feature between the training reference and a current batch "
    "(processed by the same landing, de-identification and feature code), plus an Evidently "
    "data-drift HTML report. History in `monitoring.drift_report`. `psi_drift_sensor` requests "
    "`retrain` when max PSI exceeds the clinical policy's threshold (the one this report and its check used).",
    check_specs=[AssetCheckSpec("psi_within_policy", asset="drift_report",
                                description="No feature's PSI exceeds the clinical policy's retrain threshold "
                                "(warns; psi_drift_sensor is what acts on it).")],
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
    # one threshold for the report, its check and the sensor (which reads it from this metadata)
    policy = current_policy()
    threshold = policy.psi_retrain_threshold
    table = drift_table(reference, current, MODEL_FEATURES, threshold)
    report_id = str(uuid.uuid4())
    html_path = data_home() / "reports" / f"drift-{report_id}.html"
    evidently_psi = evidently_report(reference, current, MODEL_FEATURES, html_path, threshold)
    with warehouse.connect() as con:
        save_drift_report(con, report_id, batch, table)
    drifted = table.filter("drifted")["feature"].to_list()
    context.log.info(f"Max PSI {table['psi'].max():.3f}; drifted features: {drifted or 'none'}")
    max_psi = float(table["psi"].max())
    return MaterializeResult(
        check_results=[AssetCheckResult(
            check_name="psi_within_policy", passed=not drifted, severity=AssetCheckSeverity.WARN,
            description=f"max PSI {max_psi:.3f} against threshold {threshold} (policy {policy.version}); "
            f"drifted: {', '.join(drifted) or 'none'}",
            metadata={"max_psi": max_psi, "psi_threshold": threshold, "policy_version": policy.version})],
        metadata={
        "report_id": report_id,
        "batch": batch,
        "current_patients": current.height,
        "max_psi": max_psi,
        "psi_threshold": threshold,
        "policy_version": policy.version,
        "drifted_features": MetadataValue.json(drifted),
        "psi_by_feature": MetadataValue.json(dict(zip(table["feature"], table["psi"]))),
        "evidently_psi_by_feature": MetadataValue.json(evidently_psi),
        "drift_table": markdown_table(table),
        "evidently_report": MetadataValue.path(str(html_path)),
    })
