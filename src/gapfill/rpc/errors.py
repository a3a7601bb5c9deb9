"""Per-call outcomes that are not results.

A failed item of :meth:`RpcClient.call_many` comes back as a :class:`CallError`
in its slot; whole-client failures (no endpoint reachable, wrong chain) raise
:class:`gapfill.errors.RpcError`. The classification that decides ``kind`` lives
in :mod:`gapfill.rpc.classify`.
"""

from __future__ import annotations

from typing import Literal

from gapfill.errors import RpcError, RpcKeyRefused
from gapfill.records import record

CallErrorKind = Literal["not_found", "permanent", "transient"]


@record
class CallError:
    """Why one call has no result.

    * ``not_found``: a ``null_retry`` call still answered ``null`` after every attempt;
    * ``permanent``: the node refused the call itself (bad params, reverted, unsupported,
      a log query over the provider's limit); retrying would not help;
    * ``transient``: every attempt failed for reasons that might pass (timeouts,
      rate limits, 5xx, garbage bodies).

    ``message`` is already redacted. ``fix`` is what the user must do before asking again
    can pass (a refused key: "check the API key in --rpc-url"; a method no endpoint serves:
    "point --rpc-url at another node"), ``message``'s end (see :meth:`refused`); an error
    built by :meth:`failed` keeps it apart.
    """

    kind: CallErrorKind
    message: str
    code: int | None = None
    fix: str | None = None

    @classmethod
    def refused(cls, what: str, fix: str, code: int | None = None) -> CallError:
        """The node refused the request's credentials, or no endpoint serves the method:
        ``what`` happened, ``fix`` to do. Not ``permanent``: it is about the node, not the
        call, and a ref that asked it stays in the gap for the run after the fix."""
        return cls("transient", f"{what}: {fix}", code, fix)

    def failed(self, doing: str) -> RpcError:
        """The error of a call that failed so, ``doing`` saying which ("eth_getLogs failed
        for blocks 1-9"): an :class:`RpcKeyRefused` with the fix apart, for a caller that
        words a longer sentence with the fix last, when there is one."""
        if self.fix is None:
            return RpcError(f"{doing}: {self.message}")
        return RpcKeyRefused(f"{doing}: {self.message.removesuffix(f': {self.fix}')}", self.fix)

    def to_exception(self, method: str) -> RpcError:
        return self.failed(f"{method} failed")


__all__ = ["CallError", "CallErrorKind", "RpcError"]
