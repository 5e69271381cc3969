"""python -m lab.hotpath: the per-request work outside the model, old vs new, in process.

Issue #8 item 4 ("no per-image Python on the hot path"). For batches of N = 1, 64, 256 images it
times, in the same process and interleaved (so machine noise hits both sides alike):

(a) digest + answer policy + watermark, as the data plane runs them for one request, for each
    level policy of the default profile (identity, reverse_sigmoid, label_only, misinformation
    blend) and keyed Gaussian noise, watermark on (rate 0.005):
      old = the defence package at git revision ``--ref`` (before this change: HMAC-SHA256 per
            image and per use, one numpy Generator per image for keyed noise, per-row loops),
            loaded from ``git show`` into a private package name;
      new = the working tree's ``service.defences`` (one keyed BLAKE2b per image per request,
            shared through PolicyContext, array ops everywhere).
    Both sides answer the same images and probabilities; the misinformation model is the
    trained one from ``--artifacts`` when present, else a fixed numpy stand-in (the same for
    both sides: the model's cost is not what is compared).
(b) building (and serialising) the PredictResponse: the original per-image Prediction messages,
    the same contract built from pre-encoded bytes, and the packed form (labels + raw_output);
    plus the client-side decoding of each.

Also times the digest computation alone against the alternatives considered. Reports the median
over ``--repeats`` timed blocks (process CPU time, old and new blocks alternating) of
per-request microseconds and the old/new ratio; writes JSON with ``--out``.
"""
from __future__ import annotations

import argparse
import hashlib
import hmac
import importlib
import json
import time
from pathlib import Path

import numpy as np

from lab.legacy import load_legacy as load_package

# the last commit before issue #8 item 4 (HMAC-SHA256 digests per use, per-image loops)
DEFAULT_REF = "e93f0e2043caa47a6e7bb7ca05801f9aff13377b"
LEGACY_PKG = "_legacy_defences"
DEFENCE_FILES = ("__init__", "base", "policies", "pool", "registry", "watermark")
KEY = b"bench-hotpath-secret"
SIZES = (1, 64, 256)


def load_legacy(ref: str, repo: Path):
    """The defence package as it was at ``ref``, importable as ``_legacy_defences``."""
    return load_package(ref, repo, "service.defences", LEGACY_PKG, DEFENCE_FILES)


def legacy_context(mod, client: str, request_id: str):
    """The pre-change DataPlane._context: one HMAC and one Generator per request, eagerly."""
    digest = hmac.new(KEY, f"{client}\0{request_id}".encode(), hashlib.sha256)
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:16], "little"))
    return mod.PolicyContext(client_id=client, key=KEY, rng=rng)


def legacy_response(pb, answer, request_id: str, model_version: str = "1"):
    """The pre-change servicer: one Prediction message per image (also the reference the
    packed-format tests compare with)."""
    if answer.probs is None:
        preds = [pb.Prediction(label=int(l)) for l in answer.labels]
    else:
        preds = [pb.Prediction(label=int(l), probabilities=p)
                 for l, p in zip(answer.labels, answer.probs.tolist())]
    kind = pb.ANSWER_PROBABILITIES if answer.probs is not None else pb.ANSWER_LABEL_ONLY
    return pb.PredictResponse(id=request_id, model_name="target", model_version=model_version,
                              kind=kind, predictions=preds)


def _calls_per_block(fn, min_block_s: float) -> int:
    fn()
    t = time.process_time()
    k = 0
    while time.process_time() - t < min_block_s:
        fn()
        k += 1
    return max(1, k)


def _block(fn, k: int) -> float:
    t = time.process_time()
    for _ in range(k):
        fn()
    return (time.process_time() - t) / k


def timeit(fn, repeats: int, min_block_s: float = 0.02) -> float:
    """Median CPU seconds of this process per call over ``repeats`` blocks of at least
    ``min_block_s`` (process CPU time, so other processes on a shared machine count less)."""
    k = _calls_per_block(fn, min_block_s)
    return float(np.median([_block(fn, k) for _ in range(repeats)]))


def compare(old, new, repeats: int, min_block_s: float = 0.02) -> dict:
    """Old and new timed in alternating blocks (old, new, old, new, ...): median of each."""
    ko, kn = _calls_per_block(old, min_block_s), _calls_per_block(new, min_block_s)
    to, tn = [], []
    for _ in range(repeats):
        to.append(_block(old, ko))
        tn.append(_block(new, kn))
    o, n = float(np.median(to)), float(np.median(tn))
    return {"old_us": round(o * 1e6, 1), "new_us": round(n * 1e6, 1), "speedup": round(o / n, 2)}


def misinformation_models(artifacts: Path, legacy, new_pool):
    path = artifacts / "pool" / "misinfo.pt"
    if path.exists():
        return (legacy.pool.load_model(artifacts, "misinformation"),
                new_pool.load_model(artifacts, "misinformation"), f"trained ({path})")
    w = np.random.default_rng(0).normal(0, 0.05, (784, 10)).astype(np.float32)

    def proba(images):
        z = np.asarray(images, np.float32).reshape(len(images), -1) @ w
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)

    return (legacy.pool.PoolModel("misinformation", proba, {}),
            new_pool.PoolModel("misinformation", proba, {}), "numpy stand-in (no artifacts)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default=DEFAULT_REF, help="git revision of the old code")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--repeats", type=int, default=21, help="timed blocks per side")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)

    from threadpoolctl import threadpool_limits

    threadpool_limits(1)          # as the server runs (one BLAS thread, one torch thread)
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    from common.types import Answer, AnswerKind
    from protos import inference_pb2 as pb
    from service import servicer
    from service.defences import PolicyContext, Watermark, build_policy
    from service.defences import base, pool as new_pool

    repo = Path(__file__).resolve().parents[1]
    legacy = load_legacy(args.ref, repo)
    legacy.pool = importlib.import_module(f"{LEGACY_PKG}.pool")
    legacy.policies = importlib.import_module(f"{LEGACY_PKG}.policies")
    mis_old, mis_new, mis_note = misinformation_models(args.artifacts, legacy, new_pool)
    specs = {
        "identity (NORMAL)": {"policy": "identity"},
        "reverse_sigmoid (NOISE)": {"policy": "reverse_sigmoid", "beta": 1.0, "gamma": 0.2},
        "label_only (LABEL_ONLY)": {"policy": "label_only"},
        "misinformation blend (SWITCH)": None,
        "gaussian sigma 0.05, keyed": {"policy": "gaussian", "sigma": 0.05},
    }
    wm_old, wm_new = legacy.Watermark(KEY, 0.005), Watermark(KEY, 0.005)
    results: dict = {"ref": args.ref, "misinformation_model": mis_note, "policy_path": {},
                     "digests": {}, "response": {}}
    rng = np.random.default_rng(0)
    for n in args.sizes:
        images = (rng.integers(0, 256, (n, 28, 28)) / 255).astype(np.float32)
        probs = rng.dirichlet(np.full(10, 0.3), n).astype(np.float32)

        # --- the digests alone: the old three HMAC-SHA256 passes vs one keyed BLAKE2b ---
        q = base.quantise(images)
        rows = [q[i].tobytes() for i in range(n)]
        hk = base._hash_key(KEY)
        dig = {
            "old: 3 x HMAC-SHA256 per image (noise, route, watermark)": lambda: [
                legacy.base.keyed_digests(KEY, images, d) for d in (b"noise", b"route",
                                                                    b"watermark")],
            "old: 1 x HMAC-SHA256 per image (one use)": lambda: legacy.base.keyed_digests(
                KEY, images, b"watermark"),
            "new: keyed BLAKE2b-512 per image, state copy (image_digests, incl. quantise)":
                lambda: base.image_digests(KEY, images),
            "alt: keyed BLAKE2b-512 constructed per image (bytes rows given)": lambda: [
                hashlib.blake2b(r, key=hk, digest_size=64).digest() for r in rows],
            "alt: HMAC-SHA512 per image via hmac.digest (bytes rows given)": lambda: [
                hmac.digest(hk, r, "sha512") for r in rows],
            "quantise alone": lambda: base.quantise(images),
        }
        results["digests"][n] = {k: round(timeit(f, args.repeats) * 1e6, 1)
                                 for k, f in dig.items()}

        # --- (a) digest + policy + watermark per request ---
        for name, spec in specs.items():
            if spec is None:
                pol_old = legacy.pool.MisinformationPolicy(mis_old, "blend", 0.99)
                pol_new = new_pool.MisinformationPolicy(mis_new, "blend", 0.99)
            else:
                pol_old = legacy.build_policy(spec, artifacts=args.artifacts)
                pol_new = build_policy(spec, artifacts=args.artifacts)

            def old(pol=pol_old):
                ctx = legacy_context(legacy, "alice", "req")
                return wm_old.apply(images, pol.answer(images, probs, ctx), ctx)

            def new(pol=pol_new):
                ctx = PolicyContext("alice", KEY, request_id="req")
                return wm_new.apply(images, pol.answer(images, probs, ctx), ctx)

            a_old, a_new = old(), new()
            assert np.array_equal(a_old.labels[~(a_old.watermarked | a_new.watermarked)],
                                  a_new.labels[~(a_old.watermarked | a_new.watermarked)]), name
            results["policy_path"].setdefault(name, {})[n] = compare(old, new, args.repeats)

        # --- (b) response building (+ serialisation) and client decoding ---
        pr = rng.dirichlet(np.full(10, 0.3), n).astype(np.float32)
        ans = Answer(pr.argmax(1), pr, AnswerKind.PROBABILITIES)
        lab = Answer(pr.argmax(1), None, AnswerKind.LABEL_ONLY)
        res_b = {}
        for tag, a in (("probabilities", ans), ("labels only", lab)):
            res_b[f"{tag}: old build+serialise vs packed"] = compare(
                lambda a=a: legacy_response(pb, a, "req").SerializeToString(),
                lambda a=a: servicer.build_response(pb.FORMAT_PACKED, a, "req", "target",
                                                    "1").SerializeToString(), args.repeats)
            res_b[f"{tag}: old build+serialise vs new build of the same predictions"] = compare(
                lambda a=a: legacy_response(pb, a, "req").SerializeToString(),
                lambda a=a: servicer.build_response(pb.FORMAT_PREDICTIONS, a, "req", "target",
                                                    "1").SerializeToString(), args.repeats)
            wire_old = legacy_response(pb, a, "req").SerializeToString()
            wire_new = servicer.build_response(pb.FORMAT_PACKED, a, "req", "target",
                                               "1").SerializeToString()
            from client.api import decode_response
            res_b[f"{tag}: client decode, predictions vs packed"] = compare(
                lambda w=wire_old: decode_response(pb.PredictResponse.FromString(w)),
                lambda w=wire_new: decode_response(pb.PredictResponse.FromString(w)),
                args.repeats)
            res_b[f"{tag}: bytes on the wire, predictions vs packed"] = {
                "old_bytes": len(wire_old), "new_bytes": len(wire_new)}
        results["response"][n] = res_b

    print(f"old code: git {args.ref[:12]}; misinformation model: {mis_note}")
    print("\n(a) digest + policy + watermark per request, microseconds (median), old -> new")
    print(f"{'policy':34s}" + "".join(f"{'N=' + str(n):>26s}" for n in args.sizes))
    for name, by_n in results["policy_path"].items():
        cells = [f"{r['old_us']:>9.1f} -> {r['new_us']:>7.1f} x{r['speedup']:<5}"
                 for r in by_n.values()]
        print(f"{name:34s}" + "".join(f"{c:>26s}" for c in cells))
    print("\ndigests alone, microseconds per request")
    for n, d in results["digests"].items():
        for k, v in d.items():
            print(f"  N={n:<4d} {v:>9.1f}  {k}")
    print("\n(b) response, microseconds per request (or bytes)")
    for n, d in results["response"].items():
        for k, r in d.items():
            if "old_us" in r:
                print(f"  N={n:<4d} {k}: {r['old_us']} -> {r['new_us']} us (x{r['speedup']})")
            else:
                print(f"  N={n:<4d} {k}: {r['old_bytes']} -> {r['new_bytes']} bytes")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
