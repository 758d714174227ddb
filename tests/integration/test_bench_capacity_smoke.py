"""bench/capacity runs, in its reduced form (--quick: steps 200,1900, nofile
4096; and --live --quick: one busy ss-server held through the state): it
finishes, prints its per-step table and its targets, writes the
PNG, the markdown and the JSON, and leaves nothing behind: no process it
started, no network namespace, no temp dir, /etc as it was, the system
supervisord stopped as it was. No timing and no target is asserted: a busy
machine must not fail the suite."""

import json
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest

from support.common import REPO
from support import ssrig

import sstuning_procfs as procfs

BENCH = REPO / "bench" / "capacity"
MANAGED = ("/etc/default/supervisor", "/etc/supervisor/supervisord.conf", "/etc/default/shadowsocks-libev")
CONF_D = "/etc/supervisor/conf.d"
SUPERVISOR_PIDFILE = "/var/run/supervisord.pid"
SSLIBEV_PIDFILE = "/var/run/shadowsocks-libev/shadowsocks-libev.pid"


def running(pidfile, word):
    pid = procfs.pid_from(pidfile)
    return bool(pid and ssrig.pid_alive(pid) and any(word in a for a in procfs.proc_argv(pid)))


def etc_state():
    files = {}
    for path in MANAGED:
        try:
            files[path] = pathlib.Path(path).read_bytes()
        except FileNotFoundError:
            files[path] = None
    return files, sorted(os.listdir(CONF_D))


def namespaces():
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def own_temp_dirs():
    return set(pathlib.Path("/var/tmp").glob("sst-capacity-*"))


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def run_capacity(*args, timeout):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def real_parts():
    if os.geteuid() != 0:
        pytest.skip("bench/capacity needs root")
    try:
        for binary in ("ss-server", "ss-local", "supervisord", "supervisorctl"):
            ssrig.require_binary(binary)
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    if not os.access(ssrig.SystemSupervisor.INIT_SCRIPT, os.X_OK):
        pytest.skip("Debian's /etc/init.d/supervisor is missing (apt-get install -y supervisor)")
    if running(SUPERVISOR_PIDFILE, "supervisord"):
        pytest.skip("the system supervisord already runs: the benchmark refuses to stop it")
    if running(SSLIBEV_PIDFILE, "ss-server"):
        pytest.skip("the shadowsocks-libev service runs: the benchmark refuses to edit its MAXFD under it")
    pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_capacity_quick_runs_writes_its_outputs_and_leaves_nothing(real_parts, tmp_path):
    out = tmp_path / "results"
    etc_before, ns_before, dirs_before = etc_state(), namespaces(), own_temp_dirs()

    proc = run_capacity("--quick", "--out", str(out), timeout=180)
    stdout = proc.stdout
    assert proc.returncode == 0, f"bench/capacity --quick failed:\n{stdout[-4000:]}\n{proc.stderr[-4000:]}"

    # The per-step table: both runs, both quick steps, numbers in every column.
    assert re.search(r"^run\s+nofile soft/hard\s+requested\s+held\s+failed\s+too many open files", stdout, re.M), stdout
    for run in ("before", "after"):
        for step in (200, 1900):
            row = rf"^{run}\s+\d+/\d+\s+{step}\s+\d+\s+\d+\s+\d+\s+[0-9.]+\s+(?:[0-9.]+|-)\s+[0-9.]+\s*$"
            assert re.search(row, stdout, re.M), (run, step, stdout)
    # The targets, each judged.
    for check in ("before: saturates near 500 (held max)", "before: ss-server soft open-file limit",
                  "after: ss-server soft open-file limit", "after: held max / open-file limit",
                  "after: 'too many open files' lines"):
        assert re.search(rf"^{re.escape(check)}\s+\S+\s+.*\b(MET|MISSED)\b", stdout, re.M), (check, stdout)
    assert re.search(r"^(all targets MET|MISSED: .+)$", stdout, re.M), stdout

    # The outputs.
    width, height = png_size(out / "capacity.png")
    assert width >= 600 and height >= 400
    markdown = (out / "capacity.md").read_text()
    for needle in ("| kernel |", "| CPU |", "| memory |", "| date |", "| packages |", "shadowsocks-libev",
                   "supervisor", "salt", "](capacity.png)", "| before |", "| after |"):
        assert needle in markdown, (needle, markdown)
    data = json.loads((out / "capacity.json").read_text())
    assert [r["run"] for r in data["runs"]] == ["before", "after"]
    for run in data["runs"]:
        assert [s["requested"] for s in run["steps"]] == [200, 1900]
        for step in run["steps"]:
            assert 0 <= step["held"] <= step["requested"] and step["too_many_open_files"] >= 0
    assert data["runs"][1]["ss_server_nofile"][0] == data["options"]["nofile"] == 4096
    assert data["state_apply"]["states"]["shadowsocks-tuning-nofile-verify"]["result"] is True
    assert not list(out.glob("*.tmp"))

    # Nothing left: processes it started, its namespace, its temp dirs, /etc, supervisord.
    assert data["pids"], data
    assert not [pid for pid in data["pids"] if ssrig.pid_alive(pid)], "bench/capacity left processes running"
    assert data["namespace"] not in namespaces()
    assert not {n for n in namespaces() - ns_before if n.startswith("sstcap-")}
    assert not [d for d in data["temp_dirs"] if os.path.exists(d)], "bench/capacity left a temp dir"
    assert not own_temp_dirs() - dirs_before
    assert etc_state() == etc_before, "bench/capacity did not put /etc back"
    assert not running(SUPERVISOR_PIDFILE, "supervisord"), "bench/capacity left the system supervisord running"


@pytest.mark.slow
def test_capacity_live_quick_keeps_its_connections_through_the_state_and_leaves_nothing(real_parts, tmp_path):
    """--live --quick: the connections held at the old limit stay open through
    the state (the live policy raises ss-server in place) and the ramp goes on
    to 1900 with the same ss-server. The figures are what the run measured;
    only what a raise in place promises is asserted, no timing."""
    out = tmp_path / "results"
    etc_before, ns_before, dirs_before = etc_state(), namespaces(), own_temp_dirs()

    proc = run_capacity("--live", "--quick", "--out", str(out), timeout=180)
    assert proc.returncode == 0, f"bench/capacity --live --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for line in ("held_before", "cut_by_the_state", "too_many_open_files_after", "pid_changed",
                 "first_accept_above_old_limit_s"):
        assert re.search(rf"^{line}\s+\S", proc.stdout, re.M), (line, proc.stdout)

    data = json.loads((out / "capacity-live.json").read_text())
    summary, live = data["summary"], data["live"]
    assert [p["phase"] for p in live["phases"]] == [
        "hold (before)", "over the limit (before)", "during the state", "held ones checked (after)",
        "ramp on to 1900 (after)", "all checked (end)"]
    assert summary["nofile_before"][0] == 1024 and summary["nofile_after"][0] == data["options"]["nofile"] == 4096
    assert summary["too_many_open_files_before"] > 0  # it was over its limit
    assert summary["pid_changed"] is False and summary["cut_by_the_state"] == 0
    assert summary["held_after"] == 1900 and summary["failed_after"] == 0
    assert summary["too_many_open_files_after"] == 0
    assert summary["first_accept_above_old_limit_s"] is not None
    assert live["state_apply"]["states"]["shadowsocks-tuning-nofile-verify"]["result"] is True
    width, height = png_size(out / "capacity-live.png")
    assert width >= 600 and height >= 400
    assert "](capacity-live.png)" in (out / "capacity-live.md").read_text()
    assert not list(out.glob("*.tmp"))

    assert not [pid for pid in data["pids"] if ssrig.pid_alive(pid)], "bench/capacity left processes running"
    assert not {n for n in namespaces() - ns_before if n.startswith("sstcap-")}
    assert not own_temp_dirs() - dirs_before
    assert etc_state() == etc_before, "bench/capacity did not put /etc back"
    assert not running(SUPERVISOR_PIDFILE, "supervisord"), "bench/capacity left the system supervisord running"


def test_capacity_refuses_a_limit_this_box_cannot_grant_and_starts_nothing():
    if os.geteuid() != 0:
        pytest.skip("bench/capacity needs root")
    nr_open = int(pathlib.Path("/proc/sys/fs/nr_open").read_text())
    ns_before, dirs_before, etc_before = namespaces(), own_temp_dirs(), etc_state()

    proc = run_capacity("--quick", "--nofile", str(nr_open + 1), "--out", "/nonexistent/never-written", timeout=60)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--nofile {nr_open + 1} cannot be granted here" in proc.stderr, proc.stderr
    assert not pathlib.Path("/nonexistent").exists()
    assert not {n for n in namespaces() - ns_before if n.startswith("sstcap-")}
    assert not own_temp_dirs() - dirs_before
    assert etc_state() == etc_before
