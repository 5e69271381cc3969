"""Honest traffic: natural pool images, realistic volume, repeats, class skew, and honest stats."""
from __future__ import annotations

import numpy as np
import pytest

from client.honest import HonestClient, HonestConfig, run_honest
from client.oracle import LocalOracle
from common import data, training
from common.types import NUM_CLASSES


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


class Recorder(LocalOracle):
    def __init__(self, proba, **kw):
        super().__init__(proba, **kw)
        self.batches = []

    def _query(self, images):
        self.batches.append(images.copy())
        return super()._query(images)


def test_honest_client_traffic_shape_and_stats(target):
    pool = data.attack_pool()
    oracle = Recorder(lambda x: training.predict_proba(target, x))
    sleeps = []
    cfg = HonestConfig(queries=400, repeat_prob=0.2, skew=0.3, pace_s=0.5)
    st = HonestClient(oracle, pool, 1, cfg, sleep=sleeps.append).run()
    sent = np.concatenate(oracle.batches)
    assert st.queries == len(sent) == 400 == oracle.queries_used
    assert st.requests == len(oracle.batches) == len(sleeps) and all(s >= 0 for s in sleeps)
    assert len({len(b) for b in oracle.batches}) > 3            # varying request sizes
    # natural images only: every item is a pool image, some are repeats
    flat = pool.x.reshape(len(pool), -1)
    lookup = {r.tobytes(): i for i, r in enumerate(flat)}
    idx = np.array([lookup[s.tobytes()] for s in sent.reshape(len(sent), -1)])
    assert 40 < st.repeats < 140 and len(np.unique(idx)) < len(idx)
    # class skew: the class counts follow the client's Dirichlet mix, far from uniform
    counts = np.bincount(pool.y[idx], minlength=NUM_CLASSES)
    assert counts.max() > 3 * 400 / NUM_CLASSES / 2
    # stats are exact: accuracy of the received labels, all with probabilities
    want = training.predict_proba(target, sent).argmax(1)
    assert st.accuracy == pytest.approx(np.mean(want == pool.y[idx]))
    assert st.prob_share == 1.0 and st.answer_kinds == {"probabilities": 400}
    assert st.first_label_only_at is None


def test_honest_clients_see_label_only_answers(target):
    pool = data.attack_pool()
    oracles = [LocalOracle(lambda x: training.predict_proba(target, x), labels_only=i == 1)
               for i in range(3)]
    out = run_honest(oracles, pool, seed=0, config=HonestConfig(queries=100))
    assert out["clients"] == 3 and out["clients_losing_probabilities"] == 1
    per = out["per_client"]
    assert per[1]["prob_share"] == 0.0 and per[1]["first_label_only_at"] == 1
    assert per[0]["prob_share"] == 1.0 and out["queries"] == sum(p["queries"] for p in per)
    assert 0 < out["prob_share"] < 1 and out["accuracy"] > 0.5
    assert len({p["queries"] for p in per}) > 1                 # volumes vary by client


def test_honest_client_respects_budget(target):
    oracle = LocalOracle(lambda x: training.predict_proba(target, x), budget=50)
    st = HonestClient(oracle, data.attack_pool(), 0, HonestConfig(queries=200)).run()
    assert st.queries == 50 == oracle.queries_used
