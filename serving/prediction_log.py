"""The prediction log and clinician feedback: append-only, PHI-free NDJSON files.

    <log_dir>/predictions/<YYYY-MM-DD>/<HH>-<pid>.ndjson
    <log_dir>/feedback/<YYYY-MM-DD>/<HH>-<pid>.ndjson

One file per hour and worker process, each record one ``write`` on an O_APPEND descriptor: no
lock shared with the warehouse (DuckDB's single writer never blocks a prediction), no record
torn between workers, and any reader (DuckDB's ``read_ndjson``, a Dagster asset, ``jq``) sees
whole lines. Records hold the pseudonymous patient key, hashes and numbers, never identifiers
or feature values.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import orjson

RECENT = 100_000  # prediction ids answered without a file scan (feedback usually comes soon)


class AppendLog:
    def __init__(self, root: Path, kind: str):
        self.root = Path(root) / kind
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._hour: str | None = None

    def _descriptor(self, now: datetime) -> int:
        hour = now.strftime("%Y-%m-%d/%H")
        if hour != self._hour or self._fd is None:
            if self._fd is not None:
                os.close(self._fd)
            path = self.root / f"{hour}-{os.getpid()}.ndjson"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._hour = hour
        return self._fd

    def append(self, records: list[dict]) -> None:
        now = datetime.now(timezone.utc)
        data = b"".join(orjson.dumps(r) + b"\n" for r in records)
        with self._lock:
            os.write(self._descriptor(now), data)

    def writable(self) -> bool:
        try:
            with self._lock:
                self._descriptor(datetime.now(timezone.utc))
            return os.access(self.root, os.W_OK)
        except OSError:
            return False

    def glob(self) -> str:
        return str(self.root / "*" / "*.ndjson")

    def has_files(self) -> bool:
        return self.root.is_dir() and any(self.root.glob("*/*.ndjson"))

    def find(self, column: str, value: str) -> list[dict]:
        """Records whose ``column`` equals ``value`` (a scan of every file: for traces and
        feedback on old predictions, not for the hot path)."""
        if not self.has_files():
            return []
        con = duckdb.connect(":memory:")
        try:
            # JSON objects, not inferred columns: an empty (just opened) file or an older record
            # shape must not change what a lookup can see
            rel = con.execute("SELECT json::VARCHAR FROM read_ndjson_objects(?) WHERE json_extract_string(json, ?) = ?",
                              [self.glob(), f"$.{column}", value])
            return [orjson.loads(row[0]) for row in rel.fetchall()]
        finally:
            con.close()


class PredictionLog:
    def __init__(self, log_dir: Path):
        self.predictions = AppendLog(log_dir, "predictions")
        self.feedback = AppendLog(log_dir, "feedback")
        self._recent: OrderedDict[str, dict] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, records: list[dict]) -> None:
        self.predictions.append(records)
        served = next(r for r in records if r["served"])
        with self._lock:
            self._recent[served["prediction_id"]] = served
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)

    def served_record(self, prediction_id: str) -> dict | None:
        with self._lock:
            if prediction_id in self._recent:
                return self._recent[prediction_id]
        return next((r for r in self.predictions.find("prediction_id", prediction_id) if r.get("served")), None)

    def records(self, prediction_id: str) -> list[dict]:
        return self.predictions.find("prediction_id", prediction_id)

    def add_feedback(self, record: dict) -> None:
        self.feedback.append([record])

    def feedback_for(self, prediction_id: str) -> list[dict]:
        return self.feedback.find("prediction_id", prediction_id)
