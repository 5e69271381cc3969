"""Evaluation under the project's protocol: target accuracy, stolen accuracy and fidelity
(agreement with the target) on test images 5000-9999, which no attack ever queries.

The evaluator is the lab's omniscient view: it loads the target checkpoint locally rather than
querying the service, so evaluation costs no queries and leaves no trace in the monitor's log.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from common import data, training


def evaluate(surrogate: nn.Module, target: nn.Module, split: data.Split | None = None) -> dict:
    split = split or data.eval_set()
    t = training.predict_proba(target, split.x).argmax(1)
    s = training.predict_proba(surrogate, split.x).argmax(1)
    return {
        "eval_items": len(split),
        "target_accuracy": training.accuracy(t, split.y),
        "stolen_accuracy": training.accuracy(s, split.y),
        "fidelity": training.accuracy(s, t),
    }


def load_target(path: str | Path) -> nn.Module:
    model, _ = training.load_checkpoint(path)
    return model


PERCENT_COLUMNS = ("target_accuracy", "stolen_accuracy", "fidelity")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table; accuracy and fidelity columns are shown as percentages."""
    def fmt(c, v):
        if isinstance(v, float):
            return f"{100 * v:.2f}%" if c in PERCENT_COLUMNS else f"{v:.1f}"
        return str(v)

    cells = [[fmt(c, r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
