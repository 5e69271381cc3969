"""``python -m monitor tune``: search detector thresholds, windows and rules' ``min_hits`` on
labelled monitor logs (honest and attacker clients) and write the chosen config.

How it stays fast and exact (docs/tune.md):

* A detector's **threshold** (and ``min_queries``) does not change its state, only whether it
  fires. So every distinct *state-affecting* setting of a detector (windows, history sizes,
  radii, ...) is replayed once per log, detector by detector (a PRADA window does not re-run
  the similarity detector), and every item's score is kept. A candidate's firing is then computed
  from the cached scores with numpy exactly as each detector decides it:
  ``prada``: W < delta; ``ood``: qn >= min_queries and share > threshold; ``similarity``:
  score < threshold; ``volume``: count > threshold; ``near_duplicate``: qn >= min_queries and
  share > threshold (NaN never fires). The near-copy detector's per-item near-copy flags do not
  depend on its window, so the share over any window is recomputed from the flags (with the
  detector's own rolling-share class); the OOD and volume detectors need no pixels and are
  re-run per setting from the logged probabilities and timestamps.
* The ladder (rules, ``min_hits``) is evaluated on the cached firing: for a monotone ladder the
  ``min_hits``-th joint firing of each rule, per client, with one ``searchsorted`` over all
  clients; otherwise (a cool-down ladder), and for every member of a cross-client group, the
  real ``ClientEngine`` runs request by request on detectors that return the cached values.
* Cross-client linking keeps its config (it is state shared by all clients). Its pairs, and so
  its groups, do not depend on the detectors: they come from one pass of the base linking config
  over each log; the group levels are then re-simulated for every candidate with the real
  ``Linker`` logic (members' own levels under the candidate, group rules, raise_members) fed the
  recorded pairs. The result equals a full ``monitor.replay.replay`` (tested).
"""
from __future__ import annotations

import csv
import fnmatch
import itertools
import json
import math
import shlex
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import tomlw
from common.types import Level
from monitor.config import (DETECTOR_NAMES, DETECTORS, SPEC, ConfigError, MonitorConfig,
                            config_from_dict, load_config, read_toml)

DEFAULT_OUTPUT = "results/tune/tuned.toml"
NEVER = np.iinfo(np.int64).max
LABELS = ("honest", "attacker")

# per detector: config keys that decide firing only (not the detector's state)
FIRING_KEYS = {d.name: d.firing_keys for d in DETECTORS}
# state keys recomputed without re-running the detector's pixel search
LIGHT_DETECTORS = ("ood", "volume")                 # re-run from probabilities / timestamps
FLAG_WINDOW_KEYS = {"near_duplicate": ("window",)}  # share over a window of per-item flags
NOT_SEARCHABLE = ("enabled", "encoding")


class TuneError(ValueError):
    """Bad input to the tuner (labels, globs, files, search space); the message says what."""


# --- small helpers ---------------------------------------------------------------------------
def _detector_classes():
    from monitor.detectors import IMPLEMENTATIONS
    return IMPLEMENTATIONS


def _sub(cfg: MonitorConfig, det: str):
    return getattr(cfg.detectors, det)


def _sig(det: str, sub, drop: tuple = ()) -> tuple:
    d = sub.model_dump(mode="json")
    for k in FIRING_KEYS[det] + ("enabled",) + drop:
        d.pop(k, None)
    return tuple(sorted(d.items()))


def state_sig(det: str, sub) -> tuple:
    """Everything of a detector's config that changes its scores."""
    return _sig(det, sub)


def heavy_sig(det: str, sub) -> tuple:
    """What a pixel replay of the detector depends on (near_duplicate: not its window)."""
    return _sig(det, sub, FLAG_WINDOW_KEYS.get(det, ()))


def fires(det: str, sub, scores: np.ndarray, qn: np.ndarray) -> np.ndarray:
    """A detector's firing from its scores, exactly as the detector decides it."""
    return SPEC[det].fires(sub, scores, qn)


def used_detectors(cfg: MonitorConfig) -> list[str]:
    """The detectors some rule uses (the others cannot change a level: never replayed)."""
    used = {d for r in cfg.rules for d in r.detectors}
    return [d for d in DETECTOR_NAMES if d in used]


def _level_name(v: int) -> str:
    return Level(int(v)).name


def _fmt_val(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# --- labels ---------------------------------------------------------------------------------
def load_labels(path: str | Path) -> dict[str, str]:
    """A labels file: CSV rows ``client,label`` (an optional header row) or JSON (an object
    {client: label} or a list of {"client": ..., "label": ...}); label honest or attacker."""
    path = Path(path)
    if not path.exists():
        raise TuneError(f"labels file not found: {path}")
    text = path.read_text()
    out: dict[str, str] = {}
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TuneError(f"labels file {path} is not valid JSON: {exc}") from None
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list) and all(isinstance(r, dict) for r in data):
            try:
                items = [(r["client"], r["label"]) for r in data]
            except KeyError as exc:
                raise TuneError(f"labels file {path}: every entry needs 'client' and 'label' "
                                f"(missing {exc})") from None
        else:
            raise TuneError(f"labels file {path}: expected an object {{client: label}} or a "
                            f"list of {{client, label}} objects")
    else:
        rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
        if rows and rows[0][-1].strip().lower() == "label":
            rows = rows[1:]
        items = []
        for i, r in enumerate(rows, 1):
            if len(r) != 2:
                raise TuneError(f"labels file {path}, row {i}: expected 'client,label', got {r}")
            items.append((r[0].strip(), r[1]))
    for client, label in items:
        lab = str(label).strip().lower()
        if lab not in LABELS:
            raise TuneError(f"labels file {path}: client {client!r} has label {label!r}; "
                            f"expected honest or attacker")
        if out.get(client, lab) != lab:
            raise TuneError(f"labels file {path}: client {client!r} is labelled both honest "
                            f"and attacker")
        out[str(client)] = lab
    if not out:
        raise TuneError(f"labels file {path} holds no labels")
    return out


def resolve_labels(clients: list[str], honest: list[str] | None = None,
                   attacker: list[str] | None = None, labels: dict[str, str] | None = None
                   ) -> tuple[dict[str, str], list[str]]:
    """({client: honest|attacker}, warnings) for the clients of the logs. Every glob must match
    some client; labels-file names in none of the logs are reported (an error if none is)."""
    honest, attacker, labels = honest or [], attacker or [], labels or {}
    if not (honest or attacker or labels):
        raise TuneError("no labels: give --honest GLOB and --attacker GLOB (fnmatch on client "
                        "keys, repeatable) and/or --labels FILE")
    known = sorted(set(clients))
    hint = ", ".join(known[:12]) + (" ..." if len(known) > 12 else "") or "(no clients)"
    out: dict[str, str] = {}
    warnings: list[str] = []

    def put(c: str, lab: str, why: str) -> None:
        if out.get(c, lab) != lab:
            raise TuneError(f"client {c!r} is labelled both honest and attacker ({why})")
        out[c] = lab

    for lab, globs, opt in (("honest", honest, "--honest"), ("attacker", attacker, "--attacker")):
        for g in globs:
            hit = [c for c in known if fnmatch.fnmatchcase(c, g)]
            if not hit:
                raise TuneError(f"{opt} {g!r} matches no client of the log(s); known clients: "
                                f"{hint}")
            for c in hit:
                put(c, lab, f"{opt} {g!r}")
    if labels:
        present = [c for c in labels if c in set(known)]
        if not present:
            raise TuneError(f"the labels file names none of the logs' clients ({len(labels)} "
                            f"names, e.g. {', '.join(list(labels)[:5])}); known clients: {hint}")
        missing = [c for c in labels if c not in set(known)]
        if missing:
            warnings.append(f"{len(missing)} labelled client(s) are in none of the logs: "
                            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        for c in present:
            put(c, labels[c], "labels file and a glob")
    return out, warnings


# --- search space ----------------------------------------------------------------------------
def _uniq(vals, base) -> list:
    out = sorted(set(vals) | {base})
    return out


def default_space(base: MonitorConfig) -> dict[str, list]:
    """The default search space around ``base`` (docs/tune.md): thresholds of every detector
    some rule uses, the OOD tau and window, the near-copy window, the volume window, the PRADA
    window (a pixel replay per value) and every rule's min_hits."""
    d = base.detectors
    used = set(used_detectors(base))
    sp: dict[str, list] = {}
    if "prada" in used:
        sp["detectors.prada.delta"] = _uniq([0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96],
                                            d.prada.delta)
        sp["detectors.prada.window"] = _uniq([2000, 5000], d.prada.window)
    if "ood" in used:
        sp["detectors.ood.tau"] = _uniq([0.9, 0.95, 0.99], d.ood.tau)
        sp["detectors.ood.window"] = _uniq([100, 200, 400], d.ood.window)
        sp["detectors.ood.threshold"] = _uniq([0.4, 0.5, 0.57, 0.65, 0.75], d.ood.threshold)
    if "similarity" in used:
        b = d.similarity.threshold
        sp["detectors.similarity.threshold"] = _uniq([round(b * f, 4) for f in
                                                      (0.8, 0.9, 1.1, 1.2)], b)
    if "volume" in used:
        b = d.volume.threshold
        sp["detectors.volume.threshold"] = _uniq([max(1, int(b * f)) for f in
                                                  (0.25, 0.5, 2, 4)], b)
        sp["detectors.volume.window_seconds"] = _uniq([600.0, 3600.0], d.volume.window_seconds)
    if "near_duplicate" in used:
        sp["detectors.near_duplicate.threshold"] = _uniq([0.1, 0.15, 0.2, 0.25, 0.35, 0.5],
                                                         d.near_duplicate.threshold)
        sp["detectors.near_duplicate.window"] = _uniq([100, 200, 400], d.near_duplicate.window)
    for i, r in enumerate(base.rules):
        m = r.min_hits
        vals = [1, 2, 5, 10] if m == 1 else [max(1, round(m * f)) for f in (0.25, 0.5, 2, 4)]
        sp[f"rules.{i}.min_hits"] = _uniq(vals, m)
    return sp


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def load_space(path: str | Path) -> dict[str, list]:
    """A search space file: TOML, one array of values per key (``"detectors.prada.delta" =
    [0.85, 0.9]``, ``"rules.1.min_hits" = [1, 5]``; nested tables work too)."""
    path = Path(path)
    sp = _flatten(read_toml(path, "search space file", TuneError))
    if not sp:
        raise TuneError(f"search space file {path} lists no keys")
    for k, v in sp.items():
        if not isinstance(v, list) or not v:
            raise TuneError(f"search space file {path}: {k} must be a non-empty array of values")
    return sp


def _get(d: dict, key: str):
    cur = d
    for p in key.split("."):
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    return cur


def _set(d: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def _base_dict(base: MonitorConfig) -> dict:
    return base.model_dump(mode="json")


def check_space(space: dict[str, list], base: MonitorConfig) -> dict[str, list]:
    """Validate keys and each value alone against the base config; returns the space with the
    values deduplicated (order kept) and the base value included."""
    bd = _base_dict(base)
    out = {}
    for key, vals in space.items():
        parts = key.split(".")
        ok = False
        if len(parts) == 3 and parts[0] == "detectors" and parts[1] in DETECTOR_NAMES:
            sub = getattr(base.detectors, parts[1])
            if parts[2] in NOT_SEARCHABLE:
                raise TuneError(f"search space: {key} cannot be searched")
            if parts[2] not in type(sub).model_fields:
                raise TuneError(f"search space: {key}: detector {parts[1]} has no key "
                                f"{parts[2]!r} (keys: {', '.join(type(sub).model_fields)})")
            if not sub.enabled:
                raise TuneError(f"search space: {key}: detector {parts[1]} is disabled in the "
                                f"base config")
            ok = True
        elif len(parts) == 3 and parts[0] == "rules" and parts[2] == "min_hits":
            if not parts[1].isdigit() or int(parts[1]) >= len(base.rules):
                raise TuneError(f"search space: {key}: the base config has {len(base.rules)} "
                                f"rule(s), numbered from 0 (rules.0.min_hits .. "
                                f"rules.{len(base.rules) - 1}.min_hits)")
            ok = True
        if not ok:
            raise TuneError(f"search space: {key!r} is not searchable: use "
                            f"detectors.<detector>.<key> or rules.<i>.min_hits (cross-client "
                            f"linking, the ladder and the policies stay as in the base config)")
        seen = []
        for v in [_get(bd, key)] + list(vals):
            if v in seen:
                continue
            d = _base_dict(base)
            _set(d, key, v)
            try:
                config_from_dict(d, "(search space)")
            except ConfigError as exc:
                raise TuneError(f"search space: {key} = {v!r} is invalid with the base config: "
                                f"{exc}") from None
            seen.append(v)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seen):
            seen.sort()
        out[key] = seen
    return out


def space_toml(space: dict[str, list]) -> str:
    return "".join(f'{tomlw.key(k)} = {tomlw.scalar(list(vals))}\n' for k, vals in space.items())


def config_toml_dict(cfg: MonitorConfig) -> dict:
    """The config as a TOML-ready dict, levels by name."""
    d = cfg.model_dump(mode="json")
    for r in d["rules"]:
        r["level"] = _level_name(r["level"]).lower()
    for r in d["linking"]["rules"]:
        r["level"] = _level_name(r["level"]).lower()
    d["policies"] = {_level_name(int(k)).lower(): v for k, v in d["policies"].items()}
    return d


# --- the logs and the score cache -------------------------------------------------------------
@dataclass
class Entry:
    """One client of one log."""
    db: int
    client: str
    name: str                 # shown in tables
    label: str | None         # honest / attacker; None: an unlabelled group member
    qn0: np.ndarray           # per request: the client's query count before it
    n: np.ndarray             # per request: items
    t: np.ndarray             # per request: timestamp
    probs: np.ndarray         # float32 (items, 10)
    seq: bool = False         # evaluated request by request (group member / cool-down ladder)

    @property
    def items(self) -> int:
        return int(self.n.sum())


@dataclass
class LinkData:
    """One log's arrival order and the pairs of one linker pass (base linking config)."""
    order: list               # (client, qn0, n, t) per request, in log order
    pairs: dict               # request index -> [Pair]
    members: set              # every key that was ever in a group
    relevant: list            # request indices the level simulation must visit


def _read_requests(con: sqlite3.Connection, client: str):
    rows = con.execute("SELECT qn0, n, t, target_probs FROM requests WHERE client=? ORDER BY qn0",
                       (client,)).fetchall()
    qn0 = np.array([r[0] for r in rows], np.int64)
    n = np.array([r[1] for r in rows], np.int64)
    t = np.array([r[2] for r in rows], np.float64)
    probs = (np.concatenate([np.frombuffer(r[3], np.float32).reshape(r[1], -1) for r in rows])
             if rows else np.zeros((0, 10), np.float32))
    expect = 0
    for a, b in zip(qn0.tolist(), n.tolist()):
        if a != expect:
            raise TuneError(f"client {client!r}: the log skips from query {expect} to {a + 1} "
                            f"(rows deleted by retention?); cannot replay it")
        expect = a + b
    return qn0, n, t, probs


class _FlagTap:
    """Stands in for a detector's rolling share and records the flags it is given."""

    def __init__(self, share):
        self._share = share
        self.flags: list[np.ndarray] = []

    def push(self, flags):
        self.flags.append(np.array(flags, dtype=bool))
        return self._share.push(flags)

    def __getattr__(self, name):
        return getattr(self._share, name)


class _Cached:
    """A detector for ClientEngine that returns cached (scores, fires) request by request."""

    def __init__(self, name: str, threshold: float, scores: np.ndarray, fire: np.ndarray):
        self.name, self.threshold = name, threshold
        self.s, self.f = scores, fire
        self.pos = 0

    def observe_batch(self, items, t):
        a, self.pos = self.pos, self.pos + len(items)
        return self.s[a:self.pos], self.f[a:self.pos]

    def nbytes(self) -> int:
        return 0


class Cache:
    """Every item's detector scores per state-affecting setting, for the clients under study
    (concatenated: ``offs[e]`` is entry e's first item), computed on demand."""

    def __init__(self, dbs: list[Path], entries: list[Entry], progress: bool = True):
        self.dbs = dbs
        self.entries = entries
        sizes = np.array([e.items for e in entries], np.int64)
        self.offs = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.N = int(self.offs[-1])
        self.qn = (np.concatenate([np.arange(1, s + 1) for s in sizes]).astype(np.int64)
                   if len(sizes) else np.zeros(0, np.int64))
        self.progress = progress
        self.scores: dict[tuple, np.ndarray] = {}       # (det, state_sig) -> (N,)
        self.heavy: dict[tuple, list] = {}              # (det, heavy_sig) -> per entry list
        self.firing: dict[tuple, np.ndarray] = {}
        self.cond: dict[tuple, np.ndarray] = {}
        self.item_cost: dict[str, float] = {}           # seconds per item of a pixel replay
        self.replays = 0

    # -- pixel replays -------------------------------------------------------------------------
    def missing_heavy(self, cfgs: list[MonitorConfig]) -> dict[tuple, tuple]:
        need = {}
        for cfg in cfgs:
            for det in used_detectors(cfg):
                sub = _sub(cfg, det)
                if det in LIGHT_DETECTORS:
                    continue
                key = (det, heavy_sig(det, sub))
                if key not in self.heavy:
                    need[key] = (det, sub)
        return need

    def estimate(self, need: dict) -> float:
        return sum(self.item_cost.get(det, 0.0) for det, _ in need.values()) * self.N

    def replay_heavy(self, need: dict) -> None:
        """One pass over the logs' stored inputs, running a detector instance per setting."""
        if not need:
            return
        from monitor.engine import det_view
        from monitor.detectors import Items
        from monitor.log import QueryLog
        classes = _detector_classes()
        keys = list(need)
        out = {k: [] for k in keys}
        t0 = time.perf_counter()
        bar = _bar(self.progress, total=self.N, unit="q",
                   desc=f"replay {', '.join(sorted({d for d, _ in need.values()}))}")
        logs: dict[int, QueryLog] = {}
        try:
            for e in self.entries:
                q = logs.get(e.db) or logs.setdefault(e.db, QueryLog(self.dbs[e.db]))
                insts = {}
                for k in keys:
                    det, sub = need[k]
                    inst = classes[det](sub)
                    if det in FLAG_WINDOW_KEYS:
                        inst.share = _FlagTap(inst.share)
                    insts[k] = inst
                parts = {k: [] for k in keys}
                done = 0
                for qn_first, t, x, p in q.requests(e.client):
                    if x is None:
                        raise TuneError(f"client {e.client!r} of {self.dbs[e.db]}: the request "
                                        f"starting at query {qn_first} has no stored input "
                                        f"(log.keep_raw was false); cannot replay")
                    xd, on_grid = det_view(x)
                    items = Items.make(xd.reshape(len(xd), -1), p, on_grid)
                    for k, inst in insts.items():
                        s, _ = inst.observe_batch(items, t)
                        parts[k].append(np.asarray(s, np.float64))
                    done += len(x)
                    bar.update(len(x))
                if done != e.items:
                    raise TuneError(f"client {e.client!r}: {done} stored queries replayed, "
                                    f"{e.items} logged")
                for k, inst in insts.items():
                    if need[k][0] in FLAG_WINDOW_KEYS:
                        out[k].append(inst.share.flags)
                    else:
                        out[k].append(np.concatenate(parts[k]) if parts[k] else np.zeros(0))
        finally:
            bar.close()
            for q in logs.values():
                q.close()
        dt = time.perf_counter() - t0
        for k in keys:
            self.heavy[k] = out[k]
            det = need[k][0]
            self.item_cost[det] = max(self.item_cost.get(det, 0.0),
                                      dt / max(self.N, 1) / len(keys))
        self.replays += 1

    # -- scores and firing -----------------------------------------------------------------------
    def score(self, det: str, sub) -> np.ndarray:
        key = (det, state_sig(det, sub))
        s = self.scores.get(key)
        if s is not None:
            return s
        parts = []
        if det in LIGHT_DETECTORS:
            from monitor.detectors import Items
            cls = _detector_classes()[det]
            for e in self.entries:
                inst = cls(sub)
                o = 0
                for n, t in zip(e.n.tolist(), e.t.tolist()):
                    items = Items(np.empty((n, 0), np.float32), e.probs[o:o + n])
                    parts.append(np.asarray(inst.observe_batch(items, t)[0], np.float64))
                    o += n
        else:
            hk = (det, heavy_sig(det, sub))
            if hk not in self.heavy:
                self.replay_heavy({hk: (det, sub)})
            per_entry = self.heavy[hk]
            if det in FLAG_WINDOW_KEYS:
                from monitor.detectors import _RollingShare
                for flags in per_entry:
                    share = _RollingShare(sub.window)
                    parts += [np.asarray(share.push(f), np.float64) for f in flags]
            else:
                parts = list(per_entry)
        s = np.concatenate(parts) if parts else np.zeros(0)
        assert len(s) == self.N, (det, len(s), self.N)
        self.scores[key] = s
        return s

    def fire(self, det: str, sub) -> np.ndarray:
        key = (det, _sig(det, sub, ()) + tuple((k, getattr(sub, k)) for k in FIRING_KEYS[det]))
        f = self.firing.get(key)
        if f is None:
            f = fires(det, sub, self.score(det, sub), self.qn)
            if len(self.firing) >= max(16, int(2e8) // max(self.N, 1)):   # ~200 MB
                self.firing.clear()
                self.cond.clear()
            self.firing[key] = f
        return f

    def cond_pos(self, cfg: MonitorConfig, dets: list[str]) -> np.ndarray:
        """Items (global index) where every detector of a rule fires."""
        subs = tuple(sorted(set(dets)))
        key = tuple((d, id(self.fire(d, _sub(cfg, d)))) for d in subs)
        pos = self.cond.get(key)
        if pos is None:
            c = self.fire(subs[0], _sub(cfg, subs[0]))
            for d in subs[1:]:
                c = c & self.fire(d, _sub(cfg, d))
            pos = np.flatnonzero(c)
            self.cond[key] = pos
        return pos


# --- evaluation ------------------------------------------------------------------------------
class _SimLinker:
    """The real Linker's level logic fed recorded pairs (no index): built lazily."""

    @staticmethod
    def make(cfg):
        from monitor.linking import Groups, Linker

        class SimLinker(Linker):
            next_pairs: list = []

            def _pairs(self, client, qn0, v, enc, t):
                return self.next_pairs

            def _prune(self):
                pass

        lk = SimLinker(cfg.model_copy(update={"horizon": 100}))
        lk.cfg = cfg
        lk.groups = Groups(cfg)
        lk._next_prune = math.inf
        return lk


@dataclass
class Outcome:
    first: np.ndarray         # per entry: first escalation query (NEVER: none)
    top: np.ndarray           # highest level reached
    final: np.ndarray         # level at the end of the log


class Evaluator:
    def __init__(self, cache: Cache, links: dict[int, LinkData], base: MonitorConfig):
        self.c = cache
        self.links = links
        self.base = base
        self.seq_entries = [i for i, e in enumerate(cache.entries) if e.seq]

    def evaluate(self, cfg: MonitorConfig) -> Outcome:
        c = self.c
        E = len(c.entries)
        starts, ends = c.offs[:-1], c.offs[1:]
        first = np.full(E, NEVER, np.int64)
        top = np.zeros(E, np.int64)
        reach = []                      # per rule: (query where it reaches min_hits, level)
        for r in cfg.rules:
            pos = c.cond_pos(cfg, r.detectors)
            if len(pos) == 0:
                continue
            lo = np.searchsorted(pos, starts)
            hi = np.searchsorted(pos, ends)
            ok = (hi - lo) >= r.min_hits
            at = np.where(ok, pos[np.minimum(lo + r.min_hits - 1, len(pos) - 1)] - starts + 1,
                          NEVER)
            first = np.minimum(first, at)
            top = np.where(ok, np.maximum(top, int(r.level)), top)
            reach.append((at, int(r.level)))
        final = top.copy()
        if not cfg.ladder.monotone:
            for i in range(E):
                first[i], top[i], final[i] = self._sequential(cfg, i)
        elif self.seq_entries:
            self._linked(cfg, reach, first, top, final)
        return Outcome(first, top, final)

    def _engine(self, cfg: MonitorConfig, i: int):
        from monitor.engine import ClientEngine
        c = self.c
        e = c.entries[i]
        a, b = c.offs[i], c.offs[i + 1]
        eng = ClientEngine(cfg, e.client)
        used = used_detectors(cfg)
        dets = {}
        for det in eng.dets:
            sub = _sub(cfg, det)
            if det in used:
                dets[det] = _Cached(det, eng.dets[det].threshold, c.score(det, sub)[a:b],
                                    c.fire(det, sub)[a:b])
            else:   # in no rule: its values are only evidence, never a level
                dets[det] = _Cached(det, eng.dets[det].threshold, np.full(b - a, np.nan),
                                    np.zeros(b - a, bool))
        eng.dets = dets
        return eng

    @staticmethod
    def _step(eng, e: Entry, k: int, floor: int = 0):
        a = int(e.qn0[k])
        n = int(e.n[k])
        return eng.step(np.zeros((n, 1), np.float32), e.probs[a:a + n], float(e.t[k]), None,
                        floor)

    def _sequential(self, cfg: MonitorConfig, i: int) -> tuple[int, int, int]:
        e = self.c.entries[i]
        eng = self._engine(cfg, i)
        first, top = NEVER, 0
        for k in range(len(e.n)):
            for tr in self._step(eng, e, k).transitions:
                if first == NEVER:
                    first = tr.qn
                top = max(top, int(tr.to_level))
        return first, top, int(eng.level)

    def _linked(self, cfg, reach, first, top, final) -> None:
        """Members of cross-client groups: the real Linker's level logic over the log's
        requests in arrival order, fed the recorded pairs and each member's own escalations
        (with a monotone ladder, the client's own level after item i is the highest level of
        the rules that reached min_hits by then, whatever its group did)."""
        from monitor.engine import Transition
        c = self.c
        by_db: dict[int, dict[str, int]] = {}
        for i in self.seq_entries:
            by_db.setdefault(c.entries[i].db, {})[c.entries[i].client] = i
            first[i], top[i], final[i] = NEVER, 0, 0
        for db, idx in by_db.items():
            ld = self.links[db]
            lk = _SimLinker.make(cfg.linking)
            steps = {}                  # member -> [(qn, level)] where its own level rises
            for cl, i in idx.items():
                up, cur = [], 0
                for q, lvl in sorted((int(at[i]), lvl) for at, lvl in reach if at[i] != NEVER):
                    if lvl > cur:
                        up.append((q, lvl))
                        cur = lvl
                steps[cl] = up
            level = {cl: 0 for cl in idx}
            for k in ld.relevant:
                client, qn0, n, t = ld.order[k]
                lk.next_pairs = ld.pairs.get(k, [])
                if client not in idx:
                    out = lk.step(client, qn0, range(n), None, t, 0, [])
                else:
                    before = max(level[client], int(lk.floor(client)))
                    cur, trs = before, []
                    for q, lvl in steps[client]:
                        if q > qn0 + n:
                            break
                        if q > qn0 and lvl > cur:
                            trs.append(Transition(client, t, q, Level(cur), Level(lvl), "", []))
                            cur = lvl
                    out = lk.step(client, qn0, range(n), None, t, before, trs)
                    level[client] = max(cur, int(out.level))
                for tr in out.transitions:
                    i = idx.get(tr.client)
                    if i is None:
                        continue
                    if first[i] == NEVER:
                        first[i] = tr.qn
                    top[i] = max(top[i], int(tr.to_level))
            for cl, i in idx.items():
                final[i] = top[i]


# --- candidates and metrics --------------------------------------------------------------------
@dataclass
class Candidate:
    id: int
    values: dict              # key -> value (every key of the space)
    changes: dict             # key -> value where it differs from the base
    how: str                  # base / grid / one-at-a-time / random / refine
    n_false: int = 0
    false: list = field(default_factory=list)     # [(name, level)]
    n_never: int = 0
    delay: float = 0.0
    attackers: list = field(default_factory=list)  # [(name, first or None, final level)]
    seconds: float = 0.0

    def key(self) -> tuple:
        """Selection order: false escalations, attackers never caught, median delay, then
        the fewest changes from the base, then evaluation order."""
        return (self.n_false, self.n_never, self.delay, len(self.changes), self.id)

    def summary(self) -> dict:
        return {"id": self.id, "how": self.how, "changes": self.changes,
                "false_escalations": self.n_false,
                "honest_escalated": [{"client": n, "level": lv} for n, lv in self.false],
                "attackers_never_caught": self.n_never, "median_delay": self.delay,
                "attackers": [{"client": n, "first_escalation_query": q, "final_level": lv}
                              for n, q, lv in self.attackers]}


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """The front of (false escalations, median delay), both minimised (ties: selection order)."""
    front, best = [], math.inf
    for c in sorted(cands, key=lambda c: (c.n_false, c.delay, c.n_never, len(c.changes), c.id)):
        if c.delay < best:
            front.append(c)
            best = c.delay
    return front


def choose(cands: list[Candidate]) -> Candidate:
    return min(cands, key=Candidate.key)


# --- the tuner -------------------------------------------------------------------------------
def _bar(enabled: bool, **kw):
    from tqdm import tqdm
    kw.setdefault("leave", False)
    return tqdm(disable=not enabled, file=sys.stderr, dynamic_ncols=True, **kw)


def _base_config(dbs: list[Path], path: str | None) -> tuple[MonitorConfig, str, list[str]]:
    warnings = []
    if path:
        return load_config(path), str(path), warnings
    from monitor.log import connect
    found = []
    for db in dbs:
        con = connect(db, create=False)
        try:
            r = con.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        except sqlite3.Error:
            r = None
        finally:
            con.close()
        if r:
            found.append((db, r[0]))
    if not found:
        return load_config(None), "monitor/default.toml (no config stored in the log)", warnings
    db, text = found[0]
    try:
        cfg = MonitorConfig.model_validate_json(text)
    except Exception as exc:  # noqa: BLE001 - pydantic's error, reported
        raise TuneError(f"the config stored in {db} does not load with this version ({exc}); "
                        f"give --config FILE") from None
    if any(t != text for _, t in found[1:]):
        warnings.append(f"the logs ran with different configs; the base is the one of {db}")
    return cfg, f"the config stored in {db}", warnings


class Tuner:
    def __init__(self, dbs: list[str | Path], labels: dict[str, str] | None = None,
                 honest: list[str] | None = None, attacker: list[str] | None = None,
                 config: str | None = None, space: dict[str, list] | None = None,
                 progress: bool = True):
        from monitor.log import connect
        self.dbs = [Path(d) for d in dbs]
        if not self.dbs:
            raise TuneError("no monitor database given (--db)")
        for db in self.dbs:
            if not db.exists():
                raise TuneError(f"no monitor database at {db}")
        self.progress = progress
        self.warnings: list[str] = []
        self.base, self.base_source, w = _base_config(self.dbs, config)
        self.warnings += w
        self.space = check_space(space if space is not None else default_space(self.base),
                                 self.base)
        self.keys = list(self.space)
        # clients and labels
        names = [d.name for d in self.dbs]
        tags = [str(i + 1) if names.count(n) > 1 else n for i, n in enumerate(names)]
        clients_of: list[list[str]] = []
        for db in self.dbs:
            con = connect(db, create=False)
            try:
                clients_of.append([r[0] for r in con.execute(
                    "SELECT client FROM requests GROUP BY client ORDER BY client")])
            finally:
                con.close()
        allc = sorted({c for cs in clients_of for c in cs})
        self.labels, w = resolve_labels(allc, honest, attacker, labels)
        self.warnings += w
        self.unlabelled = sum(1 for cs in clients_of for c in cs if c not in self.labels)
        self.n_honest = sum(1 for cs in clients_of for c in cs if self.labels.get(c) == "honest")
        self.n_attacker = sum(1 for cs in clients_of for c in cs
                              if self.labels.get(c) == "attacker")
        if self.n_attacker == 0:
            raise TuneError("no attacker client among the labelled ones: nothing to detect")
        if self.n_honest == 0:
            raise TuneError("no honest client among the labelled ones: every config would look "
                            "free of false escalations (label some honest clients)")
        # cross-client linking: groups from one pass of the base linking config
        lc = self.base.linking
        self.links: dict[int, LinkData] = {}
        if lc.enabled and lc.raise_members:
            for i, db in enumerate(self.dbs):
                self.links[i] = self._link_pass(db)
        entries: list[Entry] = []
        for i, db in enumerate(self.dbs):
            con = connect(db, create=False)
            try:
                members = self.links[i].members if i in self.links else set()
                for c in clients_of[i]:
                    lab = self.labels.get(c)
                    if lab is None and c not in members:
                        continue
                    qn0, n, t, probs = _read_requests(con, c)
                    name = c if len(self.dbs) == 1 else f"{tags[i]}:{c}"
                    entries.append(Entry(i, c, name, lab, qn0, n, t, probs,
                                         seq=c in members))
            finally:
                con.close()
        self.entries = entries
        self.cache = Cache(self.dbs, entries, progress)
        self.eval = Evaluator(self.cache, self.links, self.base)
        lab = [e.label for e in entries]
        self.honest_idx = np.array([i for i, x in enumerate(lab) if x == "honest"], np.int64)
        self.att_idx = np.array([i for i, x in enumerate(lab) if x == "attacker"], np.int64)
        self.budget = np.array([entries[i].items for i in self.att_idx], np.int64)
        self.candidates: list[Candidate] = []
        self.seen: dict[tuple, Candidate] = {}
        self.invalid = 0
        self.skipped_time = 0
        self.stopped = ""

    # -- linking ---------------------------------------------------------------------------------
    def _link_pass(self, db: Path) -> LinkData:
        from monitor.engine import det_view
        from monitor.linking import Linker
        from monitor.log import QueryLog
        lk = Linker(self.base.linking)
        order, pairs = [], {}
        with QueryLog(db) as q:
            total = q.con.execute("SELECT COALESCE(SUM(n), 0) FROM requests").fetchone()[0]
            bar = _bar(self.progress, total=total, unit="q", desc=f"linking pass {db.name}")
            try:
                for k, (client, qn_first, t, x, p) in enumerate(q.all_requests()):
                    if x is None:
                        raise TuneError(f"client {client!r} of {db}: the request starting at "
                                        f"query {qn_first} has no stored input; cannot replay "
                                        f"cross-client linking")
                    xd, _ = det_view(x)
                    v = xd.reshape(len(xd), -1)
                    out = lk.step(client, qn_first - 1, v, None, t, 0, [])
                    order.append((client, qn_first - 1, len(x), t))
                    if out.pairs:
                        pairs[k] = out.pairs
                    bar.update(len(x))
            finally:
                bar.close()
        members = set(lk.groups.of)
        relevant = [k for k, (c, _, _, _) in enumerate(order) if c in members or k in pairs]
        return LinkData(order, pairs, members, relevant)

    # -- candidates --------------------------------------------------------------------------------
    def config_of(self, values: dict) -> MonitorConfig | None:
        d = _base_dict(self.base)
        for k, v in values.items():
            _set(d, k, v)
        try:
            return config_from_dict(d, "(candidate)")
        except ConfigError:
            return None

    def base_values(self) -> dict:
        bd = _base_dict(self.base)
        return {k: _get(bd, k) for k in self.keys}

    def grid_size(self) -> int:
        return math.prod(len(v) for v in self.space.values())

    def evaluate(self, values: dict, how: str, deadline: float | None = None
                 ) -> Candidate | None:
        sig = tuple(values[k] for k in self.keys)
        if sig in self.seen:
            return self.seen[sig]
        cfg = self.config_of(values)
        if cfg is None:
            self.invalid += 1
            self.seen[sig] = None
            return None
        need = self.cache.missing_heavy([cfg])
        if need and deadline is not None and self.candidates:
            if time.monotonic() + self.cache.estimate(need) > deadline:
                self.skipped_time += 1
                return None
        t0 = time.perf_counter()
        self.cache.replay_heavy(need)
        out = self.eval.evaluate(cfg)
        base = self.base_values()
        cand = Candidate(len(self.candidates), dict(values),
                         {k: v for k, v in values.items() if v != base[k]}, how)
        names = [e.name for e in self.entries]
        fh = out.first[self.honest_idx]
        cand.false = [(names[i], _level_name(out.top[i])) for i, f in zip(self.honest_idx, fh)
                      if f != NEVER]
        cand.n_false = len(cand.false)
        fa = out.first[self.att_idx]
        cand.n_never = int((fa == NEVER).sum())
        cand.delay = float(np.median(np.where(fa == NEVER, self.budget + 1, fa)))
        cand.attackers = [(names[i], None if f == NEVER else int(f), _level_name(out.final[i]))
                          for i, f in zip(self.att_idx, fa)]
        cand.seconds = time.perf_counter() - t0
        self.candidates.append(cand)
        self.seen[sig] = cand
        return cand

    def outcome(self, values: dict) -> dict:
        """{entry name: (first escalation query or None, final level name)} for a config."""
        out = self.eval.evaluate(self.config_of(values))
        return {e.name: (None if out.first[i] == NEVER else int(out.first[i]),
                         _level_name(out.final[i]))
                for i, e in enumerate(self.entries) if e.label is not None}

    def _plan(self, rng, max_candidates: int):
        """Candidates to try, as a generator (refinement needs the results so far)."""
        base = self.base_values()
        yield base, "base"
        if self.grid_size() <= max_candidates:
            for combo in itertools.product(*self.space.values()):
                yield dict(zip(self.keys, combo)), "grid"
            return
        for k in self.keys:                                  # one key at a time
            for v in self.space[k]:
                if v != base[k]:
                    yield {**base, k: v}, "one-at-a-time"
        n_random = max(0, (max_candidates - len(self.candidates)) // 2)
        for _ in range(n_random):
            yield self._random(rng), "random"
        while True:                                          # coordinate refinement
            improved = False
            best = choose(self.candidates)
            for k in rng.permutation(self.keys).tolist():
                for v in self.space[k]:
                    cur = choose(self.candidates)
                    if v == cur.values[k]:
                        continue
                    yield {**cur.values, k: v}, "refine"
                    if choose(self.candidates) is not cur:
                        improved = True
            if not improved and choose(self.candidates) is best:
                break
        while True:
            yield self._random(rng), "random"

    def _random(self, rng) -> dict:
        return {k: vals[int(rng.integers(len(vals)))] for k, vals in self.space.items()}

    def search(self, max_candidates: int = 2000, time_limit: float | None = 300.0,
               seed: int = 0) -> None:
        t_start = time.monotonic()
        deadline = None if not time_limit else t_start + time_limit
        rng = np.random.default_rng(seed)
        total = min(max_candidates, self.grid_size())
        bar = _bar(self.progress, total=total, unit="cand", desc="tune", leave=True)
        tries = 0
        try:
            for values, how in self._plan(rng, max_candidates):
                if len(self.candidates) >= max_candidates:
                    self.stopped = f"--max-candidates {max_candidates} reached"
                    break
                if deadline is not None and time.monotonic() >= deadline and self.candidates:
                    self.stopped = f"--time-limit {time_limit:g} s reached"
                    break
                tries += 1
                if tries > 50 * max_candidates + 1000:
                    self.stopped = "no new candidates left to draw"
                    break
                before = len(self.candidates)
                self.evaluate(values, how, deadline)
                if len(self.candidates) > before:
                    bar.update(1)
                    b = choose(self.candidates)
                    bar.set_postfix_str(f"best: {b.n_false} false, {b.n_never} missed, "
                                        f"delay {b.delay:g}")
            else:
                self.stopped = "the whole grid was evaluated"
        finally:
            bar.close()
        self.elapsed = time.monotonic() - t_start

    # -- report ----------------------------------------------------------------------------------
    def table(self, rows: list[Candidate], chosen: Candidate, front: list[Candidate]) -> str:
        att_names = [n for n, _, _ in rows[0].attackers] if rows else []
        per_att = len(att_names) <= 6
        heads = ["#", "", "false esc.", "never", "median delay"]
        heads += att_names if per_att else ["attackers caught", "first q (min/median/max)"]
        heads += ["changes from the base"]
        fids = {c.id for c in front}
        lines = []
        for c in rows:
            mark = "/".join(m for m, ok in (("base", c.id == 0), ("chosen", c is chosen),
                                            ("front", c.id in fids)) if ok)
            fe = str(c.n_false)
            if c.false:
                shown = ", ".join(f"{n}>{lv}" for n, lv in c.false[:3])
                fe += f" ({shown}{', ...' if len(c.false) > 3 else ''})"
            cells = [str(c.id), mark, fe, str(c.n_never), f"{c.delay:g}"]
            if per_att:
                cells += [f"q{q} {lv}" if q is not None else f"never ({lv})"
                          for _, q, lv in c.attackers]
            else:
                qs = [q for _, q, _ in c.attackers if q is not None]
                cells += [f"{len(qs)}/{len(c.attackers)}",
                          f"{min(qs)}/{int(np.median(qs))}/{max(qs)}" if qs else "-"]
            ch = ", ".join(f"{_short(k)} {_fmt_val(self.base_values()[k])}->{_fmt_val(v)}"
                           for k, v in c.changes.items()) or "-"
            cells.append(ch)
            lines.append(cells)
        w = [max([len(h)] + [len(r[i]) for r in lines]) for i, h in enumerate(heads)]
        fmt = lambda cells: "  ".join(x.ljust(w[i]) for i, x in enumerate(cells)).rstrip()  # noqa
        return "\n".join([fmt(heads), fmt(["-" * x for x in w])] + [fmt(r) for r in lines])

    def rules_legend(self) -> str:
        return "rules: " + "; ".join(f"{i} = {r.label}" for i, r in enumerate(self.base.rules))


def _short(key: str) -> str:
    return key[len("detectors."):] if key.startswith("detectors.") else key


def write_plot(path: Path, cands: list[Candidate], front: list[Candidate], base: Candidate,
               chosen: Candidate) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    rng = np.random.default_rng(0)
    x = np.array([c.n_false for c in cands], float)
    y = np.array([c.delay for c in cands], float)
    jit = rng.uniform(-0.12, 0.12, len(x))
    ax.scatter(x + jit, y, s=10, alpha=0.35, color="tab:blue", label=f"{len(cands)} candidates")
    fx = [c.n_false for c in front]
    fy = [c.delay for c in front]
    ax.step(fx, fy, where="post", color="tab:orange", lw=1.5)
    ax.plot(fx, fy, "o", color="tab:orange", ms=5, label="Pareto front")
    ax.plot([base.n_false], [base.delay], "s", ms=11, mfc="none", mec="tab:red", mew=2,
            label=f"base (#{base.id})")
    ax.plot([chosen.n_false], [chosen.delay], "*", ms=15, color="tab:green",
            label=f"chosen (#{chosen.id})")
    ax.set_xlabel("honest clients falsely escalated")
    ax.set_ylabel("detection delay: median first escalation query\nof attackers "
                  "(never = budget + 1)")
    ax.set_xticks(range(int(max(x.max(), 1)) + 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("monitor tune: detection delay against false escalations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(a) -> int:
    """The ``tune`` subcommand (arguments from :func:`add_arguments`)."""
    dbs = a.dbs or [a.db]
    space = load_space(a.space) if a.space else None
    if a.print_space:
        base, src, _ = _base_config([Path(d) for d in dbs if Path(d).exists()], a.config)
        sp = check_space(space if space is not None else default_space(base), base)
        print(f"# search space around {src}\n" + space_toml(sp), end="")
        return 0
    if a.max_candidates < 1:
        raise TuneError("--max-candidates must be at least 1")
    labels = load_labels(a.labels) if a.labels else None
    t = Tuner(dbs, labels, a.honest, a.attacker, a.config, space, progress=not a.no_progress)
    for w in t.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"tuning on {len(dbs)} log(s): {t.n_honest} honest and {t.n_attacker} attacker "
          f"client(s); {t.unlabelled} unlabelled client(s) ignored")
    print(f"base config: {t.base_source}; search space: {len(t.keys)} keys, grid of "
          f"{t.grid_size():,} candidates")
    t.search(a.max_candidates, a.time_limit, a.seed)
    cands = t.candidates
    base = cands[0]
    chosen = choose(cands)
    front = pareto(cands)
    rows = sorted({c.id: c for c in front + [base, chosen]}.values(),
                  key=lambda c: (c.n_false, c.delay, c.id))
    extra = []
    if t.invalid:
        extra.append(f"{t.invalid} invalid combinations skipped")
    if t.skipped_time:
        extra.append(f"{t.skipped_time} skipped (their replay would not fit in the time limit)")
    print(f"evaluated {len(cands)} candidates in {t.elapsed:.1f} s ({t.stopped}; "
          f"{t.cache.replays} detector replay pass(es)"
          + (f"; {'; '.join(extra)}" if extra else "") + ")")
    print()
    print(t.table(rows, chosen, front))
    print(t.rules_legend())
    print()
    reach0 = min(c.n_false for c in cands) == 0
    print(f"chosen: #{chosen.id}: {chosen.n_false} false escalation(s), {chosen.n_never} "
          f"attacker(s) never caught, median delay {chosen.delay:g} (base #0: {base.n_false}, "
          f"{base.n_never}, {base.delay:g})"
          + ("" if reach0 else "; no candidate avoids every false escalation"))
    cfg = t.config_of(chosen.values)
    out = Path(a.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = _command(a)
    header = _header(t, chosen, base, cmd)
    out.write_text(header + tomlw.dumps(config_toml_dict(cfg)))
    back = load_config(out)
    if back.model_dump() != cfg.model_dump():
        raise TuneError(f"internal: {out} does not load back as the chosen config")
    print(f"wrote {out}")
    js = out.parent / "tradeoff.json"
    png = out.parent / "tradeoff.png"
    fids = {c.id for c in front}
    js.write_text(json.dumps({
        "command": cmd, "date": _now(), "dbs": [str(d) for d in t.dbs],
        "base_config": t.base_source, "labels": {"honest": t.n_honest,
                                                 "attacker": t.n_attacker,
                                                 "unlabelled": t.unlabelled},
        "space": t.space, "grid_size": t.grid_size(), "seconds": t.elapsed,
        "stopped": t.stopped, "base": 0, "chosen": chosen.id, "front": [c.id for c in front],
        "candidates": [dict(c.summary(), on_front=c.id in fids) for c in cands]},
        indent=1, default=_jsonable))
    write_plot(png, cands, front, base, chosen)
    print(f"wrote {js} and {png}")
    if a.verify:
        bad = verify(t, cfg, chosen)
        if bad:
            print("verify: full replay DISAGREES: " + "; ".join(bad))
            return 1
        print("verify: a full replay of the chosen config gives the same escalations")
    return 0


def verify(t: Tuner, cfg: MonitorConfig, cand: Candidate) -> list[str]:
    """Full replay (monitor.replay.replay) of a config against the cached evaluation."""
    from monitor.replay import replay
    want = t.outcome(cand.values)
    bad = []
    for i, db in enumerate(t.dbs):
        ents = [e for e in t.entries if e.db == i and e.label is not None]
        if not ents:
            continue
        res = replay(db, cfg, [e.client for e in ents])
        for e in ents:
            trs = res[e.client]["transitions"]
            got = (trs[0].qn if trs else None, Level(res[e.client]["final_level"]).name)
            if got != want[e.name]:
                bad.append(f"{e.name}: replay {got}, cached {want[e.name]}")
    return bad


def _command(a) -> str:
    """The command line, rebuilt from the parsed arguments."""
    parts = [] if a.dbs else ["--db", a.db]
    parts.append("tune")
    for db in a.dbs or []:
        parts += ["--db", db]
    for g in a.honest or []:
        parts += ["--honest", g]
    for g in a.attacker or []:
        parts += ["--attacker", g]
    for opt, v in (("--labels", a.labels), ("--config", a.config), ("--space", a.space)):
        if v:
            parts += [opt, v]
    parts += ["--max-candidates", str(a.max_candidates), "--time-limit", f"{a.time_limit:g}",
              "--seed", str(a.seed), "-o", a.output]
    if a.verify:
        parts.append("--verify")
    return "python -m monitor " + " ".join(shlex.quote(str(x)) for x in parts)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _header(t: Tuner, chosen: Candidate, base: Candidate, cmd: str) -> str:
    lines = [
        "modelguard monitor config written by `python -m monitor tune` (docs/tune.md)",
        f"date: {_now()}",
        f"command: {cmd}",
        "tuned on: " + ", ".join(str(d) for d in t.dbs),
        f"labels: {t.n_honest} honest, {t.n_attacker} attacker client(s); {t.unlabelled} "
        f"unlabelled ignored",
        f"base: {t.base_source}",
        f"search: {len(t.candidates)} of {t.grid_size():,} candidates ({t.stopped})",
        f"chosen #{chosen.id}: {chosen.n_false} honest client(s) falsely escalated"
        + (f" ({', '.join(f'{n}>{lv}' for n, lv in chosen.false)})" if chosen.false else "")
        + f", {chosen.n_never} attacker(s) never caught, median first escalation query "
          f"{chosen.delay:g} (never = budget + 1)",
        f"base:       {base.n_false} falsely escalated, {base.n_never} never caught, median "
        f"{base.delay:g}",
        "attackers (first escalation query, final level): "
        + ", ".join(f"{n} {'q' + str(q) if q is not None else 'never'} {lv}"
                    for n, q, lv in chosen.attackers),
        "changed from the base: " + (", ".join(f"{k} = {_fmt_val(v)}"
                                               for k, v in chosen.changes.items()) or "nothing"),
        "cross-client linking was kept as in the base config",
    ]
    return "".join(f"# {x}\n" for x in lines) + "\n"


def add_arguments(p) -> None:
    p.add_argument("--db", dest="dbs", action="append", metavar="PATH",
                   help="monitor database to tune on (repeatable; default: the global --db)")
    p.add_argument("--honest", action="append", metavar="GLOB",
                   help="clients whose key matches GLOB are honest (fnmatch, repeatable)")
    p.add_argument("--attacker", action="append", metavar="GLOB",
                   help="clients whose key matches GLOB are attackers (fnmatch, repeatable)")
    p.add_argument("--labels", metavar="FILE",
                   help="CSV (client,label) or JSON ({client: label}); label honest|attacker")
    p.add_argument("--config", help="base config (default: the one stored in the log, else "
                                    "monitor/default.toml)")
    p.add_argument("--space", metavar="FILE.toml",
                   help='search space: one array per key, e.g. "detectors.prada.delta" = '
                        '[0.85, 0.9]; replaces the default space (see --print-space)')
    p.add_argument("--print-space", action="store_true",
                   help="print the search space (default or --space, checked) and exit")
    p.add_argument("--max-candidates", type=int, default=2000,
                   help="candidates to evaluate at most (random search beyond; default "
                        "%(default)s)")
    p.add_argument("--time-limit", type=float, default=300.0, metavar="SECONDS",
                   help="stop searching after this long (0: no limit; default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random search seed")
    p.add_argument("-o", "--output", default=DEFAULT_OUTPUT,
                   help="tuned config to write (default %(default)s); tradeoff.json and "
                        "tradeoff.png go next to it")
    p.add_argument("--verify", action="store_true",
                   help="replay the chosen config in full and check the numbers")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
