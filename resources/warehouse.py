from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import duckdb
from dagster import ConfigurableResource
from pydantic import Field

from resources.settings import default_warehouse_path


class DuckDBWarehouse(ConfigurableResource):
    """The DuckDB file every asset reads and writes (schemas: raw, deid, features, ml,
    monitoring, audit). DuckDB allows one writer per file, so jobs run in-process."""

    path: str = Field(default_factory=default_warehouse_path, description="DuckDB database file (CLINICAL_WAREHOUSE).")
    threads: int = Field(default=2, description="DuckDB worker threads.")
    memory_limit: str = Field(default="8GB", description="DuckDB memory limit before spilling to disk.")

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(self.path, config={"threads": self.threads, "memory_limit": self.memory_limit})
        try:
            yield con
        finally:
            con.close()
