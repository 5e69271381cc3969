"""python -m lab.server_bench: latency and throughput of the real server, monitor included.

Starts the server in process on a free port (the trained target, the shipped monitor config with
identity answers so every level costs the same, a fresh log), then measures over gRPC:
single-image Predict latency (p50/p90/p99) for one client, and throughput with several concurrent
clients sending batches. Also times the pieces in process: one forward pass of the target and one
``Monitor.observe`` call. Writes results/service_bench.json.
"""
from __future__ import annotations

import argparse
import os
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _percentiles(samples_s: list[float]) -> dict:
    a = np.array(samples_s) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 3),
            "p90_ms": round(float(np.percentile(a, 90)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "n": len(a)}


def main(argv=None) -> int:
    from client.api import ModelClient
    from common import data
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    p = argparse.ArgumentParser(prog="python -m lab.server_bench", description=__doc__)
    p.add_argument("--target", type=Path, default=Path("artifacts/target.pt"))
    p.add_argument("--calls", type=int, default=2000, help="single-image calls for latency")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients for throughput")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0, help="throughput run length")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--no-monitor", action="store_true",
                   help="serve with the null monitor (serve --no-monitor): the server alone")
    p.add_argument("--out", type=Path, default=Path("results/service_bench.json"))
    args = p.parse_args(argv)

    pool = data.attack_pool().x
    tmp = Path(tempfile.mkdtemp(prefix="mg-bench-"))
    cfg = ServerConfig(port=0, target=args.target, monitor_db=tmp / "monitor.db",
                       workers=args.workers, torch_threads=args.torch_threads, undefended=True,
                       monitor=not args.no_monitor, open_keys=True, dev_secret=True)
    plane = build_dataplane(cfg)
    server = Server(cfg, plane).start()
    out = {"workers": args.workers, "torch_threads": args.torch_threads,
           "monitor": not args.no_monitor,
           "cpu_count": os.cpu_count()}
    try:
        # in-process pieces
        x1 = pool[:1].astype(np.float32) / 255
        for _ in range(50):
            plane.model.predict_proba(x1)
        t = time.perf_counter()
        for _ in range(1000):
            plane.model.predict_proba(x1)
        out["forward_1_image_us"] = round((time.perf_counter() - t) / 1000 * 1e6, 1)

        with ModelClient(server.address, "bench-latency") as c:
            for i in range(50):
                c.predict(pool[i:i + 1])
            lat = []
            for i in range(args.calls):
                t = time.perf_counter()
                c.predict(pool[i % len(pool):i % len(pool) + 1])
                lat.append(time.perf_counter() - t)
        out["latency_single_image"] = _percentiles(lat)

        done = threading.Event()
        counts = [0] * args.clients
        lat_b: list[float] = []
        lock = threading.Lock()

        def worker(j: int) -> None:
            rng = np.random.default_rng(j)
            with ModelClient(server.address, f"bench-load-{j}", batch_size=args.batch) as c:
                while not done.is_set():
                    idx = rng.integers(0, len(pool), args.batch)
                    t0 = time.perf_counter()
                    c.predict(pool[idx])
                    with lock:
                        lat_b.append(time.perf_counter() - t0)
                    counts[j] += args.batch

        threads = [threading.Thread(target=worker, args=(j,)) for j in range(args.clients)]
        t = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(args.seconds)
        done.set()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t
        out["throughput"] = {"clients": args.clients, "batch": args.batch,
                             "images_per_s": round(sum(counts) / elapsed, 1),
                             "batch_latency": _percentiles(lat_b)}
    finally:
        server.stop(1.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
