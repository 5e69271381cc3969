"""The Sybil wrapper spreads an attack over N keys (N distinct oracles) within the budget."""
from __future__ import annotations

import numpy as np
import pytest

from client.attacks import ATTACKS
from client.attacks.adaptive import Sybil, SybilOracle
from client.oracle import BudgetExceeded, LocalOracle
from common import data, training
from common.training import TrainConfig
from common.types import Answer, AnswerKind


class KeyedOracle(LocalOracle):
    def __init__(self, proba, key, budget=None, labels_only=False):
        super().__init__(proba, budget, labels_only)
        self.api_key = key
        self.requests = 0

    def _query(self, images):
        self.requests += 1
        return super()._query(images)


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


@pytest.mark.parametrize("mode", ["round-robin", "split"])
def test_sybil_uses_every_key_within_budget(target, mode):
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    oracles = [KeyedOracle(proba, f"key-{i}") for i in range(4)]
    attack = Sybil(ATTACKS["jbda"], oracles, 500, mode=mode, pool=data.attack_pool(), seeds=100,
                   seed=0, surrogate="mlp", progress=False, batch_size=64,
                   train_config=TrainConfig(epochs=1, progress=False))
    result = attack.run()
    per_key = [o.queries_used for o in oracles]
    assert len({o.api_key for o in oracles}) == 4 and all(n > 0 for n in per_key)
    assert all(o.requests > 0 for o in oracles)
    assert sum(per_key) == result.queries_used <= 500
    assert all(n <= o.budget for n, o in zip(per_key, oracles))   # each key has 1/4 of it
    assert max(per_key) - min(per_key) <= 64
    assert result.extra["sybil"] == {"keys": 4, "distinct_keys": 4, "per_key_queries": per_key,
                                     "mode": mode}


def test_sybil_oracle_restores_item_order_and_merges_kinds(target):
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    oracles = [KeyedOracle(proba, "a", labels_only=True), KeyedOracle(proba, "b")]
    sy = SybilOracle(oracles, budget=100, mode="split")
    x = data.attack_pool().x[:10]
    ans = sy(x)
    want = proba(x)
    np.testing.assert_array_equal(ans.labels, want.argmax(1))
    # the label-only half comes back one-hot, the merged answer is honest about it
    assert ans.kind == AnswerKind.LABEL_ONLY
    np.testing.assert_allclose(ans.probs[5:], want[5:], atol=1e-6)
    np.testing.assert_array_equal(ans.probs[:5], np.eye(10, dtype=np.float32)[want[:5].argmax(1)])
    assert [o.queries_used for o in oracles] == [5, 5]


def test_sybil_oracle_budget_is_the_sum_of_the_keys(target):
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    oracles = [KeyedOracle(proba, str(i)) for i in range(3)]
    sy = SybilOracle(oracles, budget=10)
    assert [o.budget for o in oracles] == [4, 3, 3]
    x = data.attack_pool().x[:10]
    assert isinstance(sy(x[:7]), Answer)           # larger than one key's share: spills over
    assert sy(x[:3]).labels.shape == (3,)
    with pytest.raises(BudgetExceeded):
        sy(x[:1])
    assert sum(o.queries_used for o in oracles) == 10
