"""ActiveThief (Pal et al., AAAI 2020): label-only extraction with active learning.

Start from a random seed set of pool images, query their labels, train the surrogate; then in each
round pick the next batch from the still-unqueried pool by the surrogate's *uncertainty* (entropy
of its prediction), by *k-center* (greedy farthest-first in the surrogate's probability space,
covering the pool), or at random, query, retrain. Only labels are used.
"""
from __future__ import annotations

import numpy as np

from common import data
from client.attacks._util import labels_of, one_hot, proba
from client.attacks.base import Attack


def kcenter_greedy(feats: np.ndarray, labelled: np.ndarray, k: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Greedy k-center: repeatedly take the candidate farthest from every chosen/labelled point.
    ``feats`` covers the whole pool; ``labelled`` is a boolean mask. Returns k new indices."""
    feats = feats.astype(np.float32)
    d = np.full(len(feats), np.inf, np.float32)
    lab = feats[labelled]
    for i in range(0, len(lab), 256):  # squared distance to the nearest labelled point
        d = np.minimum(d, ((feats[:, None, :] - lab[None, i:i + 256, :]) ** 2).sum(-1).min(1))
    if not labelled.any():
        d[:] = 0.0
        d[rng.integers(len(feats))] = 1.0
    d[labelled] = -1.0
    chosen = []
    for _ in range(k):
        j = int(np.argmax(d))
        chosen.append(j)
        d = np.minimum(d, ((feats - feats[j]) ** 2).sum(1))
        d[j] = -1.0
        d[labelled] = -1.0
    return np.array(chosen, dtype=np.int64)


class ActiveThief(Attack):
    """ActiveThief: label-only active learning (uncertainty / k-center / random) on the pool."""

    name = "activethief"
    needs = ("pool",)
    answers = "labels"
    params = {
        "selection": (str, "uncertainty", "'uncertainty', 'kcenter' or 'random'"),
        "initial": (float, 0.1, "seed set size as a fraction of the budget (or a count if > 1)"),
        "rounds": (int, 5, "active-learning rounds after the seed set"),
        "round_epochs": (int, 0, "surrogate epochs per intermediate round (0 = --epochs)"),
    }

    def __init__(self, oracle, budget, *, pool: data.Split, selection: str = "uncertainty",
                 initial: float = 0.1, rounds: int = 5, round_epochs: int = 0, **kw):
        super().__init__(oracle, budget, **kw)
        if selection not in ("uncertainty", "kcenter", "random"):
            raise ValueError(f"selection must be uncertainty, kcenter or random, got {selection!r}")
        if budget > len(pool):
            raise ValueError(f"budget {budget} exceeds the pool ({len(pool)} images); ActiveThief "
                             "queries each pool image at most once")
        self.pool = pool
        self.selection = selection
        self.initial = int(initial) if initial > 1 else max(1, int(round(initial * budget)))
        self.initial = min(self.initial, budget)
        self.rounds = max(0, rounds)
        self.round_epochs = round_epochs
        self.name = f"activethief-{selection}"

    def _train(self, x, labels, final):
        saved = self.train_config.epochs
        if not final and self.round_epochs:
            self.train_config.epochs = self.round_epochs
        try:
            return self.fit(x, one_hot(labels), desc="train surrogate" if final else "train round")
        finally:
            self.train_config.epochs = saved

    def steal(self):
        rng = np.random.default_rng(self.seed)
        n = len(self.pool)
        labelled = np.zeros(n, bool)
        labels = np.full(n, -1, np.int64)
        first = rng.choice(n, size=self.initial, replace=False)
        labels[first] = labels_of(self.query(self.pool.x[first], desc="query seed set"))
        labelled[first] = True
        remaining = self.budget - self.initial
        per_round = [remaining // self.rounds + (i < remaining % self.rounds)
                     for i in range(self.rounds)] if self.rounds else []
        model = None
        for k in per_round:
            if k <= 0:
                continue
            model = self._train(self.pool.x[labelled], labels[labelled], final=False)
            cand = np.flatnonzero(~labelled)
            if self.selection == "random":
                pick = rng.choice(cand, size=k, replace=False)
            else:
                p = proba(model, self.pool.x)
                if self.selection == "uncertainty":
                    ent = -(p[cand] * np.log(np.clip(p[cand], 1e-12, 1))).sum(1)
                    pick = cand[np.argsort(-ent, kind="stable")[:k]]
                else:
                    pick = kcenter_greedy(p, labelled, k, rng)
            labels[pick] = labels_of(self.query(self.pool.x[pick], desc="query round"))
            labelled[pick] = True
        self.extra["labelled"] = int(labelled.sum())
        return self._train(self.pool.x[labelled], labels[labelled], final=True)
