"""Small DuckDB helpers shared by the stages."""

from __future__ import annotations

import itertools
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import duckdb


@dataclass(frozen=True)
class DuckDBSettings:
    """How much of the machine one DuckDB connection may take. Past ``memory_limit`` DuckDB
    spills joins, aggregates and sorts to ``temp_directory`` instead of failing with "Out of
    Memory" (its own default limit is 80% of RAM, per connection, and an in-memory database has
    nowhere to spill unless a folder is named)."""

    threads: int = 2
    memory_limit: str = "2GB"
    temp_directory: Optional[str] = None

    def config(self) -> dict:
        config = {"threads": self.threads, "memory_limit": self.memory_limit}
        if self.temp_directory:
            # DuckDB names its spill files the same in every database: each connection gets a
            # folder of its own (DuckDB creates it, and removes it when the connection closes),
            # so parallel workers sharing the setting never write each other's blocks.
            Path(self.temp_directory).mkdir(parents=True, exist_ok=True)
            config["temp_directory"] = str(Path(self.temp_directory) / f"{os.getpid()}-{next(_SPILL_FOLDERS)}")
        return config


_SPILL_FOLDERS = itertools.count()


def connect(path: str = ":memory:", settings: Optional[DuckDBSettings] = None,
            read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection under ``settings`` (threads, memory limit, spill folder)."""
    return duckdb.connect(path, read_only=read_only, config=(settings or DuckDBSettings()).config())


@contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """All statements inside commit together or not at all: a failed stage leaves the
    previous tables as they were."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def quote_ident(name: str) -> str:
    """A validated, double-quoted SQL identifier (schema, table or column name); anything that
    is not a plain identifier is refused rather than escaped."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise ValueError(f"not a valid SQL identifier: {name!r}")
    return f'"{name}"'


def quote_path(path) -> str:
    """A file path as a SQL string literal, for statements that take no bound parameters (ATTACH)."""
    text = str(path)
    if "\x00" in text:
        raise ValueError("a path with a NUL byte")
    return "'" + text.replace("'", "''") + "'"


def table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    return con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = ? AND table_name = ?",
                       [schema, table]).fetchone()[0] > 0
