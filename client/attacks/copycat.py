"""The original course project's attack (copycat): query in-distribution images, train a surrogate
on the returned probability vectors (or, in the label-only variant, on the labels)."""
from __future__ import annotations

import numpy as np

from common import data
from common.types import NUM_CLASSES
from client.attacks.base import Attack, answer_targets


class Copycat(Attack):
    """Copycat: query pool images once each, train on the returned probabilities."""

    name = "copycat"
    answers = "probabilities"
    needs = ("pool",)
    params: dict = {}

    def __init__(self, oracle, budget, *, pool: data.Split, labels_only: bool = False, **kw):
        super().__init__(oracle, budget, **kw)
        if budget > len(pool):
            raise ValueError(f"budget {budget} exceeds the pool ({len(pool)} images); the "
                             "copycat queries each pool image once")
        self.pool = pool
        self.labels_only = labels_only

    def steal(self):
        rng = np.random.default_rng(self.seed)
        idx = np.sort(rng.permutation(len(self.pool))[: self.budget])
        x = self.pool.x[idx]
        answers = self.query(x)
        if self.labels_only:
            targets = np.eye(NUM_CLASSES, dtype=np.float32)[np.concatenate([a.labels for a in answers])]
        else:
            targets = answer_targets(answers)
        return self.fit(x, targets)


class CopycatLabels(Copycat):
    """Label-only variant: trains on the returned labels even when probabilities come back."""

    name = "copycat-labels"
    answers = "labels"

    def __init__(self, oracle, budget, **kw):
        kw["labels_only"] = True
        super().__init__(oracle, budget, **kw)
