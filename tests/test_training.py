import numpy as np
import pytest
import torch

from common import data, nets, training


def test_target_metadata_and_accuracy(small_target):
    path, meta = small_target
    for key in ("arch", "seed", "epochs", "test_accuracy", "data_fingerprint", "train_items"):
        assert key in meta
    assert meta["train_items"] == 3000
    assert meta["test_accuracy"] > 0.70  # 3k images, 3 epochs; chance is 0.10
    model, loaded = training.load_checkpoint(path)
    assert loaded["test_accuracy"] == meta["test_accuracy"]
    # the loaded model predicts: on the test split it scores what the metadata says it did
    ev = data.load("fashion", "test")
    acc = training.accuracy(training.predict_proba(model, ev.x).argmax(1), ev.y)
    assert abs(acc - meta["test_accuracy"]) < 1e-6


def test_training_is_deterministic(tmp_path):
    from service.train import train_target

    a = train_target(tmp_path / "a.pt", epochs=1, limit=500, progress=False)
    b = train_target(tmp_path / "b.pt", epochs=1, limit=500, progress=False)
    ma, _ = training.load_checkpoint(tmp_path / "a.pt")
    mb, _ = training.load_checkpoint(tmp_path / "b.pt")
    for pa, pb in zip(ma.state_dict().values(), mb.state_dict().values()):
        assert torch.equal(pa, pb)
    assert a["test_accuracy"] == b["test_accuracy"]


def test_soft_targets_train():
    split = data.load("fashion", "train").take(400)
    onehot = np.eye(10, dtype=np.float32)[split.y]
    m = training.train(nets.build("mlp"), split.x, onehot,
                       training.TrainConfig(epochs=5, progress=False))
    assert training.accuracy(training.predict_proba(m, split.x).argmax(1), split.y) > 0.6


def test_protocol_splits_are_disjoint():
    pool, ev = data.attack_pool(), data.eval_set()
    assert len(pool) == len(ev) == 5000
    test = data.load("fashion", "test")
    assert np.array_equal(pool.x, test.x[:5000]) and np.array_equal(ev.x, test.x[5000:])


def test_missing_data_says_how_to_fix(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def no_network(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(tvd.FashionMNIST, "download", no_network)
    data._load.cache_clear()
    with pytest.raises(data.DataUnavailable, match="MODELGUARD_DATA"):
        data.load("fashion", "test", root=tmp_path)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        nets.build("resnet")
