"""Settings precedence: flag > environment > config file > default."""

from __future__ import annotations

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
    [("db = [", "not valid TOML"), ("[[endpoints]]\nrps = 3\n", "needs a url"),
     ('[[endpoints]]\nurl = "https://x"\nrps = -1\n', "positive"),
     ('[[endpoints]]\nurl = "https://x"\nmax_batch = 0\n', "positive integer"),
     ('[[endpoints]]\nurl = "https://x"\nrps = true\n', "positive number"),
     ("enrich = 5\n", "must be a table"), ("explorer = 5\n", "must be a table"),
     ("endpoints = 5\n", "array of tables")],
)  # fmt: skip
def test_bad_config_files_say_what_to_fix(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(write(tmp_path, text))


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
    ],
)
def test_malformed_rpc_urls_are_refused_before_any_call(url: str, needle: str) -> None:
    from gapfill.rpc.config import EndpointConfig

    with pytest.raises(ConfigError) as err:
        EndpointConfig(url)
    assert needle in str(err.value) and "SECRETKEY" not in str(err.value)
