"""Running daemons, and what the limits half does to each (restart: live):
``decide_process`` for every branch, then real processes started here with
known limits, planned and applied: one whose hard limit allows the target is
raised in place (prlimit, the same pid, /proc/PID/limits read back), one whose
hard limit is too low is restarted or left with the reason, one that exits
between plan and apply is reported as gone, one of another user is refused.

The processes are `sleep` run through a link with a name of its own, made for
the test in a directory of its own, so that no other process on the box goes
by that name and none but these is ever planned, raised or stopped."""

import os
import resource
import shutil
import subprocess
import tempfile
import time
import uuid

import pytest

import sstuning_daemons as daemons
import sstuning_limits as limits
import sstuning_procfs as procfs
import sstuning_settings as settings_mod

_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# What this process's children may keep (None: unlimited, as /proc shows it).
HARD = None if _HARD == resource.RLIM_INFINITY else _HARD
NOFILE = 4096 if HARD is None else min(4096, HARD)
OFF = {name: None for name in daemons.KINDS}
PART = "probe"  # a kind of pillar's own, whose only program is the link below


def cap_sys_resource():
    """Read from /proc/self/status, not from the engine under test."""
    with open("/proc/self/status") as handle:
        capeff = next(line for line in handle if line.startswith("CapEff:"))
    return bool(int(capeff.split()[1], 16) >> 24 & 1)


def limits_of(pid):
    """(soft, hard) 'Max open files' read from /proc/PID/limits (None: unlimited)."""
    with open(f"/proc/{pid}/limits") as handle:
        line = next(line for line in handle if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return tuple(None if value == "unlimited" else int(value) for value in (soft, hard))


def wait_for_exec(pid, name, timeout=10):
    """Until `pid` runs the program (before exec it is still a copy of this one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stat = procfs.proc_stat(pid)
        if stat and stat[0] == name:
            return
        time.sleep(0.01)
    pytest.fail(f"pid {pid} did not exec {name} within {timeout} s")


@pytest.fixture
def daemon(tmp_path):
    """``start(soft, hard, user=None)``: a process of the test's own program
    started with those limits (and, given ``user``, that uid and gid)."""
    # Not under tmp_path: another user must be able to reach the link.
    directory = tempfile.mkdtemp(prefix="sst-unit-", dir="/tmp")
    os.chmod(directory, 0o755)
    name = "sst" + uuid.uuid4().hex[:10]  # under the 15 bytes of a comm
    link = os.path.join(directory, name)
    os.symlink(shutil.which("sleep"), link)
    started = []

    def start(soft, hard, user=None):
        def prepare():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.RLIM_INFINITY if hard is None else hard))
            if user is not None:
                os.setgroups([])
                os.setgid(user)
                os.setuid(user)

        proc = subprocess.Popen([link, "120"], preexec_fn=prepare, stdin=subprocess.DEVNULL)
        started.append(proc)
        wait_for_exec(proc.pid, name)
        assert limits_of(proc.pid) == (soft, hard)
        return proc

    start.name = name
    start.link = link
    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
        shutil.rmtree(directory)


@pytest.fixture
def opts(tmp_path):
    (tmp_path / "init.d").mkdir()
    return settings_mod.options({
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.systemd_dir": str(tmp_path / "systemd"),
        "shadowsocks_tuning.unit_dirs": [str(tmp_path / "systemd")],
        "shadowsocks_tuning.init_dir": str(tmp_path / "init.d"),
        "shadowsocks_tuning.systemd_marker": str(tmp_path / "no-systemd"),
    }.get)


def settings_for(opts, daemon, **kind):
    tuning = {"nofile": NOFILE, "limits": {**OFF, PART: {"programs": [daemon.name], **kind}}}
    return settings_mod.resolve(tuning, None, limits.box(opts))


# --------------------------------------------------------------------------
# One decision per process
# --------------------------------------------------------------------------
@pytest.mark.parametrize("soft, hard, cap, may, policy, member, action, target, why", [
    (None, None, False, True, "live", None, "in place", (None, None), None),  # unlimited
    (8192, 8192, False, True, "live", None, "in place", (8192, 8192), None),  # higher: left as it is
    (4096, 4096, False, True, "live", None, "in place", (4096, 4096), None),
    (1024, 20000, False, True, "live", None, "raise", (4096, 20000), None),  # the soft limit, up to the hard one
    (1024, None, False, True, "live", None, "raise", (4096, None), None),
    (1024, 1024, True, True, "live", None, "raise", (4096, 4096), None),  # CAP_SYS_RESOURCE raises the hard one too
    (1024, 1024, False, True, "live", None, "left", None,
     "cannot be raised in place (its hard limit 1024 is below 4096, and raising a hard limit needs CAP_SYS_RESOURCE), "
     "and no service this package manages started it: restart it yourself"),
    (1024, 1024, False, True, "live", ("probe", 0), "restart", None,
     "cannot be raised in place: its hard limit 1024 is below 4096, and raising a hard limit needs CAP_SYS_RESOURCE"),
    (1024, 20000, False, False, "live", None, "left", None,
     "cannot be raised in place (it runs as another user and salt lacks CAP_SYS_RESOURCE, which prlimit needs then), "
     "and no service this package manages started it: restart it yourself"),
    (1024, 20000, False, False, "live", ("probe", 0), "restart", None,
     "cannot be raised in place: it runs as another user and salt lacks CAP_SYS_RESOURCE, which prlimit needs then"),
    # The other policies leave running processes to the files and their restarts.
    (1024, 20000, False, True, "running", ("probe", 0), "left", None, None),
    (1024, 20000, True, True, "always", None, "left", None, None),
    (1024, 20000, True, True, "never", ("probe", 0), "left", None, None),
])
def test_decide_process(soft, hard, cap, may, policy, member, action, target, why):
    proc = {"pid": 1, "name": "ss-server", "soft": soft, "hard": hard}
    assert limits.decide_process(proc, 4096, cap, may, policy, member) == {"action": action, "target": target,
                                                                           "why": why}


# --------------------------------------------------------------------------
# Real processes
# --------------------------------------------------------------------------
def test_a_process_is_raised_in_place_and_one_with_a_low_hard_limit_is_not(opts, daemon):
    if NOFILE <= 1024:
        pytest.skip(f"the hard limit here ({HARD}) leaves no room above 1024")
    roomy = daemon(1024, HARD)
    tight = daemon(1024, 1024)
    settings = settings_for(opts, daemon)
    planned = limits.plan(settings, opts)
    assert planned["errors"] == []
    found = planned["processes"]
    assert set(found) == {roomy.pid, tight.pid}  # only the test's own program
    assert found[roomy.pid]["action"] == "raise" and found[roomy.pid]["target"] == (NOFILE, HARD)
    cap = cap_sys_resource()
    if cap:
        assert found[tight.pid]["action"] == "raise" and found[tight.pid]["target"] == (NOFILE, NOFILE)
    else:
        assert found[tight.pid]["action"] == "left", found[tight.pid]
        assert f"its hard limit 1024 is below {NOFILE}" in found[tight.pid]["why"]
        assert "CAP_SYS_RESOURCE" in found[tight.pid]["why"]

    # A dry run changes nothing and says what would be done.
    dry = limits.apply(settings, opts, planned, PART, test=True)
    assert dry["errors"] == []
    assert {r["pid"]: r["comment"] for r in dry["raised"]}[roomy.pid].startswith(
        f"{daemon.name} (pid {roomy.pid}) would be raised in place from 1024:{HARD} to {NOFILE}:{HARD}")
    assert limits_of(roomy.pid) == (1024, HARD)

    done = limits.apply(settings, opts, planned, PART, test=False)
    assert done["errors"] == [] and done["restarts"] == []
    raised = {r["pid"]: r for r in done["raised"]}
    assert raised[roomy.pid]["changed"] and raised[roomy.pid]["ok"]
    assert raised[roomy.pid]["new"] == f"{NOFILE}:{HARD}"
    # The same process, still running, with the new limit: no restart.
    assert roomy.poll() is None and procfs.proc_stat(roomy.pid)[0] == daemon.name
    assert limits_of(roomy.pid) == (NOFILE, HARD)
    assert limits_of(tight.pid) == ((NOFILE, NOFILE) if cap else (1024, 1024))
    assert (tight.pid in raised) == cap
    # Planned again: the raised one is in place now.
    again = limits.plan(settings, opts)["processes"]
    assert again[roomy.pid]["action"] == "in place"


def test_a_process_that_exits_between_plan_and_apply_is_reported_gone(opts, daemon):
    if NOFILE <= 1024:
        pytest.skip(f"the hard limit here ({HARD}) leaves no room above 1024")
    proc = daemon(1024, HARD)
    settings = settings_for(opts, daemon)
    planned = limits.plan(settings, opts)
    assert planned["processes"][proc.pid]["action"] == "raise"
    proc.kill()
    proc.wait()  # reaped: the pid is gone, not a zombie
    done = limits.apply(settings, opts, planned, PART, test=False)
    assert done["errors"] == []
    (result,) = done["raised"]
    assert result["ok"] and not result["changed"]
    assert result["comment"] == f"{daemon.name} (pid {proc.pid}) exited before it could be raised: nothing to do"


def test_a_process_of_another_user_is_refused_without_cap_sys_resource(opts, daemon):
    if os.geteuid() != 0:
        pytest.skip("starting a process as another user needs root")
    if cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: it may set any process's limits")
    if NOFILE <= 1024:
        pytest.skip(f"the hard limit here ({HARD}) leaves no room above 1024")
    other = daemon(1024, HARD, user=65534)
    assert procfs.ids(other.pid) == ((65534,) * 3, (65534,) * 3)
    assert not procfs.may_set_limits(other.pid, False)
    # The kernel agrees: prlimit(2) on it is refused, even only to read.
    with pytest.raises(PermissionError):
        resource.prlimit(other.pid, resource.RLIMIT_NOFILE)
    settings = settings_for(opts, daemon)
    planned = limits.plan(settings, opts)
    decision = planned["processes"][other.pid]
    assert decision["action"] == "left" and "it runs as another user" in decision["why"]
    done = limits.apply(settings, opts, planned, PART, test=False)
    assert done["errors"] == [] and done["raised"] == []
    assert limits_of(other.pid) == (1024, HARD)


INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
### END INIT INFO
DAEMON={link}
PIDFILE={pidfile}
case "$1" in
  status) [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null || exit 3 ;;
  *) exit 1 ;;
esac
"""


def test_a_process_its_service_started_is_planned_for_a_restart(opts, daemon, tmp_path):
    """Found through its service's pidfile, a process that cannot be raised
    in place is restarted by its service (shown here as a dry run: the
    service would be stopped and started)."""
    if cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: every process here can be raised in place")
    tight = daemon(1024, 1024)
    pidfile = tmp_path / "probe.pid"
    pidfile.write_text(f"{tight.pid}\n")
    script = tmp_path / "init.d" / "sst-probe"
    script.write_text(INIT.format(name="sst-probe", link=daemon.link, pidfile=pidfile))
    script.chmod(0o755)
    settings = settings_for(opts, daemon, service="sst-probe", pidfile=str(pidfile),
                            defaults_file=str(tmp_path / "default-probe"))
    planned = limits.plan(settings, opts)
    assert planned["errors"] == []
    decision = planned["processes"][tight.pid]
    assert decision["action"] == "restart" and decision["member"] == (PART, 0)
    assert decision["why"].startswith("cannot be raised in place: its hard limit 1024")
    (group,) = planned["parts"][PART]
    assert group["restart_why"] == f"{daemon.name} (pid {tight.pid}) {decision['why']}"
    dry = limits.apply(settings, opts, planned, PART, test=True)
    assert dry["errors"] == [] and dry["raised"] == []
    (restart,) = dry["restarts"]
    assert restart["name"] == "sst-probe" and restart["changed"]
    assert restart["comment"].startswith("sst-probe would be stopped and started (service sst-probe stop, then start)")
    assert tight.poll() is None and limits_of(tight.pid) == (1024, 1024)


# --------------------------------------------------------------------------
# What a kind's own configs say
# --------------------------------------------------------------------------
def test_a_server_config_that_sets_a_lower_nofile_is_named_and_no_restart_is_planned_for_it(opts, daemon, tmp_path):
    """shadowsocks' own `nofile` key (libev's jconf, shadowsocks-rust's
    config) sets both limits when the server starts: a lower value there
    wins over every file this package writes, so it is named, and a restart
    (which would come back at that value) is not planned."""
    config = tmp_path / "server.json"
    config.write_text('{"server_port": 8388, "nofile": 2048}')
    tight = daemon(1024, 1024)
    kind = {"config_limit": "nofile", "service": "probe-service", "pidfile": str(tmp_path / "probe.pid"),
            "defaults_file": str(tmp_path / "default"), "defaults_limit": "MAXFD",
            "configs": {"paths": [str(tmp_path / "*.json")], "format": "json", "ports": ["server_port"]}}
    (tmp_path / "probe.pid").write_text(f"{tight.pid}\n")
    planned = limits.plan(settings_for(opts, daemon, **kind), opts)
    assert planned["errors"] == []
    (note,) = [n for n in planned["notes"] if "sets nofile" in n]
    assert note == (f"{config} sets nofile 2048: {PART} sets its open-file limit to it when it starts, below nofile "
                    f"{NOFILE}; raise it there or remove it (this package never writes a server's config)")
    proc = planned["processes"][tight.pid]
    if not cap_sys_resource() and NOFILE > 1024:
        assert proc["action"] == "left" and "a restart would not help" in proc["why"], proc
    # Enough there: nothing to say, and the usual decision.
    config.write_text('{"server_port": 8388, "nofile": 1048576}')
    planned = limits.plan(settings_for(opts, daemon, **kind), opts)
    assert not [n for n in planned["notes"] if "sets nofile" in n]


def test_a_multi_protocol_server_without_a_shadowsocks_inbound_is_left_alone(opts, daemon, tmp_path):
    """needs_ports (xray, v2ray, sing-box): only a shadowsocks inbound makes
    them this package's business; one serving vless only is not planned,
    raised or judged, and the plan says why."""
    config = tmp_path / "config.json"
    config.write_text('{"inbounds": [{"protocol": "vless", "port": 443}]}')
    proc = daemon(1024, HARD or 1024)
    kind = {"needs_ports": True, "raises_soft": True,
            "configs": {"paths": [str(config)], "format": "jsonc", "ports": ["inbounds[protocol=shadowsocks].port"]}}
    planned = limits.plan(settings_for(opts, daemon, **kind), opts)
    assert proc.pid not in planned["processes"] and PART not in planned["kinds"]
    assert (f"{PART}: no config in {config} has a shadowsocks inbound: its open-file limit is left alone (pillar "
            f"shadowsocks:tuning:limits:{PART}:configs names other paths)") in planned["notes"]
    # verify, from settings alone, leaves it out too.
    assert PART not in limits.serving(opts, settings_for(opts, daemon, **kind)["limits"]["kinds"])
    config.write_text('{"inbounds": [{"protocol": "vless", "port": 443}, {"protocol": "shadowsocks", "port": 8388}]}')
    planned = limits.plan(settings_for(opts, daemon, **kind), opts)
    assert proc.pid in planned["processes"] and PART in planned["kinds"]
    assert not [n for n in planned["notes"] if "shadowsocks inbound" in n]
