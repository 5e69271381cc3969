"""python -m lab.shared_monitor: several servers sharing one monitor, a client's requests spread
over them round-robin (no sticky routing), against one server with its monitor in process.

Both setups get the same streams over gRPC, one API key per stream, one request at a time
(``--batch`` images each; the client waits for each answer): a Papernot JBDA stand-in and an
MNIST (out-of-distribution) stream, which the default config escalates, and two honest streams
of the attack pool, which it must not. Setup 1: ``python -m service serve`` (default monitor,
sync). Setup 2: ``python -m monitor serve`` and ``--servers`` servers with ``--monitor-address``;
request i of a stream goes to server i mod N. From each setup's log: the query at which each
level was decided (the detectors' view) and the first query answered at it (the client's view:
with several servers, a server does not wait for the others' requests, so an answer can lag
the decision by up to one request per server). Results: ``--out``/shared_monitor.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from lab.serving import HOST, ServerProcess, free_port, monitor_process

SECRET = "lab-shared-monitor-secret-0123456789abcdef"


def _env() -> None:
    os.environ["MODELGUARD_SECRET"] = SECRET
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _server(name: str, workdir: Path, artifacts: Path, extra: list[str]) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "service", "serve", "--host", HOST, "--port", str(port),
            "--torch-threads", "1", "--artifacts", str(artifacts),
            "--target", str(artifacts / "target.pt"), "--open-keys", *extra]
    return ServerProcess(name, argv, port, workdir / f"{name}.log").start()


def _drive(addresses: list[str], streams: dict[str, np.ndarray], batch: int) -> None:
    from tqdm import tqdm

    from client.api import ModelClient
    for name, x in streams.items():
        clients = [ModelClient(a, f"lab-shared-{name}", batch_size=batch) for a in addresses]
        try:
            for i in tqdm(range(0, len(x), batch), desc=f"{name} via {len(addresses)}",
                          unit="req", file=sys.stderr, mininterval=1.0):
                clients[(i // batch) % len(clients)].predict(x[i:i + batch])
        finally:
            for c in clients:
                c.close()


def _read(db: Path, names: list[str]) -> dict:
    """Per stream: queries logged, and per level reached, the query it was decided at and the
    first query answered at it or above."""
    from common.keys import client_id_for_key
    from common.types import Level
    from monitor import QueryLog
    out = {}
    with QueryLog(db) as q:
        for name in names:
            c = client_id_for_key(f"lab-shared-{name}", SECRET)
            s = q.series(c)
            row = {"queries": int(len(s["qn"])), "levels": {}}
            for t in q.transitions(c):
                lvl = Level(t["to_level"]).name
                answered = np.flatnonzero(s["level"] >= t["to_level"])
                row["levels"][lvl] = {"decided_at": int(t["qn"]),
                                      "first_answered_at": int(s["qn"][answered[0]])
                                      if len(answered) else None}
            out[name] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.shared_monitor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", type=int, default=2, help="servers sharing the monitor (2)")
    ap.add_argument("--batch", type=int, default=20, help="images per request (20)")
    ap.add_argument("--queries", type=int, default=1200, help="queries per stream (1200)")
    ap.add_argument("--artifacts", type=Path,
                    default=Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts")))
    ap.add_argument("--out", type=Path, default=Path("results/shared_monitor"))
    a = ap.parse_args(argv)
    if not (a.artifacts / "target.pt").exists():
        print(f"error: no target checkpoint at {a.artifacts / 'target.pt'}; run `make train`",
              file=sys.stderr)
        return 2
    if a.servers < 1 or a.batch < 1 or a.queries < a.batch:
        ap.error("--servers and --batch must be positive and --queries at least --batch")
    _env()
    from lab.monitor_bench import get_target, honest_streams, mnist_stream, papernot_stream
    target, _ = get_target(str(a.artifacts / "target.pt"))
    honest = honest_streams()
    streams = {"jbda": papernot_stream(target)[:a.queries],
               "mnist": mnist_stream(a.queries),
               "honest-shuffled": honest["honest-shuffled"][:a.queries],
               "honest-with-repeats": honest["honest-with-repeats"][:a.queries]}
    workdir = Path(tempfile.mkdtemp(prefix="mg-lab-shared-"))
    res: dict = {"servers": a.servers, "batch": a.batch, "queries": a.queries}
    procs: list[ServerProcess] = []
    try:
        one = _server("one", workdir, a.artifacts, ["--monitor-db", str(workdir / "one.db")])
        procs.append(one)
        one.wait_ready()
        _drive([one.address], streams, a.batch)
        one.stop()
        res["one_server"] = _read(workdir / "one.db", list(streams))
        mon = monitor_process("monitor", workdir / "shared.db", workdir)
        procs.append(mon)
        servers = [_server(f"s{i}", workdir, a.artifacts,
                           ["--monitor-address", mon.address])
                   for i in range(a.servers)]
        procs += servers
        for s in servers:
            s.wait_ready()
        _drive([s.address for s in servers], streams, a.batch)
        for s in servers:
            s.stop()
        mon.stop(grace=60.0)
        res["shared"] = _read(workdir / "shared.db", list(streams))
    finally:
        for p in procs:
            p.stop()
    lines = ["## Servers sharing one monitor, requests round-robin", "",
             f"{a.servers} servers on one `python -m monitor serve` against one server with its "
             f"monitor in process; {a.queries} queries per stream in requests of {a.batch}, "
             f"one API key per stream, the client waiting for each answer. Level: decided at "
             f"query / first answered at it.", "",
             "| stream | level | one server | shared monitor |", "|---|---|---|---|"]
    for name in streams:
        r1, r2 = res["one_server"][name], res["shared"][name]
        levels = list(dict.fromkeys([*r1["levels"], *r2["levels"]])) or ["(none)"]
        for lvl in levels:
            cell = [(f"{r['levels'][lvl]['decided_at']} / {r['levels'][lvl]['first_answered_at']}"
                     if lvl in r["levels"] else "–") for r in (r1, r2)]
            lines.append(f"| {name} ({r1['queries']} / {r2['queries']} logged) | {lvl} | "
                         f"{cell[0]} | {cell[1]} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "shared_monitor.json").write_text(json.dumps(res, indent=2))
    (a.out / "shared_monitor.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
