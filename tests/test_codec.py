import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.codec import encode_images
from service.codec import decode_images
from service.errors import InvalidInput


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 8), seed=st.integers(0, 2**16), uint8=st.booleans())
def test_roundtrip(n, seed, uint8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if uint8 else \
        rng.random((n, 28, 28), dtype=np.float32)
    dtype, shape, raw = encode_images(x)
    assert dtype == ("UINT8" if uint8 else "FP32") and shape == [n, 28, 28]
    y = decode_images(dtype, shape, raw, max_batch=8)
    expected = x.astype(np.float32) / 255 if uint8 else x
    assert y.dtype == np.float32 and y.shape == (n, 28, 28)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-7)


def test_channel_dimension_accepted():
    x = np.zeros((2, 1, 28, 28), np.uint8)
    assert decode_images("UINT8", [2, 1, 28, 28], x.tobytes(), 4).shape == (2, 28, 28)


@pytest.mark.parametrize("datatype, shape, nbytes, match", [
    ("INT16", [1, 28, 28], 784 * 2, "unknown datatype 'INT16'"),
    ("UINT8", [1, 28, 27], 756, r"shape \[1, 28, 27\] is not"),
    ("UINT8", [28, 28], 784, r"shape \[28, 28\] is not"),
    ("UINT8", [1, 3, 28, 28], 784 * 3, "is not"),
    ("UINT8", [0, 28, 28], 0, "empty batch"),
    ("UINT8", [9, 28, 28], 784 * 9, "batch of 9 images exceeds the limit of 8"),
    ("UINT8", [2, 28, 28], 784, "raw_input has 784 bytes; shape .* needs 1568"),
    ("FP32", [1, 28, 28], 784, "raw_input has 784 bytes"),
])
def test_malformed(datatype, shape, nbytes, match):
    with pytest.raises(InvalidInput, match=match):
        decode_images(datatype, shape, b"\0" * nbytes, max_batch=8)


@pytest.mark.parametrize("bad, match", [(np.nan, "NaN or infinite values"),
                                        (np.inf, "NaN or infinite"),
                                        (1.5, r"must lie in \[0, 1\]"),
                                        (-0.1, r"must lie in \[0, 1\]")])
def test_bad_float_values(bad, match):
    x = np.zeros((3, 28, 28), np.float32)
    x[1, 5, 5] = bad
    with pytest.raises(InvalidInput, match=match):
        decode_images("FP32", [3, 28, 28], x.tobytes(), 8)


def test_encode_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        encode_images(np.zeros((2, 27, 28), np.uint8))
