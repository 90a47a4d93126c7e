from typing import Optional

import polars as pl
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from clinical_assets.features import feature_matrix
from clinical_assets.metadata import markdown_table
from clinical_ml.batches import TrainingWindow, read_training_window
from clinical_ml.model_store import save_model
from clinical_ml.tracking import log_and_register_model, log_training_run
from clinical_ml.training import TrainingConfig, frame_hash, train
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse


class TrainingRunConfig(Config):
    seed: int = 42
    test_fraction: float = 0.3
    iterations: int = 400
    depth: int = 4
    learning_rate: float = 0.05
    min_positives: int = 50
    window_batches: Optional[int] = Field(default=None, description="Train on the newest N landed batches (default: all).")
    window_months: Optional[int] = Field(
        default=None, description="Within them, only landmarks at most N months before the newest (default: all).")

    def training_config(self) -> TrainingConfig:
        return TrainingConfig(**self.model_dump(exclude={"window_batches", "window_months"}))

    def window(self) -> TrainingWindow:
        return TrainingWindow(batches=self.window_batches, months=self.window_months)


@asset(
    deps=[feature_matrix],
    group_name="training",
    kinds={"catboost", "scikitlearn", "mlflow"},
    owners=["team:clinical-ml"],
    description="CatBoost classifier (with a logistic-regression baseline) trained on a window of landed batches "
    "(default: all; a patient's rows from the newest batch that has them), on a seeded, "
    "patient-level split of the landmark cohort (CV folds grouped by patient; a temporal validation trains on "
    "earlier landmarks and tests on later ones). Stops with the counts when the cohort has too few positives. Model and held-out predictions in `ml.models` / `ml.test_predictions`; "
    "parameters, metrics, data hash, features and model logged to MLflow.",
)
def trained_model(context: AssetExecutionContext, config: TrainingRunConfig, warehouse: DuckDBWarehouse,
                  mlflow: MLflowTracking) -> MaterializeResult:
    window = read_training_window(warehouse.batch_store(), config.window())
    frame = window.frame
    data_hash = frame_hash(frame)
    context.log.info(f"Training window: {window.describe()}")
    # InsufficientDataError says in numbers why the cohort cannot support a model
    result = train(frame, config.training_config(), horizon_days=window.spec.horizon_days,
                   data_span=window.plan.describe_span())
    with mlflow.start_run(run_name=f"train-{context.run_id[:8]}",
                          tags={"dagster_run_id": context.run_id, "training_data_sha256": data_hash,
                                "training_batches": ",".join(window.batches)}) as run:
        import mlflow as mlflow_module

        log_training_run(mlflow_module, result, data_hash, window_facts=window.facts)
        registry_version = log_and_register_model(mlflow_module, result, frame, mlflow.registered_model_name)
        run_id = run.info.run_id
    with warehouse.connect() as con:
        stored = save_model(con, result, run_id, data_hash, registry_version, training_window=window.facts)
    # every new model is the challenger until the promotion gates say otherwise
    mlflow.tag_version(registry_version, {"warehouse_model_version": stored.model_version,
                                          "training_data_sha256": data_hash, "model_sha256": stored.model_sha256})
    mlflow.set_alias("challenger", registry_version)
    importance = pl.DataFrame({"feature": result.feature_names,
                               "importance": result.model.get_feature_importance().tolist()}).sort(
        "importance", descending=True)
    return MaterializeResult(metadata={
        "model_version": stored.model_version,
        "registered_model": f"{mlflow.registered_model_name} v{registry_version} (alias challenger)",
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": mlflow.tracking_uri,
        "training_data_sha256": data_hash,
        "training_window": window.describe(),
        "rows_by_batch": MetadataValue.json(window.facts["rows_by_batch"]),
        "model_sha256": stored.model_sha256,
        "test_auroc": result.metrics["test_auroc"],
        "baseline_test_auroc": result.metrics["baseline_test_auroc"],
        "cv_auroc_mean": result.metrics["cv_auroc_mean"],
        "cv_auroc_std": result.metrics["cv_auroc_std"],
        "temporal_test_auroc": result.metrics["temporal_test_auroc"],
        "temporal_validation": MetadataValue.json({k: v for k, v in result.temporal.items() if v == v}),
        "n_train": result.n_train,
        "n_test": result.n_test,
        "feature_importance": markdown_table(importance),
    })
