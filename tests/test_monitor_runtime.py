"""Monitor runtime: eviction with checkpoints, crash recovery from the last checkpoint, async mode.
Each compares against an uninterrupted synchronous run of the same stream: the decisions must be
the same, whatever the runtime did to memory and threads."""
from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.log import SCORE_COLUMNS, recent_clients_of
from tests.streams import three_streams


def _cfg(**execution):
    return load_config().with_changes(execution=execution)


@pytest.fixture(scope="module")
def streams():
    """Three clients: natural images, JBDA-like near-copies (escalates), MNIST (OOD)."""
    return three_streams(900)


def _answer(p):
    return Answer(p.argmax(1), p, AnswerKind.PROBABILITIES)


def _run(mon, streams, batch=30, upto=900, start=0, counts=False):
    """Interleave the clients request by request (the order a busy server sees). Returns, per
    client, the level each request was answered at (what the data plane asks before answering).
    counts: also check that the monitor counts every query sent before each request."""
    out = {c: [] for c in streams}
    for i in range(start, upto, batch):
        for c, (x, p) in streams.items():
            lvl = mon.level(c)
            if counts:
                assert mon.queries(c) == i, (c, i)
            out[c].append(lvl)
            mon.observe(c, f"{c}-{i}", x[i:i + batch], p[i:i + batch], _answer(p[i:i + batch]),
                        lvl)
    return out


def _decisions(db):
    with QueryLog(db) as q:
        res = {}
        for c in q.client_ids():
            s = q.series(c)
            res[c] = (np.column_stack([s[k] for k in SCORE_COLUMNS] + [s["fired"],
                                                                       s["level_after"]]),
                      [(t["qn"], t["from_level"], t["to_level"], t["rule"])
                       for t in q.transitions(c)])
        return res


def _same(a, b):
    assert a.keys() == b.keys()
    for c in a:
        np.testing.assert_array_equal(a[c][0], b[c][0], err_msg=c)
        assert a[c][1] == b[c][1], c


def _within_lag(levels, streams, requests):
    """Each request (of 10 queries) was answered at a level the synchronous monitor had reached
    at most ``requests`` requests earlier, never above the level it had reached by then; the
    attacker did escalate."""
    with Monitor(_cfg(), None, clock=FakeClock()) as ref:
        sync_levels = _run(ref, streams, batch=10)
    for c in streams:
        for i, lvl in enumerate(levels[c]):
            assert sync_levels[c][max(0, i - requests)] <= lvl <= sync_levels[c][i], (c, i)
    assert levels["jbda"][-1] > Level.NORMAL


@pytest.fixture(scope="module")
def reference(streams, tmp_path_factory):
    db = tmp_path_factory.mktemp("ref") / "m.db"
    with Monitor(_cfg(), db, clock=FakeClock()) as mon:
        _run(mon, streams)
    dec = _decisions(db)
    assert dec["jbda"][1] and dec["mnist"][1] and not dec["natural"][1]  # the streams do differ
    return dec


def test_eviction_checkpoints_and_restores_exactly(streams, reference, tmp_path):
    db = tmp_path / "m.db"
    with Monitor(_cfg(max_clients=1, checkpoint_every=100000), db, clock=FakeClock()) as mon:
        _run(mon, streams)
        mon.flush()
        assert mon.resident_clients() == 1  # the others were checkpointed and dropped
    _same(_decisions(db), reference)


def test_memory_budget_evicts_by_state_size_and_restores_exactly(streams, reference,
                                                                   tmp_path):
    db = tmp_path / "m.db"
    budget_mb = 1.0     # a client's state passes 1 MB after a few hundred queries
    peak = 0
    with Monitor(_cfg(max_clients=100, max_state_mb=budget_mb, checkpoint_every=100000), db,
                 clock=FakeClock()) as mon:
        for i in range(0, 900, 30):
            for c, (x, p) in streams.items():
                lvl = mon.level(c)
                mon.observe(c, f"{c}-{i}", x[i:i + 30], p[i:i + 30], _answer(p[i:i + 30]), lvl)
                peak = max(peak, mon.resident_bytes())
                # at most the budget, or one client alone (the one being served is kept)
                assert mon.resident_bytes() <= budget_mb * 2 ** 20 or \
                    len(mon._engines) == 1, (i, c, mon.resident_bytes())
        mon.flush()
        assert mon.resident_clients() < len(streams)   # evicted by size, not by count
    assert peak > 0.5 * 2 ** 20
    _same(_decisions(db), reference)


def test_rss_cap_lowers_the_state_budget_evicts_and_restores_exactly(streams, reference,
                                                                      tmp_path, caplog):
    """execution.max_rss_mb: the server reports its RSS; what is not client state counts
    against the cap, and the state budget is what is left of 90% of it."""
    mb = 2 ** 20
    other = 88 * mb     # model, buffers...: leaves 90 - 88 = 2 MB of a 100 MB cap for state
    db = tmp_path / "m.db"
    with Monitor(_cfg(max_clients=100, max_state_mb=2048, max_rss_mb=100,
                      checkpoint_every=100000), db, clock=FakeClock()) as mon:
        evicted, now, spike = 0, 0.0, None
        for i in range(0, 900, 30):
            for c, (x, p) in streams.items():
                lvl = mon.level(c)
                mon.observe(c, f"{c}-{i}", x[i:i + 30], p[i:i + 30], _answer(p[i:i + 30]), lvl)
                now += 0.1
                # a request in flight once took 1 MB more: the budget remembers it for 10 s
                extra = 0
                if (i, c) == (600, "jbda"):
                    extra, spike = mb, now
                evicted += mon.fit_memory(other + extra + mon.resident_bytes(), now)
                limit = mb if spike is not None and now - spike < 9.95 else 2 * mb
                assert mon.resident_bytes() <= limit, (i, c, mon.resident_bytes())
                assert mon.stats()["state_budget_bytes"] <= limit
        assert evicted > 0
        mon.flush()
        # the rest of the process shrinks: the budget comes back, 5% of the cap per reading
        budgets = []
        now += 10.0      # the peaks seen are forgotten after 10 s
        for _ in range(4):
            now += 0.1
            mon.fit_memory(10 * mb + mon.resident_bytes(), now)
            budgets.append(mon.stats()["state_budget_bytes"])
        assert budgets == sorted(budgets) and budgets[0] <= 7 * mb + 1
        assert budgets[-1] > 2 * mb
        # more than 90% of the cap outside client state: every idle client goes, with a warning
        caplog.set_level(logging.WARNING, logger="modelguard.monitor")
        mon.fit_memory(95 * mb + mon.resident_bytes(), now + 0.1)
        assert mon.resident_bytes() == 0
        assert any("max_rss_mb" in r.getMessage() for r in caplog.records)
    _same(_decisions(db), reference)


def test_restart_after_a_crash_replays_only_since_the_last_checkpoint(streams, reference,
                                                                      tmp_path, caplog):
    db = tmp_path / "m.db"
    clock = FakeClock()
    mon = Monitor(_cfg(checkpoint_every=200), db, clock=clock)
    _run(mon, streams, upto=420)
    mon.flush()                # the checkpoints due at 420 are written (by a background thread)
    _run(mon, streams, start=420, upto=510)
    mon.flush()                # what was logged is on disk; then the process "dies": no close(),
    mon._closed = True         # no final checkpoint (the writer thread is simply abandoned)
    caplog.set_level(logging.INFO, logger="modelguard.monitor")
    with Monitor(_cfg(checkpoint_every=200), db, clock=clock) as mon2:
        _run(mon2, streams, start=510)
    replays = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
    assert len(replays) == 3
    for msg in replays:  # from the last checkpoint (420) up to 510: nothing before it
        assert "queries 421..510" in msg, msg
    _same(_decisions(db), reference)


def test_async_mode_decides_the_same_and_applies_levels_from_the_next_request(streams,
                                                                             reference, tmp_path):
    db = tmp_path / "m.db"
    with Monitor(_cfg(mode="async"), db, clock=FakeClock()) as mon:
        levels = _run(mon, streams)
        mon.flush()
        assert mon.level("jbda") > Level.NORMAL
    _same(_decisions(db), reference)
    # every request is answered at the level the synchronous monitor would have used: the
    # answer did not wait for its own detectors, the client's next request waited for them
    with Monitor(_cfg(), None, clock=FakeClock()) as ref:
        sync_levels = _run(ref, streams)
    assert levels == sync_levels
    assert levels["jbda"][0] == Level.NORMAL and levels["jbda"][-1] > Level.NORMAL


def test_async_lag_merges_waiting_requests_with_the_same_decisions(streams, reference,
                                                                   tmp_path, monkeypatch):
    """execution.max_lag: requests of a client that wait together run as one detector step and
    one log row; every item's scores and every transition are those of the synchronous run,
    replay of the merged log reproduces them, and no answer lags more than max_lag queries."""
    from monitor.replay import replay
    real = Monitor._run_step
    slow = {"n": 0}

    def run_step(self, jobs):          # the worker falls behind now and then: requests queue
        slow["n"] += 1
        if slow["n"] % 10 == 1:
            time.sleep(0.3)
        return real(self, jobs)

    monkeypatch.setattr(Monitor, "_run_step", run_step)
    db = tmp_path / "m.db"
    cfg = _cfg(mode="async", max_lag=90)
    with Monitor(cfg, db, clock=FakeClock()) as mon:
        levels = _run(mon, streams, batch=10, counts=True)   # the watermark's knee reads it
        mon.flush()
    _same(_decisions(db), reference)
    with QueryLog(db) as q:
        rows = list(q.requests("jbda"))
        merged = [n for n in (len(x) for _, _, x, _ in rows) if n > 10]
        assert merged and max(merged) <= 100           # merged, within max_lag + one request
        assert len(rows) < 90
    for c, trs in replay(db, cfg, list(streams)).items():
        assert [(t.qn, int(t.to_level)) for t in trs["transitions"]] == \
            [(qn, to) for qn, _, to, _ in reference[c][1]], c
    # each request is answered at a level the synchronous monitor reached at most 90 queries
    # (9 requests of 10) earlier, never higher than the level it had reached by then
    _within_lag(levels, streams, 9)


def test_async_lag_with_eviction_decides_the_same(streams, reference, tmp_path):
    """Merged steps and eviction together: one client resident at a time (every switch
    checkpoints and restores), up to 90 queries of lag: the same per-item decisions."""
    db = tmp_path / "m.db"
    with Monitor(_cfg(mode="async", max_lag=90, max_clients=1, checkpoint_every=100000), db,
                 clock=FakeClock()) as mon:
        _run(mon, streams, batch=10, counts=True)
        mon.flush()
        assert mon.resident_clients() == 1
    _same(_decisions(db), reference)


def _paced(mon, client, x, p, sizes, gap_s):
    """Requests of ``sizes`` items of one client, ``gap_s`` apart (answered at the level the
    monitor gives); returns the seconds they took in all."""
    t0 = time.monotonic()
    i = 0
    for n in sizes:
        lvl = mon.level(client)
        mon.observe(client, f"{client}-{i}", x[i:i + n], p[i:i + n], _answer(p[i:i + n]), lvl)
        i += n
        if gap_s:
            time.sleep(gap_s)
    return time.monotonic() - t0


def _rows(db, client):
    with QueryLog(db) as q:
        return [len(x) for _, _, x, _ in q.requests(client)]


@pytest.mark.parametrize("wait_ms, merged", [(0, False), (2000, True)])
def test_lag_merge_window_merges_requests_that_arrive_apart(streams, tmp_path, wait_ms,
                                                            merged):
    """execution.merge_wait_ms: with a lag, the detectors wait that long for more of a
    client's requests, so single-item requests 50 ms apart (each step takes a few ms: without
    the window every one ran alone) run as one step and one row, with the decisions of the
    requests one by one."""
    x, p = streams["jbda"]
    db = tmp_path / "m.db"
    cfg = _cfg(mode="async", max_lag=64, merge_wait_ms=wait_ms)
    with Monitor(cfg, db, clock=FakeClock()) as mon:
        _paced(mon, "warm", x, p, [1], 0)            # (first-call costs out of the way)
        mon.flush()
        _paced(mon, "c", x, p, [1] * 10, 0.05)
        mon.flush()
    rows = _rows(db, "c")
    assert sum(rows) == 10
    if merged:
        assert len(rows) <= 2, rows
    else:
        assert len(rows) >= 8, rows
    ref_db = tmp_path / "ref.db"
    with Monitor(_cfg(), ref_db, clock=FakeClock()) as ref:
        _paced(ref, "warm", x, p, [1], 0)
        _paced(ref, "c", x, p, [1] * 10, 0)
    _same({"c": _decisions(db)["c"]}, {"c": _decisions(ref_db)["c"]})


def test_lag_merge_window_never_holds_a_client_that_waits(streams, tmp_path):
    """The window ends as soon as a client's queued queries pass max_lag (its next answer waits
    for them): requests of 3 items with max_lag 4 and a 5 s window do not wait 5 s each."""
    x, p = streams["natural"]
    db = tmp_path / "m.db"
    with Monitor(_cfg(mode="async", max_lag=4, merge_wait_ms=5000), db,
                 clock=FakeClock()) as mon:
        took = _paced(mon, "c", x, p, [3] * 8, 0)
        mon.flush()
    assert took < 4.0, took
    assert sum(_rows(db, "c")) == 24


def test_process_mode_decides_the_same_and_applies_levels_from_the_next_request(streams,
                                                                               reference,
                                                                               tmp_path):
    """The monitor in a child process: every request answered at the level the synchronous
    monitor used, every query counted before the next request, the same per-item decisions."""
    from monitor.process import MonitorProcess
    db = tmp_path / "m.db"
    seen = []
    with MonitorProcess(_cfg(mode="process"), db, clock=FakeClock()) as mon:
        mon.on_transition(seen.append)
        levels = _run(mon, streams, counts=True)
        mon.flush()
        assert mon.level("jbda") > Level.NORMAL and mon.ready()
        assert mon.stats()["resident_clients"] == 3
    _same(_decisions(db), reference)
    with Monitor(_cfg(), None, clock=FakeClock()) as ref:
        sync_levels = _run(ref, streams)
    assert levels == sync_levels
    assert sorted((t.client, t.qn) for t in seen) == \
        sorted((c, qn) for c in reference for qn, *_ in reference[c][1])


def test_process_mode_with_lag_decides_the_same_within_the_lag(streams, reference, tmp_path):
    """max_lag in process mode: answers run ahead of the child by at most 90 queries, never
    above the level the synchronous monitor had reached; the logged decisions are the
    synchronous run's (consecutive waiting requests merged or not)."""
    from monitor.process import MonitorProcess
    db = tmp_path / "m.db"
    with MonitorProcess(_cfg(mode="process", max_lag=90), db, clock=FakeClock()) as mon:
        levels = _run(mon, streams, batch=10, counts=True)
        mon.flush()
    _same(_decisions(db), reference)
    _within_lag(levels, streams, 9)


def test_process_mode_merge_window_merges_and_never_holds_a_client_that_waits(streams,
                                                                             tmp_path):
    """The child's merge window (execution.merge_wait_ms, with max_lag): single-item requests
    50 ms apart run as one step and one row; requests whose queries pass max_lag end the window
    at once (a 3 s window, 6 requests of 5 items with max_lag 8: no 3 s waits)."""
    from monitor.process import MonitorProcess
    x, p = streams["natural"]
    db = tmp_path / "m.db"
    with MonitorProcess(_cfg(mode="process", max_lag=8, merge_wait_ms=3000), db,
                        clock=FakeClock()) as mon:
        _paced(mon, "a", x, p, [1] * 6, 0.05)
        mon.flush()
        took = _paced(mon, "b", x, p, [5] * 6, 0)
        mon.flush()
    assert took < 2.5, took
    rows = _rows(db, "a")
    assert sum(rows) == 6 and len(rows) <= 2, rows
    assert sum(_rows(db, "b")) == 30


def test_process_mode_fails_closed_when_the_child_dies(streams, tmp_path):
    """kill -9 of the monitor's process: every request is refused (LogUnavailable, which the
    service answers as UNAVAILABLE), health says why; a new monitor on the same log restores
    every query the dead one acknowledged."""
    import os
    import signal

    from monitor.log import LogUnavailable
    from monitor.process import MonitorProcess
    db = tmp_path / "m.db"
    x, p = streams["natural"]
    mon = MonitorProcess(_cfg(mode="process"), db, clock=FakeClock())
    try:
        for i in range(0, 60, 20):
            mon.observe("a", f"r{i}", x[i:i + 20], p[i:i + 20], _answer(p[i:i + 20]),
                        mon.level("a"))
        assert mon.level("a") == Level.NORMAL and mon.queries("a") == 60
        os.kill(mon.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while mon.health() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "exited" in (mon.health() or "") and not mon.ready()
        with pytest.raises(LogUnavailable, match="monitor process exited"):
            mon.level("a")
        with pytest.raises(LogUnavailable):
            mon.observe("a", "late", x[:1], p[:1], _answer(p[:1]), Level.NORMAL)
    finally:
        mon.close()
    with Monitor(_cfg(), db, clock=FakeClock()) as again:
        assert again.queries("a") == 60


_KILLED_SERVER = """
import os, signal, sys
import numpy as np
from common.types import Answer, AnswerKind
from monitor import load_config
from monitor.process import MonitorProcess

if __name__ == "__main__":
    rng = np.random.default_rng(0)
    cfg = load_config().with_changes(execution={"mode": "process", "max_lag": 100000})
    mon = MonitorProcess(cfg, sys.argv[1])
    while not mon.ready():
        pass
    # a large request keeps the monitor busy while 15 small ones fill the pipe's buffer, and
    # the server dies before it reads them: they and the pipe's end arrive together
    for i, n in enumerate([512] + [1] * 15):
        x = (rng.integers(0, 256, (n, 28, 28)) / 255).astype(np.float32)
        p = np.full((n, 10), 0.1, np.float32)
        mon.observe("c0", f"r{i}", x, p, Answer(p.argmax(1), p, AnswerKind.PROBABILITIES),
                    mon.level("c0"))
    print(mon.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_process_mode_kill_9_of_the_server_loses_nothing_it_sent(tmp_path):
    """SIGKILL of the serving process: the monitor's process reads what is left in the pipe,
    logs it, checkpoints and exits by itself (every request answered was sent before its
    answer, so none answered goes unlogged)."""
    import subprocess
    import sys
    from pathlib import Path

    db = tmp_path / "m.db"
    script = tmp_path / "killed_server.py"
    script.write_text(_KILLED_SERVER)
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(script), str(db)], capture_output=True, text=True,
                       timeout=120, cwd=root, env={**__import__("os").environ,
                                                   "PYTHONPATH": str(root)})
    assert r.returncode == -9, r.stderr[-2000:]
    child = int(r.stdout.split()[-1])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists(), "the monitor process outlived its server"
    with QueryLog(db) as q:
        assert q.client_ids() == ["c0"] and q.max_qn("c0") == 527
    with Monitor(_cfg(), db, clock=FakeClock()) as again:
        assert again.queries("c0") == 527


def test_process_mode_restart_knows_the_restored_clients_without_asking(streams, reference,
                                                                           tmp_path):
    """After a restart, the clients the monitor's process restored are known to the serving
    process by the time it is ready: their counts without a round trip to the child (their
    levels too, unless linking's probe wants a request's images), and their logged levels."""
    from monitor.process import MonitorProcess
    db = tmp_path / "m.db"
    with MonitorProcess(_cfg(mode="process"), db, clock=FakeClock()) as mon:
        _run(mon, streams)
    mon = MonitorProcess(_cfg(mode="process"), db, clock=FakeClock(), warm=True)
    try:
        deadline = time.monotonic() + 60
        while not mon.ready() and time.monotonic() < deadline:
            time.sleep(0.02)
        asked = []
        real = mon._asking     # every question to the monitor's process goes through it
        mon._asking = lambda kind, *a, **k: asked.append(kind) or real(kind, *a, **k)
        assert {c: mon.queries(c) for c in streams} == {c: 900 for c in streams}
        assert asked == []
        for c in streams:
            last = reference[c][1][-1][2] if reference[c][1] else Level.NORMAL
            assert mon.level(c) == last
        asked.clear()
        assert mon.queries("someone-new") == 0 and asked == ["level"]
    finally:
        mon.close()


def test_process_mode_needs_the_embedded_store(tmp_path):
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    cfg = ServerConfig(port=0, artifacts=tmp_path, store="postgresql://nowhere/db",
                       secret="s", dev_secret=True, open_keys=True)
    with pytest.raises(ValueError, match="process.*SQLite"):
        build_dataplane(cfg, _cfg(mode="process"))


def test_merge_runs_keeps_each_clients_order_and_level():
    from monitor.core import _merge_runs
    p = np.full((10, 10), 0.1, np.float32)

    def job(c, rid, n=10, level=Level.NORMAL, kind=AnswerKind.PROBABILITIES):
        ans = Answer(p[:n].argmax(1), p[:n] if kind == AnswerKind.PROBABILITIES else None, kind)
        return (c, rid, 0.0, np.zeros((n, 28, 28), np.float32), p[:n], ans, level)

    jobs = [job("a", "1"), job("b", "2"), job("a", "3"), job("a", "4", level=Level.NOISE),
            job("a", "5", level=Level.NOISE), job("b", "6", kind=AnswerKind.LABEL_ONLY)]
    assert [[j[1] for j in s] for s in _merge_runs(jobs)] == [["1", "3"], ["2"], ["4", "5"],
                                                              ["6"]]
    from monitor.core import _merged_job
    a1 = job("a", "1", n=3)
    a2 = job("a", "2", n=2)
    a2[5].watermarked[1] = True
    a2[5].model[0] = "pool-cnn"
    m = _merged_job([a1, a2])
    assert m[1] == "1,2" and m[3].shape == (5, 28, 28) and m[4].shape == (5, 10)
    assert m[5].model == ["target"] * 3 + ["pool-cnn", "target"] and \
        m[5].watermarked.tolist() == [False] * 4 + [True]
    with pytest.raises(ValueError, match="different kinds"):
        Answer.concat([a1[5], job("a", "3", kind=AnswerKind.LABEL_ONLY)[5]])
    big = [job("a", str(i), n=100) for i in range(4)]     # at most MERGE_MAX_ITEMS per step
    steps = _merge_runs(big)
    assert [sum(len(j[3]) for j in s) for s in steps] == [200, 200]


@pytest.mark.parametrize("merge", [False, True])
def test_steps_of_different_clients_run_on_two_threads_with_the_same_decisions(
        streams, reference, tmp_path, monkeypatch, merge):
    """run_requests (the monitor's own process) with step_threads = 2: rounds holding several
    requests of each client run the clients' steps on two threads at once, each client's in
    order; the logged decisions are the synchronous run's (with merge, a client's waiting
    requests run as one step)."""
    import threading

    from monitor import core
    real = core.Monitor._process
    threads: dict[str, set] = {}

    def spy(self, job, wait=True):
        threads.setdefault(job[0], set()).add(threading.get_ident())
        return real(self, job, wait)

    monkeypatch.setattr(core.Monitor, "_process", spy)
    clock = FakeClock()
    db = tmp_path / "m.db"
    with Monitor(_cfg(mode="process", step_threads=2), db, clock=clock) as mon:
        for i in range(0, 900, 90):           # a round: 3 requests of 30 of each client
            jobs = [(c, f"{c}-{j}", clock(), x[j:j + 30], p[j:j + 30], _answer(p[j:j + 30]),
                     mon.current_level(c))
                    for j in range(i, i + 90, 30) for c, (x, p) in streams.items()]
            mon.run_requests(jobs, merge)
        mon.flush()
    _same(_decisions(db), reference)
    assert len(set().union(*threads.values())) == 2      # both threads ran steps
    assert all(len(t) >= 1 for t in threads.values()) and len(threads) == 3


def test_execution_keys_are_validated():
    from monitor.config import ConfigError
    with pytest.raises(ConfigError, match="execution.mode"):
        _cfg(mode="threads")
    with pytest.raises(ConfigError, match="execution.max_clients"):
        _cfg(max_clients=0)
    with pytest.raises(ConfigError, match="max_lag.*async.*process"):
        _cfg(max_lag=64)


def _until_ready(mon, timeout: float = 10.0) -> None:
    """Wait for a warm-starting monitor to report ready (its background restore done)."""
    deadline = time.monotonic() + timeout
    while not mon.ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mon.ready(), f"not ready after {timeout:g} s"


def test_warm_start_restores_recent_clients_before_ready(streams, tmp_path):
    db = tmp_path / "m.db"
    with Monitor(_cfg(), db, clock=FakeClock()) as mon:
        _run(mon, streams, upto=300)
        before = {c: mon.level(c) for c in streams}
    mon2 = Monitor(_cfg(), db, clock=FakeClock(), warm=True)
    try:
        _until_ready(mon2)
        assert mon2.resident_clients() == 3        # restored in the background, not on demand
        assert {c: mon2._engines[c].level for c in streams} == before
        assert all(mon2._engines[c].qn == 300 for c in streams)
    finally:
        mon2.close()


def test_warm_start_after_a_crash_restores_clients_that_have_no_checkpoint(streams, tmp_path,
                                                                        caplog):
    """kill -9 before any client reached checkpoint_every: nothing is checkpointed, so the
    clients come back from the log; the warm start replays them before ready, not their first
    requests. The clients logged last come first when max_clients does not hold them all."""
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(checkpoint_every=5000), db, clock=FakeClock())
    _run(mon, streams, upto=300)
    before = {c: mon.level(c) for c in streams}
    mon.flush()
    mon._closed = True         # the process "dies": no close(), no checkpoint
    assert mon.store.load_state("natural") is None
    caplog.set_level(logging.INFO, logger="modelguard.monitor")
    mon2 = Monitor(_cfg(checkpoint_every=5000), db, clock=FakeClock(), warm=True)
    try:
        _until_ready(mon2)
        assert sorted(mon2.resident_ids()) == sorted(streams)
        assert {c: mon2._engines[c].level for c in streams} == before
        assert all(mon2._engines[c].qn == 300 for c in streams)
        replayed = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
        assert len(replayed) == 3 and all("queries 1..300" in m for m in replayed)
        # the last client logged comes first (_run logs natural, jbda, mnist in turn)
        assert mon2.store.recent_clients(1) == [list(streams)[-1]]
        caplog.clear()
        x, p = streams["jbda"]
        mon2.observe("jbda", "after", x[300:330], p[300:330], _answer(p[300:330]),
                     mon2.level("jbda"))
        assert not [r for r in caplog.records if "replayed" in r.getMessage()]
        assert mon2.store.recent_clients(1) == ["jbda"]
    finally:
        mon2.close()


def test_recent_clients_are_the_newest_logged_then_the_checkpointed():
    rows = [{"seq": s, "client": c} for s, c in
            [(9, "a"), (8, "b"), (7, "a"), (6, "c"), (5, "d"), (4, "b")]]

    def page(last):
        left = [r for r in rows if last is None or r["seq"] < last]
        return left[:2]                       # two rows a page

    assert recent_clients_of(page, ["e", "b"], 10) == ["a", "b", "c", "d", "e"]
    assert recent_clients_of(page, ["e"], 2) == ["a", "b"]
    # the log is read only so far back; the checkpointed fill the rest
    assert recent_clients_of(page, ["e", "d"], 10, max_rows=4) == ["a", "b", "c", "e", "d"]
    assert recent_clients_of(lambda last: [], ["e"], 3) == ["e"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failing_detector_costs_one_request_not_the_client(streams, tmp_path, monkeypatch,
                                                               mode):
    from monitor.detectors import Prada
    x, p = streams["natural"]
    real = Prada.observe_batch
    calls = {"n": 0}

    def flaky(self, items, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise IndexError("injected")
        return real(self, items, t)

    monkeypatch.setattr(Prada, "observe_batch", flaky)
    with Monitor(_cfg(mode=mode), tmp_path / "m.db", clock=FakeClock()) as mon:
        for i in range(0, 150, 30):
            try:
                mon.observe("c", f"r{i}", x[i:i + 30], p[i:i + 30], _answer(p[i:i + 30]),
                            mon.level("c"))
            except IndexError:
                assert mode == "sync" and i == 60
        mon.flush()
        with QueryLog(mon.db_path) as q:   # the failed request is not logged; the rest are, in
            assert q.max_qn("c") == 120    # order, with no gap in the client's query numbers
            assert [r[0] for r in q.requests("c")] == [1, 31, 61, 91]
