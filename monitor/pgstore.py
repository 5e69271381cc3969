"""The monitor's state in PostgreSQL, shared by several server replicas (docs/scaleout.md).

:class:`PgStore` implements :class:`monitor.store.MonitorStore` with the semantics of the
embedded SQLite store: ``put_*`` return at once and are applied in order by one writer thread in
batched transactions; ``flush`` waits until everything put before is committed; ``put_state``
returns a ticket that ``is_committed`` accepts once it is durable (one ordered lane here: a
ticket is durable with everything put before it); reads come from any thread
(one autocommit connection per reading thread). The tables have the SQLite log's columns (a
request's per-item arrays as ``bytea``: uint8 inputs, float32 probabilities, ...), so rows
decode with the same :class:`monitor.log.Decoded`, plus the replica that wrote each row.

Writes are idempotent (``ON CONFLICT``), so after a lost connection the writer reconnects and
re-sends the same transaction without duplicating anything; it retries until PostgreSQL is back
(no manual step). While PostgreSQL is down nothing is lost that was put, up to ``max_pending``
queued requests (then new request rows are dropped and counted; transitions, checkpoints and
pairs are always kept). ``available()`` says whether the last contact with the server
succeeded, ``failure()`` why not: the Monitor fails open or closed on it (``log.on_failure``).

A checkpoint never overwrites a newer one (``WHERE client_state.qn <= excluded.qn``), and a
request row never overwrites another replica's row for the same query numbers: a replica that
lost a client to another one cannot roll its state back.

:class:`SharedMonitor` is the Monitor of a replica: it claims a client in the ``owners`` table
when it loads it (the previous owner is told through LISTEN/NOTIFY and drops its copy), restores
only its own clients after a start, follows the other replicas' requests and pairs so that
cross-client linking sees every key's queries, and refuses requests (fail-closed) or answers
them (fail-open) while PostgreSQL is unreachable.

    python -m monitor.pgstore serve --store postgresql://... --replica r1 --port 50061
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import threading
import time
from typing import Iterator

import numpy as np
import psycopg
from psycopg.rows import dict_row, tuple_row

from common.types import Level
from monitor.core import Monitor
from monitor.engine import ClientEngine, det_view
from monitor.log import (Batch, Decoded, LogUnavailable, SCHEMA_VERSION, recent_clients_of,
                         recent_items_of, series_of, take_batch, transition_row)
from monitor.store import MonitorStore

log = logging.getLogger("modelguard.pgstore")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS requests (
    seq BIGSERIAL PRIMARY KEY,
    client TEXT NOT NULL,
    qn0 INTEGER NOT NULL,
    n INTEGER NOT NULL,
    t DOUBLE PRECISION NOT NULL,
    request_id TEXT,
    level SMALLINT NOT NULL,
    kind SMALLINT NOT NULL,
    target_probs BYTEA NOT NULL,
    sent_labels BYTEA NOT NULL,
    sent_top BYTEA,
    models TEXT,
    n_wm INTEGER NOT NULL,
    watermarked BYTEA,
    scores BYTEA NOT NULL,
    fired BYTEA NOT NULL,
    level_after BYTEA NOT NULL,
    grid BYTEA,
    raw_u8 BYTEA,
    raw_f16 BYTEA,
    raw_f32 BYTEA,
    replica TEXT NOT NULL DEFAULT '',
    UNIQUE (client, qn0)
);
CREATE INDEX IF NOT EXISTS requests_t ON requests(t);
CREATE TABLE IF NOT EXISTS transitions (
    id BIGSERIAL PRIMARY KEY,
    client TEXT NOT NULL,
    t DOUBLE PRECISION NOT NULL,
    qn INTEGER NOT NULL,
    from_level SMALLINT NOT NULL,
    to_level SMALLINT NOT NULL,
    rule TEXT NOT NULL,
    evidence TEXT NOT NULL,
    replica TEXT NOT NULL DEFAULT '',
    UNIQUE (client, qn, from_level, to_level, rule)
);
CREATE INDEX IF NOT EXISTS transitions_client ON transitions(client, id);
CREATE TABLE IF NOT EXISTS pairs (
    id BIGSERIAL PRIMARY KEY,
    t DOUBLE PRECISION NOT NULL,
    client TEXT NOT NULL,
    qn INTEGER NOT NULL,
    other TEXT NOT NULL,
    other_qn INTEGER NOT NULL,
    dist DOUBLE PRECISION NOT NULL,
    dense DOUBLE PRECISION NOT NULL,
    peak DOUBLE PRECISION NOT NULL,
    replica TEXT NOT NULL DEFAULT '',
    UNIQUE (client, qn, other, other_qn)
);
CREATE TABLE IF NOT EXISTS client_state (
    client TEXT PRIMARY KEY,
    qn INTEGER NOT NULL,
    level SMALLINT NOT NULL,
    config_hash TEXT NOT NULL,
    state BYTEA NOT NULL,
    updated DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS log_size (       -- bytes of the request rows (ROW_BYTES), per writer
    replica TEXT PRIMARY KEY,
    bytes BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS owners (         -- which replica holds a client's detector state
    client TEXT PRIMARY KEY,
    replica TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 1,
    since DOUBLE PRECISION NOT NULL
);
"""

# a request row's bytes as log.max_mb counts them: its text and bytea fields plus 64 for the
# rest (PostgreSQL's files hold more: row headers, indexes, and space freed but not yet reused)
ROW_BYTES = ("64 + octet_length(client) + coalesce(octet_length(request_id), 0) "
             "+ octet_length(target_probs) + octet_length(sent_labels) "
             "+ coalesce(octet_length(sent_top), 0) + coalesce(octet_length(models), 0) "
             "+ coalesce(octet_length(watermarked), 0) + octet_length(scores) "
             "+ octet_length(fired) + octet_length(level_after) + coalesce(octet_length(grid), 0) "
             "+ coalesce(octet_length(raw_u8), 0) + coalesce(octet_length(raw_f16), 0) "
             "+ coalesce(octet_length(raw_f32), 0) + octet_length(replica)")
REQUEST_COLUMNS = ("client, qn0, n, t, request_id, level, kind, target_probs, sent_labels, "
                   "sent_top, models, n_wm, watermarked, scores, fired, level_after, grid, "
                   "raw_u8, raw_f16, raw_f32")          # the SQLite log's (snapshot)
_ROW_PARAMS = "(" + ",".join(["%s"] * 21) + ")"
INSERT_CHUNK = 1000          # rows per INSERT statement (21 parameters each; the limit is 65,535)


def insert_requests_sql(n: int) -> str:
    """One INSERT of ``n`` request rows that returns the bytes of the rows it inserted (rows
    another replica had logged first are skipped, and not counted)."""
    return (f"INSERT INTO requests ({REQUEST_COLUMNS}, replica) VALUES "
            + ",".join([_ROW_PARAMS] * n)
            + f" ON CONFLICT (client, qn0) DO NOTHING RETURNING {ROW_BYTES} AS b")


ADD_SIZE = ("INSERT INTO log_size VALUES (%s, %s) ON CONFLICT (replica) DO UPDATE SET bytes = "
            "log_size.bytes + excluded.bytes")
INSERT_TRANSITION = ("INSERT INTO transitions (client, t, qn, from_level, to_level, rule, "
                     "evidence, replica) VALUES (%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING")
INSERT_PAIR = ("INSERT INTO pairs (t, client, qn, other, other_qn, dist, dense, peak, replica) "
               "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT DO NOTHING")
UPSERT_STATE = ("INSERT INTO client_state VALUES (%s,%s,%s,%s,%s,%s) ON CONFLICT (client) DO "
                "UPDATE SET qn = excluded.qn, level = excluded.level, config_hash = "
                "excluded.config_hash, state = excluded.state, updated = excluded.updated "
                "WHERE client_state.qn <= excluded.qn")
UPSERT_META = ("INSERT INTO meta VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = "
               "excluded.value")
CONN_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError)
_STOP = object()


class StoreUnavailable(LogUnavailable):
    """PostgreSQL cannot be reached (the store retries on its own); the service answers
    UNAVAILABLE, as for any log that cannot be written."""


def is_dsn(s) -> bool:
    return isinstance(s, str) and s.startswith(("postgresql://", "postgres://"))


def connect(dsn: str, schema: str | None = None, autocommit: bool = False,
            timeout: float = 5.0) -> psycopg.Connection:
    kw = {"options": f"-c search_path={schema}"} if schema else {}
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=max(1, int(timeout)),
                           row_factory=dict_row, **kw)


def create_schema(dsn: str, schema: str | None = None) -> None:
    with psycopg.connect(dsn, autocommit=True) as con:
        # concurrent replicas create the same objects: serialise on an advisory lock
        con.execute("SELECT pg_advisory_lock(4242)")
        try:
            if schema:
                con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                con.execute(f'SET search_path = "{schema}"')
            con.execute(SCHEMA)
            con.execute("INSERT INTO meta VALUES ('schema', %s) ON CONFLICT DO NOTHING",
                        (SCHEMA_VERSION,))
            # a store created before the size counter existed: count what it holds, once
            con.execute(f"INSERT INTO log_size SELECT '', (SELECT coalesce(sum({ROW_BYTES}), 0) "
                        "FROM requests) WHERE NOT EXISTS (SELECT 1 FROM log_size) "
                        "ON CONFLICT DO NOTHING")
        finally:
            con.execute("SELECT pg_advisory_unlock(4242)")


class PgWriter(threading.Thread):
    """Takes Batch / Transition / pairs / state / meta items from a queue and commits them in
    transactions of up to ``batch_size`` items or every ``flush_seconds``; on a lost connection
    it reconnects (backing off up to 2 s) and re-sends the same transaction."""

    def __init__(self, store: "PgStore"):
        super().__init__(name=f"pgstore-writer-{store.replica}", daemon=True)
        self.s = store
        self.q: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self._seq = itertools.count(1)
        self.committed = 0
        self.pending_batches = 0         # request rows queued (bounded by max_pending)
        self._plock = threading.Lock()
        self.con: psycopg.Connection | None = None
        self._cv = threading.Condition()
        self._last_retention = time.monotonic()
        self._last_cap = float("-inf")
        self._vacuum_due = False
        self.start()

    def put(self, item) -> int:
        if self.error is not None:
            raise StoreUnavailable(f"monitor store writer failed: {self.error!r}") from self.error
        seq = next(self._seq)
        self.q.put((seq, item))
        return seq

    def _apply(self, con, items) -> None:
        s = self.s
        cur = con.cursor()
        rows: list = []

        added = 0

        def flush_rows():
            nonlocal added
            for i in range(0, len(rows), INSERT_CHUNK):
                chunk = rows[i:i + INSERT_CHUNK]
                cur.execute(insert_requests_sql(len(chunk)), [v for r in chunk for v in r])
                got = cur.fetchall()
                added += sum(int(r["b"]) for r in got)
                lost = len(chunk) - len(got)
                if lost:   # another replica logged these query numbers first (handover race)
                    s.conflicts += lost
            rows.clear()

        for _, it in items:
            if it is _STOP:
                continue
            if isinstance(it, Batch):
                rows.append(it.row() + (s.replica,))
                continue
            flush_rows()
            if isinstance(it, tuple) and it[0] == "pairs":
                cur.executemany(INSERT_PAIR, [(p.t, p.client, p.qn, p.other, p.other_qn, p.dist,
                                               p.dense, p.peak, s.replica) for p in it[1]])
            elif isinstance(it, tuple) and it[0] == "state":
                cur.execute(UPSERT_STATE, it[1:])
            elif isinstance(it, tuple) and it[0] == "meta":
                cur.execute(UPSERT_META, it[1:])
            else:  # Transition
                cur.execute(INSERT_TRANSITION, transition_row(it) + (s.replica,))
        flush_rows()
        if added:
            cur.execute(ADD_SIZE, (s.replica, added))

    def _housekeeping(self) -> None:
        s = self.s
        now = time.monotonic()
        if s.retention_days > 0 and now - self._last_retention >= s.retention_every:
            self._last_retention = now
            self._exclusively("retention", self._retention)
        if s.max_mb > 0 and now - self._last_cap >= s.cap_every:
            self._last_cap = now
            self._vacuum_due = False
            self._exclusively("size cap", self._cap)
            if self._vacuum_due:
                # make the deleted rows' space reusable now (autovacuum may come a minute later,
                # and the files grow meanwhile); PostgreSQL keeps the files' size and refills it
                self._vacuum()

    def _exclusively(self, what: str, work) -> None:
        """Run ``work(con)`` in one transaction, on one replica at a time (a transaction-level
        advisory lock; the others skip this round); a lost connection postpones it (the
        writer's own retry loop reports the outage)."""
        try:
            con = self._connect()
            with con.transaction():
                if con.execute("SELECT pg_try_advisory_xact_lock(4243) AS ok").fetchone()["ok"]:
                    work(con)
        except CONN_ERRORS as exc:
            self._drop()
            log.debug("monitor store %s postponed: %r", what, exc)

    def _vacuum(self) -> None:
        """VACUUM the request table (outside any transaction, as PostgreSQL requires)."""
        try:
            with connect(self.s.dsn, self.s.schema, autocommit=True) as vc:
                vc.execute("VACUUM requests")
        except CONN_ERRORS as exc:
            log.debug("monitor store VACUUM postponed: %r", exc)

    def _retention(self, con) -> None:
        """``log.retention_days``: delete request rows that much older than the newest logged
        one, keeping rows with watermarked answers (the proof), as the SQLite writer does."""
        s = self.s
        newest = con.execute("SELECT max(t) AS t FROM requests").fetchone()["t"]
        if newest is None:
            return
        n = self._delete_rows(con, "t < %s AND n_wm = 0", (newest - s.retention_days * 86400,))[0]
        if n:
            s.pruned += n
            log.info("monitor store: %d request rows older than %g days deleted", n,
                     s.retention_days)

    def _delete_rows(self, con, where: str, args: tuple = (), limit: int | None = None
                     ) -> tuple[int, int]:
        """Delete request rows (the oldest ``limit`` of those matching, or all) in the caller's
        transaction and take their bytes off the size counter: (rows, bytes)."""
        sql = f"DELETE FROM requests WHERE {where} RETURNING {ROW_BYTES} AS b"
        if limit is not None:
            sql = (f"DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE {where} "
                   f"ORDER BY seq LIMIT {int(limit)}) RETURNING {ROW_BYTES} AS b")
        got = con.execute(sql, args).fetchall()
        freed = sum(int(r["b"]) for r in got)
        if freed:
            con.execute(ADD_SIZE, (self.s.replica, -freed))
        return len(got), freed

    @staticmethod
    def used_bytes(con) -> tuple[int, int]:
        """What ``log.max_mb`` caps: (the request rows' bytes, from the counter; the
        checkpoints' stored bytes)."""
        rows = con.execute("SELECT coalesce(sum(bytes), 0)::bigint AS b FROM log_size"
                           ).fetchone()["b"]
        states = con.execute("SELECT coalesce(sum(pg_column_size(state)), 0)::bigint AS b "
                             "FROM client_state").fetchone()["b"]
        return int(rows), int(states)

    def _cap(self, con) -> None:
        """``log.max_mb``: when the store holds more than the cap, delete the oldest request
        rows down to 90% of it, rows without watermarked answers first (as the SQLite writer
        does), then VACUUM so that their space is reused."""
        s = self.s
        cap = s.max_mb * 2 ** 20
        rows_bytes, states = self.used_bytes(con)
        used = rows_bytes + states
        if used <= cap:
            return
        count = con.execute("SELECT count(*) AS n FROM requests").fetchone()["n"]
        per_row = max(1.0, rows_bytes / max(1, int(count)))
        deleted = {"n_wm = 0": 0, "TRUE": 0}
        for where in deleted:
            while used > 0.9 * cap:
                # as many rows as the excess holds on average, at least one
                chunk = int(min(20000, max(1, (used - 0.9 * cap) // per_row)))
                n, freed = self._delete_rows(con, where, limit=chunk)
                if not n:
                    break
                deleted[where] += n
                used -= freed
        n = sum(deleted.values())
        if n:
            s.pruned += n
            log.warning("monitor store above log.max_mb = %g: the %d oldest request rows "
                        "deleted (%d of them held watermarked answers)", s.max_mb, n,
                        deleted["TRUE"])
            self._vacuum_due = s.vacuum_after_cap

    def _connect(self):
        if self.con is None or self.con.closed:
            self.con = connect(self.s.dsn, self.s.schema)
        return self.con

    def _drop(self) -> None:
        if self.con is not None:
            try:
                self.con.close()
            except Exception:  # noqa: BLE001
                pass
        self.con = None

    def run(self) -> None:
        s = self.s
        stop = False
        last_contact = time.monotonic()
        try:
            while not stop:
                try:
                    item = self.q.get(timeout=s.flush_seconds)
                except queue.Empty:
                    if time.monotonic() - last_contact >= s.heartbeat:   # notice an outage
                        try:
                            self._connect().execute("SELECT 1")
                            self._connect().rollback()
                            s._up()
                        except CONN_ERRORS as exc:
                            s._down(exc)
                            self._drop()
                        last_contact = time.monotonic()
                    continue
                items = take_batch(self.q, item, s.batch_size, s.flush_seconds)
                stop = any(it is _STOP for _, it in items)
                delay = 0.05
                while True:
                    try:
                        con = self._connect()
                        with con.transaction():
                            self._apply(con, items)
                        s._up()
                        break
                    except CONN_ERRORS as exc:
                        s._down(exc)
                        self._drop()
                        if self.s._closing and s.down_for() > s.close_timeout:
                            s.abandoned += sum(1 for _, it in items if it is not _STOP)
                            log.error("PostgreSQL unreachable for %.0f s at close: %d queued "
                                      "items not written", s.down_for(), s.abandoned)
                            break
                        time.sleep(delay)
                        delay = min(2.0, delay * 2)
                last_contact = time.monotonic()
                self._housekeeping()
                nb = sum(1 for _, it in items if isinstance(it, Batch))
                if nb:
                    with self._plock:
                        self.pending_batches -= nb
                with self._cv:
                    self.committed = max(self.committed, max(seq for seq, _ in items))
                    self._cv.notify_all()
                for _ in items:
                    self.q.task_done()
        except BaseException as exc:  # surfaced by put()/flush()/close()
            self.error = exc
            log.exception("monitor store writer failed")
        finally:
            with self._cv:
                self._cv.notify_all()
            self._drop()


class PgStore(MonitorStore):
    """The monitor's store in PostgreSQL (see the module doc). ``schema``: a PostgreSQL schema
    of its own (created when missing; tests use one each); ``replica``: the name written with
    every row."""

    def __init__(self, dsn: str, replica: str | None = None, *, schema: str | None = None,
                 batch_size: int = 512, flush_seconds: float = 0.2, max_pending: int = 20000,
                 heartbeat: float = 1.0, close_timeout: float = 10.0,
                 retention_days: float = 0.0, retention_every: float = 600.0,
                 max_mb: float = 0.0, cap_every: float = 5.0, vacuum_after_cap: bool = True):
        self.dsn = dsn
        self.schema = schema
        self.replica = replica or f"{os.uname().nodename}-{os.getpid()}"
        self.batch_size = batch_size
        self.flush_seconds = flush_seconds
        self.max_pending = max_pending
        self.heartbeat = heartbeat
        self.close_timeout = close_timeout
        self.retention_days = retention_days    # log.retention_days (0: keep everything)
        self.retention_every = retention_every
        self.max_mb = max_mb                    # log.max_mb (0: no cap)
        self.cap_every = cap_every
        self.vacuum_after_cap = vacuum_after_cap  # VACUUM requests after the cap deleted rows
        self.pruned = 0         # request rows deleted by retention or the cap (by this replica)
        self.conflicts = 0      # request rows another replica had logged first
        self._dropped = 0       # request rows/checkpoints dropped by the max_pending bound
        self.abandoned = 0      # items not written because PostgreSQL stayed down at close
        self._down_since: float | None = None
        self.last_error: BaseException | None = None
        self._closing = False
        create_schema(dsn, schema)
        self._local = threading.local()
        self._conns: list[psycopg.Connection] = []
        self._conns_lock = threading.Lock()
        self._writer = PgWriter(self)

    @classmethod
    def for_log(cls, dsn: str, replica: str | None, lc, schema: str | None = None
                ) -> "PgStore":
        """The store a server runs with its monitor config's ``[log]`` section ``lc``: writer
        batching, the bound on what waits for PostgreSQL, retention and the size cap."""
        return cls(dsn, replica, schema=schema, batch_size=lc.batch_size,
                   flush_seconds=lc.flush_seconds, max_pending=lc.max_queue,
                   retention_days=lc.retention_days, max_mb=lc.max_mb)

    # --- health ---------------------------------------------------------------------------------
    def _down(self, exc: BaseException) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("PostgreSQL unreachable (%s); retrying", str(exc).strip()[:200])
        self.last_error = exc

    def _up(self) -> None:
        if self._down_since is not None:
            log.warning("PostgreSQL reachable again after %.1f s", self.down_for())
            self._down_since = None

    def failure(self):
        if self._writer.error is not None:
            return f"store writer stopped: {self._writer.error}"
        if self._down_since is None:
            return None
        return f"PostgreSQL unreachable for {self.down_for():.1f} s ({self.last_error})"

    def dropped(self):
        return self._dropped

    def wait_committed(self, ticket, timeout):
        w = self._writer
        with w._cv:
            return w._cv.wait_for(lambda: w.committed >= ticket or w.error is not None
                                  or not w.is_alive(), timeout) and w.committed >= ticket

    def available(self) -> bool:
        """False from the first failed contact with PostgreSQL until the next good one."""
        return self._down_since is None

    def down_for(self) -> float:
        return 0.0 if self._down_since is None else time.monotonic() - self._down_since

    # --- writes ---------------------------------------------------------------------------------
    def put_batch(self, batch):
        w = self._writer
        with w._plock:
            if w.q.qsize() >= self.max_pending:     # PostgreSQL down for long: bound memory
                self._dropped += 1
                if self._dropped == 1 or self._dropped % 1000 == 0:
                    log.error("monitor store: %d items waiting; %d request rows/checkpoints "
                              "dropped so far", w.q.qsize(), self._dropped)
                return next(w._seq)
            w.pending_batches += 1
        return w.put(batch)

    def put_transition(self, tr):
        return self._writer.put(tr)

    def put_pairs(self, pairs):
        return self._writer.put(("pairs", list(pairs)))

    def put_state(self, client, qn, level, config_hash, blob, t):
        w = self._writer
        if w.q.qsize() >= self.max_pending:
            self._dropped += 1
            return next(w._seq)
        return w.put(("state", client, qn, level, config_hash, blob, t))

    def set_meta(self, key, value):
        self._writer.put(("meta", key, value))

    def is_committed(self, ticket):
        return self._writer.committed >= ticket

    def queue_depth(self):
        return self._writer.q.qsize()

    def uncommitted(self):
        return self._writer.q.unfinished_tasks

    def flush(self, timeout: float | None = None):
        """Wait until everything put so far is committed. Raises StoreUnavailable when
        PostgreSQL has been down for ``timeout`` seconds (default: ``close_timeout``) meanwhile."""
        w = self._writer
        timeout = self.close_timeout if timeout is None else timeout
        with w.q.all_tasks_done:
            while w.q.unfinished_tasks and w.is_alive():
                w.q.all_tasks_done.wait(0.05)
                if self.down_for() > timeout:
                    raise StoreUnavailable(f"PostgreSQL unreachable for {self.down_for():.0f} s; "
                                           f"{w.q.unfinished_tasks} items not yet written")
        if w.error is not None:
            raise StoreUnavailable(f"monitor store writer failed: {w.error!r}") from w.error

    def close(self):
        self._closing = True
        w = self._writer
        try:
            if w.is_alive():
                w.q.put((0, _STOP))
                w.join()
            if w.error is not None:
                raise StoreUnavailable(f"monitor store writer failed: {w.error!r}") from w.error
            if self.abandoned:
                raise StoreUnavailable(f"PostgreSQL still unreachable after "
                                       f"{self.close_timeout:g} s: {self.abandoned} queued "
                                       f"items were not written")
        finally:
            with self._conns_lock:
                for c in self._conns:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001 - a reader of another thread
                        pass
                self._conns.clear()

    # --- reads ----------------------------------------------------------------------------------
    def _con(self) -> psycopg.Connection:
        c = getattr(self._local, "con", None)
        if c is None or c.closed:
            c = connect(self.dsn, self.schema, autocommit=True)
            self._local.con = c
            with self._conns_lock:
                self._conns.append(c)
        return c

    def _q(self, sql: str, args=(), many: bool = True):
        """Run a read; one reconnect on a broken connection, then StoreUnavailable."""
        return self._run(sql, args, lambda cur: cur.fetchall() if many else cur.fetchone())

    def execute(self, sql: str, args=()) -> list[dict]:
        """A statement on this thread's autocommit connection (rows, or [] when none)."""
        return self._run(sql, args, lambda cur: cur.fetchall() if cur.description else [])

    def _run(self, sql: str, args, fetch):
        for attempt in (0, 1):
            try:
                out = fetch(self._con().execute(sql, args))
                self._up()
                return out
            except CONN_ERRORS as exc:
                self._local.con = None      # a connection broken by a past restart: once more
                if attempt:
                    self._down(exc)
                    raise StoreUnavailable(f"PostgreSQL unreachable: {exc}") from exc
        raise AssertionError("unreachable")

    def max_qn(self, client):
        r = self._q("SELECT qn0 + n AS m FROM requests WHERE client=%s ORDER BY qn0 DESC LIMIT 1",
                    (client,), many=False)
        return int(r["m"]) if r else 0

    def last_level(self, client):
        r = self._q("SELECT to_level FROM transitions WHERE client=%s ORDER BY id DESC LIMIT 1",
                    (client,), many=False)
        return Level(r["to_level"]) if r else Level.NORMAL

    def load_state(self, client):
        r = self._q("SELECT qn, level, config_hash, state FROM client_state WHERE client=%s",
                    (client,), many=False)
        if not r:
            return None
        return {"qn": r["qn"], "level": Level(r["level"]), "config_hash": r["config_hash"],
                "state": bytes(r["state"])}

    def _decoded(self, client: str, after_qn: int = 0, raw: bool = True, chunk: int = 256
                 ) -> Iterator[Decoded]:
        last = after_qn - 1
        while True:
            rows = self._q("SELECT * FROM requests WHERE client=%s AND qn0 > %s ORDER BY qn0 "
                           "LIMIT %s", (client, last, chunk))
            if not rows:
                return
            for r in rows:
                yield Decoded(r, raw)
            last = rows[-1]["qn0"]

    def requests(self, client, after_qn):
        for d in self._decoded(client, after_qn):
            yield d.qn0 + 1, d.t, (d.x if d.kept.all() else None), d.probs

    def pairs(self):
        return [(r["client"], r["other"], r["t"]) for r in
                self._q("SELECT client, other, t FROM pairs ORDER BY id")]

    def recent_items(self, limit):
        def page(last):
            return self._q("SELECT * FROM requests" + (" WHERE seq < %s" if last else "")
                           + " ORDER BY seq DESC LIMIT 256", (last,) if last else ())
        return recent_items_of(page, lambda r: Decoded(r, raw=True), limit)

    def recent_clients(self, limit):
        def page(last):
            return self._q("SELECT seq, client FROM requests" +
                           (" WHERE seq < %s" if last else "") + " ORDER BY seq DESC LIMIT 1024",
                           (last,) if last else ())
        return recent_clients_of(page, [r["client"] for r in self._q(
            "SELECT client FROM client_state ORDER BY updated DESC LIMIT %s", (limit,))], limit)

    # --- reads for tools and tests (the QueryLog's views) ------------------------------------------
    def client_ids(self) -> list[str]:
        return [r["client"] for r in self._q(
            "SELECT client FROM requests UNION SELECT client FROM transitions UNION SELECT "
            "client FROM client_state ORDER BY 1")]

    def transitions(self, client: str | None = None) -> list[dict]:
        sql = "SELECT * FROM transitions" + (" WHERE client=%s" if client else "") + " ORDER BY id"
        out = []
        for d in self._q(sql, (client,) if client else ()):
            d["evidence"] = json.loads(d["evidence"])
            d["from_level"], d["to_level"] = Level(d["from_level"]), Level(d["to_level"])
            out.append(d)
        return out

    def series(self, client: str) -> dict[str, np.ndarray]:
        return series_of(list(self._decoded(client, raw=False)))

    def pair_rows(self) -> list[dict]:
        return self._q("SELECT * FROM pairs ORDER BY id")

    def meta(self, key: str) -> str | None:
        r = self._q("SELECT value FROM meta WHERE key=%s", (key,), many=False)
        return r["value"] if r else None

    # --- cluster: ownership and following the others' rows -----------------------------------------
    def claim(self, client: str) -> str | None:
        """Make this replica the client's owner; returns the previous owner when it was another
        replica (which is told on channel ``modelguard_owner``), else None."""
        r = self.execute(
            "WITH old AS (SELECT replica FROM owners WHERE client=%s FOR UPDATE), "
            "up AS (INSERT INTO owners (client, replica, since) VALUES (%s, %s, %s) "
            "ON CONFLICT (client) DO UPDATE SET replica = excluded.replica, since = "
            "excluded.since, epoch = owners.epoch + 1 WHERE owners.replica <> excluded.replica "
            "RETURNING epoch) SELECT (SELECT replica FROM old) AS prev, "
            "(SELECT epoch FROM up) AS epoch",
            (client, client, self.replica, time.time()))
        prev = r[0]["prev"] if r else None
        if prev is not None and prev != self.replica:
            self.execute("SELECT pg_notify(%s, %s)",
                         (self.channel, json.dumps([client, self.replica])))
            return prev
        return None

    @property
    def channel(self) -> str:
        return "modelguard_owner" + (f"_{self.schema}" if self.schema else "")

    def owned_clients(self, limit: int) -> list[str]:
        """This replica's clients, the most recently claimed or checkpointed first (with or
        without a checkpoint: after a crash, those without one replay their whole stream)."""
        return [r["client"] for r in self._q(
            "SELECT o.client FROM owners o LEFT JOIN client_state s USING (client) WHERE "
            "o.replica = %s ORDER BY GREATEST(s.updated, o.since) DESC LIMIT %s",
            (self.replica, limit))]

    def owner(self, client: str) -> str | None:
        r = self._q("SELECT replica FROM owners WHERE client=%s", (client,), many=False)
        return r["replica"] if r else None


class _Follower:
    """Rows of a table written by other replicas, each once, in ``id`` order as they become
    visible. Ids are assigned when a row is inserted, not when its transaction commits, so a
    row with a lower id can appear after a higher one: rows above ``low`` are remembered, and
    ``low`` only passes an id once it was seen (or ``settle`` seconds passed)."""

    def __init__(self, store: PgStore, table: str, key: str, start: int, settle: float = 10.0):
        self.s, self.table, self.key = store, table, key
        self.low = start
        self.seen: dict[int, float] = {}
        self.settle = settle

    def poll(self, limit: int = 512) -> list[dict]:
        rows = self.s._q(f"SELECT * FROM {self.table} WHERE {self.key} > %s AND replica <> %s "
                         f"ORDER BY {self.key} LIMIT %s", (self.low, self.s.replica, limit))
        now = time.monotonic()
        new = [r for r in rows if r[self.key] not in self.seen]
        for r in new:
            self.seen[r[self.key]] = now
        # ids of this replica's own rows are never returned: treat the settle time as "seen"
        settled = sorted(k for k, t0 in self.seen.items() if now - t0 > self.settle)
        if settled:
            self.low = max(self.low, settled[-1])
            self.seen = {k: v for k, v in self.seen.items() if k > self.low}
        return new


class SharedMonitor(Monitor):
    """A replica's monitor over a shared :class:`PgStore` (docs/scaleout.md).

    * ownership: loading a client claims it (``owners``); the replica that held it before is
      notified and drops its in-memory copy, so a client that comes back later is restored
      from the store (checkpoint + requests logged since), never from a stale copy;
    * start: only this replica's own clients are restored in the background;
    * linking: a follower thread adds the other replicas' logged requests to the linker's
      index and their pairs to its groups (silently: the replica that found a pair logs the
      transitions it causes), every ``follow_seconds``;
    * fail mode (``log.on_failure`` of the monitor config, as for the SQLite log): with
      PostgreSQL unreachable, ``"closed"`` refuses every request (the store's ``failure()``
      makes ``level`` raise :class:`monitor.log.LogUnavailable`: UNAVAILABLE), ``"open"``
      answers from the state in memory (a client not in memory starts empty at NORMAL) and
      queues the log (up to ``max_pending`` items) for when it is back.
    """

    def __init__(self, config, store: PgStore, *, follow_seconds: float = 0.25,
                 verify_owner: bool = True, **kw):
        self.follow_seconds = follow_seconds
        self.verify_owner = verify_owner
        self.handovers = 0          # clients another replica took from this one
        self.followed = 0           # items of other replicas added to the linker's index
        self._stop_follow = threading.Event()
        self._follow_thread: threading.Thread | None = None
        super().__init__(config, store=store, **kw)
        self._follow_thread = threading.Thread(target=self._follow, daemon=True,
                                               name=f"monitor-follow-{store.replica}")
        self._follow_thread.start()

    # the follower starts at the rows the linker restored from at start-up
    def _restore_linker(self):
        self._start_seq = self._max_id("requests", "seq")
        self._start_pair = self._max_id("pairs", "id")
        super()._restore_linker()

    def _max_id(self, table, key):
        r = self.store.execute(f"SELECT COALESCE(MAX({key}), 0) AS m FROM {table}")
        return int(r[0]["m"])

    def _warm_clients(self) -> list[str]:
        return self.store.owned_clients(self._exec.max_clients)   # this replica's own only

    def _load(self, client):
        try:
            prev = self.store.claim(client)
        except StoreUnavailable:
            if not self._fail_open:
                raise
            prev = None          # fail-open: serve from whatever the store gives below
        if prev is not None:
            log.info("client %s: taken over from replica %s", client, prev)
        try:
            return super()._load(client)
        except StoreUnavailable:
            if not self._fail_open:
                raise
            log.warning("client %s: store unreachable; starting it empty (fail-open)", client)
            eng = ClientEngine(self.config, client)
            self._saved[client] = (0, None)
            return eng

    def waits_for(self, client_id: str) -> bool:
        """Always: every request may read the shared store (the owner check, a handover)."""
        return True

    def level(self, client_id, images=None):
        """As Monitor.level; with ``verify_owner`` a client held in memory is first checked
        against ``owners`` (one indexed read): if another replica claimed it meanwhile (and its
        notification has not arrived yet), the copy here is stale and is dropped, so the
        client is restored from the store. Without it, a handover is noticed when the
        notification arrives (milliseconds)."""
        if self.verify_owner and client_id in self._engines and self.store.available():
            try:
                owner = self.store.owner(client_id)
            except StoreUnavailable:
                owner = None        # the fail mode is decided by Monitor.level below
            if owner is not None and owner != self.store.replica:
                self._drop(client_id)
        return super().level(client_id, images)

    def _drop(self, client: str) -> None:
        """Another replica took the client: forget our copy (no checkpoint: it is stale)."""
        with self._lock(client):
            with self._global:
                gone = self._engines.pop(client, None)
                self._evicted.pop(client, None)
                self._resident_bytes -= self._bytes.pop(client, 0)
            self._saved.pop(client, None)
        if gone is not None:
            self.handovers += 1
            log.info("client %s: now served by another replica; local state dropped",
                     client)

    def _follow(self):
        st: PgStore = self.store
        reqs = _Follower(st, "requests", "seq", getattr(self, "_start_seq", 0))
        prs = _Follower(st, "pairs", "id", getattr(self, "_start_pair", 0))
        con = None
        while not self._stop_follow.is_set():
            try:
                if con is None:
                    con = connect(st.dsn, st.schema, autocommit=True)
                    con.execute(f"LISTEN {st.channel}")
                for n in con.notifies(timeout=self.follow_seconds):
                    client, owner = json.loads(n.payload)
                    if owner != st.replica:
                        self._drop(client)
                if self.linker is not None:
                    self._follow_rows(reqs, prs)
            except CONN_ERRORS as exc:
                st._down(exc)
                try:
                    if con is not None:
                        con.close()
                except Exception:  # noqa: BLE001
                    pass
                con = None
                self._stop_follow.wait(0.5)
            except StoreUnavailable:
                self._stop_follow.wait(0.5)
            except Exception:  # noqa: BLE001 - following is best effort; log and go on
                log.exception("following the other replicas failed")
                self._stop_follow.wait(1.0)
        if con is not None:
            con.close()

    def _follow_rows(self, reqs: _Follower, prs: _Follower) -> None:
        lk = self.linker
        for r in reqs.poll():
            d = Decoded(r, raw=True)
            if not d.kept.all():
                continue
            v = det_view(d.x)[0]
            with self._link_lock:
                lk.refill(d.client, d.qn0, v)
                lk.last_qn[d.client] = max(lk.last_qn.get(d.client, 0), d.qn0 + d.n)
            self.followed += d.n
        new = prs.poll()
        if not new:
            return
        cfg = self.config.linking
        with self._link_lock:
            touched = {}
            for p in new:
                g = lk.groups.add_pair(p["client"], p["other"], p["t"])
                if g is not None:
                    touched[g.id] = g
            for g in {lk.groups.of[m].id: lk.groups.of[m] for g in touched.values()
                      for m in g.members}.values():
                for r in cfg.rules:
                    if g.pairs >= r.pairs:
                        g.rule_level = max(g.rule_level, int(r.level))
                top = int(g.level)
                if cfg.raise_members and top:
                    for m in g.members:
                        if lk.eff.get(m, 0) < top:
                            lk.eff[m] = top
                    g.applied, g.dirty = top, False
            lk._tops = None

    def close(self):
        self._stop_follow.set()
        if self._follow_thread is not None:
            self._follow_thread.join(5.0)
        super().close()



# --------------------------------------------------------------------------------------------
# a consistent copy of a shared store as a SQLite log, for the tools that read SQLite
# --------------------------------------------------------------------------------------------


def snapshot(dsn: str, out, schema: str | None = None, *, chunk: int = 2000,
             progress=None) -> dict:
    """Copy the monitor's tables from PostgreSQL (one REPEATABLE READ transaction: a consistent
    view while the replicas keep writing) into a new SQLite log at ``out`` (schema of
    monitor.log), so that ``python -m monitor --db OUT ...`` and ``python -m service.defences
    verify --db OUT`` read a replicated deployment's log. The rows' scores were written by this
    version's detectors (the replicas run it), so they take its score layout. Refuses an ``out``
    that exists. Returns the rows copied per table."""
    from pathlib import Path

    from monitor.log import connect as sqlite_connect
    from monitor.log import layout_id

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: snapshot writes a new SQLite log; remove it or "
                              "choose another path")
    counts = {}
    dst = sqlite_connect(out)
    try:
        layout = layout_id(dst)
        with connect(dsn, schema, autocommit=True) as src:
            with src.transaction():
                src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = src.cursor(name="snapshot_requests", row_factory=tuple_row)
                cur.itersize = chunk
                cur.execute(f"SELECT {REQUEST_COLUMNS} FROM requests ORDER BY seq")
                n = 0
                ins = (f"INSERT INTO requests ({REQUEST_COLUMNS}, layout) VALUES "
                       f"({','.join('?' * 21)})")
                while rows := cur.fetchmany(chunk):
                    with dst:
                        dst.executemany(ins, [tuple(bytes(v) if isinstance(v, memoryview)
                                                    else v for v in r) + (layout,)
                                              for r in rows])
                    n += len(rows)
                    if progress is not None:
                        progress(n)
                cur.close()
                counts["requests"] = n
                simple = {
                    "transitions": "client, t, qn, from_level, to_level, rule, evidence",
                    "pairs": "t, client, qn, other, other_qn, dist, dense, peak",
                    "client_state": "client, qn, level, config_hash, state, updated",
                }
                order = {"transitions": "id", "pairs": "id", "client_state": "client"}
                for table, cols in simple.items():
                    rows = src.cursor(row_factory=tuple_row).execute(
                        f"SELECT {cols} FROM {table} ORDER BY {order[table]}").fetchall()
                    with dst:
                        dst.executemany(f"INSERT INTO {table} ({cols}) VALUES "
                                        f"({','.join('?' * len(cols.split(',')))})",
                                        [tuple(bytes(v) if isinstance(v, memoryview) else v
                                               for v in r) for r in rows])
                    counts[table] = len(rows)
                meta = src.cursor(row_factory=tuple_row).execute(
                    "SELECT key, value FROM meta WHERE key <> 'schema'").fetchall()
                with dst:
                    dst.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
                counts["meta"] = len(meta)
    except BaseException:
        dst.close()
        for f in (out, Path(f"{out}-wal"), Path(f"{out}-shm")):
            f.unlink(missing_ok=True)
        raise
    dst.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    dst.close()
    return counts
