"""Compositions of the stages, for paths that run a whole batch outside the warehouse."""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

from clinical_ml.deid import deidentify
from clinical_ml.features import FeatureSpec, build_feature_matrix
from clinical_ml.ingest import land_ndjson


def features_for_batch(ndjson_dir: str | Path, key: bytes, spec: FeatureSpec, max_shift_days: int = 365,
                       **deid_options) -> pl.DataFrame:
    """Land, de-identify and featurize a batch in a private in-memory database.

    The same code as the main path, so a monitoring batch is processed exactly like training
    data; its raw PHI never touches the warehouse and is gone when the connection closes.
    """
    con = duckdb.connect(":memory:")
    try:
        land_ndjson(con, ndjson_dir)
        deidentify(con, key, max_shift_days=max_shift_days, **deid_options)
        return build_feature_matrix(con, spec)
    finally:
        con.close()
