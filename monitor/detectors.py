"""Per-client extraction detectors.

Every detector has the same small interface::

    det.observe(x, probs, t) -> (score, fires)

x: float32 (28, 28) in [0, 1] (the item as the monitor stores it); probs: float32 (10,) the
target's probabilities; t: the request's timestamp in seconds (as logged). ``score`` is a float or
None (not enough data yet); ``fires`` a bool. Detectors depend on nothing else (no wall clock, no
randomness), so replaying a logged stream reproduces them exactly. State is plain numpy/python and
pickles (``state_dict``/``load_state_dict`` go through ``__dict__``).
"""
from __future__ import annotations

import math
import warnings
from collections import deque

import numpy as np
from scipy import stats

from monitor.config import (NearDuplicateConfig, OODConfig, PradaConfig, SimilarityConfig,
                            VolumeConfig)


class Detector:
    name = "detector"
    threshold: float

    def observe(self, x: np.ndarray, probs: np.ndarray, t: float) -> tuple[float | None, bool]:
        raise NotImplementedError


class _Buffer:
    """Append-only float32 row buffer grown geometrically (amortised O(1) append)."""

    def __init__(self, dim: int, cap: int = 64, dtype=np.float32):
        self.data = np.empty((cap, dim) if dim else (cap,), dtype=dtype)
        self.n = 0

    def append(self, row) -> None:
        if self.n == len(self.data):
            new = np.empty((2 * len(self.data),) + self.data.shape[1:], dtype=self.data.dtype)
            new[:self.n] = self.data[:self.n]
            self.data = new
        self.data[self.n] = row
        self.n += 1

    @property
    def view(self) -> np.ndarray:
        return self.data[:self.n]

    def __getstate__(self):  # pickle only the used part
        return {"data": self.data[:self.n].copy(), "n": self.n}

    def __setstate__(self, st):
        self.n = st["n"]
        self.data = st["data"] if len(st["data"]) else np.empty((64,) + st["data"].shape[1:],
                                                                 st["data"].dtype)


class Prada(Detector):
    """PRADA as published (Juuti et al., EuroS&P 2019; reference implementation's order of steps).

    Per predicted class c: a growing set G_c, the distances recorded when G_c grew (first element
    counts 0) and a threshold T_c. For a query x of class c: d = min L2 distance from x to G_c,
    recorded in the class's distance list D_c; if d > T_c, x joins G_c and T_c = max(T_c,
    mean - std of the growth distances). Every ``check_every`` queries the distance lists of the
    classes holding >= 10 distances are pooled, values beyond 3 std dropped and, if more than 100
    remain, Shapiro-Wilk W is computed; the detector fires while the last W < delta.

    Deviations (documented): exact duplicates (d == 0) are not recorded when ``ignore_duplicates``
    (a repeated query reveals nothing new, and honest clients repeat); the test runs on the most
    recent ``window`` (<= 5000) pooled distances, since scipy's Shapiro-Wilk is only accurate up to
    5000 samples and a window keeps the cost bounded at any history length.

    Cost: the growing sets are preallocated buffers with cached squared norms; the min distance is
    one matrix-vector product, the winning candidate's distance is then recomputed exactly so the
    result does not depend on BLAS rounding. No rescan of the history.
    """

    name = "prada"

    def __init__(self, cfg: PradaConfig, num_classes: int = 10, dim: int = 784):
        self.cfg = cfg
        self.threshold = cfg.delta
        self.G = [_Buffer(dim) for _ in range(num_classes)]
        self.Gnorm = [_Buffer(0, dtype=np.float64) for _ in range(num_classes)]
        self.grow_d = [[] for _ in range(num_classes)]   # growth distances per class (first = 0)
        self.grow_sum = np.zeros(num_classes)
        self.grow_sq = np.zeros(num_classes)
        self.T = np.zeros(num_classes)
        # all recorded min distances, in order, with their class
        self.D = _Buffer(0, dtype=np.float64)
        self.Dcls = _Buffer(0, dtype=np.int8)
        self.Dcount = np.zeros(num_classes, dtype=np.int64)
        self.n = 0
        self.W: float | None = None
        self.fires = False

    def _grow(self, c: int, x: np.ndarray, d: float) -> None:
        self.G[c].append(x)
        self.Gnorm[c].append(float(np.dot(x, x)))
        self.grow_d[c].append(d)
        self.grow_sum[c] += d
        self.grow_sq[c] += d * d
        k = len(self.grow_d[c])
        mean = self.grow_sum[c] / k
        var = max(self.grow_sq[c] / k - mean * mean, 0.0)
        self.T[c] = max(self.T[c], mean - math.sqrt(var))

    def observe(self, x, probs, t):
        c = int(np.argmax(probs))
        xv = np.asarray(x, dtype=np.float32).reshape(-1)
        if self.G[c].n == 0:
            self._grow(c, xv, 0.0)
        else:
            G = self.G[c].view
            sq = self.Gnorm[c].view - 2.0 * (G @ xv).astype(np.float64)
            j = int(np.argmin(sq))
            diff = (G[j] - xv).astype(np.float64)
            d = float(math.sqrt(np.dot(diff, diff)))
            if not (d == 0.0 and self.cfg.ignore_duplicates):
                self.D.append(d)
                self.Dcls.append(c)
                self.Dcount[c] += 1
            if d > self.T[c]:
                self._grow(c, xv, d)
        self.n += 1
        if self.n % self.cfg.check_every == 0:
            self._test()
        return self.W, self.fires

    def _test(self) -> None:
        ok = np.flatnonzero(self.Dcount >= self.cfg.min_class_distances)
        if len(ok) == 0:
            return
        D = self.D.view
        if len(ok) < len(self.Dcount):
            D = D[np.isin(self.Dcls.view, ok)]
        D = D[-self.cfg.window:]
        mu, sd = D.mean(), D.std()
        D = D[np.abs(D - mu) < self.cfg.outlier_sigma * sd] if sd > 0 else D
        if len(D) > self.cfg.min_pooled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                W = float(stats.shapiro(D).statistic)
            if not math.isnan(W):
                self.W = W
                self.fires = W < self.cfg.delta


class _RollingShare:
    """Share of True among the last ``window`` flags (a ring buffer with a running count)."""

    def __init__(self, window: int):
        self.ring = np.zeros(window, dtype=bool)
        self.count = 0
        self.n = 0

    def push(self, flag: bool) -> float:
        i = self.n % len(self.ring)
        self.count += int(flag) - int(self.ring[i])
        self.ring[i] = flag
        self.n += 1
        return self.count / min(self.n, len(self.ring))


class OODRate(Detector):
    """Share of the client's last ``window`` queries whose top softmax score is below tau."""

    name = "ood"

    def __init__(self, cfg: OODConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.share = _RollingShare(cfg.window)

    def observe(self, x, probs, t):
        rate = self.share.push(bool(float(np.max(probs)) < self.cfg.tau))
        return rate, bool(self.share.n >= self.cfg.min_queries and rate > self.cfg.threshold)


def encode(x: np.ndarray, encoding: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32).reshape(28, 28)
    if encoding == "pool2":
        return x.reshape(14, 2, 14, 2).mean(axis=(1, 3)).reshape(-1)
    return x.reshape(-1)


class _History:
    """A bounded history of encodings (the most recent ``size``), grown geometrically, then a
    ring buffer; with squared norms kept for fast distance computations."""

    def __init__(self, size: int, dim: int):
        self.size = size
        self.H = np.zeros((0, dim), np.float32)
        self.Hn = np.zeros(0, np.float64)
        self.n = 0

    @property
    def m(self) -> int:
        return min(self.n, self.size)

    def approx_sq(self, e: np.ndarray) -> np.ndarray:
        """Approximate squared distances from ``e`` to every stored encoding (float32 BLAS)."""
        m = self.m
        return self.Hn[:m] - 2.0 * (self.H[:m] @ e).astype(np.float64) + float(np.dot(e, e))

    def exact(self, idx: np.ndarray, e: np.ndarray) -> np.ndarray:
        """Exact distances to the stored encodings ``idx``, sorted (BLAS-independent)."""
        diff = self.H[idx].astype(np.float64) - e
        return np.sort(np.sqrt(np.einsum("ij,ij->i", diff, diff)))

    def add(self, e: np.ndarray) -> None:
        m = self.m
        if m < self.size:
            if m == len(self.H):
                cap = min(self.size, max(64, 2 * len(self.H)))
                H2 = np.zeros((cap, self.H.shape[1]), np.float32)
                H2[:m] = self.H[:m]
                n2 = np.zeros(cap, np.float64)
                n2[:m] = self.Hn[:m]
                self.H, self.Hn = H2, n2
            slot = m
        else:
            slot = self.n % self.size
        self.H[slot] = e
        self.Hn[slot] = float(np.dot(e.astype(np.float64), e))
        self.n += 1

    def __getstate__(self):
        st = dict(self.__dict__)
        st["H"], st["Hn"] = self.H[:self.m].copy(), self.Hn[:self.m].copy()
        return st


class Similarity(Detector):
    """Chen, Carlini, Wagner 2019: mean L2 distance to the K nearest earlier queries (bounded
    history of the most recent ``history`` encodings, in a ring buffer). Fires when below the
    threshold. No score until K earlier queries exist."""

    name = "similarity"

    def __init__(self, cfg: SimilarityConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.hist = _History(cfg.history, 196 if cfg.encoding == "pool2" else 784)

    def observe(self, x, probs, t):
        e = encode(x, self.cfg.encoding)
        score = None
        m, k = self.hist.m, self.cfg.k
        if m >= k:
            sq = self.hist.approx_sq(e)
            idx = np.argpartition(sq, k - 1)[:k] if k < m else np.arange(m)
            score = float(self.hist.exact(idx, e).mean())
        self.hist.add(e)
        return score, bool(score is not None and score < self.cfg.threshold)


class NearDuplicate(Detector):
    """Share of the client's last ``window`` queries that are a small perturbation of an earlier
    query: nearest earlier query (raw pixels, L2, [0, 1] scale) closer than ``radius`` but not an
    exact repeat (farther than ``duplicate``). Synthetic augmentation (JBDA: x + lambda sign(grad))
    produces such queries even when interleaved with natural images; honest users repeat images
    exactly but rarely send near-copies. Fires when the share exceeds ``threshold``."""

    name = "near_duplicate"

    def __init__(self, cfg: NearDuplicateConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.hist = _History(cfg.history, 784)
        self.share = _RollingShare(cfg.window)

    def observe(self, x, probs, t):
        e = encode(x, "raw")
        near = False
        if self.hist.m:
            sq = self.hist.approx_sq(e)
            # candidates by the fast (approximate) distances, confirmed exactly
            cand = np.flatnonzero(sq < (self.cfg.radius + 0.05) ** 2)
            if len(cand):
                d = self.hist.exact(cand, e)
                near = bool(((d > self.cfg.duplicate) & (d < self.cfg.radius)).any())
        self.hist.add(e)
        rate = self.share.push(near)
        return rate, bool(self.share.n >= self.cfg.min_queries and rate > self.cfg.threshold)


class Volume(Detector):
    """Number of queries in the sliding window (t - window_seconds, t]."""

    name = "volume"

    def __init__(self, cfg: VolumeConfig):
        self.cfg = cfg
        self.threshold = float(cfg.threshold)
        self.batches: deque[list] = deque()  # [t, count]
        self.count = 0

    def observe(self, x, probs, t):
        if self.batches and self.batches[-1][0] == t:
            self.batches[-1][1] += 1
        else:
            self.batches.append([t, 1])
        self.count += 1
        lo = t - self.cfg.window_seconds
        while self.batches and self.batches[0][0] <= lo:
            self.count -= self.batches.popleft()[1]
        return float(self.count), bool(self.count > self.cfg.threshold)


def build_detectors(cfg) -> dict[str, Detector]:
    """Enabled detectors of a DetectorsConfig, in a fixed order."""
    out: dict[str, Detector] = {}
    if cfg.prada.enabled:
        out["prada"] = Prada(cfg.prada)
    if cfg.ood.enabled:
        out["ood"] = OODRate(cfg.ood)
    if cfg.similarity.enabled:
        out["similarity"] = Similarity(cfg.similarity)
    if cfg.volume.enabled:
        out["volume"] = Volume(cfg.volume)
    if cfg.near_duplicate.enabled:
        out["near_duplicate"] = NearDuplicate(cfg.near_duplicate)
    return out
