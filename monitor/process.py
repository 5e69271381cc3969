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

The same monitor can run on its own, on this machine or another (:func:`serve`, ``python -m
monitor serve``), with servers connecting to it over TCP (``execution.address``): it then keeps
its own log and config, outlives the servers (a restarted server finds its clients in memory),
may be shared by several servers (level changes reach every one of them), and a server that
loses it fails closed and reconnects by itself. The monitor's side reads each connection on one
thread, runs the detector steps on others (``execution.step_threads``: different clients' at
once, each client's in order) and answers levels on a third.

Only the embedded SQLite store is supported here (replicas sharing PostgreSQL hand clients
over between them, which the serving process's cached levels would not see).
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict, deque
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from common.steps import Blocking, Steps, Waiting, run_steps
from common.types import Answer, Level
from monitor.config import MonitorConfig, parse_address
from monitor.core import gather
from monitor.log import LogUnavailable

log = logging.getLogger("modelguard.monitor")

REPLY_TIMEOUT_S = 120.0    # a client's first request may wait for its restore: generous
READ_MAX_MESSAGES = 512    # the monitor takes at most this many messages per round of steps
STATUS_EVERY_S = 0.1       # the child reports readiness and fits its memory this often
RECONNECT_S = 1.0          # a server retries a lost monitor at an address this often


@dataclass(slots=True)
class _Known:
    """What the serving process knows of a client."""

    level: Level
    qn: int                 # its query count, its unacknowledged queries included
    items: int = 0          # its queries sent and not yet acknowledged
    requests: int = 0       # the requests they came in
    ask: bool = False       # level() must ask the child (linking's probe, or stale)


def link_key(secret: str) -> bytes:
    """The key a server and a monitor it connects to (``execution.address``) authenticate each
    other with: derived from the server's secret, so both read the same secret file and the
    secret itself never serves two purposes."""
    return hmac.new(secret.encode(), b"modelguard monitor link v1", hashlib.sha256).digest()


def _settle(fut: futures.Future, reply) -> None:
    """Deliver the monitor's ``reply`` (a value, or an exception it raised) to ``fut``."""
    try:
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)
    except futures.InvalidStateError:
        pass      # given up on meanwhile (timed out, cancelled)


class MonitorProcess:
    """Drop-in for :class:`monitor.Monitor` on the service's side, with the real monitor in
    another process (see the module's doc). ``config.execution.mode`` must be ``"process"``.

    Without ``execution.address`` the monitor is a child process of this one, on the log at
    ``db_path`` (None: a temporary log the child deletes on close). With it, this connects to a
    monitor started by ``python -m monitor serve`` (its own log and config; ``authkey``: see
    :func:`link_key`), and reconnects when the connection is lost: requests fail closed
    meanwhile. ``clock``: request timestamps, taken here in the serving process (replay stays
    exact)."""

    def __init__(self, config: MonitorConfig, db_path: str | Path | None = None, *,
                 clock: Callable[[], float] = time.time, warm: bool = False,
                 threads: int = 1, authkey: bytes | None = None):
        ex = config.execution
        if ex.mode != "process":
            raise ValueError(f"MonitorProcess needs execution.mode = \"process\", "
                             f"not {ex.mode!r}")
        self.address = parse_address(ex.address) if ex.address else None
        if self.address is not None and not authkey:
            raise ValueError("a monitor at execution.address needs the link key "
                             "(monitor.process.link_key of the server's secret)")
        self.config = config
        self.db_path = Path(db_path) if db_path is not None and self.address is None else None
        self._authkey = authkey
        # TLS to the monitor at the address: a CA file that cannot be used fails here, at start
        self._tls = None
        if ex.tls_ca:
            from monitor.tlslink import client_context
            self._tls = client_context(ex.tls_ca)
        self._clock = clock
        self._adopt(config)
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()
        self._clients: OrderedDict[str, _Known] = OrderedDict()
        self._waiting = 0     # requests sent, not yet read by the monitor (queue_limit bounds)
        self._unacked = 0     # requests sent, not yet acknowledged
        self._futures: dict[int, futures.Future] = {}   # replies awaited, by token
        self._tokens = itertools.count(1)
        self._listeners: list[Callable] = []
        self._child_ready = False
        self._child_health: str | None = None
        self._closed = False
        self._closing = False
        self._stop_link = threading.Event()
        self._remember = 4 * ex.max_clients + 64   # clients remembered here (idle ones go)
        self._gen = 0         # connection generation: what a lost connection left is ignored
        self._proc = None
        self._conn = None
        if self.address is None:
            ctx = mp.get_context("spawn")      # never fork a process with threads and locks
            self._conn, child_conn = ctx.Pipe(duplex=True)
            level_name = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            self._proc = ctx.Process(
                target=_child_main, name="modelguard-monitor", daemon=True,
                args=(child_conn, config.model_dump_json(),
                      None if db_path is None else str(db_path), warm, threads, level_name))
            self._proc.start()
            child_conn.close()
            self._dead: str | None = None
        else:
            self._dead = f"not yet connected to the monitor at {ex.address}"
        self._receiver = threading.Thread(target=self._link, name="monitor-process-recv",
                                          daemon=True)
        self._receiver.start()

    def _adopt(self, config: MonitorConfig) -> None:
        """Take what answering needs from the monitor's config (a monitor at an address runs
        its own: its lag, queue limit, linking and failure mode are what count)."""
        ex = config.execution
        self._max_lag = ex.max_lag
        self._queue_limit = ex.queue_limit
        self._linking = config.linking.enabled and config.linking.raise_members
        self._fail_closed = config.log.on_failure == "closed"

    # -- transport ---------------------------------------------------------------------------
    def _send(self, msg) -> int:
        """Send ``msg``; returns the connection's generation."""
        with self._send_lock:
            conn, gen = self._conn, self._gen
            if conn is None or self._dead is not None:
                raise LogUnavailable(self._dead or "the monitor is not connected")
            try:
                conn.send(msg)
            except (OSError, EOFError, ValueError) as exc:
                why = f"the connection to the monitor failed ({exc!r})"
                self._died(why, gen)
                raise LogUnavailable(why) from exc
        return gen

    def _ask(self, kind: str, *args, timeout: float = REPLY_TIMEOUT_S):
        """Send a request to the monitor and wait for its reply."""
        return self._asking(kind, *args, timeout=timeout).run()

    def _asking(self, kind: str, *args, timeout: float = REPLY_TIMEOUT_S) -> Waiting:
        """Send a request to the monitor; the Waiting step (common.steps) of its reply. The
        reply fails with LogUnavailable when the connection is lost first, or after
        ``timeout`` seconds."""
        token = next(self._tokens)
        self._check()
        fut: futures.Future = futures.Future()
        with self._cv:
            self._futures[token] = fut
        try:
            self._send((kind, token) + args)
        except BaseException:
            with self._cv:
                self._futures.pop(token, None)
            raise

        def late() -> LogUnavailable:
            with self._cv:
                self._futures.pop(token, None)
            return LogUnavailable(f"the monitor did not answer {kind!r} within {timeout:g} s")

        return Waiting(fut, timeout, late)

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("monitor is closed")
        if self._dead is not None:
            raise LogUnavailable(self._dead)

    def _died(self, why: str, gen: int | None = None) -> None:
        with self._cv:
            if gen is not None and gen != self._gen:
                return            # an old connection's failure: already handled
            if self._dead is None:
                self._dead = why
                if not (self._closed or self._closing):
                    log.error("%s: requests fail closed until %s", why,
                              "the server restarts" if self.address is None
                              else "the monitor is reachable again")
            pending, self._futures = self._futures, {}
            self._cv.notify_all()
        for fut in pending.values():     # nothing will answer them now
            _settle(fut, LogUnavailable(why))

    def _link(self) -> None:
        """The receiving thread: the child's pipe until it closes; or connect to the monitor at
        the address, receive until the connection is lost, reconnect."""
        if self.address is None:
            self._receive(self._conn, self._gen)
            self._proc.join(5)
            self._died(f"the monitor process exited (exit code {self._proc.exitcode})")
            return
        warned = False
        while not self._closing:
            try:
                conn = _connect(self.address, self._authkey, self._tls)
            except (OSError, EOFError, mp.AuthenticationError) as exc:
                why = _unreachable(self.config.execution.address, exc)
                with self._cv:
                    self._dead = why
                    self._cv.notify_all()
                if not warned:
                    log.error("%s: requests fail closed; retrying every %g s", why, RECONNECT_S)
                    warned = True
                self._stop_link.wait(RECONNECT_S)
                continue
            with self._send_lock, self._cv:
                if self._closing:
                    conn.close()
                    return
                # what the lost connection left is void: nothing of it is waited for
                self._gen += 1
                self._conn = conn
                self._clients.clear()
                self._waiting = self._unacked = 0
                self._child_ready, self._child_health = False, None
                self._dead = None
                gen = self._gen
                self._cv.notify_all()
            if warned:
                log.warning("connected to the monitor at %s again",
                            self.config.execution.address)
            warned = False
            self._receive(conn, gen)
            if self._closing:     # close(): the monitor ended the connection as asked
                with self._send_lock:
                    conn.close()
                    self._closed = True
                self._died("monitor is closed", gen)
                return
            self._died(f"lost the connection to the monitor at "
                       f"{self.config.execution.address}", gen)
            with self._send_lock:
                conn.close()

    def _receive(self, conn, gen: int) -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            kind = msg[0]
            if kind == "ack":
                self._acked(*msg[1:])
            elif kind == "reply":
                with self._cv:
                    fut = self._futures.pop(msg[1], None)
                if fut is not None:
                    _settle(fut, msg[2])
            elif kind == "taken":
                with self._cv:
                    self._waiting -= msg[1]
                    self._cv.notify_all()
            elif kind == "hello":
                try:
                    cfg = MonitorConfig.model_validate_json(msg[1])
                except ValueError as exc:   # another version's config: nothing is safe to do
                    self._died(f"the monitor's config cannot be read here (another version of "
                               f"modelguard?): {str(exc).splitlines()[0]}", gen)
                    return
                with self._cv:
                    self._adopt(cfg)
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
                self._died(f"the monitor process failed: {msg[1]}", gen)

    def _acked(self, done: list, levels: dict, probes: dict, transitions: list) -> None:
        with self._cv:
            for c, n in done:
                st = self._clients.get(c)
                if st is not None:
                    st.items -= n
                    st.requests -= 1
                self._unacked -= 1
            for c, (lvl, qn) in levels.items():
                st = self._clients.get(c)
                if st is not None:
                    # qn: the monitor's count, which includes other servers' queries when
                    # several share it; this server's queries not yet acknowledged come on top
                    st.level = Level(lvl)
                    st.qn = max(st.qn, qn + st.items)
            for c, want in probes.items():
                st = self._clients.get(c)
                if st is not None:
                    st.ask = want
            if transitions and self._linking:
                # a group's level may have changed for clients not in this step: each asks
                # the monitor once before its next answer
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
        queries wait for the detectors. Raises LogUnavailable when the monitor is gone or
        reports its log failing (``log.on_failure = "closed"``)."""
        return run_steps(self.level_steps(client_id, images))

    def level_steps(self, client_id: str, images: np.ndarray | None = None) -> Steps:
        """:meth:`level` as steps (common.steps): the monitor's answer, when it must be asked
        (a client it knows nothing of yet, a young key's probe), is a Waiting step; a wait for
        its replies while more than ``max_lag`` of the client's queries are in flight is a
        Blocking one; a client whose level is known here takes no step at all."""
        self._check()
        if self._child_health is not None and self._fail_closed:
            raise LogUnavailable(f"the monitor's log cannot be written "
                                 f"({self._child_health}); try again later")
        with self._cv:
            lagging = self._lagging(self._clients.get(client_id))
        if lagging:
            yield Blocking(self._await_lag, client_id)
        with self._cv:
            st = self._clients.get(client_id)
            if st is not None:
                self._clients.move_to_end(client_id)
                if not st.ask:
                    return st.level
        probe = images if self._linking else None
        lvl, qn, want = yield self._asking("level", client_id, probe)
        with self._cv:
            st = self._clients.get(client_id)
            if st is None:
                st = self._clients[client_id] = _Known(Level(lvl), qn, ask=want)
                self._forget()
            elif not st.requests:   # nothing of it in flight: the monitor's figures are current
                st.level, st.qn, st.ask = Level(lvl), max(st.qn, qn), want
            else:
                st.level, st.ask = max(st.level, Level(lvl)), want
            return st.level

    def _await_lag(self, client_id: str) -> None:
        """Wait until at most ``max_lag`` of the client's queries are in flight (with max_lag
        0: none)."""
        with self._cv:
            while self._lagging(self._clients.get(client_id)):
                if self._dead is not None:
                    raise LogUnavailable(self._dead)
                self._cv.wait(1.0)

    def _lagging(self, st: _Known | None) -> bool:
        """More of the client's queries are in flight than ``max_lag`` allows (with max_lag 0:
        any request of it); caller holds _cv."""
        return st is not None and bool(st.requests) and (
            self._max_lag == 0 or st.items > self._max_lag)

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
            st = self._clients.get(client_id)
            if st is None:      # the connection was lost meanwhile
                raise LogUnavailable(self._dead or "the connection to the monitor was lost")
            return st.qn

    def observe(self, client_id: str, request_id: str, images: np.ndarray,
                target_probs: np.ndarray, answer: Answer, level: Level, *,
                wait: bool = True) -> Level:
        """Send the request to the monitor; returns the client's level known now (the
        request's own effect applies from a later request). Blocks while ``queue_limit``
        requests wait for the monitor. ``wait``: ignored (nothing here waits for the
        detectors)."""
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
                    now, gen = st.level, self._gen
                    break
            self.level(client_id)     # observed without level() first (a test, a tool)
        try:
            self._send(("observe", client_id, str(request_id), t, images, target_probs,
                        answer, int(level)))
        except LogUnavailable:
            with self._cv:
                if gen == self._gen:
                    st.qn -= n
                    st.items -= n
                    st.requests -= 1
                    self._waiting -= 1
                    self._unacked -= 1
            raise
        return now

    def wait_durable(self, client_id: str) -> None:
        """Nothing: a client's next request waits for its previous rows (see ``level``)."""

    def observe_steps(self, client_id: str, request_id: str, images: np.ndarray,
                      target_probs: np.ndarray, answer: Answer, level: Level) -> Steps:
        """:meth:`observe` as steps (common.steps): sent in place, or one Blocking step while
        ``queue_limit`` requests wait for the monitor (observe waits for room then)."""
        args = (client_id, request_id, images, target_probs, answer, level)
        if self._waiting >= self._queue_limit:
            return (yield Blocking(self.observe, *args))
        return self.observe(*args)

    def durable_steps(self, client_id: str) -> Steps:
        """wait_durable as steps: none."""
        yield from ()

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
        """Call ``fn(transition)`` for every level change, as the monitor acknowledges it
        (with a shared monitor, other servers' clients' changes too)."""
        self._listeners.append(fn)

    def fit_memory(self, rss: int | None, now: float | None = None) -> int:
        """Nothing to fit here: the monitor's process holds the client state and fits it to
        its own resident size."""
        return 0

    @property
    def pid(self) -> int | None:
        """The child's pid (None for a monitor at an address)."""
        return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        """A child: let it drain, checkpoint every client and close the log; wait for it. A
        monitor at an address: let it commit what this server sent, then disconnect (it keeps
        running for the next server)."""
        if self._closed:
            return
        self._closing = True
        self._stop_link.set()
        try:
            if self._dead is None:
                self._ask("close", timeout=600.0)
        except LogUnavailable:
            if self._proc is not None:
                raise
        finally:
            if self._proc is None:
                self._receiver.join(5)      # it closes the connection as the monitor does
            with self._send_lock:
                self._closed = True
                if self._conn is not None and not self._conn.closed:
                    self._conn.close()
            if self._proc is not None:
                self._proc.join(30)
                if self._proc.is_alive():
                    self._proc.kill()
                    self._proc.join(5)
            self._receiver.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def __repr__(self) -> str:
        where = (f"pid={self.pid}, db={self.db_path}" if self.address is None
                 else f"address={self.config.execution.address}")
        return f"MonitorProcess({where})"


def _unreachable(address: str, exc: BaseException) -> str:
    """Why a connection to the monitor at ``address`` failed, for health() and the log."""
    if isinstance(exc, mp.AuthenticationError):
        return (f"the monitor at {address} refused this server's key: both must read the same "
                f"secret")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"the monitor at {address} presented a certificate this server does not trust "
                f"({exc.verify_message}): it must be signed by the CA in execution.tls_ca "
                f"(--monitor-tls-ca) and name the host {address.rsplit(':', 1)[0]}")
    if isinstance(exc, ssl.SSLError):
        return (f"the TLS handshake with the monitor at {address} failed ({exc.reason or exc}): "
                f"is it serving TLS (monitor serve --tls-cert)?")
    if isinstance(exc, NoHandshake):
        return (f"the peer at {address} took the connection but did not complete the link's "
                f"handshake ({exc}): is it a modelguard monitor (monitor serve), and not "
                f"stalled?")
    if isinstance(exc, OSError):
        return f"cannot reach the monitor at {address} ({exc.strerror or exc!r})"
    return (f"the monitor at {address} closed the connection (one serving TLS needs "
            f"execution.tls_ca here, --monitor-tls-ca)")


class NoHandshake(TimeoutError):
    """A peer took the connection but did not complete the link's challenge in time."""


def _io_timeout(sock: socket.socket, seconds: float) -> None:
    """Reads and writes on ``sock``'s descriptor fail (EAGAIN) after ``seconds`` (0: never),
    also through multiprocessing's Connection, which reads the descriptor itself."""
    tv = struct.pack("ll", int(seconds), int(round(seconds % 1 * 1e6)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def _connect(address: tuple[str, int], authkey: bytes, tls: ssl.SSLContext | None = None,
             timeout: float | None = None):
    """A connection to a monitor that ``serve`` runs, both sides authenticated (HMAC
    challenges both ways, as multiprocessing's Client does), over TLS with ``tls``. A peer
    that takes the connection but does not complete the challenge within ``timeout`` (default
    the TLS handshake's) raises :class:`NoHandshake`: the link retries instead of waiting for
    it for ever (a monitor that hangs, or another service at that address)."""
    from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

    from monitor.tlslink import HANDSHAKE_TIMEOUT_S, TLSConnection
    timeout = HANDSHAKE_TIMEOUT_S if timeout is None else timeout
    sock = socket.create_connection(address, timeout=timeout)
    # small messages (acknowledgements, "taken") go out at once, not after the peer's delayed
    # ACK (Nagle; measured: batch-1 requests over the loopback at half the pipe's rate without)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    family = sock.family
    if tls is None:
        sock.settimeout(None)            # a blocking descriptor, which Connection reads
        _io_timeout(sock, timeout)
        conn = Connection(sock.detach())
    else:
        conn = TLSConnection(sock, tls, server_side=False, server_hostname=address[0],
                             timeout=timeout)
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except BlockingIOError:              # the plain socket's timeouts ran out
        conn.close()
        raise NoHandshake(f"no handshake within {timeout:g} s") from None
    except BaseException:
        conn.close()
        raise
    if tls is None:
        with socket.fromfd(conn.fileno(), family, socket.SOCK_STREAM) as s:
            _io_timeout(s, 0)            # linked: the receiving thread waits as long as it must
    return conn


# -- the monitor's side -------------------------------------------------------------------------
def _child_main(conn, config_json: str, db_path: str | None, warm: bool, threads: int,
                log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the server, which closes us
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s[monitor]: %(message)s")
    try:
        cfg = MonitorConfig.model_validate_json(config_json)
        mon = _start_monitor(cfg, db_path, warm, threads, freeze_heap=True)
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which fails closed
        try:
            conn.send(("fatal", repr(exc)))
        finally:
            raise
    fitter = _MemoryFitter(mon)
    try:
        _Child(conn, mon).run()
    except BaseException as exc:  # noqa: BLE001
        log.exception("the monitor process failed")
        try:
            conn.send(("fatal", repr(exc)))
        except OSError:
            pass
        raise
    finally:
        fitter.stop()
        mon.close()


def _start_monitor(cfg: MonitorConfig, db_path, warm: bool, threads: int,
                   freeze_heap: bool = False):
    """The real monitor, in this process, after deliberate thread counts and a warm-up.
    ``freeze_heap``: the process is the monitor's own (common.memory.freeze_startup_heap)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from threadpoolctl import threadpool_limits

    from common.memory import freeze_startup_heap, limit_heap_arenas
    from monitor.core import Monitor

    threadpool_limits(threads, user_api="blas")
    limit_heap_arenas()
    # in here the monitor runs synchronously (mode "process"): the serving process waits
    _warm_up(cfg)
    mon = Monitor(cfg, db_path, warm=warm)
    if freeze_heap:
        log.info("froze %d start-up objects out of Python's full garbage collections",
                 freeze_startup_heap())
    return mon


class ListenError(OSError):
    """``serve`` cannot bind its address (in use, not this host's, no permission)."""


def serve(config: MonitorConfig, db_path: str | Path | None, address: tuple[str, int],
          authkey: bytes, *, threads: int = 1, on_listening: Callable | None = None,
          stop: threading.Event | None = None, tls: ssl.SSLContext | None = None,
          freeze_heap: bool = False) -> None:
    """``python -m monitor serve``: run the monitor on its own (this machine or another) for
    the servers whose ``execution.address`` names it. Each server that connects (authenticated
    with ``authkey``, see :func:`link_key`) is served as a child of its own would be; several
    may share the monitor, and a server that restarts finds its clients' state still in memory.
    Returns on SIGTERM or SIGINT (from the main thread; else when ``stop`` is set), once every
    client is checkpointed and the log closed. ``on_listening(address)``: called with the
    bound address (port 0: the one chosen). ``tls``: serve TLS only
    (:func:`monitor.tlslink.server_context`). ``freeze_heap``: this process is the monitor's
    own (the command line): its start-up objects leave Python's full garbage collections
    (common.memory.freeze_startup_heap)."""
    from multiprocessing.connection import Connection

    cfg = config.with_changes(execution={"mode": "process", "address": "", "tls_ca": ""})
    try:        # first: a port in use is said at once, not after the monitor's restore
        listener = socket.create_server(address, backlog=16)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address[0]}:{address[1]}: "
                          f"{exc.strerror or exc}") from None
    try:
        mon = _start_monitor(cfg, db_path, True, threads, freeze_heap)
    except BaseException:
        listener.close()
        raise
    fitter = _MemoryFitter(mon)
    stop = stop or threading.Event()
    children: set[_Child] = set()
    lock = threading.Lock()

    bound = listener.getsockname()[:2]

    def closer() -> None:
        stop.wait()
        try:                      # wakes accept() (closing the socket would not)
            socket.create_connection(bound, timeout=5).close()
        except OSError:
            pass

    threading.Thread(target=closer, name="monitor-stop", daemon=True).start()
    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM,
                                                                      signal.SIGINT)}

    def handle(sock, peer) -> None:
        from multiprocessing.connection import answer_challenge, deliver_challenge
        conn = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is None:
                conn = Connection(sock.detach())
            else:             # the handshake here, off the accepting thread
                from monitor.tlslink import TLSConnection
                conn = TLSConnection(sock, tls, server_side=True)
            deliver_challenge(conn, authkey)
            answer_challenge(conn, authkey)
        except (mp.AuthenticationError, OSError, EOFError) as exc:
            log.warning("refused a connection from %s: %r (a server must read the same "
                        "secret as this monitor%s)", peer, exc,
                        "" if tls is None else " and connect with TLS, trusting its CA")
            (sock if conn is None else conn).close()
            return
        child = _Child(conn, mon, shared=True)
        with lock:
            children.add(child)
        log.info("server connected from %s", peer)
        try:
            child.run()
        except Exception:  # noqa: BLE001 - one connection's failure is not the monitor's
            log.exception("serving the connection from %s failed", peer)
        finally:
            with lock:
                children.discard(child)
            conn.close()
            log.info("server at %s disconnected", peer)

    log.info("monitor listening on %s:%d (%s; log %s)", bound[0], bound[1],
             "TLS" if tls is not None else "plain TCP, authenticated, not encrypted", db_path)
    if on_listening is not None:
        on_listening(bound)
    try:
        while not stop.is_set():
            try:
                sock, peer = listener.accept()
            except OSError:
                if stop.is_set():
                    break
                raise
            if stop.is_set():
                sock.close()
                break
            sock.setblocking(True)
            threading.Thread(target=handle, args=(sock, peer[:2]), daemon=True,
                             name=f"monitor-conn-{peer}").start()
    finally:
        stop.set()
        for sig, h in old.items():
            signal.signal(sig, h)
        with lock:
            for child in list(children):
                child.stopped.set()
        deadline = time.monotonic() + 60
        while children and time.monotonic() < deadline:
            time.sleep(0.05)
        listener.close()
        fitter.stop()
        mon.close()
        log.info("monitor closed: every client checkpointed")


def _warm_up(cfg: MonitorConfig) -> None:
    """Run the detectors once on a throwaway engine (nothing stored), before the child says it
    is ready: their first call imports and initialises torch and the scipy kernels (measured:
    1.1 s), which would otherwise land on the second request of the first client."""
    from monitor.engine import ClientEngine, det_view

    rng = np.random.default_rng(0)
    x, on_grid = det_view(rng.random((4, 28, 28), dtype=np.float32))
    probs = np.full((4, 10), 0.1, np.float32)
    ClientEngine(cfg, "warm-up").step(x.reshape(4, -1), probs, 0.0, on_grid)


class _MemoryFitter:
    """As the server's health watcher does in one process: fit the client state to this
    process's resident size, give the freed heap back (after an eviction, else every second).
    On its own thread: a trim of a large heap takes a while, and the detectors go on
    meanwhile."""

    def __init__(self, mon):
        self.mon = mon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor-memory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from common.memory import rss_bytes, trim_heap

        last_trim = 0.0
        while not self._stop.wait(STATUS_EVERY_S):
            try:
                now = time.monotonic()
                if self.mon.fit_memory(rss_bytes()) or now - last_trim > 1.0:
                    trim_heap()
                    last_trim = now
            except Exception as exc:  # noqa: BLE001 - never let the watcher die
                log.warning("fitting client state to the memory cap failed: %r", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class _Child:
    """One server's connection to the monitor: read what it sent, run the requests through the
    detectors in order, and acknowledge them once their rows are durable. Acknowledgements and
    replies leave through one sender thread, in order; it waits for the commits, so the
    detectors go on with the next requests meanwhile. ``shared``: the monitor outlives the
    connection (``serve``): the server's "close" and the connection's end leave it running,
    and level changes other servers' requests made are passed on (within STATUS_EVERY_S)."""

    def __init__(self, conn, mon, shared: bool = False):
        self.conn, self.mon, self.shared = conn, mon, shared
        self.merge = mon.config.execution.max_lag > 0
        self.merge_wait = mon.config.execution.merge_wait_ms / 1e3 if self.merge else 0.0
        self.transitions: deque = deque()
        self._listener = self.transitions.append   # one object: off_transition finds it
        mon.on_transition(self._listener)
        self.status = None
        self.next_status = 0.0
        self.stopped = threading.Event()
        self.told_resident = False
        self.send_lock = threading.Lock()
        self.out: queue.Queue = queue.Queue()
        self.sender = threading.Thread(target=self._send_loop, name="monitor-acks", daemon=True)
        self.sender.start()
        self.inbox: queue.Queue = queue.Queue()   # what the worker runs, in order
        self.error: BaseException | None = None
        # levels asked before an answer (a young key's linking probe looks at its images) are
        # answered on their own thread: they wait neither for the detector steps read before
        # them nor for acknowledgements waiting for their commits
        self.probes: queue.Queue = queue.Queue()
        self.prober = threading.Thread(target=self._probe_loop, name="monitor-levels",
                                       daemon=True)
        self.prober.start()

    def emit(self, msg, ticket: int | None = None) -> None:
        """Send ``msg`` once ``ticket`` is durable, after everything emitted before it: at once
        from this thread when nothing waits before it (no thread hop for the common case),
        else through the sender thread."""
        with self.send_lock:
            if self.out.unfinished_tasks == 0 and (
                    ticket is None or self.mon.store.is_committed(ticket)):
                try:
                    self.conn.send(msg)
                except (OSError, EOFError, ValueError):   # the server is gone: nobody to tell
                    pass
                return
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
            with self.send_lock:
                try:
                    self.conn.send(msg)
                except (OSError, EOFError, ValueError):   # the server is gone: nobody to tell
                    pass
                finally:
                    self.out.task_done()

    def _probe_loop(self) -> None:
        while True:
            m = self.probes.get()
            try:
                if m is None:
                    return
                self.control(m)
            finally:
                self.probes.task_done()

    def run(self) -> None:
        """Read the connection on this thread until it ends; the detector steps (and every
        message but levels, in order) run on the worker thread, levels on the prober's, so a
        level asked while a long step runs is answered at once. Raises what the worker
        raised."""
        conn = self.conn
        self.emit(("hello", self.mon.config.model_dump_json()))
        worker = threading.Thread(target=self._work_loop, name="monitor-steps", daemon=True)
        worker.start()
        try:
            while not self.stopped.is_set():
                try:
                    if not conn.poll(STATUS_EVERY_S):
                        continue
                    m = conn.recv()
                except (EOFError, OSError):
                    # what was read before the connection closed is still run and logged
                    if not self.shared and not self.stopped.is_set():
                        log.warning("the serving process is gone: closing the monitor")
                    break
                if m[0] == "level":
                    # a level (and linking's probe) looks at what the detectors have seen so
                    # far, as in async mode; the client's own requests it must follow are
                    # acknowledged already (max_lag), and the reply's query count is used
                    # only then
                    self.probes.put(m)
                else:
                    self.inbox.put(m)
        finally:
            self.inbox.put(None)          # the worker runs what it has, then stops
            worker.join()
            self.stopped.set()
            self.probes.put(None)
            self.prober.join(60)
            self.mon.off_transition(self._listener)
            self.out.put(None)
            self.sender.join(60)
        if self.error is not None:
            raise self.error

    def _work_loop(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 - re-raised by run()
            self.error = exc
            log.exception("the monitor's detector steps failed")
        finally:
            self.stopped.set()

    def _work(self) -> None:
        mon = self.mon
        while True:
            now = time.monotonic()
            if now >= self.next_status:
                self.next_status = now + STATUS_EVERY_S
                status = (mon.ready(), mon.health())
                if status != self.status:
                    if status[0] and not self.told_resident:
                        # the clients restored at start (or held by a shared monitor): their
                        # first requests then need no round trip (sent before "ready")
                        self.told_resident = True
                        self.emit(("known", {c: (int(mon.current_level(c)),
                                                 mon.queries(c), mon.wants_probe(c))
                                             for c in mon.resident_ids()}))
                    self.status = status
                    self.emit(("status",) + status)
            try:
                msgs = [self.inbox.get(timeout=STATUS_EVERY_S)]
            except queue.Empty:
                if self.transitions:      # other servers' requests changed levels
                    self.work([])
                continue
            # what else waits (and, merging, what arrives within the merge window)
            gather(self.inbox, msgs, READ_MAX_MESSAGES, self.merge_wait, lambda m: m is None,
                   lambda: self._hurry(msgs))
            end = msgs[-1] is None
            if end:
                msgs.pop()
            taken = sum(m[0] == "observe" for m in msgs)
            if taken:     # no longer waiting to be run: the server may send more
                self.emit(("taken", taken))
            jobs: list = []
            for m in msgs:
                if m[0] == "observe":
                    jobs.append(m[1:])
                    continue
                self.work(jobs)
                jobs = []
                self.probes.join()      # flush, stats, close: after the levels asked before
                if self.control(m):
                    return
            self.work(jobs)
            if end:
                return

    def _hurry(self, msgs: list) -> bool:
        """Whether the messages read so far must run now rather than wait for more to merge
        with: one is not a request (a flush, stats or close), half of queue_limit requests
        wait (the server sends no more beyond queue_limit), or a client's requests among them
        hold more than max_lag queries (its next answer waits for them)."""
        ex = self.mon.config.execution
        items: dict[str, int] = {}
        n = 0
        for m in msgs:
            if m is None or m[0] != "observe":
                return True
            n += 1
            items[m[1]] = items.get(m[1], 0) + len(m[4])
        return 2 * n >= ex.queue_limit or any(v > ex.max_lag for v in items.values())

    def work(self, jobs: list) -> None:
        """Run the jobs through the detectors; their acknowledgement leaves once the rows the
        clients' next answers wait for are durable. It carries the level (and query count) of
        every client the jobs or any level change since the last one touched."""
        mon = self.mon
        if jobs:
            mon.run_requests([(c, rid, t, images, probs, answer, Level(lvl))
                              for c, rid, t, images, probs, answer, lvl in jobs], self.merge)
        trs = []
        while self.transitions:
            trs.append(self.transitions.popleft())
        if not jobs and not trs:
            return
        touched = list(dict.fromkeys([j[0] for j in jobs] + [tr.client for tr in trs]))
        tickets = [t for t in (mon.commit_ticket(c) for c in touched) if t is not None]
        levels = {c: (int(mon.current_level(c)), mon.queries(c)) for c in touched}
        probes = {c: mon.wants_probe(c) for c in touched}
        # the log's tickets commit in order: the last one covers the others
        self.emit(("ack", [(j[0], len(j[3])) for j in jobs], levels, probes, trs),
                  max(tickets) if tickets else None)

    def control(self, m) -> bool:
        """A request of the server; True: stop serving this connection."""
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
                # a child closes its monitor (every client checkpointed); a shared monitor
                # commits what this server sent and goes on for the others
                reply = mon.flush() if self.shared else mon.close()
            else:
                reply = ValueError(f"unknown monitor request {kind!r}")
        except Exception as exc:  # noqa: BLE001 - raised in the parent's caller
            reply = exc
        if kind == "level":
            # not behind the acknowledgements waiting for commits: the server asks a level only
            # once the client's own requests are acknowledged (beyond max_lag), and what it
            # holds of a client with requests in flight only rises with the reply
            with self.send_lock:
                try:
                    self.conn.send(("reply", token, reply))
                except (OSError, EOFError, ValueError):   # the server is gone
                    pass
        else:
            self.emit(("reply", token, reply))
        return kind == "close"
