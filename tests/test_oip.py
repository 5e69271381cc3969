"""The Open Inference Protocol v2 service (inference.GRPCInferenceService, service/oip.py) on a
real in-process server: NVIDIA's tritonclient (from PyPI, in its own venv: it needs protobuf < 7)
as a subprocess, and the generated stubs for the error cases."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from common import data
from protos import grpc_predict_v2_pb2 as oip
from protos import grpc_predict_v2_pb2_grpc as oip_grpc

REPO = Path(__file__).resolve().parents[1]
TRITON_VENV = REPO / ".venv-triton"
VOLUME = 40   # a key's VOLUME+1-th query raises it to LABEL_ONLY (the only rule here)


def oip_monitor_config(volume: int = VOLUME):
    """Only the volume detector, raising a key to LABEL_ONLY past ``volume`` queries; identity
    answers below that, label-only from it; no watermark, no linking: answers are the target's."""
    from monitor import load_config
    from monitor.config import config_from_dict

    base = load_config().model_dump(mode="python")
    for name in base["detectors"]:
        base["detectors"][name]["enabled"] = name == "volume"
    base["detectors"]["volume"]["threshold"] = volume
    base["rules"] = [{"detectors": ["volume"], "level": "label_only"}]
    base["linking"]["enabled"] = False
    base["policies"] = {"normal": {"policy": "identity"}, "noise": {"policy": "identity"},
                        "label_only": {"policy": "label_only"}, "switch": {"policy": "identity"}}
    base["watermark"] = {}
    return config_from_dict(base)


def start_oip_server(target: Path, workdir: Path, metrics_port: int | None = None,
                     volume: int = VOLUME, aio: bool = False):
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    cfg = ServerConfig(port=0, max_batch=64, workers=4, artifacts=workdir, target=target,
                       monitor_db=workdir / "monitor.db", grace_s=1.0, secret="test-secret",
                       dev_secret=True, open_keys=True,
                       metrics_port=metrics_port, aio=aio)
    return Server(cfg, build_dataplane(cfg, oip_monitor_config(volume))).start()


@pytest.fixture(scope="module")
def oip_server(small_target, tmp_path_factory):
    server = start_oip_server(small_target[0], tmp_path_factory.mktemp("oip"))
    yield server
    server.stop(0.5)


def _pypi_reachable() -> bool:
    r = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "tritonclient",
                        "--disable-pip-version-check"], capture_output=True, text=True,
                       timeout=120)
    return r.returncode == 0 and "tritonclient" in r.stdout


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """.venv-triton/bin/python with tritonclient[grpc], made by `make triton-venv` if missing."""
    py = TRITON_VENV / "bin" / "python"
    if not (TRITON_VENV / ".installed").exists():
        r = subprocess.run(["make", "-s", "triton-venv"], cwd=REPO, capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            if not _pypi_reachable():
                pytest.skip("PyPI is unreachable: cannot install tritonclient[grpc] into "
                            ".venv-triton (make triton-venv)")
            pytest.fail(f"make triton-venv failed:\n{r.stdout}\n{r.stderr}")
    assert py.exists(), py
    return py


TRITON_SCRIPT = r'''
import json, sys
import numpy as np
import tritonclient.grpc as g
from tritonclient.utils import InferenceServerException

address, arrays_in, arrays_out = sys.argv[1:4]
x = dict(np.load(arrays_in))
c = g.InferenceServerClient(url=address)
H = lambda key: {"x-api-key": key}
res, out = {}, {}

res["live"] = c.is_server_live(headers=H("alice"))
res["ready"] = c.is_server_ready(headers=H("alice"))
res["model_ready"] = c.is_model_ready("target", headers=H("alice"))
res["other_model_ready"] = c.is_model_ready("resnet", headers=H("alice"))
res["server"] = c.get_server_metadata(headers=H("alice"), as_json=True)
res["model"] = c.get_model_metadata("target", headers=H("alice"), as_json=True)


def infer(key, images, datatype="UINT8", outputs=None, model="target", version="", rid=""):
    i = g.InferInput("images", list(images.shape), datatype)
    i.set_data_from_numpy(images)
    outs = None if outputs is None else [g.InferRequestedOutput(o) for o in outputs]
    r = c.infer(model, [i], model_version=version, outputs=outs, headers=H(key),
                request_id=rid)
    return r, r.get_response(as_json=True)


def error(**kw):
    try:
        infer(**kw)
    except InferenceServerException as e:
        return [e.status(), e.message()]
    return None


a = x["alice"]
r, js = infer("alice", a, rid="alice-1")
out["alice_label"], out["alice_probs"] = r.as_numpy("label"), r.as_numpy("probabilities")
res["alice"] = {"id": js.get("id"), "parameters": js.get("parameters"),
                "outputs": js.get("outputs")}
r, _ = infer("alice", a.reshape(len(a), 784).astype(np.float32) / np.float32(255), "FP32")
out["alice_f32_label"], out["alice_f32_probs"] = r.as_numpy("label"), r.as_numpy("probabilities")
r, js = infer("alice", a[:5], outputs=["label"])
res["alice_label_asked"] = {"probs_is_none": r.as_numpy("probabilities") is None,
                            "parameters": js.get("parameters")}
out["alice_label_asked"] = r.as_numpy("label")

m = x["mallory"]
r, js = infer("mallory", m[:-5])                 # past the volume threshold: escalated
res["mallory_first"] = {"has_probs": r.as_numpy("probabilities") is not None,
                        "parameters": js.get("parameters")}
r, js = infer("mallory", m[-5:])                 # answered at LABEL_ONLY
res["mallory_after"] = {"probs_is_none": r.as_numpy("probabilities") is None,
                        "parameters": js.get("parameters"),
                        "outputs": [o["name"] for o in js.get("outputs", [])]}
out["mallory_after_label"] = r.as_numpy("label")

res["wrong_model"] = error(key="carol", images=a[:1], model="resnet")
res["wrong_version"] = error(key="carol", images=a[:1], version="999")
res["bad_shape"] = error(key="carol", images=np.zeros((1, 28, 29), np.uint8))
res["no_key"] = None
i = g.InferInput("images", [1, 28, 28], "UINT8")
i.set_data_from_numpy(a[:1])
try:
    c.infer("target", [i])
except InferenceServerException as e:
    res["no_key"] = [e.status(), e.message()]
np.savez(arrays_out, **out)
print(json.dumps(res))
'''


@pytest.fixture(scope="module")
def triton_run(oip_server, triton_python, tmp_path_factory):
    """Run TRITON_SCRIPT against the server once: (json results, arrays, the images sent)."""
    tmp = tmp_path_factory.mktemp("triton")
    pool = data.attack_pool().x
    images = {"alice": pool[:8], "mallory": pool[100:100 + VOLUME + 15]}
    np.savez(tmp / "in.npz", **images)
    (tmp / "run.py").write_text(TRITON_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(triton_python), str(tmp / "run.py"), oip_server.address,
                        str(tmp / "in.npz"), str(tmp / "out.npz")], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, f"tritonclient script failed:\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1]), dict(np.load(tmp / "out.npz")), images


def test_tritonclient_metadata_and_readiness(triton_run, oip_server):
    res, _, _ = triton_run
    assert res["live"] and res["ready"] and res["model_ready"]
    assert res["other_model_ready"] is False
    assert res["server"]["name"] == "modelguard"
    m = res["model"]
    assert m["name"] == "target" and m["versions"] == [oip_server.plane.model.version]
    assert [(t["name"], t["datatype"]) for t in m["inputs"]] == [("images", "FP32")]
    assert [(t["name"], t["datatype"]) for t in m["outputs"]] == [("label", "INT64"),
                                                                   ("probabilities", "FP32")]


def test_tritonclient_answers_equal_the_v1_api(triton_run, oip_server):
    from client.api import ModelClient

    res, out, images = triton_run
    with ModelClient(oip_server.address, "alice") as c:
        want = c.predict(images["alice"])
    assert out["alice_label"].dtype == np.int64 and out["alice_probs"].dtype == np.float32
    assert out["alice_probs"].shape == (8, 10)
    np.testing.assert_array_equal(out["alice_label"], want.labels)
    np.testing.assert_array_equal(out["alice_probs"], want.probs)
    np.testing.assert_array_equal(out["alice_f32_label"], want.labels)
    np.testing.assert_allclose(out["alice_f32_probs"], want.probs, atol=1e-6)
    assert res["alice"]["id"] == "alice-1"
    assert res["alice"]["parameters"]["probabilities_withheld"] == {"bool_param": False}
    assert res["alice"]["parameters"]["modelguard_answer"] == {"string_param": "probabilities"}
    assert "modelguard_level" not in res["alice"]["parameters"]   # never told (see oip.py)
    # only the label requested: only the label sent, not counted as withheld
    assert res["alice_label_asked"]["probs_is_none"]
    np.testing.assert_array_equal(out["alice_label_asked"], want.labels[:5])
    assert res["alice_label_asked"]["parameters"]["probabilities_withheld"] == {
        "bool_param": False}


def test_tritonclient_label_only_level_withholds_probabilities(triton_run):
    res, out, _ = triton_run
    assert res["mallory_first"]["has_probs"]
    after = res["mallory_after"]
    assert after["probs_is_none"] and after["outputs"] == ["label"]
    assert after["parameters"]["probabilities_withheld"] == {"bool_param": True}
    assert after["parameters"]["modelguard_answer"] == {"string_param": "label_only"}
    assert out["mallory_after_label"].shape == (5,)


def test_tritonclient_errors(triton_run):
    res, _, _ = triton_run
    status, message = res["wrong_model"]
    assert status == "StatusCode.NOT_FOUND" and "unknown model 'resnet'" in message
    status, message = res["wrong_version"]
    assert status == "StatusCode.NOT_FOUND" and "no version '999'" in message
    status, message = res["bad_shape"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "shape [1, 28, 29]" in message
    status, message = res["no_key"]
    assert status == "StatusCode.UNAUTHENTICATED" and "missing API key" in message


def test_tritonclient_calls_are_in_the_monitor_log(triton_run, oip_server):
    from common.types import Level
    from monitor.log import QueryLog

    _, _, images = triton_run
    oip_server.plane.monitor.flush()
    with QueryLog(oip_server.cfg.monitor_db) as q:
        per = {s["client"]: s for s in q.summary()}
        trs = q.transitions(oip_server.client_id("mallory"))
    assert per[oip_server.client_id("mallory")]["queries"] == len(images["mallory"])
    assert per[oip_server.client_id("alice")]["queries"] >= 8 + 8 + 5
    assert oip_server.client_id("carol") not in per   # rejected before the data plane
    assert [(t["from_level"], t["to_level"]) for t in trs] == [(Level.NORMAL, Level.LABEL_ONLY)]
    assert trs[0]["qn"] == VOLUME + 1 and "volume" in trs[0]["rule"]


# --------------------------------------------------------------------------------------------
# The generated stubs: what tritonclient does not exercise
# --------------------------------------------------------------------------------------------

def _infer(address, req, key="stub-tester"):
    with grpc.insecure_channel(address) as ch:
        md = () if key is None else (("x-api-key", key),)
        return oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=md, timeout=10)


def _request(x: np.ndarray, datatype="UINT8", shape=None, raw=True, outputs=(), **kw):
    t = oip.ModelInferRequest.InferInputTensor(name="images", datatype=datatype,
                                              shape=list(x.shape if shape is None else shape))
    req = oip.ModelInferRequest(model_name="target", inputs=[t],
                                outputs=[oip.ModelInferRequest.InferRequestedOutputTensor(name=o)
                                         for o in outputs], **kw)
    if raw:
        req.raw_input_contents.append(x.tobytes())
    elif datatype == "UINT8":
        req.inputs[0].contents.uint_contents.extend(x.reshape(-1).tolist())
    else:
        req.inputs[0].contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def _outputs(resp) -> dict:
    dt = {"INT64": "<i8", "FP32": "<f4"}
    return {o.name: np.frombuffer(raw, dt[o.datatype]).reshape(o.shape)
            for o, raw in zip(resp.outputs, resp.raw_output_contents)}


def test_typed_contents_and_shapes_give_the_same_answer(oip_server):
    x = data.attack_pool().x[200:206]
    f = x.astype(np.float32) / np.float32(255)
    ref = _outputs(_infer(oip_server.address, _request(x), key="typed"))
    assert ref["label"].shape == (6,) and ref["probabilities"].shape == (6, 10)
    for req in (_request(x, raw=False), _request(f, "FP32", raw=False),
                _request(f, "FP32", shape=[6, 1, 28, 28]), _request(x, shape=[6, 784])):
        got = _outputs(_infer(oip_server.address, req, key="typed"))
        np.testing.assert_array_equal(got["label"], ref["label"])
        np.testing.assert_allclose(got["probabilities"], ref["probabilities"], atol=1e-6)


def test_requested_outputs_order_and_generated_id(oip_server):
    x = data.attack_pool().x[:3]
    resp = _infer(oip_server.address, _request(x, outputs=("probabilities", "label")),
                  key="outputs")
    assert [o.name for o in resp.outputs] == ["probabilities", "label"]
    assert resp.id and resp.model_name == "target"
    assert resp.model_version == oip_server.plane.model.version
    resp = _infer(oip_server.address, _request(x, outputs=("probabilities",)), key="outputs")
    assert [o.name for o in resp.outputs] == ["probabilities"]
    assert not resp.parameters["probabilities_withheld"].bool_param


def _bad(**kw):
    x = np.zeros((1, 28, 28), np.uint8)
    return _request(x, **kw)


def _two_inputs():
    req = _bad()
    req.inputs.append(req.inputs[0])
    req.raw_input_contents.append(req.raw_input_contents[0])
    return req


def _renamed():
    req = _bad()
    req.inputs[0].name = "pixels"
    return req


def _raw_and_typed():
    req = _bad()
    req.inputs[0].contents.uint_contents.extend([0] * 784)
    return req


BAD = {
    "wrong shape": (lambda: _bad(shape=[1, 28, 29]), "is not [N, 28, 28], [N, 1, 28, 28] or "
                                                     "[N, 784]"),
    "wrong byte count": (lambda: _bad(shape=[2, 28, 28]), "needs 1568"),
    "unknown datatype": (lambda: _bad(datatype="FP64"), "unknown datatype 'FP64'"),
    "empty batch": (lambda: _request(np.zeros((0, 28, 28), np.uint8)), "empty batch"),
    "batch over the limit": (lambda: _request(np.zeros((65, 28, 28), np.uint8)),
                             "exceeds the limit of 64"),
    "NaN in FP32": (lambda: _request(np.full((1, 28, 28), np.nan, "<f4"), "FP32"), "NaN"),
    "two inputs": (_two_inputs, "expected one input tensor 'images'; got 2"),
    "unknown input": (_renamed, "unknown input 'pixels'"),
    "unknown output": (lambda: _bad(outputs=("logits",)), "unknown output(s) ['logits']"),
    "raw and typed": (_raw_and_typed, "both raw_input_contents and contents"),
    "typed count": (lambda: _request(np.zeros((1, 28, 20), np.uint8), shape=[1, 28, 28],
                                     raw=False), "has 560 values; shape [1, 28, 28] needs 784"),
    "typed over 255": (lambda: _request(np.full((1, 28, 28), 256, np.uint32), raw=False),
                       "UINT8 values must lie in 0..255"),
    "no data": (lambda: _request(np.zeros((1, 28, 28), np.uint8)[:0], shape=[1, 28, 28],
                                 raw=False), "has no data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_argument(oip_server, case):
    make, message = BAD[case]
    with pytest.raises(grpc.RpcError) as err:
        _infer(oip_server.address, make())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert message in err.value.details()


def test_not_found_and_unauthenticated(oip_server):
    x = np.zeros((1, 28, 28), np.uint8)
    for kw, message in [({"model_name": "resnet"}, "unknown model 'resnet'"),
                        ({"model_version": "7"}, "no version '7'")]:
        req = _request(x)
        for k, v in kw.items():
            setattr(req, k, v)
        with pytest.raises(grpc.RpcError) as err:
            _infer(oip_server.address, req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and message in err.value.details()
    with grpc.insecure_channel(oip_server.address) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        md = (("x-api-key", "stub-tester"),)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelMetadata(oip.ModelMetadataRequest(name="resnet"), metadata=md, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert not stub.ModelReady(oip.ModelReadyRequest(name="target", version="7"),
                                   metadata=md, timeout=5).ready
        # liveness and readiness need no key (probes carry none); everything else does
        assert stub.ServerLive(oip.ServerLiveRequest(), timeout=5).live
        assert stub.ServerReady(oip.ServerReadyRequest(), timeout=5).ready
        with pytest.raises(grpc.RpcError) as err:
            stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_name_the_oip_service(oip_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(oip_server.address) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        out = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services=""),
                  reflection_pb2.ServerReflectionRequest(
                      file_containing_symbol="inference.GRPCInferenceService")]), timeout=5))
    names = {s.name for s in out[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "modelguard.v1.Inference"} <= names
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto.FromString(
        out[1].file_descriptor_response.file_descriptor_proto[0])
    assert fd.package == "inference" and fd.service[0].name == "GRPCInferenceService"
    assert [m.name for m in fd.service[0].method] == [
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer"]
