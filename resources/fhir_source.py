from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.synthetic import CohortSpec, write_bulk_export
from resources.settings import data_home


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class FhirSource(ConfigurableResource):
    """Where raw FHIR NDJSON comes from: a directory of Bulk Data / Synthea NDJSON
    (FHIR_NDJSON_DIR) or, by default, the built-in deterministic synthetic generator."""

    ndjson_dir: Optional[str] = Field(default_factory=lambda: os.environ.get("FHIR_NDJSON_DIR") or None,
                                      description="Read this folder of <Type>.ndjson files instead of generating.")
    synthetic_patients: int = Field(default_factory=lambda: _env_int("SYNTHETIC_PATIENTS", 5000))
    synthetic_seed: int = Field(default_factory=lambda: _env_int("SYNTHETIC_SEED", 42))
    export_root: str = Field(default_factory=lambda: str(data_home() / "exports"),
                             description="Where generated exports are written.")

    def describe(self) -> str:
        if self.ndjson_dir:
            return f"directory {self.ndjson_dir}"
        return f"synthetic generator ({self.synthetic_patients} patients, seed {self.synthetic_seed})"

    def export_directory(self) -> Path:
        """The NDJSON folder to land: the configured one, or a freshly generated export."""
        if self.ndjson_dir:
            path = Path(self.ndjson_dir)
            if not path.is_dir():
                raise FileNotFoundError(f"FHIR_NDJSON_DIR does not exist or is not a folder: {path}")
            return path
        spec = CohortSpec(n_patients=self.synthetic_patients, seed=self.synthetic_seed)
        return self.generate(spec)

    def generate(self, spec: CohortSpec) -> Path:
        name = f"synthetic-n{spec.n_patients}-seed{spec.seed}{'-drift' if spec.drift else ''}"
        return write_bulk_export(Path(self.export_root) / name, spec).directory
