from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.audit import AuditRecord, append_record, verify_chain
from resources.warehouse import DuckDBWarehouse


class AuditStore(ConfigurableResource):
    """Append-only, hash-chained audit log (table audit.audit_log in the warehouse)."""

    warehouse: DuckDBWarehouse = Field(default_factory=DuckDBWarehouse)

    def append(self, body: dict) -> AuditRecord:
        with self.warehouse.connect() as con:
            return append_record(con, body)

    def verify(self) -> tuple[bool, int | None]:
        with self.warehouse.connect() as con:
            return verify_chain(con)
