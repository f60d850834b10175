"""Mount options from a TOML config file and from JFSCACHE_* environment
variables, through click's own machinery: each option's `envvar` and the
context's `default_map`. Precedence, highest first: the command line, the
environment, the config file, the built-in default (click's order).

    # jfscache --config /etc/jfscache/research.toml mount /mnt/research
    meta-url = "redis://meta:6379/1"
    cache-dir = ["/nvme/a", "/nvme/b"]
    cache-size = "400G"
    log-level = "info"

Keys are the long names of `mount`'s options (dashes or underscores), plus
`meta-url` (META_URL of mount, status, fsck and gc), `secrets-file`, and the
secrets of jfscache/secrets.py by their variable names (META_PASSWORD, ...).
A file that holds a secret (one of those, or a password in meta-url) must
be mode 0600, as a secrets file must.

No file is read unless named (--config or JFSCACHE_CONFIG): a file found
at a fixed path would change every command on the machine, the test suite's
included, without anything on the command line saying so.
"""
from __future__ import annotations

import os
import tomllib
from urllib.parse import urlsplit

import click

from . import secrets

ENV_PREFIX = "JFSCACHE_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
META_URL_ENV = ENV_PREFIX + "META_URL"
# Commands whose META_URL comes from the environment or the file when not given.
URL_COMMANDS = ("mount", "status", "fsck", "gc")
# -d from the environment or a file would reach the detached child that -d
# starts, which would detach again; --config inside a config file is a loop.
NOT_CONFIGURABLE = ("background", "config", "help")


class ConfigError(ValueError):
    """A config file that cannot be used (one line, for the CLI)."""


def long_name(param: click.Parameter) -> str:
    return max((o for o in param.opts if o.startswith("--")), key=len, default="--" + param.name)[2:]


def configurable(command: click.Command) -> dict[str, click.Option]:
    """The options a config file or the environment may set, by long name."""
    return {long_name(p): p for p in command.params
            if isinstance(p, click.Option) and long_name(p) not in NOT_CONFIGURABLE}


def add_envvars(command: click.Command) -> None:
    """--cache-size also reads JFSCACHE_CACHE_SIZE, and so on (click's
    auto_envvar_prefix would name it JFSCACHE_MOUNT_CACHE_SIZE)."""
    for name, p in configurable(command).items():
        p.envvar = ENV_PREFIX + name.upper().replace("-", "_")


def _has_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def load(path: str, mount: click.Command) -> dict:
    """The default_map of the root command for the config file at `path`.
    Its secrets go into the environment, where the environment has none:
    the environment comes before the file."""
    text, st = secrets.read(path, "config file", private=False)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    options = configurable(mount)
    ctx = click.Context(mount, info_name="mount")
    mount_map, found_secrets, top = {}, {}, {}
    for key, value in doc.items():
        name = key.replace("_", "-")
        if key in secrets.KEYS:
            found_secrets[key] = str(value)
        elif name in ("meta-url", "secrets-file"):
            if not isinstance(value, str):
                raise ConfigError(f"config file {path}: {key} must be a string, not {value!r}")
            top[name.replace("-", "_")] = value
        elif name in options:
            p = options[name]
            if p.multiple and not isinstance(value, list):
                value = [value]
            try:
                mount_map[p.name] = p.type_cast_value(ctx, value)
            except click.BadParameter as e:
                raise ConfigError(f"config file {path}: {key} = {value!r}: {e.message}") from None
        else:
            raise ConfigError(f"config file {path}: unknown key {key!r} (keys are mount's options, such as "
                              f"cache-size, and meta-url, secrets-file, {', '.join(secrets.KEYS)})")
    held = sorted(found_secrets) + (["the password in meta-url"] if _has_password(top.get("meta_url", "")) else [])
    if held:
        try:
            secrets.check_private(path, st, "config file")
        except secrets.SecretsError as e:
            raise ConfigError(f"{e} (it holds {', '.join(held)})") from None
    for k, v in found_secrets.items():
        os.environ.setdefault(k, v)
    default_map = {c: {"meta_url": top["meta_url"]} for c in URL_COMMANDS if "meta_url" in top}
    default_map.setdefault("mount", {}).update(mount_map)
    if "secrets_file" in top:
        default_map["secrets_file"] = top["secrets_file"]
    return default_map
