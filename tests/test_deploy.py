"""The Kubernetes manifests in systemd/kubernetes/ against the real CLI.

No cluster here: the files are parsed and checked for what would break
them silently. Every document has apiVersion, kind and metadata.name of a
known kind; every jfscache container runs one image; every `jfscache`
command line (container commands, init containers, hooks, shell scripts,
Fluid's FUSE command) parses with the click commands of jfscache.cli, so a
renamed or removed option fails here; no secret reaches a command line;
members have a preStop hook that drains (`group drain`) and then unmounts
their own mount point, and a grace period that covers the drain's --timeout
and the daemon's shutdown; mounts propagate the right way.
"""
from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from jfscache.cli import cli

DIR = Path(__file__).resolve().parent.parent / "systemd" / "kubernetes"
FILES = sorted(DIR.glob("*.yaml")) + sorted(DIR.glob("*.yml"))
IMAGE = "jfscache"

KINDS = {
    "Namespace": {"v1"}, "ConfigMap": {"v1"}, "Secret": {"v1"}, "Service": {"v1"}, "Pod": {"v1"},
    "ServiceAccount": {"v1"},
    "DaemonSet": {"apps/v1"}, "StatefulSet": {"apps/v1"}, "Deployment": {"apps/v1"},
    "Job": {"batch/v1"}, "CronJob": {"batch/v1"},
    "Role": {"rbac.authorization.k8s.io/v1"}, "RoleBinding": {"rbac.authorization.k8s.io/v1"},
    "HorizontalPodAutoscaler": {"autoscaling/v2"},
    "ThinRuntimeProfile": {"data.fluid.io/v1alpha1"}, "ThinRuntime": {"data.fluid.io/v1alpha1"},
    "Dataset": {"data.fluid.io/v1alpha1"},
}
# Containers that run the user's own program, not jfscache.
USER_CONTAINERS = {("Pod", "train-market", "train")}
SECRET_ENV = {"META_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
SHELL_OPS = {"&&", "||", ";", "|", "&", "(", ")", ";;", "then", "do", "else", "if", "until", "while", "!",
             "exec", "{", "}"}
REDIRECT = re.compile(r"^\d*[<>]")


def _docs() -> list[tuple[str, dict]]:
    out = []
    for f in FILES:
        for doc in yaml.safe_load_all(f.read_text()):
            if doc is not None:
                out.append((f.name, doc))
    return out


DOCS = _docs()


def _pod_specs():
    """(kind, name, pod spec) of every workload, Fluid's FUSE spec included."""
    for _, d in DOCS:
        kind, spec = d["kind"], d.get("spec", {})
        if kind == "Pod":
            yield kind, d["metadata"]["name"], spec
        elif kind in ("DaemonSet", "StatefulSet", "Deployment", "Job"):
            yield kind, d["metadata"]["name"], spec["template"]["spec"]
        elif kind == "CronJob":
            yield kind, d["metadata"]["name"], spec["jobTemplate"]["spec"]["template"]["spec"]


def _containers():
    """(kind, name, container, pod spec or None) of every container."""
    for kind, name, pod in _pod_specs():
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            yield kind, name, c, pod
    for _, d in DOCS:
        if d["kind"] in ("ThinRuntimeProfile", "ThinRuntime") and "fuse" in d["spec"]:
            yield d["kind"], d["metadata"]["name"], dict(d["spec"]["fuse"], name="fuse"), None


def _env_values(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def _expand(arg: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR), and the shell's $VAR / ${VAR}: known values, else
    a placeholder that every option type accepts ("1")."""
    arg = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), "1"), arg)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), "1"), arg)


def _shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell script that start with jfscache."""
    out = []
    joined = re.sub(r"\\\n", " ", script)
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "jfscache" not in line:
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lex.whitespace_split = True
        lex.commenters = ""
        cmd: list[str] | None = None
        skip = False
        for tok in list(lex) + [";"]:
            if skip:
                skip = False
                continue
            if REDIRECT.match(tok):
                skip = tok.rstrip("0123456789") in ("<", ">", ">>", "<<")
                continue
            if cmd is None:
                if tok == "jfscache" or tok.endswith("/jfscache"):
                    cmd = []
            elif tok in SHELL_OPS:
                out.append(cmd)
                cmd = None
            else:
                cmd.append(tok)
    return out


def _argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def _command_lines(c: dict) -> list[list[str]]:
    """Every jfscache invocation of a container (its own, its hooks', its scripts'),
    arguments expanded as the kubelet and the shell would."""
    env = _env_values(c)
    argvs = [_argv(c)]
    for hook in ("preStop", "postStart"):
        h = c.get("lifecycle", {}).get(hook, {})
        if "exec" in h:
            argvs.append(h["exec"]["command"])
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if "exec" in c.get(probe, {}):
            argvs.append(c[probe]["exec"]["command"])
    lines = []
    for argv in argvs:
        if not argv:
            continue
        if argv[0] == "jfscache" or argv[0].endswith("/jfscache"):
            lines.append(argv[1:])
        elif Path(argv[0]).name in ("sh", "bash") and "-c" in argv:
            script = argv[argv.index("-c") + 1]
            lines.extend(_shell_commands(script))
    return [[_expand(a, env) for a in line] for line in lines]


def _parse(args: list[str]) -> tuple[str, dict]:
    """Parse a jfscache command line with the real click commands; return the
    subcommand's path and its parsed parameters. Raises click errors."""
    ctx = cli.make_context("jfscache", list(args), resilient_parsing=False)
    cmd, path = cli, "jfscache"
    rest = [*ctx._protected_args, *ctx.args]
    while isinstance(cmd, click.Group):
        name, sub, rest = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"unknown command {name!r}"
        ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
        cmd, path = sub, f"{path} {name}"
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args] if isinstance(sub, click.Group) else []
    return path, ctx.params


def _all_invocations():
    for kind, name, c, pod in _containers():
        for line in _command_lines(c):
            yield kind, name, c, pod, line


def _members():
    """(kind, name, container, pod, params) of every container that mounts as a sharing group member."""
    for kind, name, c, pod in _containers():
        argv = _command_lines(c)[:1]
        if not argv or not argv[0] or pod is None:
            continue
        path, params = _parse(argv[0])
        if path == "jfscache mount" and params["cache_group"] and not params["no_sharing"]:
            yield kind, name, c, pod, params


def _mountpoint(params: dict) -> str:
    return params["args"][-1]


# ---- the tests ------------------------------------------------------------

def test_files_exist():
    names = {f.name for f in FILES}
    assert len(names) >= 6 and (DIR / "Dockerfile").is_file()


@pytest.mark.parametrize("fname,doc", DOCS, ids=[f"{f}:{d.get('kind')}/{d.get('metadata', {}).get('name')}"
                                                  for f, d in DOCS])
def test_documents_are_known_kinds(fname, doc):
    assert isinstance(doc, dict), fname
    assert doc.get("kind") in KINDS, f"{fname}: unknown kind {doc.get('kind')!r}"
    assert doc.get("apiVersion") in KINDS[doc["kind"]], f"{fname}: {doc['kind']} {doc.get('apiVersion')}"
    assert doc.get("metadata", {}).get("name"), f"{fname}: {doc['kind']} without metadata.name"
    if doc["kind"] not in ("Namespace", "ThinRuntimeProfile"):  # cluster-scoped
        assert doc["metadata"].get("namespace") == "jfscache"


def test_one_image():
    images = set()
    for kind, name, c, _ in _containers():
        if (kind, name, c["name"]) in USER_CONTAINERS:
            continue
        if kind == "ThinRuntime" and "image" not in c:
            continue  # the profile's image
        image = c["image"] + (f":{c['imageTag']}" if c.get("imageTag") else "")
        repo = image.rsplit("@", 1)[0]
        repo = repo.rsplit(":", 1)[0] if ":" in repo.rsplit("/", 1)[-1] else repo
        assert repo.rsplit("/", 1)[-1] == IMAGE, f"{kind}/{name}/{c['name']}: image {image}"
        images.add(image)
    assert len(images) == 1, images


def test_command_lines_parse_with_the_real_cli():
    seen = set()
    for kind, name, c, _, line in _all_invocations():
        try:
            path, _ = _parse(line)
        except (click.ClickException, AssertionError) as e:
            msg = e.format_message() if isinstance(e, click.ClickException) else str(e)
            pytest.fail(f"{kind}/{name}/{c['name']}: jfscache {' '.join(line)}: {msg}")
        seen.add(path)
    # What the manifests are for: if one of these disappears, so did a use.
    assert {"jfscache mount", "jfscache umount", "jfscache warmup", "jfscache group drain"} <= seen, seen


def test_the_parser_catches_a_wrong_option():
    with pytest.raises(click.NoSuchOption):
        _parse(["mount", "redis://r/1", "/mnt/x", "--group-advertise", "10.0.0.1:9750"])
    with pytest.raises(click.BadParameter):
        _parse(["warmup", "--threads", "0", "/mnt/x"])
    assert _shell_commands('a && exec jfscache warmup --check "$D" > /tmp/x && b') == [
        ["warmup", "--check", "$D"]]
    # subcommands of `group` are parsed too, options and all
    with pytest.raises(click.NoSuchOption):
        _parse(["group", "drain", "/mnt/x", "--wait", "10"])
    with pytest.raises(click.BadParameter):
        _parse(["group", "weight", "/mnt/x", "--", "-1"])
    assert _parse(["group", "drain", "/mnt/x", "--timeout", "90"]) == (
        "jfscache group drain", {"mountpoint": "/mnt/x", "idle": 10, "timeout": 90})


def _secret_values() -> set[str]:
    values = set()
    for _, d in DOCS:
        if d["kind"] == "Secret":
            for v in d.get("stringData", {}).values():
                values |= {line.partition("=")[2] or line for line in v.splitlines() if line.strip()}
            for v in d.get("data", {}).values():
                values.add(base64.b64decode(v).decode())
    return {v.strip() for v in values if len(v.strip()) >= 6}


def test_no_secret_on_a_command_line():
    secrets = _secret_values()
    assert secrets, "the Secret example went missing"
    for kind, name, c, _ in _containers():
        where = f"{kind}/{name}/{c['name']}"
        texts = [*_argv(c)]
        pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
        texts += pre
        for text in texts:
            for s in secrets:
                assert s not in text, f"{where}: a secret value in its command line"
            assert not re.search(r"://[^/\s:@]*:[^@/\s]+@", text), f"{where}: a password in a URL"
            m = re.search(r"\b(META_PASSWORD|AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID)=([^\s;]*)", text)
            assert m is None or m.group(2).lstrip("\"'").startswith("$"), f"{where}: {m.group(0)}"
        for e in c.get("env", []):
            if e["name"] in SECRET_ENV:
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{where}: {e['name']} not from a Secret"


def test_secrets_file_is_mounted_as_a_file():
    """--secrets-file opens with O_NOFOLLOW and wants no group/other bits:
    a Secret volume's files are symlinks, so it must come in by subPath."""
    for kind, name, c, pod in _containers():
        for line in _command_lines(c):
            if "--secrets-file" not in line:
                continue
            path = line[line.index("--secrets-file") + 1]
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert path in mounts and mounts[path].get("subPath"), f"{kind}/{name}: {path} not a subPath mount"
            vol = {v["name"]: v for v in pod["volumes"]}[mounts[path]["name"]]
            assert vol["secret"].get("defaultMode", 0o644) & 0o077 == 0


def test_members_have_a_prestop_hook_and_grace():
    members = list(_members())
    assert {k for k, *_ in members} == {"DaemonSet", "StatefulSet"}
    for kind, name, c, pod, params in members:
        hook = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        assert hook, f"{kind}/{name}: no preStop hook"
        cmds = [_parse(cmd) for cmd in _shell_commands(hook[-1]) if cmd]
        paths = [path for path, _ in cmds]
        mp = _mountpoint(params)
        assert "jfscache umount" in paths, f"{kind}/{name}: preStop does not unmount"
        umount = paths.index("jfscache umount")
        assert cmds[umount][1]["mountpoint"] == mp, f"{kind}/{name}: preStop unmounts another mount point"
        # Drain before leaving: the blocks' new owners fetch them from this
        # member while it is still up, instead of from S3.
        drains = [i for i, (path, p) in enumerate(cmds) if path == "jfscache group drain" and p["mountpoint"] == mp]
        assert drains and drains[0] < umount, f"{kind}/{name}: preStop does not drain {mp} before unmounting it"
        # The hook's time counts against the grace period: the drain waits up
        # to its --timeout; then staged uploads wait up to --io-timeout,
        # disk-cache writes up to 30 s, leaving the group up to 5 s
        # (jfscache/daemon.py, group/node.py).
        drain_timeout = cmds[drains[0]][1]["timeout"]
        assert pod["terminationGracePeriodSeconds"] >= drain_timeout + params["io_timeout"] + 35, f"{kind}/{name}"
        assert "--group-listen" in _argv(c), f"{kind}/{name}: members must say where peers reach them"
        assert not _argv(c)[_argv(c).index("--group-listen") + 1].startswith("0.0.0.0")


def test_mount_propagation():
    host_mnt = None
    for kind, name, c, pod, params in _members():
        mp = _mountpoint(params)
        vols = {v["name"]: v for v in pod["volumes"]}
        under = [m for m in c["volumeMounts"] if mp.startswith(m["mountPath"].rstrip("/") + "/")
                 and "hostPath" in vols[m["name"]]]
        if kind == "DaemonSet":  # the node's pods use this mount
            assert under and under[0]["mountPropagation"] == "Bidirectional", mp
            assert c["securityContext"]["privileged"] is True  # Bidirectional needs it
            host_mnt = vols[under[0]["name"]]["hostPath"]["path"]
        else:  # a private mount
            assert not under, f"{kind}/{name}: {mp} under a hostPath"
    assert host_mnt
    readers = 0
    for kind, name, pod_spec in _pod_specs():
        if kind != "Pod":
            continue
        vols = {v["name"]: v for v in pod_spec["volumes"]}
        for c in pod_spec.get("initContainers", []) + pod_spec["containers"]:
            for m in c.get("volumeMounts", []):
                if vols[m["name"]].get("hostPath", {}).get("path") == host_mnt:
                    assert m.get("mountPropagation") == "HostToContainer", f"{name}/{c['name']}"
                    readers += 1
    assert readers >= 2  # the warmup init container and the training container


def test_warmup_is_gated_on_check():
    for kind, name, pod in _pod_specs():
        if kind != "Pod":
            continue
        init = pod["initContainers"]
        modes = [p.get("mode") for c in init for line in _command_lines(c)
                 for path, p in [_parse(line)] if path == "jfscache warmup"]
        assert "check" in modes and None in modes, modes


def test_scaler_script_compiles():
    for _, d in DOCS:
        if d["kind"] == "ConfigMap":
            for key, text in d.get("data", {}).items():
                if key.endswith(".py"):
                    compile(text, key, "exec")
