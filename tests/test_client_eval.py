import numpy as np
import pytest

from client.evaluate import evaluate, format_table
from client.oracle import BudgetExceeded, LocalOracle
from common import data, nets, training


def test_format_table_percent_columns_only():
    out = format_table([{"attack": "x", "fidelity": 0.5, "wall_time_s": 0.2}],
                       ["attack", "fidelity", "wall_time_s"])
    row = out.splitlines()[2].split()
    assert row == ["x", "50.00%", "0.2"]


def test_evaluate_agreement_with_itself(small_target):
    target, _ = training.load_checkpoint(small_target[0])
    m = evaluate(target, target, data.eval_set().take(300))
    assert m["fidelity"] == 1.0 and m["stolen_accuracy"] == m["target_accuracy"] > 0.6


def test_oracle_budget_is_enforced_and_counted():
    o = LocalOracle(lambda x: np.full((len(x), 10), 0.1, np.float32), budget=5)
    a = o(np.zeros((3, 28, 28), np.uint8))
    assert len(a) == 3 and o.queries_used == 3 and o.remaining == 2
    with pytest.raises(BudgetExceeded, match="exceed the budget"):
        o(np.zeros((3, 28, 28), np.uint8))
    assert o.queries_used == 3  # a refused call costs nothing
    labels = LocalOracle(lambda x: np.eye(10, dtype=np.float32)[[2] * len(x)], labels_only=True)
    b = labels(np.zeros((2, 28, 28), np.uint8))
    assert b.probs is None and list(b.labels) == [2, 2] and labels.kinds["label_only"] == 2
