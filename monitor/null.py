"""A monitor that watches nothing: every client stays at NORMAL and nothing is logged.

``python -m service serve --no-monitor`` uses it so a benchmark can measure the server without
the monitor's detectors and log. It has the service-facing API of ``monitor.Monitor``
(``level``, ``observe``, ``flush``, ``close``) and carries the loaded :class:`MonitorConfig` as
``config``, so the per-level policies and the watermark are still built from the same file.
Only ``monitor.config`` and ``common.types`` are used here.
"""
from __future__ import annotations

from pathlib import Path

from common.types import Level
from monitor.config import MonitorConfig, load_config


class NullMonitor:
    """Drop-in for ``monitor.Monitor`` that never escalates and records nothing."""

    def __init__(self, config: MonitorConfig | str | Path | None = None):
        self.config = config if isinstance(config, MonitorConfig) else load_config(config)
        self._closed = False

    def level(self, client_id: str, images=None) -> Level:
        return Level.NORMAL

    def observe(self, client_id: str, request_id: str, images, target_probs, answer,
                level: Level, *, wait: bool = True) -> Level:
        if self._closed:
            raise RuntimeError("monitor is closed")
        return level

    def wait_durable(self, client_id: str) -> None:
        pass

    def level_steps(self, client_id: str, images=None):
        """level as steps (common.steps): none."""
        return Level.NORMAL
        yield   # a generator

    def observe_steps(self, client_id: str, request_id: str, images, target_probs, answer,
                      level: Level):
        """observe as steps: none."""
        return self.observe(client_id, request_id, images, target_probs, answer, level)
        yield   # a generator

    def durable_steps(self, client_id: str):
        """wait_durable as steps: none."""
        yield from ()

    def flush(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def health(self) -> str | None:
        return None

    def queries(self, client_id: str) -> None:
        """Unknown (nothing is counted): the watermark then counts for itself."""
        return None

    def close(self) -> None:
        self._closed = True

    def __repr__(self) -> str:
        return "NullMonitor()"
