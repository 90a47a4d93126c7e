"""A FHIR Bulk Data Access (v2) server on loopback, with fault injection, for client tests and demos.

    from bulk_data_server import BulkDataServer, ServerFaults

    with BulkDataServer.from_synthetic(n_patients=200, seed=1) as server:
        ...  # export from server.base_url; set server.faults.* to inject failures
"""

from bulk_data_server.server import BulkDataServer, RateLimit, ResourceStore, ServerFaults

__all__ = ["BulkDataServer", "RateLimit", "ResourceStore", "ServerFaults"]
