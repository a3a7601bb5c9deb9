"""Building RPC clients from settings, and running them from synchronous code."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gapfill.errors import GapfillError
from gapfill.quantity import quantity
from gapfill.records import record
from gapfill.rpc import EndpointConfig, RpcClient, RpcSettings
from gapfill.settings import EndpointSetting
from gapfill.signals import run_interruptible

logger = logging.getLogger(__name__)

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


@record
class CodeAt:
    """What the node holds at an address: its code (``0x`` for none) at block ``block``."""

    block: int
    code: str


def fetch_chain_id_and_code(
    endpoints: Sequence[EndpointSetting],
    address: str,
    tell: Callable[[str], None] | None = None,
    settings: RpcSettings | None = None,
) -> tuple[int, CodeAt | None]:
    """:func:`fetch_chain_id`, and ``address``'s code at the node's head: None where the node
    did not say (it failed to; only the chain id is needed)."""

    async def go() -> tuple[int, CodeAt | None]:
        async with make_client(endpoints, settings=settings) as client:
            chain_id = await client.probe(tell)
            return chain_id, await code_at(client, address)

    return run_interruptible(go)


async def code_at(client: RpcClient, address: str) -> CodeAt | None:
    """``address``'s code at the node's head, None where the node did not say: the answer
    only feeds a warning (:func:`no_code`), and a failure to get it is no error."""
    try:
        block = quantity(await client.call("eth_blockNumber", []), "the node's answer to eth_blockNumber")
        code = await client.call("eth_getCode", [address, hex(block)])
    except (GapfillError, TypeError, ValueError) as exc:
        logger.debug("no code asked of %s: %s", address, exc)
        return None
    return CodeAt(block, code) if isinstance(code, str) else None


def no_code(address: str, chain_id: int, code: CodeAt | None) -> str | None:
    """The warning for an address the node holds no code at (a mistyped address, an EOA),
    None where it holds some or did not say. Never an error: a contract deployed after a
    lagging node's head, or self-destructed, has none there either."""
    if code is None or code.code not in ("0x", ""):
        return None
    return (f"warning: no contract code at {address} on chain {chain_id} at block {code.block:,}: "
            "check the address (an EOA or a contract not deployed yet finds no refs, "
            "a self-destructed one only those from before)")  # fmt: skip


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

    return run_interruptible(go)
