"""``python -m lab.pg_cap``: does ``log.max_mb`` bound a PostgreSQL store's disk?

Starts a throw-away PostgreSQL server (deploy.pgserver, binaries installed when missing, as
root), writes request rows of ~7 kB (4 off-grid images kept raw, one row in 50 watermarked)
through :class:`monitor.pgstore.PgStore` with the cap under test, and after every ``--every``
rows prints the size the cap counts (the ``log_size`` counter), the rows left and the
tables' files on disk (``pg_total_relation_size``, TOAST and indexes included). ``--no-vacuum``
shows the files without the VACUUM the cap runs after deleting.

    python -m lab.pg_cap [--rows 12000] [--max-mb 5] [--check-every 1] [--every 2000]
"""
from __future__ import annotations

import argparse
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.pg_cap", description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--max-mb", type=float, default=5.0)
    ap.add_argument("--check-every", type=float, default=1.0, help="seconds between checks")
    ap.add_argument("--every", type=int, default=2000, help="rows between two readings")
    ap.add_argument("--no-vacuum", action="store_true")
    a = ap.parse_args(argv)
    if a.rows < 1 or a.every < 1 or a.max_mb <= 0:
        ap.error("--rows and --every must be >= 1 and --max-mb > 0")

    import numpy as np
    import psycopg

    from common.types import AnswerKind
    from deploy import pgserver
    from monitor import pgstore
    from monitor.log import Batch

    if pgserver.find_bindir() is None:
        pgserver.install()
    srv = pgserver.PgServer(tempfile.mkdtemp(prefix="mg-lab-pgcap-"), fsync=False).start()
    try:
        st = pgstore.PgStore(srv.dsn, "lab", schema="cap", max_mb=a.max_mb,
                             cap_every=a.check_every, vacuum_after_cap=not a.no_vacuum)

        def reading() -> tuple[float, float, int]:
            with psycopg.connect(srv.dsn, autocommit=True) as c:
                disk = c.execute("SELECT sum(pg_total_relation_size(oid))::bigint FROM pg_class "
                                 "WHERE relnamespace = 'cap'::regnamespace AND relkind = 'r'"
                                 ).fetchone()[0]
                counted = c.execute("SELECT coalesce(sum(bytes), 0)::bigint FROM cap.log_size"
                                    ).fetchone()[0]
                rows = c.execute("SELECT count(*) FROM cap.requests").fetchone()[0]
            return disk / 2 ** 20, counted / 2 ** 20, rows

        rng = np.random.default_rng(0)
        peak = (0.0, 0.0)
        for i in range(a.rows):
            n = 4
            x = rng.random((n, 28, 28), np.float32)
            p = rng.dirichlet(np.ones(10), n).astype(np.float32)
            wm = np.zeros(n, bool)
            wm[0] = i % 50 == 0
            st.put_batch(Batch(f"c{i % 8}", 4 * (i // 8), 1e9 + i, "r", x, np.zeros(n, bool), p,
                               0, int(AnswerKind.PROBABILITIES), p.argmax(1), p.max(1), [], wm,
                               np.full((n, 5), np.nan), np.zeros(n, int), np.zeros(n, int),
                               True))
            if (i + 1) % a.every == 0 or i + 1 == a.rows:
                st.flush()
                disk, counted, rows = reading()
                peak = (max(peak[0], disk), max(peak[1], counted))
                print(f"{i + 1:>7,d} rows written: counted {counted:6.2f} MB, {rows:,d} rows "
                      f"left, files {disk:6.1f} MB", flush=True)
                time.sleep(a.check_every * 1.1)    # the next commit runs the check
        st.close()
        print(f"max_mb {a.max_mb:g}: counted at most {peak[1]:.2f} MB, files at most "
              f"{peak[0]:.1f} MB ({peak[0] / max(peak[1], 1e-9):.2f}x the counted peak); "
              f"rows deleted by the cap: {st.pruned:,d}")
    finally:
        srv.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
