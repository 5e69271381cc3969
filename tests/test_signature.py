"""The soft-label signature (service/defences/signature.py, issue #12): labels never change, the
keyed classes are specific to the key, the test's null law is exact, a copy that learnt a key's
signature is attributed to that key alone, and verify reads the log's items after the knee."""
from __future__ import annotations

import numpy as np
import pytest

from common.types import Answer, AnswerKind
from service.defences import PolicyContext, Watermark
from service.defences.signature import NBINS, Signature, bins
from service.defences.watermark import RANK_SCORE, attribute, score_tail

KEY = b"signature-test-key"


def images(n, seed):
    """Images whose mean intensity spreads over every bin."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 28, 28)).astype(np.float32)
    return x * rng.uniform(0.1, 0.9, (n, 1, 1)).astype(np.float32)


def confident(n, seed, top=0.995):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 10, n)
    rest = rng.dirichlet(np.ones(9), n) * (1 - top)
    p = np.zeros((n, 10), np.float32)
    for i in range(n):
        p[i, [c for c in range(10) if c != lab[i]]] = rest[i]
        p[i, lab[i]] = top
    return p


def test_signing_keeps_every_label_moves_mass_to_the_keyed_class_and_waits_for_the_knee():
    sig = Signature(KEY, 0.1, knee=100)
    rng = np.random.default_rng(0)
    x = images(400, 1)
    p = rng.dirichlet(np.full(10, 0.3), 400).astype(np.float32)
    qn = 1 + np.arange(400)
    out, done = sig.sign(p, x, "alice", qn)
    assert (out.argmax(1) == p.argmax(1)).all()                    # no label ever changes
    assert not done[:100].any() and np.array_equal(out[:100], p[:100])  # not before the knee
    w = sig.classes("alice", p.argmax(1), x)
    rows = np.flatnonzero(done)
    assert 100 < len(rows) < 300                  # ambiguous answers are left alone
    expect = 0.9 * p[rows]
    expect[np.arange(len(rows)), w[rows]] += 0.1
    np.testing.assert_allclose(out[rows], expect, atol=1e-6)
    margin = p[np.arange(400), p.argmax(1)] - p[np.arange(400), w]
    left = np.flatnonzero(~done[100:]) + 100
    assert (margin[left] <= 0.1 / 0.9 + 1e-6).all()
    np.testing.assert_array_equal(out[left], p[left])


def test_keyed_classes_differ_per_key_and_secret_and_never_equal_the_label():
    a, b = Signature(KEY, 0.1), Signature(KEY, 0.05)
    t = a.table("alice")
    assert t.shape == (10, NBINS)
    assert not (t == np.arange(10)[:, None]).any()
    assert np.array_equal(t, b.table("alice"))          # the strength does not enter the table
    assert (t != a.table("bob")).mean() > 0.7           # 8/9 expected to differ
    assert (t != Signature(b"another secret", 0.1).table("alice")).mean() > 0.7
    allt = np.stack([a.table(f"k{i}") for i in range(300)])
    counts = np.bincount(((allt - np.arange(10)[None, :, None]) % 10).ravel(), minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()   # uniform offsets


def test_bins_do_not_move_under_shifts_and_flips():
    x = images(200, 3)
    b = bins(x)
    assert len(np.unique(b)) == NBINS
    assert np.array_equal(b, bins(np.roll(x, (2, -1), (1, 2))))
    assert np.array_equal(b, bins(x[:, :, ::-1]))


def test_unrelated_suspects_give_uniform_ranks_and_p_values():
    """Null: a suspect independent of the key's table (here random probabilities, and the target
    itself with its ties) ranks W uniformly, so p-values are uniform: no key is accused."""
    sig = Signature(KEY, 0.1)
    x = images(3000, 4)
    tp = confident(3000, 5)
    rng = np.random.default_rng(6)
    ranks, ps = [], []
    for i in range(40):
        sp = rng.dirichlet(np.ones(10), 3000)
        r = sig.cell_scores(sp, tp, x, [f"key{i}"] * 3000)[f"key{i}"]
        ranks.append(r)
        ps.append(score_tail(RANK_SCORE, int(np.sum(8 - (r - 1))), len(r)))
    r = np.concatenate(ranks)
    assert len(r) > 40 * 60                                   # ~80 testable cells per key
    assert abs(r.mean() - 5.0) < 0.15                         # uniform on 1..9: mean 5
    assert np.abs(np.bincount(r, minlength=10)[1:] / len(r) - 1 / 9).max() < 0.02
    assert min(ps) > 1e-3 and 0.3 < np.mean(ps) < 0.7
    # the target as its own suspect: every difference is 0, ties broken by class index
    r_t = sig.cell_scores(tp.astype(np.float64), tp, x, ["t"] * 3000)["t"]
    assert 4.3 < r_t.mean() < 5.7


def test_a_copy_that_learnt_one_keys_signature_is_attributed_to_that_key_only():
    """alice's and bob's logged items (different images, the same kind of traffic); the suspect
    learnt a weak, noisy trace of alice's signed answers: alice is attributed, bob is not, and
    the evidence is the signature (no label mark records at all)."""
    sig = Signature(KEY, 0.1)
    xa, xb = images(2500, 7), images(2500, 8)
    ta, tb = confident(2500, 9), confident(2500, 10)
    lookup = {x.tobytes(): p for x, p in zip(np.concatenate([xa, xb]), np.concatenate([ta, tb]))}
    rng = np.random.default_rng(11)

    def suspect(x):
        tp = np.stack([lookup[i.tobytes()] for i in x]).astype(np.float64)
        learnt, _ = sig.sign(tp, x, "alice", np.full(len(x), 1))
        noisy = 0.3 * learnt + 0.7 * tp + rng.dirichlet(np.ones(10), len(x)) * 0.02
        return noisy / noisy.sum(1, keepdims=True)

    srec = (np.concatenate([xa, xb]), np.concatenate([ta, tb]), ["alice"] * 2500 + ["bob"] * 2500)
    empty = np.zeros((0, 28, 28), np.float32)
    att = attribute(empty, np.zeros(0, np.int64), [], predict=suspect, key=KEY, alpha=1e-6,
                    signature=sig, signature_records=srec)
    rows = {r.name: r for r in att.rows}
    assert att.test == "keyed+signature"           # no label-mark records: no rank sum
    assert rows["alice"].attributed and rows["alice"].p_signature < 1e-12
    assert rows["alice"].sig_mean_rank < 2.0 and rows["alice"].records == 0
    assert not rows["bob"].attributed and rows["bob"].p_adjusted > 1e-3
    assert rows["bob"].sig_cells >= 40
    assert "sig cells" in att.table()


def test_the_watermark_signs_after_its_knee_and_marks_still_swap_labels():
    wm = Watermark(KEY, 0.5, knee=50, signature=0.1)
    x = images(120, 12)
    p = confident(120, 13)
    ctx = PolicyContext("carol", KEY, request_id="r")
    a = wm.apply(x, Answer(p.argmax(1), p, AnswerKind.PROBABILITIES, ["t"] * 120, None), ctx, p)
    changed = np.abs(a.probs - p).sum(1) > 1e-6
    assert not changed[:50].any() and changed[50:].all()
    marked = a.watermarked
    assert marked[50:].any() and not marked[:50].any()
    keep = ~marked
    assert (a.labels[keep] == p.argmax(1)[keep]).all()
    assert (a.labels[marked] != p.argmax(1)[marked]).all()
    assert np.allclose(a.probs[50:][keep[50:]].max(1), 0.9 * p[50:][keep[50:]].max(1))
    with pytest.raises(ValueError, match="signature"):
        Watermark(KEY, 0.03, signature=0.5)
    with pytest.raises(ValueError, match="signature"):
        Watermark.from_spec({"enabled": True, "signature": -0.1}, KEY)


def test_verify_reads_the_logs_items_after_the_knee_with_probabilities(tmp_path, monkeypatch,
                                                                       capsys):
    """db_signature_records: items after each key's knee, answered with probabilities, inputs
    kept; the per-key cap holds; verify --client tests a key that holds signature records but
    no label marks (instead of refusing it)."""
    from common.types import Level
    from monitor import Monitor
    from monitor.config import load_config
    from service.dataplane import DataPlane
    from service.defences import build_policy
    from service.defences.__main__ import db_signature_records

    class Owner:
        meta: dict = {}

        def predict_proba(self, x):
            return confident(len(x), int(x.sum() * 1000) % 2 ** 31).astype(np.float32)

    spec = {"enabled": True, "rate": 1e-6, "knee": 30, "signature": 0.1}
    cfg = load_config(None).model_copy(update={
        "policies": {lvl: {"policy": "identity"} for lvl in Level if lvl != Level.BLOCK},
        "watermark": spec})
    db = tmp_path / "m.db"
    pols = {lvl: build_policy({"policy": "identity"}) for lvl in Level if lvl != Level.BLOCK}
    plane = DataPlane(Owner(), Monitor(cfg, db), pols, Watermark.from_spec(spec, KEY), KEY, 256)
    x = images(100, 14)
    for client, part in (("a", x[:80]), ("b", x[80:])):
        for i in range(0, len(part), 20):
            plane.predict(client, None, part[i:i + 20])
    plane.close()
    sx, sp, sc = db_signature_records(db, 30)
    assert sc.count("a") == 50 and "b" not in sc        # b sent 20 queries: all before the knee
    np.testing.assert_allclose(sx, x[30:80], atol=1e-3)
    assert sp.shape == (50, 10) and np.allclose(sp.sum(1), 1, atol=1e-4)
    assert db_signature_records(db, 30, max_per_key=7)[2] == ["a"] * 7

    import torch

    from common import nets, training
    from service.defences.__main__ import main

    torch.manual_seed(0)
    ck = tmp_path / "suspect.pt"
    training.save_checkpoint(ck, nets.build("mlp", hidden=16), "mlp", {"hidden": 16}, {})
    monkeypatch.setenv("MODELGUARD_SECRET", KEY.decode())
    main(["verify", "--suspect", str(ck), "--db", str(db), "--client", "a"])
    out = capsys.readouterr().out
    assert "0 watermark records" in out and "sig cells" in out, out
    with pytest.raises(SystemExit, match="no watermark records for client 'b'"):
        main(["verify", "--suspect", str(ck), "--db", str(db), "--client", "b"])
