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

import numpy as np

SIDE = 28
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


def lower_bound_sq(q: np.ndarray, qn: np.ndarray, qr: np.ndarray, h: np.ndarray,
                   hn: np.ndarray, hr: np.ndarray) -> np.ndarray:
    """Approximate lower bounds of the squared pixel distances (len(q), len(h)): the squared
    distance of the encodings plus the squared difference of the residual norms (the part of
    an item the 64 frequencies do not hold). Valid because the basis is orthonormal:
    ||x - y||^2 = ||e_x - e_y||^2 + ||res_x - res_y||^2 >= ||e_x - e_y||^2 + (r_x - r_y)^2."""
    s = approx_sq(q, qn, h, hn)
    d = qr.astype(np.float32)[:, None] - hr.astype(np.float32)[None, :]
    d *= d
    s += d
    return s


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

    @property
    def m(self) -> int:
        return min(self.n, self.size)

    def add(self, **rows: np.ndarray) -> None:
        k = len(next(iter(rows.values())))
        if k == 0:
            return
        if k >= self.size:  # only the last `size` survive
            rows = {c: v[-self.size:] for c, v in rows.items()}
            self.n += k - self.size
            k = self.size
        m = self.m
        cur = len(next(iter(self.cols.values())))
        if m + k > cur and cur < self.size:
            cap = min(self.size, max(64, 2 * cur, m + k))
            for c, a in self.cols.items():
                b = np.zeros((cap,) + a.shape[1:], a.dtype)
                b[:m] = a[:m]
                self.cols[c] = b
        slots = (self.n + np.arange(k)) % self.size
        for c, v in rows.items():
            self.cols[c][slots] = v
        self.n += k

    def get(self, *names: str) -> tuple[np.ndarray, ...]:
        """The used rows of the named columns, in storage order (views)."""
        m = self.m
        return tuple(self.cols[c][:m] for c in names)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.cols.values())

    def __getstate__(self):  # the used part, in storage order (slot arithmetic stays valid)
        m = self.m
        return {"size": self.size, "n": self.n, "cols": {c: a[:m].copy()
                                                          for c, a in self.cols.items()}}

    def __setstate__(self, st):
        self.size, self.n, self.cols = st["size"], st["n"], st["cols"]
