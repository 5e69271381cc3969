"""One server replica whose monitor keeps its state in PostgreSQL (docs/scaleout.md).

    python -m deploy.replica --store postgresql://modelguard@127.0.0.1:5432/modelguard \\
        --replica r1 --port 50061 --open-keys --secret-file artifacts/cluster/secret

The server is the ordinary one (service.server.Server over service.dataplane's DataPlane); only
the monitor differs: a :class:`monitor.pgstore.SharedMonitor` on a :class:`PgStore` instead of
the Monitor on the embedded SQLite log. Every replica of a cluster must use the same secret
(client ids in open-keys mode, the answers' noise and the watermark are keyed by it) and the
same monitor config.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def build(cfg, dsn: str, replica: str, follow_seconds: float = 0.25, schema: str | None = None,
          monitor_config=None):
    """A DataPlane whose monitor is a SharedMonitor on PostgreSQL."""
    from monitor.pgstore import PgStore, SharedMonitor
    from service.dataplane import build_dataplane

    # the target, the policies and the watermark as `python -m service serve` builds them, with
    # a null monitor that is then replaced by the shared one (same config object)
    plane = build_dataplane(cfg.model_copy(update={"monitor": False}), monitor_config)
    mc = plane.monitor.config
    plane.monitor.close()
    lc = mc.log
    store = PgStore.for_log(dsn, replica, lc, schema=schema)
    plane.monitor = SharedMonitor(mc, store, warm=True, follow_seconds=follow_seconds)
    logging.getLogger("modelguard.replica").info(
        "replica %s: monitor state in PostgreSQL %s (fail %s, durability %s)", replica,
        dsn.split("@")[-1], lc.on_failure, lc.durability)
    return plane


def main(argv=None) -> int:
    from service.config import ServerConfig, read_secret_file

    p = argparse.ArgumentParser(prog="python -m deploy.replica", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", required=True, help="postgresql://USER@HOST:PORT/DB")
    p.add_argument("--replica", required=True, help="this replica's name (unique per cluster)")
    p.add_argument("--follow-seconds", type=float, default=0.25,
                   help="how often the other replicas' rows are read for linking (default 0.25)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--max-batch", dest="max_batch", type=int)
    p.add_argument("--target", type=Path)
    p.add_argument("--artifacts", type=Path)
    p.add_argument("--monitor-config", dest="monitor_config", type=Path)
    p.add_argument("--api-keys", dest="api_keys", type=Path)
    p.add_argument("--open-keys", dest="open_keys", action="store_true", default=None)
    p.add_argument("--secret-file", dest="secret_file", type=Path)
    p.add_argument("--dev-secret", dest="dev_secret", action="store_true", default=None)
    p.add_argument("--metrics-port", dest="metrics_port", type=int)
    p.add_argument("--undefended", action="store_true", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s [{args.replica}] %(name)s: %(message)s")
    over = {k: v for k, v in vars(args).items() if k in ServerConfig.model_fields and v is not None}
    if args.secret_file is not None:
        over["secret"] = read_secret_file(args.secret_file)
    cfg = ServerConfig(**over)
    problems = cfg.startup_problems() if hasattr(cfg, "startup_problems") else []
    if problems:
        for m in problems:
            logging.error("refusing to start: %s", m)
        return 2
    if not cfg.target.exists():
        logging.error("no target checkpoint at %s; run `make train`", cfg.target)
        return 2
    from service.server import Server

    server = Server(cfg, build(cfg, args.store, args.replica, args.follow_seconds)).start()
    logging.getLogger("modelguard.replica").info("replica %s serving on %s", args.replica,
                                                 server.address)
    server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
