"""Offline replay: re-run detectors and the ladder over recorded streams under any config.

With the config the live monitor used, replay reproduces its decisions exactly (same items as
stored, same target probabilities, same order, same logged timestamps; no wall clock).
"""
from __future__ import annotations

from pathlib import Path

from common.types import Level
from monitor.config import MonitorConfig
from monitor.engine import ClientEngine, Transition, det_view
from monitor.linking import Linker, Pair
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
        xd, on_grid = det_view(x)
        trs += eng.step(xd.reshape(len(xd), -1), p, t, on_grid).transitions
    return trs


def replay_client(cfg: MonitorConfig, qlog: QueryLog, client: str
                  ) -> tuple[ClientEngine, list[Transition]]:
    """Feed a client's logged stream through a fresh engine; returns (engine, transitions)."""
    eng = ClientEngine(cfg, client)
    return eng, feed(eng, qlog, client)


def replay_linked(cfg: MonitorConfig, qlog: QueryLog, progress=None
                  ) -> tuple[dict[str, ClientEngine], Linker, list[Transition], list[Pair]]:
    """Replay the whole log in arrival order through per-client engines and one linker, as
    the live monitor ran it (cross-client linking depends on the order of all clients'
    requests). Returns (engines, linker, transitions, pairs)."""
    linker = Linker(cfg.linking)
    engines: dict[str, ClientEngine] = {}
    trs: list[Transition] = []
    pairs: list[Pair] = []
    for client, qn0, t, x, p in qlog.all_requests():
        eng = engines.get(client)
        if eng is None:
            eng = engines[client] = ClientEngine(cfg, client)
        if x is None:
            raise RuntimeError(f"client {client!r}: the request starting at query {qn0} has no "
                               f"stored input; cannot replay")
        if qn0 != eng.qn + 1:
            raise RuntimeError(f"client {client!r}: the log skips from query {eng.qn} to {qn0}")
        xd, on_grid = det_view(x)
        st = eng.step(xd.reshape(len(xd), -1), p, t, on_grid, int(linker.floor(client)))
        out = linker.apply(client, eng, st, t)
        trs += out.transitions
        pairs += out.pairs
        if progress is not None:
            progress(len(x))
    return engines, linker, trs, pairs


def replay(db_path: str | Path, cfg: MonitorConfig, clients: list[str] | None = None) -> dict:
    """{client: {"queries": n, "final_level": Level, "transitions": [Transition]}}. With
    cross-client linking on, every client is replayed (in arrival order) and the result also
    holds "groups" ({client: group summary}) for the clients asked for."""
    out = {}
    with QueryLog(db_path) as q:
        if cfg.linking.enabled:
            for c in clients or []:
                if not q.has_client(c):
                    raise KeyError(c)
            engines, linker, trs, _ = replay_linked(cfg, q)
            for c in clients or q.client_ids():
                eng = engines.get(c)
                mine = [tr for tr in trs if tr.client == c]
                level = max([int(tr.to_level) for tr in mine], default=0)
                g = linker.group_of(c)
                out[c] = {"queries": eng.qn if eng else 0, "final_level": Level(level),
                          "transitions": mine, "group": g.summary() if g else None}
            return out
        for c in clients or q.client_ids():
            if not q.has_client(c):
                raise KeyError(c)
            eng, trs = replay_client(cfg, q, c)
            out[c] = {"queries": eng.qn, "final_level": eng.level, "transitions": trs}
    return out
