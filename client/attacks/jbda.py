"""Papernot et al. 2017 ("Practical black-box attacks"): Jacobian-based dataset augmentation.

Start from a small seed set of natural images (default 150 from the attacker's pool), query it,
train the surrogate, then grow the set with x' = clip(x + lambda * sign(d F_y(x) / dx)) where F
is the surrogate and y the oracle's label for x; query the new points, retrain, repeat. The set
doubles every round until the budget is spent. Options from the paper: periodic step size
(lambda flips sign every ``tau`` rounds) and reservoir sampling (at most ``kappa`` new points per
round, drawn at random).
"""
from __future__ import annotations

import numpy as np

from common import data
from client.attacks._util import as_float, input_gradient_sign, labels_of
from client.attacks.base import Attack, answer_targets


class JBDA(Attack):
    """Papernot's Jacobian-based dataset augmentation (seed set, lambda, rounds)."""

    name = "jbda"
    needs = ("pool",)
    answers = "labels"
    params = {
        "seeds": (int, 150, "natural seed images drawn from the pool"),
        "lam": (float, 0.1, "augmentation step lambda"),
        "rounds": (int, 0, "augmentation rounds (0 = until the budget is spent)"),
        "tau": (int, 0, "periodic step size: flip lambda's sign every tau rounds (0 = off)"),
        "kappa": (int, 0, "reservoir sampling: at most kappa new points per round (0 = off)"),
        "round_epochs": (int, 0, "surrogate epochs per intermediate round (0 = --epochs)"),
        "labels_only": (bool, False, "train on labels even when probabilities come back"),
    }

    def __init__(self, oracle, budget, *, pool: data.Split, seeds: int = 150, lam: float = 0.1,
                 rounds: int = 0, tau: int = 0, kappa: int = 0, round_epochs: int = 0,
                 labels_only: bool = False, **kw):
        super().__init__(oracle, budget, **kw)
        if seeds <= 0 or lam <= 0:
            raise ValueError("seeds and lam must be positive")
        self.pool = pool
        self.seeds = min(seeds, budget, len(pool))
        self.lam = lam
        self.rounds = rounds
        self.tau = tau
        self.kappa = kappa
        self.round_epochs = round_epochs
        self.labels_only = labels_only

    # hooks for the interleaved variant -----------------------------------------------------
    def _targets(self, answers):
        if self.labels_only:
            return np.eye(10, dtype=np.float32)[labels_of(answers)]
        return answer_targets(answers)

    def _query_batch(self, x_synth: np.ndarray, rng) -> tuple[np.ndarray, list]:
        """Query the synthetic points; returns (the images actually queried, answers)."""
        return x_synth, self.query(x_synth, desc="query synthetic")

    def _synth_share(self) -> float:
        """Fraction of each round's queries that are synthetic (1 for plain JBDA)."""
        return 1.0

    def _train(self, model, x, y, final: bool):
        epochs = self.train_config.epochs if final or not self.round_epochs else self.round_epochs
        saved = self.train_config.epochs
        self.train_config.epochs = epochs
        try:
            return self.fit(x, y, model=model, desc="train surrogate" if final else "train round")
        finally:
            self.train_config.epochs = saved

    def steal(self):
        rng = np.random.default_rng(self.seed)
        idx = rng.choice(len(self.pool), size=self.seeds, replace=False)
        x = as_float(self.pool.x[idx])
        answers = self.query(x, desc="query seeds")
        spent = len(x)
        model = self._train(None, x, self._targets(answers), final=spent >= self.budget)
        round_no, per_round = 0, []
        while spent < self.budget and (self.rounds <= 0 or round_no < self.rounds):
            lam = self.lam
            if self.tau > 0 and (round_no // self.tau) % 2 == 1:
                lam = -lam
            labels = labels_of(answers)
            parents = np.arange(len(x))
            if self.kappa > 0 and len(parents) > self.kappa:
                parents = rng.choice(parents, size=self.kappa, replace=False)
            room = self.budget - spent
            n_synth = int(min(len(parents), np.floor(room * self._synth_share())))
            if n_synth <= 0:
                break
            if n_synth < len(parents):      # the last round: a random subset fits the budget
                parents = rng.choice(parents, size=n_synth, replace=False)
            grad = input_gradient_sign(model, x[parents], labels[parents])
            x_new = np.clip(x[parents] + lam * grad, 0.0, 1.0).astype(np.float32)
            xq, ans = self._query_batch(x_new, rng)
            spent += len(xq)
            x = np.concatenate([x, xq])
            answers = answers + ans
            round_no += 1
            per_round.append(int(len(xq)))
            model = self._train(model, x, self._targets(answers), final=False)
        self.extra.update({"rounds": round_no, "queries_per_round": [self.seeds] + per_round})
        # final training from scratch on the whole substitute set
        return self._train(None, x, self._targets(answers), final=True)
