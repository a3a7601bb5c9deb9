"""Checks for what users type: addresses and transaction hashes."""

from __future__ import annotations

import re

from gapfill.errors import InputError
from gapfill.keccak import keccak

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_HASH = re.compile(r"^0x[0-9a-fA-F]{64}$")


def parse_address(text: str) -> str:
    """A lowercase address, or InputError. Mixed case must be a valid EIP-55 checksum."""
    s = text.strip()
    if not _ADDRESS.match(s):
        if s.startswith("0x") and re.fullmatch(r"0x[0-9a-fA-F]*", s):
            raise InputError(
                f"{s!r} is not an address: it has {len(s) - 2} hex digits, an address has 40"
            )
        raise InputError(f"{s!r} is not an address: write it as 0x followed by 40 hex digits")
    if s[2:] != s[2:].lower() and s[2:] != s[2:].upper() and s != to_checksum(s):
        raise InputError(
            f"{s!r} has a wrong EIP-55 checksum: check for a typo, or write it in lowercase"
        )
    return s.lower()


def to_checksum(address: str) -> str:
    """EIP-55: uppercase each hex letter whose nibble in keccak(lowercase address) is >= 8."""
    body = address[2:].lower()
    digest = keccak(body.encode()).hex()
    return "0x" + "".join(c.upper() if c.isalpha() and int(digest[i], 16) >= 8 else c
                          for i, c in enumerate(body))  # fmt: skip


def is_tx_hash(text: str) -> bool:
    return bool(_HASH.match(text))


def parse_tx_hash(text: str) -> str:
    s = text.strip()
    if not _HASH.match(s):
        raise InputError(
            f"{s[:80]!r} is not a transaction hash: write it as 0x followed by 64 hex digits"
        )
    return s.lower()
