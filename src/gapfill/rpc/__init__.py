"""Async JSON-RPC for gapfill: batching, host-shared rate budget, retries, failover.

Everything above this package speaks :class:`Call` and results; the one I/O seam
is :class:`gapfill.rpc.transport.Transport`. Failure classification lives in
:mod:`gapfill.rpc.classify`.

:class:`RpcClient` and :class:`EndpointStats` are imported on first use: the
client pulls in aiohttp (~0.15 s), which commands that only read the database
(status, runs, failures) never need, while they do need the settings here.
"""

from typing import TYPE_CHECKING, Any

from gapfill.rpc.config import Call, EndpointConfig, RpcSettings, parse_rpc_urls
from gapfill.rpc.errors import CallError, CallErrorKind

if TYPE_CHECKING:
    from gapfill.rpc.client import RpcClient
    from gapfill.rpc.endpoint import EndpointStats

__all__ = [
    "Call",
    "CallError",
    "CallErrorKind",
    "EndpointConfig",
    "EndpointStats",
    "RpcClient",
    "RpcSettings",
    "parse_rpc_urls",
]


def __getattr__(name: str) -> Any:
    if name == "RpcClient":
        from gapfill.rpc.client import RpcClient

        return RpcClient
    if name == "EndpointStats":
        from gapfill.rpc.endpoint import EndpointStats

        return EndpointStats
    raise AttributeError(f"module 'gapfill.rpc' has no attribute {name!r}")
