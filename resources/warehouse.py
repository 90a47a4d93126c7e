from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import duckdb
from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.batches import BatchStore
from clinical_ml.db import DuckDBSettings, open_database
from resources.settings import data_home, default_warehouse_path


class DuckDBWarehouse(ConfigurableResource):
    """The DuckDB files: one per data batch (schemas raw, deid, features; written only by that
    batch's partition) and the warehouse proper (schemas ml, monitoring, audit)."""

    path: str = Field(default_factory=default_warehouse_path, description="DuckDB database file (CLINICAL_WAREHOUSE).")
    batch_root: Optional[str] = Field(default_factory=lambda: os.environ.get("CLINICAL_BATCH_ROOT") or None,
                                      description="Folder of per-batch DuckDB files (CLINICAL_BATCH_ROOT); default: "
                                      "`<warehouse name>-batches` beside the warehouse file.")
    threads: int = Field(default_factory=lambda: int(os.environ.get("CLINICAL_DUCKDB_THREADS", "2")),
                         description="DuckDB worker threads per connection (CLINICAL_DUCKDB_THREADS).")
    memory_limit: str = Field(default_factory=lambda: os.environ.get("CLINICAL_DUCKDB_MEMORY_LIMIT", "2GB"),
                              description="DuckDB memory limit per connection, past which joins, aggregates and "
                              "sorts spill to temp_directory (CLINICAL_DUCKDB_MEMORY_LIMIT).")
    temp_directory: str = Field(default_factory=lambda: os.environ.get("CLINICAL_DUCKDB_TEMP_DIR")
                                or str(data_home() / "duckdb-spill"),
                                description="Where DuckDB spills (CLINICAL_DUCKDB_TEMP_DIR); a folder per connection "
                                "is made in it and removed on close. Spilled blocks can hold PHI (raw tables): "
                                "keep it on storage as protected as the warehouse.")

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self._open(self.path) as con:
            yield con

    @contextmanager
    def connect_batch(self, key: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """The batch's own file (raw, deid, features): only that batch's partition writes it."""
        with self._open(str(self.batch_store().path(key))) as con:
            yield con

    def batch_store(self) -> BatchStore:
        path = Path(self.path)
        return BatchStore(Path(self.batch_root) if self.batch_root else path.parent / f"{path.stem}-batches",
                          duckdb_settings=self.duckdb_settings())

    def duckdb_settings(self) -> DuckDBSettings:
        return DuckDBSettings(threads=self.threads, memory_limit=self.memory_limit, temp_directory=self.temp_directory)

    @contextmanager
    def _open(self, path: str) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open_database(path, self.duckdb_settings()) as con:
            yield con
