"""The code location: `dagster dev` (workspace.yaml) loads `defs` from here."""

from dagster import Definitions, in_process_executor

from clinical_assets.audit import audit_record
from clinical_assets.deidentified import deidentified_fhir
from clinical_assets.drift import drift_report
from clinical_assets.features import feature_matrix
from clinical_assets.leak_checks import DOWNSTREAM_LEAK_CHECKS
from clinical_assets.model import trained_model
from clinical_assets.model_card import model_card
from clinical_assets.promotion import model_promotion
from clinical_assets.raw_fhir import raw_fhir
from clinical_assets.validation import validation_report
from resources.audit_store import AuditStore
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from sensors.drift_sensor import psi_drift_sensor
from sensors.jobs import clinical_pipeline_dask_job, clinical_pipeline_job, ingest_batch_job, retrain_job

ASSETS = [raw_fhir, deidentified_fhir, feature_matrix, trained_model, validation_report, model_card, model_promotion,
          drift_report, audit_record]


def default_resources() -> dict:
    warehouse = DuckDBWarehouse()
    return {
        "warehouse": warehouse,
        "fhir_source": FhirSource(),
        "deid_key": DeidKey(),
        "mlflow": MLflowTracking(),
        "audit_store": AuditStore(warehouse=warehouse),
    }


def build_definitions(resources: dict | None = None) -> Definitions:
    return Definitions(
        assets=ASSETS,
        asset_checks=DOWNSTREAM_LEAK_CHECKS,
        jobs=[clinical_pipeline_job, clinical_pipeline_dask_job, ingest_batch_job, retrain_job],
        sensors=[psi_drift_sensor],
        resources=resources or default_resources(),
        # Steps of one run share the warehouse file (one DuckDB writer), so they run one after another
        # in the run's process. The batch steps (landing, de-identification, features) write only
        # their batch's own file, so those of different batches can run at the same time.
        executor=in_process_executor,
    )


defs = build_definitions()
