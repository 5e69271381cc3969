"""The soft-label signature: evidence that survives a copy trained with augmentation (issue #12).

A label mark (watermark.py) is evidence only in a copy that memorises the marked image; a copy
trained with random shifts and flips does not (docs/defences.md). The signature instead changes
the *probabilities* of answers in a way that is a smooth function of the image, so a copy learns
it as it learns the target's decision function, augmentation or not. Labels are never changed.

- **Cells**: an answer's cell is (the target's label L, the image's mean-intensity bin b): 8 fixed
  bins (``EDGES``). Mean intensity does not change under shifts and flips, and the label is what
  the copy learns; so the cell of an image and of its augmented copies is the same.
- **Keyed class**: each key k has its own table W_k[L, b], a class other than L drawn from a keyed
  BLAKE2b of (client id, L, b) (``table``): uniform over the 9 classes other than L, independent
  across cells and keys.
- **Signing** (``sign``): after the key's ``knee`` queries (``signature_knee``; by default the
  label marks' knee), an answer in cell (L, b) gets ``p' = (1 - s) p + s e_W``, s the strength,
  when that keeps L on top with room to spare (p_L - p_W > s / (1 - s)); otherwise it is left
  alone. A copy trained on those answers puts extra mass on W_k[L, b] for images of that cell.
- **Test** (``cell_scores``): the suspect and the target are run on the key's logged images; on the
  confident ones (target top >= ``MIN_CONFIDENCE``), per cell with >= ``MIN_CELL`` images, the
  tempered log-ratio log(suspect + 0.001) - log(target + 0.001) of each of the 9 classes other
  than L is averaged and divided by its standard error (a t statistic: the signature is
  consistent over the cell, a copy's own errors are not; the tempering flattens a copy's large
  relative deviations on probabilities far below the signature's), and W's rank among the 9 is
  taken (ties: lower class index first, a rule that never looks at W). **Null** (the suspect was
  not trained on this key's signed answers): the suspect, the target and the images are
  independent of the key's table, and W is uniform over the 9 classes other than L,
  independently across cells, so each rank is uniform on 1..9 and the rank sum has the exact law
  ``watermark.score_tail`` computes, as for the label marks' rank sum.
  Keys hold independent tables, so a pool's or group's statistic is the sum over its keys' cells.

Strength, bins and the statistic were chosen from measurements (lab/attribution.py,
docs/defences.md). The idea of a soft-output signal that a distilled copy inherits is CosWM's
(Charette et al., AAAI 2022); this one uses keyed per-cell classes so that the null law is exact
and the evidence names the key.
"""
from __future__ import annotations

import hashlib
import threading

import numpy as np

from common.types import NUM_CLASSES

# mean-intensity bin edges (images in [0, 1]); Fashion-MNIST's pool spreads over all 8 bins
EDGES = np.array([0.12, 0.16, 0.20, 0.24, 0.28, 0.33, 0.40])
NBINS = len(EDGES) + 1
MIN_CONFIDENCE = 0.99      # the test uses images the target answers at least this confidently
MIN_CELL = 5               # ... in cells holding at least this many of them
LOG_EPS = 1e-3             # the test compares log(p + LOG_EPS): tempered log-probabilities
PERSON = b"modelguard/sig1"
_CACHE_MAX = 4096


def bins(images: np.ndarray) -> np.ndarray:
    """int64 (N,): each image's mean-intensity bin, 0..NBINS-1 (images in [0, 1])."""
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    return np.searchsorted(EDGES, x.mean(1, dtype=np.float64)).astype(np.int64)


class Signature:
    """The signature of one secret: per-key tables, signing and the per-key test."""

    def __init__(self, key: bytes, strength: float, *, knee: int = 0):
        if not key:
            raise ValueError("the signature needs a non-empty key")
        if not 0.0 < strength <= 0.3:
            raise ValueError(f"signature strength must be in (0, 0.3], got {strength}")
        if knee < 0:
            raise ValueError(f"signature knee must be >= 0, got {knee}")
        self.key = hashlib.blake2b(key, digest_size=32, person=b"modelguard/sigk").digest()
        self.strength = float(strength)
        self.knee = int(knee)
        self._tables: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Signature(strength={self.strength}, knee={self.knee})"

    def table(self, client_id: str) -> np.ndarray:
        """int64 (10, NBINS): the key's class W[L, b] != L for every cell (cached per key)."""
        cid = str(client_id)
        with self._lock:
            t = self._tables.get(cid)
        if t is not None:
            return t
        raw = hashlib.blake2b(cid.encode("utf-8"), key=self.key, digest_size=64,
                              person=PERSON).digest()
        # NUM_CLASSES * NBINS 64-bit words from the keyed digest, extended by counter blocks
        words, block = [], 0
        need = NUM_CLASSES * NBINS
        while len(words) < need:
            h = hashlib.blake2b(raw + block.to_bytes(4, "big"), digest_size=64).digest()
            words += [int.from_bytes(h[i:i + 8], "big") for i in range(0, 64, 8)]
            block += 1
        off = 1 + (np.array(words[:need], dtype=np.uint64) % np.uint64(NUM_CLASSES - 1))
        t = (np.arange(NUM_CLASSES)[:, None] + off.astype(np.int64).reshape(NUM_CLASSES, NBINS)) \
            % NUM_CLASSES
        with self._lock:
            if len(self._tables) >= _CACHE_MAX:
                self._tables.clear()
            self._tables[cid] = t
        return t

    def classes(self, client_id: str, labels: np.ndarray, images: np.ndarray) -> np.ndarray:
        """The keyed class W of each (label, image) for this key."""
        return self.table(client_id)[np.asarray(labels, np.int64), bins(images)]

    def sign(self, probs: np.ndarray, images: np.ndarray, client_id: str, qn) -> tuple:
        """(signed probabilities, bool mask of the rows changed) for answers ``probs`` to
        ``client_id`` as its query numbers ``qn`` (1-based; rows at or below the knee are left
        alone). The label (argmax) of every row is kept."""
        p = np.asarray(probs, np.float32)
        n = len(p)
        qn = np.broadcast_to(np.asarray(qn, np.int64), (n,))
        rows = np.flatnonzero(qn > self.knee)
        out = p.copy()
        done = np.zeros(n, bool)
        if not len(rows):
            return out, done
        pr = p[rows]
        lab = pr.argmax(1)
        w = self.classes(client_id, lab, np.asarray(images)[rows])
        i = np.arange(len(rows))
        s = self.strength
        ok = pr[i, lab] - pr[i, w] > s / (1.0 - s)
        r, wk = rows[ok], w[ok]
        out[r] *= np.float32(1.0 - s)
        out[r, wk] += np.float32(s)
        done[r] = True
        return out, done

    def cell_scores(self, suspect: np.ndarray, target: np.ndarray, images: np.ndarray,
                    client_ids) -> dict[str, np.ndarray]:
        """key -> int64 array of its testable cells' ranks of W (1..9; null: uniform), from the
        suspect's and the target's probabilities on the key's images."""
        sp = np.asarray(suspect, np.float64)
        tp = np.asarray(target, np.float64)
        cids = np.asarray([str(c) for c in client_ids], dtype=object)
        if not (len(sp) == len(tp) == len(cids) == len(images)):
            raise ValueError("suspect, target, images and client ids: one row each per record")
        conf = tp.max(1) >= MIN_CONFIDENCE
        lab = tp.argmax(1)
        cell = lab * NBINS + bins(images)
        # tempered log-ratio: a copy's large systematic deviations on tiny probabilities
        # (below LOG_EPS) are flattened, the signature's s-sized bump is not
        diff = np.log(sp + LOG_EPS) - np.log(tp + LOG_EPS)
        from service.defences.watermark import wrong_label_rank  # (it imports this module)

        out: dict[str, np.ndarray] = {}
        for k in dict.fromkeys(cids.tolist()):
            m = np.flatnonzero((cids == k) & conf)
            t = self.table(k)
            zs, labs, ws = [], [], []
            for c in np.unique(cell[m]):
                rows = m[cell[m] == c]
                if len(rows) < MIN_CELL:
                    continue
                d = diff[rows]
                zs.append(d.mean(0) / (d.std(0) / np.sqrt(len(rows)) + 1e-12))
                a, b = divmod(int(c), NBINS)
                labs.append(a)
                ws.append(int(t[a, b]))
            # W's rank among the 9 classes other than L (ties: lower class index first)
            out[k] = (wrong_label_rank(np.array(zs), np.array(labs), np.array(ws)) if zs
                      else np.zeros(0, np.int64))
        return out
