"""normalise_tx against real geth responses (tests/fixtures/execution-apis).

Expected values are written out from the fixture JSON by hand (hex literals
where the node gave hex), never recomputed with the code under test.
"""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from typing import Any

import pytest
from eth_abi.abi import encode
from fixtures_io import load_io, result

from gapfill.enrich.decode import Decoder
from gapfill.enrich.normalise import (
    BlockMismatchError,
    MalformedAnswer,
    NormaliseError,
    hex_int,
    normalise_tx,
    timestamp_from_receipt,
)
from gapfill.model import LogRow, TxRow

CHAIN = 0xC72DD9D5E883E  # the execution-apis test chain
SENDER = "0x7435ed30a8b4aeb0877cef0c6e8cffe834eb865f"
EMITTER = "0x7dcd17433742f4c0ca53122ab541d0ba67fc27df"
EMIT_TOPIC = "0x00000000000000000000000000000000000000000000000000000000656d6974"
ZERO_KEY = "0x" + "00" * 32


def pair(tx_fixture: str, receipt_fixture: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    tx = result(f"eth_getTransactionByHash/{tx_fixture}")
    receipt = result(f"eth_getTransactionReceipt/{receipt_fixture or tx_fixture}")
    return tx, receipt


def emit_log(tx_hash: str, block: int, slot_key: str, data: str) -> LogRow:
    return LogRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        log_index=0,
        block_number=block,
        address=EMITTER,
        topic0=EMIT_TOPIC,
        topic1=slot_key,
        topic2=None,
        topic3=None,
        data=data,
        event_name=None,
        event_args=None,
    )


# --- one test per transaction type ------------------------------------------


def test_legacy_pre_byzantium_receipt_keeps_root_and_has_no_status() -> None:
    row, logs = normalise_tx(CHAIN, *pair("get-legacy-tx", "get-legacy-receipt"), None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash="0x3fbac8b19b59077cd29bbacc3815d73577b45a4d976cae80b04c98c793684c07",
        block_number=3,
        block_hash="0xb8a651cb280e169015aef5235a141cb2d905058d1ff9bba788b7ad2c729c9837",
        tx_index=0,
        block_timestamp=0x1E,
        from_address=SENDER,
        to_address="0xc7b99a164efd027a93f147376cc7da7c67c6bbe0",
        value=1,
        input="0x",
        nonce=0x3F,
        gas=21000,
        gas_price=1,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=0,
        status=None,
        root="0x09ebe9c3ee77cd8d23faf37c62cf702b3c00e71dcadbef4d21355f35921b49ca",
        gas_used=21000,
        cumulative_gas_used=21000,
        effective_gas_price=1,
        created_contract=None,
        access_list=None,
        max_fee_per_blob_gas=None,
        blob_versioned_hashes=None,
        blob_gas_used=None,
        blob_gas_price=None,
        authorization_list=None,
        method_id=None,
        method_name=None,
        method_args=None,
        log_count=0,
    )
    assert logs == []


CREATE_INPUT = (
    "0x600d380380600d6000396000f3600043815260200146815260200141815260200148815260200144"
    "81526020013281526020013481526020016000f3"
)


@pytest.mark.parametrize(
    ("tx_fixture", "receipt_fixture"),
    [("get-legacy-create", "get-legacy-contract"), ("get-legacy-input", "get-legacy-input")],
)
def test_contract_creation(tx_fixture: str, receipt_fixture: str) -> None:
    row, logs = normalise_tx(CHAIN, *pair(tx_fixture, receipt_fixture), None, Decoder())
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash="0xc1d605c6612a5fe84dc95810030bfe5b1d327652b381bc695e28f50d13b2b09e",
        block_number=1,
        block_hash="0x80e911b62f552f563a2544dfef5eb39ec8863d9082c998ca6b657f76e19de38e",
        tx_index=0,
        block_timestamp=0xA,
        from_address=SENDER,
        to_address=None,
        value=0,
        input=CREATE_INPUT,
        nonce=0,
        gas=0x13A54,
        gas_price=1,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=0,
        status=None,
        root="0x9d6eec3457f11763a235d68c58367a740f429f01fd310692736b54e0019df44b",
        gas_used=0x102D3,
        cumulative_gas_used=0x102D3,
        effective_gas_price=1,
        created_contract="0x9344b07175800259691961298ca11c824e65032d",
        access_list=None,
        max_fee_per_blob_gas=None,
        blob_versioned_hashes=None,
        blob_gas_used=None,
        blob_gas_price=None,
        authorization_list=None,
        method_id="0x600d3803",  # the start of the init code, as for any input of 4+ bytes
        method_name=None,
        method_args=None,
        log_count=0,
    )
    assert logs == []


def test_access_list_type_1() -> None:
    tx_hash = "0x695ad02907c9e13ab7c69963f723fa46ac13cd5e2314f61eab2cb2f07b946faa"
    block_hash = "0xd4c1a87837460a5d00d7225a1406ccafcfe765d40f277eaae65f17adff7dc50a"
    slot = "0x95104e47e1982aba633477f377b1511396c3fe83600224bcb0c78949be705b33"
    row, logs = normalise_tx(CHAIN, *pair("get-access-list"), None, Decoder())
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        block_number=0x18,
        block_hash=block_hash,
        tx_index=0,
        block_timestamp=0xF0,
        from_address=SENDER,
        to_address=EMITTER,
        value=2,
        input="0x0e394e7c8a2b32c9656d6974",
        nonce=0x85,
        gas=100000,
        gas_price=1,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=1,
        status=1,
        root=None,
        gas_used=0xCA9C,
        cumulative_gas_used=0xCA9C,
        effective_gas_price=1,
        created_contract=None,
        access_list=[{"address": EMITTER, "storageKeys": [ZERO_KEY, slot]}],
        max_fee_per_blob_gas=None,
        blob_versioned_hashes=None,
        blob_gas_used=None,
        blob_gas_price=None,
        authorization_list=None,
        method_id="0x0e394e7c",
        method_name=None,
        method_args=None,
        log_count=1,
    )
    assert logs == [emit_log(tx_hash, 0x18, slot, "0x" + "00" * 31 + "0f")]


def test_dynamic_fee_type_2() -> None:
    tx_hash = "0x205405746564cbcf1dd53fb5ac92c7622d3792d82f03c59d9baddf2443d91864"
    block_hash = "0xb82be38216daf4487ab4fcafe9413892e7140f6816276560ec10d94d039db1aa"
    slot = "0x13bd2394f758553be374ffa4a9455cdf5e6ef3d905acd02746df2d12361e1ace"
    row, logs = normalise_tx(CHAIN, *pair("get-dynamic-fee"), None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        block_number=0x1B,
        block_hash=block_hash,
        tx_index=0,
        block_timestamp=0x10E,
        from_address=SENDER,
        to_address=EMITTER,
        value=2,
        input="0x1ee8f6decf498faf656d6974",
        nonce=0x90,
        gas=100000,
        gas_price=1_000_000_001,
        max_fee_per_gas=1_000_000_001,
        max_priority_fee_per_gas=1,
        tx_type=2,
        status=1,
        root=None,
        gas_used=0xCA9C,
        cumulative_gas_used=0xCA9C,
        effective_gas_price=1_000_000_001,
        created_contract=None,
        access_list=[{"address": EMITTER, "storageKeys": [ZERO_KEY, slot]}],
        max_fee_per_blob_gas=None,
        blob_versioned_hashes=None,
        blob_gas_used=None,
        blob_gas_price=None,
        authorization_list=None,
        method_id="0x1ee8f6de",
        method_name=None,
        method_args=None,
        log_count=1,
    )
    assert logs == [emit_log(tx_hash, 0x1B, slot, "0x" + "00" * 31 + "13")]


def test_blob_type_3() -> None:
    tx_hash = "0x4bb6fa064c302d27ea9ac821e061bcc336b8fa40de77f01e116c6461d47e7ac1"
    block_hash = "0x9e5e1e79c57f257def6a0e882d10863e2a98b034e6e0fdaccd7ff7b31312105d"
    slot = "0x35f96bc70aa62a539fa99d9153b0f8aaa4594abf70cc8a8d9018e04e39a17982"
    row, logs = normalise_tx(CHAIN, *pair("get-blob-tx"), None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        block_number=0x2A,
        block_hash=block_hash,
        tx_index=0,
        block_timestamp=0x1A4,
        from_address=SENDER,
        to_address=EMITTER,
        value=3,
        input="0x29db68258899c2fe656d6974",
        nonce=0xC7,
        gas=100000,
        gas_price=135_524_924,
        max_fee_per_gas=135_524_924,
        max_priority_fee_per_gas=1,
        tx_type=3,
        status=1,
        root=None,
        gas_used=0xCA9C,
        cumulative_gas_used=0xCA9C,
        effective_gas_price=135_524_924,
        created_contract=None,
        access_list=[{"address": EMITTER, "storageKeys": [ZERO_KEY, slot]}],
        max_fee_per_blob_gas=0x20000,
        blob_versioned_hashes=["0x015a4cab4911426699ed34483de6640cf55a568afc5c5edffdcbd8bcd4452f68"],
        blob_gas_used=0x20000,
        blob_gas_price=1,
        authorization_list=None,
        method_id="0x29db6825",
        method_name=None,
        method_args=None,
        log_count=1,
    )
    assert logs == [emit_log(tx_hash, 0x2A, slot, "0x" + "00" * 31 + "25")]


def test_setcode_type_4() -> None:
    row, logs = normalise_tx(CHAIN, *pair("get-setcode-tx"), None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash="0x99f7e58af4dd2735931a3262705fbe57ea2fcc79497668f74309cdeaf37cc223",
        block_number=0x2D,
        block_hash="0xe4165d5a6e4d31469f4a9354c30bffec633a640940b40bc0bc1ae86d1b391643",
        tx_index=1,
        block_timestamp=0x1C2,
        from_address=SENDER,
        to_address="0x0000000000000000000000000000000000000000",
        value=0,
        input="0x",
        nonce=0xD3,
        gas=0xB3B0,
        gas_price=90_870_292,
        max_fee_per_gas=90_870_292,
        max_priority_fee_per_gas=1,
        tx_type=4,
        status=1,
        root=None,
        gas_used=0x8FC0,
        cumulative_gas_used=0x17231,
        effective_gas_price=90_870_292,
        created_contract=None,
        access_list=[],
        max_fee_per_blob_gas=None,
        blob_versioned_hashes=None,
        blob_gas_used=None,
        blob_gas_price=None,
        authorization_list=[
            {
                "chainId": "0xc72dd9d5e883e",
                "address": "0x8c2319620d7c348bb4e2b2a0b230c81f310e9561",
                "nonce": "0x0",
                "yParity": "0x0",
                "r": "0xf17d59102e9ebed035d1bd77bc668b170eb1d38edef6e7d971857d85781d68fe",
                "s": "0x193dbdc8dea2fc194da75febbd4de9689b625eecd1e4ca30e27b45339af22572",
            }
        ],
        method_id=None,
        method_name=None,
        method_args=None,
        log_count=0,
    )
    assert logs == []


# --- block mode: full block transactions + eth_getBlockReceipts ----------------


def block_pairs(block_fixture: str, receipts_fixture: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    block = result(block_fixture)
    receipts = {r["transactionHash"]: r for r in result(receipts_fixture)}
    return [(tx, receipts[tx["hash"]]) for tx in block["transactions"]]


def test_block_1_all_pre_byzantium_contract_creations() -> None:
    pairs = block_pairs("eth_getBlockByHash/get-block-by-hash", "eth_getBlockReceipts/get-block-receipts-n")
    block_hash = "0x80e911b62f552f563a2544dfef5eb39ec8863d9082c998ca6b657f76e19de38e"
    # (hash, input prefix, gas, gas_used, cumulative, root, created)
    expected = [
        ("0xc1d605c6612a5fe84dc95810030bfe5b1d327652b381bc695e28f50d13b2b09e", "0x600d3803",
         0x13A54, 0x102D3, 0x102D3,
         "0x9d6eec3457f11763a235d68c58367a740f429f01fd310692736b54e0019df44b",
         "0x9344b07175800259691961298ca11c824e65032d"),
        ("0x1999fb436409e9c2464bd9efc3aa914b2e8a843144fdcc17132fa9da0f15641e", "0x600d3803",
         0x15F84, 0x12809, 0x22ADC,
         "0x52c619f59247e66f4abaf6e08c54e8d448d1b0d5e5fb2be0e3d63a019b5ca593",
         "0x17e7eedce4ac02ef114a7ed9fe6e2f33feba1667"),
        ("0x021ae79aa8821d60291761cfe419b6cbc0ad7dd50d4aa6f14a54e5fc0d62e325", "0x600d3803",
         0x18EC4, 0x15755, 0x38231,
         "0xa851d26965f49357466094e46aae53927fb78359e834150e28f63a679deb10b1",
         "0x0ee3ab1371c93e7c0c281cc0c2107cdebc8b1930"),
        ("0x709f12649d057e2ad0a0a41176cc405f80af735df8cf2b89782eb3ab1699e549", "0x43600052",
         0x1C4A0, 0x1A5BA, 0x527EB,
         "0xc45c61f676847ea82577acf0615c26796772a3c803b3c2cbf205284cc978375c",
         "0x2c1287779024c3a2f0924b54816d79b7e378907d"),
    ]  # fmt: skip
    assert len(pairs) == len(expected)
    for index, ((tx, receipt), exp) in enumerate(zip(pairs, expected, strict=True)):
        tx_hash, mid, gas, gas_used, cumulative, root, created = exp
        row, logs = normalise_tx(CHAIN, tx, receipt, 0xA)
        assert row == TxRow(
            chain_id=CHAIN,
            tx_hash=tx_hash,
            block_number=1,
            block_hash=block_hash,
            tx_index=index,
            block_timestamp=0xA,
            from_address=SENDER,
            to_address=None,
            value=0,
            input=tx["input"],
            nonce=index,
            gas=gas,
            gas_price=1,
            max_fee_per_gas=None,
            max_priority_fee_per_gas=None,
            tx_type=0,
            status=None,
            root=root,
            gas_used=gas_used,
            cumulative_gas_used=cumulative,
            effective_gas_price=1,
            created_contract=created,
            method_id=mid,
            log_count=0,
        )
        assert row.input.startswith(mid)
        assert logs == []


LATEST_HASH = "0xd226371d0b1551adb03fb52b71f08e3e11247fe9b1af994768af8cdaa8e7dcd7"
GAS_PRICE_36 = 0x1A21398


def test_latest_block_post_byzantium_with_ten_logs() -> None:
    pairs = block_pairs("eth_getBlockByNumber/get-latest", "eth_getBlockReceipts/get-block-receipts-latest")
    assert [tx["hash"][:10] for tx, _ in pairs] == ["0x0d1cf59d", "0x492784ac", "0x02a69bc3", "0x42bbb542"]
    tx_hash = "0x492784ac4d441388c6f8415f41e1441f007ab20dc960a2e5edd80012d657d986"
    tx, receipt = pairs[1]
    # The block's transactions carry blockTimestamp: no header needed.
    row, logs = normalise_tx(CHAIN, tx, receipt, None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        block_number=0x36,
        block_hash=LATEST_HASH,
        tx_index=1,
        block_timestamp=0x21C,
        from_address=SENDER,
        to_address=None,
        value=0,
        input="0x4360005260006020525b604060002060208051600101905260206020a15a61271010600957",
        nonce=0xF6,
        gas=0x11F58,
        gas_price=GAS_PRICE_36,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=0,
        status=1,
        root=None,
        gas_used=0xFC65,
        cumulative_gas_used=0x2999B,
        effective_gas_price=GAS_PRICE_36,
        created_contract="0xb1917d669e2a9307d342d04ab74e68ea94c4d11c",
        method_id="0x43600052",
        log_count=10,
    )
    topics0 = [
        "0xe6bccefd92fc2fa71227cbd31f39b085fabc5c0f7b7d07eb4a639c53ad5822f4",
        "0x39b891754677077a5297bdcd461d43105bb93e213858a126f6d7310acd650aa4",
        "0xc2e10ab7a19d872b97ee35501295cf578a457b800ae20d9a790ee95f37737970",
        "0x1c5556a54fe414bb73b8e027c2ff4bb044a11e7ca4f73a8463fd263d06b76aa6",
        "0x730d07f07f071f74973307d6cc3e11ed033d9a189205b3edf35c60097eb89c42",
        "0x4f66f33ac65df0650a263ea44962e2a6099e2bb49e7689e96b2d42cef897854a",
        "0x3fb882c045dfc3e621afeb2f59d0e1daf33d1782f23d3456c3755da1b279430a",
        "0xef818fc3b39dfed51cdbddbfb3737c9c4062fc10f14ce3b2ecc2047cc1560de0",
        "0xd0c1729cd96c307cdf1c9b415c78ce687b5262fd5fb42e78a566945aa95889d4",
        "0x583ee370e5f1f222fb7a7c3471bf9c6f1ccfa879a8ed5036923628694913cb59",
    ]
    assert logs == [
        LogRow(
            chain_id=CHAIN,
            tx_hash=tx_hash,
            log_index=i,
            block_number=0x36,
            address="0xb1917d669e2a9307d342d04ab74e68ea94c4d11c",
            topic0=topic0,
            topic1=None,
            topic2=None,
            topic3=None,
            data="0x" + "00" * 31 + f"{i + 1:02x}",
            event_name=None,
            event_args=None,
        )
        for i, topic0 in enumerate(topics0)
    ]


def test_latest_block_call_with_log_index_ten() -> None:
    pairs = block_pairs("eth_getBlockByNumber/get-latest", "eth_getBlockReceipts/get-block-receipts-latest")
    tx_hash = "0x42bbb5422de0069316bbe68f4cb8fc31ac577b1dd0fee07ee3584fe9822fd0cb"
    row, logs = normalise_tx(CHAIN, *pairs[3], None)
    assert row == TxRow(
        chain_id=CHAIN,
        tx_hash=tx_hash,
        block_number=0x36,
        block_hash=LATEST_HASH,
        tx_index=3,
        block_timestamp=0x21C,
        from_address=SENDER,
        to_address=EMITTER,
        value=2,
        input="0x46acb779ab122437656d6974",
        nonce=0xF8,
        gas=100000,
        gas_price=GAS_PRICE_36,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=0,
        status=1,
        root=None,
        gas_used=0xC268,
        cumulative_gas_used=0x52F71,
        effective_gas_price=GAS_PRICE_36,
        created_contract=None,
        method_id="0x46acb779",
        log_count=1,
    )
    assert logs == [
        LogRow(
            chain_id=CHAIN,
            tx_hash=tx_hash,
            log_index=10,
            block_number=0x36,
            address=EMITTER,
            topic0=EMIT_TOPIC,
            topic1="0xd082f6e8c74ac2946803a6e74db678ff0a3994c6bcda0cf48b6c189e652a14c7",
            topic2=None,
            topic3=None,
            data="0x" + "00" * 31 + "37",
        )
    ]


# --- block timestamp -----------------------------------------------------------


def test_explicit_block_timestamp_wins() -> None:
    row, _ = normalise_tx(CHAIN, *pair("get-access-list"), 1_700_000_000)
    assert row.block_timestamp == 1_700_000_000


def test_block_timestamp_from_receipt_logs_when_tx_lacks_it() -> None:
    tx, receipt = pair("get-access-list")
    del tx["blockTimestamp"]
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert row.block_timestamp == 0xF0


def test_block_timestamp_none_when_nothing_carries_it() -> None:
    tx, receipt = pair("get-legacy-tx", "get-legacy-receipt")
    del tx["blockTimestamp"]
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert row.block_timestamp is None


def test_timestamp_from_receipt() -> None:
    assert timestamp_from_receipt(result("eth_getTransactionReceipt/get-access-list")) == 0xF0
    assert timestamp_from_receipt(result("eth_getTransactionReceipt/get-legacy-receipt")) is None
    assert timestamp_from_receipt({"blockTimestamp": "0x10", "logs": []}) == 16
    assert timestamp_from_receipt({"logs": [{"blockTimestamp": None}, {"blockTimestamp": "0x5"}]}) == 5
    assert timestamp_from_receipt({"blockTimestamp": "garbage"}) is None
    # Else the transaction's (anvil, recent geth); the receipt's wins when both have one.
    assert timestamp_from_receipt({"logs": []}, {"blockTimestamp": "0x7"}) == 7
    assert timestamp_from_receipt({"blockTimestamp": "0x10", "logs": []}, {"blockTimestamp": "0x7"}) == 16
    assert timestamp_from_receipt({"logs": []}, None) is None


# --- hex_int ---------------------------------------------------------------------


def test_hex_int() -> None:
    assert hex_int(None) is None
    assert hex_int("0x0") == 0
    assert hex_int("0x") == 0
    assert hex_int("0x1a") == 26
    assert hex_int("0xABC") == 0xABC
    assert hex_int("0x" + "f" * 64) == 2**256 - 1
    with pytest.raises(ValueError):
        hex_int("0xzz")
    assert hex_int(7) == 7  # a node that sends numbers


# What int(v, 16) reads that is no 0x hex quantity: a decimal string (as some providers
# send: "10" read as 16), a sign, underscores, surrounding whitespace, the uppercase or a
# missing prefix, non-ASCII digits; and JSON true, which is an int to Python.
NOT_HEX = ["10", "1e3", "-0x1", "+0x1", "0x1_0", "0x_1", " 0x10", "0x10 ", "0x10\n", "0X10",
           "0x\u0661\u0660", "\uff10x10", "0x0x1"]


@pytest.mark.parametrize("given", [*NOT_HEX, True, 1.5, [1]])
def test_hex_int_refuses_what_is_not_0x_hex_rather_than_guess(given: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="quantity"):
        hex_int(given)


# --- shapes the fixtures do not cover --------------------------------------------


def test_values_beyond_64_bits_and_mixed_case_hex() -> None:
    tx, receipt = pair("get-dynamic-fee")
    tx["value"] = "0x" + "F" * 30  # 2**120 - 1
    tx["from"] = "0x7435ED30A8B4AEB0877CEF0C6E8CFFE834EB865F"
    tx["to"] = "0x7DCD17433742F4C0CA53122AB541D0BA67FC27DF"
    tx["input"] = "0xABCDEF01FF"
    tx["maxFeePerGas"] = "0x1" + "0" * 20  # 2**80
    receipt["effectiveGasPrice"] = "0x1" + "0" * 17  # 2**68
    receipt["logs"][0]["address"] = "0x7DCD17433742F4C0CA53122AB541D0BA67FC27DF"
    receipt["logs"][0]["data"] = "0xABCD"
    row, logs = normalise_tx(CHAIN, tx, receipt, None)
    assert row.value == 2**120 - 1
    assert row.max_fee_per_gas == 2**80
    assert row.effective_gas_price == 2**68
    assert row.from_address == SENDER
    assert row.to_address == EMITTER
    assert row.input == "0xabcdef01ff"
    assert row.method_id == "0xabcdef01"
    assert logs[0].address == EMITTER
    assert logs[0].data == "0xabcd"


def test_unknown_and_extra_fields_are_ignored() -> None:
    tx, receipt = pair("get-dynamic-fee")
    expected, _ = normalise_tx(CHAIN, tx, receipt, None)
    tx["somethingNew"] = {"nested": [1, 2]}
    receipt["l1Fee"] = "0x123"
    assert normalise_tx(CHAIN, tx, receipt, None)[0] == expected


def test_op_deposit_type_0x7e_does_not_crash() -> None:
    tx: dict[str, Any] = {
        "blockHash": "0x" + "ab" * 32,
        "blockNumber": "0x7a1200",
        "from": "0xDeaDDEaDDeAdDeAdDEAdDEaddeAddEAdDEAd0001",
        "gas": "0xf4240",
        "gasPrice": "0x0",
        "hash": "0x" + "cd" * 32,
        "input": "0x440a5e20000008dd00101c1200000000000000040000000066",
        "mint": "0x0",
        "nonce": "0x7a1200",
        "sourceHash": "0x" + "ef" * 32,
        "to": "0x4200000000000000000000000000000000000015",
        "transactionIndex": "0x0",
        "value": "0x0",
        "type": "0x7e",
        "v": "0x0",
        "r": "0x0",
        "s": "0x0",
        "isSystemTx": False,
        "depositReceiptVersion": "0x1",
    }
    receipt: dict[str, Any] = {
        "blockHash": "0x" + "ab" * 32,
        "blockNumber": "0x7a1200",
        "contractAddress": None,
        "cumulativeGasUsed": "0xb4c5",
        "depositNonce": "0x7a1200",
        "depositReceiptVersion": "0x1",
        "effectiveGasPrice": "0x0",
        "from": "0xdeaddeaddeaddeaddeaddeaddeaddeaddead0001",
        "gasUsed": "0xb4c5",
        "logs": [],
        "status": "0x1",
        "to": "0x4200000000000000000000000000000000000015",
        "transactionHash": "0x" + "cd" * 32,
        "transactionIndex": "0x0",
        "type": "0x7e",
    }
    row, logs = normalise_tx(10, tx, receipt, 1_700_000_000, Decoder())
    assert row == TxRow(
        chain_id=10,
        tx_hash="0x" + "cd" * 32,
        block_number=0x7A1200,
        block_hash="0x" + "ab" * 32,
        tx_index=0,
        block_timestamp=1_700_000_000,
        from_address="0xdeaddeaddeaddeaddeaddeaddeaddeaddead0001",
        to_address="0x4200000000000000000000000000000000000015",
        value=0,
        input="0x440a5e20000008dd00101c1200000000000000040000000066",
        nonce=0x7A1200,
        gas=0xF4240,
        gas_price=0,
        max_fee_per_gas=None,
        max_priority_fee_per_gas=None,
        tx_type=0x7E,
        status=1,
        root=None,
        gas_used=0xB4C5,
        cumulative_gas_used=0xB4C5,
        effective_gas_price=0,
        created_contract=None,
        method_id="0x440a5e20",
        log_count=0,
    )
    assert logs == []


def test_type_2_without_gas_price_and_legacy_without_effective_gas_price() -> None:
    tx, receipt = pair("get-dynamic-fee")
    del tx["gasPrice"]
    del receipt["effectiveGasPrice"]
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.gas_price, row.effective_gas_price) == (None, None)
    # Before London nodes did not report effectiveGasPrice; for type 0/1 it is gasPrice.
    tx, receipt = pair("get-legacy-tx", "get-legacy-receipt")
    tx["gasPrice"] = "0x4a817c800"
    del receipt["effectiveGasPrice"]
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.gas_price, row.effective_gas_price) == (20_000_000_000, 20_000_000_000)


def test_legacy_tx_ignores_stray_fee_fields() -> None:
    tx, receipt = pair("get-legacy-tx", "get-legacy-receipt")
    tx["maxFeePerGas"] = "0x5"  # some nodes echo gasPrice into these for legacy txs
    tx["maxPriorityFeePerGas"] = "0x5"
    tx["accessList"] = []
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.max_fee_per_gas, row.max_priority_fee_per_gas, row.access_list) == (None, None, None)


def test_created_contract_only_for_creations() -> None:
    tx, receipt = pair("get-dynamic-fee")
    receipt["contractAddress"] = "0x" + "11" * 20  # a node quirk on a call
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert row.created_contract is None


def test_pre_and_post_byzantium_fields_both_kept_when_both_present() -> None:
    tx, receipt = pair("get-legacy-tx", "get-legacy-receipt")
    receipt["status"] = "0x0"
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.status, row.root) == (0, "0x09ebe9c3ee77cd8d23faf37c62cf702b3c00e71dcadbef4d21355f35921b49ca")


def test_authorization_list_falls_back_to_v() -> None:
    tx, receipt = pair("get-setcode-tx")
    auth = tx["authorizationList"][0]
    auth["v"] = auth.pop("yParity")
    auth["address"] = auth["address"].upper().replace("0X", "0x")
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert row.authorization_list is not None
    assert row.authorization_list[0]["yParity"] == "0x0"
    assert row.authorization_list[0]["address"] == "0x8c2319620d7c348bb4e2b2a0b230c81f310e9561"
    assert list(row.authorization_list[0]) == ["chainId", "address", "nonce", "yParity", "r", "s"]


def test_rows_are_json_serialisable() -> None:
    row, _ = normalise_tx(CHAIN, *pair("get-setcode-tx"), None)
    json.dumps([row.access_list, row.authorization_list, row.blob_versioned_hashes])


# --- errors ------------------------------------------------------------------------


def test_unknown_hash_is_null_and_null_is_rejected() -> None:
    for name in ("get-notfound-tx", "get-empty-tx"):
        assert result(f"eth_getTransactionByHash/{name}") is None
        assert result(f"eth_getTransactionReceipt/{name}") is None
    with pytest.raises(NormaliseError):
        normalise_tx(CHAIN, None, None, None)  # type: ignore[arg-type]
    tx, _ = pair("get-legacy-tx", "get-legacy-receipt")
    with pytest.raises(NormaliseError):
        normalise_tx(CHAIN, tx, None, None)  # type: ignore[arg-type]


def test_receipt_of_another_transaction() -> None:
    tx, _ = pair("get-legacy-tx", "get-legacy-receipt")
    _, receipt = pair("get-access-list")
    with pytest.raises(NormaliseError, match="receipt of") as info:
        normalise_tx(CHAIN, tx, receipt, None)
    assert not isinstance(info.value, BlockMismatchError)
    assert isinstance(info.value, ValueError)


def test_transaction_and_receipt_from_different_blocks() -> None:
    tx, receipt = pair("get-access-list")
    tx["blockHash"] = "0x" + "99" * 32
    with pytest.raises(BlockMismatchError):
        normalise_tx(CHAIN, tx, receipt, None)


def test_pending_transaction_with_mined_receipt_is_accepted() -> None:
    tx, receipt = pair("get-access-list")
    tx["blockHash"] = tx["blockNumber"] = tx["transactionIndex"] = None
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.block_number, row.tx_index) == (0x18, 0)


@pytest.mark.parametrize("field", ["hash", "from", "value", "nonce", "gas"])
def test_missing_tx_field(field: str) -> None:
    tx, receipt = pair("get-access-list")
    del tx[field]
    with pytest.raises(NormaliseError, match=field):
        normalise_tx(CHAIN, tx, receipt, None)


@pytest.mark.parametrize(
    "field", ["transactionHash", "blockHash", "blockNumber", "transactionIndex", "gasUsed",
              "cumulativeGasUsed", "logs"],
)  # fmt: skip
def test_missing_receipt_field(field: str) -> None:
    tx, receipt = pair("get-access-list")
    receipt[field] = None
    with pytest.raises(NormaliseError, match=field):
        normalise_tx(CHAIN, tx, receipt, None)


def test_malformed_values() -> None:
    tx, receipt = pair("get-access-list")
    bad = copy.deepcopy(tx)
    bad["gas"] = "0xnothex"
    with pytest.raises(NormaliseError):
        normalise_tx(CHAIN, bad, receipt, None)
    bad = copy.deepcopy(receipt)
    bad["logs"] = "not a list"
    with pytest.raises(NormaliseError):
        normalise_tx(CHAIN, tx, bad, None)
    bad = copy.deepcopy(receipt)
    del bad["logs"][0]["logIndex"]
    with pytest.raises(NormaliseError, match="logIndex"):
        normalise_tx(CHAIN, tx, bad, None)
    bad = copy.deepcopy(receipt)
    bad["logs"][0]["transactionHash"] = "0x" + "00" * 32
    with pytest.raises(NormaliseError):
        normalise_tx(CHAIN, tx, bad, None)


QUANTITIES = [("tx", "value"), ("tx", "nonce"), ("tx", "gas"), ("tx", "type"), ("tx", "gasPrice"),
              ("tx", "maxFeePerGas"), ("receipt", "blockNumber"), ("receipt", "transactionIndex"),
              ("receipt", "gasUsed"), ("receipt", "cumulativeGasUsed"), ("receipt", "status"),
              ("receipt", "effectiveGasPrice"), ("log", "logIndex"), ("log", "blockNumber")]


def with_field(where: str, field: str, given: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    tx, receipt = pair("get-dynamic-fee")  # type 2, one log
    {"tx": tx, "receipt": receipt, "log": receipt["logs"][0]}[where][field] = given
    return tx, receipt


@pytest.mark.parametrize(("where", "field"), QUANTITIES)
@pytest.mark.parametrize("given", ["10", "1e3", "-0x1", "0x1_0", " 0x10", "0X10"])
def test_a_quantity_that_is_not_0x_hex_is_refused_not_guessed(where: str, field: str, given: str) -> None:
    # int(v, 16) read "10" as 16 and "1e3" as 483, and took the sign, underscore and space:
    # a provider's malformed quantity was stored as a wrong value.
    tx, receipt = with_field(where, field, given)
    with pytest.raises(NormaliseError, match="0x hex"):
        normalise_tx(CHAIN, tx, receipt, None)


@pytest.mark.parametrize(("where", "field"), QUANTITIES)
def test_a_refused_quantity_is_a_malformed_answer_naming_its_field(where: str, field: str) -> None:
    # It was a NormaliseError, which the enricher records as a failure that passes (tried
    # again on every run), and an optional one (gasPrice, status, ...) said only
    # "malformed transaction or receipt 0x..: ValueError(\"'10' is not a 0x hex quantity\")".
    tx, receipt = with_field(where, field, "10")
    with pytest.raises(MalformedAnswer) as info:
        normalise_tx(CHAIN, tx, receipt, None)
    what = {"tx": "transaction", "receipt": "receipt of", "log": "log in the receipt of"}[where]
    assert str(info.value) == f"{what} {tx['hash']} has {field!r} '10', not a 0x hex quantity"


@pytest.mark.parametrize(("where", "field"), QUANTITIES)
def test_a_quantity_sent_as_a_number_or_as_bare_0x_still_reads(where: str, field: str) -> None:
    for given, read in ((0x1B if field == "blockNumber" else 0x2, None), ("0x", 0)):
        tx, receipt = with_field(where, field, given)
        if where == "receipt" and field == "blockNumber":
            receipt["logs"][0]["blockNumber"] = given
        row, logs = normalise_tx(CHAIN, tx, receipt, None)
        got = {"value": row.value, "nonce": row.nonce, "gas": row.gas, "type": row.tx_type,
               "gasPrice": row.gas_price, "maxFeePerGas": row.max_fee_per_gas,
               "transactionIndex": row.tx_index, "gasUsed": row.gas_used,
               "cumulativeGasUsed": row.cumulative_gas_used, "status": row.status,
               "effectiveGasPrice": row.effective_gas_price, "logIndex": logs[0].log_index,
               "blockNumber": logs[0].block_number if where == "log" else row.block_number}[field]
        assert got == (given if read is None else read)


def test_a_log_repeating_the_receipts_block_number_or_giving_its_own() -> None:
    tx, receipt = pair("get-dynamic-fee")
    assert receipt["logs"][0]["blockNumber"] == receipt["blockNumber"] == "0x1b"
    assert normalise_tx(CHAIN, tx, receipt, None)[1][0].block_number == 0x1B
    receipt["logs"][0]["blockNumber"] = "0x1c"  # kept as before, though the two disagree
    assert normalise_tx(CHAIN, tx, receipt, None)[1][0].block_number == 0x1C


def test_a_removed_log_is_not_stored_as_a_live_one() -> None:
    # A receipt whose log the node marks "removed": true (reorged out) is inconsistent:
    # it was stored like any other; refused, the ref is tried again (rpc_error).
    tx, receipt = pair("get-dynamic-fee")
    assert receipt["logs"][0]["removed"] is False
    assert len(normalise_tx(CHAIN, tx, receipt, None)[1]) == 1
    receipt["logs"][0]["removed"] = True
    with pytest.raises(NormaliseError, match="removed"):
        normalise_tx(CHAIN, tx, receipt, None)


# --- with the decoder -----------------------------------------------------------------


def token_abi() -> list[dict[str, Any]]:
    text = files("gapfill").joinpath("testing", "contracts", "Token.json").read_text()
    abi: list[dict[str, Any]] = json.loads(text)["abi"]
    return abi


def test_decoded_call_and_log() -> None:
    tx, receipt = pair("get-dynamic-fee")
    recipient = "0x" + "ab" * 20
    tx["input"] = "0xa9059cbb" + encode(["address", "uint256"], [recipient, 10**30]).hex()
    log = receipt["logs"][0]
    log["topics"] = [
        "0xDDF252AD1BE2C89B69C2B068FC378DAA952BA7F163C4A11628F55A4DF523B3EF",
        "0x000000000000000000000000" + SENDER[2:],
        "0x000000000000000000000000" + recipient[2:],
    ]
    log["data"] = "0x" + encode(["uint256"], [10**30]).hex()
    row, logs = normalise_tx(CHAIN, tx, receipt, None, Decoder({EMITTER.upper(): token_abi()}))
    assert (row.method_id, row.method_name) == ("0xa9059cbb", "transfer")
    assert row.method_args == {"to": recipient, "amount": "1" + "0" * 30}
    assert logs[0].topic0 == "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
    assert logs[0].event_name == "Transfer"
    assert logs[0].event_args == {"from": SENDER, "to": recipient, "value": "1" + "0" * 30}


def test_upper_case_indexed_topics_are_lowered_for_the_row_and_the_decoded_args() -> None:
    # normalise lowers each topic once, for the row and the decoder both.
    tx, receipt = pair("get-dynamic-fee")
    recipient = "0x" + "ab" * 20
    log = receipt["logs"][0]
    log["topics"] = [
        "0xDDF252AD1BE2C89B69C2B068FC378DAA952BA7F163C4A11628F55A4DF523B3EF",
        "0x000000000000000000000000" + SENDER[2:].upper(),
        "0x000000000000000000000000" + recipient[2:].upper(),
    ]
    log["data"] = "0x" + encode(["uint256"], [7]).hex()
    _, logs = normalise_tx(CHAIN, tx, receipt, None, Decoder({EMITTER: token_abi()}))
    assert (logs[0].topic1, logs[0].topic2) == ("0x" + "0" * 24 + SENDER[2:], "0x" + "0" * 24 + recipient[2:])
    assert logs[0].event_args == {"from": SENDER, "to": recipient, "value": "7"}


def test_of_two_faults_the_one_read_first_is_said() -> None:
    # The common quantities are checked together; when that check fails, each is read again
    # where it always was, so the error a user reads does not depend on the shortcut.
    tx, receipt = with_field("tx", "value", "10")
    receipt["blockNumber"] = "0X1B"
    with pytest.raises(MalformedAnswer, match="'blockNumber' '0X1B'"):
        normalise_tx(CHAIN, tx, receipt, None)
    tx, receipt = with_field("tx", "value", "10")
    receipt["logs"][0]["removed"] = True  # the logs are read before the value
    with pytest.raises(NormaliseError, match="marked removed"):
        normalise_tx(CHAIN, tx, receipt, None)
    tx, receipt = with_field("tx", "gas", 0x5208)  # a number: read, as the rest
    receipt["status"] = None  # pre-Byzantium
    row, _ = normalise_tx(CHAIN, tx, receipt, None)
    assert (row.gas, row.status, row.value) == (0x5208, None, int(tx["value"], 16))


def test_fixture_loader_reads_requests_too() -> None:
    (exchange,) = load_io("eth_getTransactionByHash/get-legacy-tx")
    assert exchange.request["method"] == "eth_getTransactionByHash"
    assert exchange.request["params"] == [
        "0x3fbac8b19b59077cd29bbacc3815d73577b45a4d976cae80b04c98c793684c07"
    ]
