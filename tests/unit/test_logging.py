"""What ``-v`` and ``-vv`` show: the CLI's handler, and the records of planning, migrations
and re-decodes (see also test_worker.py, for worker processes' records, and test_rpc_client.py)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from gapfill.cli import _StderrLog
from gapfill.engine.run import EnrichJob, _plan
from gapfill.enrich.redecode import redecode_contract
from gapfill.model import Contract, Ref
from gapfill.redact import DbUrl
from gapfill.store import open_store

C = "0x" + "ab" * 20
KEY = "S3cr3tPathKeyAbCdEf0123"
PASSWORD = "S3cr3tPassw0rdQwErTy"


def _said(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_the_clis_handler_writes_to_standard_error_as_it_is_now_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The live view swaps sys.stderr for a proxy that prints above it: a handler holding the
    # stream it started with wrote under the view.
    handler = _StderrLog()
    handler.secrets = [DbUrl(f"postgresql://gf:{PASSWORD}@db.example.com/gf"),
                       f"https://rpc.example.com/v3/{KEY}?apikey={KEY}"]  # fmt: skip
    first, second = io.StringIO(), io.StringIO()
    log = logging.getLogger("gapfill.test_logging")
    for stream in (first, second):
        monkeypatch.setattr("sys.stderr", stream)
        args = (f"https://rpc.example.com/v3/{KEY}", KEY, PASSWORD)
        handler.handle(log.makeRecord(log.name, logging.INFO, __file__, 1, "asked %s with key %s of %s", args,
                                      None))  # fmt: skip
    assert (
        first.getvalue() == second.getvalue() == "asked https://rpc.example.com/v3/*** with key *** of ***\n"
    )


def test_info_logs_migrations_planning_and_redecodes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gapfill")
    url = f"sqlite:///{tmp_path / 'g.db'}"
    with open_store(url) as store:
        store.add_contract(Contract(1, C))
        store.add_refs(Ref(1, C, f"0x{i:064x}", 10 + i) for i in range(5))
        run_id = store.create_run("batch", 1)
        assert _plan(store, EnrichJob(url, (), ((1, C),), 1, batch_size=2), run_id) == (3, 5, 0, 5)
        redecode_contract(store, 1, C, [])
    migrations = _said(caplog, "gapfill.store.base")
    assert migrations and migrations[0].startswith(
        f"database {tmp_path / 'g.db'}: schema migration 1 applied ("
    )
    [planned] = _said(caplog, "gapfill.engine.run")
    assert planned.startswith(f"run {run_id} planned 5 ref(s) into 3 new batch(es) of up to 2 refs, joined 0 "
                              "open plan(s); 3 open batches for 1 contract(s) ("), planned  # fmt: skip
    [redecoded] = _said(caplog, "gapfill.enrich.redecode")
    assert redecoded.startswith(
        f"decoded again the stored rows of {C} on chain 1 with its new ABI: "
        "0 transaction(s) sent to it (0 decoded), 0 log(s) (0 decoded) in "
    ), redecoded
