"""``-v`` and ``-vv`` in every process of a run, and never a secret in what they show."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from engine_support import emulator

GAPFILL = str(Path(sys.executable).parent / "gapfill")
KEY = "S3cr3tPathKeyAbCdEf0123"
API_KEY = "S3cr3tQueryKeyZyXwV98765"
PASSWORD = "S3cr3tPassw0rdQwErTy"


@pytest.fixture
def keyed_node(small_chain: Any) -> Iterator[str]:
    """The small chain behind a provider-like URL: a key in the path, another in the query."""
    with emulator(small_chain.url, "--path", f"/v3/{KEY}") as (url, _):
        yield f"{url}?apikey={API_KEY}"


def _enrich(db: str, rpc_url: str, small_chain: Any, tmp_path: Path, *flags: str) -> str:
    """Track the token, import 600 of its refs, enrich them in concurrent mode with 2 workers
    (``flags`` before the command); returns what the enrich wrote on standard error."""
    chain = small_chain.chain
    refs = tmp_path / "refs.csv"
    hashes = sorted(chain.direct[chain.token])[:600]
    refs.write_text("hash,block_number\n" + "".join(f"{h},{chain.tx_block[h]}\n" for h in hashes))
    base = [GAPFILL, "--db", db, "--rpc-url", rpc_url, "--config", ""]
    err = ""
    for args in (["contract", "add", chain.token], ["import", str(refs), "--contract", chain.token],
                 [*flags, "enrich", "--mode", "concurrent", "--workers", "2",
                  "--batch-size", "100"]):  # fmt: skip
        r = subprocess.run(base + args, capture_output=True, text=True, timeout=150)
        assert r.returncode == 0, r.stdout + r.stderr
        err = r.stderr
    return err


@pytest.mark.timeout(180)
def test_worker_processes_log_at_the_clis_level(tmp_path: Path, small_chain: Any) -> None:
    err = _enrich(f"sqlite:///{tmp_path / 'g.db'}", small_chain.url, small_chain, tmp_path, "-v")
    lines = err.splitlines()
    # A worker's records reach standard error, named after the worker, whole lines each.
    leased = [ln for ln in lines if " INFO gapfill.engine.worker: [Worker-" in ln and " leased: " in ln]
    committed = [ln for ln in lines if " INFO gapfill.engine.worker: [Worker-" in ln and " committed: " in ln]
    assert leased and committed, err
    assert all(" fetch " in ln and " commit " in ln for ln in committed)
    # (the plan comes before the start-up sample, which then enriched the first 20 refs)
    assert re.search(r"measured on \d+ refs", err) is not None, err
    assert any("INFO gapfill.engine.run: run " in ln and " planned 600 ref(s) into " in ln
               for ln in lines), err  # fmt: skip
    assert not any(" DEBUG " in ln for ln in lines)  # -v is INFO
    # Each start-up fact once: the coordinator's check says the chain, not again its
    # sample's client nor each worker's (they said it 4 times).
    chain = [ln for ln in lines if " chain id 31337: RPC endpoint(s) " in ln]
    assert len(chain) == 1 and "[Worker-" not in chain[0], chain


@pytest.mark.timeout(180)
def test_verbose_says_block_receipts_once_for_all_workers(tmp_path: Path, small_chain: Any) -> None:
    # Under a rate limit each worker asks whether eth_getBlockReceipts is served (the
    # per-block plan counts calls); a node slow enough that both workers get batches. The
    # coordinator writes the answer once, not once per worker.
    with emulator(small_chain.url, "--latency-s", "0.2") as (url, _):
        err = _enrich(f"sqlite:///{tmp_path / 'g.db'}", url, small_chain, tmp_path, "-v", "--rps", "100000")
    lines = err.splitlines()
    assert {ln.split("[Worker-")[1][0] for ln in lines if " committed: " in ln} == {"1", "2"}, err
    said = [ln for ln in lines
            if " INFO gapfill.rpc.client: [Worker-" in ln and "eth_getBlockReceipts served" in ln]
    assert len(said) == 1, said


@pytest.mark.timeout(180)
def test_debug_logging_shows_no_secret(
    tmp_path: Path, small_chain: Any, keyed_node: str, pg_url: str
) -> None:
    parts = urlsplit(pg_url)
    db = urlunsplit(parts._replace(netloc=f"{parts.username}:{PASSWORD}@{parts.hostname}:{parts.port}"))
    err = _enrich(db, keyed_node, small_chain, tmp_path, "-vv")
    for secret in (KEY, API_KEY, PASSWORD):
        assert secret not in err
    # It did log the URLs, redacted: every HTTP request, in the coordinator and the workers.
    assert " DEBUG gapfill.rpc.client: POST http://127.0.0.1:" in err, err
    assert " DEBUG gapfill.rpc.client: [Worker-" in err, err
    assert "/v3/***?apikey=***" in err, err
    # -vv is gapfill's DEBUG, not other libraries' (asyncio's "Using selector", in every process).
    debug_names = {ln.split(" DEBUG ", 1)[1].split(":", 1)[0] for ln in err.splitlines() if " DEBUG " in ln}
    assert debug_names and all(n.startswith("gapfill.") for n in debug_names), debug_names
