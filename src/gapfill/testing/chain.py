"""Deterministic test chains on a local node (anvil).

`generate` deploys the three test contracts (``Token``, ``Silent``, ``Router``
from ``contracts/``) and then fills blocks with a seeded mix of transactions:

- **dense**: 20-200 transactions per block, about 80% of them sent straight to
  the two tracked contracts (``Token.ping/transfer/approve/fail``,
  ``Silent.store/fail``); the rest is unrelated traffic (plain ETH transfers, a
  few ``Router.route`` calls that reach both contracts internally, a few calls
  that revert in the router);
- **sparse**: about 50 transactions per block, of which 1-2 reach a tracked
  contract (directly or through the router); the rest is unrelated.

Both layouts mix legacy, EIP-2930 and EIP-1559 transactions from the same
senders, revert about 3% of the time (calls to ``fail`` with an explicit gas
limit), and move some values above 2**64.

Every field that goes into a transaction hash (nonce, gas, fees, value, input,
access list) comes from the seed, so the same spec on a fresh node yields the
same hashes in the same blocks. The result, `GeneratedChain`, says which
transactions each discovery method must find; `save`/`load` cache it as JSON.

Transactions go out as JSON-RPC batches of ``eth_sendTransaction`` on one
keep-alive connection with automine off, then one ``evm_mine`` per block; at the
end every planned block is read back and compared with the plan, because a
node that drops a transaction does so silently.

CLI (for benchmarks)::

    python -m gapfill.testing.chain --rpc-url URL --layout dense --txs 100000 --out chain.json
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import logging
import random
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast, get_args

import orjson

from gapfill.keccak import keccak

__all__ = [
    "ChainError",
    "ChainSpec",
    "GeneratedChain",
    "Layout",
    "generate",
    "load",
    "load_artifact",
    "main",
    "save",
]

log = logging.getLogger(__name__)

Layout = Literal["dense", "sparse"]
Abi = list[dict[str, Any]]

BIG_VALUE = 2**64
"""A value above this does not fit in 64 bits; `GeneratedChain.big_value` lists such txs."""

DENSE_MIN_TXS, DENSE_MAX_TXS = 20, 200
SPARSE_TXS_PER_BLOCK = 50
SEND_BATCH = 500
VERIFY_BATCH = 500
RECEIPT_SAMPLE_EVERY = 97  # besides every expected revert, check this fraction of receipts

_GWEI = 10**9
_TOKEN_SUPPLY_EACH = 10**30

# Gas limits, set explicitly so the node never estimates; generous, the rest is refunded.
_GAS = {
    "eth": 21_000,
    "eth_al": 30_000,  # a transfer with an access list pays for the list
    "ping": 90_000,
    "transfer": 90_000,
    "approve": 80_000,
    "token_fail": 60_000,
    "store": 100_000,
    "silent_fail": 60_000,
    "route": 200_000,
    "router_bad": 60_000,
    "deploy": 3_000_000,
    "mint_many": 100_000,  # plus 40k per recipient
}

# Dense: share of all txs. 80% go straight to Token/Silent; reverts ~3%.
_DENSE_KINDS: dict[str, float] = {
    "ping": 0.300,
    "transfer": 0.100,
    "approve": 0.025,
    "token_fail": 0.012,
    "store": 0.350,
    "silent_fail": 0.013,
    "eth": 0.175,
    "route": 0.020,
    "router_bad": 0.005,
}
# Sparse: the 1-2 txs per block that reach a tracked contract...
_SPARSE_TRACKED_KINDS: dict[str, float] = {
    "ping": 0.36,
    "transfer": 0.12,
    "approve": 0.03,
    "token_fail": 0.015,
    "store": 0.42,
    "silent_fail": 0.015,
    "route": 0.04,
}
# ...and the ~50 that do not.
_SPARSE_OTHER_KINDS: dict[str, float] = {"eth": 0.97, "router_bad": 0.03}

_REVERTING = frozenset({"token_fail", "silent_fail", "router_bad"})


class ChainError(RuntimeError):
    """The node refused a call, or the mined chain differs from the plan."""


@dataclass(frozen=True)
class ChainSpec:
    """What to generate. ``blocks`` defaults to what the layout implies."""

    layout: Layout
    total_txs: int
    seed: int = 7
    blocks: int | None = None

    def __post_init__(self) -> None:
        if self.layout not in get_args(Layout):
            raise ValueError(f"layout must be one of {get_args(Layout)}, not {self.layout!r}")
        if self.total_txs < 0:
            raise ValueError("total_txs must be >= 0")
        if self.blocks is not None and not 1 <= self.blocks <= max(1, self.total_txs):
            raise ValueError("blocks must be between 1 and total_txs")


@dataclass(frozen=True)
class GeneratedChain:
    """What `generate` put on the chain: the ground truth for discovery and enrichment tests.

    Addresses and hashes are lowercase ``0x`` hex. The per-contract maps have a key
    for each of ``token``, ``silent`` and ``router``. The three contracts are
    created in block ``first_block - 1`` (with a ``Token.mintMany`` that funds
    every sender); the layout's blocks are ``first_block..head``.
    """

    chain_id: int
    head: int
    token: str
    silent: str
    router: str
    token_abi: Abi
    silent_abi: Abi
    router_abi: Abi
    all_txs: list[str]
    """Every transaction generated, in send order, setup (deploys) included."""
    emitted: dict[str, frozenset[str]]
    """Txs in which that contract emitted at least one log (what a log scan finds)."""
    direct: dict[str, frozenset[str]]
    """Txs whose ``to`` is that contract, reverted ones included (what a block scan finds)."""
    internal: dict[str, frozenset[str]]
    """Txs that reached it only through the router (a trace finds ``direct | internal``)."""
    reverted: frozenset[str]
    big_value: frozenset[str]
    """Txs whose value is above 2**64."""
    tx_block: dict[str, int]
    first_block: int = 0
    spec: ChainSpec | None = None
    deploy_txs: dict[str, str] = field(default_factory=dict)
    """Contract address -> hash of the transaction that created it."""

    def reached(self, address: str) -> frozenset[str]:
        """All txs that touched ``address``: directly, internally, or by its logs."""
        a = address.lower()
        return self.direct[a] | self.internal[a] | self.emitted[a]

    def block_txs(self) -> dict[int, list[str]]:
        """Block number -> its generated tx hashes (send order)."""
        out: dict[int, list[str]] = {}
        for h in self.all_txs:
            out.setdefault(self.tx_block[h], []).append(h)
        return out


# -- contract artifacts --------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    abi: Abi
    bytecode: str


@functools.cache
def load_artifact(name: str) -> Artifact:
    """The committed ABI and creation bytecode of ``Token``, ``Silent`` or ``Router``."""
    ref = resources.files("gapfill.testing").joinpath("contracts", f"{name}.json")
    data = json.loads(ref.read_text(encoding="utf-8"))
    return Artifact(abi=data["abi"], bytecode=data["bytecode"])


# -- calldata (hand-rolled: eth_abi would dominate the generation time) --------


@functools.cache
def _selector(signature: str) -> bytes:
    return bytes(keccak(signature.encode()))[:4]


def _word(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _addr_word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def _bytes_tail(data: bytes) -> bytes:
    pad = (-len(data)) % 32
    return _word(len(data)) + data + bytes(pad)


def _hex(b: bytes) -> str:
    return "0x" + b.hex()


def _call_ping(data: bytes) -> str:
    return _hex(_selector("ping(bytes)") + _word(32) + _bytes_tail(data))


def _call_transfer(to: str, amount: int) -> str:
    return _hex(_selector("transfer(address,uint256)") + _addr_word(to) + _word(amount))


def _call_approve(spender: str, amount: int) -> str:
    return _hex(_selector("approve(address,uint256)") + _addr_word(spender) + _word(amount))


def _call_token_fail(code: int) -> str:
    return _hex(_selector("fail(uint256)") + _word(code))


def _call_store(x: int) -> str:
    return _hex(_selector("store(uint256)") + _word(x))


def _call_silent_fail() -> str:
    return _hex(_selector("fail()"))


def _call_route(token: str, silent: str, data: bytes, x: int) -> str:
    head = _addr_word(token) + _addr_word(silent) + _word(4 * 32) + _word(x)
    return _hex(_selector("route(address,address,bytes,uint256)") + head + _bytes_tail(data))


def _call_mint_many(to: Sequence[str], amount: int) -> str:
    body = _word(2 * 32) + _word(amount) + _word(len(to)) + b"".join(_addr_word(a) for a in to)
    return _hex(_selector("mintMany(address[],uint256)") + body)


def _create_address(sender: str, nonce: int) -> str:
    """The address of a contract created by ``sender`` at ``nonce`` (RLP of [sender, nonce])."""
    if nonce == 0:
        enc_nonce = b"\x80"
    elif nonce < 0x80:
        enc_nonce = bytes([nonce])
    else:
        raw = nonce.to_bytes((nonce.bit_length() + 7) // 8, "big")
        enc_nonce = bytes([0x80 + len(raw)]) + raw
    payload = b"\x94" + bytes.fromhex(sender[2:]) + enc_nonce
    return _hex(bytes(keccak(bytes([0xC0 + len(payload)]) + payload))[12:])


# -- JSON-RPC over one keep-alive connection -----------------------------------


class _Rpc:
    """Minimal synchronous JSON-RPC client: batches, matched by id, errors raised."""

    def __init__(self, url: str, timeout_s: float = 120.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self._path = parts.path or "/"
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._conn = conn_cls(parts.hostname, parts.port, timeout=timeout_s)
        self._next_id = 0
        self.calls = 0

    def close(self) -> None:
        self._conn.close()

    def _post(self, payload: Any) -> Any:
        body = orjson.dumps(payload)
        try:
            self._conn.request("POST", self._path, body, {"Content-Type": "application/json"})
            resp = self._conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._conn.close()
            raise ChainError(f"node unreachable: {exc}") from exc
        except BaseException:
            # A Ctrl+C between request and reply leaves the connection mid-exchange; the
            # next call (a `finally` restoring automine) must start on a fresh one.
            self._conn.close()
            raise
        if resp.status != 200:
            raise ChainError(f"node answered HTTP {resp.status}: {raw[:300]!r}")
        return orjson.loads(raw)

    def call(self, method: str, *params: Any) -> Any:
        return self.batch([(method, list(params))])[0]

    def batch(self, calls: Sequence[tuple[str, list[Any]]]) -> list[Any]:
        """Send calls in one HTTP request; return results in call order."""
        if not calls:
            return []
        first = self._next_id
        self._next_id += len(calls)
        self.calls += len(calls)
        payload = [
            {"jsonrpc": "2.0", "id": first + i, "method": m, "params": p}
            for i, (m, p) in enumerate(calls)
        ]
        replies = self._post(payload)
        if not isinstance(replies, list):
            raise ChainError(f"batch answered with a non-list: {str(replies)[:300]}")
        by_id = {r.get("id"): r for r in replies}
        out: list[Any] = []
        for i, (method, params) in enumerate(calls):
            r = by_id.get(first + i)
            if r is None:
                raise ChainError(f"no reply to {method} in a batch of {len(calls)}")
            if "error" in r:
                raise ChainError(f"{method}{str(params)[:400]} failed: {r['error']}")
            out.append(r["result"])
        return out

    def batched(
        self, calls: Sequence[tuple[str, list[Any]]], size: int
    ) -> Iterator[Any]:
        for i in range(0, len(calls), size):
            yield from self.batch(calls[i : i + size])


# -- planning -------------------------------------------------------------------


@dataclass
class _Planned:
    params: dict[str, Any]
    kind: str
    value: int
    block: int
    hash: str = ""


def _block_sizes(spec: ChainSpec, rng: random.Random) -> list[int]:
    total = spec.total_txs
    if total == 0:
        return []
    if spec.blocks is None and spec.layout == "dense":
        sizes: list[int] = []
        remaining = total
        # Leave at least DENSE_MIN_TXS for the last block so every block is in bounds.
        while remaining > DENSE_MAX_TXS:
            n = rng.randint(DENSE_MIN_TXS, min(DENSE_MAX_TXS, remaining - DENSE_MIN_TXS))
            sizes.append(n)
            remaining -= n
        sizes.append(remaining)
        return sizes
    blocks = spec.blocks or max(1, total // SPARSE_TXS_PER_BLOCK)
    base, extra = divmod(total, blocks)
    sizes = [base + (1 if i < extra else 0) for i in range(blocks)]
    # Jitter pairwise so the total is kept and no block is emptied.
    for i in range(0, blocks - 1, 2):
        j = min(sizes[i], sizes[i + 1]) // 10
        if j:
            d = rng.randint(-j, j)
            sizes[i] += d
            sizes[i + 1] -= d
    return sizes


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


class _Planner:
    def __init__(
        self,
        rng: random.Random,
        senders: list[str],
        nonces: dict[str, int],
        chain_id: int,
        base_fee: int,
    ) -> None:
        self.rng = rng
        self.senders = senders
        self.nonces = nonces
        self.chain_id = chain_id
        self.unit = max(base_fee, _GWEI)
        self.token = self.silent = self.router = ""
        self.planned: list[_Planned] = []
        # A few fixed fresh addresses as recipients, beside the node's accounts.
        self.strangers = [_hex(rng.randbytes(20)) for _ in range(64)]
        self.recipients = senders + self.strangers

    def _fees(self, tx: dict[str, Any], kind: str, to: str | None) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.40:  # legacy
            tx["gasPrice"] = hex(self.unit * 2 + rng.randrange(self.unit))
        elif roll < 0.95:  # EIP-1559
            tx["maxFeePerGas"] = hex(self.unit * 3 + rng.randrange(self.unit))
            tx["maxPriorityFeePerGas"] = hex(1 + rng.randrange(self.unit // 2))
            if rng.random() < 0.05 and to is not None:
                tx["accessList"] = [{"address": to, "storageKeys": [_hex(_word(0))]}]
        else:  # EIP-2930
            tx["type"] = "0x1"
            tx["gasPrice"] = hex(self.unit * 2 + rng.randrange(self.unit))
            tx["accessList"] = (
                [{"address": to, "storageKeys": [_hex(_word(rng.randrange(4)))]}] if to else []
            )

    def _value(self, payable: bool) -> int:
        if not payable:
            return 0
        r = self.rng.random()
        if r < 0.03:
            return BIG_VALUE + 1 + self.rng.getrandbits(66)
        if r < 0.3:
            return 0
        return self.rng.getrandbits(50)

    def add(self, sender: str, kind: str, block: int, to: str | None = None, data: str = "0x",
            value: int = 0) -> _Planned:  # fmt: skip
        nonce = self.nonces[sender]
        self.nonces[sender] = nonce + 1
        tx: dict[str, Any] = {
            "from": sender,
            "nonce": hex(nonce),
            "value": hex(value),
            "input": data,
            "chainId": hex(self.chain_id),
        }
        if to is not None:
            tx["to"] = to
        self._fees(tx, kind, to)
        gas = _GAS[kind]
        if kind == "eth" and "accessList" in tx:
            gas = _GAS["eth_al"]
        tx["gas"] = hex(gas)
        p = _Planned(params=tx, kind=kind, value=value, block=block)
        self.planned.append(p)
        return p

    def add_kind(self, kind: str, block: int) -> _Planned:
        rng = self.rng
        sender = rng.choice(self.senders)
        if kind == "eth":
            pool = self.senders if rng.random() < 0.7 else self.strangers
            to = rng.choice(pool)
            return self.add(sender, kind, block, to, "0x", self._value(True))
        if kind == "ping":
            data = _call_ping(rng.randbytes(rng.randrange(0, 200)))
            return self.add(sender, kind, block, self.token, data, self._value(True))
        if kind == "transfer":
            to = rng.choice(self.recipients)
            return self.add(sender, kind, block, self.token, _call_transfer(to, rng.getrandbits(64)))
        if kind == "approve":
            data = _call_approve(rng.choice(self.senders), rng.getrandbits(80))
            return self.add(sender, kind, block, self.token, data)
        if kind == "token_fail":
            return self.add(sender, kind, block, self.token, _call_token_fail(rng.getrandbits(32)))
        if kind == "store":
            data = _call_store(rng.getrandbits(256))
            return self.add(sender, kind, block, self.silent, data, self._value(True))
        if kind == "silent_fail":
            return self.add(sender, kind, block, self.silent, _call_silent_fail())
        if kind == "route":
            data = _call_route(self.token, self.silent, rng.randbytes(rng.randrange(0, 120)),
                               rng.getrandbits(256))  # fmt: skip
            return self.add(sender, kind, block, self.router, data, self._value(True))
        if kind == "router_bad":
            # Unknown selector: the router has no fallback, so this reverts in the router.
            data = _hex(b"\xde\xad\xbe\xef" + rng.randbytes(32))
            return self.add(sender, kind, block, self.router, data)
        raise AssertionError(kind)

    def plan_setup(self, block: int) -> None:
        deployer = self.senders[0]
        n = self.nonces[deployer]
        self.token = _create_address(deployer, n)
        self.silent = _create_address(deployer, n + 1)
        self.router = _create_address(deployer, n + 2)
        for name in ("Token", "Silent", "Router"):
            self.add(deployer, "deploy", block, None, load_artifact(name).bytecode)
        mint = self.add(deployer, "mint_many", block, self.token,
                        _call_mint_many(self.senders, _TOKEN_SUPPLY_EACH))  # fmt: skip
        mint.params["gas"] = hex(_GAS["mint_many"] + 40_000 * len(self.senders))

    def plan_layout(self, spec: ChainSpec, first_block: int) -> None:
        rng = self.rng
        for i, size in enumerate(_block_sizes(spec, rng)):
            block = first_block + i
            if spec.layout == "dense":
                for _ in range(size):
                    self.add_kind(_pick(rng, _DENSE_KINDS), block)
                continue
            n_tracked = min(size, rng.randint(1, 2))
            slots = set(rng.sample(range(size), n_tracked))
            for k in range(size):
                weights = _SPARSE_TRACKED_KINDS if k in slots else _SPARSE_OTHER_KINDS
                self.add_kind(_pick(rng, weights), block)


# -- generation -----------------------------------------------------------------


def generate(rpc_url: str, spec: ChainSpec) -> GeneratedChain:
    """Generate ``spec`` on the node at ``rpc_url`` (anvil) and return what was mined.

    The node must unlock its accounts (anvil's default) and support ``evm_mine``
    and ``evm_setAutomine``; automine is restored afterwards. Nothing else may send
    transactions to the node meanwhile (verification would fail). On a fresh node
    the result, hashes and blocks included, depends only on ``spec``. Raises
    `ChainError` when the node refuses a call or the mined chain differs from the plan.
    """
    t0 = time.monotonic()
    rpc = _Rpc(rpc_url)
    try:
        chain = _generate(rpc, spec)
    finally:
        rpc.close()
    log.info(
        "generated %s chain: %d txs (+%d setup) in blocks %d..%d, %.1f s, %d RPC calls",
        spec.layout, spec.total_txs, len(chain.all_txs) - spec.total_txs, chain.first_block,
        chain.head, time.monotonic() - t0, rpc.calls,
    )  # fmt: skip
    return chain


def _generate(rpc: _Rpc, spec: ChainSpec) -> GeneratedChain:
    chain_id = int(rpc.call("eth_chainId"), 16)
    senders = [a.lower() for a in rpc.call("eth_accounts")]
    if not senders:
        raise ChainError("the node has no unlocked accounts")
    latest = rpc.call("eth_getBlockByNumber", "latest", False)
    start = int(latest["number"], 16)
    base_fee = int(latest.get("baseFeePerGas") or "0x0", 16)
    counts = rpc.batch([("eth_getTransactionCount", [a, "pending"]) for a in senders])
    nonces = {a: int(c, 16) for a, c in zip(senders, counts, strict=True)}
    automine = _get_automine(rpc)

    planner = _Planner(random.Random(spec.seed), senders, nonces, chain_id, base_fee)
    setup_block = start + 1
    planner.plan_setup(setup_block)
    planner.plan_layout(spec, setup_block + 1)
    planned = planner.planned
    head = planned[-1].block
    log.debug("planned %d txs in blocks %d..%d", len(planned), setup_block, head)

    rpc.call("evm_setAutomine", False)
    try:
        rpc.call("anvil_setIntervalMining", 0)
    except ChainError:
        log.debug("node has no anvil_setIntervalMining; assuming no interval mining")
    try:
        _send_and_mine(rpc, planned)
    finally:
        if automine:
            rpc.call("evm_setAutomine", True)
    _verify(rpc, planned, planner)
    return _describe(spec, chain_id, head, setup_block + 1, planner)


def _get_automine(rpc: _Rpc) -> bool:
    try:
        return bool(rpc.call("anvil_getAutomine"))
    except ChainError:
        return False


def _send_and_mine(rpc: _Rpc, planned: list[_Planned]) -> None:
    i = 0
    last_log = time.monotonic()
    while i < len(planned):
        block = planned[i].block
        j = i
        while j < len(planned) and planned[j].block == block:
            j += 1
        group = planned[i:j]
        calls = [("eth_sendTransaction", [p.params]) for p in group]
        for p, h in zip(group, rpc.batched(calls, SEND_BATCH), strict=True):
            p.hash = cast(str, h).lower()
        rpc.call("evm_mine")
        i = j
        if time.monotonic() - last_log > 5:
            last_log = time.monotonic()
            log.info("sent %d/%d txs (block %d)", i, len(planned), block)


def _verify(rpc: _Rpc, planned: list[_Planned], planner: _Planner) -> None:
    """Read every planned block back; check membership, then sampled receipt statuses."""
    by_block: dict[int, set[str]] = {}
    for p in planned:
        by_block.setdefault(p.block, set()).add(p.hash)
    blocks = sorted(by_block)
    calls = [("eth_getBlockByNumber", [hex(b), False]) for b in blocks]
    for number, blk in zip(blocks, rpc.batched(calls, VERIFY_BATCH), strict=True):
        if blk is None:
            raise ChainError(f"block {number} was not mined")
        got = {h.lower() for h in blk["transactions"]}
        if got != by_block[number]:
            missing = sorted(by_block[number] - got)
            raise ChainError(
                f"block {number}: {len(missing)} planned txs missing (e.g. {missing[:3]}), "
                f"{len(got - by_block[number])} unplanned"
            )
    sample = [
        p for k, p in enumerate(planned)
        if p.kind in _REVERTING or p.kind in ("deploy", "mint_many") or k % RECEIPT_SAMPLE_EVERY == 0
    ]  # fmt: skip
    calls = [("eth_getTransactionReceipt", [p.hash]) for p in sample]
    expected_created = iter((planner.token, planner.silent, planner.router))
    for p, rcpt in zip(sample, rpc.batched(calls, VERIFY_BATCH), strict=True):
        status = int(rcpt["status"], 16)
        if status != (0 if p.kind in _REVERTING else 1):
            raise ChainError(f"tx {p.hash} ({p.kind}) has status {status}")
        if p.kind == "deploy" and (rcpt.get("contractAddress") or "").lower() != next(
            expected_created
        ):
            raise ChainError(f"deploy {p.hash} created {rcpt.get('contractAddress')}")
    log.debug("verified %d blocks and %d receipts", len(blocks), len(sample))


def _describe(
    spec: ChainSpec, chain_id: int, head: int, first_block: int, planner: _Planner
) -> GeneratedChain:
    token, silent, router = planner.token, planner.silent, planner.router
    emitted: dict[str, set[str]] = {token: set(), silent: set(), router: set()}
    direct: dict[str, set[str]] = {token: set(), silent: set(), router: set()}
    internal: dict[str, set[str]] = {token: set(), silent: set(), router: set()}
    reverted: set[str] = set()
    big: set[str] = set()
    deploy_txs: dict[str, str] = {}
    created = iter((token, silent, router))
    for p in planner.planned:
        h, kind = p.hash, p.kind
        to = p.params.get("to")
        if to in direct:
            direct[to].add(h)
        if kind in _REVERTING:
            reverted.add(h)
        if p.value > BIG_VALUE:
            big.add(h)
        if kind == "deploy":
            address = next(created)
            deploy_txs[address] = h
            if address == token:  # the constructor mints: Transfer
                emitted[token].add(h)
        elif kind in ("ping", "transfer", "approve", "mint_many"):
            emitted[token].add(h)
        elif kind == "route":
            emitted[token].add(h)
            internal[token].add(h)
            internal[silent].add(h)
    return GeneratedChain(
        chain_id=chain_id,
        head=head,
        token=token,
        silent=silent,
        router=router,
        token_abi=load_artifact("Token").abi,
        silent_abi=load_artifact("Silent").abi,
        router_abi=load_artifact("Router").abi,
        all_txs=[p.hash for p in planner.planned],
        emitted={a: frozenset(s) for a, s in emitted.items()},
        direct={a: frozenset(s) for a, s in direct.items()},
        internal={a: frozenset(s) for a, s in internal.items()},
        reverted=frozenset(reverted),
        big_value=frozenset(big),
        tx_block={p.hash: p.block for p in planner.planned},
        first_block=first_block,
        spec=spec,
        deploy_txs=deploy_txs,
    )


# -- persistence ----------------------------------------------------------------


def _sets_to_json(d: dict[str, frozenset[str]]) -> dict[str, list[str]]:
    return {k: sorted(v) for k, v in d.items()}


def _sets_from_json(d: dict[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    return {k: frozenset(v) for k, v in d.items()}


def save(chain: GeneratedChain, path: str | Path) -> None:
    """Write ``chain`` as JSON (sets as sorted lists) so benchmarks can cache it."""
    data = asdict(chain)
    for key in ("emitted", "direct", "internal"):
        data[key] = _sets_to_json(getattr(chain, key))
    data["reverted"] = sorted(chain.reverted)
    data["big_value"] = sorted(chain.big_value)
    Path(path).write_bytes(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS))


def load(path: str | Path) -> GeneratedChain:
    """Read a chain written by `save`."""
    data = orjson.loads(Path(path).read_bytes())
    spec = data.get("spec")
    return GeneratedChain(
        chain_id=data["chain_id"],
        head=data["head"],
        token=data["token"],
        silent=data["silent"],
        router=data["router"],
        token_abi=data["token_abi"],
        silent_abi=data["silent_abi"],
        router_abi=data["router_abi"],
        all_txs=data["all_txs"],
        emitted=_sets_from_json(data["emitted"]),
        direct=_sets_from_json(data["direct"]),
        internal=_sets_from_json(data["internal"]),
        reverted=frozenset(data["reverted"]),
        big_value=frozenset(data["big_value"]),
        tx_block={h: int(b) for h, b in data["tx_block"].items()},
        first_block=data.get("first_block", 0),
        spec=ChainSpec(**spec) if spec else None,
        deploy_txs=data.get("deploy_txs", {}),
    )


# -- CLI ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gapfill.testing.chain",
        description="Generate a deterministic test chain on a local anvil node.",
    )
    parser.add_argument("--rpc-url", required=True, help="the node, e.g. http://127.0.0.1:8545")
    parser.add_argument("--layout", choices=get_args(Layout), default="dense")
    parser.add_argument("--txs", type=int, required=True, help="transactions after setup")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--blocks", type=int, default=None, help="default: from the layout")
    parser.add_argument("--out", type=Path, help="write the chain description (JSON) here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    spec = ChainSpec(layout=args.layout, total_txs=args.txs, seed=args.seed, blocks=args.blocks)
    try:
        chain = generate(args.rpc_url, spec)
    except ChainError as exc:
        log.error("%s", exc)
        return 1
    if args.out:
        save(chain, args.out)
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
