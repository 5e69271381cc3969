"""The Monitor: the service's only entry point (``level`` and ``observe``) plus ``close``."""
from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common.types import Answer, Level
from monitor.config import DETECTOR_NAMES, MonitorConfig, load_config
from monitor.engine import ClientEngine, Transition, det_view
from monitor.log import Batch, QueryLog, Writer, pickle_state, unpickle_state

log = logging.getLogger("modelguard.monitor")


def rebuild_engine(cfg: MonitorConfig, qlog: QueryLog, client: str) -> ClientEngine:
    """Re-run a client's detectors and ladder over its logged stream (no side effects)."""
    from monitor.replay import replay_client
    return replay_client(cfg, qlog, client)[0]


class Monitor:
    """Per-client query monitor.

    level(client) -> Level: the client's current level (cheap: a dict lookup after the first
    call, which restores the client's state from the database).
    observe(...) -> Level: runs the detectors over the N items synchronously (in order, under the
    client's lock), applies the ladder, enqueues the log rows for the background writer and
    returns the level after these N queries.
    close(): drains the writer (everything observed is then in the log) and stores every client's
    detector state so a restart resumes exactly where it stopped.

    db_path None: a temporary database in a fresh temp directory, deleted on close (no
    persistence; for tests and experiments).
    clock: the time source for request timestamps (default time.time); the timestamps are logged
    and are all the detectors ever see of time, so replay is exact.
    """

    def __init__(self, config: MonitorConfig, db_path: str | Path | None = None, *,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self._tmpdir = None
        if db_path is None:
            self._tmpdir = tempfile.mkdtemp(prefix="modelguard-monitor-")
            db_path = Path(self._tmpdir) / "monitor.db"
        self.db_path = Path(db_path)
        self._clock = clock
        self._hash = config.detector_hash()
        lc = config.log
        self._writer = Writer(self.db_path, lc.batch_size, lc.flush_seconds, lc.retention_days)
        self._reader = QueryLog(self.db_path, create=True)
        with self._reader.con:  # the thresholds in force, for `python -m monitor plot/show`
            self._reader.con.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)",
                                     (config.model_dump_json(),))
        self._reader_lock = threading.Lock()
        self._engines: dict[str, ClientEngine] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._global = threading.Lock()
        self._closed = False

    @classmethod
    def from_file(cls, config_path: str | Path | None, db_path: str | Path | None, **kw
                  ) -> "Monitor":
        return cls(load_config(config_path), db_path, **kw)

    # --- per-client state -------------------------------------------------------------------
    def _lock(self, client: str) -> threading.Lock:
        lk = self._locks.get(client)
        if lk is None:
            with self._global:
                lk = self._locks.setdefault(client, threading.Lock())
        return lk

    def _load(self, client: str) -> ClientEngine:
        """Restore a client: the saved state if it matches the log and the config, else a rebuild
        from the logged inputs; the level always comes from the stored transitions."""
        with self._reader_lock:
            q = self._reader
            max_qn = q.max_qn(client)
            level = q.last_level(client)
            st = q.load_state(client)
            eng = None
            if st is not None and st["qn"] == max_qn and st["config_hash"] == self._hash:
                try:
                    eng = unpickle_state(st["state"]).restore(self.config)
                except Exception as exc:  # corrupted/incompatible blob: rebuild instead
                    log.warning("client %s: stored state unusable (%r); rebuilding", client, exc)
            if eng is None and max_qn > 0:
                if q.raw_complete(client):
                    eng = rebuild_engine(self.config, q, client)
                    log.info("client %s: detector state rebuilt from %d logged queries", client,
                             max_qn)
                else:
                    log.warning("client %s: no usable state and raw inputs incomplete; detectors "
                                "restart empty (level %s kept)", client, level.name)
            if eng is None:
                eng = ClientEngine(self.config, client)
            eng.qn = max_qn
            eng.level = level  # the recorded ladder is authoritative
        return eng

    def _engine(self, client: str) -> ClientEngine:
        eng = self._engines.get(client)
        if eng is None:
            eng = self._load(client)
            self._engines[client] = eng
        return eng

    # --- service API --------------------------------------------------------------------------
    def level(self, client_id: str) -> Level:
        eng = self._engines.get(client_id)
        if eng is not None:
            return eng.level
        with self._lock(client_id):
            return self._engine(client_id).level

    def observe(self, client_id: str, request_id: str, images: np.ndarray,
                target_probs: np.ndarray, answer: Answer, level: Level) -> Level:
        if self._closed:
            raise RuntimeError("monitor is closed")
        t = float(self._clock())
        images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
        probs = np.asarray(target_probs, dtype=np.float32).reshape(len(images), -1)
        n = len(images)
        if len(answer) != n:
            raise ValueError(f"answer has {len(answer)} items for {n} images")
        xd, on_grid = det_view(images)
        scores = np.full((n, len(DETECTOR_NAMES)), np.nan)
        fired = np.zeros(n, dtype=np.int64)
        after = np.zeros(n, dtype=np.int64)
        with self._lock(client_id):
            eng = self._engine(client_id)
            transitions: list[Transition] = eng.begin_batch(t)
            qn0 = eng.qn
            for i in range(n):
                s, f, tr = eng.step(xd[i], probs[i], t)
                scores[i] = [np.nan if v is None else v for v in s]
                fired[i] = f
                after[i] = eng.level
                if tr is not None:
                    transitions.append(tr)
                    log.warning("client %s escalated %s -> %s at query %d (%s)", client_id,
                                tr.from_level.name, tr.to_level.name, tr.qn, tr.rule)
            sent_top = None if answer.probs is None else answer.probs.max(1)
            self._writer.put(Batch(
                client_id, qn0, t, str(request_id), images.copy(), on_grid, probs.copy(),
                int(level), int(answer.kind), np.asarray(answer.labels).copy(), sent_top,
                list(answer.model), np.asarray(answer.watermarked, bool).copy(), scores, fired,
                after, self.config.log.keep_raw))
            for tr in transitions:
                self._writer.put(tr)
            return eng.level

    def flush(self) -> None:
        """Wait until everything observed so far is committed."""
        self._writer.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._global:
            clients = list(self._engines)
        for c in clients:
            with self._lock(c):
                eng = self._engines[c]
                self._writer.put(("state", c, eng.qn, int(eng.level), self._hash,
                                  pickle_state(eng), time.time()))
        self._writer.close()
        self._reader.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
