"""keccak-256 (the EVM's hash), straight from pycryptodome.

pycryptodome is the backend ``eth_hash.auto`` would pick anyway; going to it
directly skips eth_hash's backend discovery (importlib.metadata and a trial
import), about 5 ms of every start-up. It is imported on the first hash: with
ctypes and the `file` command it runs to find its library, that is another
~13 ms, which commands that never hash (status, runs, failures) do not pay.
"""

from __future__ import annotations

from typing import Any

_new: Any = None


def keccak(data: bytes) -> bytes:
    """The 32-byte keccak-256 digest of ``data``."""
    global _new
    if _new is None:
        from Crypto.Hash import keccak as _keccak

        _new = _keccak.new
    digest: bytes = _new(digest_bits=256, data=data).digest()
    return digest
