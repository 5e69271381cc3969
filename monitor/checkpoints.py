"""The embedded store's checkpoint file: per-client detector state, beside the query log.

A client's pickled state is megabytes (~18 MiB after 100k queries on the 0-255 grid, 29 MiB
for off-grid items). Written
into the query log it held the log's single writer for ~100 ms, and every answer waiting for its
own rows waited for it. So checkpoints live in their own SQLite file (``<log>.state<suffix>``,
e.g. ``monitor.state.db`` beside ``monitor.db``) with 64 KiB pages (a 16 MiB blob commits about
4x faster than with SQLite's default 4 KiB pages), written by their own thread.

Order: a checkpoint of a client after its query ``qn`` is written only once every log item put
before it is committed, so after a crash a stored checkpoint never runs ahead of the logged
requests (restoring it replays the requests logged after ``qn``, never a gap).

Logs written before the checkpoint file existed keep their checkpoints in the log's own
``client_state`` table; readers fall back to it for clients the checkpoint file does not hold.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from common.types import Level
from monitor.log import _STOP, LogUnavailable, Writer, _connect_readonly

PAGE_SIZE = 65536

CHECKPOINT_SCHEMA = """
CREATE TABLE IF NOT EXISTS client_state (
    client TEXT PRIMARY KEY,
    qn INTEGER NOT NULL,            -- the state holds the client's queries 1..qn
    level INTEGER NOT NULL,
    config_hash TEXT NOT NULL,      -- detectors, rules, ladder and engine version it was made with
    state BLOB NOT NULL,            -- pickled monitor.engine.ClientEngine
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS client_state_updated ON client_state(updated);
-- incremental checkpoints after a client's full one (monitor.log.pickle_delta), applied in qn
-- order; a full checkpoint of the client deletes them
CREATE TABLE IF NOT EXISTS client_delta (
    client TEXT NOT NULL,
    qn INTEGER NOT NULL,
    state BLOB NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (client, qn)
);
"""


def checkpoint_path(log_path: str | Path) -> Path:
    """Where the checkpoints of the log at ``log_path`` live: ``monitor.db`` ->
    ``monitor.state.db`` (``log`` -> ``log.state``)."""
    p = Path(log_path)
    return p.with_name(f"{p.stem}.state{p.suffix}")


def connect_checkpoints(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """A connection to the checkpoint file (``create`` False: read-only, the file exists)."""
    path = Path(path)
    if not create:
        con = _connect_readonly(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(path), timeout=30.0, check_same_thread=False)
        # the page size of a new file must be set before WAL mode fixes it
        con.execute(f"PRAGMA page_size={PAGE_SIZE}")
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(CHECKPOINT_SCHEMA)
        con.commit()
    con.row_factory = sqlite3.Row
    return con


class CheckpointReader:
    """Reads a log's checkpoints: from its checkpoint file (opened once it exists), then from
    the log's own ``client_state`` table (logs written before the checkpoint file)."""

    def __init__(self, log_con: sqlite3.Connection, log_path: str | Path, create: bool):
        self._log_con = log_con
        self._path = checkpoint_path(log_path)
        self._create = create
        self._con: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def _cons(self) -> list[sqlite3.Connection]:
        if self._con is None and self._path.exists():
            self._con = connect_checkpoints(self._path, create=self._create)
        cons = [self._con] if self._con is not None else []
        if self._log_con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND "
                                 "name='client_state'").fetchone():
            cons.append(self._log_con)
        return cons

    def load(self, client: str) -> dict | None:
        """{"qn", "level", "config_hash", "state", "deltas"} or None: the full checkpoint,
        and the incremental ones written after it in order (``qn``: the last one's; "deltas"
        None for a checkpoint in the log's own table, which none can follow)."""
        for con in self._cons():
            r = con.execute("SELECT qn, level, config_hash, state FROM client_state WHERE "
                            "client=?", (client,)).fetchone()
            if r:
                deltas = None        # a log's own table (before the checkpoint file): none
                if con is self._con and _has_table(con, "client_delta"):
                    deltas = con.execute("SELECT qn, state FROM client_delta WHERE client=? "
                                         "AND qn > ? ORDER BY qn", (client, r[0])).fetchall()
                return {"qn": deltas[-1][0] if deltas else r[0], "level": Level(r[1]),
                        "config_hash": r[2], "state": r[3],
                        "deltas": None if deltas is None else [d[1] for d in deltas]}
        return None

    def recent(self, limit: int) -> list[str]:
        """Clients with a checkpoint, most recently checkpointed first."""
        seen: dict[str, float] = {}
        for con in self._cons():
            sql = "SELECT client, updated FROM client_state ORDER BY updated DESC LIMIT ?"
            if con is self._con and _has_table(con, "client_delta"):
                sql = ("SELECT client, max(updated) AS u FROM (SELECT client, updated FROM "
                       "client_state UNION ALL SELECT client, updated FROM client_delta) "
                       "GROUP BY client ORDER BY u DESC LIMIT ?")
            for c, u in con.execute(sql, (limit,)):
                seen.setdefault(c, u)     # the checkpoint file's hides an older one
        return sorted(seen, key=lambda c: -seen[c])[:limit]

    def clients(self) -> set[str]:
        return {r[0] for con in self._cons() for r in con.execute("SELECT client FROM "
                                                                  "client_state")}


def _has_table(con: sqlite3.Connection, name: str) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                       (name,)).fetchone() is not None


class CheckpointWriter(Writer):
    """The checkpoint file's writer thread: the query log's :class:`Writer` (queue, group
    commit, retries, ``max_queue`` bound) writing only ``("state", client, qn, level,
    config_hash, blob, t, rows_ticket)`` items (a full checkpoint: replaces the client's, drops
    its deltas) and ``("delta", client, qn, None, None, blob, t, rows_ticket)`` items (an
    incremental one), in order, each once ``rows`` has committed ``rows_ticket``."""

    def __init__(self, path: str | Path, rows: Writer, **kw):
        self.rows = rows
        super().__init__(path, **kw)
        self.name = "monitor-checkpoint-writer"

    def _open(self) -> sqlite3.Connection:
        return connect_checkpoints(self.path)

    def _housekeeping(self) -> None:
        """Nothing to age out: one row per client, replaced by its next checkpoint."""

    def _write(self, items) -> bool:
        states = [it for _, it in items if it is not _STOP]
        if states:
            dep = max(it[7] for it in states)
            if not self.rows.wait_committed(dep, None):
                raise LogUnavailable(f"the monitor log's writer stopped before the requests "
                                     f"these checkpoints cover were written: "
                                     f"{self.rows.error!r}")
            with self.con:
                for it in states:
                    if it[0] == "delta":
                        # (client_state's row is left alone: an UPDATE would rewrite its
                        # megabytes; recent() reads the deltas' times too)
                        self.con.execute("INSERT OR REPLACE INTO client_delta VALUES (?,?,?,?)",
                                         (it[1], it[2], it[5], it[6]))
                    else:
                        self.con.execute("INSERT OR REPLACE INTO client_state VALUES "
                                         "(?,?,?,?,?,?)", it[1:7])
                        self.con.execute("DELETE FROM client_delta WHERE client=?", (it[1],))
        return len(states) < len(items)


