"""An independent reader of what the node says, for exactness tests of enrichment.

It shares no code with ``gapfill.enrich`` or ``gapfill.rpc``: it asks the node
with plain ``urllib`` JSON-RPC batches (``eth_getTransactionByHash``,
``eth_getTransactionReceipt``, ``eth_getBlockByNumber``) and computes, from the
public schema (README "Schema"), the row each transaction and log must have.
Decoding uses ``eth_abi`` directly on the ABI entries.

Conventions it checks: quantities are exact ints, hashes, addresses and bytes
lowercase ``0x`` hex; decoded arguments are keyed by ABI parameter name
(``argN`` when unnamed) with integers as decimal strings, bytes as ``0x`` hex,
addresses lowercase, bools as bools and arrays as lists.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import eth_abi
from eth_hash.auto import keccak

TX_FIELDS = (
    "chain_id", "tx_hash", "block_number", "block_hash", "tx_index", "block_timestamp",
    "from_address", "to_address", "value", "input", "nonce", "gas", "gas_price",
    "max_fee_per_gas", "max_priority_fee_per_gas", "tx_type", "status", "root", "gas_used",
    "cumulative_gas_used", "effective_gas_price", "created_contract", "access_list",
    "max_fee_per_blob_gas", "blob_versioned_hashes", "blob_gas_used", "blob_gas_price",
    "authorization_list", "method_id", "method_name", "method_args", "log_count",
)  # fmt: skip
LOG_FIELDS = (
    "chain_id", "tx_hash", "log_index", "block_number", "address", "topic0", "topic1",
    "topic2", "topic3", "data", "event_name", "event_args",
)  # fmt: skip

Abi = Sequence[Mapping[str, Any]]


def rpc_batch(url: str, calls: Sequence[tuple[str, list[Any]]], size: int = 500) -> list[Any]:
    """Results of ``calls`` in order, by JSON-RPC batches of ``size``; an error raises."""
    out: list[Any] = []
    for start in range(0, len(calls), size):
        chunk = calls[start : start + size]
        payload = [{"jsonrpc": "2.0", "id": i, "method": m, "params": p} for i, (m, p) in enumerate(chunk)]
        req = urllib.request.Request(
            url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            replies = json.loads(resp.read())
        by_id = {r["id"]: r for r in replies}
        for i, (m, p) in enumerate(chunk):
            r = by_id[i]
            if "error" in r:
                raise RuntimeError(f"{m}{p} failed: {r['error']}")
            out.append(r["result"])
    return out


def _int(v: str | None) -> int | None:
    return None if v is None else int(v, 16)


def _low(v: str | None) -> str | None:
    return None if v is None else v.lower()


# -- ABI decoding with eth_abi ------------------------------------------------------------


def _canonical(param: Mapping[str, Any]) -> str:
    t: str = param["type"]
    if t.startswith("tuple"):
        inner = ",".join(_canonical(c) for c in param["components"])
        return f"({inner}){t[len('tuple') :]}"
    return t


def _fmt(param: Mapping[str, Any], value: Any) -> Any:
    t: str = param["type"]
    if t.endswith("]"):
        inner = dict(param)
        inner["type"] = t[: t.rindex("[")]
        return [_fmt(inner, v) for v in value]
    if t == "tuple":
        return _named(param["components"], value)
    if t == "address":
        return str(value).lower()
    if t == "bool":
        return bool(value)
    if t.startswith(("uint", "int")):
        return str(value)
    if t.startswith("bytes"):
        return "0x" + bytes(value).hex()
    if t == "string":
        return str(value)
    raise AssertionError(f"oracle cannot format {t}")


def _names(params: Sequence[Mapping[str, Any]]) -> list[str]:
    names = [p.get("name") or "" for p in params]
    return [n if n and names.count(n) == 1 else f"arg{i}" for i, n in enumerate(names)]


def _named(params: Sequence[Mapping[str, Any]], values: Sequence[Any]) -> dict[str, Any]:
    return {n: _fmt(p, v) for n, p, v in zip(_names(params), params, values, strict=True)}


def _signature(entry: Mapping[str, Any]) -> str:
    return f"{entry['name']}({','.join(_canonical(p) for p in entry['inputs'])})"


def decode_call(abi: Abi | None, input_hex: str) -> tuple[str | None, dict[str, Any] | None]:
    """(method_name, method_args) of call data for the contract's ABI, or (None, None)."""
    if not abi or len(input_hex) < 10:
        return None, None
    selector = bytes.fromhex(input_hex[2:10])
    for entry in abi:
        if entry.get("type") != "function":
            continue
        if bytes(keccak(_signature(entry).encode()))[:4] != selector:
            continue
        types = [_canonical(p) for p in entry["inputs"]]
        values = eth_abi.decode(types, bytes.fromhex(input_hex[10:]))
        return entry["name"], _named(entry["inputs"], values)
    return None, None


def decode_event(
    abi: Abi | None, topics: Sequence[str], data: str
) -> tuple[str | None, dict[str, Any] | None]:
    """(event_name, event_args) of a log for the emitting contract's ABI, or (None, None)."""
    if not abi or not topics:
        return None, None
    for entry in abi:
        if entry.get("type") != "event" or entry.get("anonymous"):
            continue
        if "0x" + bytes(keccak(_signature(entry).encode())).hex() != topics[0].lower():
            continue
        inputs = entry["inputs"]
        indexed = [p for p in inputs if p.get("indexed")]
        if len(indexed) != len(topics) - 1:
            continue
        plain = [p for p in inputs if not p.get("indexed")]
        plain_values = iter(eth_abi.decode([_canonical(p) for p in plain], bytes.fromhex(data[2:])))
        topic_values = iter(topics[1:])
        values: list[Any] = []
        for p in inputs:
            if p.get("indexed"):
                (v,) = eth_abi.decode([_canonical(p)], bytes.fromhex(next(topic_values)[2:]))
                values.append(v)
            else:
                values.append(next(plain_values))
        return entry["name"], _named(inputs, values)
    return None, None


# -- expected rows ---------------------------------------------------------------------


@dataclass
class NodeView:
    """What the node returned for some transactions: tx, receipt and block header."""

    chain_id: int
    txs: dict[str, dict[str, Any]] = field(default_factory=dict)
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)
    blocks: dict[int, dict[str, Any]] = field(default_factory=dict)


def read_node(url: str, hashes: Iterable[str]) -> NodeView:
    """Ask the node for every transaction, receipt and (header of) block of ``hashes``."""
    hs = sorted({h.lower() for h in hashes})
    chain_id = int(rpc_batch(url, [("eth_chainId", [])])[0], 16)
    view = NodeView(chain_id)
    calls: list[tuple[str, list[Any]]] = []
    for h in hs:
        calls.append(("eth_getTransactionByHash", [h]))
        calls.append(("eth_getTransactionReceipt", [h]))
    answers = rpc_batch(url, calls)
    for i, h in enumerate(hs):
        tx, rec = answers[2 * i], answers[2 * i + 1]
        assert tx is not None and rec is not None, f"the node does not know {h}"
        view.txs[h], view.receipts[h] = tx, rec
    numbers = sorted({int(r["blockNumber"], 16) for r in view.receipts.values()})
    for n, block in zip(numbers, rpc_batch(url, [("eth_getBlockByNumber", [hex(n), False]) for n in numbers]),
                        strict=True):  # fmt: skip
        view.blocks[n] = block
    return view


def expected_tx(view: NodeView, tx_hash: str, abis: Mapping[str, Abi | None]) -> dict[str, Any]:
    """The ``transactions`` row of ``tx_hash`` as the public schema defines it."""
    tx, rec = view.txs[tx_hash], view.receipts[tx_hash]
    block_number = int(rec["blockNumber"], 16)
    tx_type = int(tx["type"], 16)
    to = _low(tx.get("to"))
    input_hex = tx["input"].lower()
    if tx_type in (1, 2):
        access_list: list[Any] | None = [
            {"address": e["address"].lower(), "storageKeys": [k.lower() for k in e["storageKeys"]]}
            for e in tx["accessList"]
        ]
    else:
        assert tx_type == 0, f"the test chain has types 0-2, not {tx_type}"
        access_list = None
    method_name, method_args = decode_call(abis.get(to) if to else None, input_hex)
    return {
        "chain_id": view.chain_id,
        "tx_hash": tx_hash,
        "block_number": block_number,
        "block_hash": rec["blockHash"].lower(),
        "tx_index": int(rec["transactionIndex"], 16),
        "block_timestamp": int(view.blocks[block_number]["timestamp"], 16),
        "from_address": tx["from"].lower(),
        "to_address": to,
        "value": int(tx["value"], 16),
        "input": input_hex,
        "nonce": int(tx["nonce"], 16),
        "gas": int(tx["gas"], 16),
        "gas_price": _int(tx.get("gasPrice")),
        "max_fee_per_gas": int(tx["maxFeePerGas"], 16) if tx_type == 2 else None,
        "max_priority_fee_per_gas": int(tx["maxPriorityFeePerGas"], 16) if tx_type == 2 else None,
        "tx_type": tx_type,
        "status": int(rec["status"], 16),
        "root": _low(rec.get("root")),
        "gas_used": int(rec["gasUsed"], 16),
        "cumulative_gas_used": int(rec["cumulativeGasUsed"], 16),
        "effective_gas_price": int(rec["effectiveGasPrice"], 16),
        "created_contract": rec["contractAddress"].lower() if to is None else None,
        "access_list": access_list,
        "max_fee_per_blob_gas": None,
        "blob_versioned_hashes": None,
        "blob_gas_used": None,
        "blob_gas_price": None,
        "authorization_list": None,
        "method_id": input_hex[:10] if len(input_hex) >= 10 else None,
        "method_name": method_name,
        "method_args": method_args,
        "log_count": len(rec["logs"]),
    }


def expected_logs(view: NodeView, tx_hash: str, abis: Mapping[str, Abi | None]) -> list[dict[str, Any]]:
    """The ``logs`` rows of ``tx_hash``, in log index order."""
    out = []
    for log in view.receipts[tx_hash]["logs"]:
        topics = [t.lower() for t in log["topics"]]
        address = log["address"].lower()
        data = log["data"].lower()
        name, args = decode_event(abis.get(address), topics, data)
        padded = topics + [None] * (4 - len(topics))
        out.append({
            "chain_id": view.chain_id,
            "tx_hash": tx_hash,
            "log_index": int(log["logIndex"], 16),
            "block_number": int(log["blockNumber"], 16),
            "address": address,
            "topic0": padded[0], "topic1": padded[1], "topic2": padded[2], "topic3": padded[3],
            "data": data,
            "event_name": name,
            "event_args": args,
        })  # fmt: skip
    return out


def diff_rows(
    got: Sequence[Mapping[str, Any]], want: Sequence[Mapping[str, Any]], key: Sequence[str], limit: int = 8
) -> list[str]:
    """Human-readable differences between stored and expected rows (empty when equal)."""
    g = {tuple(r[k] for k in key): r for r in got}
    w = {tuple(r[k] for k in key): r for r in want}
    problems: list[str] = []
    for k in sorted(set(w) - set(g))[:limit]:
        problems.append(f"missing row {k}")
    for k in sorted(set(g) - set(w))[:limit]:
        problems.append(f"unexpected row {k}")
    for k in sorted(set(g) & set(w)):
        if len(problems) >= 3 * limit:
            break
        a, b = g[k], w[k]
        if set(a) != set(b):
            problems.append(f"{k}: columns {sorted(set(a) ^ set(b))} differ")
            continue
        for col in b:
            if a[col] != b[col] or type(a[col]) is not type(b[col]):
                problems.append(f"{k} {col}: stored {a[col]!r}, node says {b[col]!r}")
    return problems
