"""DP-SGD targets (issue 15): training stores the accountant's epsilon, the server serves a DP
checkpoint and shows its epsilon in ModelMetadata, the switching pool takes DP targets."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("opacus")

from common import data, nets, training  # noqa: E402


@pytest.fixture(scope="module")
def dp_artifacts(tmp_path_factory):
    """artifacts/dp/eps8.pt: the target MLP, DP-SGD on 600 train images for 2 epochs (~1 s)."""
    from service.__main__ import main
    from service.defences.pool import dp_path

    artifacts = tmp_path_factory.mktemp("artifacts")
    path = dp_path(artifacts, 8)
    assert main(["train", "--dp-epsilon", "8", "--limit", "600", "--epochs", "2",
                 "--batch-size", "100", "--out", str(path)]) == 0
    return artifacts


def test_dp_training_stores_epsilon_in_metadata(dp_artifacts):
    from service.defences.pool import dp_path

    model, meta = training.load_checkpoint(dp_path(dp_artifacts, 8))
    nets.build("mlp").load_state_dict(model.state_dict())   # the served architecture, exactly
    dp = meta["dp"]
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "epochs", "steps",
                "sample_rate", "accountant"):
        assert key in dp
    assert dp["delta"] == 1e-5 and dp["max_grad_norm"] == 1.0 and dp["epochs"] == 2
    assert dp["steps"] == 2 * 6 and dp["sample_rate"] == pytest.approx(1 / 6)
    # the accountant picked the noise for the budget: spent close to, never above, epsilon 8
    assert 7.0 < dp["epsilon"] <= 8.0 + 1e-6
    assert meta["train_items"] == 600 and meta["training"] == "DP-SGD"
    assert meta["test_accuracy"] > 0.3   # 600 images, 2 noisy epochs; chance is 0.1


def _tiny_dp(noise: float, seed: int = 0):
    split = data.load("fashion", "train").take(300)
    training.seed_everything(seed)
    return training.train_dp(nets.build("mlp"), split.x, split.y, training.DPConfig(
        epochs=1, batch_size=100, noise_multiplier=noise, seed=seed, progress=False))


def test_smaller_noise_spends_more_epsilon():
    _, loud = _tiny_dp(2.0)
    _, quiet = _tiny_dp(0.7)
    assert loud["noise_multiplier"] == 2.0 and quiet["noise_multiplier"] == 0.7
    assert quiet["epsilon"] > loud["epsilon"] > 0
    _, control = _tiny_dp(0.0)   # clipping only: trains, but promises nothing
    assert control["epsilon"] is None

    from service.train import privacy_parameters

    params = privacy_parameters({"dp": control})
    assert params["dp_epsilon"] == "inf" and params["privacy"].startswith("none")


def test_dp_training_is_deterministic_and_validated():
    a, _ = _tiny_dp(1.0)
    b, _ = _tiny_dp(1.0)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert np.array_equal(pa.numpy(), pb.numpy())
    # the plain module comes back: no Opacus hooks or per-sample attributes left
    assert not a._forward_hooks and not a._backward_hooks
    assert not any(hasattr(p, "grad_sample") for p in a.parameters())
    split = data.load("fashion", "train").take(50)
    with pytest.raises(ValueError, match="exactly one"):
        training.train_dp(nets.build("mlp"), split.x, split.y, training.DPConfig(
            epochs=1, target_epsilon=3.0, noise_multiplier=1.0, progress=False))


def test_dp_target_serves_and_shows_epsilon(dp_artifacts, tmp_path):
    from client.api import ModelClient
    from service.defences.pool import dp_path
    from tests.conftest import start_server

    _, meta = training.load_checkpoint(dp_path(dp_artifacts, 8))
    server, plane, _ = start_server(dp_path(dp_artifacts, 8), tmp_path)
    try:
        with ModelClient(server.address, "tester") as client:
            md = client.model_metadata()
            params = dict(md.parameters)
            assert params["privacy"] == "DP-SGD"
            assert float(params["dp_epsilon"]) == pytest.approx(meta["dp"]["epsilon"], rel=1e-3)
            assert params["dp_delta"] == "1e-05" and params["dp_accountant"] == "rdp"
            x = data.eval_set().x[:16]
            answer, _ = client.predict_batch(x)
        model, _ = training.load_checkpoint(dp_path(dp_artifacts, 8))
        expected = training.predict_proba(model, x)
        np.testing.assert_allclose(answer.probs, expected, atol=1e-6)
    finally:
        server.stop(0.5)


def test_plain_target_says_no_privacy():
    from service.train import privacy_parameters

    assert privacy_parameters({"arch": "mlp"}) == {"privacy": "none"}


def test_serve_option_selects_the_dp_target(dp_artifacts, tmp_path, monkeypatch):
    import service.__main__ as cli
    from service.defences.pool import dp_path

    seen = {}

    def fake_build(cfg):
        seen["target"] = cfg.target
        raise SystemExit(0)   # stop before a server starts

    monkeypatch.setattr("service.dataplane.build_dataplane", fake_build)
    with pytest.raises(SystemExit):
        cli.main(["serve", "--dp", "8", "--artifacts", str(dp_artifacts), "--port", "0",
                  "--open-keys", "--dev-secret"])
    assert seen["target"] == dp_path(dp_artifacts, 8)
    # a budget with no checkpoint: a clear error, no server
    assert cli.main(["serve", "--dp", "2", "--artifacts", str(tmp_path), "--open-keys",
                     "--dev-secret"]) == 2


def test_dp_target_in_the_switching_pool(dp_artifacts):
    from service.defences import PolicyContext, build_policy
    from service.defences.pool import load_model

    pol = build_policy({"policy": "switch", "models": ["target", "dp_eps8"]},
                       artifacts=dp_artifacts)
    x = data.eval_set().x[:64].astype(np.float32) / 255.0
    target_probs = np.full((64, 10), 0.1, np.float32)
    target_probs[:, 0] = 0.55
    target_probs /= target_probs.sum(1, keepdims=True)
    ans = pol.answer(x, target_probs, PolicyContext("c", b"k"))
    routed = np.array(ans.model) == "dp_eps8"
    assert 0 < routed.sum() < 64
    dp_probs = load_model(dp_artifacts, "dp_eps8").predict_proba(x)
    np.testing.assert_allclose(ans.probs[routed], dp_probs[routed], atol=1e-4)
    assert load_model(dp_artifacts, "dp_eps8").meta["dp"]["epsilon"] <= 8.0 + 1e-6
    with pytest.raises(FileNotFoundError, match="--dp-epsilon 1"):
        build_policy({"policy": "switch", "models": ["target", "dp_eps1"]},
                     artifacts=dp_artifacts)
    with pytest.raises(ValueError, match="unknown pool model"):
        build_policy({"policy": "switch", "models": ["dp_epsx"]}, artifacts=dp_artifacts)
