from __future__ import annotations

import json
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.audit import AuditRecord, append_record, verify_chain
from resources.warehouse import DuckDBWarehouse


class AuditStore(ConfigurableResource):
    """Append-only, hash-chained audit log (table audit.audit_log in the warehouse). The head
    of the chain (last sequence and hash) is also written beside the warehouse, so cutting
    records off the end of the table is detected; in production, point ``head_path`` at
    write-once storage."""

    warehouse: DuckDBWarehouse = Field(default_factory=DuckDBWarehouse)
    head_path: str | None = Field(default=None, description="Chain head file; default <warehouse>.audit-head.json.")

    def _head_file(self) -> Path:
        return Path(self.head_path or f"{self.warehouse.path}.audit-head.json")

    def append(self, body: dict) -> AuditRecord:
        with self.warehouse.connect() as con:
            record = append_record(con, body)
        self._head_file().write_text(json.dumps({"sequence": record.sequence, "record_hash": record.record_hash}))
        return record

    def head(self) -> tuple[int, str] | None:
        path = self._head_file()
        if not path.exists():
            return None
        value = json.loads(path.read_text())
        return int(value["sequence"]), str(value["record_hash"])

    def verify(self) -> tuple[bool, int | None]:
        with self.warehouse.connect() as con:
            return verify_chain(con, self.head())
