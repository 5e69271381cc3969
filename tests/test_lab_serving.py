"""lab.serving (the wire-speed benchmark): the echo server of the same contract answers raw
pre-encoded requests like the real server, and a small matrix against the echo alone counts
what it sends."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# The lab apart from the product: which first-party packages each package may import (issue 11).
# The lab (and the tests) may import everything; the client talks to the server only through
# common (types, the wire codec) and protos.
FIRST_PARTY = {"service", "monitor", "common", "protos", "client", "lab", "deploy"}
ALLOWED = {
    "common": {"common"},
    "protos": {"protos"},
    "monitor": {"monitor", "common"},
    "service": {"service", "monitor", "common", "protos"},
    "client": {"client", "common", "protos"},
    "deploy": {"deploy", "service", "monitor", "common", "protos"},
}


def _first_party_imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, module) of every first-party import in a file, wherever it is (module level,
    inside functions, under TYPE_CHECKING), relative ones resolved against ``package``, plus
    importlib.import_module / __import__ of a constant name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [package if node.level else (node.module or "")]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            names = [node.args[0].value]
        found += [(node.lineno, n) for n in names if n.split(".")[0] in FIRST_PARTY]
    return sorted(found)


def test_import_graph_checker_sees_every_kind_of_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nimport lab.serving as s, numpy\nfrom client.api import X\n"
                 "def g():\n    from service import codec\n"
                 "import importlib\nimportlib.import_module('lab.campaign')\n"
                 "__import__('monitor')\nfrom . import sibling\n")
    assert _first_party_imports(f, "common") == [
        (2, "lab.serving"), (3, "client.api"), (5, "service"), (7, "lab.campaign"),
        (8, "monitor"), (9, "common")]


def test_product_packages_never_import_the_lab_or_the_client():
    """service, monitor, common (and protos) never import client or lab; client never imports
    lab (nor the server's packages: it shares only common and protos with them)."""
    bad, seen = [], set()
    for pkg, allowed in ALLOWED.items():
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, f"no Python files under {pkg}/"
        for f in files:
            for line, mod in _first_party_imports(f, pkg):
                seen.add(pkg)
                if mod.split(".")[0] not in allowed:
                    bad.append(f"{f.relative_to(REPO)}:{line} imports {mod}")
    assert not bad, "the product imports outside its layer:\n" + "\n".join(bad)
    assert {"service", "monitor", "client"} <= seen  # the walk saw real imports


def test_serving_never_loads_the_pool_training_code():
    """The model pool's serving (service.defences.pool) and training (pool_train) are apart: a
    server process, its data plane and every policy load without the training module."""
    code = ("import sys\nimport service.server, service.dataplane, service.defences, "
            "service.defences.registry\n"
            "print(sorted(m for m in sys.modules if m.startswith('service.defences')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "service.defences.pool'" in out.stdout           # the serving side is there
    assert "pool_train" not in out.stdout, out.stdout


def test_the_benchmarks_live_in_the_lab():
    for gone in ("client/campaign.py", "client/bench_attacks.py", "monitor/bench.py",
                 "service/bench.py", "common/bench.py"):
        assert not (REPO / gone).exists(), f"{gone} is a benchmark: it belongs in lab/"
    for module in ("campaign", "bench_attacks", "monitor_bench", "defences", "serving"):
        assert (REPO / "lab" / f"{module}.py").exists()


def test_toml_writer_round_trips_the_monitor_config():
    import tomllib

    from common import tomlw
    d = tomllib.loads((REPO / "monitor" / "default.toml").read_text())
    d["detectors"]["prada"]["enabled"] = False
    d["rules"] = []
    d["extra"] = {"s": 'a "quoted"\nline', "f": 1e-9, "l": [1, 2], "nested": {"k": True}}
    assert tomllib.loads(tomlw.dumps(d)) == d


def test_profiles_change_what_they_name_and_nothing_else(tmp_path):
    """detectors-off keeps linking and the log, linking-off keeps every detector: between them
    and default, a matrix run splits the monitor's cost into its parts."""
    from lab.serving import prepare_profiles
    from monitor.config import load_config

    flags, notes = prepare_profiles(["detectors-off", "linking-off", "fast"], tmp_path, None)
    assert not notes
    cfg = {name: load_config(f[f.index("--monitor-config") + 1]) for name, f in flags.items()}
    base = load_config(None)
    assert base.linking.enabled and any(d.enabled for d in vars(base.detectors).values())
    assert not any(d.enabled for d in vars(cfg["detectors-off"].detectors).values())
    assert cfg["detectors-off"].rules == [] and cfg["detectors-off"].linking.enabled
    assert not cfg["linking-off"].linking.enabled
    assert cfg["linking-off"].model_dump() == base.with_changes(
        linking={"enabled": False}).model_dump()
    assert cfg["fast"].log.durability == "fast" and cfg["fast"].linking.enabled


@pytest.mark.parametrize("fmt", ["predictions", "packed"])
def test_echo_server_answers_raw_pre_encoded_requests(tmp_path, fmt):
    import grpc

    from lab.loadgen import check_response, encode_request
    from lab.serving import echo_server
    from protos import inference_pb2 as pb

    echo = echo_server(workers=2, workdir=tmp_path)
    try:
        echo.wait_ready(timeout=30)
        rng = np.random.default_rng(0)
        with grpc.insecure_channel(echo.address) as ch:
            call = ch.unary_unary("/modelguard.v1.Inference/Predict", request_serializer=None,
                                  response_deserializer=None)
            for n in (1, 7, 64, 256):
                raw = encode_request(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), fmt)
                resp = call(raw, metadata=(("x-api-key", "t"),), timeout=10)
                c = check_response(resp, n)
                assert c["ok"] and c["n"] == n and c["n_probs"] == [10]
                assert c["format"] == fmt and c["kind"] == "ANSWER_PROBABILITIES"
                r = pb.PredictResponse.FromString(resp)
                if fmt == "predictions":
                    assert len(r.predictions) == n
                    assert all(len(p.probabilities) == 10 for p in r.predictions)
                    probs = np.array([list(p.probabilities) for p in r.predictions])
                    assert [p.label for p in r.predictions] == list(probs.argmax(1))
                else:
                    probs = np.frombuffer(r.raw_output, "<f4").reshape(n, 10)
                    assert list(r.labels) == list(probs.argmax(1))
                assert np.allclose(probs.sum(1), 1, atol=1e-5)
                # cached per N: the same bytes again
                assert call(raw, metadata=(("x-api-key", "t"),), timeout=10) == resp
            bad = encode_request(np.zeros((3, 28, 28), np.uint8))[:-5]  # truncated raw_input
            with pytest.raises(grpc.RpcError) as e:
                call(bad, timeout=10)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                      grpc.StatusCode.INTERNAL)
    finally:
        echo.stop()
    assert not echo.alive()


def test_quick_matrix_against_the_echo_alone(tmp_path):
    out = tmp_path / "bench"
    batches, clients = [1, 64], [1, 3]
    cmd = [sys.executable, "-m", "lab.serving", "--matrix", "--quick", "--profiles", "echo",
           "--formats", "predictions", "--batches", ",".join(map(str, batches)),
           "--clients", ",".join(map(str, clients)), "--seconds", "0.5", "--warmup", "0.2",
           "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "serving.json").read_text())
    rows = res["matrix"]
    assert sorted((r["batch"], r["clients"]) for r in rows) == \
        sorted((b, c) for b in batches for c in clients)
    for r in rows:
        assert r["profile"] == "echo" and r["format"] == "predictions"
        assert r["requests"] > 0 and r["img_s"] > 0
        assert r["images"] == r["requests"] * r["batch"]
        assert r["img_s"] == pytest.approx(r["images"] / r["seconds"], rel=1e-3)
        assert r["responses_ok"] and r["errors"] == {}
        assert r["answers"] == {"probs": r["clients"]}  # every client got answers
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    md = (out / "serving.md").read_text()
    table = [l for l in md.splitlines() if l.startswith("| echo |")]
    assert len(table) == len(rows)
    # the table was printed as it went
    assert sum(l.startswith("| echo |") for l in p.stdout.splitlines()) == len(rows)


def test_lab_contention_runs_every_setting_and_refuses_bad_input(small_target, tmp_path):
    """python -m lab.contention: each slot setting drives the real data plane with the asked
    number of requests (threads x requests per batch size), and bad settings are refused."""
    from lab import contention

    out = tmp_path / "c.json"
    assert contention.main(["--threads", "2", "--batches", "1,8", "--requests", "15",
                            "--rounds", "1", "--target", str(small_target[0]),
                            "--undefended", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["compute_slots"], r["requests"]) for r in rows] == \
        [(1, 1, 30), (1, 0, 30), (8, 1, 30), (8, 0, 30)]
    for bad in (["--slots", "1,-1"], ["--batches", "0"], ["--batches", "a"]):
        with pytest.raises(SystemExit) as e:
            contention.main(bad)
        assert e.value.code == 2


def test_lab_steps_times_every_setting_and_refuses_bad_input(small_target, tmp_path):
    """python -m lab.steps: every step_threads setting runs the same rounds (a time per round
    each), and bad settings are refused before anything runs."""
    from lab import steps

    out = tmp_path / "s.json"
    assert steps.main(["--threads", "1,2", "--clients", "2", "--batch", "8", "--items", "16",
                       "--history", "64", "--rounds", "2", "--stream", "pool",
                       "--target", str(small_target[0]), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["step_threads"] for r in rows] == [1, 2]
    assert all(len(r["rounds"]) == 2 and r["wall_us_per_item"] > 0 for r in rows)
    assert rows[0]["wall_ratio"] == 1.0
    for bad in (["--threads", "0,2"], ["--threads", "a"], ["--batch", "0"],
                ["--history", "-1"]):
        with pytest.raises(SystemExit) as e:
            steps.main(bad)
        assert e.value.code == 2


def _git_repo(path: Path, files: dict[str, str]) -> str:
    """Commit ``files`` (relative path -> text) to a git repository at ``path`` (created on the
    first call); returns the commit."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    if not (path / ".git").exists():
        subprocess.run(["git", "init", "-q", str(path)], check=True, env=env)
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    subprocess.run(["git", "-C", str(path), "add", "-A"], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", "c"], check=True, env=env)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, env=env,
                          capture_output=True, text=True).stdout.strip()


def test_load_legacy_imports_a_package_as_it_was_with_its_own_imports_renamed(tmp_path):
    """lab.legacy.load_legacy: the package's files at the old commit, under a private name; its
    imports of itself point at that name (so the old module sees the old sibling), and nothing
    of the current package is touched."""
    from lab.legacy import load_legacy

    repo = tmp_path / "repo"
    old = _git_repo(repo, {"pkgx/__init__.py": "", "pkgx/b.py": "V = 1\n",
                           "pkgx/a.py": "from pkgx.b import V\nfrom pkgx import b\nW = b.V\n"})
    _git_repo(repo, {"pkgx/b.py": "V = 2\n"})
    mod = load_legacy(old, repo, "pkgx", "_old_pkgx_t")
    import importlib
    a = importlib.import_module("_old_pkgx_t.a")
    assert (a.V, a.W) == (1, 1)
    assert "pkgx" not in sys.modules and mod.__name__ == "_old_pkgx_t"
    with pytest.raises(SystemExit, match="no-such-ref"):
        load_legacy("no-such-ref", repo, "pkgx", "_old_pkgx_t2")
    plain = _git_repo(repo, {"pkgx/a.py": "import pkgx.b\nW = pkgx.b.V\n"})
    with pytest.raises(SystemExit, match="plain import"):
        load_legacy(plain, repo, "pkgx", "_old_pkgx_t3")


def test_detector_ab_reports_no_difference_for_the_same_code_and_sees_a_change(small_target,
                                                                               tmp_path):
    """python -m lab.detector_ab: the working tree's detectors against themselves (committed to
    a scratch repository) decide the same and score the same; against a copy whose similarity
    scores are shifted by 1 it reports a score difference of 1; bad input is refused."""
    from lab import detector_ab

    src = {f"monitor/{m}.py": (REPO / "monitor" / f"{m}.py").read_text()
           for m in ("config", "features", "detectors")}
    repo = tmp_path / "repo"
    same = _git_repo(repo, src)
    shift = "            return score, score < self.cfg.threshold"
    assert src["monitor/detectors.py"].count(shift) == 1
    src["monitor/detectors.py"] = src["monitor/detectors.py"].replace(
        shift, "            return score + 1.0, score < self.cfg.threshold")
    shifted = _git_repo(repo, src)
    common = ["--repo", str(repo), "--streams", "perturb", "--batches", "32", "--history", "256",
              "--items", "128", "--target", str(small_target[0])]
    out = tmp_path / "same.json"
    assert detector_ab.main(["--ref", same, "--json", str(out), *common]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    for d in detector_ab.DETECTORS:
        assert row[d]["flags_differ"] == 0 and row[d]["max_score_diff"] == 0, d
        assert row[d]["old_us"] > 0 and row[d]["new_us"] > 0
    out = tmp_path / "shifted.json"
    assert detector_ab.main(["--ref", shifted, "--json", str(out), *common]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["similarity"]["max_score_diff"] == pytest.approx(1.0)
    assert row["prada"]["max_score_diff"] == 0 and row["near_duplicate"]["flags_differ"] == 0
    for bad in (["--streams", "nope"], ["--batches", "0"], ["--batches", "x"]):
        with pytest.raises(SystemExit) as e:
            detector_ab.main(bad)
        assert e.value.code == 2


def test_crash_and_mixed_sections_against_a_real_server(small_target, tmp_path):
    """python -m lab.serving --crash --mixed --quick on a small target: the kill -9 loses no
    acknowledged request (durability commit), every client comes back (restored before its
    first request, which each answers), and the mixed section drives both client kinds on the
    echo and the server."""
    from common import data
    from service.defences import pool, pool_train
    from tests.streams import synthetic

    art = tmp_path / "artifacts"
    art.mkdir()
    shutil.copy(small_target[0], art / "target.pt")
    # the default profile answers SWITCH with the misinformation model: a tiny one
    pool_train.train_misinformation(pool.model_path(art, "misinformation"),
                                    data.Split(*synthetic(300, 1)),
                                    data.Split(*synthetic(100, 2)), epochs=1, progress=False)
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "lab.serving", "--crash", "--mixed", "--quick",
           "--crash-clients", "3", "--crash-sequential", "2", "--crash-queries", "192",
           "--mixed-small", "2", "--mixed-large", "1", "--mixed-batch", "64",
           "--mixed-seconds", "1", "--warmup", "0.2", "--artifacts", str(art), "--out", str(out)]
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((out / "serving.json").read_text())
    c = res["crash"]
    bc = c["before_crash"]
    assert bc["acked_images"] > 0 and bc["acked_not_logged"] == 0
    assert bc["logged_images"] >= bc["acked_images"]
    fr, fo = c["first_request"], c["first_request_one_at_a_time"]
    assert (fr["n"], fr["errors"]) == (3, {}) and (fo["n"], fo["errors"]) == (2, {})
    assert fr["median_ms"] <= fr["max_ms"] and fo["second_request_median_ms"] > 0
    # the references: the burst's second requests and the one-at-a-time clients reconnected
    assert fr["second_requests"] == 3 and fo["reconnected_median_ms"] > 0
    assert c["first_request_new_clients"]["second_requests"] == 3
    assert (c["burst_again"]["n"], c["burst_again"]["errors"]) == (3, {})
    # all five loaded clients were restored (replayed from the log: none reached a checkpoint)
    assert c["server_log"]["clients_restored_messages"] == 5
    assert "replayed queries 1.." in c["server_log"]["example"]
    m = res["mixed"]
    for name in ("echo", "default"):
        for kind in ("small", "large"):
            assert m[name][kind]["img_s"] > 0 and not m[name][kind]["errors"], (name, kind)
    md = (out / "serving.md").read_text()
    assert "## Crash recovery" in md and "## Small requests beside large ones" in md
    assert "| kill -9 under load, restart: every client's first request within 50 ms |" in md


def test_target_verdicts_read_each_target_from_the_sections_that_ran():
    from lab.serving import target_verdicts

    def verdicts(data):
        return [v for _, _, v in target_verdicts(data)]

    assert verdicts({}) == ["not measured"] * 5

    def cell(batch, ratio, fmt="packed", profile="default", clients=4):
        return {"profile": profile, "batch": batch, "clients": clients, "format": fmt,
                "img_s": 1000.0 * ratio, "ratio_to_echo": ratio}

    data = {
        # batch 256: the better format counts; batch 1: below 0.5; other cells are ignored
        "matrix": [cell(256, 0.1, "predictions"), cell(256, 0.3), cell(1, 0.4),
                   cell(1, 0.9, profile="monitor-off"), cell(1, 0.9, clients=1)],
        "history_latency": {"profile": "default", "history": 100_000,
                            "echo": {"p99_ms": 1.0}, "long": {"p99_ms": 4.0}},
        "cost": [{"history": 1000, "filled": 1000, "ms_per_item_b1": 1.0,
                  "ms_per_item_b256": 0.1},
                 {"history": 1_000_000, "filled": 1_000_000, "ms_per_item_b1": 1.5,
                  "ms_per_item_b256": 0.25}],
        "crash": {"profile": "default", "clients": 32, "queries_per_client": 5056,
                  "first_request": {"n": 32, "median_ms": 20.0, "max_ms": 40.0, "errors": {}},
                  "first_request_one_at_a_time": {"n": 8, "max_ms": 60.0, "errors": {}}},
    }
    assert verdicts(data) == ["met", "not met", "met", "not met", "not met"]
    assert "1.50 x" in target_verdicts(data)[3][1] and "2.50 x" in target_verdicts(data)[3][1]
    # a quick run's short history is not the target's; nor is a 1M fill that stopped early
    data["history_latency"]["history"] = 5_000
    data["cost"][1]["filled"] = 600_000
    data["crash"]["first_request_one_at_a_time"]["max_ms"] = 10.0
    assert verdicts(data) == ["met", "not met", "not measured", "not measured", "met"]
    data["crash"]["first_request"]["errors"] = {"UNAVAILABLE": 1}
    assert verdicts(data)[4] == "not met"
    data["crash"]["clients"] = 8                 # --quick
    assert verdicts(data)[4] == "not measured"
    # the burst without a restart, when measured, stands beside the figure (not in the verdict)
    assert "no restart" not in target_verdicts(data)[4][1]
    data["crash"]["burst_again"] = {"n": 32, "median_ms": 30.0, "max_ms": 45.0, "errors": {}}
    assert "the same burst with no restart: max 45.0 ms (median 30.0)" in \
        target_verdicts(data)[4][1]
    assert verdicts(data)[4] == "not measured"
