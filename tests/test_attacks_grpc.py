"""Every attack end to end over a real in-process gRPC server (the ``grpc_target`` fixture:
the real monitor, undefended answers), plus the Sybil wrapper seen from the server's log."""
from __future__ import annotations

import sqlite3
import time

import numpy as np
import pytest

from client.attacks import ATTACKS
from client.attacks.adaptive import Sybil
from common import data, training
from common.training import TrainConfig

CASES = [  # name, params, budget, minimum fidelity on 1,000 evaluation images
    ("copycat", {}, 400, 0.5),
    ("copycat-labels", {}, 400, 0.5),
    ("knockoff", {"sampling": "random"}, 600, 0.25),
    ("knockoff", {"sampling": "adaptive", "step_queries": 100}, 600, 0.25),
    ("jbda", {"seeds": 100}, 400, 0.4),
    ("activethief", {"selection": "kcenter", "rounds": 2}, 400, 0.4),
    ("interleaved-jbda", {"seeds": 100}, 400, 0.4),
    ("equivalent", {"max_units": 3, "lines_per_batch": 2, "fit_queries": 500}, 8000, 0.3),
]


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


def build(name, oracle, budget, params):
    cls = ATTACKS[name]
    kw = dict(params)
    for need in cls.needs:
        kw[need] = {"pool": data.attack_pool, "ood": data.ood_pool}[need]()
    return cls(oracle, budget, seed=0, surrogate="mlp", progress=False,
               train_config=TrainConfig(epochs=3, seed=0, progress=False), **kw)


def agreement(model, target):
    ev = data.eval_set().take(1000)
    return float(np.mean(training.predict_proba(model, ev.x).argmax(1)
                         == training.predict_proba(target, ev.x).argmax(1)))


@pytest.mark.parametrize("name,params,budget,min_fid", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_attack_over_grpc(grpc_target, target, name, params, budget, min_fid):
    oracle = grpc_target.oracle(f"attack-{name}-{len(params)}", budget)
    result = build(name, oracle, budget, params).run()
    assert 0 < result.queries_used <= budget and oracle.queries_used == result.queries_used
    assert set(result.answer_kinds) <= {"probabilities", "label_only"}
    assert agreement(result.surrogate, target) > min_fid
    if name == "equivalent":  # float32 probabilities over the wire suffice for exact rows
        w = target.fc1.weight.detach().numpy()
        rec = result.surrogate.fc1.weight.detach().numpy()[:result.extra["recovered_units"]]
        cos = np.abs((rec / np.linalg.norm(rec, axis=1, keepdims=True))
                     @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T).max(1)
        assert len(rec) >= 1 and (cos > 0.995).all(), cos


def _server_counts(db, clients, expect, timeout=10.0):
    """Per-client query counts of ``clients`` (client ids) in the monitor's log (written by a
    background thread)."""
    deadline = time.time() + timeout
    marks = ",".join("?" * len(clients))
    while True:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = dict(con.execute(f"SELECT client, SUM(n) FROM requests WHERE client IN "
                                    f"({marks}) GROUP BY client", list(clients)).fetchall())
        finally:
            con.close()
        if sum(rows.values()) >= expect or time.time() > deadline:
            return rows
        time.sleep(0.2)


def test_sybil_over_grpc_uses_n_distinct_keys(grpc_target, target):
    keys = [f"sybil-e2e-{i}" for i in range(3)]
    oracles = [grpc_target.oracle(k) for k in keys]
    result = Sybil(ATTACKS["copycat"], oracles, 300, pool=data.attack_pool(), seed=0,
                   surrogate="mlp", progress=False, batch_size=50,
                   train_config=TrainConfig(epochs=2, progress=False)).run()
    assert result.queries_used == 300
    assert result.extra["sybil"]["distinct_keys"] == 3
    ids = [grpc_target.client_id(k) for k in keys]
    seen = _server_counts(grpc_target.monitor_db, ids, 300)
    assert set(seen) == set(ids)                       # the server saw three clients
    assert sum(seen.values()) == 300 and max(seen.values()) <= 100
    assert agreement(result.surrogate, target) > 0.5


def test_honest_clients_over_grpc(grpc_target):
    from client.honest import HonestConfig, run_honest

    keys = [f"honest-e2e-{i}" for i in range(2)]
    oracles = [grpc_target.oracle(k) for k in keys]
    out = run_honest(oracles, data.attack_pool(), seed=0, config=HonestConfig(queries=100))
    assert out["clients"] == 2 and out["queries"] == sum(o.queries_used for o in oracles)
    assert out["prob_share"] == 1.0 and out["clients_losing_probabilities"] == 0  # undefended
    assert out["accuracy"] > 0.5
    seen = _server_counts(grpc_target.monitor_db, [grpc_target.client_id(k) for k in keys],
                          out["queries"])
    assert sum(seen.values()) == out["queries"] and len(seen) == 2
