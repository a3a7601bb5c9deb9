"""Option types and summary wording the CLI shares."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from gapfill.cli_progress import summary_lines
from gapfill.cli_types import Age, FiniteFloatRange, int_range
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


@click.command()
@click.option("--n", type=int_range(1))
@click.option("--w", type=int_range(1, 64))
@click.option("--s", type=FiniteFloatRange(min=0.1))
def typed(n: int | None, w: int | None, s: float | None) -> None:
    click.echo(f"{n} {w} {s}")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("args", "said"), [
    (["--n", "abc"], "Invalid value for '--n': 'abc' is not a whole number."),
    (["--w", "1.5"], "Invalid value for '--w': '1.5' is not a whole number."),
    (["--s", "x"], "Invalid value for '--s': 'x' is not a number."),
    (["--s", "nan"], "Invalid value for '--s': 'nan' is not a finite number."),
    (["--w", "65"], "Invalid value for '--w': 65 is not in the range 1<=x<=64."),
])
def test_a_value_that_is_no_number_is_said_so_in_words(args: list[str], said: str) -> None:
    # click said "'abc' is not a valid integer range" (or "float range"), where a config
    # file's value is "not a whole number".
    r = CliRunner().invoke(typed, args)
    assert r.exit_code == 2 and r.output.splitlines()[-1] == f"Error: {said}", r.output
    assert CliRunner().invoke(typed, ["--n", "3", "--w", "64", "--s", "0.5"]).output == "3 64 0.5\n"


@pytest.mark.timeout(10)
def test_a_run_with_nothing_to_do_claims_no_speedup() -> None:
    empty = RunSummary(1, "batch", 1, 0, 0, 0, 0.2, 0.0, 0, 0.0, "done", 500.0, "recorded")
    assert not any("speedup" in ln for ln in summary_lines(empty))
    done = RunSummary(2, "batch", 1, 100, 0, 0, 0.1, 1000.0, 200, 2.0, "done", 500.0, "recorded")
    assert any("speedup:   2.0x over sequential" in ln for ln in summary_lines(done))


@pytest.mark.timeout(10)
def test_the_summary_counts_refs_and_restarts_in_words() -> None:
    # It said "1 ref(s) are in blocks the node has not reached yet" and "1 worker restart(s)".
    def said(restarts: int, beyond_head: int) -> list[str]:
        run = RunSummary(4, "concurrent", 2, 0, 0, 0, 1.0, 0.0, 6, 0.0, "done", restarts=restarts,
                         beyond_head=beyond_head, head=30)  # fmt: skip
        return [ln for ln in summary_lines(run) if ln.startswith(("  restarts", "  not yet"))]

    assert said(1, 1) == ["  restarts:  1 worker restart",
                          "  not yet:   1 ref is in blocks the node has not reached yet (its head was 30 "
                          "when last asked): rerun once it has caught up to fill them"]  # fmt: skip
    assert said(2, 1_500) == ["  restarts:  2 worker restarts",
                              "  not yet:   1,500 refs are in blocks the node has not reached yet (its "
                              "head was 30 when last asked): rerun once it has caught up to fill "
                              "them"]  # fmt: skip


@pytest.mark.timeout(10)
def test_a_rate_limited_run_compares_with_what_the_limit_allows_one_call_at_a_time() -> None:
    from gapfill.engine.run import EnrichJob, rate_limit, sequential_baseline
    from gapfill.settings import EndpointSetting

    def job(*rps: float | None) -> EnrichJob:
        endpoints = tuple(EndpointSetting(f"http://n{i}", r) for i, r in enumerate(rps))
        return EnrichJob(db_url="sqlite:///x.db", endpoints=endpoints, targets=(), chain_id=1)

    assert rate_limit(job(150.0)) == 150.0
    assert rate_limit(job(100.0, 50.0)) == 150.0
    assert rate_limit(job(150.0, None)) is None  # one endpoint without a limit: no bound
    assert rate_limit(job(None)) is None
    # QA's case: 20 refs sampled within the bucket's burst at 500 tx/s, 3 calls each; the
    # run held at 150 calls/s and 2 calls per tx did 75 tx/s, which said "0.1x".
    why = "measured on 20 refs at the start of this run"
    rate, said = sequential_baseline(500.0, why, 3.0, rate_limit(job(150.0)))
    assert rate == pytest.approx(50.0) and said.startswith(why) and "150 calls/s rate limit" in said
    run = RunSummary(3, "concurrent", 2, 600, 0, 0, 8.0, 75.0, 1200, 2.0, "done", rate, said)
    (line,) = [ln for ln in summary_lines(run) if "speedup" in ln]
    assert "1.5x over sequential (50.0 tx/s" in line and "rate limit" in line, line
    # Without a limit, or a sequential rate the limit allows anyway, the figure stands.
    assert sequential_baseline(500.0, why, 3.0, None) == (500.0, why)
    assert sequential_baseline(40.0, why, 3.0, 150.0) == (40.0, why)


@click.command()
@click.option("--age", type=Age())
def aged(age: float | None) -> None:
    click.echo(f"{age}")


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ["1" + "0" * 300, "36501", "876001h"])
def test_an_age_past_a_century_is_refused_in_one_sentence(value: str) -> None:
    # 1 and 300 zeros was taken, and prune said "no finished plan older than 1e+300 days".
    r = CliRunner().invoke(aged, ["--age", value])
    assert r.exit_code == 2, r.output
    assert r.output.splitlines()[-1] == (f"Error: Invalid value for '--age': {value!r} is more than a "
                                         "century: give at most 36500 days (876000h)")  # fmt: skip
    assert CliRunner().invoke(aged, ["--age", "36500"]).output == f"{36_500 * 86_400.0}\n"
    assert CliRunner().invoke(aged, ["--age", "876000h"]).output == f"{36_500 * 86_400.0}\n"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", ["1e308", "inf", "nan", "86401"])
@pytest.mark.parametrize("command", ["enrich", "worker"])
@pytest.mark.parametrize("option", ["--grace-period", "--lease-timeout", "--rpc-outage"])
def test_a_wait_past_a_day_or_not_finite_is_refused(value: str, command: str, option: str) -> None:
    # 1e308 was taken ("workers have 1e+308s to finish"; a lease that never expires, an outage
    # never declared); the options are parsed before the command opens a database.
    from gapfill.cli import cli

    r = CliRunner().invoke(cli, [command, option, value])
    assert r.exit_code == 2, r.output
    last = r.output.splitlines()[-1]
    assert last.startswith(f"Error: Invalid value for '{option}': "), r.output
    assert last.endswith(("<=x<=86400.", "is not a finite number.")), r.output
