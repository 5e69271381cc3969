"""A throwaway PostgreSQL server for the cluster and the tests: ``initdb`` + ``pg_ctl`` in a
directory of our own, on a free TCP port of 127.0.0.1, no system service involved.

PostgreSQL refuses to run as root; when we are root the data directory is handed to the
``postgres`` system user (Debian's package creates it) and every command runs as that user
through ``runuser``.

    srv = PgServer("/tmp/pg").start()      # initdb on first use, then pg_ctl start
    srv.dsn                                # postgresql://modelguard@127.0.0.1:PORT/modelguard
    srv.restart(); srv.kill(); srv.stop()

``find_bindir()`` looks for the binaries (PATH, then /usr/lib/postgresql/*/bin); ``install()``
runs apt-get when they are missing (``make pg``).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

USER = "modelguard"
DB = "modelguard"


def find_bindir() -> Path | None:
    exe = shutil.which("pg_ctl")
    if exe and shutil.which("initdb"):
        return Path(os.path.realpath(exe)).parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "pg_ctl")) and os.path.exists(os.path.join(d, "initdb")):
            return Path(d)
    return None


def install() -> Path:
    """The PostgreSQL binaries, installed with apt-get when missing (needs root)."""
    b = find_bindir()
    if b is not None:
        return b
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("PostgreSQL binaries (initdb, pg_ctl) not found and cannot be "
                           "installed here (needs root and apt-get): install PostgreSQL")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "postgresql"],
                   check=True, env=env)
    b = find_bindir()
    if b is None:
        raise RuntimeError("apt-get installed postgresql but initdb/pg_ctl are not found")
    return b


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, root: str | Path, port: int | None = None, bindir: Path | None = None,
                 fsync: bool = True):
        self.root = Path(root).resolve()
        self.data = self.root / "data"
        self.sock = self.root / "sock"
        self.logfile = self.root / "postgres.log"
        self.port_file = self.root / "port"
        if port is None and self.port_file.exists():
            port = int(self.port_file.read_text())
        self.port = port or free_port()
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL binaries not found (make pg installs them)")
        self.fsync = fsync
        self._as: list[str] = []
        if os.geteuid() == 0:      # postgres refuses root: run as the postgres system user
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"],
                               check=True)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def dsn(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DB}"

    def _run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self._as + [str(self.bindir / cmd[0]), *cmd[1:]], check=check,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

    def _chown(self, *paths: Path) -> None:
        if self._as:
            for p in paths:
                shutil.chown(p, "postgres", "postgres")

    def init(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._chown(self.root)
        os.chmod(self.root, 0o755)
        if self._as:   # the postgres user must reach the data directory
            for d in self.root.parents:
                if not os.stat(d).st_mode & 0o001:
                    raise RuntimeError(f"{d} is not traversable by the postgres user that runs "
                                       f"PostgreSQL (we are root); chmod o+x it or choose "
                                       f"another directory than {self.root}")
        if (self.data / "PG_VERSION").exists():
            return
        self.sock.mkdir(exist_ok=True)
        self._chown(self.sock)
        r = self._run("initdb", "-D", str(self.data), "-U", USER, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync", check=False)
        if r.returncode:
            raise RuntimeError(f"initdb failed: {r.stdout}")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.sock}'\nmax_connections = 200\n"
                    f"fsync = {'on' if self.fsync else 'off'}\nshared_buffers = 64MB\n")

    def start(self, timeout: float = 30.0) -> "PgServer":
        self.init()
        self.port_file.write_text(str(self.port))
        if not self.running():
            if not self.logfile.exists():
                self.logfile.touch()
            self._chown(self.logfile)
            r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w",
                          "-t", str(int(timeout)), "-o", f"-p {self.port}", "start", check=False)
            if r.returncode:
                raise RuntimeError(f"pg_ctl start failed: {r.stdout}\n{self.tail()}")
        self._wait_ready(timeout)
        r = self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d",
                      "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname='{DB}'",
                      check=False)
        if r.stdout.strip() != "1":
            self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, DB)
        return self

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._run("pg_isready", "-h", "127.0.0.1", "-p", str(self.port),
                         check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"PostgreSQL on port {self.port} not ready after {timeout}s\n"
                           f"{self.tail()}")

    def running(self) -> bool:
        return self.pid() is not None

    def pid(self) -> int | None:
        f = self.data / "postmaster.pid"
        try:
            pid = int(f.read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, mode: str = "fast") -> None:
        if self.running():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends exit when they notice)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text().splitlines()[-n:])
        except OSError:
            return ""


if __name__ == "__main__":  # python -m deploy.pgserver DIR {start,stop,dsn,install}
    import sys

    if sys.argv[1:2] == ["install"]:
        print(install())
        sys.exit(0)
    root, cmd = sys.argv[1], sys.argv[2]
    if cmd == "install":
        print(install())
    elif cmd == "start":
        install()
        print(PgServer(root).start().dsn)
    elif cmd == "stop":
        PgServer(root).stop()
    elif cmd == "dsn":
        print(PgServer(root).dsn)
