"""The --metrics-port endpoint: prometheus_client serves the run's counters, leases among them."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gapfill.engine.events import LEASE_GONE, BatchAbandoned, BatchAssigned, BatchDone, BatchesEmptied
from gapfill.engine.metrics import HELP, LeaseTally, MetricsServer, check_port, series
from gapfill.errors import ConfigError

KEY = (1, "0x" + "00" * 32)


def assigned(batch_id: int) -> BatchAssigned:
    return BatchAssigned(worker=0, batch_id=batch_id, lo=KEY, hi=KEY, refs=10, attempt=1, lease=1)  # type: ignore[arg-type]


def test_the_lease_tally_follows_each_lease_to_its_end() -> None:
    tally = LeaseTally()
    for ev in (
        *(assigned(i) for i in range(1, 8)),
        BatchAssigned(worker=1, batch_id=8, lo=KEY, hi=KEY, refs=10, attempt=1, lease=1),  # type: ignore[arg-type]
        BatchDone(0, 1, 10, 0, 0.1, committed=True, stored=10),
        BatchDone(0, 2, 10, 0, 0.1, committed=False),  # lost at commit: nothing written
        BatchAbandoned(0, 3, "node gone", 1, 1, kept=4, rest=6),  # given back
        BatchAbandoned(0, 4, "stopped", 1, 1, kept=10, closed=True),  # what it kept was all: done
        BatchesEmptied(0, 3),  # closed without a lease: no lease event
    ):
        tally.take(ev)
    tally.took_back(5)  # the coordinator took an expired lease back (its worker is killed)
    tally.took_back(99)  # another run's
    assert (tally.taken, tally.committed, tally.given_back, tally.lost, tally.expired) == (8, 2, 1, 1, 2)
    assert sorted(tally.held) == [6, 7, 8]
    tally.take(BatchDone(0, 5, 10, 0, 0.1, committed=False))  # the killed worker's late word
    tally.worker_gone(0)  # worker 0 crashed: its leases went back with it
    assert tally.held == {8: 1}
    assert series(0, 0, 0, 0, 0, 0, 1, 1, tally)["gapfill_leases_held"] == 1


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def test_a_stuck_workers_late_lost_commit_leaves_the_new_holders_lease_held() -> None:
    tally = LeaseTally()
    tally.take(assigned(7))  # worker 0, attempt 1
    tally.took_back(7)  # its lease expired: the coordinator took it back
    tally.take(BatchAssigned(worker=1, batch_id=7, lo=KEY, hi=KEY, refs=10, attempt=2, lease=2))  # type: ignore[arg-type]
    # Worker 0's call finally returns: its commit finds the lease gone, nothing written.
    tally.take(BatchDone(0, 7, 10, 0, 0.1, committed=False))
    assert tally.held == {7: 1}  # worker 1 still holds batch 7's lease
    assert series(0, 0, 0, 0, 0, 0, 2, 0, tally)["gapfill_leases_held"] == 1


def test_a_late_give_back_that_found_its_lease_gone_leaves_the_new_holders_lease_held() -> None:
    tally = LeaseTally()
    tally.take(assigned(7))
    tally.take(BatchAssigned(worker=1, batch_id=7, lo=KEY, hi=KEY, refs=10, attempt=2, lease=2))  # type: ignore[arg-type]
    tally.take(BatchAbandoned(0, 7, "stopped", 1, 1, not_given=LEASE_GONE))
    assert tally.held == {7: 1}


def test_the_endpoint_serves_every_series_with_its_help_read_at_each_scrape() -> None:
    tally = LeaseTally(taken=3, committed=1, held={7: 0, 8: 1})
    calls = [5]

    def snapshot() -> dict[str, float]:
        return series(40, 2, calls[0], 1, 0, 1, 2, 0, tally)

    server = MetricsServer(0, snapshot)
    try:
        families = {f.name: f for f in text_string_to_metric_families(scrape(server.port))}
        assert set(HELP) == set(snapshot())
        for name, help_text in HELP.items():
            family = families[name.removesuffix("_total")]  # as the parser names a counter
            assert family.documentation == help_text, name
            assert family.type == ("counter" if name.endswith("_total") else "gauge"), name
            assert [s.name for s in family.samples] == [name]
        text = scrape(server.port)
        assert "gapfill_rpc_calls_total 5.0\n" in text
        assert "gapfill_leases_taken_total 3.0\n" in text and "gapfill_leases_held 2.0\n" in text
        calls[0] = 9
        tally.committed = 3
        tally.held.clear()
        text = scrape(server.port)
        assert "gapfill_rpc_calls_total 9.0\n" in text and "gapfill_leases_held 0.0\n" in text
    finally:
        server.close()


@pytest.mark.timeout(60)
def test_a_coordinators_scrape_as_a_worker_exits_leaves_its_exit_code_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Review h5: the snapshot (the HTTP server's thread) called proc.is_alive() on the
    # workers, as the supervision loop does in the main thread. A forkserver Process reads its
    # exit code from its sentinel pipe once: of two threads that both found it readable, one
    # read the code, the other met EOF and set returncode = 255. A worker that ended 0 then
    # read as crashed (restarted, "exited with code 255").
    import multiprocessing
    import multiprocessing.forkserver
    import threading
    import time
    from multiprocessing.connection import wait

    from gapfill.engine.run import Coordinator, EnrichJob, _Slot
    from gapfill.settings import EndpointSetting

    job = EnrichJob(db_url="sqlite:///unused.db", endpoints=(EndpointSetting("http://127.0.0.1:1"),),
                    targets=((1, "0x" + "11" * 20),), chain_id=1)  # fmt: skip
    c = Coordinator(job, lambda ev: None)
    proc = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(0,))
    proc.start()
    try:
        c.slots[0] = _Slot(0, proc, time.monotonic())
        c.alive_now = 1  # as the loop last counted
        assert wait([proc.sentinel], 30)  # it has exited: its code waits in the pipe
        real = multiprocessing.forkserver.read_signed

        def read_slowly(fd: int) -> int:  # widens the window between the wait and the read
            time.sleep(0.2)
            return int(real(fd))

        monkeypatch.setattr(multiprocessing.forkserver, "read_signed", read_slowly)
        scraped: list[dict[str, float]] = []
        scrape = threading.Thread(target=lambda: scraped.append(c._metrics_snapshot()))
        scrape.start()
        time.sleep(0.05)
        proc.is_alive()  # the supervision loop's turn
        scrape.join()
        assert proc.exitcode == 0
        assert scraped[0]["gapfill_workers_alive"] == 1
    finally:
        c.lifeline.close()
        c._lifeline_w.close()


def test_a_busy_port_is_one_sentence() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for start in (lambda: check_port(port), lambda: MetricsServer(port, dict)):
            with pytest.raises(ConfigError, match=rf"^cannot serve metrics on 127.0.0.1:{port} \(.*\): "
                                                  "choose another --metrics-port"):  # fmt: skip
                start()
