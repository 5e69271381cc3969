"""Train the default target: the original course project's MLP on the 60k train split."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from common import data, nets, training

log = logging.getLogger("modelguard.train")

DEFAULTS = dict(epochs=20, batch_size=64, lr=1e-3, seed=0)


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
    test = data.load("fashion", "test", root)
    training.seed_everything(seed)  # weight init is part of the seeded run
    model = nets.build("mlp")
    t0 = time.perf_counter()
    training.train(model, train.x, train.y, training.TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
        desc="train target"))
    seconds = time.perf_counter() - t0
    pred = training.predict_proba(model, test.x).argmax(1)
    ev = data.eval_set(root)
    meta = {
        "arch": "mlp", "architecture": "Flatten-Linear(784,128)-ReLU-Linear(128,10)-softmax",
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "train_items": len(train), "train_seconds": round(seconds, 1),
        "test_accuracy": training.accuracy(pred, test.y),
        "eval_accuracy": training.accuracy(training.predict_proba(model, ev.x).argmax(1), ev.y),
        "data_fingerprint": data.fingerprint(train), "torch": str(torch.__version__),
    }
    training.save_checkpoint(out, model, "mlp", {}, meta)
    return meta
