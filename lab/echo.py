"""A bare echo server of the inference contract: ``python -m lab.echo --port P``.

Same service (``modelguard.v1.Inference``), same methods, no model and no monitor. Predict reads
the request's batch size N from its shape and answers with a cached, pre-serialized
PredictResponse of the size the real server sends for N images (an id of 32 hex characters, the
model name and a 12-character version, N predictions of a label and 10 float probabilities; or, when the request asks for the packed
layout of proto v1.1, N labels and N*10 raw FP32 probabilities).
It is the floor the benchmark measures the real server against: gRPC transport, request parsing
and nothing else. Health (``grpc.health.v1``) and ServerReady answer as the real server's do.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from protos import inference_pb2 as pb

SERVICE = "modelguard.v1.Inference"
H = W = 28



def response_bytes(n: int, packed: bool = False, seed: int = 0) -> bytes:
    """A serialized PredictResponse for ``n`` images, shaped like the real server's: one
    Prediction (label, 10 probabilities) per image, or with ``packed`` the v1.1 layout (N labels
    and the probabilities as raw little-endian FP32 [N, 10])."""
    rng = np.random.default_rng(seed + n)
    lg = rng.normal(0.0, 3.0, (n, 10))
    p = np.exp(lg - lg.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    head = dict(id="0" * 32, model_name="target", model_version="0" * 12,
                kind=pb.ANSWER_PROBABILITIES)
    if packed:
        return pb.PredictResponse(**head, labels=p.argmax(1).tolist(),
                                  raw_output=p.astype("<f4").tobytes()).SerializeToString()
    preds = [pb.Prediction(label=int(l), probabilities=row)
             for l, row in zip(p.argmax(1), p.tolist())]
    return pb.PredictResponse(**head, predictions=preds).SerializeToString()


class EchoHandlers:
    def __init__(self, max_batch: int = 512):
        self.max_batch = max_batch
        self._cache: dict[tuple[int, bool], bytes] = {}
        self._lock = threading.Lock()
        self._ready = pb.ServerReadyResponse(ready=True)
        self._live = pb.ServerLiveResponse(live=True)

    def _response(self, n: int, packed: bool = False) -> bytes:
        b = self._cache.get((n, packed))
        if b is None:
            with self._lock:
                b = self._cache.get((n, packed))
                if b is None:
                    b = self._cache[(n, packed)] = response_bytes(n, packed)
        return b

    def predict(self, request: pb.PredictRequest, context) -> bytes:
        shape = request.shape
        n = int(shape[0]) if len(shape) else 0
        if not 1 <= n <= self.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch size {n} not in 1..{self.max_batch}")
        itemsize = 1 if request.datatype == "UINT8" else 4
        if len(request.raw_input) != n * H * W * itemsize:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"raw_input has {len(request.raw_input)} bytes for shape {list(shape)}")
        return self._response(n, request.format == pb.FORMAT_PACKED)

    def ready(self, request, context):
        return self._ready

    def live(self, request, context):
        return self._live

    def metadata(self, request, context):
        return pb.ModelMetadataResponse(name="echo", version="0", max_batch_size=self.max_batch)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        u = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            # response_serializer=None: the cached bytes go out as they are
            "Predict": u(self.predict, request_deserializer=pb.PredictRequest.FromString,
                         response_serializer=None),
            "ServerReady": u(self.ready, request_deserializer=pb.ServerReadyRequest.FromString,
                             response_serializer=pb.ServerReadyResponse.SerializeToString),
            "ServerLive": u(self.live, request_deserializer=pb.ServerLiveRequest.FromString,
                            response_serializer=pb.ServerLiveResponse.SerializeToString),
            "ModelMetadata": u(self.metadata,
                               request_deserializer=pb.ModelMetadataRequest.FromString,
                               response_serializer=pb.ModelMetadataResponse.SerializeToString),
        })


def build_server(host: str = "127.0.0.1", port: int = 0, workers: int = 4, max_batch: int = 512
                 ) -> tuple[grpc.Server, int]:
    max_bytes = max_batch * H * W * 4 + 64 * 1024  # as service.config.ServerConfig
    opts = [("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=opts)
    handlers = EchoHandlers(max_batch)
    for n in (1, 64, 256, 512):  # warm the cache for the usual batch sizes
        for packed in (False, True):
            if n <= max_batch:
                handlers._response(n, packed)
    server.add_generic_rpc_handlers((handlers.generic_handler(),))
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    server.start()
    for name in ("", SERVICE):
        hs.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.echo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    ap.add_argument("--workers", type=int, default=4, help="gRPC worker threads (server default)")
    ap.add_argument("--max-batch", type=int, default=512)
    a = ap.parse_args(argv)
    server, port = build_server(a.host, a.port, a.workers, a.max_batch)
    print(f"echo server listening on {a.host}:{port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(0.5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
