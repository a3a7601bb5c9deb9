"""Settings: flags beat environment variables, which beat the config file, which beats defaults.

The config file is TOML. Its location is ``--config PATH``, else ``GAPFILL_CONFIG``,
else ``./gapfill.toml`` when it exists. Example::

    db = "postgresql://gapfill@db.internal/chain"

    [[endpoints]]
    url = "https://eth-mainnet.example.com/v2/KEY"
    rps = 25            # calls per second, per host
    max_batch = 100     # calls per JSON-RPC batch

    [[endpoints]]
    url = "https://backup.example.com/KEY"
    rps = 10

    [enrich]            # defaults for `enrich` and `worker` (their flags win);
                        # rpc_timeout_s also for `discover` and `contract add`
    batch_size = 500
    rpc_batch_size = 100
    workers = 4
    lease_timeout_s = 300

    [explorer]
    url = "https://api.etherscan.io/v2/api"
    key = "..."
"""

from __future__ import annotations

import math
import os
from dataclasses import field
from pathlib import Path
from typing import Any

from gapfill.errors import ConfigError
from gapfill.records import record
from gapfill.rpc.config import FLAG_CHECK, EndpointConfig, file_check, parse_rpc_urls

DEFAULT_CONFIG_NAME = "gapfill.toml"
#: Calls per JSON-RPC batch when enriching (``--rpc-batch-size``): 50 transactions, each
#: with its receipt, per request. Measured on anvil (80,000 transactions, batch mode):
#: against 50 calls per request, about 13% less of gapfill's CPU and a little less of
#: the node's, as each request costs both sides the same whatever its size. An endpoint
#: that refuses a batch this large has it halved and remembered. 400 and 1,000 calls took
#: 10-15% less of gapfill's CPU again, but moved throughput on anvil by no more than the
#: noise (2-5%, three alternating rounds), and more providers refuse them.
ENRICH_RPC_BATCH = 100


@record
class EndpointSetting:
    url: str
    rps: float | None = None
    max_batch: int | None = None
    #: Where the URL came from, as a message's "check ..." names it.
    check: str = field(default=FLAG_CHECK, compare=False)


@record
class FileConfig:
    """What a config file says; every field is optional."""

    path: str | None = None
    db: str | None = None
    endpoints: tuple[EndpointSetting, ...] = ()
    enrich: dict[str, Any] = field(default_factory=dict)
    explorer: dict[str, Any] = field(default_factory=dict)


#: What a config file may hold, as it is written there. [enrich]'s keys are the options of
#: `enrich`, checked by the CLI, which owns them.
_TOP_LEVEL = ("db", "[[endpoints]]", "[enrich]", "[explorer]")
_ENDPOINT_KEYS = ("url", "rps", "max_batch")
_EXPLORER_KEYS = ("url", "key")


def _no_unknown_keys(where: str, table: dict[str, Any], known: tuple[str, ...]) -> None:
    """A mistyped key must not be ignored: ``dbb = ...`` would quietly use the default database."""
    names = {k.strip("[]") for k in known}
    unknown = [_as_written(k, v) for k, v in table.items() if k not in names]
    if unknown:
        raise ConfigError(f"{where} has no setting {', '.join(unknown)}: use {_or_list(known)}")


def _as_written(key: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"[{key}]"
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return f"[[{key}]]"
    return key


def _or_list(items: tuple[str, ...]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


#: Where a config file's path came from, as a message says to fix it: the flag, the
#: environment variable, or None for ./gapfill.toml found in the working directory.
ConfigSource = str | None


def config_path(explicit: str | None, given_as: str = "--config") -> Path | None:
    """The config file to read: --config, else GAPFILL_CONFIG, else ./gapfill.toml if there.
    An empty --config or GAPFILL_CONFIG means none (to skip a ./gapfill.toml). ``given_as``
    names where ``explicit`` came from (``--config``, or ``GAPFILL_CONFIG`` when click read
    the flag's value from it), as a message about it says what to fix."""
    found = _config_path(explicit, given_as)
    return None if found is None else found[0]


def _config_path(explicit: str | None, given_as: str) -> tuple[Path, ConfigSource] | None:
    if explicit == "":
        return None
    if explicit:
        return _config_file(explicit, given_as), given_as
    env = os.environ.get("GAPFILL_CONFIG")
    if env == "":
        return None
    if env:
        return _config_file(env, "GAPFILL_CONFIG"), "GAPFILL_CONFIG"
    p = Path(DEFAULT_CONFIG_NAME)
    return (p, None) if p.is_file() else None


def _config_file(text: str, given_as: str) -> Path:
    """``text``, the path ``given_as`` gave, checked: a FIFO read would block, and it said
    "does not exist"; a directory or a path it may not look into is the user's to fix."""
    p = Path(text)
    try:
        if p.is_dir():
            raise ConfigError(f"config file {text} is a directory: give {given_as} a TOML file")
        if not p.exists():
            raise ConfigError(f"config file {text} does not exist: fix {given_as}")
        if not p.is_file():
            raise ConfigError(f"config file {text} is not a regular file: give {given_as} a TOML file")
    except OSError as exc:
        raise _unreadable(p, exc, given_as) from None
    return p


def _unreadable(path: Path, exc: OSError, given_as: ConfigSource) -> ConfigError:
    fix = f"fix {given_as}" if given_as else "fix it, or pass --config '' to read none"
    return ConfigError(f"cannot read config file {path} ({exc.strerror or exc}): {fix}")


def load_config(explicit: str | None = None, given_as: str = "--config") -> FileConfig:
    """The config file's settings (see :func:`config_path`; ``given_as`` too)."""
    found = _config_path(explicit, given_as)
    if found is None:
        return FileConfig()
    path, source = found
    import tomllib  # only with a config file: ~3 ms of every start-up otherwise

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # a BOM is no TOML error
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}): fix it") from None
    except OSError as exc:  # permissions, an I/O error: the user's to fix, not a gapfill bug
        raise _unreadable(path, exc, source) from None
    _no_unknown_keys(f"config file {path}", data, _TOP_LEVEL)
    for table in ("enrich", "explorer"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{table} must be a table ([{table}] and key = value): fix it in {path}")
    _no_unknown_keys(f"config file {path}: [explorer]", data.get("explorer", {}), _EXPLORER_KEYS)
    if not isinstance(data.get("endpoints", []), list):
        raise ConfigError(f"endpoints must be an array of tables ([[endpoints]] blocks): fix it in {path}")
    endpoints = []
    for i, e in enumerate(data.get("endpoints", [])):
        if not isinstance(e, dict) or not isinstance(e.get("url"), str):
            raise ConfigError(f"endpoints[{i}] needs a url = \"...\": add it in {path}")
        _no_unknown_keys(f"config file {path}: endpoints[{i}]", e, _ENDPOINT_KEYS)
        rps = e.get("rps")
        mb = e.get("max_batch")
        # TOML allows nan and inf, which pass ``rps <= 0``; True is an int to Python.
        if rps is not None and (isinstance(rps, bool) or not isinstance(rps, int | float)
                                or not math.isfinite(rps) or rps <= 0):  # fmt: skip
            raise ConfigError(f"endpoints[{i}].rps must be a positive number: fix it in {path}")
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
            raise ConfigError(f"endpoints[{i}].max_batch must be a positive integer: fix it in {path}")
        # A malformed URL is the file's mistake, said as such: its message names the key.
        EndpointConfig(e["url"], check=f"endpoints[{i}].url in {path}")
        endpoints.append(EndpointSetting(e["url"], None if rps is None else float(rps), mb,
                                         file_check(str(path))))  # fmt: skip
    explorer_url = data.get("explorer", {}).get("url")
    if explorer_url is not None and not isinstance(explorer_url, str):
        raise ConfigError(f"[explorer] url must be a string URL: fix it in {path}")
    db = data.get("db")
    if db is not None and not isinstance(db, str):
        raise ConfigError(f"db must be a string URL: fix it in {path}")
    return FileConfig(
        str(path), db, tuple(endpoints), dict(data.get("enrich", {})), dict(data.get("explorer", {}))
    )


def resolve_endpoints(
    flag_urls: tuple[str, ...], rps: float | None, max_batch: int | None, file: FileConfig,
    flag_check: str = FLAG_CHECK,
) -> list[EndpointSetting]:
    """Flag/env URLs win over the file's; ``--rps``/``--rpc-batch-size`` apply to each flag URL.
    ``flag_check`` names where the flag URLs came from (``--rpc-url`` or ``ETH_RPC_URL``)."""
    urls = parse_rpc_urls(flag_urls)
    if urls:
        by_url = {e.url: e for e in file.endpoints}
        return [
            EndpointSetting(
                u,
                rps if rps is not None else by_url.get(u, EndpointSetting(u)).rps,
                max_batch if max_batch is not None else by_url.get(u, EndpointSetting(u)).max_batch,
                flag_check,
            )
            for u in urls
        ]
    return [
        EndpointSetting(
            e.url, rps if rps is not None else e.rps, max_batch if max_batch is not None else e.max_batch,
            e.check,
        )
        for e in file.endpoints
    ]
