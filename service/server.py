"""Building, starting and stopping the gRPC server (health, reflection, auth, limits): the
modelguard.v1 API and the Open Inference Protocol v2 (service/oip.py) on one port, and the
Prometheus metrics endpoint when ``metrics_port`` is set (service/metrics.py)."""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import grpc_predict_v2_pb2 as oip_pb
from protos import inference_pb2 as pb
from common.memory import rss_bytes, trim_heap
from service import oip
from service.auth import KeyRing
from service.config import ServerConfig
from service.dataplane import DataPlane
from service.errors import ConfigError
from service.servicer import AuthInterceptor, InferenceServicer, raw_method_handlers

log = logging.getLogger("modelguard.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name
# a memory housekeeping round (fit_memory, malloc_trim) slower than this is logged
SLOW_HOUSEKEEPING_S = 0.25


def keyring_for(cfg: ServerConfig) -> KeyRing:
    """The keys file's ring, or open mode's (cfg.open_keys)."""
    if cfg.api_keys is not None:
        return KeyRing.from_file(cfg.api_keys, cfg.secret)
    if not cfg.open_keys:
        raise ConfigError("no client keys configured: pass --api-keys or --open-keys")
    return KeyRing.open(cfg.secret)


def _read_pem(path, what: str) -> bytes:
    try:
        data = open(path, "rb").read()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"the {what} {path} is not PEM")
    return data


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from cfg.tls_cert/tls_key (and tls_client_ca: mutual TLS, a client
    certificate signed by that CA is required); None without TLS."""
    if cfg.tls_cert is None:
        return None
    chain = _read_pem(cfg.tls_cert, "TLS certificate")
    key = _read_pem(cfg.tls_key, "TLS private key")
    ca = None if cfg.tls_client_ca is None else _read_pem(cfg.tls_client_ca, "client CA")
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


class Server:
    """A running server: ``Server(cfg, plane).start()``; ``.port`` is the bound port.

    Refuses (ConfigError) a config with startup problems (ServerConfig.startup_problems: a weak
    secret without dev_secret, no key mode). A weak secret allowed by dev_secret is logged."""

    def __init__(self, cfg: ServerConfig, plane: DataPlane):
        problems = cfg.startup_problems()
        if problems:
            plane.close()
            raise ConfigError("refusing to start: " + "; ".join(problems))
        if cfg.weak_secret:
            log.warning("serving with a development secret (--dev-secret): anyone who knows it "
                        "can predict the noise and the watermark and map keys to client ids; "
                        "never in production")
        self.cfg = cfg
        self.plane = plane
        try:
            keyring = keyring_for(cfg)
            creds = server_credentials(cfg)
        except Exception:
            plane.close()
            raise
        self.keyring = keyring
        self.tls = creds is not None
        self.metrics = None
        if cfg.metrics_port is not None:
            from service.metrics import Metrics

            self.metrics = Metrics()   # its own registry: several servers may share a process
            plane.attach_metrics(self.metrics)
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        auth = AuthInterceptor(keyring, self.metrics)
        self.aio = None
        if cfg.aio:
            # grpc.aio on an event loop of its own: the short parts of a call run on the loop,
            # the ones that may wait in a pool of cfg.workers threads (service/aio.py)
            from service.aio import LoopServer

            self.aio = LoopServer(opts, auth, cfg.workers)
            self.grpc = self.aio.server
            handler_for = self.aio.handler_for()
            self.health = health.aio.HealthServicer()
        else:
            self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                                    interceptors=[auth], options=opts)
            handler_for = None
            self.health = health.HealthServicer()
        # Both APIs parse their requests' bytes themselves (servicer.raw_method_handlers):
        # malformed messages are INVALID_ARGUMENT, without grpcio's deserialization failure.
        self.grpc.add_generic_rpc_handlers((
            raw_method_handlers(pb.DESCRIPTOR.services_by_name["Inference"],
                                InferenceServicer(plane, keyring), pb, self.metrics,
                                handler_for),
            raw_method_handlers(oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                                oip.OipServicer(plane, keyring), oip_pb, self.metrics,
                                handler_for)))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, oip.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.grpc)
        if creds is None:
            self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        else:
            self.port = self.grpc.add_secure_port(f"{cfg.host}:{cfg.port}", creds)
        if self.port == 0:
            if self.aio is not None:
                self.aio.stop(0)
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    def client_id(self, key: str) -> str:
        """The client id this server gives ``key`` (its name with a keys file; in open mode
        common.keys.client_id_for_key under this server's secret): how the monitor's log,
        transitions and metrics name that client."""
        return self.keyring.client_id_of_key(key)

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port once started (None without metrics)."""
        return None if self.metrics is None else self.metrics.port

    def start(self) -> "Server":
        if self.metrics is not None:
            self.metrics.start(self.cfg.host, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.host, self.metrics.port)
        if self.aio is not None:
            self.aio.start()
        else:
            self.grpc.start()
        self._serving = self.plane.ready()
        self._set_health(health_pb2.HealthCheckResponse.SERVING if self._serving else
                         health_pb2.HealthCheckResponse.NOT_SERVING)
        threading.Thread(target=self._watch_health, name="health-watch", daemon=True).start()
        return self

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME, oip.SERVICE_NAME):
            if self.aio is not None:
                self.aio.call(self.health.set(name, status))
            else:
                self.health.set(name, status)

    def _watch_health(self, every: float = 0.1, trim_every: float = 1.0,
                      memory_every: float = 0.1) -> None:
        """Health follows the data plane's readiness: NOT_SERVING while the monitor restores
        client state after a restart, or while its log cannot be written (fail-closed), and
        SERVING again by itself when that ends. Every ``memory_every`` seconds the monitor fits
        its client state to the process's RSS (``execution.max_rss_mb``), and every
        ``trim_every`` seconds, or at once after an eviction, the C heap's free pages go back to
        the system (evicted clients' state would otherwise stay in RSS)."""
        last_trim = last_fit = time.monotonic()
        fit = getattr(self.plane.monitor, "fit_memory", None)
        while not self._stopped.wait(every):
            now = time.monotonic()
            evicted = 0
            if fit is not None and now - last_fit >= memory_every:
                last_fit = now
                try:
                    evicted = fit(rss_bytes())
                except Exception as exc:  # noqa: BLE001 - never let the watcher die
                    log.warning("fitting client state to the memory cap failed: %r", exc)
            if evicted or now - last_trim >= trim_every:
                last_trim = now
                trim_heap()
            took = time.monotonic() - now
            if took > SLOW_HOUSEKEEPING_S:   # every allocating thread may have waited for it
                log.warning("memory housekeeping took %.2f s (fitting client state to "
                            "execution.max_rss_mb, %d evicted, and returning free heap pages)",
                            took, evicted)
            ready = self.plane.ready()
            if ready == self._serving or self._stopped.is_set():
                continue
            self._serving = ready
            self._set_health(health_pb2.HealthCheckResponse.SERVING if ready else
                             health_pb2.HealthCheckResponse.NOT_SERVING)
            if ready:
                log.info("health SERVING")
            else:
                why = getattr(self.plane.monitor, "health", lambda: None)()
                log.error("health NOT_SERVING%s", f": {why}" if why else "")

    def stop(self, grace: float | None = None) -> None:
        """Graceful: stop taking calls, finish those in flight, flush the monitor's log."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.cfg.grace_s if grace is None else grace
        if self.aio is not None:
            self.aio.call(self.health.enter_graceful_shutdown())
            self.plane.shutdown()
            self.aio.stop(grace)
        else:
            self.health.enter_graceful_shutdown()
            self.plane.shutdown()
            self.grpc.stop(grace).wait()
        self.plane.close()
        if self.metrics is not None:
            self.metrics.stop()

    def wait(self) -> None:
        """Block until SIGINT/SIGTERM, then stop gracefully."""
        done = threading.Event()

        def handler(signum, frame):
            log.info("received %s, shutting down", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        done.wait()
        self.stop()
        log.info("stopped; monitor log flushed")
