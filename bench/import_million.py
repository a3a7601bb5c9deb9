"""Benchmark: import 1,000,000 hashes into PostgreSQL (issue: foundation).

Target: under a minute, peak memory under 300 MB. Writes a hash file, then runs
`gapfill import` in a child process and reads its peak RSS from the kernel.

    .venv/bin/python bench/import_million.py [--n 1000000] [--pg postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid

import psycopg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()
    db = f"gapfill_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    url = args.pg.rsplit("/", 1)[0] + "/" + db
    gapfill = [os.path.join(os.path.dirname(sys.executable), "gapfill")]
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            for i in range(args.n):  # random, as real hashes are (sorted ones fill indexes in order)
                f.write(f"0x{hashlib.sha256(i.to_bytes(8, 'big')).hexdigest()}\n")
            path = f.name
        contract = "0x" + "ab" * 20
        subprocess.run([*gapfill, "--db", url, "contract", "add", contract, "--chain-id", "1"], check=True,
                       capture_output=True)
        t0 = time.perf_counter()
        proc = subprocess.run([*gapfill, "--db", url, "import", path, "--contract", contract],
                              check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        with psycopg.connect(url) as conn:
            count = conn.execute("SELECT count(*) FROM refs").fetchone()
        result = {
            "refs": args.n, "stored": count[0] if count else 0, "seconds": round(seconds, 2),
            "refs_per_s": round(args.n / seconds), "peak_rss_mb": round(peak_mb, 1),
            "under_a_minute": seconds < 60, "under_300_mb": peak_mb < 300, "output": proc.stdout.strip(),
        }
        print(json.dumps(result, indent=2))
        os.unlink(path)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main()
