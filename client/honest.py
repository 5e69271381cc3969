"""Honest traffic: benign clients that use the service the way real users would, to measure
what the defences cost them (false escalations, lost probabilities, wrong labels).

An :class:`HonestClient` sends natural images from the pool (never synthetic ones) in requests
of realistic, varying size, with a class mix skewed per user (a Dirichlet draw over the ten
classes), some repeated images (users re-check an item) and optional pacing (exponential think
time between requests; 0 for benches). Its statistics: queries and requests sent, accuracy of the
labels received against the true labels, share of answers that came with probabilities, the
answer kinds, answers produced by a switched model or watermarked, and the query number at which
the client first lost probabilities (the client-side view of an escalation).

    python -m client.honest --clients 20 --queries 500 --address 127.0.0.1:50051
    python -m client.honest --local --target artifacts/target.pt --clients 5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np

from common import data
from common.types import AnswerKind, NUM_CLASSES
from client.oracle import Oracle


@dataclass
class HonestConfig:
    queries: int = 500                     # items per client
    batch_sizes: tuple[int, ...] = (1, 1, 1, 2, 4, 8, 16, 32)   # drawn uniformly per request
    pace_s: float = 0.0                    # mean think time between requests (exponential)
    repeat_prob: float = 0.1               # chance an item re-sends an image already sent
    skew: float = 1.0                      # Dirichlet concentration of the class mix (0 = none)


@dataclass
class HonestStats:
    client: str
    queries: int = 0
    requests: int = 0
    correct: int = 0
    with_probs: int = 0
    repeats: int = 0
    switched: int = 0
    watermarked: int = 0
    first_label_only_at: int | None = None  # 1-based query number
    answer_kinds: dict = field(default_factory=dict)
    class_mix: list = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.queries if self.queries else float("nan")

    @property
    def prob_share(self) -> float:
        return self.with_probs / self.queries if self.queries else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy, "prob_share": self.prob_share}


class HonestClient:
    """One benign user. ``run()`` sends ``config.queries`` items and returns :class:`HonestStats`."""

    def __init__(self, oracle: Oracle, pool: data.Split, rng: np.random.Generator | int = 0,
                 config: HonestConfig | None = None, name: str = "honest",
                 sleep: Callable[[float], None] = time.sleep):
        self.oracle = oracle
        self.pool = pool
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.config = config or HonestConfig()
        self.name = name
        self.sleep = sleep
        by_class = [np.flatnonzero(pool.y == k) for k in range(NUM_CLASSES)]
        self._by_class = [c for c in by_class]
        if self.config.skew > 0:
            self.mix = self.rng.dirichlet(np.full(NUM_CLASSES, self.config.skew))
        else:
            self.mix = np.array([len(c) for c in by_class], float)
            self.mix /= self.mix.sum()

    def _items(self, n: int, sent: list[int]) -> tuple[np.ndarray, int]:
        idx, reps = [], 0
        for _ in range(n):
            if sent and self.rng.random() < self.config.repeat_prob:
                idx.append(sent[self.rng.integers(len(sent))])
                reps += 1
            else:
                k = self.rng.choice(NUM_CLASSES, p=self.mix)
                members = self._by_class[k]
                idx.append(int(members[self.rng.integers(len(members))]))
        return np.array(idx), reps

    def run(self) -> HonestStats:
        cfg, st = self.config, HonestStats(self.name, class_mix=np.round(self.mix, 3).tolist())
        sent: list[int] = []
        t0 = time.perf_counter()
        while st.queries < cfg.queries:
            n = int(min(self.rng.choice(cfg.batch_sizes), cfg.queries - st.queries))
            if self.oracle.remaining is not None:
                n = min(n, self.oracle.remaining)
                if n <= 0:
                    break
            idx, reps = self._items(n, sent)
            ans = self.oracle(self.pool.x[idx])
            st.requests += 1
            st.repeats += reps
            st.correct += int((ans.labels == self.pool.y[idx]).sum())
            if ans.probs is not None and ans.kind == AnswerKind.PROBABILITIES:
                st.with_probs += n
            elif st.first_label_only_at is None:
                st.first_label_only_at = st.queries + 1
            kind = ans.kind.name.lower()
            st.answer_kinds[kind] = st.answer_kinds.get(kind, 0) + n
            st.switched += sum(m != "target" for m in ans.model)
            st.watermarked += int(np.asarray(ans.watermarked).sum())
            st.queries += n
            sent.extend(int(i) for i in idx)
            if cfg.pace_s > 0:
                self.sleep(float(self.rng.exponential(cfg.pace_s)))
        st.wall_time_s = time.perf_counter() - t0
        return st


def run_honest(oracles: Sequence[Oracle], pool: data.Split, seed: int = 0,
               config: HonestConfig | None = None, names: Sequence[str] | None = None,
               vary_volume: bool = True) -> dict:
    """Run one :class:`HonestClient` per oracle (sequentially). With ``vary_volume`` each client's
    volume is drawn log-uniformly between a fifth of and twice ``config.queries``."""
    config = config or HonestConfig()
    rng = np.random.default_rng(seed)
    clients = []
    for i, oracle in enumerate(oracles):
        cfg = config
        if vary_volume:
            q = int(np.exp(rng.uniform(np.log(max(1, config.queries / 5)),
                                       np.log(2 * config.queries))))
            cfg = HonestConfig(**{**asdict(config), "queries": max(1, q)})
        name = names[i] if names else f"honest-{i}"
        clients.append(HonestClient(oracle, pool, np.random.default_rng([seed, i]), cfg,
                                    name).run())
    q = sum(c.queries for c in clients)
    return {
        "clients": len(clients),
        "queries": q,
        "accuracy": sum(c.correct for c in clients) / q if q else float("nan"),
        "prob_share": sum(c.with_probs for c in clients) / q if q else float("nan"),
        "clients_losing_probabilities": sum(c.first_label_only_at is not None for c in clients),
        "switched_share": sum(c.switched for c in clients) / q if q else float("nan"),
        "watermarked_share": sum(c.watermarked for c in clients) / q if q else float("nan"),
        "per_client": [c.as_dict() for c in clients],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m client.honest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--queries", type=int, default=500, help="mean items per client")
    p.add_argument("--pace", type=float, default=0.0, help="mean seconds between requests")
    p.add_argument("--repeat-prob", type=float, default=0.1)
    p.add_argument("--skew", type=float, default=1.0,
                   help="Dirichlet concentration of each client's class mix (0 = pool's mix)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--key-prefix", default="honest", help="client i uses API key PREFIX-i")
    p.add_argument("--local", action="store_true", help="answer in process from --target")
    p.add_argument("--target", default="artifacts/target.pt")
    p.add_argument("--data", help="data directory (default: $MODELGUARD_DATA or ./data)")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    pool = data.attack_pool(args.data)
    names = [f"{args.key_prefix}-{i}" for i in range(args.clients)]
    if args.local:
        from client.oracle import LocalOracle
        from common import training

        target, _ = training.load_checkpoint(args.target)
        oracles = [LocalOracle(lambda x: training.predict_proba(target, x))
                   for _ in range(args.clients)]
    else:
        from client.api import RemoteOracle

        oracles = [RemoteOracle(args.address, k) for k in names]
    cfg = HonestConfig(queries=args.queries, pace_s=args.pace, repeat_prob=args.repeat_prob,
                       skew=args.skew)
    out = run_honest(oracles, pool, args.seed, cfg, names)
    summary = {k: v for k, v in out.items() if k != "per_client"}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
