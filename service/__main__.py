"""python -m service {serve,train} --help"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.config import ServerConfig, read_secret_file


def _serve(args) -> int:
    from service.dataplane import build_dataplane
    from common.memory import freeze_startup_heap, limit_heap_arenas
    from service.server import Server

    overrides = {k: v for k, v in vars(args).items()
                 if k in ServerConfig.model_fields and v is not None}
    if args.secret_file is not None:
        overrides["secret"] = read_secret_file(args.secret_file)
    cfg = ServerConfig(**overrides)
    log = logging.getLogger("modelguard")
    problems = cfg.startup_problems()
    if problems:   # before loading anything: the server would refuse to start
        for p in problems:
            log.error("refusing to start: %s", p)
        return 2
    if args.dp is not None:  # serve the DP-SGD target for that budget (docs/dp.md)
        from service.defences.pool import dp_path

        if args.target is not None:
            log.error("--dp and --target both name the model to serve; give one")
            return 2
        cfg = cfg.model_copy(update={"target": dp_path(cfg.artifacts, args.dp)})
        if not cfg.target.exists():
            log.error("no DP target at %s; train it with `python -m service train --dp-epsilon "
                      "%g` (or `make dp`)", cfg.target, args.dp)
            return 2
    log.info("config: %s", cfg.model_dump_json(exclude={"secret"}))
    if not cfg.target.exists():
        log.error("no target checkpoint at %s; run `make train` (or python -m service train)",
                  cfg.target)
        return 2
    limit_heap_arenas()      # before the model, the monitor and the gRPC workers allocate
    server = Server(cfg, build_dataplane(cfg))
    log.info("froze %d start-up objects out of Python's full garbage collections",
             freeze_startup_heap())      # before the first call: the collection takes ~0.1 s
    server.start()
    log.info("serving modelguard.v1.Inference and inference.GRPCInferenceService (Open "
             "Inference Protocol v2) on %s over %s, %s (max batch %d, %d workers, compute slots: "
             "%s, small requests: %s, %d torch threads%s); Ctrl-C to stop", server.address,
             ("mutual TLS" if cfg.tls_client_ca else "TLS") if server.tls else "PLAINTEXT",
             f"keys from {cfg.api_keys}" if cfg.api_keys else "open keys (any key; ids are "
             "keyed hashes)", cfg.max_batch, cfg.workers, cfg.compute_slots or "no limit",
             f"<= {cfg.small_request_items} images one at a time" if cfg.small_request_items
             else "no slot of their own", cfg.torch_threads,
             ", grpc.aio event loop" if cfg.aio else "")
    server.wait()
    return 0


def _train(args) -> int:
    from service.train import DEFAULTS, DP_DEFAULTS, train_dp_target, train_target

    dp = args.dp_epsilon is not None or args.dp_noise is not None
    if args.dp_epsilon is not None and args.dp_noise is not None:
        print("error: give --dp-epsilon or --dp-noise, not both", file=sys.stderr)
        return 2
    if args.out is not None:
        out = Path(args.out)
    elif args.dp_epsilon is not None:
        from service.defences.pool import dp_path

        out = dp_path(ServerConfig().artifacts, args.dp_epsilon)
    elif dp:
        print("error: --dp-noise needs --out", file=sys.stderr)
        return 2
    else:
        out = ServerConfig().target
    if out.exists() and not args.force:
        print(f"{out} exists; use --force to retrain")
        return 0
    d = DP_DEFAULTS if dp else DEFAULTS
    kw = dict(epochs=args.epochs or d["epochs"], batch_size=args.batch_size or d["batch_size"],
              lr=args.lr or d["lr"], seed=args.seed, root=args.data, limit=args.limit,
              threads=args.threads)
    if dp:
        meta = train_dp_target(out, epsilon=args.dp_epsilon, noise_multiplier=args.dp_noise,
                               delta=args.dp_delta, max_grad_norm=args.dp_clip, **kw)
    else:
        meta = train_target(out, **kw)
    print(json.dumps(meta, indent=2))
    print(f"saved {out}: test accuracy {100 * meta['test_accuracy']:.2f}%"
          + ("" if not dp else ", no privacy (no noise)" if meta["dp"]["epsilon"] is None
             else f", epsilon {meta['dp']['epsilon']:.3f} at delta {meta['dp']['delta']:g}"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the target over gRPC")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--workers", type=int)
    s.add_argument("--aio", action="store_true", default=None,
                   help="serve on grpc.aio's event loop: a call's short parts run on the loop, "
                        "only those that may wait (a log commit, a monitor in another process) "
                        "or run long (requests above --small-request-items) on --workers "
                        "threads (README, section 6)")
    s.add_argument("--compute-slots", dest="compute_slots", type=int, metavar="N",
                   help="Predict calls of more than --small-request-items images computing "
                        "at once (default 0: no limit; README, section 6)")
    s.add_argument("--small-request-items", dest="small_request_items", type=int, metavar="N",
                   help="Predict calls of at most N images compute one at a time, in a slot of "
                        "their own; larger ones follow --compute-slots (default 16; 0: no such "
                        "slot)")
    s.add_argument("--torch-threads", dest="torch_threads", type=int)
    s.add_argument("--max-batch", dest="max_batch", type=int)
    s.add_argument("--target", type=Path, help="target checkpoint")
    s.add_argument("--artifacts", type=Path)
    s.add_argument("--monitor-config", dest="monitor_config", type=Path,
                   help="monitor TOML (default: monitor/default.toml)")
    s.add_argument("--monitor-db", dest="monitor_db", type=Path)
    s.add_argument("--store", metavar="DSN", help="postgresql://...: the monitor's state in "
                   "PostgreSQL, shared by replicas (docs/scaleout.md; default: the SQLite file)")
    s.add_argument("--replica", help="this replica's name in the shared store (with --store)")
    s.add_argument("--monitor-address", dest="monitor_address", metavar="HOST:PORT",
                   help="connect to a monitor started with `python -m monitor serve` (on this "
                        "machine or another; same secret) instead of running one: sets "
                        "[execution] mode = \"process\" and address (docs/monitor.md)")
    s.add_argument("--monitor-tls-ca", dest="monitor_tls_ca", type=Path, metavar="PEM",
                   help="the CA that signed the certificate of the monitor at "
                        "--monitor-address (monitor serve --tls-cert): the link is TLS")
    k = s.add_argument_group("keys and secret (docs/security.md)")
    k.add_argument("--api-keys", dest="api_keys", type=Path,
                   help="TOML of name = \"key\" lines: only these keys pass, the client id is "
                        "the name")
    k.add_argument("--open-keys", dest="open_keys", action="store_true", default=None,
                   help="open mode: any well-formed key is a client, its id a keyed hash of the "
                        "key (one of --api-keys / --open-keys is required)")
    k.add_argument("--secret-file", dest="secret_file", type=Path, metavar="PATH",
                   help="read the server's secret (>= 32 bytes) from PATH (default: "
                        "$MODELGUARD_SECRET, else the file $MODELGUARD_SECRET_FILE)")
    k.add_argument("--dev-secret", dest="dev_secret", action="store_true", default=None,
                   help="development only: start without a secret (the public built-in one) or "
                        "with a short one")
    tl = s.add_argument_group("TLS (docs/security.md)")
    tl.add_argument("--tls-cert", dest="tls_cert", type=Path, metavar="PEM",
                   help="certificate chain: serve TLS only (with --tls-key)")
    tl.add_argument("--tls-key", dest="tls_key", type=Path, metavar="PEM",
                   help="the certificate's private key")
    tl.add_argument("--tls-client-ca", dest="tls_client_ca", type=Path, metavar="PEM",
                   help="mutual TLS: require a client certificate signed by this CA")
    s.add_argument("--metrics-port", dest="metrics_port", type=int, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; "
                        "docs/ecosystem.md)")
    s.add_argument("--undefended", action="store_true", default=None,
                   help="answer with the plain target at every level (baseline); the monitor "
                        "still watches and logs")
    s.add_argument("--no-monitor", dest="monitor", action="store_false", default=None,
                   help="run without the monitor (no detectors, no query log, every client "
                        "stays NORMAL; policies and watermark still come from the monitor "
                        "config): to measure the server alone")
    s.add_argument("--dp", type=float, metavar="EPS",
                   help="serve the DP-SGD target trained for privacy budget EPS "
                        "(ARTIFACTS/dp/epsEPS.pt; python -m service train --dp-epsilon EPS)")
    s.set_defaults(fn=_serve)
    t = sub.add_parser("train", help="train the default target model, or a DP-SGD one")
    t.add_argument("--out", help="checkpoint (default: the server's target; with --dp-epsilon "
                                 "E: ARTIFACTS/dp/epsE.pt)")
    t.add_argument("--epochs", type=int, help="default 20; DP-SGD: 40")
    t.add_argument("--batch-size", type=int, help="default 64; DP-SGD: 2048 (expected)")
    t.add_argument("--lr", type=float, help="default 1e-3 (Adam); DP-SGD: 0.4 (SGD, momentum "
                                            "0.9)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--data", help="data directory (default: $MODELGUARD_DATA or ./data)")
    t.add_argument("--limit", type=int, help="train on the first N images only")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    t.add_argument("--force", action="store_true")
    g = t.add_argument_group("differential privacy (DP-SGD; needs opacus: docs/dp.md)")
    g.add_argument("--dp-epsilon", type=float, metavar="EPS",
                   help="train with DP-SGD for this privacy budget at --dp-delta")
    g.add_argument("--dp-noise", type=float, metavar="SIGMA",
                   help="DP-SGD with this noise multiplier instead (the epsilon is reported; "
                        "0: clipping only, no privacy, a control)")
    g.add_argument("--dp-delta", type=float, default=1e-5, help="default 1e-5")
    g.add_argument("--dp-clip", type=float, default=1.0,
                   help="per-example gradient clip norm (default 1.0)")
    t.set_defaults(fn=_train)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except Exception as exc:  # a clear message, not a traceback, for expected failures
        from common.data import DataUnavailable
        if isinstance(exc, (DataUnavailable, FileNotFoundError, ValueError, OSError)) or (
                isinstance(exc, ImportError) and "opacus" in str(exc)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
