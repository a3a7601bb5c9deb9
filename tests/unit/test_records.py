"""``gapfill.records.record``: what ``@dataclass(frozen=True, slots=True)`` made, with its
``__eq__``, ``__hash__`` and ``__repr__`` shared instead of compiled per class."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from gapfill.records import record


def _fields() -> dict[str, Any]:
    """One class body for a record and for the frozen dataclass it is held to."""
    return {
        "__annotations__": {"a": "int", "b": "str", "note": "str", "hidden": "int", "items": "list[Any]"},
        "b": "x",
        "note": field(default="", compare=False),
        "hidden": field(default=0, repr=False),
        "items": field(default_factory=list, hash=False),
    }


Rec: Any = record(type("Rec", (), _fields()))
Dc: Any = dataclass(frozen=True, slots=True)(type("Dc", (), _fields()))


@record
class One:
    a: float


@record
class Empty:
    pass


@record
class Own:
    a: int

    def __repr__(self) -> str:
        return "mine"


def test_equality_hash_and_repr_are_those_of_a_frozen_dataclass() -> None:
    for x, y in [(Rec(1), Rec(1, note="other")), (Rec(1, "y"), Rec(1)), (Rec(1, items=[1]), Rec(1))]:
        dx, dy = Dc(**dataclasses.asdict(x)), Dc(**dataclasses.asdict(y))
        assert (x == y) == (dx == dy) and (x != y) == (dx != dy)
        assert repr(x).replace("Rec(", "Dc(") == repr(dx)
    assert hash(Rec(1, note="n", items=[1])) == hash(Dc(1, note="n", items=[1]))  # items: not hashed
    assert Rec(1) != Dc(1) and Rec(1).__eq__(1) is NotImplemented
    nan = float("nan")
    assert One(nan) == One(nan) or One(nan) != One(nan)  # no error either way
    same = One(nan)
    assert same == same  # the same value: equal, as a dataclass's tuples compare
    assert Empty() == Empty() and hash(Empty()) == hash(()) and repr(Empty()) == "Empty()"
    assert repr(Own(1)) == "mine"
    assert {Rec(1), Rec(1, note="n")} == {Rec(1)}


def test_a_record_shown_inside_itself_is_dots() -> None:
    r = Rec(1, items=[])
    r.items.append(r)
    assert repr(r) == "Rec(a=1, b='x', note='', items=[...])"


def test_a_record_is_frozen_slotted_picklable_and_replaceable() -> None:
    r = Rec(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.a = 2  # type: ignore[misc]
    assert not hasattr(r, "__dict__") and dataclasses.is_dataclass(r)
    assert pickle.loads(pickle.dumps(r)) == r
    assert dataclasses.replace(r, a=2) == Rec(2)


def test_the_progress_events_compile_only_their_init_and_frozen_methods() -> None:
    # @dataclass compiled six methods per frozen class (an exec each, ~5 M instructions
    # a class at start-up); a record's __eq__, __hash__ and __repr__ are shared.
    code = (
        "import builtins, dataclasses, gapfill.errors, gapfill.model, gapfill.records\n"
        "execs = []\n"
        "real = builtins.exec\n"
        "builtins.exec = lambda src, *a, **k: (execs.append(src) if isinstance(src, str) else None, "
        "real(src, *a, **k))[1]\n"
        "import gapfill.engine.events as ev\n"
        "classes = [c for c in vars(ev).values() if dataclasses.is_dataclass(c)]\n"
        "print(len(execs) == 3 * len(classes), len(classes) > 10)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True True"


@pytest.mark.parametrize("name", ["gapfill.model.Ref", "gapfill.rpc.config.Call"])
def test_a_hand_written_init_takes_and_sets_what_the_dataclass_one_would(name: str) -> None:
    """Ref and Call set their slots through the slots' own setters (faster than the frozen
    dataclass's ``object.__setattr__``): same parameters, defaults and fields, still frozen."""
    import importlib
    import inspect

    module, _, cls_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    fs = dataclasses.fields(cls)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fs]
    assert [p.default for p in params] == [
        inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default for f in fs
    ]
    values = [f"v{i}" for i, _ in enumerate(fs)]
    made = cls(*values)
    assert [getattr(made, f.name) for f in fs] == values
    assert cls(**{f.name: v for f, v in zip(fs, values, strict=True)}) == made
    required = [v for f, v in zip(fs, values, strict=True) if f.default is dataclasses.MISSING]
    assert [getattr(cls(*required), f.name) for f in fs if f.default is not dataclasses.MISSING] == [
        f.default for f in fs if f.default is not dataclasses.MISSING
    ]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.__setattr__(fs[0].name, 1)
    assert pickle.loads(pickle.dumps(cls(*required))) == cls(*required)
