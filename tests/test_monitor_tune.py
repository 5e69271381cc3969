"""python -m monitor tune: the cached evaluation equals a full replay, the chosen config avoids
the base config's false escalation, the written TOML replays to the reported numbers, label
errors, the time limit."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from common import data
from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, load_config
from monitor.cli import main as cli
from monitor.config import config_from_dict
from monitor.replay import replay
from monitor.tune import (TuneError, Tuner, check_space, choose, default_space, load_labels,
                          pareto, resolve_labels)

# a small search space that touches every evaluation path: thresholds, min_queries and min_hits
# (cached scores), the OOD window and tau (re-run from probabilities), the near-copy window
# (rolling share of cached flags), the similarity history (a second pixel replay)
SPACE = {
    "detectors.prada.delta": [0.8, 0.9, 0.95],
    "detectors.ood.tau": [0.5, 0.3],
    "detectors.ood.window": [50, 100],
    "detectors.ood.threshold": [0.5, 0.8],
    "detectors.near_duplicate.window": [50, 100],
    "detectors.near_duplicate.threshold": [0.1, 0.25, 0.6],
    "detectors.similarity.history": [300, 500],
    "detectors.similarity.threshold": [1.05, 1.6, 2.0],
    "rules.0.min_hits": [1, 100, 1000],
    "rules.1.min_hits": [1, 20],
    "rules.4.min_hits": [10, 50],
}


def _base(linking: bool = True, **ladder) -> dict:
    d = load_config().model_dump(mode="python")
    d["detectors"]["ood"].update({"window": 50, "min_queries": 50, "tau": 0.5, "threshold": 0.5})
    d["detectors"]["similarity"].update({"history": 500, "k": 10})
    d["detectors"]["near_duplicate"].update({"window": 50, "min_queries": 50, "history": 500})
    d["rules"] = [{"detectors": ["ood"], "level": "noise"},
                  {"detectors": ["prada"], "level": "label_only"},
                  {"detectors": ["prada"], "level": "switch", "min_hits": 100},
                  {"detectors": ["near_duplicate"], "level": "label_only"},
                  {"detectors": ["similarity"], "level": "noise", "min_hits": 10}]
    d["linking"].update({"enabled": linking, "horizon": 5000,
                         "rules": [{"pairs": 10, "level": "label_only"}]})
    d["ladder"].update(ladder)
    d["policies"] = {k.name.lower(): v for k, v in d["policies"].items()}
    return d


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """honest (confident), unsure (honest, but the target is unsure of its images: the base
    OOD rule escalates it), a perturbation attacker, and a JBDA-like attack split over two keys
    that perturb each other's queries (cross-client linking groups them)."""
    try:
        t = data.load("fashion", "test")
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    x = t.x[:5000].astype(np.float32) / 255.0
    y = t.y[:5000]
    rng = np.random.default_rng(0)
    onehot = np.eye(10, dtype=np.float32)
    conf = lambda yy: onehot[yy] * 0.9 + 0.01  # noqa: E731
    streams = {}
    order = rng.permutation(5000)[:600]
    streams["honest"] = (x[order], conf(y[order]))
    lg = rng.normal(0, 1, (400, 10))
    streams["unsure"] = (x[rng.integers(0, 5000, 400)],
                         (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32))
    seeds = rng.choice(5000, 60, replace=False)
    X, Y = x[seeds], y[seeds]
    xs, ys = [X], [Y]
    while sum(map(len, xs)) < 600:
        new = np.clip(X + 0.1 * rng.choice([-1.0, 1.0], X.shape), 0, 1).astype(np.float32)
        xs.append(new)
        ys.append(Y)
        X, Y = np.concatenate([X, new]), np.concatenate([Y, Y])
    streams["attacker"] = (np.concatenate(xs)[:600], conf(np.concatenate(ys)[:600]))
    db = tmp_path_factory.mktemp("tune") / "monitor.db"
    cfg = config_from_dict(_base())
    mon = Monitor(cfg, db, clock=FakeClock())

    def send(c, xx, pp):
        a = Answer(pp.argmax(1), pp, AnswerKind.PROBABILITIES)
        mon.observe(c, f"{c}-{mon.level(c)}-{time.perf_counter_ns()}", xx, pp, a, mon.level(c))

    sy = rng.choice(5000, 20, replace=False)
    sent = {"sybil-0": [x[sy]], "sybil-1": []}
    send("sybil-0", x[sy], conf(y[sy]))
    sy_y = y[sy]
    for i in range(0, 600, 40):
        for c, (xx, pp) in streams.items():
            if i < len(xx):
                send(c, xx[i:i + 40], pp[i:i + 40])
        if i < 400:   # each sybil key perturbs the other's latest queries
            for me, other in (("sybil-1", "sybil-0"), ("sybil-0", "sybil-1")):
                if sent[other]:
                    src = sent[other][-1]
                    new = np.clip(src + 0.1 * rng.choice([-1.0, 1.0], src.shape), 0, 1
                                  ).astype(np.float32)
                    send(me, new, conf(sy_y))
                    sent[me].append(new)
    mon.close()
    return db, cfg


def _tuner(db, space=SPACE, config=None, **kw):
    return Tuner([db], honest=["honest", "unsure"], attacker=["attacker", "sybil-*"],
                 config=config, space=space, progress=False, **kw)


def _replayed(db, cfg, clients):
    res = replay(db, cfg, clients)
    return {c: ((res[c]["transitions"][0].qn if res[c]["transitions"] else None),
                Level(res[c]["final_level"]).name) for c in clients}


def test_log_has_what_the_tests_need(logged):
    db, cfg = logged
    res = _replayed(db, cfg, ["honest", "unsure", "attacker", "sybil-0", "sybil-1"])
    assert res["honest"][0] is None
    assert res["unsure"][0] is not None                  # the base falsely escalates it
    assert res["attacker"][0] is not None
    t = _tuner(db)
    assert t.links[0].members >= {"sybil-0", "sybil-1"}  # a cross-client group
    assert "honest" not in t.links[0].members and "unsure" not in t.links[0].members


def test_cached_evaluation_equals_full_replay(logged):
    db, _ = logged
    t = _tuner(db)
    rng = np.random.default_rng(1)
    base = t.base_values()
    cands = [base, {**base, "rules.0.min_hits": 1000, "detectors.prada.delta": 0.95},
             {**base, "detectors.ood.tau": 0.3, "detectors.near_duplicate.window": 100,
              "detectors.similarity.history": 300, "detectors.similarity.threshold": 1.6,
              "rules.4.min_hits": 10}]
    cands += [{k: v[int(rng.integers(len(v)))] for k, v in t.space.items()} for _ in range(3)]
    clients = [e.client for e in t.entries if e.label]
    assert sorted(clients) == ["attacker", "honest", "sybil-0", "sybil-1", "unsure"]
    seen_levels = set()
    for values in cands:
        cfg = t.config_of(values)
        want = _replayed(db, cfg, clients)
        assert t.outcome(values) == want, values
        seen_levels |= {v[1] for v in want.values()}
    assert len(seen_levels) >= 3      # the candidates differ in what they decide


def test_cached_evaluation_with_a_cooldown_ladder_equals_replay(logged):
    """A non-monotone ladder (cool-down resets hit counters) runs the real engine request by
    request on the cached values: still equal to a full replay."""
    db, _ = logged
    d = _base(linking=False, monotone=False, cooldown_seconds=0.2)
    d["rules"] = [{"detectors": ["ood"], "level": "noise"},
                  {"detectors": ["near_duplicate"], "level": "label_only", "min_hits": 5}]
    path = db.parent / "cooldown.toml"
    from common.tomlw import dumps as toml_dumps
    from monitor.tune import config_toml_dict
    path.write_text(toml_dumps(config_toml_dict(config_from_dict(d))))
    space = {"detectors.near_duplicate.threshold": [0.3, 0.5, 0.8],
             "rules.1.min_hits": [1, 5, 30]}
    t = _tuner(db, space=space, config=str(path))
    assert not t.links
    clients = [e.client for e in t.entries]
    downs = 0
    for thr, hits in ((0.5, 5), (0.3, 1), (0.8, 30)):
        values = {"detectors.near_duplicate.threshold": thr, "rules.1.min_hits": hits}
        cfg = t.config_of(values)
        res = replay(db, cfg, clients)
        downs += sum(tr.rule == "cooldown" for c in clients for tr in res[c]["transitions"])
        assert t.outcome(values) == _replayed(db, cfg, clients)
    assert downs > 0


def test_search_avoids_the_false_escalation_and_still_catches_attackers(logged):
    db, _ = logged
    t = _tuner(db)
    t.search(max_candidates=150, time_limit=60, seed=0)
    base, chosen = t.candidates[0], choose(t.candidates)
    assert base.how == "base" and base.n_false >= 1
    assert ("unsure", "NOISE") in base.false
    assert chosen.n_false == 0 and chosen.n_never == 0
    front = pareto(t.candidates)
    assert front[0].n_false == 0 and all(a.delay > b.delay for a, b in zip(front, front[1:]))
    table = t.table(sorted({c.id: c for c in front + [base, chosen]}.values(),
                           key=lambda c: (c.n_false, c.delay)), chosen, front)
    assert "base" in table and "chosen" in table and "unsure>NOISE" in table


def test_cli_writes_a_config_that_replays_to_the_reported_numbers(logged, tmp_path, capsys):
    db, _ = logged
    space = tmp_path / "space.toml"
    space.write_text("".join(f'"{k}" = {json.dumps(v)}\n' for k, v in SPACE.items()))
    out = tmp_path / "tuned.toml"
    assert cli(["--db", str(db), "tune", "--honest", "honest", "--honest", "unsure",
                "--attacker", "attacker", "--attacker", "sybil-*", "--space", str(space),
                "--max-candidates", "60", "--time-limit", "60", "-o", str(out),
                "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 honest and 3 attacker client(s); 0 unlabelled" in printed
    assert "chosen: #" in printed and "false esc." in printed
    text = out.read_text()
    assert text.startswith("# modelguard monitor config written by `python -m monitor tune`")
    assert str(db) in text and "2 honest, 3 attacker" in text and "--space" in text
    cfg = load_config(out)
    js = json.loads((tmp_path / "tradeoff.json").read_text())
    assert (tmp_path / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    chosen = next(c for c in js["candidates"] if c["id"] == js["chosen"])
    assert chosen["false_escalations"] == 0 and chosen["on_front"]
    # the written file replays to the numbers reported
    got = _replayed(db, cfg, ["honest", "unsure", "attacker", "sybil-0", "sybil-1"])
    assert got["honest"][0] is None and got["unsure"][0] is None
    for a in chosen["attackers"]:
        assert got[a["client"]] == (a["first_escalation_query"], a["final_level"])
    # and differs from the base only where the report says
    base = config_from_dict(_base()).model_dump(mode="json")
    tuned = cfg.model_dump(mode="json")
    for k, v in chosen["changes"].items():
        parts = k.split(".")
        cur = tuned
        for p in parts[:-1]:
            cur = cur[int(p)] if p.isdigit() else cur[p]
        assert cur[parts[-1]] == v
    assert tuned["linking"] == base["linking"] and tuned["policies"] == base["policies"]


def test_label_errors(logged, tmp_path, capsys):
    db, _ = logged
    run = lambda *args: cli(["--db", str(db), "tune", "--no-progress", "-o",  # noqa: E731
                             str(tmp_path / "t.toml"), *args])
    assert run("--honest", "honest", "--attacker", "mallory*") == 2
    err = capsys.readouterr().err
    assert "--attacker 'mallory*' matches no client" in err and "sybil-0" in err
    assert run("--labels", str(tmp_path / "none.csv")) == 2
    assert "labels file not found" in capsys.readouterr().err
    assert run("--honest", "honest") == 2
    assert "no attacker client" in capsys.readouterr().err
    assert run("--attacker", "attacker") == 2
    assert "no honest client" in capsys.readouterr().err
    assert run("--honest", "*", "--attacker", "attacker") == 2
    assert "labelled both honest and attacker" in capsys.readouterr().err
    assert run() == 2
    assert "no labels" in capsys.readouterr().err
    assert cli(["--db", str(tmp_path / "none.db"), "tune", "--honest", "a", "--attacker",
                "b"]) == 2
    assert "no monitor database" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("client,label\nhonest,benign\n")
    assert run("--labels", str(bad)) == 2
    assert "expected honest or attacker" in capsys.readouterr().err
    space = tmp_path / "space.toml"
    space.write_text('"linking.radius" = [2.0]\n')
    assert run("--honest", "honest", "--attacker", "attacker", "--space", str(space)) == 2
    assert "not searchable" in capsys.readouterr().err

    # labels files: CSV with a header, JSON object and list; unknown names are reported
    f = tmp_path / "labels.csv"
    f.write_text("client,label\nhonest,honest\nattacker,Attacker\nghost,honest\n")
    labels = load_labels(f)
    assert labels == {"honest": "honest", "attacker": "attacker", "ghost": "honest"}
    got, warnings = resolve_labels(["attacker", "honest", "unsure"], labels=labels)
    assert got == {"honest": "honest", "attacker": "attacker"}
    assert "ghost" in warnings[0]
    j = tmp_path / "labels.json"
    j.write_text(json.dumps([{"client": "unsure", "label": "honest"}]))
    assert load_labels(j) == {"unsure": "honest"}
    j.write_text(json.dumps({"nobody": "honest"}))
    with pytest.raises(TuneError, match="names none of the logs' clients"):
        resolve_labels(["honest"], labels=load_labels(j))


def test_space_checks(logged):
    base = load_config()
    sp = default_space(base)
    assert base.detectors.prada.delta in sp["detectors.prada.delta"]
    hits = sp["rules.1.min_hits"]          # spans the base value, above and below
    assert min(hits) < base.rules[1].min_hits < max(hits)
    assert check_space(sp, base).keys() == sp.keys()
    with pytest.raises(TuneError, match="rules.7.min_hits: the base config has 7 rule"):
        check_space({"rules.7.min_hits": [1]}, base)
    with pytest.raises(TuneError, match="detectors.prada.delta = 1.5 is invalid"):
        check_space({"detectors.prada.delta": [1.5]}, base)
    with pytest.raises(TuneError, match="has no key 'nope'"):
        check_space({"detectors.ood.nope": [1]}, base)


def test_time_limit_is_respected(logged):
    db, _ = logged
    t = _tuner(db)
    t.evaluate(t.base_values(), "base")          # the pixel replays of the base, outside
    t0 = time.monotonic()
    t.search(max_candidates=100000, time_limit=1.5, seed=3)
    took = time.monotonic() - t0
    assert "--time-limit" in t.stopped
    assert took < 1.5 + 1.0, took
    assert len(t.candidates) > 5
