"""Model switching and misinformation on a tiny pool trained in a temporary artifacts dir."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common import data
from common.types import AnswerKind
from service.defences import PolicyContext, Watermark, build_policy
from service.defences import pool, pool_train
from tests.streams import synthetic as toy_images


def synthetic(n: int, seed: int):
    return data.Split(*toy_images(n, seed))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    train, test = synthetic(600, 1), synthetic(300, 2)
    pool_train.train_cnn(pool.model_path(root, "cnn"), train, test, epochs=4, progress=False)
    pool_train.train_trees(pool.model_path(root, "trees"), train, test, n_estimators=10,
                     progress=False)
    pool_train.train_misinformation(pool.model_path(root, "misinformation"), train, test, epochs=5,
                              progress=False)
    return root


def ctx(seed=0, key=b"secret", client="alice"):
    return PolicyContext(client, key, np.random.default_rng(seed))


def target_probs(split):
    """A stand-in for the target: the true label with high confidence."""
    p = np.full((len(split), 10), 0.02, np.float32)
    p[np.arange(len(split)), split.y] = 0.82
    return p


def test_metadata_written(artifacts):
    for name in ("cnn", "trees", "misinformation"):
        meta = json.loads(pool.meta_path(pool.model_path(artifacts, name)).read_text())
        assert {"arch", "seed", "test_accuracy", "train_time_s"} <= set(meta)
    cnn = json.loads(pool.meta_path(pool.model_path(artifacts, "cnn")).read_text())
    trees = json.loads(pool.meta_path(pool.model_path(artifacts, "trees")).read_text())
    mis = json.loads(pool.meta_path(pool.model_path(artifacts, "misinformation")).read_text())
    assert cnn["test_accuracy"] > 0.8 and trees["test_accuracy"] > 0.8
    assert mis["test_accuracy"] < 0.1 and mis["test_mean_prob_true"] < 0.1


def test_switch_routes_by_keyed_hash(artifacts):
    split = synthetic(300, 3)
    images = split.x.astype(np.float32) / 255
    probs = target_probs(split)
    pol = build_policy({"policy": "switch"}, artifacts=artifacts)
    a = pol.answer(images, probs, ctx())
    assert a.kind == AnswerKind.PROBABILITIES
    np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-5)
    assert np.array_equal(a.labels, a.probs.argmax(1))
    names = np.array(a.model)
    counts = {m: int((names == m).sum()) for m in ("target", "cnn", "trees")}
    assert all(c > 60 for c in counts.values()), counts
    # items routed to the target get the target's probabilities
    np.testing.assert_allclose(a.probs[names == "target"], probs[names == "target"], atol=1e-6)
    # the other models answer differently from the target
    assert not np.allclose(a.probs[names == "trees"], probs[names == "trees"], atol=1e-3)
    # same input -> same model and same answer, whatever the client, rng, batch or position
    b = pol.answer(images[::-1], probs[::-1], ctx(seed=7, client="bob"))
    assert list(names[::-1]) == b.model
    np.testing.assert_array_equal(b.probs, a.probs[::-1])
    one = pol.answer(np.repeat(images[:1], 20, 0), np.repeat(probs[:1], 20, 0), ctx())
    assert len(set(one.model)) == 1 and np.all(one.probs == one.probs[0])
    # another key routes differently
    c = pol.answer(images, probs, ctx(key=b"other"))
    assert c.model != a.model
    # a pool without the target
    d = build_policy({"policy": "switch", "models": ["cnn", "trees"]}, artifacts=artifacts)
    assert set(d.answer(images, probs, ctx()).model) == {"cnn", "trees"}


@pytest.mark.parametrize("name", ["cnn", "trees", "misinformation"])
def test_a_pool_model_gives_an_image_the_same_bits_whatever_it_is_sent_with(artifacts, name):
    """Served pool models answer as the served target does (float64, rounded once): an image's
    probabilities are the same bits alone and among 2, 39 or 99 others. In float32 the CNN and
    the misinformation MLP differed in the last bits between one image alone and the same image
    among 7 others (every row, on a 2-core AVX-512 machine), so a switched client's repeat of an
    image in another batch got another answer. No images: no rows."""
    m = pool.load_model(artifacts, name)
    x = synthetic(100, 4).x.astype(np.float32) / 255
    alone = np.concatenate([m.predict_proba(x[i:i + 1]) for i in range(len(x))])
    for n in (3, 40, 100):
        np.testing.assert_array_equal(m.predict_proba(x[:n]), alone[:n])
    assert m.predict_proba(x[:0]).shape == (0, 10)


def test_switch_then_watermark(artifacts):
    split = synthetic(400, 4)
    images = split.x.astype(np.float32) / 255
    pol = build_policy({"policy": "switch"}, artifacts=artifacts)
    base = pol.answer(images, target_probs(split), ctx())
    a = Watermark(b"secret", rate=0.1).apply(images, base, ctx())
    assert a.watermarked.any() and a.model == base.model
    assert np.all(a.labels[a.watermarked] != base.labels[a.watermarked])


def test_misinformation(artifacts):
    split = synthetic(300, 5)
    images = split.x.astype(np.float32) / 255
    probs = target_probs(split)
    rep = build_policy({"policy": "misinformation", "mode": "replace"}, artifacts=artifacts)
    a = rep.answer(images, probs, ctx())
    np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-5)
    assert set(a.model) == {"misinformation"}
    assert (a.labels == split.y).mean() < 0.1          # mostly wrong, on purpose
    # blend: confident answers (max 0.82 > tau) pass through, unconfident ones are replaced
    blend = build_policy({"policy": "misinformation", "tau": 0.5}, artifacts=artifacts)
    b = blend.answer(images, probs, ctx())
    np.testing.assert_allclose(b.probs, probs, atol=1e-5)
    assert set(b.model) == {"target"}
    flat = np.full_like(probs, 0.1)
    c = blend.answer(images, flat, ctx())
    np.testing.assert_allclose(c.probs, a.probs, atol=1e-5)
    assert set(c.model) == {"misinformation"}
    # deterministic
    np.testing.assert_array_equal(rep.answer(images, probs, ctx(9)).probs, a.probs)


def test_train_pool_caches(artifacts, monkeypatch):
    calls = []
    monkeypatch.setattr(pool_train, "train_cnn", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(data, "load", lambda *a, **k: synthetic(10, 0))
    out = pool_train.train_pool(artifacts, log=lambda s: None, progress=False)
    assert calls == [] and set(out) == {"cnn", "trees", "misinformation"}
    assert out["cnn"]["test_accuracy"] > 0.8


def test_switch_route_follows_the_documented_derivation(artifacts):
    """route = uint64 of digest bytes 40-47 (big-endian) mod len(models), digest = the keyed
    blake2b-512 of the uint8 image (scheme v2), shared with noise and watermark."""
    import hashlib

    split = synthetic(200, 6)
    images = split.x.astype(np.float32) / 255
    pol = build_policy({"policy": "switch"}, artifacts=artifacts)
    c = ctx()
    idx = pol.route(images, c)
    k = hashlib.blake2b(b"secret", digest_size=64, person=b"modelguard/key2").digest()
    for i in range(len(images)):
        d = hashlib.blake2b(split.x[i].tobytes(), key=k, digest_size=64,
                            person=b"modelguard/img2").digest()
        assert idx[i] == int.from_bytes(d[40:48], "big") % 3
    assert c.digests(images) is c.digests(images)            # computed once for the request
    a = pol.answer(images, target_probs(split), c)
    assert a.model == [pol.names[j] for j in idx]
