"""Benchmark every attack against the undefended target, in process (LocalOracle on the real
checkpoint; the gRPC server is a thin adapter over the same model), at several query budgets.

    python -m lab.bench_attacks                         # the full table: 1k, 5k, 20k
    python -m lab.bench_attacks --only jbda,copycat --budgets 1000 --epochs 5
    python -m lab.bench_attacks --only equivalent --fee-budgets 100000,200000,300000

Writes results/attacks.json (every run, appended/replaced by key) and results/attacks.md.
Budgets an attack cannot use (copycat and ActiveThief query each of the 5,000 pool images at
most once) are reported as such, not silently shrunk.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import data, training
from client.attacks import ATTACKS
from client.attacks.adaptive import Sybil
from client.evaluate import evaluate
from client.oracle import LocalOracle

# name in the table -> (registry name, params)
CONFIGS = {
    "copycat": ("copycat", {}),
    "copycat-labels": ("copycat-labels", {}),
    "knockoff-random": ("knockoff", {"sampling": "random"}),
    "knockoff-adaptive": ("knockoff", {"sampling": "adaptive"}),
    "jbda": ("jbda", {}),
    "activethief-uncertainty": ("activethief", {"selection": "uncertainty"}),
    "activethief-kcenter": ("activethief", {"selection": "kcenter"}),
    "interleaved-jbda": ("interleaved-jbda", {"natural": 0.5}),
    "sybil4-jbda": ("jbda", {"_sybil": 4}),
}


def make_oracle(target, args, key: str, budget: int | None = None):
    """In process (LocalOracle on the checkpoint), or over gRPC with --address (one API key per
    run, so the server's monitor keeps each run's stream apart)."""
    if args.address:
        from client.api import RemoteOracle

        return RemoteOracle(args.address, key, budget)
    return LocalOracle(lambda x: training.predict_proba(target, x), budget)


def run_one(label, name, params, budget, target, args, pool, ood, ev) -> dict:
    params = dict(params)
    sybil = params.pop("_sybil", 0)
    cls = ATTACKS[name]
    kw = dict(params, seed=args.seed, surrogate=args.surrogate, progress=args.progress,
              train_config=training.TrainConfig(epochs=args.epochs, batch_size=64,
                                                seed=args.seed, progress=args.progress))
    for need in cls.needs:
        kw[need] = {"pool": pool, "ood": ood}[need]
    if name == "jbda" or name == "interleaved-jbda":
        kw.setdefault("round_epochs", max(1, args.epochs // 4))
    if name == "activethief":
        kw.setdefault("round_epochs", max(1, args.epochs // 2))
    row = {"attack": label, "registry": name, "params": params, "budget": budget,
           "surrogate": args.surrogate, "epochs": args.epochs, "seed": args.seed,
           "via": f"grpc://{args.address}" if args.address else "local"}
    try:
        if sybil:
            oracles = [make_oracle(target, args, f"bench/{label}/{budget}/sybil-{i}")
                       for i in range(sybil)]
            for i, o in enumerate(oracles):
                o.api_key = f"sybil-{i}"
            result = Sybil(cls, oracles, budget, **kw).run()
        else:
            result = cls(make_oracle(target, args, f"bench/{label}/{budget}", budget), budget,
                         **kw).run()
    except ValueError as exc:
        return {**row, "status": "impossible", "reason": str(exc)}
    metrics = evaluate(result.surrogate, target, ev)
    return {**row, "status": "ok", "queries_used": result.queries_used,
            "wall_time_s": round(result.wall_time_s, 1),
            "stolen_accuracy": metrics["stolen_accuracy"], "fidelity": metrics["fidelity"],
            "target_accuracy": metrics["target_accuracy"], "answer_kinds": result.answer_kinds,
            "extra": result.extra}


def run_fee(budget, target, args, pool, ev) -> dict:
    row = {"attack": "equivalent", "registry": "equivalent", "params": {}, "budget": budget,
           "surrogate": "mlp (extracted)", "epochs": 0, "seed": args.seed,
           "via": f"grpc://{args.address}" if args.address else "local"}
    oracle = make_oracle(target, args, f"bench/equivalent/{budget}", budget)
    result = ATTACKS["equivalent"](oracle, budget, pool=pool,
                                   seed=args.seed, progress=args.progress).run()
    metrics = evaluate(result.surrogate, target, ev)
    # how close the recovered rows are to the target's (the lab's omniscient check)
    w = target.fc1.weight.detach().numpy()
    rec = result.surrogate.fc1.weight.detach().numpy()[:result.extra["recovered_units"]]
    cos = np.abs((rec / np.linalg.norm(rec, axis=1, keepdims=True))
                 @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T)
    x = pool.x.reshape(len(pool), -1) / 255.0
    pre = x @ w.T + target.fc1.bias.detach().numpy()
    live = (pre > 0).any(0) & (pre < 0).any(0)
    return {**row, "status": "ok", "queries_used": result.queries_used,
            "wall_time_s": round(result.wall_time_s, 1),
            "stolen_accuracy": metrics["stolen_accuracy"], "fidelity": metrics["fidelity"],
            "target_accuracy": metrics["target_accuracy"], "answer_kinds": result.answer_kinds,
            "extra": {**{k: v for k, v in result.extra.items() if k != "units_curve"},
                      "target_units_switching_on_pool": int(live.sum()),
                      "target_units_recovered_cos_gt_0.999": int((cos.max(0)[live] > 0.999).sum()),
                      "units_curve": result.extra.get("units_curve", [])}}


def to_markdown(rows: list[dict]) -> str:
    budgets = sorted({r["budget"] for r in rows if r["attack"] != "equivalent"})
    labels = [c for c in CONFIGS if any(r["attack"] == c for r in rows)]
    out = ["# Attacks against the undefended target", "",
           "Stolen accuracy / fidelity on the evaluation set (Fashion test 5000-9999), wall time "
           "(queries + surrogate training), "
           + ("over gRPC. " if rows and rows[0].get("via", "local") != "local" else "in process. ")
           + (f"Target accuracy {rows[0]['target_accuracy']:.2%}." if rows and
              "target_accuracy" in rows[0] else ""), "",
           "| attack | " + " | ".join(f"{b:,} queries" for b in budgets) + " |",
           "|---|" + "---|" * len(budgets)]
    for lab in labels:
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["attack"] == lab and r["budget"] == b), None)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append("n/a (pool has 5,000 images)" if "pool" in r.get("reason", "")
                             else "n/a")
            else:
                cells.append(f"{r['stolen_accuracy']:.1%} / {r['fidelity']:.1%} "
                             f"({r['queries_used']:,} q, {r['wall_time_s']:.0f} s)")
        out.append(f"| {lab} | " + " | ".join(cells) + " |")
    fee = sorted((r for r in rows if r["attack"] == "equivalent"), key=lambda r: r["budget"])
    if fee:
        out += ["", "## Functionally equivalent extraction", "",
                "| budget | queries used | units recovered (target rows matched) | fidelity | "
                "stolen accuracy | wall time |", "|---|---|---|---|---|---|"]
        for r in fee:
            e = r["extra"]
            out.append(f"| {r['budget']:,} | {r['queries_used']:,} | {e['recovered_units']} "
                       f"({e['target_units_recovered_cos_gt_0.999']}/"
                       f"{e['target_units_switching_on_pool']}) | {r['fidelity']:.2%} | "
                       f"{r['stolen_accuracy']:.2%} | {r['wall_time_s']:.0f} s |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench_attacks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="artifacts/target.pt")
    p.add_argument("--data")
    p.add_argument("--budgets", default="1000,5000,20000")
    p.add_argument("--fee-budgets", default="100000,200000,300000,400000")
    p.add_argument("--only", help="comma-separated table names (and/or 'equivalent')")
    p.add_argument("--surrogate", default="mlp")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--address", help="attack a running server (host:port) over gRPC instead of "
                                      "the checkpoint in process; serve it with --undefended")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, _ = training.load_checkpoint(args.target)
    pool, ood, ev = data.attack_pool(args.data), data.ood_pool(args.data), data.eval_set(args.data)
    only = set(args.only.split(",")) if args.only else set(CONFIGS) | {"equivalent"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "attacks.json"
    rows = json.loads(jpath.read_text()) if jpath.exists() else []

    def save(row):
        key = (row["attack"], row["budget"])
        rows[:] = [r for r in rows if (r["attack"], r["budget"]) != key] + [row]
        jpath.write_text(json.dumps(rows, indent=1))
        (out / "attacks.md").write_text(to_markdown(rows))
        shown = (f"{row['stolen_accuracy']:.3f} / {row['fidelity']:.3f} "
                 f"{row['queries_used']} q {row['wall_time_s']} s" if row["status"] == "ok"
                 else row["status"])
        print(f"{row['attack']:<26} {row['budget']:>7}  {shown}", flush=True)

    for b in [int(x) for x in args.budgets.split(",") if x]:
        for label, (name, params) in CONFIGS.items():
            if label in only:
                save(run_one(label, name, params, b, target, args, pool, ood, ev))
    if "equivalent" in only:
        for b in [int(x) for x in args.fee_budgets.split(",") if x]:
            save(run_fee(b, target, args, pool, ev))
    print(f"wrote {jpath} and {out / 'attacks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
