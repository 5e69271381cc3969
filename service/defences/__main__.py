"""python -m service.defences {train-pool, verify}

(The policy table and the watermark demo, which run the attacks: python -m lab.defences.)"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _artifacts_default() -> Path:
    return Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts"))


def cmd_train_pool(args) -> int:
    import torch

    from service.defences.pool import train_pool

    torch.set_num_threads(args.threads)
    train_pool(args.artifacts, force=args.force, train_size=args.train_size,
               cnn_epochs=args.cnn_epochs, trees=args.trees, misinfo_epochs=args.misinfo_epochs,
               only=args.only, progress=not args.no_progress, data_root=args.data)
    return 0


def load_records(args):
    """(images, labels_sent, client_ids) from an .npz (keys images, labels, client_ids) or from
    the monitor's database via monitor.QueryLog(db).watermark_records(client_id)."""
    import numpy as np

    if args.records:
        z = np.load(args.records, allow_pickle=False)
        images, labels = z["images"], z["labels"]
        cids = [str(c) for c in z["client_ids"]] if "client_ids" in z else [""] * len(labels)
        if args.client is not None:
            keep = np.array([c == args.client for c in cids], dtype=bool)
            images, labels, cids = images[keep], labels[keep], [c for c in cids if c == args.client]
        return images, labels, cids
    if not Path(args.db).exists():
        raise SystemExit(f"no monitor database at {args.db}")
    try:
        from monitor import QueryLog
    except ImportError as exc:
        raise SystemExit(f"cannot read the monitor's log ({exc}); pass --records FILE.npz") from exc
    log = QueryLog(args.db)
    return log.watermark_records(client_id=args.client)


def cmd_verify(args) -> int:
    import numpy as np
    import torch

    from common import training
    from service.defences.watermark import verify

    torch.set_num_threads(args.threads)
    model, meta = training.load_checkpoint(args.suspect)
    images, labels, cids = load_records(args)
    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    predict = lambda x: training.predict_proba(model, x)  # noqa: E731
    results = {"suspect": str(args.suspect), "client": args.client}
    key = None if args.no_key else os.environ.get(args.key_env, "").encode() or None
    if key is None and not args.no_key:
        from service.config import DEFAULT_SECRET  # the server's default secret
        key = DEFAULT_SECRET.encode()
        print(f"${args.key_env} not set: using the server's default secret for the keyed test")
    kw = dict(alpha=args.alpha, key=key, rate=args.rate)
    res = verify(images=images, labels_sent=labels, predict=predict, **kw)
    results["all"] = res.as_dict()
    print(f"suspect {args.suspect} ({meta.get('arch')}), records: {len(labels)}"
          + (f" of client {args.client}" if args.client else ""))
    print("  " + res.summary())
    if args.client is None and len(set(cids)) > 1:
        results["per_client"] = {}
        for c in sorted(set(cids)):
            keep = np.array([x == c for x in cids], dtype=bool)
            r = verify(images=images[keep], labels_sent=labels[keep], predict=predict, **kw)
            results["per_client"][c] = r.as_dict()
            print(f"  client {c}: " + r.summary())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if res.stolen else 2 if args.exit_code else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m service.defences", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    tp = sub.add_parser("train-pool", help="train and cache the model pool in ARTIFACTS/pool/")
    tp.add_argument("--artifacts", type=Path, default=_artifacts_default())
    tp.add_argument("--data", default=None, help="data root (default: $MODELGUARD_DATA)")
    tp.add_argument("--force", action="store_true", help="retrain even when cached")
    tp.add_argument("--only", nargs="+", choices=["cnn", "trees", "misinformation"])
    tp.add_argument("--train-size", type=int, default=None, help="first N training images")
    tp.add_argument("--cnn-epochs", type=int, default=2)
    tp.add_argument("--trees", type=int, default=30, help="trees in the ensemble")
    tp.add_argument("--misinfo-epochs", type=int, default=3)
    tp.add_argument("--threads", type=int, default=1)
    tp.add_argument("--no-progress", action="store_true")
    tp.set_defaults(func=cmd_train_pool)

    vp = sub.add_parser("verify", help="test a suspect model against the watermark records")
    vp.add_argument("--suspect", type=Path, required=True, help="checkpoint (.pt) of the suspect")
    src = vp.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", type=Path, help="the monitor's database")
    src.add_argument("--records", type=Path, help=".npz with images, labels[, client_ids]")
    vp.add_argument("--client", default=None, help="only this client's records")
    vp.add_argument("--alpha", type=float, default=1e-6, help="significance level (1e-6)")
    vp.add_argument("--key-env", default="MODELGUARD_SECRET",
                    help="environment variable holding the server secret (keyed test)")
    vp.add_argument("--no-key", action="store_true", help="only the unconditional test")
    vp.add_argument("--rate", type=float, default=None,
                    help="the watermark rate the server used: re-check each record's selection")
    vp.add_argument("--json", type=Path, default=None, help="also write the result here")
    vp.add_argument("--exit-code", action="store_true", help="exit 2 when not shown stolen")
    vp.add_argument("--threads", type=int, default=1)
    vp.set_defaults(func=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
