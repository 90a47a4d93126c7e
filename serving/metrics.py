"""Prometheus metrics: requests by endpoint, status and rollout mode, latency, predictions by
model role, the versions in service. Labels carry route templates, never ids or values."""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("clinical_requests_total", "HTTP requests", ["endpoint", "method", "status", "mode"],
                   registry=REGISTRY)
LATENCY = Histogram("clinical_request_latency_seconds", "Request latency", ["endpoint"], registry=REGISTRY,
                    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
PREDICTIONS = Counter("clinical_predictions_total", "Scores computed", ["alias", "served", "mode"], registry=REGISTRY)
MODEL_VERSION = Gauge("clinical_model_version", "Registered model version in service", ["alias"], registry=REGISTRY)
KILL_SWITCH = Gauge("clinical_kill_switch_engaged", "1 while model answers are disabled", registry=REGISTRY)


def set_models(models) -> None:
    MODEL_VERSION.labels("champion").set(float(models.champion.version) if models else 0)
    MODEL_VERSION.labels("challenger").set(float(models.challenger.version) if models and models.challenger else 0)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class RequestMetrics:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            service = getattr(scope.get("app"), "state", None)
            control = getattr(getattr(service, "service", None), "control", None)
            mode = control.current.mode if control else "unknown"
            if control:
                KILL_SWITCH.set(1 if control.current.kill_switch else 0)
            REQUESTS.labels(endpoint, scope["method"], str(status["code"]), mode).inc()
            LATENCY.labels(endpoint).observe(time.perf_counter() - started)
