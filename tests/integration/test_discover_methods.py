"""Discovery against a real node (anvil): each method finds exactly what it can see."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gapfill.discover.coverage import coverage_report
from gapfill.discover.explorer import ExplorerConfig
from gapfill.discover.run import DiscoverProgress, DiscoverSettings, DiscoverSummary, discover
from gapfill.discover.trace import OTS_SEARCH, TRACE_FILTER
from gapfill.model import Contract
from gapfill.rpc import EndpointConfig, RpcClient
from gapfill.store import Store, open_store
from gapfill.testing.chain import GeneratedChain
from gapfill.testing.emulator import EmulatorConfig, ProviderEmulator
from gapfill.testing.explorer_standin import ExplorerStandIn

# `small_chain` yields conftest.NodeChain(node, chain); conftest is not importable.
NodeChain = Any

FAST = DiscoverSettings(block_chunk_blocks=5, concurrency=3)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with open_store(f"sqlite:///{tmp_path / 'd.db'}") as s:
        yield s


def _track(store: Store, chain: GeneratedChain) -> list[Contract]:
    out = []
    for address in (chain.token, chain.silent, chain.router):
        c = Contract(chain.chain_id, address, start_block=0)
        store.add_contract(c)
        out.append(c)
    return out


def _refs(store: Store, contract: Contract) -> dict[str, str]:
    return {r.tx_hash: r.source for r in store.iter_gap(contract.chain_id, contract.address)}


def _refs_blocks(store: Store, contract: Contract) -> dict[str, int | None]:
    return {r.tx_hash: r.block_number for r in store.iter_gap(contract.chain_id, contract.address)}


async def _discover(store: Store, url: str, contract: Contract, **kw: object) -> DiscoverSummary:
    async with RpcClient([EndpointConfig(url)]) as client:
        kw.setdefault("confirmations", 0)
        kw.setdefault("settings", FAST)
        return await discover(store, client, contract, **kw)  # type: ignore[arg-type]


def _expected(chain: GeneratedChain, method: str, address: str) -> frozenset[str]:
    if method == "logs":
        return chain.emitted[address]
    if method == "blocks":
        return chain.direct[address]
    # Traces also see the frame that created the contract (explorers list its transaction).
    return chain.direct[address] | chain.internal[address] | {chain.deploy_txs[address]}


class _Stop(Exception):
    """Raised by a progress callback: discovery interrupted at a known commit, as by Ctrl+C."""


def _stop_at(chunks: int) -> Callable[[DiscoverProgress], None]:
    """A progress callback that raises :class:`_Stop` once ``chunks`` commits are reported."""
    seen = 0

    def on_progress(p: DiscoverProgress) -> None:
        nonlocal seen
        seen += p.event == "chunk"
        if seen == chunks:
            raise _Stop

    return on_progress


@pytest.mark.parametrize(
    ("method", "backends"),
    [("logs", None), ("blocks", None), ("trace", (TRACE_FILTER,)), ("trace", (OTS_SEARCH,))],
)
async def test_each_rpc_method_finds_exactly_what_it_sees(
    small_chain: NodeChain, store: Store, method: str, backends: tuple[str, ...] | None
) -> None:
    chain = small_chain.chain
    settings = FAST if backends is None else DiscoverSettings(block_chunk_blocks=5, trace_backends=backends,
                                                              ots_page_size=20)  # fmt: skip
    for contract in _track(store, chain):
        summary = await _discover(store, small_chain.url, contract, methods=[method], settings=settings)
        found = _refs_blocks(store, contract)
        assert set(found) == _expected(chain, method, contract.address), (method, contract.address)
        assert all(found[h] == chain.tx_block[h] for h in found)
        assert set(_refs(store, contract).values()) <= {method}
        report = coverage_report(store, chain.chain_id, contract.address, chain.head)
        assert report["unscanned"] == []
        if method in ("logs", "blocks"):  # each misses what the other sees
            assert report["partial"] == [[0, chain.head]] and report["complete"] == []
        else:
            assert report["complete"] == [[0, chain.head]] and report["partial"] == []
        if backends is not None:
            assert summary.trace_backend == backends[0]
    # The sets differ, so "exactly" means something on this chain.
    assert chain.internal[chain.silent] and chain.reverted & chain.direct[chain.silent]


async def test_explorer_finds_what_the_standin_serves(small_chain: NodeChain, store: Store) -> None:
    chain = small_chain.chain
    # A small result window makes the walk restart at the last block seen several times.
    # Blockscout's API, asked for zero-value internal calls (the router's carry no ETH).
    standin = ExplorerStandIn(chain, key="sekrit-key", rps=None, max_window=200, flavour="blockscout")
    async with standin as api:
        config = ExplorerConfig(api.url, key="sekrit-key", rps=1000, page_size=50, max_window=200)
        for contract in _track(store, chain):
            summary = await _discover(store, small_chain.url, contract, methods=["explorer"],
                                      explorer=config)  # fmt: skip
            assert set(_refs(store, contract)) == chain.direct[contract.address] | chain.internal[
                contract.address]
            assert summary.explorer_requests > 0
        assert any(page > 1 for _, _, _, page, _ in api.stats.queries)
        restarts = {start for action, start, *_ in api.stats.queries if action == "txlist"}
        assert len(restarts) > 2  # walked forward by startblock past the 200-row window
        assert api.stats.window_refused == 0
    # An explorer may list no zero-value internal call: alone, its coverage is partial.
    report = coverage_report(store, chain.chain_id, chain.token, chain.head)
    assert report["partial"] == [[0, chain.head]] and report["complete"] == []


async def test_an_explorer_without_trace_is_paired_with_logs(small_chain: NodeChain, store: Store) -> None:
    """Etherscan lists no internal call that carries no ETH: the router's calls to the token
    were missed, yet the blocks counted complete, and a later `--method logs` skipped them.
    The explorer's coverage now stands for what it lists, and the default set without trace
    is logs and the explorer: the token's Transfer events find those calls."""
    chain = small_chain.chain
    token, silent, _ = _track(store, chain)
    async with ExplorerStandIn(chain, rps=None) as api:
        config = ExplorerConfig(api.url, rps=1000)
        await _discover(store, small_chain.url, token, methods=["explorer"], explorer=config)
        assert set(_refs(store, token)) == chain.direct[chain.token]  # no router call
        assert coverage_report(store, chain.chain_id, chain.token, chain.head)["complete"] == []
        logs = await _discover(store, small_chain.url, token, methods=["logs"])
        assert logs.blocks_scanned == {"logs": chain.head + 1} and logs.already_scanned == {}
        assert set(_refs(store, token)) == chain.direct[chain.token] | chain.emitted[chain.token]
        assert chain.internal[chain.token] - chain.direct[chain.token] <= set(_refs(store, token))
        report = coverage_report(store, chain.chain_id, chain.token, chain.head)
        assert report["complete"] == [[0, chain.head]]

        settings = DiscoverSettings(block_chunk_blocks=5, trace_backends=())
        summary = await _discover(store, small_chain.url, silent, explorer=config, settings=settings)
        assert summary.methods == ("logs", "explorer")
        assert set(_refs(store, silent)) == chain.direct[chain.silent] | chain.emitted[chain.silent]
        report = coverage_report(store, chain.chain_id, chain.silent, chain.head)
        assert report["complete"] == [[0, chain.head]]


async def test_explorer_covers_only_what_it_has_indexed(small_chain: NodeChain, store: Store) -> None:
    chain = small_chain.chain
    contract = _track(store, chain)[0]
    async with ExplorerStandIn(chain, rps=None, head=chain.head - 4) as api:
        summary = await _discover(store, small_chain.url, contract, methods=["explorer"],
                                  explorer=ExplorerConfig(api.url, rps=1000))  # fmt: skip
    # Said where a user sees it (a warning log was not, at the CLI's default level).
    assert summary.text.splitlines()[-1] == (
        f"{chain.token}: the explorer has indexed up to block {chain.head - 4} only: blocks "
        f"{chain.head - 3}-{chain.head} are left unscanned; run discover again once it has caught up")
    report = coverage_report(store, chain.chain_id, chain.token, chain.head)
    assert report["partial"] == [[0, chain.head - 4]]
    assert report["unscanned"] == [[chain.head - 3, chain.head]]


async def test_explorer_waits_out_rate_limits(small_chain: NodeChain, store: Store) -> None:
    chain = small_chain.chain
    contract = _track(store, chain)[1]  # silent
    async with ExplorerStandIn(chain, rps=8, flavour="blockscout") as api:
        config = ExplorerConfig(api.url, rps=1000, page_size=40, rate_limit_backoff_s=0.25)
        await _discover(store, small_chain.url, contract, methods=["explorer"], explorer=config)
        assert api.stats.rate_limited > 0
    assert set(_refs(store, contract)) == chain.direct[chain.silent] | chain.internal[chain.silent]


async def test_default_methods_find_every_tx_sent_to_the_contract(
    small_chain: NodeChain, db_url: str
) -> None:
    chain = small_chain.chain
    with open_store(db_url) as store:
        for contract in _track(store, chain):
            summary = await _discover(store, small_chain.url, contract)
            assert summary.methods == ("trace",)
            assert set(_refs(store, contract)) >= chain.direct[contract.address]


async def test_default_without_trace_is_logs_and_blocks(small_chain: NodeChain, db_url: str) -> None:
    chain = small_chain.chain
    with open_store(db_url) as store:
        for contract in _track(store, chain):
            summary = await _discover(store, small_chain.url, contract,
                                      settings=DiscoverSettings(block_chunk_blocks=5, trace_backends=()))
            assert summary.methods == ("logs", "blocks")
            found = set(_refs(store, contract))
            assert found == chain.direct[contract.address] | chain.emitted[contract.address]
            report = coverage_report(store, chain.chain_id, contract.address, chain.head)
            assert report["complete"] == [[0, chain.head]]
            # A rerun finds nothing left to scan.
            again = await _discover(store, small_chain.url, contract,
                                    settings=DiscoverSettings(block_chunk_blocks=5, trace_backends=()))
            assert again.rpc_calls == 0 and again.chunks == 0


@pytest.mark.parametrize("hint", [True, False])
@pytest.mark.parametrize("limit", ["range", "results"])
async def test_log_ranges_split_when_the_node_refuses(
    small_chain: NodeChain, store: Store, hint: bool, limit: str
) -> None:
    chain = small_chain.chain
    token = _track(store, chain)[0]
    config = (EmulatorConfig(max_log_range=3, log_hint=hint) if limit == "range"
              else EmulatorConfig(max_log_results=120, log_hint=hint))  # fmt: skip
    settings = DiscoverSettings(range_chunk_blocks=1_000, initial_window_blocks=64)
    async with ProviderEmulator(small_chain.url, config) as emu:
        await _discover(store, emu.url, token, methods=["logs"], settings=settings)
        refused = emu.stats.faults["log_range" if limit == "range" else "log_results"]
    assert refused > 0
    assert set(_refs(store, token)) == chain.emitted[chain.token]
    assert coverage_report(store, chain.chain_id, chain.token, chain.head)["partial"] == [[0, chain.head]]


async def test_interrupted_discovery_resumes_where_it_stopped(
    small_chain: NodeChain, db_url: str
) -> None:
    chain = small_chain.chain
    settings = DiscoverSettings(block_chunk_blocks=2, concurrency=2, trace_backends=())
    with open_store(db_url) as store:
        silent = _track(store, chain)[1]
        with pytest.raises(_Stop):
            await _discover(store, small_chain.url, silent, settings=settings, on_progress=_stop_at(3))
        report = coverage_report(store, chain.chain_id, chain.silent, chain.head)
        done = sum(hi - lo + 1 for lo, hi in report["complete"])
        assert 0 < done < chain.head + 1
        assert report["partial"] == []
        assert report["unscanned"]
        left = chain.head + 1 - done
        again = await _discover(store, small_chain.url, silent, settings=settings)
        # Only the blocks not yet complete are fetched again (one block call each, one
        # log window per chunk at most, with the call that shows the node has its last block).
        assert again.blocks_scanned["blocks"] == left
        assert left <= again.rpc_calls <= left + 2 * again.chunks
        assert set(_refs(store, silent)) == chain.direct[chain.silent] | chain.emitted[chain.silent]
        final = coverage_report(store, chain.chain_id, chain.silent, chain.head)
        assert final["complete"] == [[0, chain.head]] and final["unscanned"] == []


async def test_a_commit_finishing_after_a_cancel_is_reported(small_chain: NodeChain, store: Store) -> None:
    # Ctrl+C cancels discovery while a chunk's commit runs in its thread: the thread commits
    # anyway, and it was not reported, so "interrupted: N blocks ... are committed" said less
    # than the database held.
    import asyncio
    import threading

    chain = small_chain.chain
    silent = _track(store, chain)[1]
    started, release = threading.Event(), threading.Event()
    real = store.add_refs_and_coverage

    def slow_commit(*args: Any) -> int:
        started.set()
        release.wait(30)
        return real(*args)

    store.add_refs_and_coverage = slow_commit  # type: ignore[method-assign]
    seen: list[DiscoverProgress] = []
    settings = DiscoverSettings(block_chunk_blocks=chain.head + 1, concurrency=1, trace_backends=())
    task = asyncio.ensure_future(_discover(store, small_chain.url, silent, methods=["blocks"],
                                           settings=settings, on_progress=seen.append))  # fmt: skip
    assert await asyncio.to_thread(started.wait, 30)
    task.cancel()
    await asyncio.sleep(0)  # the cancel reaches the commit, which waits for its thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [p.event for p in seen] == ["start", "chunk"]
    assert seen[-1].blocks_done == chain.head + 1 and seen[-1].new_refs == len(_refs(store, silent)) > 0


async def test_nothing_above_latest_minus_confirmations_is_covered(
    small_chain: NodeChain, store: Store
) -> None:
    chain = small_chain.chain
    token = _track(store, chain)[0]
    summary = await _discover(store, small_chain.url, token, methods=["blocks"], confirmations=5)
    assert summary.safe_head == chain.head - 5
    assert max(r.to_block for r in store.get_coverage(chain.chain_id, chain.token)) == chain.head - 5
    found = _refs_blocks(store, token)
    assert found and all(b is not None and b <= chain.head - 5 for b in found.values())
    report = coverage_report(store, chain.chain_id, chain.token, chain.head)
    assert report["unscanned"] == [[chain.head - 4, chain.head]]


async def test_a_rescan_without_a_range_covers_what_was_scanned_below_the_start_block(
    small_chain: NodeChain, store: Store
) -> None:
    chain = small_chain.chain
    silent = Contract(chain.chain_id, chain.silent, start_block=chain.head // 2)
    store.add_contract(silent)
    await _discover(store, small_chain.url, silent, methods=["blocks"], from_block=0)
    summary = await _discover(store, small_chain.url, silent, methods=["blocks"], rescan=True)
    assert (summary.from_block, summary.to_block) == (0, chain.head)
    assert summary.blocks_scanned == {"blocks": chain.head + 1} and summary.already_scanned == {}
    assert summary.new_refs == 0 and set(_refs(store, silent)) == chain.direct[chain.silent]


async def test_a_rescan_without_a_range_covers_what_fewer_confirmations_scanned(
    small_chain: NodeChain, store: Store
) -> None:
    # A scan with --confirmations 0, then `discover --rescan` with the default 12: it rescanned
    # only up to the head - 12, silently leaving the blocks above, scanned before, alone.
    chain = small_chain.chain
    silent = Contract(chain.chain_id, chain.silent)
    store.add_contract(silent)
    await _discover(store, small_chain.url, silent, methods=["blocks"])
    summary = await _discover(store, small_chain.url, silent, methods=["blocks"], rescan=True,
                              confirmations=5)  # fmt: skip
    assert (summary.from_block, summary.to_block) == (0, chain.head)
    assert summary.blocks_scanned == {"blocks": chain.head + 1} and summary.limit is None
    assert summary.new_refs == 0 and set(_refs(store, silent)) == chain.direct[chain.silent]


async def test_partial_scans_are_reported(small_chain: NodeChain, store: Store) -> None:
    chain = small_chain.chain
    token = _track(store, chain)[0]
    mid = chain.head // 2
    await _discover(store, small_chain.url, token, methods=["logs"], from_block=0, to_block=mid)
    await _discover(store, small_chain.url, token, methods=["blocks"], from_block=3, to_block=mid - 2)
    report = coverage_report(store, chain.chain_id, chain.token, chain.head)
    assert report["complete"] == [[3, mid - 2]]
    assert report["partial"] == [[0, 2], [mid - 1, mid]]
    assert report["unscanned"] == [[mid + 1, chain.head]]
    assert "partial" in report["summary"] and "unscanned" in report["summary"]
    # A default (logs + blocks) run now fills exactly what is not complete.
    summary = await _discover(store, small_chain.url, token,
                              settings=DiscoverSettings(block_chunk_blocks=5, trace_backends=()))
    assert summary.blocks_scanned["blocks"] == chain.head + 1 - (mid - 2 - 3 + 1)
    assert summary.blocks_scanned["logs"] == chain.head - mid
    assert coverage_report(store, chain.chain_id, chain.token, chain.head)["complete"] == [[0, chain.head]]


async def test_a_log_scan_keeps_its_windows_before_its_chunk_ends(anvil: Any, db_url: str) -> None:
    """Logs alone scan chunks of 20,000 blocks, committed whole: under a provider's 2-block cap
    a chunk is thousands of calls, and a Ctrl+C lost them all ("nothing was written"). Now
    every 32 windows answered are committed, and a rerun asks only for the rest."""
    anvil.request("anvil_mine", hex(199))
    head = int(anvil.request("eth_blockNumber"), 16)
    target = Contract(31337, "0x" + "be" * 20, None, 0, None)

    class Stop(Exception):
        pass

    def stop_at_first(p: DiscoverProgress) -> None:
        if p.event == "chunk":
            raise Stop

    with open_store(db_url) as store:
        store.add_contract(target)
        async with ProviderEmulator(anvil.url, EmulatorConfig(max_log_range=2)) as emu:
            with pytest.raises(Stop):
                await _discover(store, emu.url, target, methods=["logs"], on_progress=stop_at_first)
            report = coverage_report(store, 31337, target.address, head)
            kept = sum(hi - lo + 1 for lo, hi in report["partial"])
            assert 0 < kept < head + 1, report
            again = await _discover(store, emu.url, target, methods=["logs"])
        assert again.blocks_scanned["logs"] == head + 1 - kept
        assert coverage_report(store, 31337, target.address, head)["partial"] == [[0, head]]


async def test_a_long_scan_leaves_one_coverage_row_per_contiguous_range(anvil: Any, db_url: str) -> None:
    """Coverage got a row per committed chunk (a 20M-block chain: ~400,000 rows, every one
    read by each resume and status); it is kept merged, per method, as chunks commit, also
    when a Ctrl+C leaves holes and a rerun fills them."""
    from gapfill.discover.coverage import merge

    anvil.request("anvil_mine", hex(299))
    head = int(anvil.request("eth_blockNumber"), 16)
    target = Contract(31337, "0x" + "be" * 20, None, 0, None)
    settings = DiscoverSettings(block_chunk_blocks=5, concurrency=3, trace_backends=())

    def rows(store: Store, method: str) -> list[tuple[int, int]]:
        return [(r.from_block, r.to_block) for r in store.get_coverage(31337, target.address)
                if r.method == method]  # fmt: skip

    with open_store(db_url) as store:
        store.add_contract(target)
        with pytest.raises(_Stop):
            await _discover(store, anvil.url, target, settings=settings, on_progress=_stop_at(20))
        blocks = rows(store, "blocks")
        assert blocks and blocks == merge(blocks)  # one row per contiguous range, nothing touching
        assert rows(store, "logs") == merge(rows(store, "logs"))
        done = sum(hi - lo + 1 for lo, hi in blocks)
        assert done < head + 1
        again = await _discover(store, anvil.url, target, settings=settings)
        assert again.blocks_scanned["blocks"] == head + 1 - done  # only what was missing
        assert rows(store, "blocks") == rows(store, "logs") == [(0, head)]
        assert len(store.get_coverage(31337, target.address)) == 2


@pytest.mark.parametrize("methods", [["logs", "trace"], ["logs", "explorer"], ["logs", "blocks"]])
async def test_a_transaction_two_methods_find_is_one_ref_found(
    small_chain: NodeChain, store: Store, methods: list[str]
) -> None:
    """Methods that commit apart (a log scan and a trace_filter scan each as its windows are
    answered, the explorer on its own task) each counted a transaction both found: the
    progress line's "N refs found" was up to twice the refs there are."""
    chain = small_chain.chain
    token = _track(store, chain)[0]
    seen: list[DiscoverProgress] = []
    async with ExplorerStandIn(chain, rps=None) as api:
        summary = await _discover(store, small_chain.url, token, methods=methods, on_progress=seen.append,
                                  explorer=ExplorerConfig(api.url, rps=1000))  # fmt: skip
    stored = len(_refs(store, token))
    # Both methods found some of the same transactions, so a double count would show.
    assert min(summary.refs_found.values()) > 0 and sum(summary.refs_found.values()) > stored
    assert (seen[-1].refs_found, seen[-1].new_refs) == (stored, stored)


class _LaggingBackend:
    """A load balancer in front of two nodes: ``eth_blockNumber`` is answered by the node at
    the head, every other call by one behind it (a provider's backend still syncing)."""

    def __new__(cls, head_url: str, behind_url: str) -> Any:
        import json
        from http.server import BaseHTTPRequestHandler

        from engine_support import _answer, _forward, _Loopback

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                calls = body if isinstance(body, list) else [body]
                out = [_forward(head_url if c.get("method") == "eth_blockNumber" else behind_url,
                                json.dumps(c).encode()) for c in calls]  # fmt: skip
                _answer(self, out if isinstance(body, list) else out[0])

            def log_message(self, format: str, *args: object) -> None:
                return

        class Proxy(_Loopback):
            def __init__(self) -> None:
                self._serve(Handler)

        return Proxy()


@pytest.mark.parametrize(("method", "backend"),
                         [("logs", None), ("trace", TRACE_FILTER), ("trace", OTS_SEARCH)])  # fmt: skip
def test_blocks_a_node_behind_the_head_has_not_reached_are_not_recorded_as_scanned(
    anvil: Any, anvil_bin: str, store: Store, method: str, backend: str | None
) -> None:
    """A node behind the head answers trace_filter past its head with [], eth_getLogs cut at
    its head, Otterscan with a firstPage at its head, and no error: discovery recorded the
    blocks it had never seen as complete, lost the transactions in them, and a rerun said
    them "already scanned". Only blocks a node showed it had are recorded now."""
    import asyncio

    from gapfill.errors import RpcError
    from gapfill.testing.anvil import Anvil

    target = "0x" + "be" * 20
    anvil.request("anvil_setCode", target, "0x60006000a000")  # LOG0 on every call
    sender = anvil.request("eth_accounts")[0]
    sent = []
    for _ in range(3):
        sent.append(anvil.request("eth_sendTransaction", {"from": sender, "to": target, "value": "0x1"}))
        anvil.request("anvil_mine", hex(500))
    blocks = [int(anvil.request("eth_getTransactionReceipt", tx)["blockNumber"], 16) for tx in sent]
    contract = Contract(31337, target, start_block=0)
    store.add_contract(contract)
    fork = ["--fork-url", anvil.url, "--fork-block-number", str(blocks[0] + 100)]
    settings = DiscoverSettings(trace_backends=(backend,)) if backend else DiscoverSettings()
    with Anvil(binary=anvil_bin, extra_args=fork) as behind, _LaggingBackend(anvil.url, behind.url) as lb:
        try:
            asyncio.run(_discover(store, lb.url, contract, methods=[method], settings=settings))
            error = "no error"
        except RpcError as exc:
            error = str(exc)
    found = {r.block_number for r in store.iter_gap(31337, target)}
    covered = [(c.from_block, c.to_block) for c in store.get_coverage(31337, target)]
    # Blocks 502 and 1003 were recorded as scanned, their transactions not found.
    lost = [b for b in blocks if b not in found and any(lo <= b <= hi for lo, hi in covered)]
    assert not lost, (covered, found, error)
    # The first window the node had not reached: its last block (the head, or a refused
    # window's piece).
    assert re.search(r"by a node that could not show block \d+ \(it is behind the head", error), error
