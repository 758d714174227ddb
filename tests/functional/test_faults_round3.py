"""Section 10 of tests/FAULTS.md: round three of hostile input and faults,
through a real `salt-call --local state.apply shadowsocks.tuning` in the
test's own network namespace. Real files in temporary directories, real
faults made in a private mount namespace around one salt-call (a full tmpfs,
a fake dpkg database, a named pipe), a real SIGKILL of salt-call between the
stop and the start of a service, and the limit a shell really gets by
sourcing the file the package wrote."""

import json
import os
import pathlib
import resource
import stat
import subprocess
import time

import pytest

import sstuning_procfs as procfs  # the flat engine files (pytest.ini puts _utils on sys.path)
from support.common import FAKE_INIT, kill_started_from, state_of

from test_faults import with_fault  # the private-mount-namespace salt-call

SLS = "shadowsocks.tuning"
NOFILE = "shadowsocks-tuning-nofile"
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def states(result):
    assert isinstance(result.data, dict), result.stdout + result.stderr
    return {ret["__id__"]: ret for ret in result.data.values()}


class Box:
    """A defaults file, an init script with a fake daemon, and the minion."""

    def __init__(self, root, minion):
        self.root, self.minion = root, minion
        for sub in ("etc/default", "init.d", "run", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.defaults = root / "etc/default/fake"
        self.defaults.write_text("# Defaults for fake\nDAEMON_OPTS=\"\"\n")
        (root / "bin" / "supervisord").symlink_to("/bin/sleep")
        self.calls = root / "calls.log"
        self.script = root / "init.d" / "fake"
        self.script.write_text(FAKE_INIT.format(name="fake", root=root, daemon="supervisord", defaults=self.defaults,
                                                calls=self.calls))
        self.script.chmod(0o755)
        self.pidfile = root / "run" / "fake.pid"

    def pillar(self, nofile=4096, **limits):
        supervisor = {"service": "fake", "pidfile": str(self.pidfile), "defaults_file": str(self.defaults),
                      "minfds": None, "units": []}
        supervisor.update(limits.pop("supervisor", {}))
        self.minion.pillar({"config": str(self.minion.config), "nofile": nofile,
                            "limits": {"supervisor": supervisor, "timeout": 10, "grace": 0,
                                       "verify": {"pidfiles": [str(self.pidfile)], "wait": 0}, **limits}})

    def start(self, soft=1024, hard=1024):
        subprocess.run([str(self.script), "start"], check=True, timeout=10,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        pid = procfs.pid_from(str(self.pidfile))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (procfs.proc_argv(pid) or [""])[0].startswith(str(self.root)):
            time.sleep(0.02)
        return pid


@pytest.fixture
def box(make_masterless, tmp_path):
    root = tmp_path / "box"
    made = Box(root, None)
    made.minion = make_masterless(**{"shadowsocks_tuning.init_dir": str(root / "init.d")})
    try:
        yield made
    finally:
        kill_started_from(root / "bin")


def sourced(path):
    """(soft, hard) a shell gets by sourcing ``path``, starting from (1024, this box's hard limit)."""
    out = subprocess.run(["sh", "-c", f". {path} && ulimit -Sn && ulimit -Hn"], capture_output=True, text=True,
                         check=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, HARD)))
    soft, hard = out.stdout.split()
    return int(soft), int(hard)


# --------------------------------------------------------------------------
# 1. what sourcing the file gives is what the state reports
# --------------------------------------------------------------------------
def test_a_soft_limit_under_a_higher_hard_one_is_raised_and_the_shell_gets_what_the_state_says(box):
    hard = min(19000, HARD)
    box.defaults.write_text(f"DAEMON_OPTS=\"\"\nulimit -Hn {hard}\nulimit -Sn 1024\n")
    box.pillar(4096)
    ret = states(box.minion.run("state.apply", SLS))[NOFILE]
    assert ret["result"] is True, ret["comment"]
    change = ret["changes"][str(box.defaults)]
    assert (change["old"], change["new"]) == (f"1024:{hard}", f"4096:{hard}")  # the hard limit is never lowered
    assert sourced(box.defaults) == (4096, hard)
    assert subprocess.run(["sh", "-n", str(box.defaults)]).returncode == 0


def test_a_limit_set_in_both_branches_of_an_if_is_refused_naming_the_line(box):
    text = 'if [ -r /etc/ss.conf ]; then\n  ulimit -n 8192\nelse\n  ulimit -n 2048\nfi\n'
    box.defaults.write_text(text)
    box.pillar(4096)
    result = states(box.minion.run("state.apply", SLS))
    for sid, ret in result.items():
        assert ret["result"] is False and not ret["changes"], sid
        assert f"{box.defaults}:2: 'ulimit -n 8192' is inside an if (line 1)" in ret["comment"], ret["comment"]
    assert box.defaults.read_text() == text


# --------------------------------------------------------------------------
# 2. a config boot does not read, or one another program owns
# --------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["supervisord.conf", "subdirectory"])
def test_a_config_boot_does_not_read_is_refused_before_anything_is_written(box, where):
    target = (box.root / "supervisord.conf" if where == "supervisord.conf"
              else box.minion.config.parent / "ops" / "60-ss.conf")
    if where == "supervisord.conf":
        target.write_text("[supervisord]\nlogfile=/x\n")
    before = target.read_bytes() if target.exists() else None
    box.minion.pillar({"config": str(target), "nofile": 4096, "limits": {"supervisor": {
        "defaults_file": str(box.defaults), "service": None, "pidfile": None, "minfds": None, "units": []}}})
    sysctls = box.minion.run("shadowsocks_tuning.get", "net.ipv4.tcp_fin_timeout").data
    result = states(box.minion.run("state.apply", SLS))
    for sid, ret in result.items():
        assert ret["result"] is False and not ret["changes"], (sid, ret["comment"])
        assert f"{target} is not read at boot" in ret["comment"], ret["comment"]
        assert "config_outside_boot: true" in ret["comment"]
    assert (target.read_bytes() if target.exists() else None) == before
    assert "ulimit" not in box.defaults.read_text()
    assert box.minion.run("shadowsocks_tuning.get", "net.ipv4.tcp_fin_timeout").data == sysctls


def test_a_config_a_package_owns_is_refused(box, tmp_path):
    """A sysctl.d file a Debian package ships as a conffile. The dpkg
    database is a fake one bound over /var/lib/dpkg/info in the salt-call's
    own mount namespace (this box has no package that ships one)."""
    owned = box.minion.config.parent / "30-vendor.conf"
    owned.write_text("# shipped by a package\nvm.swappiness = 10\n")
    info = tmp_path / "dpkg-info"
    info.mkdir()
    (info / "vendor-tuning.conffiles").write_text(f"/etc/vendor\n{owned}\n")
    box.minion.pillar({"config": str(owned), "limits": {}})
    faked = with_fault(box.minion, f"mount --bind {info} /var/lib/dpkg/info")
    ret = state_of(faked.run("--local", "state.apply", "shadowsocks.tuning.sysctl"))
    assert ret["result"] is False and not ret["changes"]
    assert f"{owned} belongs to the vendor-tuning package (a conffile its upgrades manage)" in ret["comment"]
    assert owned.read_text() == "# shipped by a package\nvm.swappiness = 10\n"


# --------------------------------------------------------------------------
# 3. a named pipe where a pidfile goes never blocks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("test_mode", [True, False], ids=["test", "apply"])
def test_a_pidfile_that_is_a_named_pipe_does_not_hang_the_run(box, test_mode):
    os.mkfifo(box.pidfile)
    box.pillar(4096)
    started = time.monotonic()
    result = box.minion.run("state.apply", SLS, *(["test=True"] if test_mode else []))
    assert time.monotonic() - started < 100, "the run waited on the pipe"
    ret = states(result)[NOFILE]
    assert ret["result"] is (None if test_mode else True), ret["comment"]
    assert stat.S_ISFIFO(os.lstat(box.pidfile).st_mode)


# --------------------------------------------------------------------------
# 4. salt-call killed between stop and start
# --------------------------------------------------------------------------
KILLING_START = """
  start)
    [ -e {root}/kill-salt ] && {{ rm -f {root}/kill-salt; kill -9 $PPID; exit 1; }}
"""


def test_a_restart_interrupted_after_stop_is_finished_by_the_next_run(box):
    # `start` kills its caller (salt-call) once: the service was stopped and never started again.
    box.script.write_text(box.script.read_text().replace("\n  start)\n", KILLING_START.format(root=box.root), 1))
    pid = box.start(1024, 1024)  # cannot be raised in place: its hard limit is below 4096
    box.pillar(4096)
    (box.root / "kill-salt").touch()
    killed = box.minion.run("state.apply", SLS)
    assert killed.returncode != 0
    assert not procfs.alive(pid) and not procfs.pid_from(str(box.pidfile)), "the service should be down now"
    record = json.loads((box.minion.root / "state" / "restarts.json").read_text())
    assert [item["name"] for item in record] == ["fake"]

    predicted = states(box.minion.run("state.apply", SLS, "test=True"))[NOFILE]
    assert "fake would be started: a run at " in predicted["comment"], predicted["comment"]
    assert "stopped it and did not start it again" in predicted["comment"]

    finished = states(box.minion.run("state.apply", SLS))
    ret = finished[NOFILE]
    assert ret["result"] is True, ret["comment"]
    assert "fake started: a run at " in ret["comment"]
    new = procfs.pid_from(str(box.pidfile))
    assert new and procfs.alive(new)
    assert not (box.minion.root / "state" / "restarts.json").exists()
    assert finished["shadowsocks-tuning-nofile-verify"]["result"] is True


# --------------------------------------------------------------------------
# 5. a full disk: one message naming the path, the record complete
# --------------------------------------------------------------------------
def test_a_full_state_dir_stops_the_open_file_half_before_any_file(box):
    box.pillar(4096)
    state = box.minion.root / "state"
    full = with_fault(box.minion, f"mount -t tmpfs -o size=4k tmpfs {state}\ntouch {state}/lock\n"
                                  f"dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null || true")
    before = box.defaults.read_bytes()
    result = states(full.run("--local", "state.apply", SLS))
    ret = result[NOFILE]
    assert ret["result"] is False and not ret["changes"], ret
    assert f"{state}/originals.json: no space left on that file system: free some and run again" in ret["comment"]
    assert "Traceback" not in ret["comment"]
    assert box.defaults.read_bytes() == before


def test_a_full_etc_names_the_file_and_clean_can_put_back_what_was_written(box):
    second = box.root / "etc/full/other"
    second.parent.mkdir()
    second.write_text("DAEMON_OPTS=\"\"\n")
    box.pillar(4096, init_scripts=[], units=[], shadowsocks_libev={"defaults_file": str(second), "service": None,
                                                                    "pidfile": None, "units": []})
    directory = second.parent
    full = with_fault(box.minion, f"cp -a {directory} {directory}.copy\nmount -t tmpfs -o size=8k tmpfs {directory}\n"
                                  f"cp -a {directory}.copy/. {directory}/\n"
                                  f"dd if=/dev/zero of={directory}/filler bs=4k 2>/dev/null || true")
    result = states(full.run("--local", "state.apply", SLS))
    ret = result[NOFILE]
    assert ret["result"] is False
    assert f"cannot write {second}: no space left on that file system: free some and run again" in ret["comment"]
    assert "their originals are on record: state.apply shadowsocks.tuning.clean puts them back" in ret["comment"]
    # The first file was written before the full one failed; the record lets clean put it back.
    assert "ulimit -n 4096" in box.defaults.read_text()
    undo = box.minion.run("state.apply", "shadowsocks.tuning.clean")
    assert undo.returncode == 0, undo.stdout
    assert "ulimit" not in box.defaults.read_text()


# --------------------------------------------------------------------------
# 6. keys that are not plain read-write sysctls
# --------------------------------------------------------------------------
@pytest.mark.parametrize("sysctls, expected", [
    ({"net.ipv4.route.flush": 1}, "net.ipv4.route.flush: write-only: "),
    ({"net.ipv4.conf.all": 1}, "net.ipv4.conf.all: directory: "),
    ({"net.ipv4.conf.all": {"forwarding": 1}}, "net.ipv4.conf.all: {'forwarding': 1} is a mapping"),
])
def test_write_only_and_directory_keys_are_refused_with_the_true_reason(masterless, sysctls, expected):
    before = masterless.run("shadowsocks_tuning.get", "net.ipv4.tcp_fin_timeout").data
    masterless.pillar({"config": str(masterless.config), "sysctls": sysctls})
    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.sysctl"))
    assert ret["result"] is False and not ret["changes"]
    assert expected in ret["comment"], ret["comment"]
    assert "read-only" not in ret["comment"]
    assert masterless.run("shadowsocks_tuning.get", "net.ipv4.tcp_fin_timeout").data == before
    assert not masterless.config.exists()


# --------------------------------------------------------------------------
# 8. a file far bigger than anyone writes by hand
# --------------------------------------------------------------------------
def test_a_huge_local_conf_is_refused_with_the_ceiling_and_left_alone(masterless):
    huge = b"# padding\n" * (5 << 17)  # 6.25 MiB of comments
    masterless.config.write_bytes(huge)
    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.sysctl"))
    assert ret["result"] is False and not ret["changes"]
    assert f"{masterless.config} is 6.2 MiB, over the 4 MiB this package edits" in ret["comment"], ret["comment"]
    assert masterless.config.read_bytes() == huge
    assert not (masterless.root / "state" / "originals.json").exists()


# --------------------------------------------------------------------------
# 9. a value in a file that no process can get
# --------------------------------------------------------------------------
def test_a_limit_in_a_file_above_what_the_box_grants_is_not_kept_as_higher(box):
    nr_open = int(pathlib.Path("/proc/sys/fs/nr_open").read_text())
    above = max(HARD, 32768) * 2 if HARD < nr_open else nr_open * 2
    box.defaults.write_text(f"DAEMON_OPTS=\"\"\nulimit -n {above}\n")
    box.pillar(4096)
    predicted = states(box.minion.run("state.apply", SLS, "test=True"))[NOFILE]
    assert predicted["result"] is None, predicted["comment"]
    assert f"soft {above} cannot be granted here" in predicted["comment"], predicted["comment"]
    applied = states(box.minion.run("state.apply", SLS))[NOFILE]
    # It gives the ceiling at most, so it counts as the ceiling: replaced by it, never by the lower 4096.
    ceiling = min(HARD, nr_open)
    assert applied["result"] is True and applied["changes"][str(box.defaults)]["new"] == str(ceiling)
    assert sourced(box.defaults) == (ceiling, ceiling)  # before, the line failed in every shell that sourced it
