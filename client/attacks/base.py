"""The attack interface, in the style of ART's extraction attacks.

An attack gets an :class:`~client.oracle.Oracle` (its only access to the target), a query budget,
a seed and a surrogate architecture; ``run()`` spends at most the budget and returns an
:class:`AttackResult` holding the trained surrogate. Evaluation is separate
(:mod:`client.evaluate`), so an attack never sees the evaluation set.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import nets, training
from common.types import Answer, NUM_CLASSES
from client.oracle import Oracle


class AttackFailed(RuntimeError):
    """The attack could not produce a model (e.g. the answers it got carry too little signal)."""


@dataclass
class AttackResult:
    attack: str
    surrogate: nn.Module
    surrogate_arch: str
    queries_used: int
    wall_time_s: float
    answer_kinds: dict[str, int]
    extra: dict = field(default_factory=dict)
    surrogate_kwargs: dict = field(default_factory=dict)  # e.g. {"hidden": 131} (equivalent)

    def save_surrogate(self, path: str | Path) -> Path:
        training.save_checkpoint(path, self.surrogate, self.surrogate_arch, self.surrogate_kwargs,
                                 {"attack": self.attack, "queries": self.queries_used})
        return Path(path)


def answer_targets(answers: list[Answer]) -> np.ndarray:
    """Training targets from answers: the probability rows where given, one-hot labels where only
    labels came back (a defence may switch a client to label-only mid-attack)."""
    rows = []
    for a in answers:
        if a.probs is not None:
            rows.append(a.probs.astype(np.float32))
        else:
            rows.append(np.eye(NUM_CLASSES, dtype=np.float32)[a.labels])
    return np.concatenate(rows) if rows else np.zeros((0, NUM_CLASSES), np.float32)


def query_in_batches(oracle: Oracle, x: np.ndarray, batch_size: int = 256,
                     progress: bool = True, desc: str = "query") -> list[Answer]:
    from tqdm.auto import tqdm

    answers = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=not progress, leave=False):
        answers.append(oracle(x[i:i + batch_size]))
    return answers


class Attack(ABC):
    """Base class. Subclasses implement :meth:`steal`."""

    name = "attack"
    # Declarative CLI conventions (read by client/cli.py):
    #   params: extra constructor keyword arguments, {name: (type, default, help)};
    #   needs:  data the CLI passes as keyword arguments: "pool" -> data.attack_pool(),
    #           "ood" -> data.ood_pool();
    #   answers: "probabilities" if the attack needs them, "labels" if labels suffice.
    params: dict[str, tuple] = {}
    needs: tuple[str, ...] = ()
    answers: str = "labels"

    def __init__(self, oracle: Oracle, budget: int, *, seed: int = 0, surrogate: str = "cnn",
                 train_config: training.TrainConfig | None = None, batch_size: int = 256,
                 progress: bool = True):
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        if surrogate not in nets.ARCHITECTURES:
            raise ValueError(f"unknown surrogate {surrogate!r}; expected one of "
                             f"{sorted(nets.ARCHITECTURES)}")
        self.oracle = oracle
        self.budget = budget
        self.seed = seed
        self.surrogate_arch = surrogate
        self.train_config = train_config or training.TrainConfig(epochs=30, batch_size=64,
                                                                 seed=seed)
        self.batch_size = batch_size
        self.progress = progress
        self.extra: dict = {}
        self.surrogate_kwargs: dict = {}

    def new_surrogate(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return nets.build(self.surrogate_arch)

    def fit(self, x: np.ndarray, targets: np.ndarray, model: nn.Module | None = None,
            desc: str = "train surrogate") -> nn.Module:
        cfg = training.TrainConfig(**{**self.train_config.__dict__, "progress": self.progress,
                                      "desc": desc})
        return training.train(model or self.new_surrogate(), x, targets, cfg)

    def query(self, x: np.ndarray, desc: str = "query") -> list[Answer]:
        return query_in_batches(self.oracle, x, self.batch_size, self.progress, desc)

    @abstractmethod
    def steal(self) -> nn.Module:
        """Spend at most ``self.budget`` queries; return the trained surrogate."""

    def run(self) -> AttackResult:
        start_used = self.oracle.queries_used
        t0 = time.perf_counter()
        model = self.steal()
        used = self.oracle.queries_used - start_used
        assert used <= self.budget, f"{self.name} used {used} > budget {self.budget}"
        return AttackResult(self.name, model, self.surrogate_arch, used,
                            time.perf_counter() - t0, dict(self.oracle.kinds), dict(self.extra),
                            dict(self.surrogate_kwargs))
