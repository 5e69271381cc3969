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


def _small_log(path):
    """A schema-3 log with one client of 12 items through the real monitor."""
    from common.clock import FakeClock
    from common.types import Answer, AnswerKind
    from monitor import Monitor, load_config

    rng = np.random.default_rng(1)
    x = rng.random((12, 28, 28), np.float32)
    p = np.full((12, 10), 0.1, np.float32)
    with Monitor(load_config(), path, clock=FakeClock()) as mon:
        for i in (0, 6):
            mon.observe("a", "r", x[i:i + 6], p[i:i + 6],
                        Answer(p[i:i + 6].argmax(1), p[i:i + 6], AnswerKind.PROBABILITIES),
                        mon.level("a"))
    return x


def test_schema_2_log_is_migrated_in_place_and_reads_the_same(tmp_path):
    db = tmp_path / "m.db"
    _small_log(db)
    with QueryLog(db) as q:
        want = q.series("a")
    con = sqlite3.connect(db)          # make it a schema-2 file, as the previous version wrote
    cols = [r[1] for r in con.execute("PRAGMA table_info(requests)") if r[1] != "layout"]
    con.execute(f"CREATE TABLE v2 AS SELECT {', '.join(cols)} FROM requests")
    con.execute("DROP TABLE requests")
    con.execute("ALTER TABLE v2 RENAME TO requests")
    con.execute("DROP TABLE score_layouts")
    con.execute("UPDATE meta SET value='2' WHERE key='schema'")
    con.commit()
    con.close()
    with QueryLog(db) as q:            # read-only: read in place, not migrated
        np.testing.assert_array_equal(q.series("a")["s_volume"], want["s_volume"])
    assert sqlite3.connect(db).execute("SELECT value FROM meta WHERE key='schema'"
                                       ).fetchone()[0] == "2"
    from monitor.log import Writer
    w = Writer(db)                     # a writer migrates it, then appends
    w.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "3"
    assert con.execute("SELECT count(*) FROM requests WHERE layout = 0").fetchone()[0] == 2
    con.close()
    with QueryLog(db) as q:
        got = q.series("a")
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_rows_written_with_other_detectors_map_onto_this_versions_columns(tmp_path):
    """A detector added (a column this version does not know) or removed (a column missing):
    known scores and firing bits land in their columns, the rest is NaN / not fired."""
    import json

    from monitor.log import SCORE_COLUMNS
    db = tmp_path / "m.db"
    _small_log(db)
    con = sqlite3.connect(db)
    other = ["s_new_detector", "s_volume", "s_prada"]          # another version's layout
    con.execute("INSERT INTO score_layouts VALUES (7, ?)", (json.dumps(other),))
    n = 6
    sc = np.column_stack([np.full(n, 9.0), np.arange(n, dtype=np.float64), np.full(n, 0.5)])
    fired = np.array([0b011, 0b100, 0, 0b010, 0, 0], np.uint8)    # new+volume, prada, volume
    con.execute("UPDATE requests SET layout=7, scores=?, fired=? WHERE qn0=0",
                (sc.tobytes(), fired.tobytes()))
    con.commit()
    con.close()
    with QueryLog(db) as q:
        rows = [r for r in q.iter_rows("a") if r["qn"] <= n]
    assert [r["s_volume"] for r in rows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert all(r["s_prada"] == 0.5 for r in rows)
    assert all(r["s_ood"] is None and r["s_near_duplicate"] is None for r in rows)
    bit = {c: 1 << i for i, c in enumerate(SCORE_COLUMNS)}
    assert [r["fired"] for r in rows] == [bit["s_volume"], bit["s_prada"], 0, bit["s_volume"],
                                          0, 0]


def test_a_log_from_a_newer_version_is_refused_by_name(tmp_path):
    db = tmp_path / "m.db"
    _small_log(db)
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value='9' WHERE key='schema'")
    con.commit()
    con.close()
    with pytest.raises(SchemaError, match="newer modelguard.*schema 9"):
        QueryLog(db)
    from monitor import Monitor, load_config
    with pytest.raises(SchemaError, match="schema 9"):
        Monitor(load_config(), db)
