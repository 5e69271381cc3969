"""The persistent query log (SQLite, WAL mode) and its background writer.

Tables
  requests     one row per answered request: the client, its query numbers qn0+1..qn0+n, time,
               level and answer kind, and per-item arrays as blobs (target probabilities, labels
               sent, detector scores, levels after each item, inputs kept compactly)
  transitions  every level change with time, query count and evidence (JSON)
  pairs        cross-client linking's evidence: attack-like near-copies between two keys
  client_state checkpoints of logs written before the checkpoint file (monitor.checkpoints)
  meta         schema version, the config the monitor ran with

One row per request, not per item: the writer's work is one INSERT per request (measured
~30 us per item with a row per item, most of it Python holding the GIL the request threads
need). Readers expand rows to items (``iter_rows``, ``series``, ``stream``).

Writes go through :class:`Writer`, a daemon thread that batches requests into transactions;
the request path only enqueues numpy arrays. ``Writer.close()`` drains the queue, so everything
enqueued before it is on disk afterwards.
"""
from __future__ import annotations

import io
import itertools
import json
import logging
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
from monitor.config import DETECTORS

log = logging.getLogger("modelguard.log")

SCHEMA_VERSION = "3"
# the detectors' score columns, in the registry's order (monitor.config.DETECTORS); each request
# row names the layout its scores were written in (score_layouts), so a log stays readable when
# detectors are added or removed. Layout 0 is the five detectors of schema 2.
SCORE_COLUMNS = tuple(d.column for d in DETECTORS)
NSCORES = len(SCORE_COLUMNS)
LEGACY_COLUMNS = ("s_prada", "s_ood", "s_similarity", "s_volume", "s_near_duplicate")
# how an item's input is kept (per item in iter_rows' raw_fmt)
RAW_NONE, RAW_U8, RAW_F16, RAW_F32 = 0, 1, 2, 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    client TEXT NOT NULL,
    qn0 INTEGER NOT NULL,           -- the client's query count before this request
    n INTEGER NOT NULL,             -- items; their query numbers are qn0+1..qn0+n
    t REAL NOT NULL,                -- request time (unix seconds) used by the detectors
    request_id TEXT,
    level INTEGER NOT NULL,         -- defence level the answer was sent with
    kind INTEGER NOT NULL,          -- AnswerKind
    target_probs BLOB NOT NULL,     -- float32 (n, 10)
    sent_labels BLOB NOT NULL,      -- int8 (n,)
    sent_top BLOB,                  -- float32 (n,): top probability sent; NULL for label-only
    models TEXT,                    -- JSON list of the model that answered each item
    n_wm INTEGER NOT NULL,          -- watermarked items
    watermarked BLOB,               -- uint8 (n,) 0/1; NULL when n_wm = 0
    scores BLOB NOT NULL,           -- float64 (n, 5) in SCORE_COLUMNS order, NaN = none
    fired BLOB NOT NULL,            -- uint8 (n,): bitmask over SCORE_COLUMNS' detectors
    level_after BLOB NOT NULL,      -- int8 (n,): client level after each item
    grid BLOB,                      -- uint8 (n,): 1 = input on the 0-255 grid; NULL = all on it
    raw_u8 BLOB,                    -- on-grid inputs, uint8 (k, 784)
    raw_f16 BLOB,                   -- other inputs, float16 (n - k, 784)
    raw_f32 BLOB,                   -- watermarked other inputs again, float32 (lossless)
    -- score_layouts.id: the columns of scores and fired
    layout INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS score_layouts (
    id INTEGER PRIMARY KEY,
    columns TEXT NOT NULL UNIQUE    -- JSON list of score columns, in order
);
CREATE UNIQUE INDEX IF NOT EXISTS requests_client_qn ON requests(client, qn0);
CREATE INDEX IF NOT EXISTS requests_t ON requests(t);
CREATE INDEX IF NOT EXISTS requests_wm ON requests(n_wm) WHERE n_wm > 0;
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
CREATE TABLE IF NOT EXISTS pairs (   -- cross-client linking: attack-like near-copies
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t REAL NOT NULL,
    client TEXT NOT NULL,           -- the key that sent the perturbed copy...
    qn INTEGER NOT NULL,            -- ...as its query qn
    other TEXT NOT NULL,            -- the key that sent the earlier query...
    other_qn INTEGER NOT NULL,      -- ...as its query other_qn
    dist REAL NOT NULL,             -- pixel L2
    dense REAL NOT NULL,            -- share of pixels perturbed (after the tone map)
    peak REAL NOT NULL              -- 99th percentile / RMS of the perturbation
);
CREATE INDEX IF NOT EXISTS pairs_client ON pairs(client);
CREATE INDEX IF NOT EXISTS pairs_other ON pairs(other);
CREATE TABLE IF NOT EXISTS client_state (
    client TEXT PRIMARY KEY,
    qn INTEGER NOT NULL,
    level INTEGER NOT NULL,
    config_hash TEXT NOT NULL,
    state BLOB NOT NULL,
    updated REAL NOT NULL
);
"""


class SchemaError(RuntimeError):
    """The database was written by another version of the monitor's log."""


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A reader's connection that never writes: works on read-only media and beside a live
    server (mode=ro); a WAL database on media where SQLite cannot create its shared-memory file
    is opened as immutable (a snapshot)."""
    uri = path.resolve().as_uri()
    con = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=30.0, check_same_thread=False)
    try:
        con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return con
    except sqlite3.OperationalError:
        con.close()
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    path = Path(path)
    if not create and not path.exists():
        raise FileNotFoundError(f"no monitor database at {path}")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    if create:
        con = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
    else:
        con = _connect_readonly(path)
    old = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='queries'"
                      ).fetchone()
    if old:
        con.close()
        raise SchemaError(f"{path} was written by an older modelguard (one row per item, schema "
                          f"1); this version logs one row per request (schema {SCHEMA_VERSION}). "
                          f"Convert it with `python -m monitor --db {path} migrate NEW.db`, or "
                          f"move it away (or point --monitor-db elsewhere) to start a new log")
    version = _schema_of(con)
    if version is not None and int(version) > int(SCHEMA_VERSION):
        con.close()
        raise SchemaError(f"{path} was written by a newer modelguard (log schema {version}); this "
                          f"version reads schemas up to {SCHEMA_VERSION}: upgrade modelguard, or "
                          f"point --monitor-db/--db elsewhere")
    if create:
        if version is not None and version != SCHEMA_VERSION:
            migrate_in_place(con, version, path)
        con.executescript(SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        con.execute("INSERT OR IGNORE INTO score_layouts VALUES (0, ?)",
                    (json.dumps(LEGACY_COLUMNS),))
        con.commit()
    return con


def _schema_of(con) -> str | None:
    """The log schema a database was written with (None: a new, empty database)."""
    if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
                       ).fetchone():
        return None
    r = con.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    return None if r is None else str(r[0])


def _v2_to_v3(con) -> None:
    """Schema 3: each request row names the layout of its score columns (score_layouts), so
    that adding or removing a detector keeps older rows readable. Schema-2 rows are layout 0."""
    con.execute("ALTER TABLE requests ADD COLUMN layout INTEGER NOT NULL DEFAULT 0")
    con.execute("CREATE TABLE IF NOT EXISTS score_layouts (id INTEGER PRIMARY KEY, "
                "columns TEXT NOT NULL UNIQUE)")
    con.execute("INSERT OR IGNORE INTO score_layouts VALUES (0, ?)", (json.dumps(LEGACY_COLUMNS),))


# in-place migrations: from schema -> (to schema, step). Schema 1 (a row per item) is converted
# into a new file instead (monitor/migrate.py, `python -m monitor migrate`).
MIGRATIONS = {"2": ("3", _v2_to_v3)}


def migrate_in_place(con, version: str, path) -> None:
    """Bring a writable database from ``version`` up to SCHEMA_VERSION, one step per
    transaction; the schema number is updated with each step."""
    while version != SCHEMA_VERSION:
        if version not in MIGRATIONS:
            raise SchemaError(f"{path}: no migration from log schema {version} to "
                              f"{SCHEMA_VERSION}")
        to, step = MIGRATIONS[version]
        with con:
            step(con)
            con.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (to,))
        log.info("monitor log %s migrated from schema %s to %s", path, version, to)
        version = to


def layout_id(con, columns=SCORE_COLUMNS) -> int:
    """The score_layouts id of ``columns`` (registered when new)."""
    cols = json.dumps(list(columns))
    with con:
        r = con.execute("SELECT id FROM score_layouts WHERE columns=?", (cols,)).fetchone()
        if r is None:
            nxt = con.execute("SELECT coalesce(max(id), 0) + 1 FROM score_layouts").fetchone()[0]
            con.execute("INSERT INTO score_layouts VALUES (?, ?)", (nxt, cols))
            return int(nxt)
    return int(r[0])


def read_layouts(con) -> dict[int, tuple]:
    """{layout id: score columns} of a database (schema 2: only layout 0)."""
    try:
        return {int(i): tuple(json.loads(c)) for i, c in
                con.execute("SELECT id, columns FROM score_layouts")}
    except sqlite3.OperationalError:   # schema 2 read in place (read-only media)
        return {0: LEGACY_COLUMNS}


def _remap(columns: tuple) -> np.ndarray | None:
    """For scores written in ``columns``: index of each in SCORE_COLUMNS (-1: a detector this
    version does not have); None when the layout is the current one."""
    if tuple(columns) == SCORE_COLUMNS:
        return None
    return np.array([SCORE_COLUMNS.index(c) if c in SCORE_COLUMNS else -1 for c in columns])


@dataclass
class Batch:
    """One observe() call as handed to the writer (numpy; encoded off the request path)."""

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
    scores: np.ndarray       # float64 (N, 5), NaN = none
    fired: np.ndarray        # int (N,)
    level_after: np.ndarray  # int (N,)
    keep_raw: bool

    def row(self) -> tuple:
        """The request's row: a handful of array-to-bytes conversions, no per-item work."""
        n = len(self.images)
        x = np.ascontiguousarray(self.images, np.float32).reshape(n, -1)
        wm = np.asarray(self.watermarked, bool).reshape(n)
        grid = np.asarray(self.on_grid, bool).reshape(n)
        u8 = f16 = f32 = None
        if self.keep_raw or wm.any():
            keep = np.ones(n, bool) if self.keep_raw else wm
            g, o = keep & grid, keep & ~grid
            if g.any():
                u8 = np.rint(x[g] * 255.0).astype(np.uint8).tobytes()
            if o.any():
                f16 = x[o].astype(np.float16).tobytes()
            if (o & wm).any():
                f32 = x[o & wm].tobytes()
            grid_blob = None if (keep & grid).all() else \
                (grid.astype(np.uint8) + 2 * (~keep).astype(np.uint8)).tobytes()
        else:
            grid_blob = (2 * np.ones(n, np.uint8)).tobytes()  # 2 = not kept
        models = list(self.models)
        models_json = None if not models else json.dumps(models + [None] * (n - len(models)))
        return (self.client, self.qn0, n, self.t, self.request_id, self.level, self.kind,
                np.ascontiguousarray(self.target_probs, np.float32).tobytes(),
                np.asarray(self.sent_labels).astype(np.int8).tobytes(),
                None if self.sent_top is None else
                np.asarray(self.sent_top, np.float32).tobytes(),
                models_json, int(wm.sum()), wm.astype(np.uint8).tobytes() if wm.any() else None,
                np.ascontiguousarray(self.scores, np.float64).tobytes(),
                np.asarray(self.fired).astype(np.uint8).tobytes(),
                np.asarray(self.level_after).astype(np.int8).tobytes(),
                grid_blob, u8, f16, f32)


INSERT_REQUEST = ("INSERT INTO requests (client, qn0, n, t, request_id, level, kind, "
                  "target_probs, sent_labels, sent_top, models, n_wm, watermarked, scores, "
                  "fired, level_after, grid, raw_u8, raw_f16, raw_f32) VALUES ("
                  + ",".join("?" * 20) + ")")
# the same with the row's score layout (the writer's: this version's detectors)
INSERT_REQUEST_LAYOUT = INSERT_REQUEST.replace("raw_f32) VALUES (", "raw_f32, layout) VALUES (") \
    .replace(",".join("?" * 20), ",".join("?" * 21))


def transition_row(tr) -> tuple:
    return (tr.client, tr.t, tr.qn, int(tr.from_level), int(tr.to_level), tr.rule,
            json.dumps(tr.evidence))


_STOP = object()


class Decoded:
    """A request row expanded into per-item arrays."""

    def __init__(self, r: sqlite3.Row, raw: bool = True, layouts: dict | None = None):
        n = r["n"]
        self.client, self.qn0, self.n, self.t = r["client"], r["qn0"], n, r["t"]
        self.request_id, self.level, self.kind = r["request_id"], r["level"], r["kind"]
        self.seq = r["seq"]
        self.probs = np.frombuffer(r["target_probs"], np.float32).reshape(n, -1)
        self.sent_labels = np.frombuffer(r["sent_labels"], np.int8).astype(np.int64)
        self.sent_top = (None if r["sent_top"] is None else
                         np.frombuffer(r["sent_top"], np.float32).astype(np.float64))
        self.models = json.loads(r["models"]) if r["models"] else [None] * n
        self.watermarked = (np.zeros(n, bool) if r["watermarked"] is None else
                            np.frombuffer(r["watermarked"], np.uint8).astype(bool))
        scores = np.frombuffer(r["scores"], np.float64).reshape(n, -1)
        fired = np.frombuffer(r["fired"], np.uint8).astype(np.int64)
        cols = None
        if layouts is not None and "layout" in r.keys():
            cols = layouts.get(r["layout"])
            if cols is None:
                raise SchemaError(f"a request row names an unknown score layout {r['layout']}")
        idx = None if cols is None else _remap(cols)
        if idx is not None:   # written with other detectors: map onto this version's columns
            out = np.full((n, NSCORES), np.nan)
            bits = np.zeros(n, np.int64)
            for j, i in enumerate(idx):
                if i >= 0:
                    out[:, i] = scores[:, j]
                    bits |= ((fired >> j) & 1) << i
            scores, fired = out, bits
        self.scores = scores
        self.fired = fired
        self.level_after = np.frombuffer(r["level_after"], np.int8).astype(np.int64)
        code = (np.zeros(n, np.uint8) + 1 if r["grid"] is None else
                np.frombuffer(r["grid"], np.uint8))
        self.kept = code < 2
        self.grid = code == 1
        self.raw_fmt = np.where(~self.kept, RAW_NONE, np.where(
            self.grid, RAW_U8, np.where(self.watermarked, RAW_F32, RAW_F16)))
        self.x = None
        self.x_exact = None
        if raw:
            self._inputs(r)

    def _inputs(self, r) -> None:
        """x: float32 (n, 28, 28) as the detectors saw the items (k/255 on the grid, else
        float16), NaN where not kept; x_exact: as received where kept losslessly (on-grid and
        watermarked items), else as x."""
        n = self.n
        x = np.full((n, 784), np.nan, np.float32)
        g = self.kept & self.grid
        o = self.kept & ~self.grid
        if g.any():
            x[g] = np.frombuffer(r["raw_u8"], np.uint8).reshape(-1, 784).astype(np.float32) \
                / np.float32(255.0)
        if o.any():
            x[o] = np.frombuffer(r["raw_f16"], np.float16).reshape(-1, 784).astype(np.float32)
        exact = x.copy()
        ow = o & self.watermarked
        if ow.any():
            exact[ow] = np.frombuffer(r["raw_f32"], np.float32).reshape(-1, 784)
        self.x = x.reshape(n, 28, 28)
        self.x_exact = exact.reshape(n, 28, 28)


class LogUnavailable(RuntimeError):
    """The monitor's log cannot be written (disk full, I/O error, read-only media) or did not
    commit in time. The service answers UNAVAILABLE (fail-closed) while this lasts."""


# Errors the writer waits out and retries (disk full, I/O error, read-only file, a locked
# database): the items stay queued and nothing put is lost while the process lives.
RETRIABLE = (sqlite3.OperationalError,)


def take_batch(q: queue.Queue, first, batch_size: int, seconds: float) -> list:
    """``first`` and whatever else is queued, up to ``batch_size`` items and ``seconds``: one
    transaction's worth (group commit: the requests that queued meanwhile share it)."""
    items = [first]
    deadline = time.monotonic() + seconds
    while len(items) < batch_size and time.monotonic() < deadline:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            break
    return items


class Writer(threading.Thread):
    """Background writer: takes Batch / Transition / pairs items from a queue, commits in
    transactions of up to ``batch_size`` items or every ``flush_seconds`` (group commit: one
    transaction holds whatever was queued while the previous one committed).

    Failures: a retriable error (:data:`RETRIABLE`) keeps the transaction's items and retries
    with back-off (up to 2 s apart) until it succeeds; ``failure`` says what is wrong meanwhile
    and is cleared by the first successful commit. Any other error is fatal (``error``), as is a
    failure that outlasts ``close(timeout)``.

    Bounds: with ``max_queue`` > 0, request rows and checkpoints put while more than
    ``max_queue`` items wait are dropped and counted in ``dropped`` (transitions and pairs are
    always kept): memory stays bounded when the log cannot keep up or is down for long.
    ``retention_days`` deletes request rows that many days older than the newest one (rows
    holding watermarked answers, the ownership proof, are kept); ``max_mb`` caps the database's used pages, deleting the
    oldest rows without watermarked answers first, then the oldest of any kind."""

    def __init__(self, path: str | Path, batch_size: int = 512, flush_seconds: float = 0.2,
                 retention_days: float = 0.0, max_mb: float = 0.0, max_queue: int = 0):
        super().__init__(name="monitor-log-writer", daemon=True)
        self.path = Path(path)
        try:
            self.con = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise LogUnavailable(f"cannot open the monitor log {self.path} for writing: {exc} "
                                 f"(full or read-only disk? point --monitor-db elsewhere)"
                                 ) from exc
        self.q: queue.Queue = queue.Queue()
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.retention_days = retention_days
        self.max_mb = max_mb
        self.max_queue = max_queue
        self.error: BaseException | None = None
        self.failure: BaseException | None = None   # retrying on this (None: healthy)
        self.failing_since: float | None = None
        self.failures = 0            # retriable errors seen in all
        self.dropped = 0             # rows and checkpoints dropped by the max_queue bound
        self.pruned = 0              # request rows deleted by retention or the size cap
        self._last_retention = float("-inf")   # never (time.monotonic() starts near 0 at boot)
        self._last_cap = float("-inf")
        self._seq = itertools.count(1)
        self._put_lock = threading.Lock()   # tickets enter the queue in ticket order
        self.issued = 0                     # the last ticket put
        self._cv = threading.Condition()
        self._abandon = threading.Event()
        self.committed = 0      # every item put with a ticket <= this is committed
        self._ended = False     # run() has returned (is_alive() stays True until just after)
        self.start()

    def put(self, item) -> int:
        """Queue an item; returns its ticket (compare with ``committed``)."""
        if self.error is not None:
            raise LogUnavailable(f"monitor log writer failed: {self.error!r}") from self.error
        if self.max_queue and self.q.qsize() >= self.max_queue and (
                isinstance(item, Batch) or (isinstance(item, tuple) and item[0] == "state")):
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("monitor log: %d items waiting; %d request rows/checkpoints dropped so "
                          "far (log.max_queue)", self.q.qsize(), self.dropped)
            return next(self._seq)
        with self._put_lock:
            seq = next(self._seq)
            self.q.put((seq, item))
            self.issued = seq
        return seq

    def _open(self) -> sqlite3.Connection:
        con = connect(self.path)
        self.layout = layout_id(con)      # the score columns this version writes
        return con

    def wait_committed(self, ticket: int, timeout: float | None) -> bool:
        """Block until ``ticket`` is committed; False after ``timeout`` seconds, or at once if
        the writer has failed for good."""
        with self._cv:
            return self._cv.wait_for(lambda: self.committed >= ticket or self.error is not None
                                     or self._ended or not self.is_alive(), timeout) \
                and self.committed >= ticket

    # --- housekeeping: retention and the size cap -------------------------------------------
    def _used_bytes(self) -> int:
        con = self.con
        page = con.execute("PRAGMA page_size").fetchone()[0]
        used = con.execute("PRAGMA page_count").fetchone()[0] - \
            con.execute("PRAGMA freelist_count").fetchone()[0]
        return int(used) * int(page)

    def _delete_oldest(self, where: str, args: tuple = (), chunk: int = 2000) -> int:
        cur = self.con.execute(f"DELETE FROM requests WHERE seq IN (SELECT seq FROM requests "
                               f"WHERE {where} ORDER BY seq LIMIT ?)", (*args, chunk))
        return cur.rowcount

    def _housekeeping(self) -> None:
        now = time.time()
        try:
            if self.retention_days > 0 and now - self._last_retention > 600:
                self._last_retention = now
                # age is measured from the newest logged request, not the wall clock, so logs
                # written with a simulated clock (the lab, replays) are aged consistently
                newest = self.con.execute("SELECT max(t) FROM requests").fetchone()[0]
                with self.con:
                    n = 0 if newest is None else self.con.execute(
                        "DELETE FROM requests WHERE t < ? AND n_wm = 0",
                        (newest - self.retention_days * 86400,)).rowcount
                if n:
                    self.pruned += n
                    log.info("monitor log: %d request rows older than %g days deleted", n,
                             self.retention_days)
            if self.max_mb > 0 and now - self._last_cap > 5.0:
                self._last_cap = now
                cap = self.max_mb * 2 ** 20
                if self._used_bytes() > cap:
                    deleted = {}
                    for where in ("n_wm = 0", "1"):
                        deleted[where] = 0
                        while (used := self._used_bytes()) > 0.9 * cap:
                            rows = self.con.execute("SELECT count(*) FROM requests").fetchone()[0]
                            # as many rows as the excess holds on average, at least one
                            chunk = int(min(5000, max(1, (used - 0.9 * cap) * rows / used)))
                            with self.con:
                                k = self._delete_oldest(where, chunk=chunk)
                            if not k:
                                break
                            deleted[where] += k
                    n = sum(deleted.values())
                    self.pruned += n
                    log.warning("monitor log above log.max_mb = %g: the %d oldest request rows "
                                "deleted (%d of them held watermarked answers)", self.max_mb, n,
                                deleted["1"])
        except RETRIABLE as exc:  # the next commit's retry loop reports the condition
            log.debug("monitor log housekeeping postponed: %r", exc)

    # --- the writer loop -----------------------------------------------------------------------
    def _write(self, items) -> bool:
        """One transaction of ``items``; True when the stop marker was among them."""
        con = self.con
        stop = False
        with con:  # one transaction
            for _, it in items:
                if it is _STOP:
                    stop = True
                elif isinstance(it, Batch):
                    con.execute(INSERT_REQUEST_LAYOUT, it.row() + (self.layout,))
                elif isinstance(it, tuple) and it[0] == "pairs":
                    con.executemany(
                        "INSERT INTO pairs (t, client, qn, other, other_qn, dist, dense, "
                        "peak) VALUES (?,?,?,?,?,?,?,?)",
                        [(p.t, p.client, p.qn, p.other, p.other_qn, p.dist, p.dense,
                          p.peak) for p in it[1]])
                else:  # Transition
                    con.execute("INSERT INTO transitions (client, t, qn, from_level, "
                                "to_level, rule, evidence) VALUES (?,?,?,?,?,?,?)",
                                transition_row(it))
        return stop

    def _write_retrying(self, items) -> bool:
        delay = 0.05
        while True:
            try:
                stop = self._write(items)
            except RETRIABLE as exc:
                if self._abandon.is_set():
                    raise
                self.failures += 1
                if self.failure is None:
                    self.failing_since = time.time()
                    log.error("monitor log %s cannot be written (%s); %d items held, retrying "
                              "until it can", self.path, exc, len(items) + self.q.qsize())
                self.failure = exc
                self._abandon.wait(delay)
                delay = min(2 * delay, 2.0)
                continue
            if self.failure is not None:
                log.warning("monitor log %s writable again after %.1f s", self.path,
                            time.time() - (self.failing_since or time.time()))
                self.failure = None
                self.failing_since = None
            return stop

    def run(self) -> None:
        stop = False
        try:
            self._housekeeping()
            while not stop:
                try:
                    item = self.q.get(timeout=self.flush_seconds)
                except queue.Empty:
                    self._housekeeping()
                    continue
                items = take_batch(self.q, item, self.batch_size, self.flush_seconds)
                stop = self._write_retrying(items)
                with self._cv:
                    # (the stop marker's ticket is 0: the batch's largest is what it commits)
                    self.committed = max(self.committed, max(seq for seq, _ in items))
                    self._cv.notify_all()
                for _ in items:
                    self.q.task_done()
                self._housekeeping()
        except BaseException as exc:  # surfaced by put()/flush()/close()
            self.error = exc
            log.error("monitor log writer stopped: %r", exc)
        finally:
            with self._cv:
                self._ended = True      # waiters wake to find nothing more will be committed
                self._cv.notify_all()
            self.con.close()

    def flush(self) -> None:
        """Block until everything put so far is committed (waits out a retriable failure)."""
        while self.q.unfinished_tasks and self.is_alive():
            with self._cv:
                self._cv.wait(0.1)
        if self.error is not None:
            raise LogUnavailable(f"monitor log writer failed: {self.error!r}") from self.error
        if self.q.unfinished_tasks:
            raise LogUnavailable(f"monitor log writer stopped with {self.q.unfinished_tasks} "
                                 f"items unwritten")

    def close(self, timeout: float | None = 30.0) -> None:
        """Drain and stop. While the log cannot be written the writer keeps retrying for up to
        ``timeout`` seconds, then gives up: what was still queued is lost and said so."""
        if self.is_alive():
            self.q.put((0, _STOP))
            self.join(timeout)
            if self.is_alive():
                left = self.q.qsize() + 1
                self._abandon.set()
                self.join()
                raise LogUnavailable(f"monitor log {self.path} still not writable after "
                                     f"{timeout:g} s ({self.failure}); about {left} queued "
                                     f"items were not written")
        if self.error is not None:
            raise LogUnavailable(f"monitor log writer failed: {self.error!r}") from self.error


def series_of(parts: list[Decoded]) -> dict[str, np.ndarray]:
    """A client's decoded requests as per-item columns: qn, t, every score column, fired,
    level (answered at) and level_after (any store's reader uses this)."""
    if not parts:
        return {c: np.zeros(0) for c in ["qn", "t", *SCORE_COLUMNS, "fired", "level",
                                         "level_after"]}
    out = {"qn": np.concatenate([d.qn0 + 1 + np.arange(d.n) for d in parts]).astype(float),
           "t": np.concatenate([np.full(d.n, d.t) for d in parts])}
    sc = np.concatenate([d.scores for d in parts])
    for i, c in enumerate(SCORE_COLUMNS):
        out[c] = sc[:, i]
    out["fired"] = np.concatenate([d.fired for d in parts]).astype(float)
    out["level"] = np.concatenate([np.full(d.n, d.level) for d in parts]).astype(float)
    out["level_after"] = np.concatenate([d.level_after for d in parts]).astype(float)
    return out


def recent_items_of(page, decode, limit: int) -> list[tuple]:
    """Any store's ``recent_items``: walk its request rows newest first, ``page(last_seq)``
    giving the next rows (all when ``last_seq`` is None) and ``decode(row)`` a Decoded, until
    ``limit`` items are gathered (requests whose inputs were not kept are skipped); oldest
    first: (client, qn0, x float32 (n, 28, 28))."""
    out, n, last = [], 0, None
    while n < limit:
        rows = page(last)
        if not rows:
            break
        for r in rows:
            d = decode(r)
            if d.kept.all():
                x = d.x[-(limit - n):]
                out.append((d.client, d.qn0 + d.n - len(x), x))
                n += len(x)
            if n >= limit:
                break
        last = rows[-1]["seq"]
    return out[::-1]


# how far back the log is read for the clients a restart restores first (request rows)
RECENT_CLIENT_ROWS = 100_000


def recent_clients_of(page, checkpointed: list[str], limit: int,
                      max_rows: int = RECENT_CLIENT_ROWS) -> list[str]:
    """Any store's ``recent_clients``: the clients of the newest request rows, newest first
    (``page(last_seq)`` gives (seq, client) rows newest first, all when ``last_seq`` is None;
    at most ``max_rows`` rows are read), then the ``checkpointed`` ones (most recently
    checkpointed first) not among them; at most ``limit``. After a crash the clients active
    last are the ones whose logged queries their checkpoints do not cover yet."""
    out: dict[str, None] = {}
    last, read = None, 0
    while len(out) < limit and read < max_rows:
        rows = page(last)
        if not rows:
            break
        for r in rows:
            out.setdefault(r["client"])
            if len(out) >= limit:
                break
        read += len(rows)
        last = rows[-1]["seq"]
    for c in checkpointed:
        if len(out) >= limit:
            break
        out.setdefault(c)
    return list(out)


class QueryLog:
    """Read access to a monitor database (and the watermark verifier's entry point)."""

    def __init__(self, path: str | Path, create: bool = False):
        self.path = Path(path)
        self.con = connect(self.path, create=create)
        self.con.row_factory = sqlite3.Row
        from monitor.checkpoints import CheckpointReader   # (it imports this module)
        self.checkpoints = CheckpointReader(self.con, self.path, create)
        self.layouts = read_layouts(self.con)   # score layouts of the rows (schema 3)
        self._has_layout = any(r[1] == "layout" for r in
                               self.con.execute("PRAGMA table_info(requests)"))

    def close(self) -> None:
        self.con.close()
        self.checkpoints.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # --- per-client summaries -------------------------------------------------------------------
    def client_ids(self) -> list[str]:
        ids = {r[0] for r in self.con.execute(
            "SELECT client FROM requests GROUP BY client UNION SELECT client FROM transitions")}
        return sorted(ids | self.checkpoints.clients())

    def has_client(self, client: str) -> bool:
        return bool(self.con.execute(
            "SELECT 1 FROM requests WHERE client=? UNION SELECT 1 FROM transitions WHERE "
            "client=? LIMIT 1", (client, client)).fetchone()) or \
            self.load_state(client) is not None

    def max_qn(self, client: str) -> int:
        r = self.con.execute("SELECT qn0 + n FROM requests WHERE client=? ORDER BY qn0 DESC "
                             "LIMIT 1", (client,)).fetchone()
        return int(r[0]) if r else 0

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
            "SELECT client, SUM(n) AS queries, MIN(t) AS first_t, MAX(t) AS last_t, "
            "MAX(qn0 + n) AS max_qn FROM requests GROUP BY client")}
        for c in self.client_ids():
            d = rows.setdefault(c, {"client": c, "queries": 0, "first_t": None, "last_t": None,
                                    "max_qn": 0})
            d["level"] = self.last_level(c)
            tr = self.con.execute("SELECT t, qn FROM transitions WHERE client=? ORDER BY id DESC "
                                  "LIMIT 1", (c,)).fetchone()
            d["escalated_t"], d["escalated_qn"] = (tr[0], tr[1]) if tr else (None, None)
            last = self.con.execute("SELECT * FROM requests WHERE client=? ORDER BY qn0 DESC "
                                    "LIMIT 1", (c,)).fetchone()
            if last:
                dec = Decoded(last, raw=False, layouts=self.layouts)
                sc = dec.scores[-1]
                d["scores"] = ({k: (None if np.isnan(v) else float(v))
                                for k, v in zip(SCORE_COLUMNS, sc)} | {"fired": int(dec.fired[-1])})
            else:
                d["scores"] = {}
        return [rows[c] for c in sorted(rows)]

    def _decoded(self, client: str | None = None, raw: bool = False, after_qn: int = 0,
                 chunk: int = 512) -> Iterator[Decoded]:
        """The requests in order (by the client's query number, or by arrival for all)."""
        cols = "*" if raw else ("seq, client, qn0, n, t, request_id, level, kind, target_probs, "
                                "sent_labels, sent_top, models, n_wm, watermarked, scores, fired, "
                                "level_after, grid" + (", layout" if self._has_layout else ""))
        if client is None:
            last = 0
            while True:
                rows = self.con.execute(f"SELECT {cols} FROM requests WHERE seq > ? ORDER BY seq "
                                        f"LIMIT ?", (last, chunk)).fetchall()
                if not rows:
                    return
                for r in rows:
                    yield Decoded(r, raw, self.layouts)
                last = rows[-1]["seq"]
        last = after_qn - 1
        while True:
            rows = self.con.execute(f"SELECT {cols} FROM requests WHERE client=? AND qn0 > ? "
                                    f"ORDER BY qn0 LIMIT ?", (client, last, chunk)).fetchall()
            if not rows:
                return
            for r in rows:
                yield Decoded(r, raw, self.layouts)
            last = rows[-1]["qn0"]

    def series(self, client: str) -> dict[str, np.ndarray]:
        """qn, t, scores, fired, level, level_after per item, for plotting/export."""
        return series_of(list(self._decoded(client)))

    def iter_rows(self, client: str | None = None, raw: bool = False) -> Iterator[dict]:
        """One dict per item (the columns of the per-item view; ``raw``: the input as float32
        (28, 28) under "x", None when not kept)."""
        for d in self._decoded(client, raw):
            for i in range(d.n):
                row = {"seq": d.seq, "client": d.client, "qn": d.qn0 + i + 1, "t": d.t,
                       "request_id": d.request_id, "item": i,
                       "target_label": int(d.probs[i].argmax()),
                       "target_top": float(d.probs[i].max()), "level": d.level,
                       "kind": d.kind, "sent_label": int(d.sent_labels[i]),
                       "sent_top": None if d.sent_top is None else float(d.sent_top[i]),
                       "model": d.models[i], "watermarked": int(d.watermarked[i]),
                       **{c: (None if np.isnan(v) else float(v))
                          for c, v in zip(SCORE_COLUMNS, d.scores[i])},
                       "fired": int(d.fired[i]), "level_after": int(d.level_after[i]),
                       "raw_fmt": int(d.raw_fmt[i])}
                if raw:
                    row["x"] = d.x[i] if d.kept[i] else None
                yield row

    def requests(self, client: str, after_qn: int = 0):
        """The client's logged requests after query ``after_qn``, in order, as the detectors
        saw them: yields (first qn, t, x float32 (n, 28, 28) or None when an input was not
        kept, target probs float32 (n, 10))."""
        for d in self._decoded(client, raw=True, after_qn=after_qn):
            yield d.qn0 + 1, d.t, (d.x if d.kept.all() else None), d.probs

    def pairs(self, client: str | None = None) -> list[dict]:
        """Cross-client linking's evidence, in log order: every attack-like pair (with
        ``client``: the pairs it sent or was the source of)."""
        sql, args = "SELECT * FROM pairs", ()
        if client is not None:
            sql, args = sql + " WHERE client=? OR other=?", (client, client)
        return [dict(r) for r in self.con.execute(sql + " ORDER BY id", args)]

    def all_requests(self) -> Iterator[tuple]:
        """Every logged request in arrival order: (client, first qn, t, x float32 (n, 28, 28)
        or None when an input was not kept, target probs float32 (n, 10))."""
        for d in self._decoded(None, raw=True):
            yield d.client, d.qn0 + 1, d.t, (d.x if d.kept.all() else None), d.probs

    def recent_items(self, limit: int) -> list[tuple]:
        """The last logged requests holding ``limit`` items in all (fewer if the log is
        shorter), oldest first: (client, qn0, x float32 (n, 28, 28)); requests whose inputs
        were not kept are skipped."""
        def page(last):
            sql = "SELECT * FROM requests" + (" WHERE seq < ?" if last else "") + \
                " ORDER BY seq DESC LIMIT 256"
            return self.con.execute(sql, (last,) if last else ()).fetchall()
        return recent_items_of(page, lambda r: Decoded(r, raw=True, layouts=self.layouts), limit)

    def load_state(self, client: str):
        """The client's last checkpoint: {"qn", "level", "config_hash", "state"} or None."""
        return self.checkpoints.load(client)

    def recent_clients(self, limit: int) -> list[str]:
        """The clients a restart restores first: those of the newest logged requests, then
        those most recently checkpointed (see recent_clients_of)."""
        def page(last):
            sql = "SELECT seq, client FROM requests" + (" WHERE seq < ?" if last else "") + \
                " ORDER BY seq DESC LIMIT 1024"
            return self.con.execute(sql, (last,) if last else ()).fetchall()
        return recent_clients_of(page, self.checkpoints.recent(limit), limit)

    # --- watermark verifier ---------------------------------------------------------------------
    def watermark_records(self, client_id: str | None = None
                          ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(images float32 (M,28,28) as received, labels sent (M,) int64, client ids) for every
        logged item whose answer was watermarked. Watermarked items are always kept
        losslessly, even with ``log.keep_raw = false``."""
        sql = "SELECT * FROM requests WHERE n_wm > 0"
        args: tuple = ()
        if client_id is not None:
            sql += " AND client=?"
            args = (client_id,)
        xs, ls, cs = [], [], []
        for r in self.con.execute(sql + " ORDER BY seq", args):
            d = Decoded(r, raw=True, layouts=self.layouts)
            w = d.watermarked
            if not d.kept[w].all():
                raise RuntimeError("a watermarked item has no stored input")
            xs.append(d.x_exact[w])
            ls.append(d.sent_labels[w])
            cs += [d.client] * int(w.sum())
        if not xs:
            return np.zeros((0, 28, 28), np.float32), np.zeros(0, np.int64), []
        return np.concatenate(xs).astype(np.float32), np.concatenate(ls), cs


def pickle_state(engine) -> bytes:
    """Detector state as stored (plain pickle: the arrays are float encodings that compress
    poorly, and compressing megabytes would cost more than writing them)."""
    return pickle.dumps(engine, protocol=pickle.HIGHEST_PROTOCOL)


def unpickle_state(blob: bytes):
    if blob[:1] == b"\x80":          # a pickle
        return pickle.loads(blob)
    return pickle.loads(zlib.decompress(blob))  # written before the batched monitor


# --- incremental checkpoints -----------------------------------------------------------------
# A client's state is mostly ring buffers (its recent queries and their encodings, the growing
# sets), megabytes that change only by the rows added since. A delta checkpoint pickles the
# engine with each ring replaced by the rows it gained since the last checkpoint written from
# this process; restoring applies them, in order, to the rings of the full checkpoint below.

def _rings(engine) -> list:
    """The engine's ring buffers in a fixed order (detectors in config order, their attributes
    in definition order, list items in order): what a delta's ring tokens index."""
    from monitor.features import Ring
    out = []
    for det in engine.dets.values():
        for v in vars(det).values():
            if isinstance(v, Ring):
                out.append(v)
            elif isinstance(v, list):
                out.extend(x for x in v if isinstance(x, Ring))
    return out


def mark_checkpointed(engine) -> None:
    """The engine's state as it is now is what the store will hold: a delta pickles the rows
    its rings gain from here."""
    for r in _rings(engine):
        r._ck_n = r.n


def forget_checkpointed(engine) -> None:
    """What the store holds is unknown (a checkpoint may have been dropped): the next
    checkpoint must be a full one."""
    for r in _rings(engine):
        r.__dict__.pop("_ck_n", None)


class _DeltaPickler(pickle.Pickler):
    """Pickles rings as the tokens ``pickle_delta`` made for them (by object id)."""

    def __init__(self, file, tokens: dict):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tokens = tokens

    def persistent_id(self, obj):
        return self.tokens.get(id(obj))


class _DeltaUnpickler(pickle.Unpickler):
    """Resolves a delta's ring tokens to the rings they extend; collects (ring, since, n,
    rows) for the caller to check and apply."""

    def __init__(self, file, rings: list):
        super().__init__(file)
        self.rings, self.parts = rings, []

    def persistent_load(self, pid):
        kind, i, since, n, part = pid
        if kind != "ring-delta" or i >= len(self.rings):
            raise pickle.UnpicklingError(f"not a ring delta: {kind!r} {i}")
        self.parts.append((self.rings[i], since, n, part))
        return self.rings[i]


def pickle_delta(engine) -> bytes | None:
    """The engine with every ring as the rows it gained since ``mark_checkpointed``; None when
    a full checkpoint is needed (no ring is marked, or one gained more rows than it holds)."""
    rings = _rings(engine)
    tokens = {}
    for i, r in enumerate(rings):
        since = getattr(r, "_ck_n", None)
        if since is None or r.n - since > r.size or r.n < since:
            return None
        k = r.n - since
        part = object.__new__(type(r))        # the rows gained, oldest first, as a ring of its own
        slots = (since + np.arange(k)) % r.size
        part.size, part.n, part._nb = max(k, 1), k, None
        part.cols = {c: a[slots] for c, a in r.cols.items()}
        tokens[id(r)] = ("ring-delta", i, since, r.n, part)
    buf = io.BytesIO()
    _DeltaPickler(buf, tokens).dump(engine)
    return b"MGD1" + buf.getvalue()


def restore_chain(base: bytes, deltas: list[bytes]) -> tuple[object, bool]:
    """(engine, whole): the engine of a full checkpoint ``base`` with the deltas written after
    it applied in order, and whether all of them were. A delta that does not fit the rings as
    the ones before left them (a checkpoint in between was lost) ends the chain: the engine is
    then as of the last delta that fit (its own ``qn`` says which; the caller replays the log
    from there)."""
    engine = unpickle_state(base)
    for blob in deltas:
        if blob[:4] != b"MGD1":
            return engine, False
        rings = _rings(engine)
        up = _DeltaUnpickler(io.BytesIO(blob[4:]), rings)
        try:
            nxt = up.load()
        except (pickle.UnpicklingError, IndexError):
            return engine, False
        parts = up.parts
        if len(parts) != len(rings) or any(
                r.n != since or type(r) is not type(p) or set(r.cols) != set(p.cols)
                for r, since, n, p in parts):
            return engine, False
        for r, since, n, p in parts:      # all fit: applied together
            r.add(**{c: a[:p.n] for c, a in p.cols.items()})
        engine = nxt
    return engine, True
