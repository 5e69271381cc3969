"""The monitor's configuration: detectors, escalation rules, ladder, log, and the per-level
defence policies that are carried through to the service.

Loaded from TOML (``monitor/default.toml`` ships with the project) and validated with pydantic.
Every key is documented in ``docs/monitor.md``.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, create_model,
                      field_validator, model_validator)

from common.types import Level

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.toml")
# bumped whenever detector semantics or the pickled state layout change: stored states of another
# version are not loaded (the state is rebuilt from the log instead)
ENGINE_VERSION = "batched-dct8-4"


class ConfigError(ValueError):
    """A monitor config file is missing, unreadable or invalid; the message says what and where."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PradaConfig(_Strict):
    """PRADA (Juuti et al. 2019): alarm when Shapiro-Wilk W of the pooled min-distances < delta."""

    enabled: bool = True
    delta: float = Field(0.9, gt=0.0, lt=1.0, description="alarm when W < delta")
    check_every: int = Field(10, ge=1, description="run the test every N queries")
    min_class_distances: int = Field(10, ge=2, description="pool classes holding >= N distances")
    min_pooled: int = Field(100, ge=3, description="test only when more than N distances remain")
    outlier_sigma: float = Field(3.0, gt=0.0, description="drop |d - mean| >= k * std before testing")
    window: int = Field(5000, ge=100, le=5000,
                        description="test on the most recent N pooled distances (shapiro caps at 5000)")
    ignore_duplicates: bool = Field(True, description="exact repeats (d == 0) are not recorded")
    max_set: int = Field(1000, ge=10, le=100000,
                         description="each class's growing set keeps its most recent N elements")
    ignore_benign_copies: bool = Field(True, description="a near-copy of a set element made by "
                                       "a benign edit (not dense and flat-topped, see [linking]) "
                                       "is not recorded, like an exact duplicate")
    benign_radius: float = Field(2.0, gt=0.0, description="near-copy: pixel L2 <= this (2.0: "
                                 "farther look-alikes are distinct photos, kept as PRADA has them)")
    step: float = Field(4.0, gt=0.0, le=255.0, description="attack-like test: grey levels")
    dense: float = Field(0.3, gt=0.0, le=1.0, description="attack-like test: perturbed share")
    peak: float = Field(2.4, gt=1.0, description="attack-like test: 99th percentile / RMS")


class OODConfig(_Strict):
    """Adaptive Misinformation's signal: share of recent queries with top softmax < tau."""

    enabled: bool = True
    tau: float = Field(0.9, gt=0.0, le=1.0, description="a query is OOD when max prob < tau")
    window: int = Field(200, ge=1, description="recent queries considered")
    min_queries: int = Field(200, ge=1, description="no firing before this many queries")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="fires when the OOD share > threshold")

    @model_validator(mode="after")
    def _min_le_window(self):
        if self.min_queries < 1:
            raise ValueError("min_queries must be >= 1")
        return self


class SimilarityConfig(_Strict):
    """Chen et al. 2019: mean L2 distance to the K nearest earlier queries; fires when low."""

    enabled: bool = True
    k: int = Field(50, ge=1)
    history: int = Field(10000, ge=1, le=100000,
                         description="bounded history of encodings (most recent)")
    encoding: Literal["dct8"] = Field("dct8", description="the monitor's 64-dim DCT space (the "
                                                           "only one since the batched monitor)")
    threshold: float = Field(1.0, gt=0.0, description="fires when the kNN mean distance < threshold")

    @model_validator(mode="after")
    def _k_le_history(self):
        if self.k > self.history:
            raise ValueError(f"k ({self.k}) must not exceed history ({self.history})")
        return self


class VolumeConfig(_Strict):
    """Queries in a sliding time window."""

    enabled: bool = True
    window_seconds: float = Field(3600.0, gt=0.0)
    threshold: int = Field(20000, ge=1, description="fires when the count in the window > threshold")


class NearDuplicateConfig(_Strict):
    """Share of recent queries that are near-copies (not exact repeats) of an earlier query."""

    enabled: bool = True
    radius: float = Field(2.5, gt=0.0, description="near: nearest earlier query closer than this "
                                                   "(L2, raw pixels in [0, 1])")
    duplicate: float = Field(0.05, ge=0.0, description="exact repeats: closer than this; ignored")
    history: int = Field(5000, ge=1, le=100000,
                         description="earlier queries compared against (most recent)")
    window: int = Field(200, ge=1, description="recent queries considered")
    min_queries: int = Field(200, ge=1, description="no firing before this many queries")
    threshold: float = Field(0.25, gt=0.0, lt=1.0, description="fires when the near share > this")
    structure: bool = Field(True, description="count a near-copy only when the change is "
                            "attack-like (dense and flat-topped after removing a tone map, as "
                            "in [linking]): JPEG re-saves, resizing and re-lighting are not")
    step: float = Field(4.0, gt=0.0, le=255.0, description="structure: grey levels a pixel must "
                                                            "move to count as perturbed")
    dense: float = Field(0.3, gt=0.0, le=1.0, description="structure: share of pixels perturbed")
    peak: float = Field(2.4, gt=1.0, description="structure: 99th percentile / RMS at most this")

    @model_validator(mode="after")
    def _order(self):
        if self.duplicate >= self.radius:
            raise ValueError(f"duplicate ({self.duplicate}) must be below radius ({self.radius})")
        return self


# --- the detector registry ------------------------------------------------------------------
@dataclass(frozen=True)
class DetectorSpec:
    """Everything about a detector outside its implementation, in one place: its name (the
    ``[detectors.<name>]`` table, the name rules use), its config class, the log's score column,
    the CLI's column label, which side of the threshold alarms, the config key holding the
    threshold, the keys that decide firing only (the tuner varies those without re-running the
    detector) and its plot title. The implementation is the ``monitor.detectors.Detector``
    subclass whose ``name`` is the same. Adding a detector = its config class and a spec here,
    and its Detector subclass."""

    name: str
    config: type
    short: str
    direction: Literal["below", "above"]
    threshold_key: str
    firing_keys: tuple[str, ...]
    title: Callable[[Any], str]

    @property
    def column(self) -> str:
        return f"s_{self.name}"

    def threshold(self, dcfg) -> float:
        """The threshold in ``dcfg`` (this detector's config)."""
        return float(getattr(dcfg, self.threshold_key))

    def fires_text(self, dcfg) -> str:
        return f"{'<' if self.direction == 'below' else '>'} {self.threshold(dcfg):g}"

    def fires(self, dcfg, scores, qn):
        """Firing from recorded scores (numpy arrays), as the detector decides it: beyond the
        threshold on the alarming side, and from ``min_queries`` on when that is a firing key."""
        import numpy as np

        t = self.threshold(dcfg)
        with np.errstate(invalid="ignore"):
            out = scores < t if self.direction == "below" else scores > t
        if "min_queries" in self.firing_keys:
            out = out & (np.asarray(qn) >= dcfg.min_queries)
        return out


DETECTORS: tuple[DetectorSpec, ...] = (
    DetectorSpec("prada", PradaConfig, "prada W", "below", "delta", ("delta",),
                 lambda c: "PRADA Shapiro-Wilk W"),
    DetectorSpec("ood", OODConfig, "ood rate", "above", "threshold",
                 ("threshold", "min_queries"), lambda c: f"OOD share (top prob < {c.tau})"),
    DetectorSpec("similarity", SimilarityConfig, "sim kNN", "below", "threshold", ("threshold",),
                 lambda c: f"similarity: mean L2 to {c.k}-NN"),
    DetectorSpec("volume", VolumeConfig, "volume", "above", "threshold", ("threshold",),
                 lambda c: f"volume: queries in {c.window_seconds:g}s"),
    DetectorSpec("near_duplicate", NearDuplicateConfig, "near-dup", "above", "threshold",
                 ("threshold", "min_queries"),
                 lambda c: f"near-copy share (L2 < {c.radius:g})"),
)
DETECTOR_NAMES = tuple(d.name for d in DETECTORS)
SPEC = {d.name: d for d in DETECTORS}

# [detectors]: one table per registered detector, in the registry's order
DetectorsConfig = create_model("DetectorsConfig", __base__=_Strict,
                               **{d.name: (d.config, d.config()) for d in DETECTORS})


class Rule(_Strict):
    """When every detector in ``detectors`` fires on the same query, for the ``min_hits``-th time
    in total, the client is raised to ``level`` (never lowered by a rule)."""

    detectors: list[str] = Field(min_length=1)
    level: Level
    min_hits: int = Field(1, ge=1)
    name: str = ""

    @field_validator("level", mode="before")
    @classmethod
    def _parse_level(cls, v: Any) -> Level:
        return Level.parse(int(v) if isinstance(v, str) and v.isdigit() else v)

    @field_validator("detectors", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("detectors")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DETECTOR_NAMES]
        if bad:
            raise ValueError(f"unknown detector(s) {bad}; expected some of {list(DETECTOR_NAMES)}")
        return v

    @property
    def label(self) -> str:
        return self.name or f"{'+'.join(self.detectors)}>={self.min_hits}->{self.level.name}"


class GroupRule(_Strict):
    """When a group of linked keys holds ``pairs`` attack-like near-copy pairs in total, the group
    is raised to ``level`` (and with ``linking.raise_members`` every member with it)."""

    pairs: int = Field(ge=1, description="attack-like cross-key near-copy pairs in the group")
    level: Level

    @field_validator("level", mode="before")
    @classmethod
    def _parse_level(cls, v: Any) -> Level:
        return Level.parse(int(v) if isinstance(v, str) and v.isdigit() else v)

    @property
    def label(self) -> str:
        return f"group pairs>={self.pairs}->{self.level.name}"


class LinkingConfig(_Strict):
    """Cross-client linking: a global index of recent queries from every key; a query that is an
    attack-like near-copy (a small, dense, flat-topped perturbation: a Jacobian or sign step, not
    a re-encoding, resize or re-lighting) of another key's query links the two keys."""

    enabled: bool = True
    horizon: int = Field(50000, ge=100, le=10_000_000,
                         description="the index holds the most recent N queries of all keys")
    radius: float = Field(3.0, gt=0.0, description="near-copy: pixel L2 (pixels in [0, 1]) <= this")
    duplicate: float = Field(0.05, ge=0.0, description="exact repeats: closer than this; never "
                                                       "a link")
    step: float = Field(4.0, gt=0.0, le=255.0,
                        description="grey levels: a pixel is perturbed when its change, after "
                                    "removing the best pixel-wise tone map, is at least this")
    dense: float = Field(0.45, gt=0.0, le=1.0,
                         description="attack-like: at least this share of pixels perturbed")
    peak: float = Field(2.4, gt=1.0, description="attack-like: 99th percentile of the tone-map "
                        "residual / its RMS at most this (flat-topped: sign steps ~1.5-2.3; "
                        "JPEG, resizing and natural look-alikes >= 2.8)")
    tables: int = Field(16, ge=1, le=64, description="LSH tables over the 64-dim DCT encoding")
    bits: int = Field(6, ge=1, le=16, description="projections per LSH table")
    width: float = Field(4.0, gt=0.0, description="LSH bucket width (DCT units)")
    bucket: int = Field(8, ge=1, le=1024, description="most recent entries kept per LSH bucket")
    min_pairs: int = Field(2, ge=1, description="attack-like pairs a key must send (perturbed "
                           "copies of other keys' queries) before it is a perturber; perturbers "
                           "are linked when one perturbed a query of the other")
    probe_queries: int = Field(200, ge=0, description="before answering a key with fewer queries "
                               "than this, its attack-like copies of other keys' queries in the "
                               "request count toward the linking rules (0 = only escalated "
                               "groups are probed)")
    raise_members: bool = Field(True, description="every member is raised to its group's level "
                                "(the highest of its members' and the group rules'); a key that "
                                "joins an escalated group starts at that level")
    rules: list[GroupRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _order(self):
        if self.duplicate >= self.radius:
            raise ValueError(f"duplicate ({self.duplicate}) must be below radius ({self.radius})")
        return self


class LadderConfig(_Strict):
    monotone: bool = Field(True, description="levels only go up (an attacker cannot wait it out)")
    cooldown_seconds: float = Field(0.0, ge=0.0,
                                    description="non-monotone only: step down one level after this "
                                                "long without any rule condition holding")
    allow_block: bool = Field(False, description="rules may raise clients to BLOCK")


class LogConfig(_Strict):
    keep_raw: bool = Field(True, description="store inputs (uint8 or float16, zlib) for replay")
    retention_days: float = Field(90.0, ge=0.0, description="delete request rows this many days "
                                  "older than the newest one, except rows holding watermarked "
                                  "answers (the ownership proof); 0 = keep everything")
    max_mb: float = Field(8192.0, ge=0.0, description="cap on the database's used size: beyond "
                          "it the oldest request rows are deleted (those without watermarked "
                          "answers first); 0 = no cap")
    batch_size: int = Field(512, ge=1, description="writer commits at most this many requests at once")
    flush_seconds: float = Field(0.2, gt=0.0, description="writer commits at least this often")
    durability: Literal["commit", "fast"] = Field(
        "commit", description="commit: an answer is sent only after its log row and any level "
        "change it caused are committed (group commit); fast: the answer does not wait, a "
        "kill -9 loses the rows not yet committed (at most flush_seconds of them); in both "
        "modes a client is never answered at a level whose transition is not committed")
    commit_timeout_seconds: float = Field(5.0, gt=0.0, description="how long an answer waits "
                                          "for its commit before the call fails UNAVAILABLE "
                                          "(the row stays queued and is written later)")
    on_failure: Literal["closed", "open"] = Field(
        "closed", description="while the log cannot be written (disk full, I/O error): closed = "
        "every Predict fails UNAVAILABLE and health is NOT_SERVING until the writer recovers by "
        "itself; open = answers continue at each client's current level without waiting for "
        "the log, rows queue in memory up to max_queue and beyond it are dropped (counted)")
    max_queue: int = Field(20000, ge=1, description="log items waiting for the writer before "
                           "request rows and checkpoints are dropped (bounds memory when the "
                           "log is down in fail-open mode)")


def parse_address(text: str) -> tuple[str, int]:
    """"HOST:PORT" (a host name or an IPv4 address) -> (host, port); ValueError saying what is
    wrong."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or ":" in host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"monitor address {text!r}: expected HOST:PORT, e.g. 10.0.0.5:7070")
    return host, int(port)


class ExecutionConfig(_Strict):
    """How the monitor runs: not part of the detector semantics (not in the detector hash)."""

    mode: Literal["sync", "async", "process"] = Field(
        "sync", description="sync: the answer waits for the detectors; async: it does not (the "
                            "client's order is kept; its next request waits for them, so a new "
                            "level applies from the client's next request); process: as async, "
                            "with the detectors, the log and the client state in a child "
                            "process of the server (monitor/process.py; SQLite store only)")
    checkpoint_every: int = Field(2000, ge=1, description="a client's detector state is "
                                  "checkpointed after this many new queries (bounds the replay "
                                  "after a crash)")
    max_clients: int = Field(128, ge=1, description="clients held in memory; the least recently "
                             "used are checkpointed and evicted beyond this")
    max_state_mb: float = Field(2048.0, gt=0.0, description="memory budget for the detector "
                                "state of the clients held in memory; the least recently used "
                                "are checkpointed and evicted beyond it")
    max_rss_mb: float = Field(4096.0, ge=0.0, description="cap on the server process's "
                              "resident memory (model, buffers, linking index and client state "
                              "together; 0: no cap). The server reads its RSS ten times a "
                              "second and lowers the client-state budget so that RSS stays "
                              "below 90% of the cap, evicting the least recently used clients "
                              "(checkpointed) and giving the freed heap back; the last 10% "
                              "absorbs what requests allocate between two readings")
    step_threads: int = Field(2, ge=1, le=64, description="process: detector steps of "
                              "different clients run on this many threads at once (each "
                              "client's steps stay in order on one thread; linking and the log "
                              "take turns). The array work of large requests runs outside "
                              "Python's lock, so a second thread puts a second core to use; "
                              "1: one step at a time")
    queue_limit: int = Field(64, ge=1, description="async, process: requests waiting for the "
                             "detectors before observe() blocks (back-pressure)")
    max_lag: int = Field(0, ge=0, description="async, process: how many of a client's queries "
                         "may still wait for the detectors when its next request is answered (0: none, a "
                         "new level applies from the next request). Above 0, consecutive "
                         "requests of one client that wait together are run through the "
                         "detectors as one step and logged as one row (up to 256 items): small "
                         "requests cost far less per item, and a new level applies at most "
                         "max_lag queries plus one request later")
    merge_wait_ms: float = Field(20.0, ge=0.0, le=10000.0, description="async, process, with "
                                 "max_lag above 0: after a request reaches the detectors they "
                                 "wait up to this long for more requests to merge into their "
                                 "step (small requests of a client that sends faster than one "
                                 "per this time then run as one step instead of one by one); "
                                 "they stop waiting at once when a client's queued queries "
                                 "exceed max_lag (its next answer would wait) or half of "
                                 "queue_limit requests wait. 0: run what already waits")

    address: str = Field("", description="process: HOST:PORT of a monitor started on its own "
                         "with `python -m monitor serve` (on this machine or another; "
                         "authenticated with a key derived from the server's secret); empty: "
                         "the server spawns the monitor as its child process")
    tls_ca: str = Field("", description="with address: PEM CA bundle that signed the "
                        "monitor's certificate (`monitor serve --tls-cert`): the link is TLS and "
                        "the monitor must present a certificate naming the address's host; "
                        "empty: plain TCP (authenticated by the key, not encrypted)")

    @model_validator(mode="after")
    def _address_needs_process(self):
        if self.address:
            if self.mode != "process":
                raise ValueError(f"execution.address = {self.address!r} needs execution.mode = "
                                 f"\"process\"")
            parse_address(self.address)
        if self.tls_ca and not self.address:
            raise ValueError("execution.tls_ca is for a monitor at execution.address (a "
                             "monitor that is the server's child needs no TLS)")
        return self

    @model_validator(mode="after")
    def _lag_needs_async(self):
        if self.max_lag and self.mode == "sync":
            raise ValueError(f"execution.max_lag = {self.max_lag} needs execution.mode = "
                             f"\"async\" or \"process\" (in sync mode every answer waits for "
                             f"the detectors)")
        return self


class MonitorConfig(_Strict):
    detectors: DetectorsConfig = DetectorsConfig()
    execution: ExecutionConfig = ExecutionConfig()
    rules: list[Rule] = Field(default_factory=list)
    linking: LinkingConfig = LinkingConfig(enabled=False)
    ladder: LadderConfig = LadderConfig()
    log: LogConfig = LogConfig()
    policies: dict[Level, dict] = Field(default_factory=dict)
    watermark: dict = Field(default_factory=dict)

    @field_validator("policies", mode="before")
    @classmethod
    def _parse_policies(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            raise ValueError("policies must be a table of level -> {policy = ..., ...}")
        out = {}
        for k, p in v.items():
            lvl = Level.parse(int(k) if isinstance(k, str) and k.isdigit() else k)
            if lvl in out:
                raise ValueError(f"level {lvl.name} has two policies")
            if not isinstance(p, dict) or not isinstance(p.get("policy"), str):
                raise ValueError(f"policies.{k} must be a table with a string 'policy' key")
            out[lvl] = dict(p)
        return out

    @model_validator(mode="after")
    def _check(self):
        enabled = {n for n in DETECTOR_NAMES if getattr(self.detectors, n).enabled}
        for i, r in enumerate(self.rules):
            off = [d for d in r.detectors if d not in enabled]
            if off:
                raise ValueError(f"rules[{i}] ({r.label}) uses disabled detector(s) {off}")
            if r.level == Level.NORMAL:
                raise ValueError(f"rules[{i}] ({r.label}) raises to NORMAL, which does nothing")
            if r.level == Level.BLOCK and not self.ladder.allow_block:
                raise ValueError(f"rules[{i}] ({r.label}) raises to BLOCK but ladder.allow_block "
                                 f"is false")
        for lvl in (Level.NORMAL, Level.NOISE, Level.LABEL_ONLY, Level.SWITCH):
            if self.policies and lvl not in self.policies:
                raise ValueError(f"policies: no policy for level {lvl.name}")
        if self.ladder.cooldown_seconds > 0 and self.ladder.monotone:
            raise ValueError("ladder.cooldown_seconds > 0 needs ladder.monotone = false")
        for i, r in enumerate(self.linking.rules):
            if r.level == Level.NORMAL:
                raise ValueError(f"linking.rules[{i}] ({r.label}) raises to NORMAL, which does "
                                 f"nothing")
            if r.level == Level.BLOCK and not self.ladder.allow_block:
                raise ValueError(f"linking.rules[{i}] ({r.label}) raises to BLOCK but "
                                 f"ladder.allow_block is false")
        if self.linking.enabled and not self.ladder.monotone:
            raise ValueError("linking needs ladder.monotone = true (a group's level is a floor "
                             "for its members that a cool-down would not respect)")
        return self

    def with_changes(self, **sections: dict) -> "MonitorConfig":
        """A copy with some keys of some tables changed, validated as a loaded file is:
        ``cfg.with_changes(execution={"checkpoint_every": 500})``."""
        d = self.model_dump(mode="python")
        for name, keys in sections.items():
            if name not in d or not isinstance(d[name], dict):
                raise ConfigError(f"with_changes: no table {name!r} in the monitor config")
            d[name].update(keys)
        return config_from_dict(d, "<with_changes>")

    def detector_hash(self) -> str:
        """Hash of everything that determines detector state and ladder decisions."""
        blob = json.dumps({"engine": ENGINE_VERSION,
                           "detectors": self.detectors.model_dump(mode="json"),
                           "rules": [r.model_dump(mode="json") for r in self.rules],
                           "linking": self.linking.model_dump(mode="json"),
                           "ladder": self.ladder.model_dump(mode="json")}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}" + (f" (got {e['input']!r})"
                                               if "input" in e and not isinstance(e["input"], dict)
                                               else ""))
    return "\n".join(lines)


def config_from_dict(data: dict, source: str = "<dict>") -> MonitorConfig:
    try:
        return MonitorConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid monitor config {source}:\n{_format_errors(exc)}") from None


def read_toml(path: str | Path, what: str, error: type[Exception] = None) -> dict:
    """Parse a TOML file; a missing or malformed file raises ``error`` (ConfigError by default)
    with a message naming ``what`` it is and where."""
    error = error or ConfigError
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {path} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None) -> MonitorConfig:
    """Read and validate a TOML config; None -> the shipped ``monitor/default.toml``."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    return config_from_dict(read_toml(path, "monitor config"), str(path))
