from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import duckdb
from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.batches import BatchStore
from resources.settings import default_warehouse_path


class DuckDBWarehouse(ConfigurableResource):
    """The DuckDB files: one per data batch (schemas raw, deid, features; written only by that
    batch's partition) and the warehouse proper (schemas ml, monitoring, audit)."""

    path: str = Field(default_factory=default_warehouse_path, description="DuckDB database file (CLINICAL_WAREHOUSE).")
    batch_root: Optional[str] = Field(default_factory=lambda: os.environ.get("CLINICAL_BATCH_ROOT") or None,
                                      description="Folder of per-batch DuckDB files (CLINICAL_BATCH_ROOT); default: "
                                      "`<warehouse name>-batches` beside the warehouse file.")
    threads: int = Field(default=2, description="DuckDB worker threads.")
    memory_limit: str = Field(default="8GB", description="DuckDB memory limit before spilling to disk.")

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
        return BatchStore(Path(self.batch_root) if self.batch_root else path.parent / f"{path.stem}-batches")

    @contextmanager
    def _open(self, path: str) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(path, config={"threads": self.threads, "memory_limit": self.memory_limit})
        try:
            yield con
        finally:
            con.close()
