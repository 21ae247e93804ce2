"""Service configuration: every field can be set from the environment as ``MERC_<NAME>``.

Example: ``MERC_DATA_DIR=/var/lib/merc MERC_API_KEYS=key1,key2 merc serve``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """Limits, paths and defaults of the REST service and its workers."""

    model_config = SettingsConfigDict(env_prefix="MERC_", extra="ignore")

    data_dir: Path = Field(Path("merc-data"), description="job store (SQLite), uploaded media, features")
    weights_dir: Path = Field(Path("weights"), description="bundle folders (<name>/manifest.json)")
    default_model: str = Field("sdt-meld7-fast", description="bundle used when a request names none")
    default_media_model: str = Field(
        "sdt-meld7-av",
        description="bundle used when a request with media (video or audio) names none; '' or a bundle that is not "
        "in weights_dir: default_model",
    )
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list, description="more bundles loaded at start")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default)")
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, description="comma-separated; empty: open")
    workers: int = Field(1, ge=0, le=16, description="in-process worker threads (0: jobs stay queued)")
    batch_max: int = Field(16, ge=1, le=256, description="queued jobs whose text is encoded in one call")
    batch_wait_ms: float = Field(
        3.0, ge=0, le=1000, description="how long a worker holding one job waits for more to batch with it"
    )
    max_queue: int = Field(64, ge=1, description="queued + running jobs before POST answers 429")
    max_upload_mb: float = Field(200.0, gt=0, description="per uploaded file, enforced while streaming")
    max_transcript_kb: int = Field(2048, ge=1, description="transcript JSON size limit")
    max_utterances: int = Field(2000, ge=1, description="utterances per conversation")
    max_text_chars: int = Field(5000, ge=1, description="characters per utterance text")
    max_media_seconds: float = Field(3600.0, gt=0, description="longest media accepted")
    max_video_pixels: int = Field(
        7680 * 4320, ge=1, description="largest video frame (width x height, from the stream header) decoded; 8K UHD"
    )
    probe_timeout_s: float = Field(10.0, gt=0, description="time allowed to open and decode the first frame")
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request line and headers slower than this get 408 and the connection is closed"
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a request body that sends nothing this long, or lags MERC_BODY_MIN_RATE after it, gets 408",
    )
    body_min_rate: float = Field(
        1024.0, gt=0, description="bytes/s a request body must average after its first MERC_BODY_TIMEOUT_S"
    )
    job_timeout_s: float = Field(1800.0, gt=0, description="a job running longer is marked failed")
    sync_media_max_s: float = Field(60.0, ge=0, description="media longer than this is always answered 202")
    text_wait_s: float = Field(10.0, ge=0, description="default ?wait for JSON (text-only) requests")
    max_wait_s: float = Field(60.0, ge=0, description="largest ?wait accepted")
    max_attempts: int = Field(2, ge=1, description="a job interrupted this many times is marked failed")
    callback_timeout_s: float = Field(5.0, gt=0, description="timeout of the POST to callback_url")
    callback_allow_private: bool = Field(
        False, description="allow callback_url hosts on loopback, private or link-local addresses (trusted networks)"
    )

    @field_validator("api_keys", "preload", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings read from the environment (once)."""
    return Settings()
