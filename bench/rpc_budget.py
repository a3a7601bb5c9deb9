"""Benchmark: do N worker processes on one host spend a shared RPC budget fully and safely?

Starts anvil with a small generated chain, puts the provider emulator (a separate
process, like a real provider) in front of it with an rps limit and a batch cap,
and runs ``--workers`` processes that each make their own ``RpcClient`` against it
for ``--duration`` seconds. Reports achieved calls/s (target >= 90 % of rps), lost
calls (target 0: every answer is compared with anvil's own) and the share of calls
answered 429 (target < 2 %). A second scenario adds an endpoint that answers 503
to everything next to the healthy one.

    .venv/bin/python bench/rpc_budget.py --duration 30

Prints one JSON summary on stdout (progress goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from gapfill.rpc import Call, CallError, EndpointConfig, RpcClient, RpcSettings


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- worker process ------------------------------------------------------------------------


async def _work(args: argparse.Namespace) -> dict[str, Any]:
    plan = orjson.loads(Path(args.plan).read_bytes())
    calls = [Call(c["method"], c["params"]) for c in plan["calls"]]
    expected = plan["answers"]
    endpoints = [EndpointConfig(u, rps=args.rps, max_batch=args.batch) for u in args.url]
    settings = RpcSettings(budget_dir=args.budget_dir)
    done = lost = 0
    chunk = args.chunk
    async with RpcClient(endpoints, settings) as client:
        while time.monotonic() < args.start:
            await asyncio.sleep(0.005)

        async def loop(offset: int) -> None:
            nonlocal done, lost
            position = offset
            while time.monotonic() < args.end:
                picks = [(position + k) % len(calls) for k in range(chunk)]
                position += chunk * args.loops
                results = await client.call_many([calls[p] for p in picks])
                for p, result in zip(picks, results, strict=True):
                    if isinstance(result, CallError) or result != expected[p]:
                        lost += 1
                    else:
                        done += 1

        await asyncio.gather(*(loop(k * chunk) for k in range(args.loops)))
        finished = time.monotonic()
        stats = {k: {"calls": s.calls, "requests": s.requests, "retries": s.retries,
                     "rate_limited": s.rate_limited, "errors": s.errors,
                     "batch_cap": s.batch_cap, "p50_ms": (s.latency_p50_s or 0) * 1000,
                     "p99_ms": (s.latency_p99_s or 0) * 1000}
                 for k, s in client.stats().items()}
    return {"answered": done, "lost": lost, "finished": finished, "stats": stats}


# -- orchestration ---------------------------------------------------------------------------


def _start_emulator(upstream: str, *flags: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gapfill.testing.emulator", "--upstream", upstream,
         "--port", "0", *flags],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    url = process.stdout.readline().strip()
    if not url:
        raise SystemExit("the emulator did not start")
    return process, url


def _emulator_stats(url: str) -> dict[str, Any]:
    base = url.split("/", 3)
    with urllib.request.urlopen(f"{base[0]}//{base[2]}/_emulator/stats", timeout=10) as r:
        stats: dict[str, Any] = json.loads(r.read())
        return stats


def _run_workers(args: argparse.Namespace, urls: list[str], plan: str) -> dict[str, Any]:
    budget_dir = tempfile.mkdtemp(prefix="gapfill-bench-budget-")
    start = time.monotonic() + 3.0  # every interpreter is up before the clock starts
    end = start + args.duration
    command = [sys.executable, __file__, "--worker", "--plan", plan, "--budget-dir", budget_dir,
               "--start", repr(start), "--end", repr(end), "--rps", str(args.rps),
               "--batch", str(args.batch), "--chunk", str(args.chunk),
               "--loops", str(args.loops)]
    for url in urls:
        command += ["--url", url]
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
                for _ in range(args.workers)]
    reports = []
    for child in children:
        out, _ = child.communicate(timeout=args.duration + 120)
        if child.returncode != 0:
            raise SystemExit(f"a worker failed with exit code {child.returncode}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = max(r["finished"] for r in reports) - start
    answered = sum(r["answered"] for r in reports)
    return {"elapsed_s": round(elapsed, 2), "answered": answered,
            "lost": sum(r["lost"] for r in reports),
            "calls_per_s": round(answered / elapsed, 1),
            "per_worker": [r["answered"] for r in reports],
            "client_stats": [r["stats"] for r in reports]}


def _plan(node_url: str) -> str:
    from gapfill.testing.chain import ChainSpec, generate

    chain = generate(node_url, ChainSpec(layout="dense", total_txs=300, seed=11, blocks=60))
    calls = [{"method": "eth_getTransactionReceipt", "params": [h]} for h in chain.all_txs]
    calls += [{"method": "eth_getTransactionByHash", "params": [h]} for h in chain.all_txs]

    async def answers() -> list[Any]:
        async with RpcClient([EndpointConfig(node_url)]) as client:
            return await client.call_many([Call(c["method"], c["params"]) for c in calls])

    path = Path(tempfile.mkdtemp(prefix="gapfill-bench-")) / "plan.json"
    path.write_bytes(orjson.dumps({"calls": calls, "answers": asyncio.run(answers())}))
    return str(path)


def _scenario(name: str, args: argparse.Namespace, upstream: str, plan: str,
              dead: bool) -> dict[str, Any]:
    log(f"{name}: {args.workers} workers, {args.duration:g} s, rps {args.rps:g}, "
        f"batch cap {args.batch}")
    good, good_url = _start_emulator(upstream, "--rps", str(args.rps),
                                     "--max-batch", str(args.batch), "--seed", "1")
    processes, urls = [good], [good_url]
    if dead:
        bad, bad_url = _start_emulator(upstream, "--fail-status", "503")
        processes.insert(0, bad)
        urls.insert(0, bad_url)
    try:
        result = _run_workers(args, urls, plan)
        emu = _emulator_stats(good_url)
        result["emulator"] = {k: emu[k] for k in ("requests", "calls", "calls_answered",
                                                  "calls_rate_limited", "responses_429",
                                                  "batches_refused")}
        if dead:
            result["dead_endpoint_requests"] = _emulator_stats(urls[0])["requests"]
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=10)
    calls_seen = max(1, result["emulator"]["calls"])
    result["share_of_budget"] = round(result["calls_per_s"] / args.rps, 3)
    result["rate_limited_share"] = round(result["emulator"]["calls_rate_limited"] / calls_seen, 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per scenario")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rps", type=float, default=200.0)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=100, help="calls per call_many")
    parser.add_argument("--loops", type=int, default=2, help="concurrent call_many per worker")
    parser.add_argument("--skip-failover", action="store_true")
    # Worker mode (internal).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--budget-dir", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--end", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(_work(args))), flush=True)
        return

    from gapfill.testing.anvil import Anvil

    with Anvil() as node:
        plan = _plan(node.url)
        summary: dict[str, Any] = {
            "config": {"duration_s": args.duration, "workers": args.workers, "rps": args.rps,
                       "batch": args.batch, "cpus": os.cpu_count()},
            "shared_budget": _scenario("shared budget", args, node.url, plan, dead=False),
        }
        if not args.skip_failover:
            summary["one_endpoint_503"] = _scenario("one endpoint answering 503", args,
                                                    node.url, plan, dead=True)
    for scenario in ("shared_budget", "one_endpoint_503"):
        if scenario in summary:
            for worker in summary[scenario].pop("client_stats"):
                summary[scenario].setdefault("client_stats_first_worker", worker)
    checks = {
        "calls_per_s>=90%": summary["shared_budget"]["share_of_budget"] >= 0.9,
        "lost==0": summary["shared_budget"]["lost"] == 0,
        "429_share<2%": summary["shared_budget"]["rate_limited_share"] < 0.02,
    }
    if "one_endpoint_503" in summary:
        checks["failover>=80%"] = summary["one_endpoint_503"]["share_of_budget"] >= 0.8
        checks["failover_lost==0"] = summary["one_endpoint_503"]["lost"] == 0
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
