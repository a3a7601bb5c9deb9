"""Wrong usage is exit 2 (README, Exit codes), said before any node or database is asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from gapfill.cli import cli

pytestmark = pytest.mark.timeout(20)

A = "0x" + "aa" * 20


def run(tmp_path: Path, *args: str) -> Result:
    # A node nobody listens on: a command that asks it fails with exit 1, not 2.
    db = ["--db", f"sqlite:///{tmp_path / 'x.db'}", "--rpc-url", "http://127.0.0.1:9/"]
    return CliRunner().invoke(cli, [*db, *args])


@pytest.fixture
def tracked(tmp_path: Path) -> Path:
    assert run(tmp_path, "contract", "add", A, "--chain-id", "1").exit_code == 0
    return tmp_path


@pytest.mark.parametrize(
    ("args", "said"),
    [(("--from-block", "10", "--to-block", "5"), "Error: --from-block 10 is above --to-block 5: swap them"),
     (("--method", "foo"), "Error: Invalid value for '--method': unknown discovery method 'foo': use logs, "
                           "blocks, trace, explorer"),
     (("--method", "logs,Magic", "--method", "blocks"), "unknown discovery method 'Magic'"),
     # It meant the default set: a script's empty variable scanned with methods nobody chose.
     (("--method", ""), "Error: Invalid value for '--method': '' names no method: give some of logs, "
                        "blocks, trace, explorer, or leave --method out for the default set"),
     (("--method", "logs", "--method", " , "), "' , ' names no method")],
)  # fmt: skip
def test_discover_options_that_cannot_work_are_usage_errors(tracked: Path, args: tuple[str, ...],
                                                            said: str) -> None:  # fmt: skip
    r = run(tracked, "discover", *args)
    assert r.exit_code == 2, r.output
    assert said in r.stderr and "127.0.0.1" not in r.stderr, r.stderr


def test_every_workers_option_takes_the_same_range() -> None:
    import click

    from gapfill.cli import enrich, worker
    from gapfill.cli_demo import demo

    ranges = set()
    for command in (enrich, worker, demo):
        [kind] = [p.type for p in command.params if p.name == "workers"]
        assert isinstance(kind, click.IntRange)
        ranges.add((kind.min, kind.max))
    assert len(ranges) == 1, ranges


@pytest.mark.parametrize("abi", ["missing.json", "."])
def test_an_abi_path_that_is_no_file_is_one_sentence_and_exit_1_either_way(tmp_path: Path, abi: str) -> None:
    # A directory was click's usage error (exit 2, a usage block) and a missing file exit 1.
    path = str(tmp_path / abi)
    res = run(tmp_path, "contract", "add", A, "--chain-id", "1", "--abi", path)
    what = "does not exist" if abi == "missing.json" else "is a directory, not a file"
    assert (res.exit_code, res.stderr) == (1, f"error: ABI file {path} {what}: fix the --abi path\n")
    assert not (tmp_path / "x.db").exists()  # said before the database was started
@pytest.mark.parametrize(("args", "name"), [(("worker", "--rpc-url", "http://127.0.0.1:9/"), "--rpc-url"),
                                            (("enrich", "--db=sqlite:///y.db"), "--db"),
                                            (("contract", "list", "-v"), "-v")])  # fmt: skip
def test_an_option_of_gapfill_itself_after_the_command_says_where_it_goes(
    tracked: Path, args: tuple[str, ...], name: str
) -> None:
    # It was "No such option '--rpc-url'. Did you mean '--rpc-timeout'?": as if gapfill had
    # no such option, and the README's `gapfill --rpc-url ... worker` is easy to turn round.
    r = run(tracked, *args)
    assert r.exit_code == 2, r.output
    sub = "contract list" if args[0] == "contract" else args[0]
    said = f"Error: {name} is an option of gapfill itself, not of `{sub}`: put it before the command"
    assert said in r.stderr and "Did you mean" not in r.stderr, r.stderr
    assert "No such option '--nope'" in run(tracked, "worker", "--nope").stderr  # others as before


def test_sequential_mode_says_once_that_it_does_not_batch_calls(tracked: Path) -> None:
    """--rpc-batch-size (and --batches-in-flight) were taken and ignored in silence by a
    sequential run, the seed's one-call-at-a-time baseline: it says so, once, and runs."""
    warning = "warning: sequential mode sends one call at a time"
    r = run(tracked, "enrich", "--mode", "sequential", "--rpc-batch-size", "50")
    assert r.exit_code == 0, r.output
    assert r.stderr.count(warning) == 1, r.stderr
    assert (f"{warning}, so --rpc-batch-size 50 is not used: use --mode batch to batch "
            "calls\n") in r.stderr, r.stderr  # fmt: skip
    r = run(tracked, "enrich", "--mode", "sequential", "--rpc-batch-size", "50", "--batches-in-flight", "2")
    assert "so --rpc-batch-size 50 and --batches-in-flight 2 are not used" in r.stderr, r.stderr
    cfg = tracked / "g.toml"
    cfg.write_text("[enrich]\nrpc_batch_size = 20\n")
    r = run(tracked, "--config", str(cfg), "enrich", "--mode", "sequential")
    assert f"so rpc_batch_size = 20 (from {cfg}) is not used" in r.stderr, r.stderr
    for args in (("--mode", "sequential"), ("--mode", "batch", "--rpc-batch-size", "50")):
        r = run(tracked, "enrich", *args)
        assert r.exit_code == 0 and "warning" not in r.stderr, r.output
