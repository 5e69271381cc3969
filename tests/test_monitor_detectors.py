"""Detectors: PRADA on synthetic vs natural streams, OOD rate, similarity, volume."""
from __future__ import annotations

import numpy as np
import pytest

from common import data
from monitor.config import (NearDuplicateConfig, OODConfig, PradaConfig, SimilarityConfig,
                            VolumeConfig)
from monitor.detectors import NearDuplicate, OODRate, Prada, Similarity, Volume


@pytest.fixture(scope="module")
def fashion():
    try:
        t = data.load("fashion", "test")
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    return t.x.astype(np.float32) / 255.0, t.y


def _run_prada(x, classes, cfg=PradaConfig()):
    det = Prada(cfg)
    onehot = np.eye(10, dtype=np.float32)
    out = [det.observe(x[i], onehot[classes[i]], 0.0) for i in range(len(x))]
    W = np.array([np.nan if s is None else s for s, _ in out])
    fires = np.array([f for _, f in out])
    return W, fires, det


def _seed_rounds(fashion, perturb, n_seeds=150, n=2400, seed=0):
    """150 pool seeds, then rounds of x + perturb(x) over the whole current set (JBDA shape)."""
    x, y = fashion
    rng = np.random.default_rng(seed)
    idx = rng.choice(5000, n_seeds, replace=False)
    X, Y = x[idx], y[idx]
    stream, labels = [X], [Y]
    while sum(len(s) for s in stream) < n:
        new = np.clip(X + perturb(X, Y, rng), 0, 1).astype(np.float32)
        stream.append(new)
        labels.append(Y)
        X, Y = np.concatenate([X, new]), np.concatenate([Y, Y])
    return np.concatenate(stream)[:n], np.concatenate(labels)[:n]


def test_prada_quiet_on_natural_stream(fashion):
    x, y = fashion
    for order in (np.arange(2400), np.random.default_rng(1).permutation(5000)[:2400],
                  np.random.default_rng(2).integers(0, 5000, 2400)):  # with repeats
        W, fires, det = _run_prada(x[order], y[order])
        assert not fires.any(), f"false alarm, min W {np.nanmin(W):.3f}"
        assert np.isfinite(W).sum() > 2000  # the test really ran


def test_prada_fires_on_random_perturbation_stream(fashion):
    xs, ys = _seed_rounds(fashion, lambda X, Y, rng: 0.1 * rng.choice([-1.0, 1.0], X.shape))
    W, fires, _ = _run_prada(xs, ys)
    assert len(xs) >= 2000
    assert fires.any()
    first = int(np.argmax(fires)) + 1
    assert first < 600, first
    assert np.nanmin(W) < 0.85


def test_prada_fires_on_jacobian_augmented_stream(fashion):
    """JBDA with a linear surrogate fitted on the 150 labelled seeds (nearest centroid: score_c(x)
    = x . w_c + b_c with w_c = centroid_c - mean centroid); the gradient of the predicted class's
    score is w_c, so each round adds 0.1 * sign(w_pred)."""
    x, y = fashion
    rng = np.random.default_rng(3)
    seeds = rng.choice(5000, 150, replace=False)
    X0, Y0 = x[seeds].reshape(150, -1), y[seeds]
    cent = np.stack([X0[Y0 == c].mean(0) if (Y0 == c).any() else X0.mean(0) for c in range(10)])
    w = cent - cent.mean(0)
    b = -0.5 * (cent ** 2).sum(1)

    def jac(X, Y, rng):
        pred = np.argmax(X.reshape(len(X), -1) @ cent.T + b, 1)
        return 0.1 * np.sign(w[pred]).reshape(X.shape)

    xs, ys = _seed_rounds(fashion, jac, seed=3)
    W, fires, _ = _run_prada(xs, ys)
    assert len(xs) >= 2000 and fires.any()
    assert int(np.argmax(fires)) + 1 < 600


def test_prada_growing_sets_and_thresholds_follow_the_paper():
    det = Prada(PradaConfig(ignore_duplicates=False))
    p = np.eye(10, dtype=np.float32)[0]
    a = np.zeros((28, 28), np.float32)
    b = a.copy()
    b[0, 0] = 1.0  # distance 1
    c = a.copy()
    c[0, :4] = 1.0  # distance 2 from a, sqrt(3) from b
    det.observe(a, p, 0)
    assert det.G[0].n == 1 and det.D.n == 0 and det.T[0] == 0  # first query: no distance
    det.observe(b, p, 0)  # d = 1 > T = 0 -> grows; growth dists [0, 1] -> T = 0.5 - 0.5 = 0
    assert det.G[0].n == 2 and list(det.D.view) == [1.0] and det.T[0] == pytest.approx(0.0)
    det.observe(c, p, 0)  # d = sqrt(3) -> grows; dists [0,1,1.732] -> T = mean - std
    d3 = np.array([0, 1, np.sqrt(3)])
    assert det.D.view[-1] == pytest.approx(np.sqrt(3))
    assert det.T[0] == pytest.approx(d3.mean() - d3.std())
    det.observe(b, p, 0)  # duplicate: d = 0 <= T -> recorded but not added
    assert det.G[0].n == 3 and det.D.view[-1] == 0.0
    det2 = Prada(PradaConfig())
    for q in (a, b, b):
        det2.observe(q, p, 0)
    assert det2.D.n == 1  # ignore_duplicates: the repeat is not recorded


def test_ood_rate_window_and_threshold():
    det = OODRate(OODConfig(tau=0.9, window=10, min_queries=10, threshold=0.5))
    conf = np.array([0.95] + [0.05 / 9] * 9, np.float32)
    unsure = np.full(10, 0.1, np.float32)
    res = [det.observe(None, unsure, 0) for _ in range(9)]
    assert all(not f for _, f in res)  # min_queries not reached
    assert det.observe(None, unsure, 0) == (1.0, True)
    for _ in range(5):
        r = det.observe(None, conf, 0)
    assert r == (0.5, False)  # 5 of the last 10 -> not > 0.5
    assert det.observe(None, conf, 0) == (0.4, False)


def test_similarity_knn_mean():
    det = Similarity(SimilarityConfig(k=2, history=3, encoding="raw", threshold=0.5))
    base = np.zeros((28, 28), np.float32)
    imgs = []
    for v in (0.0, 1.0, 2.0, 3.0):
        im = base.copy()
        im[0, 0] = v
        imgs.append(im)
    p = np.full(10, 0.1, np.float32)
    assert det.observe(imgs[0], p, 0) == (None, False)
    assert det.observe(imgs[1], p, 0) == (None, False)
    assert det.observe(imgs[2], p, 0) == (pytest.approx(1.5), False)  # dists 1, 2
    s, f = det.observe(imgs[2], p, 0)  # dists 0, 1 -> 0.5, not < 0.5
    assert s == pytest.approx(0.5) and not f
    s, f = det.observe(imgs[2], p, 0)  # history (ring of 3): [2, 1, 2] -> 0, 0
    assert s == pytest.approx(0.0) and f


def test_volume_sliding_window():
    det = Volume(VolumeConfig(window_seconds=10, threshold=3))
    assert det.observe(None, None, 0.0) == (1.0, False)
    det.observe(None, None, 5.0)
    det.observe(None, None, 5.0)
    assert det.observe(None, None, 9.0) == (4.0, True)
    assert det.observe(None, None, 10.0) == (4.0, True)  # t=0 leaves: (0, 10]
    assert det.observe(None, None, 15.5) == (3.0, False)  # (5.5, 15.5]: 9, 10, 15.5
    assert det.observe(None, None, 20.5) == (2.0, False)  # (10.5, 20.5]: 15.5, 20.5


def _near_dup_scores(stream, cfg=NearDuplicateConfig()):
    det = NearDuplicate(cfg)
    out = [det.observe(x, None, 0.0) for x in stream]
    return np.array([r for r, _ in out]), np.array([f for _, f in out])


def test_near_duplicate_quiet_on_natural_stream_with_exact_repeats(fashion):
    x, _ = fashion
    rng = np.random.default_rng(1)
    idx = rng.choice(5000, 2000)            # with replacement: many exact repeats
    idx[rng.random(2000) < 0.2] = idx[0]    # and a heavily repeated favourite
    rate, fires = _near_dup_scores(x[idx])
    assert not fires.any(), rate.max()
    assert rate.max() < 0.1


def test_near_duplicate_fires_on_interleaved_jacobian_style_stream(fashion):
    """Half natural images, half x + 0.1 sign(noise) perturbations of earlier queries: the mix
    an adaptive attacker uses to keep PRADA's distance statistics normal."""
    x, _ = fashion
    rng = np.random.default_rng(2)
    natural = x[rng.choice(5000, 1200, replace=False)]
    stream = []
    for i in range(1200):
        stream.append(natural[i])
        parent = stream[rng.integers(len(stream))]
        stream.append(np.clip(parent + 0.1 * np.sign(rng.standard_normal((28, 28))), 0, 1))
    rate, fires = _near_dup_scores(np.array(stream, np.float32))
    assert fires.any()
    first = int(np.argmax(fires))
    assert 200 <= first < 400  # min_queries is 200
    assert rate[200:].mean() > 0.2  # the natural stream above stays under 0.1


def test_near_duplicate_config_validation():
    with pytest.raises(ValueError, match="duplicate"):
        NearDuplicateConfig(radius=0.1, duplicate=0.2)
