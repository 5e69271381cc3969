"""Knockoff Nets (Orekondy et al., CVPR 2019): steal with natural images from *another*
distribution. Here the transfer set is MNIST (``ood``), queried either uniformly at random or
with the paper's adaptive strategy: a gradient bandit over coarse actions (MNIST digit classes or
k-means clusters) whose reward mixes the answer's certainty, diversity and the surrogate's loss.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common import data, training
from client.attacks._util import as_float, shift_flip
from client.attacks.base import Attack, answer_targets


class Knockoff(Attack):
    """Knockoff Nets: natural out-of-distribution (MNIST) queries, random or adaptive sampling."""

    name = "knockoff"
    needs = ("ood",)
    answers = "labels"  # uses probabilities when they come back, labels otherwise
    params = {
        "sampling": (str, "random", "'random' or 'adaptive' (gradient bandit over arms)"),
        "arms": (str, "labels", "adaptive arms: 'labels' (MNIST digit classes) or 'kmeans'"),
        "n_arms": (int, 20, "number of k-means arms when --arms kmeans"),
        "bandit_lr": (float, 0.1, "gradient-bandit step size"),
        "step_queries": (int, 100, "adaptive: queries per bandit step"),
        "online_epochs": (int, 1, "adaptive: surrogate epochs after each step (loss reward)"),
    }

    def __init__(self, oracle, budget, *, ood: data.Split, sampling: str = "random",
                 arms: str = "labels", n_arms: int = 20, bandit_lr: float = 0.1,
                 step_queries: int = 100, online_epochs: int = 1, **kw):
        super().__init__(oracle, budget, **kw)
        if sampling not in ("random", "adaptive"):
            raise ValueError(f"sampling must be 'random' or 'adaptive', got {sampling!r}")
        if arms not in ("labels", "kmeans"):
            raise ValueError(f"arms must be 'labels' or 'kmeans', got {arms!r}")
        self.ood = ood
        self.sampling = sampling
        self.arms = arms
        self.n_arms = n_arms
        self.bandit_lr = bandit_lr
        self.step_queries = max(1, step_queries)
        self.online_epochs = online_epochs
        self.name = f"knockoff-{sampling}"

    # -- transfer set ----------------------------------------------------------------------
    def _draw(self, rng, candidates: np.ndarray, n: int, used: np.ndarray) -> np.ndarray:
        """n images from the given pool indices, unused ones first; once a group is exhausted,
        augmented (shifted/flipped) copies of its images, which are still natural OOD images."""
        fresh = candidates[~used[candidates]]
        take = rng.choice(fresh, size=min(n, len(fresh)), replace=False)
        used[take] = True
        x = self.ood.x[take]
        if len(take) < n:
            extra = rng.choice(candidates, size=n - len(take), replace=True)
            x = np.concatenate([x, shift_flip(self.ood.x[extra], rng)])
            self.extra["augmented_queries"] = self.extra.get("augmented_queries", 0) + len(extra)
        return x

    def steal(self):
        rng = np.random.default_rng(self.seed)
        if self.sampling == "random":
            x = self._draw(rng, np.arange(len(self.ood)), self.budget,
                           np.zeros(len(self.ood), bool))
            return self.fit(x, answer_targets(self.query(x)))
        return self._adaptive(rng)

    def _arm_members(self, rng) -> list[np.ndarray]:
        if self.arms == "labels":
            return [np.flatnonzero(self.ood.y == k) for k in np.unique(self.ood.y)]
        from sklearn.cluster import MiniBatchKMeans

        feats = self.ood.x.reshape(len(self.ood), -1).astype(np.float32) / 255.0
        km = MiniBatchKMeans(self.n_arms, random_state=self.seed, n_init=3).fit(feats)
        return [m for m in (np.flatnonzero(km.labels_ == k) for k in range(self.n_arms)) if len(m)]

    def _adaptive(self, rng):
        from tqdm.auto import tqdm

        members = self._arm_members(rng)
        k = len(members)
        h = np.zeros(k)                       # preferences
        baseline, seen = 0.0, 0
        used = np.zeros(len(self.ood), bool)
        xs, answers = [], []
        recent = []                           # last answers for the diversity reward
        model = self.new_surrogate()
        opt = torch.optim.Adam(model.parameters(), lr=self.train_config.lr)
        stats = {"cert": [0.0, 1.0, 0], "div": [0.0, 1.0, 0], "loss": [0.0, 1.0, 0]}
        pulls = np.zeros(k, int)
        bar = tqdm(total=self.budget, desc="knockoff adaptive", disable=not self.progress,
                   leave=False)
        spent = 0
        while spent < self.budget:
            n = min(self.step_queries, self.budget - spent)
            spent += n
            pi = np.exp(h - h.max())
            pi /= pi.sum()
            acts = rng.choice(k, size=n, p=pi)
            xb = np.concatenate([self._draw(rng, members[a], int((acts == a).sum()), used)
                                 for a in np.unique(acts)])
            acts = np.concatenate([np.full(int((acts == a).sum()), a) for a in np.unique(acts)])
            ans = self.oracle(xb)
            y = answer_targets([ans])
            xs.append(xb)
            answers.append(ans)
            bar.update(n)
            # rewards (paper, sec. 4.1.2): certainty = top-1 minus top-2 margin; diversity =
            # how far the answer sits above the recent mean; loss = surrogate's cross-entropy
            top2 = np.sort(y, 1)[:, -2:]
            r_cert = top2[:, 1] - top2[:, 0]
            mu = np.concatenate(recent).mean(0) if recent else np.zeros(y.shape[1])
            r_div = np.maximum(y - mu, 0).sum(1)
            with torch.no_grad():
                logp = F.log_softmax(model(torch.from_numpy(as_float(xb))), 1).numpy()
            r_loss = -(y * logp).sum(1)
            recent = (recent + [y])[-5:]
            r = np.zeros(n)
            for key, val in (("cert", r_cert), ("div", r_div), ("loss", r_loss)):
                m, s, c = stats[key]           # running mean / scale for normalisation
                c2 = c + n
                m2 = (m * c + val.sum()) / c2
                s2 = np.sqrt(max(((s ** 2) * c + ((val - m2) ** 2).sum()) / c2, 1e-8))
                stats[key] = [m2, s2, c2]
                r += (val - m2) / s2
            # gradient bandit update with the reward averaged per pulled arm
            for a in np.unique(acts):
                ra = r[acts == a].mean()
                seen += 1
                baseline += (ra - baseline) / seen
                onehot = np.zeros(k)
                onehot[a] = 1.0
                h += self.bandit_lr * (ra - baseline) * (onehot - pi)
                pulls[a] += int((acts == a).sum())
            # online surrogate update (keeps the loss reward meaningful): the new answers plus a
            # replay sample of older ones, at most 1,024 items per epoch
            if self.online_epochs > 0:
                xa = torch.from_numpy(as_float(np.concatenate(xs)))
                ya = torch.from_numpy(answer_targets(answers))
                model.train()
                for _ in range(self.online_epochs):
                    perm = torch.cat([torch.arange(len(xa) - n, len(xa)),
                                      torch.randperm(len(xa) - n)[:max(0, 1024 - n)]])
                    perm = perm[torch.randperm(len(perm))]
                    for i in range(0, len(perm), 128):
                        idx = perm[i:i + 128]
                        loss = -(ya[idx] * F.log_softmax(model(xa[idx]), 1)).sum(1).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                model.eval()
        bar.close()
        pi = np.exp(h - h.max())
        self.extra.update({"arms": k, "arm_pulls": pulls.tolist(),
                           "final_policy": np.round(pi / pi.sum(), 4).tolist()})
        return self.fit(np.concatenate(xs), answer_targets(answers))
