"""Per-client extraction detectors, batched.

Every detector has the same small interface::

    det.observe_batch(items, t) -> (scores float64 (N,), fires bool (N,))

``items`` is an :class:`Items` (one request's N items as the monitor stores them, their DCT
encodings and residual norms, and the target's probabilities); ``t`` the request's timestamp as
logged. Item i's
score is what the per-item definition gives after items 0..i of the request: item i sees the
client's history before the request plus items 0..i-1 of its own request (a B x B term). A
score of NaN means "not enough data yet". Detectors depend on nothing else (no wall clock, no
randomness), so replaying a logged stream request by request reproduces them exactly.

Distances: PRADA and the near-copy detector measure L2 distances between items in pixel space,
exactly as stored (the item as the log keeps it: k/255 on the 0-255 grid, else float16). They
find them with one matrix product per request in the 64-dimensional DCT space, whose distances
plus the residual norms give lower bounds of the pixel distances, and compute pixel distances
only for the few candidates those bounds cannot exclude: the result is the exact pixel-space
answer. The similarity detector works in the DCT space itself.

Cost: one matrix product (one per predicted class for PRADA) per detector per request, against
structures whose size is bounded by the config, so the cost per item does not grow with a
client's history. State is plain numpy and pickles.
"""
from __future__ import annotations

import math
from collections import deque
from functools import cached_property, lru_cache

import numpy as np
from scipy import special

from monitor import features as _features
from monitor.config import (DETECTOR_NAMES, NearDuplicateConfig, OODConfig, PradaConfig,
                            SimilarityConfig, VolumeConfig)
from monitor.features import (BASIS, DIM, LB_COLS, SQ_COLS, Ring, approx_sq,
                              attack_like_pairs, lb_queries, lb_rows, nonzero2d, pair_dist,
                              pixel_dist, sq_norms, sq_queries, sq_rows, stored_encodings,
                              take_rows, to_u8, total_variation)

PIX = 28 * 28

# squared-distance margin above the float32 error of approx_sq for encodings of norm <= 28
SQ_TOL = 0.05
# the same for pixel-space products (784 terms in [0, 1]: |x . y| <= 784)
PIXEL_SQ_TOL = 0.5
# above this share of candidate pairs, one pixel-space matrix product is cheaper than comparing
# the candidates one by one
PIXEL_PAIRS_MAX_SHARE = 0.1

# Shapiro-Wilk W (Royston 1995, algorithm AS R94, as scipy.stats.shapiro computes it) from
# sorted data, with the coefficients cached per sample size: W is the squared correlation of the
# sorted sample with the antisymmetric coefficient vector. Matches scipy to ~1e-9 (tested) at a
# fraction of the cost, because the monitor keeps its window sorted and so never sorts.
_C1 = (0.0, 0.221157, -0.147981, -2.071190, 4.434685, -2.706056)
_C2 = (0.0, 0.042981, -0.293762, -1.752461, 5.682633, -3.582633)


def _poly(c, x: float) -> float:
    r = 0.0
    for v in reversed(c):
        r = r * x + v
    return r


@lru_cache(maxsize=1024)
def _sw_half(n: int) -> np.ndarray:
    """The upper half of the Shapiro-Wilk coefficient vector for n >= 6 sorted values, scaled
    so that the full antisymmetric vector has unit norm (cached per n: <= 20 MB in all)."""
    m = special.ndtri((np.arange(1, n + 1) - 0.375) / (n + 0.25))
    summ2 = float(np.dot(m, m))
    ssumm2 = math.sqrt(summ2)
    rsn = 1.0 / math.sqrt(n)
    a1 = _poly(_C1, rsn) - m[0] / ssumm2
    a2 = -m[1] / ssumm2 + _poly(_C2, rsn)
    fac = math.sqrt((summ2 - 2 * m[0] ** 2 - 2 * m[1] ** 2) / (1 - 2 * a1 ** 2 - 2 * a2 ** 2))
    half = -m[:n // 2] / fac
    half[0], half[1] = a1, a2
    half /= math.sqrt(2.0 * float(np.dot(half, half)))
    half.setflags(write=False)
    return half


def shapiro_w_sorted(x: np.ndarray) -> float:
    """Shapiro-Wilk W of an already sorted sample (len >= 6); NaN for a constant sample.
    W = (sum_i a_i x_(i))^2 / sum (x - mean)^2 with the antisymmetric coefficients a."""
    n = len(x)
    half = _sw_half(n)
    k = len(half)
    num = float(np.dot(half, x[::-1][:k] - x[:k]))
    mean = float(x.mean())
    ss = float(np.dot(x, x)) - n * mean * mean
    if ss <= 0.0:
        return math.nan
    return num * num / ss


class Items:
    """One request's items, prepared once and shared by every detector. The DCT encodings,
    norms and grid flags are computed on first use (the OOD and volume detectors need none)."""

    def __init__(self, v: np.ndarray, probs: np.ndarray):
        self.v = v              # float32 (N, 784): the items as stored (k/255 on the grid, else
        self.probs = probs      # float16); float32 (N, 10): the target's probabilities
        self._intra = None
        self._intra_lb = None
        self.slots = None       # the linking index's LSH slots, when computed before (seed)

    @classmethod
    def make(cls, x: np.ndarray, probs: np.ndarray, grid: np.ndarray | None = None
             ) -> "Items":
        """grid: det_view's on-grid flags when the caller has them (else computed on use)."""
        v = np.ascontiguousarray(x, np.float32).reshape(len(x), -1)
        items = cls(v, np.asarray(probs, np.float32).reshape(len(x), -1))
        if grid is not None:
            items.__dict__["grid"] = np.asarray(grid, dtype=bool)  # the cached_property's slot
        return items

    SEEDED = ("enc", "res", "u8", "tv")

    def seed(self, prep: dict) -> "Items":
        """Take arrays computed for these same items before (Linker.probe's ``prep``: the same
        functions of the same stored items, so the same values): ``enc``, ``res``, ``u8``,
        ``tv`` fill their cached properties, ``slots`` the linking index's LSH slots."""
        for name in self.SEEDED:
            a = prep.get(name)
            if a is not None:
                self.__dict__[name] = a       # the cached_property's slot
        if prep.get("slots") is not None:
            self.slots = prep["slots"]
        return self

    @cached_property
    def enc(self) -> np.ndarray:
        """float32 (N, 64): DCT encodings of v (monitor.features.encode); the squared pixel
        norms (pnorm) come from the same float64 copy of v."""
        v64 = self.v.astype(np.float64)
        if "pnorm" not in self.__dict__:
            self.__dict__["pnorm"] = np.einsum("ij,ij->i", v64, v64)
        return (v64 @ BASIS).astype(np.float32)

    @cached_property
    def norm(self) -> np.ndarray:
        """float64 (N,): squared norms of the encodings."""
        return sq_norms(self.enc)

    @cached_property
    def res(self) -> np.ndarray:
        """float32 (N,): norms of the residuals (v minus its 64 frequencies):
        monitor.features.residual_norms from the two squared norms it computes."""
        return np.sqrt(np.maximum(self.pnorm - self.norm, 0.0)).astype(np.float32)

    @cached_property
    def pnorm(self) -> np.ndarray:
        """float64 (N,): squared pixel norms of v (monitor.features.sq_norms)."""
        return sq_norms(self.v)

    @cached_property
    def lb_q(self) -> np.ndarray:
        """float32 (N, LB_COLS): the items as queries of lower-bound searches
        (monitor.features.lb_queries)."""
        return lb_queries(self.enc, self.norm, self.res)

    @cached_property
    def lb_h(self) -> np.ndarray:
        """float32 (N, LB_COLS): the items as stored rows of those searches (lb_rows)."""
        return lb_rows(self.enc, self.norm, self.res)

    @cached_property
    def sq_q(self) -> np.ndarray:
        """float32 (N, SQ_COLS): the items as queries of DCT-distance searches (sq_queries)."""
        return sq_queries(self.enc, self.norm)

    @cached_property
    def sq_h(self) -> np.ndarray:
        """float32 (N, SQ_COLS): the items as stored rows of those searches (sq_rows)."""
        return sq_rows(self.enc, self.norm)

    @cached_property
    def grid(self) -> np.ndarray:
        """bool (N,): the item is exactly k/255 for integers k in 0..255."""
        y = self.v * np.float32(255.0)
        return (np.rint(y) == y).all(1) & (self.v >= 0).all(1) & (self.v <= 1).all(1)

    @cached_property
    def u8(self) -> np.ndarray:
        """uint8 (N, 784): the items rounded to grey levels (what perturbation tests compare)."""
        return to_u8(self.v)

    @cached_property
    def tv(self) -> np.ndarray:
        """int64 (N,): total variation of u8 (monitor.features.total_variation)."""
        return total_variation(self.u8)

    def __len__(self) -> int:
        return len(self.v)

    @property
    def intra(self) -> np.ndarray:
        """Approximate squared DCT distances between the request's items, +inf where j >= i
        (item i sees only earlier items of its request)."""
        if self._intra is None:
            if len(self.v) == 1 and _features.FAST_PATHS:   # the only pair, (0, 0), is +inf
                self._intra = np.full((1, 1), np.inf, np.float32)
                return self._intra
            s = approx_sq(self.enc, self.norm, self.enc, self.norm)
            s[np.triu_indices(len(s))] = np.inf
            self._intra = s
        return self._intra

    @property
    def intra_lb(self) -> np.ndarray:
        """Lower bounds of the squared pixel distances between the request's items, +inf where
        j >= i."""
        if self._intra_lb is None:
            d = self.res[:, None] - self.res[None, :]
            self._intra_lb = self.intra + d * d
        return self._intra_lb


class PixelRing(Ring):
    """A Ring of items, each held as it was added, bit for bit: as grey levels (u: uint8, a
    quarter of float32's bytes) while every item it holds is on the 0-255 grid (k/255: honest
    clients' images, re-saved or resized copies too), as float32 (h) from its first item off
    the grid on (perturbed or noise items: searches then read one float32 matrix as before).
    The other column has no width. Beside them: their rows for lower-bound searches (a:
    monitor.features.lb_rows, which hold the encodings, their squared norms and the residual
    norms), on-grid flags (g) and squared pixel norms (p). :meth:`take` gives items as float32
    (k/255 exactly as det_view makes it). Pickled compactly: the on-grid items as uint8 (a
    copy of u; converted from h in cache-sized chunks), the others as float16 when that holds
    them exactly (det_view rounds every off-grid item to float16, so the items of a live or
    replayed stream always are), else float32."""

    def __init__(self, size: int):
        super().__init__(size, u=((PIX,), np.uint8), h=((0,), np.float32),
                         a=((LB_COLS,), np.float32), g=((), bool), p=((), np.float64))

    @property
    def wide(self) -> bool:
        """Whether the items are held as float32 (h) rather than grey levels (u)."""
        return self.cols["h"].shape[1] > 0

    def add_items(self, items: "Items", rows: np.ndarray | slice = slice(None)) -> None:
        g = items.grid[rows]
        cols = {"a": items.lb_h[rows], "g": g, "p": items.pnorm[rows]}
        v = items.v[rows]
        if self.wide or not g.all():
            cols["h"] = v
        else:
            y = v * np.float32(255.0)
            np.rint(y, out=y)             # k for an on-grid item k/255
            cols["u"] = y.astype(np.uint8)
        self.add(**cols)

    def add(self, **rows: np.ndarray) -> None:
        """Ring.add of rows holding their items as grey levels (u) or as float32 (h): the
        first float32 items widen the ring (its items converted to float32; from then on it
        holds float32), a wide ring converts grey levels given to it."""
        h = rows.pop("h", None)
        u = rows.pop("u", None)
        if h is not None and h.shape[1] and not self.wide:
            m, cap = self.m, len(self.cols["u"])
            wide = np.zeros((cap, PIX), np.float32)
            wide[:m] = _grey(self.cols["u"][:m])
            self.cols["h"], self.cols["u"] = wide, np.zeros((cap, 0), np.uint8)
            self._nb = None
        if self.wide:
            rows["h"] = h if h is not None and h.shape[1] else _grey(u)
        else:
            rows["u"] = u
        super().add(**rows)

    def take(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Items ``idx`` (slots, an integer array) as float32 rows (len(idx), PIX), into
        ``out`` when given."""
        cols = self.cols
        h = cols["h"]
        if h.shape[1]:
            return np.take(h, idx, axis=0, out=out)
        u = cols["u"].take(idx, axis=0)
        if out is None:
            out = u.astype(np.float32)
        else:
            np.copyto(out, u)
        out /= np.float32(255.0)          # k/255 exactly as det_view makes it
        return out

    def approx_sq(self, q: np.ndarray, qn: np.ndarray) -> np.ndarray:
        """monitor.features.approx_sq(q, qn, self.items(), p), for candidate selection. Grey
        levels enter the product as they are, scaled by 1/255 after (the same up to float32
        rounding)."""
        m = self.m
        if self.wide:
            return approx_sq(q, qn, self.cols["h"][:m], self.cols["p"][:m])
        s = q @ self.cols["u"][:m].astype(np.float32).T
        s *= np.float32(-2.0 / 255.0)
        s += qn.astype(np.float32)[:, None]
        s += self.cols["p"][:m].astype(np.float32)[None, :]
        np.maximum(s, np.float32(0.0), out=s)
        return s

    def items(self) -> np.ndarray:
        """Every item held, float32 (m, PIX), in storage order."""
        return self.take(np.arange(self.m))

    def __getstate__(self):
        # the checkpointer pickles under the client's lock: views of the used rows (pickle
        # writes those rows alone, Ring.__getstate__), grey levels as they are; float32 items
        # converted in cache-sized chunks, never copied as floats first
        st = super().__getstate__()
        cols = st["cols"]
        u, h = cols.pop("u"), cols.pop("h")
        if not self.wide:
            st["v_u8"] = u
            st["v_f16"] = np.zeros((0, PIX), np.float16)
            return st
        m, g = self.m, cols["g"]
        st["v_u8"] = _grey_levels(h, np.flatnonzero(g))
        off = np.flatnonzero(~g)
        f16 = _to_f16(h, None if len(off) == m else off)
        if f16 is None:
            st["v_f32"] = h[off]          # not float16 values: kept as they are
        else:
            st["v_f16"] = f16
        return st

    def __setstate__(self, st):
        u = st.pop("v_u8")
        off = st.pop("v_f16") if "v_f16" in st else st.pop("v_f32")
        cols = st["cols"]
        g = cols["g"]
        if len(off) == 0:                 # every item on the grid: grey levels
            cols["u"] = u
            cols["h"] = np.zeros((len(g), 0), np.float32)
        elif len(off) == len(g):          # every item off the grid: converted in place
            cols["h"] = _to_f32(off)
            cols["u"] = np.zeros((len(g), 0), np.uint8)
        else:
            h = cols["h"] = np.empty((len(g), PIX), np.float32)
            h[g] = _grey(u)
            h[~g] = _to_f32(off)
            cols["u"] = np.zeros((len(g), 0), np.uint8)
        super().__setstate__(st)


_CHUNK_ROWS = 256   # rows converted at once (a chunk's scratch stays in the CPU cache)


def _grey(u: np.ndarray) -> np.ndarray:
    """Grey levels (uint8) as the float32 items k/255, exactly as det_view makes them."""
    out = u.astype(np.float32)
    out /= np.float32(255.0)
    return out


def _row_chunks(v: np.ndarray, rows: np.ndarray | None):
    """(start, end, float32 rows) of v[rows] (every row: None) in chunks of _CHUNK_ROWS: views
    of v, or the rows gathered into one reused scratch array (valid until the next chunk)."""
    n = len(v) if rows is None else len(rows)
    scratch = None if rows is None else np.empty((min(n, _CHUNK_ROWS), v.shape[1]), v.dtype)
    for i in range(0, n, _CHUNK_ROWS):
        j = min(n, i + _CHUNK_ROWS)
        if rows is None:
            yield i, j, v[i:j]
        else:
            np.take(v, rows[i:j], axis=0, out=scratch[:j - i])
            yield i, j, scratch[:j - i]


def _grey_levels(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The on-grid items v[rows] as their grey levels (uint8), in chunks of _CHUNK_ROWS."""
    out = np.empty((len(rows), PIX), np.uint8)
    for i, j, t in _row_chunks(v, rows):
        t *= np.float32(255.0)           # (the scratch: v itself is never written)
        np.rint(t, out=t)
        np.copyto(out[i:j], t, casting="unsafe")
    return out


def _to_f16(v: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray | None:
    """The float32 items v[rows] (every row: None) as float16 when that holds every value
    exactly, else None. Converted and checked in chunks of _CHUNK_ROWS rows with reused
    scratch (the rows are never gathered, nor the check's float32 copy made, whole: an
    off-grid client's rings at 100k queries in 11.4 ms instead of 13.5) by torch (its float16
    conversions are several times numpy's)."""
    import torch
    n = len(v) if rows is None else len(rows)
    out = np.empty((n, v.shape[1]), np.float16)
    half = torch.from_numpy(out)
    back = torch.empty((min(n, _CHUNK_ROWS), v.shape[1]), dtype=torch.float32)
    for i, j, src in _row_chunks(v, rows):
        t = torch.from_numpy(src)
        h = half[i:j]
        h.copy_(t)
        b = back[:j - i]
        b.copy_(h)
        if not torch.equal(b, t):
            return None
    return out


def _to_f32(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float16:
        return a.astype(np.float32, copy=False)
    import torch
    return torch.from_numpy(a).float().numpy()


def _pixel_ring(size: int) -> Ring:
    return PixelRing(size)


IMPLEMENTATIONS: dict[str, type] = {}   # registered name -> Detector subclass


class Detector:
    """A detector's implementation; its ``name`` ties it to its spec in the registry
    (monitor.config.DETECTORS: config, score column, labels), and defining the subclass
    registers it."""

    name = "detector"
    threshold: float

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        IMPLEMENTATIONS[cls.name] = cls

    def observe_batch(self, items: Items, t: float) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def nbytes(self) -> int:
        """Memory held by this detector's state (numpy arrays), for docs and the benchmark."""
        return 0


class Prada(Detector):
    """PRADA (Juuti et al., EuroS&P 2019; the reference implementation's order of steps), in the
    monitor's 64-dimensional DCT space.

    Per predicted class c: a growing set G_c, the mean and std of the distances at which G_c
    grew (the first element counts 0) and a threshold T_c. For a query x of class c: d = min L2
    distance from x to G_c, recorded in the class's distance list; if d > T_c, x joins G_c and
    T_c = max(T_c, mean - std of the growth distances). Every ``check_every`` queries the recorded
    distances of the classes holding >= ``min_class_distances`` are pooled, values beyond
    ``outlier_sigma`` std dropped and, if more than ``min_pooled`` remain, Shapiro-Wilk W is
    computed; the detector fires while the last W < delta.

    Deviations (documented in docs/monitor.md): distances are taken in the DCT space (exact
    there); exact duplicates (d == 0) are not recorded when ``ignore_duplicates``, nor (with
    ``ignore_benign_copies``) near-copies of a set element made by a benign edit (a JPEG re-save,
    resizing or re-lighting: honest users re-send those, and their tiny distances would break
    the normality PRADA tests, while attack-like perturbations are still recorded); the test runs
    on the most recent ``window`` (<= 5000) pooled distances; each G_c holds at most ``max_set``
    elements (the most recent growth; older elements drop out), which bounds memory and cost.
    """

    name = "prada"

    def __init__(self, cfg: PradaConfig, num_classes: int = 10):
        self.cfg = cfg
        self.threshold = cfg.delta
        self.G = [_pixel_ring(cfg.max_set) for _ in range(num_classes)]
        self.grow_n = np.zeros(num_classes, dtype=np.int64)
        self.grow_sum = np.zeros(num_classes)
        self.grow_sq = np.zeros(num_classes)
        self.T = np.zeros(num_classes)
        # the most recent recorded min distances, in order, with their class; enough of them that
        # the test's window is exact (excluded classes hold < min_class_distances each)
        self.D = np.zeros(0, np.float64)
        self.Dcls = np.zeros(0, np.int8)
        self.Dcount = np.zeros(num_classes, dtype=np.int64)
        self.inc = np.zeros(0, np.float64)     # the test's window, in arrival order
        self.S = np.zeros(0, np.float64)       # the same, sorted
        self.n = 0
        self.W = math.nan
        self.fires = False

    def nbytes(self) -> int:
        return (sum(g.nbytes() for g in self.G) + self.D.nbytes + self.Dcls.nbytes
                + self.inc.nbytes + self.S.nbytes)

    def _min_to_set(self, c: int, items: Items, idx: np.ndarray) -> np.ndarray:
        """Exact pixel distance from each item idx to its nearest element of G_c (inf when G_c
        is empty): the element with the lowest bound gives an upper bound u; only elements
        whose lower bound is below u can be nearer, and only those are compared in pixels.
        When the bounds exclude little (items whose energy lies outside the 64 frequencies, such
        as noise), one pixel-space matrix product finds the candidates instead: the cost per
        item stays bounded by the set size either way."""
        G = self.G[c]
        Ga, Gp = G.get("a", "p")
        if len(Ga) == 0:
            self._nearest = np.zeros(len(idx), dtype=np.int64)
            return np.full(len(idx), np.inf)
        lb = items.lb_q[idx] @ Ga.T
        best = lb.argmin(1)
        u = pair_dist(items.v, idx, G, best)
        cand = lb <= (u * u + SQ_TOL)[:, None].astype(np.float32)
        if np.count_nonzero(cand) > PIXEL_PAIRS_MAX_SHARE * cand.size:
            s = G.approx_sq(items.v[idx], items.pnorm[idx])     # float32, pixel space
            cand = s <= (s.min(1) + PIXEL_SQ_TOL)[:, None]
        ri, cj = nonzero2d(cand)
        d = pair_dist(items.v, idx[ri], G, cj)
        out = u.copy()
        arg = best.copy()
        if len(ri) and len(idx) == 1 and _features.FAST_PATHS:
            # one item (a batch-1 request): the first minimum is the nearest candidate with the
            # lowest slot (cj ascends), as the lexsort below orders them; NaN (sorted last
            # there, first by argmin) takes the general path
            j = int(d.argmin())
            if d[j] == d[j]:
                if d[j] < out[0]:
                    out[0] = d[j]
                    arg[0] = cj[j]
                self._nearest = arg
                return out
        if len(ri):
            order = np.lexsort((cj, d, ri))           # per item: nearest first, ties by slot
            ro = ri[order]
            first = order[np.concatenate(([True], ro[1:] != ro[:-1]))]
            closer = d[first] < out[ri[first]]
            out[ri[first[closer]]] = d[first[closer]]
            arg[ri[first[closer]]] = cj[first[closer]]
        self._nearest = arg
        return out

    def _benign(self, c: int, items: Items, idx: np.ndarray, d: np.ndarray) -> np.ndarray:
        """ignore_benign_copies: items whose nearest element of G_c is a near-copy (0 < d <=
        benign_radius) made by a benign edit (re-saved, resized, re-lit: not an attack-like
        perturbation); they are treated like exact duplicates (not recorded)."""
        cfg = self.cfg
        out = np.zeros(len(idx), dtype=bool)
        if not cfg.ignore_benign_copies:
            return out
        if len(d) == 1 and not (0 < d[0] <= cfg.benign_radius) and _features.FAST_PATHS:
            return out
        near = np.flatnonzero((d > 0) & (d <= cfg.benign_radius))
        if len(near):
            out[near] = ~attack_like_pairs(items.v[idx[near]],
                                           self.G[c].take(self._nearest[near]),
                                           cfg.step, cfg.dense, cfg.peak)
        return out

    def observe_batch(self, items, t):
        if len(items) == 1 and _features.FAST_PATHS:
            return self._observe_one(items)
        cfg = self.cfg
        n = len(items)
        cls = items.probs.argmax(1)
        rec = np.full(n, np.nan)          # distance recorded for item i (NaN: none)
        for c in np.unique(cls):
            c = int(c)
            idx = np.flatnonzero(cls == c)
            dh_a = self._min_to_set(c, items, idx)
            benign = self._benign(c, items, idx, dh_a)
            dh = dh_a.tolist()
            k = len(idx)
            best = np.full(k, np.inf)     # min distance to the request's items that joined G_c
            pair = _pairs_below(items, idx, dh_a) if k > 1 else None
            joined: list[int] = []
            T = float(self.T[c])
            gn, gs, gq = int(self.grow_n[c]), float(self.grow_sum[c]), float(self.grow_sq[c])
            for a in range(k):
                d = min(dh[a], float(best[a]))
                if d != math.inf and not ((d == 0.0 and cfg.ignore_duplicates)
                                          or (benign[a] and d == dh[a])):
                    rec[idx[a]] = d
                grow, T, gn, gs, gq = _grow(d, T, gn, gs, gq)
                if grow:
                    joined.append(a)
                    if pair is not None:
                        np.minimum(best, pair[:, a], out=best)
            self.T[c] = T
            self.grow_n[c], self.grow_sum[c], self.grow_sq[c] = gn, gs, gq
            if joined:
                j = idx[np.asarray(joined)]
                self.G[c].add_items(items, j)
        # record the distances in item order; test at every check_every-th item
        W = np.empty(n)
        fires = np.empty(n, dtype=bool)
        has = ~np.isnan(rec)
        pos = np.flatnonzero(has)                      # item index of each new distance
        new_d, new_c = rec[has], cls[has].astype(np.int64)
        every = cfg.check_every
        done = 0                                       # new distances recorded so far
        start = 0
        for i in range(int((-self.n - 1) % every), n, every):   # items with (n+i+1) % every == 0
            upto = int(np.searchsorted(pos, i, side="right"))
            W[start:i] = self.W                        # items before the test: the last W
            fires[start:i] = self.fires
            self._record(new_d[done:upto], new_c[done:upto])
            done = upto
            self._test()
            start = i
        self._record(new_d[done:], new_c[done:])
        W[start:] = self.W
        fires[start:] = self.fires
        self.n += n
        return W, fires

    def _observe_one(self, items):
        """observe_batch for a request of one item: the same steps with Python scalars (no
        per-class grouping, no B x B term, no test schedule to search)."""
        cfg = self.cfg
        c = int(items.probs.argmax(1)[0])
        idx = np.zeros(1, np.intp)
        dh_a = self._min_to_set(c, items, idx)
        benign = self._benign(c, items, idx, dh_a)
        dh0 = float(dh_a[0])
        d = min(dh0, math.inf)            # (no earlier item of the request joined G_c)
        T = float(self.T[c])
        gn, gs, gq = int(self.grow_n[c]), float(self.grow_sum[c]), float(self.grow_sq[c])
        rec = None
        if d != math.inf and not ((d == 0.0 and cfg.ignore_duplicates)
                                  or (benign[0] and d == dh0)):
            rec = d
        grow, T, gn, gs, gq = _grow(d, T, gn, gs, gq)
        self.T[c] = T
        self.grow_n[c], self.grow_sum[c], self.grow_sq[c] = gn, gs, gq
        if grow:
            self.G[c].add_items(items, idx)
        if rec is not None and rec == rec:   # (a NaN distance is not recorded)
            self._record1(rec, c)
        if (self.n + 1) % cfg.check_every == 0:
            self._test()
        self.n += 1
        return np.array([self.W], np.float64), np.array([self.fires], bool)

    def _record1(self, d: float, c: int) -> None:
        """_record for one distance d of class c (the same arrays, without the vectorised
        bookkeeping: only class c's count moves, so only it can become included)."""
        cfg = self.cfg
        mcd = cfg.min_class_distances
        before = int(self.Dcount[c])
        self.Dcount[c] += 1
        keep = cfg.window + len(self.Dcount) * mcd
        self.D = np.concatenate([self.D, np.array([d], np.float64)])[-keep:]
        self.Dcls = np.concatenate([self.Dcls, np.array([c], np.int8)])[-keep:]
        if before + 1 < mcd:
            return
        if before < mcd:                                    # class c became included
            ok = self.Dcount >= mcd
            inc = self.D[ok[self.Dcls.astype(np.int64)]][-cfg.window:]
            self.inc = inc.copy()
            self.S = np.sort(inc)
            return
        self.inc = np.concatenate([self.inc, np.array([d], np.float64)])
        S = self.S
        p = int(np.searchsorted(S, d))
        S1 = np.empty(len(S) + 1)
        S1[:p] = S[:p]
        S1[p] = d
        S1[p + 1:] = S[p:]
        drop = len(self.inc) - cfg.window
        if drop == 1:
            old = self.inc[0]
            self.inc = self.inc[1:]
            f = int(np.searchsorted(S1, old, side="left"))
            S1 = np.concatenate([S1[:f], S1[f + 1:]])
        elif drop > 1:
            old = np.sort(self.inc[:drop])
            self.inc = self.inc[drop:]
            first = np.searchsorted(S1, old, side="left")
            rank = np.arange(len(old)) - np.searchsorted(old, old, side="left")
            S1 = np.delete(S1, first + rank)
        self.S = S1

    # The test's window: the most recent ``window`` distances of the classes that hold at least
    # ``min_class_distances`` ("included"), kept both in arrival order (inc) and sorted (S), so a
    # test never sorts. D/Dcls keep the most recent distances of every class, enough to rebuild
    # the window when a class becomes included (its earlier distances join retroactively, as in
    # the reference implementation; at most once per class).
    def _record(self, d: np.ndarray, c: np.ndarray) -> None:
        if len(d) == 0:
            return
        cfg = self.cfg
        before = self.Dcount.copy()
        self.Dcount += np.bincount(c, minlength=len(self.Dcount))
        keep = cfg.window + len(self.Dcount) * cfg.min_class_distances
        self.D = np.concatenate([self.D, d])[-keep:]
        self.Dcls = np.concatenate([self.Dcls, c.astype(np.int8)])[-keep:]
        ok = self.Dcount >= cfg.min_class_distances
        if (ok & (before < cfg.min_class_distances)).any():   # a class became included
            inc = self.D[ok[self.Dcls.astype(np.int64)]][-cfg.window:]
            self.inc = inc.copy()
            self.S = np.sort(inc)
            return
        new = d[ok[c]]
        if len(new) == 0:
            return
        self.inc = np.concatenate([self.inc, new])
        ns = np.sort(new)
        self.S = np.insert(self.S, np.searchsorted(self.S, ns), ns)
        drop = len(self.inc) - cfg.window
        if drop > 0:
            old = np.sort(self.inc[:drop])
            self.inc = self.inc[drop:]
            first = np.searchsorted(self.S, old, side="left")
            # equal values: delete consecutive copies, not the same one twice
            rank = np.arange(len(old)) - np.searchsorted(old, old, side="left")
            self.S = np.delete(self.S, first + rank)

    def _test(self) -> None:
        cfg = self.cfg
        S = self.S
        if len(S) == 0:
            return
        n = len(S)
        mu = float(S.mean())
        sd = math.sqrt(max(float(np.dot(S, S)) / n - mu * mu, 0.0))
        if sd > 0:
            lim = cfg.outlier_sigma * sd
            lo = int(np.searchsorted(S, mu - lim, side="right"))
            hi = int(np.searchsorted(S, mu + lim, side="left"))
            # |d - mu| < lim, exactly as the unsorted filter (searchsorted is a bound only up to
            # rounding of mu -/+ lim): widen, then filter the edges element-wise
            lo, hi = max(lo - 2, 0), min(hi + 2, len(S))
            seg = S[lo:hi]
            S = seg[np.abs(seg - mu) < lim]
        if len(S) > cfg.min_pooled:
            W = shapiro_w_sorted(S)
            if not math.isnan(W):
                self.W = W
                self.fires = W < cfg.delta


class _RollingShare:
    """Share of True among the last ``window`` flags, for every flag of a batch: a ring buffer
    with a running count (O(1) per flag), plus a cumulative-sum path for large batches."""

    def __init__(self, window: int):
        self.window = window
        self.ring = np.zeros(window, dtype=bool)
        self.count = 0
        self.n = 0

    def push(self, flags: np.ndarray) -> np.ndarray:
        flags = np.asarray(flags, dtype=bool)
        k, w = len(flags), self.window
        if k <= 16:                                   # small requests: plain Python is cheaper
            out = np.empty(k)
            ring, count, n = self.ring, self.count, self.n
            for j, f in enumerate(flags.tolist()):
                i = n % w
                count += f - int(ring[i])
                ring[i] = f
                n += 1
                out[j] = count / min(n, w)
            self.count, self.n = count, n
            return out
        m = min(self.n, w)                            # the last m flags, oldest first
        tail = np.roll(self.ring, -(self.n % w))[w - m:] if self.n >= w else self.ring[:m]
        allf = np.concatenate([tail, flags])
        c = np.concatenate([[0], np.cumsum(allf, dtype=np.int64)])
        end = m + 1 + np.arange(k)                    # prefix length including item i
        counts = c[end] - c[np.maximum(end - w, 0)]
        ns = self.n + 1 + np.arange(k)
        slots = (self.n + np.arange(k)) % w
        if k >= w:
            slots, flags = slots[-w:], flags[-w:]
        self.ring[slots] = flags
        self.n += k
        self.count = int(counts[-1])
        return counts / np.minimum(ns, w)


class OODRate(Detector):
    """Share of the client's last ``window`` queries whose top softmax score is below tau."""

    name = "ood"

    def __init__(self, cfg: OODConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.share = _RollingShare(cfg.window)

    def observe_batch(self, items, t):
        cfg = self.cfg
        n0 = self.share.n
        rate = self.share.push(items.probs.max(1) < cfg.tau)
        if len(rate) == 1 and _features.FAST_PATHS:
            return rate, np.array([n0 + 1 >= cfg.min_queries and float(rate[0]) > cfg.threshold])
        ns = n0 + 1 + np.arange(len(rate))
        return rate, (ns >= cfg.min_queries) & (rate > cfg.threshold)


def _pairs_below(items: Items, idx: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """(k, k) pixel distances between the items idx (in request order) where item a's distance
    to an earlier item b could be below bound[a]; +inf elsewhere (those pairs cannot matter)."""
    k = len(idx)
    lb = items.intra_lb[np.ix_(idx, idx)]           # +inf for b >= a
    with np.errstate(over="ignore"):
        lim = np.minimum(bound * bound + SQ_TOL, np.finfo(np.float32).max).astype(np.float32)
    cand = lb <= lim[:, None]
    if cand.sum() > PIXEL_PAIRS_MAX_SHARE * k * k:   # the bounds exclude little: pixel product
        q, qn = items.v[idx], items.pnorm[idx]
        s = approx_sq(q, qn, q, qn)
        s[np.triu_indices(k)] = np.inf
        cand = s <= (lim + np.float32(PIXEL_SQ_TOL))[:, None]
    ri, cj = nonzero2d(cand)
    out = np.full((k, k), np.inf)
    if len(ri):
        out[ri, cj] = pair_dist(items.v, idx[ri], items.v, idx[cj])
    return out


def _gather(Ha: np.ndarray, enc: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Encodings of the history's stored rows ``Ha`` (idx < m) or of the request's items
    ``enc`` (idx - m)."""
    m = len(Ha)
    if m == 0:
        return enc[idx]
    # every index through the history (the request's own, clipped, are overwritten): one
    # gather instead of two boolean-masked ones
    out = stored_encodings(np.take(Ha, np.minimum(idx, m - 1), axis=0))
    own = idx >= m
    if own.any():
        out[own] = enc[idx[own] - m]
    return out


class Similarity(Detector):
    """Chen, Carlini, Wagner 2019: mean L2 distance (DCT space) to the ``k`` nearest earlier
    queries among the last ``history`` (before the request) and the request's earlier items.
    Fires when below the threshold. NaN until ``k`` earlier queries exist."""

    name = "similarity"

    def __init__(self, cfg: SimilarityConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.hist = Ring(cfg.history, a=((SQ_COLS,), np.float32))   # sq_rows of the items

    def nbytes(self) -> int:
        return self.hist.nbytes()

    def observe_batch(self, items, t):
        k = self.cfg.k
        n = len(items)
        m = self.hist.m
        if n == 1 and _features.FAST_PATHS:
            return self._observe_one(items, k, m)
        score = np.full(n, np.nan)
        rows = np.flatnonzero(m + np.arange(n) >= k)
        if len(rows):
            (Ha,) = self.hist.get("a")
            q = items.enc[rows]
            own = items.intra[rows]                                 # (r, n), inf for j >= i
            own_idx = np.broadcast_to(m + np.arange(n), own.shape)
            cols, pick = _k_nearest(items.sq_q[rows], Ha, own, own_idx, k, m)
            idx = np.take_along_axis(cols, pick, axis=1)
            d = pixel_dist(_gather(Ha, items.enc, idx), q[:, None, :])  # float32, no BLAS
            score[rows] = d.mean(1)
        self.hist.add(a=items.sq_h)
        with np.errstate(invalid="ignore"):
            return score, score < self.cfg.threshold

    def _observe_one(self, items, k: int, m: int):
        """observe_batch for one item: the same products and top-k selections (so the same
        neighbours in the same order, and the same mean), without the request's B x B term
        (its only entry, the item against itself, is +inf) or the row bookkeeping."""
        score = math.nan
        if m >= k:
            rows = np.zeros(1, np.intp)
            (Ha,) = self.hist.get("a")
            q = items.enc[rows]
            own = np.full((1, 1), np.inf, np.float32)
            own_idx = np.full((1, 1), m, np.int64)
            cols, pick = _k_nearest(items.sq_q, Ha, own, own_idx, k, m)
            idx = cols[:, pick[0]]                    # np.take_along_axis for one row
            g = stored_encodings(Ha[idx]) if int(idx.max()) < m else _gather(Ha, items.enc, idx)
            d = pixel_dist(g, q[:, None, :])
            score = float(np.add.reduce(d, axis=1)[0]) / k    # d.mean(1): sum / count
        self.hist.add(a=items.sq_h)
        return np.array([score]), np.array([score < self.cfg.threshold])


def _grow(d: float, T: float, gn: int, gs: float, gq: float):
    """PRADA's growing set G_c for an item at distance ``d`` from it: (joins, threshold T, and
    the count, sum and sum of squares of the joining distances). An empty set (d = inf) is
    started by the item (distance 0, not counted in the sums); otherwise the item joins when
    d > T, and T becomes max(T, mean - std) of the distances that joined."""
    if d == math.inf:
        return True, T, gn + 1, gs, gq
    if not d > T:                 # (NaN: does not join)
        return False, T, gn, gs, gq
    gn += 1
    gs += d
    gq += d * d
    mean = gs / gn
    return True, max(T, mean - math.sqrt(max(gq / gn - mean * mean, 0.0))), gn, gs, gq


# smallest_k: columns per block, and the fewest blocks (as a multiple of k) worth the two steps
BLOCK_COLS = 16
BLOCKS_MIN_K = 4


def _k_smallest_cols(a: np.ndarray, k: int) -> np.ndarray:
    """Column indices (r, k) of the k smallest entries of each row of ``a`` (in no particular
    order; k < the row length): numpy's introselect (measured on (256, 625) float32 rows: 0.5
    ms, torch.topk 1.3)."""
    return np.argpartition(a, k - 1, axis=1)[:, :k]


def smallest_k(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, column indices) of the k smallest entries of each row of ``s`` (float32 (r, m),
    m > k; in no particular order), ties at the k-th value broken by the selection. Wide rows
    take two cheaper steps instead of one selection over every column: the columns are cut
    into blocks of ``BLOCK_COLS`` (block b holds columns b, b + nb, b + 2 nb, ...; the last m
    mod BLOCK_COLS columns are always candidates), the k blocks with the smallest minima are
    kept, and the selection runs over their columns only. Exact: the k kept blocks each hold
    an entry <= tau (the largest kept minimum), so the k-th smallest entry is <= tau, and every
    block holding an entry < tau has a minimum < tau and is kept. Measured at 256 x 10,000,
    k = 50 (the default Similarity), in process: 3 ms against 8 ms for torch.topk over every
    column."""
    r, m = s.shape
    nb = m // BLOCK_COLS
    if nb < BLOCKS_MIN_K * k:
        cols = _k_smallest_cols(s, k)
        return np.take_along_axis(s, cols, axis=1), cols
    body = s[:, :nb * BLOCK_COLS].reshape(r, BLOCK_COLS, nb)
    mins = np.minimum.reduce(body, axis=1)                  # (r, nb), element-wise passes
    keep = _k_smallest_cols(mins, k)
    cols = (keep[:, None, :] + nb * np.arange(BLOCK_COLS)[:, None]).reshape(r, -1)
    if nb * BLOCK_COLS < m:
        tail = np.arange(nb * BLOCK_COLS, m)
        cols = np.concatenate([cols, np.broadcast_to(tail, (r, len(tail)))], axis=1)
    vals = np.take(s, cols + (np.arange(r) * m)[:, None])   # flat: faster than along an axis
    pick = _k_smallest_cols(vals, k)
    pick += (np.arange(r) * vals.shape[1])[:, None]
    return np.take(vals, pick), np.take(cols, pick)


def _k_nearest(qa, Ha, own, own_idx, k: int, m: int):
    """(cols, pick): candidate indices (rows, c) into history + request and, per row, the
    positions in them of the k smallest approximate distances among the ``m`` history entries
    (stored rows ``Ha``, queries ``qa``: monitor.features.sq_rows / sq_queries; their k nearest
    first when m > k: smallest_k) and the request's own earlier items
    (``own``, +inf where not earlier; their indices ``own_idx``)."""
    if m > k:
        hv, hi = smallest_k(qa @ Ha.T, k)
    else:
        hv = qa @ Ha.T
        hi = np.broadcast_to(np.arange(m), hv.shape)
    vals = np.concatenate([hv, own], axis=1)
    cols = np.concatenate([hi, own_idx], axis=1)
    return cols, _k_smallest_cols(vals, k)


class NearDuplicate(Detector):
    """Share of the client's last ``window`` queries that are a small perturbation of an earlier
    query: some earlier query (the last ``history`` before the request, or an earlier item of
    the request) lies within ``radius`` (L2, pixels in [0, 1]) but is not an exact repeat
    (farther than ``duplicate``) and, with ``structure``, the change is attack-like (dense and
    flat-topped after removing a tone map; see monitor.linking). Jacobian augmentation (x + lambda sign(grad))
    produces such queries even when interleaved with natural images; honest users repeat images
    exactly but rarely send near-copies. Fires when the share exceeds ``threshold``."""

    name = "near_duplicate"

    def __init__(self, cfg: NearDuplicateConfig):
        self.cfg = cfg
        self.threshold = cfg.threshold
        self.hist = _pixel_ring(cfg.history)
        self.share = _RollingShare(cfg.window)

    def nbytes(self) -> int:
        return self.hist.nbytes()

    def _search(self, near: np.ndarray, lb: np.ndarray, hi: np.float32, q: np.ndarray,
                h: np.ndarray) -> None:
        """Set near[i] when some column j with lb[i, j] <= hi holds an item at a pixel distance
        in (duplicate, radius) from q[i]. The lowest-bound candidate of each row is tried first:
        on near-copy streams it settles most rows with one comparison each."""
        cfg = self.cfg
        cand = lb <= hi
        cand[near] = False
        rows = np.flatnonzero(cand.any(1))
        if len(rows) == 0:
            return
        best = lb[rows].argmin(1)
        d = pair_dist(q, rows, h, best)
        hit = (d > cfg.duplicate) & (d < cfg.radius)
        hit[hit] = self._attack_like(q[rows[hit]], take_rows(h, best[hit]))
        near[rows[hit]] = True
        cand[rows[hit]] = False
        cand[rows, best] = False
        ri, cj = nonzero2d(cand)
        if len(ri):
            d = pair_dist(q, ri, h, cj)
            hit = (d > cfg.duplicate) & (d < cfg.radius)
            hit[hit] = self._attack_like(q[ri[hit]], take_rows(h, cj[hit]))
            near[ri[hit]] = True

    def _attack_like(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """structure: which near-copies a[i] ~ b[i] are attack-like perturbations."""
        if not self.cfg.structure:
            return np.ones(len(a), dtype=bool)
        c = self.cfg
        return attack_like_pairs(a, b, c.step, c.dense, c.peak)

    def observe_batch(self, items, t):
        cfg = self.cfg
        n = len(items)
        near = np.zeros(n, dtype=bool)
        hi = np.float32(cfg.radius ** 2 + SQ_TOL)
        (Ha,) = self.hist.get("a")
        if len(Ha):
            self._search(near, items.lb_q @ Ha.T, hi, items.v, self.hist)
        if n > 1 or not _features.FAST_PATHS:   # earlier items of the request (one item has
            # none: its only pair, with itself, is +inf)
            self._search(near, items.intra_lb, hi, items.v, items.v)
        self.hist.add_items(items)
        n0 = self.share.n
        rate = self.share.push(near)
        if n == 1 and _features.FAST_PATHS:
            return rate, np.array([n0 + 1 >= cfg.min_queries and float(rate[0]) > cfg.threshold])
        ns = n0 + 1 + np.arange(n)
        return rate, (ns >= cfg.min_queries) & (rate > cfg.threshold)


class Volume(Detector):
    """Number of queries in the sliding window (t - window_seconds, t]."""

    name = "volume"

    def __init__(self, cfg: VolumeConfig):
        self.cfg = cfg
        self.threshold = float(cfg.threshold)
        self.batches: deque[list] = deque()  # [t, count]
        self.count = 0

    def observe_batch(self, items, t):
        n = len(items)
        lo = t - self.cfg.window_seconds
        while self.batches and self.batches[0][0] <= lo:
            self.count -= self.batches.popleft()[1]
        if self.batches and self.batches[-1][0] == t:
            self.batches[-1][1] += n
        else:
            self.batches.append([t, n])
        if n == 1 and _features.FAST_PATHS:
            c = float(self.count + 1)
            self.count += 1
            return np.array([c]), np.array([c > self.cfg.threshold])
        counts = (self.count + 1 + np.arange(n)).astype(np.float64)
        self.count += n
        return counts, counts > self.cfg.threshold


def build_detectors(cfg) -> dict[str, Detector]:
    """Enabled detectors of a DetectorsConfig, in the registry's order."""
    missing = [n for n in DETECTOR_NAMES if n not in IMPLEMENTATIONS]
    if missing:
        raise RuntimeError(f"detectors registered in monitor.config without an implementation: "
                           f"{missing}")
    return {n: IMPLEMENTATIONS[n](getattr(cfg, n)) for n in DETECTOR_NAMES
            if getattr(cfg, n).enabled}


__all__ = ["IMPLEMENTATIONS", "Items", "Detector", "Prada", "OODRate", "Similarity", "NearDuplicate", "Volume",
           "build_detectors", "DIM"]
