"""Small helpers shared by the attacks (not part of the public interface)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common import training
from common.types import Answer, NUM_CLASSES


def as_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; float images are returned as float32."""
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


def labels_of(answers: list[Answer]) -> np.ndarray:
    return (np.concatenate([a.labels for a in answers]) if answers
            else np.zeros(0, np.int64))


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


def proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return training.predict_proba(model, x)


def shift_flip(x: np.ndarray, rng: np.random.Generator, max_shift: int = 2,
               flip: bool = True) -> np.ndarray:
    """Natural-looking augmented copies: random translation by up to ``max_shift`` pixels and,
    optionally, a horizontal flip. Keeps dtype and the [0, 1] / uint8 domain."""
    out = np.empty_like(x)
    for i, img in enumerate(x):
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        img = np.roll(np.roll(img, dy, axis=0), dx, axis=1)
        if flip and rng.random() < 0.5:
            img = img[:, ::-1]
        out[i] = img
    return out


def input_gradient_sign(model: nn.Module, x: np.ndarray, labels: np.ndarray,
                        batch_size: int = 512) -> np.ndarray:
    """sign(d surrogate_logit[label] / d x): Papernot's Jacobian direction, per image."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(as_float(x[i:i + batch_size])).requires_grad_(True)
        yb = torch.from_numpy(np.asarray(labels[i:i + batch_size], dtype=np.int64))
        logits = model(xb)
        logits.gather(1, yb[:, None]).sum().backward()
        out.append(torch.sign(xb.grad).numpy())
    return np.concatenate(out) if out else np.zeros_like(as_float(x))
