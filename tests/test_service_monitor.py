"""The service answers through the monitor's level for each client and logs every query."""
import time
import tomllib

import grpc
import numpy as np
import pytest

from client.api import ApiError
from common import data
from common.types import Level
from monitor import QueryLog
from monitor.config import DEFAULT_CONFIG_PATH, config_from_dict
from service.config import ServerConfig
from service.dataplane import build_dataplane
from service.server import Server


def _server(small_target, tmp_path, volume_threshold, rule_level, allow_block=False,
            mode="sync"):
    cfg_dict = tomllib.loads(DEFAULT_CONFIG_PATH.read_text())
    cfg_dict["execution"]["mode"] = mode
    cfg_dict["detectors"]["volume"]["threshold"] = volume_threshold
    cfg_dict["rules"] = [{"detectors": ["volume"], "level": rule_level}]
    cfg_dict["ladder"] = {"allow_block": allow_block}
    cfg_dict["policies"] = {"normal": {"policy": "identity"},
                            "noise": {"policy": "gaussian", "sigma": 0.05},
                            "label_only": {"policy": "label_only"},
                            "switch": {"policy": "label_only"}}
    cfg_dict["watermark"] = {}
    if mode == "remote":      # `python -m monitor serve`, here on a thread of this process
        cfg_dict["execution"]["mode"] = "process"
        cfg_dict["execution"]["address"] = _remote_monitor(config_from_dict(cfg_dict), tmp_path)
    mcfg = config_from_dict(cfg_dict)
    cfg = ServerConfig(port=0, max_batch=64, target=small_target[0], artifacts=tmp_path,
                       monitor_db=tmp_path / "m.db", grace_s=1.0, secret="s", dev_secret=True,
                       open_keys=True)
    return Server(cfg, build_dataplane(cfg, mcfg)).start()


def _remote_monitor(mcfg, tmp_path) -> str:
    """Start the monitor on its own (monitor.process.serve) on a thread, its log at
    tmp_path/m.db; stopped (every client checkpointed) by ``_REMOTE[address].set()``."""
    import threading

    from monitor.process import link_key, serve
    bound, stop = [], threading.Event()
    t = threading.Thread(target=serve, args=(mcfg, tmp_path / "m.db", ("127.0.0.1", 0),
                                             link_key("s")),
                         kwargs={"on_listening": bound.append, "stop": stop}, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while not bound and time.monotonic() < deadline:
        t.join(0.02)
    address = f"{bound[0][0]}:{bound[0][1]}"
    _REMOTE[address] = (stop, t)
    return address


_REMOTE: dict = {}


@pytest.mark.parametrize("mode", ["sync", "process", "remote"])
def test_escalation_changes_answers_and_log_is_complete(small_target, tmp_path, mode):
    """Also with the monitor in its own process, a child or one the server connects to: the
    same answers, the same complete log once the server (and the monitor it connected to) has
    stopped."""
    from client.api import ModelClient

    server = _server(small_target, tmp_path, volume_threshold=100, rule_level="label_only",
                     mode=mode)
    x = data.attack_pool().x[:300]
    kinds = []
    with ModelClient(server.address, "greedy", batch_size=50) as c, \
            ModelClient(server.address, "quiet", batch_size=50) as q:
        for i in range(0, 300, 50):
            kinds.append(c.predict(x[i:i + 50]).probs is not None)
        quiet = q.predict(x[:20])
    server.stop(1.0)
    while _REMOTE:
        stop, thread = _REMOTE.popitem()[1]
        stop.set()
        thread.join(60)
    # the volume rule fires once more than 100 queries were seen: probabilities stop after that
    assert kinds[:2] == [True, True] and kinds[-1] is False and quiet.probs is not None
    greedy, quiet = server.client_id("greedy"), server.client_id("quiet")
    with QueryLog(tmp_path / "m.db") as log:
        summary = {s["client"]: s for s in log.summary()}
        assert summary[greedy]["queries"] == 300 and summary[quiet]["queries"] == 20
        assert summary[greedy]["level"] == Level.LABEL_ONLY
        assert summary[quiet]["level"] == Level.NORMAL
        tr = log.transitions(greedy)
        assert len(tr) == 1 and tr[0]["to_level"] == Level.LABEL_ONLY and 100 < tr[0]["qn"] <= 150


def test_blocked_client_gets_permission_denied(small_target, tmp_path):
    from client.api import ModelClient

    server = _server(small_target, tmp_path, volume_threshold=40, rule_level="block",
                     allow_block=True)
    x = data.attack_pool().x[:64]
    try:
        with ModelClient(server.address, "blocked", batch_size=32) as c:
            c.predict(x[:32])
            c.predict(x[32:64])  # crosses the threshold: this answer is still delivered
            with pytest.raises(ApiError) as err:
                c.predict(x[:1])
        assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "blocked" in err.value.message
    finally:
        server.stop(1.0)


def test_levels_survive_restart(small_target, tmp_path):
    from client.api import ModelClient

    x = data.attack_pool().x[:200]
    server = _server(small_target, tmp_path, volume_threshold=100, rule_level="label_only")
    with ModelClient(server.address, "persistent", batch_size=100) as c:
        c.predict(x)
    server.stop(1.0)
    server = _server(small_target, tmp_path, volume_threshold=100, rule_level="label_only")
    try:
        with ModelClient(server.address, "persistent") as c:
            assert c.predict(x[:3]).probs is None  # still LABEL_ONLY after the restart
    finally:
        server.stop(1.0)


def test_slow_memory_housekeeping_is_logged(small_target, tmp_path, monkeypatch, caplog):
    """A round of the health watcher's memory housekeeping (fit_memory, then malloc_trim) that
    takes long stalls every thread that allocates meanwhile: it is logged with its duration."""
    import logging

    import service.server as server_mod

    monkeypatch.setattr(server_mod, "trim_heap", lambda: time.sleep(0.4))
    caplog.set_level(logging.WARNING, logger="modelguard.server")
    s = _server(small_target, tmp_path, 10 ** 6, "noise")
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(
                "memory housekeeping took" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    finally:
        s.stop()
    msgs = [r.getMessage() for r in caplog.records if "memory housekeeping" in r.getMessage()]
    assert msgs and "0 evicted" in msgs[0]
    took = float(msgs[0].split("took ")[1].split(" s")[0])
    assert 0.35 <= took < 5.0
