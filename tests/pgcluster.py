"""A throwaway PostgreSQL for the tests: ``initdb`` + ``pg_ctl`` in a temp dir on a free port
(as the ``postgres`` user when the tests run as root), one per test session. Tests that need
it skip, with the reason, only when the binaries are missing and cannot be installed.

    from tests.pgcluster import pg_server   # noqa: F401  (a session fixture)
    def test_x(pg_server): pg_server.dsn
"""
from __future__ import annotations

import os
import tempfile
import uuid

import pytest


def _install_allowed() -> bool:
    return os.environ.get("MODELGUARD_PG_INSTALL", "1") != "0"


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    from deploy import pgserver

    try:
        import psycopg  # noqa: F401
    except ImportError as exc:  # pragma: no cover
        pytest.skip(f"psycopg is not installed ({exc}); pip install -r requirements.txt")
    if pgserver.find_bindir() is None:
        if not _install_allowed():
            pytest.skip("PostgreSQL binaries not found and MODELGUARD_PG_INSTALL=0")
        try:
            pgserver.install()
        except Exception as exc:  # noqa: BLE001
            pytest.skip(f"PostgreSQL binaries not found and could not be installed: {exc}")
    # not under pytest's tmp dir: its parents are private to root, and postgres runs as the
    # postgres user when we are root
    root = tempfile.mkdtemp(prefix="modelguard-pg-")
    srv = pgserver.PgServer(root, fsync=False).start()
    yield srv
    srv.destroy()


@pytest.fixture
def pg_schema(pg_server):
    """A fresh PostgreSQL schema name (a store of its own on the session's server)."""
    return "t_" + uuid.uuid4().hex[:12]
