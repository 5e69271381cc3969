"""Functionally equivalent extraction: exact recovery of a one-hidden-layer ReLU target."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from client.attacks.equivalent import FunctionallyEquivalent, NeedsProbabilities
from client.oracle import LocalOracle
from common import data, nets, training


@pytest.fixture(scope="module")
def narrow_target():
    """784 -> 16 -> 10 ReLU MLP trained on 2,000 images for 2 epochs (the target's class)."""
    train = data.load("fashion", "train").take(2000)
    torch.manual_seed(0)
    model = nets.build("mlp", hidden=16)
    return training.train(model, train.x, train.y,
                          training.TrainConfig(epochs=2, seed=0, progress=False))


def run(target, budget, **params):
    oracle = LocalOracle(lambda x: training.predict_proba(target, x), budget)
    attack = FunctionallyEquivalent(oracle, budget, pool=data.attack_pool(), seed=0,
                                    progress=False, **params)
    return attack.run(), oracle


def test_recovers_the_hidden_layer_and_agrees_with_the_target(narrow_target):
    # raw pool images as segment ends: this weak target barely underflows, and units that
    # switch on few images are crossed more often than on shrunk segments
    result, oracle = run(narrow_target, 80_000, contrast=1.0)
    assert result.queries_used <= 80_000 and result.queries_used == oracle.queries_used
    ev = data.eval_set()
    t = training.predict_proba(narrow_target, ev.x)
    s = training.predict_proba(result.surrogate, ev.x)
    fidelity = float(np.mean(t.argmax(1) == s.argmax(1)))
    assert fidelity > 0.99, result.extra
    # not just the labels: the probabilities match too (on 99% of the images within 0.05)
    assert np.quantile(np.abs(t - s).max(1), 0.99) < 0.05
    # every unit that switches on 1-99% of the pool was found, its weight row matches up to
    # scale (units that almost never switch are rarely crossed; the fit absorbs them)
    w_true = narrow_target.fc1.weight.detach().numpy()
    pre = data.attack_pool().x.reshape(-1, 784) / 255.0 @ w_true.T + \
        narrow_target.fc1.bias.detach().numpy()
    active = (pre > 0).mean(0)
    alive = (active > 0.01) & (active < 0.99)
    rec = result.surrogate.fc1.weight.detach().numpy()[:result.extra["recovered_units"]]
    cos = np.abs((rec / np.linalg.norm(rec, axis=1, keepdims=True))
                 @ (w_true / np.linalg.norm(w_true, axis=1, keepdims=True)).T)
    assert alive.sum() >= 10 and (cos.max(0)[alive] > 0.999).all(), cos.max(0)
    assert result.surrogate_arch == "mlp"
    assert result.surrogate_kwargs == {"hidden": result.extra["hidden"]}


def test_saved_surrogate_reloads(narrow_target, tmp_path):
    result, _ = run(narrow_target, 30_000, max_units=4)
    path = result.save_surrogate(tmp_path / "fee.pt")
    model, meta = training.load_checkpoint(path)
    x = data.eval_set().x[:50]
    np.testing.assert_allclose(training.predict_proba(model, x),
                               training.predict_proba(result.surrogate, x), atol=1e-6)


def test_stays_inside_the_input_domain_and_budget(narrow_target):
    seen = []

    def proba(x):
        seen.append((float(np.min(x)), float(np.max(x)), x.dtype))
        return training.predict_proba(narrow_target, x)

    oracle = LocalOracle(proba, 20_000)
    FunctionallyEquivalent(oracle, 20_000, pool=data.attack_pool(), progress=False).run()
    assert oracle.queries_used <= 20_000
    assert min(s[0] for s in seen) >= 0.0 and max(s[1] for s in seen) <= 1.0
    assert {s[2] for s in seen} == {np.dtype(np.float32)}


def test_label_only_answers_are_refused(narrow_target):
    oracle = LocalOracle(lambda x: training.predict_proba(narrow_target, x), 5000,
                         labels_only=True)
    with pytest.raises(NeedsProbabilities):
        FunctionallyEquivalent(oracle, 5000, pool=data.attack_pool(), progress=False).run()
