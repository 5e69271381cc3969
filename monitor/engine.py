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
from monitor.detectors import build_detectors

DET_INDEX = {n: i for i, n in enumerate(DETECTOR_NAMES)}


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


def det_view(images: np.ndarray) -> np.ndarray:
    """The canonical form of items that detectors see and the log stores: images on the 0-255
    grid become exactly k/255 (stored as uint8); anything else is rounded to float16. Idempotent,
    so replaying the stored items reproduces the live inputs bit for bit."""
    x = np.asarray(images, dtype=np.float32)
    y = x * np.float32(255.0)
    r = np.rint(y)
    on_grid = (np.abs(y - r) <= 1e-3).reshape(len(x), -1).all(1) & (x.reshape(len(x), -1).min(1) >= 0) \
        & (x.reshape(len(x), -1).max(1) <= 1)
    out = x.astype(np.float16).astype(np.float32)
    if on_grid.any():
        out[on_grid] = r[on_grid].astype(np.uint8).astype(np.float32) / np.float32(255.0)
    return out, on_grid


class ClientEngine:
    def __init__(self, cfg: MonitorConfig, client: str):
        self.client = client
        self.dets = build_detectors(cfg.detectors)
        self.hits = [0] * len(cfg.rules)
        self.level = Level.NORMAL
        self.qn = 0
        self.last_hold_t: float | None = None
        self.last_change_t: float | None = None
        self.last_scores: dict[str, float | None] = {}
        self._bind(cfg)

    def _bind(self, cfg: MonitorConfig) -> None:
        self.cfg = cfg
        self.rules = cfg.rules

    def __getstate__(self):
        st = dict(self.__dict__)
        st.pop("cfg", None)
        st.pop("rules", None)
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

    def step(self, x: np.ndarray, probs: np.ndarray, t: float):
        """Process one item. Returns (scores: list[float|None] in DETECTOR_NAMES order,
        fired bitmask, Transition or None)."""
        self.qn += 1
        scores: list[float | None] = [None] * len(DETECTOR_NAMES)
        fired = 0
        res = {}
        for name, det in self.dets.items():
            s, f = det.observe(x, probs, t)
            res[name] = (s, f)
            scores[DET_INDEX[name]] = s
            if f:
                fired |= 1 << DET_INDEX[name]
        target = self.level
        why = []
        for i, r in enumerate(self.rules):
            if all(res[d][1] for d in r.detectors):
                self.hits[i] += 1
                self.last_hold_t = t
                if self.hits[i] >= r.min_hits and r.level > self.level:
                    if r.level > target:
                        target, why = r.level, []
                    if r.level == target:
                        why.append((i, r))
        tr = None
        if target > self.level:
            ev = []
            for i, r in why:
                for d in r.detectors:
                    ev.append({"detector": d, "value": res[d][0],
                               "threshold": self.dets[d].threshold, "hits": self.hits[i],
                               "min_hits": r.min_hits, "rule": r.label})
            tr = Transition(self.client, t, self.qn, self.level, target,
                            "; ".join(r.label for _, r in why), ev)
            self.level = target
            self.last_change_t = t
        return scores, fired, tr
