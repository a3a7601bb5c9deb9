"""Option types and summary wording the CLI shares."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from gapfill.cli_progress import summary_lines
from gapfill.cli_types import int_range
from gapfill.engine.events import RunSummary
from gapfill.model import BIGINT_MAX


@click.command()
@click.option("--n", type=int_range(1), default=1, show_default=True)
def command(n: int) -> None:
    click.echo(f"n={n}")


@pytest.mark.timeout(10)
def test_a_storable_int_shows_its_lower_bound_and_refuses_what_the_database_cannot_hold() -> None:
    r = CliRunner().invoke(command, ["--help"])
    assert "[default: 1; x>=1]" in r.output and str(BIGINT_MAX) not in r.output, r.output
    r = CliRunner().invoke(command, ["--n", str(BIGINT_MAX + 1)])
    assert r.exit_code == 2 and "larger than the database can store" in r.output, r.output
    r = CliRunner().invoke(command, ["--n", "0"])
    assert r.exit_code == 2 and "0 is not in the range x>=1" in r.output, r.output
    assert CliRunner().invoke(command, ["--n", str(BIGINT_MAX)]).output == f"n={BIGINT_MAX}\n"


@pytest.mark.timeout(10)
def test_a_run_with_nothing_to_do_claims_no_speedup() -> None:
    empty = RunSummary(1, "batch", 1, 0, 0, 0, 0.2, 0.0, 0, 0.0, "done", 500.0, "recorded")
    assert not any("speedup" in ln for ln in summary_lines(empty))
    done = RunSummary(2, "batch", 1, 100, 0, 0, 0.1, 1000.0, 200, 2.0, "done", 500.0, "recorded")
    assert any("speedup:   2.0x over sequential" in ln for ln in summary_lines(done))
