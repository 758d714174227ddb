"""Open-file limits through a real `salt-call --local` (the Salt loader, the
SLS shadowsocks.tuning.nofile), on real files in a temporary root and real
processes started by real init scripts (small sh scripts in a temporary
init.d, so nothing of the host's services is touched). systemd is not PID 1
here: the systemd path runs against a real systemd in a container
(tests/integration/test_systemd_servers.py)."""

import os
import re
import pathlib
import resource
import stat
import subprocess
import time

import pytest

import sstuning_procfs as procfs  # the flat engine files (pytest.ini puts _utils on sys.path)
from support.common import FAKE_INIT, kill_started_from

# The state IDs of salt/shadowsocks/tuning/nofile.sls: every kind of daemon
# (raise in place, write its files, restart what cannot be raised), then the proof.
NOFILE = "shadowsocks-tuning-nofile"
VERIFY = "shadowsocks-tuning-nofile-verify"
ACTING = (NOFILE,)


BROKEN_INIT = """#!/bin/sh
case "$1" in
  start) echo "broken: cannot bind 0.0.0.0:8388" >&2; exit 1 ;;
  status) exit 3 ;;
esac
exit 0
"""
# Like Debian's supervisor script when supervisord dies at once: says ERROR, exits 0.
SILENT_INIT = """#!/bin/sh
case "$1" in
  start) echo "Starting silent:  ERROR." ;;
  status) exit 3 ;;
esac
exit 0
"""


def text_or(path, fallback):
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return fallback


class Box:
    """A temporary root with supervisor-like and shadowsocks-like files,
    init scripts and daemons, and the masterless minion that manages them."""

    def __init__(self, root, minion):
        self.root = root
        self.minion = minion
        for sub in ("etc/default", "etc/supervisor", "init.d", "run", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.supervisor_defaults = root / "etc/default/supervisor"
        self.supervisord_conf = root / "etc/supervisor/supervisord.conf"
        self.sslibev_defaults = root / "etc/default/shadowsocks-libev"
        self.supervisor_defaults.write_text(text_or("/etc/default/supervisor", 'DAEMON_OPTS=""\n'))
        self.supervisord_conf.write_text(text_or("/etc/supervisor/supervisord.conf", "[supervisord]\nlogfile=/x\n"))
        self.sslibev_defaults.write_text(text_or("/etc/default/shadowsocks-libev", "MAXFD=32768\n"))
        for daemon in ("supervisord", "ssserver"):
            (root / "bin" / daemon).symlink_to("/bin/sleep")
        self.init("fake-supervisor", "supervisord", self.supervisor_defaults)
        self.fakess = self.init("fakess", "ssserver", root / "etc/default/none")
        for name, body in (("broken", BROKEN_INIT), ("silent", SILENT_INIT)):
            (root / "init.d" / name).write_text(body)
            (root / "init.d" / name).chmod(0o755)

    def init(self, name, daemon, defaults):
        path = self.root / "init.d" / name
        path.write_text(FAKE_INIT.format(name=name, root=self.root, daemon=daemon, defaults=defaults, calls='/dev/null'))
        path.chmod(0o755)
        return path

    def pidfile(self, name):
        return self.root / "run" / f"{name}.pid"

    def pid(self, name):
        return procfs.pid_from(str(self.pidfile(name)))

    def start(self, name, nofile=1024, hard=None):
        """Start a fake service the way an admin shell with `ulimit -n 1024`
        would (``hard``: a shell that kept its hard limit, `ulimit -Sn`)."""
        subprocess.run(
            [str(self.root / "init.d" / name), "start"], check=True, timeout=10,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard or nofile)),
        )
        # The pidfile names the forked shell before it execs the daemon: wait
        # for the exec, or a check may still see `sh` under that pid.
        pid = self.pid(name)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (procfs.proc_argv(pid) or [""])[0].startswith(str(self.root / "bin")):
            time.sleep(0.02)
        return pid

    def files(self):
        paths = [self.supervisor_defaults, self.supervisord_conf, self.sslibev_defaults, self.fakess]
        return {str(p): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode)) for p in paths}

    def limits(self, **extra):
        limits = {
            "supervisor": {
                "service": "fake-supervisor",
                "pidfile": str(self.pidfile("fake-supervisor")),
                "defaults_file": str(self.supervisor_defaults),
                "config": str(self.supervisord_conf),
            },
            "shadowsocks_libev": {
                "service": "fake-sslibev",  # not installed, not running: never started
                "pidfile": str(self.pidfile("fake-sslibev")),
                "defaults_file": str(self.sslibev_defaults),
            },
            "init_scripts": [{"path": str(self.fakess), "pidfile": str(self.pidfile("fakess"))}],
            "verify": {"pidfiles": [str(self.pidfile("fake-supervisor")), str(self.pidfile("fakess"))], "wait": 5},
            "timeout": 10,
        }
        limits.update(extra)
        return limits

    def pillar(self, nofile, **extra):
        self.minion.pillar({"config": str(self.minion.config), "nofile": nofile, "limits": self.limits(**extra)})

    def apply(self, *args):
        result = self.minion.run("state.apply", "shadowsocks.tuning.nofile", *args)
        assert isinstance(result.data, dict), result.stdout + result.stderr
        return {ret["__id__"]: ret for ret in result.data.values()}

    def stop_all(self):
        kill_started_from(self.root / "bin")


@pytest.fixture
def box(make_masterless, tmp_path):
    root = tmp_path / "box"
    minion = make_masterless(**{"shadowsocks_tuning.init_dir": str(root / "init.d")})
    made = Box(root, minion)
    try:
        yield made
    finally:
        made.stop_all()


def wait_pid_changed(box, name, old, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = box.pid(name)
        if pid and pid != old and procfs.alive(pid):
            return pid
        time.sleep(0.05)
    return box.pid(name)


def file_changes(ret):
    """The file entries of a limits_applied state's changes: {path: {old, new, diff}}."""
    return {key: value for key, value in ret["changes"].items() if key.startswith("/")}


def test_sysvinit_path_limit_reaches_the_restarted_daemons_and_clean_restores(box):
    """The recipe's own path, for real: `ulimit -n` in a sourced defaults file
    and in an init script, then stop and start, and /proc shows the new limit.
    The daemons run at 1024:1024: without CAP_SYS_RESOURCE their hard limit
    cannot be raised in place, so the default policy (live) restarts them."""
    sup_pid = box.start("fake-supervisor")
    ss_pid = box.start("fakess")
    assert procfs.proc_nofile(sup_pid) == (1024, 1024)
    # Below the 4096 asked for (Debian's 32768 would be kept: only raised).
    box.sslibev_defaults.write_text(re.sub(r"(?m)^MAXFD=.*$", "MAXFD=1024", box.sslibev_defaults.read_text()))
    before = box.files()
    box.pillar(4096)

    predicted = box.apply("test=True")
    assert box.files() == before and box.pid("fake-supervisor") == sup_pid, "test=True changed something"
    assert set(predicted) == {*ACTING, VERIFY}
    nofile = predicted[NOFILE]
    assert nofile["result"] is None
    assert set(nofile["changes"]) == {str(box.supervisor_defaults), str(box.supervisord_conf),
                                      str(box.sslibev_defaults), str(box.fakess), "service fake-supervisor",
                                      "service fakess"}
    defaults = nofile["changes"][str(box.supervisor_defaults)]
    assert (defaults["old"], defaults["new"]) == (None, "4096") and "+ulimit -n 4096" in defaults["diff"]
    assert nofile["changes"]["service fake-supervisor"]["old"] == f"running (pid {sup_pid})"
    # Why each restart: the prediction names the process that cannot be raised in place.
    assert f"supervisord (pid {sup_pid}) 1024:1024: cannot be raised in place: its hard limit 1024 is below 4096" \
        in nofile["comment"]
    # shadowsocks-libev is not running: its file changes, no service is touched.
    assert "fake-sslibev" not in nofile["comment"]

    applied = box.apply()
    assert all(ret["result"] is True for ret in applied.values()), {k: v["comment"] for k, v in applied.items()}
    # The same files with the same edits, and the same services stopped and started.
    assert set(applied[NOFILE]["changes"]) == set(nofile["changes"])
    assert file_changes(applied[NOFILE]) == file_changes(nofile)
    new_sup = wait_pid_changed(box, "fake-supervisor", sup_pid)
    new_ss = wait_pid_changed(box, "fakess", ss_pid)
    assert new_sup != sup_pid and new_ss != ss_pid
    assert not procfs.alive(sup_pid) and not procfs.alive(ss_pid)
    assert applied[NOFILE]["changes"]["service fake-supervisor"] == {
        "old": f"running (pid {sup_pid})", "new": f"running (pid {new_sup})"}
    assert procfs.proc_nofile(new_sup) == (4096, 4096)
    assert procfs.proc_nofile(new_ss) == (4096, 4096)
    assert "every process runs with at least 4096 open files" in applied[VERIFY]["comment"]
    assert box.supervisor_defaults.read_text().endswith("ulimit -n 4096\n")
    assert "\nminfds=4096\n" in box.supervisord_conf.read_text()
    assert "\nMAXFD=4096\n" in box.sslibev_defaults.read_text()
    script = box.fakess.read_text().split("\n")
    assert script[script.index("### END INIT INFO") + 2] == "ulimit -n 4096"
    assert os.access(box.fakess, os.X_OK)

    again = box.apply()
    assert all(ret["result"] is True and not ret["changes"] for ret in again.values())
    assert (box.pid("fake-supervisor"), box.pid("fakess")) == (new_sup, new_ss), "restarted without a change"

    undo = box.minion.run("state.apply", "shadowsocks.tuning.clean")
    assert undo.returncode == 0, undo.stdout
    assert box.files() == before


def test_a_daemon_whose_hard_limit_allows_it_is_raised_in_place_not_restarted(box):
    """Debian's supervisord runs at soft 1024 under a hard limit it inherited
    (20000 here): the default policy raises its soft limit in place with
    prlimit, so the same process, with every connection it holds, runs at
    the new limit at once, and the files still make the next start right."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    wanted = min(4096, hard)
    sup_pid = box.start("fake-supervisor", nofile=1024, hard=hard)
    assert procfs.proc_nofile(sup_pid) == (1024, hard)
    box.pillar(wanted, shadowsocks_libev=None, init_scripts=[],
               verify={"pidfiles": [str(box.pidfile("fake-supervisor"))], "wait": 0})
    predicted = box.apply("test=True")
    assert procfs.proc_nofile(sup_pid) == (1024, hard), "test=True raised it"
    assert f"supervisord (pid {sup_pid}) would be raised in place from 1024:{hard} to {wanted}:{hard}" in (
        predicted[NOFILE]["comment"])
    assert "service fake-supervisor" not in predicted[NOFILE]["changes"]
    applied = box.apply()
    assert applied[NOFILE]["result"] is True, applied[NOFILE]["comment"]
    assert box.pid("fake-supervisor") == sup_pid and procfs.alive(sup_pid), "it was restarted"
    assert procfs.proc_nofile(sup_pid) == (wanted, hard)
    assert applied[NOFILE]["changes"][f"pid {sup_pid}"] == {"old": f"1024:{hard}", "new": f"{wanted}:{hard}"}
    assert f"read back from /proc/{sup_pid}/limits; no connection was cut" in applied[NOFILE]["comment"]
    assert "service fake-supervisor" not in applied[NOFILE]["changes"]
    assert box.supervisor_defaults.read_text().endswith(f"ulimit -n {wanted}\n")  # for the next start
    assert applied[VERIFY]["result"] is True, applied[VERIFY]["comment"]
    again = box.apply()
    assert all(ret["result"] is True and not ret["changes"] for ret in again.values())


def salt_grantable(box):
    """What the salt-call process itself can grant to the services it starts."""
    grant = box.minion.run("shadowsocks_tuning.nofile_grantable")
    assert grant.returncode == 0, grant.stderr
    return grant.data


@pytest.mark.parametrize(
    "nofile, extra, expected",
    [
        ("lots", {}, "pillar shadowsocks:tuning:nofile: 'lots' is not a positive integer"),
        (0, {}, "pillar shadowsocks:tuning:nofile: 0 is not a positive integer"),
        ("NR_OPEN+1", {}, "is above fs.nr_open"),
        (4096, {"init_scripts": ["/etc/init.d/no-such-shadowsocks"]},
         "pillar shadowsocks:tuning:limits:init_scripts[0]:path: /etc/init.d/no-such-shadowsocks does not exist"),
        ("CAP+1", {}, "cannot be granted here"),
    ],
)
def test_bad_input_fails_every_state_and_touches_nothing(box, nofile, extra, expected):
    if nofile == "NR_OPEN+1":
        nofile = int(pathlib.Path("/proc/sys/fs/nr_open").read_text()) + 1
    if nofile == "CAP+1":
        grant = salt_grantable(box)
        if grant["cap_sys_resource"]:
            pytest.skip("salt has CAP_SYS_RESOURCE here: no cap below fs.nr_open")
        nofile = grant["limit"] + 1
    sup_pid = box.start("fake-supervisor")
    before = box.files()
    box.pillar(nofile, **extra)
    states = box.apply()
    # The proof state checks the same plan: it fails with the problem too.
    assert states[VERIFY]["result"] is False and expected in states[VERIFY]["comment"]
    for sid in ACTING:
        # Each part checks the whole pillar first: the problem is named in all of them.
        assert states[sid]["result"] is False, sid
        assert expected in states[sid]["comment"] and "Nothing was changed" in states[sid]["comment"], sid
        assert "pillar pillar" not in states[sid]["comment"], states[sid]["comment"]
        assert not states[sid]["changes"], sid
    assert box.files() == before
    assert box.pid("fake-supervisor") == sup_pid and procfs.alive(sup_pid)


@pytest.mark.parametrize(
    "limits, expected",
    [
        (["oops"], "pillar shadowsocks:tuning:limits must be a mapping"),
        ({"init_scripts": "/etc/init.d/shadowsocks"}, "pillar shadowsocks:tuning:limits:init_scripts must be a list"),
        ({"supervisor": {"defaults_file": "default/supervisor"}},
         "pillar shadowsocks:tuning:limits:supervisor:defaults_file: 'default/supervisor' must be an absolute path"),
        ({"init_system": "upstart"}, "pillar shadowsocks:tuning:limits:init_system: 'upstart' must be one of"),
    ],
)
def test_malformed_pillar_still_renders_and_every_state_names_the_key(box, limits, expected):
    before = box.files()
    box.minion.pillar({"config": str(box.minion.config), "nofile": 4096, "limits": limits})
    states = box.apply()
    assert set(states) == {*ACTING, VERIFY}, "the SLS did not render"
    for sid, ret in states.items():
        assert ret["result"] is False and expected in ret["comment"], sid
        assert not ret["changes"], sid
    assert box.files() == before


def test_the_cap_is_reported_plainly(box):
    """nofile above what salt can grant: every part says why, and the verify
    state reports each running daemon below it with the reason."""
    grant = salt_grantable(box)
    if grant["cap_sys_resource"]:
        pytest.skip("salt has CAP_SYS_RESOURCE here: no cap below fs.nr_open")
    box.start("fake-supervisor", nofile=grant["limit"])
    wanted = grant["limit"] + 1
    box.pillar(wanted, verify={"pidfiles": [str(box.pidfile("fake-supervisor"))], "wait": 0})
    states = box.apply()
    for sid in ACTING:
        check = states[sid]["comment"]
        assert states[sid]["result"] is False, sid
        assert f"pillar shadowsocks:tuning:nofile: {wanted} cannot be granted here" in check
        assert f"hard open-file limit of {grant['hard']} and without CAP_SYS_RESOURCE" in check
        assert f"lower it to {grant['limit']} or less" in check
    verify = states[VERIFY]
    assert verify["result"] is False
    assert f"run with an open-file limit below {wanted}" in verify["comment"]
    assert f"supervisord (pid {box.pid('fake-supervisor')}): soft {grant['limit']}" in verify["comment"]
    assert "Cap here: salt runs with a hard open-file limit" in verify["comment"]


@pytest.mark.parametrize(
    "script, expected",
    [
        ("broken", "service broken failed to start: `{root}/init.d/broken start` exited 1: broken: cannot bind 0.0.0.0:8388"),
        ("silent", "service silent failed to start: not running 2 s after `{root}/init.d/silent start` exited 0"),
    ],
)
def test_a_service_that_does_not_start_fails_its_state_by_name(box, script, expected):
    path = box.root / "init.d" / script
    box.pillar(4096, restart="always", timeout=2, init_scripts=[str(path)],
               supervisor=None, shadowsocks_libev=None, verify={"pidfiles": [], "wait": 0})
    states = box.apply()
    restart = states[NOFILE]
    assert restart["result"] is False
    assert restart["comment"].startswith(expected.format(root=box.root)), restart["comment"]
    assert "supervisor" not in restart["comment"]  # turned off: untouched
    # The limit was written before the start was tried, and the state shows it as a change.
    assert "ulimit -n 4096" in path.read_text().split("\n")
    assert restart["changes"][str(path)]["new"] == "4096"


def test_execution_functions_through_the_loader(box):
    """The engine functions as a user calls them with salt-call."""
    run = box.minion.run
    path = str(box.supervisor_defaults)
    predicted = run("shadowsocks_tuning.set_ulimit", path, "8192", "test=True").data
    assert predicted["changed"] and "+ulimit -n 8192" in predicted["diff"]
    assert "ulimit" not in box.supervisor_defaults.read_text()
    assert run("shadowsocks_tuning.set_ulimit", path, "8192").data["changed"]
    assert run("shadowsocks_tuning.set_ulimit", path, "8192").data["changed"] is False
    assert run("shadowsocks_tuning.set_assignment", str(box.sslibev_defaults), "MAXFD", "8192").data["old"] == "32768"
    bad = run("shadowsocks_tuning.set_ulimit", path, "nofile=-5")
    assert bad.returncode != 0 and "not a positive integer" in bad.stdout + bad.stderr
    pid = box.start("fakess")
    report = run("shadowsocks_tuning.nofile", "2048", f"pidfiles=[{box.pidfile('fakess')}]").data
    assert [(p["name"], p["pid"], p["soft"]) for p in report["processes"]] == [("ssserver", pid, 1024)]
    assert not report["ok"] and "stop and start it" in report["problems"][0]
    restarted = run("shadowsocks_tuning.stop_start", "fakess", f"pidfile={box.pidfile('fakess')}").data
    assert restarted["changed"] and restarted["old"] == f"running (pid {pid})"
    new = box.pid("fakess")
    assert new != pid and procfs.proc_nofile(new)[0] != 1024  # started by salt, without the admin's ulimit


# A daemon that dies a second after it starts, as one that cannot bind its port would.
CRASHING_DAEMON = "#!/bin/sh\nsleep 1\nexit 1\n"
# A shadowsocks-like daemon that holds one live TCP connection to itself on loopback.
CONNECTED_DAEMON = """#!/usr/bin/python3
import socket, time
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
time.sleep(300)
"""


def test_a_daemon_that_dies_right_after_it_started_fails_naming_the_service(box):
    crashing = box.root / "bin" / "ss-server"
    crashing.write_text(CRASHING_DAEMON)
    crashing.chmod(0o755)
    box.init("crashy", "ss-server", box.root / "etc/default/none")
    result = box.minion.run("state.single", "shadowsocks_tuning.service_restarted", "name=crashy",
                            f"pidfile={box.pidfile('crashy')}", "when=always", "grace=3")
    ret = next(iter(result.data.values()))
    assert ret["result"] is False, ret
    assert "service crashy started (pid " in ret["comment"]
    assert "did not stay up for 3 s: it dies right after it starts (a crash loop?)" in ret["comment"]
    assert not procfs.alive(box.pid("crashy") or 0)  # the report is true: it is gone


def test_a_pidfile_naming_another_program_is_neither_signalled_nor_waited_for(box):
    other = subprocess.Popen(["sleep", "300"])
    try:
        box.pidfile("fakess").write_text(f"{other.pid}\n")
        started = time.monotonic()
        result = box.minion.run("shadowsocks_tuning.stop_start", "fakess", f"pidfile={box.pidfile('fakess')}")
        assert result.returncode == 0, result.stdout + result.stderr
        comment = result.data["comment"]
        assert comment.startswith("fakess is not running: left stopped"), comment
        assert f"names pid {other.pid}, which runs sleep, not " in comment and "a stale pidfile" in comment
        assert time.monotonic() - started < 10 + 30, "well below the 10 s stop timeout plus salt-call's start-up"
        assert other.poll() is None  # never signalled
    finally:
        other.kill()
        other.wait()


def sockets_of(pid):
    """How many sockets ``pid`` holds now (its fds come and go while it starts)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass
    return count


def test_a_restart_says_how_many_live_connections_it_cuts(box):
    daemon = box.root / "bin" / "ssserver"
    daemon.unlink()
    daemon.write_text(CONNECTED_DAEMON)
    daemon.chmod(0o755)
    # Started in the minion's network namespace, where salt-call counts sockets.
    netns = ["ip", "netns", "exec", box.minion.netns]
    subprocess.run([*netns, "ip", "link", "set", "lo", "up"], check=True)
    subprocess.run([*netns, str(box.fakess), "start"], check=True, timeout=10)
    pidfile = box.pidfile("fakess")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sockets_of(box.pid("fakess")) < 3:
        time.sleep(0.05)  # wait until the daemon has connected: listener, client, accepted peer
    run = box.minion.run
    predicted = run("shadowsocks_tuning.stop_start", "fakess", f"pidfile={pidfile}", "test=True").data
    assert "2 live TCP connection(s) of its processes would be cut" in predicted["comment"], predicted
    done = run("shadowsocks_tuning.stop_start", "fakess", f"pidfile={pidfile}").data
    assert done["comment"].startswith("fakess stopped and started: 2 live TCP connection(s) of its processes cut")
