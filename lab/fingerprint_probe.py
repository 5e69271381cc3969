"""``python -m lab.fingerprint_probe``: do conferrable adversarial examples (Lukas et al., ICLR
2021) tell the lab's copies of the target from independently trained models? (issue #12: a
second kind of evidence that needs no changed answers, for the copy trained with 2 px shifts and
flips, which per-image watermarks cannot prove.)

The defender's side: 4 surrogates trained on the target's answers over train images 0-9,999
(MLP, deep MLP, CNN, MLP with 2 px shifts + flips) and 4 references trained on the true labels
of train images 10,000-19,999 (the same four recipes). From 2,000 train images (30,000-43,999)
it searches, within an L-inf ball of ``eps``, inputs that the target and the surrogates label
with the target's second class and the references do not (150 Adam steps on the target's and
surrogates' log-probability of that class plus twice the references' log(1 - p)); it keeps those
the target and >= 3 of 4 surrogates label so and <= 1 of 4 references does.

The evaluation models: copies trained on the target's answers over the attack pool (test
0-4,999: MLP, CNN, wide MLP, MLP with 2 px shifts + flips, with 1 px shifts, on labels only) and
clean models (MLPs of three seeds on other train images, a CNN and a deep MLP, an MLP on the
pool's true labels, an MLP with 2 px shifts + flips on true labels). Printed: each model's
accuracy (test 5,000-9,999) and how often it gives the target's label on the first 200 kept
examples. About 17 minutes per eps on 2 cores.

    python -m lab.fingerprint_probe [--epochs 15] [--eps 0.08,0.15] [--steps 150]   # ~17 min per eps
"""
import argparse
import time

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.fingerprint_probe",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=15, help="epochs of the defender's models")
    ap.add_argument("--eps", default="0.08,0.15")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--artifacts", default="artifacts")
    a = ap.parse_args(argv)
    import torch
    import torch.nn.functional as F

    from common import data, training
    from lab.attribution import _train, train_augmented
    torch.set_num_threads(2)
    EP = a.epochs
    t0 = time.time()
    def log(m): print(f"[{time.time()-t0:6.1f}s] {m}", flush=True)
    target, _ = training.load_checkpoint(f"{a.artifacts}/target.pt"); target.eval()
    tr = data.load("fashion", "train"); te = data.load("fashion", "test")
    f = lambda x: x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x
    Xtr, ytr = f(tr.x), tr.y
    pool = f(te.x[:5000]); Xev, yev = f(te.x[5000:]), te.y[5000:]
    P = lambda m, x: training.predict_proba(m, x)
    # defender's models: surrogates on the target's answers over train images 0-9999; references on true labels 10000-19999
    rs = np.random.default_rng(0)
    xs = Xtr[:10000]; ps = P(target, xs)
    sur = [_train("mlp", xs, ps, EP, 11), _train("deep_mlp", xs, ps, EP, 12), _train("cnn", xs, ps, EP // 2, 13),
           train_augmented(xs, ps, EP, 14, shift=2, flips=True)]
    xr, yr = Xtr[10000:20000], ytr[10000:20000]
    ref = [_train("mlp", xr, yr, EP, 21), _train("deep_mlp", xr, yr, EP, 22), _train("cnn", xr, yr, EP // 2, 23),
           train_augmented(xr, np.eye(10, dtype=np.float32)[yr], EP, 24, shift=2, flips=True)]
    log("defender models trained")
    # evaluation models: copies through the pool (attack protocol) and clean models (other data/seeds)
    pp = P(target, pool)
    copies = {"copy-mlp": _train("mlp", pool, pp, 30, 1), "copy-cnn": _train("cnn", pool, pp, 15, 2),
              "copy-wide": _train("mlp", pool, pp, 30, 3, hidden=512),
              "copy-aug2flip": train_augmented(pool, pp, 30, 4, shift=2, flips=True),
              "copy-aug1": train_augmented(pool, pp, 30, 5, shift=1, flips=False),
              "copy-labels-mlp": _train("mlp", pool, np.eye(10, dtype=np.float32)[pp.argmax(1)], 30, 6)}
    clean = {f"clean-mlp-s{s}": _train("mlp", Xtr[20000 + 8000 * i:28000 + 8000 * i], ytr[20000 + 8000 * i:28000 + 8000 * i], 20, s) for i, s in enumerate((31, 32, 33))}
    clean["clean-cnn"] = _train("cnn", Xtr[44000:60000], ytr[44000:60000], 8, 34)
    clean["clean-deep"] = _train("deep_mlp", Xtr[44000:60000], ytr[44000:60000], 20, 35)
    clean["clean-pool-true"] = _train("mlp", pool, te.y[:5000], 30, 36)
    clean["clean-aug2flip-true"] = train_augmented(Xtr[20000:30000], np.eye(10, dtype=np.float32)[ytr[20000:30000]], 20, 37)
    for n, m in {**copies, **clean}.items():
        log(f"  {n}: acc {training.accuracy(P(m, Xev).argmax(1), yev):.3f}")
    log("evaluation models trained")

    def cae(seeds_x, eps, steps, lr=0.01):
        x0 = torch.from_numpy(seeds_x.reshape(-1, 1, 28, 28))
        with torch.no_grad():
            y0 = target(x0).argmax(1)
            t = target(x0).softmax(1).clone(); t[torch.arange(len(t)), y0] = -1; tcls = t.argmax(1)  # target's 2nd class
        d = torch.zeros_like(x0, requires_grad=True)
        opt = torch.optim.Adam([d], lr=lr)
        for _ in range(steps):
            x = (x0 + d).clamp(0, 1)
            lt = F.log_softmax(target(x), 1)[torch.arange(len(x)), tcls]
            ls = torch.stack([F.log_softmax(m(x), 1)[torch.arange(len(x)), tcls] for m in sur]).mean(0)
            pr = torch.stack([F.softmax(m(x), 1)[torch.arange(len(x)), tcls] for m in ref])
            lr_ = torch.log1p(-pr.clamp(max=1 - 1e-6)).mean(0)
            loss = -(lt + ls + 2.0 * lr_).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            with torch.no_grad(): d.clamp_(-eps, eps)
        with torch.no_grad():
            x = (x0 + d).clamp(0, 1)
            ok = target(x).argmax(1) == tcls
            s_ok = torch.stack([m(x).argmax(1) == tcls for m in sur]).float().mean(0)
            r_ok = torch.stack([m(x).argmax(1) == tcls for m in ref]).float().mean(0)
        keep = (ok & (s_ok >= 0.75) & (r_ok <= 0.25)).numpy()
        return x.numpy()[keep], tcls.numpy()[keep]

    for m in sur + ref + list(copies.values()) + list(clean.values()):
        m.eval()
        for p in m.parameters(): p.requires_grad_(False)
    seeds = Xtr[rs.choice(np.arange(30000, 44000), 2000, replace=False)]
    for eps in [float(e) for e in a.eps.split(",")]:
        X, T = cae(seeds, eps, a.steps)
        log(f"eps {eps}: {len(X)} CAEs kept of {len(seeds)}")
        if len(X) == 0: continue
        X, T = X[:200], T[:200]
        for n, m in {**copies, **clean}.items():
            agree = (P(m, X).argmax(1) == T).mean()
            log(f"   eps {eps} {n:22s} agrees with the target on {agree:.1%} of {len(X)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
