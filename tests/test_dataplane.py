"""DataPlane's per-request logic with a fake model and a fake monitor (no gRPC, no detectors)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from common.steps import Blocking
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

    def observe(self, client_id, request_id, images, probs, answer, level, *, wait=True):
        self.seen.append(dict(client=client_id, request=request_id, images=images,
                              probs=probs, answer=answer, level=level))
        return level

    def wait_durable(self, client_id):
        pass

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


def test_images_not_in_the_decoded_form_are_refused_before_anything_runs():
    from service.errors import InvalidInput
    p, mon = plane()
    x = images(4)
    for bad in ((x * 255).astype(np.uint8), x.astype(np.float64), x.reshape(4, 784), x[0]):
        with pytest.raises(InvalidInput, match=r"float32 images of shape \(N, 28, 28\)"):
            p.predict("c", "r1", bad)
    assert p.model.calls == 0 and mon.seen == []
    assert p.predict("c", "r1", x).level == Level.NORMAL     # the decoded form still passes


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


class SlowModel(FakeModel):
    """FakeModel that takes ``seconds`` and counts how many calls run at once."""

    def __init__(self, seconds=0.05):
        super().__init__()
        self.seconds = seconds
        self.now = self.peak = 0
        self._lock = threading.Lock()

    def predict_proba(self, images):
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(self.seconds)
        with self._lock:
            self.now -= 1
        return super().predict_proba(images)


def _concurrently(fns):
    start = threading.Barrier(len(fns))
    errors = []

    def run(fn):
        start.wait()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    ts = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    assert not errors, errors


@pytest.mark.parametrize("slots, n, peak", [
    ({"compute_slots": 1}, 4, 1), ({"compute_slots": 2}, 4, 2), ({"compute_slots": 0}, 4, 4),
    # small requests (<= small_request_items) compute one at a time in a slot of their own
    ({"small_request_items": 16}, 16, 1), ({"small_request_items": 0}, 16, 4)])
def test_compute_slots_bound_the_requests_computing_at_once(slots, n, peak):
    model = SlowModel()
    policies = {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    p = DataPlane(model, FakeMonitor(), policies, None, KEY, 512, **slots)
    x = images(n)
    _concurrently([lambda c=c: p.predict(f"c{c}", None, x) for c in range(4)])
    assert model.peak == peak and model.calls == 4


def test_large_requests_do_not_wait_for_the_small_requests_slot():
    """Above small_request_items a request follows compute_slots (here no limit): two large
    requests and a small one compute at once; two small ones never do."""
    model = SlowModel()
    policies = {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    p = DataPlane(model, FakeMonitor(), policies, None, KEY, 512, small_request_items=16)
    big, few = images(17), images(1)
    _concurrently([lambda: p.predict("a", None, big), lambda: p.predict("b", None, big),
                   lambda: p.predict("c", None, few), lambda: p.predict("d", None, few)])
    assert model.peak == 3 and model.calls == 4


def test_a_request_waiting_for_its_commit_does_not_hold_the_compute_slot():
    """The one slot covers computing only: while one client's answer waits for the log's
    commit, another client's request is computed and answered."""
    release = threading.Event()

    class SlowDisk(FakeMonitor):
        def wait_durable(self, client_id):
            if client_id == "slow" and not release.wait(5):
                raise AssertionError("never released")

    mon = SlowDisk()
    policies = {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    p = DataPlane(FakeModel(), mon, policies, None, KEY, 512, compute_slots=1)
    done = []
    slow = threading.Thread(target=lambda: done.append(p.predict("slow", "r1", images(3))))
    slow.start()
    deadline = time.monotonic() + 5
    while not mon.seen and time.monotonic() < deadline:   # "slow" is now waiting to commit
        time.sleep(0.005)
    fast = p.predict("fast", "r2", images(3))             # would block here if it held the slot
    assert fast.level == Level.NORMAL and not done
    release.set()
    slow.join(5)
    assert len(done) == 1


def test_compute_slots_must_not_be_negative():
    with pytest.raises(ValueError, match="compute_slots must be >= 0"):
        DataPlane(FakeModel(), FakeMonitor(), {}, None, KEY, 512, compute_slots=-1)
    with pytest.raises(ValueError, match="small_request_items must be >= 0"):
        DataPlane(FakeModel(), FakeMonitor(), {}, None, KEY, 512, small_request_items=-1)


@pytest.mark.parametrize("slots", [0, 1])
def test_time_waiting_for_a_compute_slot_is_reported_apart(slots):
    """With compute slots, the metrics get the wait for a slot as its own stage (queue) and
    the model stage excludes it; without, no queue stage is reported."""
    class Stages:
        def __init__(self):
            self.calls = []

        def stages(self, model_s, policy_s, monitor_s, queue_s=None):
            self.calls.append((model_s, queue_s))

        def client_level(self, client, level):
            pass

    model = SlowModel(seconds=0.2)
    policies = {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    p = DataPlane(model, FakeMonitor(), policies, None, KEY, 512, compute_slots=slots)
    p.metrics = Stages()
    _concurrently([lambda c=c: p.predict(f"c{c}", None, images(2)) for c in range(2)])
    assert len(p.metrics.calls) == 2
    assert all(0.19 < m < 0.38 for m, _ in p.metrics.calls)    # the model's own time only
    if slots:
        assert sorted(q > 0.19 for _, q in p.metrics.calls) == [False, True]  # one waited
    else:
        assert [q for _, q in p.metrics.calls] == [None, None]


# -- a prediction as steps (common.steps): what leaves the driver's thread ----------------------

class WaitingMonitor(FakeMonitor):
    """FakeMonitor with steps (common.steps): its level and durable wait are Blocking steps
    when ``waits``, else computed in place; observe is a Blocking step when
    ``observe_waits``; it records the thread of each call."""

    def __init__(self, waits: bool, fail_level: Exception | None = None,
                 observe_waits: bool = False):
        super().__init__()
        self.waits, self.fail_level, self.threads = waits, fail_level, {}
        self.observe_waits = observe_waits

    def observe_steps(self, *args):
        if self.observe_waits:
            return (yield Blocking(self.observe, *args))
        return self.observe(*args)

    def observe(self, *args, **kw):
        self.threads["observe"] = threading.current_thread().name
        return super().observe(*args, **kw)

    def level_steps(self, client_id, images=None):
        if self.waits:
            return (yield Blocking(self.level, client_id, images))
        return self.level(client_id, images)

    def durable_steps(self, client_id):
        if self.waits:
            yield Blocking(self.wait_durable, client_id)

    def level(self, client_id, images=None):
        self.threads["level"] = threading.current_thread().name
        if self.fail_level is not None:
            raise self.fail_level
        return super().level(client_id, images)

    def wait_durable(self, client_id):
        self.threads["durable"] = threading.current_thread().name


def _steps_plane(mon, small_items=16):
    policies = {lvl: Tagged(lvl.name) for lvl in Level if lvl != Level.BLOCK}
    return DataPlane(FakeModel(), mon, policies, None, KEY, max_batch=512,
                     small_request_items=small_items)


def test_a_small_request_yields_only_the_monitor_calls_that_may_wait():
    # a monitor that never waits: the whole request computes where it is driven
    p = _steps_plane(WaitingMonitor(False))
    steps = p.predict_steps("c", "r1", images(4))
    with pytest.raises(StopIteration) as done:
        steps.send(None)
    assert done.value.value.level == Level.NORMAL and p.model.calls == 1
    # one that may: its level and its durable wait are handed out, the model runs in between
    p = _steps_plane(WaitingMonitor(True))
    steps = p.predict_steps("c", "r2", images(4))
    first = steps.send(None)
    assert p.model.calls == 0
    second = steps.send(first.fn(*first.args))
    assert p.model.calls == 1 and len(p.monitor.seen) == 1
    assert second.fn(*second.args) is None
    with pytest.raises(StopIteration) as done:
        steps.send(None)
    assert done.value.value.answer.labels.shape == (4,)


def test_a_large_request_is_one_step_that_does_everything_where_it_runs():
    p = _steps_plane(WaitingMonitor(False))
    steps = p.predict_steps("c", "r1", images(17))     # above small_request_items
    step = steps.send(None)
    assert p.model.calls == 0 and p.monitor.seen == []
    result = step.fn(*step.args)
    assert p.model.calls == 1 and len(p.monitor.seen) == 1
    with pytest.raises(StopIteration) as done:
        steps.send(result)
    assert done.value.value is result


def test_steps_on_an_event_loop_run_the_waits_in_the_executor_and_errors_come_back():
    import asyncio
    from concurrent import futures

    from monitor.log import LogUnavailable
    from service.errors import NotReady
    from common.steps import run_steps_async

    with futures.ThreadPoolExecutor(1, thread_name_prefix="waits") as ex:
        mon = WaitingMonitor(True)
        p = _steps_plane(mon)
        loop_thread = []

        async def go(plane):
            loop_thread.append(threading.current_thread().name)
            return await run_steps_async(plane.predict_steps("c", "r1", images(3)), ex)

        r = asyncio.run(go(p))
        assert r.answer.labels.shape == (3,)
        assert mon.threads["level"].startswith("waits")
        assert mon.threads["durable"].startswith("waits")
        assert not mon.threads["observe"].startswith("waits")      # it said it need not wait
        # an observe that may wait (another thread holds what it needs) runs in the executor
        busy = WaitingMonitor(False, observe_waits=True)
        r = asyncio.run(go(_steps_plane(busy)))
        assert r.answer.labels.shape == (3,) and len(busy.seen) == 1
        assert busy.threads["observe"].startswith("waits")
        assert not busy.threads["level"].startswith("waits")
        # a failure in a step is thrown into the request where it waited: the log's
        # LogUnavailable becomes the data plane's NotReady, and nothing is computed
        failing = _steps_plane(WaitingMonitor(True, LogUnavailable("disk full")))
        with pytest.raises(NotReady, match="disk full"):
            asyncio.run(go(failing))
        assert failing.model.calls == 0


def test_an_observe_that_must_wait_is_yielded_after_the_small_requests_slot_is_released():
    """Held across a yield, the slot would be held by a suspended request: on an event loop the
    next small request would then wait for it in place, forever."""
    mon = WaitingMonitor(False, observe_waits=True)
    p = _steps_plane(mon)
    steps = p.predict_steps("c", "r1", images(2))
    step = steps.send(None)                       # the observe, handed out
    assert step.fn == mon.observe and p.model.calls == 1 and mon.seen == []
    assert not p._small_gate.locked()
    with pytest.raises(StopIteration) as done:
        steps.send(step.run())
    assert len(mon.seen) == 1 and done.value.value.answer.labels.shape == (2,)
    # an error of the step comes back into the request (the log's error: not ready)
    from monitor.log import LogUnavailable
    from service.errors import NotReady
    steps = p.predict_steps("c", "r2", images(2))
    steps.send(None)
    with pytest.raises(NotReady, match="gone"):
        steps.throw(LogUnavailable("gone"))
