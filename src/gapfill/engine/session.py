"""Building RPC clients from settings, and running them from synchronous code."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
from gapfill.settings import EndpointSetting

#: Calls per JSON-RPC batch of the clients built without a size (discovery, probes);
#: enrichment passes its own (``ENRICH_RPC_BATCH``).
DEFAULT_RPC_BATCH = 50


def endpoint_configs(
    endpoints: Sequence[EndpointSetting], rpc_batch_size: int | None = None
) -> list[EndpointConfig]:
    """``--rpc-batch-size`` caps every endpoint's batch (counted in calls)."""
    out = []
    for e in endpoints:
        cap = e.max_batch or rpc_batch_size or DEFAULT_RPC_BATCH
        if rpc_batch_size is not None:
            cap = min(cap, rpc_batch_size)
        out.append(EndpointConfig(e.url, e.rps, cap, e.check))
    return out


def make_client(
    endpoints: Sequence[EndpointSetting],
    *,
    rpc_batch_size: int | None = None,
    expected_chain_id: int | None = None,
    settings: RpcSettings | None = None,
    chain_said: bool = False,
) -> RpcClient:
    """A client of ``endpoints``; ``chain_said`` as for :class:`~gapfill.rpc.client.RpcClient`."""
    return RpcClient(
        endpoint_configs(endpoints, rpc_batch_size),
        settings or RpcSettings(),
        expected_chain_id=expected_chain_id,
        chain_said=chain_said,
    )


def fetch_chain_id(
    endpoints: Sequence[EndpointSetting],
    expected_chain_id: int | None = None,
    tell: Callable[[str], None] | None = None,
    settings: RpcSettings | None = None,
) -> int:
    """Ask the nodes for their chain id (they must agree, and match ``expected_chain_id``);
    ``tell`` hears of slow or left-out endpoints (see :meth:`RpcClient.probe`), and
    ``settings`` carry the command's ``--rpc-timeout``."""
    return check_node(endpoints, expected_chain_id, tell, settings, before_run=False)[0]


def check_node(
    endpoints: Sequence[EndpointSetting],
    expected_chain_id: int | None = None,
    tell: Callable[[str], None] | None = None,
    settings: RpcSettings | None = None,
    *,
    before_run: bool = True,
) -> tuple[int, tuple[int, ...]]:
    """:func:`fetch_chain_id`, and the positions in ``endpoints`` of those it left out.
    ``before_run``: a check before an ``enrich`` run, which goes without them (its job's
    ``left_out``), so that they are said once and not waited for again, and whose own
    check says the chain id at ``-v``: this one logs it at DEBUG."""

    async def go() -> tuple[int, tuple[int, ...]]:
        async with make_client(endpoints, expected_chain_id=expected_chain_id, settings=settings,
                               chain_said=before_run) as client:  # fmt: skip
            return await client.probe(tell), client.left_out()

    return asyncio.run(go())
