"""Network architectures: the target (the original course project's MLP) and others.

Every network maps float images in [0, 1], shape (N, 28, 28) or (N, 1, 28, 28), to logits (N, 10).
"""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten -> Linear(784, hidden) -> ReLU -> Linear(hidden, 10): the original target."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.reshape(len(x), 784))))


class DeepMLP(nn.Module):
    """A wider, deeper MLP: a surrogate that does not copy the target's architecture."""

    def __init__(self, hidden: int = 256, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(nn.Module):
    """Two conv blocks and a dense head."""

    def __init__(self, width: int = 32, dropout: float = 0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 49, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(len(x), 1, 28, 28)))


ARCHITECTURES = {"mlp": MLP, "deep_mlp": DeepMLP, "cnn": SmallCNN}


def build(name: str, **kwargs) -> nn.Module:
    try:
        return ARCHITECTURES[name](**kwargs)
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}"
        ) from None
