"""The one switch for quick runs (tests, benchmarks, image smoke checks), kept out of the production
Settings: BIREFNET_TEST_OPERATING_RESOLUTION runs every job's forward at one small size. Off unless set; a
job that ran under it says so in its log (worker.job_context)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RunOverrides(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BIREFNET_TEST_", env_file=".env", extra="ignore")

    operating_resolution: str = Field(
        "",
        pattern=r"^(\d+x\d+)?$",
        description="Workers run every job's forward pass at this WIDTHxHEIGHT "
        "(e.g. 128x128) instead of its operating_resolution, so CPU chaos and load tests finish in minutes; "
        "every job's logs say so.",
    )

    @classmethod
    def off(cls) -> RunOverrides:
        """Every switch off, whatever the environment says (library callers and unit tests)."""
        return cls.model_construct()

    def resolution(self, requested: str) -> str:
        """The operating resolution a job's forward runs at."""
        return self.operating_resolution or requested
