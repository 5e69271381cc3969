"""modelguard monitor: per-client query log, extraction detectors and the escalation ladder.

See docs/monitor.md. The service calls only ``Monitor.level``, ``Monitor.observe``,
``Monitor.ready`` and ``Monitor.close``; the state lives behind ``MonitorStore``.
"""
from monitor.config import ConfigError, MonitorConfig, load_config
from monitor.core import Monitor
from monitor.log import QueryLog
from monitor.store import MonitorStore, SQLiteStore

__all__ = ["Monitor", "MonitorConfig", "load_config", "QueryLog", "ConfigError", "MonitorStore",
           "SQLiteStore"]
