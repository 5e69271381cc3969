"""Typed errors of the service core. The gRPC adapter maps them to status codes in one place
(service/servicer.py: STATUS_OF); the core itself never imports grpc."""


class ServiceError(Exception):
    """Base class; the message is sent to the client as the status details."""


class InvalidInput(ServiceError):
    """Malformed request: shape, datatype, byte count, batch size, non-finite values."""


class Unauthenticated(ServiceError):
    """No API key, or a key the server does not know."""


class PermissionDenied(ServiceError):
    """The client is blocked by the monitor."""


class NotReady(ServiceError):
    """The model is not loaded yet, or the server is shutting down."""


class NotFound(ServiceError):
    """An unknown model name or version (Open Inference Protocol calls name the model)."""
