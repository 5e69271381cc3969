"""The watermark as shipped: the default profile (watermark on) behind a real in-process server."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common import data, training
from common.types import Level

N = 5000          # the evaluation images (test 5000-9999), 10 honest keys
PER_KEY = 500     # honest clients with a modest share each


def tiny_pool(root):
    """The default profile's SWITCH level needs the misinformation model: a tiny one."""
    from service.defences import pool, pool_train

    torch.set_num_threads(1)
    x = data.attack_pool().x
    y = data.attack_pool().y
    train, test = data.Split(x[:600], y[:600]), data.Split(x[600:900], y[600:900])
    pool_train.train_misinformation(pool.model_path(root, "misinformation"), train, test, epochs=1,
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


def ask_one(address, key, x):
    from client.api import ModelClient

    with ModelClient(address, key, batch_size=250) as c:
        a = c.predict(x)
    return a.labels, a.probs


def within(observed: int, expected: float) -> bool:
    """A count of marks close to its expectation (~4 binomial standard deviations)."""
    return abs(observed - expected) <= 4 * np.sqrt(max(expected, 1.0)) + 2


def test_shipped_watermark_rate_labels_and_determinism(shipped_server, small_target):
    """Whatever schedule the default profile ships (flat, or light keys unmarked up to a knee):
    the marks follow it, they are consistent lies, a key asking again keeps its marks, and
    another key asking the same images gets its own wrong labels."""
    server, plane = shipped_server
    wm = plane.watermark
    assert wm is not None, "the default profile ships the watermark on"
    x = data.eval_set().x[:N]
    model, _ = training.load_checkpoint(small_target[0])
    tprobs = training.predict_proba(model, x)
    target = tprobs.argmax(1)
    eligible = wm.in_band(tprobs.max(1))            # the schedule's confidence band

    labels, probs = ask(server.address, "honest", x)
    # every honest client was answered with probabilities at a level that keeps the target's
    # labels (NORMAL here): differences from the target are the watermark's, not a defence's
    levels = {plane.monitor.level(server.client_id(f"honest-{k}"))
              for k in range(len(x) // PER_KEY)}
    assert levels <= {Level.NORMAL, Level.NOISE}, levels
    changed = labels != target
    expected = sum(wm.expected_marks(PER_KEY, eligible[i:i + PER_KEY].mean())
                   for i in range(0, len(x), PER_KEY))
    assert within(changed.sum(), expected), (changed.sum(), expected)
    if wm.knee >= PER_KEY:
        assert not changed.any()                  # light keys are never flipped
    assert not changed[~eligible].any()
    # the watermarked answers are consistent lies: the probabilities back the wrong label
    np.testing.assert_array_equal(probs[changed].argmax(1), labels[changed])

    # other keys asking the same images: where both are marked, each gets its own wrong label
    rep, _ = ask(server.address, "repeat", x)
    both = changed & (rep != target)
    if wm.knee < PER_KEY:
        assert both.sum() >= 5, both.sum()
        assert np.mean(rep[both] != labels[both]) > 0.6, (rep[both], labels[both])

    # one heavy key (pool images no other key asked), twice. The tiny test target makes the OOD
    # rule send it to SWITCH (misinformation labels) after ~700 queries, so its marks are read
    # from the monitor's log (which flags every marked item) rather than from label changes
    from service.defences.__main__ import db_records

    H = 5000          # the whole pool: enough marks at the shipped rate for the count check
    xh = data.attack_pool().x[:H]
    elig_h = wm.in_band(training.predict_proba(model, xh).max(1))
    ask_one(server.address, "heavy", xh)
    ask_one(server.address, "heavy", xh)
    plane.monitor.flush()
    rec = db_records(server_db(plane))
    cid = server.client_id("heavy")
    mine = np.array([c == cid for c in rec.cids])
    qn = rec.qns[mine]
    first = qn <= H
    exp_h = wm.expected_marks(H, elig_h.mean())
    # (the tiny target is rarely confident: under a confidence band few answers may qualify)
    assert exp_h > 2 and within(first.sum(), exp_h), (first.sum(), exp_h)
    assert first.sum() >= 1
    assert (qn[first] > wm.knee).all()                       # nothing marked up to the knee
    assert wm.in_band(rec.conf[mine]).all()                # only answers in the band
    # every image marked in the first pass is marked again in the second (the rate only grows)
    imgs = (rec.images[mine] * 255).round().astype(np.uint8).reshape(len(qn), -1)
    second = {r.tobytes() for r in imgs[~first]}
    assert all(r.tobytes() in second for r in imgs[first])


def server_db(plane):
    """The monitor's database file (its SQLite store's path)."""
    return plane.monitor.store.path
