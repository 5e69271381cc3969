"""The server's one validated configuration object. Values come from defaults, then environment
variables (MODELGUARD_*), then command-line flags (service/__main__.py)."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

DEFAULT_SECRET = "modelguard-dev-secret"


def artifacts_dir() -> Path:
    return Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts"))


class ServerConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(4, ge=1, le=64, description="gRPC worker threads")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads")
    max_batch: int = Field(512, ge=1, le=4096, description="images per Predict call")
    target: Path = Field(default_factory=lambda: artifacts_dir() / "target.pt")
    artifacts: Path = Field(default_factory=artifacts_dir)
    monitor_config: Path | None = None     # None: the monitor's shipped default
    monitor_db: Path = Field(default_factory=lambda: Path(
        os.environ.get("MODELGUARD_MONITOR_DB", str(artifacts_dir() / "monitor.db"))))
    api_keys: Path | None = None           # None: open mode, any non-empty key is a client
    secret: str = Field(default_factory=lambda: os.environ.get("MODELGUARD_SECRET",
                                                               DEFAULT_SECRET), repr=False)
    grace_s: float = Field(5.0, ge=0)
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="serve Prometheus metrics on host:port/metrics "
                                                 "(0: a free port); None: no metrics")
    undefended: bool = Field(False, description="answer with the plain target at every level "
                                                "(the monitor still watches and logs): a baseline")
    monitor: bool = Field(True, description="run the monitor; False: a null monitor (no "
                                            "detectors, no log, every client NORMAL), for "
                                            "measuring the server without it")

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v:
            raise ValueError("host must not be empty")
        return v

    @property
    def max_message_bytes(self) -> int:
        # the largest valid request (FP32) plus headroom for the envelope
        return self.max_batch * 28 * 28 * 4 + 64 * 1024
