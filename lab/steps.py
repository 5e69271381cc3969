"""python -m lab.steps: the monitor's detector steps on one thread against several, in process.

Issue #8. The monitor in its own process (``[execution] mode = "process"``, ``python -m monitor
serve``) runs the requests it reads together through ``Monitor.run_requests``, which spreads
different clients' steps over ``execution.step_threads`` threads. This measures what that buys
without gRPC or a second process in the way: ``--clients`` clients, each with ``--history``
queries of history (filled with real steps at batch 256, attack-pool images with Gaussian noise
by default), then rounds of ``--items`` queries per client in requests of ``--batch``, one round
per setting of ``--threads``, alternating ``--rounds`` times so that machine noise hits every
setting alike. Reported: wall and process CPU microseconds per item (median over rounds) and
the wall ratio to the first setting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _jobs(target, rng, kind: str, clients: int, n: int, batch: int, tag: str):
    from common.types import Answer, AnswerKind, Level
    from lab.monitor_bench import proba, profile_stream

    out = []
    for i in range(0, n, batch):
        for c in range(clients):
            x = profile_stream(kind, batch, rng)
            p = proba(target, x)
            out.append((f"c{c}", f"{tag}-{c}-{i}", time.time(), x, p,
                        Answer(p.argmax(1), p, AnswerKind.PROBABILITIES), Level.NORMAL))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.steps", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="step_threads settings compared (1,2)")
    ap.add_argument("--clients", type=int, default=4, help="clients (4)")
    ap.add_argument("--batch", type=int, default=256, help="items per request (256)")
    ap.add_argument("--items", type=int, default=1024, help="items per client per round (1024)")
    ap.add_argument("--history", type=int, default=8192,
                    help="queries of history per client before the rounds (8192)")
    ap.add_argument("--stream", default="pool-noise",
                    choices=("pool", "pool-noise", "perturb", "noise"),
                    help="kind of queries (lab.monitor_bench.profile_stream; pool-noise)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    ap.add_argument("--target", default="artifacts/target.pt",
                    help="target checkpoint for the probabilities (a quick MLP if missing)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        settings = [int(t) for t in a.threads.split(",")]
    except ValueError:
        ap.error(f"--threads takes comma-separated integers, not {a.threads!r}")
    if not settings or min(settings) < 1:
        ap.error("--threads: every setting must be >= 1")
    for name in ("clients", "batch", "items", "rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if a.history < 0:
        ap.error("--history must be >= 0")

    import torch
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from lab.monitor_bench import get_target
    from monitor import Monitor, load_config

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    target, how = get_target(a.target)
    rng = np.random.default_rng(a.seed)
    base = load_config(None).with_changes(execution={"mode": "process"})
    mons = {t: Monitor(base.with_changes(execution={"step_threads": t}), None)
            for t in settings}
    res: dict[int, list] = {t: [] for t in settings}
    try:
        fill = _jobs(target, rng, a.stream, a.clients, a.history, 256, "fill")
        for t, mon in tqdm(mons.items(), desc="history", file=sys.stderr):
            mon.run_requests(fill, False)     # the same history for every setting
        total = a.clients * -(-a.items // a.batch) * a.batch    # (whole requests)
        for r in tqdm(range(a.rounds), desc="rounds", file=sys.stderr):
            jobs = _jobs(target, rng, a.stream, a.clients, a.items, a.batch, f"r{r}")
            for t, mon in mons.items():
                w0, c0 = time.perf_counter(), time.process_time()
                mon.run_requests(jobs, False)
                res[t].append(((time.perf_counter() - w0) / total * 1e6,
                               (time.process_time() - c0) / total * 1e6))
    finally:
        for mon in mons.values():
            mon.close()
    rows = []
    ref = statistics.median(w for w, _ in res[settings[0]])
    print(f"\n{a.clients} clients x {a.items} items per round in requests of {a.batch}, "
          f"{a.history:,} queries of history each ({a.stream}; target: {how}); median of "
          f"{a.rounds} alternating rounds\n")
    print("| step_threads | wall µs/item | CPU µs/item | wall ratio |")
    print("|---|---|---|---|")
    for t in settings:
        wall = statistics.median(w for w, _ in res[t])
        cpu = statistics.median(c for _, c in res[t])
        rows.append({"step_threads": t, "wall_us_per_item": round(wall, 1),
                     "cpu_us_per_item": round(cpu, 1), "wall_ratio": round(wall / ref, 3),
                     "rounds": [[round(w, 1), round(c, 1)] for w, c in res[t]]})
        print(f"| {t} | {wall:.0f} | {cpu:.0f} | {wall / ref:.2f} |")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "rows": rows},
                                    indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
