"""Typed settings: built-in defaults < config.toml < CHATD_SECTION__KEY env < CLI flags.

Every key lives in one frozen dataclass per `config.toml` section; constraints sit
next to the default in field metadata, so `config.toml`, the loader and the
validation cannot drift apart. Errors name the key and exit the CLI with code 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ENV_PREFIX = "CHATD_"
EXIT_CONFIG = 2  # the exit code of every configuration error


class ConfigError(Exception):
    """An invalid setting; the message names the key and is shown as is."""


def _opt(default: Any, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, secret: bool = False) -> Any:
    meta = {"lo": lo, "hi": hi, "choices": choices}
    return field(default=default, metadata=meta, repr=not secret)


@dataclass(frozen=True)
class ServerSettings:
    host: str = _opt("127.0.0.1")
    port: int = _opt(8080, lo=1, hi=65535)
    node_id: str = _opt("")
    data_dir: str = _opt("./data")
    workers: int = _opt(1, lo=0, hi=256)
    ops_port: int = _opt(0, lo=0, hi=65535)
    worker_timeout_s: float = _opt(30.0, lo=0, hi=3600)
    shutdown_timeout_s: float = _opt(10.0, lo=0.1, hi=3600)
    max_http_body_bytes: int = _opt(65536, lo=1024, hi=16 * 1024 * 1024)
    request_timeout_s: float = _opt(10.0, lo=0.1, hi=3600)
    send_timeout_s: float = _opt(30.0, lo=1, hi=3600)
    allowed_origins: tuple[str, ...] = _opt(())
    trusted_proxies: tuple[str, ...] = _opt(())
    log_level: str = _opt("info", choices=("debug", "info", "warning", "error"))
    log_format: str = _opt("auto", choices=("auto", "json", "text"))


@dataclass(frozen=True)
class RedisSettings:
    url: str = _opt("embedded")
    cluster_nodes: tuple[str, ...] = _opt(())
    partitions: int = _opt(16, lo=1, hi=1024)
    socket_timeout_s: float = _opt(2.0, lo=0.05, hi=60)
    connect_timeout_s: float = _opt(2.0, lo=0.05, hi=60)
    startup_timeout_s: float = _opt(10.0, lo=0.1, hi=600)
    max_connections: int = _opt(64, lo=2, hi=10000)

    def __repr__(self) -> str:
        return (f"RedisSettings(url={redact_url(self.url)!r}, "
                f"cluster_nodes={self.cluster_nodes!r}, partitions={self.partitions})")


@dataclass(frozen=True)
class EmbeddedSettings:
    binary: str = _opt("")
    appendfsync: str = _opt("everysec", choices=("always", "everysec", "no"))
    aof_rewrite_min_mb: int = _opt(512, lo=1, hi=1024 * 1024)


@dataclass(frozen=True)
class AuthSettings:
    secret: str = _opt("", secret=True)
    session_ttl_s: int = _opt(7 * 24 * 3600, lo=60, hi=365 * 24 * 3600)
    argon2_time_cost: int = _opt(3, lo=1, hi=100)
    argon2_memory_kib: int = _opt(65536, lo=8, hi=4 * 1024 * 1024)
    argon2_parallelism: int = _opt(4, lo=1, hi=64)
    login_rate_per_s: float = _opt(1.0, lo=0.001, hi=1_000_000)
    login_burst: int = _opt(10, lo=1, hi=1_000_000)


@dataclass(frozen=True)
class LimitsSettings:
    max_body_chars: int = _opt(4000, lo=1, hi=1_000_000)
    max_name_chars: int = _opt(100, lo=1, hi=10_000)
    max_frame_bytes: int = _opt(65536, lo=1024, hi=16 * 1024 * 1024)
    auth_timeout_s: float = _opt(5.0, lo=0.1, hi=600)
    hello_waits_per_ip: int = _opt(4096, lo=1, hi=1_000_000)
    welcomes_at_once: int = _opt(32, lo=1, hi=100_000)
    max_connections_per_node: int = _opt(0, lo=0, hi=100_000_000)
    heartbeat_s: float = _opt(20.0, lo=0.5, hi=3600)
    max_connections_per_user: int = _opt(16, lo=1, hi=10_000)
    invalid_frames_max: int = _opt(10, lo=1, hi=1_000_000)
    invalid_frames_window_s: float = _opt(60.0, lo=1, hi=86400)
    send_rate_per_s: float = _opt(20.0, lo=0.001, hi=1_000_000)
    send_burst: int = _opt(40, lo=1, hi=1_000_000)
    room_ops_rate_per_s: float = _opt(1.0, lo=0.001, hi=1_000_000)
    room_ops_burst: int = _opt(1000, lo=1, hi=1_000_000)
    read_rate_per_s: float = _opt(100.0, lo=0.001, hi=1_000_000)
    read_burst: int = _opt(1000, lo=1, hi=1_000_000)
    frame_rate_per_s: float = _opt(100.0, lo=0.001, hi=1_000_000)
    frame_burst: int = _opt(200, lo=1, hi=1_000_000)
    send_queue_max: int = _opt(2048, lo=16, hi=1_000_000)
    idempotency_ttl_s: int = _opt(86400, lo=1, hi=30 * 86400)
    max_room_members: int = _opt(10000, lo=2, hi=1_000_000)
    max_rooms_per_user: int = _opt(10000, lo=1, hi=1_000_000)


@dataclass(frozen=True)
class MessagesSettings:
    retention: str = _opt("maxlen", choices=("maxlen", "max_age"))
    max_len: int = _opt(1_000_000, lo=100, hi=2**53)
    max_age_s: int = _opt(90 * 86400, lo=60, hi=100 * 365 * 86400)


@dataclass(frozen=True)
class FanoutSettings:
    heartbeat_interval_s: float = _opt(2.0, lo=0.1, hi=600)
    node_ttl_s: float = _opt(10.0, lo=0.5, hi=3600)
    janitor_interval_s: float = _opt(5.0, lo=0.1, hi=3600)
    inbox_max_len: int = _opt(100_000, lo=100, hi=100_000_000)
    read_count: int = _opt(512, lo=1, hi=100_000)
    block_ms: int = _opt(1000, lo=10, hi=60_000)
    coalesce_ms: float = _opt(5.0, lo=0, hi=1000)


@dataclass(frozen=True)
class DurabilitySettings:
    replicas: int = _opt(0, lo=0, hi=16)
    wait_timeout_ms: int = _opt(200, lo=1, hi=60_000)


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    messages: MessagesSettings = field(default_factory=MessagesSettings)
    fanout: FanoutSettings = field(default_factory=FanoutSettings)
    durability: DurabilitySettings = field(default_factory=DurabilitySettings)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir)


def redact_url(url: str) -> str:
    """Hide a password in a Redis URL so settings can be logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    user = f"{parts.username}:" if parts.username else ":"
    netloc = f"{user}***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def load(file: Path | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None) -> Settings:
    """Merge the layers and validate. `flags` maps "section.key" to a value."""
    raw: dict[str, dict[str, Any]] = {}
    if file is not None:
        _merge(raw, _read_toml(file), source=str(file))
    _merge(raw, _from_env(os.environ if env is None else env), source="environment")
    for dotted, value in (flags or {}).items():
        if value is not None:
            section, key = dotted.split(".", 1)
            raw.setdefault(section, {})[key] = value
    return _build(raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, key = name[len(ENV_PREFIX):].lower().split("__", 1)
        out.setdefault(section, {})[key] = _EnvValue(name, value)
    return out


@dataclass(frozen=True)
class _EnvValue:
    """A raw string from the environment, converted once the target type is known."""

    name: str
    text: str


def _merge(raw: dict[str, dict[str, Any]], layer: Mapping[str, Any], *, source: str) -> None:
    for section, values in layer.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: [{section}] must be a table of keys")
        raw.setdefault(section, {}).update(values)


def _build(raw: Mapping[str, Mapping[str, Any]]) -> Settings:
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    built: dict[str, Any] = {}
    for section, values in raw.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]")
        cls = typing.get_type_hints(Settings)[section]
        built[section] = _build_section(section, cls, values)
    settings = Settings(**built)
    _check_redis(settings.redis)
    _check_proxies(settings.server)
    return settings


def _check_proxies(server: ServerSettings) -> None:
    for entry in server.trusted_proxies:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ConfigError(f"server.trusted_proxies: expected an IP address or network "
                              f"(e.g. 10.0.0.0/8), got {entry!r}") from None


def _check_redis(redis: RedisSettings) -> None:
    scheme = urlsplit(redis.url).scheme
    if redis.url != "embedded" and scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"redis.url: expected 'embedded' or a redis://, rediss:// or unix:// "
                          f"URL, got {redact_url(redis.url)!r}")
    for node in redis.cluster_nodes:
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"redis.cluster_nodes: expected HOST:PORT, got {node!r}")


def _build_section(section: str, cls: type[Any], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key {section}.{key}")
        name = f"{section}.{key}"
        kwargs[key] = _check(name, _coerce(name, hints[key], value), fields[key].metadata)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    if isinstance(value, _EnvValue):
        value = _parse_env(name, hint, value)
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is tuple:
        ok = isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # pragma: no cover - a new field type without a rule here is a programming error
        raise TypeError(f"no coercion rule for {name}: {hint}")
    if not ok:
        raise ConfigError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    return value


def _parse_env(name: str, hint: Any, value: _EnvValue) -> Any:
    text = value.text.strip()
    try:
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise ConfigError(f"{name} (from {value.name}): expected {_type_name(hint)}, "
                          f"got {value.text!r}") from None
    if hint is str:
        return value.text
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> Any:
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ConfigError(f"{name}: must be between {lo:g} and {hi:g}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        hint, str(hint))
