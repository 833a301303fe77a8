"""Settings: one table of options, read from defaults, a TOML file, ``GAIA_*`` env, the CLI.

Later sources win: defaults < ``--config FILE.toml`` < environment < command line. Every
option has the same name in all three (``--max-message-size``, ``GAIA_MAX_MESSAGE_SIZE``,
``max_message_size``). A bad value raises :class:`ConfigError` with one clear line.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["OPTIONS", "ConfigError", "Option", "Settings", "add_arguments", "load_settings"]


T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, described in one line."""


def _size(text: str) -> int:
    """``1048576``, ``1024k``, ``1m``, ``64KiB``..."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = 1
    if t and t[-1] in "kmg":
        scale = 1024 ** ("kmg".index(t[-1]) + 1)
        t = t[:-1]
    value = int(t) * scale
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _csv(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be positive")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


_OFF = ("", "0", "off", "none")


def _or_off(parse: Callable[[str], T], off: tuple[str, ...] = _OFF) -> Callable[[str], T | None]:
    """``parse``, or None (the option is off) for any of the words ``off`` (any case)."""
    def parse_or_off(text: str) -> T | None:
        return None if text.strip().lower() in off else parse(text)

    return parse_or_off


_optional_seconds = _or_off(_seconds)
_optional_csv = _or_off(_csv, ("", "none", "off", "*"))
_optional_positive_int = _or_off(_positive_int)
_optional_port = _or_off(_port, ("", "off", "none"))  # 0 is a port: any free one


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False
    env_aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "GAIA_" + self.name.upper()


OPTIONS: tuple[Option, ...] = (
    Option("host", str, "0.0.0.0", "address to listen on"),
    Option("port", _port, 8666, "port to listen on"),
    Option("upstream", str, "ws://localhost:8001/ws/experience",
           "upstream URL of the default route /ws/experience (ws:// or wss://)"),
    Option("route_path", str, "/ws/experience", "public path of the default route"),
    Option("jwt_secret", str, None, "shared secret for HS256/384/512 tokens",
           secret=True, env_aliases=("SUPABASE_JWT_SECRET",)),
    Option("jwt_algorithms", _csv, ("HS256",), "comma-separated algorithm allow-list"),
    Option("jwt_audience", _optional_csv, ("authenticated",),
           "required aud (comma list), 'none' to skip the check"),
    Option("jwt_issuer", str, None, "required iss (unset: not checked)"),
    Option("jwt_leeway", float, 0.0, "seconds of clock skew allowed on exp/nbf"),
    Option("jwt_public_key", str, None, "PEM public key file for RS*/ES*/PS* tokens"),
    Option("jwks_url", str, None, "JWKS URL, fetched off the hot path and cached"),
    Option("jwks_file", str, None, "JWKS document on disk"),
    Option("jwks_cooldown", _seconds, 60.0, "least seconds between two JWKS fetches"),
    Option("certfile", str, None,
           "TLS certificate chain (PEM): serve wss:// and https://; SIGHUP reloads it"),
    Option("keyfile", str, None, "TLS private key (PEM) for --certfile"),
    Option("upstream_ca_file", str, None, "CA bundle to verify a wss:// upstream (default: system)"),
    Option("upstream_dns_ttl", _optional_seconds, 10.0,
           "seconds to reuse an upstream host name's addresses (0: resolve every connection)"),
    Option("allowed_origins", _optional_csv, None,
           "Origin allow-list (comma list); unset: any Origin, and clients without one"),
    Option("loop", _choice("auto", "uvloop", "asyncio"), "auto",
           "event loop: uvloop (default where installed) or asyncio"),
    Option("workers", _positive_int, 1, "processes sharing the port with SO_REUSEPORT"),
    Option("log_format", _choice("text", "json"), "text", "log line format"),
    Option("log_level", _choice("debug", "info", "warning", "error"), "info", "log level"),
    Option("max_message_size", _size, 1024 * 1024, "largest message either way (close 1009)"),
    Option("max_header_bytes", _size, 16 * 1024, "largest request head (431)"),
    Option("max_connections", _positive_int, 9000, "client connections per process (503)"),
    Option("max_connections_per_ip", _optional_positive_int, None,
           "client connections one address may hold, per process (429); unset: no limit"),
    Option("handshake_timeout", _seconds, 10.0,
           "seconds for a client's TLS handshake, then for its upgrade request (408)"),
    Option("connect_timeout", _seconds, 5.0, "seconds for the upstream connect+handshake (504)"),
    Option("close_timeout", _seconds, 1.0,
           "seconds to wait for a peer's close reply (a client's TLS close too)"),
    Option("idle_timeout", _optional_seconds, None, "close sessions silent this long (off)"),
    Option("send_timeout", _seconds, 30.0, "drop a client that reads nothing for this long"),
    Option("write_buffer", _size, 64 * 1024, "per-socket write buffer high-water mark"),
    Option("shutdown_grace", _seconds, 10.0, "seconds to drain sessions on SIGTERM/SIGINT"),
    Option("metrics_port", _optional_port, None,
           "serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (unset: off; 0: any port)"),
    Option("metrics_host", str, "127.0.0.1", "address of the metrics listener"),
    Option("metrics_interval", _seconds, 5.0,
           "with --workers: seconds between two updates of each worker's share of the metrics"),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    values: Mapping[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def routes(self) -> dict[str, str]:
        routes = dict(self.values.get("routes") or {})
        routes.setdefault(self.values["route_path"], self.values["upstream"])
        return routes

    def redacted(self) -> dict[str, Any]:
        """The settings for a log line: secrets shown as '***'."""
        return {
            k: ("***" if k in _BY_NAME and _BY_NAME[k].secret and v else v)
            for k, v in self.values.items()
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML settings file (env: GAIA_CONFIG)")
    for opt in OPTIONS:
        extra = f" (env: {opt.env}" + "".join(f", {a}" for a in opt.env_aliases) + ")"
        shown = "***" if opt.secret else opt.default
        if isinstance(shown, tuple):
            shown = ",".join(shown)
        parser.add_argument(
            opt.flag, dest=opt.name, default=None, metavar=opt.name.upper(),
            help=f"{opt.help}; default {shown}{extra}",
        )


def _parse(opt: Option, raw: Any, source: str) -> Any:
    if raw is None:
        return None
    if not isinstance(raw, str):
        if isinstance(raw, list):
            raw = ",".join(str(x) for x in raw)
        elif isinstance(raw, bool):
            raise ConfigError(f"{source}: {opt.name} must not be a boolean")
        else:
            raw = str(raw)
    try:
        return opt.parse(raw)
    except ValueError as exc:
        shown = "***" if opt.secret else repr(raw)
        raise ConfigError(f"{source}: invalid {opt.name} {shown}: {exc}") from None


def load_settings(
    args: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {o.name: o.default for o in OPTIONS}
    values["routes"] = {}
    config_file = getattr(args, "config", None) or env.get("GAIA_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key == "routes":
                if not isinstance(raw, dict) or not all(
                    isinstance(v, str) for v in raw.values()
                ):
                    raise ConfigError(f"{config_file}: [routes] maps paths to upstream URLs")
                values["routes"] = dict(raw)
                continue
            opt = _BY_NAME.get(key)
            if opt is None:
                raise ConfigError(f"{config_file}: unknown setting {key!r}")
            values[key] = _parse(opt, raw, config_file)
    for opt in OPTIONS:
        for name in (opt.env, *opt.env_aliases):
            if name in env and env[name] != "":
                values[opt.name] = _parse(opt, env[name], f"environment {name}")
                break
    if args is not None:
        for opt in OPTIONS:
            raw = getattr(args, opt.name, None)
            if raw is not None:
                values[opt.name] = _parse(opt, raw, opt.flag)
    if overrides:
        values.update(overrides)
    if bool(values["certfile"]) != bool(values["keyfile"]):
        raise ConfigError("--certfile and --keyfile go together")
    return Settings(values)


def env_help(options: Sequence[Option] = OPTIONS) -> str:
    return "\n".join(f"  {o.env:28} {o.flag}" for o in options)
