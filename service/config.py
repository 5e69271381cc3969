"""The server's one validated configuration object. Values come from defaults, then environment
variables (MODELGUARD_*), then command-line flags (service/__main__.py).

Security posture (docs/security.md): the server refuses to start (:meth:`ServerConfig.
startup_problems`, checked by service.server.Server) without a secret of at least
MIN_SECRET_BYTES bytes unless ``dev_secret`` is set, and without being told how clients are
identified: a keys file (``api_keys``) or open mode (``open_keys``), not both.
"""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from common.keys import MIN_SECRET_BYTES

# Public, in the source: only ever used with dev_secret (--dev-secret) and then with a warning.
DEFAULT_SECRET = "modelguard-dev-secret"


def read_secret_file(path: Path) -> str:
    """The secret in ``path`` (surrounding whitespace removed). ValueError naming the path when
    it cannot be read."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the secret file {path}: {exc}") from None


def _default_secret() -> str:
    """$MODELGUARD_SECRET, else the contents of $MODELGUARD_SECRET_FILE, else the public
    development secret (which the server accepts only with dev_secret)."""
    if os.environ.get("MODELGUARD_SECRET"):
        return os.environ["MODELGUARD_SECRET"]
    if os.environ.get("MODELGUARD_SECRET_FILE"):
        return read_secret_file(Path(os.environ["MODELGUARD_SECRET_FILE"]))
    return DEFAULT_SECRET


def artifacts_dir() -> Path:
    return Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts"))


class ServerConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    workers: int = Field(4, ge=1, le=64, description="gRPC worker threads (with aio: the "
                         "threads for the parts of calls that may wait)")
    aio: bool = Field(False, description="serve on grpc.aio's event loop: the short parts of a "
                      "call run on the loop, only those that may wait or run long on the "
                      "workers (service/aio.py; README, section 6)")
    compute_slots: int = Field(0, ge=0, le=64, description="Predict calls of more than "
                               "small_request_items images computing at once "
                               "(model, policies, detectors; waits on I/O excluded); 0: no "
                               "limit. 1: one at a time (no GIL hand-offs between them, "
                               "but no two large batches in numpy on two cores either)")
    small_request_items: int = Field(16, ge=0, le=4096, description="Predict calls of at "
                                     "most this many images compute one at a time, in a slot "
                                     "of their own (such a call holds the GIL nearly "
                                     "throughout: two of them only trade it back and forth); "
                                     "larger calls follow compute_slots. 0: no such slot")
    torch_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads")
    max_batch: int = Field(512, ge=1, le=4096, description="images per Predict call")
    target: Path = Field(default_factory=lambda: artifacts_dir() / "target.pt")
    artifacts: Path = Field(default_factory=artifacts_dir)
    monitor_config: Path | None = None     # None: the monitor's shipped default
    monitor_db: Path = Field(default_factory=lambda: Path(
        os.environ.get("MODELGUARD_MONITOR_DB", str(artifacts_dir() / "monitor.db"))))
    store: str | None = Field(None, description="postgresql://USER@HOST:PORT/DB: keep the "
                              "monitor's state in PostgreSQL, shared by replicas "
                              "(docs/scaleout.md); None: the SQLite file monitor_db")
    replica: str | None = Field(None, description="this replica's name in the shared store "
                                "(default: host-pid)")
    monitor_address: str | None = Field(None, description="HOST:PORT of a monitor started with "
                                        "`python -m monitor serve`: the server connects to it "
                                        "(sets the monitor config's [execution] mode = "
                                        "\"process\" and address); None: the config decides")
    monitor_tls_ca: Path | None = Field(None, description="with monitor_address: PEM CA bundle "
                                        "that signed the monitor's certificate: the link is "
                                        "TLS (sets [execution] tls_ca); None: the config "
                                        "decides")
    api_keys: Path | None = Field(None, description="TOML of name = \"key\" lines: only "
                                                    "these keys pass, the client id is the name")
    open_keys: bool = Field(False, description="open mode: any well-formed key is a client, "
                                               "its id a keyed hash of the key; must be asked "
                                               "for when there is no keys file")
    secret: str = Field(default_factory=_default_secret, repr=False)
    dev_secret: bool = Field(False, description="development only: accept the public built-in "
                                                "secret or one shorter than MIN_SECRET_BYTES")
    tls_cert: Path | None = Field(None, description="PEM certificate chain: serve TLS only")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(None, description="PEM CA bundle: mutual TLS, clients "
                                                         "must present a certificate it signed")
    grace_s: float = Field(5.0, ge=0)
    metrics_port: int | None = Field(None, ge=0, le=65535,
                                     description="serve Prometheus metrics on host:port/metrics "
                                                 "(0: a free port); None: no metrics")
    undefended: bool = Field(False, description="answer with the plain target at every level "
                                                "(the monitor still watches and logs): a baseline")
    monitor: bool = Field(True, description="run the monitor; False: a null monitor (no "
                                            "detectors, no log, every client NORMAL), for "
                                            "measuring the server without it")

    @field_validator("monitor_address")
    @classmethod
    def _monitor_address(cls, v: str | None) -> str | None:
        if v:
            from monitor.config import parse_address
            parse_address(v)
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not v:
            raise ValueError("host must not be empty")
        return v

    def startup_problems(self) -> list[str]:
        """Why a server with this config must not start ([] when it may)."""
        out = []
        n = len(self.secret.encode())
        if not self.dev_secret:
            if self.secret == DEFAULT_SECRET:
                out.append("no secret configured: set MODELGUARD_SECRET, MODELGUARD_SECRET_FILE "
                           f"or --secret-file (at least {MIN_SECRET_BYTES} random bytes; `make "
                           "serve` generates artifacts/secret), or pass --dev-secret to serve "
                           "with the public development secret")
            elif n < MIN_SECRET_BYTES:
                out.append(f"the secret has {n} bytes; at least {MIN_SECRET_BYTES} are needed "
                           "(e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`), "
                           "or pass --dev-secret for development")
        if self.api_keys is None and not self.open_keys:
            out.append("no client keys configured: pass --api-keys keys.toml (only listed keys) "
                       "or --open-keys (any key is a client; `make serve` does)")
        if self.api_keys is not None and self.open_keys:
            out.append("--api-keys and --open-keys both given; choose one")
        if (self.tls_cert is None) != (self.tls_key is None):
            out.append("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            out.append("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        return out

    @property
    def weak_secret(self) -> bool:
        return self.secret == DEFAULT_SECRET or len(self.secret.encode()) < MIN_SECRET_BYTES

    @property
    def max_message_bytes(self) -> int:
        # the largest valid request (FP32) plus headroom for the envelope
        return self.max_batch * 28 * 28 * 4 + 64 * 1024
