"""Functionally equivalent extraction of a one-hidden-layer ReLU network (Jagielski et al. 2020,
in the style of Carlini et al.'s critical-point attack), from probability answers.

The target is f(x) = W2 relu(W1 x + b1) + b2. Softmax probabilities give the logits up to an
additive constant: g(x) = log p(x) - mean(log p(x)) is the centred logit vector, a piecewise-linear
function of x whose pieces change exactly where a hidden unit's pre-activation w_j.x + b_j
crosses zero. The attack:

1. **Critical points.** Along segments between two pool images (which stay inside the target's
   input domain [0, 1]^784) g is piecewise linear in t. A bisection that compares the slopes at
   the ends of an interval finds the kinks; where exactly one kink lies in an interval, its
   position is the intersection of the two lines, verified with one more query.
2. **Which unit.** The slope jump across a kink is a_j (w_j . d), with a_j the unit's centred
   column of W2, so its direction identifies the unit for free; a kink is new when its jump
   direction or hyperplane matches no recovered unit.
3. **Weight row.** For a new unit, finite differences along the 784 coordinate axes on both sides
   of the kink give the gradient jump D = a_j w_j^T (rank one); projecting onto the known a_j
   gives w_j up to scale (coordinates whose step crossed another hyperplane are re-measured with
   a smaller step); b_j = -w_j . x* (2 + 2 * 784 queries per unit).
4. **Second layer and signs.** Least squares of g on [relu(W x + b), x, 1] over every answer
   collected. A unit whose row came out with the wrong sign shows up as a rank-one linear term
   (relu(z) = z + relu(-z)); those units are flipped and the fit repeated. Whatever linear part
   remains (units that never switch inside the sampled region) is represented by at most 10 extra
   units with a bias large enough to keep them active on all of [0, 1]^784, so the surrogate is
   an ordinary MLP (Flatten -> Linear -> ReLU -> Linear) with the recovered width.

Every query stays inside [0, 1]. Needs probabilities; raises on label-only answers. Cost is
dominated by step 3: about 1,570 queries per hidden unit (about 200k for 128 units).
"""
from __future__ import annotations

import numpy as np
import torch

from common import data, nets
from common.types import NUM_CLASSES
from client.attacks.base import Attack, AttackFailed


class NeedsProbabilities(ValueError):
    """The service withheld probabilities; functionally equivalent extraction needs them."""


class FunctionallyEquivalent(Attack):
    """Functionally equivalent extraction of the 1-hidden-layer ReLU target from probabilities."""

    name = "equivalent"
    needs = ("pool",)
    answers = "probabilities"
    params = {
        "lines_per_batch": (int, 8, "segments searched between neuron recoveries"),
        "patience": (int, 4, "stop after this many line batches without a new unit"),
        "fd_step": (float, 0.001, "finite-difference step for the weight rows"),
        "fit_queries": (int, 1000, "extra pool images queried for the second-layer fit"),
        "max_units": (int, 0, "stop after recovering this many units (0 = no limit)"),
        "pca": (int, 32, "pool principal directions used for the linear part of units never "
                         "seen switching"),
        "contrast": (float, 0.5, "segment ends: pool images shrunk towards the mean image by a "
                                 "random factor in [contrast, 1] (1 = raw pool images)"),
    }

    def __init__(self, oracle, budget, *, pool: data.Split, lines_per_batch: int = 8,
                 patience: int = 4, fd_step: float = 0.001, fit_queries: int = 1000,
                 max_units: int = 0, contrast: float = 0.5, pca: int = 32, **kw):
        super().__init__(oracle, budget, **kw)
        self.pool = pool
        self.lines_per_batch = max(1, lines_per_batch)
        self.patience = max(1, patience)
        self.fd_step = fd_step
        self.fit_queries = max(0, min(fit_queries, budget // 10))
        self.max_units = max_units
        self.pca = max(0, pca)
        self.contrast = float(np.clip(contrast, 0.0, 1.0))
        self.surrogate_arch = "mlp"  # the extracted model has the target's architecture class

    # -- oracle access -----------------------------------------------------------------------
    def _spent(self) -> int:
        return self.oracle.queries_used - self._start

    def _left(self) -> int:
        return self.budget - self._spent()

    def _g(self, x: np.ndarray, keep: float = 1.0) -> np.ndarray:
        """Centred logits for float64 images (N, 784); records (x, g) for the final fit."""
        x32 = np.clip(x, 0.0, 1.0).astype(np.float32).reshape(-1, 28, 28)
        out = []
        for i in range(0, len(x32), max(self.batch_size, 1)):
            a = self.oracle(x32[i:i + self.batch_size])
            if a.probs is None:
                raise NeedsProbabilities(
                    "functionally equivalent extraction needs probability answers; the service "
                    f"returned {a.kind.name.lower()}")
            p = a.probs.astype(np.float64)
            self._clipped += int((p < 1e-37).sum())
            lp = np.log(np.clip(p, 1e-37, None))
            out.append(lp - lp.mean(1, keepdims=True))
        g = np.concatenate(out) if out else np.zeros((0, NUM_CLASSES))
        if self._bar is not None:
            self._bar.update(len(x32))
        xf = x32.reshape(len(x32), -1).astype(np.float64)
        if keep >= 1.0:
            self._fit_x.append(xf)
            self._fit_g.append(g)
        elif keep > 0:
            m = self._rng.random(len(xf)) < keep
            self._fit_x.append(xf[m])
            self._fit_g.append(g[m])
        return g

    # -- 1. critical points along segments -----------------------------------------------------
    def _search_lines(self, starts: np.ndarray, ends: np.ndarray) -> list[dict]:
        """Kinks of g along the segments starts[i] -> ends[i] (t in [0, 1]).

        Bisection: an interval is linear when g at its midpoint equals the mean of its ends
        (within the answers' float32 noise); otherwise it is halved. The kinks are then where two
        neighbouring linear pieces' slopes differ, at the intersection of their lines (slopes
        measured over whole pieces are accurate even though single answers carry ~1e-6 noise).
        """
        n_lines = len(starts)
        dirs = ends - starts
        tol, min_width = 4e-5, 1e-6

        def pts(line_ids, ts):
            return starts[line_ids] + np.asarray(ts)[:, None] * dirs[line_ids]

        ids = np.arange(n_lines)
        if 2 * n_lines > self._left():
            return []
        g = self._g(np.concatenate([pts(ids, np.zeros(n_lines)), pts(ids, np.ones(n_lines))]))
        g0, g1 = np.split(g, 2)
        pending = [(i, 0.0, 1.0, g0[i], g1[i]) for i in range(n_lines)]
        pieces: list[list] = [[] for _ in range(n_lines)]
        while pending:
            if len(pending) > self._left() - self.fit_queries:
                return []  # out of budget mid-search: discard this batch of lines
            mids = [0.5 * (a + b) for (_, a, b, _, _) in pending]
            gm = self._g(pts(np.array([p[0] for p in pending]), mids), keep=0.25)
            nxt = []
            for (i, a, b, ga, gb), m, gv in zip(pending, mids, gm):
                scale = 1.0 + 1e-6 * max(np.abs(ga).max(), np.abs(gb).max())
                if np.abs(gv - 0.5 * (ga + gb)).max() < tol * scale:
                    pieces[i].append((a, b, ga, gb))
                elif b - a > min_width:
                    nxt += [(i, a, m, ga, gv), (i, m, b, gv, gb)]
            pending = nxt
        # candidate kinks: neighbouring pieces with different slopes. A kink just inside a
        # piece's end bends that piece's chord, so candidates are only approximate and may come
        # in close pairs; they are merged, then refined below.
        cands = []  # (line, t)
        for i in range(n_lines):
            ps = sorted(pieces[i], key=lambda p: p[0])
            ts = []
            for (a1, b1, ga1, gb1), (a2, b2, ga2, gb2) in zip(ps, ps[1:]):
                s1, s2 = (gb1 - ga1) / (b1 - a1), (gb2 - ga2) / (b2 - a2)
                if np.abs(s2 - s1).max() > 1e-5 * (1 / (b1 - a1) + 1 / (b2 - a2)) + 1e-4:
                    ts.append(0.5 * (b1 + a2))
            merged = []
            for t in ts:
                if merged and t - merged[-1][-1] < 5e-4:
                    merged[-1].append(t)
                else:
                    merged.append([t])
            cands += [(i, float(np.mean(m))) for m in merged]
        if not cands:
            return []
        # refinement: fit the lines on both sides from points well inside the neighbouring
        # linear regions (r = 0.4 x the gap to the next candidate), intersect, verify
        by_line: dict[int, list[float]] = {}
        for i, t in cands:
            by_line.setdefault(i, []).append(t)
        plan = []  # (line, t0, r)
        for i, ts in by_line.items():
            edges = [0.0] + ts + [1.0]
            for k, t in enumerate(ts):
                r = 0.4 * min(t - edges[k], edges[k + 2] - t)
                if r > 1e-6:
                    plan.append((i, t, r))
        if not plan or 5 * len(plan) > self._left() - self.fit_queries:
            return []
        lid = np.array([p[0] for p in plan])
        t0 = np.array([p[1] for p in plan])
        r = np.array([p[2] for p in plan])
        gq = self._g(np.concatenate([pts(lid, t0 - r), pts(lid, t0 - r / 2),
                                     pts(lid, t0 + r / 2), pts(lid, t0 + r)]), keep=0.25)
        gl1, gl2, gr1, gr2 = np.split(gq, 4)
        sl = (gl2 - gl1) / (r / 2)[:, None]
        sr = (gr2 - gr1) / (r / 2)[:, None]
        tstar = []
        for k in range(len(plan)):
            ds = sr[k] - sl[k]
            # gl2 + sl (t - (t0 - r/2)) = gr1 + sr (t - (t0 + r/2))
            c = gr1[k] - sr[k] * (t0[k] + r[k] / 2) - gl2[k] + sl[k] * (t0[k] - r[k] / 2)
            tstar.append(float(-(ds @ c) / (ds @ ds)) if ds @ ds > 0 else np.nan)
        tstar = np.array(tstar)
        ok = np.isfinite(tstar) & (np.abs(tstar - t0) < r / 2)
        if not ok.any():
            return []
        gv = self._g(pts(lid[ok], tstar[ok]), keep=0.25)
        kinks = []
        for k, g_t in zip(np.flatnonzero(ok), gv):
            left = gl2[k] + sl[k] * (tstar[k] - (t0[k] - r[k] / 2))
            right = gr1[k] + sr[k] * (tstar[k] - (t0[k] + r[k] / 2))
            tol = 3e-5 * (1.0 + 1e-6 * np.abs(g_t).max())
            jump = sr[k] - sl[k]
            if (np.abs(g_t - left).max() > tol or np.abs(g_t - right).max() > tol
                    or np.abs(jump).max() < 0.05):
                continue
            i = int(lid[k])
            kinks.append({"line": i, "t": float(tstar[k]), "jump": jump,
                          "x": starts[i] + tstar[k] * dirs[i], "dir": dirs[i],
                          "x_lo": starts[i] + (t0[k] - r[k]) * dirs[i],
                          "x_hi": starts[i] + (t0[k] + r[k]) * dirs[i]})
        return kinks

    # -- 2. is this kink a unit we already have? -----------------------------------------------
    @staticmethod
    def _unit(v: np.ndarray) -> np.ndarray:
        v = v / np.linalg.norm(v)
        return v * np.sign(v[np.argmax(np.abs(v))])

    def _known(self, kink: dict) -> bool:
        u = self._unit(kink["jump"])
        for j, (a_dir, w, b) in enumerate(zip(self._a_dirs, self._w, self._b)):
            if abs(u @ a_dir) < 0.98 or abs(w @ kink["x"] + b) > 0.1:
                continue
            # the jump must also be a_j |w_j . dir| (always towards a_j: one side is active),
            # a check in 784-dim space that tells apart units with similar output weights
            pred = self._a_sign[j] * a_dir * abs(float(self._w_raw[j] @ kink["dir"]))
            if np.linalg.norm(pred - kink["jump"]) < 0.1 * np.linalg.norm(kink["jump"]):
                self._pts[j].append(kink["x"])  # another point on unit j's hyperplane
                return True
        return False

    # -- 3. weight row from finite differences ------------------------------------------------
    def _recover(self, kink: dict) -> bool:
        d = 784
        if 2 * (d + 1) > self._left() - self.fit_queries:
            return False
        u = self._unit(kink["jump"])
        h_sign = {}
        rows = []
        for side in ("x_hi", "x_lo"):
            x0 = kink[side]
            h = np.where(x0 + self.fd_step <= 1.0, self.fd_step, -self.fd_step)
            h_sign[side] = h
            rows.append(x0[None])
            rows.append(x0[None] + np.diag(h))
        g = self._g(np.concatenate(rows), keep=0.05)
        g_hi0, g_hi, g_lo0, g_lo = g[0], g[1:d + 1], g[d + 1], g[d + 2:]
        grad_hi = (g_hi - g_hi0) / h_sign["x_hi"][:, None]
        grad_lo = (g_lo - g_lo0) / h_sign["x_lo"][:, None]
        D = grad_hi - grad_lo                      # (784, 10) = w a^T
        w = D @ u
        resid = np.linalg.norm(D - np.outer(w, u), axis=1)
        # Coordinates to measure again: (a) a step that crossed another unit's hyperplane leaves
        # a residual off the rank-one direction; (b) a step towards this unit's own hyperplane
        # that is longer than the margin crosses it, which only shrinks w_i (invisible in the
        # residual), so it is checked against the margin with the first estimate of w.
        margin = {sd: float(w @ (kink[sd] - kink["x"])) for sd in h_sign}
        bad = resid > 10 * np.median(resid) + 1e-9
        for sd, h in h_sign.items():
            towards = np.sign(h * w) != np.sign(margin[sd])
            bad |= towards & (np.abs(h * w) > 0.5 * abs(margin[sd]))
        if bad.any() and 2 * int(bad.sum()) <= self._left() - self.fit_queries:
            idx = np.flatnonzero(bad)
            alt = {}
            for sd in ("x_hi", "x_lo"):
                x0, wi = kink[sd][idx], w[idx]
                away = np.sign(margin[sd]) * np.sign(wi) * self.fd_step  # increases |preact|
                away = np.where(wi == 0, self.fd_step, away)
                ok = (x0 + away >= 0.0) & (x0 + away <= 1.0)
                small = 0.25 * abs(margin[sd]) / np.maximum(np.abs(wi), 1e-12)
                toward = -np.sign(away) * np.minimum(self.fd_step, small)
                alt[sd] = np.where(ok, away, toward)
                alt[sd] = np.where(np.abs(alt[sd]) < 1e-6, np.sign(alt[sd] + 1e-30) * 1e-6,
                                   alt[sd])
            pts = [kink["x_hi"][None] + np.eye(d)[idx] * alt["x_hi"][:, None],
                   kink["x_lo"][None] + np.eye(d)[idx] * alt["x_lo"][:, None]]
            g2 = self._g(np.concatenate(pts), keep=0.05)
            gh, gl = np.split(g2, 2)
            D2 = (gh - g_hi0) / alt["x_hi"][:, None] - (gl - g_lo0) / alt["x_lo"][:, None]
            w[idx] = D2 @ u
            D[idx] = D2
        self._retried += int(bad.sum())
        n = np.linalg.norm(w)
        if not np.isfinite(n) or n == 0:
            return False
        # rank-one check: a merged kink (two units) gives a poor fit
        ratio = np.linalg.norm(D - np.outer(D @ u, u)) / np.linalg.norm(D)
        if ratio > 0.3:
            self._rejected += 1
            return False
        # the slope jump seen along the line must equal a_j (w_j . dir) with this w
        w_raw = w.copy()
        pred = u * float(w @ kink["dir"])
        if np.linalg.norm(pred - kink["jump"]) > 0.05 * np.linalg.norm(kink["jump"]):
            self._rejected += 1
            return False
        w = w / n
        self._ratios.append(ratio)
        # a unit we already have (its kink escaped the matcher): average the two measurements
        # of the row instead of adding a copy, and do not count it as new
        for j, wj in enumerate(self._w):
            c = float(w @ wj)
            if abs(c) > 0.998 and abs(float(wj @ kink["x"]) + self._b[j]) < 0.1:
                self._wsum[j] += np.sign(c) * w
                self._pts[j].append(kink["x"])
                self._merged += 1
                return False
        self._w.append(w)
        self._w_raw.append(w_raw)
        self._a_sign.append(float(np.sign(u @ kink["jump"])))
        self._wsum.append(w.copy())
        self._b.append(-float(w @ kink["x"]))
        self._pts.append([kink["x"]])
        self._a_dirs.append(u)
        return True

    def _shrink(self, x: np.ndarray, mean_img: np.ndarray) -> np.ndarray:
        """Segment ends: pool images pulled towards the pool's mean image by a random factor in
        [contrast, 1]. Lower contrast means less extreme logits, so fewer probabilities underflow
        float32 (a target confident beyond ~85 nats returns exact zeros, whose logs are lost);
        the hyperplanes recovered are global, so where they are found does not matter."""
        if self.contrast >= 1.0:
            return x
        a = self._rng.uniform(self.contrast, 1.0, size=(len(x), 1))
        return mean_img + a * (x - mean_img)

    # -- 4. second layer ----------------------------------------------------------------------
    def _fit_second_layer(self, W: np.ndarray, b: np.ndarray):
        """Least squares of the centred logits on [relu(z), relu(-z), P (x - mu), 1] with
        z = W x + b, over every answer collected. Both orientations are needed because each
        recovered row's sign is unknown (relu(z) - relu(-z) = z). P holds the pool's top
        principal directions: they carry the linear part of units that never switch where we
        looked (always active there), without the overfitting of a free 784-dim linear term.
        Returns (A_plus (10, h), A_minus (10, h), L_pca (10, 784), c (10,), samples)."""
        X = np.concatenate(self._fit_x)
        G = np.concatenate(self._fit_g)
        h, P, mu = len(W), self._pcs, self._mu
        k = len(P)
        p = 2 * h + k + 1
        XtX = np.zeros((p, p))
        XtG = np.zeros((p, NUM_CLASSES))
        for i in range(0, len(X), 4096):
            xb = X[i:i + 4096]
            z = xb @ W.T + b
            F = np.concatenate([np.maximum(z, 0), np.maximum(-z, 0), (xb - mu) @ P.T,
                                np.ones((len(z), 1))], 1)
            XtX += F.T @ F
            XtG += F.T @ G[i:i + 4096]
        reg = 1e-10 * np.trace(XtX) / p
        coef = np.linalg.solve(XtX + reg * np.eye(p), XtG)
        Lp = coef[2 * h:2 * h + k].T @ P
        c = coef[-1] - Lp @ mu
        return coef[:h].T, coef[h:2 * h].T, Lp, c, len(X)

    def steal(self):
        from tqdm.auto import tqdm

        self._start = self.oracle.queries_used
        self._rng = np.random.default_rng(self.seed)
        self._fit_x, self._fit_g = [], []
        self._w, self._b, self._a_dirs, self._ratios, self._pts = [], [], [], [], []
        self._wsum, self._merged, self._w_raw, self._a_sign = [], 0, [], []
        self._clipped = self._retried = self._rejected = 0
        self._bar = None
        pool = self.pool.x.reshape(len(self.pool), -1).astype(np.float64) / 255.0
        mean_img = pool.mean(0)
        self._mu = mean_img
        _, _, vt = np.linalg.svd(pool - mean_img, full_matrices=False)
        self._pcs = vt[:self.pca]
        order = self._rng.permutation(len(pool))
        fit_idx, line_idx = order[:self.fit_queries], order[self.fit_queries:]
        with tqdm(total=self.budget, desc="equivalent extraction", disable=not self.progress,
                  leave=False) as bar:
            self._bar = bar
            if self.fit_queries:
                self._g(pool[fit_idx])
            lines_used, idle, kinks_found, pos, curve = 0, 0, 0, 0, []
            while idle < self.patience and self._left() > self.fit_queries:
                if self.max_units and len(self._w) >= self.max_units:
                    break
                m = self.lines_per_batch
                if pos + 2 * m > len(line_idx):
                    pos = 0
                    line_idx = self._rng.permutation(line_idx)
                starts = self._shrink(pool[line_idx[pos:pos + m]], mean_img)
                ends = self._shrink(pool[line_idx[pos + m:pos + 2 * m]], mean_img)
                pos += 2 * m
                kinks = self._search_lines(starts, ends)
                lines_used += m
                kinks_found += len(kinks)
                new = 0
                for k in sorted(kinks, key=lambda k: -np.linalg.norm(k["jump"])):
                    if self.max_units and len(self._w) >= self.max_units:
                        break
                    if not self._known(k) and self._recover(k):
                        new += 1
                idle = 0 if new else idle + 1
                curve.append((self._spent(), len(self._w)))
                bar.set_postfix(units=len(self._w), lines=lines_used)
                if not kinks and self._left() <= 4 * m:
                    break
            self._bar = None
        if not self._w:
            raise AttackFailed(f"no hidden unit recovered within {self.budget} queries")
        W = np.array([v / np.linalg.norm(v) for v in self._wsum])
        b = np.array([-float(np.median(np.array(P) @ w)) for P, w in zip(self._pts, W)])
        # the same unit recovered twice (a kink the matcher missed): keep the first copy
        keep_u = np.ones(len(W), bool)
        for i in range(len(W)):
            if keep_u[i]:
                cos = W[i + 1:] @ W[i]
                same = (np.abs(cos) > 0.998) & (np.abs(b[i + 1:] - np.sign(cos) * b[i]) < 0.1)
                keep_u[i + 1:][same] = False
        duplicates = int((~keep_u).sum())
        W, b = W[keep_u], b[keep_u]
        A, Am, Lp, c, n_fit = self._fit_second_layer(W, b)
        # sign fix: the true orientation of a unit carries its output weights; the other one
        # only fits noise (or the linear remainder of a unit that never switched off)
        flip = np.linalg.norm(Am, axis=0) > np.linalg.norm(A, axis=0)
        W[flip], b[flip] = -W[flip], -b[flip]
        A, Am = np.where(flip, Am, A), np.where(flip, A, Am)
        # relu(-z) = relu(z) - z: the minus side becomes a linear term L x + l of rank <= 10,
        # carried by extra units that stay active on all of [0, 1]^784 (v.x + B > 0 there)
        A = A + Am
        L = Lp - Am @ W
        c = c - Am @ b
        U, S, Vt = np.linalg.svd(L, full_matrices=False)
        keep = S > 1e-3 * max(S.max(initial=0.0), 1e-12) if np.any(S > 1e-8) else S > np.inf
        Vk, Uk = Vt[keep], U[:, keep] * S[keep]
        Bk = np.abs(Vk).sum(1) + 1.0
        W_all = np.concatenate([W, Vk])
        b_all = np.concatenate([b, Bk])
        A_all = np.concatenate([A, Uk], 1)
        c_all = c - Uk @ Bk
        hidden = len(W_all)
        model = nets.build("mlp", hidden=hidden)
        with torch.no_grad():
            model.fc1.weight.copy_(torch.from_numpy(W_all).float())
            model.fc1.bias.copy_(torch.from_numpy(b_all).float())
            model.fc2.weight.copy_(torch.from_numpy(A_all).float())
            model.fc2.bias.copy_(torch.from_numpy(c_all).float())
        model.eval()
        self.surrogate_kwargs = {"hidden": hidden}
        self.extra.update({
            "recovered_units": len(W), "linear_units": int(keep.sum()), "hidden": hidden,
            "sign_flips": int(flip.sum()), "duplicates_dropped": duplicates, "rows_averaged": self._merged,
            "kinks_per_unit": float(np.mean([len(p) for p in self._pts])),
            "lines": lines_used, "kinks": kinks_found,
            "rejected_kinks": self._rejected, "remeasured_coordinates": self._retried,
            "fit_samples": n_fit, "units_curve": curve, "clipped_probabilities": self._clipped,
            "method": "critical points + finite differences + least squares (exact, not trained)",
        })
        return model
