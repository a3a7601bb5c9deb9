"""keccak-256 (the EVM's hash), straight from pycryptodome.

pycryptodome is the backend ``eth_hash.auto`` would pick anyway; going to it
directly skips eth_hash's backend discovery (importlib.metadata and a trial
import), about 5 ms of every start-up. It is imported on the first hash, which
commands that never hash (status, runs, failures) do not pay.

Without cffi, pycryptodome's first library load calls ``platform.architecture()``,
which runs the ``file`` command on the Python executable (a fork and an exec, ~14 ms
with the caller blocked: in a run, the event loop, as the first batch is decoded) only
to tell Windows from other systems. Elsewhere than on Windows it is answered during
that import without the command, as ``platform.architecture`` itself answers where
``file`` is missing: the pointer size, and no linkage.
"""

from __future__ import annotations

import sys
from typing import Any

_new: Any = None


def _load() -> Any:
    if sys.platform == "win32":
        from Crypto.Hash import keccak as _keccak

        return _keccak.new
    import platform
    import struct

    real = platform.architecture

    def architecture(executable: str = sys.executable, bits: str = "", linkage: str = "") -> tuple[str, str]:
        return f"{struct.calcsize('P') * 8}bit", ""

    platform.architecture = architecture
    try:
        from Crypto.Hash import keccak as _keccak
    finally:
        if platform.architecture is architecture:  # not another thread's, doing the same
            platform.architecture = real
    return _keccak.new


def keccak(data: bytes) -> bytes:
    """The 32-byte keccak-256 digest of ``data``."""
    global _new
    if _new is None:
        _new = _load()
    digest: bytes = _new(digest_bits=256, data=data).digest()
    return digest
