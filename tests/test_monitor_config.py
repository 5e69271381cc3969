"""Config loading and validation: the shipped default, clear messages for bad thresholds."""
from __future__ import annotations

import numpy as np
import pytest

from common.types import Level
from monitor import load_config
from monitor.config import DEFAULT_CONFIG_PATH, ConfigError


def _jbda_like_stream(seeds: np.ndarray, rounds: int, lam: float = 0.05, seed: int = 0):
    """JBDA-style augmentation: each round sends the previous round's images moved by a
    dense sign step of size ``lam`` (a random stand-in for the Jacobian's sign)."""
    rng = np.random.default_rng(seed)
    batches, cur = [seeds], seeds
    for _ in range(rounds):
        cur = np.clip(cur + lam * np.sign(rng.standard_normal(cur.shape)), 0, 1)
        cur = cur.astype(np.float32)
        batches.append(cur)
    return batches


def test_default_config_withholds_answers_from_a_near_copy_stream_only(small_target,
                                                                       tmp_path):
    """The shipped default, end to end through a Monitor and the policies it names: a JBDA-like
    near-copy stream ends at a level that no longer hands out the target's labels, an honest
    stream of distinct images stays at a level that answers with the target's probabilities."""
    import torch

    from common import data, training
    from monitor import Monitor
    from service.defences import PolicyContext, build_policy, pool, pool_train

    torch.set_num_threads(1)
    ap = data.attack_pool()
    pool_train.train_misinformation(pool.model_path(tmp_path, "misinformation"),
                              data.Split(ap.x[:600], ap.y[:600]),
                              data.Split(ap.x[600:900], ap.y[600:900]), epochs=1,
                              progress=False)
    model, _ = training.load_checkpoint(small_target[0])

    def target_proba(x):
        # The small test target (3k images, 3 epochs) is far less confident than the target
        # the OOD thresholds were calibrated on (docs/monitor.md); sharpen its softmax to
        # stand in for that one. Labels are unchanged.
        with torch.inference_mode():
            return torch.softmax(4 * model(training.to_tensor(x)), 1).numpy()

    cfg = load_config(None)
    mon = Monitor(cfg, tmp_path / "m.db")
    identity = build_policy({"policy": "identity"})

    def send(client, x, i):
        lvl = mon.level(client, x)
        probs = target_proba(x)
        ctx = PolicyContext(client, b"k", request_id=f"{client}-{i}")
        mon.observe(client, f"{client}-{i}", x, probs, identity.answer(x, probs, ctx), lvl)

    try:
        seeds = data.attack_pool().x[1000:1150].astype(np.float32) / 255
        for i, batch in enumerate(_jbda_like_stream(seeds, rounds=4)):
            send("jbda", batch, i)
        honest = data.eval_set().x[:750].astype(np.float32) / 255
        for i in range(0, 750, 150):
            send("honest", honest[i:i + 150], i)
        attacker_level, honest_level = mon.level("jbda"), mon.level("honest")
    finally:
        mon.close()

    probe = data.eval_set().x[2000:2300].astype(np.float32) / 255
    target = target_proba(probe)

    def answered(level):
        policy = build_policy(cfg.policies[level], artifacts=tmp_path)
        return policy.answer(probe, target, PolicyContext("c", b"k", request_id="probe"))

    bad = answered(attacker_level)
    assert "target" not in set(bad.model), attacker_level          # another model answers...
    assert (bad.labels == target.argmax(1)).mean() < 0.5, attacker_level   # ...not the truth
    good = answered(honest_level)
    assert good.probs is not None, honest_level
    np.testing.assert_allclose(good.probs, target, atol=1e-6)
    np.testing.assert_array_equal(good.labels, target.argmax(1))


@pytest.mark.parametrize("path", [None, DEFAULT_CONFIG_PATH.with_name("strict.toml")])
def test_shipped_policies_are_valid_defence_specs(path):
    from service.defences.registry import SPECS

    cfg = load_config(path)
    assert set(cfg.policies) == {Level.NORMAL, Level.NOISE, Level.LABEL_ONLY, Level.SWITCH}
    for lvl, spec in cfg.policies.items():
        params = {k: v for k, v in spec.items() if k != "policy"}
        SPECS[spec["policy"]].model_validate(params)  # raises on unknown or bad parameters


def test_strict_profile_differs_only_in_answers():
    strict = load_config(DEFAULT_CONFIG_PATH.with_name("strict.toml"))
    default = load_config(None)
    assert strict.detector_hash() == default.detector_hash()
    assert strict.policies[Level.NORMAL]["policy"] == "reverse_sigmoid"


def _write(tmp_path, text):
    base = DEFAULT_CONFIG_PATH.read_text()
    p = tmp_path / "c.toml"
    p.write_text(base + "\n" + text if text.startswith("[[") else text)
    return p


@pytest.mark.parametrize("text, needle", [
    ("[detectors.prada]\ndelta = 1.5\n", "detectors.prada.delta"),
    ("[detectors.ood]\ntau = -0.1\n", "detectors.ood.tau"),
    ("[detectors.ood]\nthreshold = 1.0\n", "detectors.ood.threshold"),
    ("[detectors.similarity]\nk = 0\n", "detectors.similarity.k"),
    ("[detectors.volume]\nthreshold = 'many'\n", "detectors.volume.threshold"),
    ("[detectors.prada]\ndelat = 0.9\n", "delat"),
    ("[[rules]]\ndetectors = ['prada']\nlevel = 'lable_only'\n", "unknown level 'lable_only'"),
    ("[[rules]]\ndetectors = ['pradaa']\nlevel = 'noise'\n", "unknown detector"),
    ("[[rules]]\ndetectors = ['prada']\nlevel = 'block'\n", "allow_block"),
    ("[[rules]]\ndetectors = ['ood']\nlevel = 'noise'\nmin_hits = 0\n", "min_hits"),
    ("[ladder]\ncooldown_seconds = 60\n", "monotone = false"),
    ("[detectors.ood]\nenabled = false\n[[rules]]\ndetectors = ['ood']\nlevel = 'noise'\n",
     "disabled detector"),
    ("[policies.normal]\npolicy = 'identity'\n", "no policy for level NOISE"),
])
def test_bad_config_rejected_with_clear_message(tmp_path, text, needle):
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, text))
    msg = str(ei.value)
    assert needle in msg and str(tmp_path) in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[detectors\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cooldown_allowed_when_not_monotone(tmp_path):
    cfg = load_config(_write(tmp_path, "[ladder]\nmonotone = false\ncooldown_seconds = 60\n"))
    assert cfg.ladder.cooldown_seconds == 60 and not cfg.ladder.monotone


def test_with_changes_validates_like_a_file_and_leaves_the_original_alone():
    from monitor.config import ConfigError, load_config
    base = load_config()
    cfg = base.with_changes(execution={"checkpoint_every": 77}, log={"durability": "fast"})
    assert (cfg.execution.checkpoint_every, cfg.log.durability) == (77, "fast")
    assert base.execution.checkpoint_every == 2000 and base.log.durability == "commit"
    assert cfg.policies == base.policies and cfg.rules == base.rules
    with pytest.raises(ConfigError, match="execution.checkpoint_every"):
        base.with_changes(execution={"checkpoint_every": 0})
    with pytest.raises(ConfigError, match="no table 'executon'"):
        base.with_changes(executon={"checkpoint_every": 5})
