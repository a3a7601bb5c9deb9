"""Store scaling without a chain: plan, stream and lease a gap of N synthetic refs.

One step per process, so the caller (bench/suite.py) reads each step's peak RSS
from the kernel (``wait4``):

    .venv/bin/python bench/store_scale.py populate DB_URL --n 1000000 --dir DIR   # via `gapfill import`
    .venv/bin/python bench/store_scale.py plan DB_URL        # store.plan: cut the gap into batches of 500
    .venv/bin/python bench/store_scale.py iter DB_URL        # iter_gap over the whole gap
    .venv/bin/python bench/store_scale.py lease DB_URL       # lease every batch, one at a time

Each step prints one JSON object (its own timing and counts) on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gapfill.store import open_store

CHAIN_ID = 1
CONTRACT = "0x" + "ab" * 20
REFS_PER_BLOCK = 7  # synthetic keys spread over blocks, so the key has two parts


def _hash(i: int) -> str:
    return hashlib.sha256(i.to_bytes(8, "big")).hexdigest()


def populate(url: str, n: int, workdir: Path) -> dict[str, object]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"refs_{n}_random.csv"
    if not path.exists():
        with path.open("w") as f:
            f.write("hash,block_number\n")
            for i in range(n):
                # Real hashes are random: sorted ones would fill the hash-keyed indexes in order.
                f.write(f"0x{_hash(i)},{1_000_000 + i // REFS_PER_BLOCK}\n")
    gapfill = str(Path(sys.executable).with_name("gapfill"))
    subprocess.run(
        [gapfill, "--db", url, "contract", "add", CONTRACT, "--chain-id", str(CHAIN_ID)],
        check=True,
        capture_output=True,
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [gapfill, "--db", url, "import", str(path), "--contract", CONTRACT],
        check=True,
        capture_output=True,
        text=True,
    )
    return {
        "step": "import",
        "refs": n,
        "seconds": time.perf_counter() - t0,
        "output": (out.stdout + out.stderr).strip(),
    }


def plan(url: str, batch_size: int) -> dict[str, object]:
    with open_store(url) as store:
        run_id = store.create_run("batch", 1, "bench/store_scale.py")
        t0 = time.perf_counter()
        info = store.plan(run_id, [(CHAIN_ID, CONTRACT)], batch_size)
        secs = time.perf_counter() - t0
    return {"step": "plan", "seconds": secs, "batches": info.batches, "refs": info.refs}


def iterate(url: str) -> dict[str, object]:
    with open_store(url) as store:
        t0 = time.perf_counter()
        n = 0
        for _ in store.iter_gap(CHAIN_ID, CONTRACT):
            n += 1
        secs = time.perf_counter() - t0
    return {"step": "iter_gap", "seconds": secs, "refs": n}


def lease(url: str) -> dict[str, object]:
    with open_store(url) as store:
        t0 = time.perf_counter()
        n = 0
        while store.lease(f"bench-{os.getpid()}", 3600.0, [(CHAIN_ID, CONTRACT)]) is not None:
            n += 1
        secs = time.perf_counter() - t0
    return {"step": "lease", "seconds": secs, "batches": n}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["populate", "plan", "iter", "lease"])
    ap.add_argument("db_url")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--dir", type=Path, default=Path(".bench/work/scale"))
    args = ap.parse_args()
    if args.step == "populate":
        out = populate(args.db_url, args.n, args.dir)
    elif args.step == "plan":
        out = plan(args.db_url, args.batch_size)
    elif args.step == "iter":
        out = iterate(args.db_url)
    else:
        out = lease(args.db_url)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
