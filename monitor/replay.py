"""Offline replay: re-run detectors and the ladder over recorded streams under any config.

With the config the live monitor used, replay reproduces its decisions exactly (same items as
stored, same target probabilities, same order, same logged timestamps; no wall clock).
"""
from __future__ import annotations

from pathlib import Path

from monitor.config import MonitorConfig
from monitor.engine import ClientEngine, Transition, det_view
from monitor.log import QueryLog


def feed(eng: ClientEngine, log, client: str) -> list[Transition]:
    """Feed the client's logged requests after ``eng.qn`` through ``eng``, request by request as
    they arrived (so batched detectors see the same batches as live). ``log``: a QueryLog or a
    MonitorStore (both have ``requests(client, after_qn)``). Returns the transitions."""
    trs: list[Transition] = []
    for qn0, t, x, p in log.requests(client, eng.qn):
        if x is None:
            raise RuntimeError(f"client {client!r}: a query of the request starting at {qn0} has "
                               f"no stored input (log.keep_raw was false or retention removed "
                               f"it); cannot replay")
        if qn0 != eng.qn + 1:
            raise RuntimeError(f"client {client!r}: the log skips from query {eng.qn} to {qn0}")
        trs += eng.begin_batch(t)
        xd, on_grid = det_view(x)
        trs += eng.observe_batch(xd.reshape(len(xd), -1), p, t, on_grid)[3]
    return trs


def replay_client(cfg: MonitorConfig, qlog: QueryLog, client: str
                  ) -> tuple[ClientEngine, list[Transition]]:
    """Feed a client's logged stream through a fresh engine; returns (engine, transitions)."""
    eng = ClientEngine(cfg, client)
    return eng, feed(eng, qlog, client)


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
