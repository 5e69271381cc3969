"""python -m lab.detector_ab: the distance detectors of an older revision against the working
tree's, in one process, on the same items.

For a change to the detectors' hot path (issue #8). The machine is shared and noisy, so the two
sides are not timed in separate runs: each request of the stream is prepared once per side
(``Items``) and run through both sides' detectors, in a random order per request, and each
detector's ``observe_batch`` is timed with this thread's CPU time. Before the timed requests,
``--history`` queries fill both sides' structures (untimed, batch 256).

Besides the cost, it compares what the two sides decided: the number of items whose fire flag
differs, and the largest difference of a score (NaN where neither has one). A speed change that
is meant to keep the semantics should report 0 flags.

  python -m lab.detector_ab --ref HEAD~1 --streams pool,perturb,noise --batches 1,64,256

Streams: lab.monitor_bench's profile streams (attack-pool images with repeats, sign-step
perturbations, uniform noise; probabilities from the target at ``--target``, or a quick MLP).
"""
from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

import numpy as np

from lab.legacy import load_legacy
from lab.monitor_bench import PROFILE_STREAMS, get_target, proba, profile_stream

LEGACY_PKG = "_legacy_monitor"
DETECTORS = ("prada", "similarity", "near_duplicate")


def run(old, new, cfg, target, kind: str, batch: int, history: int, items: int,
        seed: int = 0) -> dict:
    """Per-item CPU µs of each detector on both sides, and how far their outputs differ."""
    from monitor.engine import det_view
    rng = np.random.default_rng(seed)
    sides = {"old": old, "new": new}
    dets = {s: {n: m.IMPLEMENTATIONS[n](getattr(cfg.detectors, n)) for n in DETECTORS}
            for s, m in sides.items()}
    cpu = {s: dict.fromkeys(DETECTORS, 0.0) for s in sides}
    flags = dict.fromkeys(DETECTORS, 0)
    score_diff = dict.fromkeys(DETECTORS, 0.0)

    def feed(x: np.ndarray, timed: bool) -> None:
        p = proba(target, x)
        xd, grid = det_view(x)
        xd = xd.reshape(len(xd), -1)
        out = {}
        for s in (("old", "new") if rng.random() < 0.5 else ("new", "old")):
            it = sides[s].Items.make(xd, p, grid)
            for n in DETECTORS:
                t0 = time.thread_time()
                out[s, n] = dets[s][n].observe_batch(it, 1.0)
                if timed:
                    cpu[s][n] += time.thread_time() - t0
        for n in DETECTORS:
            (so, fo), (sn, fn) = out["old", n], out["new", n]
            flags[n] += int(np.count_nonzero(fo != fn))
            both = ~(np.isnan(so) & np.isnan(sn))
            if both.any():
                d = np.abs(so[both] - sn[both])
                score_diff[n] = max(score_diff[n], float(np.nan_to_num(d, nan=np.inf).max()))

    for i in range(0, history, 256):
        feed(profile_stream(kind, min(256, history - i), rng), False)
    xs = profile_stream(kind, items, rng)
    for i in range(0, items, batch):
        feed(xs[i:i + batch], True)
    row = {"stream": kind, "batch": batch, "history": history, "items": items}
    for n in DETECTORS:
        row[n] = {"old_us": round(cpu["old"][n] / items * 1e6, 1),
                  "new_us": round(cpu["new"][n] / items * 1e6, 1),
                  "flags_differ": flags[n], "max_score_diff": score_diff[n]}
    o = sum(cpu["old"].values()) / items * 1e6
    w = sum(cpu["new"].values()) / items * 1e6
    row["total"] = {"old_us": round(o, 1), "new_us": round(w, 1), "ratio": round(w / o, 3)}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.detector_ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", default="HEAD", help="git revision of the old detectors")
    ap.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--config", default=None, help="monitor TOML (default monitor/default.toml)")
    ap.add_argument("--target", default="artifacts/target.pt")
    ap.add_argument("--streams", default="pool,perturb,noise")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--history", type=int, default=10000,
                    help="queries before the timed ones (fills similarity's default history)")
    ap.add_argument("--items", type=int, default=0,
                    help="timed queries per cell (default: 1,024 at batch 1, else 8,192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    kinds = [k for k in args.streams.split(",") if k]
    bad = [k for k in kinds if k not in PROFILE_STREAMS]
    if bad:
        ap.error(f"unknown stream(s) {bad}; choose among {','.join(PROFILE_STREAMS)}")
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches takes comma-separated integers, not {args.batches!r}")
    if not batches or min(batches) < 1:
        ap.error("--batches must be positive")
    import torch
    torch.set_num_threads(1)
    import monitor.detectors as new
    from monitor.config import load_config
    # the three modules the detectors are made of (monitor/__init__ would import the whole
    # monitor: an empty package stands in for it)
    load_legacy(args.ref, args.repo, "monitor", LEGACY_PKG, ("config", "features", "detectors"))
    old = importlib.import_module(f"{LEGACY_PKG}.detectors")
    cfg = load_config(args.config)
    target, what = get_target(args.target, args.seed)
    print(f"old: monitor/ at {args.ref}; new: the working tree; target: {what}", flush=True)
    rows = []
    for kind in kinds:
        for b in batches:
            n = args.items or (1024 if b == 1 else 8192)
            r = run(old, new, cfg, target, kind, b, args.history, n, args.seed)
            rows.append(r)
            parts = "  ".join(f"{d} {r[d]['old_us']} -> {r[d]['new_us']}" for d in DETECTORS)
            diff = sum(r[d]["flags_differ"] for d in DETECTORS)
            print(f"{kind:8s} batch {b:3d}: {parts}  total {r['total']['old_us']} -> "
                  f"{r['total']['new_us']} us/item (x{r['total']['ratio']}); fire flags that "
                  f"differ: {diff}; max score difference "
                  f"{max(r[d]['max_score_diff'] for d in DETECTORS):.3g}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ref": args.ref, "rows": rows}, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
