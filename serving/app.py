"""The inference service (FastAPI). ``create_app()`` builds it from ServingSettings; start it
with ``python -m serving`` (uvicorn)."""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from contextlib import asynccontextmanager
from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal, Optional

import numpy as np
import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from clinical_ml.deid import MissingSecretKey, pseudonym
from clinical_ml.features import MODEL_FEATURES, FeatureSpec
from resources.deid_key import DeidKey
from serving import metrics
from serving.auth import Principal, TokenStore
from serving.control import Control, ControlState, canary_bucket
from serving.fhir_features import BundleError, DeidSettings, NotEligible, bundle_features
from serving.limits import BodySizeLimit
from serving.prediction_log import PredictionLog
from serving.registry import LoadedModel, ModelHolder, ModelSet, Registry
from serving.settings import ServingSettings
from serving.trace import trace_prediction

log = logging.getLogger("serving")

FEATURE_NAMES = tuple(MODEL_FEATURES)
_UNIT = r"^[A-Za-z0-9][A-Za-z0-9 _./-]{0,63}$"
_FHIR_ID = r"^[A-Za-z0-9\-.]{1,64}$"
_PREDICTION_ID = r"^[0-9a-f]{32}$"


# -- request and response models --------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# One field per model feature, all required (null = not recorded; CatBoost treats it as missing).
FeatureVector = create_model(
    "FeatureVector", __base__=_Strict,
    **{name: (Optional[float], Field(..., allow_inf_nan=False, ge=-1e6, le=1e6)) for name in FEATURE_NAMES})


class PredictRequest(_Strict):
    features: FeatureVector  # type: ignore[valid-type]
    patient_id: Optional[str] = Field(
        None, pattern=_FHIR_ID, description="The source system's Patient id: turned into the pipeline's keyed "
        "pseudonym at once (canary routing, the log); never stored or logged as given.")
    care_unit: Optional[str] = Field(None, pattern=_UNIT, description="Routes a canary by unit when no patient is "
                                     "named; logged only as a keyed pseudonym.")
    explain: bool = Field(False, description="Add the top contributing features (SHAP values).")


class BundleEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    fullUrl: Optional[str] = None
    resource: dict[str, Any]


class Bundle(BaseModel):
    model_config = ConfigDict(extra="allow")
    resourceType: Literal["Bundle"]
    entry: list[BundleEntry] = Field(..., min_length=1)


class FhirPredictRequest(_Strict):
    as_of: date = Field(..., description="The date the risk is assessed at (data after it is ignored).")
    bundle: Bundle
    care_unit: Optional[str] = Field(None, pattern=_UNIT)
    explain: bool = False


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


class Contribution(BaseModel):
    feature: str
    shap: float


class Prediction(BaseModel):
    prediction_id: str
    probability: float
    threshold: float = Field(description="The model card's operating threshold (alert at or above it).")
    alert: bool
    model: ModelRef
    mode: str
    served_by: Literal["champion", "challenger"]
    contributions: Optional[list[Contribution]] = None


class FeedbackRequest(_Strict):
    outcome: Literal["confirmed", "overridden"]
    reason_code: Literal["agree", "clinical_judgement", "already_diagnosed", "already_treated", "measurement_error",
                         "data_missing_or_wrong", "not_in_intended_population", "other"]
    observed_label: Optional[Literal[0, 1]] = Field(
        None, description="The clinician's label for the patient (1: has or will have hypertension), if known.")


class FeedbackReceipt(BaseModel):
    feedback_id: str
    prediction_id: str
    recorded_at: str


class ControlUpdate(_Strict):
    mode: Optional[Literal["production", "shadow", "canary"]] = None
    canary_percent: Optional[float] = Field(None, ge=0, le=100)
    kill_switch: Optional[bool] = None
    reason: Optional[str] = Field(None, max_length=200)


# -- the app --------------------------------------------------------------------------------

class Service:
    """Everything a request needs, built once per process."""

    def __init__(self, settings: ServingSettings, registry: Registry | None = None):
        self.settings = settings
        self.tokens = TokenStore(settings.token_path)
        self.control = ControlState(settings)
        self.log = PredictionLog(settings.log_dir)
        self.holder = ModelHolder(registry or Registry(settings.tracking_uri, settings.model_name, FEATURE_NAMES),
                                  settings.reload_seconds)
        self.deid_key = DeidKey()

    def deid(self) -> DeidSettings:
        try:
            key = self.deid_key.key()
        except MissingSecretKey as error:
            raise HTTPException(503, f"de-identification key not configured: {error}") from None
        reference = self.deid_key.reference_date()
        return DeidSettings(key, self.deid_key.date_shift_max_days, self.deid_key.date_mode, reference,
                            self.deid_key.is_demo_key())


def _bearer(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    service: Service = request.app.state.service
    principal = service.tokens.authenticate(credentials.credentials) if credentials else None
    if principal is None:
        raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
    return principal


_scheme = HTTPBearer(auto_error=False, description="A token made with `python -m serving.tokens create`.")


def require(scope: str):
    # async: a stat() and a digest, no I/O worth a threadpool hop (which cost ~1 ms per request)
    async def dependency(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_scheme)) -> Principal:
        principal = _bearer(request, credentials)
        if scope not in principal.scopes:
            raise HTTPException(403, "forbidden")
        return principal

    return dependency


def _served_models(service: Service) -> tuple[Control, ModelSet]:
    control = service.control.current
    if control.kill_switch:
        raise HTTPException(503, "model answers are disabled (kill switch engaged)", headers={"Retry-After": "60"})
    models = service.holder.models
    if models is None:
        raise HTTPException(503, "no model is loaded: " + (service.holder.last_error or "the registry has no champion"))
    return control, models


def _route(control: Control, models: ModelSet, routing_key: str) -> tuple[LoadedModel, LoadedModel | None]:
    """(model whose answer is returned, model scored beside it and only logged)."""
    challenger = models.challenger
    if challenger is None or control.mode == "production":
        return models.champion, None
    if control.mode == "canary" and canary_bucket(routing_key) < control.canary_percent:
        return challenger, models.champion
    return models.champion, challenger


def _vector(features: dict[str, Any], names: tuple[str, ...]) -> np.ndarray:
    return np.array([[np.nan if features[n] is None else float(features[n]) for n in names]], dtype=np.float64)


def _feature_hash(features: dict[str, Any]) -> str:
    """SHA-256 of the feature vector as the model sees it (floats in the API's order): the same
    patient gives the same hash whichever endpoint computed the features."""
    return hashlib.sha256(orjson.dumps([None if features[n] is None else float(features[n])
                                        for n in FEATURE_NAMES])).hexdigest()


def _predict(service: Service, features: dict[str, Any], patient_key: str | None, care_unit: str | None,
             explain: bool, endpoint: str, started: float) -> Prediction:
    control, models = _served_models(service)
    prediction_id = uuid.uuid4().hex
    routing_key = patient_key or care_unit or prediction_id
    served, beside = _route(control, models, routing_key)
    row = _vector(features, served.feature_names)
    score = float(served.score(row)[0])
    if not math.isfinite(score):
        raise HTTPException(503, "the model returned no valid score")
    scores = [(served, score, True)]
    if beside is not None:
        try:  # the model scored beside the answer must never cost the answer
            scores.append((beside, float(beside.score(_vector(features, beside.feature_names))[0]), False))
        except Exception as error:  # noqa: BLE001
            log.warning("%s v%s could not score beside the answer: %s", beside.alias, beside.version,
                        type(error).__name__)
    latency_ms = (time.perf_counter() - started) * 1000
    now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    feature_hash = _feature_hash(features)
    service.log.record([{
        "prediction_id": prediction_id, "predicted_at": now, "endpoint": endpoint, "patient_key": patient_key,
        "care_unit_key": care_unit, "feature_sha256": feature_hash, "model_name": service.settings.model_name,
        "model_version": model.version, "alias": model.alias, "mlflow_run_id": model.run_id, "mode": control.mode,
        "served": is_served, "score": s, "threshold": model.threshold, "alert": s >= model.threshold,
        "latency_ms": round(latency_ms, 3)} for model, s, is_served in scores])
    for model, s, is_served in scores:
        metrics.PREDICTIONS.labels(model.alias, str(is_served).lower(), control.mode).inc()
    return Prediction(
        prediction_id=prediction_id, probability=score, threshold=served.threshold, alert=score >= served.threshold,
        model=ModelRef(name=service.settings.model_name, version=served.version, alias=served.alias),
        mode=control.mode, served_by=served.alias,
        contributions=[Contribution(**c) for c in served.contributions(row[0])] if explain else None)


class CatchAll:
    """Unexpected errors become a bare 500, logged by type and path only: a traceback (which
    uvicorn would log) can quote the data being processed, e.g. a validation failure's values."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:  # noqa: BLE001
            log.error("unhandled %s on %s", type(error).__name__, scope.get("path"))
            if not started:
                body = b'{"detail":"internal error"}'
                await send({"type": "http.response.start", "status": 500,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})


def _unit_key(service: Service, care_unit: str | None) -> str | None:
    """A care unit is free text (it could name a person): keyed like a patient, never kept as given."""
    return None if care_unit is None else pseudonym(service.deid().key, "CareUnit", care_unit)


def _without_inputs(errors: list[dict]) -> list[dict]:
    """Validation errors without the offending input (it may be PHI)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def create_app(settings: ServingSettings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or ServingSettings()
    service = Service(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.holder.start()
        yield
        service.holder.stop()

    app = FastAPI(title="Clinical ML inference service", version="1.0",
                  description="Hypertension risk from the MLflow registry's champion, with shadow, canary and "
                  "production rollout and a kill switch. Every endpoint but `/health` needs a bearer token.",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(BodySizeLimit, default_limit=settings.max_body_bytes,
                       limits={"/predict/fhir": settings.max_fhir_body_bytes})
    app.add_middleware(metrics.RequestMetrics)
    app.add_middleware(CatchAll)  # outermost: nothing unexpected reaches uvicorn's traceback logging

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        return JSONResponse({"detail": _without_inputs(error.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.get("/health", tags=["operations"], summary="Liveness (no token)")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], summary="Readiness: a model is loaded and the prediction log writable",
             responses={503: {"description": "not ready"}})
    async def ready(_: Principal = Depends(require("read"))):
        models, control = service.holder.models, service.control.current
        writable = service.log.predictions.writable()
        body = {"ready": models is not None and writable, "prediction_log_writable": writable,
                "champion": models.champion.version if models else None,
                "challenger": models.challenger.version if models and models.challenger else None,
                "mode": control.mode, "kill_switch": control.kill_switch, "last_reload_error": service.holder.last_error}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.post("/predict", tags=["predictions"], response_model=Prediction, response_model_exclude_none=True,
              responses={503: {"description": "kill switch engaged or no model loaded"}})
    async def predict(body: PredictRequest, _: Principal = Depends(require("predict"))):
        started = time.perf_counter()
        patient_key = None if body.patient_id is None else pseudonym(service.deid().key, "Patient", body.patient_id)
        return _predict(service, body.features.model_dump(), patient_key, _unit_key(service, body.care_unit),
                        body.explain, "features", started)

    @app.post("/predict/fhir", tags=["predictions"], response_model=Prediction, response_model_exclude_none=True,
              responses={503: {"description": "kill switch engaged or no model loaded"}})
    def predict_fhir(body: FhirPredictRequest, _: Principal = Depends(require("predict"))):
        # a plain def: de-identification and features take milliseconds of DuckDB, off the event loop
        started = time.perf_counter()
        _, models = _served_models(service)
        if not (date(1900, 1, 1) <= body.as_of <= date.today() + timedelta(days=1)):
            raise HTTPException(422, "as_of must be a date between 1900-01-01 and today")
        spec = FeatureSpec(**models.champion.card["cohort"]["spec"]) if models.champion.card.get("cohort") else FeatureSpec()
        try:
            found = bundle_features(body.bundle.model_dump(exclude_none=True), body.as_of, service.deid(), spec,
                                    FEATURE_NAMES)
        except (BundleError, NotEligible) as error:
            raise HTTPException(422, str(error)) from None
        return _predict(service, found.features, found.patient_key, _unit_key(service, body.care_unit), body.explain,
                        "fhir", started)

    @app.post("/feedback/{prediction_id}", tags=["predictions"], response_model=FeedbackReceipt, status_code=201,
              responses={404: {"description": "no such prediction"}})
    def feedback(body: FeedbackRequest, prediction_id: str = Path(..., pattern=_PREDICTION_ID),
                 principal: Principal = Depends(require("feedback"))):
        served = service.log.served_record(prediction_id)
        if served is None:
            raise HTTPException(404, "no such prediction")
        record = {"feedback_id": uuid.uuid4().hex, "prediction_id": prediction_id,
                  "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "outcome": body.outcome, "reason_code": body.reason_code, "observed_label": body.observed_label,
                  "patient_key": served.get("patient_key"), "model_version": served["model_version"],
                  "alias": served["alias"], "score": served["score"], "alert": served["alert"],
                  "recorded_by": principal.name}
        service.log.add_feedback(record)
        return FeedbackReceipt(feedback_id=record["feedback_id"], prediction_id=prediction_id,
                               recorded_at=record["recorded_at"])

    @app.get("/predictions/{prediction_id}/trace", tags=["audit"],
             summary="Prediction -> model version -> MLflow run -> training data hash -> audit record",
             responses={404: {"description": "no such prediction"}})
    def trace(prediction_id: str = Path(..., pattern=_PREDICTION_ID), _: Principal = Depends(require("read"))):
        from mlflow.exceptions import MlflowException

        try:
            found = trace_prediction(service.log, service.holder.registry, prediction_id)
        except MlflowException:
            raise HTTPException(404, "the prediction's model version or run is no longer in the registry") from None
        if found is None:
            raise HTTPException(404, "no such prediction")
        return found

    @app.get("/model-card", tags=["operations"], summary="The model card of the champion (or the challenger)")
    async def model_card(alias: Literal["champion", "challenger"] = "champion",
                         format: Literal["json", "markdown"] = "json", _: Principal = Depends(require("read"))):
        models = service.holder.models
        model = None if models is None else (models.champion if alias == "champion" else models.challenger)
        if model is None:
            raise HTTPException(404, f"no {alias} is loaded")
        if format == "markdown":
            return PlainTextResponse(model.card_markdown or "", media_type="text/markdown")
        return JSONResponse(model.card)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus(_: Principal = Depends(require("metrics"))):
        metrics.set_models(service.holder.models)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/admin/control", tags=["admin"], summary="Rollout mode, canary share, kill switch")
    async def get_control(_: Principal = Depends(require("admin"))) -> dict:
        return service.control.current.__dict__

    @app.post("/admin/control", tags=["admin"], summary="Change the rollout mode or canary share, engage or release "
              "the kill switch (every worker follows within a second)")
    async def set_control(body: ControlUpdate, principal: Principal = Depends(require("admin"))) -> dict:
        changed = service.control.update(principal.name, body.reason, mode=body.mode,
                                         canary_percent=body.canary_percent, kill_switch=body.kill_switch)
        log.warning("control changed by %s: mode=%s canary=%s kill_switch=%s", principal.name, changed.mode,
                    changed.canary_percent, changed.kill_switch)
        return changed.__dict__

    @app.post("/admin/reload", tags=["admin"], summary="Re-read the registry's aliases now")
    def reload(_: Principal = Depends(require("admin"))) -> dict:
        models = service.holder.reload()
        return {"champion": models.champion.version if models else None,
                "challenger": models.challenger.version if models and models.challenger else None,
                "error": service.holder.last_error}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: Principal = Depends(require("read"))):
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(_: Principal = Depends(require("read"))) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    return app
