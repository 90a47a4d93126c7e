from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pytest

from clinical_ml.deid import deidentify
from clinical_ml.ingest import land_ndjson
from clinical_ml.synthetic import CohortSpec, write_bulk_export

SHARED_SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "fhir-samples"
TEST_KEY = b"test-key-0123456789abcdef-not-a-real-secret"


def shared_sample(name: str) -> Path:
    path = SHARED_SAMPLES / name
    if not path.is_dir():
        message = f"../shared/fhir-samples/{name} is not present beside the checkout"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always has ../shared: a skip there would hide a real gap
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    """A 400-patient generated Bulk export, shared read-only by the tests."""
    return write_bulk_export(tmp_path_factory.mktemp("export"), CohortSpec(n_patients=400, seed=11)).directory


@pytest.fixture(scope="session")
def deid_con(small_export) -> duckdb.DuckDBPyConnection:
    """An in-memory warehouse holding the small export landed and de-identified."""
    con = duckdb.connect()
    land_ndjson(con, small_export)
    deidentify(con, TEST_KEY)
    return con


def read_resources(directory: Path, resource_type: str) -> list[dict]:
    with open(directory / f"{resource_type}.000.ndjson") as handle:
        return [json.loads(line) for line in handle]
