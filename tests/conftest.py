"""Shared fixtures: small real data, a small trained target, and a real in-process gRPC server."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# The secret of the in-process test servers: long enough that they start without --dev-secret.
TEST_SECRET = "test-secret-0123456789abcdef0123456789"
if not os.environ.get("MODELGUARD_DATA") and (REPO.parent / "shared" / "data").exists():
    os.environ["MODELGUARD_DATA"] = str(REPO.parent / "shared" / "data")


@pytest.fixture(scope="session")
def small_target(tmp_path_factory):
    """An MLP target trained on the first 3,000 train images for 3 epochs (a few seconds)."""
    from service.train import train_target

    path = tmp_path_factory.mktemp("target") / "target.pt"
    meta = train_target(path, epochs=3, limit=3000, progress=False)
    return path, meta


class GrpcTarget:
    """A real gRPC server on a free port, in process, answering with ``small_target``."""

    def __init__(self, server, plane, monitor_db: Path):
        self.server = server
        self.plane = plane
        self.address = server.address
        self.monitor_db = monitor_db

    def client_id(self, api_key: str) -> str:
        """How the server names ``api_key``'s client in its log (open mode: a keyed hash)."""
        return self.server.client_id(api_key)

    def oracle(self, api_key: str, budget: int | None = None, labels_only: bool = False):
        from client.api import RemoteOracle

        return RemoteOracle(self.address, api_key, budget, labels_only=labels_only)

    def client(self, api_key: str | None = "tester"):
        from client.api import ModelClient

        return ModelClient(self.address, api_key)


def start_server(target_path: Path, workdir: Path, policies: dict | None = None,
                 max_batch: int = 64, **server_config):
    """Server with the real monitor (shipped default detectors and rules) and the given
    per-level policy specs (default: identity at every level, i.e. undefended answers), in open
    mode with TEST_SECRET; ``server_config``: more ServerConfig fields (TLS, keys file...)."""
    from common.types import Level
    from monitor import load_config
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    policies = policies or {lvl: {"policy": "identity"} for lvl in Level if lvl != Level.BLOCK}
    config = load_config(None).model_copy(update={"policies": policies, "watermark": {}})
    server_config = {"secret": TEST_SECRET, "open_keys": "api_keys" not in server_config,
                     **server_config}
    cfg = ServerConfig(port=0, max_batch=max_batch, workers=4, artifacts=workdir,
                       target=target_path, monitor_db=workdir / "monitor.db", grace_s=1.0,
                       **server_config)
    plane = build_dataplane(cfg, config)
    return Server(cfg, plane).start(), plane, cfg.monitor_db


@pytest.fixture(scope="session")
def grpc_target(small_target, tmp_path_factory):
    server, plane, db = start_server(small_target[0], tmp_path_factory.mktemp("server"))
    yield GrpcTarget(server, plane, db)
    server.stop(0.5)
