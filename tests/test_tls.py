"""TLS and mutual TLS on a real in-process server, with certificates the test makes itself (the
``openssl`` binary): a TLS client gets answers, a plaintext client and a client trusting another
CA do not; under mutual TLS a client without a certificate is refused."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from client.api import ApiError, ModelClient
from lab.certs import have_openssl, make_certs

pytestmark = pytest.mark.skipif(not have_openssl(), reason="needs openssl")

X = np.zeros((2, 28, 28), np.uint8)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server(small_target, workdir, certs, mutual=False):
    from tests.conftest import start_server

    extra = {"tls_client_ca": certs / "ca.pem"} if mutual else {}
    server, _, _ = start_server(small_target[0], workdir, tls_cert=certs / "server.pem",
                                tls_key=certs / "server.key", **extra)
    # health says NOT_SERVING until the monitor has restored its clients in the background
    # (on a busy test process that took more than the tests before the health one, once)
    deadline = time.monotonic() + 30
    while not server._serving and time.monotonic() < deadline:
        time.sleep(0.02)
    return server


@pytest.fixture(scope="module")
def tls_server(small_target, tmp_path_factory, certs):
    server = _server(small_target, tmp_path_factory.mktemp("tls"), certs)
    yield server
    server.stop(0.5)


@pytest.fixture(scope="module")
def mtls_server(small_target, tmp_path_factory, certs):
    server = _server(small_target, tmp_path_factory.mktemp("mtls"), certs, mutual=True)
    yield server
    server.stop(0.5)


def _predict(address, **kw):
    with ModelClient(address, "tls-tester", timeout=10, **kw) as c:
        return c.predict(X)


def test_tls_client_gets_answers(tls_server, certs):
    a = _predict(tls_server.address, tls_ca=certs / "ca.pem")
    assert len(a.labels) == 2 and a.probs is not None
    # the CA as bytes, and the certificate's DNS name instead of the address's IP
    port = tls_server.port
    a = _predict(f"localhost:{port}", tls_ca=(certs / "ca.pem").read_bytes())
    assert len(a.labels) == 2
    assert tls_server.tls


def test_plaintext_and_untrusting_clients_fail(tls_server, certs):
    with pytest.raises(ApiError) as err:
        _predict(tls_server.address)                                    # plaintext
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ApiError) as err:
        _predict(tls_server.address, tls_ca=certs / "other-ca.pem")     # wrong CA
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ApiError) as err:                                # name not in the cert
        _predict(tls_server.address, tls_ca=certs / "ca.pem", tls_server_name="evil.test")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


def test_health_over_tls_needs_no_key(tls_server, certs):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials((certs / "ca.pem").read_bytes())
    with grpc.secure_channel(tls_server.address, creds) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_refuses_clients_without_a_certificate(mtls_server, certs):
    ca = certs / "ca.pem"
    a = _predict(mtls_server.address, tls_ca=ca, tls_cert=certs / "client.pem",
                 tls_key=certs / "client.key")
    assert len(a.labels) == 2
    for kw in ({"tls_ca": ca},                                             # no certificate
               {"tls_ca": ca, "tls_cert": certs / "stranger.pem",          # another CA's
                "tls_key": certs / "stranger.key"},
               {}):                                                         # plaintext
        with pytest.raises(ApiError) as err:
            _predict(mtls_server.address, **kw)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, kw
    with pytest.raises(ValueError, match="go together"):
        ModelClient(mtls_server.address, "k", tls_ca=ca, tls_cert=certs / "client.pem")


def test_client_cli_flags_reach_the_oracle(tls_server, certs):
    """python -m client ATTACK --tls-ca ...: the attacks' oracles connect over TLS."""
    import argparse

    from client.cli import _add_common, _oracles

    p = argparse.ArgumentParser()
    _add_common(p)
    args = p.parse_args(["--address", tls_server.address, "--api-key", "cli-tls",
                         "--tls-ca", str(certs / "ca.pem"), "--sybil", "2"])
    oracles = _oracles(args, 10)
    try:
        assert [len(o(X)) for o in oracles] == [2, 2]
    finally:
        for o in oracles:
            o.close()
    args = p.parse_args(["--address", tls_server.address, "--api-key", "cli-plain"])
    [plain] = _oracles(args, 10)
    with pytest.raises(ApiError):
        plain(X)
    plain.close()


def test_server_refuses_unreadable_or_non_pem_files(small_target, tmp_path, certs):
    from service.errors import ConfigError

    (tmp_path / "junk.pem").write_text("not a certificate")
    for kw, match in [({"tls_cert": certs / "server.pem", "tls_key": tmp_path / "nope.key"},
                       "cannot read the TLS private key"),
                      ({"tls_cert": tmp_path / "junk.pem", "tls_key": certs / "server.key"},
                       "is not PEM")]:
        with pytest.raises(ConfigError, match=match):
            _server_with(small_target, tmp_path / match[:6].replace(" ", "-"), **kw)


def _server_with(small_target, workdir, **kw):
    from tests.conftest import start_server

    workdir.mkdir(parents=True, exist_ok=True)
    server, _, _ = start_server(small_target[0], workdir, **kw)
    server.stop(0.1)


def test_serve_cli_has_the_tls_flags(monkeypatch, certs):
    import service.__main__ as cli

    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem",
                     "--tls-client-ca", "ca.pem", "--open-keys", "--dev-secret"]) == 0
    assert (seen["tls_cert"], seen["tls_key"], seen["tls_client_ca"]) == (
        Path("c.pem"), Path("k.pem"), Path("ca.pem"))
    assert seen["open_keys"] is True and seen["dev_secret"] is True
