"""Types shared by the service, the monitor, the defences and the client.

Everything here is plain Python/numpy: no gRPC, no torch.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class Level(enum.IntEnum):
    """Rungs of the escalation ladder, lowest first. Comparisons follow severity."""

    NORMAL = 0
    NOISE = 1
    LABEL_ONLY = 2
    SWITCH = 3
    BLOCK = 4

    @classmethod
    def parse(cls, name: str | int | "Level") -> "Level":
        if isinstance(name, Level):
            return name
        if isinstance(name, int):
            return cls(name)
        try:
            return cls[str(name).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown level {name!r}; expected one of {', '.join(l.name for l in cls)}"
            ) from None


class AnswerKind(enum.IntEnum):
    """What the client received for an item."""

    PROBABILITIES = 0
    LABEL_ONLY = 1


@dataclass
class Answer:
    """The answer for a batch, as the client receives it.

    labels: int64 (N,); probs: float32 (N, 10) rows summing to 1, or None when withheld.
    model: name of the model that produced each item (model switching routes per item).
    watermarked: bool (N,), True where a watermark deliberately changed the answer.
    """

    labels: np.ndarray
    probs: np.ndarray | None
    kind: AnswerKind
    model: list[str] = field(default_factory=list)
    watermarked: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if self.probs.shape != (n, NUM_CLASSES):
                raise ValueError(f"probs shape {self.probs.shape} != ({n}, {NUM_CLASSES})")
        if not self.model:
            self.model = ["target"] * n
        if self.watermarked is None:
            self.watermarked = np.zeros(n, dtype=bool)

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def concat(cls, parts: "list[Answer]") -> "Answer":
        """The answers of consecutive requests as one, items in order (all of one kind: with
        probabilities or without)."""
        if not parts:
            raise ValueError("no answers to concatenate")
        kinds = {(a.kind, a.probs is None) for a in parts}
        if len(kinds) > 1:
            raise ValueError(f"answers of different kinds cannot be concatenated: {kinds}")
        return cls(np.concatenate([a.labels for a in parts]),
                   None if parts[0].probs is None else np.concatenate([a.probs for a in parts]),
                   parts[0].kind, [m for a in parts for m in a.model],
                   np.concatenate([np.asarray(a.watermarked, bool) for a in parts]))
