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


@pytest.mark.parametrize("where", ["common.training", "service.dataplane"])
def test_a_model_answers_the_same_bits_on_any_thread(small_target, where):
    """torch.set_num_threads(1) in the main thread; a fresh thread (as a gRPC worker is) that
    runs the model first thing answers bit for bit as the main thread does. Without
    training.thread_ready the fresh thread's matrix products took OpenMP's default of every
    core and differed in the last bits (seen on a 2-core AVX-512 machine)."""
    import threading

    from service.dataplane import TargetModel
    path, _ = small_target
    x = data.attack_pool().x[:40]
    if where == "common.training":
        model, _ = training.load_checkpoint(path)
        run = lambda: training.predict_proba(model, x)            # noqa: E731
    else:
        target = TargetModel.load(path)
        xf = x.astype(np.float32) / 255.0
        run = lambda: target.predict_proba(xf)                    # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main = run()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("p", run()))
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    assert main.shape == (40, 10)
    np.testing.assert_array_equal(out["p"], main)


def test_the_served_model_gives_an_image_the_same_bits_whatever_it_is_sent_with(small_target):
    """The served target (float64, rounded once): each image's probabilities are the same bits
    alone, among 2 others, 39 others or 256 others, and close to the float32 model's. In float32
    one image alone and among 7 others differed in the last bits (a 2-core AVX-512 machine),
    which broke the functionally equivalent extraction over gRPC."""
    from service.dataplane import TargetModel
    path, _ = small_target
    target = TargetModel.load(path)
    x = data.attack_pool().x[:257].astype(np.float32) / 255.0
    alone = np.concatenate([target.predict_proba(x[i:i + 1]) for i in range(len(x))])
    assert alone.dtype == np.float32
    for n in (3, 40, 257):
        np.testing.assert_array_equal(target.predict_proba(x[:n]), alone[:n])
    model, _ = training.load_checkpoint(path)
    np.testing.assert_allclose(training.predict_proba(model, x), alone, atol=1e-5)
