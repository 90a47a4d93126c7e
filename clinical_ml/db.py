"""Small DuckDB helpers shared by the stages."""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import os
import re
import shutil
import socket
import tempfile
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
            # process on each host gets a folder of its own (DuckDB creates it and removes it on
            # close), so workers sharing the setting, on one machine or on a shared filesystem,
            # never write each other's blocks. Connections of one process to one file share a
            # folder (DuckDB requires the same config for them).
            Path(self.temp_directory).mkdir(parents=True, exist_ok=True)
            database = (f"mem{next(_SPILL_FOLDERS)}" if _in_memory(path) else
                        hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:12])
            config["temp_directory"] = str(Path(self.temp_directory) / f"{_HOST}-{os.getpid()}-{database}")
        return config


_SPILL_FOLDERS = itertools.count()
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]


def _in_memory(path) -> bool:
    return str(path) in ("", ":memory:") or str(path).startswith(":memory:")


# -- one writer per DuckDB file, across processes -----------------------------------------------
# DuckDB lets one process write a database file, and while it does no other process may even read
# it ("Could not set lock on file"). Steps that run in several processes (Dagster's multiprocess
# or Dask executor, parallel runs) take this lock first and wait for each other instead of failing:
# shared for read-only use, exclusive for writing, on ``<file>.lock`` beside the database.
# Within one process the lock is reentrant (DuckDB shares one database instance per process).
LOCK_TIMEOUT_S = float(os.environ.get("CLINICAL_DUCKDB_LOCK_TIMEOUT_S", "3600"))
_held: dict[str, list] = {}  # database realpath -> [lock file descriptor or None, holders, shared]
_held_guard = threading.Lock()
_acquiring: dict[str, threading.Lock] = {}  # one thread at a time takes a file's lock


class DatabaseBusy(TimeoutError):
    pass


@contextmanager
def database_lock(path, shared: bool, timeout_s: Optional[float] = None) -> Iterator[None]:
    """Hold the cross-process lock of the DuckDB file ``path`` (none for an in-memory database)."""
    if _in_memory(path):
        yield
        return
    key = os.path.realpath(path)
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    with _held_guard:
        acquiring = _acquiring.setdefault(key, threading.Lock())
    with acquiring:  # threads of this process: the first takes the file lock, the others count on it
        with _held_guard:
            entry = _held.get(key)
            if entry:
                if entry[2] and not shared:
                    raise RuntimeError(f"{Path(key).name} is open read-only in this process: it cannot also be "
                                       "opened for writing (DuckDB refuses it too)")
                entry[1] += 1
        if not entry:
            _held_entry = [_take_file_lock(key, shared, timeout_s), 1, shared]
            with _held_guard:
                _held[key] = _held_entry
    try:
        yield
    finally:
        with _held_guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                if entry[0] is not None:
                    fcntl.flock(entry[0], fcntl.LOCK_UN)
                    os.close(entry[0])


def _take_file_lock(key: str, shared: bool, timeout_s: float) -> Optional[int]:
    """The descriptor of ``<key>.lock`` locked shared or exclusive, waiting up to ``timeout_s``.
    A reader in a folder it may not write to takes no lock (DuckDB's own lock still applies)."""
    if not shared:
        Path(key).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(key + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        if shared:
            return None
        raise
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DatabaseBusy(f"{Path(key).name} stayed in use by another process for {timeout_s:.0f} s"
                                       ) from None
                time.sleep(0.1)
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def open_database(path: str = ":memory:", settings: Optional["DuckDBSettings"] = None,
                  read_only: bool = False, lock_timeout_s: Optional[float] = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to ``path`` under ``settings``, holding the file's lock while it is open."""
    with database_lock(path, shared=read_only, timeout_s=lock_timeout_s):
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


# Rows per row group of a scratch catalog. DuckDB gives each row group (default 122,880 rows) one
# thread, and TEMP tables always have the default: a working table smaller than that, as every
# scrub bucket is, was processed by one thread whatever `threads` says.
SCRATCH_ROW_GROUP_SIZE = 8_192


_SCRATCH_ALIASES = itertools.count()


@contextmanager
def scratch_catalog(con: duckdb.DuckDBPyConnection, name: str) -> Iterator[str]:
    """A throwaway catalog for working tables, attached for the ``with`` block (it yields the
    catalog's alias, ``name`` plus a number), whose small row groups let DuckDB run a statement
    on a small table with all its threads. For a file-backed connection it is a DuckDB file in
    a private folder (0700) made beside the connection's own file, since the working tables may
    hold PHI; the folder is removed after the block even if it fails, and a folder that a killed
    process of this host left behind is removed the next time. For an in-memory connection, an
    in-memory catalog."""
    alias = quote_ident(f"{name}_{next(_SCRATCH_ALIASES)}")
    path = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()[0]
    folder = None
    if path:
        base = Path(path)
        _remove_abandoned_scratch(base)
        folder = Path(tempfile.mkdtemp(prefix=f"{base.name}.scratch-{_HOST}-{os.getpid()}-", dir=base.parent))
        con.execute(f"ATTACH {quote_path(folder / 'scratch.duckdb')} AS {alias} "
                    f"(ROW_GROUP_SIZE {SCRATCH_ROW_GROUP_SIZE})")
    else:
        con.execute(f"ATTACH ':memory:' AS {alias}")
    try:
        yield alias.strip('"')
    except BaseException:
        _drop_scratch(con, alias, folder, quiet=True)  # the error that got us here is the one to see
        raise
    _drop_scratch(con, alias, folder, quiet=False)


def _drop_scratch(con: duckdb.DuckDBPyConnection, alias: str, folder: Optional[Path], quiet: bool) -> None:
    try:
        con.execute(f"DETACH {alias}")
    except duckdb.Error:
        if not quiet:
            raise
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _remove_abandoned_scratch(base: Path) -> None:
    pattern = re.compile(rf"{re.escape(base.name)}\.scratch-{re.escape(_HOST)}-(\d+)-")
    for folder in base.parent.glob(f"{base.name}.scratch-*"):
        match = pattern.match(folder.name)
        if match and not _process_alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sliced_scan_sql(con: duckdb.DuckDBPyConnection, table: str, key: str = "id") -> str:
    """SQL for ``table`` (quoted; a table or a view) read as one UNION ALL branch per DuckDB
    thread, each taking the rows of one hash slice of ``key``. DuckDB gives a table one thread
    per row group (122,880 rows), so a smaller table with heavy work per row (100k patients'
    JSON is one row group) runs on one thread; the branches of a UNION ALL run at once. Row
    order is not kept."""
    threads = int(con.execute("SELECT current_setting('threads')").fetchone()[0])
    if threads < 2:
        return table
    return "(" + " UNION ALL ".join(
        f"SELECT * FROM {table} WHERE hash({key}) % {threads}::UBIGINT = {i}::UBIGINT" for i in range(threads)) + ")"


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
    """Whether ``schema.table`` names a table or a view (something to read)."""
    return con.execute("SELECT count(*) FROM (SELECT schema_name, table_name FROM duckdb_tables() UNION ALL "
                       "SELECT schema_name, view_name FROM duckdb_views()) WHERE schema_name = ? AND table_name = ?",
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
