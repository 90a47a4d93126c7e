"""Small DuckDB helpers shared by the stages."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import threading
import time
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

    def config(self, path: str = ":memory:") -> dict:
        config = {"threads": self.threads, "memory_limit": self.memory_limit}
        if self.temp_directory:
            # DuckDB names its spill files the same in every database: each database of each
            # process gets a folder of its own (DuckDB creates it and removes it on close), so
            # parallel workers sharing the setting never write each other's blocks. Connections
            # of one process to one file share a folder (DuckDB requires the same config).
            Path(self.temp_directory).mkdir(parents=True, exist_ok=True)
            database = (f"mem{next(_SPILL_FOLDERS)}" if path == ":memory:" else
                        hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:12])
            config["temp_directory"] = str(Path(self.temp_directory) / f"{os.getpid()}-{database}")
        return config


_SPILL_FOLDERS = itertools.count()


# -- one writer per DuckDB file, across processes -----------------------------------------------
# DuckDB lets one process write a database file, and while it does no other process may even read
# it ("Could not set lock on file"). Steps that run in several processes (Dagster's multiprocess
# or Dask executor, parallel runs) take this lock first and wait for each other instead of failing:
# shared for read-only use, exclusive for writing, on ``<file>.lock`` beside the database.
# Within one process the lock is reentrant (DuckDB shares one database instance per process).
LOCK_TIMEOUT_S = float(os.environ.get("CLINICAL_DUCKDB_LOCK_TIMEOUT_S", "3600"))
_held: dict[str, list] = {}  # database realpath -> [lock file descriptor, holders]
_held_guard = threading.Lock()


class DatabaseBusy(TimeoutError):
    pass


@contextmanager
def database_lock(path, shared: bool, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Hold the cross-process lock of the DuckDB file ``path`` (none for ``:memory:``)."""
    if str(path) == ":memory:":
        yield
        return
    key = os.path.realpath(path)
    with _held_guard:
        entry = _held.get(key)
        if entry:
            entry[1] += 1
    if not entry:
        Path(key).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise DatabaseBusy(f"{Path(key).name} stayed in use by another process for "
                                       f"{LOCK_TIMEOUT_S if timeout_s is None else timeout_s:.0f} s") from None
                time.sleep(0.1)
        with _held_guard:
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                fcntl.flock(entry[0], fcntl.LOCK_UN)
                os.close(entry[0])


@contextmanager
def open_database(path: str = ":memory:", settings: Optional["DuckDBSettings"] = None,
                  read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to ``path`` under ``settings``, holding the file's lock while it is open."""
    with database_lock(path, shared=read_only):
        con = connect(path, settings, read_only=read_only)
        try:
            yield con
        finally:
            con.close()


def attach_read_only(con: duckdb.DuckDBPyConnection, path, alias: str, locks) -> None:
    """ATTACH ``path`` read-only as ``alias``; its shared lock is held by ``locks`` (an ExitStack
    the caller closes after the connection)."""
    locks.enter_context(database_lock(path, shared=True))
    con.execute(f"ATTACH {quote_path(path)} AS {quote_ident(alias)} (READ_ONLY)")


def connect(path: str = ":memory:", settings: Optional[DuckDBSettings] = None,
            read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection under ``settings`` (threads, memory limit, spill folder)."""
    return duckdb.connect(path, read_only=read_only, config=(settings or DuckDBSettings()).config(str(path)))


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


def table_fingerprints(con: duckdb.DuckDBPyConnection, schemas: list[str],
                       exclude_columns: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``schema.table`` -> (rows, order-independent hash of all rows) for the tables of ``schemas``,
    leaving out ``exclude_columns`` (a run's own stamps: landing ids, check times): two runs that
    wrote the same data compare equal whatever order they wrote it in."""
    columns = con.execute(
        "SELECT schema_name, table_name, list(column_name ORDER BY column_index) FROM duckdb_columns() "
        "WHERE schema_name IN (SELECT unnest($schemas)) AND NOT list_contains($exclude, column_name) "
        "AND (schema_name, table_name) IN (SELECT (schema_name, table_name) FROM duckdb_tables()) "
        "GROUP BY ALL ORDER BY ALL", {"schemas": schemas, "exclude": list(exclude_columns)}).fetchall()
    fingerprints = {}
    for schema, table, names in columns:
        row = ", ".join(quote_ident(n) for n in names)
        rows, digest = con.execute(f"SELECT count(*), coalesce(sum(hash(row({row}))), 0) FROM "
                                   f"{quote_ident(schema)}.{quote_ident(table)}").fetchone()
        fingerprints[f"{schema}.{table}"] = (rows, int(digest))
    return fingerprints
