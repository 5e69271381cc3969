"""The wire format of image batches, shared by the server and the client: raw row-major bytes
(Open Inference Protocol style).

Datatype "UINT8" (values 0..255) or "FP32" (little-endian, values in [0, 1]), shape [N, 28, 28]
or [N, 1, 28, 28]. :func:`encode_images` is what a client sends; the server's validating decoder
(``service.codec.decode_images``) checks every field against these definitions. Plain numpy: no
gRPC, no torch.
"""
from __future__ import annotations

import numpy as np

DTYPES = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
H = W = 28


def encode_images(images: np.ndarray) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw) for a batch: uint8 stays UINT8, anything else goes as FP32."""
    x = np.asarray(images)
    if x.ndim == 2:
        x = x[None]
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[1:] != (H, W):
        raise ValueError(f"images must have shape (N, 28, 28); got {x.shape}")
    if x.dtype == np.uint8:
        return "UINT8", list(x.shape), np.ascontiguousarray(x).tobytes()
    return "FP32", list(x.shape), np.ascontiguousarray(x, dtype="<f4").tobytes()
