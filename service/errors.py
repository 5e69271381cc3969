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


class ConfigError(ValueError):
    """The server's configuration is unsafe or inconsistent: it refuses to start (the CLI prints
    the message and exits with status 2)."""


QUOTE_CHARS = 64
LIST_ITEMS = 8


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """``value`` for an error message: its repr when short, else the repr of its first ``limit``
    characters (or items) followed by "…(N bytes)" / "…(N items)". Error details quote client
    input only through this, so a request cannot make its own error message large."""
    if isinstance(value, (bytes, bytearray)):
        n, unit = len(value), "bytes"
        head = bytes(value[:limit])
    elif isinstance(value, str):
        n, unit = len(value.encode("utf-8", "surrogatepass")), "bytes"
        head = value[:limit]
    else:
        try:
            items = list(value)
        except TypeError:
            return quote(repr(value), limit)
        shown = ", ".join(quote(x, limit) if isinstance(x, (str, bytes)) else repr(x)[:limit]
                          for x in items[:LIST_ITEMS])
        more = f", …({len(items)} items)" if len(items) > LIST_ITEMS else ""
        return f"[{shown}{more}]"
    if len(head) == len(value):
        return repr(head)
    return f"{head!r}…({n} {unit})"
