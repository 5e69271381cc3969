"""Training the defences' model pool (``python -m service.defences train-pool``; ``make models``):
the CNN, the tree ensemble and the Adaptive Misinformation model, each with a JSON metadata file
beside it. Serving them is ``service.defences.pool``."""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path
from typing import Callable

import numpy as np

from service.defences.pool import POOL_FILES, SEEDS, meta_path, model_path


def _write_meta(path: Path, meta: dict) -> None:
    meta_path(path).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def train_cnn(path: Path, train, test, *, epochs: int = 2, seed: int = SEEDS["cnn"],
              progress: bool = True) -> dict:
    from common import nets, training

    t0 = time.perf_counter()
    training.seed_everything(seed)
    model = nets.build("cnn")
    cfg = training.TrainConfig(epochs=epochs, batch_size=128, seed=seed, progress=progress,
                               desc="pool: cnn")
    training.train(model, train.x, train.y, cfg)
    acc = training.accuracy(training.predict_proba(model, test.x).argmax(1), test.y)
    meta = {"name": "cnn", "arch": "cnn", "seed": seed, "epochs": epochs,
            "train_items": len(train), "test_accuracy": acc,
            "train_time_s": round(time.perf_counter() - t0, 1)}
    training.save_checkpoint(path, model, "cnn", {}, meta)
    _write_meta(path, meta)
    return meta


def train_trees(path: Path, train, test, *, n_estimators: int = 30, min_samples_leaf: int = 5,
                seed: int = SEEDS["trees"], progress: bool = True) -> dict:
    from sklearn.ensemble import ExtraTreesClassifier
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    x = train.x.reshape(len(train), -1).astype(np.float32) / 255.0
    clf = ExtraTreesClassifier(n_estimators=0, min_samples_leaf=min_samples_leaf, n_jobs=1,
                               random_state=seed, warm_start=True)
    # grow the forest a few trees at a time for a progress bar (warm_start keeps earlier trees)
    step = max(1, n_estimators // 10)
    with tqdm(total=n_estimators, desc="pool: trees", disable=not progress, leave=False) as bar:
        while clf.n_estimators < n_estimators:
            clf.n_estimators = min(n_estimators, clf.n_estimators + step)
            clf.fit(x, train.y)
            bar.n = clf.n_estimators
            bar.refresh()
    clf.warm_start = False
    xt = test.x.reshape(len(test), -1).astype(np.float32) / 255.0
    t1 = time.perf_counter()
    acc = float(np.mean(clf.predict(xt) == test.y))
    predict_ms = (time.perf_counter() - t1) / len(test) * 1000 * 256
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(clf, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    meta = {"name": "trees", "arch": "sklearn.ExtraTreesClassifier", "seed": seed,
            "n_estimators": n_estimators, "min_samples_leaf": min_samples_leaf,
            "train_items": len(train), "test_accuracy": acc,
            "predict_ms_per_256": round(predict_ms, 1),
            "file_mb": round(path.stat().st_size / 2**20, 1),
            "train_time_s": round(time.perf_counter() - t0, 1)}
    _write_meta(path, meta)
    return meta


def misinformation_loss(logits, y):
    """Adaptive Misinformation's loss: cross-entropy of log(1 - softmax) on the true labels,
    i.e. -log(1 - p_true): minimised by putting the probability off the true class."""
    import torch

    p_true = torch.softmax(logits, 1).gather(1, y[:, None])[:, 0]
    return -torch.log1p(-p_true.clamp(max=1 - 1e-6)).mean()


def train_misinformation(path: Path, train, test, *, epochs: int = 3, arch: str = "mlp",
                         seed: int = SEEDS["misinformation"], progress: bool = True) -> dict:
    import torch
    from tqdm.auto import tqdm

    from common import nets, training

    t0 = time.perf_counter()
    gen = training.seed_everything(seed)
    model = nets.build(arch)
    xt, yt = training.to_tensor(train.x), torch.from_numpy(np.array(train.y, np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bs = 128
    steps = epochs * math.ceil(len(xt) / bs)
    model.train()
    with tqdm(total=steps, desc="pool: misinformation", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), bs):
                idx = perm[i:i + bs]
                loss = misinformation_loss(model(xt[idx]), yt[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    pt = training.predict_proba(model, test.x)
    meta = {"name": "misinformation", "arch": arch, "seed": seed, "epochs": epochs,
            "loss": "-log(1 - softmax[true])", "train_items": len(train),
            "test_accuracy": training.accuracy(pt.argmax(1), test.y),
            "test_mean_prob_true": float(pt[np.arange(len(test)), test.y].mean()),
            "train_time_s": round(time.perf_counter() - t0, 1)}
    training.save_checkpoint(path, model, arch, {}, meta)
    _write_meta(path, meta)
    return meta


def train_pool(artifacts: Path, *, force: bool = False, train_size: int | None = None,
               cnn_epochs: int = 2, trees: int = 30, misinfo_epochs: int = 3,
               only: list[str] | None = None, progress: bool = True, data_root=None,
               log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train (or reuse) the pool models into artifacts/pool/. Test accuracy is on the full
    Fashion-MNIST test split."""
    from common import data

    train = data.load("fashion", "train", data_root).take(train_size)
    test = data.load("fashion", "test", data_root)
    out = {}
    for name in only or list(POOL_FILES):
        path = model_path(artifacts, name)
        if path.exists() and not force:
            meta = json.loads(meta_path(path).read_text()) if meta_path(path).exists() else {}
            log(f"{name}: cached at {path} (test accuracy {meta.get('test_accuracy', '?')}); "
                "--force retrains")
            out[name] = meta
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "cnn":
            meta = train_cnn(path, train, test, epochs=cnn_epochs, progress=progress)
        elif name == "trees":
            meta = train_trees(path, train, test, n_estimators=trees, progress=progress)
        else:
            meta = train_misinformation(path, train, test, epochs=misinfo_epochs,
                                        progress=progress)
        meta["data"] = data.fingerprint(train)
        _write_meta(path, meta)
        log(f"{name}: trained in {meta['train_time_s']} s, test accuracy "
            f"{meta['test_accuracy']:.4f} -> {path}")
        out[name] = meta
    return out
