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
- with ``min_confidence`` only answers whose target top probability is at least that are marked
  (a flip of a confident answer is the one a copy memorises and an independent model does not
  make: measured in lab/attribution.py).

When probabilities are sent, the confidences of the honest and the wrong label are swapped, so the
vector still looks natural.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.types import Answer, NUM_CLASSES
from service.defences.base import (MARK_OFFSET_RANGE, MARK_SELECT_RANGE, WM_SELECT_RANGE,
                                   InputDigests, PolicyContext, be_words, mark_digests, quantise)

DEFAULT_RATE = 0.005


class WatermarkSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    rate: float = Field(DEFAULT_RATE, gt=0.0, le=0.5)       # after the knee (flat when knee = 0)
    knee: int = Field(0, ge=0)                               # queries marked at light_rate
    light_rate: float = Field(0.0, ge=0.0, le=0.5)
    min_confidence: float = Field(0.0, ge=0.0, lt=1.0)


class Watermark:
    def __init__(self, key: bytes, rate: float = DEFAULT_RATE, *, knee: int = 0,
                 light_rate: float = 0.0, min_confidence: float = 0.0):
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
        self.key = key
        self.rate = float(rate)
        self.knee = int(knee)
        self.light_rate = float(light_rate) if knee else 0.0
        self.min_confidence = float(min_confidence)
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
                   min_confidence=s.min_confidence)

    def spec(self) -> dict:
        return {"enabled": True, "rate": self.rate, "knee": self.knee,
                "light_rate": self.light_rate, "min_confidence": self.min_confidence}

    def __repr__(self) -> str:
        return (f"Watermark(rate={self.rate}, knee={self.knee}, light_rate={self.light_rate}, "
                f"min_confidence={self.min_confidence})")

    # -- the schedule --------------------------------------------------------------------------
    def rate_at(self, qn) -> np.ndarray:
        """The marking rate of a client's query number(s) ``qn`` (1-based)."""
        qn = np.asarray(qn, dtype=np.int64)
        if not self.knee:
            return np.full(qn.shape, self.rate)
        return np.where(qn <= self.knee, self.light_rate, self.rate)

    def expected_marks(self, queries: int, eligible: float = 1.0) -> float:
        """Expected marks among a key's first ``queries`` answers (``eligible``: the share of
        them confident enough to be marked)."""
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
        if confidence is not None and self.min_confidence > 0:
            cand &= np.asarray(confidence, np.float64).reshape(n) >= self.min_confidence
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
        target's probabilities (for ``min_confidence``; the answer's own are used when absent).
        ``qn0``: the client's query count before this request (counted here when None). With a
        context keyed like this watermark, the request's cached digests are reused."""
        digests = ctx.digests(images) if ctx is not None and ctx.key == self.key else None
        client = ctx.client_id if ctx is not None else ""
        n = len(answer.labels)
        if qn0 is None:
            qn0 = self.next_qn0(client, n) if self.knee else 0
        conf = None
        if self.min_confidence > 0:
            src = probs if probs is not None else answer.probs
            conf = None if src is None else np.asarray(src).max(1)
        sel, off = self.select(images, digests, client_id=client,
                               qn=qn0 + 1 + np.arange(n), confidence=conf)
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
    #                           other than the honest one (keyed, with probabilities)
    p_value: float            # the decisive p-value (see Attribution.test)
    testable: bool            # could reach alpha alone (its smallest possible p < alpha)
    p_departures: float | None = None   # Binomial(departures, 1/9) tail at matches
    p_second: float | None = None       # Binomial(records, 1/9) tail at second_choice
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
    test: str = "keyed"       # "keyed+second-choice" | "keyed" | "unconditional"
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
        second = self.test == "keyed+second-choice"
        head = ["rank", "test", "kind", "keys", "records",
                "matches/departures" if self.keyed else "matches",
                *(["2nd choice"] if second else []), "p", corr, "verdict"]
        rows = []
        shown = self.rows if limit is None else self.rows[:limit]
        for r in shown:
            verdict = ("OWNERSHIP (no key named)" if r.attributed and r.kind == "all" else
                       "ATTRIBUTED" if r.attributed else "not shown" if r.testable
                       else "untestable (too few records)")
            rows.append([str(r.rank) if r.testable else "-", r.name, r.kind, str(len(r.members)),
                         str(r.records), f"{r.matches}/{r.departures}" if self.keyed
                         else str(r.matches),
                         *([str(r.second_choice)] if second else []), f"{r.p_value:.3g}",
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
              include_all: bool = True) -> Attribution:
    """Test the suspect against every key's records, every linked group (``groups``: name ->
    members), every pool of keys named together (``pools``) and all records at once, and correct
    for the whole family (Holm's step-down, or Bonferroni).

    Each test unit (a key, group, pool) has one p-value. Null hypothesis: the suspect was not
    trained on these records' answers, so its output on a record is independent of the keyed
    offset that chose the record's wrong label W among the 9 classes other than the honest label
    L (recovered with the key). Two statistics, each exact under the null:

    - departures: records where the suspect's label != L hit W with probability 1/9 each, so
      matches ~ Binomial(departures, 1/9);
    - second choice (when ``predict`` returns probabilities): on *every* record, the suspect's
      most probable class other than L is W with probability 1/9, so hits ~ Binomial(records,
      1/9). A copy that learnt a wrong label but still answers L (a CNN, a fine-tuned copy)
      mostly ranks W second: this counts it.

    With both, the unit's p-value is 2 x the smaller (Bonferroni over the two statistics).
    Without the key only the unconditional test is possible: matches ~ Binomial(records, 1/9).

    Only tests that could reach ``alpha`` on their own are counted in the family: a test over n
    records has smallest possible p-value (1/9)^n (every record departs and matches), which
    depends on the records alone and not on the suspect, so leaving the tests with
    (1/9)^n >= alpha out (they can never be rejected) keeps the family-wise error rate at
    ``alpha`` (Tarone's argument). ``watermark`` (with the key): re-check every record's mark
    at its query number ``qns`` and confidence ``confidences`` and drop those that fail."""
    if correction not in ("holm", "bonferroni"):
        raise ValueError(f"correction must be 'holm' or 'bonferroni', got {correction!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    images = np.asarray(images, np.float32)
    labels_sent = np.asarray(labels_sent, np.int64)
    cids = np.asarray([str(c) for c in client_ids], dtype=object)
    if not (len(images) == len(labels_sent) == len(cids)):
        raise ValueError(f"{len(images)} images, {len(labels_sent)} labels and {len(cids)} "
                         "client ids: one of each per record")
    known = set(cids.tolist())
    pools = [list(dict.fromkeys(p)) for p in (pools or [])]
    for p in pools:
        if len(p) < 2:
            raise ValueError(f"a pool needs at least two keys, got {p}")
        missing = [k for k in p if k not in known]
        if missing:
            raise ValueError(f"pool {'+'.join(p)}: no watermark records for key(s) "
                             f"{', '.join(missing)} (known keys with records: "
                             f"{', '.join(sorted(known)[:20]) or 'none'})")
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
            probs = out.astype(np.float64)[at]
        suspect = _labels_of(out)[at]
    else:
        suspect = np.zeros(0, np.int64)
    match = suspect == labels_sent
    second = None
    if key is not None:
        off = Watermark(key).offsets(images, cids) if len(images) else np.zeros(0, np.int64)
        honest = (labels_sent - off) % NUM_CLASSES
        depart = suspect != honest
        if probs is not None:
            second = second_choice(probs, honest) == labels_sent
    else:
        depart = None
    mode = ("unconditional" if depart is None else
            "keyed" if second is None else "keyed+second-choice")

    tests: list[tuple[str, str, list[str]]] = []
    for k in sorted(set(cids.tolist())):
        tests.append((k, "key", [k]))
    for name, members in sorted((groups or {}).items()):
        tests.append((f"group {name}", "group", sorted(members)))
    for p in pools:
        tests.append(("pool " + "+".join(p), "pool", p))
    if include_all and len(set(cids.tolist())) > 1:
        tests.append(("all keys", "all", sorted(set(cids.tolist()))))
    rows = []
    for name, kind, members in tests:
        m = np.isin(cids, members)
        n, k = int(m.sum()), int(match[m].sum())
        d = sc = pd = ps = None
        if depart is None:
            p = _binom_p(k, n, NULL_RATE)
            smallest = NULL_RATE ** n
        else:
            d = int(depart[m].sum())
            p = pd = _binom_p(k, d, NULL_RATE)
            smallest = NULL_RATE ** n
            if second is not None:
                sc = int(second[m].sum())
                ps = _binom_p(sc, n, NULL_RATE)
                # two statistics of one test unit: the smaller p, Bonferroni-corrected (x2)
                p = min(1.0, 2 * min(pd, ps))
                smallest = 2 * NULL_RATE ** n
        testable = n > 0 and smallest < alpha
        rows.append(AttributionRow(name, kind, members, n, d, k, sc, p, testable, pd, ps))
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
                       not_sel, key is not None, mode, notes)


def second_choice(probs: np.ndarray, honest: np.ndarray) -> np.ndarray:
    """The suspect's most probable class other than the honest label, per record (ties: the
    lowest class index; a rule that does not look at the wrong label, so it keeps the null's 1/9
    exact)."""
    p = np.array(probs, dtype=np.float64, copy=True)
    p[np.arange(len(p)), np.asarray(honest, np.int64)] = -np.inf
    return p.argmax(1)
