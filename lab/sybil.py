"""``python -m lab.sybil``: adaptive evasion, measured honestly.

An attacker who knows the monitor has two knobs: JBDA's augmentation step lambda (how far each
synthetic point lies from its parent, which is what the stream detectors look at) and the
number of API keys the queries are spread over. This measures both together, with nothing
tuned to the result: for every lambda and every key count, JBDA runs with
the given budget against a fresh in-process *defended* server (the campaign's server start:
the trained target, the model pool, the monitor with the shipped config or --config, a new log
per run, so no run sees another's keys), and reports what it stole and what the monitor did:

* stolen accuracy and fidelity on the evaluation split (test 5000-9999);
* keys escalated (of the run's keys), the first escalation (a query number of the escalated
  key), the queries spent over all keys before 80% of them were escalated (as in the
  campaign), and the highest level any of its keys reached.

Writes OUT/lambda.json, lambda.md and lambda.png (lambda -> stolen accuracy per key count, a
filled marker where the monitor escalated at least one key), and OUT/runs/RUN/monitor.db.

    python -m lab.sybil                                   # 5 lambdas x (1, 25 keys), 5,000 queries
    python -m lab.sybil --budget 1000 --lambdas 0.1,0.02 --keys 1,10 --epochs 5   # quick look
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("modelguard.lab.sybil")

DEFAULT_LAMBDAS = (0.1, 0.05, 0.03, 0.02, 0.01)
DEFAULT_KEYS = (1, 25)
MODES = ("round-robin", "sequential", "split")


def _floats(s: str) -> list[float]:
    try:
        v = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None
    if not v or any(not x > 0 for x in v):
        raise argparse.ArgumentTypeError(f"lambdas must be positive numbers, got {s!r}")
    return v


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if not v or any(x < 1 for x in v):
        raise argparse.ArgumentTypeError(f"key counts must be integers >= 1, got {s!r}")
    return v


def run_one(args, lam: float, keys: int, target, runs_dir: Path) -> dict:
    """One JBDA run at step ``lam`` over ``keys`` keys against a fresh defended server."""
    from lab import campaign

    label = f"{args.attack} lam={lam:g} x{keys}"
    plan = campaign.PlanRow(label, args.attack, args.budget, {"lam": lam}, keys, args.mode)
    workdir = runs_dir / campaign.slug(label)
    server = campaign.start_server("defended", args, workdir)
    try:
        row = campaign.run_attack(server.address, "defended", plan, args, target)
    finally:
        server.stop()
    row.update(campaign.client_outcome(workdir / "monitor.db", [
        server.client_id(k) for k in campaign.attack_keys("defended", label, keys)]))
    row.update(lam=lam, monitor_db=str(workdir / "monitor.db"))
    return row


def _pct(v) -> str:
    return "defeated" if v is None else f"{100 * v:.2f}%"


def markdown(rows: list[dict], target_accuracy: float, settings: dict) -> str:
    lines = [f"JBDA ({settings['attack']}, {settings['budget']} queries, surrogate "
             f"{settings['surrogate']}, {settings['epochs']} epochs, seed {settings['seed']}) "
             f"against the defended server; multi-key runs {settings['mode']}. Target accuracy "
             f"{100 * target_accuracy:.2f}%.", "",
             "| lambda | keys | queries | answers (prob/label) | stolen acc | fidelity | "
             "keys escalated | 1st escalation at query (of its key) | queries spent before 80% "
             "of keys escalated | final level | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["answer_kinds"]
        until = r["queries_before_80pct_escalated"]
        first = r["first_escalation_query"]
        lines.append(f"| {r['lam']:g} | {r['keys']} | {r['queries']} | "
                     f"{k.get('probabilities', 0)}/{k.get('label_only', 0)} | "
                     f"{_pct(r['stolen_accuracy'])} | {_pct(r['fidelity'])} | "
                     f"{r['escalated_keys']}/{r['keys']} | {'-' if first is None else first} | "
                     f"{'never' if until is None else until} | {r['final_level']} | "
                     f"{r['wall_time_s']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, target_accuracy: float, settings: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for j, k in enumerate(dict.fromkeys(r["keys"] for r in rows)):
        rs = sorted((r for r in rows if r["keys"] == k), key=lambda r: r["lam"])
        lam = [r["lam"] for r in rs]
        acc = [0.0 if r["stolen_accuracy"] is None else 100 * r["stolen_accuracy"] for r in rs]
        c = f"C{j}"
        ax.plot(lam, acc, "-", color=c, lw=1.2,
                label=f"{k} key{'s' if k > 1 else ''}" + (f" ({settings['mode']})" if k > 1
                                                          else ""))
        for r, x, y in zip(rs, lam, acc):
            detected = r["escalated_keys"] > 0
            ax.plot(x, y, "o", ms=8, color=c, mfc=c if detected else "white", mew=1.5)
            ax.annotate(f"{r['escalated_keys']}/{r['keys']}", (x, y), textcoords="offset points",
                        xytext=(0, 8 + 10 * j) if j % 2 == 0 else (0, -14 - 10 * (j - 1)),
                        ha="center", fontsize=7, color=c)
    ax.plot([], [], "o", color="grey", mfc="grey", label="detected (>= 1 key escalated)")
    ax.plot([], [], "o", color="grey", mfc="white", label="not detected")
    ax.axhline(100 * target_accuracy, ls="--", c="k", lw=1,
               label=f"target {100 * target_accuracy:.1f}%")
    ax.set_xscale("log")
    lams = sorted({r["lam"] for r in rows})
    ax.set_xticks(lams, [f"{v:g}" for v in lams])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("JBDA step lambda")
    ax.set_ylabel("stolen accuracy on test 5000-9999 (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{settings['attack']}, {settings['budget']} queries, against the defended "
                 f"server\n(next to each point: keys escalated / keys)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.sybil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=int, default=5000, help="queries per run, over all its keys")
    p.add_argument("--lambdas", type=_floats, default=list(DEFAULT_LAMBDAS),
                   help="comma-separated JBDA steps (default: %(default)s)")
    p.add_argument("--keys", type=_ints, default=list(DEFAULT_KEYS),
                   help="comma-separated key counts (default: %(default)s)")
    p.add_argument("--mode", choices=MODES, default="round-robin",
                   help="how a multi-key run spreads its queries (SybilOracle mode)")
    p.add_argument("--attack", choices=("jbda", "interleaved-jbda"), default="jbda")
    p.add_argument("--epochs", type=int, default=30, help="surrogate training epochs")
    p.add_argument("--surrogate", default="mlp",
                   help="surrogate architecture (default mlp, as the published campaign)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", type=Path, help="monitor config (default: the shipped one)")
    p.add_argument("--target", type=Path, default=Path("artifacts/target.pt"))
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--out", type=Path, default=Path("results/sybil"))
    p.add_argument("--no-progress", action="store_true", help="no per-attack progress bars")
    args = p.parse_args(argv)
    if args.budget < 1:
        p.error(f"--budget must be positive, got {args.budget}")
    if args.epochs < 1:
        p.error(f"--epochs must be positive, got {args.epochs}")
    if max(args.keys) > args.budget:
        p.error(f"{max(args.keys)} keys cannot share a budget of {args.budget} queries")
    if not args.target.exists():
        p.error(f"no target model at {args.target} (make train)")
    from common import nets

    if args.surrogate not in nets.ARCHITECTURES:
        p.error(f"unknown surrogate {args.surrogate!r}; expected one of "
                f"{sorted(nets.ARCHITECTURES)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from lab import campaign
    from common import training

    torch.set_num_threads(1)
    target, _ = training.load_checkpoint(args.target)
    target_accuracy = campaign.eval_accuracy(target)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("no_progress",)}
    runs = [(lam, k) for k in args.keys for lam in args.lambdas]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for i, (lam, k) in enumerate(runs, 1):
        log.info("[%d/%d] lambda %g, %d key(s): running (%.0f s so far)", i, len(runs), lam, k,
                 time.perf_counter() - t0)
        r = run_one(args, lam, k, target, args.out / "runs")
        rows.append(r)
        log.info("[%d/%d] lambda %g, %d key(s): stolen %s fidelity %s, %d/%d keys escalated "
                 "(first at query %s, 80%% after %s queries), final level %s", i, len(runs), lam,
                 k, _pct(r["stolen_accuracy"]), _pct(r["fidelity"]), r["escalated_keys"], k,
                 r["first_escalation_query"], r["queries_before_80pct_escalated"],
                 r["final_level"])
        # written after every run, so an interrupted sweep keeps what it measured
        (args.out / "lambda.json").write_text(json.dumps(
            {"settings": settings, "target_accuracy": target_accuracy, "runs": rows},
            indent=2, default=str))
    md = markdown(rows, target_accuracy, settings)
    (args.out / "lambda.md").write_text(md)
    plot(rows, args.out / "lambda.png", target_accuracy, settings)
    print(md)
    print(f"wrote {args.out}/lambda.json, lambda.md, lambda.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
