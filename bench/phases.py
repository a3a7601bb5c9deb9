"""Where a gapfill run's wall time goes: start, steady state and end, mode against mode.

One anvil, one generated chain (`ChainSpec(--layout, --txs)`), then each case in turn,
round after round (a shared machine's speed drifts over minutes): a fresh database
seeded as bench/suite.py seeds it (Token and Silent with their ABIs, the tracked refs
imported), then ``gapfill -v enrich --mode MODE`` measured as the suite measures a run
(wall, CPU of the process tree, the node's CPU). From the ``-v`` log's timestamps:

* ``check``: the command's start to its node check ("... kept for the run");
* ``plan``: to the plan's log line;
* ``lease``: to the first batch leased (a worker's first call follows at once);
* ``steady``: the first lease to the last commit;
* ``end``: the last commit to the command's exit.

A case may run another source tree (``--src NAME=DIR``, a ``src/`` directory: a
checkout of another commit, say) on ``PYTHONPATH``, so that old and new code alternate
on the same chain: ``--case NAME:MODE:BACKEND[:SRC]``; ``--extra NAME=ARGS`` adds options
to that case's ``enrich`` (``--extra big="--rpc-batch-size 500"``).

    .venv/bin/python bench/phases.py --txs 40000 --rounds 3 \\
        --case batch:batch:postgres --case conc:concurrent:postgres

Prints one line per run and the median of each phase per case. Nothing is written
outside ``.bench/work/phases``; the databases are dropped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import suite  # (bench/suite.py, beside this file)

from gapfill.testing.anvil import Anvil
from gapfill.testing.chain import ChainSpec, generate

PHASES = ("check", "plan", "lease", "steady", "end", "wall")


def _stamp(line: str) -> float:
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()


def phases(stderr: str, started: float, wall_s: float) -> dict[str, float]:
    """The phases of one run, in seconds, from its ``-v`` log (see the module's doc)."""
    stamped = [ln for ln in stderr.splitlines() if ln[:4].isdigit() and ln[4:5] == "-"]

    def first(marker: str) -> float:
        return min(_stamp(ln) for ln in stamped if marker in ln) - started

    lease = first(" leased: ")
    last = max(_stamp(ln) for ln in stamped if " committed: " in ln) - started
    return {"check": first(" kept for the run"), "plan": first(" planned "), "lease": lease,
            "steady": last - lease, "end": wall_s - last, "wall": wall_s}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", default="dense", choices=["dense", "sparse"])
    ap.add_argument("--txs", type=int, default=40_000, help="transactions of the chain [40,000]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--case", action="append", default=[], metavar="NAME:MODE:BACKEND[:SRC]")
    ap.add_argument("--src", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=ARGS")
    ap.add_argument("--pg", default=suite.ARGS_PG)
    args = ap.parse_args()
    srcs = dict(s.split("=", 1) for s in args.src)
    extra = {k: shlex.split(v) for k, v in (e.split("=", 1) for e in args.extra)}
    cases = [c.split(":") for c in args.case] or [["batch", "batch", "postgres"],
                                                  ["concurrent", "concurrent", "postgres"]]  # fmt: skip
    work = suite.BENCH / "work" / "phases"
    work.mkdir(parents=True, exist_ok=True)
    dbs = suite.Databases(args.pg, work, keep=False)
    got: dict[str, list[dict[str, float]]] = {c[0]: [] for c in cases}
    try:
        with Anvil() as node:
            chain = generate(node.url, ChainSpec(args.layout, args.txs))  # type: ignore[arg-type]
            tracked = suite.tracked_of(chain)
            n = len(tracked.hashes)
            suite.log(f"{args.layout} chain of {args.txs:,} txs, {n:,} tracked")
            for r in range(args.rounds):
                for name, mode, backend, *src in cases:
                    db = dbs.new(backend, "phases")
                    suite.setup_gapfill_db(db, chain, tracked.by_contract, work, "phases")
                    env: dict[str, Any] = dict(os.environ)
                    cmd = [suite.GAPFILL]
                    if src:
                        env["PYTHONPATH"] = srcs[src[0]]
                        cmd = [suite.PY, "-c", "import sys; from gapfill._entry import main; main()"]
                    cmd += ["--db", db, "--rpc-url", node.url, "-v", "enrich", "--mode", mode,
                            *extra.get(name, [])]  # fmt: skip
                    started = time.time()
                    tag = db.rsplit("/", 1)[1] if backend == "postgres" else None
                    m = suite.measure(cmd, node_pid=node.pid, env=env, db_tag=tag)
                    rows = suite.count_rows(db)["transactions"]
                    p = phases(m.stderr, started, m.wall_s)
                    got[name].append(p)
                    print(f"r{r} {name:14s} " + " ".join(f"{k} {v:6.2f}" for k, v in p.items())
                          + f" | {n / m.wall_s:6,.0f} tx/s, cpu {m.cpu_s:.2f} s, node {m.node_cpu_s or 0:.2f}"
                          + ("" if rows == n else f" | ROWS {rows:,} of {n:,}"), flush=True)  # fmt: skip
    finally:
        dbs.drop_all()
    print("median by case:")
    for name, runs in got.items():
        if runs:
            print(f"  {name:14s} " + " ".join(f"{k} {statistics.median(r[k] for r in runs):6.2f}"
                                                for k in PHASES))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
