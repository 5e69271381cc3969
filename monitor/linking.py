"""Cross-client linking: catch one extraction spread over many API keys.

Every per-client detector needs a window of one key's own queries; an attacker who spreads a
synthetic-data attack (JBDA: x' = clip(x + lambda * sign(grad))) over many keys stays below all
of them. The linker watches the queries of every key together:

1. **A global index of recent queries** (:class:`LinkIndex`): each query's 64-dim DCT encoding
   (``monitor.features``) is hashed by p-stable LSH (``tables`` tables of ``bits`` random
   projections, bucket width ``width``); a bucket keeps its ``bucket`` most recent entries and the
   index its ``horizon`` most recent queries. A query is compared only with the entries of its
   buckets, so its cost does not grow with history, and memory is bounded by the horizon.
2. **Near-copy pairs that look like an attack** (:func:`perturbation_stats`): a candidate from
   another key is a near-copy when the pixel distance is in (duplicate, radius]. It is
   attack-like when the perturbation is dense and flat-topped after removing the best
   pixel-wise tone map: a sign step moves most pixels by the same amount (99th percentile of the
   residual ~1.5-2.3x its RMS); re-saving as JPEG, resizing, shifting or a different photo of a
   look-alike item concentrate the change on edges (>= 2.8x), and brightness, contrast and
   gamma changes are tone maps and vanish. Exact repeats (popular images) are never pairs.
3. **Groups** (:class:`Groups`): keys joined by ``min_pairs`` attack-like pairs are linked
   (union-find); a group carries its evidence (members, pairs per link, since when).
4. **Group escalation**: a group's level is the highest of its members' own levels and of the
   ``linking.rules`` its pair count reaches; with ``raise_members`` every member is raised to it,
   and a key that joins an escalated group starts at that level. The linker is the one place
   that knows every key's effective level (own ladder or group), so all transitions are
   emitted here, in the order requests are logged: replaying the log in that order reproduces
   the index, the pairs, the groups and the transitions exactly.

Why LSH over DCT encodings and not Blacklight's pixel-window hashes: Blacklight (Li et al. 2022)
quantises pixels and hashes windows, which matches queries that differ by small L-inf noise; a
JBDA step of lambda = 0.1 moves every pixel by 25 grey levels, across most quantisation bins, and
Fashion-MNIST's black backgrounds make pixel windows collide between unrelated images. Distances
in the DCT space are lower bounds of pixel distances (the basis is orthonormal), a JBDA step
moves an encoding by ~1.3 (lambda 0.1), and the candidates are then checked exactly in pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from common.types import Level
from monitor.config import LinkingConfig
from monitor import features as _features
from monitor.engine import Transition
from monitor.features import (DIM, TWO_SIDED, encode, nonzero2d, perturbation_stats,
                              residual_norms, to_u8, total_variation)

_SEED = 0x51B1  # LSH projections are part of the method: fixed, so replay is exact


def content_digests(pix: np.ndarray, key: np.ndarray) -> np.ndarray:
    """uint64 digest of each uint8 row's exact content (784 bytes = 98 words): every word is
    xored with its own key word and mixed (splitmix64's finaliser), and the mixed words summed.
    Equal rows give equal digests; distinct rows collide with probability ~2^-64 for a key drawn
    at random per index (so nobody can aim at a collision). Vectorised over the rows."""
    w = np.ascontiguousarray(pix).view(np.uint64) ^ key     # (integer arrays wrap silently)
    w ^= w >> _S30
    w *= _M1
    w ^= w >> _S27
    w *= _M2
    w ^= w >> _S31
    return w.sum(axis=1, dtype=np.uint64)


_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_DEDUPE_MIN = 64    # fewer candidate pairs than this: verifying each is cheaper than sorting


def attack_like(a: np.ndarray, b: np.ndarray, cfg: LinkingConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mask, l2, dense, peak) for pairs a[i] -> b[i] (uint8 (P, 784)); dense and peak are NaN
    where the distance alone rules a pair out (they are computed only inside the radius)."""
    return _attack_like(a, None, b, None, None, cfg)


def u8_dist(a: np.ndarray, ia: np.ndarray | None, b: np.ndarray, ib: np.ndarray | None
            ) -> np.ndarray:
    """Pixel L2 distances (in [0, 1] units, float64) between uint8 rows a[ia[k]] and b[ib[k]],
    as attack_like measures them (float32 differences, one einsum per row), in blocks that
    stay in the CPU cache instead of gathering every row first."""
    n = len(ia) if ia is not None else len(a)
    out = np.empty(n)
    ka = np.arange(n) if ia is None else ia
    kb = np.arange(n) if ib is None else ib
    step = 256
    for s in range(0, n, step):
        e = min(s + step, n)
        d = b[kb[s:e]].astype(np.float32)
        d -= a[ka[s:e]]
        out[s:e] = np.sqrt(np.einsum("ij,ij->i", d, d))
    out /= 255.0
    return out


def _attack_like(a, ia, b, ib, swap, cfg: LinkingConfig):
    """attack_like for the pairs (a[ia[k]], b[ib[k]]) (ia/ib None: in order); where swap[k],
    b's row is the source and a's the copy. Distances first (both orders give the same bits);
    the rows are gathered only for the pairs inside the radius."""
    p = len(ia) if ia is not None else len(a)
    dense = np.full(p, np.nan)
    peak = np.full(p, np.nan)
    if p == 0:
        return np.zeros(0, bool), np.zeros(0), dense, peak
    l2 = u8_dist(a, ia, b, ib)
    near = np.flatnonzero((l2 > cfg.duplicate) & (l2 <= cfg.radius))
    mask = np.zeros(p, bool)
    if len(near):
        src = a[near if ia is None else ia[near]]
        dst = b[near if ib is None else ib[near]]
        if swap is not None:
            sw = swap[near]
            if sw.any():
                src[sw], dst[sw] = dst[sw], src[sw].copy()
        _, r, pk, two = perturbation_stats(src, dst)
        dn = np.count_nonzero(r >= np.float32(cfg.step), axis=1) / r.shape[1]
        dense[near], peak[near] = dn, pk
        mask[near] = (dn >= cfg.dense) & (pk <= cfg.peak) & (two >= TWO_SIDED)
    return mask, l2, dense, peak


def _lower_bounds(enc, res, henc, hres, ii, ss) -> np.ndarray:
    """Lower bounds of the squared pixel distances between the request's items ii[k] and the
    index's items ss[k] (float32; see monitor.features.lb_queries), in cache-sized
    blocks."""
    n = len(ii)
    out = np.empty(n, np.float32)
    step = 2048
    for s in range(0, n, step):
        e = min(s + step, n)
        de = enc[ii[s:e]]
        de -= henc[ss[s:e]]
        r = np.einsum("ij,ij->i", de, de)
        dr = res[ii[s:e]] - hres[ss[s:e]]
        dr *= dr
        r += dr
        out[s:e] = r
    return out


@dataclass
class Pair:
    """An attack-like near-copy between two keys' queries: item ``qn`` of ``client`` (the
    perturber) is a perturbed copy of item ``other_qn`` of ``other`` (the source). Which one
    is the copy is decided by their energy outside the 64 low frequencies (a sign step adds
    it), not by which came first."""
    t: float
    client: str
    qn: int
    other: str
    other_qn: int
    dist: float
    dense: float
    peak: float


class LinkIndex:
    """The global index: LSH tables over the DCT encodings of the last ``horizon`` queries of
    every key, plus the items (uint8) to check candidates exactly.

    Each table is a fixed array of slots (a power of two, about a quarter of the horizon), each
    slot a ring of the ``bucket`` most recent entries hashed there (entries are sequence
    numbers; those older than the horizon are ignored). Everything is a numpy array: lookups and
    inserts are vectorised over a request's items and cost the same at any history."""

    def __init__(self, cfg: LinkingConfig):
        self.cfg = cfg
        rng = np.random.default_rng(_SEED)
        nproj = cfg.tables * cfg.bits
        self.proj = rng.standard_normal((DIM, nproj))
        self.offset = rng.uniform(0.0, cfg.width, nproj)
        self.mult = rng.integers(1, 2**62, size=cfg.bits, dtype=np.int64) | 1
        self.size = cfg.horizon
        self.nslots = 1 << max(10, int(math.ceil(math.log2(max(1, cfg.horizon // 4)))))
        self.table = np.full((cfg.tables, self.nslots, cfg.bucket), -1, np.int64)
        self.ptr = np.zeros((cfg.tables, self.nslots), np.int64)
        # allocated at the horizon at once (np.zeros: pages become resident as they are first
        # written), never regrown: a regrowth copied up to ~35 MB under the linking lock, a
        # 30-70 ms stall of every client's request
        h = self.size
        self.enc = np.zeros((h, DIM), np.float32)
        self.res = np.zeros(h, np.float32)
        self.tv = np.zeros(h, np.int64)
        self.pix = np.zeros((h, 784), np.uint8)
        # each entry's content digest: exact copies of one image (popular images asked by many
        # keys) are verified once per request item (LinkIndex keys: random, never stored)
        self.digest_key = np.random.default_rng().integers(0, 2**63, 784 // 8, dtype=np.uint64)
        self.digest = np.zeros(h, np.uint64)
        self.qn = np.zeros(h, np.int64)
        self.kid = np.zeros(h, np.int64)
        self.n = 0                      # items ever added (the next item's sequence number)

    def slots(self, enc: np.ndarray) -> np.ndarray:
        """int64 (N, tables): each item's slot in each table."""
        z = (enc.astype(np.float64) @ self.proj + self.offset) / self.cfg.width
        c = np.floor(z).astype(np.int64).reshape(len(enc), self.cfg.tables, self.cfg.bits)
        with np.errstate(over="ignore"):
            h = (c * self.mult).sum(-1)
        h ^= h >> 29
        return h & (self.nslots - 1)

    def candidates(self, slots: np.ndarray, kid: int) -> tuple[np.ndarray, np.ndarray]:
        """(item index, ring slot) of every indexed entry of another key that shares an LSH
        slot with an item, each pair once."""
        n = len(slots)
        if self.n == 0 or n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        lo = self.n - min(self.n, self.size)
        if n == 1 and _features.FAST_PATHS:   # one item: its entries, each once, sorted
            s = self.table[np.arange(self.cfg.tables), slots[0]].ravel()
            s = s[s >= lo]
            if len(s) > 1:
                s.sort()
                s = s[np.concatenate(([True], s[1:] != s[:-1]))]    # np.unique
            ring = s % self.size
            other = self.kid[ring] != kid
            ring = ring[other]
            return np.zeros(len(ring), np.int64), ring
        t = np.arange(self.cfg.tables)[None, :]
        seq = self.table[t, slots].reshape(n, -1)              # (n, tables * bucket), a copy
        seq.sort(axis=1)
        keep = seq >= lo
        keep[:, 1:] &= seq[:, 1:] != seq[:, :-1]               # each (item, entry) once
        ii, jj = nonzero2d(keep)                               # by item, then entry
        s = seq[ii, jj]
        ring = s % self.size
        other = self.kid[ring] != kid
        return ii[other], ring[other]

    def add(self, kid: int, qn0: int, enc: np.ndarray, res: np.ndarray, tv: np.ndarray,
            pix: np.ndarray, slots: np.ndarray) -> None:
        k = len(enc)
        if k == 0:
            return
        seq = self.n + np.arange(k)
        keep = slice(max(0, k - self.size), k)      # a request longer than the horizon
        ring = seq[keep] % self.size
        self.enc[ring] = enc[keep]
        self.res[ring] = res[keep]
        self.tv[ring] = tv[keep]
        self.pix[ring] = pix[keep]
        self.digest[ring] = content_digests(pix[keep], self.digest_key)
        self.qn[ring] = qn0 + np.arange(k)[keep]
        self.kid[ring] = kid
        cap = self.cfg.bucket
        nt = self.cfg.tables
        if k == 1 and cap >= 1 and _features.FAST_PATHS:
            # one item: one entry per table, in distinct (table, slot) cells, each the newest
            tt, ss = np.arange(nt), slots[0]
            self.table[tt, ss, self.ptr[tt, ss] % cap] = self.n
            self.ptr[tt, ss] += 1
            self.n += 1
            return
        # every table at once: (table, slot) keys, stable-sorted, so items of one slot keep
        # their request order (the newest `cap` per slot survive, as inserted one by one)
        key = (np.arange(nt, dtype=np.int64)[None, :] * self.nslots + slots).T.ravel()
        order = np.argsort(key, kind="stable")
        ks = key[order]
        start = np.r_[0, np.flatnonzero(ks[1:] != ks[:-1]) + 1]
        counts = np.diff(np.r_[start, len(ks)])
        rank = np.arange(len(ks)) - np.repeat(start, counts)
        last = rank >= np.repeat(counts, counts) - cap          # only the newest `cap` per slot
        tt, ss = ks // self.nslots, ks % self.nslots
        pos = (self.ptr[tt, ss] + rank) % cap
        item = order % k
        self.table[tt[last], ss[last], pos[last]] = seq[item[last]]
        self.ptr[tt[start], ss[start]] += counts
        self.n += k

    def nbytes(self) -> int:
        """Bytes written so far (the entry arrays' pages become resident as they fill)."""
        m = min(self.n, self.size)
        return self.table.nbytes + self.ptr.nbytes + sum(
            a[:m].nbytes for a in (self.enc, self.res, self.tv, self.pix, self.digest, self.qn,
                                   self.kid))


@dataclass
class Group:
    id: str
    members: set[str]
    pairs: int = 0
    since: float = 0.0
    last: float = 0.0
    links: dict[tuple[str, str], list] = field(default_factory=dict)  # (a, b): [pairs, first, last]
    rule_level: int = 0      # the highest linking rule its pairs reached
    member_top: int = 0      # the highest effective level of a member
    applied: int = 0         # the level its members were last raised to
    dirty: bool = True       # members joined since then

    @property
    def level(self) -> Level:
        return Level(max(self.rule_level, self.member_top))

    def summary(self) -> dict:
        return {"group": self.id, "members": sorted(self.members), "pairs": self.pairs,
                "since": self.since, "last": self.last, "level": self.level.name,
                "links": [{"keys": list(k), "pairs": v[0], "first": v[1], "last": v[2]}
                          for k, v in sorted(self.links.items())]}


class Groups:
    """Keys linked by attack-like pairs, with evidence (union-find).

    A pair's later query is the perturbed copy: its key is the *perturber*, the earlier query's
    key only the source (an honest user whose catalogue image an attacker perturbed is not an
    attacker). A key becomes a perturber after ``min_pairs`` attack-like pairs and forms a group
    (of one, at first); two perturbers are linked into one group when one perturbed a query of
    the other, or when both perturbed queries of the same source key (a split attack perturbs
    its own seed keys' queries from many keys). A group's pairs are the attack-like pairs its
    members sent."""

    def __init__(self, cfg: LinkingConfig):
        self.cfg = cfg
        self.adj: dict[str, dict[str, list]] = {}   # key -> {other: edge [pairs, first, last]}
        self.sent: dict[str, int] = {}               # attack-like pairs a key sent
        self.perturbers_of: dict[str, set[str]] = {}  # source key -> perturbers of its queries
        self.sources_of: dict[str, set[str]] = {}     # perturber -> keys whose queries it perturbed
        self.of: dict[str, Group] = {}               # perturber -> its group
        self._ids = 0

    def add_pair(self, perturber: str, source: str, t: float) -> Group | None:
        """Count one attack-like pair; returns the perturber's group (None until it is one)."""
        a, b = perturber, source
        key = (a, b) if a < b else (b, a)
        e = self.adj.setdefault(a, {}).get(b)
        if e is None:
            e = [0, t, t]
            self.adj[a][b] = e
            self.adj.setdefault(b, {})[a] = e
        e[0] += 1
        e[2] = t
        self.sent[a] = self.sent.get(a, 0) + 1
        self.sources_of.setdefault(a, set()).add(b)
        g = self.of.get(a)
        if g is None:
            if self.sent[a] < self.cfg.min_pairs:
                return None
            self._ids += 1
            g = Group(f"G{self._ids}", {a}, pairs=self.sent[a], since=t)
            self.of[a] = g
            for other, e2 in self.adj[a].items():   # the perturbers it touched, and those
                if other in self.of:                # that perturbed the same sources
                    g = self._link(g, self.of[other], (min(a, other), max(a, other)), e2)
                for co in self.perturbers_of.get(other, ()):
                    if co != a and co in self.of:
                        g = self._link(g, self.of[co], (min(a, co), max(a, co)), None)
            for other in self.adj[a]:
                self.perturbers_of.setdefault(other, set()).add(a)
        else:
            g.pairs += 1
            if b in self.of:
                g = self._link(g, self.of[b], key, e)
            cos = self.perturbers_of.setdefault(b, set())
            if a not in cos:
                for co in cos:
                    if co in self.of:
                        g = self._link(g, self.of[co], (min(a, co), max(a, co)), None)
                cos.add(a)
        g.last = t
        return g

    def _link(self, ga: Group, gb: Group, key: tuple[str, str], e: list) -> Group:
        if ga is not gb:
            keep, gone = (ga, gb) if int(ga.id[1:]) < int(gb.id[1:]) else (gb, ga)
            keep.members |= gone.members
            keep.pairs += gone.pairs
            keep.links.update(gone.links)
            keep.since = min(keep.since, gone.since)
            keep.rule_level = max(keep.rule_level, gone.rule_level)
            keep.member_top = max(keep.member_top, gone.member_top)
            keep.dirty = True
            for m in gone.members:
                self.of[m] = keep
            ga = keep
        if e is not None:
            ga.links[key] = e
        else:  # two perturbers of the same source: a link without a pair between them
            ga.links.setdefault(key, [0, ga.last, ga.last])
        return ga

    def all(self) -> list[Group]:
        seen: dict[str, Group] = {}
        for g in self.of.values():
            seen.setdefault(g.id, g)
        return sorted(seen.values(), key=lambda g: int(g.id[1:]))


@dataclass
class LinkOutcome:
    """What one request did: the transitions to log (of any client, in order), the pairs it
    formed, and the client's effective level after it."""
    transitions: list
    pairs: list[Pair]
    level: Level


class Linker:
    """The cross-client detector and the authority on effective levels (see the module doc).
    Not thread-safe: the monitor calls :meth:`step` under one lock, in log order."""

    def __init__(self, cfg: LinkingConfig):
        self.cfg = cfg
        self.index = LinkIndex(cfg)
        self.groups = Groups(cfg)
        self.eff: dict[str, int] = {}       # a key's effective level, where a group raised it
        # a key's level from its own ladder and its query count, as of its last request (kept
        # for keys in the index or in a group; pruned once per horizon)
        self.own: dict[str, int] = {}
        self.last_qn: dict[str, int] = {}
        self._next_prune = cfg.horizon
        self._tops: dict[int, int] | None = None   # probe's cache; None = stale
        self._new_kid = False
        self._kid: dict[str, int] = {}      # key -> id in the index (keys in it only)
        self._key: dict[int, str] = {}
        self._kids = 0
        self._items = None                  # the request's Items while step() runs

    # --- levels ---------------------------------------------------------------------------------
    def floor(self, client: str) -> Level:
        """The level the client's group imposes on it (NORMAL when none)."""
        return Level(self.eff.get(client, 0))

    def group_of(self, client: str) -> Group | None:
        return self.groups.of.get(client)

    # --- restart --------------------------------------------------------------------------------
    def restore(self, pairs, levels: dict[str, tuple[int, int]]) -> None:
        """Rebuild the groups from the logged pairs (client, other, t in log order) and take the
        logged levels {client: (level, qn)} of their members as they are (no transitions)."""
        for client, other, t in pairs:
            self.groups.add_pair(client, other, t)
        for g in self.groups.all():
            for r in self.cfg.rules:
                if g.pairs >= r.pairs:
                    g.rule_level = max(g.rule_level, int(r.level))
            for m in g.members:
                lvl, qn = levels.get(m, (0, 0))
                self.own[m] = lvl
                self.last_qn[m] = qn
                g.member_top = max(g.member_top, lvl)
                if self.cfg.raise_members and lvl > 0:
                    self.eff[m] = lvl
            g.applied = int(g.level) if self.cfg.raise_members else 0
            g.dirty = False

    def refill(self, client: str, qn0: int, v: np.ndarray) -> None:
        """Put logged items back into the index without looking for pairs (restart). The
        client's query count comes back with them: a key past ``probe_queries`` is not judged
        as a young one on its first request after a restart."""
        v = np.asarray(v, np.float32).reshape(len(v), -1)
        self.last_qn[client] = max(self.last_qn.get(client, 0), qn0 + len(v))
        enc = encode(v)
        pix = to_u8(v)
        self.index.add(self._key_id(client), qn0, enc, residual_norms(v, enc),
                       total_variation(pix), pix, self.index.slots(enc))

    # --- one request ----------------------------------------------------------------------------
    def step(self, client: str, qn0: int, v: np.ndarray, enc: np.ndarray | None, t: float,
             own_before: int, engine_trs: list, items=None) -> LinkOutcome:
        """One request of ``client`` (items qn0+1..qn0+n, v float32 (n, 784) as stored, enc
        their DCT encodings when the caller has them), after the client's own engine ran
        (``own_before`` its level before, ``engine_trs`` its transitions). Returns the
        transitions in effective levels, the pairs found, and the client's level after."""
        eff = max(int(own_before), self.eff.get(client, 0))
        out: list = []
        for tr in engine_trs:               # the client's own escalations, where they raise it
            if int(tr.to_level) > eff:
                out.append(Transition(client, tr.t, tr.qn, Level(eff), tr.to_level, tr.rule,
                                      tr.evidence))
                eff = int(tr.to_level)
        n = len(v)
        # the request's prepared arrays reach _pairs through the instance (subclasses such as
        # monitor.tune's simulated linker override _pairs with the five-argument signature)
        self._items = items
        try:
            pairs = self._pairs(client, qn0, v, enc, t) if n else []
        finally:
            self._items = None
        for p in pairs:
            self.groups.add_pair(p.client, p.other, t)
        touched: dict[str, Group] = {}
        for k in [client] + [p.client for p in pairs]:
            g = self.groups.of.get(k)
            if g is not None:
                touched[g.id] = g
        self.own[client] = eff
        self.last_qn[client] = qn0 + n
        if self.index.n >= self._next_prune:
            self._prune()
        for g in touched.values():
            if client in g.members:
                g.member_top = max(g.member_top, eff)
            out += self._escalate(g, t)
        eff = max(eff, self.eff.get(client, 0))
        if pairs or out or client in self.groups.of or len(v) and self._new_kid:
            self._tops = None
            self._new_kid = False
        return LinkOutcome(out, pairs, Level(eff))

    def _key_id(self, client: str) -> int:
        k = self._kid.get(client)
        if k is None:
            self._kids += 1
            k = self._kid[client] = self._kids
            self._key[k] = client
            self._new_kid = True
        return k

    def apply(self, client: str, eng, st, t: float) -> LinkOutcome:
        """The linker's part of a request after the client's engine ran it (``st``: a
        monitor.engine.Step): pairs, groups and effective levels. Raises the engine to the
        client's effective level, and the per-item levels in ``st.after`` to the floor the
        request started at (a group raise applies from the next request)."""
        out = self.step(client, st.qn0, st.items.v, st.items.enc, t, st.level_before,
                        st.transitions, st.items)
        np.maximum(st.after, st.level_before, out=st.after)
        if out.level > eng.level:
            eng.level = out.level
        return out

    def probe(self, client: str, v: np.ndarray, prep: dict | None = None) -> Level:
        """Before a request is answered (reads the index only; the pairs are counted when the
        request is observed). The level to answer it at:

        * the highest level of an escalated group whose members' queries, or whose sources'
          queries (a split attack perturbs its seed keys' queries from every key), these items
          are attack-like copies of: a new key of a caught attack is answered as the attack
          from its first request;
        * for a key with fewer than ``probe_queries`` queries (below every per-client window,
          where split attacks live): the level of the linking rules reached by its pairs so far
          (or its group's) plus the attack-like copies of any key's queries in this request.

        Only items holding the perturbed copy (the rougher side) count: an honest user who
        sends an original that an attacker perturbed is never raised by it.

        ``prep``: a dict that receives the item arrays computed here (``enc``, ``slots`` and,
        when the pixels were looked at, ``u8``, ``res``, ``tv``), so the request's observe can
        reuse them (monitor.detectors.Items.seed)."""
        idx = self.index
        cur = self.eff.get(client, 0)
        if len(v) == 0 or not self.wants_probe(client):
            return Level.NORMAL
        tops = self._escalated()
        full = self._young(client)
        v = np.asarray(v, np.float32).reshape(len(v), -1)
        enc = encode(v)
        slots = idx.slots(enc)
        if prep is not None:
            prep["enc"], prep["slots"] = enc, slots
        ii, ss = idx.candidates(slots, self._kid.get(client, -1))
        if len(ii) == 0:
            return Level.NORMAL
        lvl = np.array([tops.get(k, 0) for k in idx.kid[ss].tolist()], dtype=np.int64)
        if not full:
            keep = lvl > cur
            ii, ss = ii[keep], ss[keep]
            if len(ii) == 0:
                return Level.NORMAL
        pix = to_u8(v)
        res, tv = residual_norms(v, enc), total_variation(pix)
        if prep is not None:
            prep["u8"], prep["res"], prep["tv"] = pix, res, tv
        ii, ss, mine, *_ = self._verify(enc, res, pix, tv, ii, ss)
        # only where this request holds the perturbed copy: an honest user who sends an
        # original that an attacker perturbed is the source, never raised by it
        ii, ss = ii[mine], ss[mine]
        if len(ii) == 0:
            return Level.NORMAL
        out = max(tops.get(int(k), 0) for k in idx.kid[ss])
        if full:
            g = self.groups.of.get(client)
            so_far = g.pairs if g is not None else self.groups.sent.get(client, 0)
            n = so_far + len(np.unique(ii))
            out = max([out] + [int(r.level) for r in self.cfg.rules if n >= r.pairs])
        return Level(out) if out > cur else Level.NORMAL

    def _young(self, client: str) -> bool:
        return self.last_qn.get(client, 0) < self.cfg.probe_queries and bool(self.cfg.rules)

    def wants_probe(self, client: str) -> bool:
        """Whether :meth:`probe` can raise this client at all (cheap: no pixels looked at), so
        the caller can skip preparing the request's items."""
        if self.index.n == 0:
            return False
        if self._young(client):
            return True
        tops = self._escalated()
        return bool(tops) and max(tops.values()) > self.eff.get(client, 0)

    def _escalated(self) -> dict[int, int]:
        """{key id in the index: the level of the escalated group it belongs to or whose
        members perturbed its queries} (cached until the groups change)."""
        if self._tops is None:
            tops: dict[int, int] = {}
            for g in self.groups.all():
                lvl = int(g.level)
                if lvl == 0:
                    continue
                keys = set(g.members)
                for m in g.members:
                    keys |= self.groups.sources_of.get(m, set())
                for k in (self._kid.get(c) for c in keys):
                    if k is not None and tops.get(k, 0) < lvl:
                        tops[k] = lvl
            self._tops = tops
        return self._tops

    def _prune(self) -> None:
        present = set(np.unique(self.index.kid[:min(self.index.n, self.index.size)]).tolist())
        self._kid = {c: k for c, k in self._kid.items() if k in present}
        self._key = {k: c for c, k in self._kid.items()}
        self._tops = None
        keep = set(self._kid) | set(self.groups.of)
        self.own = {k: v for k, v in self.own.items() if k in keep}
        self.last_qn = {k: v for k, v in self.last_qn.items() if k in keep}
        self._next_prune = self.index.n + self.cfg.horizon

    def _verify(self, enc, res, pix, tv, ii, ss):
        """The candidate pairs (item ii[k] of a request, index slot ss[k]) that are attack-like
        near-copies: a lower bound of the pixel distance first (orthonormal basis), then pixels.
        The perturbed copy is the rougher one (a sign step raises the total variation of 99.9%
        of images) and the pair is measured from the smoother one, so an original sent after its
        perturbed copy makes the copy's sender the perturber. Returns (ii, ss, mine, l2, dense,
        peak) of the attack-like ones; mine: the request's item is the perturbed copy."""
        idx = self.index
        if len(ii):
            lb = _lower_bounds(enc, res, idx.enc, idx.res, ii, ss)
            keep = lb <= np.float32((self.cfg.radius + 0.01) ** 2)
            ii, ss = ii[keep], ss[keep]
        if len(ii) == 0:
            z = np.zeros(0)
            return ii, ss, z.astype(bool), z, z, z
        mine = tv[ii] >= idx.tv[ss]
        # exact copies among an item's candidates (one popular image indexed for many keys)
        # have the same pixels, hence the same verdict: verify one per (item, content) and
        # give the others its figures (the same bits as verifying each)
        rep, inv = None, None
        if len(ii) >= _DEDUPE_MIN and _features.FAST_PATHS:
            c = idx.digest[ss] + ii.astype(np.uint64) * _GOLD
            _, rep, inv = np.unique(c, return_index=True, return_inverse=True)
            if len(rep) == len(ii):
                rep = None
        sel = slice(None) if rep is None else rep
        # source: the index's item where this request's is the copy (mine), else this one
        out = _attack_like(idx.pix, ss[sel], pix, ii[sel], ~mine[sel], self.cfg)
        mask, l2, dense, peak = out if rep is None else (a[inv] for a in out)
        return ii[mask], ss[mask], mine[mask], l2[mask], dense[mask], peak[mask]

    def _pairs(self, client, qn0, v, enc, t) -> list[Pair]:
        idx = self.index
        items = getattr(self, "_items", None)
        slots = None
        if items is not None:       # the request's arrays as the detectors prepared them
            enc, res, pix, tv = items.enc, items.res, items.u8, items.tv
            slots = getattr(items, "slots", None)   # (probe's, when it computed them)
        else:
            v = np.asarray(v, np.float32).reshape(len(v), -1)
            if enc is None:
                enc = encode(v)
            pix = to_u8(v)
            res = residual_norms(v, enc)
            tv = total_variation(pix)
        if slots is None:
            slots = idx.slots(enc)
        kid = self._key_id(client)
        pairs: list[Pair] = []
        ii, ss = idx.candidates(slots, kid)
        ii, ss, mine, l2, dense, peak = self._verify(enc, res, pix, tv, ii, ss)
        if len(ii):
            other = idx.kid[ss]
            # the nearest entry per (item, other key); ties by ring slot (deterministic)
            order = np.lexsort((ss, l2, other, ii))
            io, oo = ii[order], other[order]
            first = np.concatenate(([True], (io[1:] != io[:-1]) | (oo[1:] != oo[:-1])))
            for j in order[first]:
                i, s_ = int(ii[j]), int(ss[j])
                a = (client, qn0 + i + 1)
                b = (self._key[int(other[j])], int(idx.qn[s_]) + 1)
                if not mine[j]:
                    a, b = b, a
                pairs.append(Pair(t, a[0], a[1], b[0], b[1], float(l2[j]), float(dense[j]),
                                  float(peak[j])))
        idx.add(kid, qn0, enc, res, tv, pix, slots)
        return pairs

    def _escalate(self, g: Group, t: float) -> list:
        """Raise the group to its level and (with raise_members) every member below it."""
        for r in self.cfg.rules:
            if g.pairs >= r.pairs and int(r.level) > g.rule_level:
                g.rule_level = int(r.level)
        if not self.cfg.raise_members:
            return []
        top = int(g.level)
        if top == 0 or (top == g.applied and not g.dirty):
            return []
        if g.rule_level >= g.member_top:
            rule = max((r for r in self.cfg.rules if int(r.level) == g.rule_level),
                       key=lambda r: -r.pairs)
            why, thr = rule.label, rule.pairs
        else:
            why, thr = f"a member is at {Level(top).name}", None
        out = []
        for m in sorted(g.members):
            cur = max(self.own.get(m, 0), self.eff.get(m, 0))
            if cur < top:
                out.append(Transition(m, t, self.last_qn.get(m, 0), Level(cur), Level(top),
                                      f"group {g.id}: {why}",
                                      [{"detector": "link", "group": g.id,
                                        "members": len(g.members), "value": g.pairs,
                                        "threshold": thr, "since": g.since}]))
                self.eff[m] = top
        g.applied, g.dirty = top, False
        return out

    def nbytes(self) -> int:
        edges = sum(len(v) for v in self.groups.adj.values())
        return self.index.nbytes() + 150 * edges + 100 * (len(self.own) + len(self.eff))


def groups_from_log(qlog, cfg: LinkingConfig) -> Groups:
    """The groups as the live monitor built them, rebuilt from a log's pairs (in log order)."""
    gs = Groups(cfg)
    for p in qlog.pairs():
        gs.add_pair(p["client"], p["other"], p["t"])
    for g in gs.all():
        g.rule_level = max([int(r.level) for r in cfg.rules if g.pairs >= r.pairs], default=0)
        g.member_top = max(int(qlog.last_level(m)) for m in g.members)
    return gs
