"""Where the monitor keeps its state: the one small interface between the monitor and storage.

A store holds the query log, the level transitions, the per-client detector checkpoints,
cross-client linking's pairs and a little metadata. Writes are asynchronous (``put_*`` return
at once; ``flush`` waits until everything put before is durable); log items (request rows,
transitions, pairs) are durable in the order put, and a checkpoint only after every log item
put before it. Reads may come from any thread. :class:`SQLiteStore` (the log in one SQLite
file, the checkpoints in another, WAL mode, one writer thread each) is the embedded default; a
shared store for several server replicas implements the same methods.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Iterator

from common.types import Level
from monitor.checkpoints import CheckpointWriter, checkpoint_path
from monitor.log import Batch, QueryLog, Writer


class MonitorStore(ABC):
    # --- writes: asynchronous, applied in the order they were put ----------------------------
    # Every put_* returns a ticket for is_committed / wait_committed; the tickets of log items
    # grow in the order they were put (a checkpoint's ticket compares with nothing).
    @abstractmethod
    def put_batch(self, batch: Batch) -> int:
        """One request's items with the scores and levels after each."""

    @abstractmethod
    def put_transition(self, tr) -> int:
        """A level change (monitor.engine.Transition)."""

    @abstractmethod
    def put_pairs(self, pairs: list) -> int:
        """Cross-client linking's attack-like pairs (monitor.linking.Pair) of one request."""

    @abstractmethod
    def put_state(self, client: str, qn: int, level: int, config_hash: str, blob: bytes,
                  t: float) -> int:
        """A checkpoint of the client's detector state after its query ``qn``. It becomes
        durable only after every log item put before it; log items put after it need not wait
        for it (a checkpoint is megabytes, a request's rows must not queue behind one)."""

    # incremental checkpoints (monitor.log.pickle_delta): stores that keep them say so
    supports_deltas = False

    def put_state_delta(self, client: str, qn: int, blob: bytes, t: float) -> int:
        """An incremental checkpoint of the client after its query ``qn``, to be applied on
        top of its last full one and the deltas before it (``load_state``'s "deltas"); the
        same ordering as ``put_state``."""
        raise NotImplementedError(f"{type(self).__name__} keeps full checkpoints only")

    @abstractmethod
    def is_committed(self, ticket) -> bool:
        """The item of this ticket is durable, and so is every log item (request rows,
        transitions, pairs) put before it."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Block until everything put so far is durable; raises if the writer failed."""

    @abstractmethod
    def close(self) -> None: ...

    def wait_committed(self, ticket: int, timeout: float | None) -> bool:
        """Block until ``ticket`` is durable; False if ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_committed(ticket):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def failure(self) -> str | None:
        """Why writes are not being made durable right now (None: healthy). A store retries by
        itself and clears this once writes succeed again."""
        return None

    def dropped(self) -> int:
        """Request rows and checkpoints dropped by the store's queue bound."""
        return 0

    def queue_depth(self) -> int:
        """Items put and not yet picked up by the writer (0 for stores without a queue)."""
        return 0

    def uncommitted(self) -> int:
        """Items put and not yet durable: the writer's lag in items."""
        return 0

    # --- reads ----------------------------------------------------------------------------------
    @abstractmethod
    def max_qn(self, client: str) -> int: ...

    @abstractmethod
    def last_level(self, client: str) -> Level: ...

    @abstractmethod
    def load_state(self, client: str) -> dict | None:
        """{"qn", "level", "config_hash", "state"} or None; with ``supports_deltas`` also
        "deltas": the incremental checkpoints after the full one, in order ("qn" the last
        one's)."""

    @abstractmethod
    def requests(self, client: str, after_qn: int) -> Iterator[tuple]:
        """The client's logged requests after ``after_qn``: (first qn, t, x, probs)."""

    @abstractmethod
    def pairs(self) -> Iterator[tuple]:
        """Every stored pair in the order put: (client, other, t)."""

    @abstractmethod
    def recent_items(self, limit: int) -> list[tuple]:
        """The last logged requests of all clients holding ``limit`` items, oldest first:
        (client, qn0, x)."""

    @abstractmethod
    def recent_clients(self, limit: int) -> list[str]:
        """At most ``limit`` clients for a restart to restore before traffic: those of the
        newest logged requests first (after a crash, their checkpoints lag the log), then the
        most recently checkpointed (monitor.log.recent_clients_of)."""


class SQLiteStore(MonitorStore):
    """The embedded store: the log in a SQLite file in WAL mode, the checkpoints in a second one
    beside it (:mod:`monitor.checkpoints`). Each file has its own background writer thread
    (batched transactions), so a request's rows never wait for a checkpoint's megabytes; each
    reading thread has its own connections, so readers never wait on each other or on a global
    lock. Tickets: ``2 * seq`` for the log writer's items, ``2 * seq + 1`` for checkpoints."""

    def __init__(self, path: str | Path, batch_size: int = 512, flush_seconds: float = 0.2,
                 retention_days: float = 0.0, max_mb: float = 0.0, max_queue: int = 0,
                 close_timeout: float = 30.0):
        self.path = Path(path)
        self._writer = Writer(self.path, batch_size, flush_seconds, retention_days, max_mb,
                              max_queue)
        try:
            self._ckpt_writer = CheckpointWriter(checkpoint_path(self.path), self._writer,
                                                 batch_size=8, flush_seconds=flush_seconds,
                                                 max_queue=max_queue)
        except BaseException:
            self._writer.close(close_timeout)
            raise
        self._close_timeout = close_timeout
        self._local = threading.local()
        self._readers: list[QueryLog] = []
        self._readers_lock = threading.Lock()

    @property
    def reader(self) -> QueryLog:
        q = getattr(self._local, "q", None)
        if q is None:
            q = QueryLog(self.path, create=True)
            self._local.q = q
            with self._readers_lock:
                self._readers.append(q)
        return q

    def put_batch(self, batch):
        return 2 * self._writer.put(batch)

    def put_transition(self, tr):
        return 2 * self._writer.put(tr)

    def put_pairs(self, pairs):
        return 2 * self._writer.put(("pairs", list(pairs)))

    def put_state(self, client, qn, level, config_hash, blob, t):
        # after every log item put so far: the client's rows up to qn among them
        return 2 * self._ckpt_writer.put(("state", client, qn, level, config_hash, blob, t,
                                          self._writer.issued)) + 1

    supports_deltas = True

    def put_state_delta(self, client, qn, blob, t):
        return 2 * self._ckpt_writer.put(("delta", client, qn, None, None, blob, t,
                                          self._writer.issued)) + 1

    def _lane(self, ticket) -> tuple[Writer, int]:
        return (self._ckpt_writer if ticket % 2 else self._writer), ticket // 2

    def is_committed(self, ticket):
        w, seq = self._lane(ticket)
        return w.committed >= seq

    def wait_committed(self, ticket, timeout):
        w, seq = self._lane(ticket)
        return w.wait_committed(seq, timeout)

    def _writers(self) -> tuple[Writer, Writer]:
        return self._writer, self._ckpt_writer

    def failure(self):
        for w, what in ((self._writer, "log"), (self._ckpt_writer, "checkpoint")):
            if w.error is not None:
                return f"{what} writer stopped: {w.error}"
            if w.failure is not None:
                return f"{w.path}: {w.failure}"
        return None

    def dropped(self):
        return sum(w.dropped for w in self._writers())

    def queue_depth(self):
        return sum(w.q.qsize() for w in self._writers())

    def uncommitted(self):
        return sum(w.q.unfinished_tasks for w in self._writers())

    def set_meta(self, key, value):
        with self.reader.con:
            self.reader.con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def flush(self):
        self._writer.flush()
        self._ckpt_writer.flush()

    def close(self):
        try:
            try:
                self._writer.close(self._close_timeout)
            finally:
                self._ckpt_writer.close(self._close_timeout)
        finally:
            with self._readers_lock:
                for q in self._readers:
                    try:
                        q.close()
                    except Exception:  # noqa: BLE001 - a reader of another thread; best effort
                        pass
                self._readers.clear()

    def max_qn(self, client):
        return self.reader.max_qn(client)

    def last_level(self, client):
        return self.reader.last_level(client)

    def load_state(self, client):
        return self.reader.load_state(client)

    def requests(self, client, after_qn):
        return self.reader.requests(client, after_qn)

    def pairs(self):
        return [(p["client"], p["other"], p["t"]) for p in self.reader.pairs()]

    def recent_items(self, limit):
        return self.reader.recent_items(limit)

    def recent_clients(self, limit):
        return self.reader.recent_clients(limit)

