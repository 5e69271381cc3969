"""Answer policies that only transform the target's probabilities: identity, Gaussian and Laplace
noise, rounding, top-k, reverse sigmoid, label only."""
from __future__ import annotations

import numpy as np

from common.types import Answer, AnswerKind, NUM_CLASSES
from service.defences.base import (NOISE_RANGE, AnswerPolicy, PolicyContext, as_probs,
                                   enforce_argmax, finish, labels_for, renormalise)


class IdentityPolicy(AnswerPolicy):
    """The undefended answer: the target's probabilities and label."""

    name = "identity"

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        p = renormalise(p, np.full_like(p, 1.0 / NUM_CLASSES))
        return Answer(p.argmax(1), finish(p), AnswerKind.PROBABILITIES)


class LabelOnlyPolicy(AnswerPolicy):
    """Only the target's top-1 label; no confidences."""

    name = "label_only"

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        return Answer(as_probs(probs).argmax(1), None, AnswerKind.LABEL_ONLY)


class NoisePolicy(AnswerPolicy):
    """Additive noise on the probability vector, clipped at 0 and renormalised.

    ``keyed=True`` (default) derives each item's noise from its keyed digest
    (``ctx.digests(images)``, the noise byte range): 10 uniforms per image, mapped through the
    inverse CDF (Gaussian: ``sigma * ndtri(u)``; Laplace: ``-b sign(u - 1/2) log(1 - 2|u - 1/2|)``).
    The same image always gets the same noise, for any client and request, so averaging repeated
    (or Sybil) queries does not remove it. ``keyed=False`` draws from ctx.rng instead (fresh
    noise per request: averaging repeats then recovers the truth). ``preserve_argmax`` swaps the
    target's top class back to the top when noise displaced it.
    """

    def __init__(self, dist: str, scale: float, preserve_argmax: bool = True,
                 keyed: bool = True):
        if dist not in ("gaussian", "laplace"):
            raise ValueError(f"unknown noise distribution {dist!r}")
        self.name = dist
        self.dist = dist
        self.scale = float(scale)
        self.preserve_argmax = preserve_argmax
        self.keyed = keyed

    def _draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.dist == "gaussian":
            return rng.normal(0.0, self.scale, size=(n, NUM_CLASSES))
        return rng.laplace(0.0, self.scale, size=(n, NUM_CLASSES))

    def inverse_cdf(self, u: np.ndarray) -> np.ndarray:
        """Noise values for uniforms ``u`` in (0, 1), elementwise."""
        if self.dist == "gaussian":
            from scipy.special import ndtri

            return self.scale * ndtri(u)
        c = u - 0.5
        return -self.scale * np.sign(c) * np.log1p(-2.0 * np.abs(c))

    def noise(self, images: np.ndarray, n: int, ctx: PolicyContext) -> np.ndarray:
        if not self.keyed:
            return self._draw(ctx.rng, n)
        if n == 0:
            return np.zeros((0, NUM_CLASSES))
        return self.inverse_cdf(ctx.digests(images).uniforms(NOISE_RANGE))

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        top = p.argmax(1)
        q = renormalise(p + self.noise(images, len(p), ctx), p)
        if self.preserve_argmax:
            q = enforce_argmax(q, top)
        q = finish(q)
        return Answer(labels_for(q, p), q, AnswerKind.PROBABILITIES)


class RoundPolicy(AnswerPolicy):
    """Confidences rounded to ``decimals`` decimals by largest remainder, so every value is a
    multiple of 10^-decimals and they still sum to exactly 1 (plain rounding does not). The
    order of the classes is kept (ties may appear); the label is the target's top-1."""

    name = "round"

    def __init__(self, decimals: int = 2):
        self.decimals = int(decimals)

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        p = renormalise(p, np.full_like(p, 1.0 / NUM_CLASSES))
        units = 10 ** self.decimals
        scaled = p * units
        base = np.floor(scaled)
        rem = scaled - base
        left = (units - base.sum(1)).round().astype(np.int64)
        # hand out the remaining units to the largest remainders (stable: lower class first):
        # class c of row i gets one more unit when its rank among the remainders is < left[i]
        order = np.argsort(-rem, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(NUM_CLASSES)[None, :].repeat(len(p), 0), 1)
        base += rank < left[:, None]
        q = base / units
        return Answer(labels_for(q, p), finish(q), AnswerKind.PROBABILITIES)


class TopKPolicy(AnswerPolicy):
    """Only the k largest confidences, renormalised; the rest are 0. k=1 is a one-hot label
    sent as probabilities."""

    name = "top_k"

    def __init__(self, k: int = 3):
        self.k = int(k)

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        order = np.argsort(-p, axis=1, kind="stable")
        q = np.zeros_like(p)
        rows = np.arange(len(p))[:, None]
        q[rows, order[:, :self.k]] = p[rows, order[:, :self.k]]
        top = p.argmax(1)
        q = renormalise(q, np.eye(NUM_CLASSES)[top] if len(p) else q)
        q = enforce_argmax(q, top) if self.k > 1 else q
        q = finish(q)
        return Answer(labels_for(q, p), q, AnswerKind.PROBABILITIES)


class ReverseSigmoidPolicy(AnswerPolicy):
    """Reverse sigmoid (Lee et al. 2019), as in ART:
    y' = alpha * clip(y - beta * (sigmoid(gamma * logit(y)) - 1/2), 0, 1), alpha renormalises.
    Note beta = gamma = 1 maps every vector to uniform. ``preserve_argmax`` (default True) keeps
    the target's top-1 on top, as the paper intends (it perturbs confidences, not decisions)."""

    name = "reverse_sigmoid"

    def __init__(self, beta: float = 1.0, gamma: float = 0.2, preserve_argmax: bool = True):
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.preserve_argmax = preserve_argmax

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        y = np.clip(p, 1e-9, 1 - 1e-9)
        logit = np.log(y) - np.log1p(-y)
        r = self.beta * (1.0 / (1.0 + np.exp(-self.gamma * logit)) - 0.5)
        q = renormalise(np.clip(p - r, 0.0, 1.0), p)
        if self.preserve_argmax:
            q = enforce_argmax(q, p.argmax(1))
        q = finish(q)
        return Answer(labels_for(q, p), q, AnswerKind.PROBABILITIES)
