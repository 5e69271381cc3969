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


def thread_ready() -> int:
    """Apply torch's thread count (torch.set_num_threads) to the calling thread before it runs a
    model; returns the count. torch applies it to a new thread's OpenMP and MKL pools only
    when that thread first asks (at::get_num_threads, or a parallel ATen loop); a matrix
    product run before that (a Linear layer on a fresh gRPC worker thread) takes OpenMP's
    default, every core: it competes with the server's other threads for the cores, and splits
    its sums differently, answering in different last bits than the same model on another
    thread (seen on a 2-core AVX-512 machine). A thread-local check after the first call."""
    return torch.get_num_threads()


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    thread_ready()
    model.eval()
    out = [torch.softmax(model(to_tensor(x[i:i + batch_size])), 1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros((0, 10), np.float32)


@torch.inference_mode()
def predict_proba_f64(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """What a served model answers: ``model`` (eval, already ``.double()``) computes in float64
    and the probabilities are rounded once to float32. In float32 an image's probabilities
    depended on the batch it came in (matrix products pick kernels by row count), so the same
    image got different last bits alone and among others; float64 rows differ by ~1e-14 at most,
    below float32's rounding (docs/defences.md)."""
    thread_ready()
    return torch.softmax(model(to_tensor(x).double()), 1).float().numpy()


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


# --------------------------------------------------------------------------------------------
# Differentially private training (DP-SGD on the parameters; Opacus, an optional dependency)
# --------------------------------------------------------------------------------------------

OPACUS_HINT = ("DP-SGD training needs Opacus (an optional dependency): "
               "pip install 'opacus==1.6.0' (or pip install -e '.[dp]')")


@dataclass
class DPConfig:
    """DP-SGD (Abadi et al. 2016): Poisson-sampled batches, each example's gradient clipped to
    ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` added to the
    sum. Give either ``target_epsilon`` (the accountant then finds the noise multiplier for
    ``epochs`` at ``delta``) or ``noise_multiplier`` (the accountant reports the epsilon it
    spends). ``noise_multiplier=0`` is the same training with clipping only: no privacy
    guarantee (epsilon None), a control for what the recipe alone does."""
    epochs: int = 40
    batch_size: int = 2048          # expected batch size: sampling rate 1 / ceil(N / batch_size)
    lr: float = 0.4
    optimizer: str = "sgd"          # "sgd" (momentum 0.9) or "adam"
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    accountant: str = "rdp"         # Opacus accountant: "rdp" or "prv"
    seed: int = 0
    progress: bool = True
    desc: str = "train (DP-SGD)"


def dp_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                        epochs: int, accountant: str = "rdp") -> float:
    """The smallest noise multiplier whose privacy loss after ``epochs`` epochs of
    Poisson sampling at ``sample_rate`` is at most (target_epsilon, delta)."""
    try:
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:
        raise ImportError(OPACUS_HINT) from exc
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, epochs=epochs,
                                      accountant=accountant))


def train_dp(model: nn.Module, x: np.ndarray, labels: np.ndarray,
             cfg: DPConfig) -> tuple[nn.Module, dict]:
    """Train ``model`` on int ``labels`` with DP-SGD (Opacus, ghost clipping: exact per-example
    clipping without materialising per-example gradients). Returns (the plain trained module
    in eval mode, the privacy record: epsilon spent per the accountant, delta, noise multiplier,
    clip norm, epochs, steps, sampling rate, ...). Deterministic for a seed (the noise comes from
    a seeded torch generator, not a cryptographic one: see docs/dp.md)."""
    import warnings

    try:
        import opacus
        from opacus import PrivacyEngine
    except ImportError as exc:
        raise ImportError(OPACUS_HINT) from exc
    from torch.utils.data import DataLoader, TensorDataset

    if len(x) == 0:
        raise ValueError("cannot train on an empty set")
    if (cfg.target_epsilon is None) == (cfg.noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    if cfg.target_epsilon is not None and cfg.target_epsilon <= 0:
        raise ValueError(f"target epsilon must be positive, got {cfg.target_epsilon}")
    if cfg.noise_multiplier is not None and cfg.noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {cfg.noise_multiplier}")
    if not 0 < cfg.delta < 1 or cfg.max_grad_norm <= 0 or cfg.epochs <= 0:
        raise ValueError("need 0 < delta < 1, max_grad_norm > 0 and epochs > 0")
    if np.asarray(labels).ndim != 1:
        raise ValueError("DP training takes int labels (N,)")
    gen = seed_everything(cfg.seed)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    ds = TensorDataset(to_tensor(x), torch.from_numpy(np.array(labels, dtype=np.int64)))
    loader = DataLoader(ds, batch_size=min(cfg.batch_size, len(ds)), shuffle=True,
                        generator=gen)
    sample_rate = 1.0 / len(loader)
    sigma = cfg.noise_multiplier
    if sigma is None:
        sigma = dp_noise_multiplier(cfg.target_epsilon, cfg.delta, sample_rate, cfg.epochs,
                                    cfg.accountant)
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; expected 'adam' or 'sgd'")
    with warnings.catch_warnings():
        # "Secure RNG turned off": deliberate (reproducible runs; docs/dp.md says what it means)
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=cfg.accountant, secure_mode=False)
        dp_model, dp_opt, criterion, dp_loader = engine.make_private(
            module=model, optimizer=opt, criterion=nn.CrossEntropyLoss(), data_loader=loader,
            noise_multiplier=sigma, max_grad_norm=cfg.max_grad_norm, poisson_sampling=True,
            noise_generator=noise_gen, grad_sample_mode="ghost")
    steps = cfg.epochs * len(dp_loader)
    dp_model.train()
    with tqdm(total=steps, desc=cfg.desc, disable=not cfg.progress, leave=False) as bar, \
            warnings.catch_warnings():
        # Opacus' second (clipped) backward pass runs with no input requiring a gradient
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        for epoch in range(cfg.epochs):
            total, seen = 0.0, 0
            for xb, yb in dp_loader:
                dp_opt.zero_grad()
                loss = criterion(dp_model(xb), yb)
                loss.backward()
                dp_opt.step()
                total += loss.item() * len(yb)
                seen += len(yb)
                bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / max(seen, 1):.4f}",
                            eps=f"{engine.get_epsilon(cfg.delta):.2f}" if sigma else "inf")
    epsilon = float(engine.get_epsilon(cfg.delta)) if sigma else None  # None: no guarantee
    plain = dp_model.to_standard_module()
    plain.zero_grad(set_to_none=True)
    plain.eval()
    privacy = {
        "mechanism": "DP-SGD: Poisson sampling, per-example clipping (flat), Gaussian noise",
        "epsilon": epsilon, "delta": cfg.delta, "target_epsilon": cfg.target_epsilon,
        "noise_multiplier": float(sigma), "max_grad_norm": cfg.max_grad_norm,
        "epochs": cfg.epochs, "expected_batch_size": len(ds) * sample_rate,
        "sample_rate": sample_rate, "steps": steps, "train_items": len(ds),
        "optimizer": cfg.optimizer, "lr": cfg.lr, "accountant": cfg.accountant,
        "secure_rng": False, "library": f"opacus {opacus.__version__} (ghost clipping)",
    }
    return plain, privacy
