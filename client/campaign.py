"""python -m client.campaign: the lab's headline measurement, end to end over gRPC.

For each scenario it starts the real server in process on a free port (the trained target, the
model pool, the monitor with a fresh log), then runs honest clients and the attacks against it,
each under its own API key(s), and reports:

* per attack: queries, stolen accuracy and fidelity on the evaluation set (test 5000-9999), the
  answers it received (probabilities or labels), the level the monitor reached and the query at
  which it first escalated;
* per honest client: queries, accuracy of the labels it received, share of answers that still
  carried probabilities, and whether it was escalated (a false escalation).

Scenarios: ``undefended`` (the monitor watches and logs, every level answers with the plain
target), ``defended`` (the monitor's config as shipped, or --config) and ``strict``
(monitor/strict.toml: reverse-sigmoid confidences for everyone from the first query).
Writes results/campaign/{campaign.json, campaign.md, campaign.png, SCENARIO/monitor.db}.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from common import data, training

log = logging.getLogger("modelguard.campaign")

# (label, attack name, budget, extra kwargs, sybil keys)
DEFAULT_PLAN = [
    ("copycat", "copycat", 5000, {}, 1),
    ("copycat-labels", "copycat-labels", 5000, {}, 1),
    ("knockoff (MNIST)", "knockoff", 5000, {}, 1),
    ("jbda", "jbda", 5000, {}, 1),
    ("interleaved-jbda", "interleaved-jbda", 5000, {}, 1),
    ("activethief", "activethief", 5000, {}, 1),
    ("copycat x5 sybil", "copycat", 5000, {}, 5),
    ("jbda x5 sybil", "jbda", 5000, {}, 5),
    ("equivalent", "equivalent", 20000, {}, 1),
]


SCENARIOS = ("undefended", "defended", "strict")
STRICT_CONFIG = Path(__file__).resolve().parents[1] / "monitor" / "strict.toml"


def _start(scenario: str, args, workdir: Path):
    from service.config import ServerConfig
    from service.dataplane import build_dataplane
    from service.server import Server

    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config = STRICT_CONFIG if scenario == "strict" else args.config
    cfg = ServerConfig(port=0, target=args.target, artifacts=args.artifacts,
                       monitor_config=config, monitor_db=workdir / "monitor.db", workers=4,
                       torch_threads=1, undefended=scenario == "undefended")
    return Server(cfg, build_dataplane(cfg)).start()


def _client_outcome(db: Path, keys: list[str]) -> dict:
    from monitor import QueryLog

    with QueryLog(db) as qlog:
        levels, first = [], []
        for k in keys:
            levels.append(qlog.last_level(k))
            tr = qlog.transitions(k)
            if tr:
                first.append(int(tr[0]["qn"]))
    return {"final_level": max(levels).name,
            "first_escalation_query": min(first) if first else None,
            "escalated_keys": len(first)}


def _keys(scenario: str, label: str, n: int) -> list[str]:
    """The API keys an attack uses: one, or n Sybil keys."""
    base = f"{scenario}/{label.split()[0]}"
    return [base] if n == 1 else [f"{base}/sybil-{i}" for i in range(n)]


def _run_attack(address: str, scenario: str, label: str, name: str, budget: int, extra: dict,
                sybil: int, args, target) -> dict:
    from client.api import RemoteOracle
    from client.attacks import ATTACKS
    from client.attacks.adaptive import SybilOracle
    from client.attacks.base import AttackFailed
    from client.attacks.equivalent import NeedsProbabilities
    from client.evaluate import evaluate

    cls = ATTACKS[name]
    keys = _keys(scenario, label, sybil)
    oracles = [RemoteOracle(address, k) for k in keys]
    oracle = oracles[0] if sybil == 1 else SybilOracle(oracles, budget=budget)
    oracle.budget = budget
    kw = dict(seed=args.seed, surrogate=args.surrogate, progress=not args.no_progress,
              train_config=training.TrainConfig(epochs=args.epochs, seed=args.seed))
    for need in getattr(cls, "needs", ()):
        kw[need] = {"pool": data.attack_pool, "ood": data.ood_pool}[need]()
    kw.update(extra)
    t0 = time.perf_counter()
    row = {"scenario": scenario, "attack": label, "keys": len(keys)}
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
    row["wall_time_s"] = round(time.perf_counter() - t0, 1)
    return row


def _run_honest(address: str, scenario: str, n: int, queries: int, seed: int) -> list[dict]:
    from client.api import RemoteOracle
    from client.honest import HonestClient, HonestConfig

    pool = data.attack_pool()
    out = []
    for i in range(n):
        key = f"{scenario}/honest-{i}"
        oracle = RemoteOracle(address, key)
        stats = HonestClient(oracle, pool, seed + i, HonestConfig(queries=queries),
                             name=key).run().as_dict()
        oracle.close()
        out.append({**stats, "scenario": scenario, "client": key,
                    "probability_share": stats["prob_share"]})
    return out


def _markdown(rows: list[dict], honest: list[dict]) -> str:
    def pct(v):
        return "defeated" if v is None else f"{100 * v:.2f}%"

    lines = ["| scenario | attack | keys | queries | answers (prob/label) | stolen acc | fidelity "
             "| monitor level | 1st escalation at query | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["answer_kinds"]
        lines.append(f"| {r['scenario']} | {r['attack']} | {r['keys']} | {r['queries']} | "
                     f"{k.get('probabilities', 0)}/{k.get('label_only', 0)} | "
                     f"{pct(r['stolen_accuracy'])} | {pct(r['fidelity'])} | {r['final_level']} | "
                     f"{r['first_escalation_query'] or '-'} | {r['wall_time_s']} |")
    if not honest:
        return "\n".join(lines) + "\n"
    lines += ["", "| scenario | honest clients | queries each | answer accuracy (mean) | "
              "answers with probabilities | falsely escalated |", "|---|---|---|---|---|---|"]
    for sc in dict.fromkeys(h["scenario"] for h in honest):
        hs = [h for h in honest if h["scenario"] == sc]
        lines.append(f"| {sc} | {len(hs)} | {hs[0]['queries']} | "
                     f"{pct(float(np.mean([h['accuracy'] for h in hs])))} | "
                     f"{pct(float(np.mean([h['probability_share'] for h in hs])))} | "
                     f"{sum(h['final_level'] != 'NORMAL' for h in hs)} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, target_accuracy: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    w = 0.8 / len(scenarios)
    for j, sc in enumerate(scenarios):
        vals = [next((r["stolen_accuracy"] for r in rows
                      if r["scenario"] == sc and r["attack"] == a), np.nan) for a in attacks]
        x = np.arange(len(attacks)) + j * w
        ax.bar(x, [0.0 if v is None else v * 100 for v in vals], w, label=sc)
        for xi, v in zip(x, vals):
            if v is None:  # the defence cut the attack off: it stole nothing usable
                ax.text(xi, 2, "defeated", rotation=90, ha="center", va="bottom", fontsize=8)
    target = target_accuracy * 100
    ax.axhline(target, ls="--", c="k", lw=1, label=f"target {target:.1f}%")
    ax.set_xticks(np.arange(len(attacks)) + w * (len(scenarios) - 1) / 2, attacks,
                  rotation=20, ha="right")
    ax.set_ylabel("stolen accuracy on test 5000-9999 (%)")
    ax.set_ylim(0, 108)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=len(scenarios) + 1,
              fontsize=9, framealpha=1.0)
    ax.set_title("What each attack steals, with and without the monitor's defences", pad=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(out: Path, rows: list[dict], honest: list[dict], target_accuracy: float) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "campaign.json").write_text(json.dumps({"attacks": rows, "honest": honest},
                                                  indent=2, default=str))
    md = _markdown(rows, honest)
    (out / "campaign.md").write_text(md)
    if rows:
        _plot(rows, out / "campaign.png", target_accuracy)
    return md


def _target_accuracy(target) -> float:
    ev = data.eval_set()
    return training.accuracy(training.predict_proba(target, ev.x).argmax(1), ev.y)


def _merge(dirs: list[Path], out: Path, target_path: Path) -> int:
    rows, honest = [], []
    for d in dirs:
        blob = json.loads((d / "campaign.json").read_text())
        rows += blob["attacks"]
        honest += blob["honest"]
    target, _ = training.load_checkpoint(target_path)
    print(_write(out, rows, honest, _target_accuracy(target)))
    print(f"wrote {out}/campaign.json, campaign.md, campaign.png")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.campaign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="undefended,defended")
    p.add_argument("--attacks", help="comma-separated labels from the plan (default: all)")
    p.add_argument("--config", type=Path, help="monitor config for 'defended' (default: shipped)")
    p.add_argument("--target", type=Path, default=Path("artifacts/target.pt"))
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--honest", type=int, default=5, help="honest clients per scenario")
    p.add_argument("--honest-queries", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--surrogate", default="cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/campaign"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--merge", type=Path, nargs="+", metavar="DIR",
                   help="run nothing: merge the campaign.json of earlier runs into --out")
    args = p.parse_args(argv)
    if args.merge:
        return _merge(args.merge, args.out, args.target)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    target, _ = training.load_checkpoint(args.target)
    plan = [x for x in DEFAULT_PLAN
            if not args.attacks or x[0] in args.attacks.split(",")]
    rows, honest = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenarios.split(","):
        if scenario not in SCENARIOS:
            p.error(f"unknown scenario {scenario!r}; expected some of {', '.join(SCENARIOS)}")
        server = _start(scenario, args, args.out / scenario)
        log.info("%s: serving on %s", scenario, server.address)
        try:
            hs = _run_honest(server.address, scenario, args.honest, args.honest_queries,
                             args.seed) if args.honest else []
            for label, name, budget, extra, sybil in plan:
                log.info("%s: %s (budget %d, %d key(s))", scenario, label, budget, sybil)
                r = _run_attack(server.address, scenario, label, name, budget, extra, sybil,
                                args, target)
                rows.append(r)
                log.info("%s: %s -> %s stolen %s fidelity %s", scenario, label, r["status"],
                         r["stolen_accuracy"], r["fidelity"])
        finally:
            server.stop()
        db = args.out / scenario / "monitor.db"
        for r in rows:
            if r["scenario"] == scenario:
                r.update(_client_outcome(db, _keys(scenario, r["attack"], r["keys"])))
        for h in hs:
            h.update(_client_outcome(db, [h["client"]]))
        honest += hs
        (args.out / "campaign.json").write_text(json.dumps({"attacks": rows, "honest": honest},
                                                           indent=2, default=str))
    md = _write(args.out, rows, honest, _target_accuracy(target))
    print(md)
    print(f"wrote {args.out}/campaign.json, campaign.md, campaign.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
