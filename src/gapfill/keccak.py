"""keccak-256 (the EVM's hash), straight from pycryptodome.

pycryptodome is the backend ``eth_hash.auto`` would pick anyway; going to it
directly skips eth_hash's backend discovery (importlib.metadata and a trial
import), about 5 ms of every start-up.
"""

from __future__ import annotations

from Crypto.Hash import keccak as _keccak


def keccak(data: bytes) -> bytes:
    """The 32-byte keccak-256 digest of ``data``."""
    return _keccak.new(digest_bits=256, data=data).digest()
