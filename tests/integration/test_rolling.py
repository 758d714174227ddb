"""Rolling applies: `salt -b 1 '*' state.apply shadowsocks.tuning` restarts
one box after another, never two at once.

A real master and three real minions (the harness of conftest.py, a fleet of
its own: test_fleet.py's module-scoped fleet is left alone). Each minion has,
in its sandbox, a fake service `fake-ss`: an init script in the shape of
Debian's (FAKE_INIT of tests/support/common.py, plus a timestamp on every
action) whose daemon holds one live loopback TCP connection, started before
the tests with `ulimit -n 1024`. Pillar names the script under
`limits:init_scripts` with `restart: running`, and the minion option
`shadowsocks_tuning.init_dir` points at the sandbox, so the package stops and
starts this daemon, and no other. A rolling apply means something only where
the apply restarts: the default policy (`live`) would raise a daemon in place
instead, so this one needs a restart twice over: `restart: running` stops and
starts a service whose file changed, and `ulimit -n 1024` set its hard limit
too (1024:1024), which no raise in place lifts without CAP_SYS_RESOURCE.

The proof of "one after another" is the recorded events: each init script
logs when its `stop` began and its `start` ended; under `-b 1` the intervals of
different minions do not overlap, and follow the order of the batch output.
"""

import ast
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import sstuning_procfs as procfs
from support.common import kill_started_from

pytestmark = [pytest.mark.slow, pytest.mark.fleet_sources("repo")]

MINIONS = ("roll-1", "roll-2", "roll-3")
SERVICE = "fake-ss"
DAEMON_NAME = "ss-server"
# One state manages every kind of daemon, the init scripts pillar names included.
SCRIPTS = "shadowsocks_tuning_|-shadowsocks-tuning-nofile_|-shadowsocks-tuning-nofile_|-limits_applied"
VERIFY = "shadowsocks_tuning_|-shadowsocks-tuning-nofile-verify_|-shadowsocks-tuning-nofile-verify_|-nofile_reached"
NOFILE = 4096
# The Debian-shaped init script of tests/support/common.py (FAKE_INIT), with a
# "ACTION begin|end <epoch seconds>" line around every action.
ROLLING_INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
### END INIT INFO
log() {{ echo "$1 $2 $(date +%s.%N)" >> {calls}; }}
log "$1" begin
PIDFILE={root}/run/{name}.pid
running() {{ [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }}
case "$1" in
  start)
    if ! running; then
      {root}/bin/{daemon} -I -S {root}/daemon.py </dev/null >/dev/null 2>&1 &
      echo $! > "$PIDFILE"
    fi
    ;;
  stop)
    running && kill "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
    ;;
  status)
    running || {{ log "$1" end; exit 3; }}
    ;;
  *) exit 3 ;;
esac
log "$1" end
exit 0
"""
# The daemon: one loopback TCP connection, both ends held (the package counts
# 2 established sockets), then it idles until stopped.
DAEMON = """\
import socket, time
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(4)
client = socket.create_connection(srv.getsockname())
server, _ = srv.accept()
time.sleep(3600)
"""
PYTHON = os.path.realpath("/usr/bin/python3")


class FakeService:
    """fake-ss in one minion's sandbox: init script, daemon, calls log."""

    def __init__(self, root: Path):
        self.root = root
        for sub in ("init.d", "run", "bin"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.script = root / "init.d" / SERVICE
        self.pidfile = root / "run" / f"{SERVICE}.pid"
        self.calls = root / "calls.log"
        (root / "daemon.py").write_text(DAEMON)
        # A symlink named like shadowsocks' server: the daemon runs as `ss-server`,
        # a name the package's /proc check (nofile_reached) looks at.
        program = root / "bin" / DAEMON_NAME
        if not program.is_symlink():
            program.symlink_to(PYTHON)
        self.script.write_text(ROLLING_INIT.format(name=SERVICE, daemon=DAEMON_NAME, root=root, calls=self.calls))
        self.script.chmod(0o755)
        self.calls.write_text("")

    def pid(self):
        return procfs.pid_from(str(self.pidfile))

    def events(self):
        """[(action, begin|end, t)] in the order the init script logged them."""
        out = []
        for line in self.calls.read_text().splitlines():
            action, edge, stamp = line.split()
            out.append((action, edge, float(stamp)))
        return out

    def nofile(self, pid):
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return int(line.split()[3])
        raise AssertionError(f"no open-file limit for pid {pid}")


def wait_running(service, timeout=10):
    """The pid once the daemon has exec'd its program and opened its connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = service.pid()
        argv = procfs.proc_argv(pid) if pid else None
        if argv and argv[0].startswith(str(service.root / "bin")) and len(os.listdir(f"/proc/{pid}/fd")) >= 6:
            return pid
        time.sleep(0.05)
    raise AssertionError(f"{service.script} did not start its daemon")


@pytest.fixture(scope="module")
def fleet_minion_ids():
    return list(MINIONS)


@pytest.fixture(scope="module")
def services(fleet_tuning_sandbox):
    made = {mid: FakeService(fleet_tuning_sandbox(mid).root / "svc") for mid in MINIONS}
    try:
        yield made
    finally:
        for service in made.values():
            kill_started_from(service.root / "bin")


@pytest.fixture(scope="module")
def fleet_minion_overrides(fleet_tuning_sandbox, services):
    return {mid: {**fleet_tuning_sandbox(mid).opts,
                  "shadowsocks_tuning.init_dir": str(services[mid].root / "init.d")}
            for mid in MINIONS}


@pytest.fixture(scope="module")
def fleet_pillar(fleet_tuning_sandbox, services):
    data = {}
    for mid in MINIONS:
        pillar = fleet_tuning_sandbox(mid).pillar(nofile=NOFILE)
        limits = pillar["shadowsocks"]["tuning"]["limits"]
        limits.update(
            restart="running",
            timeout=20,
            init_scripts=[{"path": str(services[mid].script), "pidfile": str(services[mid].pidfile)}],
            verify={"pidfiles": [str(services[mid].pidfile)], "wait": 5},
        )
        data[mid] = pillar
    return data


@pytest.fixture(scope="module")
def started(fleet_synced, fleet_net, services):
    """Each fake-ss started inside its minion's namespace, the way an admin
    shell with `ulimit -n 1024` would; {minion: pid}."""
    pids = {}
    for mid, service in services.items():
        subprocess.run(["ip", "netns", "exec", fleet_net.node(mid).netns, "sh", "-c",
                        f"ulimit -n 1024 && exec {service.script} start"], check=True, timeout=20)
        pids[mid] = wait_running(service)
        assert procfs.proc_nofile(pids[mid]) == (1024, 1024)  # hard too: no raise in place can lift it
        service.calls.write_text("")
    return pids


def batch_output(stdout):
    """[("run", [ids]) | ("ret", {id: return})] in the order `salt -b` printed them."""
    decoder = json.JSONDecoder()
    events, idx = [], 0
    while idx < len(stdout):
        if stdout[idx].isspace():
            idx += 1
        elif stdout[idx] == "{":
            obj, idx = decoder.raw_decode(stdout, idx)
            events.append(("ret", {k: v for k, v in obj.items() if k in MINIONS}))
        else:
            end = stdout.find("\n", idx)
            end = len(stdout) if end < 0 else end
            found = re.match(r"Executing run on (\[.*\])", stdout[idx:end])
            if found:
                events.append(("run", ast.literal_eval(found.group(1))))
            idx = end
    return events


def batch_order(result):
    """Minion ids in the order `salt -b 1` announced them ("Executing run on
    ['ID']", one minion per sub-batch), and {id: return} (each printed once).
    Salt 3008 prints the next announcement before the previous return: the
    order of the printed lines is not the order of the runs; the init
    scripts' own records are (assert_one_after_another)."""
    events = batch_output(result.stdout)
    runs = [ids for kind, ids in events if kind == "run"]
    assert all(len(ids) == 1 for ids in runs), result.stdout
    order = [ids[0] for ids in runs]
    assert sorted(order) == sorted(MINIONS), result.stdout
    returned = [mid for kind, ret in events if kind == "ret" for mid in ret]
    assert sorted(returned) == sorted(MINIONS), result.stdout
    return order, {mid: ret[mid] for kind, ret in events if kind == "ret" for mid in ret}


def restart_window(service):
    """(stop began, start ended) of the one stop-then-start the init script
    logged (`status` calls, made when no pidfile is given, left out)."""
    events = [e for e in service.events() if e[0] != "status"]
    assert [(a, e) for a, e, _ in events] == [("stop", "begin"), ("stop", "end"),
                                             ("start", "begin"), ("start", "end")], events
    return events[0][2], events[-1][2]


def assert_one_after_another(order, services):
    windows = [restart_window(services[mid]) for mid in order]
    for (_, done), (next_stop, _), (mid, nxt) in zip(windows, windows[1:], zip(order, order[1:])):
        assert done < next_stop, f"{nxt} was stopped before {mid} was started again: {windows}"


def test_test_mode_predicts_each_restart_and_the_connections_it_would_cut(fleet_salt_cli, started, services):
    ret = fleet_salt_cli.run("state.apply", "shadowsocks.tuning", "test=True", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert set(ret.data) == set(MINIONS), ret
    for mid in MINIONS:
        state = ret.data[mid][SCRIPTS]
        assert state["result"] is None, (mid, state)
        assert (f"{SERVICE} would be stopped and started (service {SERVICE} stop, then start): "
                f"2 live TCP connection(s) of its processes would be cut") in state["comment"], (mid, state["comment"])
        assert state["changes"][f"service {SERVICE}"]["old"] == f"running (pid {started[mid]})", (mid, state)
        assert f"ulimit -n {NOFILE}" not in services[mid].script.read_text(), f"{mid}: test=True wrote the script"
        assert services[mid].events() == [], f"{mid}: test=True called the init script"
        assert services[mid].pid() == started[mid]


def test_batch_of_one_restarts_the_minions_one_after_another(fleet_salt_cli, started, services):
    ret = fleet_salt_cli.run("-b", "1", "state.apply", "shadowsocks.tuning", minion_tgt="*")
    assert ret.returncode == 0, ret
    order, returns = batch_order(ret)
    assert_one_after_another(order, services)
    for mid in MINIONS:
        states = returns[mid]
        assert all(r["result"] is True for r in states.values()), (mid, states)
        state = states[SCRIPTS]
        assert f"{SERVICE} stopped and started: 2 live TCP connection(s) of its processes cut" in state["comment"]
        pid = services[mid].pid()
        assert pid != started[mid] and not procfs.alive(started[mid]), mid
        assert state["changes"][f"service {SERVICE}"] == {"old": f"running (pid {started[mid]})",
                                                         "new": f"running (pid {pid})"}, (mid, state)
        assert services[mid].nofile(pid) == NOFILE, mid
        assert states[VERIFY]["result"] is True, states[VERIFY]


def test_restart_never_writes_now_and_stop_start_restarts_later_one_by_one(fleet_salt_cli, started, services):
    """A later window: pillar `limits:restart: never` writes the new limit and
    restarts nothing; a state.apply with restart back on does not restart
    either (the files are already right), its check names the daemons still
    below; `salt -b 1 '*' shadowsocks_tuning.stop_start` restarts them."""
    raised = NOFILE * 2
    pids = {mid: services[mid].pid() for mid in MINIONS}
    for service in services.values():
        service.calls.write_text("")
    never = json.dumps({"shadowsocks": {"tuning": {"nofile": raised, "limits": {"restart": "never"}}}})
    ret = fleet_salt_cli.run("state.apply", "shadowsocks.tuning", f"pillar={never}", minion_tgt="*")
    assert set(ret.data) == set(MINIONS), ret
    for mid in MINIONS:
        state = ret.data[mid][SCRIPTS]
        assert state["result"] is True and str(services[mid].script) in state["changes"], (mid, state)
        assert f"{SERVICE}: restart is off (restart: never)" in state["comment"], (mid, state["comment"])
        assert f"ulimit -n {raised}" in services[mid].script.read_text()
        assert services[mid].pid() == pids[mid] and services[mid].events() == [], mid
        # the check says the daemon still runs with the old limit
        assert ret.data[mid][VERIFY]["result"] is False, (mid, ret.data[mid][VERIFY])
    assert ret.returncode != 0, ret

    running = json.dumps({"shadowsocks": {"tuning": {"nofile": raised}}})
    again = fleet_salt_cli.run("state.apply", "shadowsocks.tuning", f"pillar={running}", minion_tgt="*")
    for mid in MINIONS:
        assert again.data[mid][SCRIPTS]["changes"] == {}, (mid, again.data[mid][SCRIPTS])
        assert again.data[mid][VERIFY]["result"] is False, (mid, again.data[mid][VERIFY])
        assert services[mid].pid() == pids[mid] and services[mid].events() == [], mid

    rolled = fleet_salt_cli.run("-b", "1", "shadowsocks_tuning.stop_start", SERVICE, "when=running",
                                minion_tgt="*")
    assert rolled.returncode == 0, rolled
    order, returns = batch_order(rolled)
    assert_one_after_another(order, services)
    for mid in MINIONS:
        assert returns[mid]["changed"] is True, (mid, returns[mid])
        assert returns[mid]["comment"].startswith(f"{SERVICE} stopped and started"), returns[mid]
        pid = services[mid].pid()
        assert pid != pids[mid] and services[mid].nofile(pid) == raised, mid

    done = fleet_salt_cli.run("state.apply", "shadowsocks.tuning", f"pillar={running}", minion_tgt="*")
    assert done.returncode == 0, done
    for mid in MINIONS:
        assert done.data[mid][VERIFY]["result"] is True, (mid, done.data[mid][VERIFY])
