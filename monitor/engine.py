"""One client's detectors plus the escalation ladder: the deterministic core shared by the live
monitor, restart recovery and offline replay.

Decisions depend only on (item as stored, target probabilities, order, logged timestamp), so the
same stream under the same config gives the same transitions live and in replay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.types import Level
from monitor.config import DETECTOR_NAMES, MonitorConfig
from monitor.detectors import Items, build_detectors

DET_INDEX = {n: i for i, n in enumerate(DETECTOR_NAMES)}
# requests up to this many items take the per-item Python ladder (ClientEngine._observe_small;
# 0: never)
SMALL_REQUEST = 16


@dataclass
class Transition:
    client: str
    t: float
    qn: int                 # the client's query count when it happened (1-based item number)
    from_level: Level
    to_level: Level
    rule: str
    evidence: list[dict] = field(default_factory=list)  # {detector, value, threshold, hits, min_hits}

    def key(self) -> tuple:
        return (self.client, self.qn, int(self.from_level), int(self.to_level), self.rule)


def det_view(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The canonical form of items that detectors see and the log stores: images on the 0-255
    grid become exactly k/255 (stored as uint8); anything else is rounded to float16. Idempotent,
    so replaying the stored items reproduces the live inputs bit for bit."""
    x = np.asarray(images, dtype=np.float32)
    flat = x.reshape(len(x), -1)
    y = flat * np.float32(255.0)
    r = np.rint(y)
    y -= r
    np.abs(y, out=y)
    on_grid = (y.max(1, initial=0.0) <= 1e-3) & (flat.min(1, initial=0.0) >= 0) \
        & (flat.max(1, initial=0.0) <= 1)
    r = r.reshape(x.shape)
    out = r
    out /= np.float32(255.0)          # k/255 exactly as uint8 k -> float32 / 255 gives it
    off = ~on_grid
    if off.any():                     # only off-grid items pay for the float16 rounding
        out[off] = x[off].astype(np.float16).astype(np.float32)
    return out, on_grid


@dataclass
class Step:
    """What one request did to a client's engine (see :meth:`ClientEngine.step`)."""
    qn0: int                  # the client's query count before the request
    level_before: int         # its level before (after the cool-down and the group floor)
    items: Items
    scores: np.ndarray
    fired: np.ndarray
    after: np.ndarray         # level after each item
    transitions: list


class ClientEngine:
    def __init__(self, cfg: MonitorConfig, client: str):
        self.client = client
        self.dets = build_detectors(cfg.detectors)
        self.hits = [0] * len(cfg.rules)
        self.level = Level.NORMAL
        self.qn = 0
        self.last_hold_t: float | None = None
        self.last_change_t: float | None = None
        self._bind(cfg)

    def _bind(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.rules = cfg.rules

    def __getstate__(self):
        st = dict(self.__dict__)
        st.pop("cfg", None)
        st.pop("rules", None)
        st.pop("_specs", None)
        st.pop("_specs_of", None)
        st.pop("_ck", None)      # the checkpoint chain this process wrote (monitor.core)
        return st

    def restore(self, cfg: MonitorConfig) -> "ClientEngine":
        self._bind(cfg)
        return self

    def begin_batch(self, t: float) -> list[Transition]:
        """Optional cool-down (non-monotone ladders): one level down after ``cooldown_seconds``
        with no rule condition holding. Applied at the start of a request."""
        lad = self.cfg.ladder
        if lad.monotone or lad.cooldown_seconds <= 0 or self.level == Level.NORMAL:
            return []
        ref = max(x for x in (self.last_hold_t, self.last_change_t, -math.inf) if x is not None)
        if t - ref < lad.cooldown_seconds:
            return []
        new = Level(self.level - 1)
        for i, r in enumerate(self.rules):
            if r.level > new:
                self.hits[i] = 0
        tr = Transition(self.client, t, self.qn, self.level, new, "cooldown",
                        [{"detector": "cooldown", "value": t - ref,
                          "threshold": lad.cooldown_seconds}])
        self.level = new
        self.last_change_t = t
        return [tr]

    def step(self, x: np.ndarray, probs: np.ndarray, t: float, on_grid: np.ndarray | None = None,
             floor: int = 0, prepared: dict | None = None) -> "Step":
        """One request as the live monitor and replay both run it: the optional cool-down, then
        the detectors and the ladder. ``floor``: the level a linked group imposes (the engine's
        level is raised to it first, so its own rules only report what goes higher).
        ``prepared``: arrays Linker.probe computed for these same items (Items.seed)."""
        trs = self.begin_batch(t)
        if floor > self.level:
            self.level = Level(floor)
        qn0, before = self.qn, int(self.level)
        items = Items.make(x, probs, on_grid)
        if prepared:                  # arrays Linker.probe computed for these items
            items.seed(prepared)
        scores, fired, after, trs2 = self.observe_batch(items.v, items.probs, t, items=items)
        return Step(qn0, before, items, scores, fired, after, trs + trs2)

    def observe_batch(self, x: np.ndarray, probs: np.ndarray, t: float,
                      on_grid: np.ndarray | None = None, items: Items | None = None):
        """Process one request's N items (x float32 (N, 784) as stored, probs (N, 10)), in
        order. Returns (scores float64 (N, len(DETECTOR_NAMES)), NaN = none; fired int64 bitmask
        (N,); level after each item int64 (N,); transitions). Rules are applied per item exactly
        as one item at a time would: hit counters are cumulative sums, and the level after item
        i is the highest level any rule reached at items 0..i. on_grid: det_view's flags, when
        the caller has them."""
        if items is None:
            items = Items.make(x, probs, on_grid)
        n = len(items)
        if 0 < n <= SMALL_REQUEST:
            return self._observe_small(items, t)
        scores = np.full((n, len(DETECTOR_NAMES)), np.nan)
        firing = {}
        for name, det in self.dets.items():
            s, f = det.observe_batch(items, t)
            scores[:, DET_INDEX[name]] = s
            firing[name] = np.asarray(f, dtype=bool)
        fired = np.zeros(n, dtype=np.int64)
        for name, f in firing.items():
            fired |= f.astype(np.int64) << DET_INDEX[name]
        start_qn = self.qn
        self.qn += n
        # per rule: where its condition holds, and where it has reached min_hits
        reach = np.zeros((len(self.rules), n), dtype=np.int64)
        hits_at = []
        any_hold = np.zeros(n, dtype=bool)
        for i, r in enumerate(self.rules):
            cond = np.ones(n, dtype=bool)
            for d in r.detectors:
                cond &= firing[d]
            h = self.hits[i] + np.cumsum(cond)
            hits_at.append(h)
            self.hits[i] = int(h[-1]) if n else self.hits[i]
            any_hold |= cond
            reach[i] = np.where(cond & (h >= r.min_hits), int(r.level), 0)
        if any_hold.any():
            self.last_hold_t = t
        target = reach.max(0) if len(self.rules) else np.zeros(n, dtype=np.int64)
        after = np.maximum.accumulate(np.maximum(target, int(self.level)))
        trs: list[Transition] = []
        prev = int(self.level)
        for j in np.flatnonzero(after > np.concatenate([[prev], after[:-1]])):
            lvl = int(after[j])
            ev, why = [], []
            for i, r in enumerate(self.rules):
                if reach[i, j] == lvl:
                    why.append(r.label)
                    for d in r.detectors:
                        ev.append({"detector": d, "value": _num(scores[j, DET_INDEX[d]]),
                                   "threshold": self.dets[d].threshold,
                                   "hits": int(hits_at[i][j]), "min_hits": r.min_hits,
                                   "rule": r.label})
            trs.append(Transition(self.client, t, start_qn + int(j) + 1, Level(prev), Level(lvl),
                                  "; ".join(why), ev))
            prev = lvl
        if trs:
            self.level = Level(prev)
            self.last_change_t = t
        return scores, fired, after, trs

    def _rule_specs(self) -> list[tuple]:
        """(detectors, level, min_hits, rule) per rule, derived once per rules list."""
        d = self.__dict__
        if d.get("_specs_of") is not self.rules:
            d["_specs"] = [(tuple(r.detectors), int(r.level), r.min_hits, r) for r in self.rules]
            d["_specs_of"] = self.rules
        return d["_specs"]

    def _observe_small(self, items: Items, t: float):
        """observe_batch for a small request, item by item in Python (the numpy ladder's
        cumulative sums and per-rule arrays cost more than the loop here): the same hit
        counts, levels after each item, transitions and evidence."""
        n = len(items)
        scores = np.full((n, len(DETECTOR_NAMES)), np.nan)
        firing = {}
        fired = [0] * n
        for name, det in self.dets.items():
            s, f = det.observe_batch(items, t)
            col = DET_INDEX[name]
            scores[:, col] = s
            fl = np.asarray(f, dtype=bool).tolist()
            firing[name] = fl
            for j in range(n):
                if fl[j]:
                    fired[j] |= 1 << col
        start_qn = self.qn
        self.qn += n
        specs = self._rule_specs()
        hits = self.hits
        prev = int(self.level)
        top = prev                       # the level after the items so far
        after = [0] * n
        trs: list[Transition] = []
        hold = False
        for j in range(n):
            reach = []
            target = 0
            for i, (dets, lvl, min_hits, _) in enumerate(specs):
                cond = all([firing[d][j] for d in dets])
                if cond:
                    hits[i] += 1
                    hold = True
                r = lvl if cond and hits[i] >= min_hits else 0
                reach.append((r, hits[i]))
                if r > target:
                    target = r
            if target > top:
                top = target
                ev, why = [], []
                for i, (dets, lvl, min_hits, rule) in enumerate(specs):
                    if reach[i][0] == top:
                        why.append(rule.label)
                        for d in dets:
                            ev.append({"detector": d, "value": _num(scores[j, DET_INDEX[d]]),
                                       "threshold": self.dets[d].threshold,
                                       "hits": reach[i][1], "min_hits": min_hits,
                                       "rule": rule.label})
                trs.append(Transition(self.client, t, start_qn + j + 1, Level(prev), Level(top),
                                      "; ".join(why), ev))
                prev = top
            after[j] = top
        if hold:
            self.last_hold_t = t
        if trs:
            self.level = Level(prev)
            self.last_change_t = t
        return scores, np.array(fired, dtype=np.int64), np.array(after, dtype=np.int64), trs

    def nbytes(self) -> int:
        return sum(d.nbytes() for d in self.dets.values())


def _num(v: float) -> float | None:
    return None if v != v else float(v)
