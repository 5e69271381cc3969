"""``python -m lab.dp``: differential privacy on the model's parameters (issue 15), measured.

The original course project's third defence: train the target with DP-SGD instead of
perturbing its answers. For the non-private target (ARTIFACTS/target.pt), DP-SGD targets at
several budgets (ARTIFACTS/dp/epsE.pt; ``python -m service train --dp-epsilon E`` trains one
alone) and a control, the DP-SGD recipe with clipping but no noise (ARTIFACTS/dp/noise0.pt),
all trained here when missing, in process, under the evaluation protocol:

- target accuracy on the evaluation set (Fashion-MNIST test 5000-9999);
- what DP is meant to bound: a loss-threshold membership inference on the target (AUC of
  -loss, train images 0-9999 as members against the 10,000 test images as non-members);
- Copycat on probabilities and on labels and Papernot's JBDA, 5,000 queries from the pool
  (test 0-4999), each answered by that target: stolen accuracy (vs the true labels) and fidelity
  (agreement with that target) on the evaluation set;
- the DAWN watermark proof on a copy: Copycat (probabilities) through that target's watermarked
  API, checked by ``service.defences.verify`` (keyed and unconditional binomial p-values), with
  models that never saw a watermarked answer as the nulls;
- each DP target as a model of the non-private target's switching pool (policy ``switch``,
  models [target, dp_epsE]): honest accuracy and Copycat against it.

Writes results/dp/dp.json and results/dp/dp.md. Every training is seeded: a rerun gives the
same numbers.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from client.oracle import Oracle

BENCH_KEY = b"modelguard-bench-key"   # the same key as lab.defences' watermark demo


def add_arguments(ap) -> None:
    ap.add_argument("--artifacts", type=Path,
                    default=Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts")))
    ap.add_argument("--out", type=Path, default=Path("results/dp"))
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0],
                    help="privacy budgets of the DP targets (default 8 3 1)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--no-baseline", action="store_true", help="skip the non-private target")
    ap.add_argument("--no-control", action="store_true",
                    help="skip the control: the DP-SGD recipe (clipping) without noise")
    ap.add_argument("--retrain", action="store_true",
                    help="retrain the DP targets even when their checkpoints exist")
    ap.add_argument("--budget", type=int, default=5000)
    ap.add_argument("--surrogate", default="mlp", help="the attacks' surrogate (default mlp)")
    ap.add_argument("--epochs", type=int, default=30, help="surrogate training epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wm-rate", type=float, default=0.005, help="watermark rate (0.5%%)")
    ap.add_argument("--wm-surrogates", nargs="*", default=["mlp", "cnn"],
                    help="surrogates of the watermarked copies (none: skip the watermark)")
    ap.add_argument("--wm-epochs", type=int, default=30)
    ap.add_argument("--no-switch", action="store_true",
                    help="skip the switching-pool rows (target + each DP target)")
    ap.add_argument("--tune", action="store_true",
                    help="only the recipe search (TUNE_CONFIGS on a held-out train slice)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def ensure_targets(args, log=print) -> list[tuple[str, Path]]:
    """(row name, checkpoint) for the non-private target and each budget, training what is
    missing."""
    from service.defences.pool import dp_path
    from service.train import train_dp_target, train_target

    out = []
    if not args.no_baseline:
        path = args.artifacts / "target.pt"
        if not path.exists():
            log(f"training the non-private target -> {path}")
            train_target(path, progress=not args.no_progress, threads=args.threads)
        out.append(("non-private", path))
    if not args.no_control:
        path = args.artifacts / "dp" / "noise0.pt"
        if args.retrain or not path.exists():
            log(f"training the control (the DP-SGD recipe with clipping, no noise) -> {path}")
            train_dp_target(path, noise_multiplier=0.0, delta=args.delta,
                            progress=not args.no_progress, threads=args.threads)
        out.append(("DP-SGD recipe, no noise (control)", path))
    for eps in sorted(args.epsilons, reverse=True):
        path = dp_path(args.artifacts, eps)
        if args.retrain or not path.exists():
            log(f"training the DP-SGD target for epsilon {eps:g} -> {path}")
            meta = train_dp_target(path, epsilon=eps, delta=args.delta,
                                   progress=not args.no_progress, threads=args.threads)
            log(f"  epsilon {meta['dp']['epsilon']:.3f} (noise multiplier "
                f"{meta['dp']['noise_multiplier']:.3f}), test accuracy "
                f"{meta['test_accuracy']:.4f}, {meta['train_seconds']} s")
        out.append((f"DP-SGD eps {eps:g}", path))
    return out


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------

def membership_auc(model, members, nonmembers) -> dict:
    """Loss-threshold membership inference (Yeom et al. 2018): score = -cross-entropy; AUC of
    members against non-members, and the best balanced advantage TPR - FPR."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from common import training

    def losses(split):
        p = training.predict_proba(model, split.x)
        return -np.log(np.clip(p[np.arange(len(split)), split.y], 1e-12, 1.0))

    score = np.concatenate([-losses(members), -losses(nonmembers)])
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    fpr, tpr, _ = roc_curve(truth, score)
    return {"members": len(members), "nonmembers": len(nonmembers),
            "auc": float(roc_auc_score(truth, score)),
            "advantage": float(np.max(tpr - fpr))}


class AnswerOracle(Oracle):
    """Answers with the target's probabilities through an answer policy (default identity:
    what the server sends an undefended client) and a watermark (None: off), as the server
    does; keeps the watermarked records (images, labels sent) for the verifier."""

    def __init__(self, proba, budget: int, policy=None, watermark=None):
        from service.defences import build_policy

        super().__init__(budget)
        self.proba = proba
        self.policy = policy or build_policy({"policy": "identity"})
        self.watermark = watermark
        self.records: list[tuple[np.ndarray, np.ndarray]] = []

    def _query(self, images):
        from service.defences.base import PolicyContext

        x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
        p = np.asarray(self.proba(x), np.float32)
        ctx = PolicyContext("attacker", BENCH_KEY)
        ans = self.policy.answer(x, p, ctx)
        if self.watermark is not None:
            ans = self.watermark.apply(x, ans, ctx)
            if ans.watermarked.any():
                self.records.append((x[ans.watermarked], ans.labels[ans.watermarked]))
        return ans


def measure(name: str, path: Path, args, pool, ev, members, nonmembers) -> dict:
    from client.attacks.copycat import Copycat, CopycatLabels
    from client.attacks.jbda import JBDA
    from client.evaluate import evaluate
    from common import training
    from service.defences import Watermark, verify

    t0 = time.perf_counter()
    target, meta = training.load_checkpoint(path)
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    progress = not args.no_progress
    row = {"row": name, "checkpoint": str(path), "dp": meta.get("dp"),
           "test_accuracy": meta.get("test_accuracy"),
           "train_items": meta.get("train_items"),
           "train_seconds": meta.get("train_seconds")}
    row["membership"] = membership_auc(target, members, nonmembers)
    pe = training.predict_proba(target, ev.x)
    row["eval_mean_top1_confidence"] = float(pe.max(1).mean())
    row["eval_mean_entropy_nats"] = float(-(pe * np.log(np.clip(pe, 1e-12, 1))).sum(1).mean())

    def cfg(epochs):
        return training.TrainConfig(epochs=epochs, batch_size=64, seed=args.seed,
                                    progress=progress)

    attacks = {
        "copycat": (Copycat, {"pool": pool}),
        "copycat_labels": (CopycatLabels, {"pool": pool}),
        # as lab.bench_attacks runs it: 150 seeds, lambda 0.1, rounds of epochs // 4
        "jbda": (JBDA, {"pool": pool, "round_epochs": max(1, args.epochs // 4)}),
    }
    surrogates = {}
    for key, (cls, kw) in attacks.items():
        res = cls(AnswerOracle(proba, args.budget), args.budget, seed=args.seed,
                  surrogate=args.surrogate, train_config=cfg(args.epochs), progress=progress,
                  **kw).run()
        ev_res = evaluate(res.surrogate, target, ev)
        row["target_accuracy"] = ev_res["target_accuracy"]
        row[key] = {"stolen_accuracy": ev_res["stolen_accuracy"],
                    "fidelity": ev_res["fidelity"], "queries": res.queries_used}
        surrogates[key] = res.surrogate
        print(f"  {name} {key}: stolen {ev_res['stolen_accuracy']:.4f}, fidelity "
              f"{ev_res['fidelity']:.4f} (target {ev_res['target_accuracy']:.4f})", flush=True)

    row["watermark"] = {}
    wm = Watermark(BENCH_KEY, args.wm_rate)
    for arch in args.wm_surrogates:
        oracle = AnswerOracle(proba, args.budget, watermark=wm)
        res = Copycat(oracle, args.budget, pool=pool, seed=args.seed, surrogate=arch,
                      train_config=cfg(args.wm_epochs), progress=progress).run()
        rx = np.concatenate([r[0] for r in oracle.records])
        ry = np.concatenate([r[1] for r in oracle.records])

        def check(model):
            return verify(images=rx, labels_sent=ry, key=BENCH_KEY, rate=args.wm_rate,
                          client_ids=["attacker"] * len(ry),     # the oracle's client
                          predict=lambda x: training.predict_proba(model, x)).as_dict()

        ev_res = evaluate(res.surrogate, target, ev)
        entry = {"surrogate": arch, "epochs": args.wm_epochs,
                 "stolen_accuracy": ev_res["stolen_accuracy"], "fidelity": ev_res["fidelity"],
                 "verify": check(res.surrogate), "nulls": {"the target itself": check(target)}}
        if arch == args.surrogate and args.wm_epochs == args.epochs:
            entry["nulls"]["copycat through the un-watermarked API"] = check(
                surrogates["copycat"])
        row["watermark"][arch] = entry
        v = entry["verify"]
        print(f"  {name} watermark, {arch} copy: {v['matches']}/{v['total']} reproduced, "
              f"p {v['p_value']:.3g}, keyed p {v['p_value_keyed']:.3g}", flush=True)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def measure_switch(eps: float, args, pool, ev) -> dict:
    """The served non-private target with the DP target for ``eps`` in its switching pool
    (policy switch, models [target, dp_epsE], keyed routing) applied to every answer: what honest
    clients get, and Copycat (probabilities, labels) against it; fidelity is to the served
    non-private target."""
    from client.attacks.copycat import Copycat, CopycatLabels
    from client.evaluate import evaluate
    from common import training
    from service.defences import PolicyContext, build_policy
    from service.defences.pool import DP_PREFIX

    t0 = time.perf_counter()
    target, _ = training.load_checkpoint(args.artifacts / "target.pt")
    proba = lambda x: training.predict_proba(target, x)  # noqa: E731
    models = ["target", f"{DP_PREFIX}{eps:g}"]
    policy = build_policy({"policy": "switch", "models": models}, artifacts=args.artifacts)
    x = pool.x.astype(np.float32) / 255.0
    honest = policy.answer(x, proba(x), PolicyContext("honest", BENCH_KEY))
    row = {"row": f"switch (target, {models[1]})", "models": models,
           "honest_accuracy": float(np.mean(honest.labels == pool.y)),
           "honest_label_changed": float(np.mean(honest.labels != proba(x).argmax(1)))}
    for key, cls in (("copycat", Copycat), ("copycat_labels", CopycatLabels)):
        res = cls(AnswerOracle(proba, args.budget, policy=policy), args.budget, pool=pool,
                  seed=args.seed, surrogate=args.surrogate, progress=not args.no_progress,
                  train_config=training.TrainConfig(epochs=args.epochs, batch_size=64,
                                                    seed=args.seed,
                                                    progress=not args.no_progress)).run()
        e = evaluate(res.surrogate, target, ev)
        row[key] = {"stolen_accuracy": e["stolen_accuracy"], "fidelity": e["fidelity"]}
        row["target_accuracy"] = e["target_accuracy"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"  {row['row']}: honest {row['honest_accuracy']:.4f}, copycat "
          f"{row['copycat']['stolen_accuracy']:.4f}/{row['copycat']['fidelity']:.4f}, labels "
          f"{row['copycat_labels']['stolen_accuracy']:.4f}/"
          f"{row['copycat_labels']['fidelity']:.4f}", flush=True)
    return row


# The DP-SGD recipes tried (service.train.DP_DEFAULTS is the best): (expected batch, epochs,
# optimizer, lr); clip 1.0, epsilon 3, delta 1e-5, seed 0.
TUNE_CONFIGS = [(256, 20, "sgd", 0.05), (256, 20, "adam", 1e-3), (1024, 30, "adam", 2e-3),
                (1024, 30, "sgd", 0.2), (512, 20, "sgd", 0.1), (1024, 40, "sgd", 0.2),
                (2048, 40, "sgd", 0.4), (1024, 30, "sgd", 0.4)]
TUNE_TRAIN = 55000   # train on train 0-54999, validate on train 55000-59999 (not the test split)


def tune(args) -> int:
    """``--tune``: how the DP-SGD recipe was chosen. Each recipe of TUNE_CONFIGS trained at
    epsilon 3 on train 0-54999 and scored on train 55000-59999; writes results/dp/tune.json
    and tune.md. (The choice itself is not accounted in epsilon: docs/dp.md.)"""
    import torch

    from common import data, nets, training

    torch.set_num_threads(args.threads)
    train = data.load("fashion", "train")
    fit, val = train.take(TUNE_TRAIN), data.Split(train.x[TUNE_TRAIN:], train.y[TUNE_TRAIN:])
    rows = []
    for bs, epochs, opt, lr in TUNE_CONFIGS:
        t0 = time.perf_counter()
        training.seed_everything(args.seed)
        model, privacy = training.train_dp(nets.build("mlp"), fit.x, fit.y, training.DPConfig(
            epochs=epochs, batch_size=bs, lr=lr, optimizer=opt, max_grad_norm=1.0,
            delta=args.delta, target_epsilon=3.0, seed=args.seed,
            progress=not args.no_progress, desc=f"tune bs {bs} {opt} lr {lr:g}"))
        acc = training.accuracy(training.predict_proba(model, val.x).argmax(1), val.y)
        rows.append({"batch_size": bs, "epochs": epochs, "optimizer": opt, "lr": lr,
                     "epsilon": privacy["epsilon"], "noise_multiplier":
                     privacy["noise_multiplier"], "val_accuracy": acc,
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(f"batch {bs}, {epochs} epochs, {opt} lr {lr:g}: sigma "
              f"{privacy['noise_multiplier']:.3f}, validation accuracy {acc:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tune.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| expected batch | epochs | optimizer | lr | noise σ (ε 3) | validation acc |",
             "|---|---|---|---|---|---|"]
    best = max(rows, key=lambda r: r["val_accuracy"])
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        lines.append(f"| {r['batch_size']} | {r['epochs']} | {r['optimizer']} | {r['lr']:g} | "
                     f"{r['noise_multiplier']:.3f} | {_pct(r['val_accuracy'])}{mark} |")
    (args.out / "tune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _eps(row) -> str:
    dp = row.get("dp")
    if not dp:
        return "∞ (no DP)"
    if dp["epsilon"] is None:
        return "∞ (σ 0)"
    return f"{dp['epsilon']:.2f} (σ {dp['noise_multiplier']:.2f})"


def markdown(rows: list[dict], switch_rows: list[dict], args) -> str:
    wm_archs = list(args.wm_surrogates)
    dp = next((r["dp"] for r in rows if r.get("dp")), None) or {}
    recipe = ("" if not dp else
              f"DP-SGD: {dp['epochs']} epochs, expected batch {dp['expected_batch_size']:.0f}, "
              f"{dp['optimizer']} lr {dp['lr']:g}, clip {dp['max_grad_norm']:g}, delta "
              f"{dp['delta']:g}, {dp['accountant'].upper()} accountant ({dp['library']}). ")
    lines = [
        "# Differential privacy on the parameters (DP-SGD) against model stealing", "",
        "Targets: the target MLP trained on "
        + ", ".join(sorted({f"{r.get('train_items') or 0:,}" for r in rows}))
        + " train images, without and with DP-SGD. "
        + recipe + f"Attacks: {args.budget:,} queries from test 0-4999, surrogate "
        f"'{args.surrogate}', {args.epochs} epochs, seed {args.seed}; stolen accuracy (vs the "
        "true labels) and fidelity (agreement with that target) in % on test 5000-9999. "
        f"Watermark: rate {args.wm_rate:g} on that target's answers, Copycat (probabilities) "
        f"through them, {args.wm_epochs} epochs; keyed binomial p-value, matches/records "
        "(ownership shown at p < 1e-6). Membership: loss-threshold attack on the target, train "
        "0-9999 (members) vs the 10,000 test images.", "",
        "| target | ε spent (noise σ) | target acc | membership AUC | copycat probs: stolen / "
        "fidelity | copycat labels: stolen / fidelity | JBDA: stolen / fidelity | "
        + " | ".join(f"watermark p, {a} copy" for a in wm_archs) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(wm_archs),
    ]
    for r in rows:
        cells = [r["row"], _eps(r), _pct(r["target_accuracy"]),
                 f"{r['membership']['auc']:.3f}"]
        for key in ("copycat", "copycat_labels", "jbda"):
            cells.append(f"{_pct(r[key]['stolen_accuracy'])} / {_pct(r[key]['fidelity'])}")
        for a in wm_archs:
            v = r["watermark"][a]["verify"]
            cells.append(f"{v['p_value_keyed']:.2g} ({v['matches']}/{v['total']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    nulls = [(r["row"], a, n, v) for r in rows for a in wm_archs
             for n, v in r["watermark"][a]["nulls"].items()]
    if nulls:
        worst = min(nulls, key=lambda t: t[3]["p_value_keyed"])
        lines += [f"Nulls (models that never saw a watermarked answer, checked on the same "
                  f"records): {len(nulls)} checks, smallest keyed p-value "
                  f"{worst[3]['p_value_keyed']:.2g} ({worst[2]}, {worst[0]}).", ""]
    if switch_rows:
        lines += ["## A DP target in the switching pool of the non-private target", "",
                  "Policy `switch` (keyed routing, half the images to each model) applied to "
                  "every answer of the served non-private target; honest accuracy on the pool; "
                  "fidelity to the non-private target.", "",
                  "| policy | honest accuracy | labels changed | copycat probs: stolen / "
                  "fidelity | copycat labels: stolen / fidelity |", "|---|---|---|---|---|"]
        for r in switch_rows:
            lines.append(f"| {r['row']} | {_pct(r['honest_accuracy'])} | "
                         f"{_pct(r['honest_label_changed'])} | "
                         f"{_pct(r['copycat']['stolen_accuracy'])} / "
                         f"{_pct(r['copycat']['fidelity'])} | "
                         f"{_pct(r['copycat_labels']['stolen_accuracy'])} / "
                         f"{_pct(r['copycat_labels']['fidelity'])} |")
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    import torch

    from common import data

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    targets = ensure_targets(args)
    pool, ev = data.attack_pool(), data.eval_set()
    members = data.load("fashion", "train").take(10000)
    nonmembers = data.load("fashion", "test")
    rows = []
    for name, path in targets:
        print(f"{name} ({path})", flush=True)
        rows.append(measure(name, path, args, pool, ev, members, nonmembers))
    switch_rows = []
    if not args.no_switch and (args.artifacts / "target.pt").exists():
        print("the DP targets in the non-private target's switching pool", flush=True)
        switch_rows = [measure_switch(eps, args, pool, ev)
                       for eps in sorted(args.epsilons, reverse=True)]
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k != "func"},
              "rows": rows, "switch": switch_rows,
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    (args.out / "dp.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(rows, switch_rows, args)
    (args.out / "dp.md").write_text(md + "\n")
    print(md)
    print(f"wrote {args.out}/dp.json and dp.md in {result['wall_time_s']} s")
    return 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.dp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    return tune(args) if args.tune else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
