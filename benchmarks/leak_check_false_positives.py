"""Leak-check false positives on real notes: how many times the blocking check would stop the
graph on words that are not identifiers.

    .venv/bin/python benchmarks/leak_check_false_positives.py [--export ../shared/fhir-samples/synthea-bulk-10p]

Reads the export twice through landing and de-identification: as it is, and with every patient
renamed to a common-word first name ("Will", "Hope", "May" ...) with an honorific prefix. For each
it prints the check's blocks (every one would stop the graph: the target is 0) next to what the
earlier rule (any patient's name word, prefixes included, anywhere) would have counted. That
real leaks are still caught is tested in tests/test_real_export_shapes.py and by the
planted-identifier recall benchmark.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clinical_ml.leak_false_positives import measure, with_common_word_names  # noqa: E402

KEY = b"benchmark-key-0123456789abcdef-not-secret"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "fhir-samples" / "synthea-bulk-10p"
    parser.add_argument("--export", type=Path, default=default)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"as exported": args.export,
                    "common-word names": with_common_word_names(args.export, Path(tmp) / "renamed")}
        print(f"export: {args.export}")
        print(f"{'variant':<20} {'notes':>6} {'blocks':>7} {'earlier rule hits':>18} {'seconds':>8}")
        for name, directory in variants.items():
            start = time.perf_counter()
            reading = measure(directory, KEY)
            print(f"{name:<20} {reading.notes:>6} {reading.blocks:>7} {reading.global_token_hits:>18} "
                  f"{time.perf_counter() - start:>8.1f}")
            for finding in reading.findings:
                print(f"  finding: {finding}")


if __name__ == "__main__":
    main()
