"""The test chain generator and the local node: determinism, layouts, ground truth."""

from __future__ import annotations

import os
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from eth_abi.abi import decode

from gapfill.testing.anvil import ANVIL_ENV, Anvil, AnvilError, find_anvil
from gapfill.testing.chain import (
    BIG_VALUE,
    ChainSpec,
    GeneratedChain,
    generate,
    load,
    load_artifact,
    save,
)

# `small_chain` and `make_chain` yield conftest.NodeChain(node, chain); conftest is not importable.
NodeChain = Any

pytestmark = pytest.mark.timeout(120)


def rpc_batch(url: str, calls: list[tuple[str, list[Any]]], size: int = 500) -> list[Any]:
    """Results of ``calls`` in order, matched by id."""
    out: list[Any] = []
    for start in range(0, len(calls), size):
        chunk = calls[start : start + size]
        body = orjson.dumps(
            [
                {"jsonrpc": "2.0", "id": i, "method": m, "params": p}
                for i, (m, p) in enumerate(chunk)
            ]
        )
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            replies = {r["id"]: r for r in orjson.loads(resp.read())}
        for i in range(len(chunk)):
            assert "error" not in replies[i], replies[i]
            out.append(replies[i]["result"])
    return out


def receipts_of(url: str, hashes: list[str]) -> dict[str, dict[str, Any]]:
    got = rpc_batch(url, [("eth_getTransactionReceipt", [h]) for h in hashes])
    return dict(zip(hashes, got, strict=True))


def txs_of(url: str, hashes: list[str]) -> dict[str, dict[str, Any]]:
    got = rpc_batch(url, [("eth_getTransactionByHash", [h]) for h in hashes])
    return dict(zip(hashes, got, strict=True))


def layout_blocks(chain: GeneratedChain) -> dict[int, list[str]]:
    return {b: hs for b, hs in chain.block_txs().items() if b >= chain.first_block}


# -- the node -------------------------------------------------------------------


def test_anvil_starts_answers_and_stops(anvil_bin: str) -> None:
    node = Anvil(binary=anvil_bin, accounts=5, chain_id=1337)
    with node:
        assert node.running
        assert node.url == f"http://127.0.0.1:{node.port}"
        assert int(node.request("eth_chainId"), 16) == 1337
        assert len(node.accounts) == 5
        assert all(a == a.lower() for a in node.accounts)
        pid = node.pid
    assert not node.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    node.stop()  # idempotent


def test_anvil_reports_a_bad_flag(anvil_bin: str) -> None:
    with pytest.raises(AnvilError, match="exited"), Anvil(
        binary=anvil_bin, extra_args=["--no-such-flag"]
    ):
        pass


def test_find_anvil_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ANVIL_ENV, str(tmp_path / "missing"))
    assert find_anvil() is None
    fake = tmp_path / "anvil"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(ANVIL_ENV, str(fake))
    assert find_anvil() == str(fake)


# -- artifacts and specs ----------------------------------------------------------


def test_artifacts_have_the_promised_abi() -> None:
    names = {
        name: {e.get("name") for e in load_artifact(name).abi}
        for name in ("Token", "Silent", "Router")
    }
    assert {"transfer", "approve", "transferFrom", "balanceOf", "mint", "ping", "fail",
            "Transfer", "Approval", "Pinged", "name", "symbol", "decimals"} <= names["Token"]  # fmt: skip
    assert {"store", "fail"} <= names["Silent"]
    assert {"route"} <= names["Router"]
    assert not [e for e in load_artifact("Silent").abi if e["type"] == "event"]
    for name in ("Token", "Silent", "Router"):
        assert load_artifact(name).bytecode.startswith("0x60")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layout": "wide", "total_txs": 10},
        {"layout": "dense", "total_txs": -1},
        {"layout": "dense", "total_txs": 10, "blocks": 11},
    ],
)
def test_spec_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ChainSpec(**kwargs)


# -- determinism --------------------------------------------------------------------


def test_same_seed_same_chain_on_fresh_nodes(
    make_chain: Callable[[ChainSpec], NodeChain],
) -> None:
    spec = ChainSpec(layout="dense", total_txs=400, seed=11)
    a = make_chain(spec).chain
    b = make_chain(spec).chain
    assert a.all_txs == b.all_txs
    assert a.tx_block == b.tx_block
    assert (a.token, a.silent, a.router) == (b.token, b.silent, b.router)
    assert a.emitted == b.emitted and a.internal == b.internal and a.reverted == b.reverted
    other = make_chain(ChainSpec(layout="dense", total_txs=400, seed=12)).chain
    assert set(other.all_txs[4:]).isdisjoint(a.all_txs[4:])


# -- layouts ----------------------------------------------------------------------


def test_dense_layout(small_chain: NodeChain) -> None:
    chain = small_chain.chain
    blocks = layout_blocks(chain)
    assert sum(len(hs) for hs in blocks.values()) == 2_000
    assert all(20 <= len(hs) <= 200 for hs in blocks.values())
    assert sorted(blocks) == list(range(chain.first_block, chain.head + 1))
    direct_tracked = chain.direct[chain.token] | chain.direct[chain.silent]
    share = len(direct_tracked - set(chain.deploy_txs.values())) / 2_000
    assert 0.75 <= share <= 0.85
    assert 0.015 <= len(chain.reverted) / 2_000 <= 0.05
    assert chain.big_value and chain.internal[chain.token]


def test_sparse_layout_and_reuse_of_a_node(anvil: Anvil) -> None:
    chain = generate(anvil.url, ChainSpec(layout="sparse", total_txs=1_500, seed=3))
    blocks = layout_blocks(chain)
    assert len(blocks) == 30
    tracked = chain.reached(chain.token) | chain.reached(chain.silent)
    per_block = [len(tracked.intersection(hs)) for hs in blocks.values()]
    assert set(per_block) <= {1, 2} and 1 in per_block and 2 in per_block
    assert all(45 <= len(hs) <= 55 for hs in blocks.values())

    # A second chain on the same node continues after the first one.
    again = generate(anvil.url, ChainSpec(layout="dense", total_txs=500, seed=3, blocks=5))
    assert again.first_block == chain.head + 2
    assert sum(len(hs) for hs in layout_blocks(again).values()) == 500
    assert again.head == again.first_block + 4
    assert again.token != chain.token
    # Automine is back on: a plain transaction gets mined without evm_mine
    # (anvil mines it in the background, so the receipt can lag the hash a little).
    h = anvil.request("eth_sendTransaction", {"from": anvil.accounts[1], "to": anvil.accounts[2]})
    deadline = time.monotonic() + 10
    while (receipt := anvil.request("eth_getTransactionReceipt", h)) is None:
        assert time.monotonic() < deadline, "automine was not restored"
        time.sleep(0.02)
    assert int(receipt["status"], 16) == 1


# -- the ground truth agrees with the node -----------------------------------------------


def test_sets_agree_with_receipts_and_txs(small_chain: NodeChain) -> None:
    url, chain = small_chain.url, small_chain.chain
    receipts = receipts_of(url, chain.all_txs)
    txs = txs_of(url, chain.all_txs)
    contracts = (chain.token, chain.silent, chain.router)

    for address in contracts:
        with_logs = {h for h, r in receipts.items() if any(lg["address"] == address for lg in r["logs"])}
        assert chain.emitted[address] == with_logs
        assert chain.direct[address] == {h for h, t in txs.items() if t["to"] == address}
    assert chain.emitted[chain.token] and not chain.emitted[chain.silent]
    assert {h for h, r in receipts.items() if r["status"] == "0x0"} == chain.reverted
    assert {h for h, t in txs.items() if int(t["value"], 16) > BIG_VALUE} == chain.big_value
    assert all(int(r["blockNumber"], 16) == chain.tx_block[h] for h, r in receipts.items())
    for address, h in chain.deploy_txs.items():
        assert receipts[h]["contractAddress"] == address

    routed = chain.internal[chain.token]
    assert routed == chain.internal[chain.silent] and not chain.internal[chain.router]
    assert routed <= chain.direct[chain.router] and not routed & chain.reverted
    assert not routed & (chain.direct[chain.token] | chain.direct[chain.silent])

    # Every transaction type, and senders that mix them.
    assert {t["type"] for t in txs.values()} >= {"0x0", "0x1", "0x2"}
    kinds_by_sender: dict[str, set[str]] = {}
    for t in txs.values():
        kinds_by_sender.setdefault(t["from"], set()).add(t["type"])
    assert any({"0x0", "0x2"} <= k for k in kinds_by_sender.values())
    # Nonces per sender are gapless.
    nonces = Counter(t["from"] for t in txs.values())
    for sender, n in nonces.items():
        assert sorted(int(t["nonce"], 16) for t in txs.values() if t["from"] == sender) == list(range(n))


def test_pinged_carries_value_and_calldata(small_chain: NodeChain) -> None:
    url, chain = small_chain.url, small_chain.chain
    pings = sorted(chain.direct[chain.token] & chain.emitted[chain.token] & chain.big_value)
    assert pings, "some pings should carry a value above 2**64"
    txs = txs_of(url, pings)
    receipts = receipts_of(url, pings)
    for h in pings:
        (log,) = receipts[h]["logs"]
        value, data = decode(["uint256", "bytes"], bytes.fromhex(log["data"][2:]))
        (sent,) = decode(["bytes"], bytes.fromhex(txs[h]["input"][10:]))
        assert value == int(txs[h]["value"], 16) > BIG_VALUE
        assert data == sent


def test_trace_sees_router_internal_calls(small_chain: NodeChain) -> None:
    url, chain = small_chain.url, small_chain.chain
    sample = sorted(chain.internal[chain.token])[:3]
    traces = rpc_batch(url, [("debug_traceTransaction", [h, {"tracer": "callTracer"}]) for h in sample])
    for trace in traces:
        assert trace["to"].lower() == chain.router
        assert [c["to"].lower() for c in trace["calls"]] == [chain.token, chain.silent]


def test_save_load_round_trip(small_chain: NodeChain, tmp_path: Path) -> None:
    path = tmp_path / "chain.json"
    save(small_chain.chain, path)
    assert load(path) == small_chain.chain
