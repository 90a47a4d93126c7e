"""The Bulk Data test server: export flow, filters, validation, faults, gzip and SMART auth."""

from __future__ import annotations

import gzip
import http.client
import select
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bulk_data_server import BulkDataServer, ServerFaults
from clinical_ml.bulk_client import jwk_thumbprint, jwks_document, public_jwk
from tests.conftest import shared_sample

KICKOFF_HEADERS = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
N_PATIENTS = 8


@pytest.fixture
def server():
    with BulkDataServer.from_synthetic(n_patients=N_PATIENTS, seed=3) as running:
        yield running


@pytest.fixture(scope="module")
def client():
    # One client for the module: building an httpx.Client loads CA certificates (~0.1 s).
    with httpx.Client(timeout=10) as http:
        yield http


def kickoff(client: httpx.Client, server: BulkDataServer, path: str = "/$export", *,
            headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
    return client.get(server.base_url + path, params=params, headers=KICKOFF_HEADERS if headers is None else headers)


def finish(client: httpx.Client, status_url: str, headers: dict[str, str] | None = None) -> dict:
    """Poll a status URL (ignoring Retry-After: the tests know the server) until the manifest."""
    for _ in range(10):
        response = client.get(status_url, headers=headers)
        if response.status_code == 200:
            return response.json()
        assert response.status_code == 202
    raise AssertionError("export never completed")


def export(client: httpx.Client, server: BulkDataServer, path: str = "/$export", **params: str) -> dict:
    response = kickoff(client, server, path, **params)
    assert response.status_code == 202, response.text
    return finish(client, response.headers["Content-Location"])


def ndjson(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [orjson.loads(line) for line in response.content.splitlines()]


def assert_outcome(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["diagnostics"]


# -- the export flow --------------------------------------------------------------------------


def test_export_round_trip_serves_every_resource_of_the_store(server, client):
    response = kickoff(client, server)
    assert response.status_code == 202
    status_url = response.headers["Content-Location"]
    assert status_url.startswith(server.base_url + "/status/")

    polled = client.get(status_url)
    assert polled.status_code == 202
    assert polled.headers["X-Progress"] == "50% complete" and polled.headers["Retry-After"] == "1"
    manifest = finish(client, status_url)

    assert manifest["request"] == server.base_url + "/$export"
    assert manifest["requiresAccessToken"] is False
    assert manifest["error"] == [] and "deleted" not in manifest
    datetime.fromisoformat(manifest["transactionTime"])
    store = server.store.counts()
    assert {o["type"]: o["count"] for o in manifest["output"]} == store
    assert store["Patient"] == N_PATIENTS
    for output in manifest["output"]:
        download = client.get(output["url"])
        assert download.headers["Content-Type"] == "application/fhir+ndjson"
        resources = ndjson(download)
        assert len(resources) == output["count"]
        assert {r["resourceType"] for r in resources} == {output["type"]}
        assert {r["id"] for r in resources} == set(server.store.resources[output["type"]])
        assert all(r["meta"]["lastUpdated"] for r in resources)


@pytest.mark.parametrize("path", ["/Patient/$export", "/Group/any-group/$export"])
def test_patient_and_group_level_exports(server, client, path):
    manifest = export(client, server, path)
    assert manifest["request"] == server.base_url + path
    assert {o["type"]: o["count"] for o in manifest["output"]} == server.store.counts()


def test_unknown_group_is_404(server, client):
    assert_outcome(kickoff(client, server, "/Group/unknown/$export"), 404)


def test_a_large_type_is_split_into_numbered_files(client):
    with BulkDataServer.from_synthetic(n_patients=N_PATIENTS, seed=3, max_lines_per_file=200) as server:
        manifest = export(client, server, _type="Observation")
        observations = server.store.counts()["Observation"]
        assert observations > 400  # so the split below is into at least three files
        names = [urlsplit(o["url"]).path.rsplit("/", 1)[1] for o in manifest["output"]]
        assert names == [f"Observation.{i:03d}.ndjson" for i in range(len(names))]
        assert [o["count"] for o in manifest["output"]][:-1] == [200] * (len(names) - 1)
        ids = [r["id"] for o in manifest["output"] for r in ndjson(client.get(o["url"]))]
        assert len(ids) == len(set(ids)) == observations


def test_type_and_since_filters_and_the_deleted_bundle(server, client):
    manifest = export(client, server, _type="Patient,Condition")
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Condition"}

    # after everything loaded; whole seconds, as served instants carry milliseconds only
    since = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(hours=1)
    patient = next(r for r, _ in server.store.resources["Patient"].values())
    condition_id = next(iter(server.store.resources["Condition"]))
    server.store.upsert({**patient, "gender": "other"}, since + timedelta(minutes=1))
    server.store.delete("Condition", condition_id, since + timedelta(minutes=2))
    server.store.delete("Encounter", next(iter(server.store.resources["Encounter"])), since - timedelta(minutes=1))

    # "+00:00" sent percent-encoded by httpx, as a client should
    manifest = export(client, server, _type="Patient,Condition,Encounter", _since=since.isoformat())
    (output,) = manifest["output"]
    (changed,) = ndjson(client.get(output["url"]))
    assert (output["type"], output["count"]) == ("Patient", 1)
    assert changed["id"] == patient["id"] and changed["gender"] == "other"
    assert datetime.fromisoformat(changed["meta"]["lastUpdated"]) == since + timedelta(minutes=1)
    (deleted,) = manifest["deleted"]
    (bundle,) = ndjson(client.get(deleted["url"]))
    assert deleted["type"] == "Bundle" and bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
    assert bundle["entry"] == [{"request": {"method": "DELETE", "url": f"Condition/{condition_id}"}}]

    # _type narrows deletions too; without _since there is no deleted array at all
    assert "deleted" not in export(client, server, _type="Patient", _since=since.isoformat())
    assert "deleted" not in export(client, server, _type="Condition")


@pytest.mark.parametrize("output_format", ["application/fhir+ndjson", "application/ndjson", "ndjson"])
def test_ndjson_output_formats_are_accepted(server, client, output_format):
    assert kickoff(client, server, _outputFormat=output_format).status_code == 202


@pytest.mark.parametrize(("headers", "params"), [
    pytest.param({"Accept": "application/fhir+json"}, {}, id="no-prefer"),
    pytest.param({"Prefer": "respond-async"}, {}, id="no-accept"),
    pytest.param(KICKOFF_HEADERS, {"_outputFormat": "application/json"}, id="bad-output-format"),
    pytest.param(KICKOFF_HEADERS, {"_since": "yesterday"}, id="since-not-an-instant"),
    pytest.param(KICKOFF_HEADERS, {"_since": "2024-01-01T00:00:00"}, id="since-without-time-zone"),
    pytest.param(KICKOFF_HEADERS, {"_type": "Patient,not-a-type"}, id="bad-type"),
])
def test_invalid_kickoffs_get_400_with_an_operation_outcome(server, client, headers, params):
    assert_outcome(kickoff(client, server, headers=headers, **params), 400)
    assert not any(path.startswith("/fhir/status") for _, path, _ in server.requests)


def test_cancelled_and_unknown_jobs_are_404(server, client):
    status_url = kickoff(client, server).headers["Content-Location"]
    manifest = finish(client, status_url)
    assert client.delete(status_url).status_code == 202
    assert status_url.rsplit("/", 1)[1] in server.cancelled_jobs
    assert_outcome(client.get(status_url), 404)
    assert_outcome(client.get(manifest["output"][0]["url"]), 404)
    assert_outcome(client.delete(status_url), 404)
    assert_outcome(client.get(server.base_url + "/status/no-such-job"), 404)


def test_error_file_is_listed_and_served(client):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, error_file=True) as server:
        manifest = export(client, server)
        (error,) = manifest["error"]
        assert error["type"] == "OperationOutcome"
        (outcome,) = ndjson(client.get(error["url"]))
        assert outcome["resourceType"] == "OperationOutcome"


def test_polls_before_complete_sets_the_number_of_202s(client):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, polls_before_complete=3) as server:
        status_url = kickoff(client, server).headers["Content-Location"]
        progress = [client.get(status_url).headers.get("X-Progress") for _ in range(3)]
        assert progress == ["25% complete", "50% complete", "75% complete"]
        assert client.get(status_url).status_code == 200


# -- gzip -------------------------------------------------------------------------------------


def test_gzip_download_decodes_to_the_same_bytes(server, client):
    url = export(client, server, _type="Patient")["output"][0]["url"]
    identity = client.get(url, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in identity.headers
    with client.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as compressed:
        raw = b"".join(compressed.iter_raw())  # the bytes on the wire, not decoded
        assert compressed.headers["Content-Encoding"] == "gzip"
        assert int(compressed.headers["Content-Length"]) == len(raw) < len(identity.content)
    assert gzip.decompress(raw) == identity.content


def test_gzip_can_be_switched_off(client):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, gzip=False) as server:
        url = export(client, server, _type="Patient")["output"][0]["url"]
        assert "Content-Encoding" not in client.get(url, headers={"Accept-Encoding": "gzip"}).headers


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", [None, "1", "Wed, 21 Oct 2015 07:28:00 GMT", "0", "-5", "86400"])
def test_kickoff_429_fires_n_times_with_the_retry_after_given(server, client, retry_after):
    server.faults.kickoff_429 = 2
    server.faults.retry_after = retry_after
    statuses = []
    for _ in range(3):
        response = kickoff(client, server)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["Retry-After"] == (retry_after or "1")
    assert statuses == [429, 429, 202]
    assert server.faults.kickoff_429 == 0


def test_status_429_and_503_fire_n_times(server, client):
    status_url = kickoff(client, server).headers["Content-Location"]
    server.faults = ServerFaults(status_429=2, status_500=1, retry_after="7")
    responses = [client.get(status_url) for _ in range(5)]
    assert [r.status_code for r in responses] == [429, 429, 503, 202, 200]
    assert [r.headers["Retry-After"] for r in responses[:4]] == ["7"] * 4
    assert (server.faults.status_429, server.faults.status_500) == (0, 0)


def test_file_500_fires_n_times_for_that_file_only(server, client):
    manifest = export(client, server, _type="Patient,Condition")
    urls = {o["type"]: o["url"] for o in manifest["output"]}
    server.faults.file_500 = {"Patient.000.ndjson": 2}
    assert_outcome(client.get(urls["Patient"]), 500)
    assert client.get(urls["Condition"]).status_code == 200
    assert_outcome(client.get(urls["Patient"]), 500)
    assert len(ndjson(client.get(urls["Patient"]))) == N_PATIENTS
    assert server.faults.file_500 == {"Patient.000.ndjson": 0}


def test_dropped_download_is_an_incomplete_read_then_recovers(server, client):
    url = export(client, server, _type="Condition")["output"][0]["url"]
    server.faults.drop_mid_download = {"Condition.000.ndjson": 1}
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        assert response.status == 200
        with pytest.raises(http.client.IncompleteRead) as incomplete:
            response.read()
        expected = int(response.headers["Content-Length"])
        assert len(incomplete.value.partial) == expected // 2
    finally:
        connection.close()
    assert len(ndjson(client.get(url))) == server.store.counts()["Condition"]


def test_dropped_download_surfaces_as_a_protocol_error_in_httpx(server, client):
    url = export(client, server, _type="Patient")["output"][0]["url"]
    server.faults.drop_mid_download = {"Patient.000.ndjson": 1}
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(url, headers={"Accept-Encoding": "gzip"})
    assert len(ndjson(client.get(url))) == N_PATIENTS


def test_slow_seconds_delays_responses(server, client):
    server.faults.slow_seconds = 0.3
    started = time.monotonic()
    assert client.get(server.base_url + "/metadata").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_requests_are_recorded(server, client):
    client.get(server.base_url + "/metadata")
    client.get(server.base_url + "/nothing-here")
    assert server.requests == [("GET", "/fhir/metadata", 200), ("GET", "/fhir/nothing-here", 404)]


# -- SMART Backend Services -------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def kid_of(private_key) -> str:
    return jwk_thumbprint(public_jwk(private_key))


def assertion(private_key, server: BulkDataServer, client_id: str = "client-1", *, algorithm: str = "RS384",
              lifetime: int = 240, jti: str | None = None, headers: dict | None = None, **claims: str) -> str:
    """A client assertion as SMART Backend Services requires it: kid (the key's thumbprint, the
    client's default) and typ JWT in the header, unless ``headers`` says otherwise."""
    payload = {"iss": client_id, "sub": client_id, "aud": server.token_url,
               "exp": int(time.time()) + lifetime, "jti": jti or uuid.uuid4().hex, **claims}
    if headers is None:
        headers = {"typ": "JWT", "kid": kid_of(private_key)}
    return jwt.encode(payload, private_key, algorithm=algorithm, headers=headers)


def request_token(client: httpx.Client, server: BulkDataServer, client_assertion: str) -> httpx.Response:
    return client.post(server.token_url, data={
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": client_assertion,
        "scope": "system/*.read",
    })


@pytest.fixture
def auth_server(rsa_key):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, require_auth=True) as running:
        running.register_client("client-1", public_pem(rsa_key).decode())
        yield running


def test_smart_configuration_and_capability_statement(server, client):
    config = client.get(server.base_url + "/.well-known/smart-configuration").json()
    assert config["token_endpoint"] == server.token_url
    assert config["grant_types_supported"] == ["client_credentials"]
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert config["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert config["scopes_supported"] == ["system/*.read", "system/*.rs"]
    assert client.get(server.base_url + "/metadata").json()["resourceType"] == "CapabilityStatement"


def test_token_flow_guards_export_status_and_files(auth_server, client, rsa_key):
    server = auth_server
    assert_outcome(kickoff(client, server), 401)

    response = request_token(client, server, assertion(rsa_key, server))
    assert response.status_code == 200
    token = response.json()
    assert token["token_type"] == "bearer" and token["expires_in"] == 300 and token["scope"] == "system/*.read"
    bearer = {"Authorization": f"Bearer {token['access_token']}"}

    started = kickoff(client, server, headers={**KICKOFF_HEADERS, **bearer})
    assert started.status_code == 202
    status_url = started.headers["Content-Location"]
    assert_outcome(client.get(status_url), 401)
    manifest = finish(client, status_url, headers=bearer)
    assert manifest["requiresAccessToken"] is True
    url = manifest["output"][0]["url"]
    assert_outcome(client.get(url), 401)
    assert_outcome(client.get(url, headers={"Authorization": "Bearer not-a-token"}), 401)
    assert client.get(url, headers=bearer).status_code == 200

    server.expire_tokens()
    assert_outcome(client.get(url, headers=bearer), 401)
    assert_outcome(client.get(status_url, headers=bearer), 401)


def test_es384_assertions_are_accepted(auth_server, client):
    ec_key = ec.generate_private_key(ec.SECP384R1())
    auth_server.register_client("client-ec", public_pem(ec_key))
    response = request_token(client, auth_server, assertion(ec_key, auth_server, "client-ec", algorithm="ES384"))
    assert response.status_code == 200


def test_a_token_expires_after_its_ttl(client, rsa_key):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, require_auth=True, token_ttl_seconds=0) as server:
        server.register_client("client-1", public_pem(rsa_key))
        token = request_token(client, server, assertion(rsa_key, server)).json()["access_token"]
        assert_outcome(kickoff(client, server, headers={**KICKOFF_HEADERS, "Authorization": f"Bearer {token}"}), 401)


def test_files_can_be_open_while_kickoff_needs_a_token(client, rsa_key):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, require_auth=True,
                                       requires_access_token=False) as server:
        server.register_client("client-1", public_pem(rsa_key))
        bearer = {"Authorization": f"Bearer {request_token(client, server, assertion(rsa_key, server)).json()['access_token']}"}
        started = kickoff(client, server, headers={**KICKOFF_HEADERS, **bearer})
        manifest = finish(client, started.headers["Content-Location"], headers=bearer)
        assert manifest["requiresAccessToken"] is False
        assert client.get(manifest["output"][0]["url"]).status_code == 200


def test_a_reused_jti_is_rejected(auth_server, client, rsa_key):
    first = assertion(rsa_key, auth_server, jti="once")
    assert request_token(client, auth_server, first).status_code == 200
    replay = request_token(client, auth_server, assertion(rsa_key, auth_server, jti="once"))
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"


@pytest.mark.parametrize("make", [
    pytest.param(lambda key, server: assertion(key, server, aud="https://elsewhere.example/token"), id="wrong-aud"),
    pytest.param(lambda key, server: assertion(key, server, "client-2"), id="unregistered-client"),
    pytest.param(lambda key, server: assertion(key, server, sub="someone-else"), id="sub-not-iss"),
    pytest.param(lambda key, server: assertion(key, server, lifetime=3600), id="exp-too-far-ahead"),
    pytest.param(lambda key, server: assertion(key, server, lifetime=-60), id="expired"),
    pytest.param(lambda key, server: assertion(key, server, algorithm="RS256"), id="rs256"),
    pytest.param(lambda key, server: assertion(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                               server), id="other-key"),
    # signed by another key but naming the registered key's kid: the signature does not verify
    pytest.param(lambda key, server: assertion(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                                               server, headers={"typ": "JWT", "kid": kid_of(key)}),
                 id="other-key-registered-kid"),
    pytest.param(lambda key, server: jwt.encode({"iss": "client-1", "sub": "client-1", "aud": server.token_url,
                                                 "exp": int(time.time()) + 60, "jti": "x"},
                                                "a-shared-secret-that-is-long-enough-for-hmac-sha384", algorithm="HS384",
                                                headers={"typ": "JWT", "kid": kid_of(key)}),
                 id="hs384"),
    pytest.param(lambda key, server: "not.a.jwt", id="garbage"),
])
def test_bad_assertions_are_invalid_client(auth_server, client, rsa_key, make):
    response = request_token(client, auth_server, make(rsa_key, auth_server))
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client" and response.json()["error_description"]


def test_malformed_token_requests_are_400(auth_server, client, rsa_key):
    response = client.post(auth_server.token_url, data={"grant_type": "password"})
    assert response.status_code == 400 and response.json()["error"] == "unsupported_grant_type"
    response = client.post(auth_server.token_url, data={"grant_type": "client_credentials"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


# -- data sources and CLI ---------------------------------------------------------------------


def test_from_directory_keeps_or_stamps_last_updated(tmp_path, client):
    patients = [
        {"resourceType": "Patient", "id": "kept", "meta": {"lastUpdated": "2020-01-02T03:04:05.678+00:00"}},
        {"resourceType": "Patient", "id": "stamped"},
    ]
    (tmp_path / "Patient.000.ndjson").write_bytes(b"\n".join(orjson.dumps(p) for p in patients) + b"\n\n")
    (tmp_path / "Observation.ndjson").write_bytes(orjson.dumps({"resourceType": "Observation", "id": "o1"}))
    (tmp_path / "log.ndjson").write_text('{"exportId": "not a resource"}\n')
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    with BulkDataServer.from_directory(tmp_path) as server:
        assert server.store.counts() == {"Patient": 2, "Observation": 1}
        manifest = export(client, server, _type="Patient")
        served = {r["id"]: r for r in ndjson(client.get(manifest["output"][0]["url"]))}
    assert served["kept"]["meta"]["lastUpdated"] == "2020-01-02T03:04:05.678Z"
    assert datetime.fromisoformat(served["stamped"]["meta"]["lastUpdated"]) >= before


def test_shared_sample_is_served_in_full(client):
    directory = shared_sample("synthea-bulk-10p")
    lines = {
        path.name.split(".")[0]: sum(1 for line in path.read_bytes().splitlines() if line.strip())
        for path in directory.glob("*.ndjson") if path.name[0].isupper()
    }
    with BulkDataServer.from_directory(directory) as server:
        manifest = export(client, server)
        assert {o["type"]: o["count"] for o in manifest["output"]} == lines
        assert {o["type"]: len(ndjson(client.get(o["url"]))) for o in manifest["output"]} == lines


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_cli_serves_a_directory_until_stopped(tmp_path, stop_signal):
    (tmp_path / "Patient.000.ndjson").write_bytes(orjson.dumps({"resourceType": "Patient", "id": "p1"}) + b"\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "bulk_data_server", "--port", "0", "--ndjson-dir", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready, "the server printed nothing"
        base_url = process.stdout.readline().strip()
        assert httpx.get(base_url + "/metadata", timeout=10).status_code == 200
        process.send_signal(stop_signal)
        assert process.wait(timeout=10) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(base_url + "/metadata", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


# -- strict like the reference server ---------------------------------------------------------


@pytest.mark.parametrize("headers,reason", [
    ({"typ": "JWT"}, "Missing 'kid' property"),
    ({}, "Missing 'kid' property"),
    (None, "typ must be 'JWT'"),
])
def test_an_assertion_header_without_kid_or_typ_is_refused(auth_server, client, rsa_key, headers, reason):
    if headers is None:
        headers = {"kid": kid_of(rsa_key), "typ": "at+jwt"}
    response = request_token(client, auth_server, assertion(rsa_key, auth_server, headers=headers))
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    assert reason in response.json()["error_description"]


def test_a_client_registered_by_jwks_is_matched_by_kid(client, rsa_key):
    other = ec.generate_private_key(ec.SECP384R1())
    with BulkDataServer.from_synthetic(n_patients=2, seed=3, require_auth=True) as server:
        jwks = jwks_document(other, key_id="ec-2026")
        jwks["keys"] += jwks_document(rsa_key)["keys"]
        server.register_client("client-1", jwks=jwks)
        assert request_token(client, server, assertion(rsa_key, server)).status_code == 200
        ec_assertion = assertion(other, server, algorithm="ES384", headers={"typ": "JWT", "kid": "ec-2026"})
        assert request_token(client, server, ec_assertion).status_code == 200
        wrong_kid = assertion(other, server, algorithm="ES384", headers={"typ": "JWT", "kid": "not-registered"})
        assert request_token(client, server, wrong_kid).status_code == 401
        with pytest.raises(ValueError, match="public keys only"):
            server.register_client("c", jwks={"keys": [{**jwks["keys"][0], "d": "secret"}]})


@pytest.mark.parametrize("scope,status", [
    ("system/*.rs", 200), ("system/*.read", 200), ("system/Patient.rs system/Observation.rs", 200),
    ("user/*.read", 400), ("patient/*.rs", 400), ("system/*.everything", 400), ("openid", 400), ("system/Patient.", 400),
])
def test_scopes_must_be_smart_system_scopes(auth_server, client, rsa_key, scope, status):
    response = client.post(auth_server.token_url, data={
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion(rsa_key, auth_server), "scope": scope})
    assert response.status_code == status
    if status == 400:
        assert response.json()["error"] == "invalid_scope"


def test_failing_types_are_listed_as_errors_not_output(client):
    with BulkDataServer.from_synthetic(n_patients=4, seed=3, failing_types={"Condition", "MedicationRequest"}) as server:
        manifest = export(client, server)
        assert {o["type"] for o in manifest["output"]}.isdisjoint({"Condition", "MedicationRequest"})
        (error,) = manifest["error"]
        outcomes = ndjson(client.get(error["url"]))
        assert sorted(o["issue"][0]["expression"][0] for o in outcomes) == ["Condition", "MedicationRequest"]
        assert all("Failed to export" in o["issue"][0]["diagnostics"] for o in outcomes)


def test_expired_export_files_answer_410(client):
    with BulkDataServer.from_synthetic(n_patients=2, seed=3) as server:
        server.faults.expire_exports = 1
        expired = export(client, server)
        assert_outcome(client.get(expired["output"][0]["url"]), 410)
        fresh = export(client, server)
        assert client.get(fresh["output"][0]["url"]).status_code == 200


def test_rate_limit_answers_429_with_an_http_date_then_recovers(client):
    from email.utils import parsedate_to_datetime

    from bulk_data_server.server import RateLimit

    with BulkDataServer.from_synthetic(n_patients=2, seed=3, rate_limit=RateLimit(3, 60, 1)) as server:
        statuses = [kickoff(client, server).status_code for _ in range(5)]
        assert statuses == [202, 202, 202, 429, 429]
        limited = kickoff(client, server)
        retry_at = parsedate_to_datetime(limited.headers["Retry-After"])  # an HTTP-date, not seconds
        assert retry_at.tzinfo is not None and limited.headers["Retry-After"].endswith("GMT")
        time.sleep(max(0.0, (retry_at - datetime.now(timezone.utc)).total_seconds()) + 0.05)
        assert kickoff(client, server).status_code == 202
