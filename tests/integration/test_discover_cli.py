"""``gapfill discover`` end to end: flags, env vars, progress on stderr, no secrets printed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from engine_support import emulator

from gapfill.cli import cli
from gapfill.cli_discover import discover
from gapfill.discover.coverage import coverage_report
from gapfill.redact import redact_url
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
    # Blockscout's API: it lists the router's zero-value calls when asked, as Etherscan does not.
    api = ExplorerStandIn(small_chain.chain, key=KEY, rps=None, flavour="blockscout")
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


def test_a_method_that_skips_blocks_another_scanned_says_so(small_chain: NodeChain, tmp_path: Path) -> None:
    """`--method logs,blocks` over blocks a block scan covered: logs scans them, blocks skips
    them, and the summary names that method (it said nothing unless every method skipped)."""
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    args = ["--db", db, "--rpc-url", small_chain.url, "discover", "--confirmations", "0", "--to-block", "8"]
    assert runner.invoke(cli, [*args, "--method", "blocks"]).exit_code == 0
    res = runner.invoke(cli, [*args, "--method", "logs,blocks"])
    assert res.exit_code == 0, res.output + res.stderr
    assert "logs 9 blocks/" in res.stdout and "blocks 0 blocks/0 refs" in res.stdout, res.stdout
    assert (f"{chain.token}: blocks 0-8 already scanned for method blocks: pass --rescan to scan them "
            "again") in res.stdout, res.stdout  # fmt: skip
    # Every method skipping them: the line names none.
    res = runner.invoke(cli, [*args, "--method", "logs,blocks"])
    assert res.exit_code == 0, res.output + res.stderr
    assert (f"{chain.token}: blocks 0-8 already scanned: pass --rescan to scan them again"
            in res.stdout), res.stdout  # fmt: skip


def test_rescan_finds_refs_the_first_scan_missed(small_chain: NodeChain, db_url: str) -> None:
    """Refs deleted behind discover's back (a provider that missed logs): a plain rerun skips
    the covered blocks and says how to scan them again; --rescan finds exactly those refs."""
    chain = small_chain.chain
    runner = CliRunner()
    _add(runner, db_url, chain, chain.silent)
    args = ["--db", db_url, "--rpc-url", small_chain.url, "discover", "--method", "blocks",
            "--confirmations", "0"]  # fmt: skip
    assert runner.invoke(cli, args).exit_code == 0

    def refs() -> set[str]:
        with open_store(db_url) as store:
            return {r.tx_hash for r in store.iter_gap(chain.chain_id, chain.silent)}

    by_block = sorted(chain.direct[chain.silent], key=lambda h: (chain.tx_block[h], h))
    lost = [by_block[0], by_block[len(by_block) // 2], by_block[-1]]
    assert len({chain.tx_block[h] for h in lost}) == 3
    with open_store(db_url) as store, store._tx() as cur:
        cur.executemany(store._sql("DELETE FROM refs WHERE chain_id = ? AND contract = ? AND tx_hash = ?"),
                        [(chain.chain_id, chain.silent, h) for h in lost])  # fmt: skip
    assert refs() == chain.direct[chain.silent] - set(lost)

    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output + res.stderr
    assert "0 new refs" in res.stdout
    assert (f"{chain.silent}: blocks 0-{chain.head} already scanned: pass --rescan to scan them again"
            in res.stdout), res.stdout  # fmt: skip
    assert refs() == chain.direct[chain.silent] - set(lost)

    # A range: only the one lost ref in it comes back.
    block = chain.tx_block[lost[1]]
    res = runner.invoke(cli, [*args, "--rescan", "--from-block", str(block), "--to-block", str(block)])
    assert res.exit_code == 0, res.output + res.stderr
    # Counted as read (it said "blocks 1 blocks/...; 1 new refs; 1 RPC calls").
    assert (f"rescanned blocks {block}-{block}; blocks 1 block/" in res.stdout
            and "; 1 new ref; 1 RPC call, 0 explorer requests" in res.stdout), res.stdout  # fmt: skip
    assert "already scanned" not in res.stdout
    assert refs() == chain.direct[chain.silent] - {lost[0], lost[2]}

    # No range: the whole covered span, and nothing already there is touched or deleted.
    res = runner.invoke(cli, [*args, "--rescan"])
    assert res.exit_code == 0, res.output + res.stderr
    assert f"rescanned blocks 0-{chain.head}" in res.stdout and "; 2 new refs;" in res.stdout, res.stdout
    assert refs() == chain.direct[chain.silent]
    with open_store(db_url) as store:
        report = coverage_report(store, chain.chain_id, chain.silent, chain.head)
    assert report["partial"] == [[0, chain.head]]  # a block scan alone sees no internal call


def _two_confirmations(small_chain: NodeChain, tmp_path: Path) -> tuple[GeneratedChain, CliRunner, list[str]]:
    """The silent contract tracked in a new database, and the discover arguments with 2 confirmations."""
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, small_chain.chain, small_chain.chain.silent)
    args = ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "blocks",
            "--confirmations", "2"]  # fmt: skip
    return small_chain.chain, runner, args


def test_a_to_block_past_the_safe_head_is_capped_and_says_so(small_chain: NodeChain, tmp_path: Path) -> None:
    """--to-block above latest - confirmations is capped: said once, with the head, and how
    to go higher."""
    chain, runner, args = _two_confirmations(small_chain, tmp_path)
    safe, why = chain.head - 2, f"(latest {chain.head} - 2 confirmations)"
    res = runner.invoke(cli, [*args, "--from-block", str(safe - 1), "--to-block", str(chain.head + 10)])
    assert res.exit_code == 0, res.output + res.stderr
    assert f": blocks {safe - 1}-{safe};" in res.stdout, res.stdout
    said = f"--to-block {chain.head + 10} was capped at {safe} {why}: pass a lower --confirmations"
    assert res.stderr.count(said) == 1, res.stderr


def test_a_from_block_past_the_safe_head_says_so(small_chain: NodeChain, tmp_path: Path) -> None:
    """--from-block above latest - confirmations scans nothing, and says why: above the head,
    or within the confirmations (then how to go higher)."""
    chain, runner, args = _two_confirmations(small_chain, tmp_path)
    safe, why = chain.head - 2, f"(latest {chain.head} - 2 confirmations)"
    res = runner.invoke(cli, [*args, "--from-block", str(chain.head)])
    assert res.exit_code == 0 and "nothing to scan" in res.stdout, res.output + res.stderr
    assert f"--from-block {chain.head} is above the safe head {safe} {why}: pass a lower" in res.stderr
    res = runner.invoke(cli, [*args, "--from-block", "1000000"])
    assert res.exit_code == 0 and "nothing to scan" in res.stdout, res.output + res.stderr
    assert f"--from-block 1000000 is above the node's head ({chain.head})" in res.stderr, res.stderr


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
    # Everything is scanned by the explorer already: nothing is asked of it.
    assert res.exit_code == 0
    _add(runner, db, chain, chain.silent)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "explorer",
                              "--confirmations", "0", "--contract", chain.silent])  # fmt: skip
    assert res.exit_code == 1
    # What to do is to check the key where it was given, not to run the same command again.
    refused = (f"error: the explorer at {redact_url(standin)} refused the API key (Invalid API Key); "
               f"no chunk of {chain.silent} was finished, so nothing was kept: check {{}}, then run "
               "the same command again\n")  # fmt: skip
    assert res.stderr.endswith(refused.format("GAPFILL_EXPLORER_KEY")), res.stderr
    assert "WrongKeyThatMustNotShow" not in res.output + res.stderr
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "explorer",
                              "--confirmations", "0", "--contract", chain.silent,
                              "--explorer-key", "AnotherWrongKey"])  # fmt: skip
    assert res.exit_code == 1
    assert res.stderr.endswith(refused.format("--explorer-key")), res.stderr
    assert "AnotherWrongKey" not in res.output + res.stderr


def _explorer_fails(small_chain: NodeChain, db_file: Path, *explorer: str) -> str:
    """What ``discover --method explorer`` with ``explorer``'s options says as it fails, on
    the token tracked in a new database."""
    chain = small_chain.chain
    db = f"sqlite:///{db_file}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "explorer",
                              "--confirmations", "0", *explorer])  # fmt: skip
    assert res.exit_code == 1, res.output + res.stderr
    return res.output + res.stderr


def test_an_explorer_answering_an_http_error_mid_scan_ends_with_what_to_check(
    small_chain: NodeChain, tmp_path: Path, standin: str
) -> None:
    # A wrong path (HTTP 404) said "check --explorer-url ... and --explorer-key" mid-sentence,
    # then "run the same command again", which cannot pass: the check is now last, then the rerun.
    wrong = standin.replace("/v2/api", "/v1/api")
    said = _explorer_fails(small_chain, tmp_path / "cli.db", "--explorer-url", wrong, "--explorer-key", KEY)
    # The path shows as written (the mistyped segment was the one masked), and a 404 is
    # about the URL alone: the key's check is not named.
    assert said.endswith(
        f"error: the explorer at {wrong} answered HTTP 404 (404: Not Found); no chunk of "
        f"{small_chain.chain.token} was finished, so nothing was kept: check the path in --explorer-url "
        "(an Etherscan-compatible API such as https://api.etherscan.io/v2/api), then run the same "
        "command again\n"
    ), said
    assert KEY not in said


def test_an_explorer_key_in_the_url_or_none_is_said_as_such(
    small_chain: NodeChain, tmp_path: Path, standin: str
) -> None:
    # A key in --explorer-url said "check --explorer-key or GAPFILL_EXPLORER_KEY", neither set;
    # no key at all said "refused the API key" too.
    token = small_chain.chain.token
    in_url = f"{standin}?chainid=1&apikey=WRONGKEYZZ"
    said = _explorer_fails(small_chain, tmp_path / "in_url.db", "--explorer-url", in_url)
    assert "WRONGKEYZZ" not in said
    assert said.endswith(
        f"error: the explorer at {standin}?chainid=1&apikey=*** refused the API key in its URL (Invalid "
        f"API Key); no chunk of {token} was finished, so nothing was kept: check the apikey in "
        "--explorer-url, then run the same command again\n"
    ), said
    said = _explorer_fails(small_chain, tmp_path / "none.db", "--explorer-url", standin)
    assert said.endswith(
        f"error: the explorer at {standin} needs an API key and none was given (Missing/Invalid API Key); "
        f"no chunk of {token} was finished, so nothing was kept: pass --explorer-key, set "
        "GAPFILL_EXPLORER_KEY or set [explorer] key in gapfill.toml, then run the same command again\n"
    ), said


def test_discover_scans_the_served_chain_and_names_the_contracts_it_skips(
    small_chain: NodeChain, tmp_path: Path
) -> None:
    """One node (chain 31337) and a contract tracked on chain 5 as well: the node's chain is
    scanned, the other contract named with the fix, and the run does not end 0."""
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.silent)
    other = "0x" + "5e" * 20
    assert runner.invoke(cli, ["--db", db, "contract", "add", other, "--chain-id", "5"]).exit_code == 0
    args = ["--db", db, "--rpc-url", small_chain.url, "discover", "--method", "blocks",
            "--confirmations", "0"]  # fmt: skip
    res = runner.invoke(cli, args)
    assert res.exit_code == 3, res.output + res.stderr
    assert "Traceback" not in res.output + res.stderr
    assert (f"no endpoint (--rpc-url) serves chain 5: contract {other} skipped; give an endpoint of chain 5"
            in res.stderr), res.stderr  # fmt: skip
    assert "coverage blocks 0-" in res.stdout  # the served contract was scanned
    with open_store(db) as store:
        found = {r.tx_hash for r in store.iter_gap(chain.chain_id, chain.silent)}
        assert store.get_coverage(5, other) == []
    assert found == chain.direct[chain.silent]
    # Told to work on the served chain only, nothing is left: 0.
    res = runner.invoke(cli, [*args, "--chain-id", str(chain.chain_id)])
    assert res.exit_code == 0 and "serves chain 5" not in res.stderr, res.stderr
    # The contract on chain 5 named explicitly: nothing can be done, in one sentence.
    res = runner.invoke(cli, [*args, "--contract", other])
    assert res.exit_code == 1
    assert res.stderr.strip() == (f"error: the RPC node at {small_chain.url} serves chain "
                                  f"{chain.chain_id}, expected 5: check --rpc-url")  # fmt: skip


def test_discover_of_an_address_tracked_on_two_chains_scans_the_nodes(
    small_chain: NodeChain, tmp_path: Path
) -> None:
    """The node's contract tracked on its chain and on chain 5: `discover --contract` without
    --chain-id is not ambiguous, the node's chain decides (it used to ask for --chain-id)."""
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.silent)
    assert runner.invoke(cli, ["--db", db, "contract", "add", chain.silent, "--chain-id", "5"]).exit_code == 0
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "discover", "--contract",
                              chain.silent, "--method", "blocks", "--confirmations", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output + res.stderr
    assert "chain 5" not in res.stderr, res.stderr  # not asked for: not named
    picked = (f"{chain.silent} is tracked on chains 5, {chain.chain_id}: working on chain "
              f"{chain.chain_id}, the RPC node's chain\n")  # fmt: skip
    assert res.stderr.count(picked) == 1, res.stderr  # the choice made for the user is said once
    with open_store(db) as store:
        found = {r.tx_hash for r in store.iter_gap(chain.chain_id, chain.silent)}
        assert store.get_coverage(5, chain.silent) == []
    assert found == chain.direct[chain.silent]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["discover", "discover, from the config file", "contract add",
                                 "enrich --retry-failed"])
def test_a_stalled_node_is_given_up_after_the_commands_own_rpc_timeout(
    small_chain: NodeChain, tmp_path: Path, how: str
) -> None:
    """The sentence for a node that does not answer says "raise --rpc-timeout": every
    command that can say it has the option, and the config file's rpc_timeout_s (which it
    names when the file set it)."""
    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.silent)
    if how == "enrich --retry-failed":  # a failure to put back: with none, it has nothing to ask
        from gapfill.model import Enriched, Failure

        tx = min(chain.direct[chain.silent])
        res = runner.invoke(cli, ["--db", db, "import", "-", "--contract", chain.silent], input=tx)
        assert res.exit_code == 0, res.stderr
        failed = Failure(chain.chain_id, tx, chain.silent, "permanent", "rejected")
        with open_store(db) as store:
            store.write(Enriched(failures=[failed]))
    config = tmp_path / "gapfill.toml"
    config.write_text("[enrich]\nrpc_timeout_s = 1\n")
    command = {"discover": ["discover", "--rpc-timeout", "1"],
               "discover, from the config file": ["--config", str(config), "discover"],
               "contract add": ["contract", "add", "0x" + "cd" * 20, "--rpc-timeout", "1"],
               # It asks the node before putting the failures back.
               "enrich --retry-failed": ["enrich", "--retry-failed", "--rpc-timeout", "1"]}[how]  # fmt: skip
    with emulator(small_chain.url, "--p-stall", "1.0") as (url, _):
        res = runner.invoke(cli, ["--db", db, "--rpc-url", url, *command])
    assert res.exit_code == 1, res.output + res.stderr
    # 1 s, not the default 30 s, per try; the file's key named when the file gave it.
    raise_ = f"[enrich] rpc_timeout_s in {config}" if "config" in how else "--rpc-timeout"
    assert res.stderr.strip() == (
        f"error: eth_chainId failed: no response within 1 s (at {url}, after 3 attempts); "
        f"the node does not answer: check that it is not stuck or overloaded, or raise {raise_}"
    )


def _sparse_transfers(anvil: Any, target: str) -> list[str]:
    """Three transfers to ``target``, one every ~500 blocks (a block scan's chunks are 50)."""
    sender = anvil.request("eth_accounts")[0]
    sent = []
    for _ in range(3):
        sent.append(anvil.request("eth_sendTransaction", {"from": sender, "to": target, "value": "0x1"}))
        anvil.request("anvil_mine", "0x1f4")
    return sent


def test_ctrl_c_says_what_discovery_kept_and_a_rerun_finishes(anvil: Any, tmp_path: Path) -> None:
    # It said only "interrupted": not whether anything found was kept, or what to do next.
    import os
    import re
    import signal

    from engine_support import GapfillProc, gapfill, wait_for

    from gapfill.discover.coverage import fmt_ranges, merge, size

    target = "0x" + "be" * 20
    sent = _sparse_transfers(anvil, target)
    block_of = {tx: int(anvil.request("eth_getTransactionReceipt", tx)["blockNumber"], 16) for tx in sent}
    head = int(anvil.request("eth_blockNumber"), 16)
    db = f"sqlite:///{tmp_path / 'd.db'}"
    assert gapfill(["--db", db, "contract", "add", target, "--chain-id", "31337"], tmp_path, "add")[0] == 0
    args = ["discover", "--method", "blocks", "--confirmations", "0"]
    # 2 s a request: a chunk's 50 blocks are one batch, 4 chunks in flight; 8 rounds in all.
    with emulator(anvil.url, "--latency-s", "2") as (slow_url, _):
        p = GapfillProc(["--db", db, "--rpc-url", slow_url, *args], tmp_path, "discover")
        try:
            wait_for("a committed chunk", lambda: " found, " in p.err_path.read_text(), 120, proc=p)
            os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl+C
            assert p.wait(60) == 130, p.output()
        finally:
            p.close()
    err = p.err_path.read_text()
    assert "Traceback" not in err, err
    said = re.fullmatch(r"interrupted: ([\d,]+) blocks? \(([-\d, ]+)\) of (0x[0-9a-f]{40}) were scanned and "
                        r"kept(?:, with the (\d+) new refs? found in them| \(no new ref in them\)): run the "
                        r"same command again to continue where it stopped", err.splitlines()[-1])  # fmt: skip
    assert said is not None, err
    with open_store(db) as store:
        covered = merge((c.from_block, c.to_block) for c in store.get_coverage(31337, target))
        refs = {r.tx_hash for r in store.iter_gap(31337, target)}
    # Whole chunks: the refs of exactly the blocks covered, as many as said, and which.
    assert 0 < size(covered) == int(said.group(1).replace(",", "")) < head + 1
    assert said.group(2) == fmt_ranges(covered) and said.group(3) == target, err
    assert refs == {h for h, b in block_of.items() if any(lo <= b <= hi for lo, hi in covered)}
    assert len(refs) == int(said.group(4) or 0)
    rc, out = gapfill(["--db", db, "--rpc-url", anvil.url, *args], tmp_path, "again")
    assert rc == 0, out
    with open_store(db) as store:
        assert {r.tx_hash for r in store.iter_gap(31337, target)} == set(block_of)



@pytest.mark.parametrize("answered", [2, 12])
def test_a_node_failing_mid_scan_says_what_was_kept_and_a_rerun_scans_the_rest(
    anvil: Any, db_url: str, answered: int
) -> None:
    """The error of a node that dies mid-scan said only what failed: not that the chunks
    done were kept, nor that a rerun continues. ``answered`` requests are answered (the
    start-up check and the head, then a chunk a request), the rest get HTTP 503."""
    import re

    from gapfill.discover.coverage import fmt_ranges, merge, size

    target = "0x" + "be" * 20
    sent = _sparse_transfers(anvil, target)
    head = int(anvil.request("eth_blockNumber"), 16)
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db_url, "contract", "add", target, "--chain-id", "31337"])
    assert res.exit_code == 0, res.output
    args = ["discover", "--method", "blocks", "--confirmations", "0"]
    with emulator(anvil.url, "--fail-status", "503", "--fail-status-after", str(answered)) as (url, _):
        res = runner.invoke(cli, ["--db", db_url, "--rpc-url", url, *args])
    assert res.exit_code == 1, res.output
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("error: eth_getBlockByNumber failed for block ") and "HTTP 503" in error, error
    with open_store(db_url) as store:
        covered = merge((c.from_block, c.to_block) for c in store.get_coverage(31337, target))
        refs = {r.tx_hash for r in store.iter_gap(31337, target)}
    if answered == 2:  # no chunk got its answer
        assert not covered and not refs
        assert error.endswith(f"; no chunk of {target} was finished, so nothing was kept: run the same "
                              "command again"), error  # fmt: skip
    else:
        assert 0 < size(covered) < head + 1
        found = f", with the {len(refs)} new ref{'' if len(refs) == 1 else 's'} found in them" if refs else (
            " (no new ref in them)")
        assert error.endswith(
            f"; {size(covered):,} blocks ({fmt_ranges(covered)}) of {target} were scanned and kept{found}: "
            "run the same command again to continue where it stopped"
        ), error
    # The rerun scans only the blocks not kept, and finds every transaction.
    res = runner.invoke(cli, ["--db", db_url, "--rpc-url", anvil.url, *args])
    assert res.exit_code == 0, res.output
    summary = re.search(r"; blocks ([\d,]+) blocks?/", res.stdout)
    assert summary is not None, res.stdout
    assert int(summary.group(1).replace(",", "")) == head + 1 - size(covered)
    if covered:
        assert f"blocks {fmt_ranges(covered)} already scanned" in res.stdout
    with open_store(db_url) as store:
        assert {r.tx_hash for r in store.iter_gap(31337, target)} == set(sent)


@pytest.mark.parametrize(("answered", "given"), [(2, "--rpc-url"), (12, "ETH_RPC_URL"), (12, "file")])
def test_a_key_the_node_refuses_mid_scan_ends_with_where_to_fix_it(
    anvil: Any, db_url: str, tmp_path: Path, answered: int, given: str
) -> None:
    """A node refusing its key mid-scan (HTTP 401) said "check the API key in --rpc-url" in
    the middle and ended "run the same command again", which cannot pass: it now says what
    was kept, then where the URL came from, then the rerun. ``answered`` as above."""
    from gapfill.discover.coverage import fmt_ranges, merge, size

    target = "0x" + "be" * 20
    _sparse_transfers(anvil, target)
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db_url, "contract", "add", target, "--chain-id", "31337"])
    assert res.exit_code == 0, res.output
    key = "r3v0k3dN0d3K3y0123456789"
    args = ["discover", "--method", "blocks", "--confirmations", "0"]
    flags = ("--fail-status", "401", "--fail-status-after", str(answered), "--path", f"/v3/{key}")
    config = tmp_path / "gapfill.toml"
    with emulator(anvil.url, *flags) as (url, _):
        if given == "file":
            config.write_text(f'[[endpoints]]\nurl = "{url}"\n')
            res = runner.invoke(cli, ["--db", db_url, "--config", str(config), *args])
        elif given == "ETH_RPC_URL":
            res = runner.invoke(cli, ["--db", db_url, *args], env={"ETH_RPC_URL": url})
        else:
            res = runner.invoke(cli, ["--db", db_url, "--rpc-url", url, *args])
    assert res.exit_code == 1, res.output
    assert key not in res.output + res.stderr, res.stderr
    error = res.stderr.strip().splitlines()[-1]
    assert error.startswith("error: eth_getBlockByNumber failed for block "), error
    shown = url.replace(key, "***")
    assert (f": the RPC node at {shown} refused the request (HTTP 401); " in error
            and error.count("check the API key") == 1), error  # fmt: skip
    with open_store(db_url) as store:
        covered = merge((c.from_block, c.to_block) for c in store.get_coverage(31337, target))
        refs = {r.tx_hash for r in store.iter_gap(31337, target)}
    check = {"file": f"[[endpoints]] url in {config}"}.get(given, given)
    if answered == 2:
        assert error.endswith(f"; no chunk of {target} was finished, so nothing was kept: check the API key "
                              f"in {check}, then run the same command again"), error  # fmt: skip
    else:
        assert size(covered) > 0, error
        found = f", with the {len(refs)} new ref{'' if len(refs) == 1 else 's'} found in them" if refs else (
            " (no new ref in them)")
        assert error.endswith(
            f"; {size(covered):,} blocks ({fmt_ranges(covered)}) of {target} were scanned and kept{found}: "
            f"check the API key in {check}, then run the same command again to continue where it stopped"
        ), error


def test_method_explorer_without_an_explorer_names_every_way_to_give_one(
    anvil: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config file's [explorer] url works as well as the option and its variable, so the
    message names it: the file read, else ./gapfill.toml, the one that would be."""
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    address = "0x" + "ab" * 20
    res = runner.invoke(cli, ["--db", db, "contract", "add", address, "--chain-id", "31337"])
    assert res.exit_code == 0, res.output
    monkeypatch.chdir(tmp_path)  # no ./gapfill.toml here
    args = ["--db", db, "--rpc-url", anvil.url, "discover", "--method", "logs,Explorer"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        "error: --method explorer needs an explorer: pass --explorer-url, set GAPFILL_EXPLORER_URL "
        "or set [explorer] url in gapfill.toml"
    ), res.stderr
    cfg = tmp_path / "mine.toml"
    cfg.write_text("[enrich]\nworkers = 2\n")
    res = runner.invoke(cli, ["--config", str(cfg), *args])
    assert res.exit_code == 1
    assert f"or set [explorer] url in {cfg}" in res.stderr, res.stderr
    # A key with no URL is told the same ways.
    cfg.write_text('[explorer]\nkey = "k"\n')
    res = runner.invoke(cli, ["--config", str(cfg), *args])
    assert res.exit_code == 1
    assert (f"an explorer key is set ([explorer] key in {cfg}) but no URL: pass --explorer-url, "
            f"set GAPFILL_EXPLORER_URL or set [explorer] url in {cfg}") in res.stderr, res.stderr  # fmt: skip


def test_an_explorer_error_quoting_its_request_never_shows_the_key(
    small_chain: NodeChain, tmp_path: Path, standin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library's exception or log record may quote the request's URL, apikey= and all:
    the CLI's net masks the explorer's key (short ones too) and URL, with -v's traceback."""
    import logging

    from gapfill.cli import _StderrLog
    from gapfill.discover.explorer import ExplorerClient

    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    key = "Ky7"  # as short as a key is masked

    async def fails(self: ExplorerClient, params: dict[str, str]) -> Any:
        asked = f"{self.config.url}?module=account&apikey={self.config.key}"
        logging.getLogger("aiohttp.client").error("GET %s: server disconnected", asked)
        raise RuntimeError(f"{asked}: server disconnected")

    monkeypatch.setattr(ExplorerClient, "request", fails)
    handler = _StderrLog()  # the CLI's, as pytest's own handlers keep basicConfig from adding it
    monkeypatch.setattr("gapfill.cli._log_to_stderr", lambda verbose: handler)
    logging.getLogger().addHandler(handler)
    try:
        res = runner.invoke(cli, ["-v", "--db", db, "--rpc-url", small_chain.url, "discover", "--method",
                                  "explorer", "--explorer-url", f"{standin}?token=Ky7", "--explorer-key", key,
                                  "--confirmations", "0", "--contract", chain.token])  # fmt: skip
    finally:
        logging.getLogger().removeHandler(handler)
    said = res.output + res.stderr
    assert res.exit_code == 1, said
    assert "internal error (RuntimeError:" in res.stderr and "server disconnected" in said, said
    assert "apikey=***" in said and key not in said, said


@pytest.mark.parametrize("method", [None, "logs"])
def test_a_node_without_eth_getlogs_is_said_up_front_in_one_sentence(
    small_chain: NodeChain, tmp_path: Path, method: str | None
) -> None:
    """It split the range down to one block on the node's "method not found", then blamed that
    block: "eth_getLogs failed for blocks 24-24: no RPC endpoint serves eth_getLogs"."""
    from engine_support import emulator_stats

    chain = small_chain.chain
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()
    _add(runner, db, chain, chain.token)
    missing = "eth_getLogs,trace_filter,ots_searchTransactionsAfter,ots_getApiLevel"
    with emulator(small_chain.url, "--missing-methods", missing) as (url, _):
        res = runner.invoke(cli, ["--db", db, "--rpc-url", url, "discover", "--confirmations", "0",
                                  *(["--method", method] if method else [])])  # fmt: skip
        asked = emulator_stats(url)["methods"].get("eth_getLogs", 0)
    assert res.exit_code == 1, res.output + res.stderr
    which, instead = (("discover's default methods (logs,blocks) use", "pass --method blocks to scan "
                       "without it") if method is None else
                      ("the logs discovery method uses", "pick another method with --method (blocks, "
                       "trace, explorer)"))  # fmt: skip
    assert res.stderr == (f"error: the RPC node ({url}) does not serve eth_getLogs, which {which}: "
                          f"point --rpc-url at another node, or {instead}\n")  # fmt: skip
    # Asked twice (the start-up check believes "method not found" when a second request
    # says it too), not once per halving of the range.
    assert asked == 2
    with open_store(db) as store:
        assert store.get_coverage(chain.chain_id, chain.token) == []


def test_verbose_discover_logs_every_chunk_once(anvil: Any, tmp_path: Path) -> None:
    """-v said nothing of discovery itself (the endpoint line alone), and the progress line
    comes at most once a second: -v now names every chunk committed, once, with its refs."""
    import re

    from engine_support import gapfill

    target = "0x" + "be" * 20
    sender = anvil.request("eth_accounts")[0]
    for _ in range(2):  # a transfer to the target, then 100 empty blocks
        anvil.request("eth_sendTransaction", {"from": sender, "to": target, "value": "0x1"})
        anvil.request("anvil_mine", "0x64")
    head = int(anvil.request("eth_blockNumber"), 16)
    db = f"sqlite:///{tmp_path / 'd.db'}"
    assert gapfill(["--db", db, "contract", "add", target, "--chain-id", "31337"], tmp_path, "add")[0] == 0
    rc, out = gapfill(["--db", db, "--rpc-url", anvil.url, "-v", "discover", "--method", "logs,blocks",
                       "--confirmations", "0"], tmp_path, "discover")  # fmt: skip
    assert rc == 0, out
    err = (tmp_path / "discover.err").read_text()
    said = re.findall(rf" INFO gapfill\.discover\.run: discover {target}: blocks (\d+)-(\d+) scanned with "
                      r"logs,blocks: (\d+) refs?, (\d+) new$", err, re.MULTILINE)  # fmt: skip
    spans = sorted((int(lo), int(hi)) for lo, hi, _, _ in said)
    # Chunks of 50 blocks (a block scan runs), each said once: together exactly 0..head.
    assert spans == [(lo, min(lo + 49, head)) for lo in range(0, head + 1, 50)], err
    assert sum(int(n) for _, _, n, _ in said) == sum(int(n) for _, _, _, n in said) == 2, err
    assert " DEBUG " not in err  # -v is INFO


def test_more_confirmations_than_blocks_says_so_without_a_negative_head(
    small_chain: NodeChain, tmp_path: Path
) -> None:
    """A young chain (anvil, a new testnet) under the default 12 confirmations, or a huge
    --confirmations: it said "the start block 0 is above the safe head -994988 (latest ...)"."""
    chain, runner, args = _two_confirmations(small_chain, tmp_path)
    res = runner.invoke(cli, [*args, "--confirmations", str(chain.head + 7)])
    assert res.exit_code == 0 and "nothing to scan" in res.stdout, res.output + res.stderr
    assert res.stderr.splitlines()[-1] == (f"no block is {chain.head + 7} confirmations deep yet (the node's "
                                           f"head is {chain.head}): pass a lower --confirmations to scan "
                                           "closer to the head")  # fmt: skip
    assert "-7" not in res.stderr, res.stderr


def test_a_to_block_below_the_start_block_says_so(small_chain: NodeChain, tmp_path: Path) -> None:
    """It scanned nothing, said "nothing to scan below the safe head" (not why), and exited 0."""
    chain, runner, args = _two_confirmations(small_chain, tmp_path)
    db = args[1]
    res = runner.invoke(cli, ["--db", db, "contract", "add", chain.silent, "--chain-id", str(chain.chain_id),
                              "--start-block", "10"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*args, "--to-block", "4"])
    assert res.exit_code == 0 and "nothing to scan" in res.stdout, res.output + res.stderr
    assert res.stderr.splitlines() == [
        f"discover {chain.silent}: nothing to scan",
        "--to-block 4 is below the start block 10: nothing to scan; pass --from-block to scan below the "
        "start block",
    ], res.stderr


def test_blocks_scanned_below_the_start_block_show_in_the_summary_and_status(
    small_chain: NodeChain, tmp_path: Path
) -> None:
    # As the tool advises ("pass --from-block"): its coverage was stored, but the summary and
    # status showed the blocks from the start block on only.
    chain, runner, args = _two_confirmations(small_chain, tmp_path)
    db = args[1]
    res = runner.invoke(cli, ["--db", db, "contract", "add", chain.silent, "--chain-id", str(chain.chain_id),
                              "--start-block", "10"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*args, "--from-block", "3", "--to-block", "5"])
    assert res.exit_code == 0, res.output + res.stderr
    also = "3 blocks below the start block 10 scanned too (3-5)"
    assert f"{chain.silent}: coverage " in res.stdout and also in res.stdout, res.stdout
    res = runner.invoke(cli, ["--db", db, "--rpc-url", small_chain.url, "status"])
    assert res.exit_code == 0 and also in res.stdout, res.output + res.stderr


def test_a_contract_removed_mid_discovery_is_not_said_kept_nor_asked_to_run_again(
    anvil: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`contract remove` while `discover` scans it deletes what the scan committed, and the next
    commit fails. The error said both "nothing was written" and "50 blocks ... were scanned and
    kept: run the same command again to continue where it stopped", and that rerun can only
    fail ("not tracked"): what was kept went with the contract."""
    from gapfill.store.base import Store

    target = "0x" + "be" * 20
    anvil.request("anvil_mine", hex(400))
    db = f"sqlite:///{tmp_path / 'd.db'}"
    runner = CliRunner()
    res = runner.invoke(cli, ["--db", db, "contract", "add", target, "--chain-id", "31337"])
    assert res.exit_code == 0, res.output
    original = Store.add_refs_and_coverage
    calls: list[int] = []

    def removed_after_the_first(self: Store, refs: Any, ranges: Any) -> int:
        calls.append(1)
        if len(calls) == 2:  # as `gapfill contract remove` in another terminal would
            self.remove_contract(31337, target)
        return original(self, refs, ranges)

    monkeypatch.setattr(Store, "add_refs_and_coverage", removed_after_the_first)
    res = runner.invoke(cli, ["--db", db, "--rpc-url", anvil.url, "discover", "--method", "blocks"])
    assert res.exit_code == 1, res.output
    error = res.stderr.strip().splitlines()[-1]
    assert "no longer tracked" in error, error
    assert "kept" not in error and "run the same command again" not in error, error


def test_a_log_scan_beside_a_finished_block_scan_keeps_its_wide_windows(anvil: Any, tmp_path: Path) -> None:
    """`--method logs,blocks` over blocks a block scan already covered: the block scan has
    nothing to do, yet its empty plan made the log scan go in 50-block chunks, one
    eth_getLogs each (1,000 blocks: 20 calls instead of 1; mainnet's 20M: 400,000)."""
    target = "0x" + "be" * 20
    anvil.request("anvil_mine", hex(1000))
    db = f"sqlite:///{tmp_path / 'd.db'}"
    runner = CliRunner()
    base = ["--db", db, "--rpc-url", anvil.url]
    assert runner.invoke(cli, ["--db", db, "contract", "add", target, "--chain-id", "31337"]).exit_code == 0
    res = runner.invoke(cli, [*base, "discover", "--method", "blocks", "--to-block", "999"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*base, "discover", "--method", "logs,blocks", "--to-block", "999"])
    assert res.exit_code == 0, res.output
    # One 2,000-block window covers the 1,000, as with `--method logs` alone: its eth_getLogs
    # and the eth_getBlockByNumber that shows the node has its last block.
    assert "; 2 RPC calls, " in res.stdout, res.stdout


def test_a_node_that_stops_answering_mid_log_scan_is_said_to_not_answer(anvil: Any, tmp_path: Path) -> None:
    """A node that answers the start-up checks, then nothing at all (an outage, a proxy gone):
    every eth_getLogs window that timed out was halved, down to one block, each half waiting
    out every try (--rpc-timeout 1: 73 s; the default 30 s: ~20 silent minutes), and the
    error blamed block 0 ("eth_getLogs failed for blocks 0-0 ...: pick another discovery
    method"). One split is tried (a range too wide looks the same), then it says the node
    does not answer."""
    target = "0x" + "be" * 20
    anvil.request("anvil_mine", hex(300))
    db = f"sqlite:///{tmp_path / 'd.db'}"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db, "contract", "add", target, "--chain-id", "31337"]).exit_code == 0
    # The first eth_getLogs (discover's one-block check that the node serves it) is
    # answered; every request after it waits, unanswered.
    with emulator(anvil.url, "--hold-at", "eth_getLogs:1") as (url, _):
        res = runner.invoke(cli, ["--db", db, "--rpc-url", url, "discover", "--method", "logs",
                                  "--rpc-timeout", "1"])  # fmt: skip
    assert res.exit_code == 1, res.output
    error = res.stderr.strip().splitlines()[-1]
    # One split (a window of 289 blocks, then halves of it), not one per halving down to a block.
    assert "eth_getLogs got no answer for blocks 0-143: " in error, error
    assert ("the node does not answer: check that it is not stuck or overloaded, or raise --rpc-timeout"
            in error and "pick another discovery method" not in error), error
