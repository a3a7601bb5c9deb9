"""``gapfill discover``: the thin CLI shell around :func:`gapfill.discover.run.discover`.

Imported by :mod:`gapfill.cli` when the command is asked for; it registers itself
on the main group.
"""

from __future__ import annotations

import asyncio
import time

import click

from gapfill.cli import (
    Ctx,
    cli,
    contract_option,
    given_as,
    node_chain_option,
    picked_by_node,
    resolve_targets,
    rpc_settings,
    rpc_timeout_option,
    served,
    tell,
    unserved,
)
from gapfill.cli_types import int_range
from gapfill.discover.coverage import METHODS, Interval, coverage_report, fmt_ranges, size
from gapfill.discover.explorer import (
    ENV_KEY,
    ENV_URL,
    KEY_CHECK,
    NO_EXPLORER,
    URL_CHECK,
    ExplorerConfig,
    key_hint,
    url_hint,
)
from gapfill.discover.run import DEFAULT_CONFIRMATIONS, DiscoverProgress, DiscoverSummary, check_methods
from gapfill.discover.run import discover as run_discover
from gapfill.errors import ConfigError, FixFirst, GapfillError, UnknownContractError
from gapfill.model import Contract
from gapfill.redact import ExplorerUrl
from gapfill.rpc.config import RpcSettings
from gapfill.settings import DEFAULT_CONFIG_NAME
from gapfill.store import Store
from gapfill.wording import counted

_pass_ctx = click.make_pass_decorator(Ctx)
PROGRESS_EVERY_S = 1.0


def _methods(_: click.Context, __: click.Parameter, values: tuple[str, ...]) -> list[str] | None:
    """``--method a,b --method c`` as one list (None: the default set, ``--method`` not
    given); an unknown method, or a ``--method`` naming none (``--method ''``, an unset
    variable in a script), is wrong usage (exit 2), said before any database or node is
    opened."""
    for v in values:
        if not any(m.strip() for m in v.split(",")):
            raise click.BadParameter(f"{v!r} names no method: give some of {', '.join(METHODS)}, "
                                     "or leave --method out for the default set")  # fmt: skip
    out = [m.strip() for v in values for m in v.split(",") if m.strip()]
    if not out:
        return None
    try:
        return list(check_methods(out))
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None


def _explorer(ctx: Ctx, url: str | None, key: str | None,
              methods: list[str] | None) -> ExplorerConfig | None:  # fmt: skip
    """The explorer the options, the environment or the config file's [explorer] name,
    its messages naming where its URL and key came from; ``--method explorer`` needs one."""
    click_ctx = click.get_current_context()
    in_file = {k: f"[explorer] {k} in {ctx.file.path}" if ctx.file.explorer.get(k) else None
               for k in ("url", "key")}  # fmt: skip
    url_check = given_as(click_ctx, "explorer_url", url, "--explorer-url", ENV_URL, in_file["url"])
    key_check = given_as(click_ctx, "explorer_key", key, "--explorer-key", ENV_KEY, in_file["key"])
    url = url or ctx.file.explorer.get("url")
    key = key or ctx.file.explorer.get("key")
    # Whatever quotes them from here on (a library's error text or log record with the
    # request's URL and its apikey=) has them masked.
    # Marked an explorer's: its path shows (a typo in it), its query's key does not.
    ctx.hide(ExplorerUrl(str(url)) if url else None, key=str(key) if key else None)
    # The file read, else the one that would be: ./gapfill.toml.
    config_path = ctx.file.path or DEFAULT_CONFIG_NAME
    if not url:
        hint = url_hint(config_path)
        if key:
            raise ConfigError(f"an explorer key is set ({key_check}) but no URL: {hint}")
        if methods and "explorer" in (m.lower() for m in methods):
            raise ConfigError(f"{NO_EXPLORER}: {hint}")  # before any database or node is opened
        return None
    return ExplorerConfig(str(url), str(key) if key else None, url_check=url_check or URL_CHECK,
                          key_check=key_check or KEY_CHECK, key_hint=key_hint(config_path))  # fmt: skip


class _Printer:
    """Plain progress lines on stderr, at most one a second (plus the first and last); it
    keeps every contract's last progress, which counts what its commits wrote."""

    def __init__(self, rescan: bool = False) -> None:
        self._rescan = rescan
        self._last = 0.0
        self._latest: dict[tuple[int, str], DiscoverProgress] = {}
        self._said: dict[tuple[int, str], str] = {}  # each contract's last line
        self._scanning: tuple[int, str] | None = None  # the contract being scanned, if any

    def _again(self, fix: str | None = None) -> str:
        """What to do next: ``fix`` first, when running the same command again cannot pass
        without it (a refused key), then the rerun (a rescan ignores coverage, so running it
        again starts over rather than resuming)."""
        first = f"{fix}, then " if fix else ""
        return (f"{first}run the same command again to rescan from the start" if self._rescan
                else f"{first}run the same command again to continue where it stopped")  # fmt: skip

    def _blocks_kept(self, p: DiscoverProgress) -> str:
        """The blocks a contract's commits kept, per method where they differ, and the new
        refs found in them (``p.scanned`` is not empty)."""
        by_spans: dict[tuple[Interval, ...], list[str]] = {}
        for method, spans in p.scanned:
            by_spans.setdefault(spans, []).append(method)
        # Methods that scanned the same blocks (the shared chunks of logs,blocks) are said
        # once, and named only when another method scanned other blocks (or none).
        named = len(by_spans) > 1 or len(p.scanned) < len(p.methods)
        blocks = " and ".join(f"{counted(size(spans), 'block')} ({fmt_ranges(spans)})"
                              + (f" with {','.join(methods)}" if named else "")
                              for spans, methods in by_spans.items())  # fmt: skip
        were = "was" if len(by_spans) == 1 and size(next(iter(by_spans))) == 1 else "were"
        found = (f", with the {counted(p.new_refs, 'new ref')} found in them" if p.new_refs
                 else " (no new ref in them)")  # fmt: skip
        scanned = "rescanned" if self._rescan else "scanned"
        return f"{blocks} of {p.contract} {were} {scanned} and kept{found}"

    def kept(self) -> str:
        """What the commits reported so far kept, per contract and by block range, as
        Ctrl+C says it (the summaries of contracts done are not printed then)."""
        done = [p for p in self._latest.values() if p.scanned]
        if not done:
            return "nothing was written; run the same command again"
        return f"{'; '.join(self._blocks_kept(p) for p in done)}: {self._again()}"

    def kept_at_failure(self, fix: str | None = None) -> str | None:
        """What the contract being scanned when an error ended discovery kept, and what to do
        next (``fix`` first, when running the same command again cannot pass without it: a
        refused key); None when no scan was under way (the error came before one, or
        between two)."""
        if self._scanning is None:
            return None
        p = self._latest[self._scanning]
        if not p.scanned:
            first = f"{fix}, then " if fix else ""
            return (f"no chunk of {p.contract} was finished, so nothing was kept: {first}run the same "
                    "command again")  # fmt: skip
        return f"{self._blocks_kept(p)}: {self._again(fix)}"

    def __call__(self, p: DiscoverProgress) -> None:
        key = (p.chain_id, p.contract)
        self._latest[key] = p
        if p.event == "start":
            self._scanning = key if p.from_block is not None else None
        elif p.event == "done":
            self._scanning = None
        now = time.monotonic()
        if p.event == "chunk" and now - self._last < PROGRESS_EVERY_S:
            return
        # Each method scans the blocks it still needs: with several, count block scans.
        unit = "blocks" if len(p.methods) < 2 else "block scans"
        if p.event == "start":
            if p.from_block is None:
                text = "nothing to scan"  # the summary's last line says why
            else:
                text = (f"scanning blocks {p.from_block}-{p.to_block} with {','.join(p.methods)}: "
                        f"{p.blocks_total:,} {unit} to do")  # fmt: skip
        else:
            pct = 100.0 * p.blocks_done / p.blocks_total if p.blocks_total else 100.0
            text = (f"{p.blocks_done:,}/{p.blocks_total:,} {unit} ({pct:.0f}%), "
                    f"{counted(p.refs_found, 'ref')} found, {p.new_refs:,} new")  # fmt: skip
        if p.event == "done" and (self._said.get(key) == text or not p.blocks_total):
            return  # the last chunk's line said it already, or the start line that none was to do
        self._last = now
        self._said[key] = text
        click.echo(f"discover {p.contract}: {text}", err=True)


@click.command("discover")
@contract_option
@node_chain_option
@click.option("--from-block", type=int_range(0), default=None,
              help="First block [default: the contract's start block, or 0].")
@click.option("--to-block", type=int_range(0), default=None,
              help="Last block [default and cap: latest - confirmations].")
@click.option("--confirmations", type=int_range(0), default=DEFAULT_CONFIRMATIONS,
              show_default=True, help="Blocks below the head left alone (reorg safety).")
@click.option("--method", "methods", multiple=True, metavar="LIST", callback=_methods,
              help=f"Comma-separated methods out of {','.join(METHODS)} [default: trace if the "
                   "node has it, else logs,explorer if an explorer is configured, else logs,blocks].")
@click.option("--rescan", is_flag=True,
              help="Scan blocks again even where coverage says they are done (after a reorg deeper "
                   "than --confirmations, a new --method, or a provider that missed logs). Refs "
                   "already stored stay and new ones are added (the summary counts them): nothing is "
                   "deleted. Without --from-block/--to-block: every block scanned before, and the "
                   "rest up to latest - confirmations.")
@click.option("--explorer-url", envvar=ENV_URL, show_envvar=True, default=None,
              help="Etherscan-compatible API, e.g. https://api.etherscan.io/v2/api.")
@click.option("--explorer-key", envvar=ENV_KEY, show_envvar=True, default=None,
              help="API key for the explorer (never printed).")
@rpc_timeout_option
@_pass_ctx
def discover(ctx: Ctx, contract: str | None, chain_id: int | None, from_block: int | None,
             to_block: int | None, confirmations: int, methods: list[str] | None, rescan: bool,
             explorer_url: str | None, explorer_key: str | None, rpc_timeout_s: float) -> None:  # fmt: skip
    """Find the transactions of tracked contracts on chain and record refs and coverage.

    Without a range, each method scans every block up to latest - confirmations that it,
    or a method seeing as much, has not scanned yet; blocks skipped as already scanned
    are named, and --rescan scans them again.
    Contracts on a chain that no endpoint serves are named and skipped (exit 3).
    """
    # Until the scan starts (the store's opening, the targets, a slow node's first answer),
    # a Ctrl+C said a bare "interrupted".
    ctx.kept = lambda: "nothing was written; run the same command again"
    if from_block is not None and to_block is not None and from_block > to_block:
        raise click.UsageError(f"--from-block {from_block} is above --to-block {to_block}: swap them")
    explorer = _explorer(ctx, explorer_url, explorer_key, methods)
    store = ctx.store()
    targets = resolve_targets(store, contract, chain_id, node_picks=True)  # the probe in _run picks
    printer = _Printer(rescan)
    ctx.kept = printer.kept
    summaries: list[DiscoverSummary] = []
    try:
        skipped = asyncio.run(_run(ctx, store, targets, methods, from_block, to_block, confirmations,
                                   rescan, explorer, rpc_settings(rpc_timeout_s), printer, summaries,
                                   one_address=contract is not None))  # fmt: skip
    except GapfillError as exc:
        # The node died or kept failing mid-scan: what finished is committed (a rerun
        # resumes), and the user is told so. Contracts scanned in full first get their
        # summary as usual; the one under way, a clause of the error's sentence.
        for s in summaries:
            click.echo(s.text)
        if isinstance(exc, UnknownContractError):
            # Removed while it was scanned (`gapfill contract remove`): what its commits kept
            # went with it, and a rerun can only fail on it ("not tracked"): the store's
            # sentence alone, with neither what was kept nor the rerun.
            raise
        # An error that running again cannot pass until the user fixes something (a key the
        # node or the explorer refuses, an explorer's HTTP error): what to check is the
        # sentence's end, then the rerun, not "run the same command again" alone.
        refused = exc if isinstance(exc, FixFirst) else None
        kept = printer.kept_at_failure(refused.fix if refused else None)
        if kept is None:
            raise
        failed = GapfillError(f"{refused.what if refused else exc}; {kept}")
        failed.exit_code = exc.exit_code
        raise failed from exc
    for s in summaries:
        click.echo(s.text)
        report = coverage_report(store, s.chain_id, s.contract, s.safe_head)
        click.echo(f"{s.contract}: coverage {report['summary']}")
    for limit in dict.fromkeys(s.limit for s in summaries if s.limit):  # each said once
        tell(limit)
    for sentence in unserved(skipped, ctx.endpoints_check()):
        tell(sentence)
    if skipped:
        raise SystemExit(3)  # finished, with work left that these endpoints cannot do


async def _run(ctx: Ctx, store: Store, targets: list[Contract], methods: list[str] | None,
               from_block: int | None, to_block: int | None, confirmations: int, rescan: bool,
               explorer: ExplorerConfig | None, rpc: RpcSettings, printer: _Printer,
               out: list[DiscoverSummary], one_address: bool) -> list[Contract]:  # fmt: skip
    """Discover the targets on the endpoints' chain, adding their summaries to ``out`` as
    each ends (an error keeps those before it); returns the targets on other chains, left
    alone (none when ``one_address``: see :func:`served`)."""
    from gapfill.engine.session import code_at, make_client, no_code

    chains = {c.chain_id for c in targets}
    # Targets all on one chain: a node of another chain is the one-sentence error of the
    # start-up check (nothing can be done). Otherwise the node's chain picks the targets.
    expected = next(iter(chains)) if len(chains) == 1 else None
    async with make_client(ctx.endpoints(), expected_chain_id=expected, settings=rpc) as client:
        node_chain = await client.probe(tell)  # discovery finds it asked
        on_chain, skipped = served(targets, node_chain, client.check, one_address)
        if one_address and len(chains) > 1:
            tell(picked_by_node(targets, node_chain))
        for c in on_chain:
            out.append(await run_discover(
                store, client, c, methods=methods, from_block=from_block, to_block=to_block,
                confirmations=confirmations, explorer=explorer, on_progress=printer, rescan=rescan,
            ))  # fmt: skip
            if not any(out[-1].refs_found.values()) and out[-1].blocks_scanned:
                # A mistyped address (an EOA) finds nothing, and `contract add --chain-id`
                # never asked the node what is there: said here, where the 0 comes out.
                warning = no_code(c.address, c.chain_id, await code_at(client, c.address))
                if warning:
                    tell(warning)
    return skipped


cli.add_command(discover)
