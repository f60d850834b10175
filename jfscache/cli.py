"""Command line: format, mount, umount, status, stats, profile.

Every expected failure (bad URL, Redis down, missing bucket, ...) ends as one
line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time

import click

from . import __version__
from .config import CONFIG_ENV, META_URL_ENV, add_envvars
from .fsutil import mount_type


class Failure(Exception):
    """An error for the user: printed as one line, exit status 1."""


def _known_errors():
    from .meta.engine import NotFormatted
    from .meta.redisio import RedisError, RedisUnavailable
    from .storage import StorageError
    from .fsutil import Busy
    from .group.node import GroupError
    from .metrics import MetricsError
    return (Failure, NotFormatted, RedisUnavailable, RedisError, StorageError, FileExistsError, ValueError, Busy,
            GroupError, MetricsError)


def parse_size(text: str, default_unit: str = "") -> int:
    """'4M', '4MiB', '400G', '1048576' → bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtTpP]?)(i?[bB])?\s*", str(text))
    if not m:
        raise Failure(f"not a size: {text!r} (examples: 4M, 400G, 1048576)")
    unit = (m.group(2) or default_unit).upper()
    return int(float(m.group(1)) * (1 << (10 * " KMGTP".index(unit or " "))))


LOG_LEVELS = ("debug", "info", "warning", "error")


def _syslog_priority(levelno: int) -> int:
    for limit, prio in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3)):
        if levelno <= limit:
            return prio
    return 2


class _JournalFormatter(logging.Formatter):
    """sd-daemon(3) lines: journald reads the `<N>` syslog priority off each
    line of a stream (a traceback's lines too) and adds its own timestamps."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def _is_journal(stream) -> bool:
    """systemd sets JOURNAL_STREAM=DEV:INODE when stdout/stderr go to the
    journal; a process whose stderr was redirected since inherits the
    variable but not the stream, hence the comparison."""
    try:
        dev, ino = (int(x) for x in os.environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _setup_logging(level: str, log_file: str | None, stream=None) -> logging.Handler:
    """The mount's one log: `log_file`, else stderr, as journal lines when
    stderr is the journal. Replaces what an earlier call set up."""
    stream = stream or sys.stderr
    if log_file:
        handler = logging.FileHandler(log_file)
    else:
        handler = logging.StreamHandler(stream)
    if not log_file and _is_journal(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.jfscache = True
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "jfscache", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("botocore", "aiobotocore", "urllib3", "asyncio", "trio_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler


def _examples(*lines: str) -> str:
    """An epilog for --help; \\b keeps click from rewrapping it."""
    return "\b\nExamples:\n" + "\n".join("  " + line for line in lines)


def _use_config(ctx: click.Context, param, path: str | None) -> None:
    """--config: the file's values become this command's defaults (below the
    command line and the environment). Eager, so it runs before the options
    that read those defaults."""
    if not path:
        return
    from . import config
    loaded = config.load(path, cli.commands["mount"])
    if ctx.command is cli:
        ctx.default_map = {**(ctx.default_map or {}), **loaded}
        return
    ctx.default_map = {**(ctx.default_map or {}), **loaded.get(ctx.info_name, {})}
    # `jfscache mount --config F`: the root's --secrets-file was settled
    # before F was read; F's applies unless the command line or environment gave one.
    if loaded.get("secrets_file") and not ctx.find_root().params.get("secrets_file"):
        from . import secrets
        secrets.load(loaded["secrets_file"])


def _config_option(**kw):
    return click.option("--config", metavar="FILE", is_eager=True, expose_value=False, callback=_use_config,
                        help="TOML file of mount options and meta-url; below the command line and "
                             "JFSCACHE_* variables (see 'jfscache mount --help')", **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_examples(
    "jfscache mount /mnt/jfs                     # the embedded volume, no setup",
    "jfscache --config /etc/jfscache/research.toml mount /mnt/research",
    "jfscache COMMAND --help                     # each command's options and examples"))
@click.version_option(__version__)
@_config_option(envvar=CONFIG_ENV)
@click.option("--secrets-file", envvar="JFSCACHE_SECRETS_FILE", metavar="FILE",
              help="KEY=VALUE lines (mode 0600) for META_PASSWORD and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                   "so no secret is on a command line")
def cli(secrets_file):
    """jfscache: a FUSE filesystem over Redis metadata and object-store blocks, with a tiered block cache."""
    if secrets_file:
        from . import secrets
        secrets.load(secrets_file)


# ---- format -----------------------------------------------------------------
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$")


@cli.command(epilog=_examples(
    "export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...",
    "jfscache format redis://meta:6379/1 research --storage s3 --bucket http://s3:9000/research",
    "jfscache format redis://meta:6379/2 scratch --bucket /data/jfs-blocks   # a local directory store"))
@click.argument("meta_url")
@click.argument("name")
@click.option("--storage", type=click.Choice(["s3", "file"]), default="file", show_default=True,
              help="object store type")
@click.option("--bucket", help="bucket URL (http://host:port/bucket) or directory (file:///path)")
@click.option("--block-size", default="4M", show_default=True, help="block size of stored objects")
@click.option("--capacity", default="0", help="volume capacity (e.g. 100G; 0 = unlimited)")
@click.option("--inodes", default=0, type=int, help="maximum number of inodes (0 = unlimited)")
@click.option("--force", is_flag=True, help="overwrite the settings of an existing volume")
def format(meta_url, name, storage, bucket, block_size, capacity, inodes, force):
    """Create a volume: its bucket (if missing) and its settings in Redis.

    S3 credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws.
    META_URL is always given here (never from a config file or the
    environment): a format aimed at the wrong volume is not undone."""
    from .meta.engine import Meta, volume_settings
    from .storage import create_storage, run_with_loop

    if not NAME_RE.match(name):
        raise Failure(f"invalid volume name {name!r}: use 3-63 lowercase letters, digits and '-'")
    if not bucket:
        if storage == "s3":
            raise Failure("--bucket is required for S3 storage (e.g. --bucket http://127.0.0.1:9000/mybucket)")
        bucket = "file://" + os.path.join(os.path.expanduser("~"), ".jfscache", "local", name)
    elif storage == "file" and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", bucket) and not bucket.startswith("file://"):
        raise Failure(f"--bucket {bucket} is a URL, but --storage is 'file' (a local directory): "
                      "add --storage s3, or give a directory")
    bs = parse_size(block_size, "K")
    if not (64 << 10) <= bs <= (16 << 20) or bs & (bs - 1):
        raise Failure("--block-size must be a power of two between 64K and 16M")
    settings = volume_settings(name, storage, bucket, bs, parse_size(capacity, "G"), inodes)
    ak, sk = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if storage == "s3" and ak and sk:
        # Saved (as JuiceFS does) so other nodes can mount with only the Redis URL.
        settings.update(access_key=ak, secret_key=sk)

    async def run():
        meta = Meta(meta_url)
        try:
            # Ask Redis first: it is the cheaper check, and refusing early
            # avoids creating a bucket for a format that will be refused.
            await meta.check_formattable(force)
            store = create_storage(storage, bucket)
            try:
                if await store.create():
                    click.echo(f"created bucket {store.url}")
                await store.check()
            finally:
                await store.close()
            await meta.format(settings, force=force)
        finally:
            await meta.aclose()

    run_with_loop(run)
    click.echo(f"formatted volume {name} (block size {bs >> 10} KiB) on {_redacted(meta_url)}, data in {bucket}")


def _redacted(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:****@", url)


# ---- status -----------------------------------------------------------------
# Not given: JFSCACHE_META_URL, meta-url of a --config file, else the embedded volume.
_meta_url_argument = click.argument("meta_url", required=False, envvar=META_URL_ENV)


@contextlib.contextmanager
def _volume_url(meta_url: str | None, command: str):
    """META_URL, or the embedded volume's, reachable while it is unmounted
    too: its redis-server runs for the duration of the command."""
    if meta_url:
        yield meta_url
        return
    from . import embedded
    state = embedded.state_dir()
    if not embedded.exists(state):
        raise Failure(f"no META_URL given (nor {META_URL_ENV}, nor meta-url in a --config file), and there is "
                      f"no embedded volume in {state} yet: 'jfscache mount MOUNTPOINT' creates it")
    with embedded.redis_for_command(state, command) as url:
        yield url


@cli.command(epilog=_examples(
    "jfscache status                          # the embedded volume (mounted or not)",
    "jfscache status redis://meta:6379/1",
    "JFSCACHE_META_URL=redis://meta:6379/1 jfscache status"))
@_meta_url_argument
def status(meta_url):
    """Show a volume's settings (secrets masked) and its active sessions."""
    from .meta.engine import Meta
    from .storage import run_with_loop

    async def run(url):
        meta = Meta(url)
        try:
            settings = dict(await meta.load())
            stats = await meta.statfs()
            return settings, await meta.sessions(), stats, await meta.pending_uploads()
        finally:
            await meta.aclose()

    with _volume_url(meta_url, "status") as url:
        settings, sessions, (_, used, _, inodes), pending = run_with_loop(run, url)
    for k in ("secret_key", "group_secret"):
        if settings.get(k):
            settings[k] = "****"
    settings["used_bytes"] = used
    settings["inodes_used"] = inodes
    click.echo(json.dumps({"setting": settings, "sessions": sessions, "pending_uploads": pending}, indent=2))


# ---- mount ------------------------------------------------------------------
@cli.command(context_settings={"ignore_unknown_options": False}, epilog=_examples(
    "jfscache mount /mnt/jfs                  # the embedded volume",
    "jfscache mount redis://meta:6379/1 /mnt/research --cache-dir /nvme/jfs --cache-size 400G -d",
    "JFSCACHE_CACHE_SIZE=400G jfscache mount redis://meta:6379/1 /mnt/research",
    "jfscache mount --config /etc/jfscache/research.toml /mnt/research"))
@click.argument("args", nargs=-1, required=True, metavar="[META_URL] MOUNTPOINT")
@_config_option()
@click.option("--cache-dir", "cache_dirs", multiple=True, help="disk cache directory (repeatable)")
@click.option("--cache-size", default="10G", show_default=True, help="disk cache size (MiB if no unit); 0 disables it")
@click.option("--free-space-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 0.9),
              help="keep at least this fraction of the cache disk free")
@click.option("--mem-cache-size", default="256M", show_default=True, help="memory cache size (MiB if no unit)")
@click.option("--buffer-size", default="300M", show_default=True, help="write buffer limit (MiB if no unit)")
@click.option("--max-uploads", default=20, show_default=True, type=click.IntRange(1, 1000),
              help="parallel block uploads")
@click.option("--prefetch", default=8, show_default=True, type=click.IntRange(0, 256),
              help="blocks prefetched ahead of a sequential reader")
@click.option("--attr-timeout", default=1.0, show_default=True, type=click.FloatRange(0, 86400),
              help="kernel attribute cache timeout (s)")
@click.option("--entry-timeout", default=1.0, show_default=True, type=click.FloatRange(0, 86400),
              help="kernel entry cache timeout (s)")
@click.option("--read-ahead-kb", default=1024, show_default=True, type=click.IntRange(0, 1 << 20),
              help="kernel readahead of the mount (0: leave it)")
@click.option("--readdir-cache", is_flag=True,
              help="let the kernel keep listings until the directory changes (by default, only within "
                   "--attr-timeout of the last listing; later listings then skip the daemon, but ls -l of "
                   "a big directory costs a lookup per entry)")
@click.option("--xattr/--no-xattr", "xattrs", default=True, show_default=True,
              help="extended attributes; --no-xattr answers the kernel's first query with 'not "
                   "implemented', after which it never asks again (as JuiceFS without --enable-xattr): "
                   "ls -l and writes then cost no xattr round trip")
@click.option("--compact-grace", default=600.0, show_default=True, type=click.FloatRange(0),
              help="seconds the objects of compacted slices are kept for readers of old slice lists")
@click.option("--meta-timeout", default=60.0, show_default=True, type=click.FloatRange(1, 86400),
              help="seconds a metadata operation waits for an unreachable Redis before it fails with EIO")
@click.option("--meta-wait-replicas", default=0, show_default=True, type=click.IntRange(0, 16),
              help="strict mode: each metadata change waits (WAIT) until this many Redis replicas have it, "
                   "else fails with EIO")
@click.option("--io-retries", default=4, show_default=True, type=click.IntRange(0, 100),
              help="retries of a failed object-store request (jittered exponential back-off)")
@click.option("--io-timeout", default=60.0, show_default=True, type=click.FloatRange(1, 86400),
              help="seconds one object-store operation may take, retries included; past it a read fails "
                   "with EIO and a write stages its block on the cache disk")
@click.option("--writeback", is_flag=True,
              help="close and fsync return once blocks are staged on the cache disk; uploads continue "
                   "in the background (and after a restart)")
@click.option("--upload-delay", default=0.0, show_default=True, type=click.FloatRange(0, 86400), metavar="SECONDS",
              help="with --writeback: upload a staged block only once it is this old (a burst of writes "
                   "then does not share the CPU with its uploads; other nodes wait that much longer for it)")
@click.option("--fuse-poll-us", default=50, show_default=True, type=click.IntRange(0, 10000), metavar="MICROSECONDS",
              help="after a reply, keep reading /dev/fuse this long for the next request before sleeping, "
                   "while nothing else runs (stat or open of one file after another: 20-35 % more per "
                   "second, for some CPU; 0: off)")
@click.option("--subdir", default="", metavar="PATH",
              help="mount only this directory of the volume (e.g. one team's data); nothing above it is reachable")
@click.option("--cache-group", help="join this cache group: blocks are shared with its members")
@click.option("--group-listen", default="0.0.0.0:9750", show_default=True,
              help="HOST:PORT where this member serves blocks to its peers")
@click.option("--group-weight", default=1.0, show_default=True, type=click.FloatRange(0),
              help="this member's share of the group's blocks (0: own nothing; to hand a running "
                   "member's blocks over before it stops, use 'jfscache group drain')")
@click.option("--group-timeout", default=5.0, show_default=True, type=click.FloatRange(1, 3600),
              help="seconds without a heartbeat before a member leaves the ring")
@click.option("--no-sharing", is_flag=True, help="read through the cache group but serve and own nothing")
@click.option("--group-tls-cert", metavar="FILE",
              help="talk to peers over mutual TLS: this member's certificate (with --group-tls-key, --group-tls-ca)")
@click.option("--group-tls-key", metavar="FILE", help="this member's TLS private key")
@click.option("--group-tls-ca", metavar="FILE", help="the group's CA: peers must show a certificate it signed")
@click.option("--metrics", "metrics_listen", metavar="HOST:PORT",
              help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 0.0.0.0:9567; default: off)")
@click.option("-d", "--background", is_flag=True, help="run in the background")
@click.option("--log", "log_file", help="log file (default: stderr, or the journal under systemd; "
                                         "for -d: <cache dir>/jfscache.log)")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True,
              help="least severe messages logged")
@click.option("--debug", is_flag=True, help="debug logging (--log-level debug)")
def mount(args, cache_dirs, cache_size, free_space_ratio, mem_cache_size, buffer_size, max_uploads, prefetch,
          attr_timeout, entry_timeout, read_ahead_kb, readdir_cache, xattrs, compact_grace, meta_timeout, meta_wait_replicas,
          io_retries, io_timeout, writeback, upload_delay, fuse_poll_us, subdir, cache_group, group_listen, group_weight, group_timeout,
          no_sharing, group_tls_cert, group_tls_key, group_tls_ca, metrics_listen, background, log_file, log_level,
          debug):
    """Mount a volume. Without META_URL (nor JFSCACHE_META_URL, nor meta-url
    in the --config file), mount the embedded default volume (a private
    redis-server and a local block directory under ~/.local/state/jfscache).

    Every option but -d can also come from the environment, as JFSCACHE_ and
    its name (JFSCACHE_CACHE_DIR='/nvme/a /nvme/b', JFSCACHE_WRITEBACK=1), and
    from a TOML --config file by its name (cache-dir = ["/nvme/a"],
    cache-size = "400G"). The command line wins over the environment, which
    wins over the file, which wins over the defaults shown."""
    if len(args) > 2:
        raise Failure("usage: jfscache mount [META_URL] MOUNTPOINT")
    meta_url, mountpoint = (None, args[0]) if len(args) == 1 else args
    if meta_url is None:
        ctx = click.get_current_context()
        meta_url = os.environ.get(META_URL_ENV) or (ctx.default_map or {}).get("meta_url")
    mountpoint = os.path.abspath(mountpoint)
    if mount_type(mountpoint) is not None:
        # (asked as umount asks: a stat of a hung daemon's mount would hang)
        state, _ = _ask_daemon(mountpoint)
        if state != "stale":
            why = ", whose daemon does not answer" if state == "hung" else ""
            raise Failure(f"{mountpoint} is already a mount point{why} (unmount it first: jfscache umount {mountpoint})")
        _unmount_stale(mountpoint)  # a killed daemon's: this mount takes its place
    if not os.path.isdir(mountpoint):
        raise Failure(f"mount point {mountpoint} does not exist or is not a directory")
    if not os.path.exists("/dev/fuse"):
        raise Failure("/dev/fuse is missing: load the fuse module or install fuse3")
    if metrics_listen:
        from .metrics import split_listen
        split_listen(metrics_listen)  # a malformed address fails before anything starts

    from .embedded import state_dir
    if not cache_dirs:
        base = "/var/jfsCache" if os.geteuid() == 0 else os.path.join(os.path.expanduser("~"), ".jfscache", "cache")
        if meta_url is None:
            base = os.path.join(state_dir(), "cache")
        cache_dirs = (base,)
    if parse_size(cache_size, "M") > 0:
        for d in cache_dirs:  # before anything starts: a mistyped path fails at once
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
                if not os.access(d, os.W_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            except OSError as e:
                raise Failure(f"cache dir {os.path.abspath(d)} is unusable: {e.strerror} "
                              "(choose another --cache-dir, or --cache-size 0 for no disk cache)")
    if background:
        _daemonize(log_file or os.path.join(cache_dirs[0], "jfscache.log"), mountpoint)
        return
    _setup_logging("debug" if debug else log_level, log_file)

    from .daemon import MountConfig, run_mount
    from .group.node import GroupOptions
    from .vfs.vfs import Options

    opts = Options(attr_timeout=attr_timeout, entry_timeout=entry_timeout, max_uploads=max_uploads,
                   buffer_size=parse_size(buffer_size, "M"), prefetch=prefetch, compact_grace=compact_grace,
                   readdir_cache=readdir_cache, xattrs=xattrs, missing_wait=io_timeout)
    cfg = MountConfig(meta_url=meta_url, mountpoint=mountpoint, cache_dirs=list(cache_dirs),
                      cache_size=parse_size(cache_size, "M"), free_space_ratio=free_space_ratio,
                      mem_cache_size=parse_size(mem_cache_size, "M"), read_ahead_kb=read_ahead_kb, opts=opts,
                      meta_timeout=meta_timeout, meta_wait_replicas=meta_wait_replicas,
                      io_retries=io_retries, io_timeout=io_timeout, writeback=writeback,
                      upload_delay=upload_delay, fuse_poll_us=fuse_poll_us, subdir=subdir,
                      metrics=metrics_listen or "")
    if cache_group:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", cache_group):
            raise Failure(f"invalid --cache-group {cache_group!r}: use letters, digits, '.', '_' and '-'")
        host, _, port = group_listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            raise Failure(f"--group-listen must be HOST:PORT, not {group_listen!r}")
        cfg.group = GroupOptions(name=cache_group, listen=group_listen, weight=group_weight,
                                 sharing=not no_sharing, heartbeat=min(1.0, group_timeout / 3),
                                 timeout=group_timeout)
        tls = (group_tls_cert, group_tls_key, group_tls_ca)
        if any(tls):
            if not all(tls):
                raise Failure("group TLS needs all three of --group-tls-cert, --group-tls-key and --group-tls-ca")
            cfg.group.tls = tuple(os.path.abspath(p) for p in tls)
    redis_proc = None
    try:
        if meta_url is None:
            cfg.meta_url, redis_proc = _embedded_volume(mountpoint)
        run_mount(cfg)
    finally:
        from .embedded import stop_redis
        stop_redis(redis_proc)


add_envvars(mount)


def _fuse_unmount(mountpoint: str, lazy: bool) -> subprocess.CompletedProcess:
    """fusermount3 -u (-z when lazy), or umount (-l) without it."""
    exe = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [exe, "-u"] if exe else ["umount"]
    if lazy:
        cmd.append("-z" if exe else "-l")
    return subprocess.run([*cmd, mountpoint], capture_output=True, text=True)


def _unmount_stale(mountpoint: str) -> None:
    """Unmount a dead daemon's mount, lazily: nothing can be flushed any more."""
    r = _fuse_unmount(mountpoint, lazy=True)
    if r.returncode != 0:
        raise Failure(f"{mountpoint} is a stale mount of a daemon that died, and unmounting it failed: "
                      f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
    click.echo(f"jfscache: {mountpoint} was a stale mount left by a daemon that died; unmounted it", err=True)


def _embedded_volume(mountpoint: str):
    from .embedded import default_settings, lock_state, start_redis, state_dir
    from .meta.engine import Meta
    from .storage import create_storage, run_with_loop

    state = state_dir()
    lock_state(state, mountpoint)
    url, proc = start_redis(state)

    async def ensure_formatted():
        meta = Meta(url)
        try:
            if await meta.r.execute("GET", "setting") is None:
                settings = default_settings(state)
                store = create_storage("file", settings["bucket"])
                await store.create()
                await meta.format(settings)
        finally:
            await meta.aclose()

    try:
        run_with_loop(ensure_formatted)
    except BaseException:
        # The mount will not start: nothing else would stop this redis-server.
        from .embedded import stop_redis
        stop_redis(proc)
        raise
    return url, proc


def _daemonize(log_file: str, mountpoint: str) -> None:
    """Start the same mount in the foreground as a detached child, return once mounted."""
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    argv = [a for a in sys.argv[1:] if a not in ("-d", "--background")]
    if "--log" not in argv:
        argv += ["--log", log_file]
    with open(log_file, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "jfscache.cli", *argv], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
            click.echo(f"mounted at {mountpoint} (pid {proc.pid}, log {log_file})")
            return
        if proc.poll() is not None:
            with open(log_file, "rb") as f:
                tail = f.read()[-4000:].decode(errors="replace").strip().splitlines()
            errors = [line for line in tail if line.startswith("jfscache: error: ")]
            if errors:
                raise Failure(errors[-1][len("jfscache: error: "):])
            raise Failure(tail[-1] if tail else f"the mount process exited with status {proc.returncode}")
        time.sleep(0.05)
    raise Failure(f"{mountpoint} was not mounted after 60 s; see {log_file}")


# ---- umount -----------------------------------------------------------------
@cli.command(epilog=_examples(
    "jfscache umount /mnt/research",
    "jfscache umount -f /mnt/research         # busy: detach now, finish when the last user leaves",
    "jfscache umount --no-wait /mnt/research  # do not wait for write-back's uploads to finish"))
@click.argument("mountpoint")
@click.option("-f", "--force", is_flag=True, help="lazy unmount even if busy")
@click.option("--no-wait", is_flag=True,
              help="return once unmounted, while the daemon may still upload staged blocks")
def umount(mountpoint, force, no_wait):
    """Unmount a mounted volume (buffered data is flushed first), and wait
    until its daemon has exited: it uploads what write-back staged first, so
    that a mount with the same cache dir can follow at once."""
    mountpoint = os.path.abspath(mountpoint)
    if mount_type(mountpoint) is None:
        raise Failure(f"{mountpoint} is not mounted")
    state, pid = _ask_daemon(mountpoint)
    if state == "stale":
        _unmount_stale(mountpoint)
        return
    if state == "hung":
        click.echo(f"jfscache: the daemon of {mountpoint} has not answered for {_ASK_TIMEOUT:g} s (hung, or "
                   "stopped): unmounting without waiting for it; what it had not flushed is lost", err=True)
    r = _fuse_unmount(mountpoint, lazy=force)
    if r.returncode != 0:
        raise Failure((r.stderr.strip().splitlines() or [f"unmounting {mountpoint} failed"])[-1])
    if pid is not None and not force and not no_wait:  # (a lazy unmount ends when the last user leaves)
        _wait_exit(pid)


_ASK_TIMEOUT = 10.0


def _ask_daemon(mountpoint: str) -> tuple[str, int | None]:
    """("ok", the daemon's pid or None if it does not say), ("stale", None)
    for a mount whose daemon died, or ("hung", None) if it does not answer.
    Asked from a child process: a request to a hung daemon blocks the asker
    in the kernel, keeping the mount busy, until it is killed."""
    from .monitor import read_snapshot
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # (the CLI runs no threads, so a fork is safe)
        try:
            os.close(r)
            try:
                reply = b"%d" % int(read_snapshot(mountpoint)["pid"])
            except OSError as e:
                reply = b"stale" if e.errno == errno.ENOTCONN else b""
            except (ValueError, KeyError, TypeError):
                reply = b""  # not ours, or an older daemon: nothing to wait for
            os.write(w, reply)
        finally:
            os._exit(0)
    os.close(w)
    try:
        if not select.select([r], [], [], _ASK_TIMEOUT)[0]:
            os.kill(child, signal.SIGKILL)
            return "hung", None
        reply = os.read(r, 64)
    finally:
        os.close(r)
        os.waitpid(child, 0)
    if reply == b"stale":
        return "stale", None
    return "ok", int(reply) if reply else None


def _wait_exit(pid: int) -> None:
    """Wait for the daemon to exit; say why once it takes a while."""
    told = time.monotonic() + 2
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"jfscache" not in f.read():
                    return  # gone, and the pid reused (or another pid namespace's)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    return  # exited, not reaped yet (by whoever started it)
        except FileNotFoundError:
            return
        except PermissionError:
            pass  # another user's daemon: it still runs
        if told and time.monotonic() > told:
            click.echo(f"waiting for the daemon (pid {pid}) to exit: it uploads staged blocks first "
                       "(--no-wait returns at once)", err=True)
            told = 0
        time.sleep(0.05)


# ---- warmup -----------------------------------------------------------------
def _mount_root(path: str) -> str:
    p = os.path.abspath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


@cli.command(epilog=_examples(
    "jfscache warmup /mnt/research/market/2024 --threads 64",
    "jfscache warmup --check --json /mnt/research/market      # gate a job on cached_ratio",
    "jfscache warmup --meta redis://meta:6379/1 /market/2024  # from a machine with no mount"))
@click.argument("paths", nargs=-1, required=True)
@click.option("--threads", default=50, show_default=True, type=click.IntRange(1, 1024),
              help="blocks warmed at once")
@click.option("--check", "mode", flag_value="check", help="report what fraction is cached, warm nothing")
@click.option("--evict", "mode", flag_value="evict", help="drop the blocks from the cache (group)")
@click.option("--background", is_flag=True, help="start it and return; the mount carries on")
@click.option("--json", "as_json", is_flag=True, help="print the final report as JSON")
@click.option("--meta", "meta_url", help="no mount here: PATHS are paths in the volume at this Redis URL")
@click.option("--cache-group", help="with --meta: the group to fill (default: the volume's only group)")
def warmup(paths, threads, mode, background, as_json, meta_url, cache_group):
    """Fill the cache (the whole cache group, from any member) with the
    blocks of PATHS, files or directories, before a job reads them. S3
    serves each block once: each goes to its owner in the group."""
    mode = mode or "warm"
    if meta_url:
        if background:
            raise Failure("--background needs a mount (the mount carries the job on)")
        report = _warmup_without_mount(meta_url, cache_group, paths, mode, threads, as_json)
    else:
        report = _warmup_through_mount(paths, mode, threads, background, as_json)
        if background:
            click.echo(f"warmup ({mode}) of {len(paths)} path(s) started in the background; "
                       f"check it with: jfscache warmup --check {' '.join(paths)}")
            return
    if report.get("error"):
        raise Failure(f"warmup failed: {report['error']}")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_warmup(report)
    if report.get("errors"):
        sys.exit(1)


def _warmup_through_mount(paths, mode: str, threads: int, background: bool, quiet: bool) -> dict:
    for p in paths:
        if not os.path.exists(p):
            raise Failure(f"{p} does not exist")
    roots = {_mount_root(p) for p in paths}
    if len(roots) != 1:
        raise Failure("all PATHS must be on one jfscache mount")
    root = roots.pop()
    if not os.path.exists(os.path.join(root, ".control")):
        raise Failure(f"{root} is not a jfscache mount (no .control); without a mount use --meta META_URL")
    req = {"op": "warmup", "mode": mode, "targets": [[p, os.stat(p).st_ino] for p in paths],
           "threads": threads, "background": background}
    fd = _send_control(root, req)
    try:
        with _ProgressView(quiet) as view:
            buf, pos, last = b"", 0, {}
            while True:  # the output has offsets of its own: the request's write moved the fd's
                chunk = os.pread(fd, 1 << 16, pos)
                if not chunk:
                    return last
                pos += len(chunk)
                *lines, buf = (buf + chunk).split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg.get("error") and "mode" not in msg:
                        raise Failure(msg["error"])
                    if msg.get("accepted"):
                        if background:
                            return msg
                        continue
                    last = msg
                    view.update(msg)
    finally:
        os.close(fd)


def _warmup_without_mount(meta_url: str, group: str | None, paths, mode: str, threads: int, quiet: bool) -> dict:
    """Warm from a machine with no mount: resolve PATHS in the metadata,
    join the group as a client for the duration (it owns nothing) and send
    each block to its owner."""
    from .cache.blocks import BlockCache
    from .daemon import open_storage
    from .group.membership import list_groups
    from .group.node import GroupOptions, open_group
    from .meta.engine import ROOT_INODE, Meta
    from .storage import run_with_loop
    from .vfs import fill

    async def run():
        meta = Meta(meta_url)
        try:
            settings = await meta.load()
            name = group
            if name is None:
                groups = await list_groups(meta.r)
                if len(groups) != 1:
                    raise Failure(f"the volume has {len(groups)} cache groups ({', '.join(groups) or 'none'}): "
                                  "name one with --cache-group")
                name = groups[0]
            targets = []
            for p in paths:
                ino = ROOT_INODE
                for part in [x for x in p.split("/") if x]:
                    try:
                        ino = (await meta.lookup(ino, part.encode()))[0].ino
                    except FileNotFoundError:
                        raise Failure(f"{p} does not exist in volume {settings['name']}") from None
                targets.append((p, ino))
            storage = open_storage(settings)
            try:
                cache = BlockCache(storage, 0)
                opts = GroupOptions(name=name, sharing=False)
                async with open_group(meta.r, settings["group_secret"], opts, cache, cache.from_storage) as node:
                    if not len(node.ring):
                        raise Failure(f"cache group {name} has no live members to warm")
                    progress = fill.Progress(mode)
                    with _ProgressView(quiet) as view:
                        async with trio.open_nursery() as n:
                            n.start_soon(fill.run, meta, node, settings["name"],
                                         int(settings.get("block_size", 4 << 20)), targets, mode, threads, progress)
                            while not progress.finished:
                                view.update(progress.report())
                                await trio.sleep(0.5)
                    return progress.report()
            finally:
                await storage.close()
        finally:
            await meta.aclose()

    import trio
    return run_with_loop(run)


class _ProgressView:
    """A live progress bar (rich) of warmup reports, on a terminal only."""

    def __init__(self, quiet: bool):
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), transient=True,
                                 disable=quiet or not sys.stderr.isatty())
        self.bar = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, msg: dict) -> None:
        if not msg.get("expanded"):
            return
        if self.bar is None:
            self.bar = self.progress.add_task(f"{msg['mode']} {msg['files']} files, {msg['blocks']} blocks",
                                              total=msg["bytes"])
        self.progress.update(self.bar, completed=msg["done_bytes"])


def _print_warmup(r: dict) -> None:
    mib = r["bytes"] / 2**20
    if r["mode"] == "check":
        click.echo(f"{r['files']} files, {r['blocks']} blocks ({mib:.1f} MiB): "
                   f"{100 * r['cached_ratio']:.1f}% cached")
        for path, p in r.get("per_path", {}).items():
            click.echo(f"  {path}: {p['cached']}/{p['blocks']} blocks ({100 * p['cached_ratio']:.1f}%)")
        for m, p in r.get("per_member", {}).items():
            click.echo(f"  member {m}: {p['cached']}/{p['blocks']} blocks")
    elif r["mode"] == "evict":
        click.echo(f"{r['files']} files, {r['blocks']} blocks ({mib:.1f} MiB): {r['cached_blocks']} evicted "
                   f"in {r['seconds']:.1f} s")
    else:
        click.echo(f"{r['files']} files, {r['blocks']} blocks ({mib:.1f} MiB) in {r['seconds']:.1f} s "
                   f"({r['mb_per_s']:.1f} MB/s); {r['cached_blocks']} were cached already, "
                   f"{r['errors']} errors")


# ---- fsck and gc ------------------------------------------------------------
def _with_volume(meta_url: str | None, command: str, fn):
    """Run fn(meta, storage) against a volume, without a mount."""
    from .daemon import open_storage
    from .meta.engine import Meta
    from .storage import run_with_loop

    async def run(url):
        meta = Meta(url)
        try:
            storage = open_storage(await meta.load())
            try:
                return await fn(meta, storage)
            finally:
                await storage.close()
        finally:
            await meta.aclose()

    with _volume_url(meta_url, command) as url:
        return run_with_loop(run, url)


@cli.command(epilog=_examples(
    "jfscache fsck                            # the embedded volume (mounted or not)",
    "jfscache fsck redis://meta:6379/1 --repair"))
@_meta_url_argument
@click.option("--repair", is_flag=True, help="fix counters, dangling entries, dead sessions and leaked chunk lists")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def fsck(meta_url, repair, as_json):
    """Check a volume: blocks missing from the store, slices no file
    references, used-space and inode counters, dangling directory entries,
    sessions whose owners died. Exit status 1 if problems remain."""
    from . import maintenance

    report = _with_volume(meta_url, "fsck", lambda meta, storage: maintenance.fsck(meta, storage, repair))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"{report['files']} files, {report['inodes']} inodes, {report['chunks']} chunks, "
                   f"{report['slices']} slices: {report['problems']} problems")
        for m in report["missing_blocks"]:
            click.echo(f"  missing from the store: inode {m['inode']} chunk {m['chunk']} slice {m['slice']}"
                       + (f" block {m['block']}" if "block" in m else ""))
        for where, p in report["pending_uploads"].items():
            click.echo(f"  {p['blocks']} blocks staged at {where} are not uploaded yet "
                       "(blocks missing now may be among them: run fsck again once they are)")
        for k in report["leaked_chunk_lists"]:
            click.echo(f"  leaked chunk list (no file): {k}")
        for d in report["dangling_entries"]:
            click.echo(f"  dangling entry: '{d['name']}' in directory inode {d['dir']}")
        for key in ("used_space", "total_inodes"):
            c = report[key]
            if c["counter"] != c["actual"]:
                click.echo(f"  {key.replace('_', ' ')} counter is {c['counter']}, should be {c['actual']}")
        for sid in report["dead_sessions"]:
            click.echo(f"  dead session {sid} (its owner stopped heartbeating)")
        for line in report.get("repaired", []):
            click.echo(f"  repaired: {line}")
    if report["problems"] and not report.get("repaired"):
        sys.exit(1)
    if report["missing_blocks_count"]:
        sys.exit(1)  # no repair brings lost data back


@cli.command(epilog=_examples(
    "jfscache gc --dry-run                    # the embedded volume (mounted or not)",
    "jfscache gc redis://meta:6379/1 --compact"))
@_meta_url_argument
@click.option("--dry-run", is_flag=True, help="only report what would be deleted")
@click.option("--compact", is_flag=True, help="also rewrite every chunk of more than one slice as one")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def gc(meta_url, dry_run, compact, as_json):
    """Delete objects that no file references (leaked by crashes or failed
    writes) and, with --compact, defragment every chunk. An unreferenced
    object is deleted only if its slice was created before the previous gc
    run, so an upload in progress is never taken for garbage."""
    from . import maintenance
    from .cache.blocks import BlockCache

    async def run(meta, storage):
        return await maintenance.gc(meta, storage, BlockCache(storage, 64 << 20), dry_run, compact)

    report = _with_volume(meta_url, "gc", run)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if "compacted_chunks" in report:
        click.echo(f"compacted {report['compacted_chunks']} chunks")
    click.echo(f"{report['objects']} objects; {report['orphan_slices']} unreferenced slices, "
               f"{report['deletable_slices']} of them old enough ({report['deletable_bytes'] / 2**20:.1f} MiB)"
               + (" would be deleted" if dry_run else f": {report.get('deleted_objects', 0)} objects deleted")
               + (f"; {report['kept_recent_slices']} newer ones kept for the next run"
                  if report["kept_recent_slices"] else ""))


# ---- group ------------------------------------------------------------------
@cli.group(epilog=_examples(
    "jfscache group status redis://meta:6379/1",
    "jfscache mount redis://meta:6379/1 /mnt/research --cache-group research -d   # join one"))
def group():
    """Cache groups: nodes that share one block cache."""


@group.command("status", epilog=_examples(
    "jfscache group status redis://meta:6379/1 research",
    "jfscache group status redis://meta:6379/1 --json"))
@click.argument("meta_url")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def group_status(meta_url, name, as_json):
    """List the members of a volume's cache groups (or of group NAME):
    address, weight, cached bytes, hit rate, requests served, last heartbeat."""
    from .group.membership import list_groups, list_members
    from .meta.engine import Meta
    from .storage import run_with_loop

    async def run():
        meta = Meta(meta_url)
        try:
            await meta.load()
            names = [name] if name else await list_groups(meta.r)
            return {g: await list_members(meta.r, g) for g in names}
        finally:
            await meta.aclose()

    groups = run_with_loop(run)
    now = time.time()
    if as_json:
        click.echo(json.dumps({g: [dict(m.info, id=m.id, heartbeat_age=round(now - m.heartbeat, 1))
                                   for m in ms] for g, ms in groups.items()}, indent=2))
        return
    if not any(groups.values()):
        raise Failure(f"no cache group members{' in group ' + name if name else ''} on {_redacted(meta_url)}")
    for g, ms in groups.items():
        click.echo(f"group {g}: {sum(1 for m in ms if m.sharing)} sharing members, "
                   f"{sum(1 for m in ms if not m.sharing)} clients")
        click.echo(f"  {'member':<24} {'weight':>6} {'cached':>10} {'hit rate':>8} {'served':>8} {'heartbeat':>10}")
        for m in ms:
            i = m.info
            looked = i.get("hits", 0) + i.get("misses", 0)
            rate = f"{100 * i.get('hits', 0) / looked:.0f}%" if looked else "-"
            click.echo(f"  {m.id:<24} {m.weight:>6g} {i.get('cache_bytes', 0) / 2**20:>8.1f}Mi {rate:>8} "
                       f"{i.get('served', 0):>8} {now - m.heartbeat:>8.1f}s ago")


def _send_control(mountpoint: str, request: dict) -> int:
    """Open MOUNTPOINT's .control and write one request; the open fd, to read the answer from offset 0."""
    control = os.path.join(_mount_root(mountpoint), ".control")
    if not os.path.exists(control):
        raise Failure(f"{mountpoint} is not on a jfscache mount (no {control})")
    try:
        fd = os.open(control, os.O_RDWR)
    except OSError as e:
        raise Failure(f"cannot open {control}: {e.strerror} (is {mountpoint} a jfscache mount?)")
    try:
        os.write(fd, (json.dumps(request) + "\n").encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


def _control(mountpoint: str, request: dict) -> dict:
    """One request on MOUNTPOINT/.control and its one-line answer."""
    fd = _send_control(mountpoint, request)
    try:
        answer = json.loads(os.pread(fd, 1 << 16, 0).split(b"\n", 1)[0])
    finally:
        os.close(fd)
    if answer.get("error"):
        msg = answer["error"]
        if "unknown op" in msg:
            msg = f"{mountpoint} is not a member of a cache group (mounted without --cache-group)"
        raise Failure(msg)
    return answer


@group.command("weight", epilog=_examples(
    "jfscache group weight /mnt/research 2     # this member takes twice its share",
    "jfscache group weight /mnt/research 1     # back to normal after a drain"))
@click.argument("mountpoint")
@click.argument("weight", type=click.FloatRange(min=0, max=1e6))
def group_weight(mountpoint, weight):
    """Change the weight (share of the blocks) of the group member mounted at
    MOUNTPOINT, at run time. It lasts until the mount ends; a remount takes
    --group-weight again."""
    a = _control(mountpoint, {"op": "group-weight", "weight": weight})
    click.echo(f"member {a['member']}: weight {a['was']:g} -> {a['weight']:g}")


@group.command("drain", epilog=_examples(
    "jfscache group drain /mnt/research; jfscache umount /mnt/research   # a scale-in (preStop)"))
@click.argument("mountpoint")
@click.option("--idle", type=click.FloatRange(min=0), default=10, show_default=True,
              help="done once no peer asked this member for a block for this many seconds")
@click.option("--timeout", type=click.FloatRange(min=0), default=300, show_default=True,
              help="give up waiting after this many seconds (the drain itself stays)")
def group_drain(mountpoint, idle, timeout):
    """Drain the group member mounted at MOUNTPOINT before it leaves: its
    weight becomes 0, so it owns no block any more; the blocks' new owners
    fetch them from it on their next miss (not from S3) while it stays up.
    Waits until peers stop asking (--idle), then returns; unmount after it.
    A block nobody asked for by then comes from S3 when it is next read.
    Exits 1 if peers still fetch at --timeout."""
    a = _control(mountpoint, {"op": "group-weight", "weight": 0})
    click.echo(f"member {a['member']}: weight {a['was']:g} -> 0; waiting until peers stop fetching from it")
    start = time.monotonic()
    served = last = _snapshot(mountpoint).get("peer_served_requests", 0)
    quiet_since = start
    while True:
        time.sleep(min(1.0, idle) if idle else 0)
        now_served = _snapshot(mountpoint).get("peer_served_requests", 0)
        now = time.monotonic()
        if now_served != last:
            last, quiet_since = now_served, now
        if now - quiet_since >= idle:
            click.echo(f"drained: served {last - served} blocks to their new owners in {now - start:.0f} s")
            return
        if now - start >= timeout:
            raise Failure(f"peers still fetch from this member after {timeout:g} s ({last - served} blocks "
                          "so far); what they did not fetch will come from S3")


# ---- stats and profile --------------------------------------------------------
def _snapshot(mountpoint: str) -> dict:
    from .monitor import read_snapshot
    try:
        return read_snapshot(mountpoint)
    except OSError as e:
        path = os.path.join(mountpoint, ".stats")
        raise Failure(f"cannot read {path}: {e.strerror} (is {mountpoint} a jfscache mount?)")
    except ValueError as e:
        raise Failure(f"{mountpoint}/.stats is not the JSON of a jfscache mount: {e}")


def _console():
    from rich.console import Console
    # Captured (a file, a pipe): wide enough that no column is cut.
    return Console() if sys.stdout.isatty() else Console(width=130)


def _refresh(first, interval: float, frame) -> None:
    """Show `first`, then frame() every `interval` seconds until Ctrl-C."""
    from rich.live import Live
    try:
        with Live(first, console=_console(), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    except KeyboardInterrupt:
        pass


def _view_options(fn):
    """MOUNTPOINT, --once and --interval: what the live views (stats, profile) share."""
    fn = click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.1, 3600),
                      help="seconds between refreshes")(fn)
    fn = click.option("--once", is_flag=True, help="print one view and exit (for scripts)")(fn)
    return click.argument("mountpoint")(fn)


@cli.command(epilog=_examples(
    "jfscache stats /mnt/research                 # live, until Ctrl-C",
    "jfscache stats /mnt/research --once          # one view, rates over --interval",
    "jfscache stats /mnt/research --json          # the raw counters"))
@_view_options
@click.option("--json", "as_json", is_flag=True,
              help="print the counters (MOUNTPOINT/.stats) as JSON and exit; also what a non-terminal gets "
                   "without --once")
def stats(mountpoint, once, interval, as_json):
    """Show a mounted volume's metrics, refreshed every second: read and
    write throughput, FUSE operations/s, hit ratio per cache tier (mem, disk,
    staging, group), object-store and cache-group traffic, buffer use."""
    from .monitor import stats_view
    if as_json or (not once and not sys.stdout.isatty()):
        click.echo(json.dumps(_snapshot(mountpoint), indent=1))
        return
    prev, t = _snapshot(mountpoint), time.monotonic()
    if once:
        time.sleep(interval)
        cur = _snapshot(mountpoint)
        _console().print(stats_view(mountpoint, cur, prev, time.monotonic() - t))
        return

    def frame():
        nonlocal prev, t
        cur, now = _snapshot(mountpoint), time.monotonic()
        view = stats_view(mountpoint, cur, prev, now - t)
        prev, t = cur, now
        return view

    # Until the first interval has passed: the averages since the mount started.
    _refresh(stats_view(mountpoint, prev, {}, prev.get("uptime_seconds") or 0), interval, frame)


@cli.command(epilog=_examples(
    "jfscache profile /mnt/research               # live, since the command started",
    "jfscache profile /mnt/research --once        # since the mount started"))
@_view_options
@click.option("--top", default=30, show_default=True, type=click.IntRange(1), help="operations shown")
def profile(mountpoint, once, interval, top):
    """Show the FUSE operations of a mounted volume that take the most
    time: calls, calls/s, total and mean time per operation, refreshed
    every second since the command started (--once: since the mount
    started)."""
    from .monitor import profile_view
    base, t = _snapshot(mountpoint), time.monotonic()
    if once:
        _console().print(profile_view(mountpoint, base, {}, base.get("uptime_seconds") or 0, top))
        return
    _refresh(profile_view(mountpoint, base, base, 0, top), interval,
             lambda: profile_view(mountpoint, _snapshot(mountpoint), base, time.monotonic() - t, top))


def _leaf(e: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups that trio raises."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return e


def _env_origin(e: click.UsageError) -> str:
    """' (from JFSCACHE_X=...)' when a bad value came from the environment:
    nothing on the command line shows it."""
    p = getattr(e, "param", None)
    envvar = getattr(p, "envvar", None)
    if not isinstance(envvar, str) or not os.environ.get(envvar):
        return ""
    if any(a == o or a.startswith(o + "=") for a in sys.argv[1:] for o in p.opts):
        return ""
    return f" (from {envvar}={os.environ[envvar]})"


def main():
    # Library warnings (e.g. "Redis is unreachable") reach a user of a
    # command through its one error line; only a mount sets up a log.
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        try:
            cli.main(standalone_mode=False, prog_name="jfscache")
        except BaseExceptionGroup as g:
            raise _leaf(g) from None
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        # One line, as for every other error, with where to look.
        cmd = e.ctx.command_path if e.ctx is not None else "jfscache"
        click.echo(f"jfscache: error: {e.format_message()}{_env_origin(e)} (see '{cmd} --help')", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except _known_errors() as e:
        click.echo(f"jfscache: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # unexpected: still one line; --debug logs have the rest
        logging.getLogger("jfscache").debug("unexpected error", exc_info=True)
        click.echo(f"jfscache: error: {type(e).__name__}: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
