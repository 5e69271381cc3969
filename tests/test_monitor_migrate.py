"""Logs written before the batched monitor (schema 1: a row per item) are refused with a clear
error and can be migrated; a migrated log replays to the same escalations."""
from __future__ import annotations

import sqlite3
import zlib

import numpy as np
import pytest

from monitor import QueryLog
from monitor.cli import main as cli
from monitor.log import SchemaError

V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE queries (seq INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL,
  qn INTEGER NOT NULL, t REAL NOT NULL, request_id TEXT, item INTEGER NOT NULL,
  digest TEXT NOT NULL, target_label INTEGER NOT NULL, target_top REAL NOT NULL,
  target_probs BLOB NOT NULL, level INTEGER NOT NULL, kind INTEGER NOT NULL,
  sent_label INTEGER NOT NULL, sent_top REAL, model TEXT, watermarked INTEGER NOT NULL,
  s_prada REAL, s_ood REAL, s_similarity REAL, s_volume REAL, s_near_duplicate REAL,
  fired INTEGER NOT NULL, level_after INTEGER NOT NULL, raw_fmt INTEGER NOT NULL, raw BLOB);
CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, client TEXT NOT NULL,
  t REAL NOT NULL, qn INTEGER NOT NULL, from_level INTEGER NOT NULL, to_level INTEGER NOT NULL,
  rule TEXT NOT NULL, evidence TEXT NOT NULL);
CREATE TABLE client_state (client TEXT PRIMARY KEY, qn INTEGER NOT NULL, level INTEGER NOT NULL,
  config_hash TEXT NOT NULL, state BLOB NOT NULL, updated REAL NOT NULL);
"""


def _v1_db(path, rng):
    """Two clients, requests of 3 and 2 items; one float (off-grid) input, one watermarked."""
    con = sqlite3.connect(path)
    con.executescript(V1)
    items = []
    for client in ("a", "b"):
        qn = 0
        for req, n in enumerate((3, 2)):
            for i in range(n):
                qn += 1
                grid = not (client == "b" and qn == 4)
                x = (rng.integers(0, 256, (28, 28)) / 255.0).astype(np.float32) if grid else \
                    rng.random((28, 28)).astype(np.float16).astype(np.float32)
                fmt, raw = ((1, zlib.compress(np.rint(x * 255).astype(np.uint8).tobytes()))
                            if grid else (2, zlib.compress(x.astype(np.float16).tobytes())))
                p = np.full(10, 0.05, np.float32)
                p[qn % 10] = 0.55
                wm = int(client == "a" and qn == 2)
                con.execute("INSERT INTO queries (client, qn, t, request_id, item, digest, "
                            "target_label, target_top, target_probs, level, kind, sent_label, "
                            "sent_top, model, watermarked, s_prada, s_ood, s_similarity, "
                            "s_volume, s_near_duplicate, fired, level_after, raw_fmt, raw) "
                            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                            (client, qn, 100.0 + req, f"{client}{req}", i, "x", qn % 10, 0.55,
                             p.tobytes(), 0, 0, (qn + wm) % 10, 0.55, "target", wm, None, 0.5,
                             None, float(qn), None, 0, 0, fmt, raw))
                items.append((client, qn, x))
    con.execute("INSERT INTO transitions (client, t, qn, from_level, to_level, rule, evidence) "
                "VALUES ('a', 101.0, 4, 0, 2, 'r', '[]')")
    con.commit()
    con.close()
    return items


def test_old_log_is_refused_then_migrated(tmp_path, capsys):
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    items = _v1_db(old, np.random.default_rng(0))
    with pytest.raises(SchemaError, match="older modelguard"):
        QueryLog(old)
    assert cli(["--db", str(old), "clients"]) == 2
    assert "migrate NEW.db" in capsys.readouterr().err
    assert cli(["--db", str(old), "migrate", str(new)]) == 0
    with QueryLog(new) as q:
        assert q.client_ids() == ["a", "b"]
        assert q.max_qn("a") == 5 and q.last_level("a").name == "LABEL_ONLY"
        reqs = list(q.requests("b"))
        assert [(r[0], len(r[3])) for r in reqs] == [(1, 3), (4, 2)]
        got = np.concatenate([r[2] for r in reqs])
        want = np.stack([x for c, _, x in items if c == "b"])
        np.testing.assert_array_equal(got, want)        # grid and float16 inputs both exact
        rows = list(q.iter_rows("a"))
        assert [r["s_volume"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
        wx, wl, wc = q.watermark_records()
        assert wc == ["a"] and wl.tolist() == [3]
    assert cli(["--db", str(old), "migrate", str(new)]) == 2  # never overwrites
