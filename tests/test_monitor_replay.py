"""Replay reproduces live decisions exactly; other configs change them; the CLI works on a log."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common import data
from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from monitor import Monitor, QueryLog, load_config
from monitor.cli import main as cli
from monitor.config import config_from_dict
from monitor.replay import replay


def _cfg(linking: bool = True, **prada):
    d = load_config().model_dump(mode="python")
    d["linking"]["enabled"] = linking
    d["detectors"]["prada"].update(prada)
    d["detectors"]["ood"].update({"window": 50, "min_queries": 50, "tau": 0.5, "threshold": 0.5})
    d["detectors"]["similarity"].update({"history": 500, "k": 10})
    d["rules"] = [{"detectors": ["ood"], "level": "noise"},
                  {"detectors": ["prada"], "level": "label_only"},
                  {"detectors": ["prada"], "level": "switch", "min_hits": 100}]
    d["policies"] = {k.name.lower(): v for k, v in d["policies"].items()}
    return config_from_dict(d)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A log with an honest client, a perturbation attacker and an OOD-ish client."""
    try:
        t = data.load("fashion", "test")
    except data.DataUnavailable as exc:  # pragma: no cover
        pytest.skip(f"Fashion-MNIST unavailable: {exc}")
    x = t.x[:5000].astype(np.float32) / 255.0
    y = t.y[:5000]
    rng = np.random.default_rng(0)
    onehot = np.eye(10, dtype=np.float32)
    streams = {}
    order = rng.permutation(5000)[:1200]
    streams["honest"] = (x[order], onehot[y[order]] * 0.9 + 0.01)
    seeds = rng.choice(5000, 100, replace=False)
    X, Y = x[seeds], y[seeds]
    xs, ys = [X], [Y]
    while sum(map(len, xs)) < 1200:
        new = np.clip(X + 0.1 * rng.choice([-1.0, 1.0], X.shape), 0, 1).astype(np.float32)
        xs.append(new)
        ys.append(Y)
        X, Y = np.concatenate([X, new]), np.concatenate([Y, Y])
    streams["attacker"] = (np.concatenate(xs)[:1200], onehot[np.concatenate(ys)[:1200]] * 0.9 + 0.01)
    lg = rng.normal(0, 1, (400, 10))
    streams["unsure"] = (x[rng.integers(0, 5000, 400)],
                         (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32))
    db = tmp_path_factory.mktemp("replay") / "monitor.db"
    cfg = _cfg()
    mon = Monitor(cfg, db, clock=FakeClock())
    live_levels = {}
    for i in range(0, 1200, 40):  # interleaved clients, batches of 40
        for c, (xx, pp) in streams.items():
            if i < len(xx):
                a = Answer(pp[i:i + 40].argmax(1), pp[i:i + 40], AnswerKind.PROBABILITIES)
                live_levels[c] = mon.observe(c, f"{c}-{i}", xx[i:i + 40], pp[i:i + 40], a,
                                             mon.level(c))
    mon.close()
    return db, cfg, live_levels


def test_live_decisions_are_as_expected(logged):
    db, cfg, live = logged
    assert live == {"honest": Level.NORMAL, "attacker": Level.SWITCH, "unsure": Level.NOISE}


def test_replay_reproduces_live_exactly(logged):
    db, cfg, live = logged
    res = replay(db, cfg)
    with QueryLog(db) as q:
        for c in ("honest", "attacker", "unsure"):
            lt = [(t["qn"], t["from_level"], t["to_level"], t["rule"], t["t"],
                   [e["value"] for e in t["evidence"]]) for t in q.transitions(c)]
            rt = [(t.qn, t.from_level, t.to_level, t.rule, t.t, [e["value"] for e in t.evidence])
                  for t in res[c]["transitions"]]
            assert lt == rt
            assert res[c]["final_level"] == live[c]
            assert res[c]["queries"] == q.max_qn(c)
    assert len(res["attacker"]["transitions"]) == 2


def test_replay_under_other_thresholds_changes_decisions(logged):
    db, cfg, _ = logged
    live_q = replay(db, cfg, ["attacker"])["attacker"]["transitions"][0].qn
    # PRADA's threshold alone (cross-client linking off: the attacker also perturbs images the
    # 'unsure' client sent, which linking counts against it on its own)
    strict = replay(db, _cfg(False, delta=0.5), ["attacker"])["attacker"]
    assert strict["final_level"] == Level.NORMAL and strict["transitions"] == []
    eager = replay(db, _cfg(False, delta=0.97), ["attacker"])["attacker"]["transitions"]
    assert eager and eager[0].qn <= live_q


def test_cli_commands(logged, tmp_path, capsys):
    db, cfg, _ = logged
    assert cli(["--db", str(db), "clients"]) == 0
    out = capsys.readouterr().out
    assert "attacker" in out and "SWITCH" in out and "honest" in out and "NORMAL" in out

    assert cli(["--db", str(db), "show", "attacker"]) == 0
    out = capsys.readouterr().out
    assert "NORMAL -> LABEL_ONLY" in out and "prada: value" in out and "threshold 0.9000" in out

    png = tmp_path / "a.png"
    assert cli(["--db", str(db), "plot", "attacker", "-o", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20000

    f = tmp_path / "t.jsonl"
    assert cli(["--db", str(db), "export", "--what", "transitions", "--format", "jsonl",
                "-o", str(f)]) == 0
    rows = [json.loads(l) for l in f.read_text().splitlines()]
    assert {r["client"] for r in rows} == {"attacker", "unsure"}
    f = tmp_path / "q.csv"
    assert cli(["--db", str(db), "export", "--client", "unsure", "-o", str(f)]) == 0
    assert len(f.read_text().splitlines()) == 401

    toml = tmp_path / "strict.toml"
    toml.write_text("[detectors.prada]\ndelta = 0.5\n[[rules]]\ndetectors = ['prada']\n"
                    "level = 'label_only'\n")
    assert cli(["--db", str(db), "replay", "--config", str(toml), "--client", "attacker"]) == 0
    out = capsys.readouterr().out
    assert "never escalated" in out and "DIFF" in out and "1 client(s)" in out


def test_cli_errors(logged, tmp_path, capsys):
    db, _, _ = logged
    assert cli(["--db", str(db), "show", "mallory"]) == 2
    err = capsys.readouterr().err
    assert "unknown client 'mallory'" in err and "attacker" in err
    assert cli(["--db", str(tmp_path / "none.db"), "clients"]) == 2
    assert "no monitor database" in capsys.readouterr().err
    assert cli(["--db", str(db), "replay", "--config", str(tmp_path / "x.toml")]) == 2
    assert "not found" in capsys.readouterr().err
