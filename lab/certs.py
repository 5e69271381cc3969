"""Throwaway certificates for TLS experiments and tests, made with the ``openssl`` binary: two
CAs, a server certificate for 127.0.0.1 and localhost signed by the first, client certificates
signed by each (tests/test_tls.py, tests/test_monitor_remote.py, the remote-tls profiles of
lab.serving). Not for production: keys unencrypted, valid two days."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def have_openssl() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args, cwd: Path):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str, usage: str):
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n"
                   "basicConstraints=CA:FALSE\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext.name, cwd=d)


def make_certs(d: Path) -> Path:
    """In ``d``: ca.pem/key, other-ca.pem/key; server.pem/key (127.0.0.1 and localhost, by
    ca); client.pem/key (by ca); stranger.pem/key (by other-ca). Returns ``d``."""
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "IP:127.0.0.1,DNS:localhost", "serverAuth")
    _leaf(d, "client", "ca", "DNS:client.test", "clientAuth")
    _leaf(d, "stranger", "other-ca", "DNS:stranger.test", "clientAuth")
    return d
