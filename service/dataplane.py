"""The data plane (KServe's split): everything the service does per request, free of gRPC.

For each Predict: ask the monitor for the client's level, run the target, answer through the
defence policy for that level (plus the watermark), hand the query and the answer to the monitor,
return the answer. The gRPC servicer (service/servicer.py) only decodes, calls this and encodes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import training
from common.steps import Blocking, Steps, advance, call_steps, rest_of_steps, run_steps
from common.types import CLASS_NAMES, Answer, AnswerKind, Level
from service.defences import DIGEST_SCHEME, PolicyContext, Watermark, build_policy
from service.errors import InvalidInput, NotReady, PermissionDenied
from monitor.log import LogUnavailable
from service.train import privacy_parameters

log = logging.getLogger("modelguard.dataplane")


class TargetModel:
    """The hidden classifier: float images (N, 28, 28) in [0, 1] -> probabilities (N, 10).

    Computed in float64 and rounded once to float32, so an image's answer does not depend on
    what it was sent with, on the thread, or on the CPU's matrix-product kernels. In float32
    it did (measured with torch 2.14's MKL on a 2-core AVX-512 machine, the MLP target: one
    image alone and the same image among 7 others differed in the last bits, products of 16
    rows or more carried ~1.3e-5 error against ~4e-6 for one row); float64 rows differ by
    ~2e-14 at most, below float32's rounding. Costs (same machine, one thread) 54 against 39
    us for one image, 1.0 against 0.47 ms for 256."""

    def __init__(self, module: torch.nn.Module, meta: dict):
        self.module = module.eval().double()
        self.meta = meta
        self.name = "target"
        self.version = str(meta.get("version") or meta.get("fingerprint") or "1")

    @classmethod
    def load(cls, path: Path) -> "TargetModel":
        module, meta = training.load_checkpoint(path)
        meta.setdefault("version", hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12])
        return cls(module, meta)

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return training.predict_proba_f64(self.module, images)


@contextlib.contextmanager
def _not_ready_without_log():
    """The monitor's LogUnavailable (log unwritable, or not committed in time) as NotReady:
    the request is refused UNAVAILABLE rather than answered without its log."""
    try:
        yield
    except LogUnavailable as exc:
        raise NotReady(str(exc)) from None


@dataclass
class PredictResult:
    request_id: str
    answer: Answer
    level: Level


class DataPlane:
    def __init__(self, model: TargetModel, monitor, policies: dict, watermark, key: bytes,
                 max_batch: int, compute_slots: int = 0, small_request_items: int = 0):
        """monitor: monitor.Monitor; policies: {Level: AnswerPolicy}; watermark: Watermark|None.

        compute_slots: requests computing at once (model, answer policy, watermark, the
        monitor's detectors and log hand-off; 0: no limit). Waiting on I/O (the client's state,
        the log's commit) stays outside. On CPython this work holds the GIL nearly throughout,
        so concurrent requests mostly pass it back and forth; one slot spares that, but also
        stops two large batches from using two cores in numpy at once (measured by
        `python -m lab.contention` and `python -m lab.serving --compute-slots N`; README).

        small_request_items: requests of at most this many images compute one at a time, in a
        slot of their own (0: none): one slot is what small requests gain from, while large
        ones gain from computing at once (their numpy work runs outside the GIL)."""
        if compute_slots < 0:
            raise ValueError(f"compute_slots must be >= 0 (0: no limit), not {compute_slots}")
        if small_request_items < 0:
            raise ValueError(f"small_request_items must be >= 0 (0: no slot of their own), "
                             f"not {small_request_items}")
        missing = [lvl.name for lvl in Level if lvl != Level.BLOCK and lvl not in policies]
        if missing:
            raise ValueError(f"no answer policy configured for levels {missing}")
        self.model = model
        self.monitor = monitor
        self.policies = policies
        self.watermark = watermark
        self.key = key
        self.max_batch = max_batch
        self.compute_slots = compute_slots
        self._gate = (threading.Semaphore(compute_slots) if compute_slots
                      else contextlib.nullcontext())
        self.small_request_items = small_request_items
        self._small_gate = threading.Lock() if small_request_items else None
        self._ready = threading.Event()
        self._ready.set()
        self._id_prefix = uuid.uuid4().hex[:12]
        self._id_counter = itertools.count(1)
        self.metrics = None   # service.metrics.Metrics when the server exports metrics

    @property
    def monitor(self):
        return self._monitor

    @monitor.setter
    def monitor(self, monitor) -> None:
        # (deploy/replica.py swaps in a SharedMonitor after building the plane)
        self._monitor = monitor
        # its level and durable wait as steps (common.steps): its own, or (a monitor without
        # them) each call one Blocking step
        self._level_steps = getattr(monitor, "level_steps", None) or functools.partial(
            call_steps, monitor.level)
        self._durable_steps = getattr(monitor, "durable_steps", None) or functools.partial(
            call_steps, monitor.wait_durable)
        self._observe_steps = getattr(monitor, "observe_steps", None) or functools.partial(
            call_steps, functools.partial(monitor.observe, wait=False))

    def attach_metrics(self, metrics) -> None:
        """Report stage timings, the level each client is seen at and (through the monitor's
        store) its transitions to ``metrics`` (service.metrics.Metrics)."""
        metrics.watch_monitor(self.monitor)
        self.metrics = metrics

    def _next_id(self) -> str:
        """A unique request id without a system call per request (uuid4 reads os.urandom:
        measured 0.76 ms per call on this machine): a random per-process prefix and a counter."""
        return f"{self._id_prefix}-{next(self._id_counter)}"

    # -- readiness -----------------------------------------------------------------------------
    def ready(self) -> bool:
        """Accepting calls, and the monitor has restored the clients active before a restart
        (requests are answered meanwhile too, only the first of a client not yet restored
        waits for its state)."""
        return self._ready.is_set() and self.monitor.ready()

    def shutdown(self) -> None:
        self._ready.clear()

    def metadata(self) -> dict:
        return {
            "name": self.model.name,
            "version": self.model.version,
            "inputs": [{"name": "images", "datatype": "UINT8|FP32", "shape": [-1, 28, 28]}],
            "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
            "classes": list(CLASS_NAMES),
            "max_batch_size": self.max_batch,
            "parameters": privacy_parameters(self.model.meta),
        }

    # -- prediction ----------------------------------------------------------------------------
    def _context(self, client_id: str, request_id: str) -> PolicyContext:
        # Lazy: the keyed per-image digests are computed once, on the first policy or watermark
        # that asks (ctx.digests), and shared by all of them; the unkeyed-noise rng likewise.
        return PolicyContext(client_id, self.key, request_id=request_id)

    def predict(self, client_id: str, request_id: str | None, images: np.ndarray,
                want_probabilities: bool = True) -> PredictResult:
        """Answer ``images`` for ``client_id`` (blocking; see :meth:`predict_steps`)."""
        return run_steps(self.predict_steps(client_id, request_id, images, want_probabilities))

    def predict_steps(self, client_id: str, request_id: str | None, images: np.ndarray,
                      want_probabilities: bool = True) -> Steps:
        """:meth:`predict` as steps (common.steps): a request above ``small_request_items``
        images is one Blocking step (it may use a second core); a smaller one computes where it
        is driven and yields only the steps of the monitor's level and durable wait (the
        monitor's ``level_steps`` and ``durable_steps``: a round trip to a monitor in another
        process, a client's state to load, a log commit)."""
        if not self._ready.is_set():
            raise NotReady("the server is not ready (starting up or shutting down)")
        if not isinstance(images, np.ndarray) or images.dtype != np.float32 \
                or images.ndim != 3 or images.shape[1:] != (28, 28):
            # what service.codec.decode_images returns; anything else would fail deep inside
            # the model or the monitor
            raise InvalidInput(f"predict takes float32 images of shape (N, 28, 28) in [0, 1] "
                               f"(service.codec.decode_images), not "
                               f"{getattr(images, 'dtype', type(images).__name__)} "
                               f"{getattr(images, 'shape', '')}")
        request_id = request_id or self._next_id()
        small = self._small_gate is not None and len(images) <= self.small_request_items
        steps = self._steps(client_id, request_id, images, want_probabilities, small)
        if not small:
            return (yield Blocking(run_steps, steps))
        return (yield from steps)

    def _level(self, client_id: str, images: np.ndarray) -> Steps:
        with _not_ready_without_log():   # fail-closed: no answer the log could not keep
            return (yield from self._level_steps(client_id, images))

    def _durable(self, client_id: str) -> Steps:
        with _not_ready_without_log():   # not durable in time: the answer is not sent
            yield from self._durable_steps(client_id)

    def _steps(self, client_id: str, request_id: str, images: np.ndarray,
               want_probabilities: bool, small: bool) -> Steps:
        clock = time.perf_counter   # stage timings for the metrics (~0.1 us a reading)
        t0 = clock()
        level = yield from self._level(client_id, images)
        if level >= Level.BLOCK:
            if self.metrics is not None:
                self.metrics.client_level(client_id, level)
            raise PermissionDenied(f"client {client_id!r} is blocked by the monitor")
        t1 = clock()
        with self._small_gate if small else self._gate:
            tq = clock()
            probs = self.model.predict_proba(images)
            t2 = clock()
            ctx = self._context(client_id, request_id)
            answer = self.policies[level].answer(images, probs, ctx)
            if self.watermark is not None:
                # the key's query count decides its mark rate (none before the knee)
                answer = self.watermark.apply(images, answer, ctx, probs,
                                              qn0=self.monitor.queries(client_id))
            if not want_probabilities and answer.probs is not None:
                answer = Answer(answer.labels, None, AnswerKind.LABEL_ONLY, answer.model,
                                answer.watermarked)
            t3 = clock()
            # observed here when the monitor computes in place; a step that may wait is
            # yielded only after the slot is released (held across a yield, the slot would
            # be held by a suspended request, and the event loop would wait for it forever)
            observing = self._observe_steps(client_id, request_id, images, probs, answer,
                                            level)
            with _not_ready_without_log():
                done, after = advance(observing)
        if not done:
            with _not_ready_without_log():
                after = yield from rest_of_steps(observing, after)
        yield from self._durable(client_id)
        if self.metrics is not None:
            self.metrics.stages(t2 - tq, t3 - t2, (t1 - t0) + (clock() - t3),
                                tq - t1 if small or self.compute_slots else None)
            self.metrics.client_level(client_id, after if after is not None else level)
        return PredictResult(request_id, answer, level)

    def close(self) -> None:
        self.shutdown()
        self.monitor.close()


def build_dataplane(cfg, monitor_config=None) -> DataPlane:
    """Load the target, the monitor and the defence policies named in the monitor's config
    (``cfg.monitor_config``'s file, or the ``monitor_config`` object when given). With
    ``cfg.monitor`` False the monitor is a :class:`monitor.null.NullMonitor` (no detectors, no
    log, every client NORMAL); the policies and the watermark still come from the config."""
    from threadpoolctl import threadpool_limits

    # Deliberate thread counts: torch's and BLAS's (numpy, used by the monitor's detectors)
    # pools otherwise spin against gRPC's workers on a small machine (measured: a 3000x784
    # matrix-vector product took 1.9-8 ms with 2 OpenBLAS threads under load, 0.13 ms with 1).
    torch.set_num_threads(cfg.torch_threads)
    threadpool_limits(cfg.torch_threads, user_api="blas")
    if monitor_config is None:
        from monitor.config import load_config

        monitor_config = load_config(cfg.monitor_config)
    if cfg.monitor_address:
        monitor_config = monitor_config.with_changes(execution={
            "mode": "process", "address": cfg.monitor_address})
    if cfg.monitor_tls_ca:
        monitor_config = monitor_config.with_changes(execution={
            "tls_ca": str(cfg.monitor_tls_ca)})
    process = monitor_config.execution.mode == "process"
    if cfg.monitor and cfg.store and process:
        raise ValueError("[execution] mode = \"process\" runs the monitor on the embedded SQLite "
                         "log only; with a shared store (--store) use mode \"sync\" or "
                         "\"async\"")
    model = TargetModel.load(cfg.target)
    if cfg.undefended:
        monitor_config = monitor_config.model_copy(update={
            "policies": {lvl: {"policy": "identity"} for lvl in Level if lvl != Level.BLOCK},
            "watermark": {}})
    if cfg.monitor and cfg.store:
        # replicas: the monitor's state in PostgreSQL, each client owned by one replica at a
        # time (docs/scaleout.md)
        from monitor.pgstore import PgStore, SharedMonitor

        lc = monitor_config.log
        mon = SharedMonitor(monitor_config, PgStore.for_log(cfg.store, cfg.replica, lc),
                            warm=True)
    elif cfg.monitor and process:
        # the detectors, the log and the client state in a child process (monitor/process.py)
        from monitor.process import MonitorProcess, link_key

        mon = MonitorProcess(monitor_config, cfg.monitor_db, warm=True,
                             threads=cfg.torch_threads, authkey=link_key(cfg.secret))
    elif cfg.monitor:
        from monitor import Monitor

        mon = Monitor(monitor_config, cfg.monitor_db, warm=True)
    else:
        from monitor.null import NullMonitor

        mon = NullMonitor(monitor_config)
    key = cfg.secret.encode()
    policies = {Level.parse(lvl): build_policy(spec, artifacts=cfg.artifacts)
                for lvl, spec in mon.config.policies.items() if Level.parse(lvl) != Level.BLOCK}
    wm = Watermark.from_spec(dict(mon.config.watermark or {}), key)
    log.info("model %s version %s (test accuracy %s, %s); monitor %s; policies %s; watermark %s "
             "(digest scheme %s)",
             model.name, model.version, model.meta.get("test_accuracy"),
             " ".join(f"{k}={v}" for k, v in privacy_parameters(model.meta).items()),
             ("OFF (--no-monitor)" if not cfg.monitor else
              f"at {monitor_config.execution.address} (its own log and detector config)"
              if monitor_config.execution.address else
              "on, in a child process" if process else "on"),
             {lvl.name: p.name for lvl, p in policies.items()},
             "off" if wm is None else f"rate {wm.rate} after query {wm.knee}" + (
                 "" if wm.signature is None else
                 f", signature {wm.signature.strength} after query {wm.signature.knee}"),
             DIGEST_SCHEME.split(":")[0])
    return DataPlane(model, mon, policies, wm, key, cfg.max_batch, cfg.compute_slots,
                     cfg.small_request_items)
