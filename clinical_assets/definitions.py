"""The code location: `dagster dev` (workspace.yaml) loads `defs` from here."""

from dagster import Definitions, in_process_executor

from clinical_assets.audit import audit_record
from clinical_assets.deidentified import deidentified_fhir, deidentified_fhir_has_no_identifiers
from clinical_assets.drift import drift_report
from clinical_assets.features import feature_matrix, feature_matrix_has_no_identifiers
from clinical_assets.leak_checks import DOWNSTREAM_LEAK_CHECKS
from clinical_assets.model import trained_model
from clinical_assets.promotion import model_promotion
from clinical_assets.raw_fhir import raw_fhir
from clinical_assets.validation import validation_report
from resources.audit_store import AuditStore
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from sensors.drift_sensor import psi_drift_sensor
from sensors.jobs import clinical_pipeline_job, retrain_job

ASSETS = [raw_fhir, deidentified_fhir, feature_matrix, trained_model, validation_report, model_promotion, drift_report,
          audit_record]


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
        asset_checks=[deidentified_fhir_has_no_identifiers, feature_matrix_has_no_identifiers, *DOWNSTREAM_LEAK_CHECKS],
        jobs=[clinical_pipeline_job, retrain_job],
        sensors=[psi_drift_sensor],
        resources=resources or default_resources(),
        # One DuckDB writer at a time: steps run in the run's own process, one after another.
        executor=in_process_executor,
    )


defs = build_definitions()
