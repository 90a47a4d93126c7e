"""The models in service, loaded from the MLflow Model Registry by alias.

A ``ModelSet`` (champion and, when it differs, challenger) is built completely (model, feature
names, operating threshold from the model card, lineage) before it replaces the one in use by a
single reference swap: a request sees the old set or the new one, never a half-loaded model.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

log = logging.getLogger("serving.registry")

ROLES = ("champion", "challenger")


class ModelUnavailable(RuntimeError):
    """No servable model (no champion yet, or its card lacks an operating point)."""


@dataclass(frozen=True)
class LoadedModel:
    alias: str
    version: str
    run_id: str
    model: object  # CatBoostClassifier
    feature_names: tuple[str, ...]
    threshold: float
    card: dict
    tags: dict
    card_markdown: str | None = None

    def score(self, rows: np.ndarray) -> np.ndarray:
        return self.model.predict(rows, prediction_type="Probability", thread_count=1)[:, 1]

    def contributions(self, row: np.ndarray, top: int = 5) -> list[dict]:
        """The features that moved this score most (CatBoost's SHAP values, log-odds scale)."""
        from catboost import Pool

        shap = self.model.get_feature_importance(Pool(row.reshape(1, -1), feature_names=list(self.feature_names)),
                                                 type="ShapValues", thread_count=1)[0][:-1]
        order = np.argsort(-np.abs(shap))[:top]
        return [{"feature": self.feature_names[i], "shap": round(float(shap[i]), 6)} for i in order]


@dataclass(frozen=True)
class ModelSet:
    champion: LoadedModel
    challenger: LoadedModel | None  # None when the challenger alias is unset or is the champion
    loaded_at: float = field(default_factory=time.time)

    def key(self) -> tuple:
        return (self.champion.version, self.challenger.version if self.challenger else None)


class Registry:
    """Reads aliases and loads versions from an MLflow tracking server or local store."""

    def __init__(self, tracking_uri: str, model_name: str, feature_names: tuple[str, ...] | None = None):
        import mlflow
        from mlflow import MlflowClient

        # models:/ URIs resolve through the process-wide URIs (this process serves one registry)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.model_name = model_name
        self.feature_names = feature_names  # the API's schema: a model wanting others is not loaded
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._cache: dict[str, LoadedModel] = {}

    def alias_versions(self) -> dict[str, str | None]:
        from mlflow.exceptions import MlflowException

        out = {}
        for alias in ROLES:
            try:
                out[alias] = str(self.client.get_model_version_by_alias(self.model_name, alias).version)
            except MlflowException:
                out[alias] = None
        return out

    def _load(self, alias: str, version: str) -> LoadedModel:
        cached = self._cache.get(version)
        if cached is not None:
            return replace(cached, alias=alias)
        import mlflow

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        mv = self.client.get_model_version(self.model_name, version)
        model = mlflow.catboost.load_model(f"models:/{self.model_name}/{version}")
        if self.feature_names is not None and set(model.feature_names_) != set(self.feature_names):
            raise ModelUnavailable(f"{self.model_name} v{version} uses other features than this service's API "
                                   "(upgrade the service)")
        card = self._card(mv.run_id, version)
        point = card.get("operating_point") or {}
        if point.get("threshold") is None:
            raise ModelUnavailable(f"{self.model_name} v{version}: its model card has no operating point "
                                   "(re-materialize model_card)")
        loaded = LoadedModel(alias, str(version), mv.run_id, model, tuple(model.feature_names_),
                             float(point["threshold"]), card, dict(mv.tags), self._card_markdown(mv.run_id))
        self._cache[str(version)] = loaded
        return loaded

    def _card(self, run_id: str, version: str) -> dict:
        import mlflow

        try:
            return mlflow.artifacts.load_dict(f"runs:/{run_id}/model_card/model_card.json")
        except Exception as error:  # noqa: BLE001 (any artifact-store failure means: no card)
            raise ModelUnavailable(f"{self.model_name} v{version}: no model card in its MLflow run "
                                   f"({type(error).__name__})") from None

    def _card_markdown(self, run_id: str) -> str | None:
        import mlflow

        try:
            return mlflow.artifacts.load_text(f"runs:/{run_id}/model_card/model_card.md")
        except Exception:  # noqa: BLE001 (the JSON card is what serving needs; the text is for people)
            return None

    def load(self) -> ModelSet:
        versions = self.alias_versions()
        if versions["champion"] is None:
            raise ModelUnavailable(f"{self.model_name} has no champion yet: promote a model first (make demo)")
        champion = self._load("champion", versions["champion"])
        challenger = None
        if versions["challenger"] not in (None, versions["champion"]):
            try:
                challenger = self._load("challenger", versions["challenger"])
            except ModelUnavailable as error:  # shadow/canary need it; production does not
                log.warning("challenger not loaded: %s", error)
        self._cache = {v: m for v, m in self._cache.items() if v in (versions["champion"], versions["challenger"])}
        return ModelSet(champion, challenger)


class ModelHolder:
    """The current ModelSet, swapped whole; a background thread polls the registry's aliases."""

    def __init__(self, registry: Registry, reload_seconds: float):
        self.registry = registry
        self.reload_seconds = reload_seconds
        self._models: ModelSet | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def models(self) -> ModelSet | None:
        return self._models

    def reload(self) -> ModelSet | None:
        """Load what the aliases point at; keep serving the old set if that fails."""
        with self._lock:
            try:
                versions = self.registry.alias_versions()
                current = self._models
                if current is None or (versions["champion"], versions["challenger"]
                                       if versions["challenger"] != versions["champion"] else None) != current.key():
                    self._models = self.registry.load()
                    log.info("serving champion v%s, challenger %s", self._models.champion.version,
                             f"v{self._models.challenger.version}" if self._models.challenger else "none")
                self.last_error = None
            except Exception as error:  # noqa: BLE001 (a registry outage must not stop serving)
                self.last_error = f"{type(error).__name__}: {error}"
                log.warning("model reload failed: %s", self.last_error)
            return self._models

    def start(self) -> None:
        self.reload()
        if self.reload_seconds > 0:
            self._thread = threading.Thread(target=self._poll, name="registry-poll", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.reload_seconds):
            self.reload()
