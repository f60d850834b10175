"""Permission checks on a mounted jfscache (mounted with default_permissions,
and allow_other when root mounts it), as an unprivileged user would meet them.

Root (the test process) sets up files in `mnt`; the checks then run in a
child process as uid/gid 65534 (nobody, no supplementary groups) through
conftest's `as_nobody` helper. Each child records, per operation, "ok" or the
errno's name, and the test compares those with what POSIX/Linux prescribe.
With JFSCACHE_TEST_DIR set the same checks run against a kernel filesystem.
"""
from __future__ import annotations

import json
import os
import stat

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root to set up files and switch to nobody")

NOBODY = 65534

# Runs in the child (a system python, stdlib only). `A` is mnt.
PRELUDE = r"""
import errno, json, os, stat, sys
A = sys.argv[1]
os.umask(0o022)
R = {}
def P(*parts):
    return os.path.join(A, *parts)
def E(key, fn, *a, **kw):
    try:
        v = fn(*a, **kw)
    except OSError as e:
        R[key] = errno.errorcode.get(e.errno, str(e.errno))
        return None
    R[key] = "ok"
    return v
def O(key, path, flags, mode=0o644):
    fd = E(key, os.open, path, flags, mode)
    if fd is not None:
        os.close(fd)
def W(key, path, data=b"x"):
    fd = E(key, os.open, path, os.O_WRONLY)
    if fd is not None:
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
"""
EPILOGUE = "\nprint(json.dumps(R))\n"


def nobody(as_nobody, mnt, code):
    r = as_nobody.python(PRELUDE + code + EPILOGUE, mnt)
    assert r.returncode == 0, f"child failed:\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def check(results, expected):
    """Compare only the keys in `expected`; report every mismatch at once."""
    bad = {k: (results.get(k), v) for k, v in expected.items() if results.get(k) != v}
    assert not bad, "got/expected: " + ", ".join(f"{k}: {g} != {e}" for k, (g, e) in bad.items())


def mkfile(path, data=b"root data", mode=0o644, uid=0, gid=0):
    with open(path, "wb") as f:
        f.write(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def mkdir(path, mode=0o755, uid=0, gid=0):
    os.mkdir(path)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def read(path):
    with open(path, "rb") as f:
        return f.read()


# -------------------------------------------------------------------------

def test_nobody_creates_owned_files_in_0777_dir(mnt, as_nobody):
    res = nobody(as_nobody, mnt, r"""
O("create", P("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
E("mkdir", os.mkdir, P("d"))
E("symlink", os.symlink, "f", P("l"))
E("mkfifo", os.mkfifo, P("p"))
E("write", lambda: open(P("f"), "wb").write(b"mine"))
""")
    check(res, {"create": "ok", "mkdir": "ok", "symlink": "ok", "mkfifo": "ok", "write": "ok"})
    for name in ("f", "d", "l", "p"):
        st = os.lstat(mnt / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(mnt / "f").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mnt / "d").st_mode) == 0o755
    # root reads a 0600 file of nobody's all the same
    assert read(mnt / "f") == b"mine"


def test_read_write_permission_bits(mnt, as_nobody):
    mkfile(mnt / "secret", mode=0o600)
    mkfile(mnt / "public", mode=0o644)
    mkfile(mnt / "grp", mode=0o640, gid=NOBODY)          # nobody reads via group
    mkfile(mnt / "grpw", mode=0o424, gid=NOBODY)   # group may write, not read (others may)
    mkfile(mnt / "own", mode=0o077, uid=NOBODY, gid=NOBODY)  # owner bits win: none
    mkfile(mnt / "world", mode=0o666)
    res = nobody(as_nobody, mnt, r"""
O("secret_r", P("secret"), os.O_RDONLY)
O("secret_w", P("secret"), os.O_WRONLY)
O("public_r", P("public"), os.O_RDONLY)
O("public_w", P("public"), os.O_WRONLY)
O("public_rw", P("public"), os.O_RDWR)
O("public_trunc", P("public"), os.O_WRONLY | os.O_TRUNC)
O("public_append", P("public"), os.O_WRONLY | os.O_APPEND)
E("public_truncate", os.truncate, P("public"), 0)
O("grp_r", P("grp"), os.O_RDONLY)
O("grp_w", P("grp"), os.O_WRONLY)
O("grpw_r", P("grpw"), os.O_RDONLY)
W("grpw_w", P("grpw"), b"G")
O("own_r", P("own"), os.O_RDONLY)
O("own_w", P("own"), os.O_WRONLY)
W("world_w", P("world"), b"W")
E("world_truncate", os.truncate, P("world"), 1)
""")
    check(res, {
        "secret_r": "EACCES", "secret_w": "EACCES",
        "public_r": "ok", "public_w": "EACCES", "public_rw": "EACCES",
        "public_trunc": "EACCES", "public_append": "EACCES", "public_truncate": "EACCES",
        "grp_r": "ok", "grp_w": "EACCES",
        "grpw_r": "EACCES", "grpw_w": "ok",
        "own_r": "EACCES", "own_w": "EACCES",
        "world_w": "ok", "world_truncate": "ok",
    })
    assert read(mnt / "public") == b"root data"
    assert read(mnt / "secret") == b"root data"
    assert read(mnt / "grpw") == b"Goot data"
    assert read(mnt / "world") == b"W"


def test_no_create_or_delete_in_root_0755_dir(mnt, as_nobody):
    d = mkdir(mnt / "d", 0o755)
    mkfile(d / "f", mode=0o666)
    mkdir(d / "sub", 0o777)
    mkdir(mnt / "open", 0o777)
    res = nobody(as_nobody, mnt, r"""
O("create", P("d", "new"), os.O_WRONLY | os.O_CREAT, 0o644)
E("mkdir", os.mkdir, P("d", "newdir"))
E("symlink", os.symlink, "x", P("d", "newlink"))
E("mkfifo", os.mkfifo, P("d", "fifo"))
E("link", os.link, P("d", "f"), P("d", "f2"))
E("unlink", os.unlink, P("d", "f"))
E("rmdir", os.rmdir, P("d", "sub"))
E("rename_out", os.rename, P("d", "f"), P("open", "f"))
E("rename_within", os.rename, P("d", "f"), P("d", "g"))
W("write_existing", P("d", "f"), b"changed")
O("create_in_sub", P("d", "sub", "mine"), os.O_WRONLY | os.O_CREAT, 0o644)
""")
    check(res, {"create": "EACCES", "mkdir": "EACCES", "symlink": "EACCES",
                "mkfifo": "EACCES", "link": "EACCES", "unlink": "EACCES",
                "rmdir": "EACCES", "rename_out": "EACCES", "rename_within": "EACCES",
                "write_existing": "ok", "create_in_sub": "ok"})
    assert sorted(os.listdir(d)) == ["f", "sub"]
    assert os.listdir(mnt / "open") == []
    assert read(d / "f") == b"changedta"
    assert os.stat(d / "sub" / "mine").st_uid == NOBODY


def test_delete_and_rename_in_0777_dir(mnt, as_nobody):
    d = mkdir(mnt / "d", 0o777)
    mkfile(d / "rootfile", mode=0o600)
    mkdir(d / "rootdir", 0o755)
    res = nobody(as_nobody, mnt, r"""
E("rename", os.rename, P("d", "rootfile"), P("d", "renamed"))
E("unlink", os.unlink, P("d", "renamed"))
E("rename_dir_same_parent", os.rename, P("d", "rootdir"), P("d", "rd2"))
E("rmdir", os.rmdir, P("d", "rd2"))
""")
    check(res, {"rename": "ok", "unlink": "ok", "rename_dir_same_parent": "ok", "rmdir": "ok"})
    assert os.listdir(d) == []


def test_moving_a_dir_to_another_parent_needs_write_on_it(mnt, as_nobody):
    # rename(2) must update the moved directory's "..": that needs write
    # permission on the directory itself, not only on the two parents
    mkdir(mnt / "a", 0o777)
    mkdir(mnt / "b", 0o777)
    mkdir(mnt / "a" / "rootdir", 0o755)
    mkdir(mnt / "a" / "opendir", 0o777)
    res = nobody(as_nobody, mnt, r"""
E("move_rootdir", os.rename, P("a", "rootdir"), P("b", "rootdir"))
E("move_opendir", os.rename, P("a", "opendir"), P("b", "opendir"))
""")
    check(res, {"move_rootdir": "EACCES", "move_opendir": "ok"})
    assert os.listdir(mnt / "a") == ["rootdir"] and os.listdir(mnt / "b") == ["opendir"]


def test_sticky_dir(mnt, as_nobody):
    d = mkdir(mnt / "tmp", 0o1777)
    mkfile(d / "rootfile", mode=0o666)
    mkdir(d / "rootdir", 0o777)
    res = nobody(as_nobody, mnt, r"""
O("create_own", P("tmp", "mine"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
O("create_own2", P("tmp", "mine2"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
E("unlink_root", os.unlink, P("tmp", "rootfile"))
E("rename_root", os.rename, P("tmp", "rootfile"), P("tmp", "stolen"))
E("rename_over_root", os.rename, P("tmp", "mine2"), P("tmp", "rootfile"))
E("rmdir_root", os.rmdir, P("tmp", "rootdir"))
W("write_root", P("tmp", "rootfile"), b"scribble")
E("rename_own", os.rename, P("tmp", "mine"), P("tmp", "mine3"))
E("unlink_own", os.unlink, P("tmp", "mine3"))
E("unlink_own2", os.unlink, P("tmp", "mine2"))
""")
    check(res, {"create_own": "ok", "create_own2": "ok",
                "unlink_root": "EPERM", "rename_root": "EPERM",
                "rename_over_root": "EPERM", "rmdir_root": "EPERM",
                "write_root": "ok", "rename_own": "ok",
                "unlink_own": "ok", "unlink_own2": "ok"})
    assert sorted(os.listdir(d)) == ["rootdir", "rootfile"]
    assert read(d / "rootfile") == b"scribblea"   # over "root data"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o1777


def test_chmod_chown_utime_by_nobody(mnt, as_nobody):
    mkfile(mnt / "rootfile", mode=0o666)
    mkfile(mnt / "rootro", mode=0o644)
    mkfile(mnt / "mine", mode=0o644, uid=NOBODY, gid=NOBODY)
    res = nobody(as_nobody, mnt, r"""
E("chmod_root", os.chmod, P("rootfile"), 0o777)
E("chown_root", os.chown, P("rootfile"), 65534, -1)
E("chgrp_root", os.chown, P("rootfile"), -1, 65534)
E("utime_set_root", os.utime, P("rootfile"), ns=(10**18, 10**18))
E("utime_now_root_writable", os.utime, P("rootfile"))
E("utime_now_root_readonly", os.utime, P("rootro"))
E("chmod_own", os.chmod, P("mine"), 0o600)
E("chown_own_to_root", os.chown, P("mine"), 0, -1)
E("chgrp_own_to_foreign", os.chown, P("mine"), -1, 0)
E("chown_own_noop", os.chown, P("mine"), 65534, 65534)
E("utime_set_own", os.utime, P("mine"), ns=(10**18, 10**18))
""")
    check(res, {"chmod_root": "EPERM", "chown_root": "EPERM", "chgrp_root": "EPERM",
                "utime_set_root": "EPERM", "utime_now_root_writable": "ok",
                "utime_now_root_readonly": "EACCES",
                "chmod_own": "ok", "chown_own_to_root": "EPERM",
                "chgrp_own_to_foreign": "EPERM", "chown_own_noop": "ok",
                "utime_set_own": "ok"})
    st = os.stat(mnt / "rootfile")
    assert stat.S_IMODE(st.st_mode) == 0o666 and (st.st_uid, st.st_gid) == (0, 0)
    st = os.stat(mnt / "mine")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert st.st_mtime_ns == 10**18


def test_setgid_bit_dropped_when_not_in_group(mnt, as_nobody):
    # nobody owns the file but is not in its group (root): asking for g+s
    # succeeds, silently without the setgid bit
    mkfile(mnt / "f", mode=0o644, uid=NOBODY, gid=0)
    res = nobody(as_nobody, mnt, r"""
E("chmod", os.chmod, P("f"), 0o2755)
R["mode"] = oct(stat.S_IMODE(os.stat(P("f")).st_mode))
""")
    check(res, {"chmod": "ok", "mode": "0o755"})


def test_write_by_nobody_clears_setuid(mnt, as_nobody):
    mkfile(mnt / "suid", mode=0o6777)
    res = nobody(as_nobody, mnt, r"""
W("write", P("suid"), b"patched")
""")
    check(res, {"write": "ok"})
    assert stat.S_IMODE(os.stat(mnt / "suid").st_mode) == 0o777
    assert read(mnt / "suid") == b"patchedta"


def test_directory_search_and_read_bits(mnt, as_nobody):
    for name, mode in (("x711", 0o711), ("x700", 0o700), ("r744", 0o744)):
        d = mkdir(mnt / name, mode)
        mkfile(d / "f", b"inside", mode=0o644)
    res = nobody(as_nobody, mnt, r"""
for d in ("x711", "x700", "r744"):
    E(d + "_stat", os.stat, P(d, "f"))
    E(d + "_read", lambda: open(P(d, "f"), "rb").read())
    E(d + "_list", os.listdir, P(d))
    O(d + "_opendir", P(d), os.O_RDONLY | os.O_DIRECTORY)
    E(d + "_chdir", os.chdir, P(d))
    os.chdir("/")
R["r744_names"] = sorted(os.listdir(P("r744")))
""")
    check(res, {
        "x711_stat": "ok", "x711_read": "ok", "x711_list": "EACCES",
        "x711_opendir": "EACCES", "x711_chdir": "ok",
        "x700_stat": "EACCES", "x700_read": "EACCES", "x700_list": "EACCES",
        "x700_opendir": "EACCES", "x700_chdir": "EACCES",
        "r744_stat": "EACCES", "r744_read": "EACCES", "r744_list": "ok",
        "r744_opendir": "ok", "r744_chdir": "EACCES",
        "r744_names": ["f"],
    })


def test_setgid_dir_inheritance(mnt, as_nobody):
    g = mkdir(mnt / "g", 0o2777, gid=1234)
    assert stat.S_IMODE(os.stat(g).st_mode) == 0o2777
    res = nobody(as_nobody, mnt, r"""
O("create", P("g", "f"), os.O_WRONLY | os.O_CREAT, 0o644)
O("create_sgid", P("g", "s"), os.O_WRONLY | os.O_CREAT, 0o2755)
E("mkdir", os.mkdir, P("g", "sub"), 0o755)
O("create_nested", P("g", "sub", "deep"), os.O_WRONLY | os.O_CREAT, 0o644)
E("mknod", os.mknod, P("g", "node"), stat.S_IFREG | 0o600)
""")
    check(res, {"create": "ok", "create_sgid": "ok", "mkdir": "ok",
                "create_nested": "ok", "mknod": "ok"})
    for p in ("f", "s", "sub", "sub/deep", "node"):
        st = os.stat(g / p)
        assert (st.st_uid, st.st_gid) == (NOBODY, 1234), p
    # a new directory inherits the setgid bit, a new file does not get it
    assert stat.S_IMODE(os.stat(g / "sub").st_mode) == 0o2755
    assert stat.S_IMODE(os.stat(g / "f").st_mode) == 0o644
    # nobody is not in group 1234, so its request for setgid is dropped
    assert stat.S_IMODE(os.stat(g / "s").st_mode) == 0o755
    # root's new entries inherit the group too
    os.mkdir(g / "rootdir")
    (g / "rootfile").write_bytes(b"")
    assert os.stat(g / "rootdir").st_gid == 1234
    assert os.stat(g / "rootfile").st_gid == 1234
    assert os.stat(g / "rootdir").st_mode & stat.S_ISGID
    # without setgid the creator's group is used
    os.chmod(g, 0o777)
    res = nobody(as_nobody, mnt, r"""
O("create", P("g", "plain"), os.O_WRONLY | os.O_CREAT, 0o644)
""")
    check(res, {"create": "ok"})
    assert os.stat(g / "plain").st_gid == NOBODY


def test_xattr_permissions(mnt, as_nobody):
    mkfile(mnt / "ro", mode=0o644)
    mkfile(mnt / "hidden", mode=0o600)
    mkfile(mnt / "rw", mode=0o666)
    for p in ("ro", "hidden", "rw"):
        os.setxattr(mnt / p, "user.tag", b"root")
    res = nobody(as_nobody, mnt, r"""
E("get_ro", os.getxattr, P("ro"), "user.tag")
E("set_ro", os.setxattr, P("ro"), "user.tag", b"nobody")
E("remove_ro", os.removexattr, P("ro"), "user.tag")
E("get_hidden", os.getxattr, P("hidden"), "user.tag")
E("list_hidden", os.listxattr, P("hidden"))
E("set_rw", os.setxattr, P("rw"), "user.tag", b"nobody")
""")
    check(res, {"get_ro": "ok", "set_ro": "EACCES", "remove_ro": "EACCES",
                "get_hidden": "EACCES", "list_hidden": "ok", "set_rw": "ok"})
    assert os.getxattr(mnt / "ro", "user.tag") == b"root"
    assert os.getxattr(mnt / "rw", "user.tag") == b"nobody"


def test_access_as_nobody(mnt, as_nobody):
    mkfile(mnt / "r644", mode=0o644)
    mkfile(mnt / "all", mode=0o777)
    mkfile(mnt / "g750", mode=0o750)
    mkfile(mnt / "own500", mode=0o500, uid=NOBODY, gid=NOBODY)
    mkdir(mnt / "d711", 0o711)
    res = nobody(as_nobody, mnt, r"""
for name in ("r644", "all", "g750", "own500", "d711", "missing"):
    p = P(name)
    R[name] = "".join(c for c, m in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK))
                      if os.access(p, m)) or ("-" if os.access(p, os.F_OK) else "absent")
""")
    check(res, {"r644": "r", "all": "rwx", "g750": "-", "own500": "rx",
                "d711": "x", "missing": "absent"})
