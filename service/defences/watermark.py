"""DAWN-style watermarking (Szyller et al.) and its verifier.

Selection (digest scheme v2, service/defences/base.py): the image's keyed BLAKE2b digest, whose
watermark bytes are disjoint from the noise and routing bytes; the item is watermarked when the
16-bit word at WM_SELECT_RANGE is < 2^16 * rate. The selection depends on the image only (not
the client), so every client and every repeat gets the same answer for the same image. A
watermarked item gets a deterministic wrong label: (label + 1 + (uint64 at WM_OFFSET_RANGE
mod 9)) mod 10, i.e. one of the 9 other classes chosen pseudo-randomly by the keyed hash. When probabilities are sent, the
confidences of the true and the wrong label are swapped, so the vector still looks natural.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.types import Answer, NUM_CLASSES
from service.defences.base import (WM_OFFSET_RANGE, WM_SELECT_RANGE, InputDigests,
                                   PolicyContext, quantise)

DEFAULT_RATE = 0.005


class WatermarkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    rate: float = Field(DEFAULT_RATE, gt=0.0, le=0.5)


class Watermark:
    def __init__(self, key: bytes, rate: float = DEFAULT_RATE):
        if not key:
            raise ValueError("the watermark needs a non-empty key")
        if not 0.0 < rate <= 0.5:
            raise ValueError(f"watermark rate must be in (0, 0.5], got {rate}")
        self.key = key
        self.rate = float(rate)
        self.threshold = int(round(2 ** 16 * self.rate))

    @classmethod
    def from_spec(cls, spec: dict | None, key: bytes) -> "Watermark | None":
        try:
            s = WatermarkSpec.model_validate(spec or {})
        except ValidationError as exc:
            raise ValueError(f"bad watermark spec {spec!r}: {exc}") from None
        return cls(key, s.rate) if s.enabled else None

    def select(self, images: np.ndarray, digests: InputDigests | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(selected bool (N,), offset int64 (N,) in 1..9) for each image. ``digests`` must be
        the images' digests under this watermark's key (computed here when None)."""
        if digests is None:
            digests = InputDigests.compute(self.key, images)
        sel = digests.words(WM_SELECT_RANGE, 2)[:, 0] < self.threshold
        off = 1 + (digests.words(WM_OFFSET_RANGE, 8)[:, 0] % np.uint64(NUM_CLASSES - 1))
        return sel, off.astype(np.int64)

    def apply(self, images: np.ndarray, answer: Answer, ctx: PolicyContext | None = None) -> Answer:
        """Watermark ``answer``. With a context keyed like this watermark, the request's cached
        digests are reused (one hash per image per request)."""
        digests = ctx.digests(images) if ctx is not None and ctx.key == self.key else None
        sel, off = self.select(images, digests)
        prev = answer.watermarked if answer.watermarked is not None else np.zeros(len(sel), bool)
        if not sel.any():
            return Answer(answer.labels, answer.probs, answer.kind, list(answer.model), prev | sel)
        labels = answer.labels.copy()
        wrong = (labels + off) % NUM_CLASSES
        probs = None if answer.probs is None else answer.probs.copy()
        rows = np.flatnonzero(sel)
        labels[rows] = wrong[rows]
        if probs is not None:
            orig = answer.labels[rows]
            a, b = probs[rows, orig].copy(), probs[rows, wrong[rows]].copy()
            probs[rows, orig], probs[rows, wrong[rows]] = b, a
        return Answer(labels, probs, answer.kind, list(answer.model), prev | sel)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

NULL_RATE = 1.0 / (NUM_CLASSES - 1)


@dataclass
class VerifyResult:
    matches: int            # records where the suspect outputs the watermark's wrong label
    total: int              # distinct watermarked images checked
    duplicates_dropped: int
    match_rate: float
    p0: float
    p_value: float          # unconditional test: Binomial(total, 1/9), no key needed
    alpha: float
    stolen: bool            # decided on p_value_keyed when the key was given, else p_value
    disagreements: int | None = None   # records where the suspect != the honest label (key)
    p_value_keyed: float | None = None  # conditional test: Binomial(disagreements, 1/9)
    not_selected_dropped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def decisive_p(self) -> float:
        return self.p_value if self.p_value_keyed is None else self.p_value_keyed

    def summary(self) -> str:
        verdict = ("OWNERSHIP SHOWN: the suspect reproduces the watermark far above chance"
                   if self.stolen else "no evidence of theft at this alpha")
        keyed = ("" if self.p_value_keyed is None else
                 f"; keyed test: {self.matches}/{self.disagreements} of the suspect's departures "
                 f"from the honest label hit the wrong label, p-value {self.p_value_keyed:.3g}")
        dropped = ("" if not self.not_selected_dropped else
                   f" [{self.not_selected_dropped} records dropped: not selected under this key"
                   " and rate - wrong key or rate?]")
        return (f"{self.matches}/{self.total} watermark labels reproduced "
                f"(rate {self.match_rate:.3f} vs null <= {self.p0:.4f}); "
                f"binomial p-value {self.p_value:.3g}{keyed}; alpha {self.alpha:g}: {verdict}"
                + dropped)


def dedupe(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep one record per distinct (quantised) image: repeats are not independent trials."""
    q = quantise(images)
    if len(q) == 0:
        return np.asarray(images)[:0], np.asarray(labels)[:0], 0
    rows = q.reshape(len(q), -1)
    # each row as one opaque value: np.unique then compares whole images at C speed
    _, first = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))), return_index=True)
    keep = np.sort(first.reshape(-1)).astype(np.int64)
    return np.asarray(images)[keep], np.asarray(labels)[keep], len(q) - len(keep)


def _binom_p(k: int, n: int, p0: float) -> float:
    if n == 0:
        return 1.0
    from scipy.stats import binomtest
    return float(binomtest(k, n, p0, alternative="greater").pvalue)


def verify(suspect_labels: np.ndarray | None = None, labels_sent: np.ndarray | None = None, *,
           images: np.ndarray | None = None, predict=None, alpha: float = 1e-6,
           p0: float = NULL_RATE, key: bytes | None = None,
           rate: float | None = None) -> VerifyResult:
    """Does the suspect reproduce the watermark's wrong labels above chance?

    Either pass ``suspect_labels`` (the suspect's predictions on the watermarked images), or
    ``images`` and ``predict`` (images -> labels or (N,10) probabilities); repeated images are
    then counted once.

    Null hypothesis: the suspect was not trained on our watermarked answers, so its prediction
    is independent of the secret key. The wrong label W is one of the 9 classes other than the
    honest label L, picked by the keyed hash, so such a suspect hits it with probability
    P(suspect != L) / 9 <= 1/9 per item.

    - Unconditional test (no key needed): matches ~ Binomial(total, p0 = 1/9), conservative.
    - Keyed test (``key`` and ``images`` given; sharper): the key recovers L = W - offset for
      each record; only records where the suspect departs from L can match, each with
      probability exactly 1/9 under the null, so matches ~ Binomial(disagreements, 1/9).
      With ``rate`` the key also re-checks that each record really was selected, and drops
      those that were not. The verdict then uses the keyed test.
    """
    dropped = 0
    not_selected = 0
    if suspect_labels is None:
        if images is None or predict is None:
            raise ValueError("pass suspect_labels, or images and predict")
        images, labels_sent, dropped = dedupe(images, labels_sent)
        if key is not None and rate is not None and len(images):
            sel, _ = Watermark(key, rate).select(images)
            not_selected = int((~sel).sum())
            images, labels_sent = images[sel], np.asarray(labels_sent)[sel]
        out = np.asarray(predict(images)) if len(images) else np.zeros(0, np.int64)
        suspect_labels = out.argmax(1) if out.ndim == 2 else out
    elif key is not None and images is None:
        raise ValueError("the keyed test needs the images")
    suspect_labels = np.asarray(suspect_labels, dtype=np.int64)
    labels_sent = np.asarray(labels_sent, dtype=np.int64)
    if suspect_labels.shape != labels_sent.shape:
        raise ValueError(f"{suspect_labels.shape} suspect labels vs {labels_sent.shape} records")
    n = int(len(labels_sent))
    k = int(np.sum(suspect_labels == labels_sent))
    pv = _binom_p(k, n, p0)
    disagreements = pkeyed = None
    if key is not None:
        _, off = Watermark(key).select(images) if n else (None, np.zeros(0, np.int64))
        honest = (labels_sent - off) % NUM_CLASSES
        disagreements = int(np.sum(suspect_labels != honest))
        pkeyed = _binom_p(k, disagreements, NULL_RATE)
    decisive = pv if pkeyed is None else pkeyed
    return VerifyResult(k, n, dropped, k / n if n else math.nan, p0, pv, alpha,
                        decisive < alpha, disagreements, pkeyed, not_selected)
