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
