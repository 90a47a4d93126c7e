from datetime import date

import polars as pl
from dagster import AssetCheckResult, Config, MaterializeResult, asset, asset_check

from clinical_assets.deidentified import deidentified_fhir, leak_check_result
from clinical_assets.metadata import markdown_table
from clinical_ml.features import MODEL_FEATURES, FeatureSpec, build_feature_matrix, write_feature_matrix
from clinical_ml.training import frame_hash
from resources.warehouse import DuckDBWarehouse


class FeatureConfig(Config):
    index_date: str = "2022-01-01"
    horizon_days: int = 730
    lookback_days: int = 1095
    min_age: int = 18


def feature_summary(frame: pl.DataFrame) -> pl.DataFrame:
    return pl.DataFrame({
        "feature": MODEL_FEATURES,
        "mean": [frame[c].cast(pl.Float64).mean() for c in MODEL_FEATURES],
        "missing_share": [frame[c].null_count() / max(frame.height, 1) for c in MODEL_FEATURES],
    })


@asset(
    deps=[deidentified_fhir],
    group_name="features",
    kinds={"duckdb", "polars"},
    owners=["team:clinical-ml"],
    description="One row per patient at the index date (`features.feature_matrix`): demographics, "
    "BP/BMI/lab windows and trends, diagnosis flags, medications, utilization and note mentions "
    "(negation-aware), all strictly before the index date; label = hypertension within the horizon. "
    "Validated with a pandera schema.",
)
def feature_matrix(config: FeatureConfig, warehouse: DuckDBWarehouse) -> MaterializeResult:
    spec = FeatureSpec(index_date=date.fromisoformat(config.index_date), horizon_days=config.horizon_days,
                       lookback_days=config.lookback_days, min_age=config.min_age)
    with warehouse.connect() as con:
        frame = build_feature_matrix(con, spec)
        write_feature_matrix(con, frame, spec)
    return MaterializeResult(metadata={
        "patients": frame.height,
        "positives": int(frame["label"].sum()),
        "prevalence": float(frame["label"].mean()) if frame.height else 0.0,
        "features": len(MODEL_FEATURES),
        "index_date": config.index_date,
        "data_sha256": frame_hash(frame),
        "summary": markdown_table(feature_summary(frame)),
    })


@asset_check(asset=feature_matrix, blocking=True,
             description="No original identifier value appears in the feature matrix.")
def feature_matrix_has_no_identifiers(warehouse: DuckDBWarehouse) -> AssetCheckResult:
    return leak_check_result(warehouse, ["features.feature_matrix"])
