"""A --chain-id no contract is tracked on names the chains that have some."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli

pytestmark = pytest.mark.timeout(20)

A = "0x" + "aa" * 20


def run(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--db", f"sqlite:///{tmp_path / 'x.db'}", *args])


def test_the_chains_with_contracts_are_named_in_the_plural_when_there_are_several(tmp_path: Path) -> None:
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    r = run(tmp_path, "status", "--chain-id", "7")
    assert r.exit_code == 1 and "no contract is tracked on chain 7 (only on chain 1): " in r.stderr, r.stderr
    assert run(tmp_path, "contract", "add", A, "--chain-id", "5").exit_code == 0
    r = run(tmp_path, "status", "--chain-id", "7")  # it said "(only on chain 1, 5)"
    assert r.exit_code == 1
    assert "no contract is tracked on chain 7 (only on chains 1, 5): " in r.stderr, r.stderr
