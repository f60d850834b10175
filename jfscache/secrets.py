"""Secrets from a file rather than argv: `jfscache --secrets-file F ...`
(or JFSCACHE_SECRETS_FILE=F). The file holds KEY=VALUE lines, as a systemd
EnvironmentFile does, and must not be readable by group or others: a
secret on a command line shows in ps, shell history and unit files.
"""
from __future__ import annotations

import os
import stat

# What the file may set; each is read from the environment where it is used.
KEYS = ("META_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class SecretsError(ValueError):
    """The secrets file is unusable (one line, for the CLI)."""


def read(path: str, what: str = "secrets file", private: bool = True) -> tuple[str, os.stat_result]:
    """The text and stat of `path`, a regular file (a symlink is refused, so
    the file checked is the file read); with `private`, one that group and
    others cannot read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise SecretsError(f"cannot read {what} {path}: {e.strerror}") from None
    with os.fdopen(fd) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretsError(f"{what} {path} is not a regular file")
        if private:
            check_private(path, st, what)
        return f.read(), st


def check_private(path: str, st: os.stat_result, what: str = "secrets file") -> None:
    if st.st_mode & 0o077:
        raise SecretsError(f"{what} {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                           f"chmod 600 {path}")


def load(path: str) -> list[str]:
    """Put the file's secrets into this process's environment (children,
    such as a background mount, inherit them); the names that were set."""
    text, _ = read(path)
    found = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not eq or key not in KEYS:
            raise SecretsError(f"{path} line {n}: expected KEY=VALUE with KEY one of {', '.join(KEYS)}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        found[key] = value
    os.environ.update(found)
    return sorted(found)
