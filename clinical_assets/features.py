from datetime import date
from typing import Optional

import polars as pl
from dagster import AssetCheckSpec, AssetExecutionContext, Config, MaterializeResult, asset
from pydantic import Field

from clinical_assets.batches import FHIR_BATCHES
from clinical_assets.deidentified import deidentified_fhir, leak_check_result
from clinical_assets.metadata import markdown_table
from clinical_ml.deid import find_identifier_leaks
from clinical_ml.features import (MODEL_FEATURES, FeatureSpec, build_feature_matrix, landmark_summary, resolve_landmarks,
                                  write_feature_matrix)
from clinical_ml.training import frame_hash
from resources.deid_key import DeidKey
from resources.warehouse import DuckDBWarehouse


class FeatureConfig(Config):
    landmarks: Optional[list[str]] = Field(
        default=None, description="ISO dates to pin the landmarks; default: derived from the data (every "
        "landmark_interval_months back from data end - horizon, at most max_landmarks).")
    landmark_interval_months: int = 12
    max_landmarks: int = 10
    horizon_days: int = 730
    lookback_days: int = 1095
    min_age: int = 18

    def spec(self) -> FeatureSpec:
        pinned = tuple(date.fromisoformat(d) for d in self.landmarks) if self.landmarks else None
        return FeatureSpec(landmarks=pinned, **self.model_dump(exclude={"landmarks"}))


def feature_summary(frame: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame({
        "feature": MODEL_FEATURES,
        "mean": [frame[c].cast(pl.Float64).mean() for c in MODEL_FEATURES],
        "missing_share": [frame[c].null_count() / max(frame.height, 1) for c in MODEL_FEATURES],
    })


@asset(
    deps=[deidentified_fhir],
    partitions_def=FHIR_BATCHES,
    group_name="features",
    kinds={"duckdb", "polars"},
    owners=["team:clinical-ml"],
    description="Landmark cohort (`features.feature_matrix`): one row per (patient, landmark date), landmarks "
    "every 12 months across the span the data covers. Eligible: adult, alive, not yet diagnosed, history in the "
    "lookback window, observed through the horizon (else censored, not negative). Features strictly before the "
    "landmark: demographics, BP/BMI/lab windows and trends, diagnosis flags, medications, utilization, note "
    "mentions (negation-aware); label = first hypertension diagnosis within the horizon. Pandera-validated. "
    "Per batch, in the batch's file; training reads a window of batches.",
    check_specs=[AssetCheckSpec("feature_matrix_has_no_identifiers", asset="feature_matrix", blocking=True,
                                description="No original identifier value appears in the feature matrix.")],
)
def feature_matrix(context: AssetExecutionContext, config: FeatureConfig, warehouse: DuckDBWarehouse,
                   deid_key: DeidKey) -> MaterializeResult:
    spec = config.spec()
    with warehouse.connect_batch(context.partition_key) as con:
        plan = resolve_landmarks(con, spec)
        frame = build_feature_matrix(con, spec, plan=plan)
        write_feature_matrix(con, frame, spec, plan)
        leak_check = leak_check_result(find_identifier_leaks(con, ["features.feature_matrix"], deid_key.key()),
                                       ["features.feature_matrix"], check_name="feature_matrix_has_no_identifiers")
    landmarks = landmark_summary(frame, plan)
    return MaterializeResult(check_results=[leak_check], metadata={
        "batch": context.partition_key,
        "rows": frame.height,
        "patients": frame["patient_key"].n_unique(),
        "landmarks": len(plan.landmarks),
        "positives": int(frame["label"].sum()),
        "prevalence": float(frame["label"].mean()) if frame.height else 0.0,
        "features": len(MODEL_FEATURES),
        "data_span": plan.describe_span(),
        "landmarks_derived_from_data": plan.derived,
        "landmark_table": markdown_table(landmarks),
        "data_sha256": frame_hash(frame),
        "summary": markdown_table(feature_summary(frame)),
    })
