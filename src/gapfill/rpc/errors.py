"""Per-call outcomes that are not results.

A failed item of :meth:`RpcClient.call_many` comes back as a :class:`CallError`
in its slot; whole-client failures (no endpoint reachable, wrong chain) raise
:class:`gapfill.errors.RpcError`. The classification that decides ``kind`` lives
in :mod:`gapfill.rpc.classify`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gapfill.errors import RpcError

CallErrorKind = Literal["not_found", "permanent", "transient"]


@dataclass(frozen=True, slots=True)
class CallError:
    """Why one call has no result.

    * ``not_found``: a ``null_retry`` call still answered ``null`` after every attempt;
    * ``permanent``: the node refused the call itself (bad params, reverted, unsupported,
      a log query over the provider's limit); retrying would not help;
    * ``transient``: every attempt failed for reasons that might pass (timeouts,
      rate limits, 5xx, garbage bodies).

    ``message`` is already redacted.
    """

    kind: CallErrorKind
    message: str
    code: int | None = None

    def to_exception(self, method: str) -> RpcError:
        return RpcError(f"{method} failed: {self.message}")


__all__ = ["CallError", "CallErrorKind", "RpcError"]
