"""The monitor in its own process (``[execution] mode = "process"``).

The serving process keeps only what answering needs: each client's level, its query count and
how many of its queries the detectors have not seen yet. Every request's images, target
probabilities and answer go down a pipe to a child process that runs the real
:class:`monitor.Monitor` (detectors, linking, log, checkpoints, eviction) on its own core, and
acknowledges each request once its rows are committed, with the client's level after it.
The detectors then no longer hold the serving process's GIL, and the monitor can fall behind
the answers by a bounded amount, as in async mode:

* a client's next request waits while more than ``execution.max_lag`` of its queries are not
  yet acknowledged (0: its previous request must be; a new level applies from the next
  request, exactly as in async mode);
* with ``max_lag`` above 0 the child runs consecutive waiting requests of a client as one
  detector step (the same per-item decisions, one log row), as async mode does;
* cross-client linking's probe (a request that perturbs queries of an escalated group is
  answered at the group's level) is asked of the child, with the request's images, only for
  clients it says a probe could raise, and for every client after any level change;
* ``execution.queue_limit`` requests may wait for the child before ``observe`` blocks;
* ``execution.max_rss_mb`` and ``max_state_mb`` bound the child's memory (the child holds the
  client state and fits it to its own resident size);
* if the child dies, every request fails closed (:class:`monitor.log.LogUnavailable`, which the
  service answers as UNAVAILABLE) and ``health()`` says why; a restart of the server restores
  from the log and the checkpoints as after any crash.

Only the embedded SQLite store is supported here (replicas sharing PostgreSQL hand clients
over between them, which the serving process's cached levels would not see).
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.types import Answer, Level
from monitor.config import MonitorConfig
from monitor.log import LogUnavailable

log = logging.getLogger("modelguard.monitor")

REPLY_TIMEOUT_S = 120.0    # a client's first request may wait for its restore: generous
READ_MAX_MESSAGES = 512    # the child reads at most this many messages before working
STATUS_EVERY_S = 0.1       # the child reports readiness and fits its memory this often


@dataclass(slots=True)
class _Known:
    """What the serving process knows of a client."""

    level: Level
    qn: int                 # its query count, its unacknowledged queries included
    items: int = 0          # its queries sent and not yet acknowledged
    requests: int = 0       # the requests they came in
    ask: bool = False       # level() must ask the child (linking's probe, or stale)


class MonitorProcess:
    """Drop-in for :class:`monitor.Monitor` on the service's side, with the real monitor in a
    child process (see the module's doc). ``config.execution.mode`` must be ``"process"``;
    ``db_path`` None: a temporary log the child deletes on close. ``clock``: request timestamps,
    taken here in the serving process (replay stays exact)."""

    def __init__(self, config: MonitorConfig, db_path: str | Path | None = None, *,
                 clock: Callable[[], float] = time.time, warm: bool = False,
                 threads: int = 1):
        ex = config.execution
        if ex.mode != "process":
            raise ValueError(f"MonitorProcess needs execution.mode = \"process\", "
                             f"not {ex.mode!r}")
        self.config = config
        self.db_path = Path(db_path) if db_path is not None else None
        self._clock = clock
        self._max_lag = ex.max_lag
        self._queue_limit = ex.queue_limit
        self._linking = config.linking.enabled and config.linking.raise_members
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._clients: OrderedDict[str, _Known] = OrderedDict()
        self._waiting = 0     # requests sent, not yet read by the child (queue_limit bounds)
        self._unacked = 0     # requests sent, not yet acknowledged
        self._replies: dict[int, object] = {}
        self._tokens = itertools.count(1)
        self._listeners: list[Callable] = []
        self._child_ready = False
        self._child_health: str | None = None
        self._dead: str | None = None
        self._closed = False
        self._remember = 4 * ex.max_clients + 64   # clients remembered here (idle ones go)
        ctx = mp.get_context("spawn")      # never fork a process with threads and locks
        self._conn, child_conn = ctx.Pipe(duplex=True)
        level_name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self._proc = ctx.Process(
            target=_child_main, name="modelguard-monitor", daemon=True,
            args=(child_conn, config.model_dump_json(),
                  None if db_path is None else str(db_path), warm, threads, level_name))
        self._proc.start()
        child_conn.close()
        self._receiver = threading.Thread(target=self._receive, name="monitor-process-recv",
                                          daemon=True)
        self._receiver.start()

    # -- transport ---------------------------------------------------------------------------
    def _send(self, msg) -> None:
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, EOFError) as exc:
            self._died(f"the monitor process is gone ({exc!r})")
            raise LogUnavailable(self._dead) from exc

    def _ask(self, kind: str, *args, timeout: float = REPLY_TIMEOUT_S):
        """Send a request to the child and wait for its reply."""
        token = next(self._tokens)
        self._check()
        self._send((kind, token) + args)
        deadline = time.monotonic() + timeout
        with self._cv:
            while token not in self._replies:
                if self._dead is not None:
                    raise LogUnavailable(self._dead)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LogUnavailable(f"the monitor process did not answer {kind!r} "
                                         f"within {timeout:g} s")
                self._cv.wait(min(left, 1.0))
            reply = self._replies.pop(token)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def _check(self) -> None:
        if self._dead is not None:
            raise LogUnavailable(self._dead)
        if self._closed:
            raise RuntimeError("monitor is closed")

    def _died(self, why: str) -> None:
        with self._cv:
            if self._dead is None:
                self._dead = why
                if not self._closed:
                    log.error("%s: requests fail closed until the server restarts", why)
            self._cv.notify_all()

    def _receive(self) -> None:
        conn = self._conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._proc.join(5)
                self._died(f"the monitor process exited (exit code {self._proc.exitcode})")
                return
            kind = msg[0]
            if kind == "ack":
                self._acked(*msg[1:])
            elif kind == "reply":
                with self._cv:
                    self._replies[msg[1]] = msg[2]
                    self._cv.notify_all()
            elif kind == "taken":
                with self._cv:
                    self._waiting -= msg[1]
                    self._cv.notify_all()
            elif kind == "known":
                with self._cv:
                    for c, (lvl, qn, want) in msg[1].items():
                        if c not in self._clients:
                            self._clients[c] = _Known(Level(lvl), qn, ask=want)
                    self._forget()
            elif kind == "status":
                with self._cv:
                    self._child_ready, self._child_health = msg[1], msg[2]
            elif kind == "fatal":
                self._died(f"the monitor process failed: {msg[1]}")

    def _acked(self, done: list, levels: dict, probes: dict, transitions: list) -> None:
        with self._cv:
            for c, n in done:
                st = self._clients.get(c)
                if st is not None:
                    st.items -= n
                    st.requests -= 1
                self._unacked -= 1
            for c, lvl in levels.items():
                st = self._clients.get(c)
                if st is not None:
                    st.level = Level(lvl)
            for c, want in probes.items():
                st = self._clients.get(c)
                if st is not None:
                    st.ask = want
            if transitions and self._linking:
                # a group's level may have changed for clients not in this step: each asks
                # the child once before its next answer
                for st in self._clients.values():
                    st.ask = True
            self._cv.notify_all()
        for tr in transitions:
            for fn in self._listeners:
                try:
                    fn(tr)
                except Exception:  # noqa: BLE001 - a listener never breaks the monitor
                    log.exception("a transition listener failed")

    # -- service API -------------------------------------------------------------------------
    def level(self, client_id: str, images: np.ndarray | None = None) -> Level:
        """The level to answer this client's request at: once at most ``max_lag`` of its
        queries wait for the detectors. Raises LogUnavailable when the child is gone or
        reports its log failing (``log.on_failure = "closed"``)."""
        self._check()
        if self._child_health is not None and self.config.log.on_failure == "closed":
            raise LogUnavailable(f"the monitor's log cannot be written "
                                 f"({self._child_health}); try again later")
        with self._cv:
            st = self._clients.get(client_id)
            while st is not None and st.requests and (
                    self._max_lag == 0 or st.items > self._max_lag):
                if self._dead is not None:
                    raise LogUnavailable(self._dead)
                self._cv.wait(1.0)
                st = self._clients.get(client_id)
            if st is not None:
                self._clients.move_to_end(client_id)
                if not st.ask:
                    return st.level
        probe = images if self._linking else None
        lvl, qn, want = self._ask("level", client_id, probe)
        with self._cv:
            st = self._clients.get(client_id)
            if st is None:
                st = self._clients[client_id] = _Known(Level(lvl), qn, ask=want)
                self._forget()
            elif not st.requests:   # nothing of it in flight: the child's figures are current
                st.level, st.qn, st.ask = Level(lvl), qn, want
            else:
                st.level, st.ask = max(st.level, Level(lvl)), want
            return st.level

    def _forget(self) -> None:
        """Drop the oldest idle clients beyond what is remembered here (caller holds _cv)."""
        if len(self._clients) <= self._remember:
            return
        for c in [c for c, st in self._clients.items() if not st.requests]:
            if len(self._clients) <= self._remember:
                break
            del self._clients[c]

    def queries(self, client_id: str) -> int:
        """The client's query count, its queries still on their way to the detectors
        included."""
        with self._cv:
            st = self._clients.get(client_id)
            if st is not None:
                return st.qn
        self.level(client_id)
        with self._cv:
            return self._clients[client_id].qn

    def observe(self, client_id: str, request_id: str, images: np.ndarray,
                target_probs: np.ndarray, answer: Answer, level: Level, *,
                wait: bool = True) -> Level:
        """Send the request to the child; returns the client's level known now (the request's
        own effect applies from a later request). Blocks while ``queue_limit`` requests wait
        for the child. ``wait``: ignored (nothing here waits for the detectors)."""
        self._check()
        t = float(self._clock())
        n = len(images)
        if len(answer) != n:
            raise ValueError(f"answer has {len(answer)} items for {n} images")
        while True:
            with self._cv:
                while self._waiting >= self._queue_limit and self._dead is None:
                    self._cv.wait(1.0)
                self._check()
                st = self._clients.get(client_id)
                if st is not None:
                    st.qn += n
                    st.items += n
                    st.requests += 1
                    self._waiting += 1
                    self._unacked += 1
                    now = st.level
                    break
            self.level(client_id)     # observed without level() first (a test, a tool)
        try:
            self._send(("observe", client_id, str(request_id), t, images, target_probs,
                        answer, int(level)))
        except LogUnavailable:
            with self._cv:
                st.qn -= n
                st.items -= n
                st.requests -= 1
                self._waiting -= 1
                self._unacked -= 1
            raise
        return now

    def wait_durable(self, client_id: str) -> None:
        """Nothing: a client's next request waits for its previous rows (see ``level``)."""

    def flush(self) -> None:
        """Return once everything sent so far is processed and committed."""
        self._ask("flush")

    def stats(self) -> dict:
        out = {} if self._dead is not None else self._ask("stats", timeout=5.0)
        out["detector_queue_depth"] = self._unacked
        out["monitor_process_alive"] = int(self._dead is None)
        return out

    def ready(self) -> bool:
        return self._dead is None and not self._closed and self._child_ready

    def health(self) -> str | None:
        return self._dead or self._child_health

    def on_transition(self, fn: Callable) -> None:
        """Call ``fn(transition)`` for every level change, as the child acknowledges it."""
        self._listeners.append(fn)

    def fit_memory(self, rss: int | None, now: float | None = None) -> int:
        """Nothing to fit here: the child holds the client state and fits it to its own
        resident size."""
        return 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self) -> None:
        """Let the child drain, checkpoint every client and close the log; wait for it."""
        if self._closed:
            return
        try:
            if self._dead is None:
                self._ask("close", timeout=600.0)
        finally:
            self._closed = True
            self._proc.join(30)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._conn.close()
            self._receiver.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def __repr__(self) -> str:
        return f"MonitorProcess(pid={self._proc.pid}, db={self.db_path})"


# -- the child ----------------------------------------------------------------------------------
def _child_main(conn, config_json: str, db_path: str | None, warm: bool, threads: int,
                log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s[monitor]: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        from threadpoolctl import threadpool_limits

        from common.memory import limit_heap_arenas
        from monitor.core import Monitor

        threadpool_limits(threads, user_api="blas")
        limit_heap_arenas()
        cfg = MonitorConfig.model_validate_json(config_json)
        merge = cfg.execution.max_lag > 0
        # in here the monitor runs synchronously (mode "process"): the serving process waits
        _warm_up(cfg)
        mon = Monitor(cfg, db_path, warm=warm)
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which fails closed
        try:
            conn.send(("fatal", repr(exc)))
        finally:
            raise
    try:
        _Child(conn, mon, merge).run()
    except BaseException as exc:  # noqa: BLE001
        log.exception("the monitor process failed")
        try:
            conn.send(("fatal", repr(exc)))
        except OSError:
            pass
        raise
    finally:
        mon.close()


def _warm_up(cfg: MonitorConfig) -> None:
    """Run the detectors once on a throwaway engine (nothing stored), before the child says it
    is ready: their first call imports and initialises torch and the scipy kernels (measured:
    1.1 s), which would otherwise land on the second request of the first client."""
    from monitor.engine import ClientEngine, det_view

    rng = np.random.default_rng(0)
    x, on_grid = det_view(rng.random((4, 28, 28), dtype=np.float32))
    probs = np.full((4, 10), 0.1, np.float32)
    ClientEngine(cfg, "warm-up").step(x.reshape(4, -1), probs, 0.0, on_grid)


class _Child:
    """The child's loop: read what the serving process sent, run the requests through the
    detectors in order, and acknowledge them once their rows are durable. Acknowledgements and
    replies leave through one sender thread, in order; it waits for the commits, so the
    detectors go on with the next requests meanwhile."""

    def __init__(self, conn, mon, merge: bool):
        self.conn, self.mon, self.merge = conn, mon, merge
        self.transitions: list = []
        mon.on_transition(self.transitions.append)
        self.status = None
        self.next_status = 0.0
        self.stopped = threading.Event()
        self.told_resident = False
        self.out: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name="monitor-acks", daemon=True)
        self.sender.start()

    def emit(self, msg, ticket: int | None = None) -> None:
        """Send ``msg`` once ``ticket`` is durable, after everything emitted before it: at once
        from this thread when nothing waits before it (no thread hop for the common case),
        else through the sender thread."""
        if self.out.unfinished_tasks == 0 and (
                ticket is None or self.mon.store.is_committed(ticket)):
            try:
                self.conn.send(msg)
            except (OSError, EOFError):   # the serving process is gone: nobody to tell
                pass
        else:
            self.out.put((ticket, msg))

    def _send_loop(self) -> None:
        st = self.mon.store
        timeout = self.mon.config.log.commit_timeout_seconds
        while True:
            item = self.out.get()
            if item is None:
                self.out.task_done()
                return
            ticket, msg = item
            if ticket is not None and not st.wait_committed(ticket, timeout):
                log.warning("the monitor's log did not commit within %g s (%s): acknowledged "
                            "anyway, the serving process sees the failure in health()",
                            timeout, st.failure() or "slow disk")
            try:
                self.conn.send(msg)
            except (OSError, EOFError):   # the serving process is gone: nobody to tell
                pass
            finally:
                self.out.task_done()

    def _fit_memory(self) -> None:
        """As the server's health watcher does in one process: fit the client state to this
        process's resident size, give the freed heap back (after an eviction, else every
        second). On its own thread: a trim of a large heap takes a while, and the detectors
        go on meanwhile."""
        from common.memory import rss_bytes, trim_heap

        last_trim = 0.0
        while not self.stopped.wait(STATUS_EVERY_S):
            try:
                now = time.monotonic()
                if self.mon.fit_memory(rss_bytes()) or now - last_trim > 1.0:
                    trim_heap()
                    last_trim = now
            except Exception as exc:  # noqa: BLE001 - never let the watcher die
                log.warning("fitting client state to the memory cap failed: %r", exc)

    def run(self) -> None:
        conn, mon = self.conn, self.mon
        fitter = threading.Thread(target=self._fit_memory, name="monitor-memory", daemon=True)
        fitter.start()
        gone = False
        try:
            while not gone:
                now = time.monotonic()
                if now >= self.next_status:
                    self.next_status = now + STATUS_EVERY_S
                    status = (mon.ready(), mon.health())
                    if status != self.status:
                        if status[0] and not self.told_resident:
                            # the clients restored at start: their first requests then need
                            # no round trip here (sent before "ready")
                            self.told_resident = True
                            self.emit(("known", {c: (int(mon.current_level(c)),
                                                     mon.queries(c), mon.wants_probe(c))
                                                 for c in mon.resident_ids()}))
                        self.status = status
                        self.emit(("status",) + status)
                msgs: list = []
                try:
                    if not conn.poll(STATUS_EVERY_S):
                        continue
                    msgs.append(conn.recv())
                    while len(msgs) < READ_MAX_MESSAGES and conn.poll(0):
                        msgs.append(conn.recv())
                except (EOFError, OSError):
                    # what was read before the pipe closed is still run and logged below
                    log.warning("the serving process is gone: closing the monitor")
                    gone = True
                taken = sum(m[0] == "observe" for m in msgs)
                if taken:     # no longer waiting in the pipe: the parent may send more
                    self.emit(("taken", taken))
                jobs: list = []
                for m in msgs:
                    if m[0] == "observe":
                        jobs.append(m[1:])
                        continue
                    if m[0] == "level":
                        # at once, before the requests read with it: a level (and linking's
                        # probe) looks at what the detectors have seen so far, as in async
                        # mode; the client's own requests it must follow are acknowledged
                        # already (max_lag), and the reply's query count is used only then
                        self.control(m)
                        continue
                    self.work(jobs)
                    jobs = []
                    if self.control(m):
                        return
                self.work(jobs)
        finally:
            self.stopped.set()
            fitter.join(5)
            self.out.put(None)
            self.sender.join(60)

    def work(self, jobs: list) -> None:
        """Run the jobs through the detectors; their acknowledgement leaves once the rows the
        clients' next answers wait for are durable."""
        if not jobs:
            return
        mon = self.mon
        jobs = [(c, rid, t, images, probs, answer, Level(lvl))
                for c, rid, t, images, probs, answer, lvl in jobs]
        mon.run_requests(jobs, self.merge)
        clients = list(dict.fromkeys(j[0] for j in jobs))
        trs, self.transitions[:] = list(self.transitions), []
        touched = list(dict.fromkeys(clients + [tr.client for tr in trs]))
        tickets = [t for t in (mon.commit_ticket(c) for c in touched) if t is not None]
        levels = {c: int(mon.current_level(c)) for c in touched}
        probes = {c: mon.wants_probe(c) for c in touched}
        # the log's tickets commit in order: the last one covers the others
        self.emit(("ack", [(j[0], len(j[3])) for j in jobs], levels, probes, trs),
                  max(tickets) if tickets else None)

    def control(self, m) -> bool:
        """A request of the parent; True: stop."""
        kind, token, args = m[0], m[1], m[2:]
        mon = self.mon
        try:
            if kind == "level":
                c, images = args
                reply = (int(mon.level(c, images)), mon.queries(c), mon.wants_probe(c))
            elif kind == "flush":
                reply = mon.flush()
            elif kind == "stats":
                reply = mon.stats()
            elif kind == "close":
                mon.close()
                reply = None
            else:
                reply = ValueError(f"unknown monitor request {kind!r}")
        except Exception as exc:  # noqa: BLE001 - raised in the parent's caller
            reply = exc
        self.emit(("reply", token, reply))
        return kind == "close"
