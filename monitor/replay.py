"""Offline replay: re-run detectors and the ladder over recorded streams under any config.

With the config the live monitor used, replay reproduces its decisions exactly (same items as
stored, same target probabilities, same order, same logged timestamps; no wall clock).
"""
from __future__ import annotations

from pathlib import Path

from monitor.config import MonitorConfig
from monitor.engine import ClientEngine, Transition, det_view
from monitor.log import QueryLog


def replay_client(cfg: MonitorConfig, qlog: QueryLog, client: str
                  ) -> tuple[ClientEngine, list[Transition]]:
    """Feed a client's logged stream through a fresh engine; returns (engine, transitions)."""
    eng = ClientEngine(cfg, client)
    trs: list[Transition] = []
    for item, t, x, p in qlog.stream(client):
        if x is None:
            raise RuntimeError(f"client {client!r}: query {eng.qn + 1} has no stored input "
                               f"(log.keep_raw was false or retention removed it); cannot replay")
        if item == 0:  # a new request starts
            trs += eng.begin_batch(t)
        xd, _ = det_view(x[None])
        _, _, tr = eng.step(xd[0], p, t)
        if tr is not None:
            trs.append(tr)
    return eng, trs


def replay(db_path: str | Path, cfg: MonitorConfig, clients: list[str] | None = None) -> dict:
    """{client: {"queries": n, "final_level": Level, "transitions": [Transition]}}."""
    out = {}
    with QueryLog(db_path) as q:
        for c in clients or q.client_ids():
            if not q.has_client(c):
                raise KeyError(c)
            eng, trs = replay_client(cfg, q, c)
            out[c] = {"queries": eng.qn, "final_level": eng.level, "transitions": trs}
    return out
