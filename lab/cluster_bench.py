"""Scale-out benchmark: throughput through nginx with 1 vs 3 replicas on PostgreSQL, and the
escalation of a near-copy attacker (query count and wall time) on the cluster vs one server,
with one replica killed mid-attack. Drives real processes (deploy.cluster), from outside.

    python -m lab.cluster_bench [--seconds 15] [--clients 6] [--batch 64] [--out results/cluster]

Needs a trained target (make train) and PostgreSQL + nginx (installed when missing, as root).
On a 2-core machine three replicas share the same two cores as nginx, PostgreSQL and the load
generator: the gain is bounded by that, and is reported as measured.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _load(address: str, keys: list[str], x: np.ndarray, batch: int, seconds: float) -> dict:
    from client.api import ApiError, ModelClient

    done = {k: 0 for k in keys}
    errors = {k: 0 for k in keys}
    lat: list[float] = []
    end = time.monotonic() + seconds

    def run(k):
        rng = np.random.default_rng(hash(k) % 2**32)
        with ModelClient(address, api_key=k, timeout=30.0) as cl:
            while time.monotonic() < end:
                xb = x[rng.integers(0, len(x), batch)]
                t0 = time.perf_counter()
                try:
                    cl.predict_batch(xb)
                    done[k] += batch
                    lat.append(time.perf_counter() - t0)
                except ApiError:
                    errors[k] += 1

    ts = [threading.Thread(target=run, args=(k,)) for k in keys]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.monotonic() - t0
    lat_ms = np.array(lat) * 1e3
    return {"queries": sum(done.values()), "seconds": round(wall, 2),
            "queries_per_s": round(sum(done.values()) / wall, 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat_ms, 99)), 1) if len(lat) else None,
            "errors": sum(errors.values())}


def _stream(lo: int, n: int = 600) -> np.ndarray:
    from common import data
    fx = data.load("fashion", "test").x.astype(np.float32) / 255.0
    rng = np.random.default_rng(1)
    jb = [fx[lo + rng.choice(1000, 100, replace=False)]]
    while sum(len(s) for s in jb) < n:
        cur = np.concatenate(jb)
        jb.append(np.clip(cur + 0.1 * np.sign(rng.standard_normal(cur.shape)), 0, 1))
    return np.concatenate(jb)[:n].astype(np.float32)


def _attack(c, key: str, x: np.ndarray, batch: int, kill_at: int | None) -> dict:
    from client.api import ApiError, ModelClient
    from monitor.pgstore import PgStore
    from service.auth import KeyRing

    cid = KeyRing.open((c.root / "secret").read_text().strip()).client_id_of_key(key)
    st = PgStore(c.pg.dsn, "bench-reader")
    out: dict = {}
    t0 = time.monotonic()
    with ModelClient(c.address, api_key=key, timeout=60.0) as cl:
        for i in range(0, len(x), batch):
            if kill_at is not None and i == kill_at:
                owner = st.owner(cid)
                c.kill_replica(int(owner[1:]) - 1)
                out["killed"] = owner
                tk = time.monotonic()
            t1 = time.perf_counter()
            for attempt in range(5):
                try:
                    cl.predict_batch(x[i:i + batch])
                    break
                except ApiError:
                    time.sleep(0.2)
            if kill_at is not None and i == kill_at:
                out["first_call_after_kill_s"] = round(time.monotonic() - tk, 3)
                out["first_call_latency_s"] = round(time.perf_counter() - t1, 3)
    out["wall_s"] = round(time.monotonic() - t0, 2)
    out["transitions"] = [(t["qn"], t["to_level"].name, t["replica"])
                          for t in st.transitions(cid)]
    out["logged"] = st.max_qn(cid)
    out["acknowledged"] = len(x)
    if kill_at is not None:
        out["continued_on"] = st.owner(cid)
        c.start_replica(int(out["killed"][1:]) - 1)
    st.close()
    return out


def main(argv=None) -> int:
    from common import data
    from deploy.cluster import Cluster, wait_serving
    from service.config import ServerConfig

    p = argparse.ArgumentParser(prog="python -m lab.cluster_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--port", type=int, default=50250)
    p.add_argument("--out", default="results/cluster")
    a = p.parse_args(argv)
    target = ServerConfig().target
    if not target.exists():
        raise SystemExit(f"no target at {target}: make train")
    x = data.load("fashion", "test").x[:5000]
    res: dict = {"clients": a.clients, "batch": a.batch, "seconds": a.seconds}
    for n in (1, 3):
        root = Path(tempfile.mkdtemp(prefix=f"modelguard-bench{n}-"))
        c = Cluster(root, port=a.port + 100 * n, replicas=n)
        try:
            c.up(["--target", str(target), "--undefended"])
            for i in range(n):
                wait_serving(c.replica_address(i))
            keys = [f"bench-{j}" for j in range(a.clients)]
            _load(c.address, keys, x, a.batch, 2.0)                 # warm-up
            res[f"replicas_{n}"] = _load(c.address, keys, x, a.batch, a.seconds)
            print(f"{n} replica(s): {res[f'replicas_{n}']}", flush=True)
            if n == 3:
                res["attack_no_kill"] = _attack(c, "bench-attacker", _stream(5000), 30, None)
                print("attack:", res["attack_no_kill"], flush=True)
                res["attack_kill_at_180"] = _attack(c, "bench-attacker-k", _stream(7000), 30,
                                                    180)
                print("attack with a replica killed at query 180:",
                      res["attack_kill_at_180"], flush=True)
            else:
                res["attack_one_replica"] = _attack(c, "bench-attacker", _stream(5000), 30,
                                                    None)
                print("attack:", res["attack_one_replica"], flush=True)
        finally:
            c.down()
            shutil.rmtree(root, ignore_errors=True)
    r1, r3 = res["replicas_1"]["queries_per_s"], res["replicas_3"]["queries_per_s"]
    res["speedup_3_vs_1"] = round(r3 / r1, 2) if r1 else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cluster_bench.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
