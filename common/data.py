"""Fashion-MNIST and MNIST as uint8 numpy arrays, plus the evaluation protocol's splits.

The data directory is torchvision's root (it holds ``FashionMNIST/raw`` and ``MNIST/raw``). It is
taken from, in order: the ``root`` argument, the ``MODELGUARD_DATA`` environment variable,
``./data``. When the files are absent torchvision's download is tried; if that fails too,
:class:`DataUnavailable` says how to provide them.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

ENV_VAR = "MODELGUARD_DATA"
DEFAULT_ROOT = "data"

# Evaluation protocol (README "Evaluation protocol"): fixed index ranges of the test split.
POOL = slice(0, 5000)      # attackers' in-distribution pool; honest traffic comes from here too
EVAL = slice(5000, 10000)  # evaluation set; never queried

_DATASETS = {"fashion": "FashionMNIST", "mnist": "MNIST"}


class DataUnavailable(RuntimeError):
    """The data set is neither on disk nor downloadable."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # uint8 (N, 28, 28)
    y: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int | None) -> "Split":
        return self if n is None else Split(self.x[:n], self.y[:n])


def data_root(root: str | os.PathLike | None = None) -> Path:
    return Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)


@lru_cache(maxsize=8)
def _load(name: str, train: bool, root: str) -> Split:
    from torchvision import datasets  # imported lazily: heavy

    cls = getattr(datasets, _DATASETS[name])
    try:
        ds = cls(root, train=train, download=False)
    except RuntimeError:
        try:
            ds = cls(root, train=train, download=True)
        except Exception as exc:  # network errors come in many types
            raise DataUnavailable(
                f"{_DATASETS[name]} not found under {Path(root).resolve()} and the download "
                f"failed ({type(exc).__name__}: {exc}). Put torchvision's raw files in "
                f"{Path(root) / _DATASETS[name] / 'raw'} (train-images-idx3-ubyte, ...), or point "
                f"{ENV_VAR} (or --data) at a directory that has them."
            ) from exc
    x = ds.data.numpy().astype(np.uint8, copy=False)
    y = ds.targets.numpy().astype(np.int64, copy=False)
    x.setflags(write=False)
    y.setflags(write=False)
    return Split(x, y)


def load(name: str = "fashion", split: str = "train", root=None) -> Split:
    """Load ``name`` ('fashion' or 'mnist'), ``split`` ('train' or 'test')."""
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; expected one of {sorted(_DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    return _load(name, split == "train", str(data_root(root)))


def attack_pool(root=None) -> Split:
    """Test images 0-4999 of Fashion-MNIST: what attackers and honest users may query."""
    t = load("fashion", "test", root)
    return Split(t.x[POOL], t.y[POOL])


def eval_set(root=None) -> Split:
    """Test images 5000-9999 of Fashion-MNIST: the held-out evaluation set."""
    t = load("fashion", "test", root)
    return Split(t.x[EVAL], t.y[EVAL])


def ood_pool(root=None) -> Split:
    """MNIST test images: the out-of-distribution pool."""
    return load("mnist", "test", root)


def fingerprint(split: Split) -> str:
    """Short SHA-256 of images and labels, stored in checkpoints' metadata."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.x).tobytes())
    h.update(np.ascontiguousarray(split.y).tobytes())
    return h.hexdigest()[:16]
