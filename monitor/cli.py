"""``python -m monitor``: inspect the query log, plot detector scores, export, replay; run the
monitor on its own for servers that connect to it (``serve``).

The database is ``--db PATH``, else $MODELGUARD_MONITOR_DB, else artifacts/monitor.db.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common.types import Level
from monitor.config import DETECTOR_NAMES, DETECTORS

DEFAULT_DB = "artifacts/monitor.db"
SHORT = {d.column: d.short for d in DETECTORS}     # the log's score column -> the CLI's label
DETS = DETECTOR_NAMES


class CliError(Exception):
    pass


def _ts(t) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt(v, d=3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.0f}" if float(v).is_integer() and abs(v) >= 10 else f"{v:.{d}f}"


def _open(db: str):
    from monitor.log import QueryLog
    if not Path(db).exists():
        raise CliError(f"no monitor database at {db} (set --db or MODELGUARD_MONITOR_DB; the "
                       f"server writes it while answering queries)")
    return QueryLog(db)


def _need_client(q, client: str) -> None:
    if not q.has_client(client):
        known = q.client_ids()
        hint = f"; known clients: {', '.join(known[:20])}" if known else "; the log is empty"
        raise CliError(f"unknown client {client!r}{hint}")


def _live_config(q, path: str | None):
    """The config given with --config, else the one the monitor last ran with, else default."""
    from monitor.config import MonitorConfig, load_config
    if path:
        return load_config(path)
    r = q.con.execute("SELECT value FROM meta WHERE key='config'").fetchone()
    return MonitorConfig.model_validate_json(r[0]) if r else load_config(None)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w[i]) for i, c in enumerate(cells)).rstrip()  # noqa
    return "\n".join([line(headers), line(["-" * x for x in w])] + [line(r) for r in rows])


def _fired_names(mask) -> str:
    if mask is None:
        return "-"
    names = [d for i, d in enumerate(DETS) if int(mask) >> i & 1]
    return ",".join(names) or "-"


# --- commands -----------------------------------------------------------------------------------
def _groups(q, cfg):
    from monitor.linking import groups_from_log
    return groups_from_log(q, cfg.linking)


def cmd_clients(a) -> int:
    with _open(a.db) as q:
        groups = _groups(q, _live_config(q, None))
        rows = []
        for d in q.summary():
            s = d["scores"]
            g = groups.of.get(d["client"])
            rows.append([d["client"], str(d["queries"]), d["level"].name,
                         f"{g.id} ({len(g.members)} keys)" if g else "-",
                         f"{_ts(d['escalated_t'])} (q{d['escalated_qn']})" if d["escalated_t"]
                         else "-",
                         *(_fmt(s.get(k)) for k in SHORT), _fired_names(s.get("fired"))])
        if not rows:
            print("(no clients in the log)")
            return 0
        print(_table(["client", "queries", "level", "group", "escalated", *SHORT.values(),
                      "firing"], rows))
    return 0


def cmd_show(a) -> int:
    with _open(a.db) as q:
        _need_client(q, a.client)
        cfg = _live_config(q, a.config)
        d = next(x for x in q.summary() if x["client"] == a.client)
        print(f"client {a.client}: {d['queries']} queries logged "
              f"({_ts(d['first_t'])} .. {_ts(d['last_t'])}), level {d['level'].name}")
        th = {d.column: d.fires_text(getattr(cfg.detectors, d.name)) for d in DETECTORS}
        print("latest scores: " + ", ".join(f"{SHORT[k]} {_fmt(d['scores'].get(k))} (fires {th[k]})"
                                            for k in SHORT))
        _show_group(q, cfg, a.client)
        trs = q.transitions(a.client)
        if not trs:
            print("no escalation")
            return 0
        print(f"escalation timeline ({len(trs)} transitions):")
        for tr in trs:
            print(f"  {_ts(tr['t'])}  query {tr['qn']:>7d}  {tr['from_level'].name} -> "
                  f"{tr['to_level'].name}   rule: {tr['rule']}")
            for ev in tr["evidence"]:
                if ev.get("detector") == "link":
                    print(f"      link: group {ev['group']} of {ev['members']} keys, "
                          f"{ev['value']} attack-like pairs (rule needs {ev['threshold']}), "
                          f"linked since {_ts(ev['since'])}")
                    continue
                hits = (f", hit {ev['hits']} of {ev['min_hits']} needed" if "hits" in ev else "")
                print(f"      {ev['detector']}: value {_fmt(ev['value'], 4)}, threshold "
                      f"{_fmt(ev['threshold'], 4)}{hits}")
    return 0


def _show_group(q, cfg, client: str) -> None:
    """The key's cross-client evidence: its group's members and links, and its own pairs."""
    pairs = q.pairs(client)
    sent = [p for p in pairs if p["client"] == client]
    src = [p for p in pairs if p["other"] == client]
    g = _groups(q, cfg).of.get(client)
    if g is None:
        print(f"cross-client linking: not linked ({len(sent)} attack-like copies of other keys' "
              f"queries sent, {len(src)} of its queries perturbed by other keys)")
        return
    print(f"cross-client linking: group {g.id}, {len(g.members)} keys, {g.pairs} attack-like "
          f"pairs, linked since {_ts(g.since)} (last {_ts(g.last)})")
    print("  members: " + ", ".join(sorted(g.members)))
    links = sorted(g.links.items(), key=lambda kv: -kv[1][0])
    for (x, y), (n, first, last) in links[:20]:
        print(f"  {x} <-> {y}: {n} pairs, {_ts(first)} .. {_ts(last)}")
    if len(links) > 20:
        print(f"  ... {len(links) - 20} more links (python -m monitor export --what pairs)")
    if sent:
        p = min(sent, key=lambda p: p["dist"])
        print(f"  this key sent {len(sent)} perturbed copies (first at its query "
              f"{min(x['qn'] for x in sent)}); e.g. query {p['qn']} = {p['other']}'s query "
              f"{p['other_qn']} + a perturbation of L2 {p['dist']:.2f}, {p['dense']:.0%} of pixels, "
              f"peak ratio {p['peak']:.2f}")


def cmd_plot(a) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with _open(a.db) as q:
        _need_client(q, a.client)
        cfg = _live_config(q, a.config)
        s = q.series(a.client)
        trs = q.transitions(a.client)
        q_pairs = q.pairs(a.client)
    if len(s["qn"]) == 0:
        raise CliError(f"client {a.client!r} has no logged queries to plot")
    panels = []
    for d in DETECTORS:
        dcfg = getattr(cfg.detectors, d.name)
        panels.append((d.column, d.title(dcfg), d.threshold(dcfg), f"alarm {d.direction}"))
    pairs = [p["qn"] for p in q_pairs if p["client"] == a.client]
    if pairs:  # cross-client linking: cumulative perturbed copies of other keys' queries
        qn = np.asarray(s["qn"])
        s["links"] = np.searchsorted(np.sort(pairs), qn, side="right").astype(float)
        rule = min((r.pairs for r in cfg.linking.rules), default=float("nan"))
        panels.append(("links", "linking: attack-like copies of other keys' queries", rule,
                       "group rule at"))
    panels = [p for p in panels if np.isfinite(s[p[0]]).any()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.3 * len(panels) + 0.8), sharex=True,
                             squeeze=False)
    colors = {Level.NOISE: "tab:orange", Level.LABEL_ONLY: "tab:red", Level.SWITCH: "tab:purple",
              Level.BLOCK: "black", Level.NORMAL: "tab:green"}
    for ax, (col, title, thr, how) in zip(axes[:, 0], panels):
        ax.plot(s["qn"], s[col], lw=0.9, color="tab:blue")
        ax.axhline(thr, ls="--", color="gray", lw=1, label=f"threshold {thr:g} ({how})")
        ax.set_ylabel(title, fontsize=8)
        ax.legend(loc="best", fontsize=7)
        ax.grid(alpha=0.3)
        for tr in trs:
            ax.axvline(tr["qn"], color=colors[tr["to_level"]], lw=1.2)
    top = axes[0, 0]
    for tr in trs:
        top.annotate(f"{tr['to_level'].name} q{tr['qn']}", (tr["qn"], 1.0), xycoords=("data", "axes fraction"),
                     xytext=(2, 2), textcoords="offset points", fontsize=8, rotation=0,
                     color=colors[tr["to_level"]], va="bottom")
    axes[-1, 0].set_xlabel("client query count")
    fig.suptitle(f"monitor: client {a.client} ({len(s['qn'])} queries)", y=0.995)
    fig.tight_layout()
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.output, dpi=110)
    print(f"wrote {a.output}")
    return 0


def cmd_export(a) -> int:
    with _open(a.db) as q:
        if a.client:
            _need_client(q, a.client)
        if a.what == "pairs":
            rows = q.pairs(a.client)
        elif a.what == "groups":
            rows = [g.summary() for g in _groups(q, _live_config(q, None)).all()
                    if a.client is None or a.client in g.members]
        elif a.what == "transitions":
            rows = [dict(r, from_level=r["from_level"].name, to_level=r["to_level"].name)
                    for r in q.transitions(a.client)]
        else:
            rows = [dict(r, level=Level(r["level"]).name, level_after=Level(r["level_after"]).name)
                    for r in q.iter_rows(a.client)]
        out = open(a.output, "w", newline="") if a.output else sys.stdout
        try:
            if a.format == "jsonl":
                for r in rows:
                    out.write(json.dumps(r) + "\n")
            else:
                if rows:
                    w = csv.DictWriter(out, fieldnames=list(rows[0]))
                    w.writeheader()
                    for r in rows:
                        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                                    for k, v in r.items()})
        finally:
            if a.output:
                out.close()
        if a.output:
            print(f"wrote {len(rows)} {a.what} rows to {a.output}", file=sys.stderr)
    return 0


def cmd_replay(a) -> int:
    from monitor.config import load_config
    from monitor.replay import replay
    cfg = load_config(a.config)
    with _open(a.db) as q:
        clients = a.client or q.client_ids()
        for c in clients:
            _need_client(q, c)
        live = {c: q.transitions(c) for c in clients}
    res = replay(a.db, cfg, clients)
    fmt_tr = lambda lst: ", ".join(f"{x[1].name}@q{x[0]}" for x in lst) or "never escalated"  # noqa
    rows = []
    changed = 0
    for c in clients:
        lv = [(t["qn"], t["to_level"]) for t in live[c]]
        rp = [(t.qn, t.to_level) for t in res[c]["transitions"]]
        same = lv == rp
        changed += not same
        g = res[c].get("group")
        rows.append([c, str(res[c]["queries"]), fmt_tr(lv), fmt_tr(rp),
                     f"{g['group']} ({len(g['members'])} keys)" if g else "-",
                     "same" if same else "DIFF"])
    print(f"replay of {len(clients)} client(s) under {a.config}")
    print(_table(["client", "queries", "live escalations", "replayed escalations",
                  "replayed group", ""], rows))
    if a.verbose:
        for c in clients:
            for t in res[c]["transitions"]:
                ev = "; ".join(f"{e['detector']}={_fmt(e['value'], 4)} vs {_fmt(e['threshold'], 4)}"
                               for e in t.evidence)
                print(f"  {c}: q{t.qn} {t.from_level.name}->{t.to_level.name} ({t.rule}) {ev}")
    print(f"{changed} client(s) would be escalated differently")
    return 0


def cmd_migrate(a) -> int:
    from monitor.migrate import migrate
    try:
        res = migrate(a.db, a.output, progress=lambda c, n: print(f"  {c}: {n} items so far",
                                                                  file=sys.stderr))
    except (FileExistsError, ValueError) as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {a.output}: {res['requests']} requests, {res['items']} items (from {a.db})")
    return 0


def cmd_snapshot(a) -> int:
    try:
        from monitor.pgstore import snapshot
    except ImportError as exc:
        raise CliError(f"snapshot needs psycopg (pip install 'psycopg[binary]'): {exc}") from None
    import psycopg

    try:
        res = snapshot(a.store, a.output, a.pg_schema,
                       progress=lambda n: print(f"  {n:,} requests so far", file=sys.stderr)
                       if n % 20000 == 0 else None)
    except FileExistsError as exc:
        raise CliError(str(exc)) from None
    except psycopg.Error as exc:
        raise CliError(f"cannot read the store {a.store}: {str(exc).strip()}") from None
    print(f"wrote {a.output}: " + ", ".join(f"{n:,} {t}" for t, n in res.items())
          + f" (from {a.store}); read it with `python -m monitor --db {a.output} ...` or "
          f"`python -m service.defences verify --db {a.output} ...`")
    return 0


def cmd_id(a) -> int:
    from common.keys import client_id_for_key, key_problem
    secret = _secret(a)
    for k in a.keys:
        why = key_problem(k)
        print(f"{k}\t{'(invalid: ' + why + ')' if why else client_id_for_key(k, secret)}")
    return 0


def cmd_tune(a) -> int:
    from monitor.tune import TuneError, run
    try:
        return run(a)
    except TuneError as exc:
        raise CliError(str(exc)) from None


def cmd_serve(a) -> int:
    import logging

    from monitor.config import load_config, parse_address
    from monitor.process import ListenError, link_key, serve
    from common.keys import MIN_SECRET_BYTES
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s[monitor]: %(message)s")
    try:
        address = parse_address(a.listen)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if bool(a.tls_cert) != bool(a.tls_key):
        raise CliError("--tls-cert and --tls-key go together (the certificate chain and its "
                       "private key, PEM)")
    tls = None
    if a.tls_cert:
        from monitor.tlslink import TLSConfigError, server_context
        try:
            tls = server_context(a.tls_cert, a.tls_key)
        except TLSConfigError as exc:
            raise CliError(str(exc)) from None
    cfg = load_config(a.config)
    secret = _secret(a, "serve")
    if len(secret.encode()) < MIN_SECRET_BYTES:
        logging.getLogger("modelguard.monitor").warning(
            "the secret has %d bytes (servers want at least %d unless run with --dev-secret): "
            "the link's key is only as strong as the secret", len(secret.encode()),
            MIN_SECRET_BYTES)
    try:
        serve(cfg, a.db, address, link_key(secret), threads=a.threads, tls=tls,
              freeze_heap=True)   # the monitor's own process
    except ListenError as exc:
        raise CliError(str(exc)) from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m monitor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=os.environ.get("MODELGUARD_MONITOR_DB", DEFAULT_DB),
                    help="monitor database (default: $MODELGUARD_MONITOR_DB or %(default)s)")
    keys = argparse.ArgumentParser(add_help=False)
    keys.add_argument("--key", action="append", metavar="KEY",
                      help="name the client by its API key (an open-mode server logs a keyed hash "
                           "of the key, never the key)")
    secret = argparse.ArgumentParser(add_help=False)
    secret.add_argument("--secret-file", metavar="PATH",
                        help="the server's secret, for --key and serve (default: "
                             "$MODELGUARD_SECRET, else "
                             "$MODELGUARD_SECRET_FILE, else $MODELGUARD_ARTIFACTS/secret or "
                             "artifacts/secret, the file `make serve` generates)")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    p = sub.add_parser("clients", help="table of clients: queries, level, escalation, latest scores")
    p.set_defaults(fn=cmd_clients)
    p = sub.add_parser("show", parents=[keys, secret], help="a client's escalation timeline with evidence")
    p.add_argument("client", nargs="?", help="client id (or give --key)")
    p.add_argument("--config", help="thresholds to display (default: those the monitor ran with)")
    p.set_defaults(fn=cmd_show)
    p = sub.add_parser("plot", parents=[keys, secret], help="detector scores over the query count, thresholds, escalations")
    p.add_argument("client", nargs="?", help="client id (or give --key)")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--config", help="thresholds to draw (default: those the monitor ran with)")
    p.set_defaults(fn=cmd_plot)
    p = sub.add_parser("export", parents=[keys, secret], help="export the query log or the transitions as CSV or JSON Lines")
    p.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    p.add_argument("--what", choices=("queries", "transitions", "pairs", "groups"),
                   default="queries", help="pairs and groups: cross-client linking's evidence")
    p.add_argument("--client", help="only this client")
    p.add_argument("-o", "--output", help="file (default: stdout)")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("replay", parents=[keys, secret], help="re-run detectors and ladder offline under another config")
    p.add_argument("--config", required=True, help="monitor TOML to evaluate")
    p.add_argument("--client", action="append", help="only this client (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every replayed transition")
    p.set_defaults(fn=cmd_replay)
    p = sub.add_parser("id", parents=[secret], help="the client id an open-mode server logs for each API key "
                                  "(a keyed hash: needs the server's secret)")
    p.add_argument("keys", nargs="+", metavar="KEY")
    p.set_defaults(fn=cmd_id)
    p = sub.add_parser("migrate", help="convert a log written before the batched monitor "
                                       "(one row per item) into the current layout")
    p.add_argument("output", help="the new database file (must not exist)")
    p.set_defaults(fn=cmd_migrate)
    p = sub.add_parser("snapshot", help="copy a PostgreSQL store (replicas, --store) into a "
                                        "new SQLite log that every command here and `verify` "
                                        "read (one consistent view)")
    p.add_argument("--store", required=True, metavar="DSN",
                   help="the replicas' PostgreSQL, e.g. postgresql://user@host/modelguard")
    p.add_argument("--pg-schema", default=None, help="the PostgreSQL schema the replicas use "
                                                     "(default: the search path)")
    p.add_argument("output", help="the new SQLite file (must not exist)")
    p.set_defaults(fn=cmd_snapshot)
    p = sub.add_parser("tune", help="search thresholds, windows and min_hits on logs of "
                                    "labelled honest and attacker clients (docs/tune.md)")
    from monitor.tune import add_arguments as tune_arguments
    tune_arguments(p)
    p.set_defaults(fn=cmd_tune)
    p = sub.add_parser("serve", parents=[secret],
                       help="run the monitor on its own, on this machine or another, for the "
                            "servers whose [execution] address names it (docs/monitor.md)")
    p.add_argument("--listen", default="127.0.0.1:7070", metavar="HOST:PORT",
                   help="where servers connect (default %(default)s; 0.0.0.0:PORT for other "
                        "machines: the link is authenticated by the secret, and encrypted "
                        "only with --tls-cert)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS only, with this certificate "
                   "chain (it must name the host servers connect to; they trust its CA with "
                   "--monitor-tls-ca or [execution] tls_ca)")
    p.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--config", default=None,
                   help="monitor TOML: detectors, rules, linking, log, execution "
                        "(default monitor/default.toml); the servers' own policies and "
                        "watermark still come from theirs")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads of the detectors (default %(default)s)")
    p.set_defaults(fn=cmd_serve)
    return ap


def _secret(a, needs: str = "--key") -> str:
    path = a.secret_file or os.environ.get("MODELGUARD_SECRET_FILE")
    if not path and os.environ.get("MODELGUARD_SECRET"):
        return os.environ["MODELGUARD_SECRET"]
    path = Path(path or Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts")) / "secret")
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise CliError(f"{needs} needs the server's secret: cannot read {path} ({exc.strerror}); "
                       f"give --secret-file or set MODELGUARD_SECRET") from None


def _resolve_keys(a) -> None:
    """--key KEY -> the client id an open-mode server logs for it."""
    a.key = getattr(a, "key", None)
    client = getattr(a, "client", None)
    if a.key and client and a.cmd != "replay":
        raise CliError("give a client id or --key, not both")
    if not a.key:
        if a.cmd in ("show", "plot") and not client:
            raise CliError(f"{a.cmd}: name the client (its id, or --key KEY)")
        return
    from common.keys import client_id_for_key
    secret = _secret(a)
    ids = [client_id_for_key(k, secret) for k in a.key]
    if a.cmd == "replay":
        a.client = (a.client or []) + ids
    elif len(ids) > 1:
        raise CliError(f"{a.cmd} takes one --key")
    else:
        a.client = ids[0]


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from threadpoolctl import threadpool_limits

    from monitor.config import ConfigError
    from monitor.log import SchemaError

    threadpool_limits(1, user_api="blas")  # replay's detectors: one BLAS thread (see dataplane)
    try:
        _resolve_keys(a)
        return a.fn(a)
    except (CliError, ConfigError, FileNotFoundError, SchemaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
