"""Hints name where a value came from: the option, the environment variable, or the config
file's key and file; never an option the user did not pass."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gapfill.cli import Ctx, served, unserved
from gapfill.errors import ConfigError, GapfillError, RpcError
from gapfill.model import Contract
from gapfill.redact import redact_text
from gapfill.rpc import Call, CallError
from gapfill.settings import FileConfig, load_config

A, B = "0x" + "aa" * 20, "0x" + "bb" * 20
KEY = "0123456789abcdef0123456789abcdef"


def file_ctx(tmp_path: Path) -> Ctx:
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'[[endpoints]]\nurl = "https://eth.example.com/v2/{KEY}"\n')
    return Ctx("sqlite:///x.db", (), None, load_config(str(cfg)), 0)


def test_the_config_file_endpoints_are_named_by_key_and_file(tmp_path: Path) -> None:
    ctx = file_ctx(tmp_path)
    assert ctx.endpoints_check() == f"[[endpoints]] url in {tmp_path / 'gapfill.toml'}"
    # Given as an option or in the environment, the flag's URLs win and are named as given.
    ctx.rpc_urls, ctx.rpc_check = ("http://127.0.0.1:8545",), "ETH_RPC_URL"
    assert ctx.endpoints_check() == "ETH_RPC_URL"


def test_served_names_where_the_endpoints_came_from(tmp_path: Path) -> None:
    check = file_ctx(tmp_path).endpoints_check()
    with pytest.raises(GapfillError) as info:
        served([Contract(1, A), Contract(5, B)], 31337, check)
    assert str(info.value) == ("no tracked contract is on chain 31337, the RPC node's chain (they are "
                               f"on chains 1, 5): check [[endpoints]] url in {tmp_path / 'gapfill.toml'}")


def test_one_address_on_several_chains_is_the_nodes_or_else_still_asks_for_the_chain(tmp_path: Path) -> None:
    # `--contract A` on chains 1 and 5: the endpoints' chain is the one meant, the other not
    # left out (not asked for); with no endpoint to ask, A stays ambiguous, dry run or not.
    picked = served([Contract(1, A), Contract(5, A)], 5, "--rpc-url", one_address=True)
    assert picked == ([Contract(5, A)], [])
    from click.testing import CliRunner

    from gapfill.cli import cli

    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    for chain in ("1", "5"):
        assert CliRunner().invoke(cli, [*db, "contract", "add", A, "--chain-id", chain]).exit_code == 0
    for dry_run in ([], ["--dry-run"]):
        r = CliRunner().invoke(cli, [*db, "enrich", "--contract", A, *dry_run])
        assert r.exit_code == 1
        assert r.stderr == f"error: contract {A} is tracked on chains 1, 5: pass --chain-id to pick one\n"


def test_unserved_names_where_the_endpoints_came_from() -> None:
    [said] = unserved([Contract(5, B)], "[[endpoints]] url in /etc/gapfill.toml", {(5, B): 2})
    assert said == (f"no endpoint ([[endpoints]] url in /etc/gapfill.toml) serves chain 5: contract {B} "
                    "skipped (2 missing refs left as they are); give an endpoint of chain 5, or pass "
                    "--chain-id to work on one chain only")
    [said] = unserved([Contract(5, B)], "ETH_RPC_URL", {(5, B): 1})
    assert "skipped (1 missing ref left as it is); " in said
    assert said.startswith("no endpoint (ETH_RPC_URL) serves chain 5") and "--rpc-url" not in said


def test_a_malformed_url_in_the_config_file_names_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text('[[endpoints]]\nurl = "https://a.example/"\n\n[[endpoints]]\nurl = "http://h:99999/"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert str(info.value) == ("RPC URL 'http://h:99999/' is not valid (Port out of range 0-65535); "
                               f"check endpoints[1].url in {cfg}")


@pytest.mark.parametrize(("check", "said"), [("--rpc-url", "--rpc-url"), ("ETH_RPC_URL", "ETH_RPC_URL")])
def test_a_malformed_url_names_the_option_or_the_variable(check: str, said: str) -> None:
    ctx = Ctx("sqlite:///x.db", (f"eth.example.com/v2/{KEY}",), None, FileConfig(), 0)
    ctx.rpc_check = check
    with pytest.raises(ConfigError) as info:
        ctx.endpoints()
    shown = redact_text(str(info.value), *ctx.secrets())
    assert shown.endswith(f"; check {said}") and "config file" not in shown and KEY not in shown


class _Client:
    """What discovery asks of a client before and while it scans: a chain, and answers."""

    check = "[[endpoints]] url in /etc/gapfill.toml"

    async def probe(self, tell: Any = None) -> int:
        return 31337

    async def call_many(self, calls: list[Call]) -> list[Any]:
        return [CallError("transient", "HTTP 500 (at http://n/, after 3 attempts)") for _ in calls]

    async def call_many_via(self, calls: list[Call]) -> list[tuple[Any, None]]:
        return [(out, None) for out in await self.call_many(calls)]


def test_discovery_on_another_chain_names_where_the_endpoints_came_from() -> None:
    from gapfill.discover.run import discover

    with pytest.raises(RpcError) as info:
        asyncio.run(discover(None, _Client(), Contract(1, A)))  # type: ignore[arg-type]
    assert str(info.value) == (f"the RPC node serves chain 31337 but {A} is tracked on chain 1: "
                               "check [[endpoints]] url in /etc/gapfill.toml")


def test_a_failed_range_scan_names_where_the_endpoints_came_from() -> None:
    from gapfill.discover.ranges import AdaptiveWindow, scan_ranges

    scan = scan_ranges(_Client(), [(0, 9)], lambda lo, hi: Call("eth_getLogs", [lo, hi]),  # type: ignore[arg-type]
                       AdaptiveWindow())  # fmt: skip
    with pytest.raises(RpcError) as info:
        asyncio.run(scan)
    assert str(info.value).endswith(
        "or point [[endpoints]] url in /etc/gapfill.toml at another node"), str(info.value)


@pytest.mark.parametrize("given", ["config file", "environment", "option"])
def test_database_hints_name_where_the_url_came_from(tmp_path: Path, given: str) -> None:
    from click.testing import CliRunner

    from gapfill.cli import cli

    missing = tmp_path / "missing.db"
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "sqlite:///{missing}"\n')
    args, env = {"config file": (["--config", str(cfg)], {}),
                 "environment": (["--config", ""], {"GAPFILL_DB": f"sqlite:///{missing}"}),
                 "option": (["--config", str(cfg), "--db", f"sqlite:///{missing}"], {})}[given]  # fmt: skip
    said = {"config file": f"the db key of {cfg}", "environment": "GAPFILL_DB", "option": "--db"}[given]
    r = CliRunner().invoke(cli, [*args, "status"], env=env)
    assert r.exit_code == 1 and r.stderr == (f"error: the SQLite database {missing} does not exist: check "
                                             f"{said}, or start one with `gapfill contract add ADDRESS`\n")
    assert not missing.exists()
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--db", "sqlite:///:memory:", "status"])
    assert r.stderr.endswith("gone when the command ends: set --db to a file, such as sqlite:///gapfill.db\n")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("mysql://root:hunter2secret@127.0.0.1/x", "unsupported database URL scheme 'mysql' in the db key of "
                                                   "{cfg}: use sqlite:///path/to/file.db or "
                                                   "postgresql://user@host:5432/dbname"),
        ("host=127.0.0.1 password=hunter2secret",
         "'host=127.0.0.1 password=***' is not a database URL: write the db key of {cfg} as "
         "postgresql://user:password@host:5432/dbname (or sqlite:///path/to/file.db)"),
    ],
)  # fmt: skip
def test_a_database_url_of_no_known_form_names_where_it_came_from(
    tmp_path: Path, url: str, said: str
) -> None:
    # Both named no setting at all: the user had to guess which of --db, GAPFILL_DB or the file.
    from click.testing import CliRunner

    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "{url}"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "status"])
    assert r.exit_code == 1 and r.stderr == f"error: {said.format(cfg=cfg)}\n"
    assert "hunter2" not in r.stderr


def test_a_worker_on_a_database_without_contracts_names_the_config_files_db(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "sqlite:///{tmp_path / "empty.db"}"\n')
    assert CliRunner().invoke(cli, ["--config", str(cfg), "init"]).exit_code == 0
    r = CliRunner().invoke(cli, ["--config", str(cfg), "worker"])
    assert r.exit_code == 1
    assert r.stderr == f"error: no contract is tracked in this database: check the db key of {cfg}\n"


@pytest.fixture
def silent_node() -> Any:
    """An RPC URL whose server accepts connections and never answers."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/"


@pytest.mark.parametrize("given", ["config file", "option"])
def test_a_silent_node_names_where_the_rpc_timeout_came_from(tmp_path: Path, silent_node: str,
                                                             given: str) -> None:  # fmt: skip
    # "raise --rpc-timeout" was said when the config file's [enrich] set it.
    from click.testing import CliRunner

    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'[[endpoints]]\nurl = "{silent_node}"\n\n[enrich]\nrpc_timeout_s = 0.2\n')
    flag = ["--rpc-timeout", "0.3"] if given == "option" else []
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--db", f"sqlite:///{tmp_path / 'x.db'}",
                                 "contract", "add", A, *flag])  # fmt: skip
    assert r.exit_code == 1, r.stderr
    said = f"[enrich] rpc_timeout_s in {cfg}" if given == "config file" else "--rpc-timeout"
    assert r.stderr.endswith(f"check that it is not stuck or overloaded, or raise {said}\n"), r.stderr


async def test_the_start_up_wait_names_where_the_rpc_timeout_came_from(silent_node: str) -> None:
    from gapfill.rpc import RpcClient
    from gapfill.rpc.config import EndpointConfig, RpcSettings

    told: list[str] = []
    settings = RpcSettings(read_timeout_s=0.3, slow_probe_notice_s=0.1, attempts=1,
                           timeout_check="[enrich] rpc_timeout_s in /etc/gapfill.toml")  # fmt: skip
    async with RpcClient([EndpointConfig(silent_node)], settings) as client:
        with pytest.raises(RpcError) as info:
            await client.probe(told.append)
    assert told[0].endswith("it gets 1 try of 0.3 s each ([enrich] rpc_timeout_s in /etc/gapfill.toml)")
    assert str(info.value).endswith("or raise [enrich] rpc_timeout_s in /etc/gapfill.toml")


@pytest.mark.parametrize("given", ["config file", "environment", "option"])
def test_a_bad_explorer_url_names_where_it_came_from(tmp_path: Path, given: str) -> None:
    from click.testing import CliRunner

    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text('[explorer]\nurl = "ftp://explorer.example/api"\n')
    args, env = {"config file": ([], {}),
                 "environment": ([], {"GAPFILL_EXPLORER_URL": "ftp://explorer.example/api"}),
                 "option": (["--explorer-url", "ftp://explorer.example/api"], {})}[given]  # fmt: skip
    said = {"config file": f"[explorer] url in {cfg}", "environment": "GAPFILL_EXPLORER_URL",
            "option": "--explorer-url"}[given]  # fmt: skip
    if given != "config file":
        cfg.write_text("")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--db", f"sqlite:///{tmp_path / 'x.db'}",
                                 "discover", *args], env=env)  # fmt: skip
    assert r.exit_code == 1
    assert r.stderr == ("error: explorer URL 'ftp://explorer.example/api' is not an http(s) URL: write it "
                        f"as https://explorer.example/api; check {said}\n")  # fmt: skip


def test_an_explorer_key_without_a_url_names_where_the_key_came_from(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'[explorer]\nkey = "{KEY}"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "--db", f"sqlite:///{tmp_path / 'x.db'}", "discover"])
    assert r.exit_code == 1 and KEY not in r.stderr
    assert r.stderr == (f"error: an explorer key is set ([explorer] key in {cfg}) but no URL: pass "
                        "--explorer-url, set GAPFILL_EXPLORER_URL or set [explorer] url in "
                        f"{cfg}\n")  # fmt: skip


async def test_explorer_messages_name_where_the_url_and_key_came_from() -> None:
    from gapfill.discover.explorer import ExplorerClient, ExplorerConfig, ExplorerError

    config = ExplorerConfig("http://127.0.0.1:1/api", key=KEY, attempts=1,
                            url_check="[explorer] url in /etc/gapfill.toml",
                            key_check="[explorer] key in /etc/gapfill.toml")  # fmt: skip
    async with ExplorerClient(config, 1) as client:
        with pytest.raises(ExplorerError) as info:
            await client.request({"module": "account", "action": "txlist"})
        assert str(info.value).endswith("; check [explorer] url in /etc/gapfill.toml")
        with pytest.raises(ExplorerError) as info:
            client._unwrap({"status": "0", "message": "NOTOK", "result": "Invalid API Key"})
        assert str(info.value).endswith("check [explorer] key in /etc/gapfill.toml")


def test_a_worker_process_names_where_the_database_url_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A concurrent run's workers open their own stores: their messages said
    # "--db / GAPFILL_DB" whatever the source, as the job did not carry it.
    import multiprocessing
    import signal

    from gapfill.engine.events import Notice
    from gapfill.engine.run import EnrichJob, _open, worker_process_main

    monkeypatch.setattr("gapfill.engine.run._log_through", lambda *_: None)  # logging stays pytest's
    monkeypatch.setattr(signal, "signal", lambda *_: None)  # SIGINT stays pytest's
    missing = tmp_path / "no" / "x.db"
    job = EnrichJob(db_url=f"sqlite:///{missing}", endpoints=(), targets=(), chain_id=1,
                    db_check="the db key of /etc/gapfill.toml")  # fmt: skip
    said = (f"cannot open the SQLite database {missing}: folder {missing.parent} does not exist; create "
            "it, or check the db key of /etc/gapfill.toml")  # fmt: skip
    events, sent = multiprocessing.Pipe(duplex=False)
    lifeline, coordinator = multiprocessing.Pipe(duplex=False)  # the coordinator's, as it holds it
    with pytest.raises(SystemExit):
        worker_process_main(0, job, sent, lifeline)
    assert events.recv() == Notice(f"[Worker-1] {said}")
    for conn in (events, lifeline, coordinator):
        conn.close()
    with pytest.raises(GapfillError) as info:
        _open(job, lambda event: None)  # the coordinator's, and a batch run's
    assert str(info.value) == said


def test_a_runs_job_carries_where_the_database_url_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    import gapfill.cli
    from gapfill.cli import cli

    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "sqlite:///{tmp_path / "g.db"}"\n\n[[endpoints]]\nurl = "http://127.0.0.1:1/"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "contract", "add", A, "--chain-id", "1"])
    assert r.exit_code == 0
    # A ref to fetch: with nothing missing, enrich says so and builds no job.
    ref = "0x" + "11" * 32
    r = CliRunner().invoke(cli, ["--config", str(cfg), "import", "-", "--contract", A], input=ref)
    assert r.exit_code == 0, r.stderr
    jobs: list[Any] = []

    def run_job(job: Any, *args: Any, store: Any = None, **kwargs: Any) -> None:
        jobs.append(job)
        if store is not None:  # the command's connection, handed to the run
            store.close()

    monkeypatch.setattr(gapfill.cli, "_run_job", run_job)
    r = CliRunner().invoke(cli, ["--config", str(cfg), "enrich"])  # `worker` builds its job alike
    assert r.exit_code == 0, r.stderr
    assert [job.db_check for job in jobs] == [f"the db key of {cfg}"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("given", ["config file", "option"])
def test_status_waits_for_the_head_as_long_as_the_rpc_timeout_says_and_says_when_none_came(
    tmp_path: Path, silent_node: str, given: str
) -> None:
    # It waited a fixed 5 s whatever --rpc-timeout said, and said nothing of the missing head.
    import time

    from click.testing import CliRunner

    from gapfill.cli import cli

    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}"]
    assert CliRunner().invoke(cli, [*db, "contract", "add", A, "--chain-id", "1"]).exit_code == 0
    cfg = tmp_path / "gapfill.toml"
    timeout = "\n[enrich]\nrpc_timeout_s = 0.3\n" if given == "config file" else ""
    cfg.write_text(f'[[endpoints]]\nurl = "{silent_node}"\n{timeout}')
    flag = ["--rpc-timeout", "0.3"] if given == "option" else []
    for args in (["status", *flag], ["status", "--json", *flag]):
        t0 = time.monotonic()
        r = CliRunner().invoke(cli, ["--config", str(cfg), *db, *args])
        assert time.monotonic() - t0 < 3.0
        assert r.exit_code == 0, r.stderr
        assert A in r.stdout  # the table (or the JSON) is whole
        said = f"[enrich] rpc_timeout_s in {cfg}" if given == "config file" else "--rpc-timeout"
        (line,) = r.stderr.splitlines()
        assert line.startswith("note: no head block from the RPC node, so coverage stops at the "
                               "highest scanned block: eth_chainId failed: no response within 0.3 s"), line
        assert line.endswith(f"or raise {said}"), line
    assert json.loads(r.stdout)[0]["contract"] == A


@pytest.fixture
def decimal_head_node() -> Any:
    """A loopback node on chain 1 whose eth_blockNumber is a decimal "100" (not 0x hex)."""
    from fixtures_http import loopback, rpc_answers

    with loopback(rpc_answers({"eth_chainId": "0x1", "eth_blockNumber": "100"})) as url:
        yield f"{url}/"


@pytest.mark.timeout(30)
def test_status_says_a_head_that_is_not_0x_hex_rather_than_read_it_as_another(
    tmp_path: Path, decimal_head_node: str
) -> None:
    # int(head, 16) read "100" as block 256: coverage was reported up to a block the node
    # had not said. Now the head is unknown, and the note says which answer was bad.
    from click.testing import CliRunner

    from gapfill.cli import cli

    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--rpc-url", decimal_head_node]
    assert CliRunner().invoke(cli, [*db, "contract", "add", A, "--chain-id", "1"]).exit_code == 0
    r = CliRunner().invoke(cli, [*db, "status"])
    assert r.exit_code == 0, r.stderr
    (line,) = r.stderr.splitlines()
    assert line == ("note: no head block from the RPC node, so coverage stops at the highest scanned "
                    "block: its answer to eth_blockNumber is '100', not a 0x hex quantity"), line
