"""Importing refs from files: plain hash lists, CSVs, and Etherscan exports.

The parser is a generator, so a million-line file streams straight into the
store's bulk insert. It raises :class:`InputError` with the line number on the
first malformed line (a CSV is read strictly: a quote never closed is one, not a field
that runs to the end of the file); the store runs the import in one transaction, so nothing
is imported when that happens. Lines starting with ``#`` are comments anywhere in a hash
list and above a CSV's header; among a CSV's rows they are rows (a row's first field may
start with ``#`` and its hash column hold a hash), so one holding no hash is an error.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable, Iterator
from typing import IO, cast

from gapfill.errors import InputError
from gapfill.model import BIGINT_MAX, Ref
from gapfill.records import record
from gapfill.validate import is_tx_hash
from gapfill.wording import counted

HASH_COLUMNS = ("hash", "tx_hash", "transaction hash", "txhash", "transaction_hash")
BLOCK_COLUMNS = ("block_number", "blocknumber", "blockno", "block", "block number")
# A whole number written as a float by a tool whose column was one (pandas writes 3.0 for
# 3 in a column with a blank): read as the number. Only ".0": "1.000" may be a thousand
# with a dot for thousands separator, so any other decimals are refused.
_BLOCK = re.compile(r"^(0x[0-9a-fA-F]+|[0-9]+)(\.0)?$")
#: What a block number is to look like, as an error about one says it.
BLOCK_FORM = ("write it as a whole number such as 1003 (decimal, or 0x hex), without decimals or "
              "thousands separators")
_DELIMITERS = (",", "\t", ";")


def _binary(sample: bytes) -> bool:
    return b"\x00" in sample


def open_text(path: str, stdin: IO[bytes] | None = None) -> tuple[str, IO[str]]:
    """Open ``path`` (``-`` for stdin) as UTF-8 text (UTF-16 with its byte-order mark),
    refusing binary files."""
    import sys

    name = "stdin" if path == "-" else path
    try:
        raw: IO[bytes] = (stdin or sys.stdin.buffer) if path == "-" else open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise InputError(f"cannot import {name}: no such file: check the path") from None
    except IsADirectoryError:
        raise InputError(f"cannot import {name}: it is a directory, not a file: give the path of "
                         "the file in it") from None  # fmt: skip
    except PermissionError:
        raise InputError(f"cannot import {name}: this user may not read it: make it readable "
                         f"(chmod +r {name}), or run gapfill as a user who may") from None  # fmt: skip
    except OSError as exc:
        raise InputError(f"cannot import {name} ({exc.strerror}): check the path, and that the file "
                         "is readable there") from None  # fmt: skip
    buffered = raw if isinstance(raw, io.BufferedReader) else io.BufferedReader(cast(io.RawIOBase, raw))
    head = buffered.peek(8192)[:8192]
    if not head:
        # The end already: the peek's read consumed it, and at a terminal (Ctrl+D on an empty
        # line) the reader's next read would wait for more typing, a second Ctrl+D.
        raw.close()
        return name, io.StringIO("")
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        # Excel's "Unicode Text" and Windows PowerShell's `>` write UTF-16 (its NULs are
        # not a binary file): the BOM says which byte order.
        return name, io.TextIOWrapper(buffered, encoding="utf-16", errors="strict", newline="")
    if _binary(head):
        raw.close()
        raise InputError(
            f"{name} looks like a binary file: give a text file with one hash per line, "
            "or a CSV with a hash column"
        )
    return name, io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="strict", newline="")


def _columns(header: str, delimiter: str) -> list[str]:
    return [h.strip().strip('"').lower() for h in next(csv.reader([header], delimiter=delimiter))]


def _delimiter(header: str) -> str | None:
    """The field separator of a CSV whose first line is ``header``; None for a one-column file.

    Spreadsheets in locales whose decimal mark is a comma write ``;``. The separator is
    the one that sets a hash column apart, else the first of ``,``, tab, ``;`` present.
    """
    present = [d for d in _DELIMITERS if d in header]
    return next((d for d in present if set(_columns(header, d)) & set(HASH_COLUMNS)),
                present[0] if present else None)  # fmt: skip


def _comment(line: str) -> bool:
    """Whether ``line`` (stripped), ahead of a file's first hash or header, is a comment: it
    starts with ``#`` (perhaps quoted), and is not a CSV header naming a hash column (an export
    may call a row-number column ``#``). A comma in it (``# exported 2024, from etherscan``)
    does not make it a header."""
    return line.strip('"').startswith("#") and not any(
        set(_columns(line, d)) & set(HASH_COLUMNS) for d in _DELIMITERS if d in line
    )


def _block(value: str, name: str, lineno: int) -> int | None:
    v = value.strip()
    if not v:
        return None
    m = _BLOCK.match(v)
    if m is None or (m.group(2) and v.startswith("0x")):
        raise InputError(f"{name} line {lineno}: {v[:40]!r} is not a block number: {BLOCK_FORM}; "
                         "nothing was imported")  # fmt: skip
    v = m.group(1)
    n = int(v, 16) if v.startswith("0x") else int(v)
    if n > BIGINT_MAX:
        raise InputError(f"{name} line {lineno}: block number {v[:40]} is too large; nothing was imported")
    return n


@record
class CsvColumns:
    """What an import read of a CSV's header: the column of hashes and the column of block
    numbers (None: none it knows), and the other columns, ignored, as the header names them."""

    hash: str
    block: str | None
    ignored: tuple[str, ...]


class NoRefs(InputError):
    """The file holds no transaction hash: it is empty, or holds blank lines, comments or a
    header alone."""


def parse_refs(
    path: str, chain_id: int, contract: str, *, source: str = "import", stdin: IO[bytes] | None = None,
    on_columns: Callable[[CsvColumns], None] | None = None,
) -> Iterator[Ref]:
    """Yield the refs in ``path``: hash list, CSV with a hash column, or an Etherscan export.
    Raises :class:`NoRefs` when it holds none. ``on_columns`` hears what was read of a CSV's
    header (a column it ignores may hold what the user meant as block numbers)."""
    name, text = open_text(path, stdin)
    with text:
        try:
            refs = _parse(text, name, chain_id, contract, source, on_columns)
            first = next(refs, None)
            if first is None:
                raise NoRefs(f"{name} holds no transaction hashes (it is empty, or a header alone): "
                             "check that it is the file you meant to import")  # fmt: skip
            yield first
            yield from refs
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, name, exc) from None


def _parse(text: IO[str], name: str, chain_id: int, contract: str, source: str,
           on_columns: Callable[[CsvColumns], None] | None) -> Iterator[Ref]:  # fmt: skip
    first = ""
    lineno = 0
    for line in text:
        lineno += 1
        if line.strip() and not _comment(line.strip()):
            first = line
            break
    if not first:
        return
    stripped = first.strip()
    if stripped.startswith(("[", "{")):
        # A JSON list of hashes (`jq -c`) read as a header-less CSV asked for a header naming
        # every one of its hashes a column; an explorer API's answer named its keys.
        raise InputError(f"{name} looks like JSON, which import does not read: give a text file "
                         "with one hash per line (jq -r '.[]' writes a JSON list so), or a CSV with "
                         "a hash column; nothing was imported")  # fmt: skip
    delimiter = None if is_tx_hash(stripped.strip('"')) else _delimiter(stripped)
    if delimiter is None:
        # One hash per line, perhaps under a one-column header ("hash", "tx_hash").
        if stripped.strip('"').lower() in HASH_COLUMNS:
            first = ""
        yield from _hash_lines(text, name, chain_id, contract, source, first, lineno)
        return
    header_line = lineno
    header = _columns(stripped, delimiter)
    written = [h.strip().strip('"') for h in next(csv.reader([stripped], delimiter=delimiter))]
    _one_column(name, header_line, written, header, HASH_COLUMNS, "hash")
    _one_column(name, header_line, written, header, BLOCK_COLUMNS, "block number")
    hash_col = next((header.index(c) for c in HASH_COLUMNS if c in header), None)
    if hash_col is None:
        hashes = sum(map(is_tx_hash, written))
        if hashes > 8:
            # Not a row, which holds a few (a transaction's hash, its block's, a log's four
            # topics): a list on one line, of which a header would import the first alone.
            many = counted(hashes, "transaction hash", "transaction hashes")
            raise InputError(f"{name} line {header_line} holds {many}: put one hash per line; "
                             "nothing was imported")  # fmt: skip
        if hashes:
            # A header-less CSV (psql's COPY ... WITH CSV writes none): its first row is data.
            raise InputError(
                f"{name} has no header line (its first line holds a transaction hash): add one "
                "naming the hashes' column hash and the block numbers' block_number (other "
                f"columns are ignored), such as {_header_for(written, delimiter)}; nothing was "
                "imported"
            )
        raise InputError(
            f"{name} has no hash column among {', '.join(written)[:200]}: its header needs "
            "one of hash, tx_hash or 'Transaction Hash' (Etherscan), separated by commas, semicolons "
            "or tabs; nothing was imported"
        )
    block_col = next((header.index(c) for c in BLOCK_COLUMNS if c in header), None)
    if on_columns is not None:
        used = {hash_col, block_col}
        on_columns(CsvColumns(written[hash_col], None if block_col is None else written[block_col],
                              tuple(w for i, w in enumerate(written) if i not in used and w)))  # fmt: skip
    # Strict: a quote never closed is an error, not a field that swallows the rest of the file.
    reader = csv.reader(text, delimiter=delimiter, strict=True)
    while True:
        # The line the next row starts on: a quoted field can hold line breaks, so rows and
        # lines part ways (the reader counts the lines it read).
        lineno = header_line + reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise _not_csv(name, lineno, exc) from None
        if row is None:
            return
        if not row or all(not c.strip() for c in row):
            continue
        tx = row[hash_col].strip() if hash_col < len(row) else None
        if (tx is None or not is_tx_hash(tx)) and row[0].strip().startswith("#"):
            raise InputError(
                f"{name} line {lineno}: {row[0].strip()[:40]!r} reads as a comment, but comments go "
                "above a CSV's header, not among its rows: move it there; nothing was imported"
            )
        if tx is None:
            raise InputError(
                f"{name} line {lineno}: the row has {counted(len(row), 'field')} but the hash is in "
                f"column {hash_col + 1}; nothing was imported"
            )
        if not is_tx_hash(tx):
            raise InputError(
                f"{name} line {lineno}: {tx[:80]!r} is not a transaction hash "
                "(0x + 64 hex digits); nothing was imported"
            )
        block = None
        if block_col is not None and block_col < len(row):
            block = _block(row[block_col], name, lineno)
        yield Ref(chain_id, contract, tx.lower(), block, source)


def _not_utf8(path: str, name: str, exc: UnicodeDecodeError) -> InputError:
    """The error for a file that is not UTF-8 (a spreadsheet's Latin-1 or Windows-1252 ``é``):
    the line of its first bad byte, which a file read again tells (a character never spans a
    line break), and how to save it."""
    if not exc.encoding.lower().replace("-", "").startswith("utf8"):  # a UTF-16 BOM, then no UTF-16
        return InputError(f"{name} starts with a UTF-16 byte-order mark but is not UTF-16 text: save "
                          "the file as UTF-8 and import it again; nothing was imported")  # fmt: skip
    where, byte = "", exc.object[exc.start : exc.start + 1]
    if path != "-":
        try:
            with open(path, "rb") as f:
                for n, line in enumerate(f, 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError as bad:
                        where, byte = f" line {n}", line[bad.start : bad.start + 1]
                        break
        except OSError:
            pass
    shown = f" (byte 0x{byte.hex()})" if byte else ""
    return InputError(f"{name}{where} is not UTF-8 text{shown}, as a Latin-1 or Windows-1252 file has "
                      "accents: save the file as UTF-8 (a spreadsheet's \"CSV UTF-8\") and import it "
                      "again; nothing was imported")  # fmt: skip


def _one_column(name: str, lineno: int, written: list[str], header: list[str], names: tuple[str, ...],
                what: str) -> None:  # fmt: skip
    """Refuse a header with more than one column of ``names`` (``hash,tx_hash``): the others
    were ignored without a word, and which holds what was meant is the user's to say."""
    found = [w for w, h in zip(written, header, strict=True) if h in names]
    if len(found) > 1:
        both = f"{', '.join(found[:-1])} and {found[-1]}"
        raise InputError(f"{name} line {lineno}: the header has {len(found)} {what} columns, {both}: "
                         f"keep the one to import under its name and rename the others (such as "
                         f"{found[-1]}_ignored), as columns of other names are ignored; nothing "
                         "was imported")  # fmt: skip


def _not_csv(name: str, lineno: int, exc: csv.Error) -> InputError:
    """The error for a CSV row from line ``lineno`` on that the csv module cannot read."""
    why = str(exc)
    if why == "unexpected end of data":
        what = ('a quote (") opened in the row that starts here is never closed, so it would swallow '
                "the rest of the file: close it")  # fmt: skip
    elif why.startswith("field larger than field limit"):
        what = (f"a field of the row that starts here runs past {csv.field_size_limit():,} characters, "
                'most likely from a quote (") opened and never closed: close it')  # fmt: skip
    elif "expected after" in why:
        what = ('a quoted field has something after its closing quote: remove it (a space before '
                'the separator counts), or write a quote inside the field as two ("")')  # fmt: skip
    else:
        what = f"the row that starts here is not valid CSV ({why}): fix it"
    return InputError(f"{name} line {lineno}: {what}; nothing was imported")


def _header_for(row: list[str], delimiter: str) -> str:
    """A header for a header-less CSV whose first row is ``row``, built from it: its first
    transaction hash's column ``hash``, its one integer's (if it has only one)
    ``block_number``, the others ``columnN``; tab-separated columns said in words."""
    hash_at = next(i for i, w in enumerate(row) if is_tx_hash(w))
    ints = [i for i, w in enumerate(row) if w.isdigit()]
    names = ["hash" if i == hash_at else "block_number" if ints == [i] else f"column{i + 1}"
             for i in range(len(row))]  # fmt: skip
    if delimiter != "\t":
        return delimiter.join(names)
    return f"{', '.join(names[:-1])} and {names[-1]}, tab-separated" if len(names) > 1 else names[0]


def _hash_lines(
    text: IO[str], name: str, chain_id: int, contract: str, source: str, first: str, lineno: int
) -> Iterator[Ref]:
    def one(line: str, n: int) -> Ref | None:
        s = line.strip().strip('"')
        if not s or s.startswith("#"):
            return None
        if not is_tx_hash(s):
            raise InputError(
                f"{name} line {n}: {s[:80]!r} is not a transaction hash "
                "(0x + 64 hex digits); nothing was imported"
            )
        return Ref(chain_id, contract, s.lower(), None, source)

    r = one(first, lineno)
    if r is not None:
        yield r
    for line in text:
        lineno += 1
        r = one(line, lineno)
        if r is not None:
            yield r
