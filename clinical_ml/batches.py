"""Data batches: each batch of FHIR data lands in its own DuckDB file, and training reads a window of them.

A batch is whatever arrived together: the initial export, a Bulk ``_since`` export, a new NDJSON
folder, the monitoring batch that tripped the drift check. Its file (``<root>/<key>.duckdb``)
holds that batch's ``raw``, ``deid`` and ``features`` schemas, made by the same landing,
de-identification and feature code as any other. Only that batch's step writes the file, so
batches can be processed in parallel (DuckDB allows one writer per file, not per warehouse);
everything downstream opens batch files read-only.

Keys sort in arrival order (``b0001-initial``, ``b0002-drifted`` ...). A batch's source (what it
lands) is kept beside it as ``<key>.source.json``.

Training window: patients are pseudonymous keys that are stable across batches (keyed HMAC), so
when a patient appears in several batches (successive full snapshots of one population) only the
newest batch's rows for that patient are used; disjoint batches simply add up. Landmarks older
than ``months`` before the newest landmark of the window can be left out.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional

import duckdb
import polars as pl

from clinical_ml.db import DuckDBSettings, attach_read_only, connect, open_database, quote_ident, table_exists
from clinical_ml.features import FeatureSpec, LandmarkPlan, read_feature_spec
from clinical_ml.ingest import add_patient_ids

BATCH_KEY = re.compile(r"b(\d{4,})-[a-z0-9][a-z0-9-]{0,40}")
SourceKind = Literal["configured", "synthetic", "directory"]


def check_batch_key(key: str) -> str:
    """Keys name files: only ``b<number>-<label>`` is accepted (no paths, no quoting games)."""
    if not isinstance(key, str) or not BATCH_KEY.fullmatch(key):
        raise ValueError(f"not a batch key (b<number>-<label>, lower case): {key!r}")
    return key


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "batch"


@dataclass(frozen=True)
class BatchSource:
    """What a batch lands. ``configured``: the platform's FHIR source (Bulk Data server, folder or
    generator, from the FhirSource settings) at the time the batch is processed."""

    kind: SourceKind = "configured"
    directory: Optional[str] = None
    synthetic_patients: Optional[int] = None
    synthetic_seed: Optional[int] = None
    drift: bool = False

    def describe(self) -> str:
        if self.kind == "directory":
            return f"directory {self.directory}"
        if self.kind == "synthetic":
            return (f"synthetic generator ({self.synthetic_patients} patients, seed {self.synthetic_seed}"
                    f"{', drifted' if self.drift else ''})")
        return "the configured FHIR source"


@dataclass
class BatchStore:
    """The folder of batch files, and the DuckDB settings of connections that read across them."""

    root: Path
    duckdb_settings: DuckDBSettings = field(default_factory=DuckDBSettings)

    def __post_init__(self):
        self.root = Path(self.root)

    def path(self, key: str) -> Path:
        return self.root / f"{check_batch_key(key)}.duckdb"

    def _source_path(self, key: str) -> Path:
        return self.root / f"{check_batch_key(key)}.source.json"

    def keys(self) -> list[str]:
        """Registered batches, oldest first."""
        if not self.root.is_dir():
            return []
        keys = [p.name.removesuffix(".source.json") for p in self.root.glob("*.source.json")]
        return sorted((k for k in keys if BATCH_KEY.fullmatch(k)), key=lambda k: int(BATCH_KEY.match(k).group(1)))

    def register(self, source: BatchSource, label: str) -> str:
        """A new batch key for ``source``. A synthetic or folder source that is already registered
        keeps its key (re-running the same set-up re-processes that batch, it does not duplicate
        it); the configured source always makes a new batch (a Bulk server has new data)."""
        if source.kind != "configured":
            for key in self.keys():
                if self.source(key) == source:
                    return key
        numbers = [int(BATCH_KEY.match(k).group(1)) for k in self.keys()]
        key = f"b{max(numbers, default=0) + 1:04d}-{_label(label)}"
        self.root.mkdir(parents=True, exist_ok=True)
        self._source_path(key).write_text(json.dumps(asdict(source), indent=1))
        return key

    def source(self, key: str) -> BatchSource:
        """The batch's registered source; a key nobody registered (a partition added in the UI)
        lands the configured source."""
        path = self._source_path(key)
        return BatchSource(**json.loads(path.read_text())) if path.exists() else BatchSource()

    def read(self, key: str) -> "read_only":
        """``with store.read(key) as con``: the batch's file, read-only, under the store's DuckDB settings."""
        return read_only(self.path(key), self.duckdb_settings)

    def featurized(self, keys: list[str] | None = None) -> list[str]:
        """Of ``keys`` (default: all), those whose file holds a feature matrix, oldest first."""
        ready = []
        for key in self.keys() if keys is None else keys:
            if self.path(key).exists():
                with self.read(key) as con:
                    if table_exists(con, "features", "feature_matrix"):
                        ready.append(key)
        return ready


class read_only:
    """``with read_only(path) as con``: a read-only connection to a DuckDB file (under its shared
    lock, with ``settings``; ``lock_timeout_s``: give up sooner than the default hour)."""

    def __init__(self, path: Path, settings: Optional[DuckDBSettings] = None, lock_timeout_s: Optional[float] = None):
        self.path, self.settings, self.lock_timeout_s = path, settings, lock_timeout_s

    def __enter__(self) -> duckdb.DuckDBPyConnection:
        self._opened = open_database(str(self.path), self.settings, read_only=True, lock_timeout_s=self.lock_timeout_s)
        return self._opened.__enter__()

    def __exit__(self, *exc):
        return self._opened.__exit__(*exc)


@dataclass(frozen=True)
class TrainingWindow:
    """Which landed data trains: the newest ``batches`` batches (None: all) and, within them,
    landmarks no older than ``months`` before the newest landmark (None: all)."""

    batches: Optional[int] = None
    months: Optional[int] = None

    def __post_init__(self):
        for name in ("batches", "months"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"training window {name} must be at least 1 (or unset for all)")


@dataclass
class WindowData:
    frame: pl.DataFrame            # the training rows, with a ``batch_key`` column
    spec: FeatureSpec
    plan: LandmarkPlan             # landmarks of the window (union), span of the newest batch
    batches: list[str]
    facts: dict = field(default_factory=dict)  # what the window was: kept with the model

    def describe(self) -> str:
        landmarks = self.facts.get("landmarks") or []
        span = f"landmarks {landmarks[0]} to {landmarks[-1]}" if landmarks else "no landmarks"
        return f"{len(self.batches)} batch(es) {', '.join(self.batches)}; {span}"


def attach_batches(con: duckdb.DuckDBPyConnection, store: BatchStore, keys: list[str], locks: ExitStack) -> dict[str, str]:
    """Attach each batch file read-only to ``con`` (``locks`` holds their shared locks); returns
    key -> catalog alias."""
    aliases = {}
    for index, key in enumerate(keys):
        alias = f"batch_{index}"
        attach_read_only(con, store.path(key), alias, locks)
        aliases[key] = alias
    return aliases


def window_keys(store: BatchStore, window: TrainingWindow) -> list[str]:
    keys = store.featurized()
    if not keys:
        raise LookupError(f"no batch in {store.root} has a feature matrix yet: materialize feature_matrix for a "
                          "batch (partition) first")
    return keys[-window.batches:] if window.batches else keys


def read_window(store: BatchStore, keys: list[str], months: Optional[int] = None) -> WindowData:
    """The training rows of batches ``keys`` (oldest first): a patient's rows from the newest
    batch that has the patient, landmarks within ``months`` of the newest one. Every batch must
    have drawn its cohort with the same rules (horizon, lookback, ages)."""
    specs = {}
    con, locks = connect(settings=store.duckdb_settings), ExitStack()
    try:
        aliases = attach_batches(con, store, keys, locks)
        for key, alias in aliases.items():
            con.execute(f"USE {quote_ident(alias)}")
            specs[key] = read_feature_spec(con)
        con.execute("USE memory")
        rules = {k: (s.horizon_days, s.lookback_days, s.min_age) for k, (s, _) in specs.items()}
        if len(set(rules.values())) > 1:
            raise ValueError("the batches in the training window drew their cohorts with different rules "
                             f"(horizon, lookback, min age): {rules}; re-materialize their feature_matrix alike")
        union = " UNION ALL BY NAME ".join(
            f"SELECT *, ? AS batch_key, ? AS batch_order FROM {quote_ident(alias)}.features.feature_matrix"
            for alias in aliases.values())
        params = [v for order, key in enumerate(keys) for v in (key, order)]
        frame = _read_rows(con, union, params, months)
    finally:
        con.close()
        locks.close()
    spec, newest_plan = specs[keys[-1]]
    landmarks = tuple(sorted(set(frame["landmark_date"].to_list())))
    plan = LandmarkPlan(landmarks, min((p.data_start for _, p in specs.values() if p.data_start), default=None),
                        newest_plan.data_end, newest_plan.derived)
    facts = {
        "batches": keys,
        "months": months,
        "landmarks": [d.isoformat() for d in landmarks],
        "rows": frame.height,
        "patients": frame["patient_key"].n_unique(),
        "rows_by_batch": dict(frame.group_by("batch_key").len().sort("batch_key").iter_rows()),
    }
    return WindowData(frame, spec, plan, keys, facts)


def _read_rows(con: duckdb.DuckDBPyConnection, union: str, params: list, months: Optional[int]) -> pl.DataFrame:
    cutoff = "" if months is None else "WHERE landmark_date >= (SELECT max(landmark_date) FROM kept) - to_months(?)"
    return con.execute(f"""
        WITH rows AS ({union}),
        newest AS (SELECT patient_key, max(batch_order) AS batch_order FROM rows GROUP BY patient_key),
        kept AS (SELECT rows.* FROM rows JOIN newest USING (patient_key, batch_order))
        SELECT * EXCLUDE (batch_order) FROM kept {cutoff}
        ORDER BY patient_key, landmark_date""", params + ([] if months is None else [int(months)])).pl()


def read_training_window(store: BatchStore, window: TrainingWindow) -> WindowData:
    return read_window(store, window_keys(store, window), window.months)


def previous_landed(store: BatchStore, key: str) -> str | None:
    """The newest batch before ``key`` whose file holds landed raw tables."""
    keys = store.keys()
    earlier = keys[:keys.index(key)] if key in keys else keys
    for candidate in reversed(earlier):
        if store.path(candidate).exists():
            with store.read(candidate) as con:
                if table_exists(con, "raw", "patient"):
                    return candidate
    return None


def seed_raw_from(con: duckdb.DuckDBPyConnection, store: BatchStore, previous: str) -> int:
    """Copy the raw tables of batch ``previous`` into ``con``'s batch: an incremental (``_since``)
    export is merged onto the population as it stood, so that every batch is a whole snapshot
    (features need each patient's full history). Returns the number of tables copied."""
    locks = ExitStack()
    try:
        attach_read_only(con, store.path(previous), "previous_batch", locks)
        tables = [t for (t,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'previous_batch' AND schema_name = 'raw'"
        ).fetchall()]
        con.execute("CREATE SCHEMA IF NOT EXISTS raw")
        for table in tables:
            con.execute(f"CREATE OR REPLACE TABLE raw.{quote_ident(table)} AS "
                        f"SELECT * FROM previous_batch.raw.{quote_ident(table)}")
        add_patient_ids(con, "raw")  # a batch landed before the column existed
    finally:
        con.execute("DETACH DATABASE IF EXISTS previous_batch")
        locks.close()
    return len(tables)


def model_window(store: BatchStore, training_window: dict | None) -> WindowData:
    """The rows a stored model trained on (its recorded window), read again from the batch files."""
    if not training_window or not training_window.get("batches"):
        raise LookupError("the model records no training window (trained before data batches): retrain it")
    missing = [k for k in training_window["batches"] if not store.path(k).exists()]
    if missing:
        raise LookupError(f"batches the model trained on are gone from {store.root}: {missing}")
    return read_window(store, list(training_window["batches"]), training_window.get("months"))


IDENTITY_TABLES = ("patient", "practitioner", "related_person")  # the raw tables identifiers are read from


def downstream_identifier_leaks(store: BatchStore, warehouse_path: str | Path, tables: list[str], key: bytes,
                                aggregate: bool = False) -> list[dict]:
    """The leak scan of warehouse tables (``ml.models`` ...) against the identifiers of every
    landed batch: an in-memory connection sees the batches' identity tables as one ``raw``
    schema and the warehouse tables under their own names, all attached read-only. ``aggregate``:
    see ``find_identifier_leaks``."""
    from clinical_ml.deid import find_identifier_leaks

    keys = [k for k in store.keys() if store.path(k).exists()]
    con, locks = connect(settings=store.duckdb_settings), ExitStack()
    try:
        aliases = attach_batches(con, store, keys, locks)
        attach_read_only(con, warehouse_path, "warehouse", locks)
        con.execute("CREATE SCHEMA raw")
        for table in IDENTITY_TABLES:
            sources = [a for a in aliases.values() if con.execute(
                "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'raw' "
                "AND table_name = ?", [a, table]).fetchone()[0]]
            if sources:
                con.execute(f"CREATE VIEW raw.{quote_ident(table)} AS " + " UNION ALL ".join(
                    f"SELECT id, resource FROM {quote_ident(a)}.raw.{quote_ident(table)}" for a in sources))
        present = []
        for table in tables:
            schema, name = table.split(".")
            if con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'warehouse' AND "
                           "schema_name = ? AND table_name = ?", [schema, name]).fetchone()[0]:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}")
                con.execute(f"CREATE VIEW {quote_ident(schema)}.{quote_ident(name)} AS "
                            f"SELECT * FROM warehouse.{quote_ident(schema)}.{quote_ident(name)}")
                present.append(table)
        if "patient" not in {t for (t,) in con.execute("SELECT view_name FROM duckdb_views() WHERE schema_name = 'raw'").fetchall()}:
            return []  # nothing landed: no identifiers to look for
        return find_identifier_leaks(con, present, key, aggregate=aggregate)
    finally:
        con.close()
        locks.close()
