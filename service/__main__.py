"""python -m service {serve,train} --help"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.config import DEFAULT_SECRET, ServerConfig


def _serve(args) -> int:
    from service.dataplane import build_dataplane
    from service.server import Server

    overrides = {k: v for k, v in vars(args).items()
                 if k in ServerConfig.model_fields and v is not None}
    cfg = ServerConfig(**overrides)
    log = logging.getLogger("modelguard")
    log.info("config: %s", cfg.model_dump_json(exclude={"secret"}))
    if cfg.secret == DEFAULT_SECRET:
        log.warning("using the built-in development secret; set MODELGUARD_SECRET in production")
    if not cfg.target.exists():
        log.error("no target checkpoint at %s; run `make train` (or python -m service train)",
                  cfg.target)
        return 2
    server = Server(cfg, build_dataplane(cfg)).start()
    log.info("serving on %s (max batch %d, %d workers, %d torch threads); Ctrl-C to stop",
             server.address, cfg.max_batch, cfg.workers, cfg.torch_threads)
    server.wait()
    return 0


def _train(args) -> int:
    from service.train import train_target

    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists; use --force to retrain")
        return 0
    meta = train_target(out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        seed=args.seed, root=args.data, limit=args.limit,
                        threads=args.threads)
    print(json.dumps(meta, indent=2))
    print(f"saved {out}: test accuracy {100 * meta['test_accuracy']:.2f}%")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the target over gRPC")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--torch-threads", dest="torch_threads", type=int)
    s.add_argument("--max-batch", dest="max_batch", type=int)
    s.add_argument("--target", type=Path, help="target checkpoint")
    s.add_argument("--artifacts", type=Path)
    s.add_argument("--monitor-config", dest="monitor_config", type=Path,
                   help="monitor TOML (default: monitor/default.toml)")
    s.add_argument("--monitor-db", dest="monitor_db", type=Path)
    s.add_argument("--api-keys", dest="api_keys", type=Path,
                   help="TOML of name = \"key\"; default: any key is accepted")
    s.add_argument("--undefended", action="store_true", default=None,
                   help="answer with the plain target at every level (baseline); the monitor "
                        "still watches and logs")
    s.add_argument("--no-monitor", dest="monitor", action="store_false", default=None,
                   help="run without the monitor (no detectors, no query log, every client "
                        "stays NORMAL; policies and watermark still come from the monitor "
                        "config): to measure the server alone")
    s.set_defaults(fn=_serve)
    t = sub.add_parser("train", help="train the default target model")
    t.add_argument("--out", default=str(ServerConfig().target))
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", help="data directory (default: $MODELGUARD_DATA or ./data)")
    t.add_argument("--limit", type=int, help="train on the first N images only")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.add_argument("--force", action="store_true")
    t.set_defaults(fn=_train)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as exc:  # a clear message, not a traceback, for expected failures
        from common.data import DataUnavailable
        if isinstance(exc, (DataUnavailable, FileNotFoundError, ValueError, OSError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
