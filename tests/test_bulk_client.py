"""The Bulk Data client against the project's own Bulk Data server on 127.0.0.1."""

from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bulk_data_server import BulkDataServer
from clinical_ml.audit import table_hash
from clinical_ml.bulk_client import BulkDataClient, BulkDataError, ExportRequest, SmartBackendAuth
from clinical_ml.ingest import land_ndjson, table_name
from resources.fhir_source import FhirSource

TYPES = ("Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "DocumentReference")


class Sleeps(list):
    """Records requested waits instead of sleeping (the client's sleep is injectable)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(server: BulkDataServer, **kwargs) -> BulkDataClient:
    kwargs.setdefault("sleep", Sleeps())
    return BulkDataClient(server.base_url, **kwargs)


def landed_fingerprint(directory: Path, mode="replace", con=None) -> dict[str, str]:
    con = con or duckdb.connect()
    report = land_ndjson(con, directory, mode=mode)
    assert report.quarantined == 0 and report.reconciles
    # meta.lastUpdated is stamped when a server loads its data: equal content, different stamp
    content = "regexp_replace(resource::VARCHAR, '\"lastUpdated\":\"[^\"]*\"', '')"
    return {t: table_hash(con, f"(SELECT id, {content} FROM raw.{table_name(t)})") for t in TYPES}


@pytest.fixture(scope="module")
def clean_reference(tmp_path_factory):
    """Tables from a fault-free export, to compare every faulty run with."""
    with BulkDataServer.from_synthetic(n_patients=40, seed=3) as server:
        directory = tmp_path_factory.mktemp("clean")
        with client_for(server) as client:
            client.export(ExportRequest(), directory)
        return landed_fingerprint(directory)


def test_full_export_downloads_every_resource(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=40, seed=3, polls_before_complete=2) as server:
        with client_for(server) as client:
            result = client.export(ExportRequest(), tmp_path)
        assert result.count("output") == len(server.store.counts())
        con = duckdb.connect()
        report = land_ndjson(con, tmp_path)
        assert report.loaded_by_type["Observation"] == server.store.counts()["Observation"]
        assert report.quarantined == 0
        sleeps = client.sleep
        assert len(sleeps) == 2  # two "in progress" polls, each honouring Retry-After
        assert all(f.sha256 and f.bytes > 0 for f in result.files)


@pytest.mark.parametrize("fault", [
    {"kickoff_429": 2},
    {"status_429": 2, "retry_after": "3"},
    {"status_500": 2},
    {"file_500": {"Observation.000.ndjson": 2}},
    {"drop_mid_download": {"Encounter.000.ndjson": 2}},
    {"slow_seconds": 0.05},
])
def test_each_injected_fault_is_survived_with_the_same_tables(tmp_path, clean_reference, fault):
    with BulkDataServer.from_synthetic(n_patients=40, seed=3) as server:
        for name, value in fault.items():
            setattr(server.faults, name, value)
        with client_for(server) as client:
            client.export(ExportRequest(), tmp_path)
    assert landed_fingerprint(tmp_path) == clean_reference


def test_retry_after_is_honoured_and_absurd_values_capped(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=5, seed=1) as server:
        server.faults.status_429 = 1
        server.faults.retry_after = "7"
        with client_for(server) as client:
            client.export(ExportRequest(), tmp_path / "a")
        assert 7.0 in client.sleep
        server.faults.status_429 = 1
        server.faults.retry_after = "86400"
        with client_for(server, retry_after_bounds=(1.0, 30.0)) as client:
            client.export(ExportRequest(types=("Patient",)), tmp_path / "b")
        assert 30.0 in client.sleep and max(client.sleep) <= 30.0


def test_4xx_is_a_clear_error_with_the_operation_outcome(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=5, seed=1) as server:
        with client_for(server) as client:
            with pytest.raises(BulkDataError, match=r"HTTP 400: .*") as err:
                client.export(ExportRequest(output_format="text/csv"), tmp_path)
            assert err.value.status_code == 400 and "_outputFormat" in str(err.value)
            with pytest.raises(BulkDataError, match="HTTP 404"):
                client.export(ExportRequest(level="group", group_id="unknown"), tmp_path)
        # a 4xx is not retried
        assert sum(1 for m, p, s in server.requests if s == 400) == 1


def _rsa_pem():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))


def test_smart_backend_services_and_an_expired_token_is_refreshed(tmp_path, clean_reference):
    private_pem, public_pem = _rsa_pem()
    with BulkDataServer.from_synthetic(n_patients=40, seed=3, require_auth=True, polls_before_complete=1) as server:
        server.register_client("platform", public_pem)
        auth = SmartBackendAuth("platform", private_pem)  # token URL discovered from smart-configuration

        def expire_while_waiting(seconds):  # the token dies while the export is in progress
            server.expire_tokens()

        with client_for(server, auth=auth, sleep=expire_while_waiting) as client:
            client.export(ExportRequest(), tmp_path)
        token_requests = [r for r in server.requests if r[1].endswith("/token")]
        assert len(token_requests) == 2 and all(r[2] == 200 for r in token_requests)
        assert any(r[2] == 401 for r in server.requests)  # the expired token was refused once
    assert landed_fingerprint(tmp_path) == clean_reference


def test_es384_keys_are_supported(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with BulkDataServer.from_synthetic(n_patients=3, seed=1, require_auth=True) as server:
        server.register_client("ec-client", public_pem)
        auth = SmartBackendAuth("ec-client", private_pem)
        assert auth.algorithm == "ES384"
        with client_for(server, auth=auth) as client:
            assert client.export(ExportRequest(types=("Patient",)), tmp_path).count("output") == 1


def test_since_export_upserts_and_applies_deletions(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=20, seed=5) as server:
        con = duckdb.connect()
        with client_for(server) as client:
            first = client.export(ExportRequest(), tmp_path / "full")
        land_ndjson(con, first.directory)

        later = datetime.now(timezone.utc) + timedelta(seconds=5)
        patients = con.execute("SELECT id, resource FROM raw.patient ORDER BY id LIMIT 3").fetchall()
        import json
        changed = json.loads(patients[0][1])
        changed["gender"] = "other"
        server.store.upsert(changed, later)
        server.store.upsert({"resourceType": "Patient", "id": "brand-new", "gender": "female"}, later)
        server.store.delete("Patient", patients[1][0], later)
        unchanged_before = con.execute("SELECT resource FROM raw.patient WHERE id = ?", [patients[2][0]]).fetchone()

        with client_for(server) as client:
            delta = client.export(ExportRequest(since=first.transaction_time), tmp_path / "delta")
        assert delta.count("output") == 1 and delta.count("deleted") == 1
        report = land_ndjson(con, delta.directory, mode="merge")

        assert report.deleted == 1 and report.loaded == 2
        assert con.execute("SELECT resource->>'gender' FROM raw.patient WHERE id = ?", [changed["id"]]).fetchone()[0] == "other"
        assert con.execute("SELECT count(*) FROM raw.patient WHERE id = 'brand-new'").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM raw.patient WHERE id = ?", [patients[1][0]]).fetchone()[0] == 0
        assert con.execute("SELECT resource FROM raw.patient WHERE id = ?", [patients[2][0]]).fetchone() == unchanged_before
        assert con.execute("SELECT count(*) FROM raw.patient").fetchone()[0] == server.store.counts()["Patient"]
        # landing the same delta again changes nothing
        before = table_hash(con, "(SELECT id, resource FROM raw.patient)")
        land_ndjson(con, delta.directory, mode="merge")
        assert table_hash(con, "(SELECT id, resource FROM raw.patient)") == before


def test_an_interrupted_export_resumes_without_refetching_complete_files(tmp_path, clean_reference):
    with BulkDataServer.from_synthetic(n_patients=40, seed=3) as server:
        server.faults.drop_mid_download = {"Observation.000.ndjson": 5}
        with client_for(server, max_retries=1, max_parallel_downloads=1) as client:
            with pytest.raises(BulkDataError, match="Observation"):
                client.export(ExportRequest(), tmp_path)
        server.faults.drop_mid_download = {}
        with client_for(server) as client:
            result = client.export(ExportRequest(), tmp_path)
        assert result.resumed
        kickoffs = [r for r in server.requests if r[1].endswith("$export")]
        assert len(kickoffs) == 1  # the same server job was picked up again
        patient_downloads = [r for r in server.requests if r[1].endswith("Patient.000.ndjson")]
        assert len(patient_downloads) == 1  # complete and verified: not fetched twice
        assert any(f.skipped_as_complete for f in result.files)
    assert landed_fingerprint(tmp_path) == clean_reference


def test_interrupting_an_export_cancels_it_on_the_server(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=5, seed=1, polls_before_complete=5) as server:
        def interrupt(seconds):
            raise KeyboardInterrupt  # what a cancelled Dagster run raises in the step

        with client_for(server, sleep=interrupt) as client:
            with pytest.raises(KeyboardInterrupt):
                client.export(ExportRequest(), tmp_path)
        assert len(server.cancelled_jobs) == 1
        assert any(m == "DELETE" for m, p, s in server.requests)


def test_fhir_source_exports_then_exports_incrementally(tmp_path):
    with BulkDataServer.from_synthetic(n_patients=10, seed=2) as server:
        source = FhirSource(base_url=server.base_url, incremental=True, export_root=str(tmp_path), client_id=None)
        first = source.fetch()
        assert first.mode == "replace" and first.export.count("output") == 6
        source.record_landed_export(first.export)
        second = source.fetch()
        assert second.mode == "merge" and source.export_request().since == first.export.transaction_time


def test_a_resumed_export_the_server_forgot_starts_once_more(tmp_path, clean_reference):
    with BulkDataServer.from_synthetic(n_patients=40, seed=3) as server:
        server.faults.drop_mid_download = {"Observation.000.ndjson": 5}
        with client_for(server, max_retries=1, max_parallel_downloads=1) as client:
            with pytest.raises(BulkDataError, match="Observation"):
                client.export(ExportRequest(), tmp_path)
        server.faults.drop_mid_download = {}
        server._jobs.clear()  # the export expired on the server: its URLs now answer 404
        with client_for(server) as client:
            result = client.export(ExportRequest(), tmp_path)
        assert not result.resumed
        assert len([r for r in server.requests if r[1].endswith("$export")]) == 2
    assert landed_fingerprint(tmp_path) == clean_reference
