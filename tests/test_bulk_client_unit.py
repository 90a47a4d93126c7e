from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from clinical_ml.bulk_client import ExportRequest, parse_retry_after

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("value, expected", [
    ("5", 5.0), ("0", 1.0), ("-5", 1.0), ("86400", 120.0), ("2.5", 2.5),
    (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
    (format_datetime(NOW - timedelta(hours=1), usegmt=True), 1.0),   # a date in the past
    (format_datetime(NOW + timedelta(days=3), usegmt=True), 120.0),  # absurdly far
    ("soon", None), ("", None), (None, None),
])
def test_retry_after_is_parsed_and_clamped(value, expected):
    assert parse_retry_after(value, now=NOW, minimum=1.0, maximum=120.0) == expected


def test_export_request_levels_and_parameters():
    assert ExportRequest().path() == "$export"
    assert ExportRequest(level="patient").path() == "Patient/$export"
    assert ExportRequest(level="group", group_id="g1").path() == "Group/g1/$export"
    with pytest.raises(ValueError):
        ExportRequest(level="group").path()
    params = ExportRequest(types=("Patient", "Observation"), since="2026-01-01T00:00:00Z").params()
    assert params == {"_outputFormat": "application/fhir+ndjson", "_type": "Patient,Observation",
                      "_since": "2026-01-01T00:00:00Z"}
