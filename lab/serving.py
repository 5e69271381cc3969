"""Wire-speed benchmark of the prediction server: ``python -m lab.serving``.

Everything is measured against a reference taken in the same run, because this machine is shared
and noisy: a bare **echo server of the same contract** (``lab.echo``: same gRPC service, same
Predict, no model, no monitor, a cached response of the real size for each N) is driven by the
same client processes, with the same pre-serialized requests, in the same cell, just before the
real server. Sections (all of them when none is chosen):

``--matrix``   img/s and request p50/p99 for batch x concurrent clients, per server profile:
               monitor-off (``serve --no-monitor``), detectors-off (every detector disabled, no
               rules; cross-client linking and the log still on), linking-off (default without
               cross-client linking), default (monitor/default.toml: answers wait for their log
               rows' commit), fast (default with ``[log] durability = "fast"``), strict
               (monitor/strict.toml), async
               (default + ``[execution] mode = "async"``; skipped when the monitor config does
               not know that key), async-lag (async with ``max_lag = 64``: a client's
               requests that wait together are run through the detectors as one step),
               process and process-lag (the same with ``mode = "process"``: the monitor in a
               child process of the server), remote and remote-lag (the same two with the
               monitor started on its own, ``python -m monitor serve``, and the server
               connecting to it over TCP), remote-tls and remote-lag-tls (the same over TLS,
               with throwaway certificates from lab.certs: needs ``openssl``). Ratio = the
               profile's img/s / the echo's img/s in that cell.
``--history-latency``  unary (batch 1) p50/p99 for 4 clients, fresh and after each sent 100k
               queries (default profile), with the echo's for reference.
``--crash``    32 clients x ~5,000 queries (batch 64), and 8 more; ``kill -9`` of the server
               during the load; restart on the same database; time to ServerReady and the
               latency of the 32 clients' first requests after the restart, all at once
               (median, max), then of the 8 others' one client at a time. ``--crash-kills
               monitor`` (remote profiles): the monitor is killed instead, and a new one
               started on the same log and port.
``--cost``     in process: monitor.Monitor's observe() cost per item at a client history of
               1k..1M queries (batch 1 and batch 256), and the memory of that client's state.

Servers and clients run in their own processes (no shared GIL), on 127.0.0.1, with 1 torch /
OMP / BLAS thread each. Every subprocess is stopped on exit, Ctrl-C or error. Results:
``results/bench/serving.json`` and ``serving.md`` (rewritten after every section).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import tomlw
from lab.loadgen import FORMATS, ClientPool

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
PROFILES = ("monitor-off", "detectors-off", "linking-off", "default", "fast", "strict", "async",
            "async-lag", "process", "process-lag", "remote", "remote-lag", "remote-tls",
            "remote-lag-tls")
ASYNC_LAG = 64      # the async-lag profile's [execution] max_lag
READY_KEY = (("x-api-key", "bench-readiness"),)


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --- subprocesses --------------------------------------------------------------------------------
_used_ports: set[int] = set()


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _used_ports:
            _used_ports.add(port)
            return port
    raise OSError("no free port found on 127.0.0.1")


def _die_with_parent() -> None:  # runs in the child before exec: SIGKILL it if we die
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort; the parent's finally-block is the main path
        pass


def _child_env() -> dict:
    env = dict(os.environ)
    env.update({"PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1"})
    env.setdefault("MODELGUARD_SECRET", "modelguard-bench-secret")
    return env


class ServerProcess:
    """A server in a subprocess (its own session, so Ctrl-C reaches only us; SIGKILLed by the
    kernel if we die), its output in a log file."""

    live: list["ServerProcess"] = []

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path):
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self.proc: subprocess.Popen | None = None
        self.t_spawn = 0.0
        self.companion: ServerProcess | None = None  # a monitor it connects to (remote)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "ServerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=_child_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        ServerProcess.live.append(self)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from spawn until ServerReady answers true; raises with the log's tail."""
        import grpc

        from protos import inference_pb2 as pb
        from protos import inference_pb2_grpc as pb_grpc
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as ch:
            stub = pb_grpc.InferenceStub(ch)
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} server exited with code "
                                       f"{self.proc.returncode} before it was ready:\n"
                                       f"{self.tail()}")
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), metadata=READY_KEY,
                                        timeout=1.0).ready:
                        return time.monotonic() - self.t_spawn
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} server not ready after {timeout:.0f} s:\n{self.tail()}")

    def cpu_split(self) -> tuple[float, float]:
        """user+system CPU seconds so far of the server process and of its live child
        processes (the monitor's own process in mode "process") or its companion (the monitor
        it connects to), from /proc."""
        own = children = 0.0
        pids = _with_children(self.pid)
        if self.companion is not None and self.companion.alive():
            pids += _with_children(self.companion.pid)
        for i, pid in enumerate(pids):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                t = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):
                if i == 0:
                    return float("nan"), float("nan")
                continue
            if i == 0:
                own = t
            else:
                children += t
        return own, children

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and its child processes together."""
        return sum(self.cpu_split())

    def settle(self, max_s: float = 60.0, idle_frac: float = 0.10, step: float = 0.25) -> float:
        """Wait until the server is idle (CPU < idle_frac of one core over two consecutive
        steps): work it deferred past the measurement window must not bleed into the next
        cell. Returns the seconds waited (bounded by max_s)."""
        t0 = time.monotonic()
        quiet = 0
        c0 = self.cpu_seconds()
        while time.monotonic() - t0 < max_s and self.alive():
            time.sleep(step)
            c1 = self.cpu_seconds()
            quiet = quiet + 1 if (c1 - c0) / step < idle_frac else 0
            c0 = c1
            if quiet >= 2:
                break
        return time.monotonic() - t0

    def kill9(self, children: bool = False) -> None:
        """SIGKILL to the server process only: a child of it (the monitor's own process in mode
        "process") sees its pipe close and finishes by itself (``orphans``). ``children``:
        SIGKILL to its children first (a whole container killed)."""
        if self.alive():
            self.orphans = _with_children(self.pid)[1:]
            if children:
                for pid in self.orphans:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._close()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (the server shuts down gracefully), SIGKILL after ``grace`` seconds; then
        its companion, if any."""
        try:
            self._stop(grace)
        finally:
            if self.companion is not None:
                self.companion.stop(max(grace, 60.0))

    def _stop(self, grace: float) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(ValueError):
            ServerProcess.live.remove(self)
        with contextlib.suppress(Exception):
            self._log.close()

    def last_exception(self) -> str | None:
        """The last exception line in the server's log (e.g. after INTERNAL answers)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        exc = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", l)]
        return exc[-1] if exc else None

    def tail(self, n: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("    " + l for l in lines[-n:])

    @classmethod
    def stop_all(cls) -> None:
        cls.stop_all_but(None)

    @classmethod
    def stop_all_but(cls, keep: "ServerProcess | None") -> None:
        for s in list(cls.live):
            if s is not keep:
                with contextlib.suppress(Exception):
                    s.stop(grace=5.0)


def echo_server(workers: int, workdir: Path) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "lab.echo", "--host", HOST, "--port", str(port),
            "--workers", str(workers)]
    return ServerProcess("echo", argv, port, workdir / "echo.log").start()


def monitor_process(name: str, db: Path, workdir: Path, config: str | None = None,
                    tls: Path | None = None) -> ServerProcess:
    """``python -m monitor serve`` on a free port, its log ``db``; returns once it listens.
    ``tls``: a lab.certs directory: serve TLS with its server certificate."""
    port = free_port()
    argv = [sys.executable, "-m", "monitor", "--db", str(db), "serve", "--listen",
            f"{HOST}:{port}"] + (["--config", config] if config else []) + (
        [] if tls is None else ["--tls-cert", str(tls / "server.pem"),
                                "--tls-key", str(tls / "server.key")])
    m = ServerProcess(name, argv, port, workdir / f"{name}.log").start()
    deadline = time.monotonic() + 120
    while "listening on" not in m.tail(5):
        if not m.alive() or time.monotonic() > deadline:
            m.stop()
            raise RuntimeError(f"the monitor {name} did not start:\n{m.tail()}")
        time.sleep(0.05)
    return m


def real_server(name: str, extra: list[str], args, db: Path, workdir: Path,
                profile: str | None = None) -> ServerProcess:
    """A server of ``profile`` (default: ``name``); for the remote profiles, the monitor it
    connects to is started first, on its own (``python -m monitor serve``, the profile's TOML,
    log ``db``), and is the server's ``companion``: its CPU counts as the monitor process's, it
    stops with the server."""
    port = free_port()
    companion = None
    prof = profile or name
    if prof.startswith("remote"):
        tls = None
        if prof.endswith("-tls"):     # TLS on the link, with throwaway certificates
            from lab.certs import make_certs
            tls = workdir / "certs"
            if not (tls / "server.pem").exists():
                tls.mkdir(exist_ok=True)
                make_certs(tls)
        companion = monitor_process(f"{name}-monitor", db, workdir,
                                    extra[extra.index("--monitor-config") + 1], tls)
        extra = [*extra, "--monitor-address", companion.address]
        if tls is not None:
            extra += ["--monitor-tls-ca", str(tls / "ca.pem")]
    argv = [sys.executable, "-m", "service", "serve", "--host", HOST, "--port", str(port),
            "--workers", str(args.workers), "--torch-threads", "1",
            "--artifacts", str(args.artifacts), "--target", str(args.artifacts / "target.pt"),
            "--monitor-db", str(db), "--open-keys", "--dev-secret", *extra]
    if args.compute_slots is not None:
        argv += ["--compute-slots", str(args.compute_slots)]
    if args.small_items is not None:
        argv += ["--small-request-items", str(args.small_items)]
    if args.aio:
        argv += ["--aio"]
    s = ServerProcess(name, argv, port, workdir / f"{name}.log")
    s.companion = companion
    return s.start()


def _slots(args) -> str:
    n, k = args.compute_slots, args.small_items
    big = ("the default compute slots (no limit)" if n is None
           else "no limit on compute slots" if n == 0 else f"{n} compute slots")
    if k is None:
        from service.config import ServerConfig
        k_default = ServerConfig.model_fields["small_request_items"].default
    small = (f"requests of up to {k_default} images one at a time (the default)" if k is None
             else "no slot for small requests" if k == 0
             else f"requests of up to {k} images one at a time")
    return f"{big}, {small}"


# --- server profiles -----------------------------------------------------------------------------
def prepare_profiles(names: list[str], workdir: Path, step_threads: int | None = None,
                     merge_wait_ms: float | None = None
                     ) -> tuple[dict[str, list[str]], list[str]]:
    """{profile: extra `serve` arguments} for the profiles that can run today, and a note for
    each one skipped (and why). ``step_threads``: the monitor's execution.step_threads in the
    process and remote profiles; ``merge_wait_ms``: its execution.merge_wait_ms in the -lag
    profiles (None: the config's default)."""
    from monitor.config import ConfigError, config_from_dict

    default_toml = REPO / "monitor" / "default.toml"
    with open(default_toml, "rb") as f:
        base = tomllib.load(f)
    out: dict[str, list[str]] = {}
    notes: list[str] = []

    def write(name: str, data: dict) -> Path:
        text = tomlw.dumps(data)
        if tomllib.loads(text) != data:
            raise RuntimeError(f"the TOML written for profile {name} does not read back equal")
        config_from_dict(data, name)  # raises ConfigError with the reason
        p = workdir / f"{name}.toml"
        p.write_text(f"# written by lab.serving for the {name} profile\n" + text)
        return p

    for name in names:
        if name == "monitor-off":
            helptext = subprocess.run([sys.executable, "-m", "service", "serve", "--help"],
                                      cwd=REPO, env=_child_env(), capture_output=True,
                                      text=True, timeout=120).stdout
            if "--no-monitor" in helptext:
                out[name] = ["--no-monitor"]
            else:
                notes.append("monitor-off skipped: `python -m service serve --help` has no "
                             "--no-monitor")
        elif name == "detectors-off":
            d = copy.deepcopy(base)
            for det in d.get("detectors", {}).values():
                det["enabled"] = False
            d["rules"] = []
            out[name] = ["--monitor-config", str(write(name, d))]
        elif name == "default":
            out[name] = ["--monitor-config", str(default_toml)]
        elif name == "strict":
            out[name] = ["--monitor-config", str(REPO / "monitor" / "strict.toml")]
        elif name == "linking-off":   # default without cross-client linking
            d = copy.deepcopy(base)
            d.setdefault("linking", {})["enabled"] = False
            out[name] = ["--monitor-config", str(write(name, d))]
        elif name == "fast":   # default, answers not waiting for their log rows' commit
            d = copy.deepcopy(base)
            d.setdefault("log", {})["durability"] = "fast"
            out[name] = ["--monitor-config", str(write(name, d))]
        elif name in ("async", "async-lag", "process", "process-lag", "remote", "remote-lag",
                      "remote-tls", "remote-lag-tls"):
            # remote: the monitor started on its own (`python -m monitor serve`, this TOML),
            # the server connecting to it over TCP (real_server)
            d = copy.deepcopy(base)
            d["execution"] = {"mode": name.split("-")[0].replace("remote", "process")}
            if "-lag" in name:
                d["execution"]["max_lag"] = ASYNC_LAG
                if merge_wait_ms is not None:
                    d["execution"]["merge_wait_ms"] = merge_wait_ms
            if step_threads is not None and not name.startswith("async"):
                d["execution"]["step_threads"] = step_threads
            try:
                out[name] = ["--monitor-config", str(write(name, d))]
            except ConfigError as exc:
                first = str(exc).splitlines()[1:2]
                notes.append(f"{name} skipped: the monitor config rejects "
                             f"{d['execution']} ({first[0].strip() if first else exc})")
        else:
            raise SystemExit(f"unknown profile {name!r}; expected echo or one of {PROFILES}")
    return out, notes


def profile_flags(prof: str, option: str, workdir: Path, args) -> list[str]:
    """The server flags of one profile a section asked for with ``option`` (--hl-profile,
    --crash-profile, --mixed-profile); exits with the reason when it cannot run here."""
    extras, notes = prepare_profiles([prof], workdir, args.step_threads, args.merge_wait_ms)
    if prof not in extras:
        raise SystemExit(f"{option} {prof}: {'; '.join(notes) or 'not a server profile'}")
    return extras[prof]


def _with_children(pid: int) -> list[int]:
    """pid and its descendants alive now (Linux /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    return out


# --- one measured cell -----------------------------------------------------------------------------
def _pct(a: list[float], q: float) -> float | None:
    return round(float(np.percentile(a, q)), 3) if len(a) else None


def _first_latencies(lat: list[float]) -> dict:
    """How many first requests answered, their median and their maximum (ms; both rounded
    alike, so a median equal to the maximum never reads above it)."""
    return {"n": len(lat), "median_ms": _pct(lat, 50), "max_ms": _pct(lat, 100)}


def _second_latencies(clients: list[dict]) -> dict:
    """Median and maximum (ms) of the clients' second requests."""
    two = [c["lat_ms"][1] for c in clients if len(c["lat_ms"]) > 1]
    return {"second_requests": len(two), "second_request_median_ms": _pct(two, 50),
            "second_request_max_ms": _pct(two, 100)}


def drive(pool: ClientPool, address: str, keys: list[str], batch: int, *, fmt: str = "predictions",
          warmup: float = 0.0, seconds: float | None = None, max_requests: int = 10 ** 9,
          source: str = "pool", timeout: float = 60.0, stop_on_error: bool = False,
          server: ServerProcess | None = None, tick=None, tick_every: float = 0.5,
          max_total_s: float = 3600.0) -> dict:
    """Run ``keys`` (one client each) against ``address``: ``warmup`` seconds unmeasured, then
    ``seconds`` measured (or, with seconds None, up to max_requests per client within
    max_total_s, all measured). Returns totals, latencies and the per-client results."""
    t_start = time.monotonic() + 0.4 + 0.02 * len(keys)  # time for the clients to connect
    m0 = t_start + warmup
    m1 = m0 + seconds if seconds is not None else t_start + max_total_s
    used = start_clients(pool, address, keys, batch, t_start, m0, m1, fmt=fmt,
                         max_requests=max_requests, source=source, timeout=timeout,
                         stop_on_error=stop_on_error)
    return collect_clients(pool, used, m0, m1, seconds, server=server, timeout=timeout,
                           tick=tick, tick_every=tick_every)


def start_clients(pool: ClientPool, address: str, keys: list[str], batch: int, t_start: float,
                  m0: float, m1: float, *, fmt: str = "predictions", max_requests: int = 10 ** 9,
                  source: str = "pool", timeout: float = 60.0, stop_on_error: bool = False
                  ) -> list[int]:
    """Start ``keys`` in ``pool``'s processes: requests from ``t_start``, measured from ``m0``
    to ``m1`` (monotonic clock). :func:`collect_clients` gathers the results."""
    spec = {"address": address, "batch": batch, "format": fmt, "t_start": t_start, "m0": m0,
            "m1": m1, "max_requests": max_requests, "source": source, "timeout": timeout,
            "stop_on_error": stop_on_error}
    return pool.start(spec, keys)


def collect_clients(pool: ClientPool, used: list[int], m0: float, m1: float,
                    seconds: float | None, *, server: ServerProcess | None = None,
                    timeout: float = 60.0, tick=None, tick_every: float = 0.5) -> dict:
    """The results of the clients :func:`start_clients` started: totals, latencies, the
    per-client results (and the server's CPU over the window, given the server)."""
    cpu0 = cpu1 = None
    if server is not None and seconds is not None:
        time.sleep(max(0.0, m0 - time.monotonic()))
        cpu0 = server.cpu_split()
        time.sleep(max(0.0, m1 - time.monotonic()))
        cpu1 = server.cpu_split()
    clients, client_cpu = pool.collect(used, max(0.0, m1 - time.monotonic()) + timeout + 60.0,
                                       tick, tick_every)
    lat = [x for c in clients for x in c["lat_ms"]]
    errors: Counter = Counter()
    for c in clients:
        errors.update(c["errors"])
        if c["connect_error"]:
            errors["connect: " + c["connect_error"][:80]] += 1
    checks = [c["check"] for c in clients if c["check"] is not None]
    window = seconds if seconds is not None else None
    out = {"requests": sum(c["requests"] for c in clients),
           "images": sum(c["images"] for c in clients),
           "ok": sum(c["ok"] for c in clients),
           "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
           "max_ms": round(max(lat), 3) if lat else None,
           "errors": dict(errors),
           # None: no response came back to check
           "responses_ok": all(ch["ok"] for ch in checks) if checks else None,
           "answers": dict(Counter(short_kind(c["last_kind"]) for c in clients
                                   if c["last_kind"])),
           "formats_received": sorted({ch["format"] for ch in checks}),
           "response_bytes": sorted({ch["bytes"] for ch in checks}),
           "client_cpu_s": round(client_cpu, 3), "clients": clients}
    if window:
        out["seconds"] = window
        out["img_s"] = round(out["images"] / window, 1)
        if cpu0 is not None:
            out["server_cpu_pct"] = round(100 * (sum(cpu1) - sum(cpu0)) / window, 1)
            if cpu1[1] or cpu0[1]:     # of which the monitor's process (mode "process")
                out["monitor_process_cpu_pct"] = round(100 * (cpu1[1] - cpu0[1]) / window, 1)
    return out


def _f1(v) -> str:
    return "–" if v is None else f"{v:,.1f}"


def short_kind(kind: str | None) -> str:
    return {"ANSWER_PROBABILITIES": "probs", "ANSWER_LABEL_ONLY": "labels"}.get(kind, str(kind))


# --- markdown ------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list]) -> list[str]:
    fmt = lambda v: "–" if v is None else (f"{v:,.1f}" if isinstance(v, float) else str(v))  # noqa
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]


MATRIX_HEADER = ["server", "format", "batch", "clients", "requests", "images", "img/s",
                 "p50 ms", "p99 ms", "× echo", "× monitor-off", "server CPU %", "drain s",
                 "answers", "errors"]


def matrix_cells(r: dict) -> list:
    ratio = r.get("ratio_to_echo")
    return [r["profile"], r["format"], r["batch"], r["clients"], r["requests"], r["images"],
            r["img_s"], r["p50_ms"], r["p99_ms"], "1" if r["profile"] == "echo" else
            (None if ratio is None else f"{ratio:.3f}"),
            None if r.get("ratio_to_monitor_off") is None else f"{r['ratio_to_monitor_off']:.3f}",
            r.get("server_cpu_pct") if r.get("monitor_process_cpu_pct") is None else
            f"{r['server_cpu_pct']} (monitor process {r['monitor_process_cpu_pct']})",
            r.get("drain_s"),
            " ".join(f"{k}:{v}" for k, v in sorted(r["answers"].items())) or None,
            " ".join(f"{k}:{v}" for k, v in sorted(r["errors"].items())) or ""]


# The targets (issue 8), read from whatever sections ran: (what, measured, verdict)
def target_verdicts(data: dict) -> list[tuple[str, str, str]]:
    """Each target of the wire-speed issue against this run's figures: "met", "not met", or
    "not measured" (its section did not run, or not at the target's scale)."""
    out = []

    def verdict(ok):
        return "met" if ok else "not met"

    for batch, want in ((256, 0.25), (1, 0.5)):
        what = f"default profile, 4 clients, batch {batch}: >= {want} x echo img/s"
        cells = [r for r in data.get("matrix", []) if r["profile"] == "default"
                 and r["batch"] == batch and r["clients"] == 4
                 and r.get("ratio_to_echo") is not None]
        if not cells:
            out.append((what, "–", "not measured"))
            continue
        best = max(cells, key=lambda r: r["ratio_to_echo"])
        got = ", ".join(f"{r['ratio_to_echo']:.3f} ({r['format']}, {r['img_s']:,.0f} img/s)"
                        for r in cells)
        out.append((what, got, verdict(best["ratio_to_echo"] >= want)))
    hl = data.get("history_latency") or {}
    what = "default profile, 4 clients at 100,000 queries of history: unary p99 <= 5 ms"
    long = hl.get("long") or {}
    if long.get("p99_ms") is None:
        out.append((what, "–", "not measured"))
    else:
        got = (f"p99 {long['p99_ms']} ms ({hl.get('profile')}, {hl.get('history', 0):,} "
               f"queries each; echo {(hl.get('echo') or {}).get('p99_ms')} ms)")
        at_scale = hl.get("history", 0) >= 100_000 and hl.get("profile") == "default"
        out.append((what, got, verdict(long["p99_ms"] <= 5.0) if at_scale else "not measured"))
    what = "monitor cost per item at 1M queries of history <= 2 x at 1k (batch 1 and 256)"
    cost = {r["history"]: r for r in data.get("cost", []) if r.get("filled") == r["history"]}
    if 1000 in cost and 1_000_000 in cost:
        ratios = {b: cost[1_000_000][f"ms_per_item_b{b}"] / cost[1000][f"ms_per_item_b{b}"]
                  for b in (1, 256)}
        out.append((what, ", ".join(f"batch {b}: {v:.2f} x" for b, v in ratios.items()),
                    verdict(max(ratios.values()) <= 2.0)))
    else:
        out.append((what, "–", "not measured"))
    what = "kill -9 under load, restart: every client's first request within 50 ms"
    cr = data.get("crash") or {}
    fr, fo = cr.get("first_request") or {}, cr.get("first_request_one_at_a_time") or {}
    if fr.get("max_ms") is None:
        out.append((what, "–", "not measured"))
    else:
        again = cr.get("burst_again") or {}
        got = (f"{fr['n']} at once: max {fr['max_ms']} ms (median {fr['median_ms']})"
               + (f"; {fo['n']} one at a time: max {fo['max_ms']} ms" if fo.get("max_ms")
                  is not None else "") + f" ({cr.get('profile')} profile)"
               # the reference that tells a restart's cost from a burst's
               + (f"; the same burst with no restart: max {again['max_ms']} ms (median "
                  f"{again['median_ms']})" if again.get("max_ms") is not None else ""))
        worst = max(v for v in (fr["max_ms"], fo.get("max_ms")) if v is not None)
        ok = worst <= 50.0 and not fr.get("errors") and not fo.get("errors")
        # at the section's default scale (a quick run's few short clients restore trivially)
        at_scale = cr.get("clients", 0) >= 32 and cr.get("queries_per_client", 0) >= 5000
        out.append((what, got, verdict(ok) if at_scale else "not measured"))
    return out


class Report:
    def __init__(self, out_dir: Path, meta: dict):
        self.dir = out_dir
        self.data: dict = {"meta": meta, "notes": []}
        self.md: dict[str, list[str]] = {}

    def note(self, msg: str) -> None:
        log(f"NOTE: {msg}")
        self.data["notes"].append(msg)

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data["meta"]["loadavg_end"] = os.getloadavg()
        verdicts = target_verdicts(self.data)
        self.data["targets"] = [dict(zip(("target", "measured", "verdict"), t))
                                for t in verdicts]
        (self.dir / "serving.json").write_text(json.dumps(self.data, indent=2, default=str))
        m = self.data["meta"]
        lines = ["# Wire-speed benchmark (`python -m lab.serving`)", "",
                 f"{m['started']}, {m['cpu_count']} CPUs, load average at start "
                 f"{m['loadavg_start'][0]:.2f}, commit {m['commit']}"
                 f"{' (+ uncommitted changes)' if m['dirty'] else ''}. Command: "
                 f"`{m['command']}`", ""]
        lines += ["## The issue's targets (issue 8) in this run", ""]
        lines += md_table(["target", "measured", "verdict"], [list(t) for t in verdicts]) + [""]
        for sec in self.md.values():
            lines += sec + [""]
        if self.data["notes"]:
            lines += ["## Notes", ""] + [f"- {n}" for n in self.data["notes"]] + [""]
        (self.dir / "serving.md").write_text("\n".join(lines))


# --- section: matrix ----------------------------------------------------------------------------
def section_matrix(args, pool: ClientPool, echo: ServerProcess, workdir: Path, rep: Report) -> None:
    # monitor-off right after the echo in every cell: the others are also given as a ratio to it
    profiles = sorted((p for p in args.profiles if p != "echo"), key=lambda p: p != "monitor-off")
    extras, notes = prepare_profiles(profiles, workdir, args.step_threads, args.merge_wait_ms)
    for n in notes:
        rep.note(n)
    servers: dict[str, ServerProcess] = {"echo": echo}
    try:
        for name, extra in extras.items():
            log(f"starting the {name} server ...")
            s = real_server(name, extra, args, workdir / f"{name}.db", workdir)
            try:
                ready = s.wait_ready()
            except (RuntimeError, TimeoutError) as exc:
                rep.note(f"{name} skipped: its server did not start: {exc}")
                s.stop()
                continue
            log(f"  {name}: ready after {ready:.1f} s on {s.address} (log {s.log_path})")
            servers[name] = s
        cells = [(b, c, f) for b in args.batches for c in args.clients for f in args.formats]
        log(f"\n## Matrix: {len(cells)} cells x {len(servers)} servers, {args.warmup:g} s "
            f"warm-up + {args.seconds:g} s each, {pool.n} client processes\n")
        for line in md_table(MATRIX_HEADER, [])[:2]:
            log(line)
        rows: list[dict] = []
        sec = rep.md["matrix"] = [
            "## Throughput and latency: server profiles vs the echo server", "",
            f"Each cell: {args.warmup:g} s warm-up, then {args.seconds:g} s measured; clients "
            f"spread over {pool.n} client processes (grpc.aio, one connection and API key each, "
            f"pre-serialized UINT8 requests from the attack pool); server: "
            f"{'grpc.aio event loop (serve --aio) and ' if args.aio else ''}{args.workers} gRPC "
            f"workers, {_slots(args)}, 1 torch thread. img/s counts images whose response "
            f"arrived in the window; × echo = the profile's img/s / the echo's img/s in the "
            f"same cell (measured just before); × monitor-off = the profile's img/s / the "
            f"server's without its monitor in the same cell (what the monitor leaves). "
            f"server CPU % = server process CPU time / window (100 = "
            f"one core; with the monitor in its own process, both processes, that one's share "
            f"in brackets). drain s = time until the server was idle again after the cell. "
            f"answers = the answer kind each client last received." + (
                f" Every key first sent {args.key_warmup} unmeasured batch-1 requests (older "
                f"than the young keys whose requests linking probes)." if args.key_warmup else
                " Every cell's keys are new (young keys: linking probes each of their first "
                "requests, a round trip in the process and remote profiles)."), ""]
        sec += md_table(MATRIX_HEADER, [])
        rep.data["matrix"] = rows
        for b, c, fmt in cells:
            echo_img_s = off_img_s = None
            for name, s in servers.items():
                if not s.alive():
                    rep.note(f"{name} server died (code {s.proc.returncode}); its remaining "
                             f"cells are skipped:\n{s.tail()}")
                    servers = {k: v for k, v in servers.items() if k != name}
                    continue  # (the loop goes on over the dict it started with)
                keys = [f"{name}-{fmt[:4]}-b{b}-c{c}-{j}" for j in range(c)]
                if args.key_warmup:     # past the young keys' linking probe (probe_queries)
                    drive(pool, s.address, keys, 1, fmt=fmt, max_requests=args.key_warmup,
                          timeout=args.timeout)
                r = drive(pool, s.address, keys, b, fmt=fmt, warmup=args.warmup,
                          seconds=args.seconds, server=s, timeout=args.timeout)
                r.pop("clients")
                r.update(profile=name, format=fmt, batch=b, clients=c)
                # the echo defers nothing; a real server may (log writer, async monitor)
                r["drain_s"] = (None if name == "echo" else
                                round(s.settle(max_s=args.settle_max), 2))
                if name == "echo":
                    echo_img_s = r["img_s"]
                r["ratio_to_echo"] = (round(r["img_s"] / echo_img_s, 4)
                                      if echo_img_s else None)
                # what the monitor leaves of the server without it (same cell, measured first)
                if name == "monitor-off":
                    off_img_s = r["img_s"]
                r["ratio_to_monitor_off"] = (round(r["img_s"] / off_img_s, 4)
                                             if off_img_s and name not in ("echo", "monitor-off")
                                             else None)
                if r["responses_ok"] is False:
                    rep.note(f"{name} b{b} c{c} {fmt}: a response failed the shape check")
                if r["errors"]:
                    rep.note(f"{name} b{b} c{c} {fmt}: errors {r['errors']}; last exception in "
                             f"{s.log_path}: {s.last_exception()}")
                rows.append(r)
                line = md_table(MATRIX_HEADER, [matrix_cells(r)])[2]
                sec.append(line)
                log(line)
            rep.write()
    finally:
        for name, s in servers.items():
            if name != "echo":
                s.stop()


# --- section: small requests beside large ones -------------------------------------------------
def section_mixed(args, pool: ClientPool, echo: ServerProcess, workdir: Path, rep: Report,
                  pool_x: np.ndarray) -> None:
    """Clients sending one image per request while others send ``--mixed-batch`` at once, all
    at the same time: what the large requests cost the small ones (their p50/p99/max) and
    what each kind carries, on the echo and on one server profile (``--mixed-profile``)."""
    prof, b, ns, nl = args.mixed_profile, args.mixed_batch, args.mixed_small, args.mixed_large
    log(f"\n## Small requests beside large ones: {ns} clients at batch 1 and {nl} at batch "
        f"{b}, {args.mixed_seconds:g} s ({prof} profile{', serve --aio' if args.aio else ''})\n")
    flags = profile_flags(prof, "--mixed-profile", workdir, args)
    s = real_server(f"mixed-{prof}", flags, args, workdir / "mixed.db", workdir, prof)
    large_pool = ClientPool(1, pool_x)
    res: dict = {"profile": prof, "aio": bool(args.aio), "small_clients": ns,
                 "large_clients": nl, "large_batch": b, "seconds": args.mixed_seconds}
    try:
        log(f"  server ready after {s.wait_ready():.1f} s")
        for name, srv in (("echo", echo), (prof, s)):
            small = [f"mixed-{name}-s{j}" for j in range(ns)]
            large = [f"mixed-{name}-l{j}" for j in range(nl)]
            if args.key_warmup and srv is not echo:     # past linking's young-key probe
                drive(pool, srv.address, small + large, 1, max_requests=args.key_warmup,
                      timeout=args.timeout)
            t_start = time.monotonic() + 0.4 + 0.02 * (ns + nl)
            m0 = t_start + args.warmup
            m1 = m0 + args.mixed_seconds
            used_s = start_clients(pool, srv.address, small, 1, t_start, m0, m1,
                                   fmt="packed", timeout=args.timeout)
            used_l = start_clients(large_pool, srv.address, large, b, t_start, m0, m1,
                                   fmt="packed", timeout=args.timeout)
            rs = collect_clients(pool, used_s, m0, m1, args.mixed_seconds,
                                 timeout=args.timeout)
            rl = collect_clients(large_pool, used_l, m0, m1, args.mixed_seconds,
                                 timeout=args.timeout)
            for r in (rs, rl):
                r.pop("clients")
                if r["errors"]:
                    rep.note(f"mixed {name}: errors {r['errors']}")
            keep = ("img_s", "p50_ms", "p99_ms", "max_ms", "errors", "answers")
            res[name] = {"small": {k: rs.get(k) for k in keep},
                         "large": {k: rl.get(k) for k in keep}}
            log(f"  {name:8s} batch 1: {rs['img_s']} img/s, p50 {rs['p50_ms']} / p99 "
                f"{rs['p99_ms']} / max {rs['max_ms']} ms;  batch {b}: {rl['img_s']} img/s, "
                f"p50 {rl['p50_ms']} / p99 {rl['p99_ms']} ms")
            if srv is not echo:
                srv.settle(max_s=args.settle_max)
    finally:
        large_pool.close()
        s.stop()
    rep.data["mixed"] = res
    rows = [[name, f"{res[name]['small']['img_s']}", f"{res[name]['small']['p50_ms']}",
             f"{res[name]['small']['p99_ms']}", f"{res[name]['small']['max_ms']}",
             f"{res[name]['large']['img_s']}", f"{res[name]['large']['p99_ms']}"]
            for name in ("echo", prof)]
    rep.md["mixed"] = [
        "## Small requests beside large ones", "",
        f"{ns} clients at batch 1 and {nl} at batch {b}, all at once, {args.mixed_seconds:g} s "
        f"measured after {args.warmup:g} s; packed responses; server: {prof} profile"
        f"{' with serve --aio' if args.aio else ''}.", "",
        *md_table(["server", "batch-1 img/s", "p50 ms", "p99 ms", "max ms",
                   f"batch-{b} img/s", f"batch-{b} p99 ms"], rows)]
    rep.write()


# --- section: unary latency at a long history ------------------------------------------------------
def _progress_bar(total: int, desc: str, pool: ClientPool):
    from tqdm import tqdm
    bar = tqdm(total=total, desc=desc, unit="q", mininterval=1.0, file=sys.stderr)

    last = [0.0]

    def tick():
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            bar.n = min(total, pool.progress())
            bar.refresh()
    return bar, tick


def section_history_latency(args, pool: ClientPool, echo: ServerProcess, workdir: Path,
                            rep: Report) -> None:
    h, calls, nc, prof = args.hl_history, args.hl_calls, 4, args.hl_profile
    log(f"\n## Unary latency at {h:,} queries of history ({nc} clients x {calls} calls, "
        f"{prof} profile)\n")
    flags = profile_flags(prof, "--hl-profile", workdir, args)
    s = real_server(f"hl-{prof}", flags, args, workdir / "hl.db", workdir, prof)
    res: dict = {"history": h, "clients": nc, "calls": calls, "profile": prof}
    try:
        log(f"  server ready after {s.wait_ready():.1f} s")

        def unary(address, keys, srv):
            r = drive(pool, address, keys, 1, max_requests=calls, timeout=args.timeout,
                      max_total_s=args.fill_timeout)
            if r["errors"]:
                rep.note(f"history-latency {srv.name}: errors {r['errors']}; last exception in "
                         f"{srv.log_path}: {srv.last_exception()}")
            return {k: r[k] for k in ("ok", "p50_ms", "p99_ms", "max_ms", "errors", "answers")}

        res["echo"] = unary(echo.address, [f"hl-echo-{j}" for j in range(nc)], echo)
        log(f"  echo:                          p50 {res['echo']['p50_ms']} ms, "
            f"p99 {res['echo']['p99_ms']} ms")
        res["fresh"] = unary(s.address, [f"hl-fresh-{j}" for j in range(nc)], s)
        log(f"  server, fresh clients:         p50 {res['fresh']['p50_ms']} ms, "
            f"p99 {res['fresh']['p99_ms']} ms")
        keys = [f"hl-long-{j}" for j in range(nc)]
        per = math.ceil(h / 512)
        pool.reset_progress()
        bar, tick = _progress_bar(per * 512 * nc, f"history fill ({nc} clients, batch 512)", pool)
        t0 = time.monotonic()
        try:
            fill = drive(pool, s.address, keys, 512, max_requests=per, source="noisy",
                         timeout=args.timeout, max_total_s=args.fill_timeout, tick=tick)
        finally:
            tick()
            bar.close()
        fill_s = time.monotonic() - t0
        done = fill["ok"] * 512
        if fill["errors"]:
            rep.note(f"history-latency fill: errors {fill['errors']}; last exception in "
                     f"{s.log_path}: {s.last_exception()}")
        res["fill"] = {"images": done, "seconds": round(fill_s, 1),
                       "img_s": round(done / fill_s, 1), "errors": fill["errors"],
                       "answers": fill["answers"], "complete": done >= per * 512 * nc}
        log(f"  fill: {done:,} queries in {fill_s:.1f} s ({done / fill_s:,.0f} img/s), answers "
            f"{fill['answers']}, errors {fill['errors'] or 'none'}")
        s.settle(max_s=args.settle_max)
        res["long"] = unary(s.address, keys, s)
        log(f"  server, after {h:,} each:     p50 {res['long']['p50_ms']} ms, "
            f"p99 {res['long']['p99_ms']} ms")
        for k in ("fresh", "long"):
            for q in ("p50_ms", "p99_ms"):
                a, e = res[k][q], res["echo"][q]
                res[k][q.replace("_ms", "_x_echo")] = round(a / e, 2) if a and e else None
    finally:
        s.stop()
        rep.data["history_latency"] = res
        rows = [[name, res[k]["ok"], res[k]["p50_ms"], res[k]["p99_ms"], res[k]["max_ms"],
                 " ".join(f"{a}:{b}" for a, b in sorted(res[k]["answers"].items())),
                 " ".join(f"{a}:{b}" for a, b in sorted(res[k]["errors"].items()))]
                for k, name in (("echo", "echo server"), ("fresh", f"{prof}, fresh clients"),
                                ("long", f"{prof}, after {h:,} queries each")) if k in res]
        sec = rep.md["history_latency"] = [
            f"## Unary latency at {h:,} queries of client history", "",
            f"{nc} clients, each {calls} sequential batch-1 calls, concurrently. The long "
            f"history: each client first sent {h:,} queries (batch 512, pool images + Gaussian "
            f"noise, so none is an exact repeat)"
            + (f": {res['fill']['images']:,} in {res['fill']['seconds']} s "
               f"({res['fill']['img_s']:,.0f} img/s)." if "fill" in res else "."), ""]
        sec += md_table(["server", "calls", "p50 ms", "p99 ms", "max ms", "answers", "errors"],
                        rows)
        rep.write()


# --- section: crash recovery ---------------------------------------------------------------------
def logged_queries(db: Path, keys: list[str]) -> dict[str, int]:
    """Queries per client in a monitor database, read by a fresh process: the monitor's code
    (and its schema) is that of the server which wrote the database, even when it changed on
    disk since this benchmark started."""
    code = ("import json, os, sys\nfrom monitor import QueryLog\n"
            "from common.keys import client_id_for_key as cid\n"
            "with QueryLog(sys.argv[1]) as q:\n"
            "    print(json.dumps({k: q.max_qn(cid(k, os.environ['MODELGUARD_SECRET'])) "
            "for k in sys.argv[2:]}))")
    p = subprocess.run([sys.executable, "-c", code, str(db), *keys], cwd=REPO, env=_child_env(),
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"could not read the monitor database {db}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


_KILLED = {"server": "server was", "all": "server and its children were",
           "monitor": "monitor was"}


def section_crash(args, pool: ClientPool, workdir: Path, rep: Report) -> None:
    nc, ns, q, b = args.crash_clients, args.crash_sequential, args.crash_queries, 64
    per = math.ceil(q / b)
    total = (nc + ns) * per * b
    log(f"\n## Crash recovery: {nc} + {ns} clients x {per * b:,} queries (batch {b}), kill -9 "
        f"at {args.crash_at:.0%} of the load\n")
    prof = args.crash_profile
    flags = profile_flags(prof, "--crash-profile", workdir, args)
    kill_monitor = args.crash_kills == "monitor"
    if kill_monitor and not prof.startswith("remote"):
        raise SystemExit(f"--crash-kills monitor needs a profile whose monitor runs on its own "
                         f"(remote, remote-lag), not {prof}")
    db = workdir / "crash.db"
    s = real_server(f"crash-{prof}", flags, args, db, workdir, prof)
    victim = s.companion if kill_monitor else s
    res: dict = {"clients": nc, "clients_one_at_a_time": ns, "queries_per_client": per * b,
                 "batch": b,
                 "profile": prof, "killed": args.crash_kills}
    s2 = None
    try:
        log(f"  server ready after {s.wait_ready():.1f} s")
        keys = [f"crash-{j}" for j in range(nc + ns)]
        pool.reset_progress()
        bar, tick0 = _progress_bar(total, "load before the crash", pool)
        killed = {}
        t0 = time.monotonic()

        def tick():
            tick0()
            if not killed and (pool.progress() >= args.crash_at * total or
                               time.monotonic() - t0 > args.fill_timeout):
                killed["acked_images"] = pool.progress()
                killed["t"] = round(time.monotonic() - t0, 2)
                victim.kill9(children=args.crash_kills == "all")
        try:
            load = drive(pool, s.address, keys, b, max_requests=per, stop_on_error=True,
                         timeout=args.timeout, max_total_s=args.fill_timeout, tick=tick,
                         tick_every=0.01)
        finally:
            bar.close()
        if not killed:  # the load finished before the kill point (tiny loads)
            killed["acked_images"] = pool.progress()
            killed["t"] = round(time.monotonic() - t0, 2)
            victim.kill9(children=args.crash_kills == "all")
            rep.note("crash: the load ended before the kill point; killed after it")
        orphans, t_kill = getattr(victim, "orphans", []), time.monotonic()
        while any(Path(f"/proc/{p}").exists() for p in orphans) and \
                time.monotonic() - t_kill < 120:
            time.sleep(0.05)
        if orphans:
            res["children_finished_s"] = round(time.monotonic() - t_kill, 2)
            log(f"  the server's {len(orphans)} child process(es) finished "
                f"{res['children_finished_s']} s after the kill")
        if s.companion is not None and not kill_monitor:   # remote: the monitor goes on
            while "disconnected" not in s.companion.tail(40) and \
                    time.monotonic() - t_kill < 120:
                time.sleep(0.05)
            res["monitor_caught_up_s"] = round(time.monotonic() - t_kill, 2)
            log(f"  the monitor (still running) logged what it had read "
                f"{res['monitor_caught_up_s']} s after the kill")
        acked = {c["key"]: c["ok"] * b for c in load["clients"]}
        logged = logged_queries(db, keys)
        lost = {k: acked[k] - logged[k] for k in keys}
        res["before_crash"] = {
            "killed_after_s": killed["t"], "acked_images": sum(acked.values()),
            "logged_images": sum(logged.values()),
            "acked_not_logged": sum(max(0, v) for v in lost.values()),
            "clients_with_acked_not_logged": sum(v > 0 for v in lost.values()),
            "errors_seen_by_clients": load["errors"]}
        log(f"  killed after {killed['t']} s: {sum(acked.values()):,} images answered, "
            f"{sum(logged.values()):,} in the log ({res['before_crash']['acked_not_logged']:,} "
            f"answered but not logged)")
        if kill_monitor:
            # a new monitor on the same log and port; the server (still running) reconnects
            m2 = ServerProcess(f"{victim.name}-restart", victim.argv[:], victim.port,
                               workdir / "crash-monitor-restart.log").start()
            s.companion = m2
            s2, restored_log = s, m2.log_path
            s.wait_ready()
            res["restart_ready_s"] = round(time.monotonic() - m2.t_spawn, 2)
            log(f"  a new monitor on the same log and port: the server's ServerReady true "
                f"again {res['restart_ready_s']} s after it was spawned")
        else:
            s2 = ServerProcess("crash-restart", s.argv[:], free_port(),
                               workdir / "crash-restart.log")
            s2.companion = s.companion   # remote: the restarted server connects to it again
            i = s2.argv.index("--port")
            s2.argv[i + 1] = str(s2.port)
            s2.start()
            restored_log = s2.log_path
            res["restart_ready_s"] = round(s2.wait_ready(), 2)
            log(f"  restarted on the same database: ServerReady true after "
                f"{res['restart_ready_s']} s")
        # two requests each: the burst's second requests (every client restored by then) say
        # what the burst itself costs, apart from restoring
        first = drive(pool, s2.address, keys[:nc], 1, max_requests=2,
                      timeout=args.crash_timeout, max_total_s=args.crash_timeout)
        lat = [c["lat_ms"][0] for c in first["clients"] if c["lat_ms"]]
        res["first_request"] = {**_first_latencies(lat), "errors": first["errors"],
                                "answers": first["answers"],
                                **_second_latencies(first["clients"])}
        # the others one at a time: what restoring costs a client, without the queue of a
        # burst; each client's second request right after is the reference
        one, two, errs = [], [], Counter()
        for k in keys[nc:]:
            r = drive(pool, s2.address, [k], 1, max_requests=2, timeout=args.crash_timeout,
                      max_total_s=args.crash_timeout)
            one += [c["lat_ms"][0] for c in r["clients"] if c["lat_ms"]]
            two += [c["lat_ms"][1] for c in r["clients"] if len(c["lat_ms"]) > 1]
            errs.update(r["errors"])
        # and once more on a new connection each: a first request of a client already in
        # memory (what a new connection costs, apart from restoring)
        again = [c["lat_ms"][0] for k in keys[nc:] for c in
                 drive(pool, s2.address, [k], 1, max_requests=1, timeout=args.crash_timeout,
                       max_total_s=args.crash_timeout)["clients"] if c["lat_ms"]]
        res["first_request_one_at_a_time"] = {**_first_latencies(one), "errors": dict(errs),
                                              "second_request_median_ms": _pct(two, 50),
                                              "reconnected_median_ms": _pct(again, 50)}
        # the same burst again, each client on a new connection and in memory by now: what
        # the burst costs without any restore
        burst2 = drive(pool, s2.address, keys[:nc], 1, max_requests=1,
                       timeout=args.crash_timeout, max_total_s=args.crash_timeout)
        res["burst_again"] = {**_first_latencies([c["lat_ms"][0] for c in burst2["clients"]
                                                  if c["lat_ms"]]),
                              "errors": burst2["errors"]}
        fresh = drive(pool, s2.address, [f"crash-new-{j}" for j in range(nc)], 1,
                      max_requests=2, timeout=args.crash_timeout, max_total_s=args.crash_timeout)
        lat2 = [c["lat_ms"][0] for c in fresh["clients"] if c["lat_ms"]]
        res["first_request_new_clients"] = {**_first_latencies(lat2),
                                            "errors": fresh["errors"],
                                            **_second_latencies(fresh["clients"])}
        # what the restarted monitor said about each client it restored (the wording is the
        # monitor's; counted by kind, with an example line)
        text = restored_log.read_text(errors="replace").splitlines()
        # (the server logs each key as a client id: k-<digest of the key>)
        restored = [l.split(": ", 1)[-1] for l in text
                    if "modelguard.monitor" in l and re.search(r"client \S+: ", l)]
        kinds = Counter(re.sub(r"\d+", "#", re.sub(r"client \S+:", "client C:", l))
                        for l in restored)
        res["server_log"] = {"clients_restored_messages": len(restored),
                             "kinds": dict(kinds.most_common(5)),
                             "example": restored[0] if restored else None}
        fr, fo, nf, ba = (res[k] for k in ("first_request", "first_request_one_at_a_time",
                                           "first_request_new_clients", "burst_again"))
        log(f"  first request of each of the {nc} clients (concurrently): median "
            f"{fr['median_ms']} ms, max {fr['max_ms']} ms, errors {first['errors'] or 'none'} "
            f"(second requests: median {fr['second_request_median_ms']}, max "
            f"{fr['second_request_max_ms']} ms; the same burst again later, new connections: "
            f"median {ba['median_ms']}, max {ba['max_ms']} ms); {ns} others one at a time: median "
            f"{fo['median_ms']} ms, max {fo['max_ms']} ms (their second requests: median "
            f"{fo['second_request_median_ms']} ms; on a new connection after: median "
            f"{fo['reconnected_median_ms']} ms); {nc} new clients: median {nf['median_ms']} ms, "
            f"max {nf['max_ms']} ms (second requests: median {nf['second_request_median_ms']}, "
            f"max {nf['second_request_max_ms']} ms); restored-client log lines: "
            f"{res['server_log']['clients_restored_messages']} "
            f"(e.g. {res['server_log']['example']!r})")
    finally:
        s.stop()
        if s2 is not None and s2 is not s:
            s2.stop()
        rep.data["crash"] = res
        sec = rep.md["crash"] = [
            "## Crash recovery", "",
            f"Profile {prof}. {nc + ns} clients x {per * b:,} queries (batch {b}) from the attack "
            f"pool; the {_KILLED[args.crash_kills]} killed with SIGKILL at "
            f"{args.crash_at:.0%} of the "
            f"load, then " + ("a new monitor started on the same log and port (the server "
                              "kept running and reconnected)." if kill_monitor else
                              "restarted on the same database."), ""]
        bc = res.get("before_crash")
        if bc:
            sec += [f"- killed after {bc['killed_after_s']} s of load: {bc['acked_images']:,} "
                    f"images answered, {bc['logged_images']:,} in the query log; answered but "
                    f"not logged: {bc['acked_not_logged']:,} (over "
                    f"{bc['clients_with_acked_not_logged']} clients)"]
        if "restart_ready_s" in res:
            sec += [f"- restart: ServerReady true {res['restart_ready_s']} s after the process "
                    f"was spawned"]
        if "first_request_new_clients" in res:   # set last: every figure below is there
            fr, nf = res["first_request"], res["first_request_new_clients"]
            fo = res["first_request_one_at_a_time"]
            sec += [f"- first request (batch 1) of every one of the {nc} clients, "
                    f"concurrently: median **{_f1(fr['median_ms'])} ms**, max "
                    f"**{_f1(fr['max_ms'])} ms** "
                    f"({fr['n']} answered; errors {fr['errors'] or 'none'}); their second "
                    f"requests, sent as each first one was answered: median "
                    f"{_f1(fr['second_request_median_ms'])} ms, max "
                    f"{_f1(fr['second_request_max_ms'])} ms; the same {nc} clients at once "
                    f"again after the one-at-a-time ones, each on a new connection (in memory "
                    f"by then): median {_f1(res['burst_again']['median_ms'])} ms, max "
                    f"{_f1(res['burst_again']['max_ms'])} ms",
                    f"- first request of each of the {ns} other clients, one client at a time: "
                    f"median **{_f1(fo['median_ms'])} ms**, max **{_f1(fo['max_ms'])} ms** "
                    f"({fo['n']} answered; errors {fo['errors'] or 'none'}); their second "
                    f"requests right after: median {_f1(fo['second_request_median_ms'])} ms; "
                    f"then each once more on a new connection (in memory by then): median "
                    f"{_f1(fo['reconnected_median_ms'])} ms",
                    f"- for comparison, the first request of {nc} new clients at once right "
                    f"after: median {_f1(nf['median_ms'])} ms, max {_f1(nf['max_ms'])} ms "
                    f"(second requests: median {_f1(nf['second_request_median_ms'])}, max "
                    f"{_f1(nf['second_request_max_ms'])} ms)",
                    f"- the restarted server's monitor logged "
                    f"{res['server_log']['clients_restored_messages']} lines about restoring "
                    f"these clients, e.g. `{res['server_log']['example']}`"]
        rep.write()


# --- section: monitor cost in process --------------------------------------------------------------
def section_cost(args, pool_x: np.ndarray, rep: Report) -> None:
    import torch
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from common.types import Level
    from monitor import Monitor, load_config
    from monitor.log import pickle_state
    from common.clock import FakeClock
    from lab.monitor_bench import fake_answer

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")  # as the server does
    cfg = load_config(args.monitor_config)
    pool = pool_x.astype(np.float32) / 255.0
    rng = np.random.default_rng(args.seed)

    def batch(n):
        idx = rng.integers(0, len(pool), n)
        if args.cost_items == "grid":
            g = pool_x[idx].astype(np.int16) + rng.integers(-20, 21, (n, 28, 28))
            x = (np.clip(g, 0, 255) / 255.0).astype(np.float32)
        else:
            x = np.clip(pool[idx] + rng.normal(0, 0.05, (n, 28, 28)), 0, 1).astype(np.float32)
        lg = rng.normal(0, 3, (n, 10))
        p = np.exp(lg - lg.max(1, keepdims=True))
        return x, (p / p.sum(1, keepdims=True)).astype(np.float32)

    header = ["history", "filled", "fill s", "fill items/s", "batch 1: ms/item",
              "batch 256: ms/item", "client state (pickle)", "full checkpoint pickle",
              "client state (memory)"]
    items = ("pool images with +-20 grey levels of noise, on the 0-255 grid (the rings hold "
             "them as grey levels)" if args.cost_items == "grid" else
             "pool images + Gaussian noise 0.05, clipped: off the 0-255 grid (the rings hold "
             "them as float32; `--cost-items grid`: as an honest client's images are)")
    sec = rep.md["cost"] = [
        "## Monitor cost per item at long client histories (in process)", "",
        f"`monitor.Monitor` with {args.monitor_config or 'monitor/default.toml'}, a temporary "
        f"database, FakeClock(step=0.001). One client's history filled with real observe() "
        f"calls of 512 images ({items}; probabilities from a random softmax), then timed: "
        f"{args.cost_calls1} calls of batch 1 and {args.cost_calls256} calls of batch 256. "
        f"State size, after the timed calls: the full checkpoint's length "
        f"(monitor.log.pickle_state) and the best of 3 times it took (what a full checkpoint "
        f"holds the client's lock for); in memory: the engine's nbytes(), what "
        f"execution.max_state_mb counts.", ""]
    sec += md_table(header, [])
    rows = rep.data["cost"] = []
    log(f"\n## Monitor cost per item (config {args.monitor_config or 'monitor/default.toml'})\n")
    for line in md_table(header, []):
        log(line)
    for h in args.histories:
        mon = Monitor(cfg, None, clock=FakeClock(step=0.001))
        client = "bench"
        try:
            t0 = time.perf_counter()
            filled = 0
            with tqdm(total=h, desc=f"fill {h:,}", unit="q", mininterval=1.0,
                      file=sys.stderr) as bar:
                while filled < h:
                    if time.perf_counter() - t0 > args.fill_timeout:
                        break
                    n = min(512, h - filled)
                    x, p = batch(n)
                    mon.observe(client, f"h{filled}", x, p, fake_answer(p), Level.NORMAL)
                    filled += n
                    bar.update(n)
            fill_s = time.perf_counter() - t0
            mon.flush()  # the log writer's backlog must not run during the timing
            r = {"history": h, "filled": filled, "fill_s": round(fill_s, 1),
                 "fill_items_s": round(filled / fill_s, 1)}
            for bs, calls in ((1, args.cost_calls1), (256, args.cost_calls256)):
                xs = [batch(bs) for _ in range(calls)]
                t = time.perf_counter()
                for i, (x, p) in enumerate(xs):
                    mon.observe(client, f"m{bs}-{i}", x, p, fake_answer(p), Level.NORMAL)
                r[f"ms_per_item_b{bs}"] = round((time.perf_counter() - t) / (calls * bs) * 1e3,
                                                4)
                mon.flush()
            eng = mon._engines[client]
            r["memory_bytes"] = eng.nbytes()
            try:
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    blob = pickle_state(eng)
                    times.append(time.perf_counter() - t)
                r["state_bytes"], r["pickle_ms"] = len(blob), round(min(times) * 1e3, 2)
                del blob
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                r["state_bytes"] = r["pickle_ms"] = None
                r["state_error"] = repr(exc)
            rows.append(r)
            if filled < h:
                rep.note(f"cost: the {h:,} history fill stopped at {filled:,} after "
                         f"--fill-timeout {args.fill_timeout:g} s; its row is at {filled:,}")
            line = md_table(header, [[f"{h:,}", f"{filled:,}", r["fill_s"],
                                      r["fill_items_s"], f"{r['ms_per_item_b1']:.4f}",
                                      f"{r['ms_per_item_b256']:.4f}",
                                      "–" if r["state_bytes"] is None
                                      else f"{r['state_bytes'] / 2**20:,.1f} MiB",
                                      "–" if r["pickle_ms"] is None else f"{r['pickle_ms']} ms",
                                      f"{r['memory_bytes'] / 2**20:,.1f} MiB"]])[2]
            sec.append(line)
            log(line)
            rep.write()
        finally:
            mon.close()


# --- main ----------------------------------------------------------------------------------------
def _ints(s: str) -> list[int]:
    try:
        v = [int(x.replace("_", "")) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {s!r}")
    return v


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sec = ap.add_argument_group("sections (default: all of them)")
    sec.add_argument("--matrix", action="store_true", help="throughput/latency matrix")
    sec.add_argument("--history-latency", action="store_true",
                     help="unary p50/p99 after 100k queries of history")
    sec.add_argument("--crash", action="store_true", help="kill -9 under load, restart, recover")
    sec.add_argument("--cost", action="store_true", help="in-process monitor cost per item")
    sec.add_argument("--mixed", action="store_true",
                     help="batch-1 clients beside large-batch clients, at once")
    m = ap.add_argument_group("matrix")
    m.add_argument("--profiles", type=_names, default=None,
                   help="comma-separated, among echo," + ",".join(PROFILES) +
                        " (default: all; the echo always runs, it is the reference)")
    m.add_argument("--batches", type=_ints, default=None, help="default 1,64,256")
    m.add_argument("--clients", type=_ints, default=None, help="default 1,4,16")
    m.add_argument("--formats", type=_names, default=None,
                   help="response layouts: predictions, packed (default: both when the protos "
                        "have PredictRequest.format, else predictions)")
    m.add_argument("--seconds", type=float, default=None, help="measured seconds per cell (3)")
    m.add_argument("--warmup", type=float, default=None, help="warm-up seconds per cell (1)")
    m.add_argument("--client-procs", type=int, default=2, help="client processes (2)")
    m.add_argument("--workers", type=int, default=4, help="gRPC workers of every server (4)")
    m.add_argument("--aio", action="store_true",
                   help="the real servers run `serve --aio` (grpc.aio event loop; the echo "
                        "stays the thread-pool reference)")
    m.add_argument("--compute-slots", dest="compute_slots", type=int, default=None,
                   help="compute slots of the real servers (default: the server's own, "
                        "0 = no limit)")
    m.add_argument("--key-warmup", dest="key_warmup", type=int, default=0,
                   help="each cell's keys first send this many unmeasured batch-1 requests "
                        "(e.g. 250: past linking's probe_queries, which probes a young key's "
                        "requests before they are answered); default 0: new keys")
    m.add_argument("--small-items", dest="small_items", type=int, default=None,
                   help="the real servers' --small-request-items (default: the server's "
                        "own; 0 = no slot for small requests)")
    m.add_argument("--step-threads", dest="step_threads", type=int, default=None,
                   help="the monitor's execution.step_threads in the process and remote "
                        "profiles (default: the config's)")
    m.add_argument("--merge-wait-ms", dest="merge_wait_ms", type=float, default=None,
                   help="the monitor's execution.merge_wait_ms in the -lag profiles (default: "
                        "the config's; 0: the detectors run what waits, without waiting for "
                        "more)")
    m.add_argument("--settle-max", type=float, default=30.0,
                   help="max seconds to wait for a server to go idle after a cell")
    o = ap.add_argument_group("other sections")
    o.add_argument("--histories", type=_ints, default=None,
                   help="--cost client histories (default 1000,10000,100000,1000000)")
    o.add_argument("--monitor-config", default=None,
                   help="--cost monitor TOML (default monitor/default.toml)")
    o.add_argument("--cost-items", default="noisy", choices=("noisy", "grid"),
                   help="--cost: pool images with Gaussian noise 0.05, off the 0-255 grid "
                        "(default), or with +-20 grey levels of noise, on it (as an honest "
                        "client's images are; the rings then hold grey levels)"),
    o.add_argument("--fill-timeout", type=float, default=3600.0,
                   help="bound (s) on any history fill or load phase (3600)")
    o.add_argument("--hl-history", type=int, default=None, help="--history-latency (100000)")
    o.add_argument("--hl-calls", type=int, default=None, help="--history-latency calls (500)")
    o.add_argument("--crash-profile", default="default", choices=PROFILES,
                   help="--crash: the server profile (default: default)")
    o.add_argument("--hl-profile", default="default", choices=PROFILES,
                   help="--history-latency: the server profile (default: default)")
    o.add_argument("--mixed-profile", default="default", choices=PROFILES,
                   help="--mixed: the server profile (default: default)")
    o.add_argument("--mixed-batch", type=int, default=256,
                   help="--mixed: the large clients' batch (256)")
    o.add_argument("--mixed-small", type=int, default=None, help="--mixed: batch-1 clients (4)")
    o.add_argument("--mixed-large", type=int, default=None,
                   help="--mixed: large-batch clients (2)")
    o.add_argument("--mixed-seconds", type=float, default=None,
                   help="--mixed: measured seconds (20)")
    o.add_argument("--crash-kills", default="server", choices=("server", "all", "monitor"),
                   help="--crash: what is killed: the server; all: the server and its child "
                        "processes at once (process profiles: the monitor's process too); "
                        "monitor: (remote profiles) the monitor it connects to (default: "
                        "server)")
    o.add_argument("--crash-clients", type=int, default=None,
                   help="--crash clients whose first requests after the restart go at once (32)")
    o.add_argument("--crash-sequential", type=int, default=None,
                   help="--crash clients whose first requests go one client at a time (8)")
    o.add_argument("--crash-queries", type=int, default=None,
                   help="--crash queries per client (5000)")
    o.add_argument("--crash-at", type=float, default=0.5,
                   help="--crash: kill at this fraction of the load (0.5)")
    o.add_argument("--crash-timeout", type=float, default=300.0,
                   help="timeout (s) of the first requests after the restart")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    ap.add_argument("--artifacts", type=Path,
                    default=Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts")),
                    help="checkpoints (target.pt, pool/) for the real servers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="a small, fast version of every section (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("results/bench"),
                    help="directory for serving.json and serving.md")
    a = ap.parse_args(argv)
    q = a.quick
    dflt = lambda v, full, quick: v if v is not None else (quick if q else full)  # noqa: E731
    a.profiles = dflt(a.profiles, ["echo", *PROFILES], ["echo", *PROFILES])
    a.batches = dflt(a.batches, [1, 64, 256], [1, 64])
    a.clients = dflt(a.clients, [1, 4, 16], [1, 4])
    a.seconds = dflt(a.seconds, 3.0, 1.0)
    a.warmup = dflt(a.warmup, 1.0, 0.3)
    a.histories = dflt(a.histories, [1000, 10000, 100000, 1000000], [1000, 10000])
    a.hl_history = dflt(a.hl_history, 100_000, 5_000)
    a.hl_calls = dflt(a.hl_calls, 500, 50)
    a.crash_clients = dflt(a.crash_clients, 32, 8)
    a.crash_sequential = dflt(a.crash_sequential, 8, 2)
    a.crash_queries = dflt(a.crash_queries, 5000, 640)
    a.cost_calls1, a.cost_calls256 = (50, 5) if q else (200, 20)
    a.mixed_small = dflt(a.mixed_small, 4, 2)
    a.mixed_large = dflt(a.mixed_large, 2, 1)
    a.mixed_seconds = dflt(a.mixed_seconds, 20.0, 1.0)
    a.formats = dflt(a.formats, list(FORMATS), ["predictions"])
    bad = [p for p in a.profiles if p != "echo" and p not in PROFILES]
    if bad:
        ap.error(f"unknown profile(s) {bad}; expected echo or some of {list(PROFILES)}")
    bad = [f for f in a.formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}; expected some of {list(FORMATS)}")
    if max(a.batches) > 512:
        ap.error("batches above the server's limit of 512")
    if not 0 < a.crash_at < 1:
        ap.error("--crash-at must be between 0 and 1")
    if a.key_warmup < 0:
        ap.error("--key-warmup must be >= 0")
    if not 1 <= a.mixed_batch <= 512 or a.mixed_small < 1 or a.mixed_large < 1:
        ap.error("--mixed-batch must be 1..512, --mixed-small and --mixed-large >= 1")
    if a.mixed_seconds <= 0:
        ap.error("--mixed-seconds must be > 0")
    chosen = [s for s in ("matrix", "history_latency", "crash", "cost", "mixed")
              if getattr(a, s)]
    # (--mixed runs only when asked for: the default run is the sections)
    a.sections = chosen or ["matrix", "history_latency", "crash", "cost"]
    return a


def _meta(args, argv) -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    import grpc
    return {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python -m lab.serving", *argv]),
            "commit": git("rev-parse", "--short", "HEAD") or "?",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "python": platform.python_version(), "grpc": grpc.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    needs_server = (any(p != "echo" for p in args.profiles) and "matrix" in args.sections) or \
        any(s in args.sections for s in ("history_latency", "crash", "mixed"))
    if needs_server and not (args.artifacts / "target.pt").exists():
        print(f"error: no target checkpoint at {args.artifacts / 'target.pt'}; run `make models` "
              f"(trains the target and the defence pool) or pass --artifacts", file=sys.stderr)
        return 2

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    rep = Report(args.out, _meta(args, argv))
    log(f"lab.serving: sections {', '.join(args.sections)}; results in {args.out}/serving.*")
    workdir = Path(tempfile.mkdtemp(prefix="mg-lab-serving-"))
    pool = echo = None
    from common import data
    from common.data import DataUnavailable
    try:
        pool_x = np.ascontiguousarray(data.attack_pool().x)  # test images 0-4999
        if any(s in args.sections for s in ("matrix", "history_latency", "crash", "mixed")):
            log(f"starting {args.client_procs} client processes and the echo server ...")
            pool = ClientPool(args.client_procs, pool_x)
            echo = echo_server(args.workers, workdir)
            log(f"  echo: ready after {echo.wait_ready():.1f} s on {echo.address}")
        failed: list[str] = []

        def run(name: str, fn, *a) -> None:
            """A failing section is reported (traceback, note) and the others still run."""
            if name not in args.sections:
                return
            try:
                fn(*a)
            except (KeyboardInterrupt, DataUnavailable):
                raise
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                rep.note(f"section {name} failed: {type(exc).__name__}: {exc}")
                failed.append(name)
                ServerProcess.stop_all_but(echo)

        run("matrix", section_matrix, args, pool, echo, workdir, rep)
        run("history_latency", section_history_latency, args, pool, echo, workdir, rep)
        run("crash", section_crash, args, pool, workdir, rep)
        run("mixed", section_mixed, args, pool, echo, workdir, rep, pool_x)
        if echo is not None:  # the in-process cost section gets the machine to itself
            echo.stop()
        if pool is not None:
            pool.close()
            pool = None
        run("cost", section_cost, args, pool_x, rep)
        if failed:
            print(f"error: section(s) {', '.join(failed)} failed (see above)", file=sys.stderr)
            return 1
    except DataUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        rep.note("interrupted (Ctrl-C / SIGTERM): results are partial")
        return 130
    except Exception as exc:
        rep.note(f"failed: {type(exc).__name__}: {exc}")
        raise
    finally:
        ServerProcess.stop_all()
        if pool is not None:
            pool.close()
        rep.write()
        measured = [t for t in rep.data["targets"] if t["verdict"] != "not measured"]
        if measured:
            log("\nthe issue's targets (issue 8) in this run:")
            for t in measured:
                log(f"  {t['verdict'].upper():8s} {t['target']}: {t['measured']}")
        for f in workdir.glob("*.db*"):  # query logs can be large; the servers' logs stay
            with contextlib.suppress(OSError):
                f.unlink()
        log(f"\nwrote {args.out / 'serving.json'} and {args.out / 'serving.md'} "
            f"(server logs: {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
