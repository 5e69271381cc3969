"""The persistent query log (SQLite, WAL mode) and its background writer.

Tables
  queries      one row per answered item (see ``QUERY_COLUMNS``), raw input kept compactly
  transitions  every level change with time, query count and evidence (JSON)
  client_state pickled detector/ladder state per client, written on clean shutdown
  meta         schema version

Writes go through :class:`Writer`, a daemon thread that batches rows into transactions; the
request path only enqueues numpy arrays. ``Writer.close()`` drains the queue, so everything
enqueued before it is on disk afterwards.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import pickle
import queue
import sqlite3
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from common.types import Level

SCHEMA_VERSION = "1"
# raw_fmt: 1-3 zlib-compressed (written before the batched monitor), 4-6 plain bytes
RAW_NONE, RAW_U8, RAW_F16, RAW_F32 = 0, 1, 2, 3
RAW_U8_PLAIN, RAW_F16_PLAIN, RAW_F32_PLAIN = 4, 5, 6

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS queries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL,
    qn INTEGER NOT NULL,            -- the client's query number, 1-based
    t REAL NOT NULL,                -- request time (unix seconds) used by the detectors
    request_id TEXT,
    item INTEGER NOT NULL,          -- index within the request
    digest TEXT NOT NULL,           -- blake2b-64 of the float32 input as received, 16 hex
    target_label INTEGER NOT NULL,
    target_top REAL NOT NULL,
    target_probs BLOB NOT NULL,     -- float32 (10,)
    level INTEGER NOT NULL,         -- defence level the answer was sent with
    kind INTEGER NOT NULL,          -- AnswerKind
    sent_label INTEGER NOT NULL,
    sent_top REAL,                  -- top probability sent (NULL for label-only)
    model TEXT,
    watermarked INTEGER NOT NULL,
    s_prada REAL, s_ood REAL, s_similarity REAL, s_volume REAL, s_near_duplicate REAL,
    fired INTEGER NOT NULL,         -- bitmask over (prada, ood, similarity, volume, near_duplicate)
    level_after INTEGER NOT NULL,   -- client level after this item
    raw_fmt INTEGER NOT NULL,       -- 0 none; uint8, float16, float32: 1-3 zlib, 4-6 plain
    raw BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS queries_client_qn ON queries(client, qn);
CREATE INDEX IF NOT EXISTS queries_t ON queries(t);
CREATE INDEX IF NOT EXISTS queries_wm ON queries(watermarked) WHERE watermarked = 1;
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL,
    t REAL NOT NULL,
    qn INTEGER NOT NULL,
    from_level INTEGER NOT NULL,
    to_level INTEGER NOT NULL,
    rule TEXT NOT NULL,
    evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_client ON transitions(client, id);
CREATE TABLE IF NOT EXISTS client_state (
    client TEXT PRIMARY KEY,
    qn INTEGER NOT NULL,
    level INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    state BLOB NOT NULL,
    updated REAL NOT NULL
);
"""

SCORE_COLUMNS = ("s_prada", "s_ood", "s_similarity", "s_volume", "s_near_duplicate")


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    path = Path(path)
    if not create and not path.exists():
        raise FileNotFoundError(f"no monitor database at {path}")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    if create:
        con.executescript(SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        con.commit()
    return con


def decode_raw(fmt: int, blob: bytes | None) -> np.ndarray | None:
    if fmt == RAW_NONE or blob is None:
        return None
    b = zlib.decompress(blob) if fmt in (RAW_U8, RAW_F16, RAW_F32) else blob
    if fmt in (RAW_U8, RAW_U8_PLAIN):
        return (np.frombuffer(b, np.uint8).astype(np.float32) / np.float32(255.0)).reshape(28, 28)
    if fmt in (RAW_F16, RAW_F16_PLAIN):
        return np.frombuffer(b, np.float16).astype(np.float32).reshape(28, 28)
    return np.frombuffer(b, np.float32).copy().reshape(28, 28)


@dataclass
class Batch:
    """One observe() call as handed to the writer (numpy, encoded to rows off the request path)."""

    client: str
    qn0: int
    t: float
    request_id: str
    images: np.ndarray       # float32 (N,28,28) as received
    on_grid: np.ndarray      # bool (N,)
    target_probs: np.ndarray
    level: int
    kind: int
    sent_labels: np.ndarray
    sent_top: np.ndarray | None
    models: list[str]
    watermarked: np.ndarray
    scores: np.ndarray       # float64 (N,4), NaN = none
    fired: np.ndarray        # int (N,)
    level_after: np.ndarray  # int (N,)
    keep_raw: bool

    def rows(self) -> list[tuple]:
        """The batch's log rows, built with array operations: one digest and one raw blob per
        item are the only per-item work (no compression: SQLite pages hold them as they are)."""
        n = len(self.images)
        x = np.ascontiguousarray(self.images, np.float32).reshape(n, -1)
        xb = x.tobytes()
        step = x.shape[1] * 4
        digests = [hashlib.blake2b(xb[i * step:(i + 1) * step], digest_size=8).hexdigest()
                   for i in range(n)]
        wm = np.asarray(self.watermarked, bool)
        store = np.ones(n, bool) if self.keep_raw else wm.copy()
        fmts = np.zeros(n, np.int64)
        raws: list[bytes | None] = [None] * n
        if store.any():
            grid = np.asarray(self.on_grid, bool) & store
            u8 = np.rint(x[grid] * 255.0).astype(np.uint8).tobytes()
            for k, i in enumerate(np.flatnonzero(grid)):
                raws[i] = u8[k * 784:(k + 1) * 784]
            fmts[grid] = RAW_U8_PLAIN
            f32 = store & ~grid & wm            # watermarked items: lossless
            for i in np.flatnonzero(f32):
                raws[i] = x[i].tobytes()
            fmts[f32] = RAW_F32_PLAIN
            f16 = store & ~grid & ~wm
            h = x[f16].astype(np.float16).tobytes()
            for k, i in enumerate(np.flatnonzero(f16)):
                raws[i] = h[k * 1568:(k + 1) * 1568]
            fmts[f16] = RAW_F16_PLAIN
        p = np.asarray(self.target_probs, np.float32).reshape(n, -1)
        pb = p.tobytes()
        ps = p.shape[1] * 4
        labels = p.argmax(1).tolist()
        tops = p.max(1).astype(np.float64).tolist()
        sent = np.asarray(self.sent_labels).astype(np.int64).tolist()
        top = [None] * n if self.sent_top is None else \
            np.asarray(self.sent_top, np.float64).tolist()
        models = list(self.models) + [None] * (n - len(self.models))
        sc = np.asarray(self.scores, np.float64)
        scores = np.where(np.isnan(sc), None, sc.astype(object)).tolist()
        fired = np.asarray(self.fired).astype(np.int64).tolist()
        after = np.asarray(self.level_after).astype(np.int64).tolist()
        wml = wm.astype(np.int64).tolist()
        fl = fmts.tolist()
        c, t, rid, lvl, kind, q0 = self.client, self.t, self.request_id, self.level, self.kind, \
            self.qn0
        return [(c, q0 + i + 1, t, rid, i, digests[i], labels[i], tops[i],
                 pb[i * ps:(i + 1) * ps], lvl, kind, sent[i], top[i], models[i], wml[i],
                 *scores[i], fired[i], after[i], fl[i], raws[i]) for i in range(n)]


INSERT_QUERY = ("INSERT INTO queries (client, qn, t, request_id, item, digest, target_label, "
                "target_top, target_probs, level, kind, sent_label, sent_top, model, watermarked, "
                + ", ".join(SCORE_COLUMNS) + ", fired, level_after, raw_fmt, raw) "
                "VALUES (" + ",".join("?" * (19 + len(SCORE_COLUMNS))) + ")")


def transition_row(tr) -> tuple:
    return (tr.client, tr.t, tr.qn, int(tr.from_level), int(tr.to_level), tr.rule,
            json.dumps(tr.evidence))


_STOP = object()


class Writer(threading.Thread):
    """Background writer: takes Batch / Transition / state items from a queue, commits in
    transactions of up to ``batch_size`` rows or every ``flush_seconds``."""

    def __init__(self, path: str | Path, batch_size: int = 512, flush_seconds: float = 0.2,
                 retention_days: float = 0.0):
        super().__init__(name="monitor-log-writer", daemon=True)
        self.con = connect(path)
        self.q: queue.Queue = queue.Queue()
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.retention_days = retention_days
        self.error: BaseException | None = None
        self._last_retention = 0.0
        self._seq = itertools.count(1)
        self.committed = 0      # every item put with a ticket <= this is committed
        self.start()

    def put(self, item) -> int:
        """Queue an item; returns its ticket (compare with ``committed``)."""
        if self.error is not None:
            raise RuntimeError(f"monitor log writer failed: {self.error!r}") from self.error
        seq = next(self._seq)
        self.q.put((seq, item))
        return seq

    def _apply_retention(self) -> None:
        if self.retention_days > 0 and time.time() - self._last_retention > 3600:
            self.con.execute("DELETE FROM queries WHERE t < ?",
                             (time.time() - self.retention_days * 86400,))
            self._last_retention = time.time()

    def run(self) -> None:
        con = self.con
        stop = False
        try:
            self._apply_retention()
            con.commit()
            while not stop:
                try:
                    item = self.q.get(timeout=self.flush_seconds)
                except queue.Empty:
                    continue
                items = [item]
                nrows = len(item[1].images) if isinstance(item[1], Batch) else 1
                deadline = time.monotonic() + self.flush_seconds
                while nrows < self.batch_size and time.monotonic() < deadline:
                    try:
                        it = self.q.get_nowait()
                    except queue.Empty:
                        break
                    items.append(it)
                    nrows += len(it[1].images) if isinstance(it[1], Batch) else 1
                with con:  # one transaction
                    for _, it in items:
                        if it is _STOP:
                            stop = True
                        elif isinstance(it, Batch):
                            con.executemany(INSERT_QUERY, it.rows())
                        elif isinstance(it, tuple) and it[0] == "state":
                            con.execute("INSERT OR REPLACE INTO client_state VALUES (?,?,?,?,?,?)",
                                        it[1:])
                        else:  # Transition
                            con.execute("INSERT INTO transitions (client, t, qn, from_level, "
                                        "to_level, rule, evidence) VALUES (?,?,?,?,?,?,?)",
                                        transition_row(it))
                self._apply_retention()
                self.committed = items[-1][0]
                for _ in items:
                    self.q.task_done()
        except BaseException as exc:  # surfaced by put()/close()
            self.error = exc
        finally:
            con.close()

    def flush(self) -> None:
        self.q.join()
        if self.error is not None:
            raise RuntimeError(f"monitor log writer failed: {self.error!r}") from self.error

    def close(self) -> None:
        if self.is_alive():
            self.q.put((0, _STOP))
            self.join()
        if self.error is not None:
            raise RuntimeError(f"monitor log writer failed: {self.error!r}") from self.error


class QueryLog:
    """Read access to a monitor database (and the watermark verifier's entry point)."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        self.con = connect(self.path, create=create)
        self.con.row_factory = sqlite3.Row

    def close(self) -> None:
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # --- per-client summaries -------------------------------------------------------------------
    def client_ids(self) -> list[str]:
        return [r[0] for r in self.con.execute(
            "SELECT client FROM queries GROUP BY client UNION SELECT client FROM transitions "
            "UNION SELECT client FROM client_state ORDER BY 1")]

    def has_client(self, client: str) -> bool:
        return bool(self.con.execute(
            "SELECT 1 FROM queries WHERE client=? UNION SELECT 1 FROM transitions WHERE client=? "
            "UNION SELECT 1 FROM client_state WHERE client=? LIMIT 1",
            (client, client, client)).fetchone())

    def max_qn(self, client: str) -> int:
        r = self.con.execute("SELECT MAX(qn) FROM queries WHERE client=?", (client,)).fetchone()
        return int(r[0] or 0)

    def last_level(self, client: str) -> Level:
        r = self.con.execute("SELECT to_level FROM transitions WHERE client=? ORDER BY id DESC "
                             "LIMIT 1", (client,)).fetchone()
        return Level(r[0]) if r else Level.NORMAL

    def transitions(self, client: str | None = None) -> list[dict]:
        sql = "SELECT * FROM transitions" + (" WHERE client=?" if client else "") + " ORDER BY id"
        out = []
        for r in self.con.execute(sql, (client,) if client else ()):
            d = dict(r)
            d["evidence"] = json.loads(d["evidence"])
            d["from_level"], d["to_level"] = Level(d["from_level"]), Level(d["to_level"])
            out.append(d)
        return out

    def summary(self) -> list[dict]:
        rows = {r["client"]: dict(r) for r in self.con.execute(
            "SELECT client, COUNT(*) AS queries, MIN(t) AS first_t, MAX(t) AS last_t, "
            "MAX(qn) AS max_qn FROM queries GROUP BY client")}
        for c in self.client_ids():
            d = rows.setdefault(c, {"client": c, "queries": 0, "first_t": None, "last_t": None,
                                    "max_qn": 0})
            d["level"] = self.last_level(c)
            tr = self.con.execute("SELECT t, qn FROM transitions WHERE client=? ORDER BY id DESC "
                                  "LIMIT 1", (c,)).fetchone()
            d["escalated_t"], d["escalated_qn"] = (tr[0], tr[1]) if tr else (None, None)
            last = self.con.execute(
                "SELECT " + ", ".join(SCORE_COLUMNS) + ", fired FROM queries WHERE client=? "
                "ORDER BY qn DESC LIMIT 1", (c,)).fetchone()
            d["scores"] = ({k: last[k] for k in SCORE_COLUMNS} | {"fired": last["fired"]}
                           if last else {})
        return [rows[c] for c in sorted(rows)]

    def series(self, client: str) -> dict[str, np.ndarray]:
        """qn, t, scores, fired, level, level_after for plotting/export."""
        cur = self.con.execute("SELECT qn, t, " + ", ".join(SCORE_COLUMNS) + ", fired, level, "
                               "level_after FROM queries WHERE client=? ORDER BY qn", (client,))
        rows = cur.fetchall()
        cols = ["qn", "t", *SCORE_COLUMNS, "fired", "level", "level_after"]
        arr = np.array([tuple(np.nan if v is None else v for v in r) for r in rows],
                       dtype=np.float64).reshape(len(rows), len(cols))
        return {c: arr[:, i] for i, c in enumerate(cols)}

    def iter_rows(self, client: str | None = None, raw: bool = False) -> Iterator[dict]:
        cols = ("seq, client, qn, t, request_id, item, digest, target_label, target_top, level, "
                "kind, sent_label, sent_top, model, watermarked, " + ", ".join(SCORE_COLUMNS)
                + ", fired, level_after, raw_fmt" + (", raw" if raw else ""))
        sql = f"SELECT {cols} FROM queries" + (" WHERE client=?" if client else "") + \
            " ORDER BY seq"
        for r in self.con.execute(sql, (client,) if client else ()):
            yield dict(r)

    def stream(self, client: str, start_qn: int = 0, chunk: int = 4096):
        """Yield (item, t, x float32 (28,28) or None, target probs (10,)) in query order."""
        last = start_qn
        while True:
            rows = self.con.execute(
                "SELECT qn, item, t, target_probs, raw_fmt, raw FROM queries WHERE client=? "
                "AND qn>? ORDER BY qn LIMIT ?", (client, last, chunk)).fetchall()
            if not rows:
                return
            for r in rows:
                yield (r["item"], r["t"], decode_raw(r["raw_fmt"], r["raw"]),
                       np.frombuffer(r["target_probs"], np.float32))
            last = rows[-1]["qn"]

    def requests(self, client: str, after_qn: int = 0, chunk: int = 4096):
        """The client's logged requests after query ``after_qn``, in order, as the detectors
        saw them: yields (first qn, t, x float32 (n, 28, 28) or None when an input was not
        stored, target probs float32 (n, 10)). A request is the run of rows from an item 0 up
        to the next item 0."""
        cur: list = []
        cur_t = None
        first = after_qn + 1

        def emit():
            xs = [r[2] for r in cur]
            x = None if any(v is None for v in xs) else np.stack(xs)
            return first, cur_t, x, np.stack([r[3] for r in cur])

        for item, t, x, p in self.stream(client, after_qn, chunk):
            if item == 0 and cur:
                yield emit()
                first += len(cur)
                cur = []
            if not cur:
                cur_t = t
            cur.append((item, t, x, p))
        if cur:
            yield emit()

    def raw_complete(self, client: str) -> bool:
        r = self.con.execute("SELECT COUNT(*), MIN(qn) FROM queries WHERE client=? AND "
                             "(raw_fmt=0 OR raw IS NULL)", (client,)).fetchone()
        first = self.con.execute("SELECT MIN(qn) FROM queries WHERE client=?",
                                 (client,)).fetchone()[0]
        return r[0] == 0 and (first in (None, 1))

    def load_state(self, client: str):
        r = self.con.execute("SELECT qn, level, config_hash, state FROM client_state WHERE "
                             "client=?", (client,)).fetchone()
        if not r:
            return None
        return {"qn": r["qn"], "level": Level(r["level"]), "config_hash": r["config_hash"],
                "state": r["state"]}

    # --- watermark verifier ---------------------------------------------------------------------
    def watermark_records(self, client_id: str | None = None
                          ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images float32 (M,28,28) as received, labels sent (M,) int64, client ids) for every
        logged item whose answer was watermarked. Watermarked items are always stored
        losslessly, even with ``log.keep_raw = false``."""
        sql = "SELECT client, sent_label, raw_fmt, raw FROM queries WHERE watermarked=1"
        args: tuple = ()
        if client_id is not None:
            sql += " AND client=?"
            args = (client_id,)
        rows = self.con.execute(sql + " ORDER BY seq", args).fetchall()
        imgs = [decode_raw(r["raw_fmt"], r["raw"]) for r in rows]
        if any(i is None for i in imgs):
            raise RuntimeError("a watermarked item has no stored input (log written without raw)")
        x = np.stack(imgs).astype(np.float32) if imgs else np.zeros((0, 28, 28), np.float32)
        return x, np.array([r["sent_label"] for r in rows], dtype=np.int64), \
            [r["client"] for r in rows]


def pickle_state(engine) -> bytes:
    """Detector state as stored (plain pickle: the arrays are float encodings that compress
    poorly, and compressing megabytes would cost more than writing them)."""
    return pickle.dumps(engine, protocol=pickle.HIGHEST_PROTOCOL)


def unpickle_state(blob: bytes):
    if blob[:1] == b"\x80":          # a pickle
        return pickle.loads(blob)
    return pickle.loads(zlib.decompress(blob))  # written before the batched monitor
