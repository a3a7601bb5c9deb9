"""A throwaway local anvil node for tests, the demo and benchmarks.

`Anvil` starts anvil on a free loopback port with the flags the project's chains
need, waits until it answers JSON-RPC, and stops it on exit. The child is tied to
this process (``PR_SET_PDEATHSIG`` on Linux, plus an ``atexit`` hook), so a crashed
or interrupted test run does not leave an orphan node behind.

Binary resolution (`find_anvil`): the ``GAPFILL_ANVIL`` environment variable, then
``<repo>/.tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil`` (the npm
package ``@foundry-rs/anvil-linux-amd64``), then ``anvil`` on ``PATH``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

__all__ = ["ANVIL_ENV", "REPO_ANVIL_BIN", "Anvil", "AnvilError", "find_anvil"]

log = logging.getLogger(__name__)

ANVIL_ENV = "GAPFILL_ANVIL"
"""Environment variable naming the anvil binary to use."""

_NPM_ANVIL = Path(".tools/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
REPO_ANVIL_BIN = Path(__file__).resolve().parents[3] / _NPM_ANVIL
"""Where the repository's npm install puts anvil (``<repo>/.tools/...``)."""

DEFAULT_BALANCE_ETH = 10_000_000
DEFAULT_GAS_LIMIT = 100_000_000
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1

# Nodes still running, stopped at interpreter exit if their owner forgot to.
_live: weakref.WeakSet[Anvil] = weakref.WeakSet()
_atexit_registered = False


class AnvilError(RuntimeError):
    """anvil could not be found, started, or did not answer."""


def find_anvil() -> str | None:
    """Return the anvil binary to use, or None when there is none."""
    configured = os.environ.get(ANVIL_ENV)
    if configured:
        return configured if _is_executable(Path(configured)) else None
    for candidate in (REPO_ANVIL_BIN, Path.cwd() / _NPM_ANVIL):
        if _is_executable(candidate):
            return str(candidate)
    return shutil.which("anvil")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    # The child gets SIGKILL when the parent dies, however the parent dies.
    # Caveat: "parent" is the thread that forked, so start nodes from a
    # long-lived thread (the main thread, or a pool thread that stays alive).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Anvil:
    """A local anvil node on a free ``127.0.0.1`` port; use it as a context manager.

    >>> with Anvil() as node:          # doctest: +SKIP
    ...     node.request("eth_blockNumber")
    '0x0'
    """

    url: str
    port: int
    chain_id: int
    accounts: list[str]

    def __init__(
        self,
        *,
        accounts: int = 50,
        chain_id: int = 31337,
        extra_args: Sequence[str] = (),
        binary: str | None = None,
        balance_eth: int = DEFAULT_BALANCE_ETH,
        gas_limit: int = DEFAULT_GAS_LIMIT,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self._binary = binary
        self._n_accounts = accounts
        self.chain_id = chain_id
        self._extra_args = tuple(extra_args)
        self._balance_eth = balance_eth
        self._gas_limit = gas_limit
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self.port = 0
        self.url = ""
        self.accounts = []

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> Anvil:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the node and wait until it answers; raises AnvilError."""
        if self._proc is not None:
            raise AnvilError("this Anvil is already started")
        binary = self._binary or find_anvil()
        if binary is None:
            raise AnvilError(
                f"anvil not found: set {ANVIL_ENV}, run `npm install` in .tools, "
                "or put anvil on PATH"
            )
        last: AnvilError | None = None
        # A free port can be taken between our probe and anvil's bind: retry.
        for _ in range(3):
            try:
                self._spawn(binary, _free_port())
                self._wait_ready()
            except AnvilError as exc:
                last = exc
                self.stop()
                continue
            _track(self)
            log.debug("anvil started on %s (pid %d)", self.url, self.pid)
            return
        assert last is not None
        raise last

    def _spawn(self, binary: str, port: int) -> None:
        args = [
            binary,
            "--host", "127.0.0.1",
            "-p", str(port),
            "-a", str(self._n_accounts),
            "--balance", str(self._balance_eth),
            "--gas-limit", str(self._gas_limit),
            "--chain-id", str(self.chain_id),
            "--order", "fifo",
            "--silent",
            *self._extra_args,
        ]  # fmt: skip
        # Lives as long as the node (closed in stop()), so no `with` block.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._stderr,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                # Its own process group: a Ctrl+C at the terminal reaches gapfill, which
                # stops the node itself, instead of killing it under a running command.
                start_new_session=True,
            )
        except OSError as exc:
            raise AnvilError(f"cannot run anvil at {binary}: {exc}") from exc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise AnvilError(
                    f"anvil exited with code {self._proc.returncode}: {self._stderr_text()}"
                )
            try:
                answered = int(self.request("eth_chainId", timeout_s=1.0), 16)
            except (OSError, AnvilError):
                if time.monotonic() > deadline:
                    raise AnvilError(
                        f"anvil did not answer on {self.url} within "
                        f"{self._start_timeout_s:.0f} s: {self._stderr_text()}"
                    ) from None
                time.sleep(0.05)
                continue
            if answered != self.chain_id:
                raise AnvilError(f"anvil answered chain id {answered}, not {self.chain_id}")
            self.accounts = [a.lower() for a in self.request("eth_accounts")]
            return

    def _stderr_text(self) -> str:
        if self._stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            self._stderr.seek(0)
            text: str = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
            return text
        return ""

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise AnvilError("anvil is not started")
        return self._proc.pid

    def stop(self) -> None:
        """Stop the node: SIGTERM, then SIGKILL after a grace period. Idempotent."""
        proc, self._proc = self._proc, None
        _live.discard(self)
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("anvil pid %d ignored SIGTERM; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            log.debug("anvil on %s stopped", self.url)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    # -- JSON-RPC ----------------------------------------------------------

    def request(self, method: str, *params: Any, timeout_s: float = 30.0) -> Any:
        """Send one JSON-RPC call and return its result; raises AnvilError on an RPC error."""
        if not self.url:
            raise AnvilError("anvil is not started")
        body = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)})
        req = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            reply = orjson.loads(resp.read())
        if "error" in reply:
            raise AnvilError(f"{method} failed: {reply['error']}")
        return reply["result"]

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"Anvil(url={self.url!r}, chain_id={self.chain_id}, {state})"


def _track(node: Anvil) -> None:
    # Registered on first use rather than at import: importing has no side effects.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_stop_all)
        _atexit_registered = True
    _live.add(node)


def _stop_all() -> None:
    for node in list(_live):
        node.stop()
