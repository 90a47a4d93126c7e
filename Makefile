# The two set-up commands (README): `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME := $(CURDIR)/.dagster

.PHONY: install demo demo-drift test dev dagster-home serve token

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@

install: $(VENV)/.installed

dagster-home:
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml

# Install, then materialize the whole asset graph on the embedded defaults (synthetic FHIR
# source, DuckDB file, SQLite Dagster storage, local MLflow store; demo de-id key).
# The data arrive as a batch (a Dagster partition): registered first, then materialized.
demo: install dagster-home
	export CLINICAL_DEMO_MODE=1; batch=$$($(BIN)/python -m clinical_assets.batches add --label initial) && \
	$(BIN)/dagster job execute -m clinical_assets.definitions -a defs -j clinical_pipeline \
		--tags "{\"dagster/partition\": \"$$batch\"}" && \
	$(BIN)/python -m clinical_assets.summary

# After `make demo`: a drifted batch arrives, psi_drift_sensor requests the retrain, the challenger
# (trained on a window that includes the batch) is judged against the champion; prints before/after.
demo-drift: install dagster-home
	CLINICAL_DEMO_MODE=1 $(BIN)/python -m clinical_assets.drift_loop

# Install, then run the whole test suite (slow suites included).
test: install
	$(BIN)/pytest

# The Dagster UI and daemon (sensors) on http://127.0.0.1:3000
dev: install dagster-home
	CLINICAL_DEMO_MODE=1 $(BIN)/dagster dev -w workspace.yaml

# The inference service on http://127.0.0.1:8000 (after `make demo`: serves the registry's champion).
serve: install
	CLINICAL_DEMO_MODE=1 $(BIN)/python -m serving

# A local token with every scope (printed once; stored hashed under .data/serving/tokens.json).
token: install
	$(BIN)/python -m serving.tokens create --name local-admin --scopes predict,feedback,read,metrics,admin
