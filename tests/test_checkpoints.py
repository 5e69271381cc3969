"""The embedded store's checkpoint file (monitor.checkpoints): a request never waits for a
checkpoint being written, a checkpoint is never durable before the requests it covers, and logs
that kept their checkpoints in the log file (before the checkpoint file) are still restored
from them."""
from __future__ import annotations

import logging
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
    mon = Monitor(_cfg(checkpoint_every=60), db, clock=clock)
    _observe(mon, x, p, 0, 120)
    mon.flush()                         # the checkpoint due at 120 is written
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
