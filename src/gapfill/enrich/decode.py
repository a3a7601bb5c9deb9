"""ABI decoding of call data and logs.

The :class:`Decoder` is built once per run from the tracked contracts' ABIs and
then called for every transaction and log, so all the work that does not depend
on the data is done in ``__init__``: signatures are hashed once, each ABI entry
is compiled into a small decoder, and ``eth_abi`` decoders are looked up once
per signature. Entries whose parameters are all static value types (``address``,
``uintN``, ``intN``, ``bool``, ``bytesN``: ``transfer``, ``approve``, ERC-20 and
ERC-721 ``Transfer`` ...) skip ``eth_abi`` altogether and are read word by word
from the hex string, with the same strict checks ``eth_abi`` applies (zero
padding, value in range, ``bool`` is 0 or 1).

Output shape, shared by ``method_args`` and ``event_args`` (see the public
schema): a ``dict`` keyed by parameter name in ABI order (``argN`` for the N-th
parameter, counted from 0, when the ABI gives no name or repeats one; ``argN_2``,
``argN_3``, ... when an earlier parameter is named ``argN`` too); integers (and fixed-point
numbers) are decimal strings, ``bytes``/``bytesN`` are lowercase ``0x`` hex,
addresses are lowercase, ``bool`` is a JSON bool, ``string`` is ``str`` (invalid
UTF-8 is replaced by U+FFFD rather than failing the whole decode), arrays are
lists and tuples are dicts keyed by component name. An indexed event parameter
of a reference type (``string``, ``bytes``, array, tuple) is stored as the topic,
the keccak hash the EVM logged instead of the value.

Matching rules:

* Call data: the 4-byte selector picks the function in the ABI of the
  transaction's ``to`` address. Bytes after the encoded arguments are tolerated,
  as Solidity tolerates them (forwarders append the sender to call data).
* Logs: ``topic0`` and the number of topics pick the event, first in the ABI of
  the log's address, then in :data:`BUILTIN_EVENT_ABIS` (so ERC-721
  ``Transfer``, with its token id indexed, is told apart from ERC-20's). Data
  of static events must have exactly the encoded length. Anonymous events are
  not matched: they have no signature topic.

Data that does not match (too short, bad padding, wrong topic count, invalid
pointers) gives ``None`` for the decoded fields; decoding never raises.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Any

from gapfill.keccak import keccak
from gapfill.records import record

__all__ = [
    "BUILTIN_EVENT_ABIS",
    "Decoder",
    "event_topic0",
    "function_selector",
    "method_id",
]

logger = logging.getLogger(__name__)

#: Hex characters in one 32-byte ABI word.
_WORD_HEX = 64
_ZERO_WORD = "0" * _WORD_HEX
_ONE_WORD = "0" * (_WORD_HEX - 1) + "1"
_ADDRESS_PAD = "0" * 24

#: What a decoded argument becomes (see the module docstring).
_Formatter = Callable[[Any], Any]
#: Reads one 64-hex-character word; raises ``ValueError`` when it is not a valid
#: encoding of the type.
_WordReader = Callable[[str], Any]

#: eth_abi's decoding stream (its constructor is untyped).
def _stream(raw: bytes) -> Any:
    from eth_abi.decoding import ContextFramesBytesIO

    return ContextFramesBytesIO(raw)  # type: ignore[no-untyped-call]


def _tuple_decoder(codecs: Sequence[str]) -> Any:
    # eth_abi is imported on first need: its import (eth_utils, pydantic) costs about
    # 0.16 s per process, and ABIs of value types, bytes, strings and T[] never need it.
    from eth_abi.registry import registry

    return registry.get_tuple_decoder(*codecs)

_TYPE_RE = re.compile(r"^([a-z]+)(\d+(?:x\d+)?)?((?:\[\d*\])*)$")
_DIM_RE = re.compile(r"\[\d*\]")


BUILTIN_EVENT_ABIS: list[dict[str, Any]] = [
    {
        "type": "event",
        "name": "Transfer",
        "anonymous": False,
        "inputs": [
            {"name": "from", "type": "address", "indexed": True},
            {"name": "to", "type": "address", "indexed": True},
            {"name": "value", "type": "uint256", "indexed": False},
        ],
    },
    {
        "type": "event",
        "name": "Approval",
        "anonymous": False,
        "inputs": [
            {"name": "owner", "type": "address", "indexed": True},
            {"name": "spender", "type": "address", "indexed": True},
            {"name": "value", "type": "uint256", "indexed": False},
        ],
    },
    # ERC-721: same signatures as ERC-20's, with the third parameter indexed,
    # so a fourth topic tells them apart.
    {
        "type": "event",
        "name": "Transfer",
        "anonymous": False,
        "inputs": [
            {"name": "from", "type": "address", "indexed": True},
            {"name": "to", "type": "address", "indexed": True},
            {"name": "tokenId", "type": "uint256", "indexed": True},
        ],
    },
    {
        "type": "event",
        "name": "Approval",
        "anonymous": False,
        "inputs": [
            {"name": "owner", "type": "address", "indexed": True},
            {"name": "approved", "type": "address", "indexed": True},
            {"name": "tokenId", "type": "uint256", "indexed": True},
        ],
    },
    # ERC-721 and ERC-1155.
    {
        "type": "event",
        "name": "ApprovalForAll",
        "anonymous": False,
        "inputs": [
            {"name": "owner", "type": "address", "indexed": True},
            {"name": "operator", "type": "address", "indexed": True},
            {"name": "approved", "type": "bool", "indexed": False},
        ],
    },
    # ERC-1155.
    {
        "type": "event",
        "name": "TransferSingle",
        "anonymous": False,
        "inputs": [
            {"name": "operator", "type": "address", "indexed": True},
            {"name": "from", "type": "address", "indexed": True},
            {"name": "to", "type": "address", "indexed": True},
            {"name": "id", "type": "uint256", "indexed": False},
            {"name": "value", "type": "uint256", "indexed": False},
        ],
    },
    {
        "type": "event",
        "name": "TransferBatch",
        "anonymous": False,
        "inputs": [
            {"name": "operator", "type": "address", "indexed": True},
            {"name": "from", "type": "address", "indexed": True},
            {"name": "to", "type": "address", "indexed": True},
            {"name": "ids", "type": "uint256[]", "indexed": False},
            {"name": "values", "type": "uint256[]", "indexed": False},
        ],
    },
    {
        "type": "event",
        "name": "URI",
        "anonymous": False,
        "inputs": [
            {"name": "value", "type": "string", "indexed": False},
            {"name": "id", "type": "uint256", "indexed": True},
        ],
    },
]


def function_selector(signature: str) -> str:
    """``0x`` + 8 hex of ``keccak(signature)``: ``transfer(address,uint256)`` -> ``0xa9059cbb``."""
    return "0x" + keccak(signature.encode()).hex()[:8]


def event_topic0(signature: str) -> str:
    """``0x`` + the 64-hex keccak of an event signature (its ``topic0``)."""
    return "0x" + keccak(signature.encode()).hex()


def method_id(input_hex: str | None) -> str | None:
    """The first 4 bytes of call data as lowercase ``0x`` + 8 hex, or ``None`` when shorter."""
    if input_hex is None or len(input_hex) < 10 or input_hex[:2] not in ("0x", "0X"):
        return None
    return input_hex[:10].lower()


# --- compiling ABI types ----------------------------------------------------


class _AbiError(ValueError):
    """An ABI entry gapfill cannot compile (unknown type, malformed JSON)."""


@record
class _Type:
    """One compiled ABI parameter type."""

    #: The type as written in signatures, e.g. ``(uint256,string)[]``.
    canonical: str
    #: The type handed to ``eth_abi``: ``string`` is read as ``bytes`` so that
    #: invalid UTF-8 is replaced instead of failing the decode.
    codec: str
    fmt: _Formatter
    #: Set for the value types read word by word without ``eth_abi``.
    word: _WordReader | None
    #: A value type is logged as itself when indexed; the rest as their hash.
    value_type: bool
    #: For ``T[]`` where ``T`` is read word by word: ``T``'s reader (the fast path's arrays).
    array_of: _WordReader | None = None


def _identity(v: Any) -> Any:
    return v


def _hex(v: bytes) -> str:
    return "0x" + v.hex()


def _plain_decimal(v: Any) -> str:
    return format(v, "f")  # never exponent notation


def _text(v: bytes) -> str:
    return v.decode("utf-8", "replace")


def _list_of(fmt: _Formatter) -> _Formatter:
    if fmt is _identity:
        return list
    return lambda v: [fmt(x) for x in v]


def _dict_of(names: tuple[str, ...], fmts: tuple[_Formatter, ...]) -> _Formatter:
    return lambda v: {n: f(x) for n, f, x in zip(names, fmts, v, strict=True)}


def _uint_word(bits: int) -> _WordReader:
    limit = 1 << bits

    def read(w: str) -> str:
        v = int(w, 16)
        if v >= limit:
            raise ValueError("uint out of range")
        return str(v)

    return read


def _int_word(bits: int) -> _WordReader:
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)

    def read(w: str) -> str:
        v = int(w, 16)
        if v >= 1 << 255:
            v -= 1 << 256
        if not lo <= v < hi:
            raise ValueError("int out of range")
        return str(v)

    return read


def _address_word(w: str) -> str:
    if not w.startswith(_ADDRESS_PAD):
        raise ValueError("address padding")
    return "0x" + w[24:]


def _bool_word(w: str) -> bool:
    if w == _ONE_WORD:
        return True
    if w == _ZERO_WORD:
        return False
    raise ValueError("bool out of range")


def _bytes_word(size: int) -> _WordReader:
    cut = 2 * size
    pad = "0" * (_WORD_HEX - cut)

    def read(w: str) -> str:
        if w[cut:] != pad:
            raise ValueError("bytesN padding")
        return "0x" + w[:cut]

    return read


def _elementary(base: str, size: str | None) -> _Type:
    """Compile an elementary type (no array dimensions)."""
    if base in ("uint", "int"):
        bits = int(size) if size and size.isdigit() else 0 if size else 256
        if not (8 <= bits <= 256 and bits % 8 == 0):
            raise _AbiError(f"bad type {base}{size}")
        canonical = f"{base}{bits}"
        word = _uint_word(bits) if base == "uint" else _int_word(bits)
        return _Type(canonical, canonical, str, word, True)
    if base == "address" and not size:
        return _Type("address", "address", _identity, _address_word, True)
    if base == "bool" and not size:
        return _Type("bool", "bool", _identity, _bool_word, True)
    if base == "bytes" and size:
        n = int(size) if size.isdigit() else 0
        if not 1 <= n <= 32:
            raise _AbiError(f"bad type bytes{size}")
        return _Type(f"bytes{n}", f"bytes{n}", _hex, _bytes_word(n), True)
    if base == "byte" and not size:  # an old alias of bytes1
        return _Type("bytes1", "bytes1", _hex, _bytes_word(1), True)
    if base == "bytes":
        return _Type("bytes", "bytes", _hex, None, False)
    if base == "string" and not size:
        return _Type("string", "bytes", _text, None, False)
    if base == "function" and not size:
        # An external function pointer: 20-byte address + 4-byte selector.
        return _Type("function", "bytes24", _hex, _bytes_word(24), True)
    if base in ("fixed", "ufixed"):
        canonical = f"{base}{size or '128x18'}"
        return _Type(canonical, canonical, _plain_decimal, None, True)
    raise _AbiError(f"unsupported ABI type {base}{size or ''}")


def _arg_names(params: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Unique keys for ``params`` in order: the ABI's name, else ``argN`` (N its position)
    when the ABI gives none or an earlier parameter holds it, else, when ``argN`` is held
    too (``f(uint256 arg1, uint256)``), ``argN_2``, ``argN_3``, ...: a value is never lost
    to a clash, and a name an earlier parameter holds is never taken from it."""
    names: list[str] = []
    taken: set[str] = set()
    for i, p in enumerate(params):
        name = p.get("name")
        if not isinstance(name, str) or not name or name in taken:
            name = f"arg{i}"
            k = 2
            while name in taken:
                name = f"arg{i}_{k}"
                k += 1
        names.append(name)
        taken.add(name)
    return tuple(names)


def _compile_type(param: Mapping[str, Any]) -> _Type:
    type_str = param.get("type")
    if not isinstance(type_str, str):
        raise _AbiError(f"parameter without a type: {param!r}")
    m = _TYPE_RE.match(type_str.strip())
    if m is None:
        raise _AbiError(f"unsupported ABI type {type_str!r}")
    base, size, dims = m.group(1), m.group(2), m.group(3)
    if base == "tuple" and not size:
        components = param.get("components")
        if not isinstance(components, list):
            raise _AbiError(f"tuple without components: {param!r}")
        parts = [_compile_type(c) for c in components]
        t = _Type(
            "(" + ",".join(p.canonical for p in parts) + ")",
            "(" + ",".join(p.codec for p in parts) + ")",
            _dict_of(_arg_names(components), tuple(p.fmt for p in parts)),
            None,
            False,
        )
    else:
        t = _elementary(base, size)
    for dim in _DIM_RE.findall(dims):
        array_of = t.word if dim == "[]" else None
        t = _Type(t.canonical + dim, t.codec + dim, _list_of(t.fmt), None, False, array_of)
    return t


#: How a top-level parameter of the fast paths is read (a slot's kind): a static word, read
#: by its reader or, for the two commonest types, inline (a call costs more than the read);
#: then the dynamic ones: ``bytes`` (hex), ``string`` (UTF-8 text), an array of static words.
_WORD, _UINT256, _ADDRESS, _BYTES, _STRING, _ARRAY = range(6)
#: A slot: the kind and the word reader (of the word itself, or of an array's items; None
#: for ``bytes`` and ``string``).
_Slot = tuple[int, _WordReader | None]


def _word_kind(t: _Type) -> int:
    """The kind of a static word type (see :data:`_Slot`)."""
    return {"uint256": _UINT256, "address": _ADDRESS}.get(t.canonical, _WORD)


def _slots(types: Sequence[_Type]) -> tuple[_Slot, ...] | None:
    """Per-parameter readers when every type is a static word, ``bytes``/``string`` or ``T[]``."""
    out: list[_Slot] = []
    for t in types:
        if t.word is not None:
            out.append((_word_kind(t), t.word))
        elif t.canonical in ("bytes", "string"):
            out.append((_STRING if t.canonical == "string" else _BYTES, None))
        elif t.array_of is not None:
            out.append((_ARRAY, t.array_of))
        else:
            return None
    return tuple(out)


class _Args:
    """Decodes one head/tail-encoded block of parameters from hex.

    Three ways, fastest first: all static words (read word by word); static words
    plus plain ``bytes``/``string`` and dynamic arrays of static words (``ping(bytes)``,
    ``Pinged(uint256,bytes)``, ``mintMany(address[],uint256)``: read from the hex with
    eth_abi's checks: pointers inside the tail, length word present, value and zero
    padding complete, every item valid); anything else through ``eth_abi``.
    """

    __slots__ = ("_codecs", "_fmts", "_head", "_slots", "_static", "_tuple")

    def __init__(self, types: Sequence[_Type]) -> None:
        self._head = _WORD_HEX * len(types)
        #: Each parameter's place, kind and reader (see :data:`_Slot`) for the fast paths
        #: (zipped once here: a ``zip(..., strict=True)`` per decode cost ~1,700 instructions,
        #: more than the words).
        self._slots: tuple[tuple[int, int, _WordReader | None], ...] | None = None
        self._tuple: Any = None
        self._codecs = tuple(t.codec for t in types)
        #: Every type is a static word: the body needs no check as hex (int() checks each word).
        self._static = all(t.word is not None for t in types)
        slots = _slots(types)
        if slots is not None:
            self._slots = tuple((at, kind, read) for at, (kind, read)
                                in zip(range(0, self._head, _WORD_HEX), slots, strict=True))  # fmt: skip
        # Otherwise the eth_abi decoder is built the first time a body needs it.
        self._fmts = tuple(t.fmt for t in types)

    def _eth_abi(self) -> Any:
        try:
            return _tuple_decoder(self._codecs)
        except Exception as exc:  # eth_abi raises several unrelated types here
            raise _AbiError(f"eth_abi cannot decode {list(self._codecs)}") from exc

    def decode(self, body: str, exact: bool) -> list[Any] | None:
        """The formatted values, or ``None`` when ``body`` (lowercase hex, no ``0x``) does not fit."""
        n = len(body)
        if self._static:
            if n < self._head or (exact and n != self._head):
                return None
            return self._read(body, n, b"")
        try:
            raw = bytes.fromhex(body)
        except ValueError:
            return None
        if self._slots is not None and 2 * len(raw) == n:  # pure hex: no whitespace fromhex skipped
            return self._read(body, n, raw)
        try:
            if self._tuple is None:
                self._tuple = self._eth_abi()
            values = self._tuple(_stream(raw))
            return [f(v) for f, v in zip(self._fmts, values, strict=True)]
        except Exception:  # eth_abi raises a zoo (DecodingError, OverflowError, ...) on bad data
            return None

    def _read(self, body: str, n: int, raw: bytes) -> list[Any] | None:
        """The fast paths; ``body`` has ``n`` characters and, unless every type is a static
        word, is valid hex and ``raw`` its bytes."""
        head = self._head
        if n < head:
            return None
        out: list[Any] = []
        try:
            for at, kind, read in self._slots or ():
                if kind == _UINT256:  # 64 hex digits hold no more than 256 bits: no range check
                    out.append(str(int(body[at : at + _WORD_HEX], 16)))
                    continue
                if kind == _ADDRESS:  # as _address_word reads it
                    if not body.startswith(_ADDRESS_PAD, at):
                        return None
                    out.append("0x" + body[at + 24 : at + _WORD_HEX])
                    continue
                if kind == _WORD:
                    out.append(read(body[at : at + _WORD_HEX]))  # type: ignore[misc]
                    continue
                # A pointer (bytes from the block's start) past the head and inside the data,
                # to a length word, then the value and its zero padding. (int() of the whole
                # word: reading only its low digits after a check of the high ones costs more.)
                start = 2 * int(body[at : at + _WORD_HEX], 16)
                if start < head or start + _WORD_HEX > n:
                    return None
                size = int(body[start : start + _WORD_HEX], 16)
                start += _WORD_HEX
                if kind == _ARRAY:  # then ``size`` words, each a valid item
                    end = start + _WORD_HEX * size
                    if end > n:
                        return None
                    out.append([read(body[i : i + _WORD_HEX]) for i in range(start, end, _WORD_HEX)])  # type: ignore[misc]
                    continue
                end = start + 2 * size
                padded = start + 2 * (-(-size // 32) * 32)
                if padded > n or body[end:padded].strip("0"):
                    return None
                if kind == _STRING:
                    out.append(raw[start // 2 : end // 2].decode("utf-8", "replace"))
                else:
                    out.append("0x" + body[start:end])
        except ValueError:
            return None
        return out


# --- compiled ABI entries ---------------------------------------------------


@record
class _Function:
    name: str
    signature: str
    names: tuple[str, ...]
    args: _Args

    def decode(self, body: str) -> dict[str, Any] | None:
        values = self.args.decode(body, exact=False)
        # One value per parameter, as many as names. No strict= (True or False): a keyword
        # argument takes zip's slow path (~1,300 instructions, more than reading a word).
        return None if values is None else dict(zip(self.names, values))  # noqa: B905


def _hash_topic(w: str) -> str:
    return "0x" + w


def _topic_reader(t: _Type) -> _WordReader:
    if t.word is not None:
        return t.word
    if t.value_type:  # fixed-point: rare enough to go through eth_abi
        one = _Args([t])

        def read(w: str) -> Any:
            values = one.decode(w, exact=True)
            if values is None:
                raise ValueError("bad indexed value")
            return values[0]

        return read
    return _hash_topic


@record
class _Event:
    name: str
    signature: str
    n_topics: int
    names: tuple[str, ...]
    #: For each parameter in ABI order, its name (of ``names``) and, for an indexed one, its
    #: topic's kind (:data:`_ADDRESS` read inline, else :data:`_WORD`), position and reader;
    #: otherwise (``None``, position among the data values, ``None``).
    plan: tuple[tuple[str, int | None, int, _WordReader | None], ...]
    data: _Args
    data_static: bool

    def decode(self, topics: Sequence[str], data: str) -> dict[str, Any] | None:
        """The arguments of a log with these ``topics`` and ``data`` (both lowercase, data
        without ``0x``), or ``None`` when they do not fit."""
        values = self.data.decode(data, exact=self.data_static)
        if values is None:
            return None
        out: dict[str, Any] = {}
        try:
            for name, kind, pos, reader in self.plan:
                if kind is None:
                    out[name] = values[pos]
                    continue
                topic = topics[pos]
                if len(topic) != 2 + _WORD_HEX:
                    return None
                if kind == _ADDRESS:  # as _address_word reads topic[2:]
                    if not topic.startswith(_ADDRESS_PAD, 2):
                        return None
                    out[name] = "0x" + topic[26:]
                else:
                    out[name] = reader(topic[2:])  # type: ignore[misc]
        except (ValueError, TypeError, AttributeError):
            return None
        return out


def _compile_function(entry: Mapping[str, Any]) -> _Function:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _AbiError("function without a name")
    params = entry.get("inputs") or []
    types = [_compile_type(p) for p in params]
    signature = f"{name}({','.join(t.canonical for t in types)})"
    return _Function(name, signature, _arg_names(params), _Args(types))


def _compile_event(entry: Mapping[str, Any]) -> _Event:
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise _AbiError("event without a name")
    params = entry.get("inputs") or []
    types = [_compile_type(p) for p in params]
    names = _arg_names(params)
    plan: list[tuple[str, int | None, int, _WordReader | None]] = []
    data_types: list[_Type] = []
    n_indexed = 0
    for arg, p, t in zip(names, params, types, strict=True):
        if p.get("indexed"):
            n_indexed += 1
            kind = _ADDRESS if t.canonical == "address" else _WORD
            plan.append((arg, kind, n_indexed, _topic_reader(t)))
        else:
            plan.append((arg, None, len(data_types), None))
            data_types.append(t)
    signature = f"{name}({','.join(t.canonical for t in types)})"
    return _Event(
        name,
        signature,
        1 + n_indexed,
        names,
        tuple(plan),
        _Args(data_types),
        all(t.word is not None for t in data_types),
    )


_FunctionTable = dict[str, tuple[_Function, ...]]
_EventTable = dict[str, tuple[_Event, ...]]


def _compile_abi(
    abi: Iterable[Mapping[str, Any]], problems: list[str] | None = None
) -> tuple[_FunctionTable, _EventTable]:
    """Selector -> functions and topic0 -> events; entries that do not compile are skipped
    (and, with ``problems``, described there)."""
    functions: dict[str, list[_Function]] = {}
    events: dict[str, list[_Event]] = {}
    for entry in abi:
        if not isinstance(entry, Mapping):
            if problems is not None:
                problems.append(f"{str(entry)[:40]!r} is not an ABI entry")
            continue
        kind = entry.get("type", "function")  # the ABI spec's default
        try:
            if kind == "function":
                f = _compile_function(entry)
                functions.setdefault(function_selector(f.signature), []).append(f)
            elif kind == "event" and not entry.get("anonymous"):
                e = _compile_event(entry)
                events.setdefault(event_topic0(e.signature), []).append(e)
        except _AbiError as exc:
            logger.warning("skipping ABI %s %r: %s", kind, entry.get("name"), exc)
            if problems is not None:
                problems.append(f"{kind} {entry.get('name')}: {exc}")
    return (
        {k: tuple(v) for k, v in functions.items()},
        {k: tuple(v) for k, v in events.items()},
    )


def abi_problems(abi: Sequence[Mapping[str, Any]]) -> list[str]:
    """The entries of ``abi`` that cannot be decoded (and so are skipped), each described."""
    problems: list[str] = []
    _compile_abi(abi, problems)
    return problems


@cache
def _builtin_events() -> _EventTable:
    return _compile_abi(BUILTIN_EVENT_ABIS)[1]


def _abi_list(address: str, abi: Any) -> list[Mapping[str, Any]]:
    """An ABI as a list of entries; also accepts JSON text and ``{"abi": [...]}`` artifacts."""
    if isinstance(abi, str | bytes):
        try:
            abi = json.loads(abi)
        except ValueError:
            logger.warning("ignoring the ABI of %s: not valid JSON", address)
            return []
    if isinstance(abi, Mapping):
        abi = abi.get("abi")
    if not isinstance(abi, Sequence) or isinstance(abi, str | bytes):
        logger.warning("ignoring the ABI of %s: not a list of entries", address)
        return []
    return list(abi)


# --- the decoder --------------------------------------------------------------


class Decoder:
    """Decodes call data and logs with the tracked contracts' ABIs.

    ``abis`` maps a contract address to its ABI JSON list. Entries that cannot
    be compiled (unknown types, malformed JSON) are skipped with a warning, so
    one odd ABI does not stop a run. Contracts that share an ABI share its
    compiled tables. Instances are immutable after ``__init__`` and safe to
    share between threads and tasks.
    """

    __slots__ = ("_builtin", "_events", "_functions")

    def __init__(self, abis: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> None:
        self._functions: dict[str, _FunctionTable] = {}
        self._events: dict[str, _EventTable] = {}
        self._builtin = _builtin_events()
        compiled: dict[str, tuple[_FunctionTable, _EventTable]] = {}
        for address, raw in (abis or {}).items():
            abi = _abi_list(address, raw)
            try:
                key = json.dumps(abi, sort_keys=True, default=str)
            except (TypeError, ValueError):
                key = str(id(abi))
            tables = compiled.get(key)
            if tables is None:
                tables = compiled[key] = _compile_abi(abi)
            functions, events = tables
            if functions:
                self._functions[address.lower()] = functions
            if events:
                self._events[address.lower()] = events

    def decode_input(
        self, to_address: str | None, input_hex: str
    ) -> tuple[str | None, str | None, dict[str, Any] | None]:
        """``(method_id, method_name, method_args)`` of a transaction's call data.

        ``method_id`` is set whenever the input has at least 4 bytes (contract
        creations included: it is then the start of the init code); the other
        two only when a function of ``to_address``'s ABI matches and decodes.
        """
        try:
            mid = method_id(input_hex)
            if mid is None or to_address is None:
                return mid, None, None
            table = self._functions.get(to_address.lower())
            if table is None:
                return mid, None, None
            candidates = table.get(mid)
            if candidates is None:
                return mid, None, None
            body = input_hex[10:].lower()
            for f in candidates:
                args = f.decode(body)
                if args is not None:
                    return mid, f.name, args
            return mid, None, None
        except (AttributeError, TypeError):  # not even strings: nothing to decode
            return None, None, None

    def decode_input_lower(
        self, to_address: str | None, input_hex: str
    ) -> tuple[str | None, str | None, dict[str, Any] | None]:
        """:meth:`decode_input` for a ``to_address`` and ``input_hex`` already lowercase (normalise)."""
        if len(input_hex) < 10 or input_hex[:2] != "0x":
            return None, None, None
        mid = input_hex[:10]
        if to_address is None:
            return mid, None, None
        table = self._functions.get(to_address)
        if table is None:
            return mid, None, None
        candidates = table.get(mid)
        if candidates is None:
            return mid, None, None
        body = input_hex[10:]
        for f in candidates:  # f.decode(body), inline: this runs for every transaction
            values = f.args.decode(body, False)
            if values is not None:
                return mid, f.name, dict(zip(f.names, values))  # noqa: B905 - see _Function.decode
        return mid, None, None

    def decode_log_lower(
        self, address: str, topic0: str, topics: Sequence[str], data: str
    ) -> tuple[str | None, dict[str, Any] | None]:
        """:meth:`decode_log` for an ``address``, ``topic0``, ``topics`` and ``data`` already
        lowercase (normalise lowers them once, for the row and the decoding both)."""
        try:
            n = len(topics)
            body: str | None = None
            for table in (self._events.get(address), self._builtin):
                if not table:
                    continue
                candidates = table.get(topic0)
                if candidates is None:
                    continue
                for e in candidates:
                    if e.n_topics != n:
                        continue
                    if body is None:
                        body = data[2:] if data[:2] == "0x" else data
                    args = e.decode(topics, body)
                    if args is not None:
                        return e.name, args
            return None, None
        except (AttributeError, TypeError, IndexError):  # malformed topics
            return None, None

    def decode_log(
        self, address: str, topics: Sequence[str], data: str
    ) -> tuple[str | None, dict[str, Any] | None]:
        """``(event_name, event_args)`` of a log, or ``(None, None)`` when nothing matches."""
        try:
            if not topics:
                return None, None
            topic0 = topics[0].lower()
            n = len(topics)
            body: str | None = None
            for table in (self._events.get(address.lower()), self._builtin):
                if not table:
                    continue
                candidates = table.get(topic0)
                if candidates is None:
                    continue
                for e in candidates:
                    if e.n_topics != n:
                        continue
                    if body is None:
                        body = data[2:].lower() if data[:2] in ("0x", "0X") else data.lower()
                        topics = [t.lower() for t in topics]
                    args = e.decode(topics, body)
                    if args is not None:
                        return e.name, args
            return None, None
        except (AttributeError, TypeError, IndexError):  # malformed topics or data
            return None, None
