"""The other ways shadowsocks-libev runs, found in /proc for real: ss-manager
with two ports (each ss-server it starts daemonizes, so init adopts it) and
ss-server with the obfs-server plugin (a child with limits of its own).
Everything runs in a fresh network namespace under `ulimit -n 1000`, from
links in the test's own directory, so every process is found and stopped
by its path."""

import json
import os
import subprocess
import time

import pytest

import sstuning_daemons as daemons
import sstuning_limits as limits
import sstuning_procfs as procfs
from support import ssrig
from support.common import kill_started_from

NAMES = daemons.program_names()
PARENTS = daemons.server_names()


def wait_for(predicate, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def family(tmp_path):
    try:
        bin_dir = ssrig.link_binaries(tmp_path / "bin", ("ss-manager", "ss-server", "obfs-server"))
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    (tmp_path / "manager").mkdir()
    (tmp_path / "manager.json").write_text(json.dumps({
        "server": "127.0.0.1", "method": "chacha20-ietf-poly1305", "port_password": {"18501": "one", "18502": "two"}}))
    script = (
        "ip link set lo up; ulimit -n 1000; "
        f"{bin_dir}/ss-manager -c {tmp_path}/manager.json -D {tmp_path}/manager "
        f"--manager-address {tmp_path}/manager.sock --executable {bin_dir}/ss-server >/dev/null 2>&1 & "
        f"exec {bin_dir}/ss-server -s 127.0.0.1 -p 18503 -k three -m chacha20-ietf-poly1305 "
        f"--plugin {bin_dir}/obfs-server --plugin-opts obfs=http >/dev/null 2>&1"
    )
    top = subprocess.Popen(["unshare", "-n", "sh", "-c", script])
    try:
        yield top, bin_dir
    finally:
        kill_started_from(bin_dir)
        top.wait(timeout=10)
        wait_for(lambda: not any(str(bin_dir) in " ".join(procfs.proc_argv(pid)) for pid in procfs.process_table()))


def test_manager_children_and_plugins_are_found_and_checked(family, tmp_path):
    top, bin_dir = family

    def ready():
        table = procfs.process_table()
        named = procfs.named_processes(table, NAMES)
        ours = {pid: name for pid, name in named.items() if str(bin_dir) in " ".join(procfs.proc_argv(pid))}
        return (table, ours) if sorted(ours.values()) == ["obfs-server", "ss-manager", "ss-server", "ss-server",
                                                          "ss-server"] else None

    found = wait_for(ready)
    assert found, procfs.named_processes(procfs.process_table(), NAMES)
    table, ours = found
    manager = next(pid for pid, name in ours.items() if name == "ss-manager")
    plugin = next(pid for pid, name in ours.items() if name == "obfs-server")
    assert table[plugin][2] == top.pid  # the plugin is ss-server's child
    adopted = procfs.adopted(table)
    managed = [pid for pid, name in ours.items() if name == "ss-server" and pid != top.pid]
    assert {pid: adopted.get(pid) for pid in managed} == {pid: manager for pid in managed}
    assert all(table[pid][2] != manager for pid in managed)  # daemonized: not its children

    # The report of the whole tree, from the top process's pidfile: every one at 1000.
    pidfile = tmp_path / "top.pid"
    pidfile.write_text(f"{top.pid}\n")
    report = limits.report("/proc/sys", 4096, NAMES, [str(pidfile)])
    seen = {entry["pid"]: entry for entry in report["processes"]}
    assert set(seen) == set(ours)
    for pid, entry in seen.items():
        assert (entry["name"], entry["soft"], entry["hard"], entry["ok"]) == (ours[pid], 1000, 1000, False)
    assert f"obfs-server (pid {plugin}): soft 1000, hard 1000" in report["comment"]
    assert limits.report("/proc/sys", 1000, NAMES, [str(pidfile)])["ok"]
    # a plugin of any name is found as a child of ss-server, even when not named
    assert procfs.named_processes(table, {"ss-server"}, {"ss-server"})[plugin] == "obfs-server"
