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
        _, gen2 = c.predict_batch(np.zeros((1, 28, 28), np.uint8))
    assert rid == "req-42" and gen and gen2 and gen != gen2  # generated ids are unique


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
    assert r["stolen_accuracy"] > 0.3 and r["fidelity"] > 0.3   # agrees with the target far above chance
    assert (tmp_path / "s.pt").exists()


# --------------------------------------------------------------------------------------------
# Response formats (proto v1.1: PredictRequest.format, PredictResponse.labels/raw_output)
# --------------------------------------------------------------------------------------------

def _legacy_response(answer, rid="r"):
    """The response as the server built it before the packed format: one message per image."""
    from lab.hotpath import legacy_response
    return legacy_response(pb, answer, rid, model_version="v")


@pytest.mark.parametrize("n", [1, 7, 8, 64, 256])
@pytest.mark.parametrize("with_probs", [True, False])
def test_build_response_keeps_the_contract_and_packs(n, with_probs):
    from client.api import decode_response
    from common.types import Answer, AnswerKind
    from service.servicer import build_response

    rng = np.random.default_rng(n)
    probs = rng.dirichlet(np.full(10, 0.3), n).astype(np.float32)
    ans = (Answer(probs.argmax(1), probs, AnswerKind.PROBABILITIES) if with_probs
           else Answer(probs.argmax(1), None, AnswerKind.LABEL_ONLY))
    old = _legacy_response(ans)
    new = build_response(pb.FORMAT_PREDICTIONS, ans, "r", "target", "v")
    assert new == old                                   # same message, field for field
    assert pb.PredictResponse.FromString(new.SerializeToString()) == old
    packed = pb.PredictResponse.FromString(
        build_response(pb.FORMAT_PACKED, ans, "r", "target", "v").SerializeToString())
    assert len(packed.predictions) == 0 and list(packed.labels) == ans.labels.tolist()
    assert len(packed.raw_output) == (n * 40 if with_probs else 0)
    for resp in (old, packed):
        got = decode_response(resp)
        np.testing.assert_array_equal(got.labels, ans.labels)
        assert got.kind == ans.kind
        if with_probs:
            np.testing.assert_array_equal(got.probs, ans.probs)   # bit-exact float32
        else:
            assert got.probs is None


def test_packed_and_old_clients_get_the_same_answers(grpc_target):
    x = data.attack_pool().x[:300]
    with grpc_target.client("e2e-formats") as c:
        packed = c.predict(x)
        c.packed = False
        old = c.predict(x)
        labels_old = c.predict(x[:20], labels_only=True)
        c.packed = True
        labels_packed = c.predict(x[:20], labels_only=True)
    np.testing.assert_array_equal(packed.labels, old.labels)
    np.testing.assert_array_equal(packed.probs, old.probs)
    assert labels_old.probs is None and labels_packed.probs is None
    np.testing.assert_array_equal(labels_old.labels, labels_packed.labels)
    # on the wire: an old client (no format field) gets predictions, a new one the packed arrays
    raw = x[:10].tobytes()
    req = pb.PredictRequest(datatype="UINT8", shape=[10, 28, 28], raw_input=raw)
    r_old = _raw_predict(grpc_target.address, req)
    assert len(r_old.predictions) == 10 and len(r_old.labels) == 0 and not r_old.raw_output
    req.format = pb.FORMAT_PACKED
    r_new = _raw_predict(grpc_target.address, req)
    assert len(r_new.predictions) == 0 and len(r_new.labels) == 10
    probs = np.frombuffer(r_new.raw_output, "<f4").reshape(10, 10)
    np.testing.assert_array_equal(probs, [p.probabilities for p in r_old.predictions])
    np.testing.assert_array_equal(list(r_new.labels), [p.label for p in r_old.predictions])


def test_client_rejects_a_malformed_packed_response():
    from client.api import decode_response

    bad = pb.PredictResponse(kind=pb.ANSWER_PROBABILITIES, labels=[1, 2], raw_output=b"\0" * 40)
    with pytest.raises(ValueError, match="raw_output has 40 bytes for 2 labels"):
        decode_response(bad)


# --------------------------------------------------------------------------------------------
# --no-monitor and the data plane's per-request digests
# --------------------------------------------------------------------------------------------

def test_no_monitor_serves_from_the_same_config_and_logs_nothing(small_target, tmp_path):
    from common.types import Level
    from monitor import load_config
    from service.config import ServerConfig
    from service.dataplane import build_dataplane

    config = load_config(None)
    cfg = ServerConfig(port=0, target=small_target[0], artifacts=tmp_path,
                       monitor_db=tmp_path / "monitor.db", secret="test-secret", monitor=False)
    plane = build_dataplane(cfg, config.model_copy(update={
        "policies": {lvl.name.lower(): {"policy": "identity"} for lvl in Level
                     if lvl != Level.BLOCK}}))
    try:
        assert plane.monitor.level("mallory") == Level.NORMAL
        assert plane.watermark is not None and plane.watermark.rate == config.watermark["rate"]
        x = data.attack_pool().x[:50].astype(np.float32) / 255
        for i in range(3):
            r = plane.predict("mallory", f"r{i}", x)
            assert r.level == Level.NORMAL and len(r.answer) == 50
    finally:
        plane.close()
    assert not (tmp_path / "monitor.db").exists()
    assert ServerConfig().monitor is True


def test_no_monitor_flag_reaches_the_config(monkeypatch):
    import service.__main__ as cli

    seen = {}

    def fake_serve(args):   # parse only: the real _serve would load a target and serve
        seen["monitor"] = args.monitor
        return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    assert cli.main(["serve", "--no-monitor"]) == 0 and seen["monitor"] is False
    assert cli.main(["serve"]) == 0 and seen["monitor"] is None   # ServerConfig's default


def test_dataplane_hashes_each_request_once(small_target, tmp_path, monkeypatch):
    from common.types import Level
    from service.dataplane import DataPlane, TargetModel
    from service.defences import Watermark, build_policy
    from service.defences import base

    class Quiet:
        def __init__(self, level):
            self.lvl = level

        def level(self, client, images=None):
            return self.lvl

        def observe(self, client_id, request_id, images, probs, answer, level, *, wait=True):
            return level

        def wait_durable(self, client_id):
            pass

        def queries(self, client_id):
            return None

        def close(self):
            pass

    calls = []
    real = base.image_digests
    monkeypatch.setattr(base, "image_digests", lambda k, x: calls.append(len(x)) or real(k, x))
    policies = {Level.NORMAL: build_policy({"policy": "identity"}),
                Level.NOISE: build_policy({"policy": "gaussian", "sigma": 0.1}),
                Level.LABEL_ONLY: build_policy({"policy": "label_only"}),
                Level.SWITCH: build_policy({"policy": "reverse_sigmoid"})}
    x = data.attack_pool().x[:40].astype(np.float32) / 255
    model = TargetModel.load(small_target[0])
    for wm, level, want in [(Watermark(b"k", 0.05), Level.NOISE, [40]),
                            (Watermark(b"k", 0.05), Level.NORMAL, [40]),
                            (None, Level.NOISE, [40]),
                            (None, Level.SWITCH, [])]:
        calls.clear()
        plane = DataPlane(model, Quiet(level), policies, wm, b"k", 64)
        plane.predict("alice", "r", x)
        assert calls == want, (wm, level)
