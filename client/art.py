"""IBM ART interoperability: the modelguard API as an ART ``BlackBoxClassifier``.

    from art.attacks.extraction import CopycatCNN
    from client.art import RemoteClassifier, art_images, pytorch_thief
    from common import data, nets

    with RemoteClassifier("127.0.0.1:50051", api_key="alice", budget=5000) as victim:
        thief = pytorch_thief(nets.build("mlp"))
        attack = CopycatCNN(victim, nb_stolen=5000, use_probability=True,
                            batch_size_query=256, batch_size_fit=64, nb_epochs=30)
        stolen = attack.extract(art_images(data.attack_pool().x), thieved_classifier=thief)

Conventions (what ART expects, and what the server takes):

* inputs are float32 in [0, 1] (``clip_values=(0.0, 1.0)``), channels first: ``(N, 1, 28, 28)``
  (``channels_first=False`` gives ``(N, 28, 28, 1)``); ``(N, 28, 28)`` is accepted too.
  :func:`art_images` turns the project's uint8 ``(N, 28, 28)`` arrays into that.
* ``predict`` returns float32 ``(N, 10)`` rows (``nb_classes=10``): the server's probability
  vector where the server gives one, and the **one-hot row of the server's label where the answer
  is label-only** (a defended API, or ``labels_only=True``). ART's extraction attacks with
  ``use_probability=True`` train on these rows as they are; a one-hot row is exactly the label, so
  the thief trains on what the server said rather than on a made-up distribution. Never return
  zeros or a uniform row for a withheld probability vector: every argmax then becomes class 0
  and the thief ends at chance. :attr:`RemoteClassifier.answer_kinds` counts which rows were which.
* ``budget``: at most that many images are sent; a ``predict`` that would go past it raises
  :class:`~client.oracle.BudgetExceeded` before sending anything of that call.

Each ``predict`` is sent in Predict calls of at most ``batch_size`` images (and the server's
advertised limit) through :class:`client.api.RemoteOracle`. ART's extraction attacks default to
``batch_size_query=1`` (one call per image): pass a larger one.

``python -m client.art`` runs ART's CopycatCNN or KnockoffNets against a server and evaluates
the thief under the project's protocol (docs/art.md). ART is an optional dependency, pinned:
``pip install -e '.[art]'`` (or requirements.txt).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from client.api import RemoteOracle
from client.oracle import BudgetExceeded
from common.types import IMAGE_SHAPE, NUM_CLASSES

ART_VERSION = "1.20.1"  # the pin in pyproject.toml's extra "art" and requirements.txt
CLIP_VALUES = (0.0, 1.0)
ART_HINT = (f"client.art needs IBM ART (an optional dependency): pip install "
            f"adversarial-robustness-toolbox=={ART_VERSION}  (or pip install -e '.[art]')")

try:
    from art.estimators.classification import BlackBoxClassifier
except ImportError as exc:  # pragma: no cover - exercised only without ART
    raise ImportError(ART_HINT) from exc

__all__ = ["RemoteClassifier", "remote_classifier", "art_images", "pytorch_thief",
           "BudgetExceeded", "CLIP_VALUES", "ART_VERSION"]


def input_shape(channels_first: bool = True) -> tuple[int, int, int]:
    return (1, *IMAGE_SHAPE) if channels_first else (*IMAGE_SHAPE, 1)


def art_images(x: np.ndarray, channels_first: bool = True) -> np.ndarray:
    """The project's images (uint8 or [0, 1] floats, ``(N, 28, 28)``) as ART wants them:
    float32 in [0, 1], ``(N, 1, 28, 28)`` (or ``(N, 28, 28, 1)``)."""
    x = np.asarray(x)
    x = x.astype(np.float32) / np.float32(255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    x = x.reshape(len(x), *IMAGE_SHAPE)
    return x[:, None] if channels_first else x[..., None]


def _server_images(x: np.ndarray) -> np.ndarray:
    """ART's batch -> what the wire takes: (N, 28, 28), uint8 as it is, floats checked for
    [0, 1] here (a clear error, and no query spent) rather than rejected by the server."""
    x = np.asarray(x)
    if x.ndim == 3 and x.shape[1:] == IMAGE_SHAPE:
        pass
    elif x.ndim == 4 and x.shape[1:] in ((1, *IMAGE_SHAPE), (*IMAGE_SHAPE, 1)):
        x = x.reshape(len(x), *IMAGE_SHAPE)
    else:
        raise ValueError(f"images must have shape (N, 1, 28, 28), (N, 28, 28, 1) or (N, 28, 28); "
                         f"got {x.shape}")
    if x.dtype == np.uint8:
        return x
    x = x.astype(np.float32, copy=False)
    if len(x) and (not np.isfinite(x).all() or x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"pixel values must be finite floats in [0, 1] (clip_values={CLIP_VALUES}); got range "
            f"[{np.nanmin(x):.4g}, {np.nanmax(x):.4g}]. Scale uint8 images with art_images(x) "
            "(or x / 255).")
    return x


class RemoteClassifier(BlackBoxClassifier):
    """An ART ``BlackBoxClassifier`` whose predictions come from a modelguard server.

    address, api_key: the server and the client's identity (the monitor sees every query).
    budget: stop after this many images (queries); ``None`` is unlimited.
    labels_only: ask the server for labels only (rows are then always one-hot).
    batch_size: images per Predict call (capped by the server's ``max_batch_size``).
    """

    def __init__(self, address: str, api_key: str, *, budget: int | None = None,
                 labels_only: bool = False, batch_size: int = 256, channels_first: bool = True):
        self.oracle = RemoteOracle(address, api_key, budget, labels_only=labels_only,
                                   batch_size=batch_size)
        self.address = address
        self.channels_first = channels_first
        super().__init__(predict_fn=self._predict_rows, input_shape=input_shape(channels_first),
                         nb_classes=NUM_CLASSES, clip_values=CLIP_VALUES)

    # -- budget and bookkeeping ---------------------------------------------------------------
    @property
    def budget(self) -> int | None:
        return self.oracle.budget

    @property
    def queries_used(self) -> int:
        return self.oracle.queries_used

    @property
    def remaining(self) -> int | None:
        return self.oracle.remaining

    @property
    def answer_kinds(self) -> dict[str, int]:
        """Images answered per kind: {"probabilities": n, "label_only": m}."""
        return dict(self.oracle.kinds)

    def close(self) -> None:
        self.oracle.close()

    def __enter__(self) -> "RemoteClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- ART interface ------------------------------------------------------------------------
    def predict(self, x: np.ndarray, batch_size: int = 128, **kwargs) -> np.ndarray:
        n = len(x)
        if self.remaining is not None and n > self.remaining:
            raise BudgetExceeded(
                f"the query budget is spent: this predict needs {n} queries but only "
                f"{self.remaining} of the budget of {self.budget} remain ({self.queries_used} "
                f"used); nothing of this call was sent. Raise RemoteClassifier(budget=...) or "
                f"ask for fewer (e.g. the attack's nb_stolen).")
        return super().predict(x, batch_size=batch_size, **kwargs)

    def _predict_rows(self, x: np.ndarray) -> np.ndarray:
        """ART's predict_fn: (n, 10) float32 rows, probabilities or one-hot labels per answer."""
        images = _server_images(x)
        out = np.empty((len(images), NUM_CLASSES), dtype=np.float32)
        step = self.oracle.client._effective_batch() if len(images) else 1
        for i in range(0, len(images), step):
            answer = self.oracle(images[i:i + step])
            if answer.probs is not None:
                out[i:i + step] = answer.probs
            else:
                out[i:i + step] = np.eye(NUM_CLASSES, dtype=np.float32)[answer.labels]
        return out


def remote_classifier(address: str, api_key: str, **kwargs) -> RemoteClassifier:
    """``RemoteClassifier(address, api_key, **kwargs)``: the server as an ART BlackBoxClassifier."""
    return RemoteClassifier(address, api_key, **kwargs)


def pytorch_thief(model, lr: float = 1e-3, channels_first: bool = True):
    """An ART ``PyTorchClassifier`` around ``model`` trained like the project's attacks train
    their surrogates: Adam, cross-entropy (which takes probability rows as soft targets and one-hot
    rows as labels), inputs in [0, 1], 10 classes, CPU."""
    import torch
    from art.estimators.classification import PyTorchClassifier

    return PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(),
                             optimizer=torch.optim.Adam(model.parameters(), lr=lr),
                             input_shape=input_shape(channels_first), nb_classes=NUM_CLASSES,
                             channels_first=channels_first, clip_values=CLIP_VALUES,
                             device_type="cpu")


# ------------------------------------------------------------------------------------------------
# python -m client.art: ART's extraction attacks against a server, evaluated like client/cli.py
# ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    import torch
    from art.attacks.extraction import CopycatCNN, KnockoffNets

    from client.evaluate import evaluate, load_target
    from common import data, nets

    torch.set_num_threads(args.threads)
    np.random.seed(args.seed)  # ART samples the pool with np.random
    torch.manual_seed(args.seed)
    pool = data.ood_pool() if args.pool == "mnist" else data.attack_pool()
    thief = pytorch_thief(nets.build(args.surrogate), lr=args.lr)
    common = dict(batch_size_fit=args.train_batch, batch_size_query=args.query_batch,
                  nb_epochs=args.epochs, nb_stolen=args.budget, use_probability=args.use_probability)
    t0 = time.perf_counter()
    with RemoteClassifier(args.address, args.api_key, budget=args.budget,
                          labels_only=args.ask_labels, batch_size=args.query_batch) as victim:
        if args.attack == "copycat":
            attack = CopycatCNN(victim, **common)
            y = None
        else:
            attack = KnockoffNets(victim, sampling_strategy=args.sampling, reward=args.reward,
                                  verbose=False, **common)
            y = pool.y if args.sampling == "adaptive" else None
        stolen = attack.extract(art_images(pool.x), y, thieved_classifier=thief)
        used, kinds = victim.queries_used, victim.answer_kinds
    wall = time.perf_counter() - t0
    metrics = evaluate(stolen.model, load_target(args.target_checkpoint), data.eval_set())
    name = f"art-{args.attack}" + (f"-{args.sampling}" if args.attack == "knockoff" else "")
    out = {"attack": name + ("-mnist" if args.pool == "mnist" else ""),
           "art_version": ART_VERSION, "pool": args.pool, "queries_used": used,
           "answer_kinds": kinds, "use_probability": args.use_probability,
           "surrogate": args.surrogate, "epochs": args.epochs, "seed": args.seed,
           "wall_time_s": round(wall, 1), **metrics}
    if args.save_surrogate:
        from common import training
        training.save_checkpoint(args.save_surrogate, stolen.model, args.surrogate, {},
                                 {"attack": out["attack"], "queries": used})
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client.art", description=(
        "Run IBM ART's CopycatCNN or KnockoffNets against a modelguard server through "
        "client.art.RemoteClassifier; evaluate the thief on test 5000-9999 (client/evaluate.py)."))
    p.add_argument("attack", choices=("copycat", "knockoff"))
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--api-key", default="art-attacker")
    p.add_argument("--ask-labels", action="store_true", help="request label-only answers")
    p.add_argument("--budget", type=int, default=5000, help="queries (ART's nb_stolen)")
    p.add_argument("--pool", choices=("fashion", "mnist"), default="fashion",
                   help="fashion: test images 0-4999 (attack_pool); mnist: the OOD pool")
    p.add_argument("--sampling", choices=("random", "adaptive"), default="random",
                   help="KnockoffNets' sampling strategy")
    p.add_argument("--reward", default="all", help="KnockoffNets' adaptive reward")
    p.add_argument("--no-probability", dest="use_probability", action="store_false",
                   help="ART's use_probability=False: train on argmax labels")
    p.add_argument("--surrogate", default="mlp", help="thief architecture (common/nets.py)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--train-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--query-batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--target-checkpoint", type=Path, default=Path("artifacts/target.pt"),
                   help="for evaluation only (the lab's omniscient view)")
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--save-surrogate", type=Path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = run(args)
    from client.evaluate import format_table
    print(format_table([out], ["attack", "queries_used", "target_accuracy", "stolen_accuracy",
                               "fidelity", "wall_time_s"]))
    print("answer kinds:", out["answer_kinds"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
