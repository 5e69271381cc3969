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

    from service.defences.pool_train import train_pool

    torch.set_num_threads(args.threads)
    train_pool(args.artifacts, force=args.force, train_size=args.train_size,
               cnn_epochs=args.cnn_epochs, trees=args.trees, misinfo_epochs=args.misinfo_epochs,
               only=args.only, progress=not args.no_progress, data_root=args.data)
    return 0


class Records:
    """Watermark records: images float32 (M, 28, 28), labels sent (M,), the key each was sent
    to, and when known the key's query number and the target's top probability."""

    def __init__(self, images, labels, cids, qns=None, conf=None, config=None):
        import numpy as np

        self.images = np.asarray(images, dtype=np.float32).reshape(-1, 28, 28)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.cids = [str(c) for c in cids]
        self.qns = None if qns is None else np.asarray(qns, dtype=np.int64).reshape(-1)
        self.conf = None if conf is None else np.asarray(conf, dtype=np.float64).reshape(-1)
        self.config = config          # the monitor config the log was written under, if any
        n = len(self.labels)
        for name, v in (("images", self.images), ("client ids", self.cids), ("qns", self.qns),
                        ("confidences", self.conf)):
            if v is not None and len(v) != n:
                raise SystemExit(f"records: {len(v)} {name} for {n} labels")
        if n and (self.labels.min() < 0 or self.labels.max() > 9):
            raise SystemExit("records: labels must be classes 0..9")

    def only(self, client: str) -> "Records":
        import numpy as np

        keep = np.array([c == client for c in self.cids], dtype=bool)
        return Records(self.images[keep], self.labels[keep], [c for c in self.cids if c == client],
                       None if self.qns is None else self.qns[keep],
                       None if self.conf is None else self.conf[keep], self.config)


def _npz_records(path: Path) -> Records:
    import numpy as np

    if not path.exists():
        raise SystemExit(f"no records file at {path}")
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file: say which and why
        raise SystemExit(f"cannot read records {path}: {exc}") from None
    missing = [k for k in ("images", "labels") if k not in z]
    if missing:
        raise SystemExit(f"records {path} lack {', '.join(missing)} (an .npz with images "
                         "(M, 28, 28), labels (M,)[, client_ids, qns, confidences])")
    images, labels = z["images"], z["labels"]
    if images.ndim not in (2, 3) or images.size != len(images) * 784:
        raise SystemExit(f"records {path}: images must be (M, 28, 28) or (M, 784), got "
                         f"{images.shape}")
    cids = [str(c) for c in z["client_ids"]] if "client_ids" in z else [""] * len(labels)
    return Records(images, labels, cids, z["qns"] if "qns" in z else None,
                   z["confidences"] if "confidences" in z else None)


def db_records(db: Path) -> Records:
    """Every watermarked item in the monitor's log, with its key, query number and the target's
    top probability (the log keeps each request's items, their query numbers qn0+1..qn0+n and
    the target's probabilities)."""
    import numpy as np

    if not Path(db).exists():
        raise SystemExit(f"no monitor database at {db}")
    try:
        from monitor.log import Decoded, QueryLog
    except ImportError as exc:
        raise SystemExit(f"cannot read the monitor's log ({exc}); pass --records FILE.npz") from exc
    log = QueryLog(db)
    try:
        xs, ls, cs, qs, ps = [], [], [], [], []
        for r in log.con.execute("SELECT * FROM requests WHERE n_wm > 0 ORDER BY seq"):
            d = Decoded(r, raw=True)
            w = d.watermarked
            if not d.kept[w].all():
                raise SystemExit("a watermarked item has no stored input in the log")
            xs.append(d.x_exact[w])
            ls.append(d.sent_labels[w])
            cs += [d.client] * int(w.sum())
            qs.append(d.qn0 + 1 + np.flatnonzero(w))
            ps.append(d.probs[w].max(1))
        config = _logged_config(log)
    finally:
        log.close()
    if not xs:
        return Records(np.zeros((0, 28, 28)), np.zeros(0), [], np.zeros(0), np.zeros(0), config)
    return Records(np.concatenate(xs), np.concatenate(ls), cs, np.concatenate(qs),
                   np.concatenate(ps), config)


def db_signature_records(db: Path, knee: int, max_per_key: int = 20000):
    """(images float32 (M, 28, 28), target probabilities (M, 10), client ids) of every logged item
    after each key's ``knee`` that was answered with probabilities and whose input the log kept:
    what the soft-label signature test reads (at most ``max_per_key`` items per key, the first
    ones)."""
    import numpy as np

    from monitor.log import Decoded, QueryLog

    log = QueryLog(db)
    xs, ps, cs = [], [], []
    count: dict[str, int] = {}
    try:
        for r in log.con.execute("SELECT * FROM requests WHERE qn0 + n > ? AND sent_top IS NOT "
                                 "NULL ORDER BY seq", (knee,)):
            have = count.get(r["client"], 0)
            if have >= max_per_key:
                continue
            d = Decoded(r, raw=True)
            keep = d.kept & (d.qn0 + 1 + np.arange(d.n) > knee)
            rows = np.flatnonzero(keep)[:max_per_key - have]
            if not len(rows):
                continue
            xs.append(d.x_exact[rows])
            ps.append(d.probs[rows])
            cs += [d.client] * len(rows)
            count[d.client] = have + len(rows)
    finally:
        log.close()
    if not xs:
        return np.zeros((0, 28, 28), np.float32), np.zeros((0, 10), np.float32), []
    return (np.concatenate(xs).reshape(-1, 28, 28).astype(np.float32), np.concatenate(ps), cs)


def _logged_config(log):
    """The monitor config the log was written under (meta 'config'), or None."""
    try:
        from monitor.config import MonitorConfig

        r = log.con.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        return MonitorConfig.model_validate_json(r[0]) if r else None
    except Exception:  # noqa: BLE001 - an unreadable config: no groups / re-check from it
        return None


def linked_groups(db: Path, config) -> dict[str, list[str]]:
    """The cross-client linking groups as the live monitor built them (monitor.linking's own
    union-find, replayed over the log's pairs table in log order)."""
    from monitor.config import load_config
    from monitor.linking import groups_from_log
    from monitor.log import QueryLog

    cfg = config if config is not None else load_config(None)
    with QueryLog(db) as q:
        gs = groups_from_log(q, cfg.linking)
    return {g.id: sorted(g.members) for g in gs.all()}


def parse_pools(values) -> list[list[str]]:
    pools = []
    for v in values or []:
        keys = [k.strip() for k in v.split(",")]
        if any(not k for k in keys):
            raise SystemExit(f"--pool {v!r}: an empty key name (expected KEY,KEY[,KEY...])")
        if len(set(keys)) < 2:
            raise SystemExit(f"--pool {v!r}: name at least two different keys to pool")
        pools.append(list(dict.fromkeys(keys)))
    return pools


def cmd_verify(args) -> int:
    import torch

    from common import training
    from service.defences.watermark import Watermark, attribute, verify

    if not 0.0 < args.alpha < 1.0:
        raise SystemExit(f"--alpha must be in (0, 1), got {args.alpha}")
    pools = parse_pools(args.pool)
    torch.set_num_threads(args.threads)
    if not Path(args.suspect).exists():
        raise SystemExit(f"no suspect checkpoint at {args.suspect}")
    try:
        model, meta = training.load_checkpoint(args.suspect)
    except Exception as exc:  # noqa: BLE001 - not a checkpoint of ours: say so
        raise SystemExit(f"cannot load the suspect {args.suspect}: {exc}") from None
    rec = _npz_records(args.records) if args.records else db_records(args.db)
    if args.client is not None:
        rec = rec.only(args.client)     # (a client may hold signature records and no marks)
    predict = lambda x: training.predict_proba(model, x)  # noqa: E731
    key = None if args.no_key else os.environ.get(args.key_env, "").encode() or None
    if key is None and not args.no_key:
        from service.config import DEFAULT_SECRET  # the server's default secret
        key = DEFAULT_SECRET.encode()
        print(f"${args.key_env} not set: using the server's default secret for the keyed test")
    wm = None
    if key is not None and args.rate is not None:
        try:
            wm = Watermark(key, args.rate, knee=args.knee, light_rate=args.light_rate,
                           min_confidence=args.min_confidence,
                           max_confidence=args.max_confidence)
        except ValueError as exc:
            raise SystemExit(f"verify: {exc}") from None
    elif key is not None and args.recheck:
        spec = dict((rec.config.watermark if rec.config is not None else None) or {})
        if not spec.get("enabled"):
            raise SystemExit("--recheck: the log holds no enabled [watermark] config; give the "
                             "schedule with --rate [--knee --light-rate --min-confidence "
                             "--max-confidence]")
        try:
            wm = Watermark.from_spec(spec, key)
        except ValueError as exc:
            raise SystemExit(f"verify: the logged [watermark] config: {exc}") from None
    groups = {}
    if args.db and not args.no_groups and args.client is None:
        groups = linked_groups(args.db, rec.config)
    sig = sig_records = None
    logged = dict((rec.config.watermark if rec.config is not None else None) or {})
    want = args.signature == "on" or (args.signature == "auto" and args.db is not None
                                      and float(logged.get("signature") or 0) > 0)
    if want:
        if args.db is None or key is None:
            raise SystemExit("--signature on: needs --db (the keys' logged inputs and the "
                             "target's probabilities) and the key")
        from service.defences.signature import Signature

        knee = (args.signature_knee if args.signature_knee is not None else
                int(logged["signature_knee"]) if logged.get("signature_knee") is not None
                else int(logged.get("knee") or 0))
        # the test needs the key's tables only: the strength never enters it (any valid one)
        sig = Signature(key, float(logged.get("signature") or 0.1), knee=knee)
        sx, sp, sc = db_signature_records(args.db, knee)
        if args.client is not None:
            keep = [i for i, c in enumerate(sc) if c == args.client]
            sx, sp, sc = sx[keep], sp[keep], [sc[i] for i in keep]
        sig_records = (sx, sp, sc)
    if args.client is not None and not len(rec.labels) and not (sig_records and sig_records[2]):
        raise SystemExit(f"no watermark records for client {args.client!r}")
    try:
        att = attribute(rec.images, rec.labels, rec.cids, predict=predict, key=key,
                        alpha=args.alpha, pools=pools, groups=groups,
                        correction=args.correction, watermark=wm, qns=rec.qns,
                        confidences=rec.conf, tta=args.tta, signature=sig,
                        signature_records=sig_records)
    except ValueError as exc:
        raise SystemExit(f"verify: {exc}") from None
    allres = verify(images=rec.images, labels_sent=rec.labels, predict=predict,
                    alpha=args.alpha, key=key, client_ids=rec.cids, watermark=wm, qns=rec.qns,
                    confidences=rec.conf)
    nkeys = len(set(rec.cids))
    print(f"suspect {args.suspect} ({meta.get('arch')}): {att.records} watermark records of "
          f"{nkeys} key(s)" + (f" (client {args.client})" if args.client else "")
          + (f", {att.duplicates_dropped} repeats counted once" if att.duplicates_dropped else "")
          + (f", {len(groups)} linked group(s)" if groups else ""))
    test = {"keyed+rank": "keyed test (departures and the rank sum of the wrong label, the "
                          "smaller p x 2)", "keyed": "keyed test (departures)",
            "unconditional": "unconditional test (no key)",
            "keyed+rank+signature": "keyed test (departures, the rank sum of the wrong label "
                                    "and the soft-label signature's rank sum, the smallest p x "
                                    "3)"}.get(att.test, att.test)
    if att.tta != "none":
        test += f", suspect averaged over test-time augmentation {att.tta!r}"
    print(f"{test}; "
          f"{'Holm step-down' if att.correction == 'holm' else 'Bonferroni'} correction over "
          f"{att.tests} test(s) that can reach alpha {args.alpha:g} "
          f"({att.untestable} with too few records to ever reach it are not counted)")
    for note in att.notes:
        print("  note: " + note)
    print(att.table(limit=args.top))
    hit = att.attributed()
    named = [r for r in hit if r.kind != "all"]
    if named:
        print("ATTRIBUTED (corrected p < alpha): " + "; ".join(
            f"{r.name} [{', '.join(r.members)}]" if r.kind in ("group", "pool")
            else r.name for r in named))
    else:
        print("no key, group or pool attributed at this alpha after correction")
    if any(r.kind == "all" for r in hit):
        print("OWNERSHIP SHOWN over all keys' records pooled (evidence that the suspect copies "
              "this service; it names no key)")
    print("all records, one set, departures only (the summary before attribution): "
          + allres.summary())
    if args.json:
        out = {"suspect": str(args.suspect), "client": args.client, "all": allres.as_dict(),
               "attribution": att.as_dict(),
               "per_client": {r.name: r.as_dict() for r in att.rows if r.kind == "key"}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    shown = bool(hit)
    return 0 if shown else 2 if args.exit_code else 0


def build_parser() -> argparse.ArgumentParser:
    from service.defences.watermark import DEFAULT_TTA, TTA_SETS

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
    src.add_argument("--records", type=Path,
                     help=".npz with images, labels[, client_ids, qns, confidences]")
    vp.add_argument("--client", default=None, help="only this client's records")
    vp.add_argument("--pool", action="append", default=[], metavar="KEY,KEY[,...]",
                    help="also test these keys' records together (repeatable); each pool is "
                         "one more test in the corrected family")
    vp.add_argument("--no-groups", action="store_true",
                    help="do not test the monitor's linked groups (with --db)")
    vp.add_argument("--correction", choices=["holm", "bonferroni"], default="holm",
                    help="family-wise correction over every key, group and pool tested (holm)")
    vp.add_argument("--top", type=int, default=None, help="show only the first N rows")
    vp.add_argument("--recheck", action="store_true",
                    help="re-check every record's mark under the watermark schedule the log "
                         "was written with (its logged config; with --db)")
    vp.add_argument("--alpha", type=float, default=1e-6, help="significance level (1e-6)")
    vp.add_argument("--key-env", default="MODELGUARD_SECRET",
                    help="environment variable holding the server secret (keyed test)")
    vp.add_argument("--no-key", action="store_true", help="only the unconditional test")
    vp.add_argument("--rate", type=float, default=None,
                    help="the watermark rate the server used: re-check each record's selection")
    vp.add_argument("--knee", type=int, default=0, help="with --rate: the schedule's knee")
    vp.add_argument("--light-rate", type=float, default=0.0,
                    help="with --rate: the rate up to the knee")
    vp.add_argument("--min-confidence", type=float, default=0.0,
                    help="with --rate: the schedule's min_confidence")
    vp.add_argument("--max-confidence", type=float, default=1.0,
                    help="with --rate: the schedule's max_confidence (1: no upper bound)")
    vp.add_argument("--tta", choices=list(TTA_SETS), default=DEFAULT_TTA,
                    help="test-time augmentation: average the suspect's probabilities over "
                         "these transforms of each record image before ranking (none; "
                         "shift1 = every shift by -1..1 px, shift2 = -2..2 px, -flip = also "
                         "mirrored). Choose it before looking at the suspect: the p-values are "
                         "exact for one pre-declared choice, not for the best of several")
    vp.add_argument("--signature", choices=["auto", "on", "off"], default="auto",
                    help="also test the soft-label signature on the keys' logged inputs (with "
                         "--db; auto: when the log's [watermark] config has signature > 0)")
    vp.add_argument("--signature-knee", type=int, default=None,
                    help="the signature's knee (default: the logged [watermark] signature_knee, "
                         "else its knee)")
    vp.add_argument("--json", type=Path, default=None, help="also write the result here")
    vp.add_argument("--exit-code", action="store_true",
                    help="exit 2 when nothing is attributed")
    vp.add_argument("--threads", type=int, default=1)
    vp.set_defaults(func=cmd_verify)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
