"""With real parts, the other ways shadowsocks-libev runs under Debian's
supervisord: ss-manager with two ports (it starts one ss-server per port,
and each daemonizes: init adopts it) and ss-server with the obfs-server
plugin (a child process with limits of its own). supervisord is started
from a shell with soft 1024 under this box's hard limit, so every one of
them runs at 1024:hard, which a raise in place can lift without
CAP_SYS_RESOURCE. `state.apply shadowsocks.tuning` raises every process of
supervisord's tree in place, the manager's adopted servers and the plugin
included, restarts none, and each is found by `shadowsocks_tuning.nofile`
and the verify state. Real connections go through ss-local (with
obfs-local for the plugin): those held before the apply still echo after
it, and each path then holds more than its processes could at 1024.

As in test_nofile_e2e.py: everything runs in the test's own network
namespace, /etc is put back byte for byte, every daemon is stopped.
"""

import collections
import contextlib
import json
import os
import resource

import pytest

from support import ssrig
from support.common import kill_started_from
from test_nofile_e2e import (  # the same real parts, guards and helpers  # noqa: F401  (real_parts is a fixture)
    MANAGED, NOFILE, VERIFY, joined_network_namespace, raised_pids, real_parts, snapshot, soft_nofile, states,
    system_supervisord_running, tuning_pillar,
)

import sstuning_daemons as daemons
import sstuning_procfs as procfs

pytestmark = pytest.mark.slow

LIMIT = 16384
HELD = 300  # per path before the apply, well within 1024
MORE = 300  # per path after it: 600 held, two descriptors each, is above 1024
METHOD = ssrig.DEFAULT_METHOD
# supervisord's tree as the engine names it; besides these, one process runs
# under another name: the line counter around the rig's own ss-server.
EXPECTED = collections.Counter({"supervisord": 1, "ss-server": 4, "ss-manager": 1, "obfs-server": 1})


def programs(name, bin_dir, work, manager_ports, obfs_port):
    """supervisord programs: ss-manager with two ports, ss-server with obfs-server."""
    (work / "manager").mkdir()
    (work / "manager.json").write_text(json.dumps({
        "server": ssrig.HOST, "method": METHOD, "timeout": 60,
        "port_password": {str(port): f"manager-{port}" for port in manager_ports}}))
    commands = {
        f"{name}-manager": (f"{bin_dir}/ss-manager -c {work}/manager.json -D {work}/manager "
                            f"--manager-address {work}/manager.sock --executable {bin_dir}/ss-server"),
        f"{name}-obfs": (f"{bin_dir}/ss-server -s {ssrig.HOST} -p {obfs_port} -k obfs-password -m {METHOD} "
                         f"--plugin {bin_dir}/obfs-server --plugin-opts obfs=http"),
    }
    return "".join(
        f"[program:{program}]\ncommand={command}\nautostart=true\nautorestart=false\nstartsecs=1\nstartretries=0\n"
        f"stopasgroup=true\nkillasgroup=true\nstopwaitsecs=5\nredirect_stderr=true\n"
        f"stdout_logfile={work}/{program}.log\nstdout_logfile_maxbytes=1MB\nstdout_logfile_backups=0\n\n"
        for program, command in commands.items())


def family(supervisord_pid, ports):
    """{pid: name} of supervisord's whole tree as the engine reports it (the
    manager's adopted servers and the plugin included; a process of no known
    name under its comm), once every port listens and nothing else runs in it."""
    if not supervisord_pid or not all(ssrig.is_listening(port) for port in ports):
        return None
    table = procfs.process_table()
    tree = procfs.subtree(table, [supervisord_pid])
    named = procfs.named_processes(table, daemons.program_names(), daemons.server_names())
    out = {pid: named.get(pid, table[pid][0]) for pid in tree}
    known = collections.Counter(name for pid, name in out.items() if pid in named)
    return out if known == EXPECTED and len(out) == sum(EXPECTED.values()) + 1 else None


def limits_by_pid(report):
    return {entry["pid"]: (entry["soft"], entry["hard"]) for entry in report["processes"]}


def test_manager_servers_and_plugins_are_raised_in_place_and_keep_serving(make_masterless, real_parts, tmp_path):
    saved = real_parts
    try:
        bin_dir = ssrig.link_binaries(tmp_path / "bin", ("ss-manager", "ss-server", "obfs-server", "obfs-local"))
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    minion = make_masterless()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < LIMIT:
        pytest.skip(f"a raise in place to {LIMIT} needs a hard limit of at least {LIMIT} (here {hard})")
    tuning_pillar(minion, LIMIT)
    pidfiles = f"pidfiles=[{ssrig.SystemSupervisor.PIDFILE}]"

    try:
        with joined_network_namespace(minion.netns), soft_nofile(1024), contextlib.ExitStack() as stack:
            echo = stack.enter_context(ssrig.EchoServer())
            server = stack.enter_context(ssrig.SystemSupervisor(start=False))
            for path in MANAGED:
                server.guard(path)
            manager_ports = [ssrig.free_port(), ssrig.free_port()]
            obfs_port = ssrig.free_port()
            conf = f"{server.CONF_D}/{os.path.basename(server.program_path)[:-5]}-more.conf"
            server.guard(conf)  # absent: removed on exit
            with open(conf, "w") as handle:
                handle.write(programs(os.path.basename(conf)[:-5], bin_dir, tmp_path, manager_ports, obfs_port))
            original = snapshot()
            server.start()
            ports = manager_ports + [obfs_port, server.port]
            before = ssrig._wait_until(lambda: family(server.supervisord_pid(), ports), 20, 0.1)
            assert before, f"not every program came up: {family(server.supervisord_pid(), [])}"

            locals_ = [ssrig.SsLocal(port, password=f"manager-{port}", method=METHOD) for port in manager_ports]
            obfs_local = ssrig.SsLocal(obfs_port, password="obfs-password", method=METHOD)
            obfs_local.proc.argv += ["--plugin", f"{bin_dir}/obfs-local",
                                     "--plugin-opts", "obfs=http;obfs-host=www.example.com"]
            locals_.append(obfs_local)
            for local in locals_:
                stack.enter_context(local)

            # Before: every process of the tree at 1024:hard, each path serving and held.
            report = minion.run("shadowsocks_tuning.nofile", str(LIMIT), pidfiles).data
            assert {e["pid"]: e["name"] for e in report["processes"]} == before, report
            assert limits_by_pid(report) == {pid: (1024, hard) for pid in before}, report
            assert not report["ok"] and len(report["problems"]) == len(before)
            held = {}
            for local in locals_:
                ramp = ssrig.socks5_ramp(local.port, echo.port, HELD, timeout=30, stall_timeout=5, keep=True)
                held[local.port] = stack.enter_context(ramp.pop("kept"))
                assert ramp["held"] == HELD and ramp["failures"] == {}, ramp

            # The tuning: every process raised in place, none restarted.
            applied = states(minion.run("state.apply", "shadowsocks.tuning"))
            comment, changes = applied[NOFILE]["comment"], applied[NOFILE]["changes"]
            assert applied[NOFILE]["result"] is True, comment
            assert {pid: raised_pids(changes).get(pid) for pid in before} == {
                pid: {"old": f"1024:{hard}", "new": f"{LIMIT}:{hard}"} for pid in before}, changes
            for pid, name in before.items():
                assert f"{name} (pid {pid}) raised in place from 1024:{hard} to {LIMIT}:{hard}" in comment, comment
            assert not [key for key in changes if key.startswith("service ")], changes
            assert applied[VERIFY]["result"] is True, applied[VERIFY]["comment"]
            assert family(server.supervisord_pid(), ports) == before, "a process was restarted"

            report = minion.run("shadowsocks_tuning.nofile", str(LIMIT), pidfiles).data
            assert report["ok"], report["comment"]
            assert {e["pid"]: e["name"] for e in report["processes"]} == before
            assert limits_by_pid(report) == {pid: (LIMIT, hard) for pid in before}
            for pid in before:  # as /proc itself says
                assert ssrig.read_nofile_limits(pid) == (LIMIT, hard), (pid, before[pid])

            # Every connection held before still echoes; each path now holds
            # more than 1024 descriptors' worth, the plugin's included.
            for local in locals_:
                check = held[local.port].check()
                assert (check["echoed"], check["failures"]) == (HELD, {}), (local.port, check)
                ramp = ssrig.socks5_ramp(local.port, echo.port, MORE, timeout=30, stall_timeout=5, keep=True)
                held[local.port].extend(ramp.pop("kept"))
                assert ramp["held"] == MORE and ramp["failures"] == {}, (local.port, ramp)
            busy = {pid: ssrig.count_open_fds(pid) for pid, name in before.items()
                    if name in ("ss-server", "obfs-server") and pid != server.ss.pid()}
            assert len(busy) == 4 and all(fds > 1024 for fds in busy.values()), busy

            # The verify state sees the same tree, plugin and adopted servers included.
            again = states(minion.run("state.apply", "shadowsocks.tuning"))
            comment = again[VERIFY]["comment"]
            assert again[VERIFY]["result"] is True, comment
            assert again[NOFILE]["result"] is True and not again[NOFILE]["changes"], again[NOFILE]
            for pid, name in before.items():
                assert f"{name}[{pid}] {LIMIT}/{hard}" in comment, (name, comment)
            for local in locals_:
                check = held[local.port].check()
                assert (check["echoed"], check["failures"]) == (HELD + MORE, {}), (local.port, check)
                held[local.port].close()

            undo = minion.run("state.apply", "shadowsocks.tuning.clean")
            assert undo.returncode == 0, undo.stdout
            assert snapshot() == original
    finally:
        kill_started_from(bin_dir)

    assert not system_supervisord_running()
    assert not [pid for pid in procfs.process_table() if str(bin_dir) in " ".join(procfs.proc_argv(pid))]
    assert snapshot() == saved and not os.path.exists(conf)
