"""Model switching at serving time: the pool of heterogeneous models trained on the same data (the
MLP target, a small CNN, a scikit-learn tree ensemble) plus the Adaptive Misinformation model,
where their files live, loading and caching them, and the two policies that use them. Training
them is ``service.defences.pool_train`` (``python -m service.defences train-pool``), which the
server never imports."""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from common.types import Answer, AnswerKind, NUM_CLASSES
from service.defences.base import (ROUTE_RANGE, AnswerPolicy, PolicyContext, as_probs, finish,
                                   labels_for, renormalise)

POOL_DIR = "pool"
# name -> file in artifacts/pool/ ("target" is the service's own model: no file here)
POOL_FILES = {"cnn": "cnn.pt", "trees": "trees.pkl", "misinformation": "misinfo.pt"}
SEEDS = {"cnn": 101, "trees": 102, "misinformation": 103}
# DP-SGD targets (docs/dp.md), trained by `python -m service train --dp-epsilon E` or `make dp`
# into ARTIFACTS/dp/epsE.pt; in a switch pool they are named "dp_epsE" (e.g. "dp_eps3").
DP_DIR = "dp"
DP_PREFIX = "dp_eps"


def dp_path(artifacts: Path, epsilon: float | str) -> Path:
    """ARTIFACTS/dp/eps{epsilon:g}.pt: where the DP target for a privacy budget lives."""
    return Path(artifacts) / DP_DIR / f"eps{float(epsilon):g}.pt"


def dp_epsilon_of(name: str) -> float | None:
    """3.0 for the pool name "dp_eps3"; None for a name that is not a DP target's."""
    if not name.startswith(DP_PREFIX):
        return None
    try:
        eps = float(name[len(DP_PREFIX):])
    except ValueError:
        return None
    return eps if eps > 0 and math.isfinite(eps) else None


def pool_dir(artifacts: Path) -> Path:
    return Path(artifacts) / POOL_DIR


def model_path(artifacts: Path, name: str) -> Path:
    if dp_epsilon_of(name) is not None:
        return dp_path(artifacts, dp_epsilon_of(name))
    if name not in POOL_FILES:
        raise ValueError(f"unknown pool model {name!r}; expected one of "
                         f"{sorted(POOL_FILES)}, 'target' or a DP target 'dp_epsE'")
    return pool_dir(artifacts) / POOL_FILES[name]


def meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _float_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

@dataclass
class PoolModel:
    name: str
    predict_proba: Callable[[np.ndarray], np.ndarray]   # float images (N,28,28) -> (N,10)
    meta: dict


@lru_cache(maxsize=16)
def _load_cached(path_str: str, mtime: float, name: str) -> PoolModel:
    path = Path(path_str)
    meta = json.loads(meta_path(path).read_text()) if meta_path(path).exists() else {}
    if path.suffix == ".pkl":
        with open(path, "rb") as f:
            clf = pickle.load(f)

        def proba(images, clf=clf):
            if len(images) == 0:
                return np.zeros((0, NUM_CLASSES), np.float32)
            x = _float_images(images).reshape(len(images), -1)
            out = np.zeros((len(x), NUM_CLASSES), np.float64)
            out[:, clf.classes_.astype(int)] = clf.predict_proba(x)
            return out.astype(np.float32)
        return PoolModel(name, proba, meta)
    from common import training  # torch: imported lazily

    model, ck_meta = training.load_checkpoint(path)
    model = model.eval().double()   # served as the target is: the same bits in any batch
    return PoolModel(name,
                     lambda images, m=model: training.predict_proba_f64(m, _float_images(images)),
                     {**ck_meta, **meta})


def load_model(artifacts: Path, name: str) -> PoolModel:
    path = model_path(artifacts, name)
    if not path.exists() and dp_epsilon_of(name) is not None:
        raise FileNotFoundError(
            f"DP target {name!r} not found at {path}; train it with `python -m service train "
            f"--dp-epsilon {dp_epsilon_of(name):g}` (or `make dp`)")
    if not path.exists():
        raise FileNotFoundError(
            f"pool model {name!r} not found at {path}; train the model pool first with "
            f"`make models` (python -m service.defences train-pool --artifacts {artifacts})")
    return _load_cached(str(path.resolve()), path.stat().st_mtime, name)


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------

class SwitchPolicy(AnswerPolicy):
    """Each item is answered by one pool model, chosen by the route bytes of its keyed digest
    (``ctx.digests(images)``, a uint64) mod len(models). The same image always goes to the same model (for every client), so
    repeats cannot be averaged; different images go to different models, so a copy is trained
    on a mixture of several decision functions. 'target' means the target's own probabilities
    (the service passes them in)."""

    name = "switch"

    def __init__(self, models: dict[str, PoolModel | None]):
        if not models:
            raise ValueError("switch needs at least one model")
        self.names = list(models)
        self.models = models
        self._name_array = np.array(self.names, dtype=object)

    def route(self, images: np.ndarray, ctx: PolicyContext) -> np.ndarray:
        words = ctx.digests(images).words(ROUTE_RANGE, 8)[:, 0]
        return (words % np.uint64(len(self.names))).astype(np.int64)

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        idx = self.route(images, ctx)
        q = p.copy()
        for j, name in enumerate(self.names):
            sel = idx == j
            if sel.any() and self.models[name] is not None:
                q[sel] = self.models[name].predict_proba(np.asarray(images)[sel])
        q = renormalise(q, p)
        q32 = finish(q)
        return Answer(q32.argmax(1), q32, AnswerKind.PROBABILITIES,
                      model=self._name_array[idx].tolist())


class MisinformationPolicy(AnswerPolicy):
    """Adaptive Misinformation (Kariyappa & Qureshi 2020).

    mode 'blend' (the paper's smooth form): y' = (1 - a) y + a y_mis with
    a = sigmoid(nu * (tau - max y)): confident answers stay the target's, uncertain ones
    (typical of out-of-distribution or synthetic queries) come from the misinformation model.
    mode 'replace': every answer is the misinformation model's (for a client already escalated).
    """

    name = "misinformation"

    def __init__(self, model: PoolModel, mode: str = "blend", tau: float = 0.99,
                 nu: float = 10000.0):
        if mode not in ("blend", "replace"):
            raise ValueError(f"unknown misinformation mode {mode!r}")
        self.model, self.mode, self.tau, self.nu = model, mode, float(tau), float(nu)

    def weights(self, p: np.ndarray) -> np.ndarray:
        if self.mode == "replace":
            return np.ones(len(p))
        z = np.clip(self.nu * (self.tau - p.max(1)), -60, 60)
        return 1.0 / (1.0 + np.exp(-z))

    def answer(self, images, probs, ctx: PolicyContext) -> Answer:
        p = as_probs(probs)
        a = self.weights(p)
        q = p.copy()
        use = a > 1e-12
        if use.any():
            mis = self.model.predict_proba(np.asarray(images)[use]).astype(np.float64)
            q[use] = (1 - a[use, None]) * p[use] + a[use, None] * mis
        q = finish(renormalise(q, p))
        return Answer(labels_for(q, p), q, AnswerKind.PROBABILITIES,
                      model=np.where(a >= 0.5, "misinformation", "target").tolist())
