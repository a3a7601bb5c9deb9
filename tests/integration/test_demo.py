"""A smaller `gapfill demo`, end to end: node, chain, discovery, status, enrichment, decoded rows."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.timeout(240)
def test_small_demo_runs_end_to_end(tmp_path: Path, anvil_bin: str) -> None:
    gapfill = Path(sys.executable).parent / "gapfill"
    env = {**os.environ, "GAPFILL_ANVIL": anvil_bin}
    r = subprocess.run([str(gapfill), "demo", "--txs", "2000", "--workers", "2"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=220)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    for step in ("1. Starting anvil", "4. Registering", "5. The gap", "6. Enriching", "7. After",
                 "A few decoded transactions", "8. Stopping the node"):  # fmt: skip
        assert step in out, out
    assert "Traceback" not in out
    db = sqlite3.connect(tmp_path / "gapfill-demo.db")
    missing = db.execute(
        "SELECT count(*) FROM refs r WHERE NOT EXISTS "
        "(SELECT 1 FROM transactions t WHERE t.chain_id = r.chain_id AND t.tx_hash = r.tx_hash)"
    ).fetchone()[0]
    refs = db.execute("SELECT count(*) FROM refs").fetchone()[0]
    decoded = db.execute("SELECT count(*) FROM transactions WHERE method_name IS NOT NULL").fetchone()[0]
    db.close()
    assert refs > 1000 and missing == 0 and decoded > 0


@pytest.mark.timeout(120)
def test_demo_leaves_the_database_of_gapfill_db_and_of_the_config_file_alone(
    tmp_path: Path, anvil_bin: str
) -> None:
    """The README's quick tour exports GAPFILL_DB (the user's own database) and ends with
    `gapfill demo`: the demo's contracts, on a random chain no endpoint serves, went into
    that database, and every later `discover` named them and ended with exit 3."""
    gapfill = Path(sys.executable).parent / "gapfill"
    (tmp_path / "gapfill.toml").write_text('db = "sqlite:///from-file.db"\n')
    env = {**os.environ, "GAPFILL_ANVIL": anvil_bin, "GAPFILL_DB": "sqlite:///mine.db"}
    r = subprocess.run([str(gapfill), "demo", "--txs", "500", "--rows", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=100)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "GAPFILL_DB is left alone: the demo writes gapfill-demo.db" in r.stderr
    assert not (tmp_path / "mine.db").exists() and not (tmp_path / "from-file.db").exists()
    db = sqlite3.connect(tmp_path / "gapfill-demo.db")
    assert db.execute("SELECT count(*) FROM refs").fetchone()[0] > 0
    db.close()
    del env["GAPFILL_DB"]  # the config file's db is left alone too, and said so
    r = subprocess.run([str(gapfill), "demo", "--txs", "500", "--rows", "0"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=100)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the db key of gapfill.toml is left alone" in r.stderr
    assert not (tmp_path / "from-file.db").exists()


def test_demo_names_a_wrong_gapfill_anvil_and_keeps_the_old_demo_db(tmp_path: Path) -> None:
    gapfill = Path(sys.executable).parent / "gapfill"
    (tmp_path / "gapfill-demo.db").write_bytes(b"an earlier demo")
    env = {**os.environ, "GAPFILL_ANVIL": str(tmp_path / "nonexistent")}
    r = subprocess.run([str(gapfill), "demo"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 1
    assert f"GAPFILL_ANVIL={tmp_path / 'nonexistent'} is not an executable file" in r.stderr
    assert (tmp_path / "gapfill-demo.db").read_bytes() == b"an earlier demo"


@pytest.mark.timeout(120)
def test_ctrl_c_during_chain_generation_stops_cleanly(tmp_path: Path, anvil_bin: str) -> None:
    """A terminal's Ctrl+C reaches the whole foreground process group: the node must not die
    under the generator (that ended in 'internal error (ChainError)'), and must be stopped."""
    gapfill = Path(sys.executable).parent / "gapfill"
    env = {**os.environ, "GAPFILL_ANVIL": anvil_bin, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(gapfill), "demo", "--txs", "200000"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # SIGINT as a terminal leaves it:
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert proc.stdout is not None
    url = ""
    try:
        for line in proc.stdout:
            if "node at " in line:
                url = line.split("node at ", 1)[1].strip()
            if line.startswith("2-3."):
                break
        time.sleep(4.0)  # well inside the generator (it then sends and mines in batches)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):  # not left to the collector (a later test's warning)
            if pipe is not None:
                pipe.close()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "internal error" not in err and "Traceback" not in err, err
    # Not a bare "interrupted": what the database holds, and what to do.
    said = ("interrupted: the demo's node and chain are gone, and gapfill-demo.db holds what it "
            "wrote of them so far; run `gapfill demo` again to start over")
    assert err.strip().splitlines()[-1] == said, err
    assert "8. Stopping the node." in out
    assert url.startswith("http://127.0.0.1:")
    host, port = url.removeprefix("http://").split(":")
    with pytest.raises(OSError), socket.create_connection((host, int(port)), timeout=2):
        pass


@pytest.mark.timeout(180)
def test_ctrl_c_as_the_demos_run_summary_is_said_stops_the_demo_after_it(
    tmp_path: Path, anvil_bin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first Ctrl+C as the run's end is said is held, so that the summary is said whole;
    it was then dropped, and the demo went on through its remaining steps."""
    import click
    from click.testing import CliRunner

    import gapfill.cli
    from gapfill.cli import cli

    monkeypatch.setenv("GAPFILL_ANVIL", anvil_bin)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gapfill.cli, "_is_tty", lambda: True)  # the summary said after the live view
    echo = click.echo

    def echo_signalled(message: object = None, *args: object, **kwargs: object) -> None:
        if isinstance(message, str) and message.startswith("  processed:"):
            signal.raise_signal(signal.SIGINT)  # its handler runs here, as the line is written
        echo(message, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(click, "echo", echo_signalled)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
    try:
        r = CliRunner().invoke(cli, ["demo", "--txs", "500", "--rows", "0"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.exit_code == 130, r.output
    assert r.output.count("  processed:") == 1 and "  calls:" in r.output, r.output  # said whole
    assert "7. After enrichment" not in r.output and "8. Stopping the node" in r.output, r.output
    assert "Traceback" not in r.output, r.output


@pytest.mark.timeout(180)
def test_a_demo_stopped_while_it_enriches_says_to_start_over_not_to_continue(
    tmp_path: Path, anvil_bin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupted run's summary said enrich's "rerun the same command to continue where
    it stopped", but a rerun replaces gapfill-demo.db and builds a new chain."""
    from click.testing import CliRunner

    from gapfill.cli import cli
    from gapfill.cli_progress import LineRenderer

    monkeypatch.setenv("GAPFILL_ANVIL", anvil_bin)
    monkeypatch.chdir(tmp_path)
    line = LineRenderer.line

    def line_signalled(self: LineRenderer, text: str) -> None:
        line(self, text)
        if "Assigned batch" in text:
            signal.raise_signal(signal.SIGINT)  # a Ctrl+C as the first batch is fetched

    monkeypatch.setattr(LineRenderer, "line", line_signalled)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal
    try:
        r = CliRunner().invoke(cli, ["demo", "--txs", "500", "--rows", "0", "--mode", "batch"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert r.exit_code == 130, r.output
    assert ("  interrupted: gapfill-demo.db holds what the run stored, but the demo's chain ends with "
            "its node: run `gapfill demo` again to start over on a new chain\n") in r.stderr, r.stderr
    assert "continue where it stopped" not in r.output, r.output
    assert "8. Stopping the node" in r.stdout and "Traceback" not in r.output, r.output
