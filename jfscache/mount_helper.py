"""`mount.jfscache`: the helper mount(8) runs for `mount -t jfscache` and for
/etc/fstab lines, turning `-o` options into `jfscache mount` flags:

    mount -t jfscache redis://meta:6379/1 /mnt/research -o cache-dir=/nvme/jfs,cache-size=400G
    # /etc/fstab
    redis://meta:6379/1  /mnt/research  jfscache  _netdev,cache-dir=/nvme/jfs,cache-size=400G  0 0

Install: .ci/setup links it as /sbin/mount.jfscache (or: ln -s /path/to/.venv/bin/mount.jfscache /sbin/)
Options mount(8) itself uses (_netdev, defaults, auto, noauto, nofail, user,
users, rw, x-systemd.*, ...) are left out; `ro` is refused (not supported);
every other `name[=value]` becomes `--name [value]`. The daemon detaches once
the mount answers, as mount(8) expects.
"""
from __future__ import annotations

import os
import sys

_IGNORED = {"_netdev", "defaults", "auto", "noauto", "nofail", "user", "users", "nouser", "owner", "group",
            "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "atime", "noatime", "relatime",
            "nodiratime", "async", "sync", "loop"}


def translate(options: str) -> list[str]:
    """Comma-separated mount options -> jfscache mount flags."""
    flags: list[str] = []
    for opt in filter(None, options.split(",")):
        name, eq, value = opt.partition("=")
        if name in _IGNORED or name.startswith(("x-", "comment=")):
            continue
        if name == "ro":
            raise SystemExit("mount.jfscache: read-only mounts are not supported")
        if name == "secrets-file":  # a top-level option: passed on through the environment
            os.environ["JFSCACHE_SECRETS_FILE"] = value
            continue
        flags.append("--" + name)
        if eq:
            flags.append(value)
    return flags


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    options, positional = "", []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            options = ",".join(filter(None, [options, args[i + 1]]))
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options = ",".join(filter(None, [options, a[2:]]))
        elif a in ("-n", "-f", "-s", "-v", "-r", "-w"):  # mount(8)'s own flags for helpers
            pass
        elif a == "-t":
            i += 1  # "-t jfscache"
        else:
            positional.append(a)
        i += 1
    if len(positional) != 2:
        raise SystemExit("usage: mount.jfscache META_URL MOUNTPOINT [-o options]")
    from .cli import main as cli_main
    sys.argv = ["jfscache", "mount", positional[0], positional[1], *translate(options), "-d"]
    os.environ.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")  # mount(8) may run us with a bare environment
    cli_main()


if __name__ == "__main__":
    main()
