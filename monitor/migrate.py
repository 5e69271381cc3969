"""Convert a monitor database written before the batched monitor (schema 1: one row per item in a
``queries`` table, inputs zlib-compressed) into the current layout (one row per request).

    python -m monitor --db OLD.db migrate NEW.db

Requests are rebuilt from the item rows (a request is the run of rows from an item 0 to the next
item 0 of the same client); transitions and the config the monitor ran with are copied; detector
checkpoints are not (they belong to the old engine: the new one replays the log instead). The
old file is only read.
"""
from __future__ import annotations

import json
import sqlite3
import zlib
from pathlib import Path

import numpy as np

from monitor.log import INSERT_REQUEST, Batch, connect

_OLD_SCORES = ("s_prada", "s_ood", "s_similarity", "s_volume", "s_near_duplicate")


def _decode_v1(fmt: int, blob: bytes | None) -> tuple[np.ndarray | None, bool]:
    """(float32 (28, 28) input or None, on the 0-255 grid) from a schema-1 raw column."""
    if fmt == 0 or blob is None:
        return None, False
    b = zlib.decompress(blob)
    if fmt == 1:
        return (np.frombuffer(b, np.uint8).astype(np.float32) / np.float32(255.0)
                ).reshape(28, 28), True
    if fmt == 2:
        return np.frombuffer(b, np.float16).astype(np.float32).reshape(28, 28), False
    return np.frombuffer(b, np.float32).copy().reshape(28, 28), False


def migrate(old: str | Path, new: str | Path, progress=None) -> dict:
    old, new = Path(old), Path(new)
    if not old.exists():
        raise FileNotFoundError(f"no database at {old}")
    if new.exists():
        raise FileExistsError(f"{new} exists; choose a new file")
    src = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
    src.row_factory = sqlite3.Row
    if not src.execute("SELECT 1 FROM sqlite_master WHERE name='queries'").fetchone():
        raise ValueError(f"{old} has no schema-1 'queries' table: nothing to migrate")
    cols = [r[1] for r in src.execute("PRAGMA table_info(queries)")]
    scores = [c for c in _OLD_SCORES if c in cols]
    dst = connect(new)
    n_req = n_items = 0
    with dst:
        for (client,) in src.execute("SELECT DISTINCT client FROM queries ORDER BY client"
                                     ).fetchall():
            rows = src.execute("SELECT * FROM queries WHERE client=? ORDER BY qn",
                               (client,)).fetchall()
            start = 0
            while start < len(rows):
                end = start + 1
                while end < len(rows) and rows[end]["item"] != 0:
                    end += 1
                part = rows[start:end]
                xs = [_decode_v1(r["raw_fmt"], r["raw"]) for r in part]
                kept = all(x is not None for x, _ in xs)
                images = np.stack([x if x is not None else np.zeros((28, 28), np.float32)
                                   for x, _ in xs])
                sc = np.full((len(part), len(_OLD_SCORES)), np.nan)
                for j, c in enumerate(_OLD_SCORES):
                    if c in scores:
                        sc[:, j] = [np.nan if r[c] is None else r[c] for r in part]
                top = [r["sent_top"] for r in part]
                b = Batch(client, part[0]["qn"] - 1, part[0]["t"], part[0]["request_id"],
                          images, np.array([g for _, g in xs]),
                          np.stack([np.frombuffer(r["target_probs"], np.float32) for r in part]),
                          part[0]["level"], part[0]["kind"],
                          np.array([r["sent_label"] for r in part]),
                          None if any(v is None for v in top) else np.array(top),
                          [r["model"] for r in part],
                          np.array([bool(r["watermarked"]) for r in part]), sc,
                          np.array([r["fired"] for r in part]),
                          np.array([r["level_after"] for r in part]), kept)
                dst.execute(INSERT_REQUEST, b.row())
                n_req += 1
                n_items += len(part)
                start = end
            if progress:
                progress(client, n_items)
        for r in src.execute("SELECT client, t, qn, from_level, to_level, rule, evidence FROM "
                             "transitions ORDER BY id"):
            dst.execute("INSERT INTO transitions (client, t, qn, from_level, to_level, rule, "
                        "evidence) VALUES (?,?,?,?,?,?,?)", tuple(r))
        cfg = src.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        if cfg:
            dst.execute("INSERT OR REPLACE INTO meta VALUES ('config', ?)", (cfg[0],))
        dst.execute("INSERT OR REPLACE INTO meta VALUES ('migrated_from', ?)",
                    (json.dumps({"path": str(old), "schema": "1"}),))
    src.close()
    dst.close()
    return {"requests": n_req, "items": n_items}
