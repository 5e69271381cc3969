"""Contracts of the probability-only answer policies and of build_policy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from common.types import AnswerKind
from service.defences import PolicyContext, build_policy, POLICY_NAMES

SIMPLE_SPECS = [
    {"policy": "identity"},
    {"policy": "gaussian", "sigma": 0.05, "preserve_argmax": True},
    {"policy": "gaussian", "sigma": 0.3, "preserve_argmax": True},
    {"policy": "gaussian", "sigma": 0.3, "preserve_argmax": False},
    {"policy": "laplace", "scale": 0.1, "preserve_argmax": True},
    {"policy": "laplace", "scale": 0.5, "preserve_argmax": False},
    {"policy": "round", "decimals": 1},
    {"policy": "round", "decimals": 2},
    {"policy": "top_k", "k": 1},
    {"policy": "top_k", "k": 3},
    {"policy": "reverse_sigmoid", "beta": 1.0, "gamma": 0.2},
    {"policy": "reverse_sigmoid", "beta": 0.7, "gamma": 0.5, "preserve_argmax": False},
]
ARGMAX_KEPT = [s for s in SIMPLE_SPECS
               if s.get("preserve_argmax", True) and s["policy"] != "round"]


def ctx(seed=0, key=b"secret", client="alice"):
    return PolicyContext(client, key, np.random.default_rng(seed))


def batch(seed: int, n: int, conc: float):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(10, conc), size=n).astype(np.float32)
    images = rng.random((n, 28, 28)).astype(np.float32)
    return images, probs


batches = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 40),
                    st.sampled_from([0.05, 0.3, 1.0, 5.0]))


def spec_id(s):
    return "-".join(f"{v}" for v in s.values())


@pytest.mark.parametrize("spec", SIMPLE_SPECS, ids=spec_id)
@settings(max_examples=25, deadline=None)
@given(b=batches)
def test_valid_distribution_and_label(spec, b):
    images, probs = batch(*b)
    a = build_policy(spec, artifacts="unused").answer(images, probs, ctx())
    assert len(a) == len(probs) and a.labels.dtype == np.int64
    assert a.kind == AnswerKind.PROBABILITIES
    assert a.probs.dtype == np.float32 and a.probs.shape == probs.shape
    assert np.all(np.isfinite(a.probs)) and np.all(a.probs >= 0)
    np.testing.assert_allclose(a.probs.sum(1), 1.0, atol=1e-5)
    # the label sent is a top class of the confidences sent
    rows = np.arange(len(a))
    assert np.all(a.probs[rows, a.labels] >= a.probs.max(1))
    assert a.model == ["target"] * len(a) and not a.watermarked.any()


@pytest.mark.parametrize("spec", ARGMAX_KEPT, ids=spec_id)
@settings(max_examples=25, deadline=None)
@given(b=batches)
def test_argmax_preserved_when_promised(spec, b):
    images, probs = batch(*b)
    a = build_policy(spec, artifacts="unused").answer(images, probs, ctx())
    assert np.array_equal(a.labels, probs.argmax(1))
    assert np.array_equal(a.probs.argmax(1), probs.argmax(1))  # strict top, no tie


@settings(max_examples=25, deadline=None)
@given(b=batches, decimals=st.integers(0, 3))
def test_round_is_on_the_grid_and_keeps_the_label(b, decimals):
    images, probs = batch(*b)
    a = build_policy({"policy": "round", "decimals": decimals}).answer(images, probs, ctx())
    units = a.probs.astype(np.float64) * 10 ** decimals
    np.testing.assert_allclose(units, np.round(units), atol=1e-3)
    assert np.array_equal(a.labels, probs.argmax(1))
    # order of classes kept (weakly)
    for p, q in zip(probs, a.probs):
        o = np.argsort(-p, kind="stable")
        assert np.all(np.diff(q[o]) <= 1e-6)


@settings(max_examples=25, deadline=None)
@given(b=batches, k=st.integers(1, 10))
def test_top_k_support(b, k):
    images, probs = batch(*b)
    a = build_policy({"policy": "top_k", "k": k}).answer(images, probs, ctx())
    assert np.all((a.probs > 0).sum(1) <= k)
    assert np.array_equal(a.labels, probs.argmax(1))
    if k == 1:
        assert np.array_equal(a.probs, np.eye(10, dtype=np.float32)[probs.argmax(1)])


def test_label_only():
    images, probs = batch(1, 30, 0.5)
    a = build_policy({"policy": "label_only"}).answer(images, probs, ctx())
    assert a.kind == AnswerKind.LABEL_ONLY and a.probs is None
    assert np.array_equal(a.labels, probs.argmax(1))


def test_reverse_sigmoid_degenerate_case_is_uniform():
    images, probs = batch(2, 10, 0.3)
    spec = {"policy": "reverse_sigmoid", "beta": 1.0, "gamma": 1.0, "preserve_argmax": False}
    a = build_policy(spec).answer(images, probs, ctx())
    np.testing.assert_allclose(a.probs, 0.1, atol=1e-5)


def test_reverse_sigmoid_flattens_confident_answers():
    probs = np.array([[0.991] + [0.001] * 9], np.float32)
    a = build_policy({"policy": "reverse_sigmoid"}).answer(np.zeros((1, 28, 28), np.float32),
                                                           probs, ctx())
    assert a.probs[0, 0] < 0.6 and a.labels[0] == 0


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
def test_noise_is_keyed_not_random(name):
    images, probs = batch(3, 20, 1.0)
    pol = build_policy({"policy": name})
    a = pol.answer(images, probs, ctx(seed=1))
    b = pol.answer(images, probs, ctx(seed=999, client="bob"))  # other rng, other client
    np.testing.assert_array_equal(a.probs, b.probs)
    assert not np.allclose(a.probs, probs, atol=1e-3)          # noise was added
    c = pol.answer(images, probs, ctx(key=b"other-key"))
    assert not np.allclose(a.probs, c.probs)                   # depends on the key
    # a repeated image gets the same answer inside one batch too; averaging cannot remove it
    rep = pol.answer(np.repeat(images[:1], 50, 0), np.repeat(probs[:1], 50, 0), ctx())
    assert np.all(rep.probs == rep.probs[0])
    # a different image with the same probabilities gets different noise
    assert not np.allclose(a.probs[0], pol.answer(images[1:2], probs[:1], ctx()).probs[0])


def test_noise_unkeyed_uses_rng():
    images, probs = batch(4, 20, 1.0)
    pol = build_policy({"policy": "gaussian", "keyed": False})
    a = pol.answer(images, probs, ctx(seed=1))
    np.testing.assert_array_equal(a.probs, pol.answer(images, probs, ctx(seed=1)).probs)
    assert not np.allclose(a.probs, pol.answer(images, probs, ctx(seed=2)).probs)


def test_noise_size_grows_with_sigma():
    images, probs = batch(5, 200, 1.0)
    err = [np.abs(build_policy({"policy": "gaussian", "sigma": s, "preserve_argmax": False})
                  .answer(images, probs, ctx()).probs - probs).mean() for s in (0.01, 0.1, 0.5)]
    assert err[0] < err[1] < err[2]
    flips = (build_policy({"policy": "gaussian", "sigma": 0.5, "preserve_argmax": False})
             .answer(images, probs, ctx()).labels != probs.argmax(1)).mean()
    assert flips > 0.2


def test_empty_batch():
    pol = build_policy({"policy": "gaussian"})
    a = pol.answer(np.zeros((0, 28, 28), np.float32), np.zeros((0, 10), np.float32), ctx())
    assert len(a) == 0


@pytest.mark.parametrize("spec, match", [
    ({"policy": "nope"}, "unknown policy"),
    ({}, "unknown policy"),
    ({"policy": "gaussian", "sigma": -0.1}, "sigma"),
    ({"policy": "gaussian", "sigmaa": 0.1}, "sigmaa"),
    ({"policy": "round", "decimals": "two"}, "decimals"),
    ({"policy": "top_k", "k": 0}, "k"),
    ({"policy": "top_k", "k": 11}, "k"),
    ({"policy": "switch", "models": ["target", "svm"]}, "svm"),
    ({"policy": "misinformation", "mode": "sometimes"}, "mode"),
    ("gaussian", "dict"),
])
def test_bad_specs_are_value_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        build_policy(spec, artifacts="unused")


@pytest.mark.parametrize("spec", [{"policy": "switch"}, {"policy": "misinformation"}])
def test_missing_pool_models_say_make_models(spec, tmp_path):
    with pytest.raises(FileNotFoundError, match="make models"):
        build_policy(spec, artifacts=tmp_path)


def test_policy_names():
    assert set(POLICY_NAMES) == {"identity", "gaussian", "laplace", "round", "top_k",
                                 "reverse_sigmoid", "label_only", "switch", "misinformation"}


def test_package_imports_no_grpc_nor_torch():
    import subprocess
    import sys
    code = ("import sys, service.defences; "
            "print('grpc' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


# --------------------------------------------------------------------------------------------
# Keyed noise from the per-request digests (digest scheme v2, issue #8)
# --------------------------------------------------------------------------------------------

def _grey_images(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 256, (n, 28, 28)) / 255).astype(np.float32)


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
def test_keyed_noise_is_per_image_whatever_the_client_request_or_batch(name):
    images = _grey_images(64, 10)
    pol = build_policy({"policy": name})
    from service.defences import PolicyContext as Ctx
    a = pol.noise(images, 64, Ctx("alice", b"secret", request_id="r1"))
    b = pol.noise(images, 64, Ctx("bob", b"secret", request_id="r2"))
    np.testing.assert_array_equal(a, b)                                  # clients, requests
    perm = np.random.default_rng(0).permutation(64)
    np.testing.assert_array_equal(pol.noise(images[perm], 64, ctx()), a[perm])  # position
    np.testing.assert_array_equal(pol.noise(images[5:6], 1, ctx())[0], a[5])    # batch
    # different images get different noise, on every class
    assert len(np.unique(a[:, 0])) == 64 and np.all(a[0] != a[1])
    # another key gives other noise
    assert not np.any(pol.noise(images, 64, ctx(key=b"other")) == a)
    # float jitter below half a grey level does not change it
    jitter = np.random.default_rng(1).uniform(-0.4, 0.4, images.shape).astype(np.float32) / 255
    np.testing.assert_array_equal(pol.noise(images + jitter, 64, ctx()), a)


@pytest.mark.parametrize("name, param, scale", [("gaussian", "sigma", 0.05),
                                                ("gaussian", "sigma", 0.3),
                                                ("laplace", "scale", 0.1)])
def test_keyed_noise_has_the_configured_distribution(name, param, scale):
    from scipy import stats

    n = 4000
    z = build_policy({"policy": name, param: scale}).noise(_grey_images(n, 11), n, ctx())
    assert z.shape == (n, 10) and np.all(np.isfinite(z))
    flat = z.ravel()
    sd = scale if name == "gaussian" else np.sqrt(2) * scale
    # 40,000 draws: the sample std is within 2% of the configured one, the mean near 0
    assert abs(flat.std() / sd - 1) < 0.02, flat.std()
    assert abs(flat.mean()) < 4 * sd / np.sqrt(flat.size)
    dist = stats.norm(0, scale) if name == "gaussian" else stats.laplace(0, scale)
    assert stats.kstest(flat, dist.cdf).pvalue > 1e-3
    # the 10 classes' noise is uncorrelated (each comes from its own digest bytes)
    c = np.corrcoef(z.T)
    assert np.abs(c[~np.eye(10, dtype=bool)]).max() < 0.06


def test_keyed_noise_follows_the_documented_derivation():
    """u = (uint32 big-endian of digest bytes 4c..4c+3 + 1/2) / 2^32, noise = sigma ndtri(u)."""
    import hashlib

    from scipy.special import ndtri

    images = _grey_images(3, 12)
    k = hashlib.blake2b(b"secret", digest_size=64, person=b"modelguard/key2").digest()
    z = build_policy({"policy": "gaussian", "sigma": 0.2}).noise(images, 3, ctx())
    for i in range(3):
        q = np.clip(np.rint(images[i] * np.float32(255)), 0, 255).astype(np.uint8)
        d = hashlib.blake2b(q.tobytes(), key=k, digest_size=64, person=b"modelguard/img2").digest()
        u = np.array([(int.from_bytes(d[4 * c:4 * c + 4], "big") + 0.5) / 2**32
                      for c in range(10)])
        np.testing.assert_allclose(z[i], 0.2 * ndtri(u), rtol=1e-12)


def test_digests_are_computed_once_per_request_and_only_when_needed(monkeypatch):
    from service.defences import PolicyContext as Ctx, Watermark
    from service.defences import base

    calls = []
    real = base.image_digests
    monkeypatch.setattr(base, "image_digests", lambda k, x: calls.append(len(x)) or real(k, x))
    images, probs = batch(13, 32, 1.0)
    wm = Watermark(b"secret", rate=0.1)
    c = Ctx("alice", b"secret", request_id="r")
    wm.apply(images, build_policy({"policy": "gaussian"}).answer(images, probs, c), c)
    assert calls == [32]                       # noise and watermark share one computation
    c = Ctx("alice", b"secret", request_id="r")
    build_policy({"policy": "reverse_sigmoid"}).answer(images, probs, c)
    build_policy({"policy": "round"}).answer(images, probs, c)
    assert calls == [32]                       # policies without keyed randomness: no hashing
    d = c.digests(images)
    assert calls == [32, 32]
    assert d.words(base.WM_SELECT_RANGE, 2).shape[0] == 32   # one digest per image
    assert c.digests(images) is c.digests(images) and calls == [32, 32]


def test_digest_byte_ranges_are_disjoint_and_independent():
    from service.defences import base

    spans = [base.NOISE_RANGE, base.ROUTE_RANGE, base.WM_SELECT_RANGE, base.WM_OFFSET_RANGE]
    used = np.zeros(base.DIGEST_SIZE, int)
    for s, n in spans:
        used[s:s + n] += 1
    assert used.max() == 1
    d = base.InputDigests.compute(b"secret", _grey_images(5000, 14))
    u = d.uniforms()[:, 0]
    route = (d.words(base.ROUTE_RANGE, 8)[:, 0] % np.uint64(3)).astype(int)
    sel = d.words(base.WM_SELECT_RANGE, 2)[:, 0].astype(float) / 2**16
    # no visible dependence between the uses: correlations ~ 0 (5000 items: sd 0.014)
    assert abs(np.corrcoef(u, sel)[0, 1]) < 0.06
    assert abs(np.corrcoef(u, route)[0, 1]) < 0.06
    assert abs(np.corrcoef(sel, route)[0, 1]) < 0.06


def test_unkeyed_noise_rng_is_derived_lazily_per_request():
    from service.defences import PolicyContext as Ctx

    images, probs = batch(15, 10, 1.0)
    pol = build_policy({"policy": "gaussian", "keyed": False})
    a = pol.answer(images, probs, Ctx("alice", b"secret", request_id="r1")).probs
    np.testing.assert_array_equal(
        a, pol.answer(images, probs, Ctx("alice", b"secret", request_id="r1")).probs)
    assert not np.allclose(a, pol.answer(images, probs,
                                         Ctx("alice", b"secret", request_id="r2")).probs)


def _round_reference(probs, decimals):
    """The original per-row largest-remainder loop, as the vectorised RoundPolicy's reference."""
    from service.defences.base import as_probs, renormalise
    p = as_probs(probs)
    p = renormalise(p, np.full_like(p, 0.1))
    units = 10 ** decimals
    scaled = p * units
    base = np.floor(scaled)
    left = (units - base.sum(1)).round().astype(int)
    order = np.argsort(-(scaled - base), axis=1, kind="stable")
    for i in range(len(p)):
        base[i, order[i, :left[i]]] += 1
    return base / units


@settings(max_examples=40, deadline=None)
@given(b=batches, decimals=st.integers(0, 4))
def test_round_vectorised_equals_the_row_loop(b, decimals):
    images, probs = batch(*b)
    a = build_policy({"policy": "round", "decimals": decimals}).answer(images, probs, ctx())
    want = _round_reference(probs, decimals)
    np.testing.assert_array_equal(a.probs, (want.astype(np.float32)
                                            / want.astype(np.float32).sum(1, keepdims=True,
                                                                          dtype=np.float32)))
