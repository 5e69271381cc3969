"""``python -m lab.async_lag``: how much later an escalation takes effect in async mode.

In ``execution.mode = "async"`` the answer does not wait for the detectors, so a client keeps
getting the old level's answers until the detectors have caught up with its requests. This
drives the real data plane (target model, policies, watermark, monitor; no gRPC) with one client
sending its requests one after another, as an attack script does, in sync and in async mode, and
reports for each stream and level: the query at which the monitor decided the escalation, the
first query answered at that level, and the lag in queries between the two (sync mode has a lag
too: the rest of the request in flight). ``async-lag`` is async with ``execution.max_lag``
(``--max-lag``, 64): the client may run that many queries ahead of the detectors, and the requests
that wait together are run through them as one step.

Streams (evaluation protocol: pool = test 0-4999; MNIST the OOD pool): the JBDA stand-in from
150 seeds (lab.monitor_bench.papernot_stream) and a Knockoff-style MNIST stream.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from common.types import Level


def run(mode: str, stream: np.ndarray, batch: int, target: Path, artifacts: Path,
        client: str = "attacker", max_lag: int = 64, merge_wait_ms: float | None = None
        ) -> dict:
    from monitor import QueryLog, load_config
    from service.config import ServerConfig
    from service.dataplane import build_dataplane

    cfg_m = load_config(None)
    ex = {"mode": "async", "max_lag": max_lag} if mode == "async-lag" else {"mode": mode}
    if mode == "async-lag" and merge_wait_ms is not None:
        ex["merge_wait_ms"] = merge_wait_ms
    cfg_m = cfg_m.model_copy(update={"execution": cfg_m.execution.model_copy(update=ex)})
    tmp = Path(tempfile.mkdtemp(prefix="mg-lag-"))
    cfg = ServerConfig(port=0, target=target, artifacts=artifacts, monitor_db=tmp / "m.db",
                       secret="lag-bench")
    plane = build_dataplane(cfg, cfg_m)
    served = []          # (first qn of the request, n, level the answer was sent at)
    qn = 0
    t0 = time.perf_counter()
    try:
        for i in range(0, len(stream), batch):
            x = stream[i:i + batch]
            res = plane.predict(client, None, x)
            served.append((qn + 1, len(x), int(res.level)))
            qn += len(x)
        elapsed = time.perf_counter() - t0
        plane.monitor.flush()
        with QueryLog(plane.monitor.db_path) as q:
            trs = q.transitions(client)
    finally:
        plane.close()
    out = {"mode": mode, "batch": batch, "queries": qn, "seconds": round(elapsed, 2),
           "max_lag": max_lag if mode == "async-lag" else 0,
           "merge_wait_ms": cfg_m.execution.merge_wait_ms if mode == "async-lag" else None,
           "levels": {}}
    for tr in trs:
        lvl = int(tr["to_level"])
        first = next((q0 for q0, n, l in served if l >= lvl), None)
        out["levels"][Level(lvl).name] = {
            "decided_at": tr["qn"], "first_answered_at": first,
            "lag_queries": None if first is None else first - tr["qn"]}
    return out


def main(argv=None) -> int:
    import torch
    from threadpoolctl import threadpool_limits

    from lab import monitor_bench as bench

    ap = argparse.ArgumentParser(prog="python -m lab.async_lag", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=Path("artifacts/target.pt"))
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--batches", default="1,64", help="request sizes (comma-separated)")
    ap.add_argument("--queries", type=int, default=3000, help="queries per stream")
    ap.add_argument("--modes", default="sync,async,async-lag",
                    help="compared modes among sync, async, async-lag")
    ap.add_argument("--max-lag", type=int, default=64,
                    help="async-lag: [execution] max_lag (64)")
    ap.add_argument("--merge-wait-ms", type=float, default=None,
                    help="async-lag: [execution] merge_wait_ms (default: the config's)")
    ap.add_argument("--out", type=Path, default=Path("results/bench/async_lag.json"))
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("sync", "async", "async-lag")]
    if bad or not modes:
        ap.error(f"--modes: unknown {bad}; expected some of sync, async, async-lag")
    if a.max_lag < 1:
        ap.error("--max-lag must be at least 1")
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    if not a.target.exists():
        ap.error(f"no target at {a.target}; run `make train` first")
    target, _ = bench.get_target(str(a.target))
    streams = {"JBDA (150 seeds)": bench.papernot_stream(target)[:a.queries],
               "Knockoff (MNIST)": bench.mnist_stream(a.queries)}
    rows, results = [], []
    print("| stream | batch | level | mode | decided at query | first answered at | lag (queries) "
          "| stream s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, x in streams.items():
        for b in (int(v) for v in a.batches.split(",")):
            per_mode = {m: run(m, x, b, a.target, a.artifacts, max_lag=a.max_lag,
                               merge_wait_ms=a.merge_wait_ms)
                        for m in modes}
            results.append({"stream": name, **{m: r for m, r in per_mode.items()}})
            levels = sorted(set().union(*(r["levels"] for r in per_mode.values())),
                            key=lambda s: Level[s])
            for lvl in levels:
                for m in modes:
                    d = per_mode[m]["levels"].get(lvl, {})
                    row = [name, b, lvl, m, d.get("decided_at", "-"),
                           d.get("first_answered_at", "-"), d.get("lag_queries", "-"),
                           per_mode[m]["seconds"]]
                    rows.append(row)
                    print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
