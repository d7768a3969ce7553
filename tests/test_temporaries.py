"""Temporary files of write_files on a shared results folder: named by host, pid namespace
and pid, deleted only when this host and namespace wrote them and their process is gone."""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

import outputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DAY = outputs.STALE_AFTER


def dead_pid():
    """The pid of a process that has ended."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def plant(folder, prefix, age=0.0):
    """A temporary file named ``prefix`` + random letters + a result's name, ``age`` s old."""
    path = folder / f"{prefix}{os.urandom(4).hex()}fig1a.json"
    path.write_text("partial")
    if age:
        os.utime(path, (time.time() - age,) * 2)
    return path


def prefix_of(pid, host=None, namespace=None):
    """This process's temporary prefix with the pid (and the host, namespace) replaced."""
    own_host, own_namespace, _ = outputs.temporary_prefix()[5:].split("~")
    return f".tmp-{host or own_host}~{namespace or own_namespace}~{pid}-"


def test_names_carry_host_namespace_and_pid(tmp_path, monkeypatch):
    """The name reads back as (host, namespace, pid), a host with '-', '~' and '.' too; an
    earlier version (which takes an all-digit owner field for a pid) never reads a pid."""
    names = []
    outputs.write_files({tmp_path / "a.txt": lambda tmp: names.append(os.path.basename(tmp))})
    assert names[0].startswith(outputs.temporary_prefix()) and names[0].endswith("a.txt")
    assert outputs._owner(names[0]) == outputs._identity()
    for host in ("node-01.cluster~x", "1234", "knoten-ü"):
        monkeypatch.setattr(socket, "gethostname", lambda: host)
        name = outputs.temporary_prefix() + "abc_x-1.json"
        assert outputs._owner(name) == (host, outputs._identity()[1], os.getpid())
        assert not name[5:].split("-", 1)[0].isdigit()
    assert outputs._owner(f".tmp-{os.getpid()}-abc_x-1.json") == (None, None, os.getpid())
    assert outputs._owner(".tmp-x-y") is None and outputs._owner("tmp-1-y") is None


def test_only_dead_temporaries_of_this_host_and_namespace_are_removed(tmp_path):
    """A dead pid of another host or another pid namespace (a shard elsewhere: its pid means
    nothing here) and a live pid of this identity survive a write; a dead pid of this
    identity is removed."""
    dead = dead_pid()
    other_host = plant(tmp_path, prefix_of(dead, host="node%2D17.cluster"))
    other_namespace = plant(tmp_path, prefix_of(dead, namespace="4026531999"))
    live = plant(tmp_path, prefix_of(os.getppid()))
    stale = plant(tmp_path, prefix_of(dead))
    outputs.write_text(tmp_path / "result.txt", "done")
    assert other_host.exists() and other_namespace.exists() and live.exists()
    assert not stale.exists() and (tmp_path / "result.txt").read_text() == "done"


def test_old_style_temporaries_are_removed_only_when_a_day_old(tmp_path):
    """.tmp-<pid>-* of earlier versions (no host): a fresh one stays even with a dead pid
    (its writer may run on another node); one more than a day old with a dead pid goes; one
    of a live pid stays."""
    dead = dead_pid()
    fresh = plant(tmp_path, f".tmp-{dead}-")
    old = plant(tmp_path, f".tmp-{dead}-", age=DAY + 60)
    old_live = plant(tmp_path, f".tmp-{os.getppid()}-", age=DAY + 60)
    outputs.write_text(tmp_path / "result.txt", "done")
    assert fresh.exists() and not old.exists() and old_live.exists()


def test_foreign_temporaries_lists_old_leftovers_of_other_hosts_only(tmp_path):
    """Old temporaries of another host or namespace are listed with their host and age;
    fresh ones, this identity's and old-style ones are not; nothing is deleted."""
    dead = dead_pid()
    old_host = plant(tmp_path, prefix_of(dead, host="node%2D17"), age=DAY + 60)
    old_namespace = plant(tmp_path, prefix_of(dead, namespace="4026531999"), age=2 * DAY)
    others = [plant(tmp_path, prefix_of(dead, host="node%2D18")),
              plant(tmp_path, prefix_of(dead), age=2 * DAY),
              plant(tmp_path, f".tmp-{dead}-", age=2 * DAY)]
    found = outputs.foreign_temporaries(tmp_path)
    assert [(path, host) for path, host, _ in found] == sorted(
        [(str(old_host), "node-17"), (str(old_namespace), socket.gethostname())])
    assert all(DAY < age < 3 * DAY for _, _, age in found)
    assert [path for path, _, _ in outputs.foreign_temporaries(tmp_path, older_than=-1)] == \
        sorted(str(p) for p in (old_host, old_namespace, others[0]))
    assert all(p.exists() for p in [old_host, old_namespace, *others])


INNER_WRITER = r"""
import os, sys, time
busy, folder, started, done = set(map(int, sys.argv[1].split())), *sys.argv[2:5]
for _ in range(5000):              # a writer whose pid is not in use outside this namespace
    child = os.fork()
    if child == 0:
        if os.getpid() in busy:
            os._exit(3)
        sys.path.insert(0, {repo!r})
        import outputs

        def slow(tmp):             # held until the outer process has written
            with open(tmp, "w") as f:
                f.write("inner")
            with open(started, "w") as f:
                f.write(os.readlink("/proc/self/ns/pid"))
            for _ in range(600):
                if os.path.exists(done):
                    break
                time.sleep(0.02)

        outputs.write_files({{os.path.join(folder, "inner.txt"): slow}})
        os._exit(0)
    status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    if status != 3:
        sys.exit(status)
"""


def unshare_command():
    """The unshare command line that runs a command in a new pid namespace here, or a skip."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    tried = []
    for flags in (["--pid", "--fork", "--mount-proc"],
                  ["--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        probe = subprocess.run(["unshare", *flags, "true"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["unshare", *flags]
        tried.append(probe.stderr.strip())
    pytest.skip(f"unshare cannot make a pid namespace here: {' / '.join(tried)}")


def test_a_writer_in_another_pid_namespace_keeps_its_temporary(tmp_path):
    """A slowed writer in another pid namespace (its pid not in use here) and a write of
    this process into the same folder meanwhile: the slowed writer finishes and its file is
    there."""
    command = unshare_command()
    folder, signals = tmp_path / "results", tmp_path / "signals"
    folder.mkdir(), signals.mkdir()
    started, done = signals / "started", signals / "done"
    busy = " ".join(name for name in os.listdir("/proc") if name.isdigit())
    inner = subprocess.Popen([*command, sys.executable, "-c", INNER_WRITER.format(repo=REPO),
                              busy, str(folder), str(started), str(done)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1000):
            if started.exists() and started.read_text() or inner.poll() is not None:
                break
            time.sleep(0.01)
        assert started.exists(), inner.communicate(timeout=10)
        assert started.read_text() != os.readlink("/proc/self/ns/pid")
        outputs.write_text(folder / "outer.txt", "outer")
        done.write_text("")
        _, stderr = inner.communicate(timeout=30)
    finally:
        done.write_text("")
        if inner.poll() is None:
            inner.kill()
    assert inner.returncode == 0, stderr[-2000:]
    assert (folder / "inner.txt").read_text() == "inner"
    assert (folder / "outer.txt").read_text() == "outer"
    assert not [name for name in os.listdir(folder) if name.startswith(".tmp-")]
