"""The fixed low-dimensional space the distance-based detectors work in, and exact distances in it.

Every item is projected once per request onto the 64 lowest 2-D DCT-II frequencies (8 x 8) of
the 28 x 28 image: ``encode(X) = X @ BASIS``. The basis is orthonormal, so distances in this space
never exceed pixel-space distances, and it keeps about 89% of Fashion-MNIST's pixel energy. It
is data-independent (no artefact to ship, nothing to retrain when the target changes), and
computing it costs one small matrix product per request.

Distances are found in two steps: a float32 matrix product gives approximate squared distances
(or lower bounds of pixel distances) for whole blocks (a batch against a history) and selects
candidates; the candidates' distances are then recomputed element-wise without BLAS
(:func:`pixel_dist`), so the values the detectors record do not depend on BLAS blocking or
rounding. Candidate selection keeps a margin above the float32 error, so a candidate that could
win is never dropped.
"""
from __future__ import annotations

import math

import numpy as np

SIDE = 28
# The shortcuts for one-item (batch-1) and few-item requests in this module, monitor.detectors and
# monitor.linking compute the same values bit for bit as the general code; tests switch them off
# to compare the two.
FAST_PATHS = True
FREQS = 8                      # 8 x 8 lowest frequencies
DIM = FREQS * FREQS            # 64


def dct_matrix(n: int, k: int) -> np.ndarray:
    """The first ``k`` rows of the orthonormal DCT-II matrix of size ``n`` (float64, (k, n))."""
    i = np.arange(n)
    m = np.cos(np.pi * (2 * i[None, :] + 1) * np.arange(k)[:, None] / (2 * n))
    m[0] *= np.sqrt(1.0 / n)
    m[1:] *= np.sqrt(2.0 / n)
    return m


# (784, 64): column (u, v) is the separable basis image d_u (x) d_v, flattened row-major
BASIS = np.kron(dct_matrix(SIDE, FREQS), dct_matrix(SIDE, FREQS)).T.copy()


def encode(x: np.ndarray) -> np.ndarray:
    """float32 items (N, 28, 28) or (N, 784) -> float32 encodings (N, 64). Computed in float64
    and rounded once, so an item's encoding does not depend on the batch it arrived in."""
    x = np.asarray(x).reshape(len(x), -1)
    return (x.astype(np.float64) @ BASIS).astype(np.float32)


def sq_norms(e: np.ndarray) -> np.ndarray:
    e64 = e.astype(np.float64)
    return np.einsum("ij,ij->i", e64, e64)


def approx_sq(q: np.ndarray, qn: np.ndarray, h: np.ndarray, hn: np.ndarray) -> np.ndarray:
    """Approximate squared distances (len(q), len(h)) in float32 (one BLAS product and three
    in-place passes); clipped at 0. For candidate selection only: exact values come from
    :func:`pixel_dist`."""
    s = q @ h.T
    s *= np.float32(-2.0)
    s += qn.astype(np.float32)[:, None]
    s += hn.astype(np.float32)[None, :]
    np.maximum(s, np.float32(0.0), out=s)
    return s


# One product per search: the squared distances (or the lower bounds) of queries to stored rows
# come from a single float32 matrix product of augmented rows, with the norms folded in as extra
# columns, instead of a product plus three or four passes over the (queries x rows) result.
# Stored rows hold -2e (exact: a power-of-two scale, so e = -0.5 * row[:DIM] bit for bit), so
# they replace the encodings in the detectors' rings at the same size. Float32 error of a
# product with norms <= 784 (pixels in [0, 1]): ~1e-4 measured, < 2e-3 bound, far below the
# candidate margins (SQ_TOL); the values may be slightly negative where the distance is 0.
SQ_COLS = DIM + 2            # [-2e, 1, n]      . [e, n, 1]        = ||e - e'||^2
LB_COLS = DIM + 3            # [-2e, -2r, 1, p] . [e, r, p, 1]     = ||e - e'||^2 + (r - r')^2


def sq_rows(e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Stored rows for :func:`sq_queries`: float32 (N, SQ_COLS) [-2e, 1, n] (n: squared norms
    of the encodings e)."""
    out = np.empty((len(e), SQ_COLS), np.float32)
    np.multiply(e, np.float32(-2.0), out=out[:, :DIM])
    out[:, DIM] = 1.0
    out[:, DIM + 1] = n
    return out


def sq_queries(e: np.ndarray, n: np.ndarray) -> np.ndarray:
    """float32 (N, SQ_COLS) [e, n, 1]: ``sq_queries(q) @ sq_rows(h).T`` approximates the squared
    distances of the encodings (as :func:`approx_sq`, unclipped)."""
    out = np.empty((len(e), SQ_COLS), np.float32)
    out[:, :DIM] = e
    out[:, DIM] = n
    out[:, DIM + 1] = 1.0
    return out


def lb_rows(e: np.ndarray, n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Stored rows for :func:`lb_queries`: float32 (N, LB_COLS) [-2e, -2r, 1, n + r^2] (r: the
    residual norms)."""
    out = np.empty((len(e), LB_COLS), np.float32)
    np.multiply(e, np.float32(-2.0), out=out[:, :DIM])
    np.multiply(r, np.float32(-2.0), out=out[:, DIM])
    out[:, DIM + 1] = 1.0
    r64 = r.astype(np.float64)
    out[:, DIM + 2] = n + r64 * r64
    return out


def lb_queries(e: np.ndarray, n: np.ndarray, r: np.ndarray) -> np.ndarray:
    """float32 (N, LB_COLS) [e, r, n + r^2, 1]: ``lb_queries(q) @ lb_rows(h).T`` approximates
    lower bounds of the squared pixel distances: the squared distance of the encodings plus the
    squared difference of the residual norms (the part of an item the 64 frequencies do not
    hold). Valid because the basis is orthonormal:
    ||x - y||^2 = ||e_x - e_y||^2 + ||res_x - res_y||^2 >= ||e_x - e_y||^2 + (r_x - r_y)^2."""
    out = np.empty((len(e), LB_COLS), np.float32)
    out[:, :DIM] = e
    out[:, DIM] = r
    r64 = r.astype(np.float64)
    out[:, DIM + 1] = n + r64 * r64
    out[:, DIM + 2] = 1.0
    return out


def stored_encodings(rows: np.ndarray) -> np.ndarray:
    """The encodings e of stored rows (sq_rows or lb_rows), bit for bit."""
    return rows[..., :DIM] * np.float32(-0.5)


def residual_norms(v: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Norm of the part of each item outside the 64 frequencies (float32 (N,))."""
    v64 = v.astype(np.float64)
    tot = np.einsum("ij,ij->i", v64, v64)
    return np.sqrt(np.maximum(tot - sq_norms(e), 0.0)).astype(np.float32)


def pixel_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel-space L2 distances between rows a[i] and b[i] (float32 items), computed without
    BLAS: reproducible, and exactly 0 for identical items."""
    d = a - b
    return np.sqrt(np.einsum("...j,...j->...", d, d)).astype(np.float64)


def nonzero2d(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2-D array (rows, columns; row-major order, the same arrays), by way of
    the flat indices: measured on a (256, 5000) bool array with ~4k True, 0.23 ms against
    2.2 ms for np.nonzero's 2-D path."""
    return np.divmod(np.flatnonzero(a), a.shape[1])


_CHUNK = 256    # rows per block of pair_dist (a block's scratch stays in the CPU cache)
_SMALL_PAIRS = 16   # up to this many pairs, pair_dist gathers them directly


def take_rows(src, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``idx`` of ``src`` as float32: an array's rows, or the items of a ring that holds
    them compactly (its ``take``: monitor.detectors.PixelRing), into ``out`` when given."""
    if isinstance(src, np.ndarray):
        return np.take(src, idx, axis=0, out=out)
    return src.take(idx, out=out)


def pair_dist(a: np.ndarray, ia: np.ndarray | None, b, ib: np.ndarray | None) -> np.ndarray:
    """pixel_dist(a[ia], b[ib]) (bit for bit: the same float32 difference and the same
    per-row einsum), without materialising the gathered rows: blocks of ``_CHUNK`` pairs are
    gathered into one reused scratch buffer. ``b``: an array, or a ring of items
    (:func:`take_rows`). ``ia``/``ib`` None: the rows in order."""
    n = len(ia) if ia is not None else len(ib) if ib is not None else len(a)
    if n == 0:
        return np.empty(0, np.float64)
    ka = np.arange(n) if ia is None else np.asarray(ia, np.intp)
    kb = np.arange(n) if ib is None else np.asarray(ib, np.intp)
    if n <= _SMALL_PAIRS and a.dtype == np.float32 and \
            getattr(b, "dtype", np.float32) == np.float32 and FAST_PATHS:
        # a few pairs: the gathered rows are small, so no scratch buffers (the same float32
        # difference, the same per-row einsum and square root)
        x = a[ka]
        x -= take_rows(b, kb)
        r = np.einsum("ij,ij->i", x, x)
        np.sqrt(r, out=r)
        return r.astype(np.float64)
    out = np.empty(n, np.float64)
    width = a.shape[1]
    buf = np.empty((min(n, _CHUNK), width), np.float32)
    tmp = np.empty((min(n, _CHUNK), width), np.float32)
    for s in range(0, n, _CHUNK):
        e = min(s + _CHUNK, n)
        k = e - s
        x, y = buf[:k], tmp[:k]
        np.take(a, ka[s:e], axis=0, out=x)
        take_rows(b, kb[s:e], out=y)
        np.subtract(x, y, out=x)
        r = np.einsum("ij,ij->i", x, x)
        np.sqrt(r, out=r)
        out[s:e] = r
    return out


_BINS = 32      # tone-map bins (8 grey levels each) over the source item's grey level


def perturbation_stats(a: np.ndarray, b: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For pairs a[i] -> b[i] (uint8 (P, 784), grey levels; a the source): pixel L2 distance
    (in [0, 1] units); the change's residual after removing the best pixel-wise tone map (the
    mean change per 8-grey-level bin of ``a``: brightness, contrast and gamma vanish), float32
    (P, 784) in grey levels; its peak ratio (99th percentile / RMS); and how two-sided the raw
    change is (the minority sign's share of the pixels that moved by 4 grey levels or more: a
    sign step pushes pixels both ways, a re-lighting clipped at 0 or 255 only one way).

    uint8 inputs (what the monitor passes) take a faster path with the same results bit for
    bit: the changes are integers, so the per-bin sums are exact in any order, and the 99th
    percentile is the 8th largest value of a row (a top-k, not a partition)."""
    if (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == np.uint8
            and b.dtype == np.uint8 and a.ndim == 2 and len(a)):
        return _perturbation_stats_u8(a, b)
    return _perturbation_stats_ref(a, b)


def _perturbation_stats_ref(a: np.ndarray, b: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """perturbation_stats for any input (the plain definition)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    p, n = a.shape
    d = b - a
    l2 = np.sqrt(np.einsum("ij,ij->i", d, d)) / np.float32(255.0)
    bins = np.minimum((a * (_BINS / 256.0)).astype(np.int64), _BINS - 1)
    flat = bins + (np.arange(p) * _BINS)[:, None]
    sums = np.bincount(flat.ravel(), d.ravel(), p * _BINS)
    cnt = np.bincount(flat.ravel(), minlength=p * _BINS)
    mean = sums / np.maximum(cnt, 1)
    r = np.abs(d - mean[flat].astype(np.float32))
    rms = np.sqrt(np.einsum("ij,ij->i", r, r) / n)
    k = int(math.ceil(0.99 * n)) - 1
    p99 = np.partition(r, k, axis=1)[:, k]
    peak = np.where(rms > 0, p99 / np.maximum(rms, 1e-12), np.inf)
    pos = (d >= 4).sum(1)
    neg = (d <= -4).sum(1)
    two = np.minimum(pos, neg) / np.maximum(pos + neg, 1)
    return l2.astype(np.float64), r, peak.astype(np.float64), two.astype(np.float64)


def _perturbation_stats_u8(a: np.ndarray, b: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    p, n = a.shape
    d = b.astype(np.float32)
    d -= a                                          # exact: integers in [-255, 255]
    l2 = np.sqrt(np.einsum("ij,ij->i", d, d)) / np.float32(255.0)
    # bin of each pixel (grey level // 8, as floor(a * 32 / 256) gives it), offset per row
    flat = (a >> 3).astype(np.intp)
    flat += (np.arange(p, dtype=np.intp) * _BINS)[:, None]
    flat = flat.ravel()
    # per-bin sums and counts in one pass: the weights d + 2^19 are integers, so the float64
    # sums are exact in any order; the counts are their multiples of 2^19 (|sum of d| < 2^18)
    w = d.ravel().astype(np.float64)
    w += 524288.0
    tot = np.bincount(flat, w, p * _BINS)
    cnt = np.rint(tot / 524288.0)
    sums = tot - cnt * 524288.0
    mean = (sums / np.maximum(cnt, 1)).astype(np.float32)
    r = mean[flat].reshape(p, n)
    np.subtract(d, r, out=r)
    np.abs(r, out=r)
    rms = np.sqrt(np.einsum("ij,ij->i", r, r) / n)
    k = int(math.ceil(0.99 * n)) - 1                # the (k+1)-th smallest = (n-k)-th largest
    top = torch.topk(torch.from_numpy(r), n - k, dim=1, largest=True, sorted=False).values
    p99 = top.min(1).values.numpy()
    peak = np.where(rms > 0, p99 / np.maximum(rms, 1e-12), np.inf)
    pos = np.count_nonzero(d >= 4, axis=1)
    neg = np.count_nonzero(d <= -4, axis=1)
    two = np.minimum(pos, neg) / np.maximum(pos + neg, 1)
    return l2.astype(np.float64), r, peak.astype(np.float64), two.astype(np.float64)


def to_u8(v: np.ndarray) -> np.ndarray:
    """Items in [0, 1] rounded to grey levels (uint8): what the perturbation tests compare."""
    return np.clip(np.rint(v * np.float32(255.0)), 0, 255).astype(np.uint8)


def total_variation(pix: np.ndarray) -> np.ndarray:
    """Anisotropic total variation of uint8 items (N, 784), in grey levels (int64 (N,))."""
    u = pix.reshape(len(pix), 28, 28).astype(np.int16)
    dy = u[:, 1:, :] - u[:, :-1, :]         # np.diff along each axis (exact integers)
    dx = u[:, :, 1:] - u[:, :, :-1]
    np.abs(dy, out=dy)
    np.abs(dx, out=dx)
    return dy.sum((1, 2), dtype=np.int64) + dx.sum((1, 2), dtype=np.int64)



TWO_SIDED = 0.15   # a sign step: the minority sign holds >= 14-20% of the moved pixels (JBDA 1st-5th pct)


def attack_like_pairs(a: np.ndarray, b: np.ndarray, step: float, dense: float, peak: float
                      ) -> np.ndarray:
    """Which near-copies a[i] ~ b[i] (float32 items in [0, 1], (P, 784)) are attack-like
    perturbations: measured from the smoother of the two (total variation), the change after
    the tone map moves at least ``dense`` of the pixels by ``step`` grey levels and its 99th
    percentile is at most ``peak`` times its RMS (see monitor.linking)."""
    if len(a) == 0:
        return np.zeros(0, dtype=bool)
    ua, ub = to_u8(a), to_u8(b)
    swap = total_variation(ua) < total_variation(ub)
    src = np.where(swap[:, None], ua, ub)
    dst = np.where(swap[:, None], ub, ua)
    _, r, pk, two = perturbation_stats(src, dst)
    return ((r >= np.float32(step)).mean(1) >= dense) & (pk <= peak) & (two >= TWO_SIDED)


class Ring:
    """The most recent ``size`` rows of a few parallel arrays (e.g. encodings, their norms, the
    items themselves), in a ring buffer grown geometrically up to ``size``. Searches over it do
    not depend on the order of rows, so rows stay where they were written."""

    def __init__(self, size: int, **columns: tuple[tuple, type]):
        """columns: name=(row shape, dtype)."""
        self.size = int(size)
        self.cols = {k: np.zeros((0,) + tuple(shape), dtype) for k, (shape, dtype) in
                     columns.items()}
        self.n = 0          # rows ever added
        self._nb = None     # nbytes() while the columns are not regrown (None: recount)

    @property
    def m(self) -> int:
        return min(self.n, self.size)

    def add(self, **rows: np.ndarray) -> None:
        k = len(next(iter(rows.values())))
        if k == 0:
            return
        if k >= self.size:  # only the last `size` survive: every slot is written below
            rows = {c: v[-self.size:] for c, v in rows.items()}
            self._make_room(self.size)     # (before n moves: it copies the rows held now)
            self.n += k - self.size
            k = self.size
        else:
            self._make_room(self.m + k)
        cols = self.cols
        if k == 1 and FAST_PATHS:   # one row (a batch-1 request): a plain index, no slot array
            slot = self.n % self.size
            for c, v in rows.items():
                cols[c][slot] = v[0]
        else:
            slots = (self.n + np.arange(k)) % self.size
            for c, v in rows.items():
                cols[c][slots] = v
        self.n += k

    def _make_room(self, rows: int) -> None:
        """Room for ``rows`` rows: when the columns hold fewer (and fewer than ``size``), every
        column is reallocated at twice its length (at least 64 and ``rows``, at most
        ``size``), the used rows copied."""
        cur = len(next(iter(self.cols.values())))
        if rows <= cur or cur >= self.size:
            return
        cap = min(self.size, max(64, 2 * cur, rows))
        m = self.m
        for c, a in self.cols.items():
            b = np.zeros((cap,) + a.shape[1:], a.dtype)
            b[:m] = a[:m]
            self.cols[c] = b
        self._nb = None

    def get(self, *names: str) -> tuple[np.ndarray, ...]:
        """The used rows of the named columns, in storage order (views)."""
        m = self.m
        return tuple(self.cols[c][:m] for c in names)

    def nbytes(self) -> int:
        nb = getattr(self, "_nb", None)     # (rings pickled before the cache have none)
        if nb is None:
            nb = self._nb = sum(a.nbytes for a in self.cols.values())
        return nb

    def __getstate__(self):
        """The used part, in storage order (slot arithmetic stays valid). Views, not copies:
        pickle writes a view's rows and nothing else, so a copy first would copy every row
        twice under the client's lock (``copy.copy`` of a ring would share its arrays)."""
        m = self.m
        return {"size": self.size, "n": self.n, "cols": {c: a[:m] for c, a in self.cols.items()}}

    def __setstate__(self, st):
        """Restored with the room the next add would make (twice the rows, up to ``size``):
        a restore runs before the client's next request, off its path, and the regrowth of
        every ring was that request's cost (measured in process, a client of 2,560 queries at
        batch 64: the first request after a restore 3.3-4.5 ms, later ones 0.6-0.7; with the
        room made at restore 0.6-0.9)."""
        self.size, self.n, self.cols = st["size"], st["n"], st["cols"]
        self._nb = None
        self._make_room(self.m + 1)
