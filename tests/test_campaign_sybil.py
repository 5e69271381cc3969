"""The campaign's Sybil measurements: keys escalated and the queries an attack had spent over all
its keys when 80% of them were escalated, on a hand-built monitor log and end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level
from lab import campaign
from lab.campaign import PlanRow, first_escalations, queries_until_escalated
from monitor import Monitor, QueryLog, load_config
from monitor.config import config_from_dict
from monitor.engine import Transition

OTHERS = ("prada", "ood", "similarity", "near_duplicate")


def _volume_config(threshold: int):
    """Only the volume detector: a key is raised to NOISE at its (threshold + 1)-th query."""
    base = load_config().model_dump(mode="python")
    for name in OTHERS:
        base["detectors"][name]["enabled"] = False
    base["detectors"]["volume"]["threshold"] = threshold
    base["rules"] = [{"detectors": ["volume"], "level": "noise"}]
    base["policies"] = {k.name.lower(): v for k, v in base["policies"].items()}
    return config_from_dict(base)


# (key, items) in the order sent; x is not one of the attack's keys
SCHEDULE = [("a", 6), ("x", 7), ("b", 6), ("c", 6), ("d", 6), ("e", 3), ("g", 4), ("a", 6),
            ("b", 6), ("x", 7), ("c", 4), ("d", 8), ("e", 2), ("c", 1), ("e", 10)]
GROUP_AFTER = 11   # g is escalated (as by its group) after SCHEDULE[11], between its requests


@pytest.fixture(scope="module")
def hand_log(tmp_path_factory):
    db = tmp_path_factory.mktemp("log") / "monitor.db"
    rng = np.random.default_rng(0)
    clock = FakeClock()
    mon = Monitor(_volume_config(10), db, clock=clock)
    for i, (key, n) in enumerate(SCHEDULE):
        x = rng.integers(0, 256, (n, 28, 28)).astype(np.float32) / 255.0
        p = np.full((n, 10), 0.1, np.float32)
        mon.observe(key, f"r{i}", x, p, Answer(p.argmax(1), p, AnswerKind.PROBABILITIES),
                    mon.level(key))
        if i == GROUP_AFTER:
            mon.store.put_transition(Transition("g", clock.t + 0.01, 4, Level.NORMAL,
                                                Level.LABEL_ONLY, "group (test)"))
    mon.close()
    return db


def test_first_escalations_are_each_keys_own_query_numbers(hand_log):
    with QueryLog(hand_log) as q:
        got = first_escalations(q, list("abcdefgx"))
    assert got == {"a": 11, "b": 11, "c": 11, "d": 11, "e": 11, "g": 4, "x": 11}


@pytest.mark.parametrize("keys, share, want", [
    # a..e escalate at their 11th query, which is overall query 32, 38, 48, 54, 60 of a..e
    (list("abcde"), 0.8, 54),
    (list("abcde"), 0.6, 48),
    (list("abcde"), 1.0, 60),
    (list("abcde"), 0.2, 32),
    # counted over the given keys only: a 6, c 6, a 5 (a escalates: 17), c 4, c 1 (c: 23)
    (["a", "c"], 0.8, 23),
    # g is escalated between its requests, after d's second one: d 6, g 4, d 8 (d at 15) -> 18
    (["d", "g"], 0.8, 18),
    (["d", "g"], 0.5, 15),
    # f never sent anything: two of three keys is short of 80%
    (["a", "b", "f"], 0.8, None),
    (["a", "b", "f"], 0.6, 23),
])
def test_queries_until_escalated_on_a_hand_built_log(hand_log, keys, share, want):
    with QueryLog(hand_log) as q:
        assert queries_until_escalated(q, keys, share) == want


def test_queries_until_escalated_rejects_bad_arguments(hand_log):
    with QueryLog(hand_log) as q:
        with pytest.raises(ValueError, match="no keys"):
            queries_until_escalated(q, [])
        with pytest.raises(ValueError, match="share"):
            queries_until_escalated(q, ["a"], 0.0)


def test_client_outcome_counts_only_the_given_keys(hand_log):
    out = campaign.client_outcome(hand_log, ["a", "b", "f"])
    assert out == {"final_level": "NOISE", "first_escalation_query": 11, "escalated_keys": 2,
                   "queries_before_80pct_escalated": None,
                   "keys_escalated_before_half_own_queries": 0, "logged_queries": 24}


def test_keys_escalated_before_half_of_their_own_queries():
    first = {"a": 11, "b": 6, "g": 4}
    # a: 11 of 22 (exactly half: counts); b: 6 of 11 (after half); g: 4 of 4; f: never
    assert campaign.escalated_early(first, {"a": 22, "b": 11, "g": 4, "f": 30}) == 1
    assert campaign.escalated_early(first, {"a": 21, "b": 12, "g": 9}) == 2
    assert campaign.escalated_early({}, {"a": 5}) == 0


def test_plans_have_unique_labels_and_keys():
    rows = campaign.plan_rows("all")
    labels = [r.label for r in rows]
    assert len(labels) == len(set(labels))
    keys = [k for r in rows for k in campaign.attack_keys("defended", r.label, r.keys)]
    assert len(keys) == len(set(keys))            # no two rows share a key
    sybil = {r.label: r for r in campaign.plan_rows("sybil")}
    assert sybil["jbda x25 rr"] == PlanRow("jbda x25 rr", "jbda", 5000, {}, 25, "round-robin")
    assert sybil["interleaved-jbda x100 seq"].mode == "sequential"
    assert {"jbda", "interleaved-jbda"} <= set(sybil)   # the single-key comparison rows
    with pytest.raises(ValueError, match="unknown plan"):
        campaign.plan_rows("sybill")


CONFIG_TOML = """
[detectors.prada]
enabled = false
[detectors.ood]
enabled = false
[detectors.similarity]
enabled = false
[detectors.near_duplicate]
enabled = false
[detectors.volume]
threshold = 60

[[rules]]
detectors = ["volume"]
level = "noise"

[policies.normal]
policy = "identity"
[policies.noise]
policy = "identity"
[policies.label_only]
policy = "identity"
[policies.switch]
policy = "identity"
"""


def _client_id(key: str) -> str:
    """The id the campaign's open-mode servers (default secret) give ``key`` in their logs."""
    from common.keys import client_id_for_key
    from service.config import ServerConfig

    return client_id_for_key(key, ServerConfig().secret)


def test_sybil_campaign_row_end_to_end(small_target, tmp_path, monkeypatch):
    """A tiny Sybil campaign over gRPC: every key is escalated at its 61st query (volume), the
    honest client (100 queries) too, so a row must count its own keys and no one else's."""
    cfg = tmp_path / "monitor.toml"
    cfg.write_text(CONFIG_TOML)
    jb = {"seeds": 30}
    monkeypatch.setitem(campaign.PLANS, "sybil", [
        PlanRow("jbda x3 seq", "jbda", 300, jb, 3, "sequential"),
        PlanRow("jbda x6 rr", "jbda", 300, jb, 6, "round-robin"),
        PlanRow("jbda", "jbda", 300, jb, 1),
    ])
    out = tmp_path / "out"
    # --shared: the honest client and the attacks in one log (the rows must count their own keys)
    argv = ["--shared", "--scenarios", "defended", "--plan", "sybil", "--config", str(cfg),
            "--target", str(small_target[0]), "--artifacts", str(tmp_path),
            "--honest", "1", "--honest-queries", "100", "--epochs", "1",
            "--surrogate", "mlp", "--out", str(out), "--no-progress"]
    honest_flags = ["--honest-variants", "0.3", "--honest-orgs", "1"]
    variants = not campaign.honest_support()
    if not variants:  # client.honest without benign variants yet: the flags fail up front
        with pytest.raises(SystemExit):
            campaign.main(argv + honest_flags)
        assert not out.exists()
    rc = campaign.main(argv + (honest_flags if variants else []))
    assert rc == 0
    blob = json.loads((out / "campaign.json").read_text())
    rows = {r["attack"]: r for r in blob["attacks"]}
    seq, rr, one = rows["jbda x3 seq"], rows["jbda x6 rr"], rows["jbda"]
    for r in (seq, rr, one):
        assert r["queries"] == r["logged_queries"] == 300      # the server saw these keys' queries
        assert r["stolen_accuracy"] is not None and r["fidelity"] is not None
    assert seq["keys"] == 3 and seq["mode"] == "sequential" and seq["per_key_queries"] == [100] * 3
    # one key after another: the keys escalate at overall queries 61, 161 and 261
    assert seq["escalated_keys"] == 3 and seq["first_escalation_query"] == 61
    assert seq["queries_before_80pct_escalated"] == 261 and seq["final_level"] == "NOISE"
    # 50 queries per key: none escalated, although the honest client in the same log was
    assert rr["keys"] == 6 and rr["per_key_queries"] == [50] * 6
    assert rr["escalated_keys"] == 0 and rr["queries_before_80pct_escalated"] is None
    assert rr["final_level"] == "NORMAL"
    assert one["keys"] == 1 and one["mode"] is None
    assert one["escalated_keys"] == 1 and one["queries_before_80pct_escalated"] == 61
    [h] = blob["honest"]
    assert h["final_level"] == "NOISE" and h["escalated_keys"] == 1
    if variants:  # the flags reached the honest client
        assert h["variants_setting"] == 0.3 and h["orgs_setting"] == 1 and h["org"] == 0
        assert h["variants"] > 0
    ids = {_client_id(k) for k in campaign.attack_keys("defended", "jbda x3 seq", 3)}
    with QueryLog(out / "defended" / "monitor.db") as q:
        mine = [c for c in q.client_ids() if c in ids]
    assert len(mine) == 3
    md = (out / "campaign.md").read_text()
    assert "queries spent before 80% of keys escalated" in md
    assert "| defended | jbda x3 seq | 3 | 300 |" in md and "| 3/3 | 61 | 261 |" in md
    assert "| 0/6 | - | never |" in md
    assert (out / "campaign.png").stat().st_size > 0
    assert blob["settings"]["attacks"] == ["jbda x3 seq", "jbda x6 rr", "jbda"]


def test_campaign_rejects_unknown_labels_and_bad_honest_flags(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        campaign.main(["--plan", "sybil", "--attacks", "jbda x7 rr"])
    assert "no attack labelled 'jbda x7 rr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        campaign.main(["--honest-variants", "1.5"])
    assert "--honest-variants must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        campaign.main(["--honest", "2", "--honest-orgs", "3"])
    assert "--honest-orgs must be between 1 and --honest (2)" in capsys.readouterr().err
    monkeypatch.setattr(campaign, "honest_support", lambda: ["run_honest(..., orgs=N)"])
    with pytest.raises(SystemExit):
        campaign.main(["--honest", "2", "--honest-orgs", "2"])
    assert "need run_honest(..., orgs=N) in client/honest.py" in capsys.readouterr().err


def test_lab_sybil_sweeps_lambda_and_keys(small_target, tmp_path):
    from lab import sybil

    cfg = tmp_path / "monitor.toml"
    cfg.write_text(CONFIG_TOML)
    out = tmp_path / "sybil"
    rc = sybil.main(["--budget", "240", "--lambdas", "0.1,0.03", "--keys", "1,2", "--epochs", "1",
                     "--config", str(cfg), "--target", str(small_target[0]), "--artifacts",
                     str(tmp_path), "--out", str(out), "--no-progress"])
    assert rc == 0
    blob = json.loads((out / "lambda.json").read_text())
    got = [(r["lam"], r["keys"]) for r in blob["runs"]]
    assert got == [(0.1, 1), (0.03, 1), (0.1, 2), (0.03, 2)]
    for r in blob["runs"]:
        assert r["queries"] == r["logged_queries"] == 240
        assert r["stolen_accuracy"] is not None
        # volume threshold 60: one key escalates at its 61st query; two keys of 120 both do
        assert r["escalated_keys"] == r["keys"] and r["first_escalation_query"] == 61
        assert r["final_level"] == "NOISE"
    one = [r for r in blob["runs"] if r["keys"] == 1]
    assert all(r["queries_before_80pct_escalated"] == 61 for r in one)
    md = (out / "lambda.md").read_text()
    assert md.count("| 2/2 | 61 |") == 2 and md.count("| 1/1 | 61 | 61 |") == 2
    assert (out / "lambda.png").stat().st_size > 0


def test_lab_sybil_rejects_bad_arguments(capsys):
    from lab import sybil

    with pytest.raises(SystemExit):
        sybil.main(["--lambdas", "0.1,-0.01"])
    assert "lambdas must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sybil.main(["--budget", "10", "--keys", "1,25"])
    assert "25 keys cannot share a budget of 10" in capsys.readouterr().err


def test_campaign_isolates_each_attack_by_default(small_target, tmp_path, monkeypatch):
    """Without --shared every attack gets its own server and log (SCENARIO/ATTACK/monitor.db):
    the scenario's log holds the honest client only, and the row is read from the attack's."""
    cfg = tmp_path / "monitor.toml"
    cfg.write_text(CONFIG_TOML)
    monkeypatch.setitem(campaign.PLANS, "sybil", [
        PlanRow("jbda x3 seq", "jbda", 300, {"seeds": 30}, 3, "sequential")])
    out = tmp_path / "out"
    rc = campaign.main(["--scenarios", "defended", "--plan", "sybil", "--config", str(cfg),
                        "--target", str(small_target[0]), "--artifacts", str(tmp_path),
                        "--honest", "1", "--honest-queries", "100", "--epochs", "1",
                        "--surrogate", "mlp", "--out", str(out), "--no-progress"])
    assert rc == 0
    with QueryLog(out / "defended" / "monitor.db") as q:
        assert [c for c in q.client_ids()] == [_client_id("defended/honest-0")]
    with QueryLog(out / "defended" / "jbda-x3-seq" / "monitor.db") as q:
        assert len(q.client_ids()) == 3
    [row] = json.loads((out / "campaign.json").read_text())["attacks"]
    assert row["escalated_keys"] == 3 and row["queries_before_80pct_escalated"] == 261
