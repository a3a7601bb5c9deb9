"""The command line: parse flags and environment, call the library, render. No logic here.

Exit codes: 0 success, 1 an error the user can act on, 2 wrong usage (click),
3 finished with failures (see `gapfill failures`) or with contracts skipped because no
endpoint serves their chain, 130 interrupted, 141 output pipe closed.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import dataclasses
import importlib
import io
import logging
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn, TextIO, TypeVar

import click
import orjson

from gapfill import __version__
from gapfill.cli_types import Age, FiniteFloatRange, int_range, said_age
from gapfill.errors import ConfigError, GapfillError, Interrupted, RpcError, UnknownContractError
from gapfill.model import Contract, ContractStatus, Ref
from gapfill.redact import DbUrl, Secret, redact_text
from gapfill.rpc.config import FLAG_CHECK, RpcSettings, calls_metered, checks, metered_rate, parse_rpc_urls
from gapfill.settings import ENRICH_RPC_BATCH, EndpointSetting, FileConfig, load_config, resolve_endpoints
from gapfill.signals import (
    CommitUnknown,
    HeldSignals,
    HoldFromCommit,
    keep_lost_interrupts,
    run_interruptible,
)
from gapfill.store import DB_CHECK, DEFAULT_DB_URL, Store, open_store
from gapfill.validate import parse_address
from gapfill.wording import counted

if TYPE_CHECKING:
    from gapfill.engine.session import CodeAt

log = logging.getLogger("gapfill")


@dataclass
class Ctx:
    """What the global options resolved to."""

    db_url: str
    rpc_urls: tuple[str, ...]
    rps: float | None
    file: FileConfig
    verbose: int
    _store: Store | None = None
    #: What Ctrl+C would leave written, said after "interrupted: " (a command that writes
    #: keeps it true as it goes; one that opens the database read-only says it wrote
    #: nothing); None says ``_NOTHING_SAID``.
    kept: Callable[[], str] | None = None
    _store_read_only: bool = False
    #: Where ``rpc_urls`` came from, as a message's "check ..." names it.
    rpc_check: str = FLAG_CHECK
    #: Where ``db_url`` came from, named so: ``--db``, ``GAPFILL_DB`` or the config file's key.
    db_check: str = DB_CHECK
    #: Secrets a command adds to those of the global options (an explorer's URL and key).
    more_secrets: list[str] = field(default_factory=list)
    #: The handler that masks the secrets in log records, told of the ones a command adds.
    log_handler: _StderrLog | None = None
    #: Positions in :meth:`endpoints` of those a check before a run left out (hung,
    #: unreachable): the run goes without them, rather than say so and wait for them again.
    left_out: tuple[int, ...] = ()

    def store(self, create: bool = False, read_only: bool = False) -> Store:
        """The database; only commands that add to it (``create``) may start a new SQLite
        file: a mistyped --db must not leave empty databases behind. Commands that only
        read (``read_only``) neither create nor change the schema, so a read-only file or
        role can run them."""
        if self._store is not None and self._store_read_only and not read_only:
            self.close()
        if self._store is None:
            if self.db_url.lower().startswith("sqlite:"):
                from gapfill.store.sqlite import sqlite_path

                path = sqlite_path(self.db_url)
                if path == ":memory:":
                    # Fine for the library's own tests; from the command line everything
                    # written would vanish when the command ends, after it said "tracking".
                    raise ConfigError(
                        "an in-memory SQLite database (:memory:) is gone when the command ends: "
                        f"set {self.db_check} to a file, such as sqlite:///gapfill.db"
                    )
                if not create and not self.database_exists():
                    raise ConfigError(
                        f"the SQLite database {path} does not exist: check {self.db_check}, "
                        "or start one with `gapfill contract add ADDRESS`"
                    )
            if read_only and self.kept is None:  # status, runs, failures, dry runs: a Ctrl+C
                # while they wait (a slow node's head) said a bare "interrupted"
                self.kept = lambda: "nothing was written (this command only reads); run it again"
            self._store = open_store(self.db_url, read_only=read_only, notice=tell, check=self.db_check,
                                     app=_command_name())  # fmt: skip
            self._store_read_only = read_only
        return self._store

    def database_exists(self) -> bool:
        """False for a SQLite file not made yet (a PostgreSQL database is not made here)."""
        if not self.db_url.lower().startswith("sqlite:"):
            return True
        from gapfill.store.sqlite import sqlite_path

        return os.path.exists(sqlite_path(self.db_url))

    def endpoints(self, max_batch: int | None = None, required: bool = True) -> list[EndpointSetting]:
        """The endpoints, each checked (no network); none is an error when ``required``."""
        eps = resolve_endpoints(self.rpc_urls, self.rps, max_batch, self.file, self.rpc_check)
        if not eps and required:
            raise ConfigError(
                "no RPC endpoint is set: pass --rpc-url URL, set ETH_RPC_URL, "
                "or add [[endpoints]] to gapfill.toml"
            )
        from gapfill.rpc.config import EndpointConfig

        for e in eps:  # a malformed URL is said now, before a run row or a plan is written
            EndpointConfig(e.url, e.rps, check=e.check)
        return eps

    def endpoints_check(self) -> str:
        """Where the endpoints came from, as a message's "check ..." names it: ``--rpc-url``,
        ``ETH_RPC_URL`` or the config file's key."""
        return checks(resolve_endpoints(self.rpc_urls, None, None, self.file, self.rpc_check))

    def secrets(self) -> list[str]:
        """The URLs whose secrets no message may show. A comma-separated ``--rpc-url`` is
        several URLs: taken whole, the second one's host read as a secret path segment of
        the first, and "the RPC node at http://***/" hid which endpoint was meant. The
        database URL is marked as one: its password is hidden however it is written."""
        return [DbUrl(self.db_url), *parse_rpc_urls(self.rpc_urls), *(e.url for e in self.file.endpoints),
                *self.more_secrets]  # fmt: skip

    def hide(self, *urls: str | None, key: str | None = None) -> None:
        """Add ``urls`` and an API ``key`` (given alone) to what no message or log line may
        show, for the rest of the command."""
        self.more_secrets += [u for u in urls if u] + ([Secret(key)] if key else [])
        if self.log_handler is not None:
            self.log_handler.secrets = self.secrets()

    def take_store(self) -> Store | None:
        """The open database, handed to the caller, who closes it (None: none is open, or
        only read-only); the command holds it no longer."""
        if self._store_read_only:
            self.close()
        store, self._store = self._store, None
        return store

    def close(self) -> None:
        store, self._store = self._store, None  # closed once, even if cut short
        if store is not None:
            store.close()


def fail(ctx: Ctx | None, exc: BaseException) -> NoReturn:
    secrets = ctx.secrets() if ctx else []
    msg = redact_text(str(exc), *secrets)
    click.echo(f"error: {msg}", err=True)
    raise SystemExit(getattr(exc, "exit_code", 1))


#: Commands in modules of their own, imported when asked for: `discover` pulls in the
#: discovery engine and `demo` the chain generator, which no other command needs.
_LAZY_COMMANDS = {"demo": "gapfill.cli_demo", "discover": "gapfill.cli_discover"}
#: Their help's first sentence, for ``gapfill --help``, which lists them without importing
#: them (that took ~0.3 s); a test keeps each equal to the command's own.
LAZY_SHORT_HELP = {
    "demo": "Run the whole job on a local anvil chain: discover, status, enrich, decoded rows.",
    "discover": "Find the transactions of tracked contracts on chain and record refs and coverage.",
}


class GapfillGroup(click.Group):
    """Turns gapfill's errors into one sentence and an exit code, never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(map(len, names), default=0)  # as click's own
        rows = []
        for name in names:
            if name not in self.commands and name in LAZY_SHORT_HELP:
                rows.append((name, click.Command(name, help=LAZY_SHORT_HELP[name]).get_short_help_str(limit)))
                continue
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _LAZY_COMMANDS.get(cmd_name)
        if module is not None and cmd_name not in self.commands:
            importlib.import_module(module)  # registers the command on `cli`
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        # `timeout`, systemd and `docker stop` send SIGTERM: every command stops as on Ctrl+C
        # (enrich's modes install their own handlers on top of this one).
        old_term = _term_as_interrupt()
        keep_lost_interrupts()  # a Ctrl+C a finalizer swallowed ends the next wait on a node
        # Read by the group's callback, once click has moved the subcommand's arguments away.
        ctx.meta["gapfill.help_asked"] = any(a in ("-h", "--help") for a in ctx.args)
        try:
            try:
                result = super().invoke(ctx)
            except BaseException:
                # The command's own outcome is said below: a Ctrl+C as the database closes
                # must not say "after the command ended" in its place.
                _close_held(ctx, ended=False)
                raise
            _close_held(ctx)
            return result
        except GapfillError as exc:
            fail(ctx.find_object(Ctx), exc)
        except CommitUnknown:
            click.echo("interrupted as the database committed: whether what this command wrote is "
                       "stored is not known; `gapfill status` shows what is, and running the same "
                       "command again is safe", err=True)  # fmt: skip
            raise SystemExit(130) from None
        except KeyboardInterrupt:
            obj = ctx.find_object(Ctx)
            if obj is None:  # still importing the command (discover, demo): nothing began
                kept = "interrupted before the command started: nothing was done; run it again"
            else:  # (each command that writes says what it kept; with none set, no more)
                kept = f"interrupted: {obj.kept() if obj.kept is not None else _NOTHING_SAID}"
            click.echo(kept, err=True)
            raise SystemExit(130) from None
        except click.exceptions.NoSuchOption as exc:
            raise _name_the_global_option(ctx, exc) from None
        except click.exceptions.Abort:  # a prompt met end of input or Ctrl+C
            click.echo("aborted: nothing was changed", err=True)
            raise SystemExit(1) from None
        except BrokenPipeError as exc:
            if not _stdout_gone():  # another pipe (a worker's, say): a real error
                _internal_error(ctx, exc)
            # `gapfill failures | head`: the reader has what it wanted. End quietly, as a
            # command killed by SIGPIPE would (141), and keep the final flush from failing.
            _silence_gone_streams()
            raise SystemExit(141) from None
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if isinstance(exc, OSError) and _stdout_refuses(exc):
                _output_refused(ctx, exc)
            _internal_error(ctx, exc)
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)


def _close_held(ctx: click.Context, ended: bool = True) -> None:
    """Close the command's database (SQLite checkpoints its WAL: ~0.2 s after an import of 1M
    refs) holding a first Ctrl+C or SIGTERM, as a run's end holds it: the command has done
    and said what it did, and its exit code stands. Closed by click as its context ended, it
    took one as "Aborted!" and exit 1. A second stops the command at once (130), said so
    where the command ``ended``; where it did not (an error or an interrupt on its way to
    be said), that outcome is said instead."""
    obj = ctx.find_object(Ctx)
    if obj is None:
        return
    end = HeldSignals()
    end.hold()
    try:
        obj.close()
    except KeyboardInterrupt:
        if not ended:
            return
        tell("interrupted as the database closed, after the command ended: what it committed is kept")
        raise SystemExit(130) from None
    finally:
        end.restore()


def _name_the_global_option(ctx: click.Context,
                            exc: click.exceptions.NoSuchOption) -> click.exceptions.NoSuchOption:  # fmt: skip
    """``gapfill worker --rpc-url URL``: an option of gapfill itself given after the command
    was "No such option '--rpc-url'. Did you mean '--rpc-timeout'?", as if it did not exist.
    Say where it goes instead (the usage error, exit 2, stays)."""
    name = exc.option_name.split("=", 1)[0]
    own = {o for p in ctx.command.params for o in (*p.opts, *p.secondary_opts)}
    path = exc.ctx.command_path.split(" ", 1) if exc.ctx is not None else []
    sub = path[1] if len(path) == 2 else None  # "contract list": the words after gapfill
    if name not in own or sub is None:
        return exc
    return click.exceptions.NoSuchOption(
        exc.option_name, ctx=exc.ctx,
        message=f"{name} is an option of gapfill itself, not of `{sub}`: put it before the command "
                f"(gapfill {name} ... {sub})")  # fmt: skip


def _internal_error(ctx: click.Context, exc: Exception) -> NoReturn:
    """A bug: one sentence asking for a report (the traceback with -v, redacted)."""
    obj = ctx.find_object(Ctx)
    if obj is not None and obj.verbose:
        click.echo(redact_text(traceback.format_exc(), *obj.secrets()), err=True)
    fail(obj, RuntimeError(
        f"internal error ({type(exc).__name__}: {exc}); rerun with -v for details and report it"
    ))  # fmt: skip


def _stdout_refuses(exc: OSError) -> bool:
    """Whether ``exc`` is standard output's refusal of what the command wrote to it (a file
    on a full disk, past a file-size limit)."""
    return any(raw.refused is exc for raw in _whole_stdout)


def _output_refused(ctx: click.Context, exc: OSError) -> NoReturn:
    """The command's output could not be written (`gapfill failures > f` on a full disk): the
    user's to fix, not a bug to report (it said "internal error (OSError: [Errno 28] ...)")."""
    with contextlib.suppress(OSError, ValueError):  # the final flush must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    fail(ctx.find_object(Ctx), GapfillError(
        f"could not write the output to standard output ({exc.strerror or exc}): free space where it "
        "goes (or raise its file-size limit), or send it elsewhere, then run the command again"
    ))  # fmt: skip


def _stdout_gone(stream: Any = None) -> bool:
    """Whether standard output (or ``stream``) is a pipe whose reader has left (poll reports
    an error)."""
    try:
        poller = select.poll()
        poller.register((stream or sys.stdout).fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_gone_streams() -> None:
    """Point standard output and error, where their reader has left, at /dev/null: the
    lines still to come (and the interpreter's final flush) must not fail again."""
    for stream in (sys.stdout, sys.stderr):
        if _stdout_gone(stream):
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _term_as_interrupt() -> Any:
    """Make SIGTERM raise KeyboardInterrupt; returns the handler to put back (None outside
    the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _command_name() -> str:
    """The command running (``contract remove``), without the program's name."""
    names: list[str] = []
    ctx = click.get_current_context(silent=True)
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(reversed(names))


def tell(text: str) -> None:
    """A line for the user while a command works (not its output): standard error."""
    click.echo(text, err=True)


class _StderrLog(logging.StreamHandler[TextIO]):
    """Log records on standard error as it is when each is written, with the secrets of
    :attr:`secrets` (the command's URLs) masked.

    Standard error as it is *now*: on a terminal, rich's live view swaps ``sys.stderr`` for
    a proxy that prints above the view, and a handler holding the stream it started with
    wrote under the view, breaking it. Worker processes send their records to their
    coordinator (``gapfill.engine.run``), so they come here too, whole lines each.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.secrets: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr  # under the handler's lock
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        # Modules redact the URLs they log; this is the net for what they cannot know of
        # (a driver's message quoting a connection string, another library's records).
        return redact_text(super().format(record), *self.secrets)


def _log_to_stderr(verbose: int) -> _StderrLog:
    """Log at ``-v`` (INFO) or ``-vv`` (DEBUG), else errors only, to standard error; returns
    the handler (unused where logging was set up already: a test's)."""
    handler = _StderrLog()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.ERROR
    logging.basicConfig(
        # Quiet by default: what a user must know arrives as one sentence or a progress
        # event; -v shows decisions, batches with timings, retries, set-aside endpoints and
        # other warnings; -vv every HTTP request, SQL timings, lease renewals.
        level=max(level, logging.INFO),
        handlers=[handler],
    )
    # -vv is gapfill's debugging (every request, lease renewal, SQL timing), not asyncio's
    # or a driver's, whose DEBUG records would bury it: only gapfill's loggers go below INFO
    # (worker processes do the same: engine.run._log_through).
    # (NOTSET below -vv: gapfill's loggers follow the root's level, as they did.)
    logging.getLogger("gapfill").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.NOTSET)
    return handler


def _is_tty() -> bool:
    return sys.stdout.isatty() and os.environ.get("TERM") != "dumb"


@click.group(cls=GapfillGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "db_url", envvar="GAPFILL_DB", show_envvar=True, default=None,
              help=f"Database URL: sqlite:///file.db or postgresql://... [default: {DEFAULT_DB_URL}]")
@click.option("--rpc-url", "rpc_urls", envvar="ETH_RPC_URL", show_envvar=True, multiple=True,
              help="JSON-RPC endpoint; repeat it or separate with commas for several.")
@click.option("--rps", type=FiniteFloatRange(min=0.001), envvar="GAPFILL_RPS", show_envvar=True,
              default=None, help="Calls per second per endpoint, shared by all processes of this host.")
@click.option("--config", "config_file", envvar="GAPFILL_CONFIG", show_envvar=True, default=None,
              help="TOML config file [default: ./gapfill.toml when present; '' for none].")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(__version__, prog_name="gapfill")
@click.pass_context
def cli(ctx: click.Context, db_url: str | None, rpc_urls: tuple[str, ...], rps: float | None,
        config_file: str | None, verbose: int) -> None:  # fmt: skip
    """Find the transactions missing from your EVM database and fill them in from JSON-RPC nodes."""
    log_handler = _log_to_stderr(verbose)
    # A subcommand's --help must work whatever the config file says (it is what one reads
    # to fix it): then a broken file is left unread.
    help_asked = bool(ctx.meta.get("gapfill.help_asked"))
    try:
        from_env = ctx.get_parameter_source("config_file") is click.core.ParameterSource.ENVIRONMENT
        file = load_config(config_file, "GAPFILL_CONFIG" if from_env else "--config")
    except GapfillError as exc:
        if not help_asked:
            fail(None, exc)
        file = FileConfig()
    obj = Ctx(db_url or file.db or DEFAULT_DB_URL, rpc_urls, rps, file, verbose)
    log_handler.secrets = obj.secrets()
    obj.log_handler = log_handler
    source = ctx.get_parameter_source("rpc_urls")
    if source is click.core.ParameterSource.COMMANDLINE:  # hints name what the user gave
        obj.rpc_check = "--rpc-url"
    elif source is click.core.ParameterSource.ENVIRONMENT:
        obj.rpc_check = "ETH_RPC_URL"
    obj.db_check = given_as(ctx, "db_url", db_url, "--db", "GAPFILL_DB",
                            f"the db key of {file.path}" if file.db else None) or obj.db_check
    ctx.obj = obj
    if file.enrich:
        # The file's [enrich] table gives `enrich` and `worker` their defaults; flags win.
        try:
            defaults = enrich_defaults(file)
        except GapfillError as exc:
            if not help_asked:
                fail(None, exc)
            defaults = {}
        ctx.default_map = {"enrich": defaults,
                           "worker": {k: v for k, v in defaults.items()
                                      if k not in ("mode", "batch_size")}}  # fmt: skip
        if "rpc_timeout_s" in defaults:
            # How long the node may take is the node's: the other commands that ask it
            # something take it too.
            node = {"rpc_timeout_s": defaults["rpc_timeout_s"]}
            ctx.default_map.update({"discover": node, "contract": {"add": node}, "status": node})
    ctx.call_on_close(obj.close)


pass_ctx = click.make_pass_decorator(Ctx)
#: What a Ctrl+C says of a command that set no ``Ctx.kept``: it wrote nothing, or committed
#: what it wrote whole.
_NOTHING_SAID = "what the command committed before it is kept; run the same command again"
#: `enrich` parameters a config file's [enrich] table cannot set: they pick what to do, not how.
_NOT_IN_CONFIG = frozenset({"contract", "chain_id", "dry_run", "retry_failed"})
#: Former names of [enrich] keys, still read: ``plan_shape`` is ``plan``.
_CONFIG_ALIASES = {"plan_shape": "plan"}


def enrich_defaults(file: FileConfig) -> dict[str, Any]:
    """The config file's [enrich] table, each value checked by the type of the `enrich` option it sets.

    Checked here, when the file is read, so that a bad value is reported as the file's
    (exit 1, naming it) rather than by click as a bad flag the user never typed (exit 2).
    """
    params = {p.name: p for p in enrich.params if p.name and p.name not in _NOT_IN_CONFIG}
    where = f"config file {file.path}: [enrich]"
    unknown = sorted(k for k in file.enrich if _CONFIG_ALIASES.get(k, k) not in params)
    if unknown:
        raise ConfigError(f"{where} has no setting {', '.join(unknown)}: use {', '.join(sorted(params))}")
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in file.enrich.items():
        name = _CONFIG_ALIASES.get(key, key)
        if name in given_as:
            raise ConfigError(f"{where} sets {name} twice (as {given_as[name]} and {key}): keep one of them")
        given_as[name] = key
        param = params[name]
        problem = _toml_type_problem(param.type, value)
        if problem is None:
            try:
                out[name] = param.type.convert(value, param, None)
            except click.BadParameter as exc:
                problem = exc.message.rstrip(".")
        if problem is not None:
            raise ConfigError(f"[enrich] {key}: {problem}: fix it in {file.path}")
    return out


def _toml_type_problem(kind: click.ParamType[Any], value: Any) -> str | None:
    """What is wrong with a TOML value's own type, which click would coerce (4.5 to 4, true to 1)."""
    # As the file spells it: TOML's true is Python's True.
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    if isinstance(kind, click.types.BoolParamType):
        return None if isinstance(value, bool) else f"{shown} is not true or false"
    if isinstance(kind, click.types.IntParamType):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"{shown} is not a whole number"
    if isinstance(kind, click.types.FloatParamType):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"{shown} is not a number"
    return None


def address_arg(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    """A malformed address is wrong usage (exit 2), said in one sentence."""
    if value is None:
        return None
    try:
        return parse_address(value)
    except GapfillError as exc:
        raise click.BadParameter(str(exc)) from None


def one_address(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> str | None:
    """``--contract`` given at most once: click would silently keep only the last."""
    if len(values) > 1:
        raise click.BadParameter("give it once (or leave it out for every tracked contract)")
    return address_arg(ctx, param, values[0] if values else None)


_Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
contract_option: _Decorator = click.option("--contract", "contract", callback=one_address, multiple=True,
                               help="Contract address (default: every tracked contract).")  # fmt: skip
chain_option: _Decorator = click.option(
    "--chain-id", type=int_range(1), default=None,
    help="Chain id; needed only if the address is tracked on several chains.",
)  # fmt: skip
#: ``chain_option`` of the commands that ask the endpoints their chain (see resolve_targets).
node_chain_option: _Decorator = click.option(
    "--chain-id", type=int_range(1), default=None,
    help="Chain id; needed only if the address is tracked on several chains and no RPC endpoint "
         "is given (the endpoints' chain picks).",
)  # fmt: skip
#: Every command that asks the node something has it: a silent node's sentence says
#: "raise --rpc-timeout", which must be an option of the command that said it.
rpc_timeout_option: _Decorator = click.option(
    "--rpc-timeout", "rpc_timeout_s", type=FiniteFloatRange(min=0.1), default=30.0, show_default=True,
    help="Seconds to wait for an RPC response before retrying it.",
)  # fmt: skip


def rpc_settings(rpc_timeout_s: float | None) -> RpcSettings:
    """The RPC settings of the running command; "raise ..." names the config file's
    rpc_timeout_s when the file gave it."""
    if rpc_timeout_s is None:
        return RpcSettings()
    click_ctx = click.get_current_context(silent=True)
    obj = click_ctx.find_object(Ctx) if click_ctx is not None else None
    in_file = f"[enrich] rpc_timeout_s in {obj.file.path}" if obj and obj.file.path else None
    check = given_as(click_ctx, "rpc_timeout_s", rpc_timeout_s, "--rpc-timeout", None, in_file)
    return RpcSettings(read_timeout_s=rpc_timeout_s, timeout_check=check or "--rpc-timeout")


def given_as(click_ctx: click.Context | None, param: str, value: object, flag: str, env: str | None,
             in_file: str | None) -> str | None:  # fmt: skip
    """Where a parameter's ``value`` came from, as a message's "check ..." names it: ``flag``
    when typed, ``env`` from the environment, else ``in_file`` (the config file's key,
    None when the file does not set it), None when none of them gave it."""
    source = click_ctx.get_parameter_source(param) if click_ctx is not None else None
    if value and source is click.core.ParameterSource.COMMANDLINE:
        return flag
    if value and source is click.core.ParameterSource.ENVIRONMENT:
        return env or flag
    if source is click.core.ParameterSource.DEFAULT_MAP or not value:
        return in_file
    return None


#: What `status`, `contract list` and a command that needs a contract say of a database
#: that tracks none.
NOTHING_TRACKED = "no contract is tracked yet: add one with `gapfill contract add ADDRESS`"


def _chains(contracts: Iterable[Contract]) -> str:
    """The chains of ``contracts``, named: "chain 1", "chains 1, 5"."""
    ids = sorted({c.chain_id for c in contracts})
    return ("chain " if len(ids) == 1 else "chains ") + ", ".join(str(c) for c in ids)


def resolve_targets(store: Store, contract: str | None, chain_id: int | None,
                    node_picks: bool = False) -> list[Contract]:  # fmt: skip
    """The tracked contracts a command works on. ``node_picks``: the command asks its RPC
    endpoints their chain, so an address tracked on several chains, given without
    ``chain_id``, is each of them (``served(..., one_address=True)`` keeps the one the
    endpoints serve) instead of the error that asks for --chain-id."""
    if contract is not None:
        if node_picks and chain_id is None:
            found = [c for c in store.list_contracts() if c.address == contract]
            if len(found) > 1:
                return found
        return [store.get_contract(contract, chain_id)]
    tracked = store.list_contracts()
    found = [c for c in tracked if chain_id is None or c.chain_id == chain_id]
    if not found and tracked:
        raise GapfillError(f"no contract is tracked on chain {chain_id} (only on {_chains(tracked)}): "
                           "fix --chain-id, or add one with `gapfill contract add ADDRESS`")  # fmt: skip
    if not found:
        raise GapfillError(NOTHING_TRACKED)
    return found


# -- init, contract ---------------------------------------------------------------------


@cli.command()
@pass_ctx
def init(ctx: Ctx) -> None:
    """Create or upgrade the schema (every command that writes does this too)."""
    store = ctx.store(create=True)
    version = store.migrate()
    # A first run and a second one said the same, so a user could not tell it created anything.
    # "Tables", not "schema": on PostgreSQL they go in the search_path's schema, which exists.
    if store.schema_found is None:
        click.echo(f"created gapfill's tables (schema version {version}) in {store.display_url}")
    elif 0 <= store.schema_found < version:
        click.echo(f"upgraded gapfill's tables in {store.display_url} from schema version "
                   f"{store.schema_found} to {version}")  # fmt: skip
    else:
        click.echo(f"database {store.display_url} is at schema version {version}")


@cli.group()
def contract() -> None:
    """Track contracts."""


@contract.command("add")
@click.argument("address", callback=address_arg)
@click.option("--chain-id", type=int_range(1), default=None,
              help="Its chain [default: the RPC node's; without a node, the one chain it is "
                   "tracked on].")  # fmt: skip
@click.option("--label", default=None, help="A name to show in status.")
@click.option("--abi", "abi_file", type=click.Path(), default=None,
              help="ABI JSON file (a list, an artifact with an \"abi\" key, or an explorer's "
                   "getabi answer) for decoding.")
@click.option("--start-block", type=int_range(0), default=None,
              help="First block of the contract (discovery starts here).")
@rpc_timeout_option
@pass_ctx
def contract_add(ctx: Ctx, address: str, chain_id: int | None, label: str | None,
                 abi_file: str | None, start_block: int | None, rpc_timeout_s: float) -> None:  # fmt: skip
    """Track ADDRESS. The chain id defaults to the RPC node's."""
    ctx.kept = lambda: "nothing was written; run the same command again"
    abi = load_abi(abi_file) if abi_file else None
    code: CodeAt | None = None  # the node's code at the address, where it was asked
    if chain_id is None and not (ctx.rpc_urls or ctx.file.endpoints):
        # Already tracked on one chain (a new ABI or label for it): that chain. Nothing is
        # tracked in a database not made yet, and the error below must not leave one behind.
        tracked = [c.chain_id for c in ctx.store(create=True).list_contracts()
                   if c.address == address] if ctx.database_exists() else []  # fmt: skip
        if len(tracked) == 1:
            chain_id = tracked[0]
    if chain_id is None:
        if not (ctx.rpc_urls or ctx.file.endpoints):
            raise ConfigError(
                "cannot tell the chain id: pass --chain-id N, or give --rpc-url so it can be asked"
            )
        from gapfill.engine.session import fetch_chain_id_and_code

        # The node is asked anyway: its code at the address too, so that a mistyped address
        # (an EOA) is said now, not as a discovery that finds nothing and says nothing.
        chain_id, code = fetch_chain_id_and_code(ctx.endpoints(), address, tell=tell,
                                                 settings=rpc_settings(rpc_timeout_s))  # fmt: skip
    store = ctx.store(create=True)
    try:
        was: Contract | None = store.get_contract(address, chain_id)
    except UnknownContractError:
        was = None
    # A Ctrl+C or SIGTERM as the contract is written stops the command once it is (the
    # scope's end), saying so: it raised as the commit returned, "nothing was written".
    written = f"{address} is tracked on chain {chain_id}"
    # The ABI the contract has already: nothing is asked to be decoded again (Store.add_contract).
    abi_changed = abi is not None and (was is None or was.abi != abi)
    if abi_changed:
        # The ABI and the ask to decode the stored rows again were written together: if
        # this is cut short, the next `gapfill enrich` (or `contract add`) finishes it.
        written += (" with this ABI, but the rows stored before it are not all decoded with "
                    "it yet: the next `gapfill enrich` finishes that, or run the same command again")
    with HoldFromCommit() as late:
        # Set before the write: a second signal as it commits is said from `late.committed`.
        ctx.kept = lambda: written if late.committed else "nothing was written; run the same command again"
        store.add_contract(Contract(chain_id, address, label, start_block, abi))
    click.echo(_added(was, store.get_contract(address, chain_id), abi_changed))
    if code is not None:
        from gapfill.engine.session import no_code

        warning = no_code(address, chain_id, code)
        if warning:
            click.echo(warning, err=True)
    if abi is not None:
        from gapfill.enrich.decode import abi_problems

        problems = abi_problems(abi)
        if problems:
            shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
            click.echo(f"warning: {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} of "
                       f"{abi_file} cannot be decoded and will be skipped: {shown}", err=True)  # fmt: skip
    from gapfill.enrich.redecode import finish_redecodes

    # Rows stored before this ABI (another contract's refs, an earlier add or a removed
    # contract's) are decoded with it now, as a new enrichment would; so are those of any
    # contract an earlier run or `contract add` left to do (killed, a power cut).
    for done_chain, done_address, done in finish_redecodes(store):
        if not (done.txs or done.logs):
            continue
        if not abi_changed or (done_chain, done_address) != (chain_id, address):
            click.echo(f"decoded the stored rows of {done_address} on chain {done_chain} again with its "
                       f"ABI, which a run or `contract add` cut short had left to do: "
                       f"{counted(done.txs, 'transaction')} sent to it, "
                       f"{counted(done.logs, 'log')} it emitted")  # fmt: skip
        else:
            click.echo(f"decoded the stored rows with this ABI: {done.decoded_txs:,} of "
                       f"{counted(done.txs, 'transaction')} sent to it, {done.decoded_logs:,} of "
                       f"{counted(done.logs, 'log')} it emitted")  # fmt: skip
            if not (done.decoded_txs or done.decoded_logs):
                click.echo(f"warning: none of the stored rows matches this ABI: check that "
                           f"{abi_file} is {address}'s ABI", err=True)  # fmt: skip


def _added(was: Contract | None, now: Contract, new_abi: bool) -> str:
    """What `contract add` did: started tracking ``now``, or (``was`` tracked already) what
    it changed, as said nothing of a label or start block it kept, nor that none changed."""
    named = f" ({now.label})" if now.label else ""
    if was is None:
        return f"tracking {now.address} on chain {now.chain_id}{named}"
    # An empty label (`--label ''`) is no label, as `contract list` shows both.
    changes = [f"{what} {'none' if old in (None, '') else old} -> {'none' if new in (None, '') else new}"
               for what, old, new in (("label", was.label or None, now.label or None),
                                      ("start block", was.start_block, now.start_block))
               if old != new]  # fmt: skip
    if new_abi:
        changes.append("ABI replaced" if was.abi is not None else "ABI set")
    return (f"{now.address} on chain {now.chain_id}{named} was tracked already: "
            + (", ".join(changes) if changes else "nothing changed"))


def load_abi(path: str) -> list[dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        # Windows editors and some exporters start UTF-8 files with a byte-order mark,
        # which JSON parsers refuse.
        data = orjson.loads(raw.removeprefix(codecs.BOM_UTF8))
    except FileNotFoundError:
        raise ConfigError(f"ABI file {path} does not exist: fix the --abi path") from None
    except IsADirectoryError:
        raise ConfigError(f"ABI file {path} is a directory, not a file: fix the --abi path") from None
    except OSError as exc:
        raise ConfigError(f"cannot read ABI file {path} ({exc.strerror}): fix the --abi path") from None
    except orjson.JSONDecodeError:
        raise ConfigError(f"ABI file {path} is not JSON: give the contract's ABI JSON") from None
    if isinstance(data, dict) and isinstance(data.get("abi"), list):
        data = data["abi"]
    elif isinstance(data, dict) and "status" in data and "result" in data:
        data = _explorer_abi(path, data)
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ConfigError(f"ABI file {path} holds no ABI: expected a JSON list of entries")
    return data


def _explorer_abi(path: str, answer: dict[str, Any]) -> Any:
    """The ABI of an explorer's `getabi` answer (Etherscan, Blockscout), saved as it came:
    ``{"status": "1", "message": "OK", "result": "[...]"}``, the ABI as a JSON string."""
    result = answer["result"]
    if str(answer["status"]) != "1":
        said = str(result or answer.get("message") or "no reason given").strip().rstrip(".")
        raise ConfigError(f"ABI file {path} is an explorer's refusal, not an ABI ({said}): "
                          "give the contract's ABI JSON")  # fmt: skip
    if isinstance(result, str):
        try:
            return orjson.loads(result)
        except orjson.JSONDecodeError:
            raise ConfigError(f"ABI file {path} is an explorer's answer whose ABI is not JSON: "
                              "give the contract's ABI JSON") from None  # fmt: skip
    return result


@contract.command("remove")
@click.argument("address", callback=address_arg)
@chain_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def contract_remove(ctx: Ctx, address: str, chain_id: int | None, yes: bool) -> None:
    """Stop tracking ADDRESS: its refs, plan, coverage and failure records are deleted; the
    transactions and logs already stored stay."""
    store = ctx.store()
    try:
        c = store.get_contract(address, chain_id)
    except UnknownContractError as exc:
        if "not tracked" not in str(exc):
            raise  # tracked on several chains: that message says to pass --chain-id
        raise UnknownContractError(f"contract {address} is not tracked: nothing to remove "
                                   "(`gapfill contract list` shows what is)") from None  # fmt: skip
    if not yes:
        if not _stdin_is_a_terminal():
            raise ConfigError(f"contract remove deletes the refs and plan of {c.address}: pass --yes "
                              "to confirm")  # fmt: skip
        # Coverage too: the blocks discover scanned for it would have to be scanned again.
        if not click.confirm(f"Remove {c.address} on chain {c.chain_id} with its refs, plan, "
                             "discovery coverage and failure records?", default=False):  # fmt: skip
            # The user's "no" is an answer, not an error: said as such, and exit 0.
            click.echo("nothing removed")
            return
    store.release_dead_local_owners()  # a killed run's leases block nothing
    # As an import's: a Ctrl+C or SIGTERM from the removal's commit on is held, and said
    # after it; it raised as the commit returned, and the removal done went unsaid (130).
    with HoldFromCommit(deliver=False) as late:
        ctx.kept = lambda: (f"{c.address} on chain {c.chain_id} had been removed" if late.committed
                            else "nothing was removed")  # fmt: skip
        deleted = store.remove_contract(c.chain_id, c.address)
        click.echo(f"removed {c.address} on chain {c.chain_id}: {counted(deleted['refs'], 'ref')}, "
                   f"{counted(deleted['batches'], 'batch', 'batches')}, "
                   f"{counted(deleted['failures'], 'failure record')}; "
                   "its stored transactions stay")  # fmt: skip
        if late.held:
            tell("interrupted only after the removal was committed: it is complete, nothing to run again")


@contract.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def contract_list(ctx: Ctx, as_json: bool) -> None:
    """List tracked contracts."""
    rows = ctx.store(read_only=True).list_contracts()
    if as_json:
        click.echo(orjson.dumps([{"chain_id": c.chain_id, "address": c.address, "label": c.label,
                                  "start_block": c.start_block, "has_abi": c.abi is not None}
                                 for c in rows]).decode())  # fmt: skip
        return
    if not rows:
        # As `status` says it: a bare empty output left it open whether the command had run.
        click.echo(NOTHING_TRACKED)
        return
    # A header names the columns: "31337 0x... router - -" could not be read without --json.
    # Tab-separated off a terminal (a label may hold spaces: `cut -f3` still finds it),
    # aligned on one.
    table = [["chain", "address", "label", "start_block", "abi"]]
    table += [[str(c.chain_id), c.address, c.label or "-",
               str(c.start_block) if c.start_block is not None else "-", "yes" if c.abi is not None else "no"]
              for c in rows]  # fmt: skip
    if not _is_tty():
        for r in table:
            click.echo("\t".join(r))
        return
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


# -- import, status ------------------------------------------------------------------------


def _stdin_is_a_terminal() -> bool:
    return sys.stdin.isatty()


@cli.command("import")
@click.argument("file")
@click.option("--contract", "contract", callback=one_address, multiple=True, required=True,
              help="The contract these transactions belong to.")
@chain_option
@pass_ctx
def import_(ctx: Ctx, file: str, contract: str, chain_id: int | None) -> None:
    """Import the hashes in FILE (a hash per line, a CSV, an Etherscan export, or - for stdin)."""
    from gapfill.discover.imports import CsvColumns, NoRefs, parse_refs
    from gapfill.store import RefsAdded

    store = ctx.store()
    c = store.get_contract(contract, chain_id)
    ctx.kept = lambda: "nothing was imported (an import is one transaction); run it again"
    if file == "-" and _stdin_is_a_terminal():
        # Else a blank terminal that waits, and nothing says for what.
        click.echo("reading transaction hashes from the terminal: one a line, then Ctrl+D "
                   "(or give a file, or pipe one in)", err=True)  # fmt: skip
    read = 0

    def counting(refs: Iterator[Ref]) -> Iterator[Ref]:
        nonlocal read
        for ref in refs:
            read += 1
            yield ref

    columns: list[CsvColumns] = []
    # A Ctrl+C or SIGTERM from the commit on is held: the import is said whole, then that it
    # came too late to stop it, and the exit code is the import's. It raised as the commit
    # returned, and "nothing was imported" was said of an import stored whole.
    with HoldFromCommit(deliver=False) as late:
        ctx.kept = lambda: ("the import had been committed: all its refs are stored" if late.committed else
                            "nothing was imported (an import is one transaction); run it again")  # fmt: skip
        try:
            parsed = parse_refs(file, c.chain_id, c.address, on_columns=columns.append)
            added = store.add_refs(counting(parsed))
            remark = _known_already(read - added.repeated, read - added.repeated - added.new - added.filled,
                                    added.repeated)  # fmt: skip
        except NoRefs:
            if file != "-":
                raise  # a file named that holds nothing is almost surely the wrong file
            # A pipe that found nothing new to import (a script's quiet day) is no error.
            added, remark = RefsAdded(0, 0), " (stdin held no transaction hashes)"
        for col in columns:
            if col.block is None and col.ignored and read:
                # A misspelt block column ("block_num") would be dropped without a word (with
                # refs read: a header alone on stdin brings none).
                tell(f"note: {'stdin' if file == '-' else file} has no block number column, so its refs "
                     f"get their block numbers when enriched; ignored: {_some(col.ignored)} (block "
                     "numbers are read from a column named block_number, blockNumber, blockno, block or "
                     "'Block Number')")  # fmt: skip
        filled = f", {counted(added.filled, 'block number')} filled" if added.filled else ""
        click.echo(f"imported {counted(added.new, 'new ref')} for {c.address} "
                   f"on chain {c.chain_id}{filled}{remark}{_conflicting(added.conflicts)}")  # fmt: skip
        if late.held:
            tell("interrupted only after the import was committed: it is complete, nothing to run again")


def _some(names: Sequence[str], shown: int = 5) -> str:
    """``names`` joined, the first ``shown`` of them when there are more (an export of 60
    columns made a note of 60 names): "a, b, c, d, e and 55 more"."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown} more"


def _conflicting(conflicts: int) -> str:
    """What an import says of hashes it was given another block number for than the one
    kept (a line that disagrees with an earlier line, or with the ref stored before)."""
    if not conflicts:
        return ""
    return (f"; {counted(conflicts, 'hash', 'hashes')} had conflicting block numbers: "
            f"{'it' if conflicts == 1 else 'each'} kept the one stored before, else the first given "
            "(enrichment corrects a wrong one)")  # fmt: skip


def _known_already(read: int, unchanged: int, repeated: int = 0) -> str:
    """What an import says of the ``read`` hashes (each once) it read that changed nothing
    (tracked already with what they say), and of the lines that repeat a hash of an earlier
    line (``repeated``, not known before for that): an import of 0 new refs did not just
    fail to read."""
    again = f"{repeated:,} repeated in the file" if repeated else ""
    if not unchanged:
        return f" ({again})" if again else ""
    if unchanged == read:
        known = "every hash was known already" if read > 1 else "the hash was known already"
    else:
        known = f"{unchanged:,} of {counted(read, 'hash', 'hashes')} known already"
    return f" ({known}; {again})" if again else f" ({known})"


def status_dict(s: ContractStatus) -> dict[str, Any]:
    return {
        "chain_id": s.chain_id, "contract": s.address, "label": s.label, "refs": s.refs,
        "enriched": s.enriched, "missing": s.missing, "failed": s.failed,
        "min_block": s.min_block, "max_block": s.max_block,
        "unknown_block_refs": s.unknown_block_refs,
    }  # fmt: skip


#: How long `status` waits for the node's head unless --rpc-timeout (or the config file's
#: rpc_timeout_s) says: status is about the database, and the head only lets the coverage
#: report reach it, so a silent node should not hold the table for enrich's 30 s.
STATUS_HEAD_TIMEOUT_S = 5.0


@cli.command()
@contract_option
@chain_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--rpc-timeout", "rpc_timeout_s", type=FiniteFloatRange(min=0.1), default=None,
              help=f"Seconds to wait for the node's head [default: {STATUS_HEAD_TIMEOUT_S:g}].")  # fmt: skip
@pass_ctx
def status(ctx: Ctx, contract: str | None, chain_id: int | None, as_json: bool,
           rpc_timeout_s: float | None) -> None:  # fmt: skip
    """Per contract: refs, enriched, missing and failed counts, and the block range."""
    store = ctx.store(read_only=True)
    if contract is not None:
        store.get_contract(contract, chain_id)
    rows = store.status(chain_id, contract)
    if not rows and chain_id is not None:
        resolve_targets(store, None, chain_id)  # names the chains that do have contracts
    rpc = rpc_settings(STATUS_HEAD_TIMEOUT_S if rpc_timeout_s is None else rpc_timeout_s)
    extra = _coverage_report(store, rows, _node_head(ctx, {s.chain_id for s in rows}, rpc))
    if as_json:
        out = []
        for s in rows:
            d = status_dict(s)
            d.update(extra.get((s.chain_id, s.address), {}))
            out.append(d)
        click.echo(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return
    render_status(rows, extra)


def _node_head(ctx: Ctx, chains: set[int], rpc: RpcSettings) -> dict[int, int]:
    """The head block of the configured node's chain, when a node is configured and answers
    within ``rpc``'s read timeout (one try).

    Status is about the database: a node that does not answer only makes the coverage
    report stop at the highest scanned block instead of the head, which is said in one
    sentence on standard error (the output, JSON too, stays whole).
    """
    if not (ctx.rpc_urls or ctx.file.endpoints) or not chains:
        return {}
    from gapfill.quantity import QuantityError, quantity

    settings = dataclasses.replace(rpc, attempts=1, connect_timeout_s=min(3.0, rpc.read_timeout_s))

    async def go() -> dict[int, int]:
        # Imported in the loop, where a Ctrl+C during the import is not lost (run_interruptible).
        from gapfill.engine.session import make_client

        async with make_client(ctx.endpoints(), settings=settings) as client:
            chain = await client.probe()
            head = await client.call("eth_blockNumber", [])
            try:
                return {chain: quantity(head, "its answer to eth_blockNumber")}
            except QuantityError as exc:
                raise RpcError(str(exc)) from None

    try:
        return run_interruptible(go)
    except GapfillError as exc:
        why = redact_text(str(exc), *ctx.secrets()).rstrip(".")
        tell(f"note: no head block from the RPC node, so coverage stops at the highest scanned "
             f"block: {why}")  # fmt: skip
        return {}


def _coverage_report(
    store: Store, rows: Sequence[ContractStatus], heads: dict[int, int]
) -> dict[tuple[int, str], dict[str, Any]]:
    from gapfill.discover.coverage import coverage_report

    return {(s.chain_id, s.address): coverage_report(store, s.chain_id, s.address, heads.get(s.chain_id))
            for s in rows}  # fmt: skip


def _blocks(s: ContractStatus) -> str:
    if s.min_block is None:
        return f"{s.unknown_block_refs:,} unknown" if s.unknown_block_refs else "-"
    rng = f"{s.min_block}-{s.max_block}"  # block numbers, not counts: as a node names them
    return rng + (f" (+{s.unknown_block_refs:,} unknown)" if s.unknown_block_refs else "")


def render_status(rows: Sequence[ContractStatus], extra: dict[tuple[int, str], dict[str, Any]]) -> None:
    if not rows:
        click.echo(NOTHING_TRACKED)
        return
    headers = ["chain", "contract", "label", "refs", "enriched", "missing", "failed", "blocks"]
    # Counts with thousands separators, as every other count gapfill says (`--json` has them bare).
    table = [[str(s.chain_id), s.address, s.label or "-", f"{s.refs:,}", f"{s.enriched:,}",
              f"{s.missing:,}", f"{s.failed:,}", _blocks(s)] for s in rows]  # fmt: skip
    if _is_tty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title="gapfill status")
        for h in headers:
            t.add_column(h, justify="right" if h in ("refs", "enriched", "missing", "failed") else "left")
        for r in table:
            t.add_row(*r)
        Console().print(t)
    else:
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
        click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
        for r in table:
            click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    for s in rows:
        info = extra.get((s.chain_id, s.address))
        if info and info.get("summary"):
            # The chain too: one address may be tracked on several chains, each covered apart.
            click.echo(f"{s.address} on chain {s.chain_id}: {info['summary']}")


# -- enrich, worker, failures, runs ------------------------------------------------------


def _tracked_targets(ctx: Ctx, contract: str | None, chain_id: int | None, read_only: bool) -> list[Contract]:
    """The tracked contracts ``--contract`` and ``--chain-id`` select, on any chain (see
    :func:`_on_node_chain`)."""
    # `--contract X` of an address tracked on several chains: the endpoints' chain picks
    # (without endpoints, as in a dry run without a node, it stays the --chain-id error).
    node_picks = bool(ctx.endpoints(required=False))
    return resolve_targets(ctx.store(read_only=read_only), contract, chain_id, node_picks)


def _on_node_chain(
    ctx: Ctx,
    targets: list[Contract],
    contract: str | None,
    rpc: RpcSettings,
    say: Callable[[str], None] | None = tell,
) -> tuple[int, list[Contract], list[Contract]]:
    """The contracts of ``targets`` (of :func:`_tracked_targets`) to work on, all on one chain
    (the RPC endpoints' chain), and those left out because they are on another (see
    :func:`served`): the endpoints are asked their chain only when the targets are on
    several. Targets all on one chain are not probed here: the run's own start-up check
    says, in one sentence, when the node serves another chain (nothing could be done:
    exit 1). ``say`` (if any) hears which chain they picked for the one address
    --contract named."""
    chains = {c.chain_id for c in targets}
    if len(chains) == 1:
        return chains.pop(), targets, []
    from gapfill.engine.session import check_node

    # The run's own start-up check says the chain at -v; this one only picks the targets.
    node_chain, ctx.left_out = check_node(ctx.endpoints(), tell=tell, settings=rpc)
    on_chain, skipped = served(targets, node_chain, ctx.endpoints_check(), one_address=contract is not None)
    if contract is not None and say is not None:
        say(picked_by_node(targets, node_chain))
    return node_chain, on_chain, skipped


def picked_by_node(targets: Sequence[Contract], node_chain: int) -> str:
    """The line that says which chain of an address tracked on several (``targets``, the
    chains of the one address --contract named) a command works on: the endpoints'.
    Said once, as it is a choice made for the user (see :func:`served`)."""
    chains = ", ".join(str(c) for c in sorted({c.chain_id for c in targets}))
    return (f"{targets[0].address} is tracked on chains {chains}: working on chain {node_chain}, "
            "the RPC node's chain")  # fmt: skip


def served(targets: Sequence[Contract], node_chain: int, check: str,
           one_address: bool = False) -> tuple[list[Contract], list[Contract]]:  # fmt: skip
    """``targets`` split into those on ``node_chain`` (the chain the endpoints serve) and
    the rest; raises when none is on it: then nothing at all can be done. ``check`` names
    where the endpoints came from (see :meth:`Ctx.endpoints_check`). ``one_address``: the
    targets are the chains of the one address --contract named (see :func:`resolve_targets`),
    of which the endpoints' chain is the one meant: the rest is not left out, not asked for."""
    on_chain = [c for c in targets if c.chain_id == node_chain]
    if not on_chain:
        raise GapfillError(f"no tracked contract is on chain {node_chain}, the RPC node's chain "
                           f"(they are on {_chains(targets)}): check {check}")  # fmt: skip
    return on_chain, [] if one_address else [c for c in targets if c.chain_id != node_chain]


def unserved(skipped: Sequence[Contract], check: str,
             missing: dict[tuple[int, str], int] | None = None) -> list[str]:  # fmt: skip
    """One sentence per chain that no endpoint serves, naming its contracts left alone (with
    the refs each leaves missing, when ``missing`` counts them) and how to reach them;
    ``check`` names where the endpoints came from."""
    by_chain: dict[int, list[Contract]] = {}
    for c in skipped:
        by_chain.setdefault(c.chain_id, []).append(c)
    out = []
    for chain, contracts in sorted(by_chain.items()):
        names = ", ".join(c.address for c in contracts)
        left = ""
        if missing is not None:
            n = sum(missing.get((c.chain_id, c.address), 0) for c in contracts)
            left = f" ({counted(n, 'missing ref')} left as {'it is' if n == 1 else 'they are'})"
        out.append(f"no endpoint ({check}) serves chain {chain}: contract{'s' if len(contracts) > 1 else ''} "
                   f"{names} skipped{left}; give an endpoint of chain {chain}, or pass --chain-id "
                   "to work on one chain only")  # fmt: skip
    return out


def _renderer(quiet: bool, go_on: str) -> Any:
    from gapfill.cli_progress import LineRenderer, LiveRenderer

    if quiet:
        from gapfill.engine.events import Notice, RunSummary

        # Quiet is the summary, what the run waits for (a lock or a node silent for minutes
        # would otherwise look like a hang), and what the user must know of it: an endpoint
        # set aside, the metrics address (Notice.quiet_too).
        lines = LineRenderer(go_on=go_on)
        return lambda ev: lines(ev) if isinstance(ev, RunSummary) or (
            isinstance(ev, Notice) and (ev.waiting or ev.quiet_too)) else None
    return LiveRenderer() if _is_tty() else LineRenderer(go_on=go_on)


def _run_job(
    job: Any, quiet: bool, left: Sequence[str] = (), deliver: bool = False, go_on: str | None = None,
    store: Store | None = None,
) -> None:
    """Run ``job``; ``left`` are the sentences naming work it cannot do (contracts on a
    chain no endpoint serves), said after its summary: then it ends with exit 3.
    ``store``: the command's open database, which the run takes over (see ``run_enrich``).
    ``deliver``: a first Ctrl+C or SIGTERM held through the run's end is handled once that
    end is said (``gapfill demo`` stops there, before its next steps); else the command ends
    with its run's exit code. ``go_on``: what a stopped run says to do (by default, run the
    same command again: it continues where it stopped)."""
    from gapfill.cli_progress import RERUN, LiveRenderer, summary_lines
    from gapfill.engine.events import RunStarted, RunSummary
    from gapfill.engine.run import run_enrich

    go_on = go_on or RERUN
    render = _renderer(quiet, go_on)
    live = isinstance(render, LiveRenderer)
    summaries: list[RunSummary] = []
    started = reader_left = False

    def emit(ev: Any) -> None:
        nonlocal reader_left, started
        if isinstance(ev, RunSummary):
            summaries.append(ev)
        started = started or isinstance(ev, RunStarted)
        if reader_left:
            return
        try:
            render(ev)
        except BrokenPipeError:
            # `gapfill enrich 2>&1 | head`: the reader of the progress lines left. Raised into
            # the engine, this failed every batch over and over; stop as on Ctrl+C instead
            # (batches given back, the run marked interrupted), and end as SIGPIPE would.
            # SIGTERM, which every mode handles as Ctrl+C: SIGINT may be ignored (`cmd &`).
            reader_left = True
            _silence_gone_streams()
            os.kill(os.getpid(), signal.SIGTERM)

    # The run's end is recorded as the engine returns, and what is left to say of it (the
    # live view's last frame, the summary, the contracts it could not reach) holds a first
    # Ctrl+C or SIGTERM as the engine's end did: one landing there ended a complete run with
    # 130 and "interrupted", its summary cut short, and a line its KeyboardInterrupt cut
    # was written again (a buffered write that fails keeps its data). A second signal stops
    # the command at once, saying nothing more: the output may be what hangs. The engine
    # holds them in this same `end`, and leaves them held as it returns: it gave its handlers
    # back first, and a signal in between ended a run recorded complete with 130.
    end = HeldSignals()
    cut = False  # a second signal stopped the engine as it recorded the run's end

    def run() -> RunSummary:
        nonlocal cut
        try:
            return run_enrich(job, emit, end, store)
        except KeyboardInterrupt:
            cut = end.held > 1
            raise
        finally:
            end.hold()  # where the engine did not (it stopped before its run's end)

    try:
        try:
            if live:
                with render:
                    summary = run()
            else:
                summary = run()
        except (Interrupted, KeyboardInterrupt):
            if reader_left:
                raise SystemExit(141) from None
            if end.held > 1 and not cut:
                raise  # as the live view ended: below
            if not summaries and not started:
                raise  # the command says what a stop before the run leaves
            if not summaries:  # a second Ctrl+C cut the run's end short: the next run marks it
                tell(f"interrupted: what the run committed is kept; {go_on}")
                raise SystemExit(130) from None
            # The summary says it was interrupted and how to go on: no second line for it.
            if live:
                for line in summary_lines(summaries[-1], go_on):
                    click.echo(line)
            raise SystemExit(130) from None
        if live:
            for line in summary_lines(summary, go_on):
                click.echo(line)
        for sentence in left:
            tell(sentence)
    except KeyboardInterrupt:
        if end.held < 2:
            raise
        raise SystemExit(130) from None  # a second signal as the run's end is said
    finally:
        end.restore()
    if deliver and end.first is not None:
        signal.raise_signal(end.first)  # its handler, put back, runs now
    if summary.permanent_failures or summary.failed or left:
        # Finished, but not everything is stored: `gapfill failures` says why, or the
        # sentences above which contracts no endpoint's chain let it reach.
        raise SystemExit(3)


#: The most worker processes a run takes (`enrich`, `worker` and `demo` --workers).
MAX_WORKERS = 64
#: Planning only: `gapfill worker` joins plans and never makes one.
batch_size_option = click.option("--batch-size", type=int_range(1), default=500, show_default=True,
                                 help="Refs per batch (a lease covers one batch).")
enrich_options = [
    click.option("--workers", type=int_range(1, MAX_WORKERS), default=None,
                 help="Worker processes of a concurrent run or of `gapfill worker` "
                      "[default: 75% of cores, 2-8]."),
    batch_size_option,
    click.option("--rpc-batch-size", type=int_range(1), default=ENRICH_RPC_BATCH, show_default=True,
                 help="Calls per JSON-RPC batch (a call, not a transaction, is the unit; without --rps "
                      "a transaction and its receipt share a batch, so an odd size sends one call less)."),
    click.option("--batches-in-flight", type=int_range(1), default=4, show_default=True,
                 help="Batches each worker fetches at once (finished ones wait to be committed together)."),
    # These three at most a day: more is a mistyped number (1e308 was taken), not a wait anyone
    # means; a lease is renewed while its batch progresses, so a day without progress is stuck.
    click.option("--lease-timeout", "lease_timeout_s", type=FiniteFloatRange(min=0.1, max=86_400),
                 default=300.0, show_default=True,
                 help="Seconds without progress before a batch is taken back."),
    click.option("--grace-period", "grace_period_s", type=FiniteFloatRange(min=0, max=86_400), default=30.0,
                 show_default=True, help="Seconds workers get to finish after Ctrl+C or SIGTERM."),
    click.option("--plan", type=click.Choice(["auto", "per_tx", "per_block"]), default="auto",
                 show_default=True, help="Force the call plan (the planner chooses by default)."),
    click.option("--block-plan-min-refs", type=int_range(1), default=None,
                 help="Refs sharing a block (of all the run's contracts) from which it is fetched "
                      "whole, once [default: 2 when --rps is set; never without a rate limit]."),
    rpc_timeout_option,
    click.option("--rpc-outage", "rpc_outage_s", type=FiniteFloatRange(min=1, max=86_400), default=120.0,
                 show_default=True,
                 help="Stop (batches given back) when no RPC node has replied for this many seconds "
                      "of trying (waits for --rps or a Retry-After pause do not count), found by two "
                      "checks in a row, a quarter of it (at most 5 s) apart."),
    click.option("--metrics-port", type=int_range(0, 65535), default=None,
                 help="Serve Prometheus metrics on 127.0.0.1:PORT (0: a free port, said at the start)."),
    click.option("-q", "--quiet", is_flag=True,
                 help="Print only the summary, what the run waits for (a lock, a slow node) and what "
                      "changes it (an endpoint set aside, failures put back, --workers a one-process mode "
                      "ignores, the metrics address)."),
]  # fmt: skip


F = TypeVar("F", bound=Callable[..., Any])


def with_options(options: list[Any]) -> Callable[[F], F]:
    def wrap(f: F) -> F:
        for opt in reversed(options):
            f = opt(f)
        return f

    return wrap


def _plan_settings(opts: dict[str, Any], metered: bool = False) -> Any:
    from gapfill.enrich.fetch import PlanSettings

    n = opts.get("block_plan_min_refs")
    base = PlanSettings(shape=opts["plan"], calls_metered=metered)
    if n is None:
        return base
    return PlanSettings(block_plan_min_refs=n, block_plan_min_refs_free=n, shape=opts["plan"],
                        calls_metered=metered)  # fmt: skip


def _workers_said(ctx: Ctx, workers: int | None) -> str | None:
    """How a message names the worker count when the config file set it (else None:
    ``--workers N``, as the user typed it)."""
    source = click.get_current_context().get_parameter_source("workers")
    if workers is None or source is not click.core.ParameterSource.DEFAULT_MAP:
        return None
    return f"workers = {workers} (from {ctx.file.path})"


def _job(ctx: Ctx, chain_id: int, targets: list[Contract], mode: str, opts: dict[str, Any],
         plan_new: bool = True) -> Any:  # fmt: skip
    from gapfill.importing import ImportsWithoutGc

    with ImportsWithoutGc():  # the run's engine, RPC client and aiohttp: most of its start-up
        from gapfill.engine.run import EnrichJob
        from gapfill.engine.worker import WorkerSettings

    return EnrichJob(
        db_url=ctx.db_url,
        db_check=ctx.db_check,
        endpoints=tuple(ctx.endpoints()),
        targets=tuple((c.chain_id, c.address) for c in targets),
        chain_id=chain_id,
        mode=mode,
        workers=opts["workers"],
        workers_said=_workers_said(ctx, opts["workers"]),
        batch_size=opts["batch_size"],
        rpc_batch_size=opts["rpc_batch_size"],
        grace_period_s=opts["grace_period_s"],
        worker=WorkerSettings(lease_timeout_s=opts["lease_timeout_s"],
                              batches_in_flight=opts["batches_in_flight"],
                              rpc_outage_s=opts.get("rpc_outage_s", 120.0)),
        plan=_plan_settings(opts),
        plan_new=plan_new,
        metrics_port=opts["metrics_port"],
        rpc=rpc_settings(opts.get("rpc_timeout_s")),
        left_out=ctx.left_out,
    )  # fmt: skip


@cli.command()
@contract_option
@node_chain_option
@click.option("--mode", type=click.Choice(["auto", "sequential", "batch", "concurrent"]), default="auto",
              show_default=True,
              help="How to run (auto: batch under 20,000 refs or on fewer than 3 cores, else "
                   "concurrent).")
@with_options(enrich_options)
@click.option("--dry-run", is_flag=True,
              help="Show the missing counts, batches and estimated calls; touch nothing.")
@click.option("--retry-failed", is_flag=True, help="Put permanently failed refs back into the gap first.")
@pass_ctx
def enrich(ctx: Ctx, /, contract: str | None, chain_id: int | None, mode: str, dry_run: bool,
           retry_failed: bool, **opts: Any) -> None:  # fmt: skip
    """Fill the gap: fetch, decode and store every missing transaction."""
    if mode == "sequential":
        _say_unused_in_sequential(ctx, opts)
    if mode != "concurrent" or dry_run:
        _enrich(ctx, contract, chain_id, mode, dry_run, retry_failed, opts)
        return
    from gapfill.engine import forkserver

    try:  # (_enrich starts the workers' fork server once it knows there is work)
        _enrich(ctx, contract, chain_id, mode, dry_run, retry_failed, opts)
    finally:
        forkserver.stop()  # a run that used it has stopped it already


def _say_unused_in_sequential(ctx: Ctx, opts: dict[str, Any]) -> None:
    """Warn, once, of the batching options a sequential run does not use, when the user gave
    them: it is the seed's baseline, one call at a time (honouring them would make it batch
    mode, and its rate no longer the baseline the speedup compares with)."""
    click_ctx = click.get_current_context()
    unused = [said for param, flag in (("rpc_batch_size", "--rpc-batch-size"),
                                       ("batches_in_flight", "--batches-in-flight"))
              if (said := given_as(click_ctx, param, opts[param], f"{flag} {opts[param]}", None,
                                   f"{param} = {opts[param]} (from {ctx.file.path})"))]  # fmt: skip
    if unused:
        tell(f"warning: sequential mode sends one call at a time, so {' and '.join(unused)} "
             f"{'is' if len(unused) == 1 else 'are'} not used: use --mode batch to batch calls")


def _start_workers_server(ctx: Ctx, targets: Sequence[Contract]) -> None:
    """Start concurrent mode's fork server for a run of ``targets``, which has work: the
    workers fork from a server that imports the engine and the store (~0.3 s, 0.65 s on a
    slow machine, when no worker can start and the node waits); started now, that import
    overlaps this process's import of the engine, the node's check and the plan. Not for an
    open plan of an empty gap (its batches given back with all they had fetched): the run
    closes its batches, and no worker starts. Killed at the end if no worker came of it
    (an error, or a gap the start-up sample took whole)."""
    from gapfill.engine import forkserver

    store = ctx.store()
    keys = [(c.chain_id, c.address) for c in targets]
    # Without an open plan, the work found is a gap (or failures to put back into it).
    if store.has_open_batches(keys) and not any(store.has_gap(c, a) for c, a in keys):
        return  # (with --retry-failed, the run starts it once the failures are back)
    forkserver.start(ctx.db_url, _may_use_tls(ctx))


def _may_use_tls(ctx: Ctx) -> bool:
    """Whether an endpoint may use TLS (a malformed setting is said later, as without this)."""
    from gapfill.rpc.tls import any_may_use_tls

    try:
        return any_may_use_tls(e.url for e in ctx.endpoints(required=False))
    except GapfillError:
        return False


def _enrich(ctx: Ctx, contract: str | None, chain_id: int | None, mode: str, dry_run: bool,
            retry_failed: bool, opts: dict[str, Any]) -> None:  # fmt: skip
    # Until a run starts (its summary says what a Ctrl+C leaves from then on): a bare
    # "interrupted" left it open whether anything had been written.
    ctx.kept = lambda: "nothing was fetched yet; run the same command again"
    rpc = rpc_settings(opts.get("rpc_timeout_s"))
    # A dry run writes nothing: it reads as `status` does (a read-only file or role will do).
    tracked = _tracked_targets(ctx, contract, chain_id, read_only=dry_run)
    # Nothing missing on any chain: no node is asked anything, not even its chain. Not so
    # for `--contract X` tracked on several chains: the node's chain is the one meant, and
    # only its copy counts (another chain's failures must not make the exit 3); the node is
    # asked its chain first, as a run with work asks it anyway.
    one_of_several = contract is not None and len({c.chain_id for c in tracked}) > 1
    if not dry_run and not one_of_several and _say_if_nothing_to_enrich(ctx, tracked, retry_failed):
        return
    if dry_run and not ctx.endpoints(required=False):
        # A dry run fetches nothing: with no node to pick a chain, it estimates every chain
        # of the targets, as it does the one chain of targets all on one (it stopped at "no
        # RPC endpoint is set" where these were on two).
        _dry_run(ctx, tracked, opts, retry_failed)
        return
    # -q shows only the summary and what the run waits for.
    chain, targets, skipped = _on_node_chain(ctx, tracked, contract, rpc, None if opts["quiet"] else tell)
    # Contracts on a chain no endpoint serves, named when they have a gap the run leaves.
    store = ctx.store(read_only=dry_run)
    missing = {(c.chain_id, c.address): _gap_size(store, c, retry_failed) for c in skipped}
    skipped = [c for c in skipped if missing[(c.chain_id, c.address)]]
    left = unserved(skipped, ctx.endpoints_check(), missing)
    if dry_run:
        _dry_run(ctx, targets + skipped, opts, retry_failed, left)
        return
    if targets != tracked and _say_if_nothing_to_enrich(ctx, targets, retry_failed, left):
        return
    if mode == "concurrent":  # nothing to do started no server: the command ended first
        _start_workers_server(ctx, targets)
    if retry_failed:
        from gapfill.engine.session import check_node

        # A mistyped --rpc-url must not cost the failure records: check the node first.
        _, ctx.left_out = check_node(ctx.endpoints(), expected_chain_id=chain, tell=tell, settings=rpc)
        n = sum(ctx.store().clear_failures(c.chain_id, c.address) for c in targets)
        click.echo(f"{counted(n, 'failed ref')} put back into the gap", err=True)
    job = _job(ctx, chain, targets, mode, opts)
    # An in-process run goes on with this connection (a second one's start came before the
    # node's first call); a concurrent run's coordinator and workers open their own.
    if mode == "concurrent":
        ctx.close()
    _run_job(job, opts["quiet"], left, store=ctx.take_store())


def _say_if_nothing_to_enrich(ctx: Ctx, targets: list[Contract], retry_failed: bool,
                              left: Sequence[str] = ()) -> bool:  # fmt: skip
    """When a run of ``targets`` would have nothing to do (see ``engine.idle.nothing_to_enrich``),
    say so and return True, without asking the node anything or recording a run (each rerun
    recorded one of 0 calls, after a node check for nothing); ``left`` as for
    :func:`_run_job`. Like a run, it exits 3 while permanent failures of ``targets`` are on
    record (or ``left`` names contracts skipped), else 0."""
    from gapfill.engine.events import Notice
    from gapfill.engine.idle import fill_block_numbers, finish_left_redecodes, nothing_to_enrich

    store = ctx.store()
    keys = [(c.chain_id, c.address) for c in targets]
    idle = nothing_to_enrich(store, keys, retry_failed=retry_failed)
    if idle is None:
        return False
    # What a run's start and end would have done: block numbers, and the re-decode a run
    # killed after an ABI change (or a `contract add` cut short) left to do.
    fill_block_numbers(store, keys)
    finish_left_redecodes(store, None, lambda ev: tell(ev.text) if isinstance(ev, Notice) else None)
    tell(nothing_to_enrich_said(targets, idle))
    for sentence in left:
        tell(sentence)
    if idle.permanent or left:
        raise SystemExit(3)
    return True


def nothing_to_enrich_said(targets: Sequence[Contract], idle: Any) -> str:
    """The sentence for a run of ``targets`` with nothing to do (``idle``, a
    ``NothingToEnrich``)."""
    chains = sorted({c.chain_id for c in targets})
    where = f"chain{'s' if len(chains) > 1 else ''} {', '.join(str(c) for c in chains)}"
    one = len(targets) == 1
    who = f"{targets[0].address} on {where}" if one else f"the {len(targets)} tracked contracts on {where}"
    if not idle.has_refs:
        return (f"nothing to enrich: {who} {'has' if one else 'have'} no refs yet: "
                "`gapfill discover` or `gapfill import` finds them")  # fmt: skip
    if not idle.permanent:
        return f"nothing to enrich: every ref of {who} is stored"
    return (f"nothing to enrich: every ref of {who} is stored or failed for good "
            f"({counted(idle.permanent, 'permanent failure')} on record: `gapfill failures` says why, "
            "`gapfill enrich --retry-failed` tries them again)")  # fmt: skip


def _gap_size(store: Store, c: Contract, retry_failed: bool) -> int:
    """The refs a run would work on for ``c``."""
    n = store.count_gap(c.chain_id, c.address)
    return n + store.count_permanent_failures(c.chain_id, c.address) if retry_failed else n


def _dry_run(ctx: Ctx, targets: list[Contract], opts: dict[str, Any], retry_failed: bool,
             left: Sequence[str] = ()) -> None:  # fmt: skip
    """What a run would do; ``left`` names the contracts among ``targets`` it would skip."""
    from gapfill.engine.dryrun import estimate

    eps = ctx.endpoints(required=False)  # a malformed one is said as a real run would say it
    rps_total = metered_rate(eps)
    unmetered = sum(e.rps is None for e in eps)
    rows = estimate(ctx.store(read_only=True), [(c.chain_id, c.address) for c in targets],
                    batch_size=opts["batch_size"], plan=_plan_settings(opts, metered=calls_metered(eps)),
                    rps_total=rps_total, retry_failed=retry_failed)  # fmt: skip
    click.echo("dry run: nothing is fetched or written"
               + (" (permanently failed refs counted as missing: --retry-failed)" if retry_failed else ""))
    for r in rows:
        when = (f"~{r.estimated_seconds:,.0f}s at {rps_total:g} calls/s" if r.estimated_seconds is not None
                else "time depends on the node (no --rps set)" if unmetered == len(eps)
                else f"time depends on the node ({counted(unmetered, 'endpoint')} with no rps)")  # fmt: skip
        # Whole blocks only where the plan fetches some (under --rps, or --plan per_block):
        # "0 refs in 0 whole blocks" on every dry run without a rate limit read as a gap
        # the plan had lost.
        whole = (f"{counted(r.per_block_refs, 'ref')} in {counted(r.blocks, 'whole block')}, "
                 if r.per_block_refs else "")  # fmt: skip
        # A contract with an open plan (a run in progress, or one stopped) is not planned
        # again: the run joins it, batches and all, so "N batches of --batch-size" would be
        # a plan that never happens; it cuts new batches only for the gap outside them.
        batches = f"{counted(r.batches, 'batch', 'batches')} of {opts['batch_size']}"
        if r.joins and r.missing:
            plan = ctx.store(read_only=True).batch_counts(targets=[(r.chain_id, r.contract)])
            more = (f" and plans {batches} more for the {counted(r.outside, 'ref')} outside them"
                    if r.batches else "")  # fmt: skip
            batches = (f"joins the open plan ({plan.pending:,} pending, {plan.leased:,} leased "
                       f"{'batch' if plan.pending + plan.leased == 1 else 'batches'}){more}")  # fmt: skip
        # A transaction a contract above shares is fetched once, and a block a contract above
        # fetches whole stores this one's refs in it too: their calls are counted there.
        above = [f"{r.shared:,} shared with a contract above"] if r.shared else []
        above += [f"{r.riders:,} in whole blocks a contract above fetches"] if r.riders else []
        shared = f" ({' and '.join(above)}, their calls counted there)" if above else ""
        click.echo(f"{r.chain_id} {r.contract}: {r.missing:,} missing{shared}, {batches}, {whole}"
                   f"~{r.estimated_calls:,} RPC calls, {when}")  # fmt: skip
    for sentence in left:  # what a run would say after its summary
        click.echo(sentence)
    from gapfill.engine.idle import nothing_to_enrich

    idle = nothing_to_enrich(ctx.store(read_only=True), [(c.chain_id, c.address) for c in targets],
                             retry_failed=retry_failed)  # fmt: skip
    if idle is not None:  # what the run would say instead of running
        click.echo(nothing_to_enrich_said(targets, idle))


@cli.command()
@with_options([o for o in enrich_options if o is not batch_size_option])
@click.option("--wait", is_flag=True,
              help="With no plan open yet, wait for one (`gapfill enrich` on another host) "
                   "instead of exiting.")  # fmt: skip
@pass_ctx
def worker(ctx: Ctx, /, wait: bool, **opts: Any) -> None:
    """Join the open plans of this database (any host) and work until they are done."""
    opts["batch_size"] = 500  # unused: a worker never plans (plan_new=False)
    # Until its run starts (the summary says what a Ctrl+C leaves from then on): a stop
    # while a slow node answered its first call said a bare "interrupted".
    before_run = "no plan was joined and nothing was written; run the same command again"
    ctx.kept = lambda: before_run
    contracts = ctx.store().list_contracts()
    if not contracts:
        raise GapfillError(f"no contract is tracked in this database: check {ctx.db_check}")
    # A worker joins the plans of its endpoints' chain; those of another chain are for
    # workers given an endpoint of that chain, so it leaves them without a word. The node
    # is asked its chain even when every contract is on one: a worker is there to work, and
    # one given another chain's node used to say there was no plan of the contracts' chain
    # (or wait for one, with --wait) and fail only once a plan was there to join. The run
    # goes without the endpoints this check left out, and its own check says the chain at
    # -v: each said once, a hung endpoint waited for once.
    from gapfill.engine.session import check_node

    tracked = _tracked_targets(ctx, None, None, read_only=False)
    chain, ctx.left_out = check_node(ctx.endpoints(), tell=tell,
                                     settings=rpc_settings(opts.get("rpc_timeout_s")))  # fmt: skip
    targets, _ = served(tracked, chain, ctx.endpoints_check())
    keys = [(c.chain_id, c.address) for c in targets]
    if not ctx.store().has_open_batches(keys):
        if not wait:  # nothing to join: said, and nothing written (not even a run row)
            tell(f"no open plan to join on chain {chain}: run `gapfill enrich` with this database "
                 "(on any host) to plan the gap, or start the worker with --wait")  # fmt: skip
            return
        tell(f"no open plan on chain {chain} yet: waiting for `gapfill enrich` to plan one "
             "(Ctrl+C to stop)")  # fmt: skip
        from gapfill.engine.run import wait_for_plan

        ctx.kept = lambda: f"{before_run} to wait for one"
        wait_for_plan(ctx.store(), keys)
        ctx.kept = lambda: before_run
    ctx.close()
    _run_job(_job(ctx, chain, targets, "concurrent", opts, plan_new=False), opts["quiet"])


@cli.command()
@contract_option
@chain_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", type=int_range(1), default=1000, show_default=True,
              help="Show at most this many failures.")
@pass_ctx
def failures(ctx: Ctx, contract: str | None, chain_id: int | None, as_json: bool, limit: int) -> None:
    """List transactions that could not be enriched, and why."""
    store = ctx.store(read_only=True)
    if contract is not None:
        store.get_contract(contract, chain_id)
    rows = store.list_failures(chain_id, contract, limit + 1)
    if len(rows) > limit:  # said on standard error, so a script's JSON or lines stay whole
        rows = rows[:limit]
        click.echo(f"note: only the first {counted(limit, 'failure')} are shown, and there are more: "
                   "pass a higher --limit to see them", err=True)  # fmt: skip
    if as_json:
        click.echo(orjson.dumps([{"chain_id": f.chain_id, "tx_hash": f.tx_hash, "contract": f.contract,
                                  "reason": f.reason, "permanent": f.permanent, "attempts": f.attempts,
                                  "last_error": f.last_error, "at": at}
                                 for f, at in rows]).decode())  # fmt: skip
        return
    if not rows:
        click.echo("no failures")
        return
    for f, at in rows:
        kind = "permanent" if f.permanent else "transient, still in the gap"
        # `attempts` counts the times a run recorded it; the error itself may count RPC tries.
        times = "once" if f.attempts == 1 else f"{f.attempts} times"
        click.echo(f"{f.chain_id} {f.tx_hash} {f.reason} ({kind}, recorded {times}, last {at}): "
                   f"{f.last_error}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--limit", type=int_range(1), default=20, show_default=True,
              help="Show at most this many runs, the latest first.")
@pass_ctx
def runs(ctx: Ctx, as_json: bool, limit: int) -> None:
    """Show the history of runs."""
    import datetime as dt

    rows = ctx.store(read_only=True).list_runs(limit)
    if as_json:
        click.echo(orjson.dumps([{**dataclasses.asdict(r), "rate": r.rate} for r in rows]).decode())
        return
    if not rows:
        click.echo("no runs yet")
        return
    for r in rows:
        started = dt.datetime.fromtimestamp(r.started_at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        rate = "-" if r.rate is None else f"{r.rate:,.1f} tx/s"
        # A run this host cannot judge (another machine, or PID namespace, that has the name)
        # is marked by a later run where it ran, if ever: its row may be stale. One of this
        # host whose process is gone comes as `interrupted` already (Store.list_runs).
        state = r.state if r.state != "running" or r.judged_here else "running (not checked from here)"
        click.echo(f"#{r.run_id} {started} UTC {r.host} {r.mode} x{r.workers} {state}: "
                   f"{r.processed:,} processed, {r.failed:,} failed, {counted(r.rpc_calls, 'call')}, "
                   f"{rate}" + (f" ({redact_text(r.note, *ctx.secrets())})"
                                if r.note and r.state != "done" else ""))  # fmt: skip


@cli.command()
@click.option("--older-than", "older_than_s", type=Age(), default="30", show_default=True,
              help="Prune plans last worked on longer ago than this: days (30), or 12h, 7d.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, and delete nothing.")
@pass_ctx
def prune(ctx: Ctx, older_than_s: float, dry_run: bool) -> None:
    """Delete finished plans (batches) and their lease events, once older than --older-than.

    A plan goes once it is over: none of its batches pending or leased, the run that planned
    it no longer running, and nothing done on it for --older-than. Open plans, and those of
    runs still running, stay. The runs stay too: `gapfill runs` shows them with their counts,
    which the runs table keeps."""
    from gapfill.engine.prune import prune as prune_plans
    from gapfill.store import Pruned

    age = said_age(older_than_s)
    store = ctx.store(read_only=dry_run)

    def said(p: Pruned) -> str:
        return (f"{counted(p.batches, 'batch', 'batches')} and {counted(p.events, 'lease event')} "
                f"of {counted(p.plans, 'finished plan')} older than {age}")  # fmt: skip

    so_far = Pruned()

    def done(total: Pruned) -> None:
        nonlocal so_far
        so_far = total

    ctx.kept = lambda: (f"pruned {said(so_far)}, each plan whole; run the same command again to prune "
                        "the rest" if so_far.plans else "nothing was pruned")  # fmt: skip
    pruned = prune_plans(store, older_than_s, dry_run=dry_run, done=done)
    if not pruned.plans:
        click.echo(f"nothing to prune: no finished plan older than {age}")
    elif dry_run:
        click.echo(f"would prune {said(pruned)} (dry run: nothing was deleted)")
    else:
        click.echo(f"pruned {said(pruned)}; the runs stay (`gapfill runs`)")


class _WholeWrites(io.RawIOBase):
    """A standard stream's file descriptor, as a raw stream whose ``write`` writes all it is
    given or raises.

    A pipe whose reader leaves in the middle of a large write takes part of it, and Python's
    buffered writer then returns without writing the rest and without an error: `gapfill
    status --json | head -c 10` lost its output's tail and exited 0. Writing the rest here
    meets EPIPE (``BrokenPipeError``), so the command ends as SIGPIPE would (141), as
    `gapfill enrich | head` does.
    """

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd
        #: The error of the write the descriptor refused (ENOSPC, EFBIG), if one did.
        self.refused: OSError | None = None

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return os.isatty(self._fd)

    def write(self, data: Any, /) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except OSError as exc:
                self.refused = exc
                raise
        return done


#: The streams :func:`_whole_writes` replaced, kept so that nothing closes them.
_replaced_streams: list[Any] = []
#: Standard output's :class:`_WholeWrites`, where it has one: its refusals are said as such.
_whole_stdout: list[_WholeWrites] = []


def _whole_writes() -> None:
    """Put standard output and error (those that are not terminals) on :class:`_WholeWrites`."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            fd = stream.fileno()
            if os.isatty(fd):  # a terminal takes every write whole
                continue
            stream.flush()
        except (AttributeError, OSError, ValueError):  # no descriptor, or gone already
            continue
        _replaced_streams.append(stream)
        raw = _WholeWrites(fd)
        if name == "stdout":
            _whole_stdout.append(raw)
        setattr(sys, name, io.TextIOWrapper(
            io.BufferedWriter(raw), encoding=stream.encoding, errors=stream.errors,
            line_buffering=stream.line_buffering, write_through=stream.write_through,
        ))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """The console script: run the command, then leave without tearing the interpreter down.

    When the command is done (every store closed, every commit awaited), the atexit
    handlers run and the streams are flushed as at a normal exit; what is skipped is
    freeing every module and object, which takes ~30 ms with aiohttp loaded and ~60 ms
    with libpq too: a tenth of a small run. An exception other than SystemExit still
    ends the normal way, traceback included.
    """
    _whole_writes()
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="gapfill")
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
