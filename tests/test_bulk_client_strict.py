"""The Bulk Data client against the test server in its strict, reference-server-like modes:
kid-bearing assertions and JWKS registration, partial exports, expired files, rate limits with
HTTP-date Retry-After, and hostile manifests."""

import time
from pathlib import Path

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dagster import AssetKey, DagsterInstance

from bulk_data_server import BulkDataServer
from bulk_data_server.server import RateLimit
from clinical_assets.batches import register_batch
from clinical_assets.definitions import build_definitions
from clinical_ml.batches import BatchSource
from clinical_ml.bulk_client import BulkDataClient, BulkDataError, ExportRequest, SmartBackendAuth, jwks_document, main
from clinical_ml.ingest import export_completeness, land_ndjson
from resources.audit_store import AuditStore
from resources.deid_key import DeidKey
from resources.fhir_source import FhirSource
from resources.mlflow_tracking import MLflowTracking
from resources.warehouse import DuckDBWarehouse
from tests.test_bulk_client import Sleeps, landed_fingerprint


def pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    with BulkDataServer.from_synthetic(n_patients=20, seed=4) as server:
        directory = tmp_path_factory.mktemp("clean")
        with BulkDataClient(server.base_url, sleep=Sleeps()) as client:
            client.export(ExportRequest(), directory)
        return landed_fingerprint(directory)


@pytest.mark.parametrize("make_key,algorithm", [
    (lambda: ec.generate_private_key(ec.SECP384R1()), "ES384"),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS384"),
])
def test_authenticated_export_with_a_registered_jwks(tmp_path, clean, capsys, make_key, algorithm):
    key = make_key()
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(key))
    main(["jwks", "--key", str(key_file)])  # what an engineer registers with the EHR
    import json
    jwks = json.loads(capsys.readouterr().out)
    assert jwks["keys"][0]["alg"] == algorithm and "d" not in jwks["keys"][0]
    with BulkDataServer.from_synthetic(n_patients=20, seed=4, require_auth=True) as server:
        server.register_client("platform", jwks=jwks)
        source = FhirSource(base_url=server.base_url, client_id="platform", export_root=str(tmp_path / "exports"),
                            incremental=False, min_poll_seconds=0.0, ndjson_dir=None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FHIR_PRIVATE_KEY", str(key_file))
            batch = source.fetch()
        assert server.authorization_headers and all(h.startswith("Bearer ") for h in server.authorization_headers)
        assert [s for m, p, s in server.requests if p.endswith("/token")] == [200]
    assert source.smart_scope() == "system/*.rs"
    assert landed_fingerprint(batch.directory) == clean


def test_an_assertion_without_kid_is_refused_as_by_the_reference_server(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    with BulkDataServer.from_synthetic(n_patients=2, seed=4, require_auth=True) as server:
        server.register_client("platform", jwks=jwks_document(key))
        auth = SmartBackendAuth("platform", pem(key))
        auth.key_id = ""  # what the client sent before: no kid in the header
        with BulkDataClient(server.base_url, auth, sleep=Sleeps()) as client:
            with pytest.raises(BulkDataError, match="Missing 'kid' property"):
                client.export(ExportRequest(), tmp_path)


def test_scope_follows_the_settings():
    source = FhirSource(base_url="https://ehr.example/fhir", export_types="Patient,Condition", scope_version="v1")
    assert source.smart_scope() == "system/Patient.read system/Condition.read"
    assert FhirSource(base_url="https://x", export_types="Patient", scope_version="v2").smart_scope() == "system/Patient.rs"
    assert FhirSource(base_url="https://x", scope="system/*.read").smart_scope() == "system/*.read"


def run_graph(tmp_path: Path, server: BulkDataServer, **source_settings):
    warehouse = DuckDBWarehouse(path=str(tmp_path / "warehouse.duckdb"))
    resources = {
        "warehouse": warehouse,
        "fhir_source": FhirSource(**{"base_url": server.base_url, "client_id": None, "ndjson_dir": None,
                                     "incremental": False, "export_root": str(tmp_path / "exports"),
                                     "min_poll_seconds": 0.0, **source_settings}),
        "deid_key": DeidKey(key_env_var="STRICT_TEST_KEY"),
        "mlflow": MLflowTracking(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifact_root=str(tmp_path / "a")),
        "audit_store": AuditStore(warehouse=warehouse),
    }
    defs = build_definitions(resources)
    job = defs.resolve_job_def("clinical_pipeline")
    instance = DagsterInstance.ephemeral()
    batch = register_batch(instance, warehouse, BatchSource(), "bulk")  # the configured source: the server
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STRICT_TEST_KEY", "strict-server-test-key-0123456789")
        mp.setenv("CLINICAL_DEMO_MODE", "1")
        return job.execute_in_process(instance=instance, raise_on_error=False, partition_key=batch,
                                      asset_selection=[AssetKey("raw_fhir"), AssetKey("deidentified_fhir")])


def test_a_partial_export_fails_the_blocking_check_and_stops_the_graph(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=10, seed=4, failing_types={"Condition", "MedicationRequest"}) as server:
        result = run_graph(tmp_path, server)
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert materialized == {"raw_fhir"}  # de-identification never ran on the partial data
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    assert "deidentified_fhir" not in started  # skipped because the check blocked, not failed on its own
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["export_complete"]
    assert not check.passed and check.severity.value == "ERROR"
    assert "Condition 1, MedicationRequest 1" in check.description
    con = duckdb.connect(str(tmp_path / "warehouse-batches" / "b0001-bulk.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM raw.export_errors").fetchone()[0] == 2  # the errors are kept


def test_a_site_that_accepts_partial_data_sets_a_tolerance(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=10, seed=4, failing_types={"Condition"}) as server:
        result = run_graph(tmp_path, server, max_export_errors=1)
    assert {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()} == {
        "raw_fhir", "deidentified_fhir"}
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["export_complete"]
    assert check.passed and "accepted as partial data" in check.description


def test_expired_files_start_the_export_again_once(tmp_path, clean):
    with BulkDataServer.from_synthetic(n_patients=20, seed=4) as server:
        server.faults.expire_exports = 1
        with BulkDataClient(server.base_url, sleep=Sleeps()) as client:
            client.export(ExportRequest(), tmp_path / "once")
        assert len([r for r in server.requests if r[1].endswith("$export")]) == 2
        assert any(s == 410 for m, p, s in server.requests)
        server.faults.expire_exports = 2
        with BulkDataClient(server.base_url, sleep=Sleeps()) as client:
            with pytest.raises(BulkDataError, match="files are gone too") as err:
                client.export(ExportRequest(), tmp_path / "twice")
        assert err.value.status_code == 410
    assert landed_fingerprint(tmp_path / "once") == clean


def test_a_strict_rate_limit_is_waited_out(tmp_path, clean):
    waits = []

    def sleep(seconds):  # real waiting: the penalty is real time on the server
        waits.append(seconds)
        time.sleep(min(seconds, 3))

    with BulkDataServer.from_synthetic(n_patients=20, seed=4, polls_before_complete=4,
                                       rate_limit=RateLimit(requests=3, window_seconds=60, penalty_seconds=1)) as server:
        # no retries at all: a 429 is a pace to keep, not an error to retry
        with BulkDataClient(server.base_url, sleep=sleep, min_poll_interval_s=0.01, max_retries=0) as client:
            client.export(ExportRequest(), tmp_path)
        throttled = [r for r in server.requests if r[2] == 429]
    assert throttled
    assert any(0.5 <= w <= 2.5 for w in waits)  # the HTTP-date Retry-After, about one second ahead
    assert landed_fingerprint(tmp_path) == clean


def test_polling_never_goes_faster_than_the_floor(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=2, seed=4, polls_before_complete=3) as server:
        server.faults.retry_after = "0"
        sleeps = Sleeps()
        with BulkDataClient(server.base_url, sleep=sleeps, min_poll_interval_s=5.0) as client:
            client.export(ExportRequest(), tmp_path)
    assert len(sleeps) == 3 and min(sleeps) >= 5.0


def test_a_path_traversal_type_writes_nothing_outside_the_export_folder(tmp_path):
    def hostile(manifest):
        manifest["output"][0]["type"] = "../../escaped"
        return manifest

    export_dir = tmp_path / "a" / "b" / "export"
    with BulkDataServer.from_synthetic(n_patients=2, seed=4) as server:
        server.faults.manifest_rewrite = hostile
        with BulkDataClient(server.base_url, sleep=Sleeps()) as client:
            with pytest.raises(BulkDataError, match="invalid type"):
                client.export(ExportRequest(), export_dir)
        assert not any(p.endswith(".ndjson") for m, p, s in server.requests)  # nothing downloaded
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and export_dir not in p.parents]
    assert outside == []


def test_a_foreign_file_host_never_receives_the_token(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    with BulkDataServer.from_synthetic(n_patients=2, seed=4) as foreign, \
            BulkDataServer.from_synthetic(n_patients=2, seed=4, require_auth=True) as server:
        def elsewhere(manifest):  # the files "live" on another origin (another port here)
            for item in manifest["output"]:
                item["url"] = item["url"].replace(server.base_url, foreign.base_url)
            return manifest

        server.register_client("platform", jwks=jwks_document(key))
        server.faults.manifest_rewrite = elsewhere
        auth = SmartBackendAuth("platform", pem(key))
        with BulkDataClient(server.base_url, auth, sleep=Sleeps()) as client:
            with pytest.raises(BulkDataError, match="refusing to send it"):
                client.export(ExportRequest(), tmp_path / "x")
        assert foreign.authorization_headers == [] and foreign.requests == []
        # an origin the operator allowed does receive it
        with BulkDataClient(server.base_url, auth, sleep=Sleeps(), token_origins=(foreign.base_url,)) as client:
            with pytest.raises(BulkDataError):  # the foreign host has no such job: 404, but it got the token
                client.export(ExportRequest(), tmp_path / "y")
        assert foreign.authorization_headers


def test_files_without_requires_access_token_get_no_token(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    with BulkDataServer.from_synthetic(n_patients=2, seed=4, require_auth=True, requires_access_token=False) as server:
        server.register_client("platform", jwks=jwks_document(key))
        with BulkDataClient(server.base_url, SmartBackendAuth("platform", pem(key)), sleep=Sleeps()) as client:
            client.export(ExportRequest(), tmp_path)
        downloads = [r for r in server.requests if "/files/" in r[1]]
        assert downloads and len(server.authorization_headers) == len(server.requests) - len(downloads) - 2


def test_a_file_over_the_size_ceiling_is_refused(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=5, seed=4) as server:
        with BulkDataClient(server.base_url, sleep=Sleeps(), max_file_bytes=1000) as client:
            with pytest.raises(BulkDataError, match="larger than 1000 bytes"):
                client.export(ExportRequest(types=("Observation",)), tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_completeness_counts_errors_per_type(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=3, seed=4, failing_types={"Encounter"}, error_file=True) as server:
        with BulkDataClient(server.base_url, sleep=Sleeps()) as client:
            client.export(ExportRequest(), tmp_path)
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path)
    completeness = export_completeness(con, report.landing_id, tolerance=0)
    assert completeness.errors == 2 and completeness.errors_by_type == {"Encounter": 1, "unspecified": 1}
    assert not completeness.complete and export_completeness(con, report.landing_id, tolerance=2).complete


# -- what the review of this change found ------------------------------------------------------


def test_the_clients_assertion_header_names_its_key():
    import jwt

    from clinical_ml.bulk_client import jwk_thumbprint, public_jwk

    key = ec.generate_private_key(ec.SECP384R1())
    auth = SmartBackendAuth("platform", pem(key), token_url="https://ehr.example/token")
    header = jwt.get_unverified_header(auth.assertion())
    assert header == {"alg": "ES384", "typ": "JWT", "kid": jwk_thumbprint(public_jwk(key))}
    with_jku = SmartBackendAuth("platform", pem(key), token_url="https://ehr.example/token", key_id="k1",
                                jku="https://platform.example/jwks.json")
    assert jwt.get_unverified_header(with_jku.assertion())["kid"] == "k1"
    assert jwt.get_unverified_header(with_jku.assertion())["jku"] == "https://platform.example/jwks.json"


@pytest.mark.parametrize("fault,path,refusal", [
    # polling and cancelling carry the access token
    ("status_url_base", "", "status URL on another origin"),
    # a 307/308 would re-send the client assertion in the POST body
    ("token_redirect", "/token", "not following it with the client assertion"),
    # the assertion (and its aud) would go to a plain-http host the server named
    ("advertised_token_endpoint", "/token", "neither https nor on the FHIR server's origin"),
])
def test_no_credential_goes_to_another_origin(tmp_path, fault, path, refusal):
    key = ec.generate_private_key(ec.SECP384R1())
    with BulkDataServer.from_synthetic(n_patients=2, seed=4) as elsewhere, \
            BulkDataServer.from_synthetic(n_patients=2, seed=4, require_auth=True) as server:
        server.register_client("platform", jwks=jwks_document(key))
        setattr(server.faults, fault, elsewhere.base_url + path)
        with BulkDataClient(server.base_url, SmartBackendAuth("platform", pem(key)), sleep=Sleeps()) as client:
            with pytest.raises(BulkDataError, match=refusal):
                client.export(ExportRequest(), tmp_path)
        assert elsewhere.requests == [] and elsewhere.authorization_headers == []


def test_a_trickling_download_hits_the_time_limit(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=3, seed=4, gzip=False) as server:
        server.faults.trickle_seconds = {"Patient.000.ndjson": 0.05}
        started = time.monotonic()
        with BulkDataClient(server.base_url, sleep=Sleeps(), file_timeout_s=0.5) as client:
            with pytest.raises(BulkDataError, match="not complete within"):
                client.export(ExportRequest(types=("Patient",)), tmp_path)
        assert time.monotonic() - started < 5  # not the minutes the whole file would take
    assert not list(tmp_path.glob("*.part"))


def test_a_429_storm_without_retry_after_backs_off_and_gives_up_within_the_budget(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=2, seed=4) as server:
        server.faults.status_429 = 10_000
        server.faults.retry_after = ""  # no usable Retry-After: the client paces itself
        sleeps = Sleeps()
        with BulkDataClient(server.base_url, sleep=sleeps, min_poll_interval_s=1.0, overall_timeout_s=60,
                            backoff_base_s=1.0, backoff_max_s=30.0) as client:
            with pytest.raises(BulkDataError, match="still rate limited"):
                client.export(ExportRequest(), tmp_path)
    assert min(sleeps) >= 1.0 and sum(sleeps) <= 60  # never below the floor, never past the budget
    assert len(sleeps) < 60


def test_retry_after_as_an_http_date_is_what_paces_a_rate_limit(tmp_path, clean):
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        time.sleep(min(seconds, 3))

    with BulkDataServer.from_synthetic(n_patients=20, seed=4, polls_before_complete=4,
                                       rate_limit=RateLimit(requests=3, window_seconds=60, penalty_seconds=2)) as server:
        server.faults.retry_after = "0"  # in-progress polls ask for no wait: only the 429's date does
        # its own backoff stays under 0.2 s: a wait of a second or more can only come from the date
        with BulkDataClient(server.base_url, sleep=sleep, min_poll_interval_s=0.01, max_retries=0,
                            backoff_max_s=0.2, retry_after_bounds=(0.0, 300.0)) as client:
            client.export(ExportRequest(), tmp_path)
    assert [w for w in waits if w >= 1.0], "the HTTP-date Retry-After of the 429 was not honoured"
    assert landed_fingerprint(tmp_path) == clean


def test_an_incomplete_export_moves_no_watermark_and_is_refused_later(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=10, seed=4, failing_types={"Condition"}) as server:
        result = run_graph(tmp_path, server, incremental=True)
    assert not {e.check_name: e.passed for e in result.get_asset_check_evaluations()}["export_complete"]
    assert not (tmp_path / "exports" / "bulk" / "last_transaction_time.json").exists()
    # a later run of de-identification alone refuses the incomplete landing too
    from clinical_ml.ingest import IncompleteExportError, refuse_incomplete_export

    con = duckdb.connect(str(tmp_path / "warehouse-batches" / "b0001-bulk.duckdb"), read_only=True)
    with pytest.raises(IncompleteExportError, match="Condition 1"):
        refuse_incomplete_export(con)


def test_warnings_in_the_error_files_are_kept_but_do_not_fail_the_export(tmp_path):
    import orjson

    (tmp_path / "error").mkdir()
    (tmp_path / "Patient.000.ndjson").write_text('{"resourceType": "Patient", "id": "p1"}\n')
    warning = {"resourceType": "OperationOutcome", "issue": [{"severity": "warning", "diagnostics": "Observation x"}]}
    error = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "expression": ["Observation"]}]}
    (tmp_path / "error" / "OperationOutcome.000.ndjson").write_bytes(orjson.dumps(warning) + b"\n")
    con = duckdb.connect()
    report = land_ndjson(con, tmp_path)
    only_warning = export_completeness(con, report.landing_id)
    assert only_warning.complete and only_warning.errors == 0 and only_warning.outcomes == 1
    (tmp_path / "error" / "OperationOutcome.000.ndjson").write_bytes(orjson.dumps(warning) + b"\n" + orjson.dumps(error) + b"\n")
    report = land_ndjson(con, tmp_path)
    assert export_completeness(con, report.landing_id).errors_by_type == {"Observation": 1}
