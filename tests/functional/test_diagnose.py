"""`shadowsocks_tuning.diagnose` through a real salt-call in a fresh network
namespace: a real listen queue overflow shows as a rise of ListenOverflows
with somaxconn as its limit, a drifted managed sysctl is named, and a bad
sample file is a note, never a traceback."""

import json
import os
import subprocess
import sys

from support.common import in_netns

SLS = "shadowsocks.tuning.sysctl"
OVERFLOWS = "counter:TcpExt:ListenOverflows"

# A listener that never accepts, and a burst of connects at it: with
# somaxconn 2 the accept queue is full after a few, and the kernel drops the
# SYNs of the others, counting each in TcpExt ListenOverflows. Prints the
# counter once it rose (bounded: 64 connects, 10 s).
BURST = r"""
import socket, sys, time

def overflows():
    lines = open("/proc/net/netstat").read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split()[1:], values.split()[1:]))["ListenOverflows"])

before = overflows()
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)  # capped by net.core.somaxconn
clients = []
for _ in range(64):
    client = socket.socket()
    client.setblocking(False)
    client.connect_ex(server.getsockname())
    clients.append(client)
deadline = time.monotonic() + 10
while overflows() == before and time.monotonic() < deadline:
    time.sleep(0.05)
print(overflows())
"""


def entries(result):
    assert isinstance(result.data, dict), f"{result.stdout}\n{result.stderr}"
    return {f["condition"]: f for f in result.data["findings"]}


def test_a_real_listen_queue_overflow_is_reported_with_somaxconn(masterless):
    netns = masterless.netns
    subprocess.run(["ip", "-n", netns, "link", "set", "lo", "up"], check=True)
    in_netns(netns, "sysctl", "-q", "-w", "net.core.somaxconn=2", check=True)  # per namespace

    first = masterless.run("shadowsocks_tuning.diagnose")
    assert first.data["baseline"] is None, first.data
    assert any("no baseline yet" in note for note in first.data["notes"]), first.data["notes"]
    start = entries(first)[OVERFLOWS]["evidence"]["value"]
    assert entries(first)[OVERFLOWS]["evidence"]["change"] is None

    burst = in_netns(netns, sys.executable, "-c", BURST, check=True, timeout=60)
    now = int(burst.stdout.split()[-1])
    assert now > start, burst.stdout

    second = masterless.run("shadowsocks_tuning.diagnose")
    found = entries(second)[OVERFLOWS]
    assert found["severity"] == "critical", found
    assert found["evidence"] == {"value": now, "change": now - start}
    assert found["limit"] == {"net.core.somaxconn": "2"}
    assert found["pillar"] == "shadowsocks:tuning:sysctls:net.core.somaxconn"
    assert "somaxconn" in found["fix"]
    assert second.data["severity"] == "critical" and second.data["baseline"]["time"]
    assert any(p.startswith("critical: TcpExt ListenOverflows rose by") for p in second.data["problems"])
    # salt-call prints the report and exits non-zero on a critical finding
    assert second.returncode != 0

    # nothing rose since: ok again, exit 0 unless something else on the box is critical
    third = masterless.run("shadowsocks_tuning.diagnose")
    assert entries(third)[OVERFLOWS]["severity"] == "ok"
    assert entries(third)[OVERFLOWS]["evidence"] == {"value": now, "change": 0}
    assert (third.returncode == 0) == (third.data["severity"] != "critical")


def test_a_drifted_managed_sysctl_is_named_with_the_applied_value(masterless):
    assert masterless.run("state.apply", SLS).returncode == 0
    clean = masterless.run("shadowsocks_tuning.diagnose")
    assert entries(clean)["drift"]["severity"] == "ok", entries(clean).get("drift")
    in_netns(masterless.netns, "sysctl", "-q", "-w", "net.ipv4.tcp_keepalive_time=7000", check=True)
    found = entries(masterless.run("shadowsocks_tuning.diagnose"))["drift:net.ipv4.tcp_keepalive_time"]
    assert found["severity"] == "warning"
    assert found["evidence"] == {"value": masterless.read("net.ipv4.tcp_keepalive_time"), "applied": "1200"}
    assert found["pillar"] == "shadowsocks:tuning:sysctls:net.ipv4.tcp_keepalive_time"
    assert "state.apply shadowsocks.tuning" in found["fix"]


def test_a_bad_or_linked_sample_file_is_a_note_not_a_traceback(masterless, tmp_path):
    sample = masterless.root / "state" / "diagnose.json"
    sample.write_text("{half a sample")
    result = masterless.run("shadowsocks_tuning.diagnose")
    assert result.data["baseline"] is None and "Traceback" not in result.stderr
    assert any(f"{sample} is not valid JSON; no baseline" in n for n in result.data["notes"]), result.data["notes"]
    # replaced by a good one (0600), which the next call uses
    assert json.loads(sample.read_text())["version"] == 1 and sample.stat().st_mode & 0o777 == 0o600
    assert masterless.run("shadowsocks_tuning.diagnose").data["baseline"] is not None

    sample.write_text(json.dumps({"version": 1, "time": "noon", "counters": {}, "fds": {}}))
    result = masterless.run("shadowsocks_tuning.diagnose")
    assert any("no time; no baseline" in n for n in result.data["notes"]), result.data["notes"]

    secret = tmp_path / "secret"
    secret.write_text("not for diagnose")
    sample.unlink()
    os.symlink(secret, sample)
    result = masterless.run("shadowsocks_tuning.diagnose")
    assert "Traceback" not in result.stderr and result.data["baseline"] is None
    assert any("symbolic link" in n for n in result.data["notes"]), result.data["notes"]
    assert os.path.islink(sample) and secret.read_text() == "not for diagnose"


def test_bad_arguments_are_refused_plainly(masterless):
    result = masterless.run("shadowsocks_tuning.diagnose", "headroom=150")
    assert result.returncode != 0 and "headroom: 150 must be a percentage" in result.stdout + result.stderr
