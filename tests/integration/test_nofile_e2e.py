"""With real parts: a busy ss-server gets its new open-file limit in place,
without a restart and without losing a connection.

Debian's supervisord, started through its init script from a shell with a
soft limit of 1024 under this box's hard limit (20000 here), runs ss-server
on loopback at 1024:20000. About 500 connections through ss-local to an
echo server are held open (two descriptors each: ss-server is near its
limit); a few more push it over, and it logs `too many open files`. Then
`state.apply shadowsocks.tuning` raises supervisord and ss-server in place
(prlimit(2): without CAP_SYS_RESOURCE a soft limit can rise up to the hard
limit), writes the files for the next start, and restarts nothing: the same
PIDs, every connection held before still echoes, the ramp goes on well above
the old limit, and no `too many open files` line follows the raise.

Everything runs inside the test's own network namespace (this process joins
it with setns(2), so supervisord, ss-server, ss-local, the echo server and
salt-call all share one loopback and the host's sysctls are never written).
Every file changed under /etc is put back byte for byte, and every daemon the
test started is stopped. The live raise acts on every running daemon of the
kinds pillar turns on (supervisor, shadowsocks-libev) in this PID namespace:
the assertions name the rig's own processes; a daemon of the same kind that
something else runs on this box at the same time would be raised too.
"""

import contextlib
import ctypes
import os
import pathlib
import resource
import subprocess
import time

import pytest

import sstuning_limits
import sstuning_procfs as procfs
from support import ssrig
from support.common import in_netns

pytestmark = pytest.mark.slow

SYSCTL = "shadowsocks-tuning-sysctl"
NOFILE = "shadowsocks-tuning-nofile"
VERIFY = "shadowsocks-tuning-nofile-verify"
MANAGED = ("/etc/default/supervisor", "/etc/supervisor/supervisord.conf", "/etc/default/shadowsocks-libev")
CONF_D = "/etc/supervisor/conf.d"
SSLIBEV_PIDFILE = "/var/run/shadowsocks-libev/shadowsocks-libev.pid"
CLONE_NEWNET = 0x40000000
LIMIT = 16384
HELD = 500  # two descriptors each: about all ss-server holds at 1024
PROBE = 100  # then more than it can take
TOTAL = 2000  # well above the old limit, after the raise


@contextlib.contextmanager
def joined_network_namespace(name):
    """This thread (and every process it starts) in the named network
    namespace, with loopback up; back to the original one afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name}")
        try:
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace")
    finally:
        os.close(own)
        os.close(target)


@contextlib.contextmanager
def soft_nofile(limit):
    """A typical box: soft limit 1024 under a higher hard limit. Daemons
    started from here inherit it."""
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def snapshot():
    files = {}
    for path in MANAGED:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            files[path] = (pathlib.Path(path).read_bytes(), st.st_mode, st.st_uid, st.st_gid)
    return files, sorted(os.listdir(CONF_D))


def put_back(saved):
    """Last line of defence if the rig could not restore a file."""
    files, _ = saved
    for path, (data, mode, uid, gid) in files.items():
        if pathlib.Path(path).read_bytes() != data:
            pathlib.Path(path).write_bytes(data)
            os.chown(path, uid, gid)
            os.chmod(path, mode & 0o7777)


def system_supervisord_running():
    pid = procfs.pid_from(ssrig.SystemSupervisor.PIDFILE)
    return bool(pid and ssrig.pid_alive(pid) and "supervisord" in " ".join(procfs.proc_argv(pid)))


def states(result):
    assert isinstance(result.data, dict), result.stdout + result.stderr
    return {ret["__id__"]: ret for ret in result.data.values()}


def raised_pids(changes):
    """{pid: {"old", "new"}} of the processes a state raised (or would raise) in place."""
    return {int(key.split()[1]): value for key, value in changes.items() if key.startswith("pid ")}


def quiet_fd_errors(ss, still=1.0, timeout=15):
    """ss-server's count of `too many open files` lines once it has stopped
    growing for ``still`` seconds (bounded by ``timeout``): the count lags
    the daemon by the wrapper's 0.25 s flush."""
    last = [ss.fd_error_count(), None]

    def settled():
        now = ss.fd_error_count()
        if now != last[0]:
            last[:] = [now, None]
            return False
        last[1] = last[1] or time.monotonic()
        return time.monotonic() - last[1] >= still

    assert ssrig._wait_until(settled, timeout, 0.1), f"ss-server still logs `too many open files` after {timeout} s"
    return last[0]


@pytest.fixture
def real_parts():
    try:
        for binary in ("ss-server", "ss-local", "supervisord"):
            ssrig.require_binary(binary)
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    if not os.access(ssrig.SystemSupervisor.INIT_SCRIPT, os.X_OK):
        pytest.skip("Debian's /etc/init.d/supervisor is missing (apt-get install -y supervisor)")
    if system_supervisord_running():
        pytest.skip("the system supervisord already runs: this test would stop and start it")
    pid = procfs.pid_from(SSLIBEV_PIDFILE)
    if pid and ssrig.pid_alive(pid):
        pytest.skip("the shadowsocks-libev service runs: this test would edit its MAXFD under it")
    saved = snapshot()
    # Atomic writes add and rename files in these directories: keep their times too.
    directories = {d: os.stat(d) for d in {os.path.dirname(p) for p in MANAGED}}
    try:
        yield saved
    finally:
        put_back(saved)
        for directory, st in directories.items():
            os.utime(directory, ns=(st.st_atime_ns, st.st_mtime_ns))


def tuning_pillar(minion, nofile):
    """The two kinds of daemon this test runs, turned on (the harness turns every kind off)."""
    minion.pillar({"config": str(minion.config), "nofile": nofile,
                   "limits": {"supervisor": {}, "shadowsocks_libev": {},
                              "verify": {"pidfiles": [ssrig.SystemSupervisor.PIDFILE], "wait": 10}}})


def test_a_busy_ss_server_is_raised_in_place_and_keeps_every_connection(make_masterless, real_parts):
    saved = real_parts
    minion = make_masterless()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    grant = sstuning_limits.grantable("/proc/sys")  # what salt-call, started from here, can grant
    if LIMIT > grant["limit"] or hard == resource.RLIM_INFINITY:
        pytest.skip(f"this box cannot grant {LIMIT}: {grant['reason']}")
    old, new = f"1024:{hard}", f"{LIMIT}:{hard}"  # a soft limit rises; the hard one stays (no CAP_SYS_RESOURCE)
    seen = []

    with joined_network_namespace(minion.netns), soft_nofile(1024), contextlib.ExitStack() as stack:
        rig = stack.enter_context(ssrig.loopback_rig(system=True, max_seconds=300))
        server = rig.server
        for path in MANAGED:
            server.guard(path)
        original = snapshot()
        sup_pid, ss_pid = server.supervisord_pid(), rig.ss.pid()
        rig_tree = {sup_pid, ss_pid, procfs.proc_stat(ss_pid)[2]}  # supervisord, the line counter, ss-server
        seen.extend(rig_tree)
        assert ssrig.read_nofile_limits(sup_pid) == ssrig.read_nofile_limits(ss_pid) == (1024, hard)

        # Busy: about 500 connections held open, two descriptors each.
        first = rig.ramp(HELD, keep=True, timeout=20, stall_timeout=5)
        held = stack.enter_context(first.pop("kept"))
        assert first["held"] == HELD and first["failures"] == {} and first["too_many_open_files"] == 0, first
        assert first["ss_server_open_fds"] > 2 * HELD, first

        # test=True predicts a raise in place, restarts nothing, changes nothing.
        tuning_pillar(minion, LIMIT)
        predicted = states(minion.run("state.apply", "shadowsocks.tuning", "test=True"))[NOFILE]
        comment, changes = predicted["comment"], predicted["changes"]
        assert predicted["result"] is None, comment
        assert {pid: raised_pids(changes)[pid] for pid in rig_tree} == {pid: {"old": old, "new": new}
                                                                        for pid in rig_tree}, changes
        for pid, name in ((sup_pid, "supervisord"), (ss_pid, "ss-server")):
            assert f"{name} (pid {pid}) would be raised in place from {old} to {new}" in comment, comment
        assert not [key for key in changes if key.startswith("service ")], changes
        assert "stopped and started" not in comment and "restarts" not in comment, comment
        # The files for the next start: the ulimit line and minfds; Debian's
        # MAXFD=32768 is more than this box can grant: it gives the ceiling at
        # most, so it is replaced by the ceiling (never by the lower value
        # asked for), and the comment says why.
        assert {path: (changes[path]["old"], changes[path]["new"]) for path in MANAGED} == {
            "/etc/default/supervisor": (None, str(LIMIT)),
            "/etc/supervisor/supervisord.conf": (None, str(LIMIT)),
            "/etc/default/shadowsocks-libev": ("32768", str(grant["limit"])),
        }, changes
        assert (f"/etc/default/shadowsocks-libev: MAXFD would be set to {grant['limit']} (now 32768); 32768 "
                f"cannot be granted here (at most {grant['limit']}): it gives {grant['limit']} at most, so "
                f"{grant['limit']} is kept") in comment, comment
        assert snapshot() == original
        assert (server.supervisord_pid(), rig.ss.pid()) == (sup_pid, ss_pid)
        assert ssrig.read_nofile_limits(ss_pid) == (1024, hard)

        # Over the limit: more connections than it can take; it logs the error.
        probe = rig.ramp(PROBE, keep=True, timeout=10, stall_timeout=2)
        held.extend(probe.pop("kept"))
        assert probe["held"] < PROBE and probe["too_many_open_files"] > 0, probe
        before = len(held)

        # The state: raised in place, files written, nothing restarted.
        applied = states(minion.run("state.apply", "shadowsocks.tuning"))
        for sid in (SYSCTL, NOFILE, VERIFY):
            assert applied[sid]["result"] is True, (sid, applied[sid]["comment"])
        comment, changes = applied[NOFILE]["comment"], applied[NOFILE]["changes"]
        assert sorted(changes) == sorted(predicted["changes"]), (changes, predicted["changes"])
        assert {pid: raised_pids(changes)[pid] for pid in rig_tree} == {pid: {"old": old, "new": new}
                                                                        for pid in rig_tree}, changes
        assert (f"ss-server (pid {ss_pid}) raised in place from {old} to {new} (read back from "
                f"/proc/{ss_pid}/limits; no connection was cut)") in comment, comment
        assert f"32768 cannot be granted here (at most {grant['limit']})" in comment, comment
        assert (server.supervisord_pid(), rig.ss.pid()) == (sup_pid, ss_pid), "restarted"
        for pid in rig_tree:
            assert ssrig.read_nofile_limits(pid) == (LIMIT, hard), pid
        assert pathlib.Path("/etc/default/supervisor").read_bytes().endswith(f"\nulimit -n {LIMIT}\n".encode())
        assert f"\nminfds={LIMIT}" in pathlib.Path("/etc/supervisor/supervisord.conf").read_text()
        assert f"\nMAXFD={grant['limit']}\n" in pathlib.Path("/etc/default/shadowsocks-libev").read_text()

        # Not one connection lost, the errors stopped, and the ramp goes on
        # well above the old limit with the same ss-server.
        errors = quiet_fd_errors(rig.ss)
        check = held.check()
        assert check["echoed"] == before and check["failures"] == {}, check
        more = rig.ramp(TOTAL - len(held), keep=True, timeout=30, stall_timeout=5)
        held.extend(more.pop("kept"))
        assert more["held"] == more["requested"] and more["failures"] == {}, more
        assert more["ss_server_pid"] == ss_pid and more["ss_server_open_fds"] > 2 * TOTAL > 1024, more
        assert rig.ss.fd_error_count() == errors, "`too many open files` after the raise"
        check = held.check()
        assert (check["checked"], check["echoed"], check["failures"]) == (TOTAL, TOTAL, {}), check

        # Idempotent: nothing to change, nothing raised, no connection lost.
        again = states(minion.run("state.apply", "shadowsocks.tuning"))
        for sid in (NOFILE, VERIFY):
            assert again[sid]["result"] is True and not again[sid]["changes"], (sid, again[sid])
        assert (server.supervisord_pid(), rig.ss.pid()) == (sup_pid, ss_pid)
        check = held.check()
        assert (check["echoed"], check["failures"]) == (TOTAL, {}), check
        assert rig.ss.fd_error_count() == errors
        held.close()
        after_apply = snapshot()

        # 51200 is above what this box grants: the cap, said plainly, and
        # nothing changed, in either half (the whole tuning is checked first).
        if grant["limit"] < 51200:
            tuning_pillar(minion, 51200)
            # a sysctl changed behind Salt's back, for the kernel half to put back
            in_netns(minion.netns, "sysctl", "-q", "-w", "net.ipv4.tcp_keepalive_time=7200", check=True)
            capped = states(minion.run("state.apply", "shadowsocks.tuning"))
            assert minion.read("net.ipv4.tcp_keepalive_time") == "7200", "the kernel half wrote anyway"
            for sid in (SYSCTL, NOFILE):
                comment = capped[sid]["comment"]
                assert capped[sid]["result"] is False and not capped[sid]["changes"], (sid, capped[sid])
                assert "pillar shadowsocks:tuning:nofile: 51200 cannot be granted here" in comment, (sid, comment)
                assert f"hard open-file limit of {grant['hard']} and without CAP_SYS_RESOURCE" in comment
                assert comment.endswith("Nothing was changed"), (sid, comment)
            verify = capped[VERIFY]
            assert verify["result"] is False
            assert f"ss-server (pid {ss_pid}): soft {LIMIT}, hard {hard}" in verify["comment"]
            assert "Cap here: salt runs with a hard open-file limit" in verify["comment"]
            assert snapshot() == after_apply and server.supervisord_pid() == sup_pid
            assert ssrig.read_nofile_limits(ss_pid) == (LIMIT, hard)

        # clean puts back exactly what was there.
        undo = minion.run("state.apply", "shadowsocks.tuning.clean")
        assert undo.returncode == 0, undo.stdout
        assert snapshot() == original

    # After the rig: supervisord stopped, ss-server gone, /etc as it was.
    assert not system_supervisord_running()
    assert ssrig._wait_until(lambda: not any(ssrig.pid_alive(pid) for pid in seen), 5)
    assert snapshot() == saved
