from __future__ import annotations

import os
from datetime import date
from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from clinical_ml.deid import MissingSecretKey

# Published on purpose: only for the built-in synthetic demo data, never for real patients.
DEMO_KEY = "clinical-ml-platform-demo-key-not-for-real-data"


class DeidKey(ConfigurableResource):
    """Where the de-identification secret comes from. The key itself is never part of the
    resource config (which the UI shows): it is read from the environment at use time."""

    key_env_var: str = Field(default="DEID_SECRET_KEY", description="Environment variable holding the secret key.")
    demo_mode_env_var: str = Field(default="CLINICAL_DEMO_MODE",
                                   description="When this variable is 1, a missing key falls back to the demo key.")
    date_shift_max_days: int = Field(default=365, description="Per-patient date shift range, +/- days.")
    date_mode: str = Field(default_factory=lambda: os.environ.get("DEID_DATE_MODE", "shift"),
                           description="shift: every date moves by a secret per-patient offset (keeps intervals); "
                           "year: every date is generalized to 1 January of its year.")
    age_reference_date: Optional[str] = Field(
        default_factory=lambda: os.environ.get("DEID_AGE_REFERENCE_DATE") or None,
        description="ISO date at which ages over 89 are grouped; default today (or the end of the record if later). "
        "Pin it to make re-runs on other days identical.")

    def reference_date(self) -> Optional[date]:
        return date.fromisoformat(self.age_reference_date) if self.age_reference_date else None

    def key(self) -> bytes:
        value = os.environ.get(self.key_env_var, "")
        if value:
            if len(value) < 16:
                raise MissingSecretKey(f"{self.key_env_var} is too short: use at least 16 random characters.")
            return value.encode()
        if os.environ.get(self.demo_mode_env_var) == "1":
            return DEMO_KEY.encode()
        raise MissingSecretKey(
            f"{self.key_env_var} is not set. Set it to a long random secret (e.g. `openssl rand -hex 32`), "
            f"kept outside the code; or set {self.demo_mode_env_var}=1 to use the published demo key "
            "with synthetic data only."
        )

    def is_demo_key(self) -> bool:
        return not os.environ.get(self.key_env_var)
