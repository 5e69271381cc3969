"""The monitor CLI names a client by its API key: an open-mode server logs a keyed hash of the
key, never the key, and ``--key`` with the server's secret finds that client again."""
from __future__ import annotations

import numpy as np

from common import data
from monitor.cli import main as cli


def test_key_finds_the_client_an_open_mode_server_logged(grpc_target, tmp_path, capsys):
    from tests.conftest import TEST_SECRET

    x = data.attack_pool().x[:40]
    grpc_target.client("mallory-cli").predict(x)
    grpc_target.plane.monitor.flush()
    db = str(grpc_target.monitor_db)
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET + "\n")

    capsys.readouterr()
    assert cli(["--db", db, "clients"]) == 0
    assert "mallory-cli" not in capsys.readouterr().out      # the key is never in the log

    assert cli(["--db", db, "show", "--key", "mallory-cli", "--secret-file", str(secret)]) == 0
    out = capsys.readouterr().out
    assert "40 queries logged" in out and "mallory-cli" not in out

    wrong = tmp_path / "wrong"
    wrong.write_text("another-secret-of-enough-length-0123456789")
    assert cli(["--db", db, "show", "--key", "mallory-cli", "--secret-file", str(wrong)]) == 2
    assert "unknown client" in capsys.readouterr().err

    assert cli(["--db", db, "show", "--secret-file", str(secret), "--key", "mallory-cli",
                "k-0000000000000000"]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli(["--db", db, "show"]) == 2
    assert "name the client" in capsys.readouterr().err

    out_csv = tmp_path / "q.csv"
    assert cli(["--db", db, "export", "--secret-file", str(secret), "--key", "mallory-cli",
                "-o", str(out_csv)]) == 0
    assert len(out_csv.read_text().splitlines()) == 1 + 40
    assert np.all([line.split(",")[1].startswith("k-")
                   for line in out_csv.read_text().splitlines()[1:]])


def test_id_prints_what_the_server_logs(grpc_target, tmp_path, capsys):
    from tests.conftest import TEST_SECRET

    grpc_target.client("ida").predict(data.attack_pool().x[:3])
    grpc_target.plane.monitor.flush()
    secret = tmp_path / "secret"
    secret.write_text(TEST_SECRET)
    capsys.readouterr()
    assert cli(["id", "--secret-file", str(secret), "ida", "not valid"]) == 0
    lines = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())
    assert "invalid" in lines["not valid"]
    assert cli(["--db", str(grpc_target.monitor_db), "show", lines["ida"]]) == 0
    assert "3 queries logged" in capsys.readouterr().out
