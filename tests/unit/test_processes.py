"""Processes as /proc shows them: open-file limits, capabilities, names, the
report on real processes started with a low limit, and running a service
command that misbehaves."""

import os
import resource
import subprocess
import sys
import threading
import time

import pytest
from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_daemons as daemons
import sstuning_limits as limits
import sstuning_procfs as procfs
import sstuning_services as services
import sstuning_settings as settings_mod

NAMES = daemons.program_names()
PARENTS = daemons.server_names()


def wait_until_exec(pid, program, timeout=10):
    """Poll until `pid` has exec'd `program` (its comm and argv[0] show it):
    before that it is still the forked parent, under the parent's name."""
    deadline = time.monotonic() + timeout
    while True:
        stat = procfs.proc_stat(pid)
        if stat and stat[0] == os.path.basename(program) and procfs.proc_argv(pid)[:1] == [str(program)]:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"pid {pid} did not exec {program} within {timeout} s (now {stat}, {procfs.proc_argv(pid)})")
        time.sleep(0.01)


def test_limits_and_capabilities_of_this_process():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    assert procfs.proc_nofile(os.getpid()) == tuple(None if v == unlimited else v for v in (soft, hard))
    capeff = next(line for line in open("/proc/self/status") if line.startswith("CapEff:"))
    assert procfs.has_cap_sys_resource() == bool(int(capeff.split()[1], 16) & (1 << 24))
    assert procfs.proc_nofile(2**22 + 1) is None  # no such process (above the kernel's pid_max limit)


def _limits_file(pid):
    with open(f"/proc/{pid}/limits") as handle:
        line = next(line for line in handle if line.startswith("Max open files"))
    return tuple(None if v == "unlimited" else int(v) for v in line.split()[3:5])


@pytest.mark.skipif(os.geteuid() != 0, reason="starts a process as nobody")
def test_the_limits_of_another_users_process_are_read_too():
    # prlimit(2) answers only for the caller's own user ids (or with
    # CAP_SYS_RESOURCE, which this box lacks); /proc/PID/limits answers then.
    proc = subprocess.Popen(["sleep", "30"], user="nobody", group="nogroup",
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (321, 654)))
    try:
        wait_until_exec(proc.pid, "sleep")
        assert procfs.proc_nofile(proc.pid) == _limits_file(proc.pid) == (321, 654)
    finally:
        proc.kill()
        proc.wait()


def test_nr_open_is_read_from_the_kernel():
    with open("/proc/sys/fs/nr_open") as handle:
        assert procfs.nr_open("/proc/sys") == int(handle.read())


@pytest.mark.parametrize(
    "comm, argv, expected",
    [
        ("ss-server", ["/usr/bin/ss-server", "-c", "x"], "ss-server"),
        ("supervisord", ["/usr/bin/python3", "/usr/bin/supervisord", "-n"], "supervisord"),
        ("python3", ["/usr/bin/python3", "/usr/local/bin/ssserver", "-c", "x"], "ssserver"),
        ("python3", ["python3", "ssrig.py", "count-wrap", "--", "/usr/bin/ss-server"], None),
        ("less", ["less", "ss-server"], None),
        ("bash", ["bash"], None),
    ],
)
def test_process_names(comm, argv, expected):
    assert procfs.match_name(comm, argv, NAMES) == expected


def test_process_names_given_as_text_or_a_list():
    kinds = settings_mod.resolve({})["limits"]["kinds"]
    assert limits.process_names("ss-server, ss-local,", kinds) == {"ss-server", "ss-local"}
    assert limits.process_names(["ssserver"], kinds) == {"ssserver"}
    # None: every program and plugin of the kinds, the registry's own when pillar adds none.
    assert limits.process_names(None, kinds) == NAMES
    assert limits.parent_names(kinds) == PARENTS
    with pytest.raises(SaltInvocationError) as err:
        limits.process_names([1], kinds)
    assert "names: [1] must be a list of process names" in str(err.value)


def test_a_pidfile_scopes_the_report_to_that_process_tree(tmp_path):
    pidfile = tmp_path / "pid"
    pidfile.write_text(f"{os.getpid()}\n")
    assert procfs.pid_from(str(pidfile)) == os.getpid()
    assert procfs.pid_from(str(tmp_path / "absent")) is None
    child = subprocess.Popen(["sleep", "30"])
    try:
        table = procfs.process_table()
        tree = procfs.subtree(table, [os.getpid()])
        assert {os.getpid(), child.pid} <= tree
        assert os.getppid() not in tree
        assert procfs.alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not procfs.alive(child.pid)


def test_a_low_process_is_reported_with_the_reason(tmp_path):
    """A real process started with soft 256 under a hard limit that allows
    more: the report names it and says it must be started again."""
    fake = tmp_path / "ss-server"
    fake.symlink_to("/bin/sleep")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    hard_shown = None if hard == resource.RLIM_INFINITY else hard
    proc = subprocess.Popen([str(fake), "30"], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        pidfile = tmp_path / "pid"
        pidfile.write_text(f"{proc.pid}\n")
        wait_until_exec(proc.pid, fake)
        report = limits.report("/proc/sys", 1024, NAMES, [str(pidfile)])
        assert not report["ok"]
        (entry,) = report["processes"]
        assert (entry["pid"], entry["name"], entry["soft"], entry["hard"]) == (proc.pid, "ss-server", 256, hard_shown)
        assert "started before the limit was configured" in entry["reason"]
        assert f"ss-server (pid {proc.pid}): soft 256" in report["comment"]
        assert limits.report("/proc/sys", 256, NAMES, [str(pidfile)])["ok"]
        # `verify` gives up after its wait, with the same verdict.
        assert not limits.verify("/proc/sys", 1024, NAMES, [str(pidfile)], 0)["ok"]
    finally:
        proc.kill()
        proc.wait()


def test_a_capped_process_names_its_parent(tmp_path):
    """Parent without CAP_SYS_RESOURCE and a hard limit below N: the reason
    says so plainly instead of just 'restart it'."""
    if procfs.has_cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: nothing caps it here")
    fake = tmp_path / "ss-local"
    fake.symlink_to("/bin/sleep")
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"ulimit -n 512; {fake} 30 & echo $!; wait"],
        stdout=subprocess.PIPE, text=True,
    )
    child = int(shell.stdout.readline())
    try:
        # `$!` is known as soon as the shell forks: wait until the child is ss-local.
        wait_until_exec(child, fake)
        pidfile = tmp_path / "pid"
        pidfile.write_text(str(shell.pid))
        report = limits.report("/proc/sys", 4096, NAMES, [str(pidfile)])
        entry = next(p for p in report["processes"] if p["pid"] == child)
        assert entry["hard"] == 512
        assert entry["reason"].startswith(
            f"capped: its parent sh (pid {shell.pid}) has a hard limit of 512 and no CAP_SYS_RESOURCE")
    finally:
        os.kill(child, 9)
        shell.wait()
        shell.stdout.close()


# --------------------------------------------------------------------------
# Service commands
# --------------------------------------------------------------------------
def test_a_service_command_whose_daemon_keeps_the_pipe_does_not_hang():
    """The command exits while the daemon it started still holds the output
    pipe: the result comes back while that daemon still runs."""
    rc, out = services.run_service(["/bin/sh", "-c", "sleep 60 & echo started $!"], 120)
    word, pid = out.split()
    try:
        assert (rc, word) == (0, "started")
        assert procfs.alive(int(pid)), "run_service waited for the daemon to close the pipe"
    finally:
        os.kill(int(pid), 9)


def test_a_service_command_runs_with_a_clean_environment():
    os.environ["SST_LEAK"] = "x"
    try:
        rc, out = services.run_service(["/usr/bin/env"], 30)
    finally:
        del os.environ["SST_LEAK"]
    assert rc == 0
    assert sorted(line.split("=", 1)[0] for line in out.splitlines()) == sorted(services.SERVICE_ENV)


def test_a_service_command_that_hangs_is_killed():
    with pytest.raises(CommandExecutionError) as err:
        services.run_service([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert "did not finish within 1 s" in str(err.value)


def test_a_service_command_that_cannot_run_is_named():
    with pytest.raises(CommandExecutionError) as err:
        services.run_service(["/nonexistent/service", "start"], 5)
    assert "cannot run /nonexistent/service start" in str(err.value)


# --------------------------------------------------------------------------
# Pidfiles
# --------------------------------------------------------------------------
def test_a_pidfile_that_is_a_named_pipe_gives_none_without_blocking(tmp_path):
    """A pipe planted where a pidfile should be: a plain open would wait for
    a writer forever and hang the run."""
    fifo = tmp_path / "ss.pid"
    os.mkfifo(fifo)
    result = []
    reader = threading.Thread(target=lambda: result.append(procfs.pid_from(str(fifo))), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():
        # Let the blocked open return (a writer appears), so the thread ends.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        reader.join(timeout=10)
        pytest.fail("pid_from blocked on a named pipe")
    assert result == [None]


def test_a_pidfile_that_is_a_directory_a_dangling_link_or_not_a_pid_gives_none(tmp_path):
    (tmp_path / "dir.pid").mkdir()
    assert procfs.pid_from(str(tmp_path / "dir.pid")) is None
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling.pid")
    assert procfs.pid_from(str(tmp_path / "dangling.pid")) is None
    for text in ("", "\n", "abc\n", "12abc"):
        (tmp_path / "bad.pid").write_text(text)
        assert procfs.pid_from(str(tmp_path / "bad.pid")) is None, text
    (tmp_path / "ok.pid").write_text(" 4242 \nmore\n")
    assert procfs.pid_from(str(tmp_path / "ok.pid")) == 4242


def test_a_daemon_of_another_pid_namespace_is_not_this_boxs(tmp_path):
    """A container's ss-server (here a real process in a child PID namespace,
    `unshare --pid --fork`, as nspawn and docker start them) shows in this
    box's /proc, but its service and files are the container's: it is not
    found for raising, restarting or judging; the same program started here is."""
    if not procfs.pid_namespace("self"):
        pytest.skip("/proc/self/ns/pid cannot be read here")
    fake = tmp_path / "ss-server"
    fake.symlink_to("/bin/sleep")
    here = subprocess.Popen([str(fake), "30"])
    there = subprocess.Popen(["unshare", "--pid", "--fork", str(fake), "30"])
    try:
        wait_until_exec(here.pid, fake)
        inner = None
        deadline = time.monotonic() + 10
        while inner is None and time.monotonic() < deadline:
            children = [pid for pid, (_, _, ppid) in procfs.process_table().items() if ppid == there.pid]
            inner = next((pid for pid in children if procfs.proc_argv(pid)[:1] == [str(fake)]), None)
            time.sleep(0.01)
        assert inner, "unshare --pid --fork did not start its child (needs CAP_SYS_ADMIN)"
        assert procfs.pid_namespace(inner) != procfs.pid_namespace("self")
        assert not procfs.in_this_pid_namespace(inner) and procfs.in_this_pid_namespace(here.pid)
        named = procfs.named_processes(procfs.process_table(), {"ss-server"})
        assert named.get(here.pid) == "ss-server" and inner not in named
        found = limits.processes(procfs.process_table(), {"shadowsocks_libev": daemons.KINDS["shadowsocks_libev"]})
        assert here.pid in found and inner not in found
    finally:
        for proc in (here, there):
            proc.kill()
            proc.wait()
