"""The embedded store's checkpoint file (monitor.checkpoints): a request never waits for a
checkpoint being written, a checkpoint is never durable before the requests it covers, and logs
that kept their checkpoints in the log file (before the checkpoint file) are still restored
from them."""
from __future__ import annotations

import logging
import pickle
import sqlite3
import threading
import time

import numpy as np
import pytest

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.checkpoints import CheckpointWriter, checkpoint_path
from monitor.engine import Transition
from monitor.log import SCORE_COLUMNS, Writer
from monitor.store import SQLiteStore
from tests.streams import three_streams


def _cfg(**execution):
    return load_config().with_changes(execution=execution)


@pytest.fixture(scope="module")
def stream():
    x, p = three_streams(300)["natural"]
    return x, p


def _observe(mon, x, p, lo, hi, batch=30):
    for i in range(lo, hi, batch):
        a = Answer(p[i:i + batch].argmax(1), p[i:i + batch], AnswerKind.PROBABILITIES)
        mon.observe("c", f"r{i}", x[i:i + batch], p[i:i + batch], a, mon.level("c"))


def test_requests_are_answered_while_a_checkpoint_is_still_being_written(stream, tmp_path,
                                                                         monkeypatch):
    """With durability "commit" every answer waits for its own rows: they must not queue behind
    a checkpoint (megabytes). The checkpoint writer is held; requests past the checkpoint still
    commit and return; the checkpoint lands once released."""
    x, p = stream
    held, entered = threading.Event(), threading.Event()
    real = CheckpointWriter._write

    def slow(self, items):
        entered.set()
        held.wait(30)
        return real(self, items)

    monkeypatch.setattr(CheckpointWriter, "_write", slow)
    db = tmp_path / "m.db"
    mon = Monitor(_cfg(checkpoint_every=60), db, clock=FakeClock())
    try:
        assert mon.config.log.durability == "commit"
        _observe(mon, x, p, 0, 90)
        assert entered.wait(10)             # the checkpoint after query 60 is being written...
        _observe(mon, x, p, 90, 300)        # ...and these requests' rows commit meanwhile
        assert mon.store.load_state("c") is None
        assert mon.store.max_qn("c") == 300
        held.set()
        mon.flush()
        assert mon.store.load_state("c")["qn"] >= 60
    finally:
        held.set()
        mon.close()


def test_a_checkpoint_is_never_durable_before_the_log_items_put_before_it(tmp_path, monkeypatch):
    held = threading.Event()
    real = Writer._write

    def slow(self, items):            # the log's writer only (CheckpointWriter has its own)
        held.wait(30)
        return real(self, items)

    monkeypatch.setattr(Writer, "_write", slow)
    st = SQLiteStore(tmp_path / "m.db")
    try:
        tr = st.put_transition(Transition("c", 1.0, 5, Level.NORMAL, Level.NOISE, "rule"))
        ck = st.put_state("c", 5, int(Level.NOISE), "h", b"\x80state", 1.0)
        time.sleep(0.5)
        assert not st.is_committed(tr) and not st.is_committed(ck)
        assert st.load_state("c") is None
        held.set()
        assert st.wait_committed(ck, 10)
        assert st.is_committed(tr)
        assert st.last_level("c") == Level.NOISE and st.load_state("c")["qn"] == 5
    finally:
        held.set()
        st.close()
    # the checkpoint went to its own file, the log file holds none
    con = sqlite3.connect(tmp_path / "m.db")
    assert con.execute("SELECT count(*) FROM client_state").fetchone()[0] == 0
    con.close()
    assert checkpoint_path(tmp_path / "m.db") == tmp_path / "m.state.db"


def test_a_log_with_its_checkpoints_inside_is_restored_from_them(stream, tmp_path, caplog):
    """A log written before the checkpoint file kept its checkpoints in its own client_state
    table: a restart restores from that checkpoint (replaying only what came after it) and
    decides as an uninterrupted run does."""
    x, p = stream
    with Monitor(_cfg(), tmp_path / "ref.db", clock=FakeClock()) as ref:
        _observe(ref, x, p, 0, 300)
    db = tmp_path / "m.db"
    clock = FakeClock()
    mon = Monitor(_cfg(checkpoint_every=100_000), db, clock=clock)
    mon.store.supports_deltas = False   # full checkpoints only, as that version wrote them
    _observe(mon, x, p, 0, 120)
    mon.checkpoint_all()                # (a periodic one would land at 120 or at 150, as the
    mon.flush()                         # checkpointer thread comes to it)
    _observe(mon, x, p, 120, 150)
    mon.flush()
    mon._closed = True                  # a crash: no final checkpoint
    mon.store.close()
    # move the checkpoint into the log file, as an older version wrote it
    ck = checkpoint_path(db)
    src = sqlite3.connect(ck)
    row = src.execute("SELECT * FROM client_state WHERE client='c'").fetchone()
    src.close()
    assert row is not None and row[1] == 120
    for f in tmp_path.glob("m.state.db*"):
        f.unlink()
    con = sqlite3.connect(db)
    con.execute("INSERT INTO client_state VALUES (?,?,?,?,?,?)", row)
    con.commit()
    con.close()
    caplog.set_level(logging.INFO, logger="modelguard.monitor")
    with Monitor(_cfg(checkpoint_every=60), db, clock=clock) as mon2:
        assert mon2.queries("c") == 150
        msgs = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
        assert msgs == [f"client c: replayed queries {row[1] + 1}..150 after its checkpoint"]
        _observe(mon2, x, p, 150, 300)
    assert ck.exists()                  # new checkpoints go to the checkpoint file
    with QueryLog(db) as q, QueryLog(tmp_path / "ref.db") as qr:
        got, want = q.series("c"), qr.series("c")
        for k in SCORE_COLUMNS + ("fired", "level_after"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# -- incremental checkpoints -------------------------------------------------------------------
def _small_rings():
    """Rings that wrap around within a test stream."""
    return load_config().with_changes(
        detectors={"near_duplicate": {**load_config().detectors.near_duplicate.model_dump(),
                                      "history": 70},
                   "similarity": {**load_config().detectors.similarity.model_dump(),
                                  "history": 110},
                   "prada": {**load_config().detectors.prada.model_dump(), "max_set": 12}})


def _differences(a, b, path="engine") -> list[str]:
    """Where two engines' states differ: arrays bit for bit, everything else by value (pickles
    of equal states may still differ in how they share strings)."""
    if type(a) is not type(b):
        return [f"{path}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, np.ndarray):
        same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
        return [] if same else [f"{path}: arrays differ"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{path}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (u, w) in enumerate(zip(a, b)) for d in _differences(u, w, f"{path}[{i}]")]
    if hasattr(a, "__dict__") and not isinstance(a, type):
        sa = a.__getstate__() if hasattr(type(a), "__getstate__") else vars(a)
        sb = b.__getstate__() if hasattr(type(b), "__getstate__") else vars(b)
        return _differences(sa, sb, path)
    if isinstance(a, float) and a != a and b != b:
        return []
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def test_deltas_restore_the_engine_bit_for_bit_and_a_gap_ends_the_chain():
    """A full checkpoint, then deltas holding only the rows each ring gained (rings that
    wrapped around in between included): the chain restores exactly the live engine, each
    delta is a fraction of the full state; a lost delta ends the chain there (the engine as of
    the last one that fit); a ring that gained more rows than it holds needs a full one."""
    from monitor.engine import ClientEngine, det_view
    from monitor.log import (mark_checkpointed, pickle_delta, pickle_state, restore_chain,
                             _rings)
    cfg = _small_rings()
    streams = three_streams(400)
    x = np.concatenate([streams["natural"][0], streams["jbda"][0]])
    p = np.concatenate([streams["natural"][1], streams["jbda"][1]])
    eng = ClientEngine(cfg, "c")

    def step(lo, hi):
        for i in range(lo, hi, 20):
            v, grid = det_view(x[i:i + 20])
            eng.step(v.reshape(len(v), -1), p[i:i + 20], float(i), grid)

    step(0, 200)
    base = pickle_state(eng)
    mark_checkpointed(eng)
    chain, snaps = [], []
    for lo in (200, 260, 300):
        step(lo, lo + (60 if lo == 200 else 40))
        d = pickle_delta(eng)
        assert d is not None and len(d) < 0.6 * len(base)
        mark_checkpointed(eng)
        chain.append(d)
        snaps.append(pickle.loads(pickle_state(eng)))
    assert any(r.n > r.size for r in _rings(eng))           # some rings wrapped around
    back, whole = restore_chain(base, chain)
    assert whole and back.qn == eng.qn == 340
    assert _differences(back, snaps[-1]) == []
    back, whole = restore_chain(base, [chain[0], chain[2]])   # the middle one lost
    assert not whole and back.qn == 260
    assert _differences(back, snaps[0]) == []
    assert _differences(back, snaps[-1])                      # (the comparison does see)
    step(340, 480)                       # near_duplicate's ring (70) gains 140 rows
    assert pickle_delta(eng) is None


def test_a_chain_across_rings_switching_to_float_items_restores_bit_for_bit():
    """Rings hold grey levels while their items are on the grid and float32 from the first
    one off it: a full checkpoint taken before that and deltas after it (off-grid rows, then
    on-grid rows again) restore the live engine bit for bit."""
    from monitor.engine import ClientEngine, det_view
    from monitor.log import mark_checkpointed, pickle_delta, pickle_state, restore_chain, _rings
    cfg = _small_rings()
    streams = three_streams(200)
    eng = ClientEngine(cfg, "c")

    def step(x, p):
        for i in range(0, len(x), 20):
            v, grid = det_view(x[i:i + 20])
            eng.step(v.reshape(len(v), -1), p[i:i + 20], float(eng.qn), grid)

    nx, npr = streams["natural"]
    noisy = np.clip(nx[140:180] + np.random.default_rng(0).normal(0, 0.02, nx[140:180].shape),
                    0, 1).astype(np.float32)          # off the grid
    step(nx[:100], npr[:100])
    assert not any(r.wide for r in _rings(eng) if hasattr(r, "wide"))   # grey levels only
    base = pickle_state(eng)
    mark_checkpointed(eng)
    chain = []
    for x, p in ((noisy, npr[140:180]), (nx[100:140], npr[100:140])):
        step(x, p)
        chain.append(pickle_delta(eng))
        assert chain[-1] is not None
        mark_checkpointed(eng)
    assert any(r.wide for r in _rings(eng) if hasattr(r, "wide"))       # float32 since
    back, whole = restore_chain(base, chain)
    assert whole and back.qn == eng.qn == 180
    assert _differences(back, pickle.loads(pickle_state(eng))) == []
    for a, b in zip(_rings(back), _rings(eng)):
        if hasattr(a, "items"):
            assert a.items().tobytes() == b.items().tobytes()


def test_a_restart_restores_from_the_full_checkpoint_and_its_deltas(stream, tmp_path,
                                                                    caplog):
    """A client's checkpoints after its first are deltas (the checkpoint file holds them beside
    the full one); after a crash the client is restored from the full one and its deltas, the
    replay covers only what came after the last delta, and the decisions are those of an
    uninterrupted run."""
    x, p = stream
    with Monitor(_cfg(), tmp_path / "ref.db", clock=FakeClock()) as ref:
        _observe(ref, x, p, 0, 300)
    db = tmp_path / "m.db"
    clock = FakeClock()
    cfg = _cfg(checkpoint_every=100_000)     # checkpoints only where this test asks
    mon = Monitor(cfg, db, clock=clock)
    _observe(mon, x, p, 0, 150)
    mon.checkpoint_all()                     # full
    for hi in (180, 210):
        _observe(mon, x, p, hi - 30, hi)
        mon.checkpoint_all()                 # deltas
    _observe(mon, x, p, 210, 240)
    mon.flush()
    mon._closed = True                       # a crash: no final checkpoint
    mon.store.close()
    con = sqlite3.connect(checkpoint_path(db))
    full = con.execute("SELECT qn, length(state) FROM client_state").fetchall()
    deltas = con.execute("SELECT qn, length(state) FROM client_delta ORDER BY qn").fetchall()
    con.close()
    assert [f[0] for f in full] == [150] and [d[0] for d in deltas] == [180, 210]
    assert all(n < 0.5 * full[0][1] for _, n in deltas)
    caplog.set_level(logging.INFO, logger="modelguard.monitor")
    with Monitor(cfg, db, clock=clock) as mon2:
        assert mon2.queries("c") == 240
        msgs = [r.getMessage() for r in caplog.records if "replayed" in r.getMessage()]
        assert msgs == ["client c: replayed queries 211..240 after its checkpoint"]
        _observe(mon2, x, p, 240, 300)
    with QueryLog(db) as q, QueryLog(tmp_path / "ref.db") as qr:
        got, want = q.series("c"), qr.series("c")
        for k in SCORE_COLUMNS + ("fired", "level_after"):
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
