"""A deterministic clock for the monitor's clock injection (``Monitor(cfg, db, clock=...)``).

The product uses ``time.time``; tests and the lab (``lab.monitor_bench``, ``lab.serving``) pass a
:class:`FakeClock` so request timestamps, and with them the monitor's decisions, are repeatable.
It lives here rather than in the lab so tests and the lab share it without the product importing
the lab.
"""
from __future__ import annotations


class FakeClock:
    """Deterministic request timestamps: ``step`` seconds per call."""

    def __init__(self, start: float = 1.7e9, step: float = 0.05):
        self.t, self.step = start, step

    def __call__(self) -> float:
        self.t += self.step
        return self.t
