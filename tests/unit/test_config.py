"""Settings: layer precedence, validation errors that name the key, redaction of secrets.

Pure: no Redis, no processes. `chatd.config.load(file, env, flags)` is exercised
directly, and through `chatd.cli.settings_from(parse_args([...]))` with a real
temporary config file and a monkeypatched process environment.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from chatd import cli, config
from chatd.config import ConfigError, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CHATD_* variable of the developer's shell may leak into these tests."""
    for name in list(os.environ):
        if name.startswith("CHATD_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "chatd.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(file: Path | None = None, env: dict[str, str] | None = None,
             flags: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(file, env or {}, flags or {})
    return str(info.value)


# --- precedence ---------------------------------------------------------------------------

FILE_TEXT = """
[server]
port = 1001
host = "10.0.0.1"
shutdown_timeout_s = 3

[redis]
url = "redis://file:6379/0"
partitions = 4

[limits]
send_burst = 7
"""


def test_defaults_without_any_layer() -> None:
    settings = config.load(None, {}, {})
    assert settings == Settings()
    assert settings.server.port == 8080
    assert settings.server.host == "127.0.0.1"
    assert settings.redis.url == "embedded"
    assert settings.server.data_dir == "./data"
    assert settings.server.shutdown_timeout_s == 10.0


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    file = write(tmp_path, FILE_TEXT)
    env = {"CHATD_SERVER__PORT": "2002", "CHATD_REDIS__URL": "redis://env:6379/0",
           "CHATD_LIMITS__SEND_BURST": "8"}
    flags = {"server.port": 3003}

    only_file = config.load(file, {}, {})
    assert only_file.server.port == 1001
    assert only_file.server.host == "10.0.0.1"
    assert only_file.server.shutdown_timeout_s == 3.0
    assert isinstance(only_file.server.shutdown_timeout_s, float)  # an int in TOML
    assert only_file.redis.partitions == 4
    assert only_file.limits.send_burst == 7

    file_env = config.load(file, env, {})
    assert file_env.server.port == 2002  # env beats file
    assert file_env.redis.url == "redis://env:6379/0"
    assert file_env.limits.send_burst == 8
    assert file_env.server.host == "10.0.0.1"  # untouched keys keep the file's value

    everything = config.load(file, env, flags)
    assert everything.server.port == 3003  # flag beats env and file
    assert everything.redis.url == "redis://env:6379/0"
    assert everything.redis.partitions == 4
    assert everything.server.data_dir == "./data"  # nobody set it: the default


def test_a_flag_left_unset_does_not_override(tmp_path: Path) -> None:
    file = write(tmp_path, FILE_TEXT)
    settings = config.load(file, {"CHATD_SERVER__PORT": "2002"},
                           {"server.port": None, "server.host": None})
    assert settings.server.port == 2002
    assert settings.server.host == "10.0.0.1"


def test_env_values_are_parsed_by_field_type() -> None:
    settings = config.load(None, {
        "CHATD_SERVER__PORT": " 9000 ",
        "CHATD_SERVER__SHUTDOWN_TIMEOUT_S": "2.5",
        "CHATD_REDIS__CLUSTER_NODES": "10.0.0.1:7000, 10.0.0.2:7001,",
        "CHATD_SERVER__ALLOWED_ORIGINS": "https://a.example,https://b.example",
        "chatd_server__node_id": "ignored-lowercase-prefix",
        "CHATD_NO_DOUBLE_UNDERSCORE": "ignored",
        "OTHER_SERVER__PORT": "1",
    }, {})
    assert settings.server.port == 9000
    assert settings.server.shutdown_timeout_s == 2.5
    assert settings.redis.cluster_nodes == ("10.0.0.1:7000", "10.0.0.2:7001")
    assert settings.server.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.server.node_id == ""


def test_cli_flags_beat_env_beats_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(tmp_path, FILE_TEXT)
    monkeypatch.setenv("CHATD_SERVER__PORT", "2002")
    monkeypatch.setenv("CHATD_SERVER__HOST", "10.0.0.2")
    monkeypatch.setenv("CHATD_REDIS__PARTITIONS", "8")

    settings = cli.settings_from(cli.parse_args(["--config", str(file)]))
    assert settings.server.port == 2002
    assert settings.server.host == "10.0.0.2"
    assert settings.redis.partitions == 8
    assert settings.redis.url == "redis://file:6379/0"
    assert settings.limits.send_burst == 7

    settings = cli.settings_from(cli.parse_args([
        "--config", str(file), "--port", "3003", "--host", "::1", "--node-id", "n-flag",
        "--data-dir", str(tmp_path / "d"), "--redis-url", "unix:///tmp/r.sock"]))
    assert settings.server.port == 3003
    assert settings.server.host == "::1"
    assert settings.server.node_id == "n-flag"
    assert settings.server.data_dir == str(tmp_path / "d")
    assert settings.redis.url == "unix:///tmp/r.sock"
    assert settings.redis.partitions == 8  # no flag for it: env still wins over the file


def test_cli_redis_cluster_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATD_REDIS__CLUSTER_NODES", "10.9.9.9:1")
    monkeypatch.chdir(tmp_path)  # no ./config.toml here
    settings = cli.settings_from(cli.parse_args(["--redis-cluster", "h1:7000, h2:7001"]))
    assert settings.redis.cluster_nodes == ("h1:7000", "h2:7001")


def test_cli_reads_config_toml_of_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.settings_from(cli.parse_args([])) == Settings()
    write(tmp_path, "[server]\nport = 4321\n", name="config.toml")
    assert cli.settings_from(cli.parse_args([])).server.port == 4321
    assert cli.settings_from(cli.parse_args(["--port", "4322"])).server.port == 4322


def test_cli_errors_surface_as_config_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"server\.port"):
        cli.settings_from(cli.parse_args(["--port", "70000"]))
    monkeypatch.setenv("CHATD_LIMITS__SEND_BURST", "lots")
    with pytest.raises(ConfigError, match=r"limits\.send_burst"):
        cli.settings_from(cli.parse_args([]))
    monkeypatch.delenv("CHATD_LIMITS__SEND_BURST")
    with pytest.raises(ConfigError, match="cannot read config file"):
        cli.settings_from(cli.parse_args(["--config", str(tmp_path / "missing.toml")]))


# --- invalid configuration: a ConfigError naming the key ----------------------------------


@pytest.mark.parametrize(("text", "names"), [
    ('[server]\nport = "8080"\n', ["server.port", "integer"]),
    ("[server]\nport = 80.5\n", ["server.port", "integer"]),
    ("[server]\nport = true\n", ["server.port", "integer"]),
    ("[server]\nhost = 127\n", ["server.host", "string"]),
    ('[server]\nshutdown_timeout_s = "soon"\n', ["server.shutdown_timeout_s", "number"]),
    ('[server]\nallowed_origins = "https://x"\n', ["server.allowed_origins", "list"]),
    ("[redis]\ncluster_nodes = [7000]\n", ["redis.cluster_nodes", "list"]),
])
def test_wrong_type_in_file(tmp_path: Path, text: str, names: list[str]) -> None:
    message = error_of(write(tmp_path, text))
    for name in names:
        assert name in message


@pytest.mark.parametrize(("var", "value", "key"), [
    ("CHATD_SERVER__PORT", "eighty", "server.port"),
    ("CHATD_SERVER__PORT", "80.5", "server.port"),
    ("CHATD_SERVER__SHUTDOWN_TIMEOUT_S", "soon", "server.shutdown_timeout_s"),
    ("CHATD_AUTH__SESSION_TTL_S", "", "auth.session_ttl_s"),
])
def test_wrong_type_in_env(var: str, value: str, key: str) -> None:
    message = error_of(env={var: value})
    assert key in message
    assert var in message  # the operator learns which variable to fix


def test_unknown_key(tmp_path: Path) -> None:
    assert "server.prot" in error_of(write(tmp_path, "[server]\nprot = 80\n"))
    assert "server.prot" in error_of(env={"CHATD_SERVER__PROT": "80"})
    assert "redis.pasword" in error_of(flags={"redis.pasword": "x"})


def test_unknown_section(tmp_path: Path) -> None:
    assert "[sever]" in error_of(write(tmp_path, "[sever]\nport = 80\n"))
    assert "[sever]" in error_of(env={"CHATD_SEVER__PORT": "80"})
    # A key outside any table is not a section either.
    assert "port" in error_of(write(tmp_path, "port = 80\n"))


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    file = write(tmp_path, "[server\nport = 80\n")
    assert str(file) in error_of(file)


@pytest.mark.parametrize("port", [0, -1, 65536, 70000])
def test_port_out_of_range(tmp_path: Path, port: int) -> None:
    for message in (error_of(write(tmp_path, f"[server]\nport = {port}\n")),
                    error_of(env={"CHATD_SERVER__PORT": str(port)}),
                    error_of(flags={"server.port": port})):
        assert "server.port" in message
        assert str(port) in message


def test_port_bounds_are_inclusive() -> None:
    assert config.load(None, {}, {"server.port": 1}).server.port == 1
    assert config.load(None, {}, {"server.port": 65535}).server.port == 65535


@pytest.mark.parametrize(("key", "value"), [
    ("server.shutdown_timeout_s", 0.0),
    ("redis.partitions", 0),
    ("limits.max_body_chars", 0),
    ("fanout.block_ms", 1),
    ("embedded.aof_rewrite_min_mb", 0),
])
def test_other_ranges(key: str, value: Any) -> None:
    assert key in error_of(flags={key: value})


def test_bad_choice(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, '[server]\nlog_level = "verbose"\n'))
    assert "server.log_level" in message and "verbose" in message
    assert "debug" in message  # the valid choices are listed
    assert "server.log_level" in error_of(env={"CHATD_SERVER__LOG_LEVEL": "INFO"})
    assert "server.log_format" in error_of(flags={"server.log_format": "xml"})
    assert "embedded.appendfsync" in error_of(env={"CHATD_EMBEDDED__APPENDFSYNC": "sometimes"})
    assert "messages.retention" in error_of(flags={"messages.retention": "forever"})
    for level in ("debug", "info", "warning", "error"):
        assert config.load(None, {"CHATD_SERVER__LOG_LEVEL": level}, {}).server.log_level == level


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "valkey://h:1",
                                 "", "Embedded"])
def test_bad_redis_url_scheme(url: str) -> None:
    message = error_of(flags={"redis.url": url})
    assert "redis.url" in message


@pytest.mark.parametrize("url", ["embedded", "redis://h:6379/0", "rediss://u:p@h:6380/1",
                                 "unix:///run/valkey.sock"])
def test_good_redis_urls(url: str) -> None:
    assert config.load(None, {"CHATD_REDIS__URL": url}, {}).redis.url == url


@pytest.mark.parametrize("node", ["nohost", "h:", ":7000", "h:port", "h:0", "h:65536",
                                  "h:-1"])
def test_bad_cluster_node(node: str) -> None:
    message = error_of(flags={"redis.cluster_nodes": ["ok:7000", node]})
    assert "redis.cluster_nodes" in message
    assert repr(node) in message


def test_good_cluster_nodes(tmp_path: Path) -> None:
    file = write(tmp_path, '[redis]\ncluster_nodes = ["10.0.0.1:7000", "[::1]:7001"]\n')
    assert config.load(file, {}, {}).redis.cluster_nodes == ("10.0.0.1:7000", "[::1]:7001")


@pytest.mark.parametrize("entry", ["nginx", "10.0.0.300", "10.0.0.0/33", "", "::g"])
def test_bad_trusted_proxy(entry: str) -> None:
    message = error_of(flags={"server.trusted_proxies": ["10.0.0.1", entry]})
    assert "server.trusted_proxies" in message
    assert repr(entry) in message


def test_good_trusted_proxies_from_env() -> None:
    settings = config.load(None, {"CHATD_SERVER__TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16,::1"},
                           {})
    assert settings.server.trusted_proxies == ("10.0.0.5", "10.1.0.0/16", "::1")


# --- secrets --------------------------------------------------------------------------------


def test_auth_secret_is_not_in_repr() -> None:
    secret = "s3cr3t-signing-key-0123456789"
    settings = config.load(None, {"CHATD_AUTH__SECRET": secret}, {})
    assert settings.auth.secret == secret
    assert secret not in repr(settings)
    assert secret not in repr(settings.auth)
    assert secret not in str(settings)


@pytest.mark.parametrize("url", ["redis://alice:hunter2pw@db.example:6379/0",
                                 "rediss://:hunter2pw@db.example:6380",
                                 "redis://default:hunter2pw@db.example/3"])
def test_redis_password_is_redacted(url: str) -> None:
    settings = config.load(None, {}, {"redis.url": url})
    assert settings.redis.url == url
    for text in (repr(settings), str(settings), repr(settings.redis),
                 config.redact_url(url)):
        assert "hunter2pw" not in text
        assert "db.example" in text  # still says where it connects
    assert "***" in config.redact_url(url)


def test_url_without_password_is_unchanged() -> None:
    assert config.redact_url("redis://db.example:6379/0") == "redis://db.example:6379/0"
    assert config.redact_url("embedded") == "embedded"


def test_password_not_echoed_by_an_url_error() -> None:
    message = error_of(flags={"redis.url": "http://bob:hunter2pw@db.example:6379"})
    assert "redis.url" in message and "hunter2pw" not in message


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.port = 1  # type: ignore[misc]
