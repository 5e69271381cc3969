"""DAWN-style watermark: selection, wrong labels, and the verifier telling a copy trained on
watermarked answers from an independent model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common import nets, training
from service.defences import PolicyContext, Watermark, build_policy, verify
from service.defences.watermark import dedupe
from tests.streams import synthetic


def ctx():
    return PolicyContext("alice", b"secret", np.random.default_rng(0))


def test_selection_rate_and_determinism():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4000, 28, 28))
    images = (grey / 255).astype(np.float32)
    wm = Watermark(b"secret", rate=0.05)
    sel, off = wm.select(images, client_id="alice")
    assert 0.04 < sel.mean() < 0.06
    assert np.all((off[sel] >= 1) & (off[sel] <= 9)) and np.all(off[~sel] == 0)
    sel2, off2 = Watermark(b"secret", rate=0.05).select(images, client_id="alice")
    assert np.array_equal(sel, sel2) and np.array_equal(off, off2)
    sel3, _ = Watermark(b"other", rate=0.05).select(images, client_id="alice")
    assert not np.array_equal(sel, sel3)
    # the wrong labels are spread over the 9 offsets
    assert len(np.unique(off[sel])) == 9
    # another key: at a flat rate the same images are marked, but with its own wrong labels
    # (equal to alice's only by the 1-in-9 chance of two independent offsets)
    sel_b, off_b = wm.select(images, client_id="bob")
    assert np.array_equal(sel_b, sel)
    same = np.mean(off_b[sel] == off[sel])
    assert same < 0.25, same
    # float noise below half a grey level does not change the selection; uint8 input works too
    sel4, off4 = wm.select(images + rng.uniform(-0.4, 0.4, images.shape).astype(np.float32)
                           / 255, client_id="alice")
    assert np.array_equal(sel, sel4) and np.array_equal(off, off4)
    sel4, _ = wm.select(grey.astype(np.uint8), client_id="alice")
    assert np.array_equal(sel, sel4)


def test_from_spec():
    assert Watermark.from_spec({"enabled": False, "rate": 0.01}, b"k") is None
    assert Watermark.from_spec({}, b"k") is None
    wm = Watermark.from_spec({"enabled": True}, b"k")
    assert wm.rate == 0.005
    assert Watermark.from_spec({"enabled": True, "rate": 0.02}, b"k").rate == 0.02
    with pytest.raises(ValueError):
        Watermark.from_spec({"enabled": True, "rate": 2.0}, b"k")
    with pytest.raises(ValueError):
        Watermark.from_spec({"enabled": True, "ratio": 0.1}, b"k")
    # the confidence band: default unbounded above; round-trips through spec()
    wm = Watermark.from_spec({"enabled": True, "min_confidence": 0.2, "max_confidence": 0.9}, b"k")
    assert (wm.min_confidence, wm.max_confidence) == (0.2, 0.9)
    assert Watermark.from_spec(wm.spec(), b"k").spec() == wm.spec()
    assert Watermark.from_spec({"enabled": True}, b"k").max_confidence == 1.0


@pytest.mark.parametrize("lo, hi, message", [
    (0.9, 0.5, r"min_confidence \(0.9\) must be below max_confidence \(0.5\)"),
    (0.5, 0.5, r"min_confidence \(0.5\) must be below max_confidence \(0.5\)"),
    (0.0, 1.5, r"max_confidence"),
    (0.0, 0.0, r"max_confidence"),
    (-0.1, 0.9, r"min_confidence"),
])
def test_bad_confidence_band_is_refused_clearly(lo, hi, message):
    with pytest.raises(ValueError, match=message):
        Watermark(b"k", 0.01, min_confidence=lo, max_confidence=hi)
    with pytest.raises(ValueError, match=message):
        Watermark.from_spec({"enabled": True, "min_confidence": lo, "max_confidence": hi}, b"k")


def test_in_band_bounds():
    wm = Watermark(b"k", 0.01, min_confidence=0.5, max_confidence=0.99)
    c = np.array([0.0, 0.4999, 0.5, 0.7, 0.98999, 0.99, 1.0])
    np.testing.assert_array_equal(wm.in_band(c), [0, 0, 1, 1, 1, 0, 0])
    assert not Watermark(b"k", 0.01).banded
    np.testing.assert_array_equal(Watermark(b"k", 0.01, min_confidence=0.5).in_band(c),
                                  [0, 0, 1, 1, 1, 1, 1])


@pytest.mark.parametrize("spec", [{"policy": "identity"}, {"policy": "label_only"},
                                  {"policy": "gaussian", "sigma": 0.1}])
def test_apply_sets_wrong_consistent_labels(spec):
    rng = np.random.default_rng(1)
    images = rng.random((2000, 28, 28)).astype(np.float32)
    probs = rng.dirichlet(np.full(10, 0.3), 2000).astype(np.float32)
    base = build_policy(spec).answer(images, probs, ctx())
    wm = Watermark(b"secret", rate=0.1)
    a = wm.apply(images, base, ctx())
    sel = a.watermarked
    assert 0.07 < sel.mean() < 0.13
    assert np.all(a.labels[sel] != base.labels[sel])
    assert np.array_equal(a.labels[~sel], base.labels[~sel])
    assert a.kind == base.kind and a.model == base.model
    if base.probs is not None:
        np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-5)
        assert np.array_equal(a.probs[~sel], base.probs[~sel])
        assert np.array_equal(a.probs[sel].argmax(1), a.labels[sel])     # consistent probs
        # a swap: same multiset of confidences
        np.testing.assert_array_equal(np.sort(a.probs[sel], 1), np.sort(base.probs[sel], 1))
    # the same images get the same watermark again (repeats cannot reveal it by disagreement)
    b = wm.apply(images, build_policy(spec).answer(images, probs, ctx()), ctx())
    assert np.array_equal(a.labels, b.labels)


def test_dedupe_counts_repeats_once():
    x, _ = synthetic(5, 0)
    xs = np.concatenate([x, x[:2], x[:1]])
    imgs, labels, dropped = dedupe(xs, np.arange(len(xs)))
    assert len(imgs) == 5 and dropped == 3 and list(labels) == [0, 1, 2, 3, 4]


def test_verify_arithmetic():
    labels = np.arange(40) % 10
    r = verify(labels, labels)
    assert r.matches == 40 and r.stolen and r.p_value < 1e-30
    r = verify((labels + 1) % 10, labels)
    assert r.matches == 0 and not r.stolen and r.p_value == 1.0
    r = verify(np.zeros(0), np.zeros(0))
    assert r.total == 0 and not r.stolen


def test_verifier_tells_stolen_from_independent():
    torch.set_num_threads(1)
    key = b"owner-secret"
    wm = Watermark(key, rate=0.05)
    pol = build_policy({"policy": "identity"})
    # the owner's model
    x_own, y_own = synthetic(2000, 1)
    owner = training.train(nets.build("mlp", hidden=64), x_own, y_own,
                           training.TrainConfig(epochs=5, progress=False, seed=1))
    # an attacker queries 1500 images through the watermarked API and trains on the answers
    x_q, _ = synthetic(1500, 2)
    images = x_q.astype(np.float32) / 255
    ans = wm.apply(images, pol.answer(images, training.predict_proba(owner, x_q), ctx()), ctx())
    assert ans.watermarked.sum() >= 50
    stolen = training.train(nets.build("mlp", hidden=256), x_q, ans.probs,
                            training.TrainConfig(epochs=60, lr=3e-3, progress=False, seed=2))
    # an independent model trained on the same kind of data (true labels, no watermark)
    x_ind, y_ind = synthetic(1500, 3)
    indep = training.train(nets.build("mlp", hidden=256), x_ind, y_ind,
                           training.TrainConfig(epochs=60, lr=3e-3, progress=False, seed=3))
    # the records: the watermarked items as the monitor logs them (image, label sent)
    rec_x, rec_y = images[ans.watermarked], ans.labels[ans.watermarked]

    def predictor(m):
        return lambda x: training.predict_proba(m, x)

    r_stolen = verify(images=rec_x, labels_sent=rec_y, predict=predictor(stolen))
    r_indep = verify(images=rec_x, labels_sent=rec_y, predict=predictor(indep))
    r_owner = verify(images=rec_x, labels_sent=rec_y, predict=predictor(owner))
    ids = ["alice"] * len(rec_y)
    r_stolen_k = verify(images=rec_x, labels_sent=rec_y, predict=predictor(stolen), key=key,
                        client_ids=ids)
    r_indep_k = verify(images=rec_x, labels_sent=rec_y, predict=predictor(indep), key=key,
                       client_ids=ids)

    assert r_stolen_k.stolen and not r_indep_k.stolen
    print(r_stolen.summary(), r_indep.summary(), r_owner.summary(), sep="\n")
    assert r_stolen.stolen and r_stolen.p_value < 1e-6, r_stolen.summary()
    assert not r_indep.stolen and r_indep.p_value > 1e-3, r_indep.summary()
    assert not r_owner.stolen, r_owner.summary()   # the owner's model never says the wrong label


def test_keyed_test_recovers_the_honest_label_and_is_sharper():
    rng = np.random.default_rng(5)
    images = (rng.integers(0, 256, (3000, 28, 28)) / 255).astype(np.float32)
    honest = rng.integers(0, 10, 3000)
    probs = np.eye(10, dtype=np.float32)[honest] * 0.9 + 0.01
    wm = Watermark(b"k", rate=0.02)
    a = wm.apply(images, build_policy({"policy": "identity"}).answer(images, probs, ctx()), ctx())
    x, sent = images[a.watermarked], a.labels[a.watermarked]
    n = len(sent)
    assert n > 30
    # a suspect that reproduces 8 of the wrong labels and otherwise says the honest label
    suspect = honest[a.watermarked].copy()
    suspect[:8] = sent[:8]
    r_plain = verify(suspect, sent)
    ids = ["alice"] * n
    r_keyed = verify(suspect, sent, images=x, key=b"k", client_ids=ids)
    assert r_keyed.disagreements == 8 and r_keyed.matches == 8
    assert r_keyed.p_value_keyed < 1e-7 < r_plain.p_value
    assert r_keyed.stolen and not r_plain.stolen
    # an honest-but-wrong suspect (departs from the honest label at random) is not accused
    wrong = (honest[a.watermarked] + rng.integers(1, 10, n)) % 10
    r = verify(wrong, sent, images=x, key=b"k", client_ids=ids)
    assert r.disagreements == n and not r.stolen and r.p_value_keyed > 1e-4
    # the key re-checks the selection: records that were not watermarked are dropped
    mixed_x = np.concatenate([x, images[~a.watermarked][:20]])
    mixed_y = np.concatenate([sent, a.labels[~a.watermarked][:20]])
    r = verify(images=mixed_x, labels_sent=mixed_y, predict=lambda z: np.zeros(len(z), int),
               key=b"k", rate=0.02, client_ids=["alice"] * len(mixed_y))
    assert r.not_selected_dropped == 20 and r.total == n


def test_verify_cli_on_records(tmp_path, capsys):
    import json

    from service.defences.__main__ import main

    torch.set_num_threads(1)
    x, y = synthetic(300, 7)
    model = training.train(nets.build("mlp", hidden=32), x, y,
                           training.TrainConfig(epochs=5, progress=False, seed=0))
    ck = tmp_path / "suspect.pt"
    training.save_checkpoint(ck, model, "mlp", {"hidden": 32}, {})
    # records whose 'sent' labels are what the model predicts: it reproduces every one
    pred = training.predict_proba(model, x[:40]).argmax(1)
    rec = tmp_path / "records.npz"
    np.savez(rec, images=x[:40].astype(np.float32) / 255, labels=pred,
             client_ids=np.array(["a"] * 20 + ["b"] * 20))
    out_json = tmp_path / "v.json"
    main(["verify", "--suspect", str(ck), "--records", str(rec), "--no-key",
          "--json", str(out_json)])
    res = json.loads(out_json.read_text())
    assert res["all"]["matches"] == 40 and res["all"]["stolen"]
    assert set(res["per_client"]) == {"a", "b"}
    assert set(res["attribution"]["attributed_keys"]) == {"a", "b"}
    out = capsys.readouterr().out
    assert "OWNERSHIP SHOWN" in out and "ATTRIBUTED" in out
    main(["verify", "--suspect", str(ck), "--records", str(rec), "--no-key", "--client", "b",
          "--json", str(out_json)])
    assert json.loads(out_json.read_text())["all"]["total"] == 20


# --------------------------------------------------------------------------------------------
# Digest scheme v2: one keyed digest per image per request, shared through the context
# --------------------------------------------------------------------------------------------

def test_selection_follows_the_documented_derivation():
    """Candidates, marks and wrong-label offsets from the documented scheme (wm3), derived
    independently: key = blake2b(secret, person 'modelguard/key2'); candidate: bytes 48-49 of the
    keyed blake2b-512 of the uint8 image (person 'modelguard/img2') < 2^16 max rate; mark digest:
    keyed blake2b-128 (person 'modelguard/wmk3') of len(client) (4 bytes big-endian) || client ||
    image; marked when its bytes 0-3 < 2^32 rate(qn) / max rate; offset 1 + (bytes 4-11 mod 9)."""
    import hashlib

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (300, 28, 28)).astype(np.uint8)
    wm = Watermark(b"secret", rate=0.2, knee=100, light_rate=0.05)
    qn = np.arange(1, 301)
    sel, off = wm.select(grey, client_id="zoë", qn=qn)
    k = hashlib.blake2b(b"secret", digest_size=64, person=b"modelguard/key2").digest()
    cid = "zoë".encode()
    for i in range(len(grey)):
        d = hashlib.blake2b(grey[i].tobytes(), key=k, digest_size=64,
                            person=b"modelguard/img2").digest()
        cand = int.from_bytes(d[48:50], "big") < round(2**16 * 0.2)
        m = hashlib.blake2b(len(cid).to_bytes(4, "big") + cid + grey[i].tobytes(), key=k,
                            digest_size=16, person=b"modelguard/wmk3").digest()
        rate = 0.05 if qn[i] <= 100 else 0.2
        marked = cand and int.from_bytes(m[0:4], "big") < 2**32 * rate / 0.2
        assert sel[i] == marked
        assert off[i] == (1 + int.from_bytes(m[4:12], "big") % 9 if marked else 0)


def test_apply_uses_the_request_digests_and_the_verifier_rederives_them():
    from service.defences import PolicyContext as Ctx

    rng = np.random.default_rng(4)
    images = (rng.integers(0, 256, (1500, 28, 28)) / 255).astype(np.float32)
    probs = rng.dirichlet(np.full(10, 0.3), 1500).astype(np.float32)
    wm = Watermark(b"secret", rate=0.05)
    c = Ctx("alice", b"secret", request_id="r")
    a = wm.apply(images, build_policy({"policy": "gaussian"}).answer(images, probs, c), c)
    sel, off = wm.select(images, client_id="alice")      # fresh digests, no context
    np.testing.assert_array_equal(a.watermarked, sel)
    base = build_policy({"policy": "gaussian"}).answer(images, probs, ctx())
    np.testing.assert_array_equal(a.labels[sel], (base.labels[sel] + off[sel]) % 10)
    # a context under another key never lends its digests to the watermark
    other = wm.apply(images, base, Ctx("alice", b"another-key"))
    np.testing.assert_array_equal(other.watermarked, sel)
    # same client, other request and batch order: the same answers
    b = wm.apply(images[::-1], build_policy({"policy": "gaussian"}).answer(
        images[::-1], probs[::-1], Ctx("alice", b"secret", request_id="x")),
        Ctx("alice", b"secret", request_id="x"))
    np.testing.assert_array_equal(b.labels[::-1], a.labels)
    # another client: its own wrong labels on the marked images
    bob = wm.apply(images, base, Ctx("bob", b"secret", request_id="y"))
    differ = np.mean(bob.labels[sel] != a.labels[sel])
    assert differ > 0.75, differ
    # the verifier, from the records alone (image, label sent, client) and the key: re-checks
    # every selection and recovers every honest label
    rec_x, rec_y = images[a.watermarked], a.labels[a.watermarked]
    ids = ["alice"] * len(rec_y)
    honest = base.labels[a.watermarked]
    r = verify(images=rec_x, labels_sent=rec_y, predict=lambda x: np.eye(10)[honest],
               key=b"secret", rate=0.05, client_ids=ids)
    assert r.not_selected_dropped == 0 and r.total == len(rec_y)
    assert r.disagreements == 0 and r.matches == 0          # the honest model is not accused
    r = verify(images=rec_x, labels_sent=rec_y, predict=lambda x: np.eye(10)[rec_y],
               key=b"secret", rate=0.05, client_ids=ids)
    assert r.matches == r.disagreements == len(rec_y) and r.stolen


def test_dedupe_keeps_first_occurrences_in_order_and_ignores_sub_grey_jitter():
    x, _ = synthetic(6, 1)
    xf = x.astype(np.float32) / 255
    jitter = xf[[4, 1]] + np.float32(0.3 / 255)
    xs = np.concatenate([xf, jitter, xf[:3]])
    imgs, labels, dropped = dedupe(xs, np.arange(len(xs)))
    assert list(labels) == [0, 1, 2, 3, 4, 5] and dropped == 5
    np.testing.assert_array_equal(imgs, xf)
    imgs, labels, dropped = dedupe(np.zeros((0, 28, 28), np.float32), np.zeros(0, int))
    assert len(imgs) == 0 and dropped == 0
