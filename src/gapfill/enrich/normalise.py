"""A node's transaction and receipt JSON become a :class:`TxRow` and its :class:`LogRow` list.

Pure functions, no I/O. Inputs are what geth-compatible nodes return from
``eth_getTransactionByHash`` (or a full transaction object of
``eth_getBlockByNumber(n, true)``) and ``eth_getTransactionReceipt`` (or an item of
``eth_getBlockReceipts``). Output follows the public schema: hashes, addresses
and byte strings lowercase ``0x`` hex, quantities exact Python ``int``. A quantity
that is not ``0x`` hex (a decimal ``"10"``, a sign, spaces, underscores) is refused
(:class:`NormaliseError`), never guessed, and so is a receipt with a log marked
``removed``.

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gapfill.enrich.decode import Decoder, method_id
from gapfill.model import LogRow, TxRow
from gapfill.quantity import QuantityError, hex_int

__all__ = [
    "BlockMismatchError",
    "MalformedAnswer",
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

#: Builds a row (a named tuple) from the tuple of its fields, without the Python-level
#: ``__new__`` a named tuple's constructor runs: that frame costs more than the tuple.
_new_row = tuple.__new__


class NormaliseError(ValueError):
    """A transaction or receipt is malformed, or the two do not belong together."""


class MalformedAnswer(NormaliseError, QuantityError):
    """A field of the node's answer is missing, of the wrong JSON type, or not a ``0x`` hex
    quantity; ``str()`` names it. Unlike a mismatch (a reorg between two calls), the node
    answers the same every time (its bug, or a chain's own format): the enricher raises it,
    so a batch's last attempt isolates the transaction and fails it for good (see
    ``gapfill.engine.worker``), rather than recording a failure that passes and is tried
    again on every run."""


class BlockMismatchError(NormaliseError):
    """The transaction and its receipt come from different blocks.

    Usually a reorg between the two calls, or two nodes on different forks:
    fetching both again normally fixes it, so callers should retry rather than
    record a permanent failure.
    """


def timestamp_from_receipt(receipt: Mapping[str, Any], tx: Any = None) -> int | None:
    """The block timestamp a receipt carries, else the transaction ``tx`` (if given), if any.

    Recent geth puts ``blockTimestamp`` on every log; some nodes also put it on
    the receipt itself, and anvil and recent geth on the transaction. ``None``
    when none has it (e.g. a receipt without logs from a node that only
    annotates logs, and no transaction).
    """
    ts = receipt.get("blockTimestamp")
    if ts is None:
        for log in receipt.get("logs") or ():
            ts = log.get("blockTimestamp")
            if ts is not None:
                break
    if ts is None and isinstance(tx, dict):
        ts = tx.get("blockTimestamp")
    if type(ts) is int:  # as hex_int reads it (anvil's receipts say a number), without its raise
        return ts
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
        raise MalformedAnswer(f"{what} {tx_hash} has no {key!r}" if tx_hash else f"{what} has no {key!r}")
    return v


def _required_int(obj: Mapping[str, Any], key: str, what: str, tx_hash: str = "") -> int:
    """The quantity ``obj[key]``; the slow path of the reads ``_normalise_tx`` inlines."""
    v = _required(obj, key, what, tx_hash)
    try:
        n = hex_int(v)
    except (TypeError, ValueError):
        raise MalformedAnswer(_not_hex(what, tx_hash, key, v)) from None
    assert n is not None  # _required rejected None
    return n


def _not_hex(what: str, tx_hash: str, key: str, v: Any) -> str:
    return (f"{what} {tx_hash} has {key!r} {str(v)[:60]!r}, not a 0x hex quantity" if tx_hash
            else f"{what} has {key!r} {str(v)[:60]!r}, not a 0x hex quantity")  # fmt: skip


#: The quantities and strings of a transaction, a receipt and a log that the rows read: what
#: :func:`_bad_field` looks through, once normalising them failed, to name the bad one.
_QUANTITIES = {
    "transaction": ("blockNumber", "transactionIndex", "type", "value", "nonce", "gas", "gasPrice",
                    "maxFeePerGas", "maxPriorityFeePerGas", "maxFeePerBlobGas", "blockTimestamp"),
    "receipt of": ("blockNumber", "transactionIndex", "type", "status", "gasUsed", "cumulativeGasUsed",
                   "effectiveGasPrice", "blobGasUsed", "blobGasPrice", "blockTimestamp"),
    "log in the receipt of": ("blockNumber", "logIndex", "blockTimestamp"),
}  # fmt: skip
_STRINGS = {
    "transaction": ("hash", "from", "to", "blockHash", "input"),
    "receipt of": ("transactionHash", "blockHash", "contractAddress", "root"),
    "log in the receipt of": ("address", "data", "transactionHash"),
}


def _bad_field(tx: Mapping[str, Any], receipt: Mapping[str, Any], tx_hash: str) -> str | None:
    """The first field of ``tx``, ``receipt`` or its logs that is not what the rows read
    (a quantity not 0x hex, a string of another JSON type), said as a sentence; None if
    none is. The slow path of a failure: the hot one reads each field once, unnamed."""
    logs = receipt.get("logs")
    parts = [("transaction", tx), ("receipt of", receipt)]
    if isinstance(logs, list):
        parts += [("log in the receipt of", log) for log in logs if isinstance(log, Mapping)]
    for what, part in parts:
        for key in _QUANTITIES[what]:
            v = part.get(key)
            try:
                hex_int(v)
            except (TypeError, ValueError):
                return _not_hex(what, tx_hash, key, v)
        for key in _STRINGS[what]:
            v = part.get(key)
            if v is not None and not isinstance(v, str):
                return f"{what} {tx_hash} has {key!r} {str(v)[:60]!r}, not a string"
    return None


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
    block_hex: str | None = None,
) -> LogRow:
    """One receipt log as a :class:`LogRow`; ``tx_hash`` must already be lowercase.

    ``block_hex``: the receipt's ``blockNumber`` as sent, ``block_number`` read; a log
    that repeats it (as every log does) is not read again.

    Raises :class:`NormaliseError` for a log marked ``removed`` (reorged out): a
    receipt that has one is no answer to store.
    """
    g: Callable[[str], Any] = log.get
    log_tx = g("transactionHash")
    if log_tx is not None and log_tx != tx_hash and log_tx.lower() != tx_hash:
        raise NormaliseError(f"log of {log_tx} in the receipt of {tx_hash}")
    if g("removed") is True:
        raise NormaliseError(f"log {g('logIndex')} of {tx_hash} is marked removed (reorged out)")
    address = g("address")
    if address is None:
        _required(log, "address", "log in the receipt of", tx_hash)
    address = address.lower()
    topics: Sequence[str] = g("topics") or ()
    data = (g("data") or "0x").lower()
    n = len(topics)
    v = g("blockNumber")
    if v is not None and v != block_hex:
        try:
            block_number = int(v, 16)
            if not (v.isalnum() and v.isascii() and "x" in v):  # 0x hex only, as in hex_int
                raise ValueError(v)
        except (TypeError, ValueError):
            block_number = hex_int(v)  # type: ignore[assignment]  # an int, "0x", or raises
    v = g("logIndex")
    try:
        log_index = int(v, 16)
        if not (v.isalnum() and v.isascii() and "x" in v):  # 0x hex only, as in hex_int
            raise ValueError(v)
    except (TypeError, ValueError):
        log_index = _required_int(log, "logIndex", "log in the receipt of", tx_hash)
    # Each topic is lowered once, for the row and the decoder both.
    topic0 = topic1 = topic2 = topic3 = None
    if n:
        topic0 = topics[0].lower()
        lowered: Sequence[str] = (topic0,)
        if n > 1:
            topic1 = topics[1].lower()
            lowered = (topic0, topic1)
            if n > 2:
                topic2 = topics[2].lower()
                lowered = (topic0, topic1, topic2)
                if n > 3:
                    topic3 = topics[3].lower()
                    lowered = (topic0, topic1, topic2, topic3)
    event_name = event_args = None
    if decoder is not None and topic0 is not None:
        if n > 4:  # no EVM log has more (LOG0 to LOG4): the decoder lowers them all itself
            event_name, event_args = decoder.decode_log(address, topics, data)
        else:
            event_name, event_args = decoder.decode_log_lower(address, topic0, lowered, data)
    return _new_row(LogRow, (
        chain_id, tx_hash, log_index, block_number, address, topic0, topic1, topic2, topic3,
        data, event_name, event_args,
    ))  # fmt: skip


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
    if not (type(tx) is dict or isinstance(tx, Mapping)) or not (
        type(receipt) is dict or isinstance(receipt, Mapping)
    ):  # parsed JSON is a plain dict: skip the (slow) ABC check
        raise NormaliseError("transaction or receipt is missing (null)")
    try:
        return _normalise_tx(chain_id, tx, receipt, block_timestamp, decoder)
    except NormaliseError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A field of the wrong JSON type or a malformed quantity: named when it is one the
        # rows read (the hot path does not say which it was reading).
        tx_hash = str(tx.get("hash")).lower()
        said = _bad_field(tx, receipt, tx_hash) or f"malformed transaction or receipt {tx_hash}: {exc!r}"
        raise MalformedAnswer(said) from exc


def _normalise_tx(
    chain_id: int,
    tx: Mapping[str, Any],
    receipt: Mapping[str, Any],
    block_timestamp: int | None,
    decoder: Decoder | None,
) -> tuple[TxRow, list[LogRow]]:
    # The hottest function of a run: fields are read with one dict lookup and one int()
    # each, and hex_int's rules (0x hex only: isalnum, isascii and one "x") are checked once
    # on the common quantities together (``quick``), less than a check per field costs. When
    # that check fails, each field is read again where it always was, by the helpers
    # (_required, _required_int, hex_int), which raise the same errors or read the odd
    # values (ints, "0x") that int(v, 16) refuses.
    g: Callable[[str], Any] = tx.get
    rg: Callable[[str], Any] = receipt.get
    v = g("hash")
    if v is None:
        _required(tx, "hash", "transaction")
    tx_hash: str = v.lower()
    r = rg("transactionHash")
    if r is None:
        _required(receipt, "transactionHash", "receipt")
    if r != v:  # the same string is the same hash: not lowered again
        r_hash: str = r.lower()
        if r_hash != tx_hash:
            raise NormaliseError(f"receipt of {r_hash} given for transaction {tx_hash}")

    v = rg("blockHash")
    if v is None:
        _required(receipt, "blockHash", "receipt of", tx_hash)
    block_hash: str = v.lower()
    type_hex = g("type") or rg("type")
    block_hex = rg("blockNumber")
    index_hex = rg("transactionIndex")
    value_hex = g("value")
    nonce_hex = g("nonce")
    gas_hex = g("gas")
    gas_price_hex = g("gasPrice")
    status_hex = rg("status")
    gas_used_hex = rg("gasUsed")
    cumulative_hex = rg("cumulativeGasUsed")
    effective_hex = rg("effectiveGasPrice")
    try:
        tx_type = int(type_hex, 16)
        block_number = int(block_hex, 16)
        tx_index = int(index_hex, 16)
        value = int(value_hex, 16)
        nonce = int(nonce_hex, 16)
        gas = int(gas_hex, 16)
        gas_price: int | None = int(gas_price_hex, 16)
        status: int | None = int(status_hex, 16)
        gas_used = int(gas_used_hex, 16)
        cumulative_gas_used = int(cumulative_hex, 16)
        effective_gas_price: int | None = int(effective_hex, 16)
        # int() took each (none is None, nor a number); int() takes one "x" at most, as the
        # prefix: eleven of them are a prefix each.
        said: str = (type_hex + block_hex + index_hex + value_hex + nonce_hex + gas_hex + gas_price_hex
                     + status_hex + gas_used_hex + cumulative_hex + effective_hex)  # fmt: skip
        quick = said.isalnum() and said.isascii() and said.count("x") == 11
    except (TypeError, ValueError):
        quick = False
    if not quick:
        block_number = _required_int(receipt, "blockNumber", "receipt of", tx_hash)
        tx_index = _required_int(receipt, "transactionIndex", "receipt of", tx_hash)
    tx_block = g("blockHash")
    if tx_block is not None and tx_block != block_hash and tx_block.lower() != block_hash:
        raise BlockMismatchError(
            f"transaction {tx_hash} is in block {tx_block.lower()}, its receipt in {block_hash}"
        )

    if not quick:
        tx_type = hex_int(type_hex) or 0
    to_address = g("to")
    if to_address is not None:
        to_address = to_address.lower()
    input_hex: str = (g("input") or g("data") or "0x").lower()
    if not quick:
        gas_price = hex_int(gas_price_hex)

    if tx_type in _GAS_PRICE_TYPES:
        max_fee = max_priority = None
    else:
        v = g("maxFeePerGas")
        w = g("maxPriorityFeePerGas")
        try:  # as above, the two checked together
            max_fee = int(v, 16)
            max_priority = int(w, 16)
            said = v + w
            if not (said.isalnum() and said.isascii() and said.count("x") == 2):
                raise ValueError(said)
        except (TypeError, ValueError):
            max_fee = hex_int(v)
            max_priority = hex_int(w)
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
        blob_gas_used = hex_int(rg("blobGasUsed"))
        blob_gas_price = hex_int(rg("blobGasPrice"))
    authorization_list = None
    if tx_type == 4 or not known:
        raw = g("authorizationList")
        authorization_list = None if raw is None else _authorization_list(raw)

    if not quick:
        effective_gas_price = hex_int(effective_hex)
    if effective_gas_price is None and tx_type in _GAS_PRICE_TYPES:
        effective_gas_price = gas_price

    if block_timestamp is None:
        block_timestamp = hex_int(g("blockTimestamp"))
        if block_timestamp is None:
            block_timestamp = timestamp_from_receipt(receipt)

    if decoder is not None:
        mid, method_name, method_args = decoder.decode_input_lower(to_address, input_hex)
    else:
        mid, method_name, method_args = method_id(input_hex), None, None

    raw_logs = rg("logs")
    if raw_logs is None:
        _required(receipt, "logs", "receipt of", tx_hash)
    logs: list[LogRow] = []
    if raw_logs != []:  # (most transactions have none, and a comprehension is a call)
        logs = [normalise_log(chain_id, tx_hash, block_number, log, decoder, block_hex)
                for log in raw_logs]

    v = g("from")
    if v is None:
        _required(tx, "from", "transaction", tx_hash)
    from_address: str = v.lower()
    if not quick:
        value = _required_int(tx, "value", "transaction", tx_hash)
        nonce = _required_int(tx, "nonce", "transaction", tx_hash)
        gas = _required_int(tx, "gas", "transaction", tx_hash)
        status = hex_int(status_hex)
    root = rg("root")
    if root is not None:
        root = root.lower()
    if not quick:
        gas_used = _required_int(receipt, "gasUsed", "receipt of", tx_hash)
        cumulative_gas_used = _required_int(receipt, "cumulativeGasUsed", "receipt of", tx_hash)
    created = None
    if to_address is None:
        created = rg("contractAddress")
        if created is not None:
            created = created.lower()

    row = _new_row(TxRow, (
        chain_id, tx_hash, block_number, block_hash, tx_index, block_timestamp, from_address,
        to_address, value, input_hex, nonce, gas, gas_price, max_fee, max_priority, tx_type,
        status, root, gas_used, cumulative_gas_used, effective_gas_price, created, access_list,
        max_fee_per_blob_gas, blob_hashes, blob_gas_used, blob_gas_price, authorization_list,
        mid, method_name, method_args, len(raw_logs),
    ))  # fmt: skip
    return row, logs
