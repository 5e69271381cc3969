"""End to end over a real gRPC server on a free port: contract, auth, errors, and the original
attack."""
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.api import ApiError, ModelClient
from common import data, training
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc


@pytest.fixture(scope="module")
def local_target(small_target):
    model, _ = training.load_checkpoint(small_target[0])
    return model


def test_health_and_reflection_without_key(grpc_target):
    ch = grpc.insecure_channel(grpc_target.address)
    resp = health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="modelguard.v1.Inference"), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)
    out = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5))
    names = {s.name for s in out[0].list_services_response.service}
    assert {"modelguard.v1.Inference", "grpc.health.v1.Health"} <= names
    ch.close()


def test_metadata(grpc_target):
    with grpc_target.client() as c:
        m = c.model_metadata()
        assert c.ready()
    assert m.name == "target" and m.version and m.max_batch_size == 64
    assert len(m.classes) == 10 and m.classes[0] == "T-shirt/top"
    assert list(m.inputs[0].shape) == [-1, 28, 28]


def test_predict_matches_local_model(grpc_target, local_target):
    x = data.attack_pool().x[:40]
    want = training.predict_proba(local_target, x)
    with grpc_target.client("e2e-match") as c:
        a_u8 = c.predict(x)
        a_f32 = c.predict(x.astype(np.float32) / 255)
        labels_only = c.predict(x[:5], labels_only=True)
    for a in (a_u8, a_f32):
        np.testing.assert_array_equal(a.labels, want.argmax(1))
        np.testing.assert_allclose(a.probs, want, atol=1e-5)
        np.testing.assert_allclose(a.probs.sum(1), 1, atol=1e-5)
    assert labels_only.probs is None and list(labels_only.labels) == list(want[:5].argmax(1))


def test_request_id_echoed_and_generated(grpc_target):
    with grpc_target.client() as c:
        _, rid = c.predict_batch(np.zeros((1, 28, 28), np.uint8), request_id="req-42")
        _, gen = c.predict_batch(np.zeros((1, 28, 28), np.uint8))
    assert rid == "req-42" and len(gen) == 32


def _raw_predict(address, req, metadata=(("x-api-key", "bad-input-tester"),)):
    ch = grpc.insecure_channel(address)
    try:
        return pb_grpc.InferenceStub(ch).Predict(req, metadata=metadata, timeout=10)
    finally:
        ch.close()


BAD_REQUESTS = {
    "wrong shape": (pb.PredictRequest(datatype="UINT8", shape=[1, 28, 29], raw_input=b"\0" * 812),
                    "shape [1, 28, 29] is not"),
    "wrong byte count": (pb.PredictRequest(datatype="UINT8", shape=[2, 28, 28],
                                           raw_input=b"\0" * 784), "needs 1568"),
    "unknown datatype": (pb.PredictRequest(datatype="FP64", shape=[1, 28, 28],
                                           raw_input=b"\0" * 784 * 8), "unknown datatype 'FP64'"),
    "empty batch": (pb.PredictRequest(datatype="UINT8", shape=[0, 28, 28], raw_input=b""),
                    "empty batch"),
    "batch over the limit": (pb.PredictRequest(datatype="UINT8", shape=[65, 28, 28],
                                               raw_input=b"\0" * 784 * 65),
                             "exceeds the limit of 64"),
    "NaN in FP32": (pb.PredictRequest(datatype="FP32", shape=[1, 28, 28],
                                      raw_input=np.full((1, 28, 28), np.nan, "<f4").tobytes()),
                    "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_server_survives(grpc_target, case):
    req, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as err:
        _raw_predict(grpc_target.address, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    with grpc_target.client() as c:  # still serving
        assert len(c.predict(np.zeros((1, 28, 28), np.uint8)).labels) == 1


def test_missing_key_is_unauthenticated(grpc_target):
    req = pb.PredictRequest(datatype="UINT8", shape=[1, 28, 28], raw_input=b"\0" * 784)
    with pytest.raises(grpc.RpcError) as err:
        _raw_predict(grpc_target.address, req, metadata=())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "missing API key" in err.value.details()
    with pytest.raises(ApiError) as err2:
        ModelClient(grpc_target.address, api_key=None).model_metadata()
    assert err2.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_original_attack_end_to_end(grpc_target, small_target):
    """Copycat over gRPC with a small budget: the stolen model clearly beats chance."""
    from client.attacks.copycat import Copycat
    from client.evaluate import evaluate

    oracle = grpc_target.oracle("e2e-copycat", budget=600)
    result = Copycat(oracle, 600, pool=data.attack_pool(), surrogate="mlp", progress=False,
                     train_config=training.TrainConfig(epochs=8, seed=0)).run()
    assert result.queries_used == 600 == oracle.queries_used
    assert sum(result.answer_kinds.values()) == 600
    target, _ = training.load_checkpoint(small_target[0])
    m = evaluate(result.surrogate, target, data.eval_set().take(1000))
    assert m["stolen_accuracy"] > 0.5 and m["fidelity"] > 0.5, m


def test_cli_copycat_writes_json(grpc_target, small_target, tmp_path):
    import json

    from client.cli import main

    out = tmp_path / "r.json"
    rc = main(["copycat", "--address", grpc_target.address, "--api-key", "e2e-cli",
               "--budget", "300", "--epochs", "3", "--surrogate", "mlp", "--no-progress",
               "--target-checkpoint", str(small_target[0]), "--json", str(out),
               "--save-surrogate", str(tmp_path / "s.pt")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["queries_used"] == 300 and r["eval_items"] == 5000
    assert r["stolen_accuracy"] > 0.3 and 0 <= r["fidelity"] <= 1
    assert (tmp_path / "s.pt").exists()
