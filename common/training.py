"""Deterministic training and inference helpers shared by the target, the defences' model pool
and the attackers' surrogates."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from common import nets


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float images are taken as already in [0, 1]."""
    x = np.ascontiguousarray(x)
    t = torch.from_numpy(x if x.flags.writeable else x.copy())
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    progress: bool = True
    desc: str = "train"


def train(model: nn.Module, x: np.ndarray, targets: np.ndarray, cfg: TrainConfig) -> nn.Module:
    """Train ``model`` with Adam.

    targets: int labels (N,) -> cross-entropy; or float probability rows (N, 10) -> soft
    cross-entropy (the copycat's loss on returned confidences).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    gen = seed_everything(cfg.seed)
    xt = to_tensor(x)
    soft = np.asarray(targets).ndim == 2
    yt = torch.from_numpy(np.array(targets, dtype=np.float32 if soft else np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    n = len(xt)
    steps = cfg.epochs * ((n + cfg.batch_size - 1) // cfg.batch_size)
    with tqdm(total=steps, desc=cfg.desc, disable=not cfg.progress, leave=False) as bar:
        for epoch in range(cfg.epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for i in range(0, n, cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                logits = model(xt[idx])
                if soft:
                    loss = -(yt[idx] * F.log_softmax(logits, 1)).sum(1).mean()
                else:
                    loss = F.cross_entropy(logits, yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / n:.4f}")
    model.eval()
    return model


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(to_tensor(x[i:i + batch_size])), 1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 10), np.float32)


def accuracy(pred_labels: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.asarray(pred_labels) == np.asarray(y)))


def save_checkpoint(path: str | Path, model: nn.Module, arch: str, arch_kwargs: dict,
                    meta: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"arch": arch, "arch_kwargs": arch_kwargs, "state_dict": model.state_dict(),
                "meta": meta}, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Returns (model in eval mode, metadata dict incl. 'arch')."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}; train one first (make train)")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    model = nets.build(ck["arch"], **ck.get("arch_kwargs", {}))
    model.load_state_dict(ck["state_dict"])
    model.eval()
    meta = dict(ck.get("meta", {}))
    meta.setdefault("arch", ck["arch"])
    return model, meta
