"""A node's transaction and receipt JSON become a :class:`TxRow` and its :class:`LogRow` list.

Pure functions, no I/O. Inputs are what geth-compatible nodes return from
``eth_getTransactionByHash`` (or a full transaction object of
``eth_getBlockByNumber(n, true)``) and ``eth_getTransactionReceipt`` (or an item of
``eth_getBlockReceipts``). Output follows the public schema: hashes, addresses
and byte strings lowercase ``0x`` hex, quantities exact Python ``int``.

Per transaction type, which columns are filled:

=====  ===========  ==================================================================
type   name         columns besides the common ones
=====  ===========  ==================================================================
0      legacy       ``gas_price``; the EIP-1559 columns are ``None``
1      EIP-2930     ``gas_price``, ``access_list``
2      EIP-1559     ``max_fee_per_gas``, ``max_priority_fee_per_gas``, ``access_list``
3      EIP-4844     as 2, plus ``max_fee_per_blob_gas``, ``blob_versioned_hashes``,
                    and from the receipt ``blob_gas_used``, ``blob_gas_price``
4      EIP-7702     as 2, plus ``authorization_list``
other  (e.g. OP     whatever of the above fields the node reports; nothing is required
       deposit
       ``0x7e``)
=====  ===========  ==================================================================

Decisions worth knowing when querying:

* ``gas_price`` is the node's ``gasPrice`` whatever the type. For a mined type 2+
  transaction geth (and most nodes) report the price actually paid there
  (``min(maxFeePerGas, baseFee + maxPriorityFeePerGas)``); ``None`` when the node
  omits it. ``effective_gas_price`` is the receipt's ``effectiveGasPrice``; old
  nodes omit it from type 0/1 receipts, where it is by definition ``gas_price``,
  so that is stored instead.
* ``access_list`` is ``None`` for type 0 and ``[]`` for a typed transaction with
  an empty list: "not applicable" and "empty" stay distinct. Entries are
  ``{"address", "storageKeys"}``.
* ``authorization_list`` entries are ``{"chainId", "address", "nonce", "yParity",
  "r", "s"}``, each the node's hex string lowercased (``yParity`` falls back to
  ``v`` for nodes that name it so; a missing field is ``None``).
* ``status`` is ``None`` on pre-Byzantium receipts, which carry the post-state
  ``root`` instead; ``root`` is stored whenever the receipt has one.
* ``created_contract`` is the receipt's ``contractAddress`` for a contract
  creation (``to`` is ``null``), else ``None``.
* ``block_timestamp``: the explicit argument; else the transaction's
  ``blockTimestamp`` (recent geth adds it); else the receipt's (or its logs')
  ``blockTimestamp``; else ``None``.
* Block number, hash and index come from the receipt, which is always mined;
  a transaction from a different block than its receipt (a reorg between the
  two calls) raises :class:`BlockMismatchError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gapfill.enrich.decode import Decoder, method_id
from gapfill.model import LogRow, TxRow

__all__ = [
    "BlockMismatchError",
    "NormaliseError",
    "hex_int",
    "normalise_log",
    "normalise_tx",
    "timestamp_from_receipt",
]

# Types whose fee is a single gasPrice, and types known to have an access list.
_GAS_PRICE_TYPES = frozenset({0, 1})
_ACCESS_LIST_TYPES = frozenset({1, 2, 3, 4})
_KNOWN_TYPES = frozenset({0, 1, 2, 3, 4})


class NormaliseError(ValueError):
    """A transaction or receipt is malformed, or the two do not belong together."""


class BlockMismatchError(NormaliseError):
    """The transaction and its receipt come from different blocks.

    Usually a reorg between the two calls, or two nodes on different forks:
    fetching both again normally fixes it, so callers should retry rather than
    record a permanent failure.
    """


def hex_int(v: str | None) -> int | None:
    """A JSON-RPC quantity (``"0x1a"``) as an ``int``; ``None`` stays ``None``.

    ``"0x"`` reads as 0, and an ``int`` passes through (a few nodes send
    numbers). Raises ``ValueError`` on anything else.
    """
    if v is None:
        return None
    try:
        return int(v, 16)
    except TypeError:
        if isinstance(v, int):  # the annotation says str; a few nodes disagree
            return v
        raise
    except ValueError:
        if v == "0x":
            return 0
        raise


def timestamp_from_receipt(receipt: Mapping[str, Any]) -> int | None:
    """The block timestamp a receipt carries, if any.

    Recent geth puts ``blockTimestamp`` on every log; some nodes also put it on
    the receipt itself. ``None`` when neither is there (e.g. a receipt without
    logs from a node that only annotates logs).
    """
    ts = receipt.get("blockTimestamp")
    if ts is None:
        for log in receipt.get("logs") or ():
            ts = log.get("blockTimestamp")
            if ts is not None:
                break
    try:
        return hex_int(ts)
    except (TypeError, ValueError):
        return None


def _lower(v: str | None) -> str | None:
    return None if v is None else v.lower()


def _required(obj: Mapping[str, Any], key: str, what: str, tx_hash: str = "") -> Any:
    v = obj.get(key)
    if v is None:
        # The message is built only here: _required runs a dozen times per row.
        raise NormaliseError(f"{what} {tx_hash} has no {key!r}" if tx_hash else f"{what} has no {key!r}")
    return v


def _required_int(obj: Mapping[str, Any], key: str, what: str, tx_hash: str = "") -> int:
    v = hex_int(_required(obj, key, what, tx_hash))
    assert v is not None  # _required rejected None
    return v


def _access_list(v: Any) -> list[Any]:
    return [
        {
            "address": _lower(item.get("address")),
            "storageKeys": [k.lower() for k in item.get("storageKeys") or ()],
        }
        for item in v
    ]


_AUTH_KEYS = ("chainId", "address", "nonce", "yParity", "r", "s")


def _authorization_list(v: Any) -> list[Any]:
    out = []
    for item in v:
        entry = {k: _lower(item.get(k)) for k in _AUTH_KEYS}
        if entry["yParity"] is None:
            entry["yParity"] = _lower(item.get("v"))
        out.append(entry)
    return out


def normalise_log(
    chain_id: int,
    tx_hash: str,
    block_number: int,
    log: Mapping[str, Any],
    decoder: Decoder | None = None,
) -> LogRow:
    """One receipt log as a :class:`LogRow`; ``tx_hash`` must already be lowercase."""
    log_tx = log.get("transactionHash")
    if log_tx is not None and log_tx.lower() != tx_hash:
        raise NormaliseError(f"log of {log_tx} in the receipt of {tx_hash}")
    address = _required(log, "address", "log").lower()
    topics: Sequence[str] = log.get("topics") or ()
    data = (log.get("data") or "0x").lower()
    n = len(topics)
    log_block = hex_int(log.get("blockNumber"))
    event_name, event_args = (
        decoder.decode_log(address, topics, data) if decoder is not None and n else (None, None)
    )
    return LogRow(
        chain_id=chain_id,
        tx_hash=tx_hash,
        log_index=_required_int(log, "logIndex", "log"),
        block_number=block_number if log_block is None else log_block,
        address=address,
        topic0=topics[0].lower() if n > 0 else None,
        topic1=topics[1].lower() if n > 1 else None,
        topic2=topics[2].lower() if n > 2 else None,
        topic3=topics[3].lower() if n > 3 else None,
        data=data,
        event_name=event_name,
        event_args=event_args,
    )


def normalise_tx(
    chain_id: int,
    tx: Mapping[str, Any],
    receipt: Mapping[str, Any],
    block_timestamp: int | None,
    decoder: Decoder | None = None,
) -> tuple[TxRow, list[LogRow]]:
    """A transaction and its receipt as one :class:`TxRow` and its :class:`LogRow` list.

    ``block_timestamp`` is used when given; otherwise it is taken from the
    transaction or receipt when they carry it (see the module docstring). With a
    ``decoder``, call data and logs are ABI-decoded; without one only
    ``method_id`` is set.

    Raises :class:`NormaliseError` when a required field is missing or
    malformed or the receipt belongs to another transaction, and
    :class:`BlockMismatchError` (a subclass) when the two come from different
    blocks.
    """
    if not isinstance(tx, Mapping) or not isinstance(receipt, Mapping):
        raise NormaliseError("transaction or receipt is missing (null)")
    try:
        return _normalise_tx(chain_id, tx, receipt, block_timestamp, decoder)
    except NormaliseError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A field of the wrong JSON type or a malformed quantity.
        tx_hash = tx.get("hash")
        raise NormaliseError(f"malformed transaction or receipt {tx_hash}: {exc!r}") from exc


def _normalise_tx(
    chain_id: int,
    tx: Mapping[str, Any],
    receipt: Mapping[str, Any],
    block_timestamp: int | None,
    decoder: Decoder | None,
) -> tuple[TxRow, list[LogRow]]:
    tx_hash: str = _required(tx, "hash", "transaction").lower()
    r_hash: str = _required(receipt, "transactionHash", "receipt").lower()
    if r_hash != tx_hash:
        raise NormaliseError(f"receipt of {r_hash} given for transaction {tx_hash}")

    block_hash: str = _required(receipt, "blockHash", "receipt of", tx_hash).lower()
    block_number: int = _required_int(receipt, "blockNumber", "receipt of", tx_hash)
    tx_index: int = _required_int(receipt, "transactionIndex", "receipt of", tx_hash)
    tx_block = tx.get("blockHash")
    if tx_block is not None and tx_block.lower() != block_hash:
        raise BlockMismatchError(
            f"transaction {tx_hash} is in block {tx_block.lower()}, its receipt in {block_hash}"
        )

    g = tx.get
    tx_type = hex_int(g("type") or receipt.get("type")) or 0
    to_address = _lower(g("to"))
    input_hex: str = (g("input") or g("data") or "0x").lower()
    gas_price = hex_int(g("gasPrice"))

    if tx_type in _GAS_PRICE_TYPES:
        max_fee = max_priority = None
    else:
        max_fee = hex_int(g("maxFeePerGas"))
        max_priority = hex_int(g("maxPriorityFeePerGas"))
    known = tx_type in _KNOWN_TYPES
    access_list = None
    raw = g("accessList")
    if raw is not None and (tx_type in _ACCESS_LIST_TYPES or not known):
        access_list = _access_list(raw)
    elif tx_type in _ACCESS_LIST_TYPES:
        access_list = []
    max_fee_per_blob_gas = blob_hashes = blob_gas_used = blob_gas_price = None
    if tx_type == 3 or not known:
        max_fee_per_blob_gas = hex_int(g("maxFeePerBlobGas"))
        raw = g("blobVersionedHashes")
        blob_hashes = None if raw is None else [h.lower() for h in raw]
        blob_gas_used = hex_int(receipt.get("blobGasUsed"))
        blob_gas_price = hex_int(receipt.get("blobGasPrice"))
    authorization_list = None
    if tx_type == 4 or not known:
        raw = g("authorizationList")
        authorization_list = None if raw is None else _authorization_list(raw)

    effective_gas_price = hex_int(receipt.get("effectiveGasPrice"))
    if effective_gas_price is None and tx_type in _GAS_PRICE_TYPES:
        effective_gas_price = gas_price

    if block_timestamp is None:
        block_timestamp = hex_int(g("blockTimestamp"))
        if block_timestamp is None:
            block_timestamp = timestamp_from_receipt(receipt)

    if decoder is not None:
        mid, method_name, method_args = decoder.decode_input(to_address, input_hex)
    else:
        mid, method_name, method_args = method_id(input_hex), None, None

    raw_logs = _required(receipt, "logs", "receipt of", tx_hash)
    logs = [normalise_log(chain_id, tx_hash, block_number, log, decoder) for log in raw_logs]

    row = TxRow(
        chain_id=chain_id,
        tx_hash=tx_hash,
        block_number=block_number,
        block_hash=block_hash,
        tx_index=tx_index,
        block_timestamp=block_timestamp,
        from_address=_required(tx, "from", "transaction", tx_hash).lower(),
        to_address=to_address,
        value=_required_int(tx, "value", "transaction", tx_hash),
        input=input_hex,
        nonce=_required_int(tx, "nonce", "transaction", tx_hash),
        gas=_required_int(tx, "gas", "transaction", tx_hash),
        gas_price=gas_price,
        max_fee_per_gas=max_fee,
        max_priority_fee_per_gas=max_priority,
        tx_type=tx_type,
        status=hex_int(receipt.get("status")),
        root=_lower(receipt.get("root")),
        gas_used=_required_int(receipt, "gasUsed", "receipt of", tx_hash),
        cumulative_gas_used=_required_int(receipt, "cumulativeGasUsed", "receipt of", tx_hash),
        effective_gas_price=effective_gas_price,
        created_contract=_lower(receipt.get("contractAddress")) if to_address is None else None,
        access_list=access_list,
        max_fee_per_blob_gas=max_fee_per_blob_gas,
        blob_versioned_hashes=blob_hashes,
        blob_gas_used=blob_gas_used,
        blob_gas_price=blob_gas_price,
        authorization_list=authorization_list,
        method_id=mid,
        method_name=method_name,
        method_args=method_args,
        log_count=len(raw_logs),
    )
    return row, logs
