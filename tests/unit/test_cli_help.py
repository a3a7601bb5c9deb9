"""``gapfill --help`` lists the commands kept in modules of their own without importing them."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from gapfill.cli import _LAZY_COMMANDS, LAZY_SHORT_HELP, cli

_HELP_THEN_MODULES = """
import sys
from click.testing import CliRunner
from gapfill.cli import cli
out = CliRunner().invoke(cli, ["--help"]).output
print(sorted(m for m in ("aiohttp", "gapfill.cli_demo", "gapfill.cli_discover") if m in sys.modules))
print(out)
"""


@pytest.mark.parametrize("name", sorted(_LAZY_COMMANDS))
def test_a_lazy_commands_line_in_the_help_is_its_own_first_sentence(name: str) -> None:
    importlib.import_module(_LAZY_COMMANDS[name])
    command = cli.commands[name]
    assert command.help is not None
    first = " ".join(command.help.split("\n\n")[0].split())
    assert LAZY_SHORT_HELP[name] == first


def test_the_command_list_imports_neither_discovery_nor_the_demo() -> None:
    r = subprocess.run([sys.executable, "-c", _HELP_THEN_MODULES], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    loaded, _, help_text = r.stdout.partition("\n")
    assert loaded == "[]"
    assert "\n  discover  Find the transactions of tracked contracts on chain and " in help_text
    assert "\n  demo      Run the whole job on a local anvil chain: discover, status" in help_text
