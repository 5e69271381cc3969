"""DataPlane's per-request logic with a fake model and a fake monitor (no gRPC, no detectors)."""
from __future__ import annotations

import numpy as np
import pytest

from common.types import Answer, AnswerKind, Level
from service.dataplane import DataPlane
from service.defences import Watermark, build_policy
from service.errors import PermissionDenied

KEY = b"dataplane-test-key"


class FakeModel:
    """Deterministic probabilities: each image's class is its mean pixel bucket."""
    name = "fake"
    version = "1"
    meta: dict = {}

    def __init__(self):
        self.calls = 0

    def predict_proba(self, images):
        self.calls += 1
        n = len(images)
        cls = (images.reshape(n, -1).mean(1) * 10).astype(int).clip(0, 9)
        p = np.full((n, 10), 0.02, np.float32)
        p[np.arange(n), cls] = 0.82
        return p


class FakeMonitor:
    """Returns a fixed level and records what observe() receives."""

    def __init__(self, level=Level.NORMAL):
        self.lvl = level
        self.seen = []

    def level(self, client_id, images=None):
        return self.lvl

    def observe(self, client_id, request_id, images, probs, answer, level):
        self.seen.append(dict(client=client_id, request=request_id, images=images,
                              probs=probs, answer=answer, level=level))
        return level

    def ready(self):
        return True

    def queries(self, client_id):
        return sum(len(s["images"]) for s in self.seen if s["client"] == client_id)

    def close(self):
        pass


class Tagged:
    """A policy that answers like identity and tags every item with its own name, so the test
    sees which level's policy answered."""

    def __init__(self, tag):
        self.name = tag

    def answer(self, images, probs, ctx):
        return Answer(probs.argmax(1), probs.copy(), AnswerKind.PROBABILITIES,
                      [self.name] * len(probs))


def images(n=400, seed=0):
    # spread the mean pixel over all 10 buckets so FakeModel's labels vary
    rng = np.random.default_rng(seed)
    base = rng.random((n, 1, 1)).astype(np.float32)
    return np.clip(base + 0.01 * rng.standard_normal((n, 28, 28)), 0, 1).astype(np.float32)


def plane(level=Level.NORMAL, policies=None, watermark=None):
    mon = FakeMonitor(level)
    policies = policies or {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    return DataPlane(FakeModel(), mon, policies, watermark, KEY, max_batch=512), mon


@pytest.mark.parametrize("level", [Level.NORMAL, Level.NOISE, Level.LABEL_ONLY, Level.SWITCH])
def test_the_monitors_level_selects_the_policy(level):
    p, _ = plane(level)
    r = p.predict("c", "r1", images(20))
    assert r.level == level
    assert set(r.answer.model) == {level.name}


def test_label_only_answers_carry_no_probabilities():
    policies = {lvl: build_policy({"policy": "identity"}) for lvl in Level if lvl != Level.BLOCK}
    policies[Level.LABEL_ONLY] = build_policy({"policy": "label_only"})
    p, _ = plane(Level.LABEL_ONLY, policies)
    x = images(50)
    r = p.predict("c", "r1", x)
    assert r.answer.probs is None and r.answer.kind == AnswerKind.LABEL_ONLY
    np.testing.assert_array_equal(r.answer.labels, FakeModel().predict_proba(x).argmax(1))


def test_blocked_client_is_refused_before_the_model_runs():
    p, mon = plane(Level.BLOCK)
    with pytest.raises(PermissionDenied, match="blocked"):
        p.predict("mallory", "r1", images(5))
    assert p.model.calls == 0 and mon.seen == []


def test_observe_gets_the_target_probabilities_and_the_answer_actually_sent():
    policies = {lvl: build_policy({"policy": "identity"}) for lvl in Level if lvl != Level.BLOCK}
    policies[Level.NOISE] = build_policy({"policy": "reverse_sigmoid", "beta": 1.0,
                                          "gamma": 0.2})
    p, mon = plane(Level.NOISE, policies, Watermark(KEY, rate=0.2))
    x = images(200)
    r = p.predict("alice", "req-7", x)
    (seen,) = mon.seen
    assert seen["client"] == "alice" and seen["request"] == "req-7"
    assert seen["level"] == Level.NOISE
    target = FakeModel().predict_proba(x)
    np.testing.assert_allclose(seen["probs"], target)            # the target's, not the answer's
    assert seen["answer"] is r.answer                            # the answer that was returned
    assert not np.allclose(r.answer.probs, target)               # (which differs from the target)
    assert r.answer.watermarked.any()


def test_want_probabilities_false_strips_probabilities():
    p, mon = plane(Level.NORMAL)
    x = images(30)
    r = p.predict("c", "r1", x, want_probabilities=False)
    assert r.answer.probs is None and r.answer.kind == AnswerKind.LABEL_ONLY
    np.testing.assert_array_equal(r.answer.labels, FakeModel().predict_proba(x).argmax(1))
    assert mon.seen[0]["answer"].probs is None                   # the monitor logs what was sent
    assert p.predict("c", "r2", x).answer.probs is not None


class OtherModel:
    """A policy answering from another model: its labels ignore the target's probabilities."""
    name = "other"

    def answer(self, images, probs, ctx):
        n = len(images)
        labels = (FakeModel().predict_proba(images).argmax(1) + 3) % 10
        return Answer(labels, None, AnswerKind.LABEL_ONLY, ["other"] * n)


def test_watermark_is_applied_after_the_policy():
    """The policy's answer is what gets watermarked: had the watermark been applied to the
    target's answer before the policy, a policy answering from another model would drop it."""
    wm = Watermark(KEY, rate=0.2)
    policies = {lvl: OtherModel() for lvl in Level if lvl != Level.BLOCK}
    x = images(400)
    policy_labels = OtherModel().answer(x, None, None).labels
    p, mon = plane(Level.NORMAL, policies, wm)
    r = p.predict("c", "r1", x)
    changed = r.answer.labels != policy_labels
    assert 40 < changed.sum() < 130                              # ~20% of 400
    np.testing.assert_array_equal(changed, r.answer.watermarked)
    assert set(r.answer.model) == {"other"}
    # the same plane without a watermark sends the policy's labels unchanged
    q, _ = plane(Level.NORMAL, policies, None)
    np.testing.assert_array_equal(q.predict("c", "r1", x).answer.labels, policy_labels)


def test_watermark_after_a_probability_policy_keeps_label_and_probabilities_consistent():
    wm = Watermark(KEY, rate=0.2)
    policies = {lvl: build_policy({"policy": "identity"}) for lvl in Level if lvl != Level.BLOCK}
    p, _ = plane(Level.NORMAL, policies, wm)
    x = images(400)
    r = p.predict("c", "r1", x)
    target = FakeModel().predict_proba(x)
    wmk = r.answer.watermarked
    assert wmk.any()
    # the sent probabilities agree with the sent (watermarked) label, not the target's
    np.testing.assert_array_equal(r.answer.probs.argmax(1), r.answer.labels)
    assert (r.answer.labels[wmk] != target.argmax(1)[wmk]).all()
    np.testing.assert_allclose(r.answer.probs[~wmk], target[~wmk])


def test_missing_policy_is_rejected():
    with pytest.raises(ValueError, match="SWITCH"):
        DataPlane(FakeModel(), FakeMonitor(), {lvl: Tagged("x") for lvl in
                                               (Level.NORMAL, Level.NOISE, Level.LABEL_ONLY)},
                  None, KEY, 64)
