"""python -m lab.stalls: a long-history client's slowest requests, and what each coincided with.

In process, through the real ``monitor.Monitor`` with its SQLite store in a temporary directory
(``monitor/default.toml`` unless ``--config``; ``--checkpoint-every`` overrides that key). One
client's history is filled with ``--history`` queries (real ``observe`` calls of 512 pool images
with +-20 grey levels of noise: unique, on the 0-255 grid, the growing sets fill), then
``--requests`` requests of ``--batch`` images are timed one by one, as a client sending one
request after another sees them (``observe`` returns once the request's rows are committed with
``log.durability = "commit"``). With ``--clients N`` there are N such clients, filled and then
timed in turn; with ``--max-clients M`` below N (``execution.max_clients``) every timed request
finds its client evicted: it is restored from its checkpoint and another one is evicted.

Every request slower than ``--slow`` ms is listed with the background work it overlapped:
the checkpoint's pickle (under the client's lock), the log writer's and the checkpoint writer's
transactions, a full (generation 2) garbage collection, the linking index's insert. Torch and
BLAS run one thread each, as in the server, and the start-up heap is frozen out of full
collections as the server does (``--no-freeze``: not). ``--json`` writes the figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _instrument(events: list, t0: float) -> None:
    """Wrap the background steps worth blaming; record (start ms, end ms, what) when > 3 ms."""
    import monitor.core as mc
    import monitor.linking as ml
    import monitor.log as mlog
    targets = [(mlog.Writer, "_write", "log write"), (mc.Monitor, "_checkpoint", "pickle"),
               (ml.LinkIndex, "add", "linking add")]
    try:
        from monitor.checkpoints import CheckpointWriter
        targets.append((CheckpointWriter, "_write", "checkpoint write"))
    except ImportError:      # a revision before the checkpoint file: checkpoints in the log
        pass

    def now() -> float:
        return (time.perf_counter() - t0) * 1e3

    for cls, name, what in targets:
        real = getattr(cls, name)

        def wrapped(*a, _real=real, _what=what, **k):
            s = now()
            try:
                return _real(*a, **k)
            finally:
                if now() - s > 3:
                    events.append((s, now(), _what))
        setattr(cls, name, wrapped)
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = now()
        elif info["generation"] == 2:
            events.append((started["t"], now(), "gc gen 2"))
    gc.callbacks.append(on_gc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.stalls", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="monitor TOML (default monitor/default.toml)")
    ap.add_argument("--history", type=int, default=30_000, help="queries before timing (30000)")
    ap.add_argument("--requests", type=int, default=6000, help="timed requests (6000)")
    ap.add_argument("--batch", type=int, default=1, help="images per timed request (1)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="execution.checkpoint_every (default: the config's)")
    ap.add_argument("--clients", type=int, default=1, help="clients taking turns (1)")
    ap.add_argument("--max-clients", type=int, default=None,
                    help="execution.max_clients (default: the config's)")
    ap.add_argument("--slow", type=float, default=20.0, help="list requests slower than this (ms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--no-freeze", dest="freeze", action="store_false",
                    help="leave the start-up heap in Python's full garbage collections (the "
                         "server freezes it: common.memory.freeze_startup_heap)")
    args = ap.parse_args(argv)
    if args.history < 0 or args.requests < 1 or args.batch < 1 or args.clients < 1:
        ap.error("--history must be >= 0, --requests, --batch and --clients >= 1")

    import torch
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from common.data import attack_pool
    from common.types import Level
    from lab.monitor_bench import fake_answer
    from monitor import Monitor, load_config

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    cfg = load_config(args.config)
    if args.checkpoint_every is not None:
        cfg = cfg.with_changes(execution={"checkpoint_every": args.checkpoint_every})
    if args.max_clients is not None:
        cfg = cfg.with_changes(execution={"max_clients": args.max_clients})
    clients = [f"c{i}" for i in range(args.clients)]
    pool = attack_pool().x
    rng = np.random.default_rng(args.seed)

    def batch(n):
        x = pool[rng.integers(0, len(pool), n)].astype(np.int16) + rng.integers(-20, 21,
                                                                                 (n, 28, 28))
        x = (np.clip(x, 0, 255) / 255.0).astype(np.float32)
        lg = rng.normal(0, 3, (n, 10))
        p = np.exp(lg - lg.max(1, keepdims=True))
        return x, (p / p.sum(1, keepdims=True)).astype(np.float32)

    events: list = []
    t0 = time.perf_counter()
    _instrument(events, t0)
    with tempfile.TemporaryDirectory(prefix="modelguard-stalls-") as tmp:
        mon = Monitor(cfg, Path(tmp) / "monitor.db")
        if args.freeze:                   # as `python -m service serve` does once started
            from common.memory import freeze_startup_heap
            freeze_startup_heap()
        try:
            filled = 0
            with tqdm(total=args.history * len(clients), desc="history", unit="q",
                      file=sys.stderr, mininterval=1.0) as bar:
                while filled < args.history:
                    n = min(512, args.history - filled)
                    for c in clients:
                        x, p = batch(n)
                        mon.observe(c, f"h{filled}", x, p, fake_answer(p), Level.NORMAL)
                        bar.update(n)
                    filled += n
            mon.flush()
            events.clear()
            lat, spans = [], []
            for i in tqdm(range(args.requests), desc="timed", unit="req", file=sys.stderr,
                          mininterval=1.0):
                x, p = batch(args.batch)
                c = clients[i % len(clients)]
                s = time.perf_counter()
                mon.level(c)                      # (what the server asks before answering)
                mon.observe(c, f"m{i}", x, p, fake_answer(p), Level.NORMAL)
                e = time.perf_counter()
                lat.append((e - s) * 1e3)
                spans.append(((s - t0) * 1e3, (e - t0) * 1e3))
            mon.flush()
        finally:
            mon.close()
    lat = np.array(lat)
    res = {"history": args.history, "requests": args.requests, "batch": args.batch,
           "clients": args.clients, "max_clients": cfg.execution.max_clients,
           "checkpoint_every": cfg.execution.checkpoint_every,
           "p50_ms": round(float(np.percentile(lat, 50)), 2),
           "p99_ms": round(float(np.percentile(lat, 99)), 2),
           "p999_ms": round(float(np.percentile(lat, 99.9)), 2),
           "max_ms": round(float(lat.max()), 1), "freeze": args.freeze,
           "full_gcs": [round(b - a, 1) for a, b, w in events if w == "gc gen 2"],
           "slow": []}
    print(f"{args.requests} requests of {args.batch} after {args.history:,} queries, "
          f"{args.clients} client(s) (max_clients {res['max_clients']}, checkpoint_every "
          f"{res['checkpoint_every']}): p50 {res['p50_ms']} ms, p99 "
          f"{res['p99_ms']} ms, p99.9 {res['p999_ms']} ms, max {res['max_ms']} ms; full "
          f"garbage collections while timed: {len(res['full_gcs'])}"
          + (f" (longest {max(res['full_gcs'])} ms)" if res["full_gcs"] else "")
          + ("" if args.freeze else " (start-up heap not frozen)"))
    for i in np.flatnonzero(lat > args.slow):
        s, e = spans[i]
        with_ = sorted({f"{w} {round(b - a)} ms" for a, b, w in events if b >= s and a <= e})
        res["slow"].append({"request": int(i), "ms": round(float(lat[i]), 1), "with": with_})
        print(f"  request {i}: {lat[i]:.1f} ms, during: {', '.join(with_) or 'nothing recorded'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
