"""The attacker's view of the target: a query function with a budget.

Every attack talks to the target only through an :class:`Oracle`: ``oracle(images) -> Answer``.
:class:`RemoteOracle` sends the images over gRPC (client/api.py); :class:`LocalOracle` wraps an
in-process model for unit tests. Both count queries and refuse to exceed the budget.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import numpy as np

from common.types import Answer, AnswerKind


class BudgetExceeded(RuntimeError):
    """An attack asked for more queries than its budget allows."""


class Oracle:
    """Base class: counts queries, enforces the budget, tallies the kinds of answers received."""

    def __init__(self, budget: int | None = None):
        if budget is not None and budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.budget = budget
        self.queries_used = 0
        self.kinds: Counter[str] = Counter()

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries_used

    def __call__(self, images: np.ndarray) -> Answer:
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        n = len(images)
        if self.budget is not None and self.queries_used + n > self.budget:
            raise BudgetExceeded(
                f"{n} more queries would exceed the budget ({self.queries_used}/{self.budget} used)"
            )
        answer = self._query(images) if n else Answer(np.zeros(0, np.int64), None,
                                                      AnswerKind.LABEL_ONLY)
        self.queries_used += n
        self.kinds[answer.kind.name.lower()] += n
        return answer

    def _query(self, images: np.ndarray) -> Answer:
        raise NotImplementedError


class LocalOracle(Oracle):
    """Answers from an in-process probability function (tests, offline experiments)."""

    def __init__(self, proba: Callable[[np.ndarray], np.ndarray], budget: int | None = None,
                 labels_only: bool = False):
        super().__init__(budget)
        self.proba = proba
        self.labels_only = labels_only

    def _query(self, images: np.ndarray) -> Answer:
        p = np.asarray(self.proba(images), dtype=np.float32)
        if self.labels_only:
            return Answer(p.argmax(1), None, AnswerKind.LABEL_ONLY)
        return Answer(p.argmax(1), p, AnswerKind.PROBABILITIES)
