"""Settings precedence: flag > environment > config file > default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gapfill.errors import ConfigError
from gapfill.settings import EndpointSetting, load_config, resolve_endpoints


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "gapfill.toml"
    p.write_text(text)
    return str(p)


def test_file_endpoints_and_flag_precedence(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
db = "sqlite:///from-file.db"
[[endpoints]]
url = "https://a.example/KEY1"
rps = 25
max_batch = 100
[[endpoints]]
url = "https://b.example/KEY2"
"""))
    assert cfg.db == "sqlite:///from-file.db"
    assert resolve_endpoints((), None, None, cfg) == [
        EndpointSetting("https://a.example/KEY1", 25.0, 100), EndpointSetting("https://b.example/KEY2")
    ]
    # --rps beats the file for every endpoint
    assert [e.rps for e in resolve_endpoints((), 5.0, None, cfg)] == [5.0, 5.0]
    # --rpc-url beats the file's list, keeping the file's limits for a URL it names
    assert resolve_endpoints(("https://a.example/KEY1,https://c.example",), None, None, cfg) == [
        EndpointSetting("https://a.example/KEY1", 25.0, 100), EndpointSetting("https://c.example")
    ]


def test_config_location_env_and_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config().path is None
    write(tmp_path, 'db = "sqlite:///here.db"\n')
    assert load_config().db == "sqlite:///here.db"
    other = tmp_path / "other.toml"
    other.write_text('db = "sqlite:///env.db"\n')
    monkeypatch.setenv("GAPFILL_CONFIG", str(other))
    assert load_config().db == "sqlite:///env.db"
    assert load_config(str(tmp_path / "gapfill.toml")).db == "sqlite:///here.db"


@pytest.mark.parametrize(
    ("text", "needle"),
    [("db = [", "not valid TOML"),
     ("[[endpoints]]\nrps = 3\n", 'endpoints[0] needs a url = "...": add it in'),
     ('[[endpoints]]\nurl = "https://x"\nrps = -1\n', "rps must be a positive number: fix it in"),
     ('[[endpoints]]\nurl = "https://x"\nmax_batch = 0\n', "max_batch must be a positive integer: fix it in"),
     ('[[endpoints]]\nurl = "https://x"\nrps = true\n', "positive number"),
     # TOML allows nan and inf: both pass ``rps <= 0``, and the run crashed on int(nan).
     ('[[endpoints]]\nurl = "https://x"\nrps = nan\n', "endpoints[0].rps must be a positive number: fix it"),
     ('[[endpoints]]\nurl = "https://x"\nrps = inf\n', "endpoints[0].rps must be a positive number: fix it"),
     ('[[endpoints]]\nurl = "https://x"\nrps = -inf\n', "endpoints[0].rps must be a positive number: fix it"),
     ('[[endpoints]]\nurl = "https://x"\nrps = 0\n', "endpoints[0].rps must be a positive number: fix it"),
     ('[[endpoints]]\nurl = "https://x"\nmax_batch = true\n', "max_batch must be a positive integer"),
     ('[[endpoints]]\nurl = "https://x"\nmax_batch = 2.5\n', "max_batch must be a positive integer"),
     ("enrich = 5\n", "enrich must be a table ([enrich] and key = value): fix it in"),
     ("explorer = 5\n", "must be a table"),
     ("endpoints = 5\n", "endpoints must be an array of tables ([[endpoints]] blocks): fix it in"),
     ('[[endpoints]]\nurl = "eth.example.com/v2/KEY"\n',
      "RPC URL 'eth.example.com/v2/***' has no scheme"),
     ("[explorer]\nurl = 5\n", "[explorer] url must be a string URL: fix it in"),
     ("db = 5\n", "db must be a string URL: fix it in")],
)  # fmt: skip
def test_bad_config_files_say_what_to_fix(tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)
    # The sentence ends with what to do, and where (a TOML syntax error names the file first).
    assert str(err.value).endswith((f" in {path}", ": fix it")), str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [("workers", '"four"', "'four' is not a whole number"),
     ("workers", "0", "0 is not in the range 1<=x<=64"),
     ("workers", "true", "true is not a whole number"),  # as TOML spells it, not True
     ("lease_timeout_s", "nan", "nan is not a finite number"),
     ("rpc_timeout_s", "inf", "inf is not a finite number"),
     ("rpc_outage_s", "true", "true is not a number"),
     ("grace_period_s", "-1", "-1.0 is not in the range 0<=x<=86400"),
     ("grace_period_s", "1e308", "1e+308 is not in the range 0<=x<=86400"),
     ("lease_timeout_s", "1e308", "1e+308 is not in the range 0.1<=x<=86400"),
     ("rpc_outage_s", "1e9", "1000000000.0 is not in the range 1<=x<=86400")],
)  # fmt: skip
def test_a_bad_value_in_the_enrich_table_says_to_fix_it_there(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    from gapfill.cli import enrich_defaults

    path = write(tmp_path, f"[enrich]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        enrich_defaults(load_config(path))
    assert str(info.value) == f"[enrich] {key}: {problem}: fix it in {path}"


@pytest.mark.parametrize(
    ("text", "said"),
    [('dbb = "sqlite:///a.db"\n', "has no setting dbb: use db, [[endpoints]], [enrich] or [explorer]"),
     ("[enrch]\nworkers = 2\n", "has no setting [enrch]: use db,"),
     ('[[endpoint]]\nurl = "https://x"\n', "has no setting [[endpoint]]: use db,"),
     ('[[endpoints]]\nurl = "https://x"\nrsp = 3\n',
      ": endpoints[0] has no setting rsp: use url, rps or max_batch"),
     ('[explorer]\napikey = "SECRET1"\n', ": [explorer] has no setting apikey: use url or key")],
)  # fmt: skip
def test_unknown_keys_and_tables_are_refused_by_name(tmp_path: Path, text: str, said: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"config file {path}") and said in str(info.value)
    assert "SECRET1" not in str(info.value)


def test_every_documented_setting_is_read(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, """
db = "sqlite:///x.db"
[[endpoints]]
url = "https://a.example"
rps = 2
max_batch = 10
[enrich]
workers = 2
[explorer]
url = "https://api.example/api"
key = "K"
"""))
    assert cfg.enrich == {"workers": 2} and cfg.explorer == {"url": "https://api.example/api", "key": "K"}


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/no/such/gapfill.toml")


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("ftp://node.example/KEY", "is not an http(s) URL"),
        ("http://127.0.0.1:99999/SECRETKEY", "Port out of range"),
        ("http://:8545/SECRETKEY", "it names no host"),
        ("http://[::1:8545/SECRETKEY", "Invalid IPv6 URL"),
        # A host the resolver cannot encode (IDNA) failed the first request with
        # "internal error (ExceptionGroup ...) ... report it".
        ("https://eth..example.com/v3/SECRETKEY", "its host name has an empty label"),
        ("https://" + "a" * 64 + ".example.com/SECRETKEY", "or one over 63 characters"),
    ],
)
def test_malformed_rpc_urls_are_refused_before_any_call(url: str, needle: str) -> None:
    from gapfill.rpc.config import EndpointConfig

    with pytest.raises(ConfigError) as err:
        EndpointConfig(url)
    assert needle in str(err.value) and "SECRETKEY" not in str(err.value)


def test_the_readme_lists_exactly_the_enrich_keys_accepted() -> None:
    import re

    from gapfill.cli import _NOT_IN_CONFIG, enrich

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("`[enrich]` takes the options", 1)[1].split("Values are checked", 1)[0]
    # "| `key` | `--option` ..." or "| `key` | `-q` / `--option` ...", two to a row
    documented = dict(re.findall(r"\| `(\w+)` \| (?:`-\w` / )?`(--[\w-]+)`", table))
    accepted = {p.name: max(p.opts, key=len) for p in enrich.params
                if p.name and p.name not in _NOT_IN_CONFIG}  # fmt: skip
    assert documented == accepted


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    cfg = tmp_path / "gapfill.toml"
    cfg.write_bytes(b"\xef\xbb\xbf" + b'db = "sqlite:///bom.db"\n')
    assert load_config(str(cfg)).db == "sqlite:///bom.db"


@pytest.mark.parametrize("rps", [float("nan"), float("inf"), 0.0, -1.0])
def test_an_endpoint_refuses_an_rps_it_cannot_meter(rps: float) -> None:
    # nan passes ``rps <= 0``, and the client's int(rps) raised ValueError mid-run.
    from gapfill.rpc.config import EndpointConfig

    with pytest.raises(ConfigError, match="must be positive or unset"):
        EndpointConfig("https://x.example", rps=rps)


def _config_error(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    from click.testing import CliRunner

    from gapfill.cli import cli

    r = CliRunner().invoke(cli, [*args, "status"], env=env)
    assert "Traceback" not in r.output + r.stderr and "internal error" not in r.stderr, r.stderr
    return r.exit_code, r.stderr.strip()


@pytest.mark.parametrize("given_as", ["--config", "GAPFILL_CONFIG"])
def test_a_config_file_that_cannot_be_read_says_where_its_path_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given_as: str
) -> None:
    # A file it may not read was an "internal error (PermissionError ...)"; a directory
    # named by GAPFILL_CONFIG said "give --config a TOML file"; a FIFO "does not exist".
    path = write(tmp_path, 'db = "sqlite:///x.db"\n')
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)

    def given(p: str | Path) -> tuple[int, str]:
        if given_as == "--config":
            return _config_error(["--config", str(p)])
        return _config_error([], env={"GAPFILL_CONFIG": str(p)})

    assert given(tmp_path) == (1, f"error: config file {tmp_path} is a directory: "
                                  f"give {given_as} a TOML file")  # fmt: skip
    assert given(fifo) == (1, f"error: config file {fifo} is not a regular file: give {given_as} a TOML file")
    assert given(tmp_path / "no.toml") == (1, f"error: config file {tmp_path / 'no.toml'} does not exist: "
                                              f"fix {given_as}")  # fmt: skip

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))  # chmod 000, as root can't

    monkeypatch.setattr(Path, "read_text", refused)
    assert given(path) == (1, f"error: cannot read config file {path} (Permission denied): fix {given_as}")


def test_an_unreadable_gapfill_toml_in_the_working_directory_says_how_to_skip_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, 'db = "sqlite:///x.db"\n')

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise OSError(5, "Input/output error", str(self))

    monkeypatch.setattr(Path, "read_text", refused)
    assert _config_error([]) == (1, "error: cannot read config file gapfill.toml (Input/output error): "
                                    "fix it, or pass --config '' to read none")  # fmt: skip
