"""The PostgreSQL store behind the monitor: the SQLite store's behaviour (parametrised over both
stores), then what only a shared store does: survive a PostgreSQL restart, fail open or closed,
hand a client over between replicas, and link Sybil keys served by different replicas."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from common import data
from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.config import config_from_dict
from monitor.log import SCORE_COLUMNS, LogUnavailable
from monitor.store import SQLiteStore
from tests.pgcluster import pg_schema, pg_server  # noqa: F401 - fixtures
from tests.streams import three_streams

psycopg = pytest.importorskip("psycopg")
from monitor.pgstore import PgStore, SharedMonitor, StoreUnavailable  # noqa: E402


# --- stores ------------------------------------------------------------------------------------
class Place:
    """Where one store's state lives (a SQLite file or a PostgreSQL schema): ``open()`` makes a
    store on it (again after a restart), ``reader()`` reads what was written."""

    def __init__(self, kind, tmp_path, request):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "m.db"
        else:
            self.srv = request.getfixturevalue("pg_server")
            self.schema = request.getfixturevalue("pg_schema")
        self._readers = []

    def open(self, replica="r1", **kw):
        if self.kind == "sqlite":
            return SQLiteStore(self.path)
        return PgStore(self.srv.dsn, replica, schema=self.schema, **kw)

    def reader(self):
        r = QueryLog(self.path) if self.kind == "sqlite" else self.open("reader")
        self._readers.append(r)
        return r

    def transitions(self, client=None):
        return [(t["client"], t["qn"], t["from_level"], t["to_level"], t["rule"])
                for t in self.reader().transitions(client)]

    def pairs(self):
        r = self.reader()
        rows = r.pairs() if self.kind == "sqlite" else r.pair_rows()
        return [(p["client"], p["qn"], p["other"], p["other_qn"]) for p in rows]

    def decisions(self):
        r = self.reader()
        out = {}
        for c in r.client_ids():
            s = r.series(c)
            out[c] = (np.column_stack([s[k] for k in SCORE_COLUMNS] + [s["fired"],
                                                                       s["level_after"]]),
                      [t[1:] for t in self.transitions(c)])
        return out

    def drop_checkpoints(self):
        if self.kind == "sqlite":
            import sqlite3

            from monitor.checkpoints import checkpoint_path
            con = sqlite3.connect(checkpoint_path(self.path))
            assert con.execute("DELETE FROM client_state").rowcount > 0
            con.commit()
            con.close()
        else:
            st = self.open("admin")
            st.execute("DELETE FROM client_state")
            st.close()

    def close(self):
        for r in self._readers:
            r.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def place(request, tmp_path):
    p = Place(request.param, tmp_path, request)
    yield p
    p.close()


def _same(a, b):
    assert a.keys() == b.keys()
    for c in a:
        np.testing.assert_array_equal(a[c][0], b[c][0], err_msg=c)
        assert a[c][1] == b[c][1], c


# --- streams (as in test_monitor_core / test_monitor_runtime) ---------------------------------
def _probs(rng, n, conf=3.0):
    lg = rng.normal(0, conf, (n, 10))
    return (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)


def _answer(p, wm=None):
    return Answer(p.argmax(1), p, AnswerKind.PROBABILITIES, watermarked=wm)


def _ood_cfg():
    base = load_config().model_dump(mode="python")
    base["detectors"]["ood"].update({"window": 20, "min_queries": 20})
    base["rules"] = [{"detectors": ["ood"], "level": "noise"},
                     {"detectors": ["ood"], "level": "label_only", "min_hits": 30}]
    base["policies"] = {k.name.lower(): v for k, v in base["policies"].items()}
    return config_from_dict(base)


def _cfg(linking=False, log=None, **execution):
    base = load_config().model_dump(mode="python")
    base["execution"].update(execution)
    base["log"].update(log or {})
    base["policies"] = {k.name.lower(): v for k, v in base["policies"].items()}
    if not linking:
        base["linking"]["enabled"] = False
    return config_from_dict(base)


@pytest.fixture(scope="module")
def streams():
    """Three clients: natural images, JBDA-like near-copies (escalates), MNIST (OOD)."""
    return three_streams(600)


def _run(mon, streams, batch=30, upto=600, start=0):
    out = {c: [] for c in streams}
    for i in range(start, upto, batch):
        for c, (x, p) in streams.items():
            lvl = mon.level(c)
            out[c].append(lvl)
            mon.observe(c, f"{c}-{i}", x[i:i + batch], p[i:i + batch],
                        _answer(p[i:i + batch]), lvl)
    return out


@pytest.fixture(scope="module")
def reference(streams, tmp_path_factory):
    """The uninterrupted run on the embedded SQLite store."""
    db = tmp_path_factory.mktemp("ref") / "m.db"
    with Monitor(_cfg(), db, clock=FakeClock()) as mon:
        levels = _run(mon, streams)
    with QueryLog(db) as q:
        dec = {}
        for c in q.client_ids():
            s = q.series(c)
            dec[c] = (np.column_stack([s[k] for k in SCORE_COLUMNS] + [s["fired"],
                                                                       s["level_after"]]),
                      [(t["qn"], t["from_level"], t["to_level"], t["rule"])
                       for t in q.transitions(c)])
    assert dec["jbda"][1] and dec["mnist"][1] and not dec["natural"][1]
    return dec, levels


# --- the store's contract, on both stores ------------------------------------------------------
def test_ood_stream_escalates_at_the_same_queries(place):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (200, 28, 28)).astype(np.float32) / 255.0
    p = _probs(rng, 200, conf=1.0)
    mon = Monitor(_ood_cfg(), store=place.open(), clock=FakeClock())
    levels = []
    for i in range(0, 200, 25):
        levels.append(mon.observe("alice", f"r{i}", x[i:i + 25], p[i:i + 25],
                                  _answer(p[i:i + 25]), mon.level("alice")))
    mon.close()
    assert levels[0] == Level.NOISE and levels[-1] == Level.LABEL_ONLY
    assert [t[1:4] for t in place.transitions("alice")] == [
            (20, Level.NORMAL, Level.NOISE), (49, Level.NOISE, Level.LABEL_ONLY)]
    r = place.reader()
    got = list(r.requests("alice", 0))
    assert [g[0] for g in got] == list(range(1, 201, 25))
    np.testing.assert_array_equal(np.concatenate([g[2] for g in got]), x)   # stored exactly
    np.testing.assert_array_equal(np.concatenate([g[3] for g in got]), p)


def test_near_copy_stream_decides_as_the_reference(place, streams, reference):
    """Every score, fired mask, level and transition of three interleaved clients, as on the
    uninterrupted SQLite run."""
    dec, levels = reference
    with Monitor(_cfg(), store=place.open(), clock=FakeClock()) as mon:
        got = _run(mon, streams)
    assert got == levels
    _same(place.decisions(), dec)


@pytest.mark.parametrize("keep_state", [True, False])
def test_restart_resumes_level_and_detector_state(place, streams, reference, keep_state):
    """Killed at query 420 (no close, no final checkpoint; checkpoints every 200), restarted
    from the checkpoint plus the requests since (or the whole log without a checkpoint): the
    same decisions as the uninterrupted run, the same level at once."""
    dec, levels = reference
    clock = FakeClock()
    cfg = _cfg(checkpoint_every=200)
    mon = Monitor(cfg, store=place.open(), clock=clock)
    first = _run(mon, streams, upto=420)
    mon.flush()
    mon._closed = True   # the process "dies": the store's writer is abandoned
    mon.store.close()
    if not keep_state:
        place.drop_checkpoints()
    store = place.open()
    # what a warm start restores first: the clients logged last (with or without a checkpoint)
    # (_run logs the clients in turn, so the newest rows are theirs in reverse order)
    assert store.recent_clients(3) == list(streams)[::-1]
    mon2 = Monitor(cfg, store=store, clock=clock)
    assert mon2.level("jbda") == levels["jbda"][14]
    assert mon2._engines["jbda"].qn == 420
    second = _run(mon2, streams, start=420)
    mon2.close()
    assert {c: first[c] + second[c] for c in first} == levels
    _same(place.decisions(), dec)


def test_writes_are_ordered_tickets_commit_and_readers_are_concurrent(place):
    rng = np.random.default_rng(4)
    x = rng.random((8, 50, 28, 28)).astype(np.float32)
    p = _probs(rng, 50, conf=10.0)
    st = place.open()
    mon = Monitor(_ood_cfg(), store=st)

    def work(k):
        for j in range(8):
            c = f"client{k % 3}"
            mon.observe(c, f"{k}-{j}", x[j], p, _answer(p), mon.level(c))
            st.max_qn(c)          # a read from this thread's own connection

    ts = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    mon.flush()
    assert st.uncommitted() == 0
    ticket = st.put_state("zed", 5, 0, "h", b"\x80blob", 1.0)
    st.flush()
    assert st.is_committed(ticket)
    assert st.load_state("zed")["state"] == b"\x80blob"
    mon.close()
    r = place.reader()
    for c in ("client0", "client1", "client2"):
        assert sorted(q for q in r.series(c)["qn"].astype(int)) == list(range(1, 801))
        assert r.max_qn(c) == 800


def test_pairs_groups_and_levels_survive_a_restart(place):
    try:
        pool = data.attack_pool()
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"data unavailable: {exc}")
    pool = pool.x.reshape(len(pool.x), -1).astype(np.float32) / 255.0
    rng = np.random.default_rng(4)

    def step(x):
        return np.clip(x + 0.1 * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)

    def send(mon, key, x):
        p = np.full((len(x), 10), 0.01, np.float32)
        p[:, 0] = 0.91
        mon.observe(key, "r", x.reshape(-1, 28, 28), p, _answer(p), mon.level(key))

    cfg = _cfg(linking=True)       # the shipped linking rules
    mon = Monitor(cfg, store=place.open(), clock=FakeClock())
    sent = pool[:30]
    send(mon, "seed", sent)
    for r in range(12):
        x = step(sent[rng.integers(0, len(sent), 10)])
        send(mon, f"s{r % 4}", x)
        sent = np.concatenate([sent, x])
    before = {k: mon.level(k) for k in ("seed", "s0", "s1", "s2", "s3")}
    members = set(mon.linker.group_of("s1").members)
    mon.close()
    assert before["seed"] == Level.NORMAL and before["s1"] > Level.NORMAL
    assert {"s0", "s1", "s2", "s3"} <= members
    pairs = place.pairs()
    assert len(pairs) >= 20 and {p[0] for p in pairs} == {"s0", "s1", "s2", "s3"}

    mon = Monitor(cfg, store=place.open(), clock=FakeClock())
    try:
        assert {k: mon.level(k) for k in before} == before
        assert set(mon.linker.group_of("s2").members) == members
        send(mon, "late", step(sent[-20:]))           # perturbs queries logged before
        assert mon.level("late") == before["s1"]
    finally:
        mon.close()


# --- PostgreSQL only ---------------------------------------------------------------------------
@pytest.fixture
def pg(pg_server, pg_schema):
    return pg_server, pg_schema


def _batch(client, qn0, n=4, rng=np.random.default_rng(0)):
    from monitor.log import Batch
    x = rng.integers(0, 256, (n, 28, 28)).astype(np.float32) / 255.0
    p = _probs(rng, n)
    return Batch(client, qn0, float(qn0), "r", x, np.ones(n, bool), p, 0, 0, p.argmax(1),
                 p.max(1), [], np.zeros(n, bool), np.zeros((n, 5)), np.zeros(n, int),
                 np.zeros(n, int), True)


def test_writer_survives_a_postgresql_restart_without_losing_a_row(pg):
    srv, schema = pg
    st = PgStore(srv.dsn, "r1", schema=schema, flush_seconds=0.05, heartbeat=0.2)
    for i in range(20):
        st.put_batch(_batch("c", 4 * i))
    st.flush()
    srv.kill()                                   # PostgreSQL dies with the writer connected
    for i in range(20, 40):
        st.put_batch(_batch("c", 4 * i))
    t0 = time.monotonic()
    while st.available() and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    assert not st.available()                    # the outage is noticed...
    with pytest.raises(StoreUnavailable):
        st.flush(timeout=0.5)                    # ...and flush says so instead of hanging
    assert st.uncommitted() > 0
    srv.start()
    st.flush(timeout=30)                         # back: the queue drains by itself
    assert st.available()
    assert st.max_qn("c") == 160
    assert [q for q, *_ in st.requests("c", 0)] == list(range(1, 161, 4))
    assert st.conflicts == 0 and st.dropped() == 0
    st.close()


def test_fail_closed_refuses_and_fail_open_answers_while_postgresql_is_down(pg, streams):
    srv, schema = pg
    x, p = streams["natural"]
    mons = {m: SharedMonitor(_cfg(log={"on_failure": m}),
                             PgStore(srv.dsn, m, schema=schema, heartbeat=0.2))
            for m in ("open", "closed")}
    for m, mon in mons.items():
        mon.observe(f"{m}-1", "r", x[:10], p[:10], _answer(p[:10]), mon.level(f"{m}-1"))
        mon.flush()
    srv.kill()
    try:
        t0 = time.monotonic()
        while any(m.store.available() for m in mons.values()) and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        closed, opened = mons["closed"], mons["open"]
        assert closed.store.failure() and not closed.ready()    # health: NOT_SERVING
        with pytest.raises(LogUnavailable):
            closed.level("closed-1")                 # a known client: refused (UNAVAILABLE)
        with pytest.raises(LogUnavailable):
            closed.level("closed-new")               # an unknown one: refused
        assert opened.level("open-1") == Level.NORMAL          # from memory
        assert opened.level("open-new") == Level.NORMAL        # starts empty
        opened.observe("open-1", "r2", x[10:20], p[10:20], _answer(p[10:20]), Level.NORMAL)
    finally:
        srv.start()
    for mon in mons.values():
        mon.flush()
    t0 = time.monotonic()    # the store notices by itself (heartbeat) that PostgreSQL is back
    while mons["closed"].store.failure() and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert mons["closed"].ready()
    assert mons["closed"].level("closed-1") == Level.NORMAL    # serves again without a restart
    assert mons["open"].store.max_qn("open-1") == 20           # queued while down, then written
    for mon in mons.values():
        mon.close()


def test_a_replica_warms_the_clients_it_owns_even_before_their_first_checkpoint(pg, streams):
    """A replica killed before any of its clients reached checkpoint_every, restarted under
    its name: the warm start restores all its clients (from the log) before it is ready."""
    srv, schema = pg
    cfg = _cfg(checkpoint_every=5000)
    a = SharedMonitor(cfg, PgStore(srv.dsn, "W", schema=schema), clock=FakeClock())
    _run(a, streams, upto=90)
    a.flush()
    a._closed = True            # killed: no close, no checkpoint
    a.store.close()
    a2 = SharedMonitor(cfg, PgStore(srv.dsn, "W", schema=schema), clock=FakeClock(), warm=True)
    try:
        assert sorted(a2.store.owned_clients(10)) == sorted(streams)
        t0 = time.monotonic()
        while not a2.ready() and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert sorted(a2.resident_ids()) == sorted(streams)
        assert all(a2._engines[c].qn == 90 for c in streams)
    finally:
        a2.close()


def test_a_client_handed_to_another_replica_keeps_its_state_and_comes_back(pg, streams,
                                                                           reference):
    """Replica A serves the clients, B takes them over (A is told and drops its copies), then A
    again: the decisions are exactly those of one uninterrupted monitor."""
    srv, schema = pg
    dec, levels = reference
    clock = FakeClock()
    cfg = _cfg(checkpoint_every=200)
    a = SharedMonitor(cfg, PgStore(srv.dsn, "A", schema=schema), clock=clock)
    b = SharedMonitor(cfg, PgStore(srv.dsn, "B", schema=schema), clock=clock)
    try:
        first = _run(a, streams, upto=240)
        a.flush()
        second = _run(b, streams, start=240, upto=420)       # B claims every client
        b.flush()
        t0 = time.monotonic()
        while a.handovers < 3 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert a.handovers == 3 and not a._engines            # A dropped its stale copies
        assert b.store.owner("jbda") == "B"
        third = _run(a, streams, start=420)                   # and back to A
        assert a.store.owner("jbda") == "A"
    finally:
        a.close()
        b.close()
    assert {c: first[c] + second[c] + third[c] for c in first} == levels
    st = PgStore(srv.dsn, "reader", schema=schema)
    try:
        assert st.conflicts == 0
        for c, (arr, trs) in dec.items():
            s = st.series(c)
            got = np.column_stack([s[k] for k in SCORE_COLUMNS] + [s["fired"], s["level_after"]])
            np.testing.assert_array_equal(got, arr, err_msg=c)
            assert [(t["qn"], t["from_level"], t["to_level"], t["rule"])
                    for t in st.transitions(c)] == trs
    finally:
        st.close()


def test_sybil_keys_on_different_replicas_are_linked(pg):
    """A split attack whose keys are served by two replicas is linked and escalated as on one
    server: each replica's linker indexes the other's logged queries and counts its pairs."""
    srv, schema = pg
    try:
        pool = data.attack_pool()
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"data unavailable: {exc}")
    pool = pool.x.reshape(len(pool.x), -1).astype(np.float32) / 255.0

    def run(mons):
        rng = np.random.default_rng(4)
        home = {"seed": 0, "s0": 1, "s1": 0, "s2": 1, "s3": 0}   # replica of each key

        def route(k):
            return mons[home[k] % len(mons)]

        def send(key, x):
            m = route(key)
            p = np.full((len(x), 10), 0.01, np.float32)
            p[:, 0] = 0.91
            m.observe(key, "r", x.reshape(-1, 28, 28), p, _answer(p), m.level(key))
            m.flush()
            if len(mons) > 1:
                time.sleep(0.3)          # the other replica follows within follow_seconds

        sent = pool[:30]
        send("seed", sent)
        for r in range(12):
            x = np.clip(sent[rng.integers(0, len(sent), 10)] + 0.1 * rng.choice(
                [-1.0, 1.0], (10, 784)), 0, 1).astype(np.float32)
            send(f"s{r % 4}", x)
            sent = np.concatenate([sent, x])
        time.sleep(0.5 if len(mons) > 1 else 0)
        return {k: route(k).level(k) for k in ("seed", "s0", "s1", "s2", "s3")}

    cfg = _cfg(linking=True)
    one = SharedMonitor(cfg, PgStore(srv.dsn, "solo", schema=schema + "_solo"))
    try:
        single = run([one])
    finally:
        one.close()
    a = SharedMonitor(cfg, PgStore(srv.dsn, "A", schema=schema), follow_seconds=0.05)
    b = SharedMonitor(cfg, PgStore(srv.dsn, "B", schema=schema), follow_seconds=0.05)
    try:
        split = run([a, b])
        assert b.followed > 0 and a.followed > 0
        ga, gb = a.linker.group_of("s0"), b.linker.group_of("s1")
        assert ga is not None and gb is not None
        assert {"s0", "s1", "s2", "s3"} <= ga.members & gb.members
    finally:
        a.close()
        b.close()
    assert single["seed"] == Level.NORMAL and single["s0"] > Level.NORMAL
    assert split == single


# --- a real cluster: PostgreSQL + 3 replica processes + nginx (deploy/cluster.py) ---------------
def _free_base() -> int:
    import random
    import socket
    for _ in range(50):
        base = random.randint(20000, 60000)
        try:
            for p in [base] + [base + 11 + i for i in range(3)]:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def cluster(small_target):
    import shutil
    import tempfile

    from deploy import pgserver
    from deploy.cluster import Cluster, ensure_nginx

    if pgserver.find_bindir() is None:
        pytest.skip("PostgreSQL binaries not found (make pg)")
    try:
        ensure_nginx()
    except SystemExit as exc:
        pytest.skip(str(exc))
    root = tempfile.mkdtemp(prefix="modelguard-cluster-")   # traversable by postgres
    c = Cluster(root, port=_free_base(), replicas=3)
    try:
        c.up(["--target", str(small_target[0]), "--artifacts", root, "--undefended"],
             env={"MODELGUARD_ARTIFACTS": root})
    except Exception:
        logs = "\n".join(f.read_text()[-2000:] for f in Path(root).glob("replica-*.log"))
        c.down()
        raise RuntimeError(f"cluster did not start:\n{logs}")
    yield c
    c.down()
    shutil.rmtree(root, ignore_errors=True)


def _client_id(c, key):
    from service.auth import KeyRing
    return KeyRing.open((c.root / "secret").read_text().strip()).client_id_of_key(key)


def _single_server_reference(target_path, x, batch):
    """The monitor of one server (shipped default config) over the same stream, with the
    target's probabilities for it: the first query count of each level change."""
    from service.dataplane import TargetModel
    model = TargetModel.load(target_path)
    with Monitor(load_config(None)) as mon:
        for i in range(0, len(x), batch):
            xb = x[i:i + batch]
            p = model.predict_proba(xb)
            mon.observe("ref", str(i), xb, p, _answer(p), mon.level("ref", xb))
        mon.flush()
        return [(t["qn"], t["to_level"]) for t in mon.store.reader.transitions("ref")]


def _send(address, key, x, batch, start=0, upto=None, retries=3):
    from client.api import ApiError, ModelClient
    acked = 0
    with ModelClient(address, api_key=key, timeout=60.0) as cl:
        for i in range(start, len(x) if upto is None else upto, batch):
            for attempt in range(retries):
                try:
                    cl.predict_batch(x[i:i + batch])
                    acked += len(x[i:i + batch])
                    break
                except ApiError:
                    if attempt == retries - 1:
                        raise
                    time.sleep(0.5)
    return acked



def _near_copy_stream(lo, n=600, seed=1):
    """A JBDA-like stream (sign steps of 0.1 around 100 seed images from test images lo..lo+999):
    each test its own images, so cross-client linking does not tie the tests' attackers."""
    fx = data.load("fashion", "test").x.astype(np.float32) / 255.0
    rng = np.random.default_rng(seed)
    jb = [fx[lo + rng.choice(1000, 100, replace=False)]]
    while sum(len(s) for s in jb) < n:
        cur = np.concatenate(jb)
        jb.append(np.clip(cur + 0.1 * np.sign(rng.standard_normal(cur.shape)), 0, 1))
    return np.concatenate(jb)[:n].astype(np.float32)


def _within(got, ref, tol=0.10):
    return abs(got - ref) <= tol * ref


def test_an_attacker_spread_over_all_three_replicas_is_escalated_as_on_one_server(
        cluster, small_target):
    """Worst case for a balancer: every request of one key goes to the next replica in turn
    (bypassing nginx's key hash). Each replica takes the client over from the store."""
    x = _near_copy_stream(5000)
    batch = 30
    ref = _single_server_reference(small_target[0], x, batch)
    assert ref, "the near-copy stream escalates on one server"
    for i in range(0, len(x), batch):
        _send(cluster.replica_address((i // batch) % 3), "mallory-rr", x, batch, i, i + batch)
    cid = _client_id(cluster, "mallory-rr")
    st = PgStore(cluster.pg.dsn, "reader")
    try:
        got = [(t["qn"], t["to_level"]) for t in st.transitions(cid)]
        replicas = {r["replica"] for r in st.execute(
            "SELECT DISTINCT replica FROM requests WHERE client=%s", (cid,))}
        assert st.max_qn(cid) == len(x)
    finally:
        st.close()
    assert replicas == {"r1", "r2", "r3"}
    print(f"\nsingle server: {ref}\n3 replicas, round robin: {got}")
    assert [lv for _, lv in got] == [lv for _, lv in ref]
    for (q, _), (qr, _) in zip(got, ref):
        assert _within(q, qr), (got, ref)


def test_a_replica_killed_mid_attack_its_client_continues_elsewhere_with_its_level(
        cluster, small_target):
    """Through nginx (one address, routed by key): the attacker's replica is killed with
    SIGKILL halfway; the next requests reach another replica, which restores the client's
    level and detector state from PostgreSQL; every acknowledged query is in the log."""
    x = _near_copy_stream(7000)
    batch = 30
    ref = _single_server_reference(small_target[0], x, batch)
    assert ref[0][0] < 180 < ref[-1][0]
    half = 180        # after its first escalation (160 on one server), before its second (200)
    acked = _send(cluster.address, "mallory-kill", x, batch, 0, half)
    cid = _client_id(cluster, "mallory-kill")
    st = PgStore(cluster.pg.dsn, "reader")
    try:
        owner = st.owner(cid)
        level_before = st.last_level(cid)
        assert level_before > Level.NORMAL          # escalated before the kill
        victim = int(owner[1:]) - 1
        cluster.kill_replica(victim)
        t0 = time.monotonic()
        acked += _send(cluster.address, "mallory-kill", x, batch, half)
        took = time.monotonic() - t0
        new_owner = st.owner(cid)
        got = [(t["qn"], t["from_level"], t["to_level"]) for t in st.transitions(cid)]
        by = [t["replica"] for t in st.transitions(cid)]
        logged = st.max_qn(cid)
    finally:
        st.close()
        cluster.start_replica(victim)
    print(f"\nkilled {owner}; continued on {new_owner} ({took:.1f} s for {len(x) - half} "
          f"queries); acknowledged {acked}, logged {logged}\nsingle server: {ref}\n"
          f"cluster: {got}")
    assert new_owner != owner
    assert acked == len(x) and logged >= acked      # nothing acknowledged was lost
    # the level was kept: no transition restarts from NORMAL after the handover
    assert all(f < to for _, f, to in got) and \
        [to for *_, to in got] == sorted(to for *_, to in got)
    assert [to for *_, to in got] == [lv for _, lv in ref]
    for (q, *_), (qr, _) in zip(got, ref):
        assert _within(q, qr), (got, ref)
    # the escalation after the kill was decided on the new replica, from the restored state
    assert by[0] == owner and by[-1] == new_owner and got[-1][0] > half


def test_the_cluster_recovers_by_itself_when_postgresql_restarts(cluster):
    """PostgreSQL restarted under load: while it is down a call waits for its commit and is
    refused (UNAVAILABLE, fail-closed: the shipped default) if that takes longer than
    log.commit_timeout_seconds; afterwards the replicas serve again without any manual step and
    every acknowledged query is logged."""
    from client.api import ApiError, ModelClient
    rng = np.random.default_rng(9)
    x = rng.integers(0, 256, (16, 28, 28)).astype(np.uint8)
    refused, acked, slowest = 0, 0, 0.0
    window = {}

    def restart():
        time.sleep(0.5)
        window["down"] = time.monotonic()
        cluster.pg.restart()
        window["up"] = time.monotonic()

    th = threading.Thread(target=restart)
    th.start()
    during = 0
    with ModelClient(cluster.address, api_key="steady", timeout=30.0) as cl:
        t_end = time.monotonic() + 60
        while time.monotonic() < t_end and not ("up" in window and
                                                 time.monotonic() > window["up"] + 1.0):
            t0 = time.monotonic()
            try:
                cl.predict_batch(x)
                acked += len(x)
            except ApiError as exc:
                assert exc.code.name == "UNAVAILABLE", exc
                refused += 1
                time.sleep(0.1)
            t1 = time.monotonic()
            slowest = max(slowest, t1 - t0)
            if "down" in window and t1 > window["down"] and ("up" not in window or
                                                             t0 < window["up"]):
                during += 1
    th.join()
    assert during > 0                 # calls were made while PostgreSQL was restarting
    cid = _client_id(cluster, "steady")
    st = PgStore(cluster.pg.dsn, "reader")
    try:
        assert st.max_qn(cid) >= acked > 0
    finally:
        st.close()
    print(f"\nPostgreSQL restarted during load (down {window['up'] - window['down']:.1f} s): "
          f"{during} calls overlapped the restart, {refused} refused (UNAVAILABLE), slowest "
          f"{slowest:.2f} s; {acked} queries acknowledged, all logged")


def test_serve_with_store_keeps_the_monitor_state_in_postgresql(pg, small_target, tmp_path):
    """`python -m service serve --store DSN --replica NAME`: the ordinary server whose monitor
    state lives in PostgreSQL: a client's queries are logged there (not in a SQLite file) and
    another replica on the same store restores the client's level."""
    import psycopg

    from client.api import ModelClient
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server
    from tests.conftest import TEST_SECRET

    srv, schema = pg
    with psycopg.connect(srv.dsn, autocommit=True) as con:
        con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    dsn = f"{srv.dsn}{'&' if '?' in srv.dsn else '?'}options=-csearch_path%3D{schema}"
    x = data.attack_pool().x[:40]

    def serve(name):
        cfg = ServerConfig(port=0, target=small_target[0], artifacts=tmp_path, store=dsn,
                           replica=name, monitor_db=tmp_path / "unused.db", secret=TEST_SECRET,
                           open_keys=True, grace_s=0.5, undefended=True)
        return Server(cfg, build_dataplane(cfg)).start()

    s1 = serve("r1")
    try:
        with ModelClient(s1.address, "pg-user") as c:
            c.predict(x)
        s1.plane.monitor.flush()
        cid = s1.client_id("pg-user")
        assert s1.plane.monitor.store.max_qn(cid) == 40
    finally:
        s1.stop(0.5)
    assert not (tmp_path / "unused.db").exists()        # nothing went to SQLite
    s2 = serve("r2")
    try:
        assert s2.plane.monitor.queries(cid) == 40      # the other replica restores the client
    finally:
        s2.stop(0.5)


def test_snapshot_copies_a_shared_store_into_a_sqlite_log_the_tools_read(
        pg_server, pg_schema, streams, reference, tmp_path, capsys):
    """`python -m monitor snapshot`: what replicas wrote to PostgreSQL becomes a SQLite log with
    the same decisions, transitions, checkpoints and watermark records; an existing output and
    an unreachable store are refused with a message."""
    from monitor.cli import main as cli
    dec, _ = reference
    x, p = streams["natural"]
    wm = np.zeros(30, bool)
    wm[[2, 11]] = True
    with SharedMonitor(_cfg(), PgStore(pg_server.dsn, "r1", schema=pg_schema),
                       clock=FakeClock()) as mon:
        _run(mon, streams)
        sent = _answer(p[:30], wm)
        mon.observe("marked", "m-0", x[:30], p[:30], sent, mon.level("marked"))
    out = tmp_path / "snap.db"
    assert cli(["snapshot", "--store", pg_server.dsn, "--pg-schema", pg_schema, str(out)]) == 0
    assert "61 requests" in capsys.readouterr().out     # 3 clients x 20 requests + 1
    with QueryLog(out) as q:
        assert sorted(q.client_ids()) == ["jbda", "marked", "mnist", "natural"]
        for c in dec:
            s = q.series(c)
            got = np.column_stack([s[k] for k in SCORE_COLUMNS] + [s["fired"],
                                                                   s["level_after"]])
            np.testing.assert_array_equal(got, dec[c][0], err_msg=c)
            assert [(t["qn"], t["from_level"], t["to_level"], t["rule"])
                    for t in q.transitions(c)] == dec[c][1]
        imgs, labels, cids = q.watermark_records()
        assert cids == ["marked", "marked"]
        np.testing.assert_array_equal(imgs, x[:30][wm])
        np.testing.assert_array_equal(labels, sent.labels[wm])
        assert q.load_state("jbda")["qn"] == 600              # checkpoints came along
    assert cli(["--db", str(out), "clients"]) == 0
    assert "jbda" in capsys.readouterr().out
    # refused: an existing output (left untouched), an unreachable store (nothing written)
    before = out.stat().st_size
    assert cli(["snapshot", "--store", pg_server.dsn, "--pg-schema", pg_schema, str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.stat().st_size == before
    bad = tmp_path / "bad.db"
    assert cli(["snapshot", "--store", "postgresql://nobody@127.0.0.1:1/none", str(bad)]) == 2
    assert "cannot read the store" in capsys.readouterr().err and not bad.exists()


def test_retention_deletes_old_rows_but_keeps_watermark_records(pg_server, pg_schema):
    """log.retention_days on PostgreSQL, as on SQLite: rows older than the newest by more than
    the retention go, rows holding watermarked answers (the proof) stay."""
    from tests.test_monitor_durability import _batch
    day = 86400.0
    st = PgStore(pg_server.dsn, "r1", schema=pg_schema, retention_days=2.0,
                 retention_every=3600.0)
    for b in (_batch("a", 0, 1e9),                        # 10 days before the newest: deleted
              _batch("a", 4, 1e9, watermarked=True),      # as old, but holds the proof: kept
              _batch("a", 8, 1e9 + 9 * day),              # within 2 days of the newest: kept
              _batch("a", 12, 1e9 + 10 * day)):
        st.put_batch(b)
    st.flush()
    kept = lambda: [r["qn0"] for r in st.execute("SELECT qn0 FROM requests ORDER BY qn0")]  # noqa: E731
    assert kept() == [0, 4, 8, 12]          # not before the period has passed
    st._writer._last_retention = float("-inf")  # the period is over: the next commit prunes
    st.put_batch(_batch("a", 16, 1e9 + 10 * day))
    st.flush()
    assert kept() == [4, 8, 12, 16] and st.pruned == 1
    st.close()


def test_size_cap_deletes_the_oldest_rows_and_keeps_the_counter_exact(pg_server, pg_schema):
    """log.max_mb on PostgreSQL, as on SQLite: above the cap the oldest request rows go, those
    without watermarked answers first, down to 90% of it; the size counter always equals the
    bytes of the rows that are there (through inserts, retention, the cap and a reopen), and a
    store made before the counter existed is counted when it is opened."""
    from monitor.pgstore import ROW_BYTES, create_schema
    from tests.test_monitor_durability import _batch

    def real():    # the rows' bytes, counted from scratch
        return int(st.execute(f"SELECT coalesce(sum({ROW_BYTES}), 0)::bigint AS b "
                              "FROM requests")[0]["b"])

    def counter():
        return int(st.execute("SELECT coalesce(sum(bytes), 0)::bigint AS b FROM log_size")[0]["b"])

    kept = lambda: [(r["client"], r["qn0"]) for r in st.execute(  # noqa: E731
        "SELECT client, qn0 FROM requests ORDER BY seq")]
    st = PgStore(pg_server.dsn, "r1", schema=pg_schema, max_mb=0.0)
    for i in range(12):                        # 12 rows of ~3.5 kB; rows 4 and 5 are marked
        st.put_batch(_batch("a", 4 * i, 1e9 + i, watermarked=i in (4, 5)))
    st.flush()
    one = real() / 12
    assert kept() == [("a", 4 * i) for i in range(12)] and counter() == real() > 40_000
    st.close()

    # a cap of about 6 rows: the oldest unmarked rows go, down to 90% of it (5 rows), and no
    # more; the marked ones stay
    st = PgStore(pg_server.dsn, "r2", schema=pg_schema, max_mb=6.2 * one / 2 ** 20, cap_every=0)
    st.put_batch(_batch("b", 0, 1e9 + 20))
    st.flush()
    left = kept()
    assert real() <= 0.9 * 6.2 * one < real() + one and counter() == real()
    unmarked = [("a", 4 * i) for i in range(12) if i not in (4, 5)] + [("b", 0)]
    assert left == [("a", 16), ("a", 20)] + unmarked[-3:]     # the oldest unmarked ones went
    assert st.pruned == 8
    # a cap below the marked rows themselves: every unmarked row goes, then the oldest marked
    st.max_mb = 2.0 * one / 2 ** 20
    st.put_batch(_batch("b", 4, 1e9 + 21))
    st.flush()
    assert real() <= 0.9 * 2.0 * one and counter() == real() and kept() == [("a", 20)]
    st.close()

    # a store from before the counter: its rows are counted when it is next opened
    with psycopg.connect(pg_server.dsn, autocommit=True) as con:
        con.execute(f'DELETE FROM "{pg_schema}".log_size')
    create_schema(pg_server.dsn, pg_schema)
    st = PgStore(pg_server.dsn, "r3", schema=pg_schema)
    assert counter() == real() > 0
    st.close()
