"""The gRPC adapter: decode the request, call the data plane, encode the answer. Typed errors
become status codes here and nowhere else (STATUS_OF)."""
from __future__ import annotations

import logging

import grpc

from common.types import AnswerKind
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from service import codec
from service.auth import KeyRing
from service.dataplane import DataPlane
from service.errors import (InvalidInput, NotReady, PermissionDenied, ServiceError,
                            Unauthenticated)

log = logging.getLogger("modelguard.servicer")

STATUS_OF = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
}

# Health and reflection stay reachable without a key.
PUBLIC_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def abort_for(context: grpc.ServicerContext, exc: Exception):
    """Abort the call with the status for ``exc``: the one place errors become codes."""
    for typ, code in STATUS_OF.items():
        if isinstance(exc, typ):
            context.abort(code, str(exc))
    log.exception("internal error")
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without a valid key before they reach a handler (health/reflection exempt)."""

    def __init__(self, keyring: KeyRing):
        self.keyring = keyring

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(PUBLIC_METHOD_PREFIXES):
            return continuation(handler_call_details)
        try:
            self.keyring.client_id(handler_call_details.invocation_metadata)
        except Unauthenticated as exc:
            message = str(exc)

            def deny(request, context):
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

            return grpc.unary_unary_rpc_method_handler(deny)
        return continuation(handler_call_details)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, plane: DataPlane, keyring: KeyRing):
        self.plane = plane
        self.keyring = keyring

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.plane.ready())

    def ModelMetadata(self, request, context):
        m = self.plane.metadata()
        return pb.ModelMetadataResponse(
            name=m["name"], version=m["version"], classes=m["classes"],
            max_batch_size=m["max_batch_size"],
            inputs=[pb.TensorMetadata(**t) for t in m["inputs"]],
            outputs=[pb.TensorMetadata(**t) for t in m["outputs"]])

    def Predict(self, request, context):
        try:
            client = self.keyring.client_id(context.invocation_metadata())
            images = codec.decode_images(request.datatype, request.shape, request.raw_input,
                                         self.plane.max_batch)
            result = self.plane.predict(client, request.id, images,
                                        want_probabilities=request.output != pb.OUTPUT_LABEL)
        except ServiceError as exc:
            abort_for(context, exc)
        except Exception as exc:  # noqa: BLE001 - anything else is INTERNAL, without traceback
            abort_for(context, exc)
        a = result.answer
        if a.probs is None:
            preds = [pb.Prediction(label=int(l)) for l in a.labels]
        else:
            preds = [pb.Prediction(label=int(l), probabilities=p)
                     for l, p in zip(a.labels, a.probs.tolist())]
        kind = (pb.ANSWER_PROBABILITIES if a.kind == AnswerKind.PROBABILITIES
                else pb.ANSWER_LABEL_ONLY)
        return pb.PredictResponse(id=result.request_id, model_name=self.plane.model.name,
                                  model_version=self.plane.model.version, kind=kind,
                                  predictions=preds)
