"""`gapfill import` of a CSV without a header line says that is what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli

pytestmark = pytest.mark.timeout(20)

A = "0x" + "aa" * 20
H = "0x" + "12" * 32


def run(tmp_path: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'x.db'}", *args], input=input)


@pytest.mark.parametrize(("first", "example"), [
    (f"{H},12", "hash,block_number"), (f"{H};12", "hash;block_number"),
    # The example follows the row (review: it said hash,block_number of a row whose hash
    # was in its second column, and the header it gave failed on "12").
    (f"12\t{H}", "block_number and hash, tab-separated"), (f'"{H}","12"', "hash,block_number"),
    (f"12,{H}", "block_number,hash"),
    # psql's COPY of a table: chain id, contract, hash, block: two integers, no guess.
    (f"1,{A},{H},12", "column1,column2,hash,column4"),
])
def test_a_csv_whose_first_line_is_data_asks_for_a_header(tmp_path: Path, first: str, example: str) -> None:
    # `psql -c "COPY ... TO STDOUT WITH CSV"` writes no header: the error named the first
    # row's hash and block as the file's columns ("has no hash column among 0x12..., 12").
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    f = tmp_path / "refs.csv"
    f.write_text(f"{first}\n")
    r = run(tmp_path, "import", str(f), "--contract", A)
    assert r.exit_code == 1, r.output
    assert r.stderr == (f"error: {f} has no header line (its first line holds a transaction hash): "
                        "add one naming the hashes' column hash and the block numbers' block_number "
                        f"(other columns are ignored), such as {example}; nothing was imported\n")
