"""``gapfill discover`` end to end: flags, env vars, progress on stderr, no secrets printed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gapfill.cli import cli
from gapfill.cli_discover import discover
from gapfill.store import open_store
from gapfill.testing.chain import GeneratedChain
from gapfill.testing.explorer_standin import ExplorerStandIn

cli.add_command(discover)

# `small_chain` yields conftest.NodeChain(node, chain); conftest is not importable.
NodeChain = Any
KEY = "TopSecretExplorerKey123"


@pytest.fixture
def standin(small_chain: NodeChain) -> Iterator[str]:
    """The explorer stand-in on a loop of its own (the CLI runs asyncio.run in this thread)."""
    loop = asyncio.new_event_loop()
    api = ExplorerStandIn(small_chain.chain, key=KEY, rps=None)
    ready = threading.Event()
    stop = asyncio.Event()

    async def serve() -> None:
        async with api:
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield api.url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def _add(runner: CliRunner, db: str, chain: GeneratedChain, address: str) -> None:
    res = runner.invoke(cli, ["--db", db, "contract", "add", address, "--chain-id", str(chain.chain_id),
                              "--start-block", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_discover_command(small_chain: NodeChain, tmp_path: Path) -> None:
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.silent)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "blocks",
                              "--confirmations", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    assert "discover " + chain.silent in res.stderr  # progress on stderr
    assert "coverage blocks 0-" in res.stdout and "complete" in res.stdout
    with open_store(db) as store:
        found = {r.tx_hash for r in store.iter_gap(chain.chain_id, chain.silent)}
    assert found == chain.direct[chain.silent]
    # A second run has nothing left to do.
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "blocks",
                              "--confirmations", "0"])  # fmt: skip
    assert res.exit_code == 0 and "0 new refs" in res.stdout


def test_discover_explorer_from_env_never_prints_the_key(
    small_chain: NodeChain, tmp_path: Path, standin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    monkeypatch.setenv("GAPFILL_EXPLORER_URL", standin)
    monkeypatch.setenv("GAPFILL_EXPLORER_KEY", KEY)
    args = ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "explorer",
            "--confirmations", "0", "--contract", chain.token]  # fmt: skip
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output + res.stderr
    assert KEY not in res.output + res.stderr
    with open_store(db) as store:
        found = {r.tx_hash for r in store.iter_gap(chain.chain_id, chain.token)}
    assert found == chain.direct[chain.token] | chain.internal[chain.token]
    monkeypatch.setenv("GAPFILL_EXPLORER_KEY", "WrongKeyThatMustNotShow")
    res = runner.invoke(cli, [*args, "--from-block", "0"])
    # Everything is complete already: nothing is asked of the explorer.
    assert res.exit_code == 0
    _add(runner, db, chain, chain.silent)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "explorer",
                              "--confirmations", "0", "--contract", chain.silent])  # fmt: skip
    assert res.exit_code == 1
    assert "API key" in res.stderr
    assert "WrongKeyThatMustNotShow" not in res.output + res.stderr


def test_unknown_method_is_a_usage_error(small_chain: NodeChain, tmp_path: Path) -> None:
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "magic"])
    assert res.exit_code == 1
    assert "unknown discovery method 'magic'" in res.stderr
