"""Monitor interface: logging, persistence across restart, watermark records, thread safety."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.config import config_from_dict
from monitor.log import RAW_F16, RAW_F32, RAW_U8


def _probs(rng, n, conf=3.0):
    lg = rng.normal(0, conf, (n, 10))
    return (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)


def _answer(p, wm=None):
    return Answer(p.argmax(1), p, AnswerKind.PROBABILITIES, watermarked=wm)


def _cfg(**ood):
    base = load_config().model_dump(mode="python")
    base["detectors"]["ood"].update({"window": 20, "min_queries": 20, **ood})
    base["rules"] = [{"detectors": ["ood"], "level": "noise"},
                     {"detectors": ["ood"], "level": "label_only", "min_hits": 30}]
    base["policies"] = {k.name.lower(): v for k, v in base["policies"].items()}
    return config_from_dict(base)


def _stream(seed=0, n=200):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28)).astype(np.float32) / 255.0
    p = _probs(rng, n, conf=1.0)  # low confidence: the OOD rule fires
    return x, p


def test_observe_logs_everything_and_escalates(tmp_path):
    db = tmp_path / "m.db"
    x, p = _stream()
    mon = Monitor(_cfg(), db, clock=FakeClock())
    assert mon.level("alice") == Level.NORMAL
    levels = []
    for i in range(0, len(x), 25):
        wm = np.zeros(25, bool)
        wm[3] = i == 50
        levels.append(mon.observe("alice", f"r{i}", x[i:i + 25], p[i:i + 25],
                                  _answer(p[i:i + 25], wm), mon.level("alice")))
    mon.close()
    assert levels[0] == Level.NOISE and levels[-1] == Level.LABEL_ONLY  # q20 is in batch 1
    assert levels == sorted(levels)  # monotone
    with QueryLog(db) as q:
        rows = list(q.iter_rows("alice"))
        assert [r["qn"] for r in rows] == list(range(1, 201))
        assert rows[0]["raw_fmt"] == RAW_U8  # on the 0-255 grid -> uint8
        trs = q.transitions("alice")
        assert [(t["from_level"], t["to_level"]) for t in trs] == [
            (Level.NORMAL, Level.NOISE), (Level.NOISE, Level.LABEL_ONLY)]
        assert trs[0]["qn"] == 20 and trs[0]["evidence"][0]["detector"] == "ood"
        assert trs[1]["qn"] == 49 and trs[1]["evidence"][0]["hits"] == 30
        wx, wl, wc = q.watermark_records()
        assert wx.shape == (1, 28, 28) and wc == ["alice"]
        np.testing.assert_array_equal(wx[0], x[53])
        assert wl[0] == p[53].argmax()
        assert q.watermark_records("bob")[0].shape == (0, 28, 28)


def test_float_inputs_stored_compactly_and_watermarked_losslessly(tmp_path):
    db = tmp_path / "m.db"
    rng = np.random.default_rng(1)
    x = rng.random((4, 28, 28)).astype(np.float32)
    p = _probs(rng, 4)
    with Monitor(_cfg(), db) as mon:
        mon.observe("c", "r", x, p, _answer(p, np.array([0, 1, 0, 0], bool)), Level.NORMAL)
    with QueryLog(db) as q:
        fmts = [r["raw_fmt"] for r in q.iter_rows("c")]
        assert fmts == [RAW_F16, RAW_F32, RAW_F16, RAW_F16]  # float16, except the watermarked item: float32
        wx, _, _ = q.watermark_records()
        np.testing.assert_array_equal(wx[0], x[1])


@pytest.mark.parametrize("keep_state", [True, False])
def test_restart_resumes_level_and_detector_state(tmp_path, keep_state):
    """A restarted monitor (from the saved state, or rebuilt from the log when the state row is
    missing) makes exactly the decisions an uninterrupted one makes."""
    x, p = _stream(2, 400)
    p[:150] = np.eye(10, dtype=np.float32)[p[:150].argmax(1)]  # confident first: no escalation
    cfg = _cfg()

    def feed(mon, lo, hi):
        out = []
        for i in range(lo, hi, 10):
            out.append(mon.observe("c", f"r{i}", x[i:i + 10], p[i:i + 10],
                                   _answer(p[i:i + 10]), mon.level("c")))
        return out

    ref = Monitor(cfg, tmp_path / "ref.db", clock=FakeClock())
    ref_levels = feed(ref, 0, 400)
    ref.close()

    db = tmp_path / "m.db"
    clock = FakeClock()
    m1 = Monitor(cfg, db, clock=clock)
    lv1 = feed(m1, 0, 160)
    m1.close()
    if not keep_state:
        import sqlite3

        from monitor.checkpoints import checkpoint_path
        con = sqlite3.connect(checkpoint_path(db))
        assert con.execute("DELETE FROM client_state").rowcount == 1
        con.commit()
        con.close()
    m2 = Monitor(cfg, db, clock=clock)
    assert m2.level("c") == lv1[-1]
    assert m2._engines["c"].qn == 160
    lv2 = feed(m2, 160, 400)
    m2.close()
    assert lv1 + lv2 == ref_levels
    with QueryLog(db) as q, QueryLog(tmp_path / "ref.db") as qr:
        key = lambda t: (t["qn"], t["from_level"], t["to_level"], t["rule"])  # noqa: E731
        assert [key(t) for t in q.transitions("c")] == [key(t) for t in qr.transitions("c")]
        assert len(q.transitions("c")) == 2
        a = [(r["qn"], r["s_ood"], r["s_prada"], r["s_similarity"]) for r in q.iter_rows("c")]
        b = [(r["qn"], r["s_ood"], r["s_prada"], r["s_similarity"]) for r in qr.iter_rows("c")]
        assert a == b


def test_escalated_level_survives_restart(tmp_path):
    db = tmp_path / "m.db"
    x, p = _stream(3, 100)
    with Monitor(_cfg(), db) as m:
        for i in range(0, 100, 10):
            m.observe("eve", str(i), x[i:i + 10], p[i:i + 10], _answer(p[i:i + 10]), Level.NORMAL)
        lvl = m.level("eve")
    assert lvl == Level.LABEL_ONLY
    with Monitor(_cfg(), db) as m:
        assert m.level("eve") == Level.LABEL_ONLY
        assert m.level("newcomer") == Level.NORMAL


def test_concurrent_observe_from_threads(tmp_path):
    db = tmp_path / "m.db"
    rng = np.random.default_rng(4)
    x = rng.random((8, 50, 28, 28)).astype(np.float32)
    p = _probs(rng, 50, conf=10.0)
    mon = Monitor(_cfg(), db)

    def work(k):
        for j in range(8):
            mon.observe(f"client{k % 3}", f"{k}-{j}", x[j], p, _answer(p), mon.level(f"c{k}"))

    ts = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    mon.close()
    with QueryLog(db) as q:
        for c in ("client0", "client1", "client2"):
            qns = [r["qn"] for r in q.iter_rows(c)]
            assert sorted(qns) == list(range(1, 801))


def test_answer_length_mismatch_is_rejected():
    rng = np.random.default_rng(5)
    p = _probs(rng, 3)
    with Monitor(_cfg()) as mon:
        with pytest.raises(ValueError, match="answer has 2 items for 3 images"):
            mon.observe("c", "r", rng.random((3, 28, 28)).astype(np.float32), p,
                        _answer(p[:2]), Level.NORMAL)


def test_observe_as_steps_hands_out_a_step_only_when_the_async_queue_is_full(tmp_path):
    """Monitor.observe_steps computes in place (a lock another thread holds is waited for in
    place, measured no worse); in async mode, while the queue to the detectors is full
    (observe would wait for them to make room), it computes nothing and hands out one
    Blocking step instead, which does the work once run."""
    import time

    from common.steps import Blocking, run_steps

    cfg = load_config(None).model_dump(mode="python")
    cfg["execution"].update(mode="async", queue_limit=1)
    cfg["policies"] = {k.name.lower(): v for k, v in cfg["policies"].items()}
    mon = Monitor(config_from_dict(cfg), tmp_path / "m.db")
    x, p = _stream(n=12)
    lvl = Level.NORMAL
    for k, c in enumerate("cde"):                      # each client's state in memory
        assert mon.level(c, x[:2]) == lvl
        run_steps(mon.observe_steps(c, "r0", x[:2], p[:2], _answer(p[:2]), lvl))
    mon.flush()
    def until(cond):
        end = time.monotonic() + 10
        while not cond() and time.monotonic() < end:
            time.sleep(0.01)
        return cond()

    with mon._lock("c"):                               # the detectors' worker waits for it
        for c, cond in (("c", mon._queue.empty), ("d", mon._queue.full)):
            with pytest.raises(StopIteration):         # in place: c's taken, d's queued
                mon.observe_steps(c, "r1", x[2:4], p[2:4], _answer(p[2:4]), lvl).send(None)
            assert until(cond)
        steps = mon.observe_steps("e", "r1", x[4:6], p[4:6], _answer(p[4:6]), lvl)
        step = steps.send(None)
        assert isinstance(step, Blocking) and mon.queries("e") == 2
    with pytest.raises(StopIteration):
        steps.send(step.run())
    mon.flush()
    assert [mon.queries(c) for c in "cde"] == [4, 4, 4]
    mon.close()
