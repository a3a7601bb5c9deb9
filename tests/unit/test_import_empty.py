"""`gapfill import` of a file that holds no hash says so: almost surely the wrong file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli
from gapfill.discover import imports

pytestmark = pytest.mark.timeout(20)

A = "0x" + "aa" * 20


def run(tmp_path: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'x.db'}", *args], input=input)


@pytest.mark.parametrize("text", ["", "\n\n", "hash,block_number\n", "Transaction Hash\n", "# none yet\n"])
def test_a_file_without_hashes_is_an_error_that_names_it(tmp_path: Path, text: str) -> None:
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    empty = tmp_path / "export.csv"
    empty.write_text(text)
    r = run(tmp_path, "import", str(empty), "--contract", A)
    assert r.exit_code == 1, r.output
    assert r.stderr == (f"error: {empty} holds no transaction hashes (it is empty, or a header alone): "
                        "check that it is the file you meant to import\n")  # fmt: skip
    assert r.stdout == ""


def test_stdin_without_hashes_imports_nothing_and_says_so(tmp_path: Path) -> None:
    # A pipe with nothing new today (`export-new | gapfill import -`) is no error.
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    r = run(tmp_path, "import", "-", "--contract", A, input="hash\n")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"imported 0 new refs for {A} on chain 1 (stdin held no transaction hashes)\n"


class _Terminal(io.RawIOBase):
    """A terminal's stdin: one end of input (Ctrl+D), then whatever is typed after it."""

    def __init__(self, after: bytes) -> None:
        self._reads = [b"", after]

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        data = self._reads.pop(0) if self._reads else b""
        b[: len(data)] = data
        return len(data)


def test_one_ctrl_d_ends_stdin_at_a_terminal() -> None:
    # At a terminal, Ctrl+D on an empty line makes one read() return b"" and the next waits
    # for more typing. The peek for the encoding consumed that end, and the text reader read
    # again: `gapfill import -` needed Ctrl+D twice (the README says "until Ctrl+D").
    typed_after_eof = b"0x" + b"ab" * 32 + b"\n"
    _, text = imports.open_text("-", stdin=_Terminal(typed_after_eof))  # type: ignore[arg-type]
    with text:
        assert text.read() == ""
