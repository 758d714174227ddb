"""bench/effect runs in its reduced form (--quick: defaults and bbr, RTT 0 and
100 ms, 200 busy and 400 idle connections): through the real ss-server and
ss-local and its own delay line between two network namespaces, it finishes,
writes its JSON, markdown and three plots, every figure a number, and leaves
nothing behind: no process it started, no network namespace, no TUN device,
no temp dir, the host's sysctls as they were. No timing, no throughput and
no memory target is asserted: a busy machine must not fail the suite."""

import json
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys

import pytest

from support.common import REPO
from support import ssrig

BENCH = REPO / "bench" / "effect"
PLOTS = ("effect-throughput.png", "effect-busy.png", "effect-idle.png")


def namespaces():
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def tun_devices():
    listing = subprocess.run(["ip", "-o", "link", "show", "type", "tun"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in listing.splitlines() if ":" in line}


def own_temp_dirs():
    return set(pathlib.Path("/var/tmp").glob("sst-effect-*"))


def host_sysctls():
    values = {}
    for base in ("net/core", "net/ipv4"):
        for path in pathlib.Path("/proc/sys", base).iterdir():
            if path.is_file() and path.name != "tcp_fastopen_key":
                try:
                    values[str(path)] = path.read_text()
                except OSError:
                    pass
    return values


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def real_parts():
    if os.geteuid() != 0:
        pytest.skip("bench/effect needs root (network namespaces, TUN devices)")
    try:
        for binary in ("ss-server", "ss-local"):
            ssrig.require_binary(binary)
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    if shutil.which("gcc") is None:
        pytest.skip("gcc is missing (apt-get install -y gcc libc6-dev): the delay line is compiled at run time")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")
    pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_effect_quick_writes_numbers_and_leaves_nothing(real_parts, tmp_path):
    out = tmp_path / "results"
    ns_before, tun_before, dirs_before, sysctls_before = namespaces(), tun_devices(), own_temp_dirs(), host_sysctls()

    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"bench/effect --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    data = json.loads((out / "effect.json").read_text())
    assert data["profiles"] == ["defaults", "bbr"]
    assert not data["incomplete"], data["warnings"]
    for profile in data["profiles"]:
        entry = data["summary"][profile]
        assert entry["refused"] is None, entry
        cells = {(c["streams"], c["rtt_ms"], c["loss"]) for c in entry["throughput"]}
        assert cells == {(1, 0, 0.0), (8, 0, 0.0), (1, 100, 0.0), (8, 100, 0.0)}, cells
        for cell in entry["throughput"]:
            assert cell["mbit_s"]["median"] > 0, (profile, cell)
        busy, idle = entry["busy"], entry["idle"]
        assert busy["held"]["median"] == 200 and idle["held"]["median"] == 400, (busy["held"], idle["held"])
        # Busy slow clients leave data queued in ss-server's sockets; idle ones a process that holds them.
        assert busy["ss_server_sockets"]["median"] > 0, busy
        assert idle["ss_server_rss"]["median"] > 0, idle
    # The bbr profile as the package resolves it here, written in the server namespace only.
    trial = next(t for t in data["trials"] if t["profile"] == "bbr")
    written = trial["applied"]["server"]["written"]
    assert written["net.ipv4.tcp_notsent_lowat"][1] == "16384", written
    assert not [k for k in written if not k.startswith("net.")], written
    assert trial["applied"]["client"]["written"] == {}
    assert data["what_it_buys"]["bbr"].startswith("bbr: ") and re.search(r"\d\.?\d*x", data["what_it_buys"]["bbr"])

    markdown = (out / "effect.md").read_text()
    for needle in ("| kernel |", "| CPU |", "| date, commit |", data["machine"]["commit"], "## Throughput",
                   "## Memory with 200 busy slow clients", "## Memory with 400 idle connections",
                   "](effect-throughput.png)", "](effect-busy.png)", "](effect-idle.png)"):
        assert needle in markdown, (needle, markdown)
    assert re.search(r"^\| 1 \| 100 \| 0 \| [0-9]+\.[0-9] \| [0-9]+\.[0-9] \([0-9.]+x\) \|$", markdown, re.M), markdown
    assert re.search(r"^\| bbr \| 200 \| [0-9]+\.[0-9] \|", markdown, re.M), markdown
    for name in PLOTS:
        width, height = png_size(out / name)
        assert width >= 600 and height >= 300, (name, width, height)
    assert not list(out.glob("*.tmp"))

    # Nothing left behind.
    assert data["pids"] and not [pid for pid in data["pids"] if ssrig.pid_alive(pid)], "processes left running"
    assert not set(data["namespaces"]) & namespaces()
    assert not {n for n in namespaces() - ns_before if n.startswith("sstfx-")}
    assert tun_devices() <= tun_before, "bench/effect left a TUN device"
    assert not os.path.exists(data["temp_dir"]) and not own_temp_dirs() - dirs_before
    assert host_sysctls() == sysctls_before, "bench/effect changed a host sysctl"


def test_effect_refuses_unknown_profile_and_starts_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("bench/effect needs root")
    ns_before, dirs_before = namespaces(), own_temp_dirs()

    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--profiles", "defaults,no-such-profile",
                           "--out", str(tmp_path / "never")], capture_output=True, text=True, timeout=60)

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--profiles: unknown no-such-profile" in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()
    assert not {n for n in namespaces() - ns_before if n.startswith("sstfx-")}
    assert not own_temp_dirs() - dirs_before
