"""An optional Prometheus endpoint (``--metrics-port``): ``prometheus_client`` serves,
from its own thread, what the run counts.

Every mode serves the same series (:func:`series`): transactions enriched and failed,
RPC calls, retries and 429s, batches done, workers alive and restarted, and the run's
leases (:class:`LeaseTally`: taken, committed, given back, lost, taken back expired, held
now). ``prometheus_client`` is imported only when a port is asked for.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gapfill.engine.events import LEASE_GONE, BatchAbandoned, BatchAssigned, BatchDone, Event
from gapfill.errors import ConfigError

__all__ = ["LeaseTally", "MetricsServer", "check_port", "series"]

#: Each series and its help text; names ending in ``_total`` are counters.
HELP: dict[str, str] = {
    "gapfill_transactions_enriched_total": "Transactions this run stored.",
    "gapfill_transactions_failed_total": "Transactions this run recorded as failed.",
    "gapfill_rpc_calls_total": "JSON-RPC calls sent (a batch of N calls counts N).",
    "gapfill_rpc_retries_total": "JSON-RPC calls sent again after a failure.",
    "gapfill_rpc_rate_limited_total": "Calls refused for an endpoint's rate limit (HTTP 429 or its code).",
    "gapfill_batches_done_total": "Batches this run finished (committed, or found already filled).",
    "gapfill_workers_alive": "Worker processes (or in-process workers) running now.",
    "gapfill_worker_restarts_total": "Worker processes restarted after a crash or a kill.",
    "gapfill_leases_taken_total": "Batch leases this run's workers took.",
    "gapfill_leases_committed_total": "Leases that ended in a commit of their batch.",
    "gapfill_leases_given_back_total": "Leases given back (an error, a stop); what they fetched is kept.",
    "gapfill_leases_lost_total": ("Leases gone at commit or give-back (expired, taken by another): "
                                  "nothing written."),
    "gapfill_leases_expired_total": "Leases past their timeout that this run's coordinator took back.",
    "gapfill_leases_held": "Leases this run's workers hold now.",
}


@dataclass
class LeaseTally:
    """What happened to the leases of a run's workers, counted from their events (and the
    coordinator's takings back): ``held`` maps each batch leased now to its worker."""

    taken: int = 0
    committed: int = 0
    given_back: int = 0
    lost: int = 0
    expired: int = 0  # taken back by the coordinator (its workers' or anyone's)
    held: dict[int, int] = field(default_factory=dict)  # batch id -> worker index

    def take(self, ev: Event) -> None:
        if isinstance(ev, BatchAssigned):
            self.taken += 1
            self.held[ev.batch_id] = ev.worker
        elif isinstance(ev, BatchDone):
            if ev.committed:
                self.committed += 1
            else:
                self.lost += 1
            self._ended(ev.worker, ev.batch_id)
        elif isinstance(ev, BatchAbandoned):
            if ev.closed:
                self.committed += 1
            elif ev.not_given == LEASE_GONE:
                self.lost += 1
            elif not ev.not_given:  # else it is left to expire (taken back: ``expired``)
                self.given_back += 1
            self._ended(ev.worker, ev.batch_id)

    def _ended(self, worker: int, batch_id: int) -> None:
        # Only the worker's own lease: one whose lease expired says so late (its commit or
        # give-back found the lease gone), when another worker may hold the batch's new one.
        if self.held.get(batch_id) == worker:
            del self.held[batch_id]

    def took_back(self, batch_id: int) -> None:
        """The coordinator took back an expired lease (a stuck worker's, or anyone's)."""
        self.expired += 1
        self.held.pop(batch_id, None)

    def worker_gone(self, worker: int) -> None:
        """A worker process ended (crashed, killed): its leases were released with it."""
        for batch_id in [b for b, w in self.held.items() if w == worker]:
            del self.held[batch_id]


def series(processed: int, failed: int, calls: int, retries: int, limited: int, batches: int,
           alive: int, restarts: int, leases: LeaseTally) -> dict[str, float]:  # fmt: skip
    """The values of every series in :data:`HELP`."""
    return {
        "gapfill_transactions_enriched_total": processed,
        "gapfill_transactions_failed_total": failed,
        "gapfill_rpc_calls_total": calls,
        "gapfill_rpc_retries_total": retries,
        "gapfill_rpc_rate_limited_total": limited,
        "gapfill_batches_done_total": batches,
        "gapfill_workers_alive": alive,
        "gapfill_worker_restarts_total": restarts,
        "gapfill_leases_taken_total": leases.taken,
        "gapfill_leases_committed_total": leases.committed,
        "gapfill_leases_given_back_total": leases.given_back,
        "gapfill_leases_lost_total": leases.lost,
        "gapfill_leases_expired_total": leases.expired,
        "gapfill_leases_held": len(leases.held),
    }


def _cannot_serve(host: str, port: int, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): "
                       "choose another --metrics-port (or metrics_port in the config file)")  # fmt: skip


def check_port(port: int, host: str = "127.0.0.1") -> None:
    """Raise the sentence :class:`MetricsServer` would, before a run writes anything (the
    server itself starts once the run has its worker)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise _cannot_serve(host, port, exc) from None


class MetricsServer:
    """Serves ``snapshot()`` (a value for every series of :data:`HELP`) on ``host:port``,
    read at each scrape."""

    def __init__(self, port: int, snapshot: Callable[[], dict[str, float]], host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        class Snapshot(Collector):
            def collect(self) -> Iterator[Any]:
                for name, value in sorted(snapshot().items()):
                    if name.endswith("_total"):  # the client adds the suffix back
                        yield CounterMetricFamily(name[: -len("_total")], HELP[name], value=value)
                    else:
                        yield GaugeMetricFamily(name, HELP[name], value=value)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Snapshot())
        try:
            self.server, self.thread = start_http_server(port, host, registry=registry)
        except OSError as exc:
            raise _cannot_serve(host, port, exc) from None
        self.port = int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
