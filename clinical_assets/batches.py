"""Data batches as Dagster partitions, and the command that registers a new one.

    python -m clinical_assets.batches add [--label L] [--ndjson-dir DIR | --synthetic-seed N [--patients N] [--drift]]

prints the batch's key (the partition to materialize). Without a source option the batch is the
configured FHIR source (FHIR_BASE_URL, FHIR_NDJSON_DIR or the generator settings); a folder or
generator registered again keeps its key. A partition added in the Dagster UI lands the
configured source.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dagster import DagsterInstance, DynamicPartitionsDefinition

from clinical_ml.batches import BatchSource
from resources.fhir_source import FhirSource
from resources.warehouse import DuckDBWarehouse

FHIR_BATCHES = DynamicPartitionsDefinition(name="fhir_batches")


def register_batch(instance: DagsterInstance, warehouse: DuckDBWarehouse, source: BatchSource, label: str) -> str:
    """Record the batch's source beside its file and add it as a partition."""
    key = warehouse.batch_store().register(source, label)
    if not instance.has_dynamic_partition(FHIR_BATCHES.name, key):
        instance.add_dynamic_partitions(FHIR_BATCHES.name, [key])
    return key


def source_from_args(args: argparse.Namespace, configured: FhirSource) -> BatchSource:
    """The batch's source, made concrete where it can be: a folder or generator settings are
    recorded (re-registering them finds the same batch); a Bulk Data server is asked for its
    data when the batch is processed (each export is a new batch)."""
    if args.ndjson_dir:
        return BatchSource(kind="directory", directory=str(Path(args.ndjson_dir).resolve()))
    if args.synthetic_seed is not None:
        return BatchSource(kind="synthetic", synthetic_patients=args.patients, synthetic_seed=args.synthetic_seed,
                           drift=args.drift)
    if configured.base_url:
        return BatchSource()
    if configured.ndjson_dir:
        return BatchSource(kind="directory", directory=str(Path(configured.ndjson_dir).resolve()))
    return BatchSource(kind="synthetic", synthetic_patients=configured.synthetic_patients,
                       synthetic_seed=configured.synthetic_seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clinical_assets.batches")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="register a new data batch; prints its partition key")
    add.add_argument("--label", default=None, help="a word for the key (b0002-<label>)")
    add.add_argument("--ndjson-dir", help="land this folder of NDJSON")
    add.add_argument("--synthetic-seed", type=int, help="generate a synthetic batch with this seed")
    add.add_argument("--patients", type=int, default=1000, help="synthetic patients (with --synthetic-seed)")
    add.add_argument("--drift", action="store_true", help="synthetic: BP device +8 mmHg, older population")
    commands.add_parser("list", help="registered batches, oldest first")
    args = parser.parse_args(argv)
    warehouse = DuckDBWarehouse()
    if args.command == "list":
        store = warehouse.batch_store()
        for key in store.keys():
            print(f"{key}\t{store.source(key).describe()}")
        return
    source = source_from_args(args, FhirSource())
    label = args.label or ("drifted" if source.drift else source.kind)
    print(register_batch(DagsterInstance.get(), warehouse, source, label))


if __name__ == "__main__":
    main()
