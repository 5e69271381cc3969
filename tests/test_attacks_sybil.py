"""The Sybil wrapper spreads an attack over N keys (N distinct oracles) within the budget."""
from __future__ import annotations

import numpy as np
import pytest

from client.attacks import ATTACKS
from client.attacks.adaptive import Sybil, SybilOracle
from client.oracle import BudgetExceeded, LocalOracle
from common import data, training
from common.training import TrainConfig
from common.types import AnswerKind


class KeyedOracle(LocalOracle):
    def __init__(self, proba, key, budget=None, labels_only=False, calls=None):
        super().__init__(proba, budget, labels_only)
        self.api_key = key
        self.requests = 0
        self.calls = calls      # shared list: (key, items) per request, in the order sent

    def _query(self, images):
        self.requests += 1
        if self.calls is not None:
            self.calls.append((self.api_key, len(images)))
        return super()._query(images)


def _tagged_proba(x):
    """A fake model whose probability of class 0 is half the image's first pixel, so every item's
    answer says which image it belongs to."""
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    p = np.full((len(x), 10), 0.0, np.float32)
    p[:, 0] = x[:, 0] / 2
    p[:, 1:] = ((1 - p[:, 0]) / 9)[:, None]
    return p


def _tagged_images(n):
    x = np.zeros((n, 28, 28), np.float32)
    x[:, 0, 0] = np.arange(1, n + 1) / (n + 1)
    return x


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


@pytest.mark.parametrize("mode", ["round-robin", "split", "sequential"])
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
    spilled = sy(x[:7])                            # larger than one key's share: spills over
    np.testing.assert_array_equal(spilled.labels, proba(x[:7]).argmax(1))
    assert [o.queries_used for o in oracles] == [4, 3, 0]
    assert sy(x[:3]).labels.shape == (3,)
    with pytest.raises(BudgetExceeded):
        sy(x[:1])
    assert sum(o.queries_used for o in oracles) == 10


def test_sequential_mode_spends_one_key_after_another():
    calls = []
    oracles = [KeyedOracle(_tagged_proba, f"k{i}", calls=calls) for i in range(3)]
    sy = SybilOracle(oracles, budget=10, mode="sequential")
    assert [o.budget for o in oracles] == [4, 3, 3]
    x = _tagged_images(10)
    counts = []
    answers = []
    for a, b in [(0, 3), (3, 6), (6, 8), (8, 10)]:
        answers.append(sy(x[a:b]))
        counts.append(sy.per_key_queries)
    # key 0 takes everything until its 4 are spent, the request that crosses spills onto key 1
    assert counts == [[3, 0, 0], [4, 2, 0], [4, 3, 1], [4, 3, 3]]
    assert calls == [("k0", 3), ("k0", 1), ("k1", 2), ("k1", 1), ("k2", 1), ("k2", 2)]
    # every item's answer is its own image's, in the request's order, across the key boundary
    got = np.concatenate([a.probs[:, 0] for a in answers])
    np.testing.assert_allclose(got, x[:, 0, 0] / 2, rtol=1e-6)
    assert all(a.kind == AnswerKind.PROBABILITIES for a in answers)
    with pytest.raises(BudgetExceeded):
        sy(x[:1])
    assert sy.queries_used == 10 and sy.per_key_queries == [4, 3, 3]


def test_sequential_mode_keeps_smaller_per_key_budgets_and_needs_one():
    oracles = [KeyedOracle(_tagged_proba, "a", budget=2), KeyedOracle(_tagged_proba, "b")]
    sy = SybilOracle(oracles, budget=10, mode="sequential")
    assert [o.budget for o in oracles] == [2, 5]
    ans = sy(_tagged_images(6))
    assert sy.per_key_queries == [2, 4] and len(ans) == 6
    with pytest.raises(ValueError, match="per-key budget"):
        SybilOracle([KeyedOracle(_tagged_proba, "a"), KeyedOracle(_tagged_proba, "b")],
                    mode="sequential")
    with pytest.raises(ValueError, match="mode must be one of"):
        SybilOracle(oracles, budget=10, mode="sequental")


def test_sybil_jbda_in_sequential_mode_uses_keys_in_order(target):
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    calls = []
    oracles = [KeyedOracle(proba, f"key-{i}", calls=calls) for i in range(4)]
    result = Sybil(ATTACKS["jbda"], oracles, 400, mode="sequential", pool=data.attack_pool(),
                   seeds=50, seed=0, surrogate="mlp", progress=False, batch_size=64,
                   train_config=TrainConfig(epochs=1, progress=False)).run()
    order = [int(k.split("-")[1]) for k, _ in calls]
    assert order == sorted(order) and set(order) == {0, 1, 2, 3}  # one block per key, in turn
    per_key = result.extra["sybil"]["per_key_queries"]
    assert sum(per_key) == result.queries_used <= 400
    # every key but the last in use is full before the next one starts
    assert per_key[:-1] == [o.budget for o in oracles[:-1]]
