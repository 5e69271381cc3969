"""``serve --aio``: the same API on grpc.aio's event loop (service/aio.py), with the real monitor.

A call's short parts run on the loop thread, the parts that may wait (service.steps.Blocking)
on the worker threads; answers, status codes, health and the monitor's log are the thread-pool
server's."""
from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import data
from protos import grpc_predict_v2_pb2 as oip
from protos import grpc_predict_v2_pb2_grpc as oip_grpc
from protos import inference_pb2 as pb
from tests.conftest import start_server

LOOP, WORKER = "grpc-aio-loop", "aio-blocking"


@pytest.fixture(scope="module")
def servers(small_target, tmp_path_factory):
    """The same target and monitor config behind a thread-pool server and an aio server."""
    out = {}
    for kind in ("threads", "aio"):
        server, plane, db = start_server(small_target[0], tmp_path_factory.mktemp(kind),
                                         aio=kind == "aio")
        out[kind] = (server, plane, db)
    yield out
    for server, _, _ in out.values():
        server.stop(0.5)


@pytest.fixture(scope="module")
def pool():
    return np.asarray(data.attack_pool().x[:200])


def _predict(address, x, key="aio-tester", packed=True, output=pb.OUTPUT_PROBABILITIES):
    req = pb.PredictRequest(datatype="UINT8", shape=list(x.shape), raw_input=x.tobytes(),
                            output=output, format=pb.FORMAT_PACKED if packed else
                            pb.FORMAT_PREDICTIONS)
    with grpc.insecure_channel(address) as ch:
        md = () if key is None else (("x-api-key", key),)
        stub = ch.unary_unary("/modelguard.v1.Inference/Predict",
                              request_serializer=pb.PredictRequest.SerializeToString,
                              response_deserializer=pb.PredictResponse.FromString)
        return stub(req, metadata=md, timeout=20)


def _infer(address, x, key="aio-tester"):
    t = oip.ModelInferRequest.InferInputTensor(name="images", datatype="UINT8",
                                              shape=list(x.shape))
    req = oip.ModelInferRequest(model_name="target", inputs=[t], raw_input_contents=[x.tobytes()])
    with grpc.insecure_channel(address) as ch:
        return oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
            req, metadata=(("x-api-key", key),), timeout=20)


def _answer(resp):
    return list(resp.labels), bytes(resp.raw_output)


@pytest.mark.parametrize("n", [1, 40])   # on the loop; above small_request_items (16)
def test_aio_answers_as_the_thread_pool_server_does(servers, pool, n):
    x = pool[:n]
    answers = {k: _predict(s.address, x) for k, (s, _, _) in servers.items()}
    assert _answer(answers["aio"]) == _answer(answers["threads"])
    assert len(answers["aio"].labels) == n and answers["aio"].kind == pb.ANSWER_PROBABILITIES
    per_image = {k: _predict(s.address, x, packed=False) for k, (s, _, _) in servers.items()}
    assert per_image["aio"].predictions == per_image["threads"].predictions
    labels = {k: _predict(s.address, x, output=pb.OUTPUT_LABEL) for k, (s, _, _) in
              servers.items()}
    assert labels["aio"].raw_output == b"" and labels["aio"].labels == labels["threads"].labels
    infer = {k: _infer(s.address, x) for k, (s, _, _) in servers.items()}
    assert list(infer["aio"].raw_output_contents) == list(infer["threads"].raw_output_contents)
    assert list(infer["aio"].raw_output_contents)[0] == np.asarray(
        answers["aio"].labels, "<i8").tobytes()


def test_aio_refuses_what_the_thread_pool_server_refuses_with_the_same_codes(servers, pool):
    for server, _, _ in servers.values():
        with pytest.raises(grpc.RpcError) as nokey:
            _predict(server.address, pool[:1], key=None)
        too_many = np.zeros((65, 28, 28), np.uint8)          # the fixture's max_batch is 64
        with pytest.raises(grpc.RpcError) as big:
            _predict(server.address, too_many)
        with grpc.insecure_channel(server.address) as ch:
            raw = ch.unary_unary("/modelguard.v1.Inference/Predict", request_serializer=None,
                                 response_deserializer=None)
            with pytest.raises(grpc.RpcError) as malformed:
                raw(b"\xff\xff\xff\xff", metadata=(("x-api-key", "aio-tester"),), timeout=10)
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="modelguard.v1.Inference"), timeout=5)
            listed = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        assert nokey.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing API key" in nokey.value.details()
        assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "65" in big.value.details()
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid protobuf" in malformed.value.details()
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        names = {s.name for s in listed[0].list_services_response.service}
        assert {"modelguard.v1.Inference", "inference.GRPCInferenceService"} <= names


def test_aio_computes_small_requests_on_the_loop_and_waits_on_the_workers(servers, pool,
                                                                           monkeypatch):
    server, plane, _ = servers["aio"]
    seen = []
    model_fn, durable_fn = plane.model.predict_proba, plane.monitor.wait_durable

    def model(images):
        seen.append(("model", len(images), threading.current_thread().name))
        return model_fn(images)

    def durable(client_id):
        seen.append(("durable", 0, threading.current_thread().name))
        return durable_fn(client_id)

    monkeypatch.setattr(plane.model, "predict_proba", model)
    monkeypatch.setattr(plane.monitor, "wait_durable", durable)
    _predict(server.address, pool[:1], key="aio-threads")
    _predict(server.address, pool[:40], key="aio-threads")
    where = {(what, n): name for what, n, name in seen}
    assert where[("model", 1)] == LOOP
    assert where[("model", 40)].startswith(WORKER)
    # the default log durability: an answer waits for its rows' commit, on a worker
    waits = [name for what, _, name in seen if what == "durable"]
    assert len(waits) == 2 and all(name.startswith(WORKER) for name in waits)


def test_aio_concurrent_clients_are_all_answered_and_logged(servers, pool):
    server, plane, _ = servers["aio"]
    sizes = [1, 3, 1, 24, 1, 8]
    keys = [f"aio-conc-{i}" for i in range(4)]

    def client(key):
        n = 0
        for i, size in enumerate(sizes * 3):
            x = pool[(7 * i) % 150:(7 * i) % 150 + size]
            assert len(_predict(server.address, x, key=key).labels) == size
            n += size
        return n

    with futures.ThreadPoolExecutor(len(keys)) as ex:
        sent = dict(zip(keys, ex.map(client, keys)))
    plane.monitor.flush()
    for key, n in sent.items():
        assert plane.monitor.queries(server.client_id(key)) == n


def test_aio_stop_ends_the_loop_and_refuses_new_calls(small_target, tmp_path, pool):
    server, _, _ = start_server(small_target[0], tmp_path, aio=True)
    address = server.address
    assert len(_predict(address, pool[:2]).labels) == 2
    server.stop(0.5)
    assert not server.aio._thread.is_alive()
    with pytest.raises(grpc.RpcError) as err:
        _predict(address, pool[:1])
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
