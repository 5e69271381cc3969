"""Prometheus metrics (service/metrics.py): a real server with --metrics-port, real traffic over
both APIs (one client escalated by the monitor), a scrape of /metrics parsed with
prometheus_client's parser."""
from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import data
from protos import grpc_predict_v2_pb2_grpc as oip_grpc
from protos import inference_pb2 as pb
from protos import inference_pb2_grpc as pb_grpc
from tests.test_oip import _request, start_oip_server

VOLUME = 20   # mallory's 21st query raises it to LABEL_ONLY


def scrape(port: int) -> dict:
    """{(name, frozenset(labels)): value} of every sample at http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def matching(samples: dict, name: str, **labels) -> dict:
    want = set(labels.items())
    return {dict(k[1]).get("rule", ""): v for k, v in samples.items()
            if k[0] == name and want <= k[1]}


@pytest.fixture(params=[False, True], ids=["threads", "aio"])
def metrics_server(small_target, tmp_path_factory, request):
    """A fresh server per test: the counts start at zero. Both transports (``serve --aio``
    counts the same)."""
    server = start_oip_server(small_target[0], tmp_path_factory.mktemp("metrics"),
                              metrics_port=0, volume=VOLUME, aio=request.param)
    yield server
    server.stop(0.5)


def _oip(address, req, key):
    with grpc.insecure_channel(address) as ch:
        md = (("x-api-key", key),)
        return oip_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, metadata=md, timeout=10)


def test_metrics_count_what_was_sent(metrics_server):
    from client.api import ModelClient

    srv = metrics_server
    assert srv.metrics_port and srv.metrics_port != srv.port
    pool = data.attack_pool().x
    with ModelClient(srv.address, "alice") as c:
        for i in range(3):
            c.predict(pool[4 * i:4 * i + 4])                   # v1, NORMAL, probabilities
        c.predict(pool[20:22], labels_only=True)               # v1, NORMAL, label only asked
    _oip(srv.address, _request(pool[100:130]), "mallory")      # 30 > VOLUME: escalated here
    for i in range(2):                                          # answered at LABEL_ONLY
        r = _oip(srv.address, _request(pool[130 + 5 * i:135 + 5 * i]), "mallory")
        assert r.parameters["probabilities_withheld"].bool_param
    with grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.InferenceStub(ch)
        bad = pb.PredictRequest(datatype="UINT8", shape=[1, 28, 29], raw_input=b"\0" * 812)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(bad, metadata=(("x-api-key", "alice"),), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = pb.PredictRequest(datatype="UINT8", shape=[1, 28, 28], raw_input=b"\0" * 784)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(ok, timeout=10)                        # no key
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    wrong = _request(pool[:1])
    wrong.model_name = "resnet"
    with pytest.raises(grpc.RpcError) as err:
        _oip(srv.address, wrong, "alice")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND

    s = scrape(srv.metrics_port)
    req, img = "modelguard_requests_total", "modelguard_images_total"
    expect = [  # (api, level, answer, code): (requests, images)
        (("v1", "normal", "probabilities", "OK"), (3, 12)),
        (("v1", "normal", "label_only", "OK"), (1, 2)),
        (("oip", "normal", "probabilities", "OK"), (1, 30)),
        (("oip", "label_only", "label_only", "OK"), (2, 10)),
        (("v1", "none", "none", "INVALID_ARGUMENT"), (1, 0)),
        (("v1", "none", "none", "UNAUTHENTICATED"), (1, 0)),
        (("oip", "none", "none", "NOT_FOUND"), (1, 0)),
    ]
    for (api, level, answer, code), (n_req, n_img) in expect:
        lab = dict(api=api, level=level, answer=answer, code=code)
        assert value(s, req, **lab) == n_req, lab
        assert value(s, img, **lab) == n_img, lab
    assert sum(v for (name, _), v in s.items() if name == req) == 10   # nothing else counted

    esc = matching(s, "modelguard_escalations_total", from_level="normal",
                   to_level="label_only")
    assert list(esc.values()) == [1.0] and "volume" in next(iter(esc)), esc
    assert value(s, "modelguard_clients", level="normal") == 1          # alice
    assert value(s, "modelguard_clients", level="label_only") == 1      # mallory
    assert value(s, "modelguard_clients", level="switch") == 0

    hist = "modelguard_latency_seconds_count"
    assert value(s, hist, stage="total") == 9          # every handled call (not the keyless)
    for stage in ("decode", "model", "policy", "monitor"):
        assert value(s, hist, stage=stage) == 7, stage  # the 7 answered calls
    # the 6 answered calls of <= 16 images (small_request_items' default) took the small
    # requests' slot, and their wait for it is the queue stage; the one of 30 images follows
    # compute_slots (no limit: nothing waits)
    assert value(s, hist, stage="queue") == 6
    assert value(s, "modelguard_latency_seconds_bucket", stage="total", le="+Inf") == 9
    assert value(s, "modelguard_latency_seconds_sum", stage="model") > 0

    assert value(s, "modelguard_monitor_resident_clients") >= 2
    assert ("modelguard_monitor_log_queue_depth", frozenset()) in s
    assert ("modelguard_monitor_log_uncommitted", frozenset()) in s


def test_each_server_has_its_own_registry(metrics_server, small_target, tmp_path):
    other = start_oip_server(small_target[0], tmp_path, metrics_port=0)
    try:
        assert other.metrics.registry is not metrics_server.metrics.registry
        assert other.metrics_port != metrics_server.metrics_port
        with grpc.insecure_channel(other.address) as ch:
            pb_grpc.InferenceStub(ch).Predict(
                pb.PredictRequest(datatype="UINT8", shape=[2, 28, 28], raw_input=b"\0" * 1568),
                metadata=(("x-api-key", "zed"),), timeout=10)
        s = scrape(other.metrics_port)
        assert value(s, "modelguard_requests_total", api="v1", level="normal",
                     answer="probabilities", code="OK") == 1
        assert value(s, "modelguard_images_total", api="v1", level="normal",
                     answer="probabilities", code="OK") == 2
        assert value(s, "modelguard_clients", level="normal") == 1
    finally:
        other.stop(0.5)
    with pytest.raises(OSError):   # the endpoint is gone with its server
        scrape(other.metrics_port)


def test_no_metrics_by_default_and_the_flag(monkeypatch):
    import service.__main__ as cli
    from service.config import ServerConfig

    assert ServerConfig().metrics_port is None
    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda args: seen.update(port=args.metrics_port) or 0)
    assert cli.main(["serve", "--metrics-port", "9100"]) == 0 and seen["port"] == 9100
    assert cli.main(["serve"]) == 0 and seen["port"] is None


def test_metrics_do_not_change_answers(metrics_server):
    """The metrics-on server answers like the plain target."""
    x = data.attack_pool().x[300:310]
    r = _oip(metrics_server.address, _request(x), "answers")
    labels = np.frombuffer(r.raw_output_contents[0], "<i8")
    probs = np.frombuffer(r.raw_output_contents[1], "<f4").reshape(10, 10)
    want = metrics_server.plane.model.predict_proba(x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(labels, want.argmax(1))
    np.testing.assert_allclose(probs, want, atol=1e-6)
