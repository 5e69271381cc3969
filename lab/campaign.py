"""python -m lab.campaign: the lab's headline measurement, end to end over gRPC.

For each scenario it starts the real server in process on a free port (the trained target, the
model pool, the monitor with a fresh log), then runs honest clients and the attacks against it,
each under its own API key(s), and reports:

* per attack: queries, stolen accuracy and fidelity on the evaluation set (test 5000-9999), the
  answers it received (probabilities or labels), the level the monitor reached, the query (of
  its own key) at which one of its keys first escalated, how many of its keys were escalated,
  and the queries it had spent over all its keys, in the order the server logged them, when
  80% of its keys had been escalated (None: never);
* per honest client: queries, accuracy of the labels it received, share of answers that still
  carried probabilities, and whether it was escalated (a false escalation).

Plans (``--plan``, default ``all``): ``standard`` (every attack once, two 5-key Sybil rows),
``sybil`` (JBDA and the interleaved JBDA over 10, 25 and 100 keys, round-robin and sequential,
next to their single-key runs) and ``all`` (both). Honest clients can be given benign
variants and organisations (``--honest-variants``, ``--honest-orgs``): traffic a cross-client
detector must not flag.

Scenarios: ``undefended`` (the monitor watches and logs, every level answers with the plain
target), ``defended`` (the monitor's config as shipped, or --config) and ``strict``
(monitor/strict.toml: reverse-sigmoid confidences for everyone from the first query).
Writes results/campaign/{campaign.json, campaign.md, campaign.png, SCENARIO/monitor.db}.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from common import data, training

log = logging.getLogger("modelguard.campaign")

class PlanRow(NamedTuple):
    """One attack run: its label (unique in a plan), the attack's name in client.attacks.ATTACKS,
    the query budget (over all keys), extra attack kwargs, the number of API keys and how the
    queries are spread over them (a SybilOracle mode; ignored for one key)."""

    label: str
    attack: str
    budget: int
    extra: dict
    keys: int = 1
    mode: str = "round-robin"


DEFAULT_PLAN = [
    PlanRow("copycat", "copycat", 5000, {}),
    PlanRow("copycat-labels", "copycat-labels", 5000, {}),
    PlanRow("knockoff (MNIST)", "knockoff", 5000, {}),
    PlanRow("jbda", "jbda", 5000, {}),
    PlanRow("interleaved-jbda", "interleaved-jbda", 5000, {}),
    PlanRow("activethief", "activethief", 5000, {}),
    PlanRow("copycat x5 sybil", "copycat", 5000, {}, 5),
    PlanRow("jbda x5 sybil", "jbda", 5000, {}, 5),
    PlanRow("equivalent", "equivalent", 20000, {}),
]

SYBIL_KEYS = (10, 25, 100)
SYBIL_MODES = {"rr": "round-robin", "seq": "sequential"}
# the single-key runs first (the comparison), then every key count in both modes
SYBIL_PLAN = [PlanRow("jbda", "jbda", 5000, {}),
              PlanRow("interleaved-jbda", "interleaved-jbda", 5000, {})] + [
    PlanRow(f"{name} x{n} {short}", name, 5000, {}, n, mode)
    for name in ("jbda", "interleaved-jbda") for n in SYBIL_KEYS
    for short, mode in SYBIL_MODES.items()]

PLANS = {"standard": DEFAULT_PLAN, "sybil": SYBIL_PLAN}
ESCALATED_SHARE = 0.8   # the queries-spent figure: until this share of an attack's keys escalated


def plan_rows(names: str) -> list[PlanRow]:
    """The rows of the comma-separated plans (``all`` = every plan), each label once."""
    want = list(PLANS) if names == "all" else names.split(",")
    rows: dict[str, PlanRow] = {}
    for name in want:
        if name not in PLANS:
            raise ValueError(f"unknown plan {name!r}; expected {', '.join(PLANS)} or all")
        for r in PLANS[name]:
            if r.label in rows and rows[r.label] != r:
                raise ValueError(f"plans disagree on the attack labelled {r.label!r}")
            rows.setdefault(r.label, r)
    return list(rows.values())


SCENARIOS = ("undefended", "defended", "strict")
STRICT_CONFIG = Path(__file__).resolve().parents[1] / "monitor" / "strict.toml"


def start_server(scenario: str, args, workdir: Path):
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config = STRICT_CONFIG if scenario == "strict" else args.config
    cfg = ServerConfig(port=0, target=args.target, artifacts=args.artifacts,
                       monitor_config=config, monitor_db=workdir / "monitor.db", workers=4,
                       torch_threads=1, undefended=scenario == "undefended", open_keys=True,
                       dev_secret=True)
    return Server(cfg, build_dataplane(cfg)).start()


def _first_escalation_transitions(qlog, keys: list[str]) -> dict[str, dict]:
    """key -> its first transition to a higher level (keys never escalated are left out)."""
    out = {}
    for k in keys:
        tr = next((tr for tr in qlog.transitions(k) if tr["to_level"] > tr["from_level"]), None)
        if tr is not None:
            out[k] = tr
    return out


def first_escalations(qlog, keys: list[str]) -> dict[str, int]:
    """Each key's first escalation (its first transition to a higher level): key -> the key's own
    query number when it happened. Keys that were never escalated are left out."""
    return {k: int(tr["qn"]) for k, tr in _first_escalation_transitions(qlog, keys).items()}


def _arrival_order(qlog, keys: list[str]) -> list[tuple[int, str, int, int, float]]:
    """The keys' requests in the order the server logged them: (seq, key, qn0, n, t).

    QueryLog has no request-level reader (its ``_decoded`` is private), so this expands each
    key's items with ``iter_rows`` and folds them back into requests (item 0 starts one)."""
    reqs: list[list] = []
    for k in keys:
        for r in qlog.iter_rows(k):
            if r["item"] == 0:
                reqs.append([r["seq"], k, r["qn"] - 1, 0, r["t"]])
            reqs[-1][3] += 1
    return sorted(tuple(r) for r in reqs)


def queries_until_escalated(qlog, keys: list[str], share: float = ESCALATED_SHARE
                            ) -> int | None:
    """The queries spent over all ``keys`` together, counted in the order the server logged the
    requests, when ``share`` of the keys (rounded up; at least one) had had their first
    escalation. None when fewer keys were ever escalated.

    A key escalated by one of its own requests (the transition has that request's time and a
    query number inside it) is placed at that query: the queries before the request plus its
    items up to the escalating one. A key escalated between its own requests (e.g. with a group
    of linked keys, by another key's request) is placed after every request logged at or before
    the transition's time."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        raise ValueError("no keys given")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    need = max(1, math.ceil(round(share * len(keys), 9)))
    first = _first_escalation_transitions(qlog, keys)
    if len(first) < need:
        return None
    reqs = _arrival_order(qlog, keys)
    before = np.concatenate([[0], np.cumsum([n for _, _, _, n, _ in reqs])]).astype(int)
    at = []
    for key, tr in first.items():
        e, te = int(tr["qn"]), float(tr["t"])
        own = next((i for i, (_, k, qn0, n, t) in enumerate(reqs)
                    if k == key and qn0 < e <= qn0 + n and t == te), None)
        if own is not None:
            at.append(int(before[own]) + e - reqs[own][2])
        else:
            at.append(sum(n for _, _, _, n, t in reqs if t <= te))
    return sorted(at)[need - 1]


def escalated_early(first: dict[str, int], spent: dict[str, int]) -> int:
    """Keys whose first escalation came before they had sent half of their own queries (a
    key's own reading of "before half of the budget": in one-key-after-another use most keys
    have not started when half of the whole budget is spent)."""
    return sum(1 for k, n in spent.items() if k in first and first[k] <= n / 2)


def client_outcome(db: Path, keys: list[str]) -> dict:
    """What the monitor did to these keys (one attack's, or one honest client's)."""
    from monitor import QueryLog

    with QueryLog(db) as qlog:
        levels = [qlog.last_level(k) for k in keys]
        first = first_escalations(qlog, keys)
        spent = {k: qlog.max_qn(k) for k in keys}
        until = queries_until_escalated(qlog, keys)
    return {"final_level": max(levels).name,
            "first_escalation_query": min(first.values()) if first else None,
            "escalated_keys": len(first),
            "queries_before_80pct_escalated": until,
            "keys_escalated_before_half_own_queries": escalated_early(first, spent),
            "logged_queries": sum(spent.values())}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "attack"


def attack_keys(scenario: str, label: str, n: int) -> list[str]:
    """The API keys an attack uses: one, or n Sybil keys; distinct per label (no two plan rows
    share a key, so no row inherits another's monitor state)."""
    base = f"{scenario}/{slug(label)}"
    return [base] if n == 1 else [f"{base}/key-{i}" for i in range(n)]


def run_attack(address: str, scenario: str, plan: PlanRow, args, target) -> dict:
    from client.api import RemoteOracle
    from client.attacks import ATTACKS
    from client.attacks.adaptive import SybilOracle
    from client.attacks.base import AttackFailed
    from client.attacks.equivalent import NeedsProbabilities
    from client.evaluate import evaluate

    cls = ATTACKS[plan.attack]
    budget = plan.budget
    keys = attack_keys(scenario, plan.label, plan.keys)
    oracles = [RemoteOracle(address, k) for k in keys]
    oracle = oracles[0] if len(oracles) == 1 else SybilOracle(oracles, budget=budget,
                                                              mode=plan.mode)
    oracle.budget = budget
    kw = dict(seed=args.seed, surrogate=args.surrogate, progress=not args.no_progress,
              train_config=training.TrainConfig(epochs=args.epochs, seed=args.seed))
    for need in getattr(cls, "needs", ()):
        kw[need] = {"pool": data.attack_pool, "ood": data.ood_pool}[need]()
    if len(keys) > 1:
        # requests of about a tenth of a key's share: a real round-robin (every key in use from
        # the start, not one 256-item request per key), and the same request size in sequential
        # mode, so the two modes differ only in the order keys are used
        kw["batch_size"] = max(1, min(256, budget // len(keys) // 10))
    kw.update(plan.extra)
    t0 = time.perf_counter()
    row = {"scenario": scenario, "attack": plan.label, "name": plan.attack, "keys": len(keys),
           "mode": plan.mode if len(keys) > 1 else None, "budget": budget,
           "key_prefix": f"{scenario}/{slug(plan.label)}"}
    try:
        result = cls(oracle, budget, **kw).run()
    except (NeedsProbabilities, AttackFailed) as exc:  # the defence left it nothing to work with
        row.update(queries=oracle.queries_used, answer_kinds=dict(oracle.kinds),
                   stolen_accuracy=None, fidelity=None, status=f"defeated: {exc}")
    else:
        row.update(queries=result.queries_used, answer_kinds=result.answer_kinds,
                   status="completed", **evaluate(result.surrogate, target))
    finally:
        for o in oracles:
            o.close()
    if len(oracles) > 1:
        row["per_key_queries"] = oracle.per_key_queries
    row["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return row


def honest_support() -> list[str]:
    """What client.honest lacks of the benign variants (empty when it has them all)."""
    from client import honest

    missing = []
    if "variant_share" not in {f.name for f in dataclasses.fields(honest.HonestConfig)}:
        missing.append("HonestConfig(variant_share=...)")
    if "orgs" not in inspect.signature(honest.run_honest).parameters:
        missing.append("run_honest(..., orgs=N)")
    return missing


def _run_honest(address: str, scenario: str, n: int, queries: int, seed: int,
                variants: float | None = None, orgs: int | None = None) -> list[dict]:
    """n honest clients of ``queries`` items each (keys SCENARIO/honest-i), through
    client.honest.run_honest; ``variants``/``orgs`` are passed on only when given."""
    from client.api import RemoteOracle
    from client.honest import HonestConfig, run_honest

    keys = [f"{scenario}/honest-{i}" for i in range(n)]
    cfg = HonestConfig(queries=queries, **({} if variants is None else
                                           {"variant_share": variants}))
    oracles = [RemoteOracle(address, k) for k in keys]
    try:
        out = run_honest(oracles, data.attack_pool(), seed, cfg, names=keys, vary_volume=False,
                         **({} if orgs is None else {"orgs": orgs}))
    finally:
        for o in oracles:
            o.close()
    return [{**stats, "scenario": scenario, "client": stats["client"],
             "probability_share": stats["prob_share"], "variants_setting": variants,
             "orgs_setting": orgs} for stats in out["per_client"]]


def _markdown(rows: list[dict], honest: list[dict]) -> str:
    def pct(v):
        return "defeated" if v is None else f"{100 * v:.2f}%"

    def opt(v):
        return "-" if v is None else f"{v}"

    share = f"{ESCALATED_SHARE:.0%}"
    lines = ["| scenario | attack | keys | queries | answers (prob/label) | stolen acc | fidelity "
             "| monitor level | keys escalated | 1st escalation at query (of its key) | "
             f"queries spent before {share} of keys escalated | keys escalated before half of "
             "their own queries | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["answer_kinds"]
        esc = r.get("escalated_keys")
        until = r.get("queries_before_80pct_escalated")
        until = "-" if "queries_before_80pct_escalated" not in r else (  # merged older runs
            "never" if until is None else until)
        lines.append(f"| {r['scenario']} | {r['attack']} | {r['keys']} | {r['queries']} | "
                     f"{k.get('probabilities', 0)}/{k.get('label_only', 0)} | "
                     f"{pct(r['stolen_accuracy'])} | {pct(r['fidelity'])} | {r['final_level']} | "
                     f"{opt(esc)}/{r['keys']} | {opt(r['first_escalation_query'])} | "
                     f"{until} | {opt(r.get('keys_escalated_before_half_own_queries'))}"
                     f"/{r['keys']} | {r['wall_time_s']} |")
    if not honest:
        return "\n".join(lines) + "\n"
    lines += ["", "| scenario | honest clients | queries each | variant share (set) | orgs (set) | "
              "answer accuracy (mean) | answers with probabilities | falsely escalated |",
              "|---|---|---|---|---|---|---|---|"]
    for sc in dict.fromkeys(h["scenario"] for h in honest):
        hs = [h for h in honest if h["scenario"] == sc]
        lines.append(f"| {sc} | {len(hs)} | {hs[0]['queries']} | "
                     f"{opt(hs[0].get('variants_setting'))} | {opt(hs[0].get('orgs_setting'))} | "
                     f"{pct(float(np.mean([h['accuracy'] for h in hs])))} | "
                     f"{pct(float(np.mean([h['probability_share'] for h in hs])))} | "
                     f"{sum(h['final_level'] != 'NORMAL' for h in hs)} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, target_accuracy: float) -> None:
    """Two panels over the attacks: stolen accuracy per scenario (with keys escalated / keys
    above each bar), and the queries spent before 80% of the attack's keys were escalated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    by = {(r["scenario"], r["attack"]): r for r in rows}
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(max(10.0, 0.55 * len(attacks) + 2), 8.5),
                                 sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    w = 0.8 / len(scenarios)
    budget_max = max((r.get("budget") or r["queries"] for r in rows), default=1)
    for j, sc in enumerate(scenarios):
        x = np.arange(len(attacks)) + j * w
        got = [by.get((sc, a)) for a in attacks]
        acc = [np.nan if r is None else (0.0 if r["stolen_accuracy"] is None
                                          else 100 * r["stolen_accuracy"]) for r in got]
        ax.bar(x, acc, w, label=sc, color=f"C{j}")
        spent = [np.nan if r is None or r.get("queries_before_80pct_escalated") is None
                 else r["queries_before_80pct_escalated"] for r in got]
        bx.bar(x, spent, w, color=f"C{j}")
        for xi, r, a in zip(x, got, acc):
            if r is None:
                continue
            if r["stolen_accuracy"] is None:  # the defence cut the attack off
                ax.text(xi, 2, "defeated", rotation=90, ha="center", va="bottom", fontsize=7)
            esc = r.get("escalated_keys")
            if esc is not None:
                ax.text(xi, (a if np.isfinite(a) else 0) + 1, f"{esc}/{r['keys']}", rotation=90,
                        ha="center", va="bottom", fontsize=7)
            if "queries_before_80pct_escalated" in r and \
                    r["queries_before_80pct_escalated"] is None:
                bx.text(xi, budget_max * 0.02, "never", rotation=90, ha="center",
                        va="bottom", fontsize=7)
    target = target_accuracy * 100
    ax.axhline(target, ls="--", c="k", lw=1, label=f"target {target:.1f}%")
    ax.set_ylabel("stolen accuracy on\ntest 5000-9999 (%)")
    ax.set_ylim(0, 118)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=len(scenarios) + 1,
              fontsize=9, framealpha=1.0)
    ax.set_title("What each attack steals (above the bars: keys escalated / keys), and what it "
                 f"had spent when {ESCALATED_SHARE:.0%} of its keys were escalated", pad=8,
                 fontsize=10)
    bx.set_ylabel(f"queries spent before\n{ESCALATED_SHARE:.0%} of keys escalated")
    bx.set_ylim(0, budget_max * 1.05)
    bx.set_xticks(np.arange(len(attacks)) + w * (len(scenarios) - 1) / 2, attacks,
                  rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: Path, rows: list[dict], honest: list[dict], target_accuracy: float,
           settings: dict | None = None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "campaign.json").write_text(json.dumps(
        {"attacks": rows, "honest": honest, **({"settings": settings} if settings else {})},
        indent=2, default=str))
    md = _markdown(rows, honest)
    (out / "campaign.md").write_text(md)
    if rows:
        _plot(rows, out / "campaign.png", target_accuracy)
    return md


def eval_accuracy(target) -> float:
    ev = data.eval_set()
    return training.accuracy(training.predict_proba(target, ev.x).argmax(1), ev.y)


def _merge(dirs: list[Path], out: Path, target_path: Path) -> int:
    rows, honest = [], []
    for d in dirs:
        blob = json.loads((d / "campaign.json").read_text())
        rows += blob["attacks"]
        honest += blob["honest"]
    target, _ = training.load_checkpoint(target_path)
    print(_write(out, rows, honest, eval_accuracy(target)))
    print(f"wrote {out}/campaign.json, campaign.md, campaign.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="undefended,defended")
    p.add_argument("--plan", default="all",
                   help=f"comma-separated plans: {', '.join(PLANS)}, or all (default)")
    p.add_argument("--attacks", help="comma-separated labels from the plan (default: all)")
    p.add_argument("--config", type=Path, help="monitor config for 'defended' (default: shipped)")
    p.add_argument("--target", type=Path, default=Path("artifacts/target.pt"))
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--honest", type=int, default=5, help="honest clients per scenario")
    p.add_argument("--honest-queries", type=int, default=2000)
    p.add_argument("--honest-variants", type=float, metavar="SHARE",
                   help="share of each honest client's items that are benign variants of "
                        "earlier images (client.honest.HonestConfig.variant_share)")
    p.add_argument("--honest-orgs", type=int, metavar="N",
                   help="group the honest clients into N organisations that share images "
                        "(client.honest.run_honest(orgs=N))")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--surrogate", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/campaign"))
    p.add_argument("--no-progress", action="store_true")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=True,
                     help="(the default) run every attack against its own fresh server and "
                          "monitor log (the honest clients keep the scenario's): with "
                          "cross-client linking, attacks drawing seeds from one pool would "
                          "otherwise be linked to each other")
    iso.add_argument("--shared", dest="isolate", action="store_false",
                     help="run the honest clients and every attack against one server and log "
                          "(what a deployment sees; later attacks may be linked to earlier ones)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="run nothing: merge the campaign.json of earlier runs into --out")
    args = p.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out, args.target)
    try:
        plan = plan_rows(args.plan)
    except ValueError as exc:
        p.error(str(exc))
    if args.attacks:
        want = [a.strip() for a in args.attacks.split(",")]
        unknown = [a for a in want if a not in {r.label for r in plan}]
        if unknown:
            p.error(f"no attack labelled {', '.join(map(repr, unknown))} in plan {args.plan!r}; "
                    f"its labels: {', '.join(r.label for r in plan)}")
        plan = [r for r in plan if r.label in want]
    scenarios = args.scenarios.split(",")
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            p.error(f"unknown scenario {scenario!r}; expected some of {', '.join(SCENARIOS)}")
    if args.honest_variants is not None and not 0.0 <= args.honest_variants <= 1.0:
        p.error(f"--honest-variants must be in [0, 1], got {args.honest_variants}")
    if args.honest_orgs is not None and not 1 <= args.honest_orgs <= max(1, args.honest):
        p.error(f"--honest-orgs must be between 1 and --honest ({args.honest}), "
                f"got {args.honest_orgs}")
    if args.honest_variants is not None or args.honest_orgs is not None:
        missing = honest_support()
        if missing:
            p.error(f"--honest-variants/--honest-orgs need {' and '.join(missing)} in "
                    f"client/honest.py, which this checkout does not have yet")
        if args.honest_variants is not None:
            from client.honest import HonestConfig

            try:  # e.g. repeat_prob + variant_share > 1: say so before any server starts
                HonestConfig(queries=args.honest_queries, variant_share=args.honest_variants)
            except ValueError as exc:
                p.error(f"--honest-variants {args.honest_variants}: {exc}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    target, _ = training.load_checkpoint(args.target)
    settings = {"plan": args.plan, "attacks": [r.label for r in plan], "surrogate": args.surrogate,
                "epochs": args.epochs, "seed": args.seed, "honest": args.honest,
                "honest_queries": args.honest_queries, "honest_variants": args.honest_variants,
                "honest_orgs": args.honest_orgs, "escalated_share": ESCALATED_SHARE,
                "isolate": args.isolate}
    rows, honest = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for scenario in scenarios:
        server = start_server(scenario, args, args.out / scenario)
        log.info("%s: serving on %s", scenario, server.address)
        dbs: dict[str, Path] = {}
        try:
            hs = _run_honest(server.address, scenario, args.honest, args.honest_queries,
                             args.seed, args.honest_variants, args.honest_orgs) \
                if args.honest else []
            for i, pr in enumerate(plan, 1):
                log.info("%s [%d/%d]: %s (budget %d, %d key(s)%s)", scenario, i, len(plan),
                         pr.label, pr.budget, pr.keys, f", {pr.mode}" if pr.keys > 1 else "")
                own = None
                if args.isolate:  # a fresh server and monitor log for this attack alone
                    wd = args.out / scenario / slug(pr.label)
                    own = start_server(scenario, args, wd)
                    dbs[pr.label] = wd / "monitor.db"
                try:
                    r = run_attack((own or server).address, scenario, pr, args, target)
                finally:
                    if own is not None:
                        own.stop()
                rows.append(r)
                log.info("%s: %s -> %s stolen %s fidelity %s", scenario, pr.label, r["status"],
                         r["stolen_accuracy"], r["fidelity"])
        finally:
            server.stop()
        db = args.out / scenario / "monitor.db"
        log.info("%s: reading what the monitor did from %s", scenario, db)
        for r in rows:
            if r["scenario"] == scenario:
                r.update(client_outcome(dbs.get(r["attack"], db), [
                    server.client_id(k) for k in attack_keys(scenario, r["attack"], r["keys"])]))
        for h in hs:
            h.update(client_outcome(db, [server.client_id(h["client"])]))
        honest += hs
        (args.out / "campaign.json").write_text(json.dumps(
            {"attacks": rows, "honest": honest, "settings": settings}, indent=2, default=str))
    md = _write(args.out, rows, honest, eval_accuracy(target), settings)
    print(md)
    print(f"wrote {args.out}/campaign.json, campaign.md, campaign.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
