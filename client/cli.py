"""python -m client ATTACK --help: run a stealing attack against the service and evaluate it.

Every attack in client.attacks.ATTACKS is a subcommand. The result is printed as a table and
optionally written as JSON (--json); the surrogate is saved (--save-surrogate).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common import data, training

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="server host:port")
    g.add_argument("--api-key", default="attacker", help="API key (the client's identity)")
    g.add_argument("--tls-ca", type=Path, metavar="PEM",
                   help="connect over TLS, trusting this CA (the server's --tls-cert signer)")
    g.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="mutual TLS: this client's certificate (with --tls-key)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="mutual TLS: its private key")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="the name in the server's certificate, when the address's host differs")
    g.add_argument("--sybil", type=int, default=1, metavar="K",
                   help="split the budget over K API keys (KEY-0 .. KEY-K-1)")
    g.add_argument("--ask-labels", dest="ask_labels", action="store_true",
                   help="request label-only answers from the service")
    g.add_argument("--local", action="store_true",
                   help="query the target checkpoint in process instead of the server")
    a = p.add_argument_group("attack")
    a.add_argument("--budget", type=int, default=5000, help="maximum number of queries")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--surrogate", default="cnn", help="surrogate architecture (mlp, deep_mlp, cnn)")
    a.add_argument("--epochs", type=int, default=30, help="surrogate training epochs")
    a.add_argument("--train-batch", type=int, default=64)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--query-batch", type=int, default=256, help="images per Predict call")
    a.add_argument("--threads", type=int, default=1, help="torch threads for the surrogate")
    o = p.add_argument_group("evaluation and output")
    o.add_argument("--target-checkpoint", type=Path, default=Path("artifacts/target.pt"),
                   help="the target, loaded locally for evaluation only")
    o.add_argument("--data", help="data directory (default: $MODELGUARD_DATA or ./data)")
    o.add_argument("--json", type=Path, help="write the result as JSON here")
    o.add_argument("--save-surrogate", type=Path, help="save the stolen model here")
    o.add_argument("--no-progress", action="store_true")


def _oracles(args, budget):
    from client.oracle import LocalOracle

    if args.local:
        target, _ = training.load_checkpoint(args.target_checkpoint)
        return [LocalOracle(lambda x: training.predict_proba(target, x), budget,
                            labels_only=args.ask_labels)]
    from client.api import RemoteOracle

    keys = [args.api_key] if args.sybil <= 1 else [f"{args.api_key}-{i}"
                                                  for i in range(args.sybil)]
    tls = dict(tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
               tls_server_name=args.tls_server_name)
    return [RemoteOracle(args.address, k, None, labels_only=args.ask_labels,
                         batch_size=args.query_batch, **tls) for k in keys]


def run_attack(name: str, args) -> dict:
    from client.attacks import ATTACKS
    from client.evaluate import evaluate, load_target

    cls = ATTACKS[name]
    oracles = _oracles(args, args.budget)
    if len(oracles) == 1:
        oracle = oracles[0]
        oracle.budget = args.budget
    else:
        from client.attacks.adaptive import SybilOracle
        oracle = SybilOracle(oracles, budget=args.budget)
    kwargs = dict(seed=args.seed, surrogate=args.surrogate, batch_size=args.query_batch,
                  progress=not args.no_progress,
                  train_config=training.TrainConfig(epochs=args.epochs,
                                                    batch_size=args.train_batch, lr=args.lr,
                                                    seed=args.seed))
    for need in getattr(cls, "needs", ()):
        kwargs[need] = {"pool": data.attack_pool, "ood": data.ood_pool}[need](args.data)
    for pname in getattr(cls, "params", {}):
        kwargs[pname] = getattr(args, "p_" + pname)
    attack = cls(oracle, args.budget, **kwargs)
    result = attack.run()
    metrics = evaluate(result.surrogate, load_target(args.target_checkpoint),
                       data.eval_set(args.data))
    out = {
        "attack": name, "via": "local" if args.local else f"grpc://{args.address}",
        "api_keys": 1 if args.local else len(oracles), "budget": args.budget,
        "queries_used": result.queries_used, "answer_kinds": result.answer_kinds,
        "surrogate": result.surrogate_arch, "seed": args.seed, "epochs": args.epochs,
        "wall_time_s": round(result.wall_time_s, 1), **metrics, "extra": result.extra,
    }
    if args.save_surrogate:
        out["surrogate_path"] = str(result.save_surrogate(args.save_surrogate))
    return out


def main(argv=None) -> int:
    from client.attacks import ATTACKS
    from client.evaluate import format_table

    p = argparse.ArgumentParser(prog="python -m client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="attack", required=True, metavar="ATTACK")
    for name, cls in ATTACKS.items():
        sp = sub.add_parser(name, help=(cls.__doc__ or name).strip().splitlines()[0])
        _add_common(sp)
        if getattr(cls, "params", None):
            g = sp.add_argument_group(f"{name} parameters")
            for pname, (ptype, default, helptext) in cls.params.items():
                flag = "--" + pname.replace("_", "-")
                if ptype is bool:
                    g.add_argument(flag, dest="p_" + pname, action="store_true", default=default,
                                   help=helptext)
                else:
                    g.add_argument(flag, dest="p_" + pname, type=ptype, default=default,
                                   metavar=pname.upper(), help=f"{helptext} (default: {default})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    try:
        out = run_attack(args.attack, args)
    except Exception as exc:
        from client.api import ApiError
        from client.oracle import BudgetExceeded
        from common.data import DataUnavailable
        if isinstance(exc, (ApiError, BudgetExceeded, DataUnavailable, FileNotFoundError,
                            ValueError)):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    cols = ["attack", "queries_used", "target_accuracy", "stolen_accuracy", "fidelity",
            "wall_time_s"]
    print(format_table([out], cols))
    print("answer kinds:", out["answer_kinds"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0
