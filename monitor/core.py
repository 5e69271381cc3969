"""The Monitor: the service's only entry point (``level`` and ``observe``) plus ``close``."""
from __future__ import annotations

import functools
import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from common.steps import Blocking, Steps
from common.types import Answer, Level
from monitor.config import MonitorConfig, load_config
from monitor.engine import ClientEngine, det_view
from monitor.linking import Linker
from monitor.log import (Batch, LogUnavailable, forget_checkpointed, mark_checkpointed,
                         pickle_delta, pickle_state, restore_chain)
from monitor.replay import feed
from monitor.store import MonitorStore, SQLiteStore

log = logging.getLogger("modelguard.monitor")

_STOP = object()
LOCK_STRIPES = 4096
OTHER_WINDOW_S = 10.0     # fit_memory: how long a peak of the non-state memory is remembered
# level() keeps what it prepared for a small request (det_view, probe's arrays) for the
# request's observe(): requests of at most this many items, for at most this many clients
PREPARED_MAX_ITEMS = 16
PREPARED_MAX_CLIENTS = 64
# async with execution.max_lag > 0: consecutive queued requests of one client are run through
# the detectors as one step of at most this many items
MERGE_MAX_ITEMS = 256
# incremental checkpoints: a full one instead once a client has this many deltas since its
# last full one, or their bytes reach this share of the full one's
MAX_DELTAS = 4
MAX_DELTA_SHARE = 0.5


class Monitor:
    """Per-client query monitor.

    level(client) -> Level: the client's current level (a dict lookup once the client is in
    memory; the first call restores it: its last checkpoint plus the few requests logged after).
    observe(...) -> Level: runs the detectors over the request's N items as one batch (in order,
    under the client's lock), applies the ladder, hands the log rows to the store and returns
    the level after these N queries. In ``execution.mode = "async"`` it returns at once with the
    current level and the detectors run on a background thread, one request after another in
    arrival order; the client's next ``level`` call waits until they have run, so a new level
    applies from the client's next request, as in sync mode.
    close(): drains everything, checkpoints every client in memory, closes the store.

    Memory is bounded: at most ``execution.max_clients`` clients, and at most
    ``execution.max_state_mb`` of their detector state, are held; the least recently used are
    checkpointed and evicted beyond that (per-client locks are striped, so nothing per client
    stays behind). Every client's state is also checkpointed
    after ``execution.checkpoint_every`` new queries, so a restart after a crash replays at most
    that many logged queries per client (plus what the writer had not committed).

    db_path None: a temporary database in a fresh temp directory, deleted on close (no
    persistence; for tests and experiments). store: any MonitorStore (db_path is then ignored).
    warm: restore the most recently checkpointed clients (up to max_clients) on a background
    thread right away; ``ready()`` says when that is done (the server reports not-ready until
    then, so a balancer sends traffic once first requests are fast again).
    clock: the time source for request timestamps (default time.time); the timestamps are logged
    and are all the detectors ever see of time, so replay is exact.
    """

    def __init__(self, config: MonitorConfig, db_path: str | Path | None = None, *,
                 clock: Callable[[], float] = time.time, store: MonitorStore | None = None,
                 warm: bool = False):
        self.config = config
        self._tmpdir = None
        if store is None:
            if db_path is None:
                self._tmpdir = tempfile.mkdtemp(prefix="modelguard-monitor-")
                db_path = Path(self._tmpdir) / "monitor.db"
            lc = config.log
            store = SQLiteStore(db_path, lc.batch_size, lc.flush_seconds, lc.retention_days,
                                lc.max_mb, lc.max_queue)
        self.store = store
        self._durable = config.log.durability == "commit"
        self._fail_open = config.log.on_failure == "open"
        self._commit_timeout = config.log.commit_timeout_seconds
        # per client: the store ticket that must be durable before the client's next answer
        # (its last level change; with durability "commit" in async mode, its last request)
        self._must_commit: dict[str, int] = {}
        self._commit_lock = threading.Lock()
        self.db_path = Path(db_path) if db_path is not None else None
        self._clock = clock
        self._hash = config.detector_hash()
        self._exec = config.execution
        # the thresholds in force, for `python -m monitor plot/show`
        self.store.set_meta("config", config.model_dump_json())
        self._engines: OrderedDict[str, ClientEngine] = OrderedDict()
        # per resident client: (query count its stored state holds, the store ticket of that
        # checkpoint, or None when the state was read from the store)
        self._saved: dict[str, tuple[int, int | None]] = {}
        # evicted clients whose checkpoint the store has not committed yet: (ticket, engine)
        self._evicted: dict[str, tuple[int, ClientEngine]] = {}
        # per-client mutual exclusion without a per-client object that outlives the client:
        # striped re-entrant locks (clients that share a stripe just take turns)
        self._stripes = [threading.RLock() for _ in range(LOCK_STRIPES)]
        self._bytes: dict[str, int] = {}     # detector state bytes of each resident client
        self._resident_bytes = 0
        self._state_budget = int(config.execution.max_state_mb * 2 ** 20)
        self._budget = self._state_budget     # lowered by fit_memory under execution.max_rss_mb
        self._rss_warned = -1e9
        # what level() prepared for a small request, for its observe() (see _prepared_for)
        self._prepared: dict = {}
        self._prepared_lock = threading.Lock()
        self._other_seen: deque = deque()     # (time, RSS besides client state) by fit_memory
        self._global = threading.Lock()   # guards the two dicts only, never held while working
        self._closed = False
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        self._worker_error: BaseException | None = None
        self._pending: dict[str, int] = {}     # async: requests queued per client
        self._pending_items: dict[str, int] = {}   # async: their items
        # async: per client with requests queued, its query count including them (processing
        # moves queries from queued to counted: the sum does not change until it is dropped)
        self._accepted: dict[str, int] = {}
        # mode "process": this class runs in the monitor's child process (monitor/process.py),
        # synchronously; max_lag only relaxes what must be durable before the next answer
        self._max_lag = self._exec.max_lag
        self._merge_wait = self._exec.merge_wait_ms / 1e3
        self._idle = threading.Condition()
        if self._exec.mode == "async":
            self._queue = queue.Queue(maxsize=self._exec.queue_limit)
            self._worker = threading.Thread(target=self._run_async, name="monitor-detectors",
                                            daemon=True)
            self._worker.start()
        self._transition_listeners: list[Callable] = []
        self.linker: Linker | None = None
        self._link_lock = threading.Lock()
        if config.linking.enabled:
            self.linker = Linker(config.linking)
            self._restore_linker()
        self._ckpt_due: set[str] = set()
        self._ckpt_queue: queue.Queue = queue.Queue()
        self._ckpt_thread = threading.Thread(target=self._run_checkpoints,
                                             name="monitor-checkpoints", daemon=True)
        self._ckpt_thread.start()
        self._step_pool: ThreadPoolExecutor | None = None   # run_requests' other threads
        self._warmer: threading.Thread | None = None
        if warm:
            self._warmer = threading.Thread(target=self._warm, name="monitor-warm", daemon=True)
            self._warmer.start()

    @classmethod
    def from_file(cls, config_path: str | Path | None, db_path: str | Path | None, **kw
                  ) -> "Monitor":
        return cls(load_config(config_path), db_path, **kw)

    # --- per-client state -------------------------------------------------------------------
    def _lock(self, client: str) -> threading.RLock:
        return self._stripes[hash(client) % LOCK_STRIPES]

    def _sized(self, client: str, eng: ClientEngine) -> None:
        """Record the resident client's state size (caller holds the client's lock)."""
        n = eng.nbytes()
        with self._global:
            self._resident_bytes += n - self._bytes.get(client, 0)
            self._bytes[client] = n

    def _load(self, client: str) -> ClientEngine:
        """Restore a client: its checkpoint when it matches the config, then the logged requests
        after it; without a usable checkpoint, the whole logged stream. The level always comes
        from the stored transitions. A client evicted so recently that its checkpoint is still
        on its way to the store comes back as it left."""
        with self._global:
            pending = self._evicted.pop(client, None)
        if pending is not None:
            # its checkpoint may still be on its way: evicting it again must wait for it too
            self._saved[client] = (pending[1].qn, pending[0])
            return pending[1]
        st = self.store
        max_qn = st.max_qn(client)
        level = st.last_level(client)
        saved = st.load_state(client)
        eng = None
        if saved is not None and saved["config_hash"] == self._hash and saved["qn"] <= max_qn:
            try:
                # a restored client's first checkpoint is a full one (letting it be a delta made
                # evictions cheap but, with more clients taking turns than max_clients, restores
                # read chains: restore p50 21 ms against 13, request p99 worse; not kept)
                got, whole = restore_chain(saved["state"], saved.get("deltas") or [])
                if not whole:
                    log.warning("client %s: its checkpoint's deltas stop fitting after query %d "
                                "(one was lost); the rest is replayed from the log", client,
                                got.qn)
                eng = got.restore(self.config)
            except Exception as exc:  # corrupted/incompatible blob: rebuild instead
                log.warning("client %s: stored state unusable (%r); rebuilding", client, exc)
        if eng is None:
            eng = ClientEngine(self.config, client)
        self._saved[client] = (eng.qn, None)
        if eng.qn < max_qn:
            start = eng.qn
            try:
                feed(eng, st, client)
                log.info("client %s: replayed queries %d..%d after its checkpoint", client,
                         start + 1, max_qn)
            except RuntimeError as exc:
                log.warning("client %s: %s; detectors restart empty (level %s kept)", client,
                            exc, level.name)
                eng = ClientEngine(self.config, client)
                eng.qn = max_qn
        eng.level = level  # the recorded ladder is authoritative
        return eng

    def _engine(self, client: str) -> ClientEngine:
        """The client's engine (caller holds the client's lock)."""
        eng = self._engines.get(client)
        if eng is None:
            eng = self._load(client)
            with self._global:
                self._engines[client] = eng
            self._sized(client, eng)
            self._evict(client)
        else:
            with self._global:
                self._engines.move_to_end(client)
        return eng

    def _checkpoint(self, client: str, eng: ClientEngine) -> int | None:
        """Store the engine's state (caller holds the client's lock); returns the store's
        ticket, or None when the stored state is already current. An incremental checkpoint
        (the rows its rings gained since this process last stored it) when the store keeps
        them and the client has a full one from this process not too many deltas ago."""
        if self._saved.get(client, (None,))[0] == eng.qn:
            return None
        st = self.store
        chain = getattr(eng, "_ck", None)       # (full bytes, deltas since, their bytes)
        blob = None
        if st.supports_deltas and chain is not None and chain[1] < MAX_DELTAS and \
                chain[2] < MAX_DELTA_SHARE * chain[0]:
            blob = pickle_delta(eng)
        dropped = st.dropped()
        if blob is not None:
            ticket = st.put_state_delta(client, eng.qn, blob, time.time())
            eng._ck = (chain[0], chain[1] + 1, chain[2] + len(blob))
        else:
            blob = pickle_state(eng)
            ticket = st.put_state(client, eng.qn, int(eng.level), self._hash, blob,
                                  time.time())
            eng._ck = (len(blob), 0, 0)
        if st.dropped() == dropped:
            mark_checkpointed(eng)
        else:       # maybe this one (the queue bound): what the store holds is not known
            forget_checkpointed(eng)
            eng._ck = None
        self._saved[client] = (eng.qn, ticket)
        return ticket

    def _run_checkpoints(self) -> None:
        while True:
            c = self._ckpt_queue.get()
            try:
                if c is _STOP:
                    return
                with self._lock(c):
                    self._ckpt_due.discard(c)
                    eng = self._engines.get(c)
                    if eng is not None:
                        self._checkpoint(c, eng)
            except Exception as exc:  # noqa: BLE001 - the next checkpoint or close() retries
                log.warning("checkpoint of client %s failed: %r", c, exc)
            finally:
                self._ckpt_queue.task_done()

    def _forget_committed(self) -> None:
        done = self.store.is_committed
        with self._global:
            for c in [c for c, (tk, _) in self._evicted.items() if done(tk)]:
                del self._evicted[c]

    def _evict(self, keep: str | None) -> int:
        """Checkpoint and drop least recently used clients (never ``keep``, never one in use
        right now) until within ``execution.max_clients`` and the state budget; returns how
        many were dropped."""
        self._forget_committed()
        dropped = 0
        with self._global:
            order = [c for c in self._engines if c != keep]
        for victim in order:
            with self._global:
                if len(self._engines) <= self._exec.max_clients and \
                        self._resident_bytes <= self._budget:
                    break
            lk = self._lock(victim)
            if not lk.acquire(blocking=False):
                continue  # in use right now (so not idle): the next one
            try:
                eng = self._engines.get(victim)
                if eng is not None:
                    ticket = self._checkpoint(victim, eng)
                    if ticket is None:
                        # its state is saved already, but maybe not committed yet (put by the
                        # checkpointer, or it came back from _evicted and did nothing since):
                        # until it is, a reload must get this engine, not the store's state
                        ticket = self._saved.get(victim, (0, None))[1]
                    with self._global:
                        self._engines.pop(victim, None)
                        self._resident_bytes -= self._bytes.pop(victim, 0)
                        if ticket is not None:
                            self._evicted[victim] = (ticket, eng)
                    self._saved.pop(victim, None)
                    dropped += 1
            finally:
                lk.release()
        return dropped

    def fit_memory(self, rss: int | None, now: float | None = None) -> int:
        """Keep the process under ``execution.max_rss_mb`` given its resident size ``rss`` now
        (bytes; the server calls this a few times a second): what is not client state (model,
        buffers, the linking index, requests in flight, heap not yet given back) is
        ``rss - resident state``; the state budget becomes what is left of 90% of the cap (at
        most ``max_state_mb``), and least recently used clients are evicted to fit it. The
        budget drops at once and rises by at most 5% of the cap per call, so memory freed but
        not yet returned to the system does not make it swing; "the rest" is the largest seen
        over the last ``OTHER_WINDOW_S`` seconds (requests in flight come and go between two
        readings; ``now``: monotonic seconds, for tests). Returns the clients evicted."""
        cap = int(self._exec.max_rss_mb * 2 ** 20)
        if cap <= 0 or rss is None or self._closed:
            return 0
        now = time.monotonic() if now is None else now
        with self._global:
            other = max(0, int(rss) - self._resident_bytes)
            # the most the rest of the process took over the last seconds: requests in flight
            # come and go between two readings, the budget must leave room for them
            seen = self._other_seen
            seen.append((now, other))
            while seen and seen[0][0] < now - OTHER_WINDOW_S:
                seen.popleft()
            other = max(o for _, o in seen)
            room = max(0, int(0.9 * cap) - other)
            budget = min(self._state_budget, room, self._budget + cap // 20)
            self._budget = budget
            over = self._resident_bytes > budget
        if other >= int(0.9 * cap):
            if now - self._rss_warned > 60:
                self._rss_warned = now
                log.warning("the server uses %.0f MB besides client state, more than 90%% of "
                            "execution.max_rss_mb = %.0f: client state is evicted after every "
                            "request; raise the cap", other / 2 ** 20, self._exec.max_rss_mb)
        return self._evict(None) if over else 0

    def _warm(self) -> None:
        """Restore the most recently active clients in the background after a start, so their
        first requests find them in memory (each under its own lock only)."""
        try:
            for c in self._warm_clients():
                if self._closed:
                    return
                with self._lock(c):
                    if c not in self._engines:
                        self._engine(c)
        except Exception as exc:  # noqa: BLE001 - warming is an optimisation
            log.warning("warming client state failed: %r", exc)

    def _warm_clients(self) -> list[str]:
        """The clients to restore at start: the most recently checkpointed ones."""
        return self.store.recent_clients(self._exec.max_clients)

    def _restore_linker(self) -> None:
        """After a restart: the groups from the logged pairs, the members' levels from the
        logged transitions, and the index from the last ``linking.horizon`` logged items."""
        st, lk = self.store, self.linker
        pairs = list(st.pairs())
        members = {c for c, o, _ in pairs}
        lk.restore(pairs, {c: (int(st.last_level(c)), st.max_qn(c)) for c in members})
        n = 0
        for client, qn0, x in st.recent_items(self.config.linking.horizon):
            lk.refill(client, qn0, det_view(x)[0])
            n += len(x)
        if pairs or n:
            log.info("linking restored: %d groups, %d pairs, %d indexed queries",
                     len(lk.groups.all()), len(pairs), n)

    def on_transition(self, fn: Callable) -> None:
        """Call ``fn(transition)`` for every level change as it is logged (e.g. to count
        escalations for metrics). It runs on the request path: it must be cheap; exceptions
        are logged and ignored."""
        self._transition_listeners.append(fn)

    def off_transition(self, fn: Callable) -> None:
        """Stop calling ``fn`` (registered with on_transition)."""
        self._transition_listeners = [f for f in self._transition_listeners if f is not fn]

    def stats(self) -> dict:
        """Operational gauges: log items queued for the writer and not yet committed,
        requests waiting for the detectors (async mode), clients held in memory."""
        out = {"log_queue_depth": self.store.queue_depth(),
               "log_uncommitted": self.store.uncommitted(),
               "log_failing": int(self.store.failure() is not None),
               "log_dropped": self.store.dropped(),
               "resident_clients": self.resident_clients(),
               "resident_state_bytes": self.resident_bytes(),
               "state_budget_bytes": self._budget}
        if self._queue is not None:
            out["detector_queue_depth"] = self._queue.qsize()
        return out

    def ready(self) -> bool:
        """False while the clients active before a restart are still being restored, and
        (with ``log.on_failure = "closed"``) while the log cannot be written."""
        if not self._fail_open and self.store.failure() is not None:
            return False
        return self._warmer is None or not self._warmer.is_alive()

    def health(self) -> str | None:
        """Why the monitor's log is not being made durable right now (None: healthy)."""
        return self.store.failure()

    def resident_clients(self) -> int:
        """Clients whose detector state is in memory (evicted ones in flight to the store
        included)."""
        self._forget_committed()
        return len(self._engines) + len(self._evicted)

    def resident_ids(self) -> list[str]:
        """The clients whose detector state is in memory now, least recently used first."""
        with self._global:
            return list(self._engines)

    def resident_bytes(self) -> int:
        """Detector state bytes of the clients in memory (what ``execution.max_state_mb``
        bounds)."""
        return self._resident_bytes

    # --- service API --------------------------------------------------------------------------
    def level(self, client_id: str, images: np.ndarray | None = None) -> Level:
        """The level to answer this client's request at. With ``images`` and cross-client
        linking on, a request that perturbs queries of an escalated group is answered at that
        group's level (see Linker.probe).

        Raises LogUnavailable while the log cannot be written (``log.on_failure = "closed"``),
        or when the client's last level change is not durable within the commit timeout: no
        client is answered at a level that a crash could take back."""
        if not self._fail_open:
            why = self.store.failure()
            if why is not None:
                raise LogUnavailable(f"the monitor's log cannot be written ({why}); "
                                     f"try again later")
        lvl = self._own_level(client_id)
        self._await_commit(client_id)
        if images is not None and self.wants_probe(client_id):
            # only then are the items prepared (most requests skip this)
            arr = np.asarray(images, np.float32).reshape(-1, 28, 28)
            x, grid = det_view(arr)
            prep: dict = {}
            with self._link_lock:
                lvl = max(lvl, self.linker.probe(client_id, x, prep))
            if len(arr) <= PREPARED_MAX_ITEMS:
                # the request's observe reuses det_view's output and the arrays probe
                # computed, if it is handed images with these same bits
                with self._prepared_lock:
                    cache = self._prepared
                    cache.pop(client_id, None)
                    cache[client_id] = (arr.copy(), x, grid, prep)
                    while len(cache) > PREPARED_MAX_CLIENTS:   # the oldest goes
                        del cache[next(iter(cache))]
        return lvl

    def waits_for(self, client_id: str) -> bool:
        """Whether ``level``, ``observe`` or ``wait_durable`` may now wait for this client
        (rather than only compute): its state is not in memory (a read of the store), its
        queries wait for the async worker beyond ``max_lag``, or a row its answer waits for is
        not committed yet. A hint for where to run the request (``serve --aio`` runs the
        computing ones on its event loop): a wrong answer costs time, never correctness."""
        if client_id not in self._engines:
            return True
        if self._queue is not None and self._lagging(client_id):
            return True
        return self._commit_pending(client_id)

    def _commit_pending(self, client_id: str) -> bool:
        """A row the client's next answer waits for is not committed yet."""
        ticket = self._must_commit.get(client_id)
        return ticket is not None and not self.store.is_committed(ticket)

    def wants_probe(self, client_id: str) -> bool:
        """Whether cross-client linking could raise this client's next request above its own
        level (``level`` then looks at the request's images; cheap: no pixels looked at)."""
        lk = self.linker
        if lk is None or not self.config.linking.raise_members:
            return False
        with self._link_lock:
            return lk.wants_probe(client_id)

    def commit_ticket(self, client_id: str) -> int | None:
        """The store ticket that must be durable before this client's next answer (its last
        request's rows with ``durability = "commit"``, else its last level change), or None."""
        with self._commit_lock:
            return self._must_commit.get(client_id)

    def current_level(self, client_id: str) -> Level:
        """The client's level now (its own and its linking group's), without the log checks
        and waits of ``level``."""
        return self._own_level(client_id)

    def queries(self, client_id: str) -> int:
        """The client's query count so far (its detectors' count: restored after a restart).
        Concurrent requests of one client may read the same count; the logged query numbers
        are assigned later, in order, and are never lower. In async mode the client's queries
        still queued for the detectors are counted too."""
        if self._queue is not None:
            with self._idle:
                accepted = self._accepted.get(client_id)
            if accepted is not None:
                return accepted
        eng = self._engines.get(client_id)
        if eng is not None:
            return eng.qn
        with self._lock(client_id):
            return self._engine(client_id).qn

    def _await_commit(self, client_id: str) -> None:
        ticket = self._must_commit.get(client_id)
        if ticket is None:
            return
        st = self.store
        deadline = time.monotonic() + self._commit_timeout
        while not st.is_committed(ticket):
            if self._fail_open and st.failure() is not None:
                break   # fail-open: answer without waiting for a log that cannot be written
            left = deadline - time.monotonic()
            if left <= 0:
                raise LogUnavailable(f"the monitor's log did not commit within "
                                     f"{self._commit_timeout:g} s "
                                     f"({st.failure() or 'slow disk'})")
            st.wait_committed(ticket, min(left, 0.05))
        with self._commit_lock:
            if self._must_commit.get(client_id) == ticket:
                del self._must_commit[client_id]

    def _needs_commit(self, client_id: str, ticket: int) -> None:
        with self._commit_lock:
            if ticket > self._must_commit.get(client_id, 0):
                self._must_commit[client_id] = ticket

    def _own_level(self, client_id: str) -> Level:
        if self._queue is not None and self._lagging(client_id):
            # async: a request's level reflects all of the client's earlier requests but at
            # most max_lag queries (its previous answer did not wait for the detectors; this
            # one waits for them instead)
            with self._idle:
                while self._lagging(client_id) and self._worker_error is None:
                    self._idle.wait(1.0)
        eng = self._engines.get(client_id)
        if eng is None:
            with self._lock(client_id):
                eng = self._engine(client_id)
        if self.linker is not None:
            return max(eng.level, self.linker.floor(client_id))
        return eng.level

    def _lagging(self, client_id: str) -> bool:
        """async: more of the client's queries wait for the detectors than execution.max_lag
        allows (with max_lag 0: any request of it)."""
        if not self._pending.get(client_id):
            return False
        return self._max_lag == 0 or self._pending_items.get(client_id, 0) > self._max_lag

    def _any_lagging(self) -> bool:
        """async: some client's next request waits for the detectors (_lagging)."""
        with self._idle:
            return any(self._lagging(c) for c in self._pending)

    def _enqueued(self, client_id: str, n: int) -> bool:
        """async: count a request of ``n`` items as queued for the client; False (nothing
        counted) when its query count is unknown here: nothing of it queued and not resident."""
        with self._idle:
            base = self._accepted.get(client_id)
            if not self._pending.get(client_id):    # nothing of it queued: its count is final
                eng = self._engines.get(client_id)
                if eng is None:
                    return False
                base = eng.qn
            self._accepted[client_id] = base + n
            self._pending[client_id] = self._pending.get(client_id, 0) + 1
            self._pending_items[client_id] = self._pending_items.get(client_id, 0) + n
        return True

    def observe(self, client_id: str, request_id: str, images: np.ndarray,
                target_probs: np.ndarray, answer: Answer, level: Level, *,
                wait: bool = True) -> Level:
        """Run the request through the client's detectors and log it; returns the client's
        level after it. Sync durability: the call returns once the request's rows are
        committed, or with ``wait=False`` at once, and the caller calls :meth:`wait_durable`
        before answering (so it can let others compute meanwhile)."""
        if self._closed:
            raise RuntimeError("monitor is closed")
        t = float(self._clock())
        n = len(images)
        if len(answer) != n:
            raise ValueError(f"answer has {len(answer)} items for {n} images")
        job = (client_id, str(request_id), t, images, target_probs, answer, level)
        if self._queue is None:
            return self._process(job, wait)
        if self._worker_error is not None:
            raise RuntimeError(f"monitor worker failed: {self._worker_error!r}")
        while not self._enqueued(client_id, n):   # not resident (evicted meanwhile): load it
            with self._lock(client_id):
                self._engine(client_id)
        self._queue.put(job)
        eng = self._engines.get(client_id)
        return level if eng is None else eng.level

    def wait_durable(self, client_id: str) -> None:
        """Return once every row of the client observed so far that its answer waits for is
        committed (sync mode, ``durability = "commit"``; nothing to wait for otherwise).
        Raises LogUnavailable when that does not happen within the commit timeout."""
        if self._durable and self._queue is None:
            self._await_commit(client_id)

    def level_steps(self, client_id: str, images: np.ndarray | None = None) -> Steps:
        """:meth:`level` as steps (common.steps): one Blocking step when :meth:`waits_for`
        says it may wait, else computed in place."""
        if self.waits_for(client_id):
            return (yield Blocking(self.level, client_id, images))
        return self.level(client_id, images)

    def observe_steps(self, client_id: str, request_id: str, images: np.ndarray,
                      target_probs: np.ndarray, answer: Answer, level: Level) -> Steps:
        """:meth:`observe` (``wait=False``) as steps (common.steps): computed in place, or one
        Blocking step when it would wait for more than a lock: the client's state is not in
        memory (:meth:`waits_for`), or in async mode the queue is full (observe waits for the
        detectors to make room: on an event loop that would stall every call).

        A lock another thread holds (the client's lock, linking's: a large request on a
        worker) is waited for in place. Handing the request to a worker then was measured
        (``python -m lab.serving --mixed --aio --key-warmup 250``, 4 batch-1 clients beside 2
        at batch 256, two pairs): batch-1 p99 95-96 ms against 78-82 in place, on two cores
        the worker only adds a hand-off and a share of the GIL to the same wait."""
        observe = functools.partial(self.observe, client_id, request_id, images, target_probs,
                                    answer, level, wait=False)
        if self.waits_for(client_id) or (self._queue is not None and self._queue.full()):
            return (yield Blocking(observe))
        return observe()

    def durable_steps(self, client_id: str) -> Steps:
        """:meth:`wait_durable` as steps (common.steps): a Blocking step only while a row the
        answer waits for is not committed yet."""
        if self._durable and self._queue is None and self._commit_pending(client_id):
            yield Blocking(self.wait_durable, client_id)
        else:
            self.wait_durable(client_id)

    def _process(self, job, wait: bool = True) -> Level:
        client_id, request_id, t, images, target_probs, answer, level = job
        images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
        probs = np.asarray(target_probs, dtype=np.float32).reshape(len(images), -1)
        prep = self._prepared_for(client_id, images)
        if prep is not None:
            xd, on_grid, prep = prep
        else:
            xd, on_grid = det_view(images)
        linker = self.linker
        with self._lock(client_id):
            eng = self._engine(client_id)
            try:
                floor = 0 if linker is None else int(linker.floor(client_id))
                st = eng.step(xd.reshape(len(xd), -1), probs, t, on_grid, floor, prep)
            except Exception:
                # the engine may be half-updated: drop it; the client's next request restores
                # it from its checkpoint and the log (which does not hold this request)
                with self._global:
                    self._engines.pop(client_id, None)
                    self._resident_bytes -= self._bytes.pop(client_id, 0)
                self._saved.pop(client_id, None)
                try:  # the reload must see every request of this client logged so far
                    self.store.flush()
                except Exception:  # noqa: BLE001 - the writer's own error surfaces elsewhere
                    pass
                raise
            sent_top = None if answer.probs is None else answer.probs.max(1)
            if linker is None:
                last = self._log(client_id, request_id, t, images, on_grid, probs, level,
                                 answer, sent_top, st, st.transitions, [])
            else:
                # one order for the index, the groups and the log: replay follows the log
                with self._link_lock:
                    out = linker.apply(client_id, eng, st, t)
                    last = self._log(client_id, request_id, t, images, on_grid, probs, level,
                                     answer, sent_top, st, out.transitions, out.pairs)
            self._sized(client_id, eng)
            if self._resident_bytes > self._budget:
                self._evict(client_id)
            if eng.qn - self._saved.get(client_id, (0,))[0] >= self._exec.checkpoint_every and \
                    client_id not in self._ckpt_due:
                # pickled by the checkpointer thread (under this client's lock), not here
                self._ckpt_due.add(client_id)
                self._ckpt_queue.put(client_id)
            level_after = eng.level
        if self._durable and not self._max_lag:
            # sync: this answer waits for its own rows (group commit); async: the client's
            # next answer does; async with max_lag: only level changes are waited for (in
            # _log), the rows of the queries the lag allows are not
            self._needs_commit(client_id, last)
            if self._queue is None and wait:
                self._await_commit(client_id)
        return level_after

    def _prepared_for(self, client_id: str, images: np.ndarray):
        """(det_view's items, on-grid flags, probe's arrays) that ``level`` computed for the
        client's last probed images, when ``images`` hold the same bits (they are functions of
        the bits alone), else None. Bits, not object identity: in the monitor's own process
        the probe's images and the observed ones arrive in two messages, as two objects."""
        if not self._prepared:
            return None
        with self._prepared_lock:
            entry = self._prepared.pop(client_id, None)
        if entry is None:
            return None
        saved = entry[0]
        if saved.shape != images.shape or not np.array_equal(
                saved.view(np.uint32), np.ascontiguousarray(images).view(np.uint32)):
            return None
        return entry[1], entry[2], entry[3]

    def _log(self, client_id, request_id, t, images, on_grid, probs, level, answer, sent_top,
             st, transitions, pairs) -> int:
        """Hand the request's rows to the store; returns the last ticket. Each level change's
        ticket must be durable before its client is answered again (``_must_commit``)."""
        for tr in transitions:
            log.warning("client %s escalated %s -> %s at query %d (%s)", tr.client,
                        tr.from_level.name, tr.to_level.name, tr.qn, tr.rule)
        last = self.store.put_batch(Batch(
            client_id, st.qn0, t, request_id, images, on_grid, probs,
            int(level), int(answer.kind), np.asarray(answer.labels), sent_top,
            list(answer.model), np.asarray(answer.watermarked, bool), st.scores, st.fired,
            st.after, self.config.log.keep_raw))
        for tr in transitions:
            last = self.store.put_transition(tr)
            self._needs_commit(tr.client, last)
            for fn in self._transition_listeners:
                try:
                    fn(tr)
                except Exception:  # noqa: BLE001 - a listener never breaks the monitor
                    log.exception("a transition listener failed")
        if pairs:
            last = self.store.put_pairs(pairs)
        return last

    def _run_async(self) -> None:
        q = self._queue
        stop = False
        while not stop:
            jobs = [q.get()]
            if self._max_lag:
                # what else waits, and what arrives within the merge window: merged per client
                # below
                gather(q, jobs, q.maxsize, self._merge_wait, lambda j: j is _STOP,
                       self._any_lagging)
            if jobs[-1] is _STOP:
                stop = True
                jobs.pop()
            for step in _merge_runs(jobs) if self._max_lag else [[j] for j in jobs]:
                self._run_step(step)
                for _ in step:
                    q.task_done()
        q.task_done()        # the stop marker

    def run_requests(self, jobs: list, merge: bool) -> None:
        """Run observe jobs ``(client, request id, time, images, target probs, answer, level)``
        through the detectors, each client's in arrival order, without waiting for their rows
        (the caller waits for ``commit_ticket``); with ``merge``, consecutive jobs of a client
        run as one step (``_merge_runs``), as async mode with ``max_lag`` does. Different
        clients' steps run on up to ``execution.step_threads`` threads at once (this one
        included; linking and the log take turns, in the order the log records, which replay
        follows). A step whose detectors fail is logged and skipped, as the async worker does
        (its client is restored from the log on its next request). For the monitor in its own
        process (``monitor.process``)."""
        steps = _merge_runs(jobs) if merge else [[j] for j in jobs]
        runs = _client_runs(steps)
        n = min(self._exec.step_threads, len(runs))
        if n <= 1:
            for step in steps:
                self._run_one_step(step)
            return
        with self._global:      # (a shared monitor's connections may get here at once)
            if self._step_pool is None:
                self._step_pool = ThreadPoolExecutor(self._exec.step_threads - 1,
                                                     thread_name_prefix="monitor-steps")
        todo = deque(runs)          # the largest first: the threads finish close together

        def drain() -> None:
            while True:
                try:
                    run = todo.popleft()    # (atomic: deque operations hold the GIL)
                except IndexError:
                    return
                for step in run:
                    self._run_one_step(step)

        helpers = [self._step_pool.submit(drain) for _ in range(n - 1)]
        try:
            drain()
        finally:
            for f in helpers:
                f.result()          # (re-raises what a helper raised beyond Exception)

    def _run_one_step(self, step: list, wait: bool = False) -> None:
        """One detector step: one request, or consecutive requests of one client merged into
        one (see _merge_runs). A failure of its detectors is logged and skipped (the client is
        restored from the log on its next request); anything beyond Exception propagates."""
        job = step[0] if len(step) == 1 else _merged_job(step)
        try:
            self._process(job, wait=wait)
        except Exception:  # noqa: BLE001 - one request's detectors failed: go on
            log.exception("monitor: detectors failed on a request of client %s; its "
                          "state is restored from the log on its next request", job[0])

    def _run_step(self, jobs: list) -> None:
        """One detector step of the async worker (_run_one_step, waiting for its
        commit), then the bookkeeping of what waits."""
        try:
            self._run_one_step(jobs, wait=True)
        except BaseException as exc:  # surfaced by observe()/flush()/close()
            self._worker_error = exc
            log.exception("monitor worker failed")
        finally:
            with self._idle:
                for j in jobs:
                    c = j[0]
                    left = self._pending.get(c, 1) - 1
                    items = self._pending_items.get(c, 0) - len(j[3])
                    if left:
                        self._pending[c] = left
                        self._pending_items[c] = items
                    else:
                        self._pending.pop(c, None)
                        self._pending_items.pop(c, None)
                        self._accepted.pop(c, None)
                self._idle.notify_all()

    def flush(self) -> None:
        """Wait until everything observed so far is processed and committed (checkpoints that
        are due included)."""
        if self._queue is not None:
            self._queue.join()
            if self._worker_error is not None:
                raise RuntimeError(f"monitor worker failed: {self._worker_error!r}")
        self._ckpt_queue.join()
        self.store.flush()

    def checkpoint_all(self) -> None:
        with self._global:
            clients = list(self._engines)
        for c in clients:
            with self._lock(c):
                eng = self._engines.get(c)
                if eng is not None:
                    self._checkpoint(c, eng)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._queue is not None:
                self._queue.put(_STOP)
                self._worker.join()
            if self._warmer is not None:
                self._warmer.join()
            if self._step_pool is not None:
                self._step_pool.shutdown(wait=True)
            self._ckpt_queue.put(_STOP)
            self._ckpt_thread.join()
            self.checkpoint_all()
        finally:
            self.store.close()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._worker_error is not None:
            raise RuntimeError(f"monitor worker failed: {self._worker_error!r}")

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def gather(q: queue.Queue, items: list, limit: int, wait_s: float, end: Callable,
           hurry: Callable) -> None:
    """Append to ``items`` (holding at least one) what else ``q`` holds, up to ``limit`` in
    all, stopping after an item for which ``end(item)`` is true. With ``wait_s`` above 0 it
    also waits for more to arrive, up to ``wait_s`` seconds from the call (the merge window of
    steps with a lag), until ``hurry()`` says someone waits for these items or half of
    ``limit`` have come (then only what already waits is taken; ``hurry`` is not asked again)."""
    deadline = time.monotonic() + wait_s
    while len(items) < limit and not end(items[-1]):
        left = deadline - time.monotonic() if wait_s > 0 else 0.0
        if left > 0 and (2 * len(items) >= limit or hurry()):
            left = wait_s = 0.0
        try:
            items.append(q.get(timeout=left) if left > 0 else q.get_nowait())
        except queue.Empty:
            return


def _merge_runs(jobs: list) -> list[list]:
    """Group queued async jobs into detector steps: each client's jobs keep their order, and
    consecutive ones of a client (others' in between do not matter: clients' engines are
    separate, and the log, which replay follows, records the steps in the order they ran) are
    merged while they were answered at the same level and kind, up to MERGE_MAX_ITEMS items.
    Steps run in the order of their first job."""
    steps: list[list] = []
    open_: dict[str, tuple[list, int]] = {}     # client -> (its current step, items in it)
    for job in jobs:
        client, n, answer, level = job[0], len(job[3]), job[5], job[6]
        cur = open_.get(client)
        if cur is not None:
            step, items = cur
            first = step[0]
            if (items + n <= MERGE_MAX_ITEMS and first[6] == level
                    and first[5].kind == answer.kind
                    and (first[5].probs is None) == (answer.probs is None)):
                step.append(job)
                open_[client] = (step, items + n)
                continue
        step = [job]
        steps.append(step)
        open_[client] = (step, n)
    return steps


def _client_runs(steps: list[list]) -> list[list[list]]:
    """The steps grouped by client (each client's in order), the clients with the most items
    first."""
    by: dict[str, list] = {}
    for step in steps:
        by.setdefault(step[0][0], []).append(step)
    return sorted(by.values(), key=lambda run: -sum(len(j[3]) for st in run for j in st))


def _merged_job(jobs: list) -> tuple:
    """One observe job for consecutive jobs of one client (same level and answer kind): the
    items concatenated in order, the request ids joined with commas, the last one's time."""
    client, level = jobs[0][0], jobs[0][6]
    images = np.concatenate([np.asarray(j[3], np.float32).reshape(-1, 28, 28) for j in jobs])
    probs = np.concatenate([np.asarray(j[4], np.float32).reshape(len(j[3]), -1) for j in jobs])
    answer = Answer.concat([j[5] for j in jobs])
    return (client, ",".join(j[1] for j in jobs), jobs[-1][2], images, probs, answer, level)
