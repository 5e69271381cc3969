"""DAWN-style watermarking (Szyller et al.), keyed to the client, and its verifier/attributor.

Marks (scheme wm3, service/defences/base.py; issue #12):

- *candidates* depend on the image only: the 16-bit word at WM_SELECT_RANGE of the image's keyed
  digest is < 2^16 * max rate (a cheap prefilter: only candidates are hashed again);
- whether a candidate is *marked* for this client, and with which wrong label, comes from a second
  keyed hash of (client id, image) (``mark_digests``): marked when its uint32 is
  < 2^32 * rate(qn) / max rate, wrong label = (label + 1 + (uint64 mod 9)) mod 10. The same key
  asking the same image again gets the same answer (at a rate that only grows with its query
  number), but another key holds other marks and other wrong labels, so an honest key that asked
  the thief's images is not accused of the thief's copy;
- the rate depends on the client's query number qn (``knee``, ``light_rate``, ``rate``): keys that
  sent at most ``knee`` queries are marked at ``light_rate`` (0 by default), later queries at
  ``rate``; with ``knee = 0`` the rate is flat (the pre-#12 behaviour);
- only answers whose target top probability lies in the band [``min_confidence``,
  ``max_confidence``) are marked (``max_confidence = 1``: no upper bound, every answer at least
  ``min_confidence``). Which band is cheapest for honest users per record a copy learns was
  measured in lab/attribution.py (docs/defences.md). The band only decides *which* answers are
  marked; the wrong label is still the keyed offset, so the verifier's null stays exact.

When probabilities are sent, the confidences of the honest and the wrong label are swapped, so the
vector still looks natural.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.types import Answer, NUM_CLASSES
from service.defences.base import (MARK_OFFSET_RANGE, MARK_SELECT_RANGE, WM_SELECT_RANGE,
                                   InputDigests, PolicyContext, be_words, mark_digests, quantise)
from service.defences.signature import Signature

DEFAULT_RATE = 0.005
DEFAULT_TTA = "none"      # verification's test-time augmentation (TTA_SETS); measured below


class WatermarkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    rate: float = Field(DEFAULT_RATE, gt=0.0, le=0.5)       # after the knee (flat when knee = 0)
    knee: int = Field(0, ge=0)                               # queries marked at light_rate
    light_rate: float = Field(0.0, ge=0.0, le=0.5)
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0)
    max_confidence: float = Field(1.0, gt=0.0, le=1.0)   # 1.0: no upper bound
    signature: float = Field(0.0, ge=0.0, le=0.3)          # soft-label signature strength; 0: off
    signature_knee: int | None = Field(None, ge=0)         # None: the marks' knee

    @model_validator(mode="after")
    def _band(self):
        if not self.min_confidence < self.max_confidence:
            raise ValueError(f"min_confidence ({self.min_confidence}) must be below "
                             f"max_confidence ({self.max_confidence})")
        return self


class Watermark:
    def __init__(self, key: bytes, rate: float = DEFAULT_RATE, *, knee: int = 0,
                 light_rate: float = 0.0, min_confidence: float = 0.0,
                 max_confidence: float = 1.0, signature: float = 0.0,
                 signature_knee: int | None = None):
        if not key:
            raise ValueError("the watermark needs a non-empty key")
        if not 0.0 < rate <= 0.5:
            raise ValueError(f"watermark rate must be in (0, 0.5], got {rate}")
        if not 0.0 <= light_rate <= 0.5:
            raise ValueError(f"watermark light_rate must be in [0, 0.5], got {light_rate}")
        if knee < 0:
            raise ValueError(f"watermark knee must be >= 0, got {knee}")
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"watermark min_confidence must be in [0, 1), got {min_confidence}")
        if not 0.0 < max_confidence <= 1.0:
            raise ValueError(f"watermark max_confidence must be in (0, 1], got {max_confidence}")
        if not min_confidence < max_confidence:
            raise ValueError(f"watermark min_confidence ({min_confidence}) must be below "
                             f"max_confidence ({max_confidence}): the band [min, max) of top "
                             "probabilities that can be marked would be empty")
        self.key = key
        self.rate = float(rate)
        self.knee = int(knee)
        self.light_rate = float(light_rate) if knee else 0.0
        self.min_confidence = float(min_confidence)
        self.max_confidence = float(max_confidence)
        if not 0.0 <= signature <= 0.3:
            raise ValueError(f"watermark signature must be in [0, 0.3] (0: off), got {signature}")
        # the soft-label signature (signature.py), after its own knee (default: the marks')
        self.signature = (Signature(key, signature, knee=self.knee if signature_knee is None
                                    else int(signature_knee)) if signature else None)
        self.max_rate = max(self.rate, self.light_rate)
        self.threshold = int(round(2 ** 16 * self.max_rate))
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: dict | None, key: bytes) -> "Watermark | None":
        try:
            s = WatermarkSpec.model_validate(spec or {})
        except ValidationError as exc:
            raise ValueError(f"bad watermark spec {spec!r}: {exc}") from None
        if not s.enabled:
            return None
        return cls(key, s.rate, knee=s.knee, light_rate=s.light_rate,
                   min_confidence=s.min_confidence, max_confidence=s.max_confidence,
                   signature=s.signature, signature_knee=s.signature_knee)

    @property
    def signature_strength(self) -> float:
        return 0.0 if self.signature is None else self.signature.strength

    def spec(self) -> dict:
        return {"enabled": True, "rate": self.rate, "knee": self.knee,
                "light_rate": self.light_rate, "min_confidence": self.min_confidence,
                "max_confidence": self.max_confidence, "signature": self.signature_strength,
                "signature_knee": None if self.signature is None else self.signature.knee}

    def __repr__(self) -> str:
        return (f"Watermark(rate={self.rate}, knee={self.knee}, light_rate={self.light_rate}, "
                f"min_confidence={self.min_confidence}, max_confidence={self.max_confidence}, "
                f"signature={self.signature_strength}"
                + ("" if self.signature is None else f", signature_knee={self.signature.knee}")
                + ")")

    @property
    def banded(self) -> bool:
        """Does the schedule look at the target's confidence at all?"""
        return self.min_confidence > 0.0 or self.max_confidence < 1.0

    def in_band(self, confidence) -> np.ndarray:
        """bool: is each top probability in [min_confidence, max_confidence) (no upper bound
        when max_confidence = 1)?"""
        c = np.asarray(confidence, np.float64)
        ok = c >= self.min_confidence
        if self.max_confidence < 1.0:
            ok &= c < self.max_confidence
        return ok

    # -- the schedule --------------------------------------------------------------------------
    def rate_at(self, qn) -> np.ndarray:
        """The marking rate of a client's query number(s) ``qn`` (1-based)."""
        qn = np.asarray(qn, dtype=np.int64)
        if not self.knee:
            return np.full(qn.shape, self.rate)
        return np.where(qn <= self.knee, self.light_rate, self.rate)

    def expected_marks(self, queries: int, eligible: float = 1.0) -> float:
        """Expected marks among a key's first ``queries`` answers (``eligible``: the share of
        them whose target confidence lies in the band)."""
        light = min(queries, self.knee)
        return eligible * (light * self.light_rate + (queries - light) * self.rate)

    def next_qn0(self, client_id: str, n: int) -> int:
        """The client's query count before a request of ``n`` items, counted by this watermark
        (in memory; the monitor logs its own count, which is never lower, so the verifier's
        re-check of a record from its logged query number holds)."""
        with self._lock:
            q = self._counts.get(client_id, 0)
            self._counts[client_id] = q + n
        return q

    # -- marks ---------------------------------------------------------------------------------
    def candidates(self, images: np.ndarray, digests: InputDigests | None = None) -> np.ndarray:
        if digests is None:
            digests = InputDigests.compute(self.key, images)
        return digests.words(WM_SELECT_RANGE, 2)[:, 0] < self.threshold

    def select(self, images: np.ndarray, digests: InputDigests | None = None, *,
               client_id: str = "", qn=None, confidence=None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(marked bool (N,), offset int64 (N,): 1..9 where marked, 0 elsewhere) for ``images``
        answered to ``client_id`` as its query numbers ``qn`` (None: at the highest rate, i.e. a
        necessary condition only) with the target's top probability ``confidence`` (None: not
        checked). ``digests`` must be the images' digests under this watermark's key."""
        images = np.asarray(images)
        n = len(images)
        cand = self.candidates(images, digests)
        if confidence is not None and self.banded:
            cand &= self.in_band(np.asarray(confidence, np.float64).reshape(n))
        off = np.zeros(n, np.int64)
        rows = np.flatnonzero(cand)
        if not len(rows):
            return cand, off
        raw = mark_digests(self.key, client_id, images[rows])
        u = be_words(raw, MARK_SELECT_RANGE, 4)[:, 0].astype(np.float64)
        if qn is None:
            frac = np.ones(len(rows))
        else:
            frac = self.rate_at(np.broadcast_to(np.asarray(qn), (n,))[rows]) / self.max_rate
        keep = u < frac * 2.0 ** 32
        sel = np.zeros(n, bool)
        sel[rows[keep]] = True
        o = 1 + (be_words(raw, MARK_OFFSET_RANGE, 8)[:, 0] % np.uint64(NUM_CLASSES - 1))
        off[rows[keep]] = o[keep].astype(np.int64)
        return sel, off

    def offsets(self, images: np.ndarray, client_ids) -> np.ndarray:
        """The wrong-label offset (1..9) each (client, image) record would be marked with."""
        images = np.asarray(images)
        cids = np.asarray(list(client_ids) if not isinstance(client_ids, np.ndarray)
                          else client_ids, dtype=object).reshape(len(images))
        off = np.zeros(len(images), np.int64)
        for c in dict.fromkeys(cids.tolist()):
            rows = np.flatnonzero(cids == c)
            raw = mark_digests(self.key, c, images[rows])
            off[rows] = 1 + (be_words(raw, MARK_OFFSET_RANGE, 8)[:, 0]
                             % np.uint64(NUM_CLASSES - 1)).astype(np.int64)
        return off

    def apply(self, images: np.ndarray, answer: Answer, ctx: PolicyContext | None = None,
              probs: np.ndarray | None = None, *, qn0: int | None = None) -> Answer:
        """Watermark ``answer`` (to ``ctx.client_id``; "" without a context). ``probs``: the
        target's probabilities (for the confidence band; the answer's own are used when absent).
        ``qn0``: the client's query count before this request (counted here when None). With a
        context keyed like this watermark, the request's cached digests are reused."""
        digests = ctx.digests(images) if ctx is not None and ctx.key == self.key else None
        client = ctx.client_id if ctx is not None else ""
        n = len(answer.labels)
        if qn0 is None:
            counted = self.knee or (self.signature is not None and self.signature.knee)
            qn0 = self.next_qn0(client, n) if counted else 0
        qn = qn0 + 1 + np.arange(n)
        conf = None
        if self.banded:
            src = probs if probs is not None else answer.probs
            conf = None if src is None else np.asarray(src).max(1)
        if self.signature is not None and answer.probs is not None:
            # before the marks: a marked row's honest and wrong label then swap signed values
            signed, _ = self.signature.sign(answer.probs, images, client, qn)
            answer = Answer(answer.labels, signed, answer.kind, list(answer.model),
                            answer.watermarked)
        sel, off = self.select(images, digests, client_id=client, qn=qn, confidence=conf)
        prev = answer.watermarked if answer.watermarked is not None else np.zeros(len(sel), bool)
        if not sel.any():
            return Answer(answer.labels, answer.probs, answer.kind, list(answer.model), prev | sel)
        labels = answer.labels.copy()
        wrong = (labels + off) % NUM_CLASSES
        out_probs = None if answer.probs is None else answer.probs.copy()
        rows = np.flatnonzero(sel)
        labels[rows] = wrong[rows]
        if out_probs is not None:
            orig = answer.labels[rows]
            a, b = out_probs[rows, orig].copy(), out_probs[rows, wrong[rows]].copy()
            out_probs[rows, orig], out_probs[rows, wrong[rows]] = b, a
        return Answer(labels, out_probs, answer.kind, list(answer.model), prev | sel)


# --------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------

NULL_RATE = 1.0 / (NUM_CLASSES - 1)


@dataclass
class VerifyResult:
    matches: int            # records where the suspect outputs the watermark's wrong label
    total: int              # distinct watermarked (client, image) records checked
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


def _dedupe_index(images: np.ndarray, groups=None) -> np.ndarray:
    """Indices of the first record of each distinct (group, quantised image), in order."""
    q = quantise(images)
    if len(q) == 0:
        return np.zeros(0, np.int64)
    rows = q.reshape(len(q), -1)
    if groups is not None:
        _, gid = np.unique(np.asarray(list(groups), dtype=object).astype(str), return_inverse=True)
        rows = np.concatenate([gid.astype(">u4").view(np.uint8).reshape(len(q), 4), rows], 1)
    rows = np.ascontiguousarray(rows)
    # each row as one opaque value: np.unique then compares whole images at C speed
    _, first = np.unique(rows.view(np.dtype((np.void, rows.shape[1]))), return_index=True)
    return np.sort(first.reshape(-1)).astype(np.int64)


def dedupe(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Keep one record per distinct (quantised) image: repeats are not independent trials."""
    keep = _dedupe_index(images)
    if len(keep) == 0:
        return np.asarray(images)[:0], np.asarray(labels)[:0], 0
    return np.asarray(images)[keep], np.asarray(labels)[keep], len(images) - len(keep)


def _binom_p(k: int, n: int, p0: float) -> float:
    if n == 0:
        return 1.0
    from scipy.stats import binomtest
    return float(binomtest(k, n, p0, alternative="greater").pvalue)


def _labels_of(out) -> np.ndarray:
    out = np.asarray(out)
    return (out.argmax(1) if out.ndim == 2 else out).astype(np.int64)


def verify(suspect_labels: np.ndarray | None = None, labels_sent: np.ndarray | None = None, *,
           images: np.ndarray | None = None, predict=None, alpha: float = 1e-6,
           p0: float = NULL_RATE, key: bytes | None = None,
           rate: float | None = None, client_ids=None, qns=None, confidences=None,
           watermark: "Watermark | None" = None) -> VerifyResult:
    """Does the suspect reproduce the watermark's wrong labels above chance?

    Either pass ``suspect_labels`` (the suspect's predictions on the watermarked images), or
    ``images`` and ``predict`` (images -> labels or (N,10) probabilities); repeated records (the
    same client and image) are then counted once. ``client_ids``: the key each record was sent
    to (wm3 marks depend on it; "" when not given).

    Null hypothesis: the suspect was not trained on these records' watermarked answers, so its
    prediction is independent of the keyed hash that chose their wrong labels. The wrong label W
    is one of the 9 classes other than the honest label L, picked by the keyed hash of (client,
    image), so such a suspect hits it with probability P(suspect != L) / 9 <= 1/9 per record.

    - Unconditional test (no key needed): matches ~ Binomial(total, p0 = 1/9), conservative.
    - Keyed test (``key`` and ``images`` given; sharper): the key recovers L = W - offset for
      each record; only records where the suspect departs from L can match, each with
      probability exactly 1/9 under the null, so matches ~ Binomial(disagreements, 1/9).
      With ``rate`` (a flat watermark) or ``watermark`` (its schedule; ``qns`` the records'
      query numbers and ``confidences`` the target's top probabilities, when known) the key
      also re-checks that each record really was marked, and drops those that were not.
      The verdict then uses the keyed test.
    """
    dropped = 0
    not_selected = 0
    n_in = None if labels_sent is None else len(labels_sent)
    cids = (np.array([""] * (n_in or 0), dtype=object) if client_ids is None
            else np.asarray(list(client_ids), dtype=object))
    if key is not None and watermark is None and rate is not None:
        watermark = Watermark(key, rate)
    if suspect_labels is None:
        if images is None or predict is None:
            raise ValueError("pass suspect_labels, or images and predict")
        images = np.asarray(images)
        keep = _dedupe_index(images, cids if client_ids is not None else None)
        dropped = len(images) - len(keep)
        images, labels_sent, cids = images[keep], np.asarray(labels_sent)[keep], cids[keep]
        qns = None if qns is None else np.asarray(qns)[keep]
        confidences = None if confidences is None else np.asarray(confidences)[keep]
        if key is not None and watermark is not None and len(images):
            sel = recheck(watermark, images, cids, qns, confidences)
            not_selected = int((~sel).sum())
            images, labels_sent, cids = images[sel], np.asarray(labels_sent)[sel], cids[sel]
        suspect_labels = (_labels_of(predict(images)) if len(images)
                          else np.zeros(0, np.int64))
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
        off = Watermark(key).offsets(images, cids) if n else np.zeros(0, np.int64)
        honest = (labels_sent - off) % NUM_CLASSES
        disagreements = int(np.sum(suspect_labels != honest))
        pkeyed = _binom_p(k, disagreements, NULL_RATE)
    decisive = pv if pkeyed is None else pkeyed
    return VerifyResult(k, n, dropped, k / n if n else math.nan, p0, pv, alpha,
                        decisive < alpha, disagreements, pkeyed, not_selected)


def recheck(watermark: Watermark, images: np.ndarray, client_ids, qns=None,
            confidences=None) -> np.ndarray:
    """bool (N,): would each (client, image) record have been marked under ``watermark`` at its
    query number (``qns``; None: at the highest rate) and target confidence (``confidences``;
    None: not checked)? A record that fails was not produced by this key and schedule."""
    cids = np.asarray(list(client_ids), dtype=object)
    sel = np.zeros(len(images), bool)
    for c in dict.fromkeys(cids.tolist()):
        rows = np.flatnonzero(cids == c)
        s, _ = watermark.select(images[rows], client_id=c,
                                qn=None if qns is None else np.asarray(qns)[rows],
                                confidence=None if confidences is None
                                else np.asarray(confidences)[rows])
        sel[rows] = s
    return sel


# --------------------------------------------------------------------------------------------
# Attribution: which key(s) fed the suspect? One family of tests, corrected together.
# --------------------------------------------------------------------------------------------

@dataclass
class AttributionRow:
    name: str                 # the key, "group G1", "pool a+b", or "all keys"
    kind: str                 # key | group | pool | all
    members: list[str]
    records: int
    departures: int | None    # keyed test: records where the suspect != the honest label
    matches: int              # records where the suspect's label is the wrong label sent
    second_choice: int | None  # records where the wrong label is the suspect's top class
    #                           other than the honest one (rank 1; keyed, with probabilities)
    p_value: float            # the decisive p-value (see Attribution.test)
    testable: bool            # could reach alpha alone (its smallest possible p < alpha)
    p_departures: float | None = None   # Binomial(departures, 1/9) tail at matches
    mean_rank: float | None = None      # mean rank (1..9) of the wrong label among the 9
    #                                     classes other than the honest one (null: 5)
    p_rank: float | None = None         # exact tail of the rank sum (wrong_label_rank)
    sig_cells: int | None = None        # soft-label signature: the unit's testable cells
    sig_mean_rank: float | None = None  # mean rank (1..9) of the keyed class W (null: 5)
    p_signature: float | None = None    # exact tail of the signature's rank sum
    p_adjusted: float = 1.0   # Holm (or Bonferroni) over the testable tests
    attributed: bool = False
    rank: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Attribution:
    rows: list[AttributionRow]
    alpha: float
    correction: str
    tests: int                # testable tests: the family the correction covers
    untestable: int
    records: int
    duplicates_dropped: int
    not_selected_dropped: int
    keyed: bool
    test: str = "keyed"       # "keyed+rank" | "keyed" | "unconditional" (+ "+signature")
    tta: str = "none"         # the test-time augmentation the suspect was queried with
    notes: list[str] = field(default_factory=list)

    def attributed(self, kind: str | None = None) -> list[AttributionRow]:
        return [r for r in self.rows if r.attributed and (kind is None or r.kind == kind)]

    def row(self, name: str) -> AttributionRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["attributed_keys"] = [r.name for r in self.attributed("key")]
        return d

    def table(self, limit: int | None = None) -> str:
        corr = "Holm p" if self.correction == "holm" else "Bonferroni p"
        second = self.test.startswith("keyed+rank")
        sig = self.test.endswith("+signature")
        head = ["rank", "test", "kind", "keys", "records",
                "matches/departures" if self.keyed else "matches",
                *(["W 1st", "mean rank W"] if second else []),
                *(["sig cells", "sig rank"] if sig else []), "p", corr, "verdict"]
        rows = []
        shown = self.rows if limit is None else self.rows[:limit]
        for r in shown:
            verdict = ("OWNERSHIP (no key named)" if r.attributed and r.kind == "all" else
                       "ATTRIBUTED" if r.attributed else "not shown" if r.testable
                       else "untestable (too few records)")
            rows.append([str(r.rank) if r.testable else "-", r.name, r.kind, str(len(r.members)),
                         str(r.records), f"{r.matches}/{r.departures}" if self.keyed
                         else str(r.matches),
                         *([str(r.second_choice), f"{r.mean_rank:.2f}"] if second else []),
                         *([str(r.sig_cells), "-" if not r.sig_cells else
                            f"{r.sig_mean_rank:.2f}"] if sig else []),
                         f"{r.p_value:.3g}",
                         f"{r.p_adjusted:.3g}" if r.testable else "-", verdict])
        w = [max(len(h), *(len(x[i]) for x in rows)) if rows else len(h)
             for i, h in enumerate(head)]
        fmt = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa
        out = [fmt(head), fmt(["-" * x for x in w])] + [fmt(x) for x in rows]
        if limit is not None and len(self.rows) > limit:
            out.append(f"... {len(self.rows) - limit} more (all untestable or not shown)")
        return "\n".join(out)


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order."""
    p = np.asarray(pvalues, np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="stable")
    adj = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.maximum.accumulate(adj)
    out = np.empty(m)
    out[order] = adj
    return out


def bonferroni(pvalues) -> np.ndarray:
    p = np.asarray(pvalues, np.float64)
    return np.minimum(1.0, len(p) * p)


def attribute(images: np.ndarray, labels_sent: np.ndarray, client_ids, *, predict,
              key: bytes | None, alpha: float = 1e-6, pools: list[list[str]] | None = None,
              groups: dict[str, list[str]] | None = None, correction: str = "holm",
              watermark: Watermark | None = None, qns=None, confidences=None,
              include_all: bool = True, tta: str = DEFAULT_TTA,
              signature: Signature | None = None, signature_records=None) -> Attribution:
    """Test the suspect against every key's records, every linked group (``groups``: name ->
    members), every pool of keys named together (``pools``) and all records at once, and correct
    for the whole family (Holm's step-down, or Bonferroni).

    Each test unit (a key, group, pool) has one p-value. Null hypothesis: the suspect was not
    trained on these records' answers, so its output on a record is independent of the keyed
    offset that chose the record's wrong label W among the 9 classes other than the honest label
    L (recovered with the key); the offsets of distinct (key, image) records are independent.
    Two statistics, each exact under the null:

    - departures: records where the suspect's label != L hit W with probability 1/9 each, so
      matches ~ Binomial(departures, 1/9);
    - rank sum (when ``predict`` returns probabilities): on *every* record, the rank of W among
      the 9 classes other than L in the suspect's probabilities (``wrong_label_rank``: ties by
      class index, a rule that does not look at W) is uniform on 1..9, independently across
      records, so the sum of (9 - rank) has the exact law of a sum of uniforms on 0..8
      (``score_tail``, by convolution). It counts a copy that ranks W first (a CNN, a fine-tuned
      copy that still answers L: the former second-choice test, rank 1 only) and also one that
      puts W 2nd or 3rd (a copy trained with small shifts: measured in lab/attribution.py).

    With both, the unit's p-value is 2 x the smaller (Bonferroni over the two statistics).

    ``signature`` and ``signature_records`` (``(images, target probabilities, client ids)``:
    the keys' logged items after the knee): a third statistic, the soft-label signature's rank
    sum over the unit's keys' cells (``signature.Signature.cell_scores``, exact under the null
    that the suspect never learnt from this key's signed answers); the unit's p-value is then
    3 x the smallest of the three (2 x the smaller without probabilities).
    Without the key only the unconditional test is possible: matches ~ Binomial(records, 1/9).

    ``tta``: query the suspect on a fixed set of transforms of each record image
    (``TTA_SETS``: shifts, flips) and average its probabilities before taking its label and the
    rank. The set is a property of the verification, chosen before seeing the suspect: under the
    null the average is still independent of the offsets, so both statistics stay exact. (Trying
    several sets on one suspect and keeping the best would have to be paid for in the
    correction.)

    Only tests that could reach ``alpha`` on their own are counted in the family: a test over n
    records has smallest possible p-value 2 x (1/9)^n (every record departs and matches, or
    every W ranks first), which depends on the records alone and not on the suspect, so leaving
    the tests with 2 x (1/9)^n >= alpha out (they can never be rejected) keeps the family-wise
    error rate at ``alpha`` (Tarone's argument). ``watermark`` (with the key): re-check every
    record's mark at its query number ``qns`` and confidence ``confidences`` and drop those that
    fail."""
    if correction not in ("holm", "bonferroni"):
        raise ValueError(f"correction must be 'holm' or 'bonferroni', got {correction!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if tta not in TTA_SETS:
        raise ValueError(f"tta must be one of {', '.join(TTA_SETS)}, got {tta!r}")
    images = np.asarray(images, np.float32)
    labels_sent = np.asarray(labels_sent, np.int64)
    cids = np.asarray([str(c) for c in client_ids], dtype=object)
    if not (len(images) == len(labels_sent) == len(cids)):
        raise ValueError(f"{len(images)} images, {len(labels_sent)} labels and {len(cids)} "
                         "client ids: one of each per record")
    sig_keys: list[str] = []
    if signature_records is not None:
        if key is None or signature is None:
            raise ValueError("the signature test needs the key and the Signature")
        s_images, s_target, s_cids = signature_records
        s_images = np.asarray(s_images, np.float32)
        s_cids = [str(c) for c in s_cids]
        sig_keys = list(dict.fromkeys(s_cids))
    known = set(cids.tolist()) | set(sig_keys)
    pools = [list(dict.fromkeys(p)) for p in (pools or [])]
    for p in pools:
        if len(p) < 2:
            raise ValueError(f"a pool needs at least two keys, got {p}")
        missing = [k for k in p if k not in known]
        if missing:
            raise ValueError(f"pool {'+'.join(p)}: no watermark records for key(s) "
                             f"{', '.join(missing)} (known keys with records: "
                             f"{', '.join(sorted(known)[:20]) or 'none'})")
    sig_ranks: dict[str, np.ndarray] = {}
    if sig_keys:
        s_probs = np.concatenate([np.asarray(predict(s_images[i:i + 4096]), np.float64)
                                  for i in range(0, len(s_images), 4096)])
        if s_probs.ndim != 2:
            raise ValueError("the signature test needs a suspect that returns probabilities")
        sig_ranks = signature.cell_scores(s_probs, s_target, s_images, s_cids)
    keep = _dedupe_index(images, cids)
    dup = len(images) - len(keep)
    images, labels_sent, cids = images[keep], labels_sent[keep], cids[keep]
    qns = None if qns is None else np.asarray(qns)[keep]
    confidences = None if confidences is None else np.asarray(confidences)[keep]
    not_sel = 0
    if key is not None and watermark is not None and len(images):
        sel = recheck(watermark, images, cids, qns, confidences)
        not_sel = int((~sel).sum())
        images, labels_sent, cids = images[sel], labels_sent[sel], cids[sel]
    # the suspect once per distinct image (several keys may hold the same image)
    probs = None
    if len(images):
        uniq = _dedupe_index(images)
        q = quantise(images).reshape(len(images), -1)
        lookup = {q[i].tobytes(): j for j, i in enumerate(uniq)}
        at = np.array([lookup[q[i].tobytes()] for i in range(len(images))], np.int64)
        out = np.asarray(predict(images[uniq]))
        if out.ndim == 2:
            if tta != "none":
                out = tta_probs(predict, images[uniq], tta)
            probs = out.astype(np.float64)[at]
        elif tta != "none":
            raise ValueError("test-time augmentation needs a suspect that returns probabilities")
        suspect = _labels_of(out)[at]
    else:
        suspect = np.zeros(0, np.int64)
    match = suspect == labels_sent
    ranks = None
    if key is not None:
        off = Watermark(key).offsets(images, cids) if len(images) else np.zeros(0, np.int64)
        honest = (labels_sent - off) % NUM_CLASSES
        depart = suspect != honest
        if probs is not None:
            ranks = wrong_label_rank(probs, honest, labels_sent)
    else:
        depart = None
    mode = ("unconditional" if depart is None else
            "keyed" if ranks is None else "keyed+rank") + ("+signature" if sig_keys else "")

    tests: list[tuple[str, str, list[str]]] = []
    for k in sorted(set(cids.tolist()) | set(sig_keys)):
        tests.append((k, "key", [k]))
    for name, members in sorted((groups or {}).items()):
        tests.append((f"group {name}", "group", sorted(members)))
    for p in pools:
        tests.append(("pool " + "+".join(p), "pool", p))
    if include_all and len(known) > 1:
        tests.append(("all keys", "all", sorted(known)))
    rows = []
    score = np.asarray(RANK_SCORE, np.int64)
    for name, kind, members in tests:
        m = np.isin(cids, members)
        n, k = int(m.sum()), int(match[m].sum())
        d = sc = pd = pr = mr = None
        pvals, floors = [], []    # the unit's statistics and the smallest p each can give
        if depart is None:
            pvals.append(_binom_p(k, n, NULL_RATE))
            floors.append(NULL_RATE ** n)
        else:
            d = int(depart[m].sum())
            pd = _binom_p(k, d, NULL_RATE)
            pvals.append(pd)
            floors.append(NULL_RATE ** n)
            if ranks is not None:
                r = ranks[m]
                sc = int(np.sum(r == 1))
                mr = float(r.mean()) if n else math.nan
                pr = score_tail(score, int(score[r - 1].sum()), n)
                pvals.append(pr)
                floors.append(score_smallest_p(score, n))
        nc = smr = ps = None
        if sig_keys:
            # the signature's rank sum over the members' cells
            rr = np.concatenate([sig_ranks.get(x, np.zeros(0, np.int64)) for x in members])
            nc = len(rr)
            smr = float(rr.mean()) if nc else None
            ps = score_tail(score, int(score[rr - 1].sum()), nc)
            pvals.append(ps)
            floors.append(score_smallest_p(score, nc))
        # several statistics of one test unit: the smallest p, Bonferroni-corrected
        p = min(1.0, len(pvals) * min(pvals))
        smallest = len(pvals) * min(floors)
        testable = (n > 0 or bool(nc)) and smallest < alpha
        rows.append(AttributionRow(name, kind, members, n, d, k, sc, p, testable, pd, mr, pr,
                                   nc, smr, ps))
    fam = [r for r in rows if r.testable]
    adj = (holm if correction == "holm" else bonferroni)([r.p_value for r in fam])
    for r, a in zip(fam, adj):
        r.p_adjusted = float(a)
        r.attributed = bool(a < alpha)
    rows.sort(key=lambda r: (not r.testable, r.p_adjusted if r.testable else 1.0, r.p_value,
                             r.name))
    for i, r in enumerate(rows):
        r.rank = i + 1
    notes = []
    if not_sel:
        notes.append(f"{not_sel} records dropped: not marked under this key and schedule "
                     "(wrong key or schedule?)")
    return Attribution(rows, alpha, correction, len(fam), len(rows) - len(fam), len(images), dup,
                       not_sel, key is not None, mode, tta, notes)


def second_choice(probs: np.ndarray, honest: np.ndarray) -> np.ndarray:
    """The suspect's most probable class other than the honest label, per record (ties: the
    lowest class index; a rule that does not look at the wrong label, so it keeps the null's 1/9
    exact)."""
    p = np.array(probs, dtype=np.float64, copy=True)
    p[np.arange(len(p)), np.asarray(honest, np.int64)] = -np.inf
    return p.argmax(1)


# --------------------------------------------------------------------------------------------
# The rank statistic and test-time augmentation (issue #12: copies trained with augmentation)
# --------------------------------------------------------------------------------------------

NUM_WRONG = NUM_CLASSES - 1


def wrong_label_rank(probs: np.ndarray, honest: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """The rank (1..9) of the wrong label W among the 9 classes other than the honest label L in
    the suspect's probabilities, per record: 1 + the number of classes c != L, W that come
    before W in the order "higher probability first, then lower class index". That order is
    built without looking at W, so when W is uniform over the 9 classes other than L and
    independent of the suspect (the null: the keyed offset), the rank is uniform on 1..9."""
    p = np.asarray(probs, np.float64)
    n = len(p)
    honest = np.asarray(honest, np.int64).reshape(n)
    wrong = np.asarray(wrong, np.int64).reshape(n)
    if np.any(honest == wrong):
        raise ValueError("a record's wrong label equals its honest label")
    rows = np.arange(n)
    pw = p[rows, wrong][:, None]
    cls = np.arange(NUM_CLASSES)[None, :]
    before = (p > pw) | ((p == pw) & (cls < wrong[:, None]))
    before[rows, honest] = False
    return 1 + before.sum(1)


# The score of a record whose wrong label has rank 1..9 (rank 1 first); a test's statistic is
# the sum over its records, i.e. the rank sum reversed. Chosen from measurements (lab.attribution,
# docs/defences.md): against rank 1 only (the former second-choice count), top-2/top-3 counts and
# log(9 / rank) scores, the plain rank sum gave the smallest p-values on the 1 px augmentation,
# distilled, fine-tuned and 2k copies and the same on the others.
RANK_SCORE: tuple[int, ...] = (8, 7, 6, 5, 4, 3, 2, 1, 0)


def score_tail(scores, total: int, n: int) -> float:
    """P(S >= total) for S the sum of ``n`` independent draws, each uniform over the 9 integer
    ``scores`` (>= 0): exact, by convolution (renormalised at each step, so tails down to about
    1e-300 keep their precision; smaller ones are reported as 1e-300)."""
    s = np.asarray(scores, np.int64)
    if s.shape != (NUM_WRONG,) or s.min() < 0:
        raise ValueError(f"scores: 9 integers >= 0, got {scores}")
    if n == 0 or total <= n * int(s.min()):
        return 1.0
    if total > n * int(s.max()):
        return 0.0
    kernel = np.bincount(s, minlength=int(s.max()) + 1).astype(np.float64) / NUM_WRONG
    pmf = np.ones(1)
    log_scale = 0.0
    for _ in range(n):
        pmf = np.convolve(pmf, kernel)
        m = pmf.max()
        pmf /= m
        log_scale += math.log(m)
    tail = float(pmf[total:].sum())
    if tail <= 0.0:
        return 1e-300
    return float(min(1.0, max(1e-300, math.exp(math.log(tail) + log_scale))))


def score_smallest_p(scores, n: int) -> float:
    """The smallest p-value ``score_tail`` can give over ``n`` records: every record at the
    highest score (a property of the records' number alone, for Tarone's rule)."""
    s = np.asarray(scores, np.int64)
    top = int(np.sum(s == s.max()))
    return (top / NUM_WRONG) ** n if n else 1.0


# test-time augmentation: (dx, dy, flip) transforms of each record image; the suspect's
# probabilities are averaged over them before ranking. A fixed, pre-declared set: under the null
# the average is still a function of the suspect and the image alone, so the rank of W stays
# uniform; a copy trained with shifts or flips learnt W over the image's augmentation orbit.
def _grid(r: int, flips: bool) -> tuple[tuple[int, int, bool], ...]:
    base = [(dx, dy, False) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return tuple(base + ([(dx, dy, True) for dx, dy, _ in base] if flips else []))


TTA_SETS: dict[str, tuple[tuple[int, int, bool], ...]] = {
    "none": ((0, 0, False),),
    "shift1": _grid(1, False),
    "shift1-flip": _grid(1, True),
    "shift2": _grid(2, False),
    "shift2-flip": _grid(2, True),
}


def shift_images(images: np.ndarray, dx: int, dy: int, flip: bool = False) -> np.ndarray:
    """Images (N, 28, 28) shifted right by ``dx`` and down by ``dy`` pixels (zero fill), after a
    left-right flip when ``flip``."""
    x = np.asarray(images)
    x = x.reshape(len(x), 28, 28)
    if flip:
        x = x[:, :, ::-1]
    out = np.zeros_like(x)
    h, w = x.shape[1:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[:, yd, xd] = x[:, ys, xs]
    return out


def tta_probs(predict, images: np.ndarray, tta: str = "none") -> np.ndarray:
    """The suspect's probabilities averaged over the transforms of ``TTA_SETS[tta]``."""
    if tta not in TTA_SETS:
        raise ValueError(f"tta must be one of {', '.join(TTA_SETS)}, got {tta!r}")
    acc = None
    for dx, dy, flip in TTA_SETS[tta]:
        x = images if (dx, dy, flip) == (0, 0, False) else shift_images(images, dx, dy, flip)
        out = np.asarray(predict(np.ascontiguousarray(x, dtype=np.float32)))
        if out.ndim != 2:
            raise ValueError("test-time augmentation needs the suspect's probabilities")
        acc = out.astype(np.float64) if acc is None else acc + out
    return acc / len(TTA_SETS[tta])
