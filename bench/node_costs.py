"""What each way of asking for a transaction costs the node: anvil's CPU per tracked transaction.

The dense targets of bench/run are bounded by the node: on 2 cores, every CPU
millisecond anvil spends per transaction is one the tool cannot have. This measures,
on one generated dense chain, anvil's CPU (from /proc) for every call that can give a
tracked transaction's body or receipt, asked for all of them:

* the body: ``eth_getTransactionByHash``, ``eth_getRawTransactionByHash`` (RLP, no JSON
  fields for the node to fill), ``eth_getTransactionByBlockHashAndIndex``,
  ``eth_getTransactionByBlockNumberAndIndex``, ``eth_getBlockByNumber(n, true)`` (the whole
  block, once per block) and ``ots_getBlockTransactions``;
* the receipt: ``eth_getTransactionReceipt`` and ``eth_getBlockReceipts`` (once per block);
* ``eth_getBlockByNumber(n, false)``: a header, for comparison.

Calls go in JSON-RPC batches of 100 (per-block calls: 4), 8 in flight, as the bare client
sends them. Reported: node CPU ms per tracked transaction and wall seconds, per round.

    .venv/bin/python bench/node_costs.py [--txs 30000] [--sample 10000] [--rounds 2]

Prints one JSON object on stdout (progress on stderr). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp
import orjson

from gapfill.testing.anvil import Anvil
from gapfill.testing.chain import ChainSpec, generate

CLK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


async def post(session: aiohttp.ClientSession, url: str, calls: list[tuple[str, list[Any]]]) -> list[Any]:
    body = orjson.dumps(
        [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(calls)]
    )
    async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
        answers: list[dict[str, Any]] = orjson.loads(await resp.read())
    bad = [a for a in answers if "result" not in a or a["result"] is None]
    if bad:
        raise RuntimeError(f"{calls[0][0]}: {bad[0]}")
    return [a["result"] for a in sorted(answers, key=lambda a: a["id"])]


async def run(url: str, calls: list[tuple[str, list[Any]]], batch: int, in_flight: int = 8) -> None:
    chunks = [calls[i : i + batch] for i in range(0, len(calls), batch)]
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            while chunks:
                await post(session, url, chunks.pop())

        await asyncio.gather(*(worker() for _ in range(in_flight)))


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    with Anvil() as node:
        log(f"generating a dense chain of {args.txs:,} txs")
        chain = generate(node.url, ChainSpec("dense", args.txs))
        # As bench/run tracks them: the transactions sent straight to Token or Silent.
        direct = chain.direct[chain.token] | chain.direct[chain.silent]
        tracked = sorted(direct, key=lambda h: (chain.tx_block[h], h))[: args.sample]
        where: list[tuple[str, str, str]] = []  # block number, index, block hash
        async with aiohttp.ClientSession() as session:
            for i in range(0, len(tracked), 500):
                for r in await post(
                    session, node.url, [("eth_getTransactionReceipt", [h]) for h in tracked[i : i + 500]]
                ):
                    where.append((r["blockNumber"], r["transactionIndex"], r["blockHash"]))
        blocks = sorted({b for b, _, _ in where}, key=lambda b: int(b, 16))
        log(f"{len(tracked):,} tracked txs in {len(blocks):,} blocks")
        cases: dict[str, tuple[list[tuple[str, list[Any]]], int]] = {
            "eth_getTransactionByHash": ([("eth_getTransactionByHash", [h]) for h in tracked], 100),
            "eth_getRawTransactionByHash": ([("eth_getRawTransactionByHash", [h]) for h in tracked], 100),
            "eth_getTransactionByBlockHashAndIndex": (
                [("eth_getTransactionByBlockHashAndIndex", [bh, i]) for _, i, bh in where], 100),
            "eth_getTransactionByBlockNumberAndIndex": (
                [("eth_getTransactionByBlockNumberAndIndex", [b, i]) for b, i, _ in where], 100),
            "eth_getBlockByNumber(full)": ([("eth_getBlockByNumber", [b, True]) for b in blocks], 4),
            "ots_getBlockTransactions": (
                [("ots_getBlockTransactions", [int(b, 16), 0, 1000]) for b in blocks], 4),
            "eth_getTransactionReceipt": ([("eth_getTransactionReceipt", [h]) for h in tracked], 100),
            "eth_getBlockReceipts": ([("eth_getBlockReceipts", [b]) for b in blocks], 4),
            "eth_getBlockByNumber(header)": ([("eth_getBlockByNumber", [b, False]) for b in blocks], 4),
        }  # fmt: skip
        out: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for rnd in range(args.rounds):
            for name, (calls, batch) in cases.items():
                c0, t0 = cpu_s(node.pid), time.perf_counter()
                try:
                    await run(node.url, calls, batch)
                except RuntimeError as exc:
                    log(f"{name}: not measured ({exc})")
                    continue
                wall, node_cpu = time.perf_counter() - t0, cpu_s(node.pid) - c0
                out[name].append({"node_cpu_ms_per_tx": round(node_cpu / len(tracked) * 1000, 4),
                                  "wall_s": round(wall, 3)})  # fmt: skip
                per_tx = node_cpu / len(tracked) * 1000
                log(f"round {rnd + 1} {name:42s} node {per_tx:.4f} ms/tx  wall {wall:.2f} s")
        return {"tracked": len(tracked), "blocks": len(blocks), "chain_txs": args.txs, "calls": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--txs", type=int, default=30_000, help="dense chain size")
    p.add_argument("--sample", type=int, default=10_000, help="tracked transactions asked for")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print(json.dumps(asyncio.run(measure(args)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
