"""The monitor's log under failure and its durability modes: a full disk is waited out with
nothing lost (fail-closed refuses answers meanwhile, fail-open answers with a bounded queue), an
answer in "commit" mode is on disk when it returns, in "fast" mode no client is answered at a
level whose transition is not on disk, retention and the size cap keep the ownership proof."""
from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.config import config_from_dict
from monitor.log import Batch, LogUnavailable, Writer


def _cfg(**log):
    base = load_config().model_dump(mode="python")
    base["log"].update(log)
    base["policies"] = {k.name.lower(): v for k, v in base["policies"].items()}
    return config_from_dict(base)


def _near_copies(n: int, seed: int = 0) -> np.ndarray:
    """A JBDA-like stream: 50 random seeds, then signed steps of 0.1 around them (escalates)."""
    rng = np.random.default_rng(seed)
    cur = [rng.random((50, 28, 28), np.float32)]
    while sum(len(c) for c in cur) < n:
        x = np.concatenate(cur)
        cur.append(np.clip(x + 0.1 * np.sign(rng.standard_normal(x.shape)), 0, 1))
    return np.concatenate(cur)[:n].astype(np.float32)


def _probs(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lg = rng.normal(0, 1, (n, 10))
    lg[np.arange(n), rng.integers(0, 10, n)] += 10.0
    return (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)


def _observe(mon, client, x, p):
    lvl = mon.level(client)
    return mon.observe(client, "r", x, p, Answer(p.argmax(1), p, AnswerKind.PROBABILITIES), lvl)


def _slow_disk(monkeypatch, seconds: float) -> None:
    """A slow disk: every write of the log's writer takes ``seconds`` longer."""
    slow = Writer._write

    def slow_write(self, items):
        time.sleep(seconds)
        return slow(self, items)

    monkeypatch.setattr(Writer, "_write", slow_write)


def _logged(reader, client: str) -> int:
    """The client's last query number on disk (0: none)."""
    return reader.execute("SELECT coalesce(max(qn0 + n), 0) FROM requests WHERE client = ?",
                          (client,)).fetchone()[0]


def _fill_disk(mon) -> None:
    """Simulate a full disk: the writer's database may not grow by another page."""
    con = mon.store._writer.con
    n = con.execute("PRAGMA page_count").fetchone()[0]
    con.execute(f"PRAGMA max_page_count={n}")


def _free_disk(mon) -> None:
    mon.store._writer.con.execute("PRAGMA max_page_count=1073741823")


def _wait(pred, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _logged_items(db, client) -> int:
    with QueryLog(db) as q:
        return q.max_qn(client)


def test_full_disk_fail_closed_refuses_then_recovers_with_nothing_lost(tmp_path):
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(on_failure="closed", commit_timeout_seconds=0.5), db, clock=FakeClock())
    x, p = _near_copies(120), _probs(120)
    for i in range(0, 40, 10):
        _observe(mon, "a", x[i:i + 10], p[i:i + 10])
    assert mon.ready() and mon.health() is None
    _fill_disk(mon)
    with pytest.raises(LogUnavailable, match="did not commit"):   # not durable: no answer
        _observe(mon, "a", x[40:50], p[40:50])
    assert _wait(lambda: mon.health() is not None)
    assert "full" in mon.health() and not mon.ready()
    with pytest.raises(LogUnavailable, match="cannot be written"):
        mon.level("a")                                  # fail-closed: refused before answering
    with pytest.raises(LogUnavailable):
        mon.level("someone-else")
    _free_disk(mon)
    assert _wait(lambda: mon.health() is None), "the writer did not recover by itself"
    assert mon.ready()
    for i in range(50, 120, 10):
        _observe(mon, "a", x[i:i + 10], p[i:i + 10])
    mon.flush()
    # the refused request's row stayed queued and was written on recovery: nothing lost
    assert _logged_items(db, "a") == 120
    mon.close()


def test_full_disk_fail_open_answers_and_bounds_the_queue(tmp_path):
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(on_failure="open", max_queue=5, commit_timeout_seconds=5.0), db,
                  clock=FakeClock())
    x, p = _near_copies(300), _probs(300)
    _observe(mon, "a", x[:10], p[:10])
    _fill_disk(mon)
    assert _wait(lambda: _observe(mon, "b", x[:1], p[:1]) is not None and
                 mon.health() is not None)
    t0 = time.monotonic()
    levels = [_observe(mon, "a", x[i:i + 10], p[i:i + 10]) for i in range(10, 300, 10)]
    assert time.monotonic() - t0 < 3.0     # answered without waiting for the commit timeout
    assert mon.ready()                     # fail-open keeps serving
    assert max(levels) > Level.NORMAL      # the detectors keep running in memory
    stats = mon.stats()
    assert stats["log_failing"] == 1 and stats["log_dropped"] > 0
    queued_rows = sum(isinstance(it, Batch) for _, it in list(mon.store._writer.q.queue))
    assert queued_rows <= 5        # request rows beyond log.max_queue were dropped, not held
    _free_disk(mon)
    assert _wait(lambda: mon.health() is None)
    mon.close()


def test_commit_mode_answer_is_on_disk_when_it_returns(tmp_path):
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(durability="commit", flush_seconds=1.0), db, clock=FakeClock())
    x, p = _near_copies(400), _probs(400)
    reader = sqlite3.connect(db)
    escalated_at = None
    for i in range(0, 400, 20):
        after = _observe(mon, "a", x[i:i + 20], p[i:i + 20])
        logged = _logged(reader, "a")
        assert logged == i + 20, f"request ending at {i + 20} answered before its row"
        if after > Level.NORMAL and escalated_at is None:
            escalated_at = i + 20
            assert reader.execute("SELECT count(*) FROM transitions WHERE client='a'"
                                  ).fetchone()[0] >= 1
    assert escalated_at is not None
    reader.close()
    mon.close()


def test_commit_mode_without_waiting_leaves_the_wait_to_wait_durable(tmp_path, monkeypatch):
    """observe(wait=False) returns before its row is on disk (a slow disk); wait_durable then
    returns only once it is, as observe() itself would have (the data plane computes under
    its compute slot and waits outside it)."""
    _slow_disk(monkeypatch, 0.2)
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(durability="commit"), db, clock=FakeClock())
    x, p = _near_copies(60), _probs(60)
    reader = sqlite3.connect(db)
    for i in range(0, 60, 20):
        mon.observe("a", f"r{i}", x[i:i + 20], p[i:i + 20],
                    Answer(p[i:i + 20].argmax(1), p[i:i + 20], AnswerKind.PROBABILITIES),
                    mon.level("a"), wait=False)
        assert _logged(reader, "a") == i, "observe(wait=False) waited for the commit"
        mon.wait_durable("a")
        assert _logged(reader, "a") == i + 20, "wait_durable returned before the row was on disk"
    reader.close()
    mon.close()


def test_fast_mode_never_answers_at_an_uncommitted_level(tmp_path, monkeypatch):
    """A slow disk: "fast" answers do not wait for their rows, but the first answer at a raised
    level waits until the transition that raised it is on disk."""
    _slow_disk(monkeypatch, 0.15)
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(durability="fast"), db, clock=FakeClock())
    x, p = _near_copies(600), _probs(600)
    reader = sqlite3.connect(db)
    ahead = 0      # answers returned before their own row was on disk
    raised = None
    for i in range(0, 600, 20):
        after = _observe(mon, "a", x[i:i + 20], p[i:i + 20])
        logged = _logged(reader, "a")
        ahead += logged < i + 20
        if after > Level.NORMAL:
            raised = after
            break
    assert raised is not None and ahead > 0
    lvl = mon.level("a")          # the next answer at the raised level...
    assert lvl == raised
    top = reader.execute("SELECT max(to_level) FROM transitions WHERE client='a'").fetchone()[0]
    assert top == int(raised)     # ...is given only once its transition is on disk
    reader.close()
    mon.close()


def _batch(client, qn0, t, watermarked=False, n=4):
    x = np.random.default_rng(qn0).random((n, 28, 28), np.float32)
    p = _probs(n, qn0)
    wm = np.zeros(n, bool)
    wm[0] = watermarked
    return Batch(client, qn0, t, "r", x, np.zeros(n, bool), p, 0, int(AnswerKind.PROBABILITIES),
                 p.argmax(1), p.max(1), [], wm, np.full((n, 5), np.nan), np.zeros(n, int),
                 np.zeros(n, int), True)


def test_retention_deletes_old_rows_but_keeps_watermark_records(tmp_path):
    db = tmp_path / "m.db"
    day = 86400.0
    w = Writer(db, retention_days=2.0)
    w.put(_batch("a", 0, 1e9))                        # 10 days before the newest: deleted
    w.put(_batch("a", 4, 1e9, watermarked=True))      # as old, but holds the proof: kept
    w.put(_batch("a", 8, 1e9 + 9 * day))              # within 2 days of the newest: kept
    w.put(_batch("a", 12, 1e9 + 10 * day))
    w.flush()
    w._last_retention = float("-inf")
    w._housekeeping()
    w.close()
    with QueryLog(db) as q:
        kept = [r[0] for r in q.con.execute("SELECT qn0 FROM requests ORDER BY qn0")]
        n_wm = len(q.watermark_records("a")[1])
    assert kept == [4, 8, 12] and n_wm == 1


def test_size_cap_deletes_the_oldest_rows_first(tmp_path):
    db = tmp_path / "m.db"
    w = Writer(db, max_mb=0.25)
    for k in range(60):            # ~25 KB of inputs per row: ~1.5 MB in all
        w.put(_batch("a", 8 * k, 1e9 + k, watermarked=(k == 0), n=8))
    w.flush()
    w._last_cap = float("-inf")
    w._housekeeping()
    used = w._used_bytes()
    w.close()
    with QueryLog(db) as q:
        kept = [r[0] for r in q.con.execute("SELECT qn0 FROM requests ORDER BY qn0")]
    assert used <= 0.25 * 2 ** 20
    assert 0 in kept                         # the watermark record outlives the others
    assert kept[-1] == 8 * 59                # the newest rows stay
    assert len(kept) < 30                    # the oldest went
    assert kept[1:] == sorted(kept[1:]) and kept[1] > 8


def test_unwritable_log_path_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LogUnavailable, match=str(blocker)):
        Writer(blocker / "sub" / "monitor.db")


def test_readers_open_a_log_without_writing_to_it(tmp_path):
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(), db, clock=FakeClock())
    x, p = _near_copies(40), _probs(40)
    _observe(mon, "a", x, p)
    mon.close()
    before = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    with QueryLog(db) as q:
        assert q.max_qn("a") == 40
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            q.con.execute("DELETE FROM requests")
    after = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    assert after.get("m.db") == before["m.db"]


def test_server_on_a_full_disk_answers_unavailable_goes_not_serving_and_recovers(
        small_target, tmp_path):
    """Through gRPC: a full disk turns Predict into UNAVAILABLE and health into NOT_SERVING;
    once space returns the server serves again by itself and every acknowledged image is in
    the log."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from client.api import ApiError, ModelClient
    from common import data
    from tests.conftest import start_server

    server, plane, db = start_server(small_target[0], tmp_path)
    x = data.attack_pool().x[:32]
    ch = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(ch)

    def status():
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status

    acked = 0
    try:
        with ModelClient(server.address, "disk-user") as c:
            c.predict(x)
            acked += len(x)
            # a server just started says NOT_SERVING until its monitor has restored the
            # clients' state, and its health watcher notices the end within a tick (0.1 s)
            assert _wait(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            _fill_disk(plane.monitor)
            codes = []
            for _ in range(3):
                try:
                    c.predict(x)
                    acked += len(x)
                except ApiError as exc:
                    codes.append(exc.code)
            assert codes and set(codes) == {grpc.StatusCode.UNAVAILABLE}, codes
            assert _wait(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
            _free_disk(plane.monitor)
            assert _wait(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
            c.predict(x)
            acked += len(x)
        plane.monitor.flush()
        cid = server.client_id("disk-user")
        assert _logged_items(db, cid) >= acked
    finally:
        ch.close()
        server.stop(0.5)


def test_close_right_after_answers_that_did_not_wait_for_their_commit(tmp_path, monkeypatch):
    """A monitor closed while its last rows are still queued (observe(wait=False), as a server
    stopping with answers in flight): close() returns promptly, the rows are written, and the
    closing checkpoint, which waits for them, is stored. Before the fix the stop marker (ticket
    0) ended the writer's last batch, so ``committed`` stayed below those rows' tickets: the
    checkpoint writer either waited forever or failed with "stopped before the requests"."""
    import threading

    _slow_disk(monkeypatch, 0.05)          # the rows are still queued when close() starts
    for trial in range(3):
        db = tmp_path / f"m{trial}.db"
        mon = Monitor(load_config(None), db)
        x, p = _near_copies(6, seed=trial), _probs(6, seed=trial)
        lvl = mon.level("c")
        for i in range(0, 6, 2):
            mon.observe("c", f"r{i}", x[i:i + 2], p[i:i + 2],
                        Answer(p[i:i + 2].argmax(1), p[i:i + 2], AnswerKind.PROBABILITIES),
                        lvl, wait=False)
        errors = []

        def close():
            try:
                mon.close()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        th = threading.Thread(target=close, daemon=True)
        th.start()
        th.join(30)
        assert not th.is_alive(), "close() hung"
        assert errors == []
        assert _logged_items(db, "c") == 6
        with Monitor(load_config(None), db) as again:
            assert again.store.load_state("c")["qn"] == 6
