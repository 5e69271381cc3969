"""Train the default target: the original course project's MLP on the 60k train split; and the
same MLP trained with DP-SGD (``train_dp_target``, issue 15: differential privacy on the
parameters)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from common import data, nets, training

log = logging.getLogger("modelguard.train")

DEFAULTS = dict(epochs=20, batch_size=64, lr=1e-3, seed=0)
# DP-SGD recipe: the best of 8 tried at epsilon 3 on a held-out slice of the train split
# (train 55000-59999 as validation; never the test split): docs/dp.md
DP_DEFAULTS = dict(epochs=40, batch_size=2048, lr=0.4, optimizer="sgd", max_grad_norm=1.0,
                   delta=1e-5, accountant="rdp", seed=0)
ARCHITECTURE = "Flatten-Linear(784,128)-ReLU-Linear(128,10)-softmax"


def _evaluate_and_save(out: Path, model, train, root, meta: dict) -> dict:
    """Test and evaluation-set accuracy, data fingerprint, torch version; save checkpoint."""
    test = data.load("fashion", "test", root)
    ev = data.eval_set(root)
    meta.update({
        "test_accuracy": training.accuracy(training.predict_proba(model, test.x).argmax(1),
                                           test.y),
        "eval_accuracy": training.accuracy(training.predict_proba(model, ev.x).argmax(1), ev.y),
        "data_fingerprint": data.fingerprint(train), "torch": str(torch.__version__),
    })
    training.save_checkpoint(out, model, "mlp", {}, meta)
    return meta


def train_target(out: Path, *, epochs: int = DEFAULTS["epochs"],
                 batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                 seed: int = DEFAULTS["seed"], root=None, limit: int | None = None,
                 progress: bool = True, threads: int = 1) -> dict:
    """Train deterministically, evaluate on the full test split, save checkpoint + metadata.

    ``limit`` trains on the first ``limit`` train images only (tests). ``threads`` sets torch's
    thread count: small batches gain nothing from more, and on a busy 2-core machine OpenMP
    threads that spin-wait on each other slow training by orders of magnitude."""
    torch.set_num_threads(threads)
    train = data.load("fashion", "train", root).take(limit)
    training.seed_everything(seed)  # weight init is part of the seeded run
    model = nets.build("mlp")
    t0 = time.perf_counter()
    training.train(model, train.x, train.y, training.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
        desc="train target"))
    seconds = time.perf_counter() - t0
    meta = {
        "arch": "mlp", "architecture": ARCHITECTURE,
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "train_items": len(train), "train_seconds": round(seconds, 1),
    }
    return _evaluate_and_save(out, model, train, root, meta)


def train_dp_target(out: Path, *, epsilon: float | None = None,
                    noise_multiplier: float | None = None, delta: float = DP_DEFAULTS["delta"],
                    max_grad_norm: float = DP_DEFAULTS["max_grad_norm"],
                    epochs: int = DP_DEFAULTS["epochs"],
                    batch_size: int = DP_DEFAULTS["batch_size"], lr: float = DP_DEFAULTS["lr"],
                    optimizer: str = DP_DEFAULTS["optimizer"],
                    accountant: str = DP_DEFAULTS["accountant"], seed: int = DP_DEFAULTS["seed"],
                    root=None, limit: int | None = None, progress: bool = True,
                    threads: int = 1) -> dict:
    """The target's MLP trained with DP-SGD on the train split (or its first ``limit`` images).

    Give ``epsilon`` (the accountant picks the noise multiplier that spends at most epsilon at
    ``delta`` in ``epochs``) or ``noise_multiplier`` (the accountant reports what it spends).
    The checkpoint's metadata holds the privacy record under ``"dp"`` (epsilon spent, delta,
    noise multiplier, clip norm, epochs, steps, sampling rate, accountant); the server shows it
    in ModelMetadata."""
    torch.set_num_threads(threads)
    train = data.load("fashion", "train", root).take(limit)
    training.seed_everything(seed)
    model = nets.build("mlp")
    t0 = time.perf_counter()
    model, privacy = training.train_dp(model, train.x, train.y, training.DPConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        max_grad_norm=max_grad_norm, delta=delta, target_epsilon=epsilon,
        noise_multiplier=noise_multiplier, accountant=accountant, seed=seed,
        progress=progress, desc=f"DP-SGD target (eps {epsilon if epsilon else '?'})"))
    seconds = time.perf_counter() - t0
    meta = {
        "arch": "mlp", "architecture": ARCHITECTURE, "training": "DP-SGD",
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "train_items": len(train), "train_seconds": round(seconds, 1), "dp": privacy,
    }
    meta = _evaluate_and_save(out, model, train, root, meta)
    log.info("DP target: epsilon %s at delta %g (noise %.3f, clip %g, %d epochs), test "
             "accuracy %.4f -> %s", privacy["epsilon"], delta, privacy["noise_multiplier"],
             max_grad_norm, epochs, meta["test_accuracy"], out)
    return meta


def privacy_parameters(meta: dict) -> dict[str, str]:
    """The privacy record of a checkpoint's metadata as strings (ModelMetadata.parameters)."""
    dp = meta.get("dp")
    if not dp:
        return {"privacy": "none"}
    eps = dp.get("epsilon")
    out = {"privacy": "DP-SGD" if eps is not None else "none (DP-SGD clipping without noise)",
           "dp_epsilon": f"{eps:.4g}" if eps is not None else "inf",
           "dp_delta": f"{dp['delta']:g}"}
    for key in ("noise_multiplier", "max_grad_norm", "epochs", "accountant"):
        if key in dp:
            v = dp[key]
            out[f"dp_{key}"] = f"{v:.4g}" if isinstance(v, float) else str(v)
    return out
