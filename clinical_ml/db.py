"""Small DuckDB helpers shared by the stages."""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import duckdb


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
