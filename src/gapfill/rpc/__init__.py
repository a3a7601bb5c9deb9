"""Async JSON-RPC for gapfill: batching, host-shared rate budget, retries, failover.

Everything above this package speaks :class:`Call` and results; the one I/O seam
is :class:`gapfill.rpc.transport.Transport`. Failure classification lives in
:mod:`gapfill.rpc.classify`.
"""

from gapfill.rpc.client import RpcClient
from gapfill.rpc.config import Call, EndpointConfig, RpcSettings, parse_rpc_urls
from gapfill.rpc.endpoint import EndpointStats
from gapfill.rpc.errors import CallError, CallErrorKind

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
