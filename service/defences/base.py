"""The defence interface: an answer policy turns the target's probabilities into the answer a
client receives. Plain numpy here (no torch, no gRPC)."""
from __future__ import annotations

import hashlib
import hmac
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from common.types import Answer, NUM_CLASSES


@dataclass
class PolicyContext:
    """Per-request context the service hands to every policy."""

    client_id: str
    key: bytes                  # server secret (HMAC key) for keyed hashing
    rng: np.random.Generator    # seeded per request by the service


class AnswerPolicy(ABC):
    """Given the input images, the target's probabilities and a context, produce the answer."""

    name: str = "policy"

    @abstractmethod
    def answer(self, images: np.ndarray, probs: np.ndarray, ctx: PolicyContext) -> Answer:
        """images float32 (N, 28, 28) in [0, 1]; probs float32 (N, 10): the target's output."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


# --------------------------------------------------------------------------------------------
# Keyed hashing of inputs (noise, routing and watermark selection all derive from it)
# --------------------------------------------------------------------------------------------

def quantise(images: np.ndarray) -> np.ndarray:
    """Images as uint8 (N, 28, 28): float images in [0, 1] are scaled by 255 and rounded, so the
    hash of an image does not depend on float noise below one grey level."""
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    return np.clip(np.rint(images.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def keyed_digests(key: bytes, images: np.ndarray, domain: bytes) -> list[bytes]:
    """HMAC-SHA256(key, domain || uint8 image bytes) for each image. ``domain`` separates the
    uses (noise, routing, watermark) so one digest says nothing about another."""
    q = quantise(images)
    return [hmac.new(key, domain + b"\x00" + q[i].tobytes(), hashlib.sha256).digest()
            for i in range(len(q))]


def digest_uint(d: bytes, start: int = 0, nbytes: int = 8) -> int:
    return int.from_bytes(d[start:start + nbytes], "big")


# --------------------------------------------------------------------------------------------
# Probability-vector helpers
# --------------------------------------------------------------------------------------------

def as_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must have shape (N, {NUM_CLASSES}), got {p.shape}")
    return p


def renormalise(p: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Clip at 0 and scale rows to sum 1; rows whose mass vanished fall back to ``fallback``."""
    p = np.clip(p, 0.0, None)
    s = p.sum(1, keepdims=True)
    bad = ~(s[:, 0] > 0) | ~np.isfinite(s[:, 0])
    out = np.divide(p, s, out=np.zeros_like(p), where=s > 0)
    if bad.any():
        out[bad] = fallback[bad]
    return out


def enforce_argmax(p: np.ndarray, top: np.ndarray, margin: float = 1e-6) -> np.ndarray:
    """Make class ``top[i]`` the strict maximum of row i: if another class overtook it, swap the
    two values (the multiset of confidences is unchanged), then open a small margin if tied.
    Rows must already sum to 1; they still do afterwards."""
    p = p.copy()
    rows = np.arange(len(p))
    cur = p.argmax(1)
    moved = cur != top
    if moved.any():
        r = rows[moved]
        a, b = p[r, top[moved]].copy(), p[r, cur[moved]].copy()
        p[r, top[moved]], p[r, cur[moved]] = b, a
    others = p.copy()
    others[rows, top] = -np.inf
    second = others.max(1)
    tight = p[rows, top] < second + margin
    if tight.any():
        p[rows[tight], top[tight]] = second[tight] + margin
        p[tight] /= p[tight].sum(1, keepdims=True)
    return p


def labels_for(answered: np.ndarray, target_probs: np.ndarray) -> np.ndarray:
    """The label sent with answered probabilities: their argmax, with ties broken in favour of
    the target's own decision."""
    lab = answered.argmax(1)
    t = np.asarray(target_probs).argmax(1)
    rows = np.arange(len(answered))
    keep = answered[rows, t] >= answered[rows, lab]
    lab[keep] = t[keep]
    return lab.astype(np.int64)


def finish(p: np.ndarray) -> np.ndarray:
    """float32 rows that sum to 1 within float32 precision."""
    p32 = p.astype(np.float32)
    return p32 / p32.sum(1, keepdims=True, dtype=np.float32)
