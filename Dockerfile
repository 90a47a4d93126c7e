# The clinical inference service (serving/): the MLflow registry's champion behind FastAPI/uvicorn.
#
#   docker build -t clinical-serving .
#   docker run -p 8000:8000 -v clinical-data:/data -e DEID_SECRET_KEY=... clinical-serving
#
# State lives on the /data volume: the MLflow store (unless MLFLOW_TRACKING_URI points at a
# tracking server), the hashed token file, the control file and the prediction log. The registry's
# artifact paths are absolute, so a local sqlite store must have been written with the same layout
# (the pipeline run with CLINICAL_HOME=/data); otherwise set MLFLOW_TRACKING_URI to an MLflow server.
# Make a token inside the container: docker exec <id> python -m serving.tokens create --name ehr --scopes predict
# Secrets (DEID_SECRET_KEY) come from the environment at run time, never from the image;
# CLINICAL_DEMO_MODE=1 uses the published demo key, for the synthetic demo data only.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# The pinned dependencies first (their own layer: a code change does not reinstall them).
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (the packages pyproject.toml names; README.md is its readme).
COPY README.md ./
COPY clinical_ml/ clinical_ml/
COPY clinical_assets/ clinical_assets/
COPY resources/ resources/
COPY sensors/ sensors/
COPY bulk_data_server/ bulk_data_server/
COPY serving/ serving/
RUN pip install --no-deps . \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /data \
    && chown app:app /data

ENV CLINICAL_HOME=/data \
    SERVING_HOME=/data/serving \
    MLFLOW_TRACKING_URI=sqlite:////data/mlflow/mlflow.db \
    MLFLOW_DISABLE_TELEMETRY=true \
    DO_NOT_TRACK=true \
    MPLCONFIGDIR=/tmp/matplotlib

VOLUME ["/data"]
USER app
WORKDIR /home/app
EXPOSE 8000

# Liveness only (/health needs no token); curl is not in the slim image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

CMD ["python", "-m", "serving", "--host", "0.0.0.0", "--port", "8000"]
