"""Streams the tests share: toy images of ten learnable classes (``synthetic``), and three
client streams the monitor's runtime and store tests use: natural pool images, a
JBDA-like near-copy stream (escalates) and MNIST (out of distribution), with synthetic target
probabilities (confident for in-distribution images)."""
from __future__ import annotations

import numpy as np
import pytest

from common import data


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: 10 fixed class prototypes plus noise; uint8 (n, 28, 28), labels."""
    proto = np.random.default_rng(12345).random((10, 28, 28))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = np.clip(0.6 * proto[y] + 0.4 * rng.random((n, 28, 28)), 0, 1)
    return (x * 255).round().astype(np.uint8), y.astype(np.int64)


def three_streams(n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    try:
        fx = data.load("fashion", "test").x.astype(np.float32) / 255.0
        mx = data.load("mnist", "test").x.astype(np.float32) / 255.0
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"data unavailable: {exc}")
    rng = np.random.default_rng(0)
    nat = fx[rng.integers(0, 5000, n)]
    seeds = fx[rng.choice(5000, 100, replace=False)]
    jb = [seeds]
    while sum(len(s) for s in jb) < n:
        cur = np.concatenate(jb)
        jb.append(np.clip(cur + 0.1 * np.sign(rng.standard_normal(cur.shape)), 0, 1))
    jb = np.concatenate(jb)[:n].astype(np.float32)
    ood = mx[rng.integers(0, 10000, n)]

    def probs(x, confident):
        lg = rng.normal(0, 1.0, (len(x), 10))
        if confident:  # the target is sure of in-distribution images: top probability > 0.99
            lg[np.arange(len(x)), rng.integers(0, 10, len(x))] += 10.0
        return (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)

    return {"natural": (nat, probs(nat, True)), "jbda": (jb, probs(jb, True)),
            "mnist": (ood, probs(ood, False))}
