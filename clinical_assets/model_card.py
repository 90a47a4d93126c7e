"""The model card of the newest model, in the warehouse, in its MLflow run and in the UI."""

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from clinical_assets.validation import validation_report
from clinical_ml.model_card import build_model_card, card_json, render_markdown, save_model_card
from clinical_ml.model_store import latest_model
from clinical_ml.policy import current_policy
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse

CARD_ARTIFACT_DIR = "model_card"


def _mlflow_client(mlflow: MLflowTracking):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow.tracking_uri)


def _training_dagster_run(mlflow: MLflowTracking, run_id: str | None) -> str | None:
    """The Dagster run that trained the model (tagged on its MLflow run by trained_model)."""
    return _mlflow_client(mlflow).get_run(run_id).data.tags.get("dagster_run_id") if run_id else None


def _log_card(mlflow: MLflowTracking, run_id: str, registry_version: str | None, markdown: str, card: dict) -> None:
    client = _mlflow_client(mlflow)
    client.log_text(run_id, markdown, f"{CARD_ARTIFACT_DIR}/model_card.md")
    client.log_text(run_id, card_json(card).decode(), f"{CARD_ARTIFACT_DIR}/model_card.json")
    if registry_version:  # the registry page of the version points at its card
        mlflow.tag_version(registry_version, {"model_card": f"runs:/{run_id}/{CARD_ARTIFACT_DIR}/model_card.md"})


@asset(
    # before the promotion: the decision is taken on the card (and cites its hash), and a refused
    # version still gets its card (a failed blocking gate stops everything after model_promotion)
    deps=[validation_report],
    group_name="deployment",
    kinds={"mlflow", "markdown"},
    owners=["team:clinical-ml"],
    description="Model card of the newest model version: intended use and users, training data window and hash, "
    "cohort definition, features, held-out metrics with 95% CIs, subgroup results, clinical gates met or not, the "
    "promotion decision, known limitations (computed from the evidence) and lineage (MLflow run, Dagster run, audit "
    "record). Aggregates only. Stored in `ml.model_cards`; `model_card.md` and `model_card.json` are logged to the "
    "model's MLflow run.",
)
def model_card(context: AssetExecutionContext, warehouse: DuckDBWarehouse, mlflow: MLflowTracking) -> MaterializeResult:
    with warehouse.connect() as con:
        model = latest_model(con)
        card = build_model_card(con, model.model_version, policy=current_policy(), dagster_run_id=context.run_id,
                                batch_store=warehouse.batch_store(), registered_model_name=mlflow.registered_model_name,
                                training_dagster_run_id=_training_dagster_run(mlflow, model.mlflow_run_id))
        markdown = render_markdown(card)
        save_model_card(con, card, markdown)
    if model.mlflow_run_id:
        _log_card(mlflow, model.mlflow_run_id, model.registry_version, markdown, card)
    return MaterializeResult(metadata={"model_card": MetadataValue.md(markdown), "model_version": model.model_version,
                                       "registry_version": model.registry_version or "none",
                                       "gates_all_met": bool(card["gates"]["all_met"])})
