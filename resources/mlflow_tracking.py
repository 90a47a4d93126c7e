from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dagster import ConfigurableResource
from pydantic import Field

from resources.settings import default_mlflow_artifact_root, default_mlflow_tracking_uri


class MLflowTracking(ConfigurableResource):
    """MLflow tracking: a local SQLite store by default (MLflow 3 refuses a plain file store),
    any server by setting MLFLOW_TRACKING_URI. Runs are opened and always closed here (the
    dagster-mlflow resource can leave runs open across assets; see stack findings)."""

    tracking_uri: str = Field(default_factory=default_mlflow_tracking_uri)
    artifact_root: str = Field(default_factory=default_mlflow_artifact_root,
                               description="Artifact location for experiments this platform creates.")
    experiment_name: str = Field(default="hypertension-risk")
    registered_model_name: str = Field(default="hypertension-risk",
                                       description="Model Registry name; aliases champion and challenger mark roles.")

    def _client_setup(self):
        import mlflow

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.tracking_uri)
        # the registry is this store too: a registry URI set earlier in the process (another
        # store's) must not receive this pipeline's models
        mlflow.set_registry_uri(self.tracking_uri)
        experiment = mlflow.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            location = self.artifact_root
            if "://" not in location:
                Path(location).mkdir(parents=True, exist_ok=True)
                location = Path(location).resolve().as_uri()
            experiment_id = mlflow.create_experiment(self.experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        return mlflow, experiment_id

    @contextmanager
    def start_run(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator:
        mlflow, experiment_id = self._client_setup()
        if mlflow.active_run() is not None:  # left over from a crashed step in this process
            mlflow.end_run(status="KILLED")
        with mlflow.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags or {}) as run:
            yield run

    def log_metrics_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        """Add metrics to a finished run (validation happens after training)."""
        mlflow, _ = self._client_setup()
        client = mlflow.MlflowClient()
        for name, value in metrics.items():
            client.log_metric(run_id, name, value)

    # -- Model Registry: the source of truth for which model serves ---------------------------
    def _registry(self):
        mlflow, _ = self._client_setup()
        return mlflow.MlflowClient()

    def tag_version(self, version: str, tags: dict[str, str]) -> None:
        client = self._registry()
        for key, value in tags.items():
            client.set_model_version_tag(self.registered_model_name, version, key, str(value))

    def set_alias(self, alias: str, version: str) -> None:
        self._registry().set_registered_model_alias(self.registered_model_name, alias, version)

    def alias_version(self, alias: str):
        """The registered version behind ``alias`` (with its tags), or None when unset."""
        from mlflow.exceptions import MlflowException

        try:
            return self._registry().get_model_version_by_alias(self.registered_model_name, alias)
        except MlflowException:
            return None
