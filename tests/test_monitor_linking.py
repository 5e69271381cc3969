"""Cross-client linking: attack-like pairs, groups, group escalation, restart and replay."""
from __future__ import annotations

import json

import numpy as np
import pytest

from client.honest import VARIANT_KINDS, benign_variant
from common import data
from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.config import ConfigError, LinkingConfig, config_from_dict
from monitor.linking import Linker, attack_like
from monitor.replay import replay_linked

CFG = LinkingConfig(rules=[{"pairs": 20, "level": "label_only"}])


@pytest.fixture(scope="module")
def pool():
    try:
        p = data.attack_pool()
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    return p.x.reshape(len(p.x), -1).astype(np.float32) / 255.0


def _u8(x):
    return np.clip(np.rint(np.asarray(x) * 255), 0, 255).astype(np.uint8).reshape(len(x), -1)


def _step(x, lam, rng):
    """A sign step like JBDA's (random signs stand in for the surrogate's gradient signs)."""
    return np.clip(x + lam * rng.choice([-1.0, 1.0], x.shape), 0, 1).astype(np.float32)


def test_sign_steps_are_attack_like_and_benign_variants_are_not(pool):
    rng = np.random.default_rng(0)
    x = pool[:300]
    for lam in (0.1, 0.05):
        mask = attack_like(_u8(x), _u8(_step(x, lam, rng)), CFG)[0]
        assert mask.mean() > 0.95, lam
    for kind in VARIANT_KINDS:
        v = np.stack([benign_variant(im.reshape(28, 28), kind, rng).reshape(-1) for im in x])
        mask, l2, _, _ = attack_like(_u8(x), _u8(v), CFG)
        assert not mask.any(), (kind, np.flatnonzero(mask)[:5])
    # two different photos of look-alike items are not a perturbation either
    near = []
    for i in range(300):
        d = np.linalg.norm(pool[:3000] - x[i], axis=1)
        d[d < 0.05] = np.inf
        j = int(d.argmin())
        if d[j] <= CFG.radius:
            near.append((i, j))
    assert len(near) >= 20
    a = np.stack([x[i] for i, _ in near])
    b = np.stack([pool[j] for _, j in near])
    assert not attack_like(_u8(a), _u8(b), CFG)[0].any()


def test_split_attack_is_linked_and_honest_keys_are_not(pool):
    rng = np.random.default_rng(1)
    lk = Linker(CFG)
    # 20 honest keys share one catalogue: exact repeats across keys and benign re-encodings
    cat = rng.choice(5000, 400, replace=False)
    for r in range(6):
        for k in range(20):
            idx = rng.choice(cat, 20)
            x = pool[idx].copy()
            for j in np.flatnonzero(rng.random(20) < 0.5):
                x[j] = benign_variant(x[j].reshape(28, 28), VARIANT_KINDS[rng.integers(8)],
                                      rng).reshape(-1)
            lk.step(f"honest-{k}", r * 20, x, None, float(r), 0, [])
    # a JBDA-like attacker over 10 keys, round-robin: seeds from the same catalogue, then steps
    # of earlier queries of other keys
    sent = pool[rng.choice(cat, 50)]
    qn = {k: 0 for k in range(10)}
    for r in range(40):
        k = r % 10
        parents = sent[rng.integers(0, len(sent), 10)]
        x = _step(parents, 0.1, rng)
        lk.step(f"sybil-{k}", qn[k], x, None, 10.0 + r, 0, [])
        qn[k] += 10
        sent = np.concatenate([sent, x])
    groups = lk.groups.all()
    members = set().union(*(g.members for g in groups)) if groups else set()
    assert {f"sybil-{k}" for k in range(10)} <= members
    assert not any(m.startswith("honest") for m in members)
    assert len([g for g in groups if g.members & {"sybil-0"}]) == 1
    g = lk.group_of("sybil-0")
    assert g.members == {f"sybil-{k}" for k in range(10)}
    assert g.pairs >= 20 and lk.floor("sybil-3") == Level.LABEL_ONLY
    assert all(lk.floor(f"honest-{k}") == Level.NORMAL for k in range(20))


def test_original_sent_after_its_perturbed_copy_does_not_make_a_perturber(pool):
    rng = np.random.default_rng(2)
    lk = Linker(CFG)
    x = pool[100:160]
    out = lk.step("attacker", 0, _step(x, 0.1, rng), None, 0.0, 0, [])
    assert out.pairs == []
    out = lk.step("honest", 0, x, None, 1.0, 0, [])
    assert len(out.pairs) > 50          # found, but the attacker is the perturber
    assert {p.client for p in out.pairs} == {"attacker"}
    assert lk.group_of("honest") is None and lk.group_of("attacker") is not None


def test_index_cost_and_memory_are_bounded_by_the_horizon(pool):
    rng = np.random.default_rng(3)
    cfg = LinkingConfig(horizon=2000, rules=[])
    lk = Linker(cfg)
    sizes, cands = [], []
    for r in range(30):
        x = pool[rng.integers(0, 5000, 200)]
        lk.step(f"k{r % 7}", (r // 7) * 200, x, None, float(r), 0, [])
        sizes.append(lk.index.nbytes())
        slots = lk.index.slots(lk.index.enc[:10])
        cands.append(len(lk.index.candidates(slots, kid=-1)[0]) / 10)
    assert sizes[-1] == sizes[10]        # full at the horizon, flat after
    assert max(cands) <= cfg.tables * cfg.bucket
    assert lk.index.n == 6000 and len(lk.index.res) == 2000


def _mon_cfg(**linking):
    d = load_config().model_dump(mode="python")
    d["policies"] = {k.name.lower(): v for k, v in d["policies"].items()}
    d["linking"].update(linking)
    return config_from_dict(d)


def _send(mon, key, x):
    p = np.full((len(x), 10), 0.01, np.float32)
    p[:, 0] = 0.91
    lvl = mon.level(key)
    a = Answer(np.zeros(len(x), np.int64), p, AnswerKind.PROBABILITIES)
    return mon.observe(key, f"{key}-{mon.level(key)}-{np.random.random()}", x, p, a, lvl)


@pytest.mark.parametrize("mode", ["sync", "process"])
def test_monitor_escalates_the_group_restarts_and_replays_it(pool, tmp_path, mode):
    """Also with the monitor in its own process (mode "process"): the group's level reaches
    every member, and a new key's probe (its images sent to the child) raises it."""
    rng = np.random.default_rng(4)
    db = tmp_path / "m.db"
    if mode == "process":
        from monitor.process import MonitorProcess
        d = _mon_cfg(rules=[{"pairs": 20, "level": "label_only"}]).model_dump(mode="python")
        d["policies"] = {k.name.lower(): v for k, v in d["policies"].items()}
        d["execution"]["mode"] = "process"
        mon = MonitorProcess(config_from_dict(d), db, clock=FakeClock())
    else:
        mon = Monitor(_mon_cfg(rules=[{"pairs": 20, "level": "label_only"}]), db,
                      clock=FakeClock())
    sent = pool[:30]
    _send(mon, "seed", sent)
    for r in range(12):                  # 4 keys, 10 queries each turn: below every window
        k = f"s{r % 4}"
        x = _step(sent[rng.integers(0, len(sent), 10)], 0.1, rng)
        _send(mon, k, x)
        sent = np.concatenate([sent, x])
    mon.flush()    # process: another key's request raised these; let it be acknowledged
    for k in range(4):
        assert mon.level(f"s{k}") == Level.LABEL_ONLY
    assert mon.level("seed") == Level.NORMAL        # its images were perturbed, it did not
    # a key that joins the escalated group starts at its level: its first request is answered
    # at it (the probe before the answer), and it is a member afterwards
    late = _step(sent[-20:], 0.1, rng)
    assert mon.level("late") == Level.NORMAL
    assert mon.level("late", late) == Level.LABEL_ONLY
    honest_copy = sent[:20]                         # natural images the seed key sent: no
    assert mon.level("late", honest_copy) == Level.NORMAL   # perturbation, no raise
    _send(mon, "late", late)
    assert mon.level("late") == Level.LABEL_ONLY
    mon.close()

    with QueryLog(db) as q:
        pairs = q.pairs()
        trs = [(t["client"], t["qn"], t["to_level"], t["rule"]) for t in q.transitions()]
        assert any(t[3].startswith("group G") for t in trs)
        # replay in log order reproduces the pairs and the transitions exactly
        _, lk, rtrs, rpairs = replay_linked(_mon_cfg(rules=[{"pairs": 20,
                                                             "level": "label_only"}]), q)
    assert [(p["client"], p["qn"], p["other"], p["other_qn"]) for p in pairs] == \
        [(p.client, p.qn, p.other, p.other_qn) for p in rpairs]
    assert trs == [(t.client, t.qn, int(t.to_level), t.rule) for t in rtrs]

    # restart: the group, the members' levels and the index come back from the store
    mon = Monitor(_mon_cfg(rules=[{"pairs": 20, "level": "label_only"}]), db, clock=FakeClock())
    try:
        assert mon.level("s2") == Level.LABEL_ONLY
        g = mon.linker.group_of("s1")
        assert g is not None and {"s0", "s1", "s2", "s3", "late"} <= g.members
        _send(mon, "after-restart", _step(sent[-20:], 0.1, rng))   # perturbs pre-restart items
        assert mon.level("after-restart") == Level.LABEL_ONLY
    finally:
        mon.close()


def test_linking_config_is_validated():
    d = load_config().model_dump(mode="python")
    d["policies"] = {k.name.lower(): v for k, v in d["policies"].items()}
    bad = {**d, "linking": {**d["linking"], "rules": [{"pairs": 5, "level": "normal"}]}}
    with pytest.raises(ConfigError, match="linking.rules"):
        config_from_dict(bad)
    bad = {**d, "linking": {**d["linking"], "duplicate": 4.0}}
    with pytest.raises(ConfigError, match="duplicate"):
        config_from_dict(bad)
    bad = {**d, "ladder": {"monotone": False, "cooldown_seconds": 10}}
    with pytest.raises(ConfigError, match="monotone"):
        config_from_dict(bad)
    bad = {**d, "linking": {**d["linking"], "typo": 1}}
    with pytest.raises(ConfigError, match="typo"):
        config_from_dict(bad)


def test_cli_shows_groups_and_exports_evidence(pool, tmp_path, capsys):
    from monitor.cli import main as cli

    rng = np.random.default_rng(5)
    db = tmp_path / "m.db"
    with Monitor(_mon_cfg(rules=[{"pairs": 20, "level": "label_only"}]), db,
                 clock=FakeClock()) as mon:
        sent = pool[:30]
        _send(mon, "seed", sent)
        for r in range(8):
            x = _step(sent[rng.integers(0, len(sent), 10)], 0.1, rng)
            _send(mon, f"s{r % 4}", x)
            sent = np.concatenate([sent, x])
    assert cli(["--db", str(db), "clients"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines()[2:]}
    assert "G1 (4 keys)" in rows["s0"] and "G1" not in rows["seed"]
    assert cli(["--db", str(db), "show", "s1"]) == 0
    out = capsys.readouterr().out
    assert "group G1, 4 keys" in out and "members: s0, s1, s2, s3" in out
    assert "link: group G1" in out                      # the group transition's evidence
    assert cli(["--db", str(db), "show", "seed"]) == 0
    assert "not linked" in capsys.readouterr().out
    out_file = tmp_path / "pairs.jsonl"
    assert cli(["--db", str(db), "export", "--what", "pairs", "--format", "jsonl", "-o",
                str(out_file)]) == 0
    pairs = [json.loads(ln) for ln in out_file.read_text().splitlines()]
    assert pairs and all(p["client"].startswith("s") for p in pairs)
    assert cli(["--db", str(db), "export", "--what", "groups", "--format", "jsonl"]) == 0
    groups = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [g["members"] for g in groups] == [["s0", "s1", "s2", "s3"]]
    assert cli(["--db", str(db), "plot", "s2", "-o", str(tmp_path / "s2.png")]) == 0
    assert (tmp_path / "s2.png").stat().st_size > 10000
    assert cli(["--db", str(db), "replay", "--config", "monitor/default.toml"]) == 0
    out = capsys.readouterr().out
    assert "G1 (4 keys)" in out


def test_a_new_key_perturbing_the_seed_keys_of_an_escalated_attack_is_answered_at_its_level(
        pool):
    """Split JBDA's seed keys only send natural images; the keys that perturb them are linked
    and escalated. A new key whose first request perturbs the same seed keys' queries is
    answered at the group's level before any pair of its own is counted; an honest key sending
    the seed images themselves is not."""
    rng = np.random.default_rng(6)
    lk = Linker(CFG)
    seeds = pool[200:260]
    for k in range(3):                                   # three seed keys, natural images
        lk.step(f"seed{k}", 0, seeds[k * 20:(k + 1) * 20], None, 0.0, 0, [])
    for k in range(4):                                   # four perturbers of the seed keys
        x = _step(seeds[rng.integers(0, 60, 10)], 0.1, rng)
        lk.step(f"p{k}", 0, x, None, 1.0 + k, 0, [])
    g = lk.group_of("p0")
    assert g is not None and g.members == {"p0", "p1", "p2", "p3"}   # co-source links
    assert g.pairs >= 20 and lk.floor("p0") == Level.LABEL_ONLY
    assert lk.group_of("seed0") is None and lk.floor("seed0") == Level.NORMAL
    new = _step(seeds[rng.integers(0, 60, 5)], 0.1, rng)
    assert lk.probe("newcomer", new) == Level.LABEL_ONLY
    assert lk.probe("honest", seeds[:5]) == Level.NORMAL


def test_a_young_key_is_judged_on_its_first_request(pool):
    """Below probe_queries, the attack-like copies of other keys' queries in a request count
    toward the linking rules before it is answered: a fresh key whose first request perturbs
    five queries of another key is answered at SWITCH; a fresh key re-sending benign variants
    of them is not, and neither is a key past probe_queries (the per-client detectors watch
    it)."""
    from client.honest import benign_variant

    rng = np.random.default_rng(7)
    cfg = LinkingConfig(rules=[{"pairs": 5, "level": "switch"}], probe_queries=200)
    lk = Linker(cfg)
    x = pool[300:340]
    lk.step("catalogue", 0, x, None, 0.0, 0, [])
    assert lk.probe("fresh", _step(x[:5], 0.1, rng)) == Level.SWITCH
    assert lk.probe("fresh", _step(x[:3], 0.1, rng)) == Level.NORMAL     # 3 < 5 pairs
    kinds = ("jpeg", "brightness", "gamma", "contrast", "noise")
    variants = np.stack([benign_variant(x[i].reshape(28, 28), kinds[i % 5], rng).reshape(-1)
                         for i in range(20)])
    assert lk.probe("fresh-honest", variants) == Level.NORMAL
    lk.step("veteran", 0, pool[1000:1250], None, 1.0, 0, [])             # 250 queries
    assert lk.probe("veteran", _step(x[:5], 0.1, rng)) == Level.NORMAL


def test_a_veteran_key_is_not_judged_young_after_a_restart(pool, tmp_path):
    """After a restart the index gives each key's query count back: a key past probe_queries
    whose request perturbs other keys' queries is answered as before the restart (its own
    level; the pairs count when the request is observed), and a fresh key still is probed."""
    rng = np.random.default_rng(9)
    db = tmp_path / "m.db"
    cfg = _mon_cfg(rules=[{"pairs": 3, "level": "switch"}], probe_queries=200)
    x = pool[300:340]
    stepped = _step(x[:5], 0.1, rng)
    mon = Monitor(cfg, db, clock=FakeClock())
    _send(mon, "catalogue", x)
    _send(mon, "veteran", pool[1000:1250])                  # 250 queries: past probe_queries
    own = mon.level("veteran")                              # no images: no probe
    before = (mon.level("veteran", stepped), mon.level("fresh", stepped))
    mon.close()
    mon = Monitor(cfg, db, clock=FakeClock())
    try:
        assert own < Level.SWITCH and before == (own, Level.SWITCH)
        assert (mon.level("veteran", stepped), mon.level("fresh", stepped)) == before
    finally:
        mon.close()


# --- the fast paths against plain reference implementations ----------------------------------
def _ref_add(index, kid, qn0, enc, res, tv, pix, slots):
    from monitor.linking import content_digests
    """LinkIndex.add as defined: table by table, item by item (each slot a ring of ``bucket``)."""
    k = len(enc)
    for j in range(k):
        seq = index.n + j
        ring = seq % index.size
        index.enc[ring], index.res[ring], index.tv[ring] = enc[j], res[j], tv[j]
        index.pix[ring], index.qn[ring], index.kid[ring] = pix[j], qn0 + j, kid
        index.digest[ring] = content_digests(pix[j:j + 1], index.digest_key)[0]
        for t in range(index.cfg.tables):
            s = slots[j, t]
            index.table[t, s, index.ptr[t, s] % index.cfg.bucket] = seq
            index.ptr[t, s] += 1
    index.n += k


def test_index_insertion_matches_the_one_by_one_definition(pool):
    from monitor.features import encode, residual_norms, to_u8, total_variation
    from monitor.linking import LinkIndex
    rng = np.random.default_rng(11)
    cfg = LinkingConfig(horizon=3000, bucket=3, rules=[])
    fast, ref = LinkIndex(cfg), LinkIndex(cfg)
    ref.digest_key = fast.digest_key
    for r in range(12):
        n = int(rng.integers(1, 700))
        x = pool[rng.integers(0, 300, n)]     # few distinct images: crowded slots
        enc = encode(x)
        pix = to_u8(x)
        args = (r % 4, 100 * r, enc, residual_norms(x, enc), total_variation(pix), pix,
                fast.slots(enc))
        fast.add(*args)
        _ref_add(ref, *args)
        for name in ("table", "ptr", "enc", "res", "tv", "pix", "digest", "qn", "kid"):
            assert np.array_equal(getattr(fast, name), getattr(ref, name)), name


def _ref_verify(lk, enc, res, pix, tv, ii, ss):
    """Linker._verify as defined: every candidate's bound, then attack_like on whole rows."""
    idx = lk.index
    de = enc[ii] - idx.enc[ss]
    lb = np.einsum("ij,ij->i", de, de) + (res[ii] - idx.res[ss]) ** 2
    keep = lb <= np.float32((lk.cfg.radius + 0.01) ** 2)
    ii, ss = ii[keep], ss[keep]
    mine = tv[ii] >= idx.tv[ss]
    src = np.where(mine[:, None], idx.pix[ss], pix[ii])
    dst = np.where(mine[:, None], pix[ii], idx.pix[ss])
    mask, l2, dense, peak = attack_like(src, dst, lk.cfg)
    return ii[mask], ss[mask], mine[mask], l2[mask], dense[mask], peak[mask]


def test_pair_verification_matches_the_plain_definition(pool):
    from monitor.features import encode, residual_norms, to_u8, total_variation
    rng = np.random.default_rng(12)
    lk = Linker(LinkingConfig(rules=[]))
    seeds = pool[rng.integers(0, 5000, 400)]
    for k in ("a", "b", "c"):       # exact copies of every seed under three keys: verified once
        lk.step(k, 0, seeds, None, 0.0, 0, [])
    for r in range(4):       # sign steps, benign variants, exact repeats and unrelated images
        x = np.concatenate([_step(seeds[:60], 0.1, rng), seeds[60:90], pool[rng.integers(0, 5000, 60)],
                            np.stack([benign_variant(s.reshape(28, 28),
                                                     VARIANT_KINDS[i % len(VARIANT_KINDS)], rng)
                                      .reshape(-1) for i, s in enumerate(seeds[100:140])])])
        x = np.asarray(x, np.float32)
        if x.max() > 1.5:
            x = x / np.float32(255.0)
        enc = encode(x)
        pix = to_u8(x)
        res, tv = residual_norms(x, enc), total_variation(pix)
        slots = lk.index.slots(enc)
        ii, ss = lk.index.candidates(slots, kid=99)
        idx, lo = lk.index, max(0, lk.index.n - lk.index.size)
        want_c = sorted({(i, int(q) % idx.size) for i in range(len(enc))
                         for t in range(idx.cfg.tables) for q in idx.table[t, slots[i, t]]
                         if q >= lo and idx.kid[int(q) % idx.size] != 99},
                        key=lambda p: (p[0], (p[1] - idx.n) % idx.size))   # by item, then age
        assert list(zip(ii.tolist(), ss.tolist())) == want_c
        got = lk._verify(enc, res, pix, tv, ii, ss)
        want = _ref_verify(lk, enc, res, pix, tv, ii, ss)
        assert len(want[0]) > 10
        assert len(np.unique(lk.index.digest[want[1]])) < len(want[1])   # copies were matched
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and np.array_equal(g, w, equal_nan=True)


def test_content_digests_tell_exact_copies_from_any_one_grey_level_change(pool):
    from monitor.features import to_u8
    from monitor.linking import LinkIndex, content_digests
    key = LinkIndex(LinkingConfig(rules=[])).digest_key
    x = to_u8(pool[:50])
    d = content_digests(x, key)
    assert np.array_equal(d, content_digests(x.copy(), key))          # equal rows, equal digests
    assert len(np.unique(d)) == 50
    img = x[0]
    variants = np.repeat(img[None], 2 * 784, axis=0)
    pos = np.arange(784)
    variants[pos, pos] = img + np.where(img < 255, 1, -1).astype(np.uint8)        # one level up
    variants[784 + pos, pos] = img ^ np.uint8(128)                                  # top bit
    dv = content_digests(variants, key)
    assert len(np.unique(dv)) == 2 * 784 and not np.isin(d[0], dv)
    other = LinkIndex(LinkingConfig(rules=[])).digest_key      # keys are drawn per index
    assert not np.array_equal(content_digests(x, other), d)


# --- batch-1 fast paths against the general path ----------------------------------------------
def test_batch1_candidates_and_insertion_match_the_general_path(pool, monkeypatch):
    """LinkIndex fed one item per request, with the one-item shortcuts on and off: the same
    tables, ring pointers and stored items, and the same candidates (empty index, own key,
    crowded slots beyond the bucket, items of other keys) for every request."""
    import monitor.features as F
    from monitor.features import encode, residual_norms, to_u8, total_variation
    from monitor.linking import LinkIndex
    rng = np.random.default_rng(13)
    cfg = LinkingConfig(horizon=500, bucket=3, rules=[])
    x = pool[rng.integers(0, 60, 900)]                    # few distinct images: crowded slots
    x[::7] = _step(x[::7], 0.1, rng)
    runs = {}
    for fast in (True, False):
        monkeypatch.setattr(F, "FAST_PATHS", fast)
        idx = LinkIndex(cfg)
        got = []
        for i in range(len(x)):
            v = x[i:i + 1]
            enc = encode(v)
            pix = to_u8(v)
            slots = idx.slots(enc)
            for kid in (i % 5, 99):
                ii, ss = idx.candidates(slots, kid)
                got.append((ii.dtype.str, ii.tobytes(), ss.dtype.str, ss.tobytes()))
            idx.add(i % 5, i, enc, residual_norms(v, enc), total_variation(pix), pix, slots)
        runs[fast] = got, [getattr(idx, a).tobytes() for a in
                           ("table", "ptr", "enc", "res", "tv", "pix", "qn", "kid")] + [idx.n]
    assert runs[True] == runs[False]
    sizes = [len(np.frombuffer(g[1], np.int64)) for g in runs[True][0]]
    assert sizes[0] == 0 and max(sizes) > 10 and min(sizes[100:]) == 0


def test_monitor_reuses_what_level_prepared_bit_for_bit(pool, monkeypatch):
    """level(key, images) prepares the items for the linker's probe; the request's observe
    reuses that (det_view's items, encodings, pixels, LSH slots) only for images with the same
    bits: the same array, or a copy (as the monitor's own process receives them, in a second
    message). Everything logged (scores, fired bits, levels, on-grid flags, transitions,
    pairs) and every returned level equals a run that prepares everything again, including a
    request whose images are modified in place between level() and observe()."""
    import monitor.core as C
    rng0 = np.random.default_rng(14)
    seeds = pool[rng0.integers(0, 5000, 40)]
    plan = []                                   # (key, images) in order
    plan.append(("seed", seeds))
    sent = seeds
    for r in range(24):
        x = _step(sent[rng0.integers(0, len(sent), 1 + (r % 3))], 0.1, rng0)
        plan.append((f"s{r % 4}", x))
        sent = np.concatenate([sent, x])
    for r in range(60):                        # honest and perturbing keys at batches 1..3
        if r % 3 == 0:
            x = pool[rng0.integers(0, 5000, 1 + r % 2)]
        else:
            x = _step(sent[rng0.integers(0, len(sent), 1 + r % 3)], 0.1, rng0)
        x = x.copy()
        x[:, :5] += np.float32(0.0013) * (r % 2)      # some off the 0-255 grid
        plan.append((f"k{r % 5}", x))
    runs, reused, copies_reused, cur = {}, {"n": 0}, {"n": 0}, {"copy": False}
    real = C.Monitor._prepared_for

    def spy(self, client_id, images):
        out = real(self, client_id, images)
        reused["n"] += out is not None
        copies_reused["n"] += out is not None and cur["copy"]
        return out

    monkeypatch.setattr(C.Monitor, "_prepared_for", spy)
    for reuse in (True, False):
        monkeypatch.setattr(C, "PREPARED_MAX_ITEMS", 16 if reuse else 0)
        mon = Monitor(_mon_cfg(rules=[{"pairs": 3, "level": "label_only"}]), None,
                      clock=FakeClock())
        logged, levels = [], []
        st = mon.store
        put = st.put_batch

        def put_batch(b, put=put, logged=logged):
            logged.append((b.client, b.qn0, b.scores.tobytes(), np.asarray(b.fired).tobytes(),
                           np.asarray(b.level_after).tobytes(),
                           np.asarray(b.on_grid).tobytes()))
            return put(b)
        st.put_batch = put_batch
        try:
            for i, (key, x) in enumerate(plan):
                x = np.array(x, np.float32).reshape(-1, 28, 28)
                lvl = mon.level(key, x)
                if i == len(plan) - 5:
                    x[0, 3, 3] = np.float32(0.5) - x[0, 3, 3]    # changed after level()
                cur["copy"] = i % 2 == 1 and i != len(plan) - 5
                if cur["copy"]:
                    x = x.copy()                         # the same bits in another array
                p = np.full((len(x), 10), 0.01, np.float32)
                p[:, i % 10] = 0.91
                a = Answer(np.zeros(len(x), np.int64), p, AnswerKind.PROBABILITIES)
                levels.append((int(lvl), int(mon.observe(key, f"r{i}", x, p, a, lvl))))
            mon.flush()
            trs = [(t["client"], t["qn"], t["to_level"], t["rule"])
                   for t in QueryLog(mon.db_path).transitions()]
            pairs = [(p["client"], p["qn"], p["other"], p["other_qn"], p["dist"])
                     for p in QueryLog(mon.db_path).pairs()]
        finally:
            mon.close()
        runs[reuse] = (logged, levels, trs, pairs)
        if reuse:
            n_reused = reused["n"]
    assert runs[True] == runs[False]
    assert n_reused > 20                                   # the reuse really happened
    assert copies_reused["n"] > 10                         # copies included
    assert reused["n"] == n_reused                         # and only with it switched on
    assert any(lv[0] > 0 for lv in runs[True][1]) and runs[True][3]   # probes raised levels
