"""Benign variants in honest traffic: re-encoded, resized, shifted, cropped, re-lit and noisy
copies of images already sent, photo bursts, organisations sharing a catalogue, and the
configuration's checks."""
from __future__ import annotations

import json

import numpy as np
import pytest

from client.honest import (VARIANT_KINDS, HonestClient, HonestConfig, benign_variant,
                           main, run_honest)
from client.oracle import LocalOracle
from common import data, training
from common.types import NUM_CLASSES

N = 200                                   # pool images the variant tests run on
# Max L2 distance (images in [0, 1], 784 pixels) to the original over these images. Measured on
# the first 500 pool images (mean / max): jpeg 0.66 / 1.65, resize 2.08 / 3.81, brightness
# 1.38 / 2.74 (at most 25 grey levels on 784 pixels: 2.745), contrast 1.00 / 2.31, gamma
# 0.68 / 1.64, noise 0.13 / 0.15 (at most 2 grey levels: 0.22); shift 6.3 / 12.7 and crop
# 5.0 / 10.5 move the whole item, so they are far in L2 (two same-class pool images: 8.5 on
# average, a random image ~16) and are checked by undoing them instead.
MAX_L2 = {"jpeg": 2.5, "resize": 5.0, "brightness": 3.0, "contrast": 3.0, "gamma": 2.5,
          "noise": 0.25, "shift": 15.0, "crop": 15.0}
MEAN_L2 = {k: 8.0 if k in ("shift", "crop") else 3.0 for k in VARIANT_KINDS}
# Share of the small target's labels kept. Measured (3 seeds): >= 0.94 for all but shift
# (0.73-0.79) and crop (0.80-0.83), which this MLP target is sensitive to; a random image keeps
# 0.09. The shipped target: shift 0.70, crop 0.81, the others >= 0.96.
MIN_KEPT = {k: 0.6 if k in ("shift", "crop") else 0.85 for k in VARIANT_KINDS}
SAFE_KINDS = ("jpeg", "brightness", "contrast", "gamma", "noise")  # nearest pool image = original


@pytest.fixture(scope="module")
def target(small_target):
    return training.load_checkpoint(small_target[0])[0]


@pytest.fixture(scope="module")
def pool():
    return data.attack_pool()


@pytest.fixture(scope="module")
def images(pool):
    return pool.x[:N].astype(np.float32) / 255


def variants(images, kind, seed=0, **params):
    rng = np.random.default_rng(seed)
    return np.stack([benign_variant(x, kind, rng, **params) for x in images])


@pytest.fixture(scope="module")
def by_kind(images):
    return {k: variants(images, k) for k in VARIANT_KINDS}


def l2(a, b):
    return np.sqrt(((np.asarray(a, np.float64) - b) ** 2).reshape(len(a), -1).sum(1))


def centroid(x):
    """Centre of mass (row, column) of each image."""
    w = x.reshape(len(x), -1).sum(1)
    r = np.arange(x.shape[1])
    return np.stack([(x.sum(2) * r).sum(1) / w, (x.sum(1) * r).sum(1) / w], 1)


class Recorder(LocalOracle):
    def __init__(self, proba, **kw):
        super().__init__(proba, **kw)
        self.batches = []

    def _query(self, images):
        self.batches.append(images.copy())
        return super()._query(images)


def uniform_oracle(**kw):
    return Recorder(lambda x: np.full((len(x), NUM_CLASSES), 1 / NUM_CLASSES), **kw)


class PoolIndex:
    """Maps sent images back to the pool: exact copies, and nearest pool image in L2."""

    def __init__(self, pool):
        self.flat = pool.x.reshape(len(pool), -1).astype(np.float32) / 255
        self.sq = (self.flat ** 2).sum(1)
        self.exact = {r.tobytes(): i for i, r in enumerate(pool.x.reshape(len(pool), -1))}

    def exact_index(self, sent):
        """Pool index of each sent image, -1 where it is no pool image."""
        return np.array([self.exact.get(s.tobytes(), -1) for s in sent.reshape(len(sent), -1)])

    def nearest(self, sent):
        v = sent.reshape(len(sent), -1).astype(np.float32) / 255
        return ((v ** 2).sum(1)[:, None] + self.sq[None] - 2 * v @ self.flat.T).argmin(1)


# --- benign_variant ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", VARIANT_KINDS)
def test_variant_changes_the_image_on_the_8_bit_grid_and_stays_close(kind, images, by_kind):
    v = by_kind[kind]
    assert v.dtype == np.float32 and v.shape == images.shape
    assert v.min() >= 0 and v.max() <= 1
    levels = np.rint(v * 255)
    assert np.array_equal(levels.astype(np.float32) / np.float32(255), v)   # exactly k / 255
    d = l2(v, images)
    assert (d > 0).all()                                                      # every one changed
    assert d.max() < MAX_L2[kind] and d.mean() < MEAN_L2[kind]
    # a float image and its uint8 form give the same variant
    u8 = np.rint(images[:5] * 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    assert np.array_equal(np.stack([benign_variant(x, kind, rng) for x in u8]), v[:5])


def test_variants_keep_the_targets_label(target, images, by_kind):
    base = training.predict_proba(target, images).argmax(1)
    kept = {k: np.mean(training.predict_proba(target, v).argmax(1) == base)
            for k, v in by_kind.items()}
    assert all(kept[k] >= MIN_KEPT[k] for k in VARIANT_KINDS), kept
    # the bound can fail: random images of the same size keep about one label in ten
    noise = np.random.default_rng(0).random(images.shape).astype(np.float32)
    assert np.mean(training.predict_proba(target, noise).argmax(1) == base) < min(MIN_KEPT.values())


def test_variants_are_drawn_from_rng_and_honour_parameters(images):
    x = images[:50]
    assert np.array_equal(variants(x, "jpeg", 3), variants(x, "jpeg", 3))
    for kind in VARIANT_KINDS:                      # the parameters are drawn, not fixed
        assert not np.array_equal(variants(x, kind, 1), variants(x, kind, 2)), kind
    # JPEG quality and resize size matter: stronger settings land farther away
    assert l2(variants(x, "jpeg", quality=50), x).mean() > \
        1.5 * l2(variants(x, "jpeg", quality=90), x).mean()
    assert l2(variants(x, "resize", size=20), x).mean() > \
        l2(variants(x, "resize", size=26), x).mean()
    # re-lighting goes the asked way
    assert (variants(x, "brightness", delta=10) >= x).all()
    assert (variants(x, "brightness", delta=-10) <= x).all()
    assert (variants(x, "gamma", gamma=1.25) <= x).all()
    assert (variants(x, "gamma", gamma=0.8) >= x).all()
    std = x.reshape(len(x), -1).std(1)
    assert (variants(x, "contrast", factor=1.2).reshape(len(x), -1).std(1) > std).all()
    assert (variants(x, "contrast", factor=0.8).reshape(len(x), -1).std(1) < std).all()
    noisy = variants(x, "noise", amplitude=2)
    assert np.abs(np.rint((noisy - x) * 255)).max() == 2


def test_shift_and_crop_move_the_item(images):
    # with the outer 3 pixels blanked, a shift moves the whole item
    inner = np.zeros_like(images[:30])
    inner[:, 3:-3, 3:-3] = images[:30, 3:-3, 3:-3]
    moved = variants(inner, "shift", dx=2, dy=-1)
    assert np.allclose(centroid(moved) - centroid(inner), [-1, 2], atol=1e-3)
    back = variants(moved, "shift", dx=-2, dy=1)
    assert np.array_equal(back, inner)
    # a drawn shift is 1-2 pixels: shifting back by the right amount restores the interior
    for x, v in zip(images[:30], variants(images[:30], "shift")):
        assert any(np.array_equal(np.roll(v, (-dy, -dx), (0, 1))[2:-2, 2:-2], x[2:-2, 2:-2])
                   for dx in range(-2, 3) for dy in range(-2, 3) if dx or dy)
    # cropping a border enlarges the rest, so the item moves away from that border
    c = centroid(images)
    assert (centroid(variants(images, "crop", left=3))[:, 1] < c[:, 1]).mean() > 0.9
    assert (centroid(variants(images, "crop", right=3))[:, 1] > c[:, 1]).mean() > 0.9
    assert (centroid(variants(images, "crop", top=3))[:, 0] < c[:, 0]).mean() > 0.9


@pytest.mark.parametrize("kind, params, match", [
    ("blur", {}, r"'blur'.*'jpeg'"),
    ("jpeg", {"size": 20}, r"'size'.*'jpeg'"),
    ("jpeg", {"quality": 0}, "quality"),
    ("resize", {"size": 28}, "size"),
    ("resize", {"resample": "nearest"}, "resample"),
    ("shift", {"dx": 0, "dy": 0}, "original"),
    ("crop", {"left": 14}, "left"),
    ("brightness", {"delta": 0}, "original"),
    ("gamma", {"gamma": 1.0}, "gamma"),
    ("contrast", {"factor": -1.0}, "factor"),
    ("noise", {"amplitude": 0}, "amplitude"),
])
def test_bad_variant_request_raises(kind, params, match, images):
    with pytest.raises(ValueError, match=match):
        benign_variant(images[0], kind, np.random.default_rng(0), **params)


@pytest.mark.parametrize("image, match", [
    (np.zeros((28, 27), np.float32), "shape"),
    (np.full((28, 28), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((28, 28), np.nan, np.float32), "finite"),
    (np.zeros((28, 28), np.int64), "dtype"),
])
def test_bad_image_raises(image, match):
    with pytest.raises(ValueError, match=match):
        benign_variant(image, "noise", np.random.default_rng(0))


# --- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    ({"variant_share": 1.5}, "variant_share"),
    ({"variant_share": -0.1}, "variant_share"),
    ({"burst_prob": 2}, "burst_prob"),
    ({"repeat_prob": float("nan")}, "repeat_prob"),
    ({"repeat_prob": 0.6, "variant_share": 0.6}, r"repeat_prob \+ variant_share"),
    ({"variant_kinds": ("jpeg", "blur", "sepia")}, r"\['blur', 'sepia'\]"),
    ({"variant_kinds": "jpeg"}, "variant_kinds"),
    ({"variant_kinds": (), "variant_share": 0.1}, "empty"),
    ({"queries": -1}, "queries"),
    ({"batch_sizes": (1, 0)}, "batch_sizes"),
    ({"pace_s": -1.0}, "pace_s"),
])
def test_bad_config_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        HonestConfig(**kw)


def test_bad_orgs_raise(pool):
    oracles = [uniform_oracle() for _ in range(2)]
    for kw, match in [({"orgs": -1}, "orgs"), ({"orgs": 3}, "orgs"),
                      ({"orgs": 1, "catalogue_size": 0}, "catalogue_size")]:
        with pytest.raises(ValueError, match=match):
            run_honest(oracles, pool, config=HonestConfig(queries=10), **kw)
    assert all(o.queries_used == 0 for o in oracles)


# --- honest clients ---------------------------------------------------------------------------

def pre_variant_traffic(pool, seed, cfg, budget):
    """The honest client as it was before variants (repeats and fresh images only): the
    reference for 'variant_share 0 sends the very same items', which measurements rely on."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(pool.y == k) for k in range(NUM_CLASSES)]
    mix = rng.dirichlet(np.full(NUM_CLASSES, cfg.skew))
    sent, batches, sleeps, done = [], [], [], 0
    while done < cfg.queries:
        n = int(min(rng.choice(cfg.batch_sizes), cfg.queries - done, budget - done))
        if n <= 0:
            break
        idx = []
        for _ in range(n):
            if sent and rng.random() < cfg.repeat_prob:
                idx.append(sent[rng.integers(len(sent))])
            else:
                members = by_class[rng.choice(NUM_CLASSES, p=mix)]
                idx.append(int(members[rng.integers(len(members))]))
        batches.append(pool.x[idx])
        done += n
        sent.extend(idx)
        sleeps.append(float(rng.exponential(cfg.pace_s)))
    return batches, sleeps


@pytest.mark.parametrize("seed", [0, 7])
def test_variant_share_zero_sends_the_pre_variant_items(pool, seed):
    cfg = HonestConfig(queries=600, repeat_prob=0.25, skew=0.5, pace_s=0.3,
                       variant_kinds=("jpeg",))
    want, want_sleeps = pre_variant_traffic(pool, seed, cfg, budget=550)
    oracle, sleeps = uniform_oracle(budget=550), []
    st = HonestClient(oracle, pool, seed, cfg, sleep=sleeps.append).run()
    assert len(oracle.batches) == len(want) and sleeps == want_sleeps
    assert all(a.dtype == np.uint8 and np.array_equal(a, b) for a, b in zip(oracle.batches, want))
    assert st.variants == st.bursts == 0 and st.variant_counts == {}
    # variants change the traffic (so the comparison above can fail)
    other = uniform_oracle(budget=550)
    HonestClient(other, pool, seed, HonestConfig(**{**vars(cfg), "variant_share": 0.2}),
                 sleep=lambda s: None).run()
    assert not all(np.array_equal(a, b) for a, b in zip(other.batches, want))


def test_variant_share_half_sends_variants_of_earlier_items(pool, target):
    idx = PoolIndex(pool)
    oracle = Recorder(lambda x: training.predict_proba(target, x))
    cfg = HonestConfig(queries=800, variant_share=0.5, repeat_prob=0.1, variant_kinds=SAFE_KINDS)
    st = HonestClient(oracle, pool, 3, cfg).run()
    sent = np.concatenate(oracle.batches)
    assert sent.dtype == np.uint8 and st.queries == len(sent) == 800
    assert 0.42 < st.variant_share < 0.58 and 40 < st.repeats < 120
    assert sum(st.variant_counts.values()) == st.variants
    assert set(st.variant_counts) == set(SAFE_KINDS)
    # the variants are exactly the items that are no pool image; each is a variant of an
    # original this client sent in an earlier request
    exact = idx.exact_index(sent)
    is_variant = exact < 0
    assert is_variant.sum() == st.variants
    base = np.where(is_variant, idx.nearest(sent), exact)
    starts = np.cumsum([0] + [len(b) for b in oracle.batches])
    for r, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        earlier = set(exact[:a][exact[:a] >= 0])
        assert all(int(i) in earlier for i in base[a:b][is_variant[a:b]]), r
    assert (l2(sent[is_variant] / 255, pool.x[base[is_variant]] / 255) < 3.0).all()
    # accuracy is counted against the original's true label
    labels = training.predict_proba(target, sent).argmax(1)
    assert st.correct == int((labels == pool.y[base]).sum())


def test_all_kinds_are_drawn(pool):
    st = HonestClient(uniform_oracle(), pool, 5,
                      HonestConfig(queries=600, variant_share=0.4)).run()
    assert set(st.variant_counts) == set(VARIANT_KINDS)
    assert sum(st.variant_counts.values()) == st.variants
    assert min(st.variant_counts.values()) > st.variants / len(VARIANT_KINDS) / 3


def test_photo_bursts(pool):
    idx = PoolIndex(pool)
    oracle = uniform_oracle()
    cfg = HonestConfig(queries=300, burst_prob=1.0, variant_kinds=("jpeg", "noise"))
    st = HonestClient(oracle, pool, 2, cfg).run()
    assert st.bursts == st.requests == len(oracle.batches)
    assert all(3 <= len(b) <= 8 for b in oracle.batches[:-1])
    for b in oracle.batches:               # one fresh pool image, then variants of it
        first = idx.exact_index(b[:1])[0]
        assert first >= 0 and (idx.exact_index(b[1:]) < 0).all()
        assert (idx.nearest(b[1:]) == first).all()
    assert st.variants == 300 - st.requests
    # with a smaller chance, about that share of the requests are bursts
    st = HonestClient(uniform_oracle(), pool, 2,
                      HonestConfig(queries=2000, burst_prob=0.25)).run()
    assert 0.15 < st.bursts / st.requests < 0.35


def _bases(batches, idx):
    """Pool indices of the originals behind a key's items (variants: nearest pool image)."""
    sent = np.concatenate(batches)
    exact = idx.exact_index(sent)
    return set(np.where(exact < 0, idx.nearest(sent), exact).tolist())


def _variant_borrowed(batches, idx):
    """Variants (items that are no pool image) of an image this key had not sent before."""
    own, n = set(), 0
    for b in batches:
        exact, near = idx.exact_index(b), idx.nearest(b)
        n += sum(1 for e, i in zip(exact, near) if e < 0 and int(i) not in own)
        own.update(int(e) for e in exact if e >= 0)
    return n


def test_org_keys_resend_each_others_items(pool):
    idx = PoolIndex(pool)
    cfg = HonestConfig(queries=150, variant_share=0.3, repeat_prob=0.2,
                       variant_kinds=("jpeg", "noise"))

    def run(orgs):
        oracles = [uniform_oracle() for _ in range(4)]
        out = run_honest(oracles, pool, seed=1, config=cfg, vary_volume=False, orgs=orgs,
                         catalogue_size=40)
        return out, [o.batches for o in oracles]

    out, batches = run(2)
    per = out["per_client"]
    assert out["orgs"] == 2 and [p["org"] for p in per] == [0, 1, 0, 1]
    assert out["variant_share"] == pytest.approx(sum(p["variants"] for p in per) / 600)
    assert 0.2 < out["variant_share"] < 0.4
    bases = [_bases(b, idx) for b in batches]
    # the keys of an organisation draw from one catalogue of 40 images
    for org in (0, 1):
        assert len(bases[org] | bases[org + 2]) <= 40
    assert len(bases[0] | bases[1]) > 40                 # two organisations, two catalogues
    # the second key of each organisation sends variants of the first key's images: the
    # variants of images it had not sent itself come from the shared list
    v_borrowed = [_variant_borrowed(b, idx) for b in batches]
    assert v_borrowed[0] == v_borrowed[1] == 0           # first keys: only their own images
    assert v_borrowed[2] > 0 and v_borrowed[3] > 0

    out0, batches0 = run(0)                              # no organisations: nothing borrowed
    assert out0["orgs"] == 0 and all(p["org"] is None for p in out0["per_client"])
    assert all(_variant_borrowed(b, idx) == 0 for b in batches0)
    assert len(_bases(batches0[0], idx) | _bases(batches0[1], idx)) > 100



def test_cli_flags(small_target, tmp_path, capsys):
    out = tmp_path / "honest.json"
    assert main(["--local", "--target", str(small_target[0]), "--clients", "3",
                 "--queries", "60", "--variant-share", "0.3", "--variant-kinds", "jpeg,noise",
                 "--burst-prob", "0.2", "--orgs", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["orgs"] == 1 and {p["org"] for p in res["per_client"]} == {0}
    assert set().union(*(p["variant_counts"] for p in res["per_client"])) == {"jpeg", "noise"}
    assert res["variant_share"] > 0 and sum(p["bursts"] for p in res["per_client"]) > 0
    assert json.loads(capsys.readouterr().out)["variant_share"] == res["variant_share"]
    with pytest.raises(SystemExit):
        main(["--local", "--variant-kinds", "jpeg,blur"])
    assert "'blur'" in capsys.readouterr().err
