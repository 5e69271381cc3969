"""The monitor on its own (``python -m monitor serve``) and servers connecting to it
(``[execution] mode = "process"``, ``address``): the same decisions as in one process, a wrong
key refused, a restart of either side survived, several servers sharing one monitor."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from common.clock import FakeClock
from common.types import Level
from monitor import Monitor
from monitor.log import LogUnavailable
from monitor.process import MonitorProcess, link_key
from tests.test_monitor_runtime import _answer, _cfg, _decisions, _run, _same, three_streams

ROOT = Path(__file__).resolve().parents[1]
SECRET = "remote-test-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def streams():
    return three_streams(900)


@pytest.fixture(scope="module")
def reference(streams, tmp_path_factory):
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    with Monitor(_cfg(), db, clock=FakeClock()) as mon:
        levels = _run(mon, streams)
    return _decisions(db), levels


class Served:
    """``python -m monitor serve`` in a subprocess, on a port it chose (or ``port``)."""

    def __init__(self, db: Path, port: int = 0, secret: str = SECRET, tls: Path | None = None):
        """tls: a directory of tests.certs.make_certs: serve TLS with its server.pem."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MODELGUARD_SECRET": secret}
        extra = [] if tls is None else ["--tls-cert", str(tls / "server.pem"),
                                        "--tls-key", str(tls / "server.key")]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "monitor", "--db", str(db), "serve", "--listen",
             f"127.0.0.1:{port}", *extra], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        found = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = re.search(r"listening on [\d.]+:(\d+)", line)
                if m:
                    self.port = int(m.group(1))
                    found.set()
        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            self.proc.kill()
            raise AssertionError("the monitor did not start:\n" + "".join(self.lines))

    def connect(self, secret: str = SECRET, wait: bool = True, port: int | None = None,
                tls_ca: Path | None = None) -> MonitorProcess:
        cfg = _cfg(mode="process", address=f"127.0.0.1:{port or self.port}",
                   tls_ca=str(tls_ca or ""))
        mon = MonitorProcess(cfg, clock=FakeClock(), authkey=link_key(secret))
        if wait:
            _until(mon.ready, f"connected to {self.port}")
        return mon

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def _until(cond, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.02)


def test_a_server_on_a_remote_monitor_decides_as_one_process_does(streams, reference,
                                                                  tmp_path):
    """Every request answered at the level the synchronous monitor in the server's own
    process used, every query counted before the next request, the same logged decisions;
    SIGTERM checkpoints and exits cleanly."""
    db = tmp_path / "m.db"
    served = Served(db)
    try:
        with served.connect() as mon:
            levels = _run(mon, streams, counts=True)
            mon.flush()
            assert mon.pid is None and "127.0.0.1" in repr(mon)
    finally:
        assert served.stop() == 0, "".join(served.lines[-20:])
    assert any("every client checkpointed" in ln for ln in served.lines)
    _same(_decisions(db), reference[0])
    assert levels == reference[1]


def test_a_wrong_key_is_refused_and_nothing_is_answered(streams, tmp_path):
    served = Served(tmp_path / "m.db")
    try:
        mon = served.connect(secret="another-secret-0123456789abcdef", wait=False)
        try:
            _until(lambda: "refused this server's key" in (mon.health() or ""), "refusal")
            assert not mon.ready()
            x, p = streams["natural"]
            with pytest.raises(LogUnavailable, match="same secret"):
                mon.level("a")
            with pytest.raises(LogUnavailable):
                mon.observe("a", "r", x[:3], p[:3], _answer(p[:3]), Level.NORMAL)
        finally:
            mon.close()
        _until(lambda: any("refused a connection" in ln for ln in served.lines),
               "the monitor logs the refusal")
    finally:
        served.stop()


def test_the_server_fails_closed_while_the_monitor_is_down_and_reconnects(streams, tmp_path):
    """kill -9 of the monitor: the server refuses requests (UNAVAILABLE) and says why; once
    a monitor listens there again, it reconnects by itself and goes on from what the log
    holds."""
    db = tmp_path / "m.db"
    x, p = streams["natural"]
    served = Served(db)
    port = served.port
    mon = served.connect()
    try:
        for i in range(0, 60, 20):
            mon.observe("a", f"r{i}", x[i:i + 20], p[i:i + 20], _answer(p[i:i + 20]),
                        mon.level("a"))
        mon.level("a")                   # waits for the acknowledgement of the last one
        served.kill()
        _until(lambda: "lost the connection" in (mon.health() or "")
               or "cannot reach" in (mon.health() or ""), "the loss is seen")
        assert not mon.ready()
        with pytest.raises(LogUnavailable):
            mon.level("a")
        served = Served(db, port=port)
        _until(mon.ready, "reconnected", timeout=30)
        assert mon.health() is None
        assert mon.queries("a") == 60
        mon.observe("a", "r60", x[60:80], p[60:80], _answer(p[60:80]), mon.level("a"))
        mon.flush()
        assert mon.queries("a") == 80
    finally:
        mon.close()
        served.stop()


def test_servers_share_one_monitor_and_a_restarted_server_finds_its_clients(streams,
                                                                          tmp_path):
    """Two servers on one monitor: a level one server's requests raised reaches the other
    without a request of that client through it; a server started later knows the clients
    the monitor holds without asking it."""
    served = Served(tmp_path / "m.db")
    try:
        a, b = served.connect(), served.connect()
        try:
            assert b.level("jbda") == Level.NORMAL      # b has seen the client, at NORMAL
            x, p = streams["jbda"]
            for i in range(0, 600, 30):
                a.observe("jbda", f"r{i}", x[i:i + 30], p[i:i + 30], _answer(p[i:i + 30]),
                          a.level("jbda"))
            a.flush()
            assert a.level("jbda") == Level.SWITCH
            asked = []
            real = b._asking     # every question to the monitor goes through it
            b._asking = lambda kind, *args, **kw: asked.append(kind) or real(kind, *args, **kw)
            _until(lambda: b._clients["jbda"].level == Level.SWITCH, "b hears of the change",
                   timeout=10)
            assert b.level("jbda") == Level.SWITCH and b.queries("jbda") == 600
            # linking asks for a probe after any level change: one round trip at most
            assert asked in ([], ["level"])
        finally:
            a.close()
            b.close()
        c = served.connect()
        try:
            asked = []
            real = c._asking     # every question to the monitor goes through it
            c._asking = lambda kind, *args, **kw: asked.append(kind) or real(kind, *args, **kw)
            assert c.queries("jbda") == 600 and asked == []
        finally:
            c.close()
    finally:
        assert served.stop() == 0


def test_an_unreachable_monitor_keeps_the_server_not_ready(tmp_path):
    import socket
    with socket.socket() as s:             # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(mode="process", address=f"127.0.0.1:{port}")
    with pytest.raises(ValueError, match="link key"):
        MonitorProcess(cfg)
    mon = MonitorProcess(cfg, authkey=link_key(SECRET))
    try:
        _until(lambda: "cannot reach" in (mon.health() or ""), "unreachable")
        assert not mon.ready()
        with pytest.raises(LogUnavailable, match="cannot reach the monitor at 127.0.0.1"):
            mon.level("a")
    finally:
        mon.close()


def test_a_peer_that_takes_the_connection_and_stays_silent_is_said_and_retried(
        streams, tmp_path, monkeypatch):
    """A listener that never speaks (a stalled monitor, or another service at the address):
    the link gives up on the handshake after its timeout, says so in health() and retries;
    before the timeout it waited for ever. Once linked, the same timeout no longer applies:
    an idle link outlives it (the reads of the linked connection block)."""
    import socket

    import monitor.tlslink as tlslink
    monkeypatch.setattr(tlslink, "HANDSHAKE_TIMEOUT_S", 0.5)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        cfg = _cfg(mode="process", address=f"127.0.0.1:{silent.getsockname()[1]}")
        mon = MonitorProcess(cfg, authkey=link_key(SECRET))
        try:
            _until(lambda: "did not complete the link's handshake" in (mon.health() or ""),
                   "the silent peer is said", timeout=20)
            assert not mon.ready()
            with pytest.raises(LogUnavailable, match="modelguard monitor"):
                mon.level("a")
            accepted = []      # it retries: more connections reach the listener
            silent.settimeout(10)
            for _ in range(2):
                accepted.append(silent.accept()[0])
            for c in accepted:
                c.close()
        finally:
            mon.close()
    served = Served(tmp_path / "m.db")
    try:
        with served.connect() as mon:
            time.sleep(1.5)                # idle for three handshake timeouts
            assert mon.ready() and mon.health() is None
            x, p = streams["natural"]
            assert mon.observe("a", "r0", x[:5], p[:5], _answer(p[:5]), mon.level("a")) \
                == Level.NORMAL
            assert mon.ready() and mon.health() is None
    finally:
        served.stop()


@pytest.mark.parametrize("text, ok", [("10.0.0.5:7070", True), ("monitor.internal:1", True),
                                      ("10.0.0.5", False), (":7070", False),
                                      ("host:port", False), ("host:70000", False)])
def test_the_address_is_checked_when_the_config_loads(text, ok):
    from monitor.config import ConfigError
    if ok:
        assert _cfg(mode="process", address=text).execution.address == text
    else:
        with pytest.raises(ConfigError, match="HOST:PORT"):
            _cfg(mode="process", address=text)
    with pytest.raises(ConfigError, match="needs execution.mode"):
        _cfg(mode="async", address="10.0.0.5:7070")


def test_a_connection_that_ends_leaves_nothing_registered_on_the_shared_monitor():
    """Each connection listens for level changes while it lasts; a monitor that serves
    servers for months must not keep one listener per connection it ever had."""
    import multiprocessing as mp

    from monitor.process import _Child
    with Monitor(_cfg(mode="process"), None, clock=FakeClock()) as mon:
        before = len(mon._transition_listeners)
        for _ in range(3):
            ours, theirs = mp.Pipe()
            child = _Child(theirs, mon, shared=True)
            t = threading.Thread(target=child.run)
            t.start()
            assert ours.recv()[0] == "hello"
            assert len(mon._transition_listeners) == before + 1
            ours.close()
            t.join(10)
            assert not t.is_alive()
        assert len(mon._transition_listeners) == before


def test_a_young_keys_level_is_answered_while_the_detectors_run_another_clients_step(streams):
    """A key younger than linking.probe_queries asks for its level with its images before
    every answer; that must not wait for a long detector step of another client that started
    before it (it used to: the level was read only after the step, and answered after the
    step's acknowledgement)."""
    import multiprocessing as mp

    from monitor.process import _Child
    x, p = streams["natural"]
    with Monitor(_cfg(mode="process"), None, clock=FakeClock()) as mon:
        ours, theirs = mp.Pipe()
        child = _Child(theirs, mon)
        t = threading.Thread(target=child.run)
        t.start()
        try:
            assert ours.recv()[0] == "hello"
            ours.send(("observe", "big", "r0", 1.0, x[:600], p[:600], _answer(p[:600]),
                       int(Level.NORMAL)))
            deadline = time.monotonic() + 30
            while not mon._engines.get("big") and time.monotonic() < deadline:
                time.sleep(0.001)           # the big step has started
            ours.send(("level", 7, "young", x[600:601]))
            order = []
            while len(order) < 2:
                msg = ours.recv()
                if msg[0] in ("ack", "reply"):
                    # (the big client's count moves when its step's detectors are done)
                    order.append((msg[0], mon._engines["big"].qn))
            assert order == [("reply", 0), ("ack", 600)]
        finally:
            ours.send(("close", 8))
            t.join(30)


# -- TLS on the link -----------------------------------------------------------------------------
class _Tap:
    """A TCP relay between a server and the monitor at ``port`` that keeps every byte it
    passes (what someone on the network between them would see)."""

    def __init__(self, port: int):
        import socket
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = self._srv.getsockname()[1]
        self._up = port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        while True:
            try:
                down, _ = self._srv.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self._up))
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a, b):
        try:
            while data := a.recv(65536):
                with self._lock:
                    self.seen += data
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(2)
                except OSError:
                    pass

    def close(self):
        self._srv.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from lab.certs import have_openssl, make_certs
    if not have_openssl():
        pytest.skip("needs openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tapped_run(served, streams, tls_ca=None) -> bytes:
    tap = _Tap(served.port)
    try:
        with served.connect(port=tap.port, tls_ca=tls_ca) as mon:
            levels = _run(mon, streams, upto=120, counts=True)
            mon.flush()
        return bytes(tap.seen), levels
    finally:
        tap.close()


def test_over_tls_the_link_decides_the_same_and_carries_nothing_readable(streams, reference,
                                                                        certs, tmp_path):
    """A server trusting the monitor's CA gets the same answers over TLS as over plain TCP
    and as one process; on the wire, plain TCP shows the request ids and the images' bytes,
    TLS neither."""
    x, _ = streams["natural"]
    marker = x[0].tobytes()[300:340]          # 40 bytes of one image, as pickled
    assert len(set(marker)) > 2
    plain = Served(tmp_path / "plain.db")
    try:
        wire_plain, levels_plain = _tapped_run(plain, streams)
    finally:
        plain.stop()
    db = tmp_path / "tls.db"
    served = Served(db, tls=certs)
    try:
        wire_tls, levels_tls = _tapped_run(served, streams, tls_ca=certs / "ca.pem")
    finally:
        assert served.stop() == 0, "".join(served.lines[-20:])
    assert any("(TLS;" in ln for ln in served.lines)
    assert levels_tls == levels_plain == {c: v[:len(levels_tls[c])]
                                          for c, v in reference[1].items()}
    assert b"natural-0" in wire_plain and marker in wire_plain
    assert len(wire_tls) > 100_000                # the images did cross, encrypted
    assert b"natural-0" not in wire_tls and marker not in wire_tls


def test_tls_refuses_an_untrusted_monitor_and_a_plaintext_server(streams, certs, tmp_path):
    """A server trusting another CA, or one speaking plain TCP, is not served by a TLS monitor
    (nothing answered, health says why); a TLS server cannot use a plain monitor either."""
    served = Served(tmp_path / "m.db", tls=certs)
    try:
        mon = served.connect(wait=False, tls_ca=certs / "other-ca.pem")
        try:
            _until(lambda: "does not trust" in (mon.health() or ""), "untrusted refusal")
            assert "tls_ca" in mon.health() and not mon.ready()
            with pytest.raises(LogUnavailable):
                mon.level("a")
        finally:
            mon.close()
        mon = served.connect(wait=False)          # plain TCP to the TLS monitor
        try:
            time.sleep(2.0)
            assert not mon.ready()
            with pytest.raises(LogUnavailable):
                mon.level("a")
        finally:
            mon.close()
    finally:
        served.stop()
    plain = Served(tmp_path / "p.db")
    try:
        mon = plain.connect(wait=False, tls_ca=certs / "ca.pem")
        try:
            _until(lambda: "TLS handshake" in (mon.health() or ""), "TLS to a plain monitor")
            assert not mon.ready()
        finally:
            mon.close()
    finally:
        plain.stop()


def test_tls_files_that_cannot_be_used_are_said_at_start(certs, tmp_path, capsys):
    from monitor.cli import main as monitor_main
    from monitor.config import ConfigError
    from monitor.tlslink import TLSConfigError
    with pytest.raises(TLSConfigError, match="CA bundle"):
        MonitorProcess(_cfg(mode="process", address="127.0.0.1:9",
                            tls_ca=str(tmp_path / "missing.pem")), authkey=b"k")
    with pytest.raises(ConfigError, match="tls_ca is for a monitor at"):
        _cfg(mode="process", tls_ca=str(certs / "ca.pem"))
    for args, why in ((["--tls-cert", str(certs / "server.pem")], "go together"),
                      (["--tls-cert", str(certs / "server.pem"), "--tls-key",
                        str(certs / "client.key")], "cannot use the certificate")):
        assert monitor_main(["--db", str(tmp_path / "m.db"), "serve", "--listen",
                             "127.0.0.1:0", *args]) == 2
        assert why in capsys.readouterr().err


def test_level_steps_wait_for_the_monitors_reply_on_no_thread_and_fail_when_it_is_lost(
        streams, tmp_path):
    """A process monitor's level as steps (``serve --aio``): asking the monitor is a future the
    link's receiving thread completes, so an event loop awaits it with no thread of its own;
    a monitor lost while a reply is awaited fails it at once (LogUnavailable), not after the
    reply timeout."""
    import asyncio

    from common.steps import run_steps_async

    class NoThreads:
        def submit(self, *a, **k):
            raise AssertionError("a step went to a thread")

    x, _ = streams["natural"]
    mon = MonitorProcess(_cfg(mode="process"), tmp_path / "m.db", clock=FakeClock())
    try:
        steps = mon.level_steps("a", x[:1])
        step = steps.send(None)
        reply = step.future.result(30)          # delivered by the link's thread: nobody asked
        with pytest.raises(StopIteration) as done:
            steps.send(reply)
        assert done.value.value == Level.NORMAL
        assert asyncio.run(run_steps_async(mon.level_steps("b", x[1:2]), NoThreads())) \
            == Level.NORMAL
        os.kill(mon.pid, signal.SIGSTOP)        # the next question stays unanswered...
        step = mon.level_steps("c", x[2:3]).send(None)
        time.sleep(0.2)
        assert not step.future.done()
        t0 = time.monotonic()
        os.kill(mon.pid, signal.SIGKILL)        # ...until the monitor is gone
        with pytest.raises(LogUnavailable, match="exited"):
            step.run()
        assert time.monotonic() - t0 < 10
    finally:
        mon.close()


def test_observe_steps_hand_out_a_step_instead_of_blocking_while_the_queue_is_full(streams,
                                                                                    tmp_path):
    """A process monitor's observe is a send; while ``queue_limit`` requests wait for the
    monitor, observe waits for room, so as steps it is then one Blocking step (an event loop
    would otherwise wait in place). Once the monitor moves again the step completes."""
    from common.steps import Blocking

    x, p = streams["natural"]
    mon = MonitorProcess(_cfg(mode="process", queue_limit=2), tmp_path / "m.db",
                         clock=FakeClock())
    try:
        lvl = mon.level("a", x[:1])
        os.kill(mon.pid, signal.SIGSTOP)            # nothing is acknowledged meanwhile
        for i in range(2):
            steps = mon.observe_steps("a", f"r{i}", x[i:i + 1], p[i:i + 1],
                                      _answer(p[i:i + 1]), lvl)
            with pytest.raises(StopIteration):
                steps.send(None)                    # sent in place
        steps = mon.observe_steps("a", "r2", x[2:3], p[2:3], _answer(p[2:3]), lvl)
        step = steps.send(None)
        assert isinstance(step, Blocking)
        os.kill(mon.pid, signal.SIGCONT)
        with pytest.raises(StopIteration):
            steps.send(step.run())
        mon.flush()
        assert mon.queries("a") == 3
    finally:
        os.kill(mon.pid, signal.SIGCONT)
        mon.close()
