"""client.art: the server as an IBM ART BlackBoxClassifier, over a real in-process gRPC server
(conftest's ``grpc_target``: small target, undefended answers; plus a label-only server)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("art", reason="IBM ART is optional: pip install -e '.[art]'")

from art.attacks.extraction import CopycatCNN  # noqa: E402

from client.art import (CLIP_VALUES, BudgetExceeded, RemoteClassifier, art_images,  # noqa: E402
                        pytorch_thief)
from client.evaluate import evaluate  # noqa: E402
from common import data, nets, training  # noqa: E402
from common.types import Level  # noqa: E402

from tests.conftest import start_server  # noqa: E402


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


@pytest.fixture(scope="module")
def label_only_server(small_target, tmp_path_factory):
    """The same target behind a defence that answers label-only at every level."""
    policies = {lvl: {"policy": "label_only"} for lvl in Level if lvl != Level.BLOCK}
    server, _, _ = start_server(small_target[0], tmp_path_factory.mktemp("art-labels"), policies)
    yield server.address
    server.stop(0.5)


def test_conventions_and_probability_rows(grpc_target, target):
    x = data.attack_pool().x[:70]
    xa = art_images(x)
    assert xa.shape == (70, 1, 28, 28) and xa.dtype == np.float32 and xa.max() <= 1.0
    with RemoteClassifier(grpc_target.address, "art-probs", batch_size=32) as victim:
        assert victim.nb_classes == 10 and victim.input_shape == (1, 28, 28)
        assert tuple(victim.clip_values) == CLIP_VALUES
        rows = victim.predict(xa, batch_size=50)  # ART batches of 50, Predict calls of <= 32
        rows_hw = victim.predict(xa[:, 0])         # (N, 28, 28) is accepted too
        assert victim.queries_used == 140 and victim.answer_kinds == {"probabilities": 140}
    want = training.predict_proba(target, x)
    assert rows.shape == (70, 10) and rows.dtype == np.float32
    np.testing.assert_allclose(rows, want, atol=1e-5)
    np.testing.assert_allclose(rows_hw, want, atol=1e-5)
    np.testing.assert_allclose(rows.sum(1), 1, atol=1e-5)


def test_label_only_answers_become_one_hot(label_only_server, grpc_target, target):
    x = art_images(data.attack_pool().x[:40])
    labels = training.predict_proba(target, data.attack_pool().x[:40]).argmax(1)
    # a defended server that withholds probabilities, and a client that asks for labels only
    for address, ask in ((label_only_server, False), (grpc_target.address, True)):
        with RemoteClassifier(address, "art-labels", labels_only=ask) as victim:
            rows = victim.predict(x)
            assert victim.answer_kinds == {"label_only": 40}
        np.testing.assert_array_equal(rows, np.eye(10, dtype=np.float32)[labels])


def test_budget_stops_with_a_clear_error(grpc_target):
    x = art_images(data.attack_pool().x[:150])
    with RemoteClassifier(grpc_target.address, "art-budget", budget=100) as victim:
        victim.predict(x[:60])
        with pytest.raises(BudgetExceeded, match="only 40 of the budget of 100 remain"):
            victim.predict(x[60:])  # 90 more: refused whole, nothing sent
        assert victim.queries_used == 60 and victim.remaining == 40
        victim.predict(x[60:100])
        assert victim.remaining == 0
        with pytest.raises(BudgetExceeded):
            victim.predict_fn(x[:1])  # the predict_fn alone is budgeted too (client.oracle)


def test_rejects_unscaled_images_without_spending_queries(grpc_target):
    with RemoteClassifier(grpc_target.address, "art-range", budget=10) as victim:
        with pytest.raises(ValueError, match=r"in \[0, 1\].*art_images"):
            victim.predict(data.attack_pool().x[:2].astype(np.float32)[:, None])  # 0..255
        with pytest.raises(ValueError, match="shape"):
            victim.predict(np.zeros((2, 3, 28, 28), np.float32))
        assert victim.queries_used == 0


@pytest.mark.parametrize("labels_only", [False, True], ids=["probabilities", "label-only"])
def test_art_copycat_steals_through_the_server(grpc_target, label_only_server, target, labels_only):
    """ART's own CopycatCNN, use_probability=True, 400 queries, a tiny MLP thief: well above the
    10% of chance on 1,000 evaluation images, whether the server gives probabilities or only
    labels (which arrive as one-hot rows)."""
    np.random.seed(0)
    torch.manual_seed(0)
    address = label_only_server if labels_only else grpc_target.address
    thief = pytorch_thief(nets.MLP(hidden=32))
    with RemoteClassifier(address, f"art-copycat-{labels_only}", budget=400) as victim:
        attack = CopycatCNN(victim, nb_stolen=400, use_probability=True, batch_size_query=128,
                            batch_size_fit=32, nb_epochs=10)
        stolen = attack.extract(art_images(data.attack_pool().x[:1000]), thieved_classifier=thief)
        assert victim.queries_used == 400
        assert victim.answer_kinds == {"label_only" if labels_only else "probabilities": 400}
    m = evaluate(stolen.model, target, data.eval_set().take(1000))
    assert m["stolen_accuracy"] > 0.5 and m["fidelity"] > 0.65, m
