"""`gapfill import` of a CSV without a header line says that is what is missing."""

from __future__ import annotations

import codecs
import io
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli
from gapfill.discover.imports import parse_refs

pytestmark = pytest.mark.timeout(20)

A = "0x" + "aa" * 20
H = "0x" + "12" * 32


def run(tmp_path: Path, *args: str, input: str | bytes | None = None) -> Result:
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


H1, H2, H3 = ("0x" + c * 64 for c in "abc")


def import_failing(tmp_path: Path, text: str) -> tuple[Path, Result]:
    """A fresh contract's import of ``text`` as refs.csv, which fails: the file and the result."""
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    f = tmp_path / "refs.csv"
    f.write_text(text)
    r = run(tmp_path, "import", str(f), "--contract", A)
    assert r.exit_code == 1, r.output
    return f, r


def test_an_unbalanced_quote_fails_the_import_instead_of_swallowing_the_rest(tmp_path: Path) -> None:
    # The quote opened on line 2 made the rest of the file one field: 0xbb.. and 0xcc.. were
    # dropped and the import said it had succeeded, with 1 new ref.
    f, r = import_failing(tmp_path, f'hash,note\n{H1},"oops\n{H2},x\n{H3},y\n')
    assert r.stderr == (f'error: {f} line 2: a quote (") opened in the row that starts here is never '
                        "closed, so it would swallow the rest of the file: close it; nothing was "
                        "imported\n")  # fmt: skip
    f.write_text(f'hash,note\n{H1},"oops"\n{H2},x\n{H3},y\n')
    r = run(tmp_path, "import", str(f), "--contract", A)  # nothing of the failed one was kept
    assert (r.exit_code, r.stdout) == (0, f"imported 3 new refs for {A} on chain 1\n")


def test_an_unbalanced_quote_before_a_long_tail_is_no_internal_error(tmp_path: Path) -> None:
    # Past 131,072 characters the csv module's field limit struck first, and its error
    # surfaced as "internal error ... report it".
    f, r = import_failing(tmp_path, f'\nhash,note\n{H1},"oops\n' + f"{H2},x\n" * 2000)
    assert r.stderr == (f"error: {f} line 3: a field of the row that starts here runs past 131,072 "
                        'characters, most likely from a quote (") opened and never closed: close it; '
                        "nothing was imported\n")  # fmt: skip


def test_text_after_a_closing_quote_is_an_error_with_its_line(tmp_path: Path) -> None:
    f, r = import_failing(tmp_path, f'hash,note\n{H1},x\n"{H2}" ,y\n')
    assert r.stderr.startswith(f"error: {f} line 3: a quoted field has something after its closing quote")


def test_line_numbers_are_the_files_after_a_quoted_field_over_several_lines(tmp_path: Path) -> None:
    # A note of three lines is one row: the bad hash on line 5 was said to be on line 3.
    f, r = import_failing(tmp_path, f'hash,note\n{H1},"one\ntwo\nthree"\n0xbad,x\n')
    assert r.stderr == (f"error: {f} line 5: '0xbad' is not a transaction hash (0x + 64 hex digits); "
                        "nothing was imported\n")  # fmt: skip


@pytest.mark.parametrize(("text", "blocks"), [
    # A comment with a comma on the first line was read as a CSV header: "has no hash column
    # among # exported 2024, from etherscan".
    (f"# exported 2024, from etherscan\n{H1}\n# later ones, by hand\n{H2}\n", [None, None]),
    # A hash list's one-column header under a comment was read as a hash.
    (f"# deposits\n\nhash\n{H1}\n{H2}\n", [None, None]),
    # Comments above a CSV's header.
    (f"# bridge deposits, from etherscan\n\"# by hand; tab-separated\"\nhash\tblock_number\n{H1}\t12\n"
     f"{H2}\t13\n", [12, 13]),
    # A header whose first column is named # is a header, not a comment.
    (f"#,hash,block_number\n1,{H1},12\n2,{H2},13\n", [12, 13]),
])  # fmt: skip
def test_comment_lines_above_the_first_hash_or_header_are_skipped(
    tmp_path: Path, text: str, blocks: list[int | None]
) -> None:
    f = tmp_path / "refs.txt"
    f.write_text(text)
    read = [(r.tx_hash, r.block_number) for r in parse_refs(str(f), 1, A)]
    assert read == list(zip([H1, H2], blocks, strict=True))


@pytest.mark.parametrize("header", ["hash,note", "note,hash"])
def test_a_comment_among_a_csvs_rows_says_where_comments_go(tmp_path: Path, header: str) -> None:
    # Not skipped, as a row whose first field starts with # may hold a hash; it said "'# the
    # rest by hand' is not a transaction hash", or that "the row has 1 fields".
    f, r = import_failing(tmp_path, f"{header}\n{H1},{H1}\n# the rest by hand\n{H2},{H2}\n")
    assert r.stderr == (f"error: {f} line 3: '# the rest by hand' reads as a comment, but comments go "
                        "above a CSV's header, not among its rows: move it there; nothing was "
                        "imported\n")  # fmt: skip


def test_a_row_with_a_hash_and_a_first_field_starting_with_a_hash_sign_is_a_row(tmp_path: Path) -> None:
    f = tmp_path / "refs.csv"
    f.write_text(f"label,hash\n#1,{H1}\n#2,{H2}\n")
    assert [r.tx_hash for r in parse_refs(str(f), 1, A)] == [H1, H2]


def test_a_row_too_short_for_its_hash_column_says_how_many_fields_it_has(tmp_path: Path) -> None:
    f, r = import_failing(tmp_path, f"note,hash\nx,{H1}\ny\n")
    assert r.stderr == (f"error: {f} line 3: the row has 1 field but the hash is in column 2; nothing "
                        "was imported\n")  # fmt: skip


def test_a_latin1_csv_says_to_save_it_as_utf8_with_the_line_of_its_first_bad_byte(tmp_path: Path) -> None:
    # It said "give a text file with one hash per line, or a CSV with a hash column": wrong
    # advice for a CSV whose header and hashes are right, and no line.
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    f = tmp_path / "latin1.csv"
    f.write_bytes(f"hash,block_number,note\n{H1},1,ok\n{H2},2,caf\xe9\n".encode("latin-1"))
    r = run(tmp_path, "import", str(f), "--contract", A)
    assert r.exit_code == 1, r.output
    assert r.stderr == (f"error: {f} line 3 is not UTF-8 text (byte 0xe9), as a Latin-1 or Windows-1252 "
                        'file has accents: save the file as UTF-8 (a spreadsheet\'s "CSV UTF-8") and '
                        "import it again; nothing was imported\n"), r.stderr  # fmt: skip
    # From stdin, which cannot be read again, without its line.
    r = run(tmp_path, "import", "-", "--contract", A, input=f.read_bytes())
    assert r.exit_code == 1 and r.stderr.startswith("error: stdin is not UTF-8 text (byte 0xe9)"), r.stderr


def test_a_broken_utf16_file_is_not_said_to_be_utf8(tmp_path: Path) -> None:
    # A UTF-16 byte-order mark, then a lone surrogate: it is read as UTF-16, not UTF-8.
    f, r = import_failing(tmp_path, "")
    f.write_bytes(codecs.BOM_UTF16_LE + "0x".encode("utf-16-le") + b"\x00\xd8a\x00")
    r = run(tmp_path, "import", str(f), "--contract", A)
    assert r.exit_code == 1 and r.stderr == (
        f"error: {f} starts with a UTF-16 byte-order mark but is not UTF-16 text: save the file as "
        "UTF-8 and import it again; nothing was imported\n"), r.stderr  # fmt: skip


@pytest.mark.parametrize("block", ["1,003", "3.5", "1.000", "1e3", "0x1.0"])
def test_a_block_number_in_another_form_says_which_form_is_expected(tmp_path: Path, block: str) -> None:
    # "'1,003' is not a block number; nothing was imported" did not say what to write.
    f, r = import_failing(tmp_path, f'hash;block_number\n{H1};2\n{H2};"{block}"\n')
    assert r.stderr == (f"error: {f} line 3: {block!r} is not a block number: write it as a whole "
                        "number such as 1003 (decimal, or 0x hex), without decimals or thousands "
                        "separators; nothing was imported\n"), r.stderr  # fmt: skip


def test_a_whole_block_number_written_as_a_float_is_read() -> None:
    # pandas writes an integer column with a blank in it as floats: 3.0.
    text = f"hash,block_number\n{H1},3.0\n{H2},\n{H3},0x10\n".encode()
    assert [r.block_number for r in parse_refs("-", 1, A, stdin=io.BytesIO(text))] == [3, None, 16]


@pytest.mark.parametrize(("header", "named"), [
    ("hash,tx_hash,block_number", "2 hash columns, hash and tx_hash"),
    ("Transaction Hash,Blockno,block_number", "2 block number columns, Blockno and block_number"),
])
def test_a_header_with_two_hash_or_block_columns_is_refused(tmp_path: Path, header: str, named: str) -> None:
    # The tx_hash column of "hash,tx_hash,block_number" was ignored without a word.
    f, r = import_failing(tmp_path, f"{header}\n{H1},{H2},1\n")
    last = named.rpartition(" ")[2]
    assert r.stderr == (f"error: {f} line 1: the header has {named}: keep the one to import under its "
                        f"name and rename the others (such as {last}_ignored), as columns of other names "
                        "are ignored; nothing was imported\n"), r.stderr  # fmt: skip


@pytest.mark.parametrize("text", [
    f'["{H1}", "{H2}", "{H3}"]\n',  # `jq -c` of a list: read as a header-less CSV of 3 columns
    f'[\n  "{H1}",\n  "{H2}"\n]\n',  # indented: "line 1: '[' is not a transaction hash"
    f'{{"status": "1", "result": [{{"hash": "{H1}", "blockNumber": "5"}}]}}\n',  # an explorer API's
])
def test_a_json_file_is_said_to_be_json(tmp_path: Path, text: str) -> None:
    # A JSON list of 17,000 hashes on one line failed as a CSV without a header, and the header
    # it suggested named all 17,000 columns (column1,hash,column3,...: 300 kB of error).
    f, r = import_failing(tmp_path, text)
    assert r.stderr == (f"error: {f} looks like JSON, which import does not read: give a text file "
                        "with one hash per line (jq -r '.[]' writes a JSON list so), or a CSV with a "
                        "hash column; nothing was imported\n")  # fmt: skip


def test_hashes_on_one_line_are_not_taken_for_a_row_without_a_header(tmp_path: Path) -> None:
    # The error asked for a header naming one of them hash and the others column2, column3, ...:
    # an import of that header would have dropped all but the first (30,000 columns, 2 MB of error).
    f, r = import_failing(tmp_path, ",".join([H1, H2, H3] * 10_000) + "\n")
    assert r.stderr == (f"error: {f} line 1 holds 30,000 transaction hashes: put one hash per line; "
                        "nothing was imported\n")  # fmt: skip
