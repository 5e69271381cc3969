"""A hostile client against a real in-process server (conftest's ``grpc_target``, open mode):
every bad request is answered with a bounded status (INVALID_ARGUMENT with a short message, or
UNAUTHENTICATED), the request id is bounded and stored once per request, malformed protobuf is
answered without grpcio's deserialization-failure path, keys never reach the log."""
from __future__ import annotations

import logging
import os
import sqlite3
import time

import grpc
import numpy as np
import pytest

from protos import grpc_predict_v2_pb2 as oip
from protos import grpc_predict_v2_pb2_grpc as oip_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from service.codec import MAX_REQUEST_ID_BYTES

KEY = (("x-api-key", "hostile-tester"),)
MAX_DETAILS = 400     # every error message stays short whatever the input's size


def _ok_request(**kw) -> pb.PredictRequest:
    return pb.PredictRequest(datatype="UINT8", shape=[1, 28, 28], raw_input=b"\0" * 784, **kw)


def _call(address, method, request, metadata=KEY):
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", 8 << 20)]) as ch:
        return getattr(pb_grpc.InferenceStub(ch), method)(request, metadata=metadata, timeout=10)


def _status(address, request, method="Predict", metadata=KEY):
    with pytest.raises(grpc.RpcError) as err:
        _call(address, method, request, metadata)
    return err.value.code(), err.value.details()


# -- bounded errors -----------------------------------------------------------------------------
BIG = "X" * 100_000
HOSTILE = {
    "100 KB datatype": (pb.PredictRequest(datatype=BIG, shape=[1, 28, 28], raw_input=b"\0" * 784),
                        "unknown datatype 'XXXX"),
    "10k-dim shape": (pb.PredictRequest(datatype="UINT8", shape=[1] * 10_000, raw_input=b"\0"),
                      "…(10000 items)"),
    "output enum 99": (_ok_request(output=99), "unknown output value 99"),
    "format enum 7": (_ok_request(format=7), "unknown format value 7"),
    "request id over the limit": (_ok_request(id="r" * (MAX_REQUEST_ID_BYTES + 1)),
                                  f"the limit is {MAX_REQUEST_ID_BYTES}"),
    "200 KB request id": (_ok_request(id="r" * 200_000), "request id has 200000 bytes"),
    "request id with a newline": (_ok_request(id="a\nb"), "control characters"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input_is_invalid_argument_with_a_short_message(grpc_target, case):
    req, message = HOSTILE[case]
    code, details = _status(grpc_target.address, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert message in details and len(details) < MAX_DETAILS, details


def test_oip_echoes_no_long_input(grpc_target):
    x = np.zeros((1, 28, 28), np.uint8)

    def infer(**kw):
        req = oip.ModelInferRequest(model_name=kw.pop("model_name", "target"), **kw)
        req.inputs.add(name="images", datatype="UINT8", shape=[1, 28, 28])
        req.raw_input_contents.append(x.tobytes())
        return req

    with grpc.insecure_channel(grpc_target.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        cases = [(infer(model_name=BIG), grpc.StatusCode.NOT_FOUND),
                 (infer(model_version=BIG), grpc.StatusCode.NOT_FOUND),
                 (infer(id="i" * 5000), grpc.StatusCode.INVALID_ARGUMENT)]
        bad_input = infer()
        bad_input.inputs[0].name = BIG
        bad_output = infer()
        bad_output.outputs.add(name=BIG)
        cases += [(bad_input, grpc.StatusCode.INVALID_ARGUMENT),
                  (bad_output, grpc.StatusCode.INVALID_ARGUMENT)]
        for req, want in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(req, metadata=KEY, timeout=10)
            assert err.value.code() == want, err.value.details()
            assert len(err.value.details()) < MAX_DETAILS and "…(" in err.value.details()


def test_request_id_at_the_limit_is_echoed_and_stored_once_per_request(grpc_target):
    rid = "q" * MAX_REQUEST_ID_BYTES
    req = pb.PredictRequest(id=rid, datatype="UINT8", shape=[64, 28, 28],
                            raw_input=b"\1" * 784 * 64)
    assert _call(grpc_target.address, "Predict", req).id == rid
    grpc_target.plane.monitor.flush()
    con = sqlite3.connect(f"file:{grpc_target.monitor_db}?mode=ro", uri=True, timeout=5)
    try:
        rows = con.execute("SELECT n FROM requests WHERE request_id = ?", (rid,)).fetchall()
    finally:
        con.close()
    assert rows == [(64,)]          # one row (and one copy of the id) for the 64 images


# -- malformed protobuf -------------------------------------------------------------------------
# corrupt wire format, a truncated field, bad UTF-8 in field 2 (a string in both requests), an
# over-long varint
MALFORMED = [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x02\xc3\x28", b"\x08" + b"\xff" * 11]
BAD_UTF8 = MALFORMED[2]


def _raw(address, method: str, payload: bytes, metadata=KEY):
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        return call(payload, metadata=metadata, timeout=10)


@pytest.mark.parametrize("method", ["/modelguard.v1.Inference/Predict",
                                    "/inference.GRPCInferenceService/ModelInfer",
                                    "/modelguard.v1.Inference/ModelMetadata"])
def test_malformed_protobuf_is_invalid_argument(grpc_target, method):
    for payload in MALFORMED:
        if method.endswith("ModelMetadata") and payload == BAD_UTF8:
            continue   # an empty message: field 2 is an unknown field there, which parses
        with pytest.raises(grpc.RpcError) as err:
            _raw(grpc_target.address, method, payload)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (payload, err.value.details())
        assert "malformed" in err.value.details() and "not a valid protobuf" in err.value.details()
    # and a well-formed request still works on the same server
    assert _call(grpc_target.address, "Predict", _ok_request()).id


def test_malformed_protobuf_is_logged_rate_limited(grpc_target, caplog):
    from service import servicer

    servicer.malformed_log._next = 0.0                       # a fresh window
    caplog.set_level(logging.WARNING, logger="modelguard.servicer")
    for _ in range(40):
        with pytest.raises(grpc.RpcError):
            _raw(grpc_target.address, "/modelguard.v1.Inference/Predict", b"\xff\xff")
    lines = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]   # one line per 10 s, no traceback
    assert lines[0].exc_info is None
    servicer.malformed_log._next = 0.0                        # the window is over
    with pytest.raises(grpc.RpcError):
        _raw(grpc_target.address, "/modelguard.v1.Inference/Predict", b"\xff\xff")
    last = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()][-1]
    assert "39 more like it suppressed" in last


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_malformed_protobuf_does_not_grow_memory(grpc_target):
    """grpcio's own deserialization-failure path kept ~19 KB per call (the issue's measurement);
    the server's raw-bytes handlers do not: 3,000 malformed calls, RSS within a few MB."""
    from service import servicer

    servicer.malformed_log._next = time.monotonic() + 3600     # keep the test's log quiet
    with grpc.insecure_channel(grpc_target.address) as ch:
        call = ch.unary_unary("/modelguard.v1.Inference/Predict", request_serializer=None,
                              response_deserializer=None)

        def burst(n):
            for i in range(n):
                try:
                    call(MALFORMED[i % len(MALFORMED)], metadata=KEY, timeout=10)
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT

        burst(300)                                             # warm-up: pools, caches
        before = _rss_mb()
        burst(3000)
        grown = _rss_mb() - before
    servicer.malformed_log._next = 0.0
    assert grown < 20, f"RSS grew {grown:.1f} MB over 3,000 malformed calls"


# -- keys -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method, request_", [
    ("ServerLive", pb.ServerLiveRequest()), ("ServerReady", pb.ServerReadyRequest())])
def test_liveness_and_readiness_need_no_key(grpc_target, method, request_):
    resp = _call(grpc_target.address, method, request_, metadata=())
    assert resp.live if method == "ServerLive" else resp.ready
    code, _ = _status(grpc_target.address, pb.ModelMetadataRequest(), "ModelMetadata", ())
    assert code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("key, message", [("   ", "blank"), ("two words", "printable ASCII"),
                                          ("k" * 300, "longer than 256")])
def test_malformed_keys_are_unauthenticated(grpc_target, key, message):
    code, details = _status(grpc_target.address, _ok_request(), metadata=(("x-api-key", key),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and message in details
    assert key.strip() not in details or not key.strip()


def test_open_mode_keeps_no_key_in_the_log(grpc_target):
    key = "open-mode-secret-key-7f3a9c"
    with grpc_target.client(key) as c:
        c.predict(np.full((3, 28, 28), 7, np.uint8))
    grpc_target.plane.monitor.flush()
    cid = grpc_target.client_id(key)
    assert cid.startswith("k-") and key not in cid
    con = sqlite3.connect(f"file:{grpc_target.monitor_db}?mode=ro", uri=True, timeout=5)
    try:
        assert con.execute("SELECT SUM(n) FROM requests WHERE client = ?", (cid,)).fetchone() \
            == (3,)
        assert con.execute("SELECT COUNT(*) FROM requests WHERE client = ?",
                           (key,)).fetchone() == (0,)
    finally:
        con.close()
    db = grpc_target.monitor_db
    for path in db.parent.glob(db.name + "*"):                  # the database, its WAL, ...
        assert key.encode() not in path.read_bytes(), path


def test_keys_file_server_logs_names(small_target, tmp_path):
    from tests.conftest import start_server

    keys = tmp_path / "keys.toml"
    keys.write_text('alice = "alice-key-0123"\nbob = "bob-key-4567"\n')
    server, plane, db = start_server(small_target[0], tmp_path, api_keys=keys)
    try:
        from client.api import ApiError, ModelClient

        with ModelClient(server.address, "alice-key-0123") as c:
            c.predict(np.zeros((2, 28, 28), np.uint8))
        with ModelClient(server.address, "alice") as c, pytest.raises(ApiError) as err:
            c.predict(np.zeros((1, 28, 28), np.uint8))
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert server.client_id("bob-key-4567") == "bob"
        plane.monitor.flush()
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            assert con.execute("SELECT client, SUM(n) FROM requests GROUP BY client").fetchall() \
                == [("alice", 2)]
        finally:
            con.close()
    finally:
        server.stop(0.5)
