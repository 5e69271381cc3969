"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, KServe's
predict-api v2 and NVIDIA Triton's API): the same model, data plane, monitor and defences as
``modelguard.v1.Inference``, on the same port, for clients such as ``tritonclient.grpc``.

Model ``target`` (its version is the checkpoint's); one input ``images``: UINT8 (0..255) or FP32
(0..1), shape [N, 28, 28], [N, 1, 28, 28] or [N, 784], in ``raw_input_contents`` or typed
``contents`` (uint_contents / fp32_contents). Outputs ``label`` (INT64 [N]) and
``probabilities`` (FP32 [N, 10]), always in ``raw_output_contents`` (what tritonclient's
``as_numpy`` reads), in the order requested (all of them when none is named). When the defence
the monitor assigned to the caller withholds probabilities, that output is left out and the
response parameters say so: ``probabilities_withheld`` (bool) and ``modelguard_answer``
("probabilities" | "label_only"). The client's monitor level itself is not sent: naming NOISE
or SWITCH would tell an extraction attacker that the answers it now gets are perturbed or come
from the misinformation model (the v1 API likewise only says the answer kind).

Errors are status codes (service/servicer.py: STATUS_OF): unknown model or version NOT_FOUND,
malformed input INVALID_ARGUMENT with the reason, no key UNAUTHENTICATED, a blocked client
PERMISSION_DENIED. ModelReady of an unknown model answers ready = false (as Triton does).
"""
from __future__ import annotations

import logging
from importlib import metadata as _md

import numpy as np

from common.types import NUM_CLASSES, Answer, AnswerKind
from protos import grpc_predict_v2_pb2 as oip
from protos import grpc_predict_v2_pb2_grpc as oip_grpc
from service import codec
from service.auth import KeyRing
from service.dataplane import DataPlane
from service.errors import InvalidInput, NotFound, quote
from service.servicer import CallStats, abort_for
from common.steps import Steps, run_steps

log = logging.getLogger("modelguard.oip")

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "modelguard"
INPUT = "images"
LABEL, PROBS = "label", "probabilities"
OUTPUTS = (LABEL, PROBS)
PLATFORM = "pytorch"
PIXELS = codec.H * codec.W


def server_version() -> str:
    try:
        return _md.version("modelguard")
    except _md.PackageNotFoundError:
        return "unknown"


def check_model(plane: DataPlane, name: str, version: str) -> None:
    """NotFound unless ``name`` (and ``version`` when given) is the served model."""
    m = plane.model
    if name != m.name:
        raise NotFound(f"unknown model {quote(name)}; this server serves model {m.name!r}")
    if version and version != m.version:
        raise NotFound(f"model {quote(name)} has no version {quote(version)}; "
                       f"the served version is {m.version!r}")


def requested_outputs(request: oip.ModelInferRequest) -> list[str]:
    """The outputs to send, in the order asked for (all when none is named)."""
    names = list(dict.fromkeys(o.name for o in request.outputs)) or list(OUTPUTS)
    bad = [n for n in names if n not in OUTPUTS]
    if bad:
        raise InvalidInput(f"unknown output(s) {quote(bad)}; the model's outputs are "
                           f"{LABEL!r} (INT64 [N]) and {PROBS!r} (FP32 [N, {NUM_CLASSES}])")
    return names


def _shape(t) -> list[int]:
    """[N, 28, 28] for the accepted input shapes ([N, 784] included)."""
    shape = [int(s) for s in t.shape]
    ok = ((len(shape) == 2 and shape[1] == PIXELS)
          or (len(shape) == 3 and shape[1:] == [codec.H, codec.W])
          or (len(shape) == 4 and shape[1:] == [1, codec.H, codec.W]))
    if not ok:
        raise InvalidInput(f"input {INPUT!r}: shape {quote(shape)} is not [N, 28, 28], "
                           f"[N, 1, 28, 28] "
                           f"or [N, 784]")
    return [shape[0], codec.H, codec.W]


def _typed_contents(t, shape: list[int]) -> bytes:
    """The raw bytes of a tensor sent as typed ``contents``."""
    c = t.contents
    if t.datatype == "UINT8":
        values, field = c.uint_contents, "uint_contents"
    else:
        values, field = c.fp32_contents, "fp32_contents"
    others = [f.name for f, _ in c.ListFields() if f.name != field]
    if others:
        raise InvalidInput(f"input {INPUT!r}: {t.datatype} contents go in contents.{field}; "
                           f"got {others}")
    need = max(shape[0], 0) * PIXELS
    if len(values) != need:
        if not values and shape[0] > 0:
            raise InvalidInput(f"input {INPUT!r} has no data: send raw_input_contents or "
                               f"contents.{field}")
        raise InvalidInput(f"input {INPUT!r}: contents.{field} has {len(values)} values; "
                           f"shape {quote(list(t.shape))} needs {need}")
    if t.datatype == "UINT8":
        a = np.asarray(values, np.uint32)
        if len(a) and int(a.max()) > 255:
            raise InvalidInput(f"input {INPUT!r}: UINT8 values must lie in 0..255; got "
                               f"{int(a.max())}")
        return a.astype(np.uint8).tobytes()
    return np.asarray(values, "<f4").tobytes()


def decode_inputs(request: oip.ModelInferRequest, max_batch: int) -> np.ndarray:
    """float32 (N, 28, 28) in [0, 1], or InvalidInput naming what is wrong."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected one input tensor {INPUT!r}; got {len(request.inputs)}")
    t = request.inputs[0]
    if t.name != INPUT:
        raise InvalidInput(f"unknown input {quote(t.name)}; the model's input is {INPUT!r}")
    if t.datatype not in codec.DTYPES:
        raise InvalidInput(f"input {INPUT!r}: unknown datatype {quote(t.datatype)}; expected one "
                           f"of {sorted(codec.DTYPES)}")
    shape = _shape(t)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput(f"raw_input_contents holds {len(request.raw_input_contents)} "
                               f"tensors for 1 input")
        if t.HasField("contents"):
            raise InvalidInput(f"input {INPUT!r} has both raw_input_contents and contents; "
                               f"send one")
        raw = request.raw_input_contents[0]
    else:
        raw = _typed_contents(t, shape)
    return codec.decode_images(t.datatype, shape, raw, max_batch)


def build_infer_response(answer: Answer, request_id: str, model_name: str, model_version: str,
                         outputs: list[str]) -> oip.ModelInferResponse:
    n = len(answer)
    resp = oip.ModelInferResponse(model_name=model_name, model_version=model_version,
                                  id=request_id)
    for name in outputs:
        if name == LABEL:
            resp.outputs.add(name=LABEL, datatype="INT64", shape=[n])
            resp.raw_output_contents.append(np.ascontiguousarray(answer.labels, "<i8").tobytes())
        elif answer.probs is not None:
            resp.outputs.add(name=PROBS, datatype="FP32", shape=[n, NUM_CLASSES])
            resp.raw_output_contents.append(np.ascontiguousarray(answer.probs, "<f4").tobytes())
    p = resp.parameters
    p["modelguard_answer"].string_param = ("probabilities" if answer.kind ==
                                           AnswerKind.PROBABILITIES else "label_only")
    p["probabilities_withheld"].bool_param = PROBS in outputs and answer.probs is None
    return resp


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the data plane (keys checked by the server's
    AuthInterceptor, as for modelguard.v1)."""

    STEPS = {"ModelInfer": "model_infer_steps"}   # methods written as steps (common.steps)

    def __init__(self, plane: DataPlane, keyring: KeyRing):
        self.plane = plane
        self.keyring = keyring
        self._version = server_version()

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.plane.ready())

    def ModelReady(self, request, context):
        try:
            check_model(self.plane, request.name, request.version)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self.plane.ready())

    def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self._version,
                                          extensions=[])

    def ModelMetadata(self, request, context):
        try:
            check_model(self.plane, request.name, request.version)
        except NotFound as exc:
            abort_for(context, exc)
        m = self.plane.model
        T = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=m.name, versions=[m.version], platform=PLATFORM,
            inputs=[T(name=INPUT, datatype="FP32", shape=[-1, codec.H, codec.W])],
            outputs=[T(name=LABEL, datatype="INT64", shape=[-1]),
                     T(name=PROBS, datatype="FP32", shape=[-1, NUM_CLASSES])])

    def ModelInfer(self, request, context):
        return run_steps(self.model_infer_steps(request, context))

    def model_infer_steps(self, request, context) -> Steps:
        """ModelInfer as steps (common.steps; as InferenceServicer.predict_steps)."""
        stats = CallStats()
        try:
            client = self.keyring.client_id(context.invocation_metadata())
            request_id = codec.check_request_id(request.id)
            check_model(self.plane, request.model_name, request.model_version)
            outputs = requested_outputs(request)
            images = decode_inputs(request, self.plane.max_batch)
            stats.decoded(len(images))
            result = yield from self.plane.predict_steps(client, request_id or None, images,
                                                         want_probabilities=PROBS in outputs)
            stats.answered(result)
            return build_infer_response(result.answer, result.request_id, self.plane.model.name,
                                        self.plane.model.version, outputs)
        except Exception as exc:  # noqa: BLE001 - typed errors -> codes; others INTERNAL
            stats.failed(exc)
            abort_for(context, exc)
        finally:
            stats.record(self.plane.metrics, "oip")
