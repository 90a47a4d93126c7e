"""What a training run records in MLflow: parameters, metrics, data hash, features, model.
No patient-level data is logged (no keys, no predictions)."""

from __future__ import annotations

from clinical_ml.training import TrainingResult


def log_training_run(mlflow, result: TrainingResult, data_hash: str, extra_params: dict | None = None,
                     window_facts: dict | None = None) -> None:
    """Log into the active MLflow run. ``window_facts``: which batches and landmarks trained it
    (batch keys, dates and counts: no patient data)."""
    mlflow.log_params({**result.params, **(extra_params or {}), "n_train": result.n_train, "n_test": result.n_test})
    mlflow.log_metrics({k: v for k, v in result.metrics.items() if v == v})  # NaN-free
    for fold, auroc in enumerate(result.cv_aurocs):
        mlflow.log_metric("cv_fold_auroc", auroc, step=fold)
    mlflow.set_tag("training_data_sha256", data_hash)
    mlflow.log_dict({"features": result.feature_names, "training_data_sha256": data_hash}, "features.json")
    if window_facts:
        mlflow.log_dict(window_facts, "training_window.json")


def log_and_register_model(mlflow, result: TrainingResult, frame, registered_model_name: str):
    """Log the model with its signature and a PHI-free input example (the training features'
    medians, not any patient's row) and register it as a new version; returns that version."""
    from mlflow.models import infer_signature

    input_example = frame.select(result.feature_names).median().fill_null(0.0).to_pandas().astype("float64")
    signature = infer_signature(input_example, result.model.predict_proba(input_example)[:, 1])
    info = mlflow.catboost.log_model(result.model, name="model", signature=signature, input_example=input_example,
                                     registered_model_name=registered_model_name)
    return str(info.registered_model_version)
