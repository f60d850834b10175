"""Operations: options from a config file and JFSCACHE_* variables (command
line > environment > file > default), one-line errors for a bad file,
examples in every --help, log levels and journal lines, and status/fsck/gc
of the embedded volume with no META_URL, mounted or not."""
from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from helpers import (
    MiB,
    assert_clean_error,
    assert_ok,
    new_dir,
    run_cli,
    wait_for,
)
from jfscache import cli as cli_mod
from jfscache import config
from test_cli import _redis_pids_under

# Variables a test sets through CliRunner or load(); cleared so the
# machine's own environment does not decide a test.
_OWN_ENV = ("JFSCACHE_CONFIG", "JFSCACHE_META_URL", "JFSCACHE_MAX_UPLOADS", "JFSCACHE_PREFETCH",
            "JFSCACHE_LOG_LEVEL", "JFSCACHE_SECRETS_FILE", "META_PASSWORD", "JOURNAL_STREAM")


@pytest.fixture
def clean_env(monkeypatch):
    """monkeypatch, with os.environ restored whole afterwards: config.load
    sets secrets behind monkeypatch's back."""
    saved = dict(os.environ)
    for k in _OWN_ENV:
        monkeypatch.delenv(k, raising=False)
    yield monkeypatch
    monkeypatch.undo()
    os.environ.clear()
    os.environ.update(saved)


def write_config(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


# ---------------------------------------------------------------------------
# precedence, as the daemon receives it (run_mount stubbed: no FUSE)

@pytest.fixture
def mount_stub(clean_env, tmp_path):
    """Runs `jfscache ARGS` in-process up to the daemon and returns what
    the daemon would get: the MountConfig and the log level."""
    got = {}
    clean_env.setattr("jfscache.daemon.run_mount", lambda cfg: got.update(cfg=cfg))
    clean_env.setattr(cli_mod, "_setup_logging", lambda level, log_file: got.update(level=level))
    mp = tmp_path / "mnt"
    mp.mkdir()

    def run(*args, env=None):
        got.clear()
        r = CliRunner().invoke(cli_mod.cli, [str(a) for a in args], env=env, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return got["cfg"], got["level"]
    run.mp = mp
    run.cache = tmp_path / "cache"
    return run


def test_precedence_command_line_env_file_default(mount_stub, tmp_path):
    cfg_file = write_config(tmp_path / "jfs.toml", f"""
        meta-url = "redis://file:6379/1"
        max_uploads = 5          # underscores work too
        prefetch = 3
        io-retries = 9
        cache-dir = "{mount_stub.cache}"
        writeback = true
        log-level = "warning"
    """.replace("\n        ", "\n"))
    env = {"JFSCACHE_MAX_UPLOADS": "6", "JFSCACHE_PREFETCH": "4", "JFSCACHE_LOG_LEVEL": "error"}
    mp = mount_stub.mp

    cfg, level = mount_stub("--config", cfg_file, "mount", mp, "--max-uploads", "7", env=env)
    assert cfg.opts.max_uploads == 7                       # command line > environment
    assert cfg.opts.prefetch == 4 and level == "error"     # environment > file
    assert cfg.io_retries == 9 and cfg.writeback           # file > default
    assert cfg.cache_dirs == [str(mount_stub.cache)]       # a string for a repeatable option
    assert cfg.meta_timeout == 60.0                        # default
    assert cfg.meta_url == "redis://file:6379/1"           # META_URL from the file...
    cfg, _ = mount_stub("mount", mp, env={"JFSCACHE_CONFIG": str(cfg_file),
                                          "JFSCACHE_META_URL": "redis://env:6379/1"})
    assert cfg.meta_url == "redis://env:6379/1"            # ... below the environment
    assert cfg.opts.max_uploads == 5 and cfg.opts.prefetch == 3
    cfg, level = mount_stub("mount", "--config", cfg_file, "redis://cli:6379/1", mp,
                            env={"JFSCACHE_META_URL": "redis://env:6379/1"})
    assert cfg.meta_url == "redis://cli:6379/1" and level == "warning"
    cfg, level = mount_stub("mount", mp, "--debug", "--cache-dir", mount_stub.cache,
                            env={"JFSCACHE_META_URL": "redis://env:6379/1"})
    assert level == "debug" and cfg.opts.max_uploads == 20 and cfg.cache_size == 10 << 30


def test_precedence_in_a_real_mount(make_volume, mounts, tmp_dir):
    """The sizes the daemon really uses, from its .stats: the memory tier
    from the command line over the environment over the file, the write
    buffer from the environment over the file, the disk tier and META_URL
    from the file."""
    vol = make_volume("file")
    cfg_file = write_config(tmp_dir / "jfs.toml", f'meta-url = "{vol.meta_url}"\nmem-cache-size = "64M"\n'
                                                 'buffer-size = "100M"\ncache-size = "1G"\n')
    env = dict(vol.env, JFSCACHE_MEM_CACHE_SIZE="80M", JFSCACHE_BUFFER_SIZE="150M")
    env.pop("JFSCACHE_META_URL", None)
    mp = new_dir("mnt")
    m = mounts.start(["--config", str(cfg_file), "mount", str(mp), "--cache-dir", str(new_dir("cache")),
                      "--mem-cache-size", "96M"], mp, env)
    stats = json.loads((mp / ".stats").read_bytes())
    assert stats["memory_cache_limit_bytes"] == 96 * MiB
    assert stats["write_buffer_limit_bytes"] == 150 * MiB
    assert stats["disk_cache_limit_bytes"] == 1024 * MiB
    m.umount()


# ---------------------------------------------------------------------------
# a bad file or value: one line, exit 1

@pytest.mark.parametrize("text,mode,pattern", [
    ('cache-size = "4G"\nbogus = 1\n', 0o644, r"config file .*: unknown key 'bogus'"),
    ("[mount]\ncache-size = 1\n", 0o644, r"unknown key 'mount'"),
    ("max-uploads = 0\n", 0o644, r"max-uploads = 0: 0 is not in the range 1<=x<=1000"),
    ('log-level = "loud"\n', 0o644, r"log-level = 'loud': 'loud' is not one of 'debug'"),
    ("cache-size = [\n", 0o644, r"config file .* is not valid TOML"),
    ('meta-url = "redis://:hunter2@127.0.0.1:1/1"\n', 0o644,
     r"readable by others \(mode 0644\): chmod 600 .*holds the password in meta-url"),
    ('META_PASSWORD = "hunter2"\n', 0o640, r"mode 0640.*holds META_PASSWORD"),
], ids=["unknown-key", "table", "out-of-range", "bad-choice", "not-toml", "url-password", "secret"])
def test_bad_config_file_gets_one_line(text, mode, pattern, tmp_path, clean_env, capsys):
    cfg_file = write_config(tmp_path / "bad.toml", text, mode)
    # main() in-process: the one-line contract is main's, and a subprocess costs 0.7 s a case
    clean_env.setattr(sys, "argv", ["jfscache", "--config", str(cfg_file), "status", "redis://127.0.0.1:1/1"])
    with pytest.raises(SystemExit) as exit_:
        cli_mod.main()
    out = capsys.readouterr()
    r = subprocess.CompletedProcess(sys.argv, exit_.value.code, out.out, out.err)
    assert r.returncode == 1
    assert_clean_error(r, r"^jfscache: error: .*" + pattern, secrets_=["hunter2"])


def test_bad_value_from_the_environment_names_it(tmp_dir):
    env = dict(os.environ, JFSCACHE_MAX_UPLOADS="0")
    r = run_cli("mount", "redis://127.0.0.1:1/1", tmp_dir, env=env, timeout=30)
    assert_clean_error(r, r"--max-uploads.*not in the range.*from JFSCACHE_MAX_UPLOADS=0")


def test_secrets_only_from_a_private_file_and_below_the_environment(clean_env, tmp_path):
    mount = cli_mod.cli.commands["mount"]
    f = write_config(tmp_path / "s.toml", 'META_PASSWORD = "from-file"\nmeta-url = "redis://h:1/1"\n', 0o600)
    loaded = config.load(str(f), mount)
    assert os.environ["META_PASSWORD"] == "from-file"
    assert loaded["status"] == {"meta_url": "redis://h:1/1"} and loaded["mount"]["meta_url"] == "redis://h:1/1"
    clean_env.setenv("META_PASSWORD", "from-env")
    config.load(str(f), mount)
    assert os.environ["META_PASSWORD"] == "from-env"
    os.chmod(f, 0o644)
    with pytest.raises(config.ConfigError, match="readable by others"):
        config.load(str(f), mount)


# ---------------------------------------------------------------------------
# --help

def _commands(cmd: click.Command, path=()):
    yield path, cmd
    for name, sub in getattr(cmd, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_command_help_shows_an_example():
    runner = CliRunner()
    seen = []
    for path, _ in _commands(cli_mod.cli):
        r = runner.invoke(cli_mod.cli, [*path, "--help"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        examples = r.output.split("Examples:\n", 1)
        assert len(examples) == 2, f"jfscache {' '.join(path)} --help has no examples:\n{r.output}"
        assert re.search(r"^    jfscache ", examples[1], re.M), r.output   # kept unwrapped (\b)
        seen.append(" ".join(path))
    assert {"mount", "status", "fsck", "gc", "group status", "warmup", "stats"} <= set(seen)


# ---------------------------------------------------------------------------
# logs

@pytest.fixture
def root_logger():
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def test_log_level_and_journal_lines(clean_env, tmp_path, root_logger):
    out = tmp_path / "journal"
    with open(out, "w") as stream:
        st = os.fstat(stream.fileno())
        clean_env.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        cli_mod._setup_logging("info", None, stream=stream)
        log = logging.getLogger("jfscache.test")
        log.debug("not shown")
        log.info("mounted")
        log.warning("Redis is unreachable")
        try:
            raise OSError("boom")
        except OSError:
            log.exception("upload failed")
    lines = out.read_text().splitlines()
    assert lines[:3] == ["<6>jfscache.test: mounted", "<4>jfscache.test: Redis is unreachable",
                         "<3>jfscache.test: upload failed"]
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[3:]), lines  # the traceback too

    # Not the journal (JOURNAL_STREAM names another stream): timestamps and level names.
    stream = io.StringIO()
    cli_mod._setup_logging("warning", None, stream=stream)
    log.info("not shown")
    log.error("disk full")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ jfscache.test ERROR disk full\n", stream.getvalue())
    assert sum(getattr(h, "jfscache", False) for h in root_logger.handlers) == 1   # one setup, replaced


# ---------------------------------------------------------------------------
# the embedded volume without META_URL, mounted or not

def test_embedded_volume_status_and_fsck_without_url(mounts, tmp_dir):
    env = dict(os.environ, HOME=str(tmp_dir), XDG_STATE_HOME=str(tmp_dir / "state"))
    for k in ("JFSCACHE_META_URL", "JFSCACHE_CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)
    assert_clean_error(run_cli("status", env=env), r"no embedded volume in .*state/jfscache yet")

    mp = new_dir("mnt")
    m = mounts.start(["mount", str(mp)], mp, env)
    (mp / "data").write_bytes(os.urandom(MiB + 5))
    os.sync()
    redis = _redis_pids_under(tmp_dir)
    assert len(redis) == 1
    status = json.loads(assert_ok(run_cli("status", env=env)).stdout)
    assert status["setting"]["name"] == "jfscache" and str(mp) in json.dumps(status["sessions"])
    assert re.search(r"^1 files.*: 0 problems", assert_ok(run_cli("fsck", env=env)).stdout, re.M)
    assert _redis_pids_under(tmp_dir) == redis, "a command started a second redis-server or stopped the mount's"
    m.umount()
    wait_for(lambda: not _redis_pids_under(tmp_dir), timeout=10, what="the mount's redis-server to stop")

    status = json.loads(assert_ok(run_cli("status", env=env)).stdout)
    assert status["setting"]["name"] == "jfscache" and status["sessions"] == []
    assert status["setting"]["used_bytes"] >= MiB
    assert re.search(r"^1 files.*: 0 problems", assert_ok(run_cli("fsck", env=env)).stdout, re.M)
    assert not _redis_pids_under(tmp_dir), "the redis-server started for a command outlived it"
