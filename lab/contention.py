"""python -m lab.contention: what concurrent requests cost the data plane, in process.

Issue #8. On CPython the data plane's work (model, answer policy, watermark, the monitor's
detectors and linking) holds the GIL nearly throughout; it lets go for a moment in many numpy
and torch calls, and every time another request's thread is waiting the two trade places (a
futex wake-up and a context switch each). ``compute_slots`` (service.config) bounds how many
requests compute at once; this measures what that changes without gRPC in the way:

``--threads`` threads each send ``--requests`` requests of one batch size (their own API key,
images drawn from the attack pool) straight to ``DataPlane.predict`` of one server build (the
shipped default monitor, a fresh SQLite log, ``artifacts/target.pt``), once with each slot
setting, alternating ``--rounds`` times so that the machine's noise hits both alike. Reported:
process CPU time per request and wall time per request (median over rounds), and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def _plane(slots: int, workdir: Path, target: Path | None, undefended: bool = False):
    from service.config import ServerConfig
    from service.dataplane import build_dataplane

    kw = {"monitor_db": workdir / f"monitor-{slots}-{time.monotonic_ns()}.db",
          "compute_slots": slots, "secret": "lab-contention-secret-0123456789abcdef",
          "undefended": undefended}
    if target is not None:
        kw["target"] = target
    plane = build_dataplane(ServerConfig(**kw))
    deadline = time.monotonic() + 60
    while not plane.ready():
        if time.monotonic() > deadline:
            raise RuntimeError("the data plane did not get ready within 60 s")
        time.sleep(0.02)
    return plane


def one_run(slots: int, threads: int, requests: int, batch: int, pool, workdir: Path,
            target: Path | None, seed: int, undefended: bool = False) -> dict:
    import numpy as np

    plane = _plane(slots, workdir, target, undefended)
    errors: list[BaseException] = []
    start = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        rng = np.random.default_rng(seed * 1000 + t)
        idx = rng.integers(0, len(pool) - batch, requests)
        try:
            start.wait()
            for j in idx:
                plane.predict(f"contention-{t}", None, pool[j:j + batch])
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    start.wait()
    c0, w0 = time.process_time(), time.perf_counter()
    for t in ts:
        t.join()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    plane.close()
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]!r}") from errors[0]
    n = threads * requests
    return {"cpu_ms": 1e3 * cpu / n, "wall_ms": 1e3 * wall / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.contention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=4, help="concurrent callers (4)")
    ap.add_argument("--batches", default="1,16,256", help="batch sizes (1,16,256)")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per thread and run (default: about 4,000 images per thread, "
                         "at least 20 requests)")
    ap.add_argument("--slots", default="1,0", help="compute_slots settings compared (1,0)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    ap.add_argument("--target", type=Path, default=None,
                    help="target checkpoint (default: the server's, artifacts/target.pt)")
    ap.add_argument("--undefended", action="store_true",
                    help="the plain target's answer at every level (no model pool needed; the "
                         "monitor still runs)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        batches = [int(b) for b in a.batches.split(",")]
        slots = [int(s) for s in a.slots.split(",")]
    except ValueError:
        ap.error("--batches and --slots take comma-separated integers")
    if a.threads < 1 or a.rounds < 1 or min(batches) < 1 or min(slots) < 0:
        ap.error("--threads, --rounds and batch sizes must be >= 1, slots >= 0")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np

    from common import data

    pool = data.attack_pool().x.astype(np.float32) / 255.0
    rows = []
    with tempfile.TemporaryDirectory(prefix="mg-contention-") as tmp:
        for b in batches:
            n = a.requests or max(20, 4000 // b)
            res: dict[int, list[dict]] = {s: [] for s in slots}
            for r in range(a.rounds):
                for s in slots:
                    out = one_run(s, a.threads, n, b, pool, Path(tmp), a.target, a.seed + r,
                                  a.undefended)
                    res[s].append(out)
                    print(f"batch {b}, round {r + 1}/{a.rounds}, compute_slots {s}: "
                          f"CPU {out['cpu_ms']:.2f} ms/request, wall {out['wall_ms']:.2f} "
                          f"ms/request", file=sys.stderr, flush=True)
            for s in slots:
                rows.append({"batch": b, "compute_slots": s, "threads": a.threads,
                             "requests": n * a.threads,
                             "cpu_ms": statistics.median(x["cpu_ms"] for x in res[s]),
                             "wall_ms": statistics.median(x["wall_ms"] for x in res[s]),
                             "rounds": res[s]})
    ref = {r["batch"]: r for r in rows if r["compute_slots"] == slots[-1]}
    print(f"\n{a.threads} threads calling DataPlane.predict, median of {a.rounds} alternating "
          f"rounds; ratios against compute_slots {slots[-1]}\n")
    print("| batch | compute_slots | CPU ms/request | wall ms/request | CPU ratio | wall ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = ref[r["batch"]]
        print(f"| {r['batch']} | {r['compute_slots'] or 'no limit'} | {r['cpu_ms']:.2f} | "
              f"{r['wall_ms']:.2f} | {r['cpu_ms'] / b['cpu_ms']:.2f} | "
              f"{r['wall_ms'] / b['wall_ms']:.2f} |")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
