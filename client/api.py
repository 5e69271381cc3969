"""Python client for the modelguard API, and the :class:`RemoteOracle` every attack uses.

    with ModelClient("127.0.0.1:50051", api_key="alice") as c:
        answer = c.predict(images)          # uint8 or float32 (N, 28, 28)
        answer.labels, answer.probs         # probs is None when the defence withholds them

Over TLS (a server started with --tls-cert/--tls-key): ``ModelClient(addr, key,
tls_ca="ca.pem")``; for mutual TLS also ``tls_cert="client.pem", tls_key="client.key"``.
"""
from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np

from common.codec import encode_images
from common.types import Answer, AnswerKind, NUM_CLASSES
from client.oracle import Oracle
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc


class ApiError(RuntimeError):
    """A call failed; ``code`` is the gRPC status code, the message is the server's."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def decode_response(resp: pb.PredictResponse) -> Answer:
    """The Answer in a PredictResponse, packed (labels + raw_output) or not (predictions: what a
    server older than ResponseFormat sends whatever was asked)."""
    if resp.predictions:
        labels = np.array([p.label for p in resp.predictions], dtype=np.int64)
        if resp.kind == pb.ANSWER_PROBABILITIES:
            probs = np.array([p.probabilities for p in resp.predictions], dtype=np.float32)
            return Answer(labels, probs, AnswerKind.PROBABILITIES)
        return Answer(labels, None, AnswerKind.LABEL_ONLY)
    labels = np.array(resp.labels, dtype=np.int64)
    if resp.kind == pb.ANSWER_PROBABILITIES:
        want = len(labels) * NUM_CLASSES * 4
        if len(resp.raw_output) != want:
            raise ValueError(f"malformed response: raw_output has {len(resp.raw_output)} bytes "
                             f"for {len(labels)} labels (expected {want})")
        probs = np.frombuffer(resp.raw_output, dtype="<f4").reshape(len(labels), NUM_CLASSES)
        return Answer(labels, probs.astype(np.float32), AnswerKind.PROBABILITIES)
    return Answer(labels, None, AnswerKind.LABEL_ONLY)


def _pem(v) -> bytes | None:
    if v is None or isinstance(v, bytes):
        return v
    return Path(v).read_bytes()


def make_channel(address: str, options=(), tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None) -> grpc.Channel:
    """A plaintext channel, or a TLS one when any tls_* is given. ``tls_ca``: PEM (path or
    bytes) of the CA that signed the server's certificate (None with tls_cert: the system's
    roots); ``tls_cert``/``tls_key``: the client's certificate and key, for mutual TLS;
    ``tls_server_name``: the name to check the server's certificate against when it differs
    from the address's host."""
    options = list(options)
    if tls_ca is None and tls_cert is None and tls_key is None:
        return grpc.insecure_channel(address, options=options)
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (mutual TLS)")
    creds = grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca),
                                         private_key=_pem(tls_key),
                                         certificate_chain=_pem(tls_cert))
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(address, creds, options=options)


class ModelClient:
    def __init__(self, address: str = "127.0.0.1:50051", api_key: str | None = None,
                 batch_size: int = 256, timeout: float = 60.0, max_message_bytes: int = 8 << 20,
                 packed: bool = True, tls_ca=None, tls_cert=None, tls_key=None,
                 tls_server_name: str | None = None):
        """``packed``: ask for the packed response (labels + raw_output); False asks for the
        original per-image predictions. Both decode to the same Answer. ``tls_*``: connect over
        TLS (see :func:`make_channel`); without them the channel is plaintext."""
        self.address = address
        self.packed = packed
        self.batch_size = batch_size
        self.timeout = timeout
        self.channel = make_channel(address, [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes)], tls_ca=tls_ca,
            tls_cert=tls_cert, tls_key=tls_key, tls_server_name=tls_server_name)
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.metadata = (("x-api-key", api_key),) if api_key else ()
        self._server_max_batch: int | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request):
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ApiError(exc.code(), exc.details()) from None

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def ready(self) -> bool:
        return self._call(self.stub.ServerReady, pb.ServerReadyRequest()).ready

    def model_metadata(self) -> pb.ModelMetadataResponse:
        return self._call(self.stub.ModelMetadata, pb.ModelMetadataRequest())

    def predict_batch(self, images: np.ndarray, labels_only: bool = False,
                      request_id: str = "") -> tuple[Answer, str]:
        """One Predict call (at most the server's batch limit)."""
        dtype, shape, raw = encode_images(images)
        req = pb.PredictRequest(id=request_id, datatype=dtype, shape=shape, raw_input=raw,
                                output=pb.OUTPUT_LABEL if labels_only else pb.OUTPUT_PROBABILITIES,
                                format=pb.FORMAT_PACKED if self.packed else pb.FORMAT_PREDICTIONS)
        resp = self._call(self.stub.Predict, req)
        answer = decode_response(resp)
        if len(answer) != shape[0]:
            raise ValueError(f"the server answered {len(answer)} items for {shape[0]} images")
        return answer, resp.id

    def _effective_batch(self) -> int:
        """``batch_size`` capped by the server's advertised limit (asked once)."""
        if self._server_max_batch is None:
            self._server_max_batch = int(self.model_metadata().max_batch_size) or self.batch_size
        return max(1, min(self.batch_size, self._server_max_batch))

    def predict(self, images: np.ndarray, labels_only: bool = False) -> Answer:
        """Predict any number of images, in calls of at most ``batch_size`` (and the server's
        limit)."""
        x = np.asarray(images)
        if x.ndim == 2:
            x = x[None]
        step = self._effective_batch()
        parts = [self.predict_batch(x[i:i + step], labels_only)[0]
                 for i in range(0, len(x), step)]
        if not parts:
            raise ValueError("no images to predict")
        if len(parts) == 1:
            return parts[0]
        if all(a.probs is not None for a in parts):
            return Answer.concat(parts)
        # mixed: the defence changed mid-way; label-only for all keeps the type honest
        return Answer(np.concatenate([a.labels for a in parts]), None, AnswerKind.LABEL_ONLY)


class RemoteOracle(Oracle):
    """The attacker's budgeted query function over the real gRPC API."""

    def __init__(self, address: str, api_key: str, budget: int | None = None,
                 labels_only: bool = False, batch_size: int = 256, **tls):
        """``tls``: ModelClient's tls_ca / tls_cert / tls_key / tls_server_name."""
        super().__init__(budget)
        self.api_key = api_key
        self.labels_only = labels_only
        self.client = ModelClient(address, api_key, batch_size=batch_size, **tls)

    def _query(self, images: np.ndarray) -> Answer:
        return self.client.predict(images, labels_only=self.labels_only)

    def close(self) -> None:
        self.client.close()
