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


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_retry_after_is_ignored(value):
    assert parse_retry_after(value, now=NOW) is None


class _FakeAuth:
    def __init__(self):
        self.refreshes = 0

    def discover(self, http, base_url):
        pass

    def token(self, http, force_refresh=False):
        self.refreshes += force_refresh
        return f"token-{self.refreshes}"


def _client(statuses, body=b""):
    import httpx

    from clinical_ml.bulk_client import BulkDataClient

    replies = iter(statuses)
    client = BulkDataClient("http://fhir.test", auth=_FakeAuth(), max_retries=1, sleep=lambda s: None)
    client.http = httpx.Client(transport=httpx.MockTransport(lambda request: httpx.Response(next(replies), content=body)))
    return client


def test_a_401_on_the_last_attempt_refreshes_the_token_and_retries():
    client = _client([503, 401, 200])
    assert client.request("GET", "http://fhir.test/x").status_code == 200
    assert client.auth.refreshes == 1


def test_a_persistent_401_is_a_clear_error_with_the_server_text_on_one_capped_line():
    from clinical_ml.bulk_client import BulkDataError

    body = b'{"resourceType": "OperationOutcome", "issue": [{"diagnostics": "token revoked\\n\\x1b[31m' + b"x" * 2000 + b'"}]}'
    with pytest.raises(BulkDataError) as err:
        _client([401, 401], body).request("GET", "http://fhir.test/x")
    assert err.value.status_code == 401
    message = str(err.value)
    assert "token revoked" in message and "\n" not in message and "\x1b" not in message and len(message) < 600


def test_the_token_endpoint_is_retried_when_busy_and_its_refusal_never_shows_the_assertion():
    import httpx
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from clinical_ml.bulk_client import BulkDataError, SmartBackendAuth

    pem = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    auth = SmartBackendAuth("client-1", pem, token_url="http://fhir.test/token")
    waits = []
    auth.sleep = waits.append
    replies = iter([httpx.Response(503, headers={"Retry-After": "3"}), httpx.Response(429),
                    httpx.Response(200, json={"access_token": "abc", "expires_in": 300})])
    http = httpx.Client(transport=httpx.MockTransport(lambda request: next(replies)))
    assert auth.token(http) == "abc" and waits == [3.0, 2.0]

    sent = []

    def refuse(request):
        sent.append(request.content.decode())
        return httpx.Response(400, json={"error": "invalid_client", "error_description": "unknown key"})

    with pytest.raises(BulkDataError, match="invalid_client") as err:
        auth.token(httpx.Client(transport=httpx.MockTransport(refuse)), force_refresh=True)
    assertion = sent[0].split("client_assertion=")[1].split("&")[0]
    assert assertion and assertion not in str(err.value)
