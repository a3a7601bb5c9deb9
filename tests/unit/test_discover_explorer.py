"""The explorer client against the local stand-in (loopback only, no node)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gapfill.discover.explorer import (
    ExplorerClient,
    ExplorerConfig,
    ExplorerError,
    ExplorerRefused,
    _RateLimited,
    _TooCostly,
    walk_explorer,
)
from gapfill.discover.run import DiscoverProgress, _Run, _walk_job
from gapfill.model import Contract
from gapfill.store import open_store
from gapfill.testing.chain import GeneratedChain
from gapfill.testing.explorer_standin import ExplorerStandIn

TOKEN, SILENT, ROUTER = "0x" + "1" * 40, "0x" + "2" * 40, "0x" + "3" * 40
KEY = "K3yK3yK3ySecretValue"


def fake_chain(per_block: list[int], seed: int = 1) -> GeneratedChain:
    """A chain description whose token gets ``per_block[i]`` direct txs in block ``i + 1``."""
    rng = random.Random(seed)
    all_txs: list[str] = []
    tx_block: dict[str, int] = {}
    direct: set[str] = set()
    internal: set[str] = set()
    for i, n in enumerate(per_block):
        for _ in range(n):
            h = "0x" + rng.randbytes(32).hex()
            all_txs.append(h)
            tx_block[h] = i + 1
            (internal if rng.random() < 0.1 else direct).add(h)
    empty: frozenset[str] = frozenset()
    return GeneratedChain(
        chain_id=31337, head=len(per_block), token=TOKEN, silent=SILENT, router=ROUTER,
        token_abi=[], silent_abi=[], router_abi=[], all_txs=all_txs,
        emitted={TOKEN: empty, SILENT: empty, ROUTER: empty},
        direct={TOKEN: frozenset(direct), SILENT: empty, ROUTER: empty},
        internal={TOKEN: frozenset(internal), SILENT: empty, ROUTER: empty},
        reverted=frozenset(list(direct)[:3]), big_value=empty, tx_block=tx_block, first_block=1,
    )  # fmt: skip


async def _walk(client: ExplorerClient, lo: int, hi: int) -> tuple[dict[str, int], list[int]]:
    found: dict[str, int] = {}
    marks: list[int] = []
    async for refs, through in walk_explorer(client, 31337, TOKEN, lo, hi):
        for r in refs:
            assert r.tx_hash not in found or found[r.tx_hash] == r.block_number
            assert r.block_number is not None
            found[r.tx_hash] = r.block_number
        marks.append(through)
    return found, marks


async def test_walk_pages_and_restarts_past_the_result_window() -> None:
    chain = fake_chain([rng_n for rng_n in (5, 40, 0, 33, 7, 61, 2, 19, 44, 1)])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], key=KEY, rps=None, max_window=60) as api:
        config = ExplorerConfig(api.url, key=KEY, rps=1000, page_size=20, max_window=60)
        async with ExplorerClient(config, 31337) as client:
            found, marks = await _walk(client, 0, chain.head)
        assert api.stats.window_refused == 0
        starts = {q[1] for q in api.stats.queries if q[0] == "txlist"}
    assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN]
    assert all(found[h] == chain.tx_block[h] for h in found)
    assert marks == sorted(marks) and marks[-1] == chain.head
    assert len(starts) > 2


async def test_zero_value_internal_calls_are_found_where_the_explorer_lists_them() -> None:
    """Etherscan lists only internal calls that carry ETH; Blockscout lists the others when
    asked (``include_zero_value``) and names their transaction ``transactionHash``, which
    ended discovery with "internal error (KeyError: 'hash')"."""
    chain = fake_chain([5, 40, 0, 33, 7])
    assert chain.internal[TOKEN]
    everything = chain.direct[TOKEN] | chain.internal[TOKEN]
    none: frozenset[str] = frozenset()
    for flavour, valued, wanted in (("etherscan", none, chain.direct[TOKEN]),
                                    ("etherscan", chain.internal[TOKEN], everything),
                                    ("blockscout", chain.internal[TOKEN], everything),
                                    ("blockscout", none, everything)):  # fmt: skip
        async with ExplorerStandIn(chain, rps=None, flavour=flavour, valued=valued, max_window=60) as api:
            config = ExplorerConfig(api.url, rps=1000, page_size=20, max_window=60)
            async with ExplorerClient(config, 31337) as client:
                found, marks = await _walk(client, 0, chain.head)
        assert set(found) == wanted, flavour
        assert all(found[h] == chain.tx_block[h] for h in found)
        assert marks[-1] == chain.head


async def test_a_row_without_a_hash_is_one_sentence() -> None:
    client = ExplorerClient(ExplorerConfig("https://api.example.invalid/api", key=KEY), 1)
    assert client._row("txlistinternal", {"blockNumber": "7", "transactionHash": "0xAB"}) == (7, "0xab")
    with pytest.raises(ExplorerError) as info:
        client._row("txlistinternal", {"blockNumber": "7", "traceId": "0"})
    assert str(info.value).startswith(
        "the explorer at https://api.example.invalid/api answered txlistinternal with a row "
        "without a block number or a transaction hash")
    assert "\n" not in str(info.value)


async def test_walk_within_a_block_range() -> None:
    chain = fake_chain([10, 10, 10, 10, 10])
    async with (
        ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None) as api,
        ExplorerClient(ExplorerConfig(api.url, rps=1000), 31337) as client,
    ):
        found, marks = await _walk(client, 2, 3)
    wanted = chain.direct[TOKEN] | chain.internal[TOKEN]
    assert set(found) == {h for h in wanted if 2 <= chain.tx_block[h] <= 3}
    assert marks[-1] == 3


async def test_a_chainid_in_the_url_gives_way_to_the_contracts_chain() -> None:
    # The README's example URL carried ?chainid=1; gapfill adds the contract's chainid, so
    # the explorer got both (`chainid=1&...&chainid=31337`) and Etherscan-like APIs read the
    # first: another chain's list for a contract that is not on chain 1.
    chain = fake_chain([10, 10, 10])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None) as api:
        for url in (f"{api.url}?chainid=1", f"{api.url}?ChainId=1&x=y", f"{api.url}?chainid=31337"):
            async with ExplorerClient(ExplorerConfig(url, rps=1000), 31337) as client:
                found, _ = await _walk(client, 0, chain.head)
            assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN], url


async def test_walk_discovers_a_smaller_window_than_configured() -> None:
    chain = fake_chain([30, 30, 30, 30])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None, max_window=40) as api:
        config = ExplorerConfig(api.url, rps=1000, page_size=20, max_window=10_000)
        async with ExplorerClient(config, 31337) as client:
            found, _ = await _walk(client, 0, chain.head)
        assert api.stats.window_refused > 0
    assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN]


async def test_more_rows_in_one_block_than_the_window_says_how_to_scan_it_otherwise() -> None:
    """A plain ExplorerError let discover end with "run the same command again", which
    starts at that block and meets it again: the fix (another method for that block) is
    said instead, as for a block the explorer times out on."""
    chain = fake_chain([200])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None, max_window=50) as api:
        config = ExplorerConfig(api.url, rps=1000, page_size=25, max_window=50)
        async with ExplorerClient(config, 31337) as client:
            with pytest.raises(ExplorerRefused, match="cannot page past") as caught:
                await _walk(client, 0, 1)
    assert caught.value.fix.startswith("scan block 1 with --method trace --from-block 1 --to-block 1 ")
    assert "--method logs,blocks" in caught.value.fix


async def test_empty_result_is_success_and_bad_key_is_never_printed() -> None:
    chain = fake_chain([3])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], key=KEY, rps=None) as api:
        async with ExplorerClient(ExplorerConfig(api.url, key=KEY, rps=1000), 31337) as client:
            rows = [r async for r in client.walk("txlist", SILENT, 0, 10)]
            assert rows == [([], 10)]
            assert await client.head() == chain.head
        wrong = "WrongKeyWrongKeyWrongKey"
        async with ExplorerClient(ExplorerConfig(api.url, key=wrong, rps=1000), 31337) as client:
            with pytest.raises(ExplorerError) as info:
                await client.request({"module": "account", "action": "txlist", "address": TOKEN})
    assert "API key" in str(info.value)
    assert wrong not in str(info.value)
    assert wrong not in repr(ExplorerConfig(api.url, key=wrong))


def test_envelope() -> None:
    client = ExplorerClient(ExplorerConfig("https://api.example.invalid/api", key=KEY), 1)
    assert client._unwrap({"status": "1", "message": "OK", "result": [{"a": 1}]}) == [{"a": 1}]
    assert client._unwrap({"status": "0", "message": "No transactions found", "result": []}) == []
    with pytest.raises(_RateLimited):
        client._unwrap({"status": "0", "message": "NOTOK", "result": "Max rate limit reached"})
    with pytest.raises(_RateLimited):
        client._unwrap({"status": "0", "message": "NOTOK",
                        "result": "Max calls per sec rate limit reached (5/sec)"})  # fmt: skip
    with pytest.raises(_TooCostly):  # asked again over fewer blocks
        timed_out = "Query Timeout occured. Please select a smaller result dataset"
        client._unwrap({"status": "0", "message": "NOTOK", "result": timed_out})
    with pytest.raises(ExplorerError, match="Error! Invalid address") as info:
        client._unwrap({"status": "0", "message": "NOTOK", "result": f"Error! Invalid address {KEY}"})
    assert KEY not in str(info.value)


async def test_rate_limit_is_waited_out() -> None:
    chain = fake_chain([4, 4, 4])
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=4) as api:
        config = ExplorerConfig(api.url, rps=1000, page_size=4, max_window=8, rate_limit_backoff_s=0.25)
        async with ExplorerClient(config, 31337) as client:
            found, _ = await _walk(client, 0, chain.head)
            assert client.rate_limited > 0
        assert api.stats.rate_limited > 0
    assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN]


def test_config_rejects_bad_urls() -> None:
    from gapfill.errors import ConfigError

    with pytest.raises(ConfigError):
        ExplorerConfig("ftp://x")
    # A '?' in the password: aiohttp said "InvalidUrlClientError" only, at the first request.
    with pytest.raises(ConfigError) as info:
        ExplorerConfig("https://user:Secret?Pw@api.example/api", key=KEY)
    assert str(info.value) == ("the password in explorer URL 'https://user:***@api.example/api' contains "
                               "'?': write it as %3F in --explorer-url or GAPFILL_EXPLORER_URL")  # fmt: skip


async def test_a_wrong_explorer_url_says_what_to_check() -> None:
    async with ExplorerStandIn(fake_chain([1]), key=KEY, rps=None) as api:
        wrong = api.url.rsplit("/", 1)[0] + "/not-the-api"  # aiohttp answers 404
        async with ExplorerClient(ExplorerConfig(wrong, key=KEY, rps=1000), 31337) as client:
            with pytest.raises(ExplorerError) as info:
                await client.request({"module": "account", "action": "txlist", "address": TOKEN})
    message = str(info.value)
    assert "answered HTTP 404" in message and "check the path in --explorer-url" in message
    assert KEY not in message


async def test_an_unreachable_explorer_says_so_in_words_with_its_url_redacted() -> None:
    # Port 1 on loopback: refused, as an explorer that is down or mistyped.
    url = "http://127.0.0.1:1/api/SecretPathToken123456"
    async with ExplorerClient(ExplorerConfig(url, key=KEY, rps=1000, attempts=1), 31337) as client:
        with pytest.raises(ExplorerError) as info:
            await client.request({"module": "account", "action": "txlist", "address": TOKEN})
    message = str(info.value)
    assert "failed once: connection refused; check --explorer-url" in message, message
    assert "Error" not in message and "ssl:" not in message, message  # no aiohttp class or text
    assert "SecretPathToken123456" not in message and KEY not in message, message


async def _refusal(api_url: str, key: str | None = None) -> str:
    """The sentence an explorer's refusal of a txlist request gives."""
    config = ExplorerConfig(api_url, key=key, rps=1000, url_check="--explorer-url",
                            key_check="--explorer-key", key_hint="pass --explorer-key")  # fmt: skip
    async with ExplorerClient(config, 31337) as client:
        with pytest.raises(ExplorerError) as info:
            await client.request({"module": "account", "action": "txlist", "address": TOKEN})
    return str(info.value)


async def test_a_refused_key_is_named_where_it_came_from_or_asked_for_when_none_was_given() -> None:
    # A key written in --explorer-url said "check --explorer-key or GAPFILL_EXPLORER_KEY",
    # neither of them set; no key at all said "refused the API key" too.
    async with ExplorerStandIn(fake_chain([1]), key=KEY, rps=None) as api:
        in_url = await _refusal(api.url + "?chainid=1&apikey=WRONGKEYZZ")
        given = await _refusal(api.url, key="WrongKeyGivenApart")
        # A key given apart wins over one in the URL: it alone is sent, and named.
        both = await _refusal(api.url + "?apikey=" + KEY, key="WrongKeyGivenApart")
        none = await _refusal(api.url)
    assert in_url.endswith("refused the API key in its URL (Invalid API Key): check the apikey in "
                           "--explorer-url"), in_url  # fmt: skip
    assert "WRONGKEYZZ" not in in_url and "apikey=***" in in_url, in_url
    assert given.endswith("refused the API key (Invalid API Key): check --explorer-key"), given
    assert both == given.replace(api.url, api.url + "?apikey=***"), both
    assert none.endswith("needs an API key and none was given (Missing/Invalid API Key): "
                         "pass --explorer-key"), none  # fmt: skip


async def test_a_mistyped_explorer_path_shows_and_its_404_is_about_the_url() -> None:
    # The mistyped segment was the one masked ("/v2/***"), and the hint named the key too.
    async with ExplorerStandIn(fake_chain([1]), key=KEY, rps=None) as api:
        wrong = api.url.replace("/v2/api", "/v2/apj")
        message = await _refusal(wrong + "?apikey=" + KEY)
    assert f"the explorer at {wrong}?apikey=*** answered HTTP 404" in message, message
    assert message.endswith("check the path in --explorer-url (an Etherscan-compatible API such as "
                            "https://api.etherscan.io/v2/api)"), message  # fmt: skip
    assert KEY not in message


class _TwoLists:
    """txlist and txlistinternal of a contract that both list one transaction (block 10): a
    call to it that sends ETH back out (a WETH withdraw, a bridge's release), as Etherscan
    lists internal calls from the address as well as to it. The internal list's first page
    ends before block 10 (many internal rows there)."""

    def __init__(self, tx_hash: str) -> None:
        self.tx_hash = tx_hash

    async def _pages(self, pages: list[tuple[list[tuple[str, int]], int]]
                     ) -> AsyncIterator[tuple[list[tuple[str, int]], int]]:  # fmt: skip
        for p in pages:
            yield p

    def walk(self, action: str, address: str, lo: int, hi: int) -> Any:
        if action == "txlist":
            return self._pages([([(self.tx_hash, 10)], 20), ([], hi)])
        return self._pages([([], 5), ([(self.tx_hash, 10)], hi)])


async def test_a_transaction_both_lists_give_is_one_ref_found(tmp_path: Path) -> None:
    """The walk gave a transaction once per list when one list read it before the other had
    passed its block: "explorer 101 blocks/2 refs" and "2 refs found, 1 new" for one."""
    tx_hash = "0x" + "a1" * 32
    seen: list[DiscoverProgress] = []
    contract = Contract(31337, TOKEN, None, 0, None)
    with open_store(f"sqlite:///{tmp_path / 'd.db'}") as store:
        store.migrate()
        store.add_contract(contract)
        run = _Run(store, contract, ("explorer",), {"explorer": [(0, 100)]}, seen.append)
        await _walk_job(run, "explorer", [(0, 100)],
                        lambda lo, hi: walk_explorer(_TwoLists(tx_hash), 31337, TOKEN, lo, hi))  # type: ignore[arg-type]
        refs = list(store.iter_gap(31337, TOKEN))
    assert [r.tx_hash for r in refs] == [tx_hash]
    assert (run.refs_by_method["explorer"], seen[-1].refs_found, seen[-1].new_refs) == (1, 1, 1)


async def test_an_etherscan_query_timeout_is_asked_again_over_fewer_blocks() -> None:
    """Etherscan answers a list too costly to compute (a busy contract's txlistinternal over a
    wide block range) with "Query Timeout occured. Please select a smaller result dataset".
    The walk took it for a fatal error, and discovery ended with "run the same command
    again", which met it again: it now asks again over half the blocks."""
    chain = fake_chain([5] * 40)
    async with ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None, costly_blocks=10) as api:
        async with ExplorerClient(ExplorerConfig(api.url, rps=1000, page_size=20), 31337) as client:
            found, marks = await _walk(client, 0, chain.head)
        assert api.stats.timed_out > 0
        widest = max(end - start + 1 for _, start, end, _, _ in api.stats.queries)
    assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN]
    assert marks == sorted(marks) and marks[-1] == chain.head
    assert widest > 10  # widened again after a narrower query was read


async def test_a_query_timeout_over_one_block_says_how_to_scan_it_otherwise() -> None:
    chain = fake_chain([5] * 4)
    async with (
        ExplorerStandIn(chain, rps=None, costly_blocks=0) as api,
        ExplorerClient(ExplorerConfig(api.url, rps=1000), 31337) as client,
    ):
        with pytest.raises(ExplorerRefused) as caught:
            await _walk(client, 0, chain.head)
    message, fix = str(caught.value), caught.value.fix
    assert "even for block 0 alone (Query Timeout occured" in message, message
    assert fix.startswith("scan block 0 with --method trace --from-block 0 --to-block 0 "), message
    assert "--method logs,blocks" in fix, message


@pytest.mark.parametrize("cap", [7, 20])
async def test_an_explorer_capping_the_page_size_unsaid_is_paged_to_the_end(cap: int) -> None:
    """An explorer that gives fewer rows a page than ``offset`` asks, without a word: its
    first page looked like the last, and the blocks past it were recorded as scanned with
    their transactions never read. ``cap`` 20: it gives what is asked (one more request)."""
    chain = fake_chain([5, 40, 0, 33, 7, 61, 2, 19, 44, 1])
    async with (
        ExplorerStandIn(chain, valued=chain.internal[TOKEN], rps=None, max_offset=cap) as api,
        ExplorerClient(ExplorerConfig(api.url, rps=1000, page_size=20), 31337) as client,
    ):
        found, marks = await _walk(client, 0, chain.head)
    assert set(found) == chain.direct[TOKEN] | chain.internal[TOKEN]
    assert marks == sorted(marks) and marks[-1] == chain.head


@pytest.mark.parametrize("answer", ["10", "0x1_0"])
async def test_an_explorer_head_that_is_not_0x_hex_is_unknown_not_another_block(answer: Any) -> None:
    # int(str(v), 16) read a decimal "10" (and "0x1_0") as block 16.
    client = ExplorerClient(ExplorerConfig("http://127.0.0.1:9/api", rps=1000), 31337)

    async def request(params: dict[str, str]) -> Any:
        return answer

    client.request = request  # type: ignore[method-assign]
    assert await client.head() is None
