"""``gapfill demo``: the whole job on a local chain, in under two minutes.

1. start anvil on a free loopback port;
2. deploy a small ERC-20-like token (shipped bytecode and ABI) and a silent contract;
3. generate a few tens of thousands of transactions;
4. register the contracts and discover their refs from the chain;
5. show ``status`` with the gap;
6. run ``enrich`` with the live progress view;
7. show the summary and a few decoded rows;
8. stop the node.

Each demo uses a fresh random chain id, so its rows never collide with an
earlier demo's in the same database. Without ``--db`` on its command line (GAPFILL_DB and
the config file's ``db`` name the user's own database, and are left alone), it writes
``gapfill-demo.db`` in the working directory, replaced on every run.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import click
import orjson
from click.core import ParameterSource

from gapfill.cli import MAX_WORKERS, Ctx, _is_tty, cli, render_status
from gapfill.cli_types import int_range
from gapfill.errors import GapfillError
from gapfill.model import Contract
from gapfill.settings import ENRICH_RPC_BATCH, EndpointSetting
from gapfill.store import DB_CHECK

DEMO_DB = "gapfill-demo.db"


def _say(text: str) -> None:
    click.secho(text, bold=True)


@cli.command()
@click.option("--txs", type=int_range(500), default=30_000, show_default=True,
              help="Transactions to generate on the local chain.")
@click.option("--layout", type=click.Choice(["dense", "sparse"]), default="dense", show_default=True,
              help="dense: blocks full of tracked transactions; sparse: 1-2 per block among others.")
@click.option("--mode", type=click.Choice(["auto", "sequential", "batch", "concurrent"]), default="auto",
              show_default=True, help="Enrichment mode, as for `gapfill enrich`.")
@click.option("--workers", type=int_range(1, MAX_WORKERS), default=None,
              help="Worker processes for concurrent mode [default: 75% of cores, 2-8].")
@click.option("--rows", type=int_range(0), default=3, show_default=True,
              help="Decoded rows to show at the end.")
@click.pass_context
def demo(click_ctx: click.Context, txs: int, layout: str, mode: str, workers: int | None, rows: int) -> None:
    """Run the whole job on a local anvil chain: discover, status, enrich, decoded rows.

    It writes gapfill-demo.db in the working directory, replaced on every run, unless
    --db is given before `demo` (GAPFILL_DB and the config file's db are left alone).
    """
    from gapfill.testing.anvil import ANVIL_ENV, Anvil, AnvilError, find_anvil
    from gapfill.testing.chain import ChainSpec, generate

    ctx: Ctx = click_ctx.find_object(Ctx)  # type: ignore[assignment]
    if find_anvil() is None:
        configured = os.environ.get(ANVIL_ENV)
        if configured:
            raise GapfillError(
                f"{ANVIL_ENV}={configured} is not an executable file: point it at an anvil "
                "binary, or unset it to use the one `make demo` installs into .tools/"
            )
        raise GapfillError(
            "anvil is not installed: run `make demo` (it installs anvil into .tools/) "
            f"or point {ANVIL_ENV} at an anvil binary"
        )
    # Only a --db typed on this command line picks the demo's database: GAPFILL_DB and the
    # config file's db name the user's own (the README's quick tour exports GAPFILL_DB, then
    # runs the demo), which would keep two demo contracts on a chain no endpoint serves.
    parent = click_ctx.parent
    explicit_db = parent is not None and parent.get_parameter_source("db_url") is ParameterSource.COMMANDLINE
    if not explicit_db:
        if ctx.db_check != DB_CHECK:  # GAPFILL_DB or the config file's db set it
            click.echo(f"{ctx.db_check} is left alone: the demo writes {DEMO_DB} "
                       "(pass --db before `demo` to choose its database)", err=True)  # fmt: skip
        for suffix in ("", "-wal", "-shm"):
            Path(DEMO_DB + suffix).unlink(missing_ok=True)
        ctx.db_url = f"sqlite:///{DEMO_DB}"
        ctx.db_check = DB_CHECK
    chain_id = random.randint(100_000, 999_999)
    t_start = time.perf_counter()
    # A Ctrl+C said a bare "interrupted" after "Stopping the node.": the chain is gone with
    # the node, so what the database holds of it is a demo cut short.
    where = "the database" if explicit_db else DEMO_DB  # (a URL given may hold a password)
    ctx.kept = lambda: (f"the demo's node and chain are gone, and {where} holds what it wrote of "
                        "them so far; run `gapfill demo` again to start over")  # fmt: skip
    # Not enrich's "rerun the same command to continue where it stopped": a rerun builds a
    # new chain (and replaces gapfill-demo.db), and this one ends with its node.
    go_on = (f"{where} holds what the run stored, but the demo's chain ends with its node: run "
             "`gapfill demo` again to start over on a new chain")  # fmt: skip
    _say(f"1. Starting anvil (chain id {chain_id}) ...")
    try:
        node = Anvil(chain_id=chain_id)
        node.start()
    except AnvilError as exc:
        raise GapfillError(f"anvil did not start: {exc}") from None
    try:
        click.echo(f"   node at {node.url}")
        _say(f"2-3. Deploying a token and a silent contract, generating {txs:,} transactions ({layout}) ...")
        t0 = time.perf_counter()
        chain = generate(node.url, ChainSpec(layout, txs))  # type: ignore[arg-type]
        blocks = chain.head - chain.first_block + 1
        click.echo(f"   {len(chain.all_txs):,} transactions in {blocks} blocks "
                   f"({time.perf_counter() - t0:.1f}s); token {chain.token}, "
                   f"silent {chain.silent}")  # fmt: skip

        _say("4. Registering the contracts and discovering their transactions from the chain ...")
        store = ctx.store(create=True)
        token = Contract(chain_id, chain.token, "DemoToken", 0, chain.token_abi)
        silent = Contract(chain_id, chain.silent, "Silent", 0, chain.silent_abi)
        store.add_contract(token)
        store.add_contract(silent)
        endpoint = EndpointSetting(node.url)
        found = asyncio.run(_discover(store, endpoint, [token, silent]))
        for address, (n, methods) in found.items():
            click.echo(f"   {address}: {n:,} refs found with {', '.join(methods)}")

        _say("5. The gap:")
        render_status(store.status(chain_id), {})

        _say("6. Enriching ...")
        ctx.close()
        ctx.rpc_urls = (node.url,)
        from gapfill.cli import _job, _run_job

        opts: dict[str, Any] = {
            "workers": workers, "batch_size": 500, "rpc_batch_size": ENRICH_RPC_BATCH, "grace_period_s": 30.0,
            "lease_timeout_s": 300.0, "batches_in_flight": 4, "block_plan_min_refs": None,
            "plan": "auto", "metrics_port": None,
        }  # fmt: skip
        try:
            # A Ctrl+C held as the run ended stops the demo once the run's end is said.
            _run_job(_job(ctx, chain_id, [token, silent], mode, opts), quiet=False, deliver=True,
                     go_on=go_on)  # fmt: skip
        except SystemExit as exc:
            if exc.code not in (0, 3, None):
                raise

        _say("7. After enrichment:")
        store = ctx.store(create=True)
        render_status(store.status(chain_id), {})
        _show_rows(store, chain_id, chain.token, rows)
        click.echo(f"\nDemo done in {time.perf_counter() - t_start:.0f}s. Database: {store.display_url}")
        if not explicit_db:
            click.echo('Query it directly: sqlite3 gapfill-demo.db '
                       '"select method_name, count(*) from transactions group by 1"')
    finally:
        _say("8. Stopping the node.")
        node.stop()


async def _discover(store: Any, endpoint: EndpointSetting, contracts: list[Contract]) -> dict[str, Any]:
    from gapfill.discover.run import discover
    from gapfill.engine.session import make_client

    out: dict[str, Any] = {}
    async with make_client([endpoint]) as client:
        for c in contracts:
            summary = await discover(store, client, c, confirmations=0)
            out[c.address] = (summary.new_refs, list(summary.methods))
    return out


def _show_rows(store: Any, chain_id: int, token: str, n: int) -> None:
    if n <= 0:
        return
    txs = [t for t in store.fetch_transactions(chain_id, limit=2000)
           if t["method_name"] and t["to_address"] == token]
    # One of each kind of call reads best: a transfer, a ping carrying a value, ...
    by_method: dict[str, dict[str, Any]] = {}
    for t in txs:
        if t["method_name"] == "mintMany":
            continue
        best = by_method.get(t["method_name"])
        if best is None or t["value"] > best["value"]:  # a value above 2**64 shows exactness
            by_method[t["method_name"]] = t
    shown = list(by_method.values())[:n]
    if not shown:
        return
    click.echo("\nA few decoded transactions:")
    for t in shown:
        click.echo(f"  {t['tx_hash'][:18]}… block {t['block_number']} status {t['status']} "
                   f"value {t['value']}")
        click.echo(f"    {t['method_name']}({orjson.dumps(t['method_args']).decode()[:160]})")
        for log in store.fetch_logs(chain_id, t["tx_hash"])[:3]:
            if log["event_name"]:
                click.echo(f"    → {log['event_name']} {orjson.dumps(log['event_args']).decode()[:160]}")
    if _is_tty():
        click.echo("")
