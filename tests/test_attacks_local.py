"""Every attack end to end against an in-process LocalOracle on a small real target: it beats
chance clearly, never asks for more than its budget, and reports what it used."""
from __future__ import annotations

import numpy as np
import pytest

from client.attacks import ATTACKS
from client.oracle import BudgetExceeded, LocalOracle
from common import data, training
from common.training import TrainConfig

# (registry name, extra params, budget, minimum fidelity on 1,000 evaluation images)
CASES = [
    ("copycat", {}, 500, 0.5),
    ("copycat-labels", {}, 500, 0.5),
    ("knockoff", {"sampling": "random"}, 1000, 0.3),
    ("knockoff", {"sampling": "adaptive", "step_queries": 100}, 1000, 0.3),
    ("knockoff", {"sampling": "adaptive", "arms": "kmeans", "n_arms": 8}, 600, 0.2),
    ("jbda", {"seeds": 100}, 500, 0.4),
    ("jbda", {"seeds": 100, "tau": 1, "kappa": 150, "round_epochs": 1}, 500, 0.4),
    ("activethief", {"selection": "uncertainty", "rounds": 2}, 500, 0.4),
    ("activethief", {"selection": "kcenter", "rounds": 2}, 500, 0.4),
    ("activethief", {"selection": "random", "rounds": 2}, 500, 0.4),
    ("interleaved-jbda", {"seeds": 100, "natural": 0.5}, 500, 0.4),
]


@pytest.fixture(scope="module")
def target(small_target):
    model, _ = training.load_checkpoint(small_target[0])
    return model


@pytest.fixture(scope="module")
def eval_small():
    return data.eval_set().take(1000)


def build(name, oracle, budget, params, seed=0, epochs=3):
    cls = ATTACKS[name]
    kw = dict(params)
    for need in cls.needs:
        kw[need] = {"pool": data.attack_pool, "ood": data.ood_pool}[need]()
    return cls(oracle, budget, seed=seed, surrogate="mlp", progress=False,
               train_config=TrainConfig(epochs=epochs, batch_size=64, seed=seed, progress=False),
               **kw)


def fidelity(model, target, split):
    s = training.predict_proba(model, split.x).argmax(1)
    t = training.predict_proba(target, split.x).argmax(1)
    return float(np.mean(s == t)), float(np.mean(s == split.y))


@pytest.mark.parametrize("name,params,budget,min_fid", CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}" for c in CASES])
def test_attack_beats_chance_within_budget(name, params, budget, min_fid, target, eval_small):
    oracle = LocalOracle(lambda x: training.predict_proba(target, x), budget)
    result = build(name, oracle, budget, params).run()  # BudgetExceeded would fail the test
    assert 0 < result.queries_used <= budget
    assert result.queries_used == oracle.queries_used
    assert result.answer_kinds == {"probabilities": oracle.queries_used}
    assert result.wall_time_s > 0
    fid, acc = fidelity(result.surrogate, target, eval_small)
    assert fid > min_fid and acc > min_fid - 0.05, (fid, acc)


def test_every_attack_parameter_is_a_cli_flag_with_its_default(capsys):
    """`python -m client ATTACK --help` shows each of the attack's parameters as a flag with its
    default, and a value of the wrong type is refused by the parser (exit 2) before any query."""
    from client.cli import main

    seen = 0
    for name, cls in ATTACKS.items():
        with pytest.raises(SystemExit) as ex:
            main([name, "--help"])
        assert ex.value.code == 0
        out = " ".join(capsys.readouterr().out.split())
        for pname, (ptype, default, _) in cls.params.items():
            flag = "--" + pname.replace("_", "-")
            assert flag in out, (name, flag)
            seen += 1
            if ptype is bool:
                continue
            assert f"(default: {default})" in out, (name, pname)
            if ptype in (int, float):
                with pytest.raises(SystemExit) as ex:
                    main([name, "--local", flag, "not-a-number"])
                assert ex.value.code == 2
                assert "invalid" in capsys.readouterr().err
    assert seen >= 5     # the registry has attacks with parameters


@pytest.mark.parametrize("name", ["copycat-labels", "jbda", "activethief", "knockoff"])
def test_label_only_answers_suffice(name, target, eval_small):
    oracle = LocalOracle(lambda x: training.predict_proba(target, x), 400, labels_only=True)
    result = build(name, oracle, 400, {"seeds": 100} if name == "jbda" else {}).run()
    assert result.queries_used <= 400
    assert result.answer_kinds == {"label_only": result.queries_used}
    assert fidelity(result.surrogate, target, eval_small)[0] > 0.2


def test_budget_is_a_hard_limit(target):
    """A budget smaller than what the attack would like: it stops exactly there."""
    for name, params in [("jbda", {"seeds": 150}), ("interleaved-jbda", {"seeds": 150}),
                         ("knockoff", {"sampling": "adaptive", "step_queries": 64}),
                         ("activethief", {"rounds": 3})]:
        oracle = LocalOracle(lambda x: training.predict_proba(target, x), 333)
        result = build(name, oracle, 333, params, epochs=1).run()
        assert result.queries_used <= 333 and oracle.queries_used <= 333
        with pytest.raises(BudgetExceeded):
            oracle(np.zeros((oracle.remaining + 1, 28, 28), np.uint8))


def test_pool_limited_attacks_refuse_impossible_budgets(target):
    oracle = LocalOracle(lambda x: training.predict_proba(target, x), None)
    for name in ("copycat", "activethief"):
        with pytest.raises(ValueError, match="exceeds the pool"):
            build(name, oracle, 20_000, {})
    assert oracle.queries_used == 0


def test_seeded_runs_repeat(target):
    runs = []
    for _ in range(2):
        oracle = LocalOracle(lambda x: training.predict_proba(target, x), 300)
        r = build("jbda", oracle, 300, {"seeds": 60}, epochs=1).run()
        runs.append(r.surrogate.fc1.weight.detach().numpy().copy())
    np.testing.assert_array_equal(runs[0], runs[1])
