"""Chaos benchmark: the server under hostile clients, crashes and a full disk (``make chaos``).

    python -m lab.chaos                         # every section, results/chaos/chaos.{md,json}
    python -m lab.chaos --only kill9,diskfull   # some of them

Sections (each starts its own server process on 127.0.0.1 with ``--open-keys`` and a 64-byte
secret, the shipped default monitor config unless said otherwise):

``kill9``     8 clients x batch 64 (4 send pool images, 4 send JBDA-like near-copies that
              escalate), ``kill -9`` of the server after ``--kill-after`` seconds, once with
              ``log.durability = "commit"`` (the default) and once with "fast". Acknowledged
              images vs logged ones per client, ``PRAGMA integrity_check``, the highest level a
              client was answered at before the kill vs the level its first request after the
              restart is answered at (from the log), time to ServerReady and the latency of
              every client's first request after the restart, all 8 at once (then the same 8
              again, warm, as the reference); then a second ``kill -9`` and restart without
              load, and every client's first request sent one at a time (and again, warm).
``diskfull``  the log on a small tmpfs (needs root to mount; skipped otherwise), 4 clients; a
              ballast file fills the disk, then is deleted: health status over time, answers by
              status code, seconds until SERVING again, acknowledged vs logged.
``sigterm``   SIGTERM under load (8 clients x batch 64): exit code and time, acknowledged vs
              logged, clients with a checkpoint, tracebacks in the server log.
``churn``     10,000 keys x 1 query, then 300 keys x 512 images, against a server with
              ``execution.max_rss_mb`` set: its RSS sampled every 0.1 s throughout (peak under
              load, after each phase, after idling) against that cap.
``fuzz``      a matrix of malformed requests (status per case) and 10,000 fuzzed requests
              (random bytes and random field values): status codes, crashes, server RSS growth.
``writeamp``  8 requests of 512 pool images with a request id of the maximum length (128 bytes)
              over two keys: bytes on the wire vs bytes the log grew by, per request (committed
              when answered) and in all after the background checkpoints (every 2,000 queries
              of a client: one row per client, replaced).

The table at the end gives each figure with the issue's target next to it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

from lab.loadgen import PREDICT, encode_request
from lab.serving import HOST, REPO, ServerProcess, free_port, log
from monitor.checkpoints import checkpoint_path, connect_checkpoints

SECRET = "chaos-" + "5e" * 29          # 64 bytes: a production-length secret, fixed for replay
SECTIONS = ("kill9", "diskfull", "sigterm", "churn", "fuzz", "writeamp")


def client_id(key: str) -> str:
    """The client id the server logs for ``key`` in open mode (a keyed hash of the key)."""
    from common.keys import client_id_for_key
    return client_id_for_key(key, SECRET)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# --- servers and load ----------------------------------------------------------------------------
def write_config(path: Path, execution: dict | None = None, **log_keys) -> Path:
    """monitor/default.toml with some ``[log]`` (and ``[execution]``) keys changed."""
    import tomllib

    from common.tomlw import dumps
    d = tomllib.loads((REPO / "monitor" / "default.toml").read_text())
    d.setdefault("log", {}).update(log_keys)
    d.setdefault("execution", {}).update(execution or {})
    path.write_text(dumps(d))
    return path


def server(name: str, args, db: Path, workdir: Path, config: Path | None = None,
           port: int | None = None, extra: tuple = ()) -> ServerProcess:
    argv = [sys.executable, "-m", "service", "serve", "--host", HOST,
            "--port", str(port or free_port()), "--workers", "8", "--torch-threads", "1",
            "--artifacts", str(args.artifacts), "--target", str(args.artifacts / "target.pt"),
            "--monitor-db", str(db), "--open-keys"]
    if config is not None:
        argv += ["--monitor-config", str(config)]
    argv += list(extra)
    return ServerProcess(name, argv, int(argv[argv.index("--port") + 1]),
                         workdir / f"{name}.log").start()


def health(address: str) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    try:
        with grpc.insecure_channel(address) as ch:
            r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""),
                                                     timeout=1.0)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.RpcError as exc:
        return f"error:{exc.code().name}"


def near_copy_stream(pool: np.ndarray, seed: int):
    """JBDA-like requests of uint8 images: 64 seeds, then signed steps of 26 grey levels."""
    rng = np.random.default_rng(seed)
    cur = pool[rng.choice(len(pool), 64, replace=False)].astype(np.int16)
    while True:
        yield cur.astype(np.uint8)
        cur = np.clip(cur + 26 * np.sign(rng.standard_normal(cur.shape)), 0, 255)


def natural_stream(pool: np.ndarray, seed: int, batch: int = 64):
    rng = np.random.default_rng(seed)
    while True:
        yield pool[rng.integers(0, len(pool), batch)]


class Load:
    """Client threads, one channel and key each, sending until stopped. ``acked[key]`` counts
    the images of every answered request; ``codes`` counts answers by status."""

    def __init__(self, address: str, streams: dict, timeout: float = 30.0):
        self.address, self.streams, self.timeout = address, streams, timeout
        self.acked = Counter()
        self.codes: Counter = Counter()
        self.stop_ev = threading.Event()
        self.first_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                        for k in streams]

    def start(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def _run(self, key: str) -> None:
        import grpc
        ch = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)])
        call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
        md = (("x-api-key", key),)
        for x in self.streams[key]:
            if self.stop_ev.is_set():
                break
            req = encode_request(x, "packed")
            t0 = time.monotonic()
            try:
                call(req, metadata=md, timeout=self.timeout)
            except grpc.RpcError as exc:
                with self._lock:
                    self.codes[exc.code().name] += 1
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    time.sleep(0.05)
                continue
            with self._lock:
                self.codes["OK"] += 1
                self.acked[key] += len(x)
                self.first_ms.setdefault(key, 1000 * (time.monotonic() - t0))
        ch.close()

    def stop(self, join: float = 30.0) -> None:
        self.stop_ev.set()
        for t in self.threads:
            t.join(join)


def one_each(address: str, keys: list[str], pool: np.ndarray) -> dict[str, float]:
    """Every key sends one request of 64 pool images at once; latency (ms) per key."""
    streams = {k: iter([pool[:64]]) for k in keys}
    ld = Load(address, streams, timeout=60.0).start()
    ld.stop(join=120.0)
    return ld.first_ms


# --- reading the log ----------------------------------------------------------------------------
def log_facts(db: Path, keys: list[str]) -> dict:
    """Per key: logged images, the highest level answered, the last transition's level; the
    database's integrity check. Read in a fresh connection (read-only)."""
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    out = {"integrity": con.execute("PRAGMA integrity_check").fetchone()[0], "keys": {}}
    cpath = checkpoint_path(db)
    ck = connect_checkpoints(cpath, create=False) if cpath.exists() else None
    for k in keys:
        c = client_id(k)
        logged = con.execute("SELECT coalesce(max(qn0 + n), 0) FROM requests WHERE client=?",
                             (c,)).fetchone()[0]
        top = con.execute("SELECT coalesce(max(level), 0) FROM requests WHERE client=?",
                          (c,)).fetchone()[0]
        last = con.execute("SELECT to_level FROM transitions WHERE client=? ORDER BY id DESC "
                           "LIMIT 1", (c,)).fetchone()
        ckpt = None if ck is None else ck.execute(
            "SELECT max(qn) FROM (SELECT qn FROM client_state WHERE client=? UNION ALL "
            "SELECT qn FROM client_delta WHERE client=?) HAVING count(*)", (c, c)).fetchone()
        out["keys"][k] = {"logged": int(logged), "answered_level_max": int(top),
                          "last_transition": int(last[0]) if last else 0,
                          "checkpoint_qn": int(ckpt[0]) if ckpt else None}
    con.close()
    if ck is not None:
        ck.close()
    return out


def level_of_next(db: Path, key: str, after_qn: int) -> int | None:
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    r = con.execute("SELECT level FROM requests WHERE client=? AND qn0 >= ? ORDER BY qn0 LIMIT 1",
                    (client_id(key), after_qn)).fetchone()
    con.close()
    return None if r is None else int(r[0])


# --- sections ------------------------------------------------------------------------------------
def section_kill9(args, pool, workdir: Path, res: dict) -> None:
    for mode in ("commit", "fast"):
        log(f"kill9 ({mode}): 8 clients x batch 64, kill -9 after {args.kill_after:g} s")
        db = workdir / f"kill9-{mode}.db"
        cfg = write_config(workdir / f"kill9-{mode}.toml", durability=mode)
        s = server(f"kill9-{mode}", args, db, workdir, cfg)
        s.wait_ready()
        keys = [f"kill9-{mode}-nat-{i}" for i in range(4)] + \
               [f"kill9-{mode}-jbda-{i}" for i in range(4)]
        streams = {k: (natural_stream(pool, i) if "nat" in k else near_copy_stream(pool, i))
                   for i, k in enumerate(keys)}
        ld = Load(s.address, streams).start()
        time.sleep(args.kill_after)
        s.kill9()
        ld.stop()
        facts = log_facts(db, keys)
        lost = {k: max(0, ld.acked[k] - facts["keys"][k]["logged"]) for k in keys}
        log(f"  {sum(ld.acked.values()):,} images acknowledged, "
            f"{sum(f['logged'] for f in facts['keys'].values()):,} logged, "
            f"{sum(lost.values()):,} acknowledged but not logged; integrity "
            f"{facts['integrity']}")
        s2 = server(f"kill9-{mode}-restart", args, db, workdir, cfg, port=free_port())
        ready_s = s2.wait_ready()
        first = one_each(s2.address, keys, pool)
        again = one_each(s2.address, keys, pool)   # the same, restored and warm: the reference
        # a second kill -9 and restart (no load in between): every client's first request
        # sent one at a time, what restoring costs a request without 7 others queued with it
        s2.kill9()
        s3 = server(f"kill9-{mode}-restart2", args, db, workdir, cfg, port=free_port())
        s3.wait_ready()
        alone, alone_again = {}, {}
        for k in keys:
            alone.update(one_each(s3.address, [k], pool))
        for k in keys:
            alone_again.update(one_each(s3.address, [k], pool))
        s3.stop()
        lowered = []
        for k in keys:
            f = facts["keys"][k]
            after = level_of_next(db, k, f["logged"])
            f["level_after_restart"] = after
            if after is None or after < f["answered_level_max"]:
                lowered.append(k)
        res[f"kill9_{mode}"] = {
            "acked": sum(ld.acked.values()), "logged": sum(f["logged"] for f in
                                                           facts["keys"].values()),
            "acked_not_logged": sum(lost.values()), "integrity": facts["integrity"],
            "escalated_clients": sum(f["answered_level_max"] > 0 for f in facts["keys"].values()),
            "escalations_lost": len(lowered), "ready_s": round(ready_s, 2),
            "first_ms_median": round(float(np.median(list(first.values()))), 1) if first else None,
            "first_ms_max": round(max(first.values()), 1) if first else None,
            "again_ms_median": _ms(again, np.median), "again_ms_max": _ms(again, max),
            "alone_first_ms_median": _ms(alone, np.median), "alone_first_ms_max": _ms(alone, max),
            "alone_again_ms_median": _ms(alone_again, np.median),
            "alone_again_ms_max": _ms(alone_again, max),
            "answered_after_restart": len(first), "clients": len(keys), "per_key": facts["keys"]}
        log(f"  restart: ready after {ready_s:.1f} s; first requests median "
            f"{res[f'kill9_{mode}']['first_ms_median']} ms, max {res[f'kill9_{mode}']['first_ms_max']}"
            f" ms; escalations lost {len(lowered)} of "
            f"{res[f'kill9_{mode}']['escalated_clients']}")
        r = res[f"kill9_{mode}"]
        log(f"  all at once again: median {r['again_ms_median']}, max {r['again_ms_max']} ms; "
            f"after a second restart, one at a time: first median {r['alone_first_ms_median']}, "
            f"max {r['alone_first_ms_max']} ms; again median {r['alone_again_ms_median']}, max "
            f"{r['alone_again_ms_max']} ms")


def _ms(lat: dict[str, float], f) -> float | None:
    return round(float(f(list(lat.values()))), 1) if lat else None


def _fill(path: Path) -> int:
    """Write zeros into ``path`` until the disk is full; bytes written."""
    n = 0
    block = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as fh:
        while True:
            try:
                n += fh.write(block)
            except OSError:
                break
        with contextlib.suppress(OSError):
            while True:
                n += fh.write(b"\0" * 4096)
    return n


def section_diskfull(args, pool, workdir: Path, res: dict) -> None:
    mnt = workdir / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.tmpfs_mb}m", "tmpfs",
                        str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        res["diskfull"] = {"skipped": f"cannot mount a tmpfs ({r.stderr.strip() or r.returncode})"
                           "; run as root"}
        log(f"diskfull skipped: {res['diskfull']['skipped']}")
        return
    try:
        log(f"diskfull: the log on a {args.tmpfs_mb} MB tmpfs, 4 clients x batch 64")
        db = mnt / "monitor.db"
        s = server("diskfull", args, db, workdir)
        s.wait_ready()
        keys = [f"disk-{i}" for i in range(4)]
        ld = Load(s.address, {k: natural_stream(pool, 100 + i) for i, k in enumerate(keys)},
                  timeout=15.0).start()
        timeline = []
        t0 = time.monotonic()

        def sample(phase):
            timeline.append((round(time.monotonic() - t0, 2), phase, health(s.address),
                             dict(ld.codes)))

        time.sleep(2.0)
        sample("before")
        ballast = mnt / "ballast"
        wrote = _fill(ballast)
        t_full = time.monotonic()
        codes_full0 = Counter(ld.codes)
        not_serving_after = None
        while time.monotonic() - t_full < args.full_for:
            h = health(s.address)
            if h != "SERVING" and not_serving_after is None:
                not_serving_after = time.monotonic() - t_full
            time.sleep(0.2)
        sample("full")
        codes_full = Counter(ld.codes)
        codes_full.subtract(codes_full0)
        ballast.unlink()
        t_free = time.monotonic()
        serving_after = None
        while time.monotonic() - t_free < 60:
            if health(s.address) == "SERVING":
                serving_after = time.monotonic() - t_free
                break
            time.sleep(0.1)
        ok0 = ld.codes["OK"]
        time.sleep(2.0)
        sample("freed")
        answers_after = ld.codes["OK"] - ok0
        ld.stop()
        s.stop(grace=60.0)
        facts = log_facts(db, keys)
        lost = sum(max(0, ld.acked[k] - facts["keys"][k]["logged"]) for k in keys)
        res["diskfull"] = {
            "ballast_mb": round(wrote / 2 ** 20, 1), "health_left_serving_after_s":
                None if not_serving_after is None else round(not_serving_after, 2),
            "answers_while_full": {k: v for k, v in codes_full.items() if v},
            "serving_again_after_s": None if serving_after is None else round(serving_after, 2),
            "answers_in_2s_after": answers_after, "acked": sum(ld.acked.values()),
            "logged": sum(f["logged"] for f in facts["keys"].values()),
            "acked_not_logged": lost, "integrity": facts["integrity"],
            "exit_code": s.proc.returncode, "timeline": timeline}
        log(f"  health left SERVING {not_serving_after} s after the disk filled; answers while "
            f"full {dict(codes_full)}; SERVING again {serving_after} s after space returned; "
            f"acknowledged but not logged: {lost}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def section_sigterm(args, pool, workdir: Path, res: dict) -> None:
    log("sigterm: 8 clients x batch 64, SIGTERM under load")
    db = workdir / "sigterm.db"
    s = server("sigterm", args, db, workdir)
    s.wait_ready()
    keys = [f"term-nat-{i}" for i in range(4)] + [f"term-jbda-{i}" for i in range(4)]
    streams = {k: (natural_stream(pool, 200 + i) if "nat" in k else
                   near_copy_stream(pool, 200 + i)) for i, k in enumerate(keys)}
    ld = Load(s.address, streams).start()
    time.sleep(args.kill_after)
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        code = s.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        code = None
        s.kill9()
    exit_s = time.monotonic() - t0
    ld.stop()
    s._close()
    facts = log_facts(db, keys)
    text = s.log_path.read_text(errors="replace")
    res["sigterm"] = {
        "exit_code": code, "exit_s": round(exit_s, 2), "acked": sum(ld.acked.values()),
        "logged": sum(f["logged"] for f in facts["keys"].values()),
        "acked_not_logged": sum(max(0, ld.acked[k] - facts["keys"][k]["logged"]) for k in keys),
        "checkpointed_clients": sum(f["checkpoint_qn"] == f["logged"] and f["logged"] > 0
                                    for f in facts["keys"].values()),
        "clients": len(keys), "tracebacks": text.count("Traceback"),
        "integrity": facts["integrity"]}
    log(f"  exit {code} after {exit_s:.1f} s; acknowledged but not logged "
        f"{res['sigterm']['acked_not_logged']}; checkpointed "
        f"{res['sigterm']['checkpointed_clients']}/{len(keys)}; tracebacks "
        f"{res['sigterm']['tracebacks']}")


class RssSampler:
    """A process's RSS every ``every`` seconds in a thread: peak and samples per phase."""

    def __init__(self, pid: int, every: float = 0.1):
        self.pid, self.every = pid, every
        self.phase = "start"
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                v = rss_mb(self.pid)
            except OSError:
                return
            self.peak[self.phase] = max(self.peak.get(self.phase, 0.0), v)

    def __enter__(self) -> "RssSampler":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def _run_all(threads: list[threading.Thread]) -> float:
    """Start the threads, wait for all; the seconds it took (one decimal)."""
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return round(time.monotonic() - t0, 1)


def section_churn(args, pool, workdir: Path, res: dict) -> None:
    import grpc
    log(f"churn: {args.churn_keys:,} keys x 1 query, then {args.churn_big:,} keys x 512 images "
        f"(execution.max_rss_mb = {args.rss_mb:g}, max_state_mb = {args.state_mb:g})")
    mport = free_port()
    cfg = write_config(workdir / "churn.toml", execution={"max_state_mb": args.state_mb,
                                                          "max_rss_mb": args.rss_mb})
    s = server("churn", args, workdir / "churn.db", workdir, cfg,
               extra=("--metrics-port", str(mport)))
    s.wait_ready()
    out = {"rss_start_mb": round(rss_mb(s.pid), 1), "max_state_mb": args.state_mb,
           "max_rss_mb": args.rss_mb, "small_keys": args.churn_keys, "big_keys": args.churn_big,
           "settle_s": args.settle}
    ch = grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 8 << 20),
                                                    ("grpc.max_receive_message_length", 8 << 20)])
    call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    codes = Counter()
    one = encode_request(pool[:1], "packed")

    def send(keys, req):
        for k in keys:
            try:
                call(req, metadata=(("x-api-key", k),), timeout=60)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1

    with RssSampler(s.pid) as rs:
        rs.phase = "small"
        keys = [f"churn-{i}" for i in range(args.churn_keys)]
        out["small_keys_s"] = _run_all([threading.Thread(target=send, args=(keys[i::4], one))
                                        for i in range(4)])
        out["rss_after_small_mb"] = round(rss_mb(s.pid), 1)
        rng = np.random.default_rng(7)
        big = [encode_request(np.clip(pool[rng.integers(0, len(pool), 512)].astype(np.int16) +
                                      rng.integers(-8, 9, (512, 28, 28)), 0, 255
                                      ).astype(np.uint8), "packed") for _ in range(8)]
        bkeys = [f"churn-big-{i}" for i in range(args.churn_big)]
        rs.phase = "big"
        out["big_keys_s"] = _run_all([threading.Thread(
            target=lambda j=j: [send([k], big[(i + j) % 8]) for i, k in enumerate(bkeys[j::2])])
            for j in range(2)])
        out["rss_after_big_mb"] = round(rss_mb(s.pid), 1)
        rs.phase = "idle"
        time.sleep(args.settle)     # idle: what the server keeps (it trims its heap every second)
        out["rss_settled_mb"] = round(rss_mb(s.pid), 1)
    out["rss_peak_mb"] = {k: round(v, 1) for k, v in rs.peak.items()}
    out["codes"] = dict(codes)
    out["resident_state_mb"] = round(scrape(mport, "modelguard_monitor_resident_state_bytes")
                                      / 2 ** 20, 1)
    out["state_budget_mb"] = round(scrape(mport, "modelguard_monitor_state_budget_bytes")
                                   / 2 ** 20, 1)
    out["resident_clients"] = scrape(mport, "modelguard_monitor_resident_clients")
    ch.close()
    s.stop()
    res["churn"] = out
    log(f"  RSS {out['rss_start_mb']} MB at start, {out['rss_after_small_mb']} after the small "
        f"keys, {out['rss_after_big_mb']} after the big ones, {out['rss_settled_mb']} idle; "
        f"peaks {out['rss_peak_mb']}; resident detector state {out['resident_state_mb']} MB "
        f"over {out['resident_clients']:.0f} clients (budget {out['state_budget_mb']} MB); "
        f"answers {dict(codes)}")


def scrape(port: int, name: str) -> float:
    """One gauge from the server's Prometheus endpoint."""
    import urllib.request
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


def bad_inputs():
    """(case, serialized request bytes) of malformed Predict requests."""
    from protos import inference_pb2 as pb
    x = np.zeros((2, 28, 28), np.uint8)
    ok = dict(datatype="UINT8", shape=[2, 28, 28], raw_input=x.tobytes())

    def req(**kw):
        return pb.PredictRequest(**{**ok, **kw}).SerializeToString()

    return [
        ("wrong shape", req(shape=[2, 27, 28])),
        ("shape/bytes mismatch", req(raw_input=x.tobytes()[:-1])),
        ("unknown datatype", req(datatype="INT7")),
        ("100 KB datatype", req(datatype="X" * 100_000)),
        ("negative dim", req(shape=[-2, 28, 28])),
        ("huge dim", req(shape=[2 ** 40, 28, 28])),
        ("no dims", req(shape=[])),
        ("FP32 NaN", req(datatype="FP32", raw_input=np.full((2, 28, 28), np.nan,
                                                            np.float32).tobytes())),
        ("FP32 inf", req(datatype="FP32", raw_input=np.full((2, 28, 28), np.inf,
                                                            np.float32).tobytes())),
        ("batch over the limit", req(shape=[4096, 28, 28],
                                     raw_input=np.zeros((4096, 28, 28), np.uint8).tobytes())),
        ("empty batch", req(shape=[0, 28, 28], raw_input=b"")),
        ("1 MB request id", req(id="i" * (1 << 20))),
        ("unknown format enum 99", req(format=99)),
        ("truncated protobuf", req()[:-5]),
        ("random bytes", bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8))),
    ]


def section_fuzz(args, pool, workdir: Path, res: dict) -> None:
    import grpc
    log(f"fuzz: the bad-input matrix, then {args.fuzz:,} fuzzed requests")
    s = server("fuzz", args, workdir / "fuzz.db", workdir)
    s.wait_ready()
    ch = grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 64 << 20)])
    call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    md = (("x-api-key", "fuzzer"),)

    def code_of(raw: bytes) -> tuple[str, str]:
        try:
            call(raw, metadata=md, timeout=30)
            return "OK", ""
        except grpc.RpcError as exc:
            return exc.code().name, (exc.details() or "")

    matrix = []
    for name, raw in bad_inputs():
        code, details = code_of(raw)
        matrix.append({"case": name, "code": code, "details_len": len(details),
                       "details": details[:120]})
    warm = encode_request(pool[:8], "packed")
    for _ in range(50):
        code_of(warm)
    from protos import inference_pb2 as pb
    rng = np.random.default_rng(1)
    codes = Counter()
    dtypes = ["UINT8", "FP32", "FP16", "INT64", "", "uint8", "BYTES"]
    n_bad = args.fuzz * 2 // 3
    # 1. malformed: random bytes, and messages with random fields (the leak the issue saw was
    # here); RSS before and after, the client's own detector state does not grow
    rss0 = rss_mb(s.pid)
    for i in range(n_bad):
        if i % 2 == 0:
            raw = bytes(rng.integers(0, 256, int(rng.integers(1, 2048)), np.uint8))
        else:
            shape = [int(rng.integers(-3, 70)), int(rng.choice([28, 27, 0, 784])),
                     int(rng.choice([28, 1, 29]))][:int(rng.integers(0, 4))]
            raw = pb.PredictRequest(
                id="f" * int(rng.integers(0, 300)), datatype=str(rng.choice(dtypes)),
                shape=shape, raw_input=bytes(rng.integers(0, 256, int(rng.integers(0, 9000)),
                                                          np.uint8)),
                format=int(rng.integers(0, 4))).SerializeToString()
        codes[code_of(raw)[0]] += 1
        if i % 2000 == 1999:
            log(f"  {i + 1:,} malformed: {dict(codes)}")
    rss1 = rss_mb(s.pid) if s.alive() else float("nan")
    # 2. valid requests with a few bytes flipped (many still parse and are answered)
    for i in range(args.fuzz - n_bad):
        b = bytearray(encode_request(pool[rng.integers(0, len(pool), 2)], "packed"))
        for j in rng.integers(0, len(b), 4):
            b[j] = int(rng.integers(0, 256))
        codes[code_of(bytes(b))[0]] += 1
    alive = s.alive()
    rss2 = rss_mb(s.pid) if alive else float("nan")
    ch.close()
    s.stop()
    res["fuzz"] = {"matrix": matrix, "codes": dict(codes), "alive": alive, "malformed": n_bad,
                   "rss_before_mb": round(rss0, 1), "rss_after_malformed_mb": round(rss1, 1),
                   "rss_growth_mb": round(rss1 - rss0, 1), "rss_after_all_mb": round(rss2, 1),
                   "internal": codes.get("INTERNAL", 0) +
                   sum(m["code"] == "INTERNAL" for m in matrix)}
    log(f"  codes {dict(codes)}; RSS {rss0:.1f} -> {rss1:.1f} MB over {n_bad:,} malformed "
        f"requests, {rss2:.1f} MB after the byte-flipped ones; alive {alive}")


# --- the table -----------------------------------------------------------------------------------
def section_writeamp(args, pool, workdir: Path, res: dict) -> None:
    import grpc
    log("writeamp: 8 requests of 512 images, 128-byte request ids, two keys")
    db = workdir / "writeamp.db"
    s = server("writeamp", args, db, workdir)
    s.wait_ready()

    def size() -> int:
        return sum(f.stat().st_size for f in workdir.glob("writeamp.*"))   # log, checkpoints

    ch = grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 8 << 20),
                                                    ("grpc.max_receive_message_length", 8 << 20)])
    call = ch.unary_unary(PREDICT, request_serializer=None, response_deserializer=None)
    rng = np.random.default_rng(3)
    rows, wire, start = [], 0, size()
    for k in range(8):
        req = encode_request(pool[rng.integers(0, len(pool), 512)], "packed", "r" * 128)
        before = size()
        call(req, metadata=(("x-api-key", f"writeamp-{k % 2}"),), timeout=60)
        rows.append((len(req), size() - before))   # commit mode: the row is on disk now
        wire += len(req)
    time.sleep(3.0)                                 # the background checkpoints land
    ch.close()
    s.stop()
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what stays on disk, counted once
    con.close()
    con = sqlite3.connect(checkpoint_path(db))
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    ckpt = con.execute("SELECT coalesce(sum(length(state)), 0), count(*) FROM (SELECT state "
                       "FROM client_state UNION ALL SELECT state FROM client_delta)").fetchone()
    con.close()
    total = size() - start
    # each key's 4th request takes it past 2,000 queries: its checkpoint lands in that window
    plain = [g / w for w, g in rows[:6]]
    res["writeamp"] = {"requests": [{"wire_bytes": w, "log_growth_bytes": g} for w, g in rows],
                       "wire_bytes": wire, "stored_bytes": total,
                       "checkpoint_bytes": int(ckpt[0]), "checkpoints": int(ckpt[1]),
                       "max_ratio_per_request": round(max(plain), 2),
                       "ratio_in_all": round(total / wire, 2)}
    log(f"  per request {', '.join(f'{g / w:.2f}x' for w, g in rows)} (the last two with a "
        f"client's checkpoint); stored after the stop {total:,} bytes for {wire:,} on the wire "
        f"({total / wire:.2f}x), of which {ckpt[1]} checkpoints {ckpt[0]:,} bytes")


def table(res: dict) -> list[str]:
    rows = []

    def row(case, measured, target, ok):
        rows.append(f"| {case} | {measured} | {target} | {'met' if ok else '**not met**'} |")

    for mode in ("commit", "fast"):
        r = res.get(f"kill9_{mode}")
        if r:
            row(f"kill -9, 8 clients x batch 64, durability {mode}: acknowledged but not logged",
                f"{r['acked_not_logged']:,} of {r['acked']:,}", "0 (commit mode)",
                r["acked_not_logged"] == 0 or mode == "fast")
            row(f"kill -9 ({mode}): escalations lost / integrity_check",
                f"{r['escalations_lost']} of {r['escalated_clients']} / {r['integrity']}",
                "0 / ok", r["escalations_lost"] == 0 and r["integrity"] == "ok")
            row(f"kill -9 ({mode}): restart, ServerReady / every client's first request",
                f"{r['ready_s']} s / median {r['first_ms_median']} ms, max {r['first_ms_max']} ms"
                f" ({r['answered_after_restart']}/{r['clients']} answered)",
                "every client within 1 s",
                r["answered_after_restart"] == r["clients"] and (r["first_ms_max"] or 1e9) < 1000)
            if r.get("alone_first_ms_max") is not None:
                row(f"kill -9 ({mode}): every client's first request after a restart, one at a "
                    "time (the same request again, warm)",
                    f"median {r['alone_first_ms_median']} ms, max {r['alone_first_ms_max']} ms "
                    f"(again: median {r['alone_again_ms_median']}, max "
                    f"{r['alone_again_ms_max']} ms)", "within 50 ms (issue 8)",
                    r["alone_first_ms_max"] <= 50)
                row(f"kill -9 ({mode}): the 8 first requests at once (the same 8 again, warm)",
                    f"median {r['first_ms_median']} ms, max {r['first_ms_max']} ms (again: "
                    f"median {r['again_ms_median']}, max {r['again_ms_max']} ms)",
                    "within 50 ms (issue 8)", (r["first_ms_max"] or 1e9) <= 50)
    r = res.get("diskfull")
    if r and "skipped" not in r:
        row("disk full: health leaves SERVING / answers while full",
            f"after {r['health_left_serving_after_s']} s / {r['answers_while_full']}",
            "NOT_SERVING, no INTERNAL", r["health_left_serving_after_s"] is not None and
            "INTERNAL" not in r["answers_while_full"])
        row("disk full: space returns -> SERVING again / answers in the next 2 s",
            f"after {r['serving_again_after_s']} s / {r['answers_in_2s_after']}",
            "recovers by itself", r["serving_again_after_s"] is not None and
            r["answers_in_2s_after"] > 0)
        row("disk full: acknowledged but not logged / integrity",
            f"{r['acked_not_logged']} of {r['acked']:,} / {r['integrity']}", "0 / ok",
            r["acked_not_logged"] == 0 and r["integrity"] == "ok")
    elif r:
        rows.append(f"| disk full | skipped: {r['skipped']} | | |")
    r = res.get("sigterm")
    if r:
        row("SIGTERM under load: exit code, time / acknowledged but not logged",
            f"{r['exit_code']}, {r['exit_s']} s / {r['acked_not_logged']} of {r['acked']:,}",
            "0 / 0", r["exit_code"] == 0 and r["acked_not_logged"] == 0)
        row("SIGTERM: clients checkpointed / tracebacks",
            f"{r['checkpointed_clients']}/{r['clients']} / {r['tracebacks']}", "all / 0",
            r["checkpointed_clients"] == r["clients"] and r["tracebacks"] == 0)
    r = res.get("churn")
    if r:
        peak = max(r["rss_peak_mb"].values()) if r.get("rss_peak_mb") else float("nan")
        row(f"key churn: {r['small_keys']:,} keys x 1 query, then {r['big_keys']:,} keys x 512 "
            f"images (max_rss_mb {r['max_rss_mb']:g}, max_state_mb {r['max_state_mb']:g}); RSS "
            "sampled every 0.1 s",
            f"RSS {r['rss_start_mb']} at start -> {r['rss_after_small_mb']} -> "
            f"{r['rss_after_big_mb']} MB, {r['rss_settled_mb']} after {r.get('settle_s', 8):g} s "
            f"idle; peak {peak:.1f} MB; resident state {r['resident_state_mb']} MB in "
            f"{r['resident_clients']:.0f} clients (budget {r.get('state_budget_mb', '?')} MB); "
            f"answers {r['codes']}",
            f"RSS <= max_rss_mb ({r['max_rss_mb']:g}) at every sample; every query answered",
            peak <= r["max_rss_mb"] and set(r["codes"]) == {"OK"})
    r = res.get("fuzz")
    if r:
        bad = [m["case"] for m in r["matrix"] if m["code"] in ("INTERNAL", "OK", "UNKNOWN",
                                                               "RESOURCE_EXHAUSTED")]
        row("bad-input matrix: cases not answered INVALID_ARGUMENT-like",
            ", ".join(bad) or "none", "no INTERNAL", not any(
                m["code"] == "INTERNAL" for m in r["matrix"]))
        row(f"{sum(r['codes'].values()):,} fuzzed requests: codes / alive / RSS growth over "
            f"the {r['malformed']:,} malformed ones",
            f"{r['codes']} / {r['alive']} / {r['rss_growth_mb']} MB",
            "0 INTERNAL, alive, < 50 MB", r["alive"] and r["internal"] == 0 and
            r["rss_growth_mb"] < 50)
    r = res.get("writeamp")
    if r:
        row("write amplification: 8 requests of 512 images + 128-byte ids over 2 keys; log "
            "growth / bytes on the wire: a request's rows (max of the 6 without a checkpoint) / "
            "stored in all after the stop, the 2 clients' checkpoints included",
            f"{r['max_ratio_per_request']}x / {r['ratio_in_all']}x ({r['stored_bytes']:,} "
            f"bytes for {r['wire_bytes']:,}; checkpoints {r['checkpoint_bytes']:,} of them)",
            "a small multiple (<= 2x per request's rows)", r["max_ratio_per_request"] <= 2.0)
    return ["| case | measured | target | verdict |", "|---|---|---|---|", *rows]


def write(res: dict, out: Path, argv: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(res, indent=2, default=str))
    lines = ["# Chaos benchmark (`python -m lab.chaos`)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
             f"command `python -m lab.chaos {' '.join(argv)}`", "", *table(res), ""]
    if res.get("fuzz"):
        lines += ["## Bad-input matrix", "", "| case | status | details (first 120 chars) |",
                  "|---|---|---|"] + [f"| {m['case']} | {m['code']} | {m['details'][:120]} |"
                                     for m in res["fuzz"]["matrix"]] + [""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in res["notes"]] + [""]
    (out / "chaos.md").write_text("\n".join(lines))


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m lab.chaos", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS),
                    help=f"comma-separated sections among {', '.join(SECTIONS)} (default all)")
    ap.add_argument("--kill-after", type=float, default=8.0, help="seconds of load before the "
                    "kill -9 / SIGTERM (8)")
    ap.add_argument("--tmpfs-mb", type=int, default=48, help="diskfull: tmpfs size (48)")
    ap.add_argument("--full-for", type=float, default=5.0, help="diskfull: seconds full (5)")
    ap.add_argument("--churn-keys", type=int, default=10_000)
    ap.add_argument("--churn-big", type=int, default=300)
    ap.add_argument("--settle", type=float, default=8.0,
                    help="churn: idle seconds before the settled RSS reading (8)")
    ap.add_argument("--state-mb", type=float, default=2048.0,
                    help="churn: execution.max_state_mb of its server (2048, the default)")
    ap.add_argument("--rss-mb", type=float, default=1024.0,
                    help="churn: execution.max_rss_mb of its server (1024)")
    ap.add_argument("--fuzz", type=int, default=10_000, help="fuzzed requests (10,000)")
    ap.add_argument("--artifacts", type=Path,
                    default=Path(os.environ.get("MODELGUARD_ARTIFACTS", REPO / "artifacts")))
    ap.add_argument("--out", type=Path, default=Path("results/chaos"))
    a = ap.parse_args(argv)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; expected some of {list(SECTIONS)}")
    if not (a.artifacts / "target.pt").exists():
        ap.error(f"no target checkpoint at {a.artifacts / 'target.pt'}; run `make models`")
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.environ["MODELGUARD_SECRET"] = SECRET        # the servers' secret (inherited)
    from common import data
    pool = np.ascontiguousarray(data.attack_pool().x)     # test images 0-4999, uint8
    workdir = Path(tempfile.mkdtemp(prefix="mg-lab-chaos-"))
    res: dict = {"notes": []}
    fns = {"kill9": section_kill9, "diskfull": section_diskfull, "sigterm": section_sigterm,
           "churn": section_churn, "fuzz": section_fuzz, "writeamp": section_writeamp}
    failed = []
    try:
        for name in args.sections:
            try:
                fns[name](args, pool, workdir, res)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - report it, run the other sections
                traceback.print_exc()
                res["notes"].append(f"section {name} failed: {type(exc).__name__}: {exc}")
                failed.append(name)
                ServerProcess.stop_all()
            write(res, args.out, argv)
    except KeyboardInterrupt:
        res["notes"].append("interrupted: results are partial")
        return 130
    finally:
        ServerProcess.stop_all()
        write(res, args.out, argv)
        for f in workdir.glob("*.db*"):
            with contextlib.suppress(OSError):
                f.unlink()
        log(f"\nwrote {args.out / 'chaos.md'} (server logs: {workdir})")
        print("\n".join(table(res)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
