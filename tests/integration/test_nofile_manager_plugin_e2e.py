"""With real parts, the other ways shadowsocks-libev runs under Debian's
supervisord: ss-manager with two ports (it starts one ss-server per port,
and each daemonizes: init adopts it) and ss-server with the obfs-server
plugin (a child process with limits of its own). Before the tuning every one
of them runs at the inherited 1024; `state.apply shadowsocks.tuning` stops
and starts supervisord, and every one, the manager's servers and the plugin
included, comes back with N and is found by `shadowsocks_tuning.nofile` and
the verify state. Real connections go through ss-local (with obfs-local for
the plugin) before and after.

As in test_nofile_e2e.py: everything runs in the test's own network
namespace, /etc is put back byte for byte, every daemon is stopped.
"""

import collections
import json
import os
import resource

import pytest

from support import ssrig
from support.common import kill_started_from
from test_nofile_e2e import (  # the same real parts, guards and helpers  # noqa: F401  (real_parts is a fixture)
    MANAGED, SUPERVISOR, VERIFY, joined_network_namespace, real_parts, snapshot, soft_nofile, states,
    system_supervisord_running,
)

import sstuning_procfs as procfs
from sstuning_limits import process_names

pytestmark = pytest.mark.slow

NOFILE = 16384
CONNECTIONS = 300  # per path, well within 1024: the point is the limits each process gets
METHOD = ssrig.DEFAULT_METHOD
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
    """{pid: name} of supervisord's whole tree as the engine sees it (the
    manager's adopted servers and the plugin included), once every port listens."""
    if not supervisord_pid or not all(ssrig.is_listening(port) for port in ports):
        return None
    table = procfs.process_table()
    tree = procfs.subtree(table, [supervisord_pid])
    named = {pid: name for pid, name in procfs.named_processes(table, process_names(None)).items() if pid in tree}
    return named if collections.Counter(named.values()) == EXPECTED else None


def limits_by_name(report):
    out = collections.defaultdict(list)
    for entry in report["processes"]:
        out[entry["name"]].append((entry["soft"], entry["hard"]))
    return dict(out)


def serve(local_port, echo_port):
    result = ssrig.socks5_ramp(local_port, echo_port, CONNECTIONS, timeout=30, stall_timeout=5)
    assert result["held"] == CONNECTIONS and result["failures"] == {}, result
    return result


def test_manager_servers_and_plugins_get_the_limit_and_serve(make_masterless, real_parts, tmp_path):
    saved = real_parts
    try:
        bin_dir = ssrig.link_binaries(tmp_path / "bin", ("ss-manager", "ss-server", "obfs-server", "obfs-local"))
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    minion = make_masterless()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    minion.pillar({"config": str(minion.config), "nofile": NOFILE,
                   "limits": {"verify": {"pidfiles": ["/var/run/supervisord.pid"], "wait": 10}}})
    pidfiles = "pidfiles=[/var/run/supervisord.pid]"

    try:
        with joined_network_namespace(minion.netns), soft_nofile(1024):
            with ssrig.EchoServer() as echo, ssrig.SystemSupervisor(start=False) as server:
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
                    local.start()
                try:
                    # Before: every process at the inherited 1024, and serving.
                    report = minion.run("shadowsocks_tuning.nofile", str(NOFILE), pidfiles).data
                    assert {e["pid"]: e["name"] for e in report["processes"]} == before, report
                    assert limits_by_name(report) == {name: [(1024, hard)] * count for name, count in EXPECTED.items()}
                    assert not report["ok"] and len(report["problems"]) == sum(EXPECTED.values())
                    for local in locals_:
                        serve(local.port, echo.port)

                    # The tuning: supervisord stopped and started, and with it every program.
                    applied = states(minion.run("state.apply", "shadowsocks.tuning"))
                    assert applied[SUPERVISOR]["result"] is True and applied[SUPERVISOR]["changes"], applied[SUPERVISOR]
                    after = ssrig._wait_until(
                        lambda: (lambda f: f if f and not set(f) & set(before) else None)(
                            family(server.supervisord_pid(), ports)), 30, 0.1)
                    assert after, f"not every program came back: {family(server.supervisord_pid(), [])}"

                    report = minion.run("shadowsocks_tuning.nofile", str(NOFILE), pidfiles).data
                    assert report["ok"], report["comment"]
                    assert {e["pid"]: e["name"] for e in report["processes"]} == after
                    assert limits_by_name(report) == {name: [(NOFILE, NOFILE)] * count
                                                      for name, count in EXPECTED.items()}
                    for pid in after:  # as /proc itself says
                        assert ssrig.read_nofile_limits(pid) == (NOFILE, NOFILE), (pid, after[pid])
                    # The verify state sees the same tree, plugin and adopted servers included.
                    again = states(minion.run("state.apply", "shadowsocks.tuning"))
                    comment = again[VERIFY]["comment"]
                    assert again[VERIFY]["result"] is True, comment
                    for pid, name in after.items():
                        assert f"{name}[{pid}] {NOFILE}/{NOFILE}" in comment, (name, comment)
                    for local in locals_:
                        serve(local.port, echo.port)
                finally:
                    for local in locals_:
                        local.stop()

                undo = minion.run("state.apply", "shadowsocks.tuning.clean")
                assert undo.returncode == 0, undo.stdout
                assert snapshot() == original
    finally:
        kill_started_from(bin_dir)

    assert not system_supervisord_running()
    assert not [pid for pid in procfs.process_table() if str(bin_dir) in " ".join(procfs.proc_argv(pid))]
    assert snapshot() == saved and not os.path.exists(conf)
