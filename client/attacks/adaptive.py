"""Attacks adapted to the monitor.

* :class:`InterleavedJBDA`: Papernot's JBDA, but every round's synthetic points are shuffled
  together with natural pool images (a fraction ``natural`` of each round's queries), so the
  stream's distance statistics (PRADA: the minimum L2 distance of each new query to the
  client's earlier ones) look like natural traffic rather than tiny Jacobian steps. The natural
  answers are used for training too.
* :class:`SybilOracle` / :class:`Sybil`: split any attack's budget over N API keys (one
  :class:`~client.oracle.Oracle` per key), so no single key's stream holds the whole attack:
  round-robin (requests rotate over the keys), split (every request spread over all keys) or
  sequential (one key after another, each spending its whole share before the next starts).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from common.types import Answer, AnswerKind, NUM_CLASSES
from client.attacks._util import as_float
from client.attacks.base import Attack, AttackResult
from client.attacks.jbda import JBDA
from client.oracle import BudgetExceeded, Oracle


class InterleavedJBDA(JBDA):
    """JBDA whose synthetic queries are interleaved with natural pool images (evades PRADA)."""

    name = "interleaved-jbda"
    params = {
        **JBDA.params,
        "natural": (float, 0.5, "fraction of each round's queries that are natural pool images"),
    }

    def __init__(self, oracle, budget, *, natural: float = 0.5, **kw):
        if not 0.0 <= natural < 1.0:
            raise ValueError(f"natural must be in [0, 1), got {natural}")
        self.natural = natural
        super().__init__(oracle, budget, **kw)
        self._unused = None

    def _synth_share(self) -> float:
        return 1.0 - self.natural

    def _query_batch(self, x_synth, rng):
        if self._unused is None:
            self._unused = list(rng.permutation(len(self.pool)))
        n_nat = int(round(len(x_synth) * self.natural / (1.0 - self.natural)))
        n_nat = max(0, min(n_nat, self.budget - self._spent_so_far() - len(x_synth)))
        if len(self._unused) >= n_nat:
            nat_idx = [self._unused.pop() for _ in range(n_nat)]
        else:  # pool exhausted: natural images may repeat
            nat_idx = list(rng.choice(len(self.pool), size=n_nat))
        x = np.concatenate([x_synth, as_float(self.pool.x[nat_idx])]) if n_nat else x_synth
        order = rng.permutation(len(x))
        x = x[order]
        answers = self.query(x, desc="query interleaved")
        self.extra["natural_queries"] = self.extra.get("natural_queries", 0) + n_nat
        return x, answers

    def _spent_so_far(self) -> int:
        return self.oracle.queries_used - self._start_used

    def steal(self):
        self._start_used = self.oracle.queries_used
        return super().steal()


def _merge(answers: list[Answer], order: np.ndarray) -> Answer:
    """Concatenate answers from several keys and restore the request's item order. When some
    keys returned probabilities and others only labels, label-only items get one-hot rows and the
    merged answer is reported as LABEL_ONLY (never claim probabilities that were not given)."""
    labels = np.concatenate([a.labels for a in answers])
    if all(a.probs is not None for a in answers):
        probs, kind = np.concatenate([a.probs for a in answers]), AnswerKind.PROBABILITIES
    elif all(a.probs is None for a in answers):
        probs, kind = None, AnswerKind.LABEL_ONLY
    else:
        probs = np.concatenate([a.probs if a.probs is not None
                                else np.eye(NUM_CLASSES, dtype=np.float32)[a.labels]
                                for a in answers])
        kind = AnswerKind.LABEL_ONLY
    model = sum((list(a.model) for a in answers), [])
    wm = np.concatenate([a.watermarked for a in answers])
    inv = np.empty_like(order)
    inv[order] = np.arange(len(order))
    return Answer(labels[inv], None if probs is None else probs[inv], kind,
                  [model[i] for i in inv], wm[inv])


class SybilOracle(Oracle):
    """One oracle made of N per-key oracles.

    mode='round-robin' (default): each request goes whole to the next key (with budget left);
    a request larger than that key's remaining budget is split over the following keys.
    mode='split': every request is split evenly over all keys.
    mode='sequential': one key after another: key 1 answers every request until its share is
    spent (a request larger than what it has left spills over to key 2), then key 2, and so on.
    Needs a per-key budget (``budget``, or each oracle's own).
    ``budget`` (total) is divided evenly over the keys, each key's oracle getting its share as
    its own budget (an existing smaller per-key budget is kept).
    """

    MODES = ("round-robin", "split", "sequential")

    def __init__(self, oracles: Sequence[Oracle], budget: int | None = None,
                 mode: str = "round-robin"):
        if not oracles:
            raise ValueError("SybilOracle needs at least one oracle")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, self.MODES))}, "
                             f"got {mode!r}")
        super().__init__(budget)
        self.oracles = list(oracles)
        self.mode = mode
        self._next = 0
        if budget is not None:
            n = len(self.oracles)
            for i, o in enumerate(self.oracles):
                share = budget // n + (i < budget % n)
                o.budget = share if o.budget is None else min(o.budget, share)
        if mode == "sequential" and any(o.budget is None for o in self.oracles):
            raise ValueError("mode 'sequential' needs a per-key budget (pass budget=, or give "
                             "every key's oracle its own): a key without one would take every "
                             "query and the next key would never start")

    @property
    def per_key_queries(self) -> list[int]:
        return [o.queries_used for o in self.oracles]

    def _room(self, o: Oracle) -> int:
        return np.iinfo(np.int64).max if o.remaining is None else o.remaining

    def _query(self, images: np.ndarray) -> Answer:
        n, k = len(images), len(self.oracles)
        if self.mode == "split":
            parts = np.array_split(np.arange(n), k)
            plan = [(j, p) for j, p in enumerate(parts) if len(p)]
            # shift overflow of a key with too little budget onto the others
            if any(len(p) > self._room(self.oracles[j]) for j, p in plan):
                plan = self._greedy(n, start=0)
        elif self.mode == "sequential":  # the first key with budget left, spilling onto the next
            plan = self._greedy(n, start=0)
        else:
            plan = self._greedy(n, start=self._next)
            self._next = (plan[-1][0] + 1) % k
        answers, order = [], []
        for j, idx in plan:
            answers.append(self.oracles[j](images[idx]))
            order.append(idx)
        return _merge(answers, np.concatenate(order))

    def _greedy(self, n: int, start: int) -> list[tuple[int, np.ndarray]]:
        k, plan, pos = len(self.oracles), [], 0
        for step in range(k):
            if pos >= n:
                break
            j = (start + step) % k
            take = int(min(n - pos, self._room(self.oracles[j])))
            if take > 0:
                plan.append((j, np.arange(pos, pos + take)))
                pos += take
        if pos < n:
            raise BudgetExceeded(f"the {k} keys have {sum(map(self._room, self.oracles))} "
                                 f"queries left, the request needs {n}")
        return plan


class Sybil:
    """Run any attack over N API keys: ``Sybil(attack_cls, oracles, budget, **attack_kwargs)``.

    Builds a :class:`SybilOracle` over ``oracles`` (one per key) and hands it to the attack.
    ``run()`` returns the attack's :class:`AttackResult` with ``extra['sybil']`` holding the
    number of keys and each key's query count.
    """

    def __init__(self, attack: type[Attack] | Callable[..., Attack], oracles: Sequence[Oracle],
                 budget: int, *, mode: str = "round-robin", **attack_kwargs):
        self.oracle = SybilOracle(oracles, budget=budget, mode=mode)
        self.attack = attack(self.oracle, budget, **attack_kwargs)

    def run(self) -> AttackResult:
        result = self.attack.run()
        keys = [getattr(o, "api_key", None) for o in self.oracle.oracles]
        result.extra["sybil"] = {"keys": len(self.oracle.oracles),
                                 "distinct_keys": len(set(keys)) if None not in keys else None,
                                 "per_key_queries": self.oracle.per_key_queries,
                                 "mode": self.oracle.mode}
        result.answer_kinds = dict(self.oracle.kinds)
        return result
