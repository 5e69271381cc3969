"""Building, starting and stopping the gRPC server (health, reflection, auth, limits): the
modelguard.v1 API and the Open Inference Protocol v2 (service/oip.py) on one port, and the
Prometheus metrics endpoint when ``metrics_port`` is set (service/metrics.py)."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import inference_pb2 as pb
from protos import grpc_predict_v2_pb2_grpc as oip_grpc
from protos import inference_pb2_grpc as pb_grpc
from service import oip
from service.auth import KeyRing
from service.config import ServerConfig
from service.dataplane import DataPlane
from service.servicer import AuthInterceptor, InferenceServicer

log = logging.getLogger("modelguard.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name


class Server:
    """A running server: ``Server(cfg, plane).start()``; ``.port`` is the bound port."""

    def __init__(self, cfg: ServerConfig, plane: DataPlane):
        self.cfg = cfg
        self.plane = plane
        keyring = KeyRing.from_file(cfg.api_keys)
        self.metrics = None
        if cfg.metrics_port is not None:
            from service.metrics import Metrics

            self.metrics = Metrics()   # its own registry: several servers may share a process
            plane.attach_metrics(self.metrics)
        opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes)]
        self.grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers),
                                interceptors=[AuthInterceptor(keyring, self.metrics)],
                                options=opts)
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(plane, keyring), self.grpc)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(oip.OipServicer(plane, keyring),
                                                            self.grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, oip.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
            self.grpc)
        self.port = self.grpc.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if self.port == 0:
            raise OSError(f"could not bind {cfg.host}:{cfg.port}")
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port once started (None without metrics)."""
        return None if self.metrics is None else self.metrics.port

    def start(self) -> "Server":
        if self.metrics is not None:
            self.metrics.start(self.cfg.host, self.cfg.metrics_port)
            log.info("metrics on http://%s:%d/metrics", self.cfg.host, self.metrics.port)
        self.grpc.start()
        if self.plane.ready():
            self._set_health(health_pb2.HealthCheckResponse.SERVING)
        else:  # the monitor is restoring client state after a restart: NOT_SERVING until done
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            threading.Thread(target=self._serving_when_ready, name="health-ready",
                             daemon=True).start()
        return self

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME, oip.SERVICE_NAME):
            self.health.set(name, status)

    def _serving_when_ready(self) -> None:
        while not self._stopped.is_set():
            if self.plane.ready():
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
                log.info("monitor state restored; health SERVING")
                return
            self._stopped.wait(0.05)

    def stop(self, grace: float | None = None) -> None:
        """Graceful: stop taking calls, finish those in flight, flush the monitor's log."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.plane.shutdown()
        self.grpc.stop(self.cfg.grace_s if grace is None else grace).wait()
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
