"""``python -m lab.defences``: measure each policy applied to ALL answers, in process (no gRPC),
on real Fashion-MNIST:

- honest accuracy: accuracy (vs the true labels) of the labels honest clients receive for the
  5,000 pool images; also how often the label differs from the target's own decision;
- the original attack (Copycat, 5,000 queries, trained on the returned probabilities) and its
  label-only variant (CopycatLabels): stolen accuracy and fidelity on the evaluation set;
- the watermark demo: a copycat stolen through the watermarked API, checked by the verifier,
  against models that did not see watermarked answers.

Surrogate trainings with byte-identical training data are computed once and reused (training is
deterministic): e.g. the label-only attack sees the same labels under every argmax-preserving
policy.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

ROWS: list[tuple[str, dict]] = [
    ("undefended (identity)", {"policy": "identity"}),
    ("gaussian sigma=0.05, argmax kept", {"policy": "gaussian", "sigma": 0.05}),
    ("gaussian sigma=0.2, argmax kept", {"policy": "gaussian", "sigma": 0.2}),
    ("gaussian sigma=0.2, free", {"policy": "gaussian", "sigma": 0.2, "preserve_argmax": False}),
    ("laplace scale=0.1, argmax kept", {"policy": "laplace", "scale": 0.1}),
    ("round 1 decimal", {"policy": "round", "decimals": 1}),
    ("top_k k=3", {"policy": "top_k", "k": 3}),
    ("top_k k=1", {"policy": "top_k", "k": 1}),
    ("reverse_sigmoid beta=1 gamma=0.2", {"policy": "reverse_sigmoid", "beta": 1.0, "gamma": 0.2}),
    ("label_only", {"policy": "label_only"}),
    ("switch (target, cnn, trees)", {"policy": "switch"}),
    ("switch (cnn, trees)", {"policy": "switch", "models": ["cnn", "trees"]}),
    ("misinformation blend tau=0.9", {"policy": "misinformation", "tau": 0.9}),
    ("misinformation replace", {"policy": "misinformation", "mode": "replace"}),
]
BENCH_KEY = b"modelguard-bench-key"


def add_arguments(ap) -> None:
    ap.add_argument("--artifacts", type=Path,
                    default=Path(os.environ.get("MODELGUARD_ARTIFACTS", "artifacts")))
    ap.add_argument("--out", type=Path, default=Path("results"))
    ap.add_argument("--epochs", type=int, default=10, help="surrogate training epochs")
    ap.add_argument("--surrogate", default="cnn")
    ap.add_argument("--budget", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=None,
                    help="only rows whose name contains one of these strings")
    ap.add_argument("--no-table", action="store_true", help="skip the policy table")
    ap.add_argument("--no-watermark", action="store_true", help="skip the watermark demo")
    ap.add_argument("--wm-rates", type=float, nargs="+", default=[0.005, 0.02])
    ap.add_argument("--wm-epochs", type=int, default=30,
                    help="surrogate epochs in the watermark demo (the attack's own default)")
    ap.add_argument("--wm-attacks", nargs="+", default=["copycat", "copycat_labels"],
                    choices=["copycat", "copycat_labels"])
    ap.add_argument("--independent-epochs", type=int, default=5)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")


class _Bench:
    def __init__(self, args):
        import torch

        from common import data, training

        torch.set_num_threads(args.threads)
        self.args = args
        self.training = training
        self.target, self.target_meta = training.load_checkpoint(args.artifacts / "target.pt")
        self.pool = data.attack_pool()
        self.eval = data.eval_set()
        self.cache: dict[str, object] = {}
        self.trainings = 0

    # ---- an oracle applying a policy (and optionally a watermark) to the target's answers ----
    def oracle(self, policy, budget, watermark=None, client="attacker"):
        from client.oracle import Oracle
        from service.defences.base import PolicyContext

        bench, target, training = self, self.target, self.training

        class PolicyOracle(Oracle):
            records: list = []

            def _query(self, images):
                x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images
                probs = training.predict_proba(target, x)
                ctx = PolicyContext(client, BENCH_KEY,
                                    np.random.default_rng([bench.args.seed, self.queries_used]))
                ans = policy.answer(x, probs, ctx)
                if watermark is not None:
                    ans = watermark.apply(x, ans, ctx)
                    if ans.watermarked.any():
                        self.records.append((x[ans.watermarked], ans.labels[ans.watermarked]))
                return ans

        o = PolicyOracle(budget)
        o.records = []
        return o

    def attack(self, cls, oracle, epochs: int | None = None):
        """Run attack ``cls`` (Copycat or CopycatLabels), reusing identical trainings."""
        from common import training

        bench = self
        epochs = epochs or self.args.epochs

        class Cached(cls):
            def fit(self, x, targets, model=None, desc="train surrogate"):
                h = hashlib.sha256()
                for part in (np.ascontiguousarray(x), np.ascontiguousarray(targets, np.float32)):
                    h.update(part.tobytes())
                h.update(repr((self.surrogate_arch, self.seed, epochs)).encode())
                key = h.hexdigest()
                if key not in bench.cache:
                    bench.trainings += 1
                    bench.cache[key] = super().fit(x, targets, model, desc)
                return bench.cache[key]

        cfg = training.TrainConfig(epochs=epochs, batch_size=64, seed=self.args.seed)
        att = Cached(oracle, self.args.budget, pool=self.pool, seed=self.args.seed,
                     surrogate=self.args.surrogate, train_config=cfg,
                     progress=not self.args.no_progress)
        return att.run()

    def evaluate(self, model) -> dict:
        from client.evaluate import evaluate

        return evaluate(model, self.target, self.eval)

    # ---- the policy table ----
    def table(self) -> list[dict]:
        from client.attacks.copycat import Copycat, CopycatLabels
        from service.defences import build_policy
        from service.defences.base import PolicyContext

        rows = ROWS
        if self.args.rows:
            rows = [r for r in ROWS if any(s in r[0] for s in self.args.rows)]
        x = self.pool.x.astype(np.float32) / 255.0
        tprobs = self.training.predict_proba(self.target, x)
        out = []
        for name, spec in rows:
            t0 = time.perf_counter()
            policy = build_policy(spec, artifacts=self.args.artifacts)
            honest = policy.answer(x, tprobs, PolicyContext("honest", BENCH_KEY,
                                                            np.random.default_rng(0)))
            row = {"row": name, "spec": spec,
                   "honest_accuracy": float(np.mean(honest.labels == self.pool.y)),
                   "honest_label_changed": float(np.mean(honest.labels != tprobs.argmax(1)))}
            if honest.probs is not None:
                row["honest_l1_to_target"] = float(np.abs(honest.probs - tprobs).sum(1).mean())
            for key, cls in (("copycat", Copycat), ("copycat_labels", CopycatLabels)):
                res = self.attack(cls, self.oracle(policy, self.args.budget))
                ev = self.evaluate(res.surrogate)
                row[f"{key}_stolen_accuracy"] = ev["stolen_accuracy"]
                row[f"{key}_fidelity"] = ev["fidelity"]
                row["target_accuracy"] = ev["target_accuracy"]
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                          if isinstance(v, float) and k != "seconds")
                  + f" ({row['seconds']} s)", flush=True)
            out.append(row)
        return out

    # ---- the watermark demo ----
    def watermark(self) -> dict:
        from client.attacks.copycat import Copycat, CopycatLabels
        from common import data, nets, training
        from service.defences import Watermark, build_policy, verify

        def predictor(m):
            return lambda x: training.predict_proba(m, x)

        # models that never saw a watermarked answer
        t0 = time.perf_counter()
        train = data.load("fashion", "train")
        indep = training.train(nets.build("mlp"), train.x, train.y, training.TrainConfig(
            epochs=self.args.independent_epochs, seed=12345, progress=not self.args.no_progress,
            desc="independent mlp"))
        indep_time = time.perf_counter() - t0
        nulls = {"independent MLP (train split, own seed)": indep, "target": self.target}
        try:
            cnn, _ = training.load_checkpoint(self.args.artifacts / "pool" / "cnn.pt")
            nulls["pool CNN (train split)"] = cnn
        except FileNotFoundError:
            pass
        ep = self.args.wm_epochs
        clean = self.attack(Copycat, self.oracle(build_policy({"policy": "identity"}),
                                                 self.args.budget), ep).surrogate
        nulls["copycat through the un-watermarked API"] = clean
        out = {"independent_train_s": round(indep_time, 1),
               "independent_eval": self.evaluate(indep), "rates": {}}
        for rate in self.args.wm_rates:
            wm = Watermark(BENCH_KEY, rate)
            res_rate = {}
            for key, cls in (("copycat", Copycat), ("copycat_labels", CopycatLabels)):
                if key not in self.args.wm_attacks:
                    continue
                oracle = self.oracle(build_policy({"policy": "identity"}), self.args.budget, wm)
                res = self.attack(cls, oracle, ep)
                rx = np.concatenate([r[0] for r in oracle.records])
                ry = np.concatenate([r[1] for r in oracle.records])
                ids = np.array(["attacker"] * len(ry))   # the oracle's client: marks are keyed
                r = verify(images=rx, labels_sent=ry, predict=predictor(res.surrogate),
                           key=BENCH_KEY, rate=rate, client_ids=ids)
                ev = self.evaluate(res.surrogate)
                res_rate[key] = {"verify": r.as_dict(), **ev}
                print(f"watermark rate {rate} {key}: {r.summary()}", flush=True)
                if "nulls" not in res_rate:
                    res_rate["nulls"] = {}
                    for nname, m in nulls.items():
                        rn = verify(images=rx, labels_sent=ry, predict=predictor(m), key=BENCH_KEY,
                                    rate=rate, client_ids=ids)
                        res_rate["nulls"][nname] = rn.as_dict()
                        print(f"   null {nname}: {rn.summary()}", flush=True)
                    path = self.args.out / f"wm_records_rate{rate}.npz"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.savez_compressed(path, images=rx, labels=ry,
                                        client_ids=np.array(["attacker"] * len(ry)))
                res.save_surrogate(self.args.out / f"wm_suspect_{key}_rate{rate}.pt")
            out["rates"][str(rate)] = res_rate
        clean_path = self.args.out / "wm_clean_copycat.pt"
        training.save_checkpoint(clean_path, clean, self.args.surrogate, {},
                                 {"note": "copycat through the un-watermarked API"})
        training.save_checkpoint(self.args.out / "wm_independent.pt", indep, "mlp", {},
                                 {"note": "independent model for the watermark demo"})
        return out


def _fmt(v) -> str:
    return f"{100 * v:.2f}%" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], wm: dict | None, args, target_meta: dict) -> str:
    lines = ["# Defences: each policy applied to all answers", "",
             f"Target {target_meta.get('arch')} (test accuracy "
             f"{target_meta.get('test_accuracy')}). Attacks: Copycat, {args.budget} queries "
             f"(Fashion-MNIST test 0-4999), surrogate '{args.surrogate}', {args.epochs} epochs, "
             "seed {args.seed}; evaluated on test 5000-9999.".replace("{args.seed}",
                                                                     str(args.seed)), ""]
    if rows:
        lines += ["| policy | honest accuracy | labels changed | copycat (probs) stolen acc | "
                  "fidelity | copycat (labels) stolen acc | fidelity |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append("| " + " | ".join([r["row"], _fmt(r["honest_accuracy"]),
                                            _fmt(r["honest_label_changed"]),
                                            _fmt(r["copycat_stolen_accuracy"]),
                                            _fmt(r["copycat_fidelity"]),
                                            _fmt(r["copycat_labels_stolen_accuracy"]),
                                            _fmt(r["copycat_labels_fidelity"])]) + " |")
        lines.append("")
    if wm:
        lines += ["## Watermark (DAWN-style) verification", "",
                  f"Surrogates trained {args.wm_epochs} epochs. Unconditional test: matches ~ "
                  "Binomial(records, 1/9). Keyed test: matches ~ Binomial(records where the "
                  "model departs from the honest label, 1/9).", "",
                  "| rate | model checked | matches / records | p-value | departures | "
                  "keyed p-value | verdict (alpha 1e-6) |",
                  "|---|---|---|---|---|---|---|"]
        for rate, res in wm["rates"].items():
            for key in ("copycat", "copycat_labels"):
                if key not in res:
                    continue
                v = res[key]["verify"]
                lines.append(f"| {rate} | {key} stolen through the watermarked API "
                             f"(stolen acc {_fmt(res[key]['stolen_accuracy'])}) | "
                             f"{v['matches']} / {v['total']} | {v['p_value']:.3g} | "
                             f"{v['disagreements']} | {v['p_value_keyed']:.3g} | "
                             f"{'stolen' if v['stolen'] else 'not shown'} |")
            for n, v in res["nulls"].items():
                lines.append(f"| {rate} | {n} | {v['matches']} / {v['total']} | "
                             f"{v['p_value']:.3g} | {v['disagreements']} | "
                             f"{v['p_value_keyed']:.3g} | "
                             f"{'stolen' if v['stolen'] else 'not shown'} |")
        lines.append("")
    return "\n".join(lines)


def run(args) -> int:
    t0 = time.perf_counter()
    b = _Bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.no_table else b.table()
    wm = None if args.no_watermark else b.watermark()
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k != "func"},
              "target": b.target_meta, "rows": rows, "watermark": wm,
              "surrogate_trainings": b.trainings,
              "wall_time_s": round(time.perf_counter() - t0, 1)}
    suffix = args.tag or ("" if not args.rows else "_partial")
    (args.out / f"defences{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(rows, wm, args, b.target_meta)
    (args.out / f"defences{suffix}.md").write_text(md + "\n")
    print(md)
    print(f"wrote {args.out}/defences{suffix}.json and .md in {result['wall_time_s']} s")
    return 0


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lab.defences", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
