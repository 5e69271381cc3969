"""Honest traffic: benign clients that use the service the way real users would, to measure
what the defences cost them (false escalations, lost probabilities, wrong labels).

An :class:`HonestClient` sends natural images from the pool (never synthetic ones) in requests
of realistic, varying size, with a class mix skewed per user (a Dirichlet draw over the ten
classes), some repeated images (users re-check an item) and optional pacing (exponential think
time between requests; 0 for benches). Optionally (``variant_share``, ``burst_prob``) it also
sends what real users send besides: benign variants of images it already sent, i.e. the same
photo re-saved as JPEG, resized, shifted or cropped a little, re-lit (brightness, contrast,
gamma) or with sensor noise (:func:`benign_variant`, kinds in :data:`VARIANT_KINDS`), and
"photo bursts", requests holding a fresh image followed by several variants of it. Every image
sent is 8-bit (uint8), as real clients send.

With ``run_honest(..., orgs=N)`` the clients form N organisations: the keys of one organisation
draw their fresh images from a shared catalogue (a fixed subset of the pool) and share the list
of images already sent, so one key repeats, and re-sends variants of, another key's items.

Its statistics: queries and requests sent, accuracy of the labels received against the true
labels (a variant's true label is its original's), share of answers that came with
probabilities, the answer kinds, answers produced by a switched model or watermarked, the query
number at which the client first lost probabilities (the client-side view of an escalation),
repeats, variants (in all and per kind) and bursts.

    python -m client.honest --clients 20 --queries 500 --address 127.0.0.1:50051
    python -m client.honest --local --target artifacts/target.pt --clients 5
    python -m client.honest --local --clients 6 --variant-share 0.2 --burst-prob 0.05 --orgs 2
"""
from __future__ import annotations

import argparse
import io
import json
import math
import numbers
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from common import data
from common.types import AnswerKind, NUM_CLASSES
from client.oracle import Oracle

# ---------------------------------------------------------------------------------------------
# Benign variants

IMAGE_SHAPE = (28, 28)
VARIANT_KINDS = ("jpeg", "resize", "shift", "crop", "brightness", "contrast", "gamma", "noise")
JPEG_QUALITIES = (50, 75, 90)          # default quality: drawn from these
RESIZE_SIZES = (20, 26)                # default intermediate size: drawn in this range (inclusive)
RESAMPLERS = ("bilinear", "bicubic")   # Pillow filters for resize and crop
SHIFT_MAX = 2                          # default shift: 1..SHIFT_MAX pixels on one or both axes
CROP_MAX = 3                           # default crop: 1..CROP_MAX pixels off one or two borders
BRIGHTNESS_LEVELS = (5, 25)            # default brightness change: +-this many grey levels
CONTRAST_RANGE = (0.8, 1.2)            # default contrast factor, at least 0.05 away from 1
GAMMA_RANGE = (0.8, 1.25)              # default gamma, at least a factor 1.05 away from 1
NOISE_LEVELS = 2                       # default noise: uniform integers in [-2, 2] grey levels

_PARAMS = {
    "jpeg": ("quality",),
    "resize": ("size", "resample"),
    "shift": ("dx", "dy"),
    "crop": ("left", "top", "right", "bottom", "resample"),
    "brightness": ("delta",),
    "contrast": ("factor",),
    "gamma": ("gamma",),
    "noise": ("amplitude",),
}
assert tuple(_PARAMS) == VARIANT_KINDS


def _check_kinds(kinds: Sequence[str], what: str) -> None:
    unknown = [k for k in kinds if k not in VARIANT_KINDS]
    if unknown:
        raise ValueError(f"{what}: unknown variant kind(s) {unknown}; "
                         f"expected some of {list(VARIANT_KINDS)}")


def _as_u8(image) -> np.ndarray:
    """float in [0, 1] (rounded to the nearest grey level) or uint8 -> uint8 (28, 28)."""
    x = np.asarray(image)
    if x.shape != IMAGE_SHAPE:
        raise ValueError(f"image must have shape {IMAGE_SHAPE}, got {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"image must be float in [0, 1] or uint8, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError("a float image must be finite (it has NaN or infinite values)")
    if x.min() < 0 or x.max() > 1:
        raise ValueError(f"a float image must be in [0, 1], got values in [{x.min():g}, "
                         f"{x.max():g}]")
    return np.rint(x.astype(np.float64) * 255).astype(np.uint8)


def _int_param(params: dict, name: str, lo: int, hi: int, default: Callable[[], int]) -> int:
    v = params[name] if name in params else default()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) \
            or not lo <= v <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return int(v)


def _float_param(params: dict, name: str, lo: float, hi: float,
                 default: Callable[[], float]) -> float:
    v = params[name] if name in params else default()
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not lo < v < hi or v == 1:
        raise ValueError(f"{name} must be a number in ({lo}, {hi}) other than 1, got {v!r}")
    return float(v)


def _resampler(params: dict, rng: np.random.Generator) -> int:
    from PIL import Image

    name = params["resample"] if "resample" in params else RESAMPLERS[rng.integers(2)]
    if name not in RESAMPLERS:
        raise ValueError(f"resample must be one of {list(RESAMPLERS)}, got {name!r}")
    return {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[name]


def _signed(rng: np.random.Generator, lo, hi, integer: bool):
    mag = int(rng.integers(lo, hi + 1)) if integer else float(rng.uniform(lo, hi))
    return mag if rng.random() < 0.5 else -mag


def _jpeg(x, rng, p):
    from PIL import Image

    q = _int_param(p, "quality", 1, 100, lambda: int(rng.choice(JPEG_QUALITIES)))
    buf = io.BytesIO()
    Image.fromarray(x, "L").save(buf, format="JPEG", quality=q)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("L"), np.uint8)


def _resize(x, rng, p):
    from PIL import Image

    side = IMAGE_SHAPE[0]
    s = _int_param(p, "size", 4, side - 1, lambda: int(rng.integers(RESIZE_SIZES[0],
                                                                     RESIZE_SIZES[1] + 1)))
    f = _resampler(p, rng)
    small = Image.fromarray(x, "L").resize((s, s), f)
    return np.asarray(small.resize(IMAGE_SHAPE[::-1], f), np.uint8)


def _shift(x, rng, p):
    h, w = x.shape
    if "dx" in p or "dy" in p:
        dx, dy = p.get("dx", 0), p.get("dy", 0)
    else:
        axes = int(rng.integers(3))               # 0: x only, 1: y only, 2: both
        dx = _signed(rng, 1, SHIFT_MAX, True) if axes != 1 else 0
        dy = _signed(rng, 1, SHIFT_MAX, True) if axes != 0 else 0
    dx = _int_param({"dx": dx}, "dx", -(w - 1), w - 1, int)
    dy = _int_param({"dy": dy}, "dy", -(h - 1), h - 1, int)
    if dx == dy == 0:
        raise ValueError("shift: dx and dy are both 0 (that is the original image)")
    out = np.zeros_like(x)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _crop(x, rng, p):
    from PIL import Image

    h, w = x.shape
    sides = ("left", "top", "right", "bottom")
    if any(s in p for s in sides):
        cut = {s: p.get(s, 0) for s in sides}
    else:
        cut = dict.fromkeys(sides, 0)
        for s in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):
            cut[sides[s]] = int(rng.integers(1, CROP_MAX + 1))
    cut = {s: _int_param(cut, s, 0, (w if s in ("left", "right") else h) // 2 - 1, int)
           for s in sides}
    if not any(cut.values()):
        raise ValueError("crop: every border is 0 (that is the original image)")
    box = (cut["left"], cut["top"], w - cut["right"], h - cut["bottom"])
    return np.asarray(Image.fromarray(x, "L").resize((w, h), _resampler(p, rng), box=box),
                      np.uint8)


def _levels(y: np.ndarray) -> np.ndarray:
    """Grey levels (any real values) -> uint8, rounded and clipped to [0, 255]."""
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _brightness(x, rng, p):
    d = _int_param(p, "delta", -255, 255, lambda: _signed(rng, *BRIGHTNESS_LEVELS, True))
    if d == 0:
        raise ValueError("brightness: delta 0 is the original image")
    return _levels(x.astype(np.int16) + d)


def _contrast(x, rng, p):
    lo, hi = CONTRAST_RANGE
    f = _float_param(p, "factor", 0, math.inf,
                     lambda: 1 + _signed(rng, 0.05, min(1 - lo, hi - 1), False))
    m = float(x.mean())
    return _levels(m + f * (x.astype(np.float64) - m))


def _gamma(x, rng, p):
    lo, hi = GAMMA_RANGE
    g = _float_param(p, "gamma", 0, math.inf,
                     lambda: math.exp(_signed(rng, math.log(1.05),
                                              min(-math.log(lo), math.log(hi)), False)))
    return _levels(255 * (x / 255.0) ** g)


def _noise(x, rng, p):
    a = _int_param(p, "amplitude", 1, 255, lambda: NOISE_LEVELS)
    return _levels(x.astype(np.int16) + rng.integers(-a, a + 1, size=x.shape))


_VARIANTS = {"jpeg": _jpeg, "resize": _resize, "shift": _shift, "crop": _crop,
             "brightness": _brightness, "contrast": _contrast, "gamma": _gamma, "noise": _noise}


def variant_u8(image, kind: str, rng: np.random.Generator, **params) -> np.ndarray:
    """:func:`benign_variant` as uint8 grey levels (what the client sends)."""
    if not isinstance(kind, str) or kind not in _VARIANTS:
        _check_kinds([kind], "benign_variant")
    unknown = sorted(set(params) - set(_PARAMS[kind]))
    if unknown:
        raise ValueError(f"benign_variant: unknown parameter(s) {unknown} for kind {kind!r}; "
                         f"it takes {list(_PARAMS[kind])}")
    return _VARIANTS[kind](_as_u8(image), rng, params)


def benign_variant(image, kind: str, rng: np.random.Generator, **params) -> np.ndarray:
    """A benign variant of ``image``: what a real user sends when re-sending the same photo.

    image: float (28, 28) in [0, 1] (taken to the nearest grey level first) or uint8 (28, 28).
    kind: one of :data:`VARIANT_KINDS`. Parameters not given are drawn from ``rng``:

    - ``jpeg``: re-encoded as JPEG (Pillow) at ``quality`` (default: one of 50, 75, 90);
    - ``resize``: down to ``size`` px (default 20-26) and back up, ``resample`` 'bilinear' or
      'bicubic' (default: either);
    - ``shift``: translated by ``dx``, ``dy`` pixels (default: 1-2 px on one or both axes),
      zero fill;
    - ``crop``: ``left``, ``top``, ``right``, ``bottom`` pixels cut off (default: 1-3 px off one
      or two borders), resized back to 28 px with ``resample``;
    - ``brightness``: ``delta`` grey levels added (default: +-5..25);
    - ``contrast``: scaled around the image's mean by ``factor`` (default 0.8-1.2, at least
      0.05 away from 1);
    - ``gamma``: x ** ``gamma`` (default 0.8-1.25, at least a factor 1.05 away from 1);
    - ``noise``: uniform integer noise in [-``amplitude``, ``amplitude``] grey levels
      (default 2).

    Returns float32 (28, 28) in [0, 1] on the 8-bit grid (exactly ``k / 255``), as real clients
    send 8-bit images. Raises ValueError for an unknown kind or parameter, a parameter out of
    range or one that gives back the original (a zero shift, crop or brightness change).
    """
    return variant_u8(image, kind, rng, **params).astype(np.float32) / np.float32(255)


# ---------------------------------------------------------------------------------------------
# Honest clients

BURST_SIZES = (3, 8)    # a photo burst holds this many items (inclusive), one fresh + variants


def _check_share(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")


@dataclass
class HonestConfig:
    queries: int = 500                     # items per client
    batch_sizes: tuple[int, ...] = (1, 1, 1, 2, 4, 8, 16, 32)   # drawn uniformly per request
    pace_s: float = 0.0                    # mean think time between requests (exponential)
    repeat_prob: float = 0.1               # chance an item re-sends an image already sent
    skew: float = 1.0                      # Dirichlet concentration of the class mix (0 = none)
    variant_share: float = 0.0             # chance an item is a benign variant of an image
    #                                        already sent (0: the same items as before variants)
    variant_kinds: tuple[str, ...] = VARIANT_KINDS   # kinds of variants, drawn uniformly
    burst_prob: float = 0.0                # chance a request is a photo burst

    def __post_init__(self):
        if isinstance(self.queries, bool) or not isinstance(self.queries, (int, np.integer)) \
                or self.queries < 0:
            raise ValueError(f"queries must be an integer >= 0, got {self.queries!r}")
        sizes = tuple(self.batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1
                            for b in sizes):
            raise ValueError(f"batch_sizes must be a non-empty list of integers >= 1, "
                             f"got {self.batch_sizes!r}")
        if not self.pace_s >= 0:
            raise ValueError(f"pace_s must be >= 0, got {self.pace_s!r}")
        if not self.skew >= 0:
            raise ValueError(f"skew must be >= 0, got {self.skew!r}")
        for name in ("repeat_prob", "variant_share", "burst_prob"):
            _check_share(name, getattr(self, name))
        if self.repeat_prob + self.variant_share > 1:
            raise ValueError(f"repeat_prob + variant_share must be <= 1 (they are shares of the "
                             f"same items), got {self.repeat_prob} + {self.variant_share}")
        if isinstance(self.variant_kinds, str):
            raise ValueError(f"variant_kinds must be a sequence of kinds, not the string "
                             f"{self.variant_kinds!r}")
        self.variant_kinds = tuple(self.variant_kinds)
        _check_kinds(self.variant_kinds, "variant_kinds")
        if not self.variant_kinds and (self.variant_share > 0 or self.burst_prob > 0):
            raise ValueError("variant_kinds is empty but variant_share or burst_prob is > 0")


@dataclass
class HonestStats:
    client: str
    queries: int = 0
    requests: int = 0
    correct: int = 0
    with_probs: int = 0
    repeats: int = 0
    variants: int = 0                      # items that were benign variants (bursts included)
    variant_counts: dict = field(default_factory=dict)   # kind -> items
    bursts: int = 0                        # photo-burst requests
    switched: int = 0
    watermarked: int = 0
    first_label_only_at: int | None = None  # 1-based query number
    answer_kinds: dict = field(default_factory=dict)
    class_mix: list = field(default_factory=list)
    org: int | None = None                 # organisation (run_honest with orgs > 0)
    wall_time_s: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else float("nan")

    @property
    def prob_share(self) -> float:
        return self.with_probs / self.queries if self.queries else float("nan")

    @property
    def variant_share(self) -> float:
        return self.variants / self.queries if self.queries else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "prob_share": self.prob_share,
                "variant_share": self.variant_share}


class HonestClient:
    """One benign user. ``run()`` sends ``config.queries`` items and returns :class:`HonestStats`.

    catalogue: the pool indices fresh images are drawn from (default: the whole pool). sent: the
    list of pool indices already sent, which repeats and variants draw from; pass one list to
    several clients to share it (an organisation), it is extended in place."""

    def __init__(self, oracle: Oracle, pool: data.Split, rng: np.random.Generator | int = 0,
                 config: HonestConfig | None = None, name: str = "honest",
                 sleep: Callable[[float], None] = time.sleep,
                 catalogue: Sequence[int] | None = None, sent: list[int] | None = None,
                 org: int | None = None):
        self.oracle = oracle
        self.pool = pool
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.config = config or HonestConfig()
        self.name = name
        self.sleep = sleep
        self.sent = sent if sent is not None else []
        self.org = org
        if catalogue is None:
            by_class = [np.flatnonzero(pool.y == k) for k in range(NUM_CLASSES)]
        else:
            cat = np.unique(np.asarray(catalogue, np.int64))
            if not len(cat) or cat[0] < 0 or cat[-1] >= len(pool):
                raise ValueError(f"catalogue must be a non-empty set of pool indices in "
                                 f"[0, {len(pool)})")
            by_class = [cat[pool.y[cat] == k] for k in range(NUM_CLASSES)]
        self._by_class = by_class
        if self.config.skew > 0:
            self.mix = self.rng.dirichlet(np.full(NUM_CLASSES, self.config.skew))
        else:
            self.mix = np.array([len(c) for c in by_class], float)
            self.mix /= self.mix.sum()
        if catalogue is not None:           # classes the catalogue lacks are never drawn
            have = np.array([len(c) > 0 for c in by_class], float)
            mix = self.mix * have
            self.mix = mix / mix.sum() if mix.sum() > 0 else have / have.sum()

    def _fresh(self) -> int:
        k = self.rng.choice(NUM_CLASSES, p=self.mix)
        members = self._by_class[k]
        return int(members[self.rng.integers(len(members))])

    def _variant(self, base: int, st: HonestStats) -> np.ndarray:
        kinds = self.config.variant_kinds
        kind = kinds[self.rng.integers(len(kinds))]
        st.variants += 1
        st.variant_counts[kind] = st.variant_counts.get(kind, 0) + 1
        return variant_u8(self.pool.x[base], kind, self.rng)

    def _items(self, n: int, st: HonestStats) -> tuple[np.ndarray, np.ndarray]:
        """n items: (images uint8 (n, 28, 28), pool index of each item's original)."""
        cfg, sent = self.config, self.sent
        idx, variants = [], {}
        for j in range(n):
            u = self.rng.random() if sent else 1.0
            if u < cfg.variant_share:
                idx.append(sent[self.rng.integers(len(sent))])
                variants[j] = self._variant(idx[-1], st)
            elif u < cfg.variant_share + cfg.repeat_prob:
                idx.append(sent[self.rng.integers(len(sent))])
                st.repeats += 1
            else:
                idx.append(self._fresh())
        return self._images(idx, variants)

    def _burst(self, n: int, st: HonestStats) -> tuple[np.ndarray, np.ndarray]:
        """A photo burst: a fresh image followed by n - 1 variants of it."""
        st.bursts += 1
        base = self._fresh()
        return self._images([base] * n, {j: self._variant(base, st) for j in range(1, n)})

    def _images(self, idx: list[int], variants: dict) -> tuple[np.ndarray, np.ndarray]:
        idx = np.array(idx, np.int64)
        x = self.pool.x[idx]
        if variants:
            x = x.copy()
            for j, v in variants.items():
                x[j] = v
        # originals (fresh images and repeats) join the list of images already sent
        self.sent.extend(int(i) for j, i in enumerate(idx) if j not in variants)
        return x, idx

    def run(self) -> HonestStats:
        cfg = self.config
        st = HonestStats(self.name, class_mix=np.round(self.mix, 3).tolist(), org=self.org)
        t0 = time.perf_counter()
        while st.queries < cfg.queries:
            burst = cfg.burst_prob > 0 and self.rng.random() < cfg.burst_prob
            size = (self.rng.integers(BURST_SIZES[0], BURST_SIZES[1] + 1) if burst
                    else self.rng.choice(cfg.batch_sizes))
            n = int(min(size, cfg.queries - st.queries))
            if self.oracle.remaining is not None:
                n = min(n, self.oracle.remaining)
                if n <= 0:
                    break
            x, idx = self._burst(n, st) if burst else self._items(n, st)
            ans = self.oracle(x)
            st.requests += 1
            st.correct += int((ans.labels == self.pool.y[idx]).sum())
            if ans.probs is not None and ans.kind == AnswerKind.PROBABILITIES:
                st.with_probs += n
            elif st.first_label_only_at is None:
                st.first_label_only_at = st.queries + 1
            kind = ans.kind.name.lower()
            st.answer_kinds[kind] = st.answer_kinds.get(kind, 0) + n
            st.switched += sum(m != "target" for m in ans.model)
            st.watermarked += int(np.asarray(ans.watermarked).sum())
            st.queries += n
            if cfg.pace_s > 0:
                self.sleep(float(self.rng.exponential(cfg.pace_s)))
        st.wall_time_s = time.perf_counter() - t0
        return st


CATALOGUE_SIZE = 300    # images in an organisation's catalogue


def run_honest(oracles: Sequence[Oracle], pool: data.Split, seed: int = 0,
               config: HonestConfig | None = None, names: Sequence[str] | None = None,
               vary_volume: bool = True, orgs: int = 0,
               catalogue_size: int = CATALOGUE_SIZE) -> dict:
    """Run one :class:`HonestClient` per oracle (sequentially). With ``vary_volume`` each client's
    volume is drawn log-uniformly between a fifth of and twice ``config.queries``.

    orgs > 0 splits the clients into that many organisations (client i joins organisation
    i % orgs): the keys of one organisation draw fresh images from a shared catalogue of
    ``catalogue_size`` pool images (drawn per organisation) and share the list of images
    already sent. orgs = 0: every client on its own, drawing from the whole pool."""
    config = config or HonestConfig()
    if isinstance(orgs, bool) or not isinstance(orgs, (int, np.integer)) \
            or not 0 <= orgs <= max(1, len(oracles)):
        raise ValueError(f"orgs must be an integer between 0 and the number of clients "
                         f"({len(oracles)}), got {orgs!r}")
    if orgs and not 1 <= catalogue_size <= len(pool):
        raise ValueError(f"catalogue_size must be between 1 and the pool's size ({len(pool)}), "
                         f"got {catalogue_size!r}")
    catalogues = [np.sort(np.random.default_rng([seed, j, 0x0A6E]).choice(
        len(pool), catalogue_size, replace=False)) for j in range(orgs)]
    org_sent: list[list[int]] = [[] for _ in range(orgs)]
    rng = np.random.default_rng(seed)
    clients = []
    for i, oracle in enumerate(oracles):
        cfg = config
        if vary_volume:
            q = int(np.exp(rng.uniform(np.log(max(1, config.queries / 5)),
                                       np.log(2 * config.queries))))
            cfg = HonestConfig(**{**asdict(config), "queries": max(1, q)})
        name = names[i] if names else f"honest-{i}"
        org = {} if not orgs else {"catalogue": catalogues[i % orgs],
                                   "sent": org_sent[i % orgs], "org": i % orgs}
        clients.append(HonestClient(oracle, pool, np.random.default_rng([seed, i]), cfg,
                                    name, **org).run())
    q = sum(c.queries for c in clients)
    return {
        "clients": len(clients),
        "orgs": orgs,
        "queries": q,
        "accuracy": sum(c.correct for c in clients) / q if q else float("nan"),
        "prob_share": sum(c.with_probs for c in clients) / q if q else float("nan"),
        "clients_losing_probabilities": sum(c.first_label_only_at is not None for c in clients),
        "switched_share": sum(c.switched for c in clients) / q if q else float("nan"),
        "watermarked_share": sum(c.watermarked for c in clients) / q if q else float("nan"),
        "repeat_share": sum(c.repeats for c in clients) / q if q else float("nan"),
        "variant_share": sum(c.variants for c in clients) / q if q else float("nan"),
        "per_client": [c.as_dict() for c in clients],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.honest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--queries", type=int, default=500, help="mean items per client")
    p.add_argument("--pace", type=float, default=0.0, help="mean seconds between requests")
    p.add_argument("--repeat-prob", type=float, default=0.1)
    p.add_argument("--skew", type=float, default=1.0,
                   help="Dirichlet concentration of each client's class mix (0 = pool's mix)")
    p.add_argument("--variant-share", type=float, default=0.0,
                   help="share of items that are benign variants of images already sent")
    p.add_argument("--variant-kinds", default=",".join(VARIANT_KINDS),
                   help="comma-separated kinds of variants (default: all)")
    p.add_argument("--burst-prob", type=float, default=0.0,
                   help="chance a request is a photo burst (a fresh image and variants of it)")
    p.add_argument("--orgs", type=int, default=0,
                   help="split the clients into this many organisations (0 = none)")
    p.add_argument("--catalogue", type=int, default=CATALOGUE_SIZE,
                   help="images in an organisation's catalogue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--key-prefix", default="honest", help="client i uses API key PREFIX-i")
    p.add_argument("--local", action="store_true", help="answer in process from --target")
    p.add_argument("--target", default="artifacts/target.pt")
    p.add_argument("--data", help="data directory (default: $MODELGUARD_DATA or ./data)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.variant_kinds.split(",") if k.strip())
    try:
        cfg = HonestConfig(queries=args.queries, pace_s=args.pace, repeat_prob=args.repeat_prob,
                           skew=args.skew, variant_share=args.variant_share,
                           variant_kinds=kinds, burst_prob=args.burst_prob)
        if not 0 <= args.orgs <= max(1, args.clients):
            raise ValueError(f"--orgs must be between 0 and --clients ({args.clients}), "
                             f"got {args.orgs}")
    except ValueError as exc:
        p.error(str(exc))
    pool = data.attack_pool(args.data)
    names = [f"{args.key_prefix}-{i}" for i in range(args.clients)]
    if args.local:
        from client.oracle import LocalOracle
        from common import training

        target, _ = training.load_checkpoint(args.target)
        oracles = [LocalOracle(lambda x: training.predict_proba(target, x))
                   for _ in range(args.clients)]
    else:
        from client.api import RemoteOracle

        oracles = [RemoteOracle(args.address, k) for k in names]
    out = run_honest(oracles, pool, args.seed, cfg, names, orgs=args.orgs,
                     catalogue_size=args.catalogue)
    summary = {k: v for k, v in out.items() if k != "per_client"}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
