"""Config loading: precedence, unknown keys, types, and the shipped config.toml."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from tusd_py import cli
from tusd_py.config import Config, ConfigError, MiB, ServerConfig, all_keys, env_name, load_config, parse_size
from tusd_py.http.limits import HTTPLimits

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 1080
    assert config.server.base_path == "/files/"
    assert config.store.backend == "file"
    assert config.store.file.directory == "./data"
    assert config.lock.backend == "memory"


def test_shipped_config_toml_lists_every_key_with_its_default() -> None:
    with open(ROOT / "config.toml", "rb") as file:
        table = tomllib.load(file)
    shipped: dict[str, object] = {}

    def walk(node: dict[str, object], path: str) -> None:
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else key
            if isinstance(value, dict):
                walk(value, dotted)
            else:
                shipped[dotted] = value

    walk(table, "")
    assert set(shipped) == set(all_keys()), "config.toml and config.py disagree on keys"
    from_file = load_config(ROOT / "config.toml", environ={})
    assert _normalized(from_file) == _normalized(Config()), "config.toml shows a value other than the default"


def _normalized(config: Config) -> dict[str, object]:
    return {key: getattr(section, key.rsplit(".", 1)[-1]) for key, (section, _) in all_keys(config).items()}


# The [server] keys that set an HTTP limit, by the limit's name in HTTPLimits.
_HTTP_LIMIT_KEYS = {
    "max_header_size": "max_header_size",
    "header_timeout": "header_timeout",
    "keepalive_timeout": "keepalive_timeout",
    "body_timeout": "network_timeout",
    "max_connections": "max_connections",
    "drain_limit": "drain_limit",
}


def test_http_limits_defaults_agree_in_http_layer_config_and_config_toml() -> None:
    defaults = HTTPLimits()
    shipped = load_config(ROOT / "config.toml", environ={})
    for limit, key in _HTTP_LIMIT_KEYS.items():
        assert getattr(ServerConfig(), key) == getattr(defaults, limit), f"server.{key} vs HTTPLimits.{limit}"
        assert getattr(shipped.server, key) == getattr(defaults, limit), f"config.toml server.{key}"
    assert ServerConfig().http_limits() == defaults
    assert shipped.server.http_limits() == defaults
    # A limit that gets a [server] key of the same name must be in the table above.
    shared = {f.name for f in dataclasses.fields(HTTPLimits)} & {f.name for f in dataclasses.fields(ServerConfig)}
    assert shared == set(_HTTP_LIMIT_KEYS) - {"body_timeout"}


def test_server_keys_set_the_http_limits(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nnetwork_timeout = 30\nkeepalive_timeout = 5\nmax_header_size = \"8KiB\"\n")
    limits = load_config(path, environ={"TUSD_PY_SERVER_MAX_CONNECTIONS": "7"}).server.http_limits()
    assert (limits.body_timeout, limits.keepalive_timeout, limits.max_header_size) == (30, 5, 8 * 1024)
    assert limits.max_connections == 7
    assert limits.drain_timeout == HTTPLimits().drain_timeout  # no key: the HTTP layer's default


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nport = 2000\nhost = '0.0.0.0'\n[store.file]\ndirectory = '/x'\n")
    config = load_config(path, environ={"TUSD_PY_SERVER_PORT": "3000"}, overrides={})
    assert (config.server.port, config.server.host, config.store.file.directory) == (3000, "0.0.0.0", "/x")
    config = load_config(path, environ={"TUSD_PY_SERVER_PORT": "3000"}, overrides={"server.port": 4000})
    assert config.server.port == 4000


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "[server]\nprot = 1\n")
    with pytest.raises(ConfigError, match="'server.prot'"):
        load_config(path, environ={})


def test_unknown_section_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "[stroe]\nbackend = 'file'\n")
    with pytest.raises(ConfigError, match="'stroe'"):
        load_config(path, environ={})


def test_unknown_environment_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="TUSD_PY_SERVER_PROT"):
        load_config(environ={"TUSD_PY_SERVER_PROT": "1"})


def test_type_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server.port"):
        load_config(_write(tmp_path, "[server]\nport = 'eighty'\n"), environ={})
    with pytest.raises(ConfigError, match="server.behind_proxy"):
        load_config(environ={"TUSD_PY_SERVER_BEHIND_PROXY": "maybe"})


@pytest.mark.parametrize(("value", "expected"), [
    (42, 42),
    (0, 0),
    ("42", 42),
    ("42B", 42),
    ("8MiB", 8 * MiB),
    ("8 MiB", 8 * MiB),
    ("1KiB", 1024),
    ("1GiB", 1024**3),
    ("1TiB", 1024**4),
    ("8MB", 8_000_000),
    ("1kB", 1000),
    ("1KB", 1000),
    ("1GB", 1_000_000_000),
    ("2TB", 2 * 1000**4),
])
def test_accepted_size_forms(value: object, expected: int) -> None:
    assert parse_size(value, "k") == expected


@pytest.mark.parametrize("value", [
    1.5,  # a TOML float: never silently cut to 1
    2.0,
    -1,
    True,
    "1.5GiB",  # fractions of a unit: write "1536MiB"
    "8M",  # ambiguous: MB or MiB?
    "8K",
    "1G",
    "1gb",  # lower-case b is a bit
    "8mib",
    "8Mb",
    "8 parsecs",
    "MiB",
    "-8MiB",
    "8  MiB",
    "",
])
def test_refused_size_forms_are_one_line_errors(value: object) -> None:
    with pytest.raises(ConfigError) as error:
        parse_size(value, "server.max_size")
    message = str(error.value)
    assert message.startswith("server.max_size: ") and "\n" not in message
    assert repr(value) in message


def test_size_errors_from_a_file_and_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.max_size.*1\.5"):
        load_config(_write(tmp_path, "[server]\nmax_size = 1.5\n"), environ={})
    with pytest.raises(ConfigError, match=r"store\.s3\.part_size.*'8M'"):
        load_config(environ={"TUSD_PY_STORE_S3_PART_SIZE": "8M"})
    config = load_config(environ={"TUSD_PY_STORE_S3_PART_SIZE": "16MiB"})
    assert config.store.s3.part_size == 16 * MiB


def test_env_names() -> None:
    assert env_name("store.s3.bucket") == "TUSD_PY_STORE_S3_BUCKET"
    names = [env_name(key) for key in all_keys()]
    assert len(names) == len(set(names)), "two keys map to one environment variable"


def test_cross_field_validation() -> None:
    with pytest.raises(ConfigError, match="workers"):
        load_config(environ={"TUSD_PY_SERVER_WORKERS": "2"})
    load_config(environ={"TUSD_PY_SERVER_WORKERS": "2", "TUSD_PY_LOCK_BACKEND": "file"})
    with pytest.raises(ConfigError, match="bucket"):
        load_config(environ={"TUSD_PY_STORE_BACKEND": "s3"})
    with pytest.raises(ConfigError, match="part_size"):
        load_config(environ={"TUSD_PY_STORE_S3_PART_SIZE": "1MiB"})
    with pytest.raises(ConfigError, match="base_path"):
        load_config(environ={"TUSD_PY_SERVER_BASE_PATH": "files"})
    assert load_config(environ={"TUSD_PY_SERVER_BASE_PATH": "/up"}).server.base_path == "/up/"


def test_list_from_environment() -> None:
    config = load_config(environ={"TUSD_PY_CORS_ALLOW_ORIGINS": "https://a.example, https://b.example"})
    assert config.cors.allow_origins == ["https://a.example", "https://b.example"]


def test_cors_header_lists_must_hold_header_names() -> None:
    config = load_config(environ={"TUSD_PY_CORS_ALLOW_HEADERS": "X-Api-Key, X-Tenant"})
    assert config.cors.allow_headers == ["X-Api-Key", "X-Tenant"]
    with pytest.raises(ConfigError, match="cors.expose_headers: 'X Bad'"):
        load_config(environ={"TUSD_PY_CORS_EXPOSE_HEADERS": "X Bad"})


def test_cli_flags_override(tmp_path: Path) -> None:
    args = cli._parser().parse_args(["--port", "9999", "--directory", str(tmp_path), "--host", "::1"])
    config = cli.config_from_args(args)
    assert (config.server.port, config.server.host, config.store.file.directory) == (9999, "::1", str(tmp_path))


def test_cli_reports_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "[server]\nbogus = 1\n")
    assert cli.main(["--config", str(path)]) == 2
    assert "server.bogus" in capsys.readouterr().err


def test_cli_help_explains_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--host", "--port", "--directory"):
        assert flag in out


def test_cli_help_shows_the_command_as_optional(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n", 1)[0]
    assert "COMMAND ..." not in usage and "{cleanup}" not in usage
    assert "tusd-py [options]" in usage and "tusd-py [options] cleanup" in usage
