"""A local cluster: PostgreSQL + N server replicas + nginx in front, one address for clients.

    python -m deploy.cluster up   [--dir artifacts/cluster] [--port 50050] [--replicas 3] [-- ARGS]
    python -m deploy.cluster status [--dir artifacts/cluster]
    python -m deploy.cluster down [--dir artifacts/cluster]

``up`` installs PostgreSQL and nginx with apt-get when they are missing (as root), starts
PostgreSQL (initdb on first use, DIR/pg), writes a shared secret (DIR/secret) when none exists,
starts the replicas (``python -m deploy.replica``, ports PORT+11.., logs DIR/replica-N.log),
waits until each one answers the gRPC health check, then starts nginx (DIR/nginx/nginx.conf):
HTTP/2 on 127.0.0.1:PORT, ``grpc_pass`` to the replicas with ``hash $route_key consistent``
(the x-api-key header, else the authorization header), so one client's requests all reach one
replica and move to the next one on the ring only when theirs fails (docs/scaleout.md).
Extra ARGS after ``--`` go to every replica (e.g. ``-- --monitor-config strict.toml``).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

NGINX_CONF = """\
# written by python -m deploy.cluster (docs/scaleout.md)
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    # route by API key: the x-api-key header, else the authorization header (Bearer KEY)
    map $http_x_api_key $route_key {{
        ""      $http_authorization;
        default $http_x_api_key;
    }}
    upstream modelguard {{
        hash $route_key consistent;
{servers}
        keepalive 64;
    }}
    server {{
        listen {host}:{port} http2;
        client_max_body_size 16m;
        client_body_buffer_size 4m;       # requests stay in memory (no temp files)
        location / {{
            grpc_pass grpc://modelguard;
            grpc_connect_timeout 1s;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
            # a replica that refuses or resets connections (dead) or times out: the next on
            # the ring. non_idempotent: also a call already sent over a kept-alive connection
            # that a dying replica reset (it may have been logged there too: then the monitor
            # counts it twice, which errs towards escalating)
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries 3;
        }}
    }}
}}
"""


def _which_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)),
                                         None)


def ensure_nginx() -> str:
    exe = _which_nginx()
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("nginx not found and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "nginx"],
                   check=True, env=env)
    exe = _which_nginx()
    if not exe:
        raise SystemExit("apt-get installed nginx but it is not found")
    return exe


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours is dead too
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return True


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid) else None


def wait_serving(address: str, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            with grpc.insecure_channel(address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=1.0)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            last = exc.code()
        time.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {timeout:g} s (last: {last})")


class Cluster:
    def __init__(self, root: str | Path, port: int = 50050, replicas: int = 3,
                 host: str = "127.0.0.1", python: str = sys.executable,
                 from_state: bool = False):
        """from_state: take port, replicas and host from the running cluster's DIR/cluster.json
        (status, down)."""
        self.root = Path(root).resolve()
        self.port, self.n, self.host, self.python = port, replicas, host, python
        self.state_file = self.root / "cluster.json"
        if from_state and self.state_file.exists():
            st = json.loads(self.state_file.read_text())
            self.port, self.n, self.host = st["port"], st["replicas"], st["host"]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def replica_port(self, i: int) -> int:
        return self.port + 11 + i

    def replica_address(self, i: int) -> str:
        return f"{self.host}:{self.replica_port(i)}"

    @property
    def pg(self):
        from deploy.pgserver import PgServer
        return PgServer(self.root / "pg")

    # --- up -------------------------------------------------------------------------------------
    def up(self, replica_args: list[str] = (), env: dict | None = None,
           timeout: float = 180.0) -> "Cluster":
        from deploy import pgserver

        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)          # PostgreSQL runs as the postgres user under root
        pgserver.install()
        nginx = ensure_nginx()
        pg = self.pg.start()
        secret = self.root / "secret"
        if not secret.exists():
            secret.write_text(secrets.token_hex(32) + "\n")
            secret.chmod(0o600)
        self.state_file.write_text(json.dumps({"port": self.port, "replicas": self.n,
                                               "host": self.host, "dsn": pg.dsn}))
        self.replica_args = list(replica_args)
        self.env = env
        for i in range(self.n):
            self.start_replica(i)
        for i in range(self.n):
            wait_serving(self.replica_address(i), timeout)
        self.start_nginx(nginx)
        wait_serving(self.address, 30)
        return self

    def start_replica(self, i: int) -> int:
        pidf = self.root / f"replica-{i + 1}.pid"
        if _pid(pidf):
            return _pid(pidf)
        args = getattr(self, "replica_args", None)
        if args is None:
            args = json.loads((self.root / "replica-args.json").read_text()) \
                if (self.root / "replica-args.json").exists() else []
        (self.root / "replica-args.json").write_text(json.dumps(list(args)))
        cmd = [self.python, "-m", "deploy.replica", "--store", self.pg.dsn,
               "--replica", f"r{i + 1}", "--host", self.host, "--port",
               str(self.replica_port(i)), "--secret-file", str(self.root / "secret")]
        if "--api-keys" not in args:
            cmd.append("--open-keys")
        cmd += list(args)
        env = dict(os.environ, **(getattr(self, "env", None) or {}))
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        logf = open(self.root / f"replica-{i + 1}.log", "ab")
        p = subprocess.Popen(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        pidf.write_text(str(p.pid))
        self._children = getattr(self, "_children", {})
        self._children[i] = p
        return p.pid

    def start_nginx(self, nginx: str | None = None) -> None:
        nginx = nginx or ensure_nginx()
        d = self.root / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (d / "tmp" / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(d / "tmp" / sub, 0o777)
        os.chmod(d / "tmp", 0o777)
        servers = "\n".join(f"        server {self.replica_address(i)} max_fails=1 "
                            f"fail_timeout=5s;" for i in range(self.n))
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, servers=servers, host=self.host, port=self.port))
        if _pid(d / "nginx.pid"):
            subprocess.run([nginx, "-p", str(d), "-c", str(conf), "-s", "reload"], check=True)
            return
        r = subprocess.run([nginx, "-p", str(d), "-c", str(conf)], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(f"nginx failed to start: {r.stderr}")

    # --- failure injection and teardown -------------------------------------------------------
    def replica_pid(self, i: int) -> int | None:
        return _pid(self.root / f"replica-{i + 1}.pid")

    def kill_replica(self, i: int, sig: int = signal.SIGKILL) -> None:
        pid = self.replica_pid(i)
        if pid is not None:
            os.kill(pid, sig)
            ch = getattr(self, "_children", {}).get(i)
            if ch is not None:
                ch.wait(30)
            else:
                for _ in range(300):
                    if not _alive(pid):
                        break
                    time.sleep(0.1)

    def down(self) -> None:
        d = self.root / "nginx"
        pid = _pid(d / "nginx.pid")
        if pid is not None:
            os.kill(pid, signal.SIGQUIT)
        pids = {i: self.replica_pid(i) for i in range(self.n)}
        for pid in pids.values():    # all at once: each drains its calls and its log
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + 30
        for i, pid in pids.items():
            ch = getattr(self, "_children", {}).get(i)
            while pid is not None and _alive(pid) and time.monotonic() < end:
                if ch is not None and ch.poll() is not None:
                    break
                time.sleep(0.05)
            if pid is not None and _alive(pid):      # did not stop within 30 s
                os.kill(pid, signal.SIGKILL)
        self.pg.stop()

    def status(self) -> dict:
        return {"address": self.address,
                "postgresql": {"dsn": self.pg.dsn, "running": self.pg.running()},
                "replicas": {f"r{i + 1}": {"address": self.replica_address(i),
                                           "pid": self.replica_pid(i)} for i in range(self.n)},
                "nginx": _pid(self.root / "nginx" / "nginx.pid")}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="python -m deploy.cluster", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["up", "down", "status"])
    p.add_argument("--dir", default="artifacts/cluster")
    p.add_argument("--port", type=int, default=50050)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--host", default="127.0.0.1")
    a = p.parse_args(argv)
    c = Cluster(a.dir, a.port, a.replicas, a.host, from_state=a.cmd != "up")
    if a.cmd == "up":
        try:
            c.up(extra)
        except Exception:
            print(f"cluster failed to start; logs in {c.root}", file=sys.stderr)
            raise
        print(json.dumps(c.status(), indent=2))
        print(f"clients: {c.address} (x-api-key routes a client to one replica); "
              f"stop with `make cluster-stop`")
    elif a.cmd == "down":
        c.down()
        print("cluster stopped")
    else:
        print(json.dumps(c.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
