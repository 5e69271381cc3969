"""Config loading and validation: the shipped default, clear messages for bad thresholds."""
from __future__ import annotations

import pytest

from common.types import Level
from monitor import MonitorConfig, load_config
from monitor.config import DEFAULT_CONFIG_PATH, ConfigError


def test_default_config_loads_with_policies_and_watermark():
    cfg = load_config(None)
    assert cfg.policies[Level.NORMAL] == {"policy": "identity"}
    assert cfg.policies[Level.NOISE] == {"policy": "reverse_sigmoid", "beta": 1.0, "gamma": 0.2,
                                         "preserve_argmax": True}
    assert cfg.policies[Level.LABEL_ONLY]["policy"] == "label_only"
    assert cfg.policies[Level.SWITCH] == {"policy": "misinformation", "mode": "replace"}
    assert cfg.watermark == {"enabled": True, "rate": 0.005}
    assert cfg.ladder.monotone is True
    assert {r.level for r in cfg.rules} >= {Level.NOISE, Level.LABEL_ONLY, Level.SWITCH}
    assert isinstance(cfg, MonitorConfig)


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
