"""Real tools on a mounted jfscache: GNU tar (extract onto the mount, archive
from it) and git (init/add/commit/gc/clone/fsck). They use the file system
the way users' scripts do: hard links, symlinks, utimensat on everything,
chown, delayed chmod of read-only directories, renames of lock files, mmap
of pack files."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = os.geteuid() == 0
MiB = 1 << 20

TAR = shutil.which("tar")
GIT = shutil.which("git")

# ------------------------------------------------------------------ tree


def _xattrs_supported(d: Path) -> bool:
    probe = d / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        probe.unlink()


def build_tree(root: Path, xattrs: bool) -> None:
    """A tree with most of what archives carry: nested dirs of various
    modes, empty/small/multi-block/sparse files, hard links, symlinks
    (relative, absolute-dangling, to a dir), a FIFO, foreign owners,
    user xattrs, and distinct nanosecond mtimes on everything."""
    root.mkdir(exist_ok=True)
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "ro-dir").mkdir()
    (root / "private").mkdir()
    (root / "a" / "hello.txt").write_bytes(b"hello, world\n")
    (root / "a" / "b" / "empty").write_bytes(b"")
    (root / "a" / "b" / "c" / "deep.bin").write_bytes(os.urandom(12345))
    (root / "big.bin").write_bytes(os.urandom(5 * MiB + 7))       # spans 4 MiB blocks
    # sparse: data at the start and straddling the 64 MiB chunk boundary
    with open(root / "sparse.img", "wb") as f:
        f.write(b"start of sparse file")
        f.seek(64 * MiB - 5)
        f.write(b"across-the-chunk-edge")
        f.truncate(65 * MiB)
    (root / "script.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (root / "ro-dir" / "inside").write_bytes(b"in a read-only dir\n")
    (root / "private" / "key").write_bytes(b"secret\n")
    (root / "suid").write_bytes(b"suid file")
    (root / "nomode").write_bytes(b"mode 000")
    (root / "name with spaces & ünïcode").write_bytes(b"odd name")
    # hard links: three names, two directories
    os.link(root / "a" / "hello.txt", root / "a" / "b" / "hello-link")
    os.link(root / "a" / "hello.txt", root / "hardlink-top")
    # symlinks
    os.symlink("hello.txt", root / "a" / "rel-link")
    os.symlink("../../hello.txt", root / "a" / "b" / "c" / "up-link")
    os.symlink("/nonexistent/absolute/target", root / "dangling")
    os.symlink("a/b", root / "dir-link")
    os.mkfifo(root / "fifo")
    if xattrs:
        os.setxattr(root / "a" / "hello.txt", "user.comment", b"a comment")
        os.setxattr(root / "a", "user.dirattr", b"\x00\x01binary")
    modes = {
        "script.sh": 0o755, "suid": 0o4755, "nomode": 0o000,
        "big.bin": 0o600, "sparse.img": 0o640, "a/b/empty": 0o444,
        "private": 0o700, "private/key": 0o600, "a/b/c": 0o750,
        "fifo": 0o620,
    }
    for rel, mode in modes.items():
        os.chmod(root / rel, mode)
    if ROOT:
        os.chown(root / "a" / "b" / "c" / "deep.bin", 1234, 5678)
        os.chown(root / "private", 4321, 8765)
        os.chown(root / "dangling", 777, 888, follow_symlinks=False)
    # distinct nanosecond times, children before parents (ro-dir last)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            entries.append(Path(dirpath) / n)
    entries.sort(key=lambda p: -len(p.parts))
    for i, p in enumerate(entries):
        t = 1_500_000_000_000_000_000 + i * 1_000_003_007 + 123_456_789
        os.utime(p, ns=(t, t), follow_symlinks=False)
    os.chmod(root / "ro-dir", 0o555)
    os.utime(root / "ro-dir", ns=(1_400_000_000_987_654_321,) * 2)
    os.chmod(root, 0o755)
    os.utime(root, ns=(1_300_000_000_000_000_001,) * 2)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def snapshot(root: Path, xattrs: bool) -> dict:
    """Everything about a tree that tar is supposed to carry over."""
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
        paths += [Path(dirpath) / n for n in dirnames + filenames]
    out = {}
    ino_names: dict[int, list[str]] = {}
    for p in paths:
        rel = str(p.relative_to(root))          # "." for the root itself
        st = os.lstat(p)
        info = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid, "gid": st.st_gid, "mtime_ns": st.st_mtime_ns}
        if stat.S_ISREG(st.st_mode):
            info["size"] = st.st_size
            info["sha"] = _sha(p)
            ino_names.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            info["target"] = os.readlink(p)
        if xattrs and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            info["xattrs"] = {k: os.getxattr(p, k) for k in os.listxattr(p)
                              if k.startswith("user.")}
        out[rel] = info
    out["<hardlinks>"] = sorted(sorted(v) for v in ino_names.values() if len(v) > 1)
    return out


def diff_snapshots(a: dict, b: dict) -> list[str]:
    problems = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            problems.append(f"{k}: {a.get(k)} != {b.get(k)}")
    return problems


def run(args, cwd=None, env=None):
    r = subprocess.run(list(map(str, args)), cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(map(str, args))} -> {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


TAR_CREATE = ["--format=pax", "--sparse", "--numeric-owner"]
TAR_EXTRACT = ["--numeric-owner", "--preserve-permissions"]
TAR_XATTRS = ["--xattrs", "--xattrs-include=user.*"]

needs_tar = pytest.mark.skipif(not TAR, reason="tar not installed")
needs_git = pytest.mark.skipif(not GIT, reason="git not installed")


@needs_tar
def test_tar_extract_onto_mount(mnt, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    xattrs = _xattrs_supported(src)
    build_tree(src, xattrs)
    archive = tmp_path / "tree.tar"
    xa = TAR_XATTRS if xattrs else []
    run([TAR, *TAR_CREATE, *xa, "-C", src, "-cf", archive, "."])
    dest = mnt / "extracted"
    dest.mkdir()
    run([TAR, *TAR_EXTRACT, *xa, "-C", dest, "-xf", archive])
    # tar's own comparison: contents, modes, owners, mtimes, link targets
    out = run([TAR, "--numeric-owner", "-C", dest, "-df", archive])
    assert out.strip() == ""
    problems = diff_snapshots(snapshot(src, xattrs), snapshot(dest, xattrs))
    assert not problems, "\n".join(problems)
    # the sparse file reads back right at the chunk edge
    with open(dest / "sparse.img", "rb") as f:
        f.seek(64 * MiB - 5)
        assert f.read(21) == b"across-the-chunk-edge"
    # a second extraction over the existing tree (tar unlinks and replaces)
    run([TAR, *TAR_EXTRACT, *xa, "-C", dest, "-xf", archive])
    problems = diff_snapshots(snapshot(src, xattrs), snapshot(dest, xattrs))
    assert not problems, "\n".join(problems)


@needs_tar
def test_tar_create_from_mount(mnt, tmp_path):
    src = mnt / "tree"
    xattrs = _xattrs_supported(mnt) and _xattrs_supported(tmp_path)
    build_tree(src, xattrs)
    archive = tmp_path / "from-mount.tar"
    xa = TAR_XATTRS if xattrs else []
    run([TAR, *TAR_CREATE, *xa, "-C", src, "-cf", archive, "."])
    listing = run([TAR, "-tf", archive]).split("\n")
    assert "./a/b/c/deep.bin" in listing and "./sparse.img" in listing
    out = run([TAR, "--numeric-owner", "-C", src, "-df", archive])
    assert out.strip() == ""
    dest = tmp_path / "re-extracted"
    dest.mkdir()
    run([TAR, *TAR_EXTRACT, *xa, "-C", dest, "-xf", archive])
    problems = diff_snapshots(snapshot(src, xattrs), snapshot(dest, xattrs))
    assert not problems, "\n".join(problems)
    # and a compressed round trip through a pipe, extracted back onto the mount
    tgz = tmp_path / "from-mount.tgz"
    run([TAR, *TAR_CREATE, *xa, "-C", src, "-czf", tgz, "."])
    dest2 = mnt / "again"
    dest2.mkdir()
    run([TAR, *TAR_EXTRACT, *xa, "-C", dest2, "-xzf", tgz])
    problems = diff_snapshots(snapshot(src, xattrs), snapshot(dest2, xattrs))
    assert not problems, "\n".join(problems)


# -------------------------------------------------------------------- git

def _git_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", LC_ALL="C",
               GIT_AUTHOR_NAME="Test", GIT_AUTHOR_EMAIL="test@example.com",
               GIT_COMMITTER_NAME="Test", GIT_COMMITTER_EMAIL="test@example.com")
    return env


def _git(repo, env, *args):
    return run([GIT, "-c", "user.name=Test", "-c", "user.email=test@example.com",
                "-c", "init.defaultBranch=main", "-c", "gc.auto=0", *args], cwd=repo, env=env)


@needs_git
def test_git_workflow(mnt, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _git_env(home)
    repo = mnt / "repo"
    _git(mnt, env, "init", "-q", repo)
    (repo / "README.md").write_text("# test repo\n")
    (repo / "src" / "pkg").mkdir(parents=True)
    for i in range(30):
        (repo / "src" / "pkg" / f"mod{i}.py").write_text(f"X = {i}\n" * (i + 1))
    (repo / "data.bin").write_bytes(os.urandom(2 * MiB))
    (repo / "run.sh").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(repo / "run.sh", 0o755)
    os.symlink("src/pkg/mod1.py", repo / "link.py")
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "first")
    first = _git(repo, env, "rev-parse", "HEAD").strip()
    assert _git(repo, env, "status", "--porcelain") == ""

    # second commit: modify, rename, delete, add, mode change
    (repo / "README.md").write_text("# test repo\n\nmore text\n")
    _git(repo, env, "mv", "src/pkg/mod0.py", "src/renamed.py")
    _git(repo, env, "rm", "-q", "src/pkg/mod2.py")
    (repo / "new.txt").write_text("new\n")
    os.chmod(repo / "src" / "pkg" / "mod3.py", 0o755)
    _git(repo, env, "add", "-A")
    _git(repo, env, "commit", "-q", "-m", "second")
    assert _git(repo, env, "status", "--porcelain") == ""
    log = _git(repo, env, "log", "--format=%s").split()
    assert log == ["second", "first"]
    stat_out = _git(repo, env, "show", "--stat", "--format=", "HEAD")
    assert "renamed.py" in stat_out and "new.txt" in stat_out
    assert _git(repo, env, "diff", "--no-renames", "--name-only", first, "HEAD").split() == sorted(
        ["README.md", "new.txt", "src/pkg/mod0.py", "src/pkg/mod2.py", "src/pkg/mod3.py",
         "src/renamed.py"])
    _git(repo, env, "fsck", "--full", "--strict", "--no-progress")

    # pack everything (temp files, renames, mmap of packs), check again
    _git(repo, env, "gc", "--quiet", "--prune=now")
    counts = dict(line.split(": ") for line in
                  _git(repo, env, "count-objects", "-v").strip().splitlines())
    assert int(counts["count"]) == 0 and int(counts["in-pack"]) > 30
    _git(repo, env, "fsck", "--full", "--strict", "--no-progress")
    assert _git(repo, env, "status", "--porcelain") == ""

    # a local clone on the same file system (hard-links the objects)
    clone = mnt / "clone"
    _git(mnt, env, "clone", "-q", repo, clone)
    assert _git(clone, env, "rev-parse", "HEAD") == _git(repo, env, "rev-parse", "HEAD")
    _git(clone, env, "fsck", "--full", "--strict", "--no-progress")
    assert (clone / "data.bin").read_bytes() == (repo / "data.bin").read_bytes()
    assert os.readlink(clone / "link.py") == "src/pkg/mod1.py"
    assert os.stat(clone / "run.sh").st_mode & 0o111
    # check out the first commit and back: files come and go
    _git(clone, env, "checkout", "-q", first)
    assert (clone / "src" / "pkg" / "mod2.py").exists()
    assert not (clone / "new.txt").exists()
    assert _git(clone, env, "status", "--porcelain") == ""
    _git(clone, env, "checkout", "-q", "main")
    assert (clone / "new.txt").read_text() == "new\n"
    assert not (clone / "src" / "pkg" / "mod2.py").exists()
    assert _git(clone, env, "status", "--porcelain") == ""
