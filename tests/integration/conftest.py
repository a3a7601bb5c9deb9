"""Fixtures for tests against a real local node (anvil).

- ``anvil``: a fresh node per test (function scope); ``anvil_module`` and
  ``anvil_session`` share one node per module / per run.
- ``small_chain``: one node per run holding a generated dense chain of ~2,000
  transactions, with its `GeneratedChain`. Read-only: do not send transactions
  to it; tests that write use ``anvil`` or ``make_chain``.
- ``make_chain(spec)``: a fresh node with ``spec`` generated on it, stopped at teardown.

Without an anvil binary these tests are skipped, except under ``CI=true``,
where a missing binary is a failure: CI must not go green by testing nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from gapfill.testing.anvil import ANVIL_ENV, Anvil, find_anvil
from gapfill.testing.chain import ChainSpec, GeneratedChain, generate

SMALL_CHAIN_SPEC = ChainSpec(layout="dense", total_txs=2_000, seed=7)


class NodeChain(NamedTuple):
    """A running node and the chain generated on it."""

    node: Anvil
    chain: GeneratedChain

    @property
    def url(self) -> str:
        return self.node.url


@pytest.fixture(scope="session")
def anvil_bin() -> str:
    """The anvil binary; skips (or fails under CI=true) when there is none."""
    binary = find_anvil()
    if binary is None:
        reason = (
            f"anvil not found: set {ANVIL_ENV}, install @foundry-rs/anvil-linux-amd64 "
            "under .tools, or put anvil on PATH"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return binary


@pytest.fixture
def anvil(anvil_bin: str) -> Iterator[Anvil]:
    """A fresh node for one test."""
    with Anvil(binary=anvil_bin) as node:
        yield node


@pytest.fixture(scope="module")
def anvil_module(anvil_bin: str) -> Iterator[Anvil]:
    """One node shared by the tests of a module."""
    with Anvil(binary=anvil_bin) as node:
        yield node


@pytest.fixture(scope="session")
def anvil_session(anvil_bin: str) -> Iterator[Anvil]:
    """One node shared by the whole run."""
    with Anvil(binary=anvil_bin) as node:
        yield node


@pytest.fixture(scope="session")
def small_chain(anvil_bin: str) -> Iterator[NodeChain]:
    """A node with a dense ~2,000-tx chain (seed 7), shared read-only by the run."""
    with Anvil(binary=anvil_bin) as node:
        yield NodeChain(node, generate(node.url, SMALL_CHAIN_SPEC))


@pytest.fixture
def make_chain(anvil_bin: str) -> Iterator[Callable[[ChainSpec], NodeChain]]:
    """A factory: a fresh node with ``spec`` generated on it, stopped at teardown."""
    nodes: list[Anvil] = []

    def make(spec: ChainSpec) -> NodeChain:
        node = Anvil(binary=anvil_bin)
        node.start()
        nodes.append(node)
        return NodeChain(node, generate(node.url, spec))

    try:
        yield make
    finally:
        for node in nodes:
            node.stop()
