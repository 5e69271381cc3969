"""Monitor benchmark and calibration: ``python -m lab.monitor_bench``.

Reports
  1. calibration on real Fashion-MNIST with the given config (default: monitor/default.toml):
     honest streams of the 5,000 pool images (in order, shuffled, sampled with repeats, class
     skewed) must never escalate; a Papernot JBDA stream from 150 seeds (stand-in generator
     below) and a Knockoff-style MNIST stream: queries until each level is reached;
  2. per-query observe() cost with 1k and 100k queries of one client's history.

The target is artifacts/target.pt when present (``--target``), else a quick MLP trained here.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from common.clock import FakeClock
from common.types import Answer, AnswerKind, Level


def get_target(path: str | None, seed: int = 0):
    import torch

    from common import data, nets, training
    torch.set_num_threads(1)
    if path and Path(path).exists():
        model, _ = training.load_checkpoint(path)
        return model, f"checkpoint {path}"
    tr = data.load("fashion", "train")
    m = nets.build("mlp")
    training.train(m, tr.x, tr.y, training.TrainConfig(epochs=3, batch_size=128, seed=seed,
                                                       progress=False))
    return m, "quick MLP trained by lab.monitor_bench (3 epochs)"


def proba(model, x: np.ndarray) -> np.ndarray:
    from common import training
    return training.predict_proba(model, x).astype(np.float32)


def to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


# --- streams ---------------------------------------------------------------------------------
def honest_streams(seed: int = 0) -> dict[str, np.ndarray]:
    from common import data
    pool = data.attack_pool()
    x, y = to_float(pool.x), pool.y
    rng = np.random.default_rng(seed)
    skew_w = np.where(y < 3, 5.0, 1.0)  # classes 0-2 five times as likely
    skew_w /= skew_w.sum()
    return {
        "honest-in-order": x,
        "honest-shuffled": x[rng.permutation(len(x))],
        "honest-with-repeats": x[rng.integers(0, len(x), len(x))],
        "honest-class-skew": x[rng.choice(len(x), len(x), p=skew_w)],
    }


def papernot_stream(target, n_seeds: int = 150, rounds: int = 6, lam: float = 0.1,
                    seed: int = 0) -> np.ndarray:
    """Papernot et al. 2017 JBDA (stand-in): seeds from the pool, a small surrogate trained on
    target labels, x + lam * sign(grad of the surrogate's predicted-class score), clipped to
    [0,1]; every round augments the whole current set. Returns the queries in order."""
    import torch

    from common import data, nets, training
    pool = data.attack_pool()
    rng = np.random.default_rng(seed)
    X = to_float(pool.x[rng.choice(len(pool), n_seeds, replace=False)])
    stream = [X]
    Y = proba(target, X).argmax(1)
    for r in range(rounds):
        training.seed_everything(seed + r)      # the surrogate's initial weights too
        sur = nets.build("mlp", hidden=64)
        training.train(sur, X, Y, training.TrainConfig(epochs=10, batch_size=32, seed=seed + r,
                                                       progress=False))
        xt = torch.from_numpy(X).requires_grad_(True)
        logits = sur(xt)
        logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
        new = np.clip(X + lam * np.sign(xt.grad.numpy()), 0.0, 1.0).astype(np.float32)
        stream.append(new)
        X = np.concatenate([X, new])
        Y = np.concatenate([Y, proba(target, new).argmax(1)])
    return np.concatenate(stream)


def mnist_stream(n: int = 5000, seed: int = 0) -> np.ndarray:
    from common import data
    m = data.ood_pool()
    rng = np.random.default_rng(seed)
    return to_float(m.x[rng.permutation(len(m))[:n]])


def random_perturbation_stream(n_seeds: int = 150, rounds: int = 5, lam: float = 0.1,
                               seed: int = 0) -> np.ndarray:
    """PRADA's random-perturbation baseline: like JBDA but x + lam * (random sign) each round
    (no surrogate), from ``n_seeds`` pool images. 150 * 2**rounds queries."""
    from common import data
    pool = data.attack_pool()
    rng = np.random.default_rng(seed)
    X = to_float(pool.x[rng.choice(len(pool), n_seeds, replace=False)])
    stream = [X]
    for _ in range(rounds):
        new = np.clip(X + lam * rng.choice([-1.0, 1.0], X.shape), 0, 1).astype(np.float32)
        stream.append(new)
        X = np.concatenate([X, new])
    return np.concatenate(stream)


# --- running a stream through the monitor -------------------------------------------------------
def fake_answer(probs: np.ndarray) -> Answer:
    return Answer(probs.argmax(1), probs, AnswerKind.PROBABILITIES)


def run_stream(monitor, client: str, x: np.ndarray, probs: np.ndarray, batch: int = 50) -> Level:
    """Feed a stream in batches of ``batch``, as a client would; returns the final level."""
    lvl = Level.NORMAL
    for i in range(0, len(x), batch):
        lvl = monitor.level(client)
        lvl = monitor.observe(client, f"r{i}", x[i:i + batch], probs[i:i + batch],
                              fake_answer(probs[i:i + batch]), lvl)
    return lvl


def escalations(monitor, client: str) -> list[dict]:
    monitor.flush()
    from monitor.log import QueryLog
    with QueryLog(monitor.db_path) as q:
        return q.transitions(client)


def calibrate(cfg, target, seed: int = 0, db_path=None) -> dict:
    from monitor import Monitor, QueryLog
    out = {}
    streams = dict(honest_streams(seed))
    t0 = time.time()
    streams["papernot-150-seeds"] = papernot_stream(target, seed=seed)
    streams["mnist-knockoff"] = mnist_stream(5000, seed)
    streams["random-perturbation"] = random_perturbation_stream(seed=seed)
    gen_s = time.time() - t0
    mon = Monitor(cfg, db_path, clock=FakeClock())
    try:
        for name, x in streams.items():
            p = proba(target, x)
            run_stream(mon, name, x, p)
            trs = escalations(mon, name)
            eng = mon._engines[name]
            with QueryLog(mon.db_path) as q:
                ser = q.series(name)
            ood = ser["s_ood"][cfg.detectors.ood.min_queries - 1:]
            ext = {"min_prada_W": np.nanmin(ser["s_prada"]), "max_ood_share": np.nanmax(ood),
                   "min_similarity": np.nanmin(ser["s_similarity"]),
                   "max_volume": np.nanmax(ser["s_volume"])}
            out[name] = {"queries": len(x), "final_level": eng.level.name,
                         "extremes": {k: round(float(v), 4) for k, v in ext.items()},
                         "first_reached": {tr["to_level"].name: tr["qn"] for tr in trs},
                         "rules": [f"q{tr['qn']}: {tr['from_level'].name}->{tr['to_level'].name}"
                                   f" ({tr['rule']})" for tr in trs]}
    finally:
        mon.close()
    out["_stream_generation_seconds"] = round(gen_s, 1)
    return out


def cost(cfg, histories=(1000, 100000), measure: int = 200, seed: int = 0) -> dict:
    """Mean observe() wall time per query (batches of 1) after `h` queries of one client's
    history. History: pool images with small noise (so PRADA's growing sets keep growing, the
    expensive case), probs from a fixed random softmax."""
    from monitor import Monitor
    rng = np.random.default_rng(seed)
    from common import data
    pool = to_float(data.attack_pool().x)
    res = {}
    for h in histories:
        mon = Monitor(cfg, None, clock=FakeClock(step=0.001))
        try:
            total = h + measure
            for i in range(0, h, 500):
                n = min(500, h - i)
                x = np.clip(pool[rng.integers(0, 5000, n)] + rng.normal(0, 0.05, (n, 28, 28)),
                            0, 1).astype(np.float32)
                lg = rng.normal(0, 3, (n, 10))
                p = (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)
                mon.observe("bench", f"h{i}", x, p, fake_answer(p), Level.NORMAL)
            mon.flush()
            x = np.clip(pool[rng.integers(0, 5000, measure)] +
                        rng.normal(0, 0.05, (measure, 28, 28)), 0, 1).astype(np.float32)
            lg = rng.normal(0, 3, (measure, 10))
            p = (np.exp(lg) / np.exp(lg).sum(1, keepdims=True)).astype(np.float32)
            t0 = time.perf_counter()
            for i in range(measure):
                mon.observe("bench", f"m{i}", x[i:i + 1], p[i:i + 1], fake_answer(p[i:i + 1]),
                            Level.NORMAL)
            dt = (time.perf_counter() - t0) / measure
            eng = mon._engines["bench"]
            gsize = sum(g.m for g in eng.dets["prada"].G) if "prada" in eng.dets else 0
            res[f"{h}"] = {"ms_per_query": round(dt * 1e3, 3), "history": total - measure,
                           "prada_growing_set": gsize}
            print(f"observe cost with {h:>7,d} queries of history: {dt * 1e3:.3f} ms/query "
                  f"(PRADA growing set {gsize})", flush=True)
        finally:
            mon.close()
    return res


def linking_cost(cfg, totals=(1000, 100_000, 1_000_000), keys: int = 1000, batch: int = 256,
                 measure: int = 20, seed: int = 0) -> dict:
    """Cross-client linking's per-query cost after ``total`` queries of all keys: the index is
    filled through the restart path (Linker.refill: the same insertion, without the pair
    search) with pool images, ``keys`` keys taking turns; then ``measure`` requests of
    ``batch`` items are timed through Linker.step (pair search + insertion + groups). Half of
    a measured request are natural pool images, half sign steps of indexed ones (so pairs are
    found and verified). Memory: the index's arrays."""
    from common import data
    from monitor.linking import Linker
    rng = np.random.default_rng(seed)
    pool = to_float(data.attack_pool().x).reshape(-1, 784)
    res = {}
    for total in totals:
        lk = Linker(cfg.linking)
        t0 = time.perf_counter()
        for i in range(0, total, 4096):
            n = min(4096, total - i)
            lk.refill(f"k{(i // 4096) % keys}", i, pool[rng.integers(0, 5000, n)])
        fill = time.perf_counter() - t0
        dts = []
        for r in range(measure):
            x = pool[rng.integers(0, 5000, batch)].copy()
            h = batch // 2
            x[h:] = np.clip(x[h:] + 0.1 * rng.choice([-1.0, 1.0], (batch - h, 784)), 0, 1)
            t0 = time.thread_time()      # this thread's CPU time: the machine may be shared
            lk.step(f"m{r % 25}", (r // 25) * batch, x, None, float(r), 0, [])
            dts.append(time.thread_time() - t0)
        us = float(np.median(dts)) / batch * 1e6
        res[str(total)] = {"us_per_query": round(us, 1), "index_mb": round(lk.index.nbytes() / 2**20, 1),
                           "indexed": int(min(total, cfg.linking.horizon)), "fill_s": round(fill, 1)}
        print(f"linking cost after {total:>9,d} queries of all keys: {us:.1f} us/query "
              f"(batch {batch}, median of {measure}); index {res[str(total)]['index_mb']} MB "
              f"holding {res[str(total)]['indexed']:,d} queries", flush=True)
    return res


# --- per-detector profile ---------------------------------------------------------------------
PROFILE_STREAMS = ("pool", "pool-noise", "perturb", "noise")


def profile_stream(kind: str, n: int, rng) -> np.ndarray:
    """float32 (n, 28, 28) queries of one kind: ``pool`` attack-pool images with repeats (on the
    0-255 grid, as the serving benchmark's clients send them); ``pool-noise`` the same plus
    Gaussian noise 0.05 (off the grid: stored as float16); ``perturb`` sign steps (lambda 0.1)
    of pool images, one to three steps deep (a JBDA-like stream); ``noise`` uniform noise."""
    from common import data
    pool = to_float(data.attack_pool().x)
    if kind == "pool":
        return pool[rng.integers(0, len(pool), n)]
    if kind == "pool-noise":
        x = pool[rng.integers(0, len(pool), n)] + rng.normal(0, 0.05, (n, 28, 28))
        return np.clip(x, 0, 1).astype(np.float32)
    if kind == "perturb":
        x = pool[rng.integers(0, len(pool), n)].copy()
        for depth in range(3):
            m = rng.random(n) < (0.9 if depth == 0 else 0.5)
            x[m] = np.clip(x[m] + 0.1 * rng.choice([-1.0, 1.0], x[m].shape), 0, 1)
        return x.astype(np.float32)
    if kind == "noise":
        return rng.random((n, 28, 28)).astype(np.float32)
    raise ValueError(f"unknown stream {kind!r}")


def profile(cfg, target, kinds=PROFILE_STREAMS, batches=(1, 64, 256), history: int = 4000,
            clients: int = 4, items: int = 2048, seed: int = 0) -> dict:
    """Per-item cost of each part of the monitor's per-request work (no log): det_view, the
    shared item preparation, every enabled detector's observe_batch, the ladder, and the
    linker (pairs, groups). ``clients`` clients take turns; each first sends ``history``
    queries of the stream (batch 256, untimed), then ``items`` queries per client are timed in
    requests of each batch size. Probabilities: the target's. Per-item microseconds of this
    thread's CPU time (the machine may be shared: wall time would count other processes),
    summed over the timed requests of all clients."""
    clock = time.thread_time
    from monitor.engine import ClientEngine, det_view
    from monitor.linking import Linker
    res: dict = {}
    for kind in kinds:
        for b in batches:
            rng = np.random.default_rng(seed)
            engines = [ClientEngine(cfg, f"c{i}") for i in range(clients)]
            lk = Linker(cfg.linking) if cfg.linking.enabled else None
            parts: dict[str, float] = {}

            def run(ci: int, x: np.ndarray, t: float, timed: bool) -> None:
                eng = engines[ci]
                p = proba(target, x)
                t0 = clock()
                xd, grid = det_view(x)
                xd = xd.reshape(len(xd), -1)
                t1 = clock()
                from monitor.detectors import Items
                it = Items.make(xd, p, grid)
                marks = {}
                for name, det in eng.dets.items():
                    f = det.observe_batch

                    def wrapped(items, tt, _f=f, _name=name):
                        s = clock()
                        out = _f(items, tt)
                        marks[_name] = marks.get(_name, 0.0) + clock() - s
                        return out
                    det.observe_batch = wrapped
                t2 = clock()
                st = eng.step(xd, p, t, grid, 0 if lk is None else int(lk.floor(eng.client)))
                t3 = clock()
                for det in eng.dets.values():
                    del det.observe_batch
                if lk is not None:
                    lk.apply(eng.client, eng, st, t)
                t4 = clock()
                if timed:
                    parts["det_view"] = parts.get("det_view", 0.0) + t1 - t0
                    for k_, v_ in marks.items():
                        parts[k_] = parts.get(k_, 0.0) + v_
                    parts["ladder"] = parts.get("ladder", 0.0) + (t3 - t2) - sum(marks.values())
                    parts["linking"] = parts.get("linking", 0.0) + t4 - t3
                    parts["total"] = parts.get("total", 0.0) + t4 - t0
            t = 0.0
            hist = [profile_stream(kind, history, rng) for _ in range(clients)]
            for i in range(0, history, 256):
                for ci in range(clients):
                    t += 1.0
                    run(ci, hist[ci][i:i + 256], t, False)
            xs = [profile_stream(kind, items, rng) for _ in range(clients)]
            for i in range(0, items, b):
                for ci in range(clients):
                    t += 1.0
                    run(ci, xs[ci][i:i + b], t, True)
            tot = items * clients
            row = {k_: round(v_ / tot * 1e6, 1) for k_, v_ in parts.items()}
            res[f"{kind}/b{b}"] = row
            print(f"{kind:10s} batch {b:3d}: " + "  ".join(f"{k_} {v_:.1f}"
                                                             for k_, v_ in row.items())
                  + "  (us/item)", flush=True)
    return res


def main(argv=None) -> int:
    import torch
    from threadpoolctl import threadpool_limits
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")  # as the server does (service/dataplane.py)
    ap = argparse.ArgumentParser(prog="python -m lab.monitor_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="monitor TOML (default monitor/default.toml)")
    ap.add_argument("--target", default=os.environ.get("MODELGUARD_TARGET", "artifacts/target.pt"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--histories", default="1000,100000")
    ap.add_argument("--skip-linking", action="store_true")
    ap.add_argument("--linking-totals", default="1000,100000,1000000",
                    help="queries of all keys before the linking cost is measured")
    ap.add_argument("--profile", action="store_true",
                    help="only the per-detector profile (per-item us at batches 1, 64, 256)")
    ap.add_argument("--profile-streams", default=",".join(PROFILE_STREAMS))
    ap.add_argument("--profile-batches", default="1,64,256")
    ap.add_argument("--profile-history", type=int, default=4000,
                    help="queries per client before the profile is timed")
    ap.add_argument("--profile-items", type=int, default=1024,
                    help="timed queries per client and batch size")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--db", help="keep the calibration streams' log here (for python -m monitor)")
    a = ap.parse_args(argv)
    from monitor import load_config
    cfg = load_config(a.config)
    results: dict = {"config": a.config or "monitor/default.toml"}
    if a.profile:
        target, desc = get_target(a.target, a.seed)
        results["profile"] = profile(cfg, target, tuple(a.profile_streams.split(",")),
                                     tuple(int(b) for b in a.profile_batches.split(",")),
                                     a.profile_history, items=a.profile_items, seed=a.seed)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(results, indent=2))
        return 0
    if not a.skip_calibration:
        target, desc = get_target(a.target, a.seed)
        results["target"] = desc
        results["calibration"] = calibrate(cfg, target, a.seed, a.db)
        print(f"target: {desc}")
        for name, r in results["calibration"].items():
            if name.startswith("_"):
                continue
            print(f"{name:24s} {r['queries']:6d} queries  final {r['final_level']:10s} "
                  f"first reached: {r['first_reached'] or '-'}")
            print(" " * 26 + "  ".join(f"{k} {v}" for k, v in r["extremes"].items()))
    if not a.skip_cost:
        hs = tuple(int(h) for h in a.histories.split(","))
        results["cost"] = cost(cfg, hs)
    if not a.skip_linking and cfg.linking.enabled:
        results["linking_cost"] = linking_cost(
            cfg, tuple(int(t) for t in a.linking_totals.split(",")))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
