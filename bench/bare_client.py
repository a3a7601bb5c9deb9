"""The fetch-only bound: a bare asyncio JSON-RPC client, nothing stored.

For each hash, ``eth_getTransactionByHash`` and ``eth_getTransactionReceipt``, sent
as JSON-RPC batches of ``--batch`` calls (100: 50 transactions) with ``--in-flight``
batches outstanding (8) on one aiohttp session; responses are parsed with orjson
and checked (one result per id, none null), then dropped.

    .venv/bin/python bench/bare_client.py --rpc-url URL --hashes FILE

Prints one JSON object: txs, calls, seconds, tx_s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import orjson


async def run(url: str, hashes: list[str], batch_calls: int, in_flight: int) -> dict[str, float]:
    per_batch = max(1, batch_calls // 2)
    chunks = [hashes[i : i + per_batch] for i in range(0, len(hashes), per_batch)]
    queue: asyncio.Queue[list[str]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    calls = 0
    connector = aiohttp.TCPConnector(limit=in_flight, force_close=False)
    headers = {"Content-Type": "application/json"}

    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_worker() -> None:
            nonlocal calls
            while True:
                try:
                    chunk = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                payload = []
                for i, h in enumerate(chunk):
                    payload.append(
                        {"jsonrpc": "2.0", "id": 2 * i, "method": "eth_getTransactionByHash", "params": [h]}
                    )
                    payload.append(
                        {
                            "jsonrpc": "2.0",
                            "id": 2 * i + 1,
                            "method": "eth_getTransactionReceipt",
                            "params": [h],
                        }
                    )
                async with session.post(url, data=orjson.dumps(payload), headers=headers) as resp:
                    body = await resp.read()
                answers = orjson.loads(body)
                if len(answers) != len(payload) or any(a.get("result") is None for a in answers):
                    raise RuntimeError(f"bad batch answer: {body[:200]!r}")
                calls += len(payload)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_worker() for _ in range(in_flight)))
        seconds = time.perf_counter() - t0
    return {
        "txs": len(hashes),
        "calls": calls,
        "seconds": seconds,
        "tx_s": len(hashes) / seconds if seconds > 0 else 0.0,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rpc-url", required=True)
    ap.add_argument("--hashes", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=100, help="calls per JSON-RPC batch")
    ap.add_argument("--in-flight", type=int, default=8)
    args = ap.parse_args()
    hashes = [h.strip() for h in args.hashes.read_text().split() if h.strip()]
    out = asyncio.run(run(args.rpc_url, hashes, args.batch, args.in_flight))
    sys.stdout.write(orjson.dumps(out).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
