"""The server's validating decoder of image batches (the wire format: common/codec.py).

Wire format: datatype "UINT8" (values 0..255) or "FP32" (little-endian, values in [0, 1]), shape
[N, 28, 28] or [N, 1, 28, 28]. Decoding validates everything and returns float32 (N, 28, 28) in
[0, 1]; every malformed case raises :class:`~service.errors.InvalidInput` naming what is wrong.
The client encodes with :func:`common.codec.encode_images`.
"""
from __future__ import annotations

import numpy as np

from common.codec import DTYPES, H, W
from service.errors import InvalidInput, quote

__all__ = ["DTYPES", "H", "W", "MAX_REQUEST_ID_BYTES", "check_request_id", "decode_images"]

# A request id is echoed and logged once per request: past this it is INVALID_ARGUMENT (a client
# that wants a longer correlation id can hash it).
MAX_REQUEST_ID_BYTES = 128


def check_request_id(request_id: str) -> str:
    """``request_id`` when acceptable: at most MAX_REQUEST_ID_BYTES bytes of UTF-8, printable
    (no control characters). Empty means "generate one". InvalidInput otherwise."""
    n = len(request_id.encode("utf-8", "surrogatepass"))
    if n > MAX_REQUEST_ID_BYTES:
        raise InvalidInput(f"request id has {n} bytes; the limit is {MAX_REQUEST_ID_BYTES} "
                           f"(id starts {quote(request_id, 16)})")
    if not request_id.isprintable():
        raise InvalidInput(f"request id {quote(request_id)} has control characters")
    return request_id


def decode_images(datatype: str, shape, raw: bytes, max_batch: int) -> np.ndarray:
    if datatype not in DTYPES:
        raise InvalidInput(f"unknown datatype {quote(datatype)}; expected one of {sorted(DTYPES)}")
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or shape[-2:] != (H, W) or (len(shape) == 4 and shape[1] != 1):
        raise InvalidInput(f"shape {quote(shape)} is not [N, 28, 28] or [N, 1, 28, 28]")
    n = shape[0]
    if n <= 0:
        raise InvalidInput(f"empty batch: shape {quote(shape)} has N = {n}; send at least one "
                           f"image")
    if n > max_batch:
        raise InvalidInput(f"batch of {n} images exceeds the limit of {max_batch}; split it")
    dtype = DTYPES[datatype]
    expected = n * H * W * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(f"raw_input has {len(raw)} bytes; shape {quote(shape)} of {datatype} "
                           f"needs {expected}")
    x = np.frombuffer(raw, dtype=dtype).reshape(n, H, W)
    if datatype == "UINT8":
        return x.astype(np.float32) / np.float32(255.0)
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.argwhere(~finite.reshape(n, -1).all(1))[0, 0])
        raise InvalidInput(f"FP32 input has NaN or infinite values (first in image {bad})")
    if x.min() < 0.0 or x.max() > 1.0:
        raise InvalidInput(f"FP32 pixel values must lie in [0, 1]; got range "
                           f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return x.astype(np.float32, copy=True)

