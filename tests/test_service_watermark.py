"""The watermark as shipped: the default profile (watermark on) behind a real in-process server."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common import data, training
from common.types import Level

N = 8000          # at the default rate 0.005: ~40 watermarked answers expected
PER_KEY = 500     # honest clients with a modest share each


def tiny_pool(root):
    """The default profile's SWITCH level needs the misinformation model: a tiny one."""
    from service.defences import pool

    torch.set_num_threads(1)
    x = data.attack_pool().x
    y = data.attack_pool().y
    train, test = data.Split(x[:600], y[:600]), data.Split(x[600:900], y[600:900])
    pool.train_misinformation(pool.model_path(root, "misinformation"), train, test, epochs=1,
                              progress=False)


@pytest.fixture(scope="module")
def shipped_server(small_target, tmp_path_factory):
    from monitor import load_config
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    root = tmp_path_factory.mktemp("shipped")
    tiny_pool(root)
    cfg = ServerConfig(port=0, max_batch=256, workers=4, artifacts=root,
                       target=small_target[0], monitor_db=root / "monitor.db", grace_s=1.0,
                       secret="shipped-secret", dev_secret=True, open_keys=True)
    plane = build_dataplane(cfg, load_config(None))     # the default profile, unchanged
    server = Server(cfg, plane).start()
    yield server, plane
    server.stop(0.5)


def ask(address, prefix, x):
    from client.api import ModelClient

    labels, probs = [], []
    for i in range(0, len(x), PER_KEY):
        with ModelClient(address, f"{prefix}-{i // PER_KEY}", batch_size=250) as c:
            a = c.predict(x[i:i + PER_KEY])
        labels.append(a.labels)
        probs.append(a.probs)
    return np.concatenate(labels), np.concatenate(probs)


def test_shipped_watermark_rate_labels_and_determinism(shipped_server, small_target):
    server, plane = shipped_server
    x = data.eval_set().x[:N]
    model, _ = training.load_checkpoint(small_target[0])
    target = training.predict_proba(model, x).argmax(1)

    labels, probs = ask(server.address, "honest", x)
    # every honest client was answered with probabilities at a level that keeps the target's
    # labels (NORMAL here): differences from the target are the watermark's, not a defence's
    levels = {plane.monitor.level(server.client_id(f"honest-{k}")) for k in range(N // PER_KEY)}
    assert levels <= {Level.NORMAL, Level.NOISE}, levels
    changed = labels != target
    rate = changed.mean()
    assert 0.0025 <= rate <= 0.0085, (changed.sum(), rate)     # configured rate 0.005
    # the watermarked answers are consistent lies: the probabilities back the wrong label
    np.testing.assert_array_equal(probs[changed].argmax(1), labels[changed])

    # repeating the same images (other keys, other batches) gives the same watermarked answers
    again, _ = ask(server.address, "repeat", x[::-1].copy())
    again = again[::-1]
    np.testing.assert_array_equal(again, labels)
