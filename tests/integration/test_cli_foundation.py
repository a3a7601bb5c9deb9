"""The foundation commands end to end through the CLI, on both backends, bad input included."""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import psycopg
import pytest
from click.testing import CliRunner, Result
from engine_support import gapfill_argv

from gapfill.cli import cli
from gapfill.store import open_store
from gapfill.store.base import migrations

C = "0x" + "ab" * 20


def h(i: int) -> str:
    return "0x" + f"{i:064x}"


def run(db: str, *args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, ["--db", db, *args], input=input, catch_exceptions=False)


def one_sentence(r: Result) -> str:
    err = r.stderr.strip()
    assert "Traceback" not in r.output + r.stderr
    return err


@pytest.fixture
def tracked(db_url: str) -> str:
    assert run(db_url, "init").exit_code == 0
    r = run(db_url, "contract", "add", C, "--chain-id", "1", "--label", "token")
    assert r.exit_code == 0, r.output + r.stderr
    return db_url


def refs_of(db: str) -> list[tuple[str, int | None]]:
    with open_store(db) as s:
        return [(r.tx_hash, r.block_number) for r in s.iter_gap(1, C)]


def test_failures_cut_short_by_limit_say_so(tracked: str) -> None:
    # --limit (1000 by default) cut the list without a word: 1000 lines looked like all.
    from gapfill.model import Enriched, Failure, Ref

    with open_store(tracked) as s:
        s.add_refs([Ref(1, C, h(i), 7) for i in range(3)])
        s.write(Enriched(failures=[Failure(1, h(i), C, "not_found", "null") for i in range(3)]))
    for args in ((), ("--json",)):
        r = run(tracked, "failures", "--limit", "2", *args)
        assert r.exit_code == 0 and len(r.stdout.splitlines() if not args else orjson.loads(r.stdout)) == 2
        assert one_sentence(r) == ("note: only the first 2 failures are shown, and there are more: "
                                   "pass a higher --limit to see them"), r.stderr
        r = run(tracked, "failures", "--limit", "3", *args)
        assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_init_is_idempotent_and_says_whether_it_created_the_schema(db_url: str) -> None:
    # QA: a first init and a second one both said "... is at schema version N".
    if db_url.startswith("postgresql"):  # the fixture's database has the schema already
        with psycopg.connect(db_url, autocommit=True) as admin:
            admin.execute("DROP SCHEMA public CASCADE")
            admin.execute("CREATE SCHEMA public")
    latest = migrations("sqlite")[-1][0]  # the same on both backends
    with open_store(db_url, migrate=False) as s:
        shown = s.display_url
    r = run(db_url, "init")
    assert r.exit_code == 0, r.output + r.stderr
    assert r.output == f"created gapfill's tables (schema version {latest}) in {shown}\n", r.output
    r = run(db_url, "init")
    assert r.exit_code == 0 and r.output == f"database {shown} is at schema version {latest}\n", r.output


def test_init_says_it_upgraded_an_older_schema(sqlite_url: str) -> None:
    assert run(sqlite_url, "init").exit_code == 0
    latest = migrations("sqlite")[-1][0]
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:  # as the version before left it
        db.execute("ALTER TABLE batches DROP COLUMN stops")  # what 009_batch_stops.sql adds
        db.execute("DELETE FROM schema_migrations WHERE version = ?", (latest,))
    r = run(sqlite_url, "init")
    assert r.exit_code == 0, r.output + r.stderr
    assert r.output == (f"upgraded gapfill's tables in {sqlite_url} from schema version {latest - 1} "
                        f"to {latest}\n")
    assert run(sqlite_url, "init").output == f"database {sqlite_url} is at schema version {latest}\n"


def test_contract_add_and_list(tracked: str) -> None:
    r = run(tracked, "contract", "list", "--json")
    assert orjson.loads(r.output) == [
        {"chain_id": 1, "address": C, "label": "token", "start_block": None, "has_abi": False}
    ]


def test_contract_list_of_none_says_so_and_how_to_add_one(db_url: str) -> None:
    # QA: it printed nothing, which left it open whether the command had run at all.
    assert run(db_url, "init").exit_code == 0
    r = run(db_url, "contract", "list")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert r.output == "no contract is tracked yet: add one with `gapfill contract add ADDRESS`\n"
    r = run(db_url, "contract", "list", "--json")
    assert r.exit_code == 0 and orjson.loads(r.output) == []


def test_contract_list_names_its_columns(
    tracked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # QA: "1 0x... token - -" and "... - abi" could not be read without --json.
    abi = tmp_path / "abi.json"
    abi.write_text("[]")
    other = "0x" + "cd" * 20
    r = run(tracked, "contract", "add", other, "--chain-id", "5", "--label", "my pool", "--abi", str(abi),
            "--start-block", "12")  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    r = run(tracked, "contract", "list")  # not a terminal: tab-separated, a label's spaces kept whole
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    assert [ln.split("\t") for ln in r.output.splitlines()] == [
        ["chain", "address", "label", "start_block", "abi"],
        ["1", C, "token", "-", "no"],
        ["5", other, "my pool", "12", "yes"],
    ], r.output
    monkeypatch.setattr("gapfill.cli._is_tty", lambda: True)  # a terminal: aligned columns
    lines = run(tracked, "contract", "list").output.splitlines()
    assert lines[0].split() == ["chain", "address", "label", "start_block", "abi"], lines
    assert lines[1].split() == ["1", C, "token", "-", "no"], lines
    assert [ln.index(C if i == 1 else "address") for i, ln in enumerate(lines[:2])] == [7, 7], lines


def test_checksummed_address_is_accepted_and_lowercased(db_url: str) -> None:
    addr = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    r = run(db_url, "contract", "add", addr, "--chain-id", "1")
    assert r.exit_code == 0, r.stderr
    assert addr.lower() in r.output


@pytest.mark.parametrize(
    ("address", "needle"),
    [("0x1234", "40"), ("hello", "not an address"), ("0x" + "g" * 40, "not an address"),
     ("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD", "checksum")],
)  # fmt: skip
def test_bad_address_is_one_sentence_exit_2(db_url: str, address: str, needle: str) -> None:
    r = run(db_url, "contract", "add", address, "--chain-id", "1")
    assert r.exit_code == 2
    assert needle in one_sentence(r)


def test_an_abi_file_with_a_utf8_byte_order_mark_is_read(db_url: str, tmp_path: Path) -> None:
    abi = [{"type": "event", "name": "Ping", "anonymous": False, "inputs": []}]
    f = tmp_path / "bom.abi.json"
    f.write_bytes(b"\xef\xbb\xbf" + orjson.dumps({"abi": abi}))
    r = run(db_url, "contract", "add", C, "--chain-id", "1", "--abi", str(f))
    assert r.exit_code == 0, r.output + r.stderr
    with open_store(db_url) as s:
        assert s.get_contract(C, 1).abi == abi


def test_abi_entries_that_cannot_be_decoded_are_named(sqlite_url: str, tmp_path: Path) -> None:
    # They used to be skipped without a word: the contract's calls simply stayed undecoded.
    abi = [{"type": "function", "name": "odd", "inputs": [{"name": "x", "type": "uint7"}]},
           {"type": "function", "name": "fine", "inputs": [{"name": "x", "type": "uint256"}]}]
    f = tmp_path / "odd.abi.json"
    f.write_bytes(orjson.dumps(abi))
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--abi", str(f))
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stderr == (f"warning: 1 entry of {f} cannot be decoded and will be skipped: "
                        "function odd: bad type uint7\n")  # fmt: skip
    good = tmp_path / "good.abi.json"
    good.write_bytes(orjson.dumps(abi[1:]))
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--abi", str(good))
    assert r.exit_code == 0 and r.stderr == "", r.stderr


def test_an_explorers_getabi_answer_is_taken_as_its_abi(sqlite_url: str, tmp_path: Path) -> None:
    # `curl '...?module=contract&action=getabi&address=...' > abi.json` saves the ABI as a
    # JSON string in "result": it was refused ("holds no ABI"), where an artifact was taken.
    abi = [{"type": "function", "name": "fine", "inputs": [{"name": "x", "type": "uint256"}]}]
    f = tmp_path / "getabi.json"
    f.write_bytes(orjson.dumps({"status": "1", "message": "OK", "result": orjson.dumps(abi).decode()}))
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--abi", str(f))
    assert r.exit_code == 0 and r.stderr == "", r.output + r.stderr
    with open_store(sqlite_url) as s:
        assert s.get_contract(C, 1).abi == abi
    # A refusal (an unverified contract) says the explorer's words.
    f.write_bytes(orjson.dumps({"status": "0", "message": "NOTOK",
                                "result": "Contract source code not verified"}))  # fmt: skip
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--abi", str(f))
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: ABI file {f} is an explorer's refusal, not an ABI (Contract source "
                               "code not verified): give the contract's ABI JSON")  # fmt: skip


def test_an_unreadable_abi_path_is_one_sentence(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    path = tmp_path / "notes.txt" / "abi.json"  # a file where a folder should be
    r = run(sqlite_url, "contract", "add", C, "--chain-id", "1", "--abi", str(path))
    assert r.exit_code == 1
    assert one_sentence(r) == f"error: cannot read ABI file {path} (Not a directory): fix the --abi path"
    assert not (tmp_path / "gapfill.db").exists()


def test_contract_add_without_chain_id_or_rpc_says_what_to_do(db_url: str) -> None:
    r = run(db_url, "contract", "add", C)
    assert r.exit_code == 1
    assert "--chain-id" in one_sentence(r)


def test_contract_add_without_chain_id_or_rpc_leaves_no_new_sqlite_file(
    sqlite_url: str, tmp_path: Path
) -> None:
    # It made an empty gapfill.db (schema and all) to look the address up, then said it could
    # not tell the chain: `status` then said "no contract is tracked yet", not that the
    # database does not exist.
    r = run(sqlite_url, "contract", "add", C)
    assert r.exit_code == 1 and "--chain-id" in one_sentence(r)
    assert not (tmp_path / "gapfill.db").exists()


def test_import_hash_list_csv_etherscan_and_stdin(tracked: str, tmp_path: Path) -> None:
    plain = tmp_path / "hashes.txt"
    plain.write_text(f"{h(1)}\n\n{h(2).upper().replace('0X', '0x')}\n{h(1)}\n")
    r = run(tracked, "import", str(plain), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert "imported 2 new refs" in r.output
    csvf = tmp_path / "refs.csv"
    csvf.write_text(f"tx_hash,blockNumber\n{h(3)},17\n{h(4)},0x20\n")
    assert run(tracked, "import", str(csvf), "--contract", C).exit_code == 0
    ether = tmp_path / "export.csv"
    ether.write_text(
        '"Transaction Hash","Blockno","UnixTimestamp","DateTime (UTC)","From","To","Method"\n'
        f'"{h(5)}","99","1700000000","2023-11-14 22:13:20","0xaa","0xbb","Transfer"\n'
    )
    assert run(tracked, "import", str(ether), "--contract", C).exit_code == 0
    assert run(tracked, "import", "-", "--contract", C, input=f"{h(6)}\n").exit_code == 0
    assert sorted(refs_of(tracked), key=lambda x: x[0]) == [
        (h(1), None), (h(2), None), (h(3), 17), (h(4), 32), (h(5), 99), (h(6), None)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    ["hash;block_number\n{a};17\n{b};0x20\n",  # spreadsheets where the decimal mark is a comma
     "tx_hash\tblockNumber\n{a}\t17\n{b}\t0x20\n",
     '"Transaction Hash";"Blockno";"Method"\n"{a}";"17";"a,b"\n"{b}";"32";"c;d"\n',
     '"a;b",hash,block_number\n"x;y",{a},17\nz,{b},32\n'],  # ';' inside a column name
)  # fmt: skip
def test_a_csv_separated_by_semicolons_or_tabs_is_read(tracked: str, tmp_path: Path, text: str) -> None:
    f = tmp_path / "refs.csv"
    f.write_text(text.format(a=h(1), b=h(2)))
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert sorted(refs_of(tracked)) == [(h(1), 17), (h(2), 32)]


def test_a_csv_without_a_hash_column_names_the_separators(tracked: str, tmp_path: Path) -> None:
    f = tmp_path / "refs.csv"
    f.write_text("foo;bar\n1;2\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 1
    assert "separated by commas, semicolons or tabs" in one_sentence(r) and refs_of(tracked) == []


def test_a_csv_whose_block_column_is_not_read_names_the_columns_ignored(tracked: str, tmp_path: Path) -> None:
    # A misspelt block column was dropped without a word: the refs came in without blocks.
    f = tmp_path / "refs.csv"
    f.write_text(f"tx_hash,Block_Num,from\n{h(1)},17,0xaa\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert "imported 1 new ref" in r.stdout and "note" not in r.stdout
    assert r.stderr == (f"note: {f} has no block number column, so its refs get their block numbers when "
                        "enriched; ignored: Block_Num, from (block numbers are read from a column named "
                        "block_number, blockNumber, blockno, block or 'Block Number')\n")  # fmt: skip
    assert refs_of(tracked) == [(h(1), None)]
    # Many columns: the first five are named, and how many more.
    f.write_text(",".join(["hash", *(f"col{i}" for i in range(60))]) + f"\n{h(5)}" + ",x" * 60 + "\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert "; ignored: col0, col1, col2, col3, col4 and 55 more (block numbers are read" in r.stderr, r.stderr
    # With a block column (an Etherscan export's many others are not news), or no other: no note.
    for text in (f"hash,blockNumber,from\n{h(2)},5,0xaa\n", f"hash\n{h(3)}\n", f"{h(4)}\n"):
        f.write_text(text)
        r = run(tracked, "import", str(f), "--contract", C)
        assert r.exit_code == 0 and r.stderr == "", r.stderr
    # A header alone on stdin (a quiet day): no refs, so no word of their block numbers.
    r = run(tracked, "import", "-", "--contract", C, input="tx_hash,Block_Num\n")
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    # A misspelt hash column: nothing is imported, and the columns read are named.
    f.write_text(f"tx_hsh,block_number\n{h(5)},5\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 1
    assert one_sentence(r).startswith(f"error: {f} has no hash column among tx_hsh, block_number: "), r.stderr


def test_malformed_row_names_the_line_and_imports_nothing(tracked: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.csv"
    f.write_text("hash,block_number\n" + "".join(f"{h(i)},{i}\n" for i in range(1, 6)) + "0xzz,7\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 1
    assert "line 7" in one_sentence(r) and "nothing was imported" in r.stderr
    assert refs_of(tracked) == []
    g = tmp_path / "bad.txt"
    g.write_text(f"{h(1)}\n{h(2)}xx\n")
    r = run(tracked, "import", str(g), "--contract", C)
    assert r.exit_code == 1 and "line 2" in r.stderr
    assert refs_of(tracked) == []


def test_a_one_column_csv_and_a_block_number_too_large_for_the_database(tracked: str, tmp_path: Path) -> None:
    one = tmp_path / "one.csv"
    one.write_text(f"tx_hash\n{h(1)}\n{h(2)}\n")
    r = run(tracked, "import", str(one), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert sorted(refs_of(tracked)) == [(h(1), None), (h(2), None)]
    big = tmp_path / "big.csv"
    big.write_text(f"hash,block_number\n{h(3)},7\n{h(4)},99999999999999999999999999\n")
    r = run(tracked, "import", str(big), "--contract", C)
    assert r.exit_code == 1 and "line 3" in one_sentence(r) and "too large" in r.stderr
    assert len(refs_of(tracked)) == 2


@pytest.mark.parametrize(
    "args",
    [
        ("contract", "add", "0x" + "22" * 20, "--chain-id", "99999999999999999999999"),
        ("contract", "add", "0x" + "22" * 20, "--chain-id", "1", "--start-block", "99999999999999999999"),
        ("enrich", "--lease-timeout", "nan"),
        ("--rps", "inf", "enrich", "--dry-run"),
    ],
)
def test_out_of_range_options_are_usage_errors(tracked: str, args: tuple[str, ...]) -> None:
    r = run(tracked, *args)
    assert r.exit_code == 2 and "Invalid value" in r.stderr, r.output


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@127.0.0.1:abc/x", "postgresql://u:hunter2@[::1/x"])
def test_a_malformed_postgres_url_is_one_sentence_without_its_password(url: str) -> None:
    r = run(url, "status")
    assert r.exit_code == 1 and "malformed" in one_sentence(r) and "hunter2" not in r.output


def test_csv_without_hash_column_and_binary_file(tracked: str, tmp_path: Path) -> None:
    f = tmp_path / "nohash.csv"
    f.write_text("foo,bar\n1,2\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 1 and "no hash column" in one_sentence(r)
    b = tmp_path / "blob.bin"
    b.write_bytes(b"\x00\x01\x02garbage" * 100)
    r = run(tracked, "import", str(b), "--contract", C)
    assert r.exit_code == 1 and "binary" in one_sentence(r)
    r = run(tracked, "import", str(tmp_path / "missing.txt"), "--contract", C)
    assert r.exit_code == 1 and "no such file" in one_sentence(r)


def test_invalid_hash_and_unknown_contract(tracked: str, tmp_path: Path) -> None:
    f = tmp_path / "h.txt"
    f.write_text("0x1234\n")
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 1 and "not a transaction hash" in one_sentence(r)
    f.write_text(f"{h(1)}\n")
    other = "0x" + "cd" * 20
    r = run(tracked, "import", str(f), "--contract", other)
    assert r.exit_code == 1 and "not tracked" in one_sentence(r) and "contract add" in r.stderr
    r = run(tracked, "status", "--contract", other)
    assert r.exit_code == 1 and "not tracked" in r.stderr


def test_status_plain_and_json(tracked: str, tmp_path: Path) -> None:
    f = tmp_path / "h.csv"
    f.write_text("hash,block_number\n" + "".join(f"{h(i)},{10 + i}\n" for i in range(1, 4)))
    run(tracked, "import", str(f), "--contract", C)
    r = run(tracked, "status")
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split()[:8] == ["chain", "contract", "label", "refs", "enriched", "missing",
                                    "failed", "blocks"]  # fmt: skip
    assert lines[1].split()[:8] == ["1", C, "token", "3", "0", "3", "0", "11-13"]
    data = orjson.loads(run(tracked, "status", "--json").output)
    assert data[0]["refs"] == 3 and data[0]["missing"] == 3 and data[0]["min_block"] == 11


def test_status_coverage_lines_name_their_chain(tracked: str) -> None:
    # One address on two chains gave two "0xabab...: ..." lines that could not be told apart.
    from gapfill.model import CoverageRange

    run(tracked, "contract", "add", C, "--chain-id", "5")
    with open_store(tracked) as store:
        store.add_refs_and_coverage([], [CoverageRange(5, C, 0, 9, "logs")])
    lines = run(tracked, "status").output.splitlines()
    assert f"{C} on chain 1: no block range scanned yet" in lines
    assert [ln for ln in lines if ln.startswith(f"{C} on chain 5: ")] != []
    data = orjson.loads(run(tracked, "status", "--json").output)
    scanned = [(d["chain_id"], d["summary"] != "no block range scanned yet") for d in data]
    assert scanned == [(1, False), (5, True)]


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("postgresql://gapfill:hunter2secret@127.0.0.1:1/nope", "could not connect"),
        ("postgresql://gapfill:hunter2@secret@127.0.0.1:1/nope", "write it as %40"),
        ("mysql://root:hunter2secret@127.0.0.1/x", "unsupported database URL scheme"),
        ("sqlite:///no/such/dir/x.db", "does not exist"),
    ],
)
def test_database_errors_are_one_sentence_without_secrets(url: str, needle: str) -> None:
    r = run(url, "status")
    assert r.exit_code == 1
    err = one_sentence(r)
    assert needle in err and "hunter2secret" not in r.output + r.stderr
    assert len(err.splitlines()) == 1


def test_a_postgres_server_that_answers_says_what_to_fix_in_the_url(pg_url: str) -> None:
    # Neither said "check that the server runs": this server runs, and has no SSL.
    parts = urlsplit(pg_url)
    where = f"{parts.hostname}:{parts.port or 5432}"
    no_role = parts._replace(netloc=f"nosuchrole:hunter2secret@{where}").geturl()
    r = run(no_role, "status")
    assert r.exit_code == 1
    assert one_sentence(r) == (f'error: PostgreSQL at {where} has no role "nosuchrole": fix the user '
                               "name in --db, or create that role (createuser "
                               "nosuchrole)")  # fmt: skip
    r = run(pg_url + "?sslmode=require", "status")
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: PostgreSQL at {where} does not accept SSL, which "
                               "sslmode=require in --db demands: set it to prefer (or "
                               "disable), or enable SSL on the server")  # fmt: skip


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:"])
def test_a_sqlite_url_without_a_path_is_shown_as_given(url: str) -> None:
    r = run(url, "status")
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: cannot read the SQLite URL {url!r}: "
                               "write it as sqlite:///path/to/file.db")  # fmt: skip


@pytest.mark.parametrize("suffix", ["?mode=ro", "#x"])
def test_a_sqlite_url_with_parameters_is_refused_not_taken_as_a_file_name(
    tmp_path: Path, suffix: str
) -> None:
    url = f"sqlite:///{tmp_path}/x.db{suffix}"
    r = run(url, "init")
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: the SQLite URL has parameters ({suffix!r}), which gapfill "
                               "does not take: write it as sqlite:///path/to/file.db")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [("contract", "add", C, "--chain-id", "1"), ("init",), ("status",),
                                  ("enrich", "--dry-run")])  # fmt: skip
def test_an_in_memory_sqlite_database_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: tuple[str, ...]
) -> None:
    # It would say "tracking ..." and keep nothing.
    monkeypatch.chdir(tmp_path)
    r = run("sqlite:///:memory:", *args)
    assert r.exit_code == 1 and r.stdout == ""
    assert one_sentence(r) == (
        "error: an in-memory SQLite database (:memory:) is gone when the command ends: "
        "set --db to a file, such as sqlite:///gapfill.db"
    )
    assert list(tmp_path.iterdir()) == []


def test_missing_postgres_database(pg_url: str) -> None:
    url = pg_url.rsplit("/", 1)[0].replace("postgres@", "postgres:hunter2secret@") + "/no_such_db_x"
    r = run(url, "status")
    assert r.exit_code == 1
    assert 'database "no_such_db_x" does not exist' in one_sentence(r)
    assert "hunter2secret" not in r.stderr


def test_a_missing_postgres_database_in_the_config_file_names_its_db(pg_url: str, tmp_path: Path) -> None:
    # It said "fix --db / GAPFILL_DB", neither of which was set.
    url = pg_url.rsplit("/", 1)[0].replace("postgres@", "postgres:hunter2secret@") + "/no_such_db_x"
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "{url}"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "status"])
    assert r.exit_code == 1
    where = urlsplit(pg_url).netloc.rpartition("@")[2]
    assert one_sentence(r) == (f'error: PostgreSQL database "no_such_db_x" does not exist on {where}: '
                               f"create it (createdb no_such_db_x) or fix the db key of {cfg}")  # fmt: skip
    assert "hunter2secret" not in r.output + r.stderr


@pytest.mark.parametrize(("options", "said"), [
    ("-cfoo", "-c foo requires a value"),
    ("foo", "invalid command-line argument for server process: foo"),
    ("-cnosuch%3D1", 'unrecognized configuration parameter "nosuch"'),
    ("-cwork_mem%3Dabc", 'invalid value for parameter "work_mem": "abc"'),
])  # fmt: skip
def test_options_the_server_refuses_say_to_fix_them_not_that_it_is_down(
    pg_url: str, options: str, said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGOPTIONS", raising=False)
    r = CliRunner().invoke(cli, ["status"], env={"GAPFILL_DB": f"{pg_url}?options={options}"})
    assert r.exit_code == 1
    where = urlsplit(pg_url).netloc.rpartition("@")[2]
    assert one_sentence(r) == (f"error: PostgreSQL at {where} refused the options= of the URL ({said}): "
                               "fix them in GAPFILL_DB, each setting written as -c%20name%3Dvalue, or "
                               "remove them")  # fmt: skip


_NO_FOO = ('error: libpq has no connection parameter "foo" (in --db): remove it, or correct its name (such '
           "as sslmode, connect_timeout, application_name)")


@pytest.mark.parametrize(("query", "said"), [
    ("foo=bar", _NO_FOO),
    ("password=hunter2secret&foo=1", _NO_FOO),
    ("sslmode=bogus", 'error: libpq cannot take "bogus" for sslmode (in --db): correct it, or remove it '
                      "to use the default"),
    ("service=nosuch_h1", 'error: no service file defines the service "nosuch_h1" that service= in --db '
                          "names: add it to ~/.pg_service.conf (or the file PGSERVICEFILE names), or remove "
                          "it"),
])  # fmt: skip
def test_an_unknown_postgres_url_parameter_says_to_check_the_query(
    pg_url: str, query: str, said: str
) -> None:
    url = pg_url.replace("postgres@", "postgres:hunter2secret@") + "?" + query
    r = run(url, "status")
    assert r.exit_code == 1
    assert one_sentence(r) == said and "hunter2secret" not in r.output + r.stderr


def test_gapfill_db_env_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("GAPFILL_DB", url)
    r = CliRunner().invoke(cli, ["init"])
    assert r.exit_code == 0 and (tmp_path / "env.db").exists()


def test_stdin_import_uses_the_bytes(tracked: str) -> None:
    r = run(tracked, "import", "-", "--contract", C, input=io.BytesIO(f"{h(9)}\n".encode()).read())
    assert r.exit_code == 0 and refs_of(tracked) == [(h(9), None)]


def test_the_config_files_enrich_table_gives_the_defaults(tracked: str, tmp_path: Path) -> None:
    # [enrich] sets what the flags would: a 1-ref batch size shows in the dry run.
    run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n{h(2)}\n{h(3)}\n")
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text("[enrich]\nbatch_size = 1\n")
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run")
    assert r.exit_code == 0 and "3 batches of 1" in r.output, r.output
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run", "--batch-size", "2")
    assert r.exit_code == 0 and "2 batches of 2" in r.output, r.output  # the flag wins
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run", "--batch-size", "3")
    assert r.exit_code == 0 and "1 batch of 3" in r.output, r.output
    cfg.write_text("[enrich]\nbatchsize = 1\n")
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run")
    assert r.exit_code == 1 and "no setting batchsize" in r.stderr, r.output


@pytest.mark.parametrize(
    ("setting", "said"),
    [("workers = 0", "workers: 0 is not in the range 1<=x<=64"),
     ('mode = "turbo"', "mode: 'turbo' is not one of 'auto', 'sequential', 'batch', 'concurrent'"),
     ("lease_timeout_s = -3", "lease_timeout_s: -3.0 is not in the range 0.1<=x<=86400"),
     ("metrics_port = 99999", "metrics_port: 99999 is not in the range 0<=x<=65535"),
     ('plan_shape = "bogus"', "plan_shape: 'bogus' is not one of 'auto', 'per_tx', 'per_block'"),
     ('plan = "bogus"', "plan: 'bogus' is not one of 'auto', 'per_tx', 'per_block'"),
     ("workers = 4.5", "workers: 4.5 is not a whole number"),
     ("batch_size = true", "batch_size: true is not a whole number"),
     ("quiet = 1", "quiet: 1 is not true or false"),
     ("grace_period_s = nan", "grace_period_s: nan is not a finite number"),
     ('plan = "per_tx"\nplan_shape = "per_tx"',
      "sets plan twice (as plan and plan_shape): keep one of them")],
)  # fmt: skip
@pytest.mark.parametrize("command", ["enrich", "worker"])
def test_a_bad_value_in_the_config_files_enrich_table_names_the_file(
    tracked: str, tmp_path: Path, setting: str, said: str, command: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[enrich]\n{setting}\n")
    r = run(tracked, "--config", str(cfg), command, *(["--dry-run"] if command == "enrich" else []))
    assert r.exit_code == 1, r.output
    if "twice" in said:
        assert one_sentence(r) == f"error: config file {cfg}: [enrich] {said}"
    else:
        assert one_sentence(r) == f"error: [enrich] {said}: fix it in {cfg}"


def test_a_mistyped_config_key_is_refused_not_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d3.toml").write_text(f'dbb = "sqlite:///{tmp_path / "a.db"}"\n')
    r = CliRunner().invoke(cli, ["--config", "d3.toml", "status"])
    assert r.exit_code == 1
    assert one_sentence(r) == ("error: config file d3.toml has no setting dbb: "
                               "use db, [[endpoints]], [enrich] or [explorer]")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d3.toml"]


@pytest.mark.parametrize("key", ["plan", "plan_shape"])
def test_the_config_files_plan_key_is_plan(tracked: str, tmp_path: Path, key: str) -> None:
    run(tracked, "import", "-", "--contract", C, input=f"hash,block_number\n{h(1)},7\n{h(2)},7\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[enrich]\n{key} = "per_block"\n')
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run")
    assert r.exit_code == 0 and "2 refs in 1 whole block," in r.output, r.output
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run", "--plan", "per_tx")
    assert r.exit_code == 0 and "whole block" not in r.output, r.output  # the flag wins
    assert "2 missing, 1 batch of 500, ~4 RPC calls" in r.output, r.output


def test_a_chain_without_contracts_names_the_chains_that_have_some(tracked: str) -> None:
    for args in (("status", "--chain-id", "5"), ("enrich", "--chain-id", "5", "--dry-run")):
        r = run(tracked, *args)
        assert r.exit_code == 1 and "no contract is tracked on chain 5 (only on chain 1)" in one_sentence(r)


@pytest.mark.parametrize("args", [("status",), ("runs",), ("failures",), ("contract", "list"),
                                  ("enrich", "--dry-run")])  # fmt: skip
def test_reading_commands_do_not_create_a_database_at_a_mistyped_path(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    path = tmp_path / "typo.db"
    r = run(f"sqlite:///{path}", *args)
    assert r.exit_code == 1 and "does not exist" in one_sentence(r) and not path.exists()


def test_a_node_reporting_chain_id_0_is_not_taken_for_a_chain(anvil_bin: str, tmp_path: Path) -> None:
    from gapfill.testing.anvil import Anvil

    with Anvil(binary=anvil_bin, chain_id=0, accounts=1) as node:
        r = CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--rpc-url", node.url,
                                     "contract", "add", C])  # fmt: skip
    assert r.exit_code == 1 and "chain id 0" in one_sentence(r) and "--chain-id N" in r.stderr


def test_contract_add_warns_of_an_address_without_code_on_the_node(small_chain: Any, sqlite_url: str) -> None:
    # `contract add` asks the node its chain id, but not what is at the address: a mistyped
    # one (an EOA) was tracked without a word, and its discovery found 0 refs, saying nothing.
    chain, url = small_chain.chain, small_chain.url
    eoa = small_chain.node.accounts[0].lower()
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", url, "contract", "add", eoa])
    assert r.exit_code == 0 and f"tracking {eoa} on chain {chain.chain_id}" in r.output, r.output + r.stderr
    (warning,) = r.stderr.strip().splitlines()
    said = f"warning: no contract code at {eoa} on chain {chain.chain_id} at block "
    assert warning.startswith(said) and "check the address" in warning, warning
    # A contract the node holds: no warning. Nor without a node (--chain-id only).
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", url, "contract", "add", chain.token])
    assert r.exit_code == 0 and r.stderr == "", r.stderr
    other = small_chain.node.accounts[1].lower()
    assert run(sqlite_url, "contract", "add", other, "--chain-id", str(chain.chain_id)).stderr == ""
    # Then the first command that asks the node about it, discover, says it as its 0 comes out.
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", url, "discover", "--contract", other,
                                 "--method", "logs"])  # fmt: skip
    assert r.exit_code == 0, r.output + r.stderr
    assert f"warning: no contract code at {other} on chain {chain.chain_id} at block " in r.stderr, r.stderr
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", url, "discover", "--contract", chain.token,
                                 "--method", "logs"])  # fmt: skip
    assert r.exit_code == 0 and "no contract code" not in r.stderr, r.output + r.stderr


@pytest.mark.timeout(90)
@pytest.mark.parametrize("parent_sigint", ["terminal", "background"])
def test_ctrl_c_while_status_waits_for_the_node_says_nothing_was_written(
    small_chain: Any, sqlite_url: str, tmp_path: Path, parent_sigint: str
) -> None:
    # It said a bare "interrupted": nothing of what was kept, nor what to do.
    # background: the test run ignores SIGINT, as a CI started by a non-interactive shell's
    # `cmd &` does. Started with a plain Popen, status inherited that, kept it ignored as
    # gapfill does (`cmd &`), and waited for the node to its --rpc-timeout of 50 s: in a full
    # CI run it did not end within 20 s of the SIGINT, and the process left behind failed
    # the next test with ResourceWarnings. GapfillProc starts it as a terminal would.
    import signal

    from engine_support import GapfillProc, emulator, emulator_stats, rpc_hold, wait_for

    assert run(sqlite_url, "contract", "add", C, "--chain-id", str(small_chain.chain.chain_id)).exit_code == 0
    ours = signal.SIG_IGN if parent_sigint == "background" else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, ours)
    try:
        with emulator(small_chain.url) as (rpc, _):
            rpc_hold(rpc)
            p = GapfillProc(["--db", sqlite_url, "--rpc-url", rpc, "status", "--rpc-timeout", "50"], tmp_path,
                            "status")  # fmt: skip
            try:
                signal.signal(signal.SIGINT, previous)  # (the child has it as it started)
                wait_for("status to wait for the node", lambda: emulator_stats(rpc)["held"] >= 1, 30, proc=p)
                os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl+C
                rc = p.wait(20)  # kills it and fails with its output if it does not end
            finally:
                p.close()
    finally:
        signal.signal(signal.SIGINT, previous)
    err = p.err_path.read_text()
    assert rc == 130, p.output()
    said = "interrupted: nothing was written (this command only reads); run it again"
    assert err.strip().splitlines()[-1] == said, err


@pytest.mark.timeout(60)
def test_ctrl_c_a_finalizer_swallowed_before_status_waits_for_the_node_still_ends_it(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Ctrl+C landing while Python ran a finalizer (an import's module-lock callback, a
    # __del__, the collector's) was printed as "Exception ignored in ..." and lost: status
    # went on and waited for its node to its --rpc-timeout, then exited 0. Seen once in 40
    # SIGINTs sent to status 0.15-0.45 s after its start (its imports before asyncio.run).
    import signal

    from engine_support import HungNode

    import gapfill.cli as cli_module

    class Collected:  # the Ctrl+C lands as this is collected
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)

    real = cli_module.rpc_settings

    def settings(rpc_timeout_s: float | None) -> Any:
        Collected()
        return real(rpc_timeout_s)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
    try:
        assert run(sqlite_url, "contract", "add", C, "--chain-id", "1").exit_code == 0
        monkeypatch.setattr(cli_module, "rpc_settings", settings)
        with HungNode() as node:
            r = run(sqlite_url, "--rpc-url", node.url, "status", "--rpc-timeout", "20")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.exit_code == 130 and node.requests == 0, r.output + r.stderr
    said = "interrupted: nothing was written (this command only reads); run it again"
    assert r.stderr.strip().splitlines()[-1] == said, r.stderr


def test_ctrl_c_before_discover_starts_its_scan_says_nothing_was_written(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In its first ~0.5 s (importing the command, opening the database) it said a bare
    # "interrupted", its message of what was kept not set yet.
    import gapfill.cli as cli_module
    import gapfill.cli_discover

    assert run(sqlite_url, "contract", "add", C, "--chain-id", "1").exit_code == 0

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(gapfill.cli_discover, "resolve_targets", interrupted)
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", "http://127.0.0.1:1", "discover"])
    assert r.exit_code == 130 and r.stderr == "interrupted: nothing was written; run the same command again\n"
    # Still importing the command: nothing had begun.
    monkeypatch.delitem(cli.commands, "discover")
    monkeypatch.setattr(cli_module.importlib, "import_module", interrupted)
    r = CliRunner().invoke(cli, ["--db", sqlite_url, "--rpc-url", "http://127.0.0.1:1", "discover"])
    assert r.exit_code == 130
    assert r.stderr == "interrupted before the command started: nothing was done; run it again\n"


def test_a_file_that_is_not_sqlite_says_what_to_check(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n" * 100)
    r = run(f"sqlite:///{notes}", "status")
    assert r.exit_code == 1
    err = one_sentence(r)
    assert "file is not a database" in err and "check --db:" in err
    assert notes.read_text() == "not a database\n" * 100


def test_worker_offers_no_batch_size_it_would_never_use(tracked: str) -> None:
    r = run(tracked, "worker", "--help")
    assert r.exit_code == 0 and "--rpc-batch-size" in r.output
    assert "--batch-size" not in r.output.replace("--rpc-batch-size", "")
    assert run(tracked, "worker", "--batch-size", "3").exit_code == 2


def test_a_worker_with_no_open_plan_says_so_and_what_to_do(tracked: str, anvil_bin: str) -> None:
    # It used to start a run of nothing and print its empty summary: 0 open batches, 0
    # transactions, and not a word about what was wrong or what to do.
    from gapfill.testing.anvil import Anvil

    with Anvil(binary=anvil_bin, chain_id=1, accounts=1) as node:  # the worker asks its chain
        r = run(tracked, "--rpc-url", node.url, "worker")
    assert r.exit_code == 0, r.output + r.stderr
    said = ("no open plan to join on chain 1: run `gapfill enrich` with this database (on any host) "
            "to plan the gap, or start the worker with --wait")  # fmt: skip
    assert one_sentence(r) == said
    assert r.stdout == "" and run(tracked, "runs").stdout.strip() == "no runs yet"


@pytest.mark.timeout(60)
def test_a_worker_given_another_chains_node_says_so_before_anything(tracked: str, anvil_session: Any) -> None:
    # The contract is on chain 1, the node serves 31337. The worker used to say there was
    # no plan of chain 1 to join (exit 0; with --wait it waited for one), and once a plan
    # was open it joined it and only then failed, leaving a failed run row of 1 call.
    said = ("no tracked contract is on chain 31337, the RPC node's chain (they are on chain 1): "
            "check --rpc-url")  # fmt: skip
    r = run(tracked, "--rpc-url", anvil_session.url, "worker")
    assert r.exit_code == 1 and one_sentence(r) == f"error: {said}", r.output + r.stderr
    assert run(tracked, "import", "-", "--contract", C, input=h(1) + "\n").exit_code == 0
    with open_store(tracked) as s:  # another host's `gapfill enrich` planned chain 1's gap
        s.plan(s.create_run("batch", 1), [(1, C)])
    r = run(tracked, "--rpc-url", anvil_session.url, "worker", "--wait")
    assert r.exit_code == 1 and one_sentence(r) == f"error: {said}", r.output + r.stderr
    with open_store(tracked) as s:
        assert [run_.mode for run_ in s.list_runs()] == ["batch"]


def test_hints_name_the_config_file_for_what_it_set(tracked: str, tmp_path: Path) -> None:
    # The file set the workers and the endpoint: the user passed neither --workers nor --rpc-url.
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text('[[endpoints]]\nurl = "http://127.0.0.1:9/"\n\n[enrich]\nworkers = 2\n')
    assert run(tracked, "import", "-", "--contract", C, input=h(1) + "\n").exit_code == 0
    r = run(tracked, "--config", str(cfg), "enrich", "--mode", "batch", "--rpc-timeout", "1")
    assert r.exit_code == 1, r.output + r.stderr
    assert f"workers = 2 (from {cfg}) applies to concurrent mode; batch mode runs one worker" in r.output
    assert f"connection refused; check [[endpoints]] url in {cfg}" in r.stderr, r.stderr
    assert "--workers" not in r.output + r.stderr and "--rpc-url" not in r.output + r.stderr
    # Given as an option or in the environment, each is named as given.
    r = run(tracked, "--config", "", "--rpc-url", "http://127.0.0.1:9/", "enrich", "--mode", "batch",
            "--workers", "2")  # fmt: skip
    assert "--workers 2 applies to concurrent mode" in r.output
    assert r.stderr.strip().endswith("connection refused; check --rpc-url"), r.stderr
    # -q says it too: it changes what the run does (QA: a quiet run dropped it).
    r = run(tracked, "--config", "", "--rpc-url", "http://127.0.0.1:9/", "enrich", "--mode", "batch",
            "--workers", "2", "-q")  # fmt: skip
    assert "--workers 2 applies to concurrent mode; batch mode runs one worker" in r.output, r.output


@pytest.mark.timeout(120)
def test_node_hints_name_the_config_file_key_not_rpc_url(anvil_session: Any, sqlite_url: str,
                                                         tmp_path: Path) -> None:  # fmt: skip
    """The endpoint came from the config file: a node that lacks a method, or serves another
    chain than the contracts', is named by the file's key, never by --rpc-url."""
    from engine_support import emulator

    db, cfg, other = sqlite_url, tmp_path / "gapfill.toml", "0x" + "cd" * 20
    key = f"[[endpoints]] url in {cfg}"
    for address, chain in ((C, "31337"), (other, "5")):
        assert run(db, "contract", "add", address, "--chain-id", chain).exit_code == 0
        r = run(db, "import", "-", "--contract", address, "--chain-id", chain, input=h(1) + "\n")
        assert r.exit_code == 0, r.stderr
    with emulator(anvil_session.url, "--missing-methods", "eth_getTransactionReceipt") as (url, _):
        cfg.write_text(f'[[endpoints]]\nurl = "{url}"\n')
        r = run(db, "--config", str(cfg), "enrich", "--chain-id", "31337", "--mode", "batch")
    assert r.exit_code == 1, r.output + r.stderr
    assert one_sentence(r).endswith(f"does not serve eth_getTransactionReceipt, which gapfill needs to "
                                    f"enrich transactions: point {key} at another node"), r.stderr
    cfg.write_text(f'[[endpoints]]\nurl = "{anvil_session.url}"\n')
    r = run(db, "--config", str(cfg), "enrich", "--dry-run")  # chain 5's contract is left alone
    assert r.exit_code == 0 and f"no endpoint ({key}) serves chain 5: contract {other}" in r.output, r.output
    r = run(db, "--config", str(cfg), "discover", "--contract", other, "--chain-id", "5")
    assert r.exit_code == 1 and one_sentence(r).endswith(f"expected 5: check {key}"), r.stderr
    # Contracts on two chains, neither the node's: nothing can be done, in one sentence.
    db = f"sqlite:///{tmp_path / 'other.db'}"
    for address, chain in ((C, "1"), (other, "5")):
        assert run(db, "contract", "add", address, "--chain-id", chain).exit_code == 0
    for args in (["enrich", "--dry-run"], ["discover"]):
        r = run(db, "--config", str(cfg), *args)
        assert r.exit_code == 1, r.output + r.stderr
        assert one_sentence(r) == ("error: no tracked contract is on chain 31337, the RPC node's chain "
                                   f"(they are on chains 1, 5): check {key}"), r.stderr
    # Given in the environment, the hint names the variable.
    r = CliRunner().invoke(cli, ["--db", db, "--config", "", "enrich", "--dry-run"],
                           env={"ETH_RPC_URL": anvil_session.url})
    assert r.exit_code == 1 and one_sentence(r).endswith("check ETH_RPC_URL"), r.stderr


def test_a_dry_run_says_a_run_would_join_the_open_plan(tracked: str) -> None:
    # Another run's plan is open (in progress, or stopped): a run joins it rather than plan
    # again. The dry run used to show the plan of --batch-size that would never happen.
    refs = "".join(h(i) + "\n" for i in range(1, 4))
    assert run(tracked, "import", "-", "--contract", C, input=refs).exit_code == 0
    assert "1 batch of 500" in run(tracked, "enrich", "--dry-run").stdout
    with open_store(tracked) as s:
        s.plan(s.create_run("batch", 1), [(1, C)], batch_size=1)
    r = run(tracked, "enrich", "--dry-run")
    assert r.exit_code == 0, r.output + r.stderr
    line = f"1 {C}: 3 missing, joins the open plan (3 pending, 0 leased batches), ~"
    assert line in r.stdout and "of 500" not in r.stdout, r.stdout
    # Refs imported since sort outside the open batches: a run joining the plan cuts them a
    # batch of their own (b66bec7), which the dry run left out, as if the run would not.
    more = "".join(h(i) + "\n" for i in range(4, 6))
    assert run(tracked, "import", "-", "--contract", C, input=more).exit_code == 0
    r = run(tracked, "enrich", "--dry-run")
    line = (f"1 {C}: 5 missing, joins the open plan (3 pending, 0 leased batches) and plans 1 batch of "
            "500 more for the 2 refs outside them, ~")  # fmt: skip
    assert r.exit_code == 0 and line in r.stdout, r.stdout


def test_a_dry_run_checks_the_endpoints_as_a_run_does(tracked: str) -> None:
    r = run(tracked, "--rpc-url", "htp://127.0.0.1:8545", "enrich", "--dry-run")
    assert r.exit_code == 1, r.output + r.stderr
    err = one_sentence(r)
    assert err == one_sentence(run(tracked, "--rpc-url", "htp://127.0.0.1:8545", "enrich")), err
    assert "dry run" not in r.stdout
    assert run(tracked, "enrich", "--dry-run").exit_code == 0  # no endpoint at all: still fine


@pytest.mark.parametrize(("stopped_in", "again"), [
    ("gapfill.engine.session.check_node", ""),  # a slow node's first answer: it said a bare "interrupted"
    ("gapfill.engine.run.wait_for_plan", " to wait for one"),
    ("gapfill.engine.run.run_enrich", ""),  # a plan came, the run not started yet: as bare
])  # fmt: skip
def test_ctrl_c_before_a_worker_runs_says_nothing_was_written(
    tracked: str, monkeypatch: pytest.MonkeyPatch, stopped_in: str, again: str
) -> None:
    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    if stopped_in != "gapfill.engine.session.check_node":
        monkeypatch.setattr("gapfill.engine.session.check_node", lambda *_, **__: (1, ()))  # the node's chain
    if stopped_in == "gapfill.engine.run.run_enrich":
        monkeypatch.setattr("gapfill.engine.run.wait_for_plan", lambda *_, **__: None)
    monkeypatch.setattr(stopped_in, interrupted)
    r = run(tracked, "--rpc-url", "http://127.0.0.1:9/", "worker", "--wait")
    assert r.exit_code == 130, r.output + r.stderr
    assert r.stderr.splitlines()[-1] == ("interrupted: no plan was joined and nothing was written; run the "
                                         f"same command again{again}"), r.stderr  # fmt: skip
    assert run(tracked, "runs").stdout.strip() == "no runs yet"


@pytest.mark.parametrize("args", [("status", "--json"), ("contract", "list"), ("runs",)])
def test_a_closed_pipe_ends_quietly(tracked: str, args: tuple[str, ...]) -> None:
    """`gapfill status --json | head -c 10`: the reader leaves early; no 'internal error'."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE
    try:
        r = subprocess.run([str(Path(sys.executable).parent / "gapfill"), "--db", tracked, *args],
                           stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == "", r.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("args", [("status",), ("contract", "list", "--json"), ("runs",)])
def test_output_to_a_full_disk_is_said_as_such_not_as_an_internal_error(
        tracked: str, args: tuple[str, ...]) -> None:  # fmt: skip
    """`gapfill status > out.txt` on a full disk (/dev/full refuses every write with ENOSPC):
    it said "internal error (OSError: [Errno 28] No space left on device); ... report it"."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([str(Path(sys.executable).parent / "gapfill"), "--db", tracked, *args],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
    assert (r.returncode, r.stderr) == (1, "error: could not write the output to standard output (No "
                                           "space left on device): free space where it goes (or raise "
                                           "its file-size limit), or send it elsewhere, then run the "
                                           "command again\n")  # fmt: skip


def test_a_reader_that_leaves_mid_output_ends_the_command_as_sigpipe_would(tmp_path: Path) -> None:
    """`gapfill status --json | head -c 10`, with more output than a pipe holds: the reader
    leaves while the one large write is under way. The pipe took part of it, Python's buffered
    writer dropped the rest without an error, and status exited 0; `enrich | head` exits 141."""
    from gapfill.model import Contract

    db = f"sqlite:///{tmp_path / 'many.db'}"
    with open_store(db) as store:
        for i in range(1, 801):  # ~280 kB of JSON: more than the 64 kB a pipe holds
            store.add_contract(Contract(1, f"0x{i:040x}", None, None, None))
    p = subprocess.Popen([str(Path(sys.executable).parent / "gapfill"), "--db", db, "status", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdout is not None and p.stderr is not None
    try:
        assert p.stdout.read(10) == b'[\n  {\n    '  # the write has begun; it cannot all fit
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait(timeout=60) == 141 and err == "", err
    finally:
        p.kill()
        p.wait()
        p.stderr.close()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupted_import_keeps_nothing_and_says_so(tracked: str, sig: str) -> None:
    """`import -` in the middle of its input gets Ctrl+C, or SIGTERM (timeout, systemd, docker
    stop): it ends as interrupted (130), saying that nothing was imported, and nothing was;
    running it again works. It said only "interrupted"."""
    import signal

    p = subprocess.Popen([str(Path(sys.executable).parent / "gapfill"), "--db", tracked, "import", "-",
                          "--contract", C], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert p.stdin is not None
    try:
        # 1.3 MB, 20 times what a pipe holds: once written, gapfill has read most of it, inside
        # the import's transaction, and waits for the rest.
        p.stdin.write("".join(f"{h(i)}\n" for i in range(1, 20_001)))
        p.stdin.flush()
        p.send_signal(getattr(signal, sig))
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "interrupted: nothing was imported (an import is one transaction); run it again"
    assert refs_of(tracked) == []
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")
    assert r.exit_code == 0 and refs_of(tracked) == [(h(1), None)], r.output + r.stderr


def test_ctrl_c_while_contract_add_asks_the_node_writes_nothing(db_url: str, tmp_path: Path) -> None:
    import signal

    from engine_support import GapfillProc, HungNode, wait_for

    with HungNode() as node:
        p = GapfillProc(["--db", db_url, "--rpc-url", node.url, "contract", "add", C], tmp_path, "add")
        try:
            wait_for("the chain id asked", lambda: node.requests, 60, proc=p)
            os.killpg(p.pid, signal.SIGINT)  # what the terminal does on Ctrl+C
            assert p.wait(60) == 130, p.output()
        finally:
            p.close()
    err = p.err_path.read_text()
    assert err.strip() == "interrupted: nothing was written; run the same command again", err
    if db_url.startswith("sqlite"):
        assert not os.path.exists(db_url.removeprefix("sqlite:///"))
    else:
        assert run(db_url, "contract", "list").output.startswith("no contract is tracked yet")


def test_contract_remove_asks_then_forgets_the_contract(tracked: str) -> None:
    run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")
    r = run(tracked, "contract", "remove", C, input="y\n")  # not a terminal: --yes or nothing
    assert r.exit_code == 1 and "pass --yes to confirm" in one_sentence(r) and refs_of(tracked) != []
    r = run(tracked, "contract", "remove", C, "--yes")
    said = f"removed {C} on chain 1: 1 ref, 0 batches, 0 failure records; its stored transactions stay"
    assert r.exit_code == 0 and said in r.output, r.output
    assert run(tracked, "contract", "list").output.startswith("no contract is tracked yet")
    r = run(tracked, "contract", "remove", C, "--yes")
    assert r.exit_code == 1 and "is not tracked: nothing to remove" in one_sentence(r)


def test_contract_remove_at_a_terminal_names_all_it_deletes(
    tracked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The question named "its refs, plan and failure records", not the coverage that also goes.
    monkeypatch.setattr("gapfill.cli._stdin_is_a_terminal", lambda: True)
    r = run(tracked, "contract", "remove", C, input="n\n")
    # A "no" is not an error: it said "error: nothing removed" and exit 1.
    assert r.exit_code == 0 and r.stderr == "" and C in run(tracked, "contract", "list").output
    assert r.output.endswith("[y/N]: n\nnothing removed\n"), r.output
    assert r.output.startswith(f"Remove {C} on chain 1 with its refs, plan, discovery coverage and "
                               "failure records? [y/N]: "), r.output  # fmt: skip
    r = run(tracked, "contract", "remove", C, input="y\n")
    assert r.exit_code == 0
    assert run(tracked, "contract", "list").output.startswith("no contract is tracked yet")


def test_ctrl_c_before_an_enrich_run_starts_says_nothing_was_fetched(
    tracked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl+C while enrich asks the node its chain (or chooses its mode) said a bare "interrupted".
    run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")

    def interrupted(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr("gapfill.cli._on_node_chain", interrupted)
    r = run(tracked, "--rpc-url", "http://127.0.0.1:9/", "enrich")
    assert r.exit_code == 130
    assert one_sentence(r) == "interrupted: nothing was fetched yet; run the same command again"
    assert run(tracked, "runs").output.strip() == "no runs yet"


def test_contract_given_twice_is_wrong_usage_not_the_last_one(tracked: str) -> None:
    other = "0x" + "cd" * 20
    for cmd in (("status",), ("failures",), ("enrich", "--dry-run"), ("discover",), ("import", "-")):
        r = run(tracked, *cmd, "--contract", C, "--contract", other)
        assert r.exit_code == 2 and "give it once" in r.output + r.stderr, r.output


def test_a_broken_config_file_leaves_help_working_and_can_be_skipped(
    tracked: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gapfill.toml").write_text("bogus = 1\n")  # read by default from here
    r = run(tracked, "status")
    assert r.exit_code == 1 and "has no setting bogus" in one_sentence(r)
    r = run(tracked, "status", "--help")  # what one reads to fix it
    assert r.exit_code == 0 and "status [OPTIONS]" in r.output
    assert run(tracked, "--config", "", "status").exit_code == 0  # skipped
    monkeypatch.setenv("GAPFILL_CONFIG", "")
    assert run(tracked, "status").exit_code == 0


def test_a_malformed_rpc_url_is_refused_before_a_run_is_recorded(tracked: str) -> None:
    run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")
    for url in ("127.0.0.1:8545/KEYKEYKEY", "http://127.0.0.1:99999/KEYKEYKEY"):
        r = run(tracked, "--rpc-url", url, "enrich", "--mode", "batch")
        assert r.exit_code == 1 and "KEYKEYKEY" not in r.output + r.stderr, r.output + r.stderr
        assert "check --rpc-url" in one_sentence(r)
    assert run(tracked, "runs").output.strip() == "no runs yet"


def test_status_counts_refs_whose_block_is_unknown(tracked: str) -> None:
    run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n{h(2)}\n")  # hashes alone
    out = run(tracked, "status").output
    assert "2 unknown" in out.splitlines()[1], out


def test_status_counts_have_thousands_separators(tracked: str) -> None:
    # QA: the table said "1001" and "(+1000 unknown)" beside the run's "1,001 refs".
    hashes = "".join(f"{h(i)}\n" for i in range(1, 1001))
    assert run(tracked, "import", "-", "--contract", C, input=hashes).exit_code == 0  # hashes alone
    one = f"hash,block_number\n{h(1001)},7\n"
    assert run(tracked, "import", "-", "--contract", C, input=one).exit_code == 0
    r = run(tracked, "status")
    assert r.exit_code == 0, r.output + r.stderr
    assert r.output.splitlines()[1].split()[3:] == ["1,001", "0", "1,001", "0", "7-7", "(+1,000", "unknown)"]
    data = orjson.loads(run(tracked, "status", "--json").output)  # bare numbers for scripts
    assert (data[0]["refs"], data[0]["unknown_block_refs"]) == (1001, 1000)


def test_an_import_that_only_fills_block_numbers_says_so(tracked: str, tmp_path: Path) -> None:
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n{h(2)}\n{h(3)}\n")  # hashes alone
    assert r.exit_code == 0 and r.output.strip() == f"imported 3 new refs for {C} on chain 1", r.output
    csvf = tmp_path / "blocks.csv"
    csvf.write_text(f"hash,block_number\n{h(1)},17\n{h(2)},18\n")
    r = run(tracked, "import", str(csvf), "--contract", C)
    assert r.exit_code == 0, r.stderr
    assert r.output.strip() == f"imported 0 new refs for {C} on chain 1, 2 block numbers filled", r.output
    r = run(tracked, "import", str(csvf), "--contract", C)  # nothing left to fill
    said = f"imported 0 new refs for {C} on chain 1"
    assert r.output.strip() == f"{said} (every hash was known already)", r.output
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")
    assert r.output.strip() == f"{said} (the hash was known already)", r.output
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n{h(9)}\n{h(9)}\n")  # h(9) twice
    # The second h(9) was counted "known already" (2 of 3), though no hash but h(1) was.
    assert r.output.strip() == (f"imported 1 new ref for {C} on chain 1 (1 of 2 hashes known already; "
                                "1 repeated in the file)"), r.output  # fmt: skip
    assert sorted(refs_of(tracked)) == [(h(1), 17), (h(2), 18), (h(3), None), (h(9), None)]
    csvf.write_text(f"hash,block_number\n{h(3)},19\n{h(4)},20\n")
    r = run(tracked, "import", str(csvf), "--contract", C)  # one of each: singular
    assert r.output.strip() == f"imported 1 new ref for {C} on chain 1, 1 block number filled", r.output


def test_an_import_says_how_many_hashes_had_conflicting_block_numbers(tracked: str, tmp_path: Path) -> None:
    # One hash, two block numbers: SQLite kept the first, PostgreSQL the smallest, and the
    # summary said nothing. Both keep the first given now, and the summary says so.
    csvf = tmp_path / "twice.csv"
    csvf.write_text(f"hash,block_number\n{h(1)},7\n{h(1)},5\n{h(2)},5\n{h(2)},7\n{h(2)},9\n{h(3)},8\n")
    r = run(tracked, "import", str(csvf), "--contract", C)
    kept = "kept the one stored before, else the first given (enrichment corrects a wrong one)"
    # The lines repeating a hash were counted "known already" (3 of 6), none of them known.
    assert r.exit_code == 0 and r.output.strip() == (
        f"imported 3 new refs for {C} on chain 1 (3 repeated in the file); "
        f"2 hashes had conflicting block numbers: each {kept}"), r.output  # fmt: skip
    assert sorted(refs_of(tracked)) == [(h(1), 7), (h(2), 5), (h(3), 8)]
    # Against a ref stored before (here by that import): the stored block number stays.
    r = run(tracked, "import", "-", "--contract", C, input=f"hash,block_number\n{h(3)},80\n{h(4)},4\n")
    assert r.exit_code == 0 and r.output.strip() == (
        f"imported 1 new ref for {C} on chain 1 (1 of 2 hashes known already); "
        f"1 hash had conflicting block numbers: it {kept}"), r.output  # fmt: skip
    assert sorted(refs_of(tracked)) == [(h(1), 7), (h(2), 5), (h(3), 8), (h(4), 4)]
    r = run(tracked, "import", str(csvf), "--contract", C)  # the same file again: the same word
    assert r.output.strip().endswith(f"; 2 hashes had conflicting block numbers: each {kept}"), r.output


def test_an_at_sign_in_a_postgres_query_is_not_a_password_at_sign() -> None:
    r = run("postgresql://u@127.0.0.1:1?application_name=me@x", "status")
    assert r.exit_code == 1 and "%40" not in one_sentence(r) and "could not connect" in one_sentence(r)
    r = run("postgresql://u:p@127.0.0.1:1?application_name=me%40x", "status")
    assert r.exit_code == 1 and "could not connect" in one_sentence(r)
    # After a password, it may be one: "p@127.0.0.1:1?application_name=me" before the host
    # "x". Whichever was meant, a piece of the password would show: it is refused.
    r = run("postgresql://u:p@127.0.0.1:1?application_name=me@x", "status")
    assert r.exit_code == 1 and one_sentence(r) == (
        "error: the password in --db contains '@' and '?' (or its query an '@'): write it as %40 and %3F "
        "in the URL"
    )


def test_enrich_fills_the_served_chain_and_names_the_contracts_it_skips(
    small_chain: Any, sqlite_url: str
) -> None:
    """One node (chain 31337), refs tracked on chain 5 too: the node's chain is enriched,
    the contract of chain 5 named with the fix (in the dry run too), and the run ends 3."""
    db, chain, url = sqlite_url, small_chain.chain, small_chain.url
    mine = sorted(chain.direct[chain.silent])[:5]
    assert run(db, "contract", "add", chain.silent, "--chain-id", str(chain.chain_id)).exit_code == 0
    assert run(db, "import", "-", "--contract", chain.silent, input="\n".join(mine)).exit_code == 0
    assert run(db, "contract", "add", C, "--chain-id", "5").exit_code == 0
    r = run(db, "import", "-", "--contract", C, "--chain-id", "5", input="\n".join(map(h, range(50))))
    assert r.exit_code == 0, r.stderr
    skipped = (f"no endpoint (--rpc-url) serves chain 5: contract {C} skipped (50 missing refs left "
               "as they are); give an endpoint of chain 5")  # fmt: skip
    r = run(db, "--rpc-url", url, "enrich", "--dry-run")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"{chain.chain_id} {chain.silent}: 5 missing" in r.output and f"5 {C}: 50 missing" in r.output
    assert skipped in r.output, r.output
    r = run(db, "--rpc-url", url, "enrich", "--mode", "batch", "-q")
    assert r.exit_code == 3, r.output + r.stderr
    assert skipped in one_sentence(r)
    with open_store(db) as s:
        assert s.count_gap(chain.chain_id, chain.silent) == 0 and s.count_gap(5, C) == 50
    # Again: nothing left on the served chain, said without a run; chain 5's named again.
    r = run(db, "--rpc-url", url, "enrich", "--mode", "batch", "-q")
    assert r.exit_code == 3, r.output + r.stderr
    nothing = f"nothing to enrich: every ref of {chain.silent} on chain {chain.chain_id} is stored\n"
    assert r.stderr.startswith(nothing + skipped), r.stderr
    assert len(orjson.loads(run(db, "runs", "--json").output)) == 1
    # Told to work on the served chain only, the run is complete: 0, and nothing named.
    r = run(db, "--rpc-url", url, "enrich", "--chain-id", str(chain.chain_id), "--mode", "batch", "-q")
    assert r.exit_code == 0 and "serves chain 5" not in r.stderr, r.stderr
    # The contract of chain 5 named explicitly: nothing can be done, in one sentence.
    r = run(db, "--rpc-url", url, "enrich", "--contract", C, "--chain-id", "5", "--mode", "batch")
    assert r.exit_code == 1
    assert f"serves chain {chain.chain_id}, expected 5: check --rpc-url" in one_sentence(r)


def test_enrich_of_an_address_tracked_on_two_chains_works_on_the_nodes(
    small_chain: Any, sqlite_url: str
) -> None:
    """The node's contract tracked on its chain (31337) and on chain 1: `enrich --contract`
    without --chain-id is not ambiguous, the node's chain decides (it used to ask for --chain-id)."""
    db, chain, url = sqlite_url, small_chain.chain, small_chain.url
    x, mine = chain.silent, sorted(chain.direct[chain.silent])[:5]
    assert run(db, "contract", "add", x, "--chain-id", str(chain.chain_id)).exit_code == 0
    assert run(db, "import", "-", "--contract", x, "--chain-id", str(chain.chain_id),
               input="\n".join(mine)).exit_code == 0  # fmt: skip
    assert run(db, "contract", "add", x, "--chain-id", "1").exit_code == 0
    r = run(db, "import", "-", "--contract", x, "--chain-id", "1", input="\n".join(map(h, range(50))))
    assert r.exit_code == 0, r.stderr
    r = run(db, "--rpc-url", url, "enrich", "--contract", x, "--dry-run")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"{chain.chain_id} {x}: 5 missing" in r.output and f"1 {x}" not in r.output, r.output
    # The choice is the user's to see, once (on stderr, as it is no result).
    picked = (f"{x} is tracked on chains 1, {chain.chain_id}: working on chain {chain.chain_id}, "
              "the RPC node's chain\n")  # fmt: skip
    assert r.stderr.count(picked) == 1 and picked not in r.stdout, r.stderr
    r = run(db, "--rpc-url", url, "enrich", "--contract", x, "--mode", "batch", "-q")
    assert r.exit_code == 0, r.output + r.stderr
    assert "chain 1" not in r.output + r.stderr, r.output + r.stderr  # not asked for: not named
    assert "is tracked on chains" not in r.stderr, r.stderr  # -q: the summary and the waits only
    with open_store(db) as s:
        assert s.count_gap(chain.chain_id, x) == 0 and s.count_gap(1, x) == 50
    # A dry run without a node has no one to ask: the address is still ambiguous.
    r = run(db, "enrich", "--contract", x, "--dry-run")
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: contract {x} is tracked on chains 1, {chain.chain_id}: pass "
                               "--chain-id to pick one")  # fmt: skip
    # On two chains, neither of them the node's, with refs missing: nothing can be done, in
    # one sentence (with none missing, it says there is nothing to do without asking the node).
    for other in ("1", "5"):
        assert run(db, "contract", "add", C, "--chain-id", other).exit_code == 0
        assert run(db, "import", "-", "--contract", C, "--chain-id", other, input=h(1)).exit_code == 0
    r = run(db, "--rpc-url", url, "enrich", "--contract", C)
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: no tracked contract is on chain {chain.chain_id}, the RPC "
                               "node's chain (they are on chains 1, 5): check --rpc-url")  # fmt: skip


# -- store access: another process's lock, a read-only file, a read-only role ---------------

C2 = "0x" + "cd" * 20


def waiting_for_lock(path: str) -> str:
    return f"the SQLite database {path} is locked by another process: waiting up to 60 s for it\n"


def test_status_reads_beside_a_write_lock_and_a_write_says_it_waits_for_it(sqlite_url: str) -> None:
    """Another process (a `sqlite3` shell in a transaction) holds SQLite's write lock: a read
    goes on beside it, and a write says within seconds that it waits, instead of sitting
    silent for a minute; once the lock is released, the write is done."""
    db, path = sqlite_url, sqlite_url.removeprefix("sqlite:///")
    assert run(db, "contract", "add", C, "--chain-id", "1").exit_code == 0
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        r = run(db, "status", "--json")
        assert r.exit_code == 0 and r.stderr == "", r.stderr
        assert [s["contract"] for s in orjson.loads(r.output)] == [C]
        p = subprocess.Popen([*gapfill_argv(), "--db", db, "contract", "add", C2, "--chain-id", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            assert p.stderr is not None
            said = p.stderr.readline()
        finally:
            holder.execute("ROLLBACK")
        out, err = p.communicate(timeout=120)
    finally:
        holder.close()
    assert said == waiting_for_lock(path)
    assert p.returncode == 0 and err == "", err
    assert out == f"tracking {C2} on chain 1\n"


def test_a_read_only_command_does_not_start_a_schema_in_a_foreign_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    conn.close()
    for args in (["status"], ["runs"], ["contract", "list"], ["failures"]):
        r = run(f"sqlite:///{path}", *args)
        assert r.exit_code == 1
        assert one_sentence(r) == (f"error: the database sqlite:///{path} has no gapfill schema "
                                   "yet: start it with `gapfill init` or `gapfill contract add "
                                   "ADDRESS`")  # fmt: skip
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall() == [("notes",)]
    conn.close()


def test_no_schema_names_where_the_database_url_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A URL from GAPFILL_DB or a config file's db key may not be the database the user
    meant: the sentence names it, so they see why they are there."""
    path = tmp_path / "other.db"
    sqlite3.connect(path).close()
    url = f"sqlite:///{path}"
    start = "start it with `gapfill init` or `gapfill contract add ADDRESS`"
    monkeypatch.setenv("GAPFILL_DB", url)
    r = CliRunner().invoke(cli, ["status"])
    assert r.exit_code == 1
    assert one_sentence(r) == (f"error: the database {url} (from GAPFILL_DB) has no gapfill schema yet: "
                               f"{start}, or fix GAPFILL_DB if it is not the database you meant")  # fmt: skip
    monkeypatch.delenv("GAPFILL_DB")
    cfg = tmp_path / "gapfill.toml"
    cfg.write_text(f'db = "{url}"\n')
    key = f"the db key of {cfg}"
    for args in (["runs"], ["failures"], ["enrich", "--dry-run"]):
        r = CliRunner().invoke(cli, ["--config", str(cfg), *args])
        assert r.exit_code == 1
        assert one_sentence(r) == (f"error: the database {url} (from {key}) has no gapfill schema yet: "
                                   f"{start}, or fix {key} if it is not the database you meant")  # fmt: skip
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)  # nothing started
    conn.close()


def _set_read_only(path: Path, read_only: bool) -> None:
    """Make ``path`` read-only (or writable again) for this process: by its mode, or, for
    root, whom modes do not bind, by the immutable attribute."""
    if os.geteuid():
        path.chmod((0o555 if path.is_dir() else 0o444) if read_only else 0o755)
        return
    r = subprocess.run(["chattr", "+i" if read_only else "-i", str(path)], capture_output=True, text=True)
    if r.returncode and read_only:
        pytest.skip(f"running as root, and `chattr +i` cannot make {path} read-only: {r.stderr.strip()}")


@pytest.mark.parametrize("read_only", ["file", "file and folder"])
def test_a_read_only_sqlite_file_is_read_and_a_write_says_it_is_read_only(
    tmp_path: Path, read_only: str
) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "g.db"
    db = f"sqlite:///{path}"
    assert run(db, "contract", "add", C, "--chain-id", "1").exit_code == 0
    before = path.read_bytes()
    locked = [path] if read_only == "file" else [path, folder]
    try:
        for p in locked:
            _set_read_only(p, True)
        for args in (["status", "--json"], ["contract", "list"], ["runs"], ["failures"],
                     ["enrich", "--dry-run"]):  # fmt: skip
            r = run(db, *args)
            assert r.exit_code == 0 and r.stderr == "", (args, r.stderr)
        assert C in run(db, "contract", "list").output
        r = run(db, "contract", "add", C2, "--chain-id", "1")
        assert r.exit_code == 1
        assert one_sentence(r) == (f"error: the SQLite database {path} is read-only (the file or its "
                                   "folder): make it writable, or set --db to another database")  # fmt: skip
    finally:
        for p in locked:
            _set_read_only(p, False)
    assert path.read_bytes() == before
    # No -wal or -shm beside it: read-only too, they would fail the writes once it is writable.
    assert sorted(p.name for p in folder.iterdir()) == ["g.db"]


def test_a_read_only_command_leaves_no_wal_or_shm_beside_a_writable_sqlite_file(tmp_path: Path) -> None:
    # A WAL-mode file's reader creates a -wal and a -shm beside it; a connection opened with
    # mode=ro left them there, empty, after every status. One that may write leaves them to
    # a run that has the file open, and removes them once nobody has.
    folder = tmp_path / "shared"
    folder.mkdir()
    path = folder / "g.db"
    db = f"sqlite:///{path}"
    assert run(db, "contract", "add", C, "--chain-id", "1").exit_code == 0
    assert sorted(p.name for p in folder.iterdir()) == ["g.db"]
    reads = (["status"], ["status", "--json"], ["contract", "list"], ["runs"], ["failures"],
             ["enrich", "--dry-run"], ["enrich", "--dry-run", "--retry-failed"])  # fmt: skip
    for args in reads:
        r = run(db, *args)
        assert r.exit_code == 0 and r.stderr == "", (args, r.stderr)
        assert sorted(p.name for p in folder.iterdir()) == ["g.db"], args
    # The console script, which ends with os._exit once the command is done.
    out = subprocess.run([*gapfill_argv(), "--db", db, "status"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and C in out.stdout, out.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["g.db"]
    # Beside a writer (a run): its -wal, with what it has not checkpointed, stays its own.
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("UPDATE contracts SET label = 'token'")
        assert (folder / "g.db-wal").stat().st_size > 0
        r = run(db, "contract", "list")
        assert r.exit_code == 0 and "token" in r.output, r.output
        assert sorted(p.name for p in folder.iterdir()) == ["g.db", "g.db-shm", "g.db-wal"]
        assert (folder / "g.db-wal").stat().st_size > 0
        writer.execute("UPDATE contracts SET label = 'still'")
    finally:
        writer.close()
    assert sorted(p.name for p in folder.iterdir()) == ["g.db"]
    assert "still" in run(db, "contract", "list").output


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_write_names_the_read_only_side_file_beside_a_writable_sqlite_file(
    tmp_path: Path, suffix: str
) -> None:
    path = tmp_path / "g.db"
    db = f"sqlite:///{path}"
    assert run(db, "contract", "add", C, "--chain-id", "1").exit_code == 0
    side = tmp_path / f"g.db{suffix}"
    side.touch()  # as a reader of the file while it was read-only left it
    try:
        _set_read_only(side, True)
        r = run(db, "contract", "add", C2, "--chain-id", "1")
        assert r.exit_code == 1
        assert one_sentence(r) == (f"error: the file {side} beside the SQLite database {path} is "
                                   "read-only: make it writable, or set --db to another "
                                   "database")  # fmt: skip
    finally:
        _set_read_only(side, False)
    side.unlink()
    assert run(db, "contract", "add", C2, "--chain-id", "1").exit_code == 0


def test_a_sqlite_write_past_a_file_size_limit_says_the_likely_causes(tmp_path: Path) -> None:
    # A file-size limit (ulimit -f: EFBIG) ended "... failed: disk I/O error" with no hint.
    import resource

    path = tmp_path / "g.db"
    db = f"sqlite:///{path}"
    assert run(db, "contract", "add", C, "--chain-id", "1").exit_code == 0
    hashes = tmp_path / "hashes.txt"
    hashes.write_text("".join(f"0x{i:064x}\n" for i in range(1, 20_001)))
    limit = path.stat().st_size + 64 * 1024

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = subprocess.run([*gapfill_argv(), "--db", db, "import", str(hashes), "--contract", C],
                         capture_output=True, text=True, timeout=60, preexec_fn=limited)  # fmt: skip
    assert out.returncode == 1, out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr and "disk I/O error" in error, out.stderr
    assert error.endswith(
        "; the disk may be full, or the file may have reached a file-size limit (ulimit -f): free space or "
        "raise the limit (or move the database and set --db to it), then rerun the same command: what was "
        "committed is kept"), error  # fmt: skip
    assert "contract" in run(db, "status").output  # the file was left whole


@pytest.fixture
def reader(pg_url: str) -> Any:
    """``pg_url``'s database as a new role that may only read it (CONNECT, USAGE, SELECT)."""
    role = f"gapfill_ro_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'ro'")
        admin.execute(f'GRANT CONNECT ON DATABASE "{parts.path[1:]}" TO {role}')
        admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
        admin.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    try:
        yield parts._replace(netloc=f"{role}:ro@{parts.hostname}:{parts.port or 5432}").geturl()
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")


def _role_and_db(url: str) -> tuple[str | None, str]:
    parts = urlsplit(url)
    return parts.username, parts.path[1:]


def test_a_read_only_postgres_role_runs_the_read_only_commands(pg_url: str, reader: str) -> None:
    assert run(pg_url, "contract", "add", C, "--chain-id", "1", "--label", "token").exit_code == 0
    r = run(reader, "status", "--json")
    assert r.exit_code == 0, r.stderr
    assert [(s["contract"], s["label"]) for s in orjson.loads(r.output)] == [(C, "token")]
    for args in (["runs"], ["contract", "list"], ["failures"], ["enrich", "--dry-run"]):
        r = run(reader, *args)
        assert r.exit_code == 0 and r.stderr == "", (args, r.stderr)
    r = run(reader, "contract", "add", C2, "--chain-id", "1")
    assert r.exit_code == 1
    role, dbname = _role_and_db(reader)
    assert one_sentence(r) == (
        f'error: PostgreSQL role "{role}" may not write to table contracts of database "{dbname}" '
        "(permission denied for table contracts): grant it INSERT, UPDATE and DELETE on gapfill's "
        "tables, or use a role that may write, in --db"
    )
    with open_store(pg_url) as s:
        assert [c.address for c in s.list_contracts()] == [C]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"REVOKE SELECT ON runs FROM {role}")
    r = run(reader, "runs")
    assert r.exit_code == 1
    assert one_sentence(r) == (f'error: PostgreSQL role "{role}" lacks SELECT on table runs of database '
                               f'"{dbname}" (permission denied for table runs): grant it SELECT on '
                               "gapfill's tables")  # fmt: skip


def test_discover_as_a_read_only_postgres_role_says_the_grant_then_the_rerun(
    pg_url: str, reader: str, anvil: Any
) -> None:
    # The privilege's sentence was not a fix to do first: discovery gave two fixes that
    # contradict ("..., in --db; no chunk ... was kept: run the same command again").
    assert run(pg_url, "contract", "add", C, "--chain-id", "31337", "--start-block", "0").exit_code == 0
    r = run(reader, "--rpc-url", anvil.url, "discover", "--method", "blocks", "--confirmations", "0")
    assert r.exit_code == 1
    role, _ = _role_and_db(reader)
    error = one_sentence(r).splitlines()[-1]
    assert error.startswith(f'error: PostgreSQL role "{role}" may not write to table '), error
    assert error.endswith(
        "grant it INSERT, UPDATE and DELETE on gapfill's tables, or use a role that may write, in --db, "
        "then run the same command again"), error  # fmt: skip
    assert error.count("run the same command again") == 1 and ": run the same" not in error, error


def test_a_postgres_database_that_takes_no_writes_says_to_point_db_at_a_writable_one(pg_url: str) -> None:
    # As a hot standby refuses writes: the sentence named the driver's words and no fix.
    assert run(pg_url, "contract", "add", C, "--chain-id", "1").exit_code == 0
    _, dbname = _role_and_db(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    r = run(pg_url, "contract", "add", C2, "--chain-id", "1")
    assert r.exit_code == 1
    where = f"{urlsplit(pg_url).hostname}:{urlsplit(pg_url).port or 5432}"
    assert one_sentence(r) == (
        f'error: PostgreSQL database "{dbname}" on {where} takes no writes (cannot execute INSERT in a '
        "read-only transaction): point --db at the primary server (a hot standby is read-only) or "
        "another writable database, or turn default_transaction_read_only off for it")  # fmt: skip
    with open_store(pg_url) as s:
        assert [c.address for c in s.list_contracts()] == [C]


@pytest.mark.parametrize("limited", ["role", "database"])
def test_a_postgres_server_with_no_connection_slot_left_says_which_limit_to_raise(
    pg_url: str, limited: str
) -> None:
    # libpq gives the refusal no SQLSTATE, so it was said as a server that does not run:
    # "could not connect ...: check that the server runs and fix --db".
    role = f"gapfill_cl_{uuid.uuid4().hex[:10]}"
    parts = urlsplit(pg_url)
    _, dbname = _role_and_db(pg_url)
    where = f"{parts.hostname}:{parts.port or 5432}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        # A superuser is held to neither limit: a role that is not one, allowed no session.
        limit = 0 if limited == "role" else -1
        admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'cl' CONNECTION LIMIT {limit}")
        if limited == "database":
            admin.execute(f'ALTER DATABASE "{dbname}" CONNECTION LIMIT 0')
    try:
        r = run(parts._replace(netloc=f"{role}:cl@{where}").geturl(), "status")
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{dbname}" CONNECTION LIMIT -1')
            admin.execute(f"DROP ROLE {role}")
    assert r.exit_code == 1
    error = one_sentence(r)
    fewer = "close other clients, or run gapfill with fewer --workers (each worker holds a connection)"
    if limited == "role":
        assert error.startswith(f'error: PostgreSQL role "{role}" has as many sessions on {where} as its '
                                "CONNECTION LIMIT allows ("), error  # fmt: skip
        assert error.endswith(f'FATAL:  too many connections for role "{role}"): {fewer}, or raise the '
                              f'limit (ALTER ROLE "{role}" CONNECTION LIMIT -1 lifts it)'), error  # fmt: skip
    else:
        assert error.startswith(f'error: PostgreSQL database "{dbname}" on {where} has as many sessions as '
                                "its CONNECTION LIMIT allows ("), error  # fmt: skip
        assert error.endswith(f'FATAL:  too many connections for database "{dbname}"): {fewer}, or '
                              f'raise the limit (ALTER DATABASE "{dbname}" CONNECTION LIMIT -1 lifts it)'
                              ), error  # fmt: skip
    assert "cl@" not in error


def test_init_as_a_read_only_postgres_role_reports_an_up_to_date_schema(pg_url: str, reader: str) -> None:
    # QA: `gapfill init` as a role that may only read said to grant it CREATE on the schema,
    # though the schema was at the latest version and there was nothing to create.
    assert run(pg_url, "init").exit_code == 0
    r = run(reader, "init")
    assert r.exit_code == 0, r.stderr
    with open_store(pg_url) as s:
        latest = s.latest_version()
    assert r.output.strip().endswith(f"is at schema version {latest}")
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DELETE FROM schema_migrations WHERE version = %s", (latest,))
    r = run(reader, "init")  # a migration to apply: it still needs a role that may create
    assert r.exit_code == 1
    assert "may not create gapfill's tables" in one_sentence(r)


def test_a_read_only_command_does_not_create_a_missing_postgres_schema(pg_url: str, reader: str) -> None:
    role, dbname = _role_and_db(reader)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DROP SCHEMA public CASCADE")
        admin.execute("CREATE SCHEMA public")
        admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
    for url in (pg_url, reader):  # its owner, and a role that may only read it
        for args in (["status"], ["enrich", "--dry-run"]):
            r = run(url, *args)
            assert r.exit_code == 1
            shown = url.replace(":ro@", ":***@")
            assert one_sentence(r) == (f"error: the database {shown} has no gapfill schema yet: "
                                       "start it with `gapfill init` or `gapfill contract add "
                                       "ADDRESS`")  # fmt: skip
    r = run(reader, "contract", "add", C, "--chain-id", "1")
    assert r.exit_code == 1
    assert one_sentence(r) == (
        f'error: PostgreSQL role "{role}" may not create gapfill\'s tables in schema public of '
        f'database "{dbname}" (permission denied for schema public): grant it CREATE on that '
        "schema, or run `gapfill init` once as a role that may"
    )
    with psycopg.connect(pg_url) as admin:
        assert admin.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)


@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_ref_whose_transaction_another_contract_stored_gets_its_block_number(
    small_chain: Any, sqlite_url: str, mode: str
) -> None:
    # QA: hash-only refs of one contract whose transactions another contract's run stored
    # first stayed "unknown" block numbers for good.
    db, chain = sqlite_url, small_chain.chain
    shared = sorted(chain.direct[chain.silent])[:4]
    for contract in (chain.silent, chain.token):
        assert run(db, "contract", "add", contract, "--chain-id", str(chain.chain_id)).exit_code == 0
    assert run(db, "import", "-", "--contract", chain.token, input="\n".join(shared)).exit_code == 0
    rows = "hash,block_number\n" + "".join(f"{h},{chain.tx_block[h]}\n" for h in shared)
    assert run(db, "import", "-", "--contract", chain.silent, input=rows).exit_code == 0
    rpc = ["--rpc-url", small_chain.url]
    assert run(db, *rpc, "enrich", "--contract", chain.silent, "--mode", mode).exit_code == 0
    assert run(db, *rpc, "enrich", "--mode", mode).exit_code == 0  # the token's gap is empty
    with sqlite3.connect(db.removeprefix("sqlite:///")) as conn:
        got = dict(conn.execute("SELECT tx_hash, block_number FROM refs WHERE contract = ?",
                                (chain.token.lower(),)).fetchall())  # fmt: skip
    assert got == {h: chain.tx_block[h] for h in shared}


@pytest.mark.parametrize("quiet", [(), ("-q",)], ids=["lines", "quiet"])
@pytest.mark.parametrize("mode", ["batch", "concurrent"])
def test_a_run_waiting_for_another_process_lock_says_so_among_its_progress_lines(
    small_chain: Any, sqlite_url: str, mode: str, quiet: tuple[str, ...]
) -> None:
    # QA: a concurrent run started under another process's lock said nothing for 60 s;
    # with -q (only the summary) every mode did: a wait is not progress, it is said.
    db, chain, path = sqlite_url, small_chain.chain, sqlite_url.removeprefix("sqlite:///")
    assert run(db, "contract", "add", chain.silent, "--chain-id", str(chain.chain_id)).exit_code == 0
    mine = sorted(chain.direct[chain.silent])[:3]
    assert run(db, "import", "-", "--contract", chain.silent, input="\n".join(mine)).exit_code == 0
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        p = subprocess.Popen([*gapfill_argv(), "--db", db, "--rpc-url", small_chain.url, "enrich",
                              "--mode", mode, *quiet], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)  # fmt: skip
        assert p.stdout is not None
        lines = []
        try:
            while (line := p.stdout.readline()) and "locked by another process" not in line:
                lines.append(line)
        finally:
            holder.execute("ROLLBACK")
        out, _ = p.communicate(timeout=120)
    finally:
        holder.close()
    assert line == waiting_for_lock(path), lines
    assert p.returncode == 0, out
    with open_store(db) as s:
        assert s.count_gap(chain.chain_id, chain.silent) == 0


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_export_imports_like_utf8(tracked: str, tmp_path: Path, encoding: str) -> None:
    # Excel's "Unicode Text" (tab-separated) and PowerShell's `>` write UTF-16 with a BOM: it
    # was refused as "looks like a binary file", which it is not.
    f = tmp_path / "export.txt"
    bom = b"\xfe\xff" if encoding == "utf-16-be" else b""
    f.write_bytes(bom + f"hash\tblock_number\r\n{h(1)}\t7\r\n{h(2)}\t\r\n".encode(encoding))
    r = run(tracked, "import", str(f), "--contract", C)
    assert r.exit_code == 0, r.output + r.stderr
    assert sorted(refs_of(tracked)) == [(h(1), 7), (h(2), None)]


def test_contract_add_of_a_tracked_contract_says_what_it_changed(tracked: str, tmp_path: Path) -> None:
    # A second add said "tracking 0x... on chain 1" again, without the label it kept, and
    # whether anything changed could only be read in `contract list`.
    def add(*args: str) -> str:
        r = run(tracked, "contract", "add", C, "--chain-id", "1", *args)
        assert r.exit_code == 0, r.output + r.stderr
        return r.stdout.splitlines()[0]

    again = f"{C} on chain 1 (token) was tracked already"
    assert add() == f"{again}: nothing changed"
    assert add("--start-block", "5") == f"{again}: start block none -> 5"
    abi = tmp_path / "abi.json"
    abi.write_text("[]")
    assert add("--start-block", "7", "--abi", str(abi)) == f"{again}: start block 5 -> 7, ABI set"
    # The same ABI given again (a provisioning script rerun) said "ABI replaced".
    assert add("--abi", str(abi)) == f"{again}: nothing changed"
    abi.write_text('[{"type": "event", "name": "Ping", "inputs": []}]')
    assert add("--abi", str(abi)) == f"{again}: ABI replaced"
    assert add("--label", "bridge") == f"{C} on chain 1 (bridge) was tracked already: label token -> bridge"
    assert add("--label", "") == f"{C} on chain 1 was tracked already: label bridge -> none"
    r = run(tracked, "contract", "add", "0x" + "de" * 20, "--chain-id", "1", "--label", "new")
    assert r.stdout == f"tracking 0x{'de' * 20} on chain 1 (new)\n"
    # An empty label given to a contract that had none said "label none -> none".
    assert run(tracked, "contract", "add", "0x" + "ef" * 20, "--chain-id", "1").exit_code == 0
    r = run(tracked, "contract", "add", "0x" + "ef" * 20, "--chain-id", "1", "--label", "")
    assert r.stdout == f"0x{'ef' * 20} on chain 1 was tracked already: nothing changed\n"


def test_import_from_a_terminal_says_what_it_waits_for(
    tracked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `gapfill import - --contract ...` typed at a terminal waited on a blank screen.
    monkeypatch.setattr("gapfill.cli._stdin_is_a_terminal", lambda: True)
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(1)}\n")
    assert r.exit_code == 0, r.output + r.stderr
    assert r.stderr == ("reading transaction hashes from the terminal: one a line, then Ctrl+D (or give "
                        "a file, or pipe one in)\n")  # fmt: skip
    assert refs_of(tracked) == [(h(1), None)]
    monkeypatch.undo()
    r = run(tracked, "import", "-", "--contract", C, input=f"{h(2)}\n")
    assert r.exit_code == 0 and r.stderr == "", r.stderr  # a pipe: nothing to say


@pytest.mark.parametrize("owners", ["host@space", "host"])
def test_a_run_killed_outright_ends_when_it_was_last_seen_working_and_runs_says_its_rate(
    tracked: str, owners: str
) -> None:
    # A run killed -9 stays 'running' until a later run of its host finds its process gone.
    # It was marked finished then, when it was noticed: `runs` said '19.9 tx/s' of a run that
    # did ~280 tx/s minutes earlier. It ends at the last lease event its own processes wrote
    # (whose owners name the run), not at give-backs others write for it when they notice;
    # where nothing dates its end, neither its end nor a rate is made up.
    from dataclasses import replace

    from test_store import tx_row

    from gapfill.model import Enriched, Ref
    from gapfill.store import liveness

    # Owners as this version names them (with where their pid means something), and as
    # older versions did: both date the end.
    host = liveness.owner_host() if owners == "host@space" else socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    with open_store(tracked) as s:
        s.add_refs([Ref(1, C, h(i), i) for i in range(1, 31)])
        killed = s.create_run("concurrent", 2)
        s.plan(killed, [(1, C)], batch_size=10)
        owner = f"{host}:{gone.pid}/run{killed}/w1"  # as its worker process named itself
        s.counts_for_run = killed
        a, b = s.lease(owner, 60.0), s.lease(owner, 60.0)  # b still held when it was killed
        assert a is not None and b is not None
        assert s.commit_batches([(a, Enriched([tx_row(int(r.tx_hash, 16), r.block_number or 0)
                                               for r in s.batch_refs(a)]))]) == [10]  # fmt: skip
        sampled = s.create_run("concurrent", 2)  # killed after its start-up sample's rows
        s.counts_for_run = sampled
        s.write(Enriched([tx_row(99, 99)]))
        idle = s.create_run("batch", 1)  # killed before it did anything
        s.counts_for_run = None
        alive = s.create_run("concurrent", 2)  # this process's: later events, another run's
        assert s.lease(f"{host}:{os.getpid()}/run{alive}/w1", 60.0) is not None
        with s._tx() as cur:
            cur.execute(s._sql("UPDATE runs SET pid = ?, started_at = 1000 WHERE run_id IN (?, ?, ?)"),
                        (gone.pid, killed, sampled, idle))  # fmt: skip
            for event, at in (("leased", 1001.0), ("committed", 1004.0)):
                cur.execute(s._sql("UPDATE lease_events SET at = ? WHERE owner = ? AND event = ?"),
                            (at, owner, event))  # fmt: skip
        assert s.release_dead_local_owners() == {gone.pid: 1}  # b: 'abandoned', dated now
        # Listed before any run marks them, they are shown as the mark will record them.
        shown = {r.run_id: replace(r, recorded=True) for r in s.list_runs()}
        s.create_run("batch", 1)  # the run that notices them
        got = {r.run_id: r for r in s.list_runs()}
    assert {run_id: got[run_id] for run_id in shown} == shown
    assert (got[killed].state, got[killed].finished_at, got[killed].processed) == ("interrupted", 1004.0, 10)
    assert got[killed].note == "its process ended without finishing the run"
    assert (got[sampled].state, got[sampled].finished_at, got[sampled].processed) == ("interrupted", None, 1)
    assert got[sampled].note == "its process ended without finishing the run, at a time not known"
    assert (got[idle].state, got[idle].finished_at) == ("interrupted", 1000.0)
    assert got[alive].state == "running"
    lines = {int(line.split()[0][1:]): line for line in run(tracked, "runs").stdout.splitlines()}
    assert "interrupted: 10 processed, 0 failed, 0 calls, 2.5 tx/s (" in lines[killed], lines[killed]
    assert "interrupted: 1 processed, 0 failed, 0 calls, - (" in lines[sampled], lines[sampled]
    assert "interrupted: 0 processed, 0 failed, 0 calls, - (" in lines[idle], lines[idle]
    rates = {r["run_id"]: r["rate"] for r in orjson.loads(run(tracked, "runs", "--json").stdout)}
    assert (rates[killed], rates[sampled], rates[idle], rates[alive]) == (2.5, None, None, None)


def test_runs_says_interrupted_of_a_coordinator_killed_outright_before_a_run_marks_it(tracked: str) -> None:
    # Review: a coordinator killed outright (kill -9, the OOM killer) was listed `running`,
    # with its counts and a `-` rate, until the next `enrich` on its host marked it: `runs`
    # said the stored state. Its process is gone and this host can tell (its host name and
    # PID namespace), so it is listed as the mark will record it; `runs` only reads, and
    # the row says `running` until then.
    code = ("import os, sys; from gapfill.store import open_store; "
            "open_store(sys.argv[1]).create_run('concurrent', 2); os._exit(0)")
    subprocess.run([sys.executable, "-c", code, tracked], check=True)
    r = run(tracked, "runs")
    assert r.exit_code == 0, r.output + r.stderr
    line = r.stdout.splitlines()[0]
    assert (" concurrent x2 interrupted: 0 processed, 0 failed, 0 calls, - "
            "(its process ended without finishing the run)") in line, line
    (listed,) = orjson.loads(run(tracked, "runs", "--json").stdout)
    assert (listed["state"], listed["judged_here"], listed["recorded"]) == ("interrupted", True, False)
    with open_store(tracked) as s, s._read() as cur:
        cur.execute("SELECT state FROM runs")
        assert cur.fetchall() == [("running",)]


def test_a_dry_run_meters_calls_as_the_run_does_when_one_endpoint_has_an_rps(
    tracked: str, tmp_path: Path
) -> None:
    # The run meters calls when any endpoint has an rps (whole blocks from 2 refs); the dry
    # run did only when every one had, and estimated a per-transaction plan "(no --rps set)".
    refs = "".join(f"{h(i)},7\n" for i in range(1, 4))
    assert run(tracked, "import", "-", "--contract", C, input="hash,block_number\n" + refs).exit_code == 0
    cfg = tmp_path / "e2.toml"
    cfg.write_text('[[endpoints]]\nurl = "http://127.0.0.1:9/a"\nrps = 100000\n'
                   '[[endpoints]]\nurl = "http://127.0.0.1:9/b"\n')  # fmt: skip
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run")
    assert r.exit_code == 0, r.output + r.stderr
    assert "3 refs in 1 whole block, ~2 RPC calls" in r.stdout, r.stdout
    assert "no --rps set" not in r.stdout and "(1 endpoint with no rps)" in r.stdout, r.stdout
    # Every endpoint metered: the time follows from their summed rps.
    cfg.write_text('[[endpoints]]\nurl = "http://127.0.0.1:9/a"\nrps = 1\n'
                   '[[endpoints]]\nurl = "http://127.0.0.1:9/b"\nrps = 1\n')  # fmt: skip
    r = run(tracked, "--config", str(cfg), "enrich", "--dry-run")
    assert "~2 RPC calls, ~1s at 2 calls/s" in r.stdout, r.stdout


def test_a_dry_run_without_a_node_estimates_contracts_on_every_chain(tracked: str) -> None:
    # A dry run fetches nothing, so needs no node, as with contracts on one chain; on two it
    # stopped at "no RPC endpoint is set" (it asked the endpoints which chain to estimate).
    other = "0x" + "cd" * 20
    assert run(tracked, "contract", "add", other, "--chain-id", "5").exit_code == 0
    for address, chain in ((C, "1"), (other, "5")):
        r = run(tracked, "import", "-", "--contract", address, "--chain-id", chain, input=h(1) + "\n")
        assert r.exit_code == 0, r.stderr
    r = run(tracked, "enrich", "--dry-run")
    assert r.exit_code == 0, r.output + r.stderr
    assert f"1 {C}: 1 missing," in r.stdout and f"5 {other}: 1 missing," in r.stdout, r.stdout
    # --chain-id still picks one.
    r = run(tracked, "enrich", "--dry-run", "--chain-id", "5")
    assert r.exit_code == 0 and f"5 {other}: 1 missing," in r.stdout and C not in r.stdout, r.stdout
