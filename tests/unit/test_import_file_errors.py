"""`gapfill import` of a file it cannot open says what to do about it."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from gapfill.discover import imports
from gapfill.errors import InputError

pytestmark = pytest.mark.timeout(20)


@pytest.mark.parametrize(("error", "says"), [
    # It said "cannot import hashes.txt: Permission denied", with no next step.
    (PermissionError(errno.EACCES, "Permission denied"),
     "cannot import hashes.txt: this user may not read it: make it readable (chmod +r hashes.txt), "
     "or run gapfill as a user who may"),
    (OSError(errno.EIO, "Input/output error"),
     "cannot import hashes.txt (Input/output error): check the path, and that the file is readable there"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory"),
     "cannot import hashes.txt: no such file: check the path"),
])  # fmt: skip
def test_a_file_that_cannot_be_opened_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, error: OSError, says: str
) -> None:
    # Tests may run as root, whom a chmod does not stop: the open fails on cue instead.
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(imports, "open", refuse, raising=False)
    with pytest.raises(InputError) as info:
        imports.open_text("hashes.txt")
    assert str(info.value) == says


def test_a_folder_says_to_give_the_file_in_it(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        imports.open_text(str(tmp_path))
    assert str(info.value) == (f"cannot import {tmp_path}: it is a directory, not a file: give the path "
                               "of the file in it")  # fmt: skip
