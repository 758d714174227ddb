"""The shadowsocks_tuning beacon on a real minion, seen on the real master's
event bus.

One minion in its own network namespace, with the beacon on (every second,
headroom 20 %), the package synced from this repository and its sysctl part
applied into a sandbox (see TuningSandbox in support/fleet.py):

- a `sysctl -w` of a managed key inside the minion's namespace gives one
  drift event with the live value, the reactor of docs/watching.md re-applies
  `shadowsocks.tuning` and the value comes back, then nothing fires while
  nothing changes;
- ss-server under a private supervisord at 512 open files, driven through
  ss-local past 80 % of them, gives one fd-headroom event whose numbers are
  those /proc shows, and the alert reactor of docs/watching.md runs on the minion.

The master's reactors are the two SLS files of docs/watching.md, taken from it.

No host sysctl, no file under /etc, no host daemon is touched; the
supervisord, ss-server, ss-local and echo server of the rig are stopped.
"""

import json
import os
import re
import socket
import time

import pytest

from support import ssrig
from support.common import REPO

pytestmark = [pytest.mark.slow, pytest.mark.fleet_sources("repo")]

MINION = "ss-beacon"
TAG = f"salt/beacon/{MINION}/shadowsocks_tuning/"
INTERVAL = 1  # seconds between beacon looks
QUIET = 6 * INTERVAL  # how long "nothing changes" is watched
DRIFT_KEY = "net.ipv4.tcp_keepalive_time"
NOFILE = 512  # ss-server's open-file limit in the rig (supervisord minfds too)
MAX_CONNECTIONS = 400  # the bounded loop that fills ss-server's descriptors
EVENTS_OUT = os.environ.get("SSTUNING_BEACON_EVENTS")  # where to keep the events seen (the example of docs/watching.md)


def readme_reactors():
    """{name: text} of the reactor SLS blocks in docs/watching.md (their first
    line is `# /srv/reactor/NAME`)."""
    text = (REPO / "docs" / "watching.md").read_text()
    found = {}
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        match = re.match(r"# /srv/reactor/(\S+\.sls)", block)
        if match:
            found[match.group(1)] = block
    return found


@pytest.fixture(scope="module")
def fleet_master_overrides(fleet_workdir):
    reactors = readme_reactors()
    assert set(reactors) == {"shadowsocks-tuning-reapply.sls", "shadowsocks-fd-alert.sls"}, sorted(reactors)
    directory = fleet_workdir / "reactor"
    directory.mkdir()
    for name, text in reactors.items():
        (directory / name).write_text(text)
    return {"reactor": [
        {TAG.replace(MINION, "*") + "drift": [str(directory / "shadowsocks-tuning-reapply.sls")]},
        {TAG.replace(MINION, "*") + "fd-headroom": [str(directory / "shadowsocks-fd-alert.sls")]},
    ]}


@pytest.fixture(scope="module")
def fleet_minion_ids():
    return [MINION]


@pytest.fixture(scope="module")
def fleet_minion_overrides(fleet_tuning_sandbox):
    opts = dict(fleet_tuning_sandbox(MINION).opts)
    opts["beacons"] = {"shadowsocks_tuning": [{"interval": INTERVAL}, {"headroom": 20}]}
    return {MINION: opts}


@pytest.fixture(scope="module")
def fleet_pillar(fleet_tuning_sandbox):
    return {MINION: fleet_tuning_sandbox(MINION).pillar()}


@pytest.fixture(scope="module")
def applied(fleet_synced, fleet_salt_cli, fleet_tuning_sandbox):
    """The kernel part applied in the minion's namespace (so there are managed sysctls)."""
    assert "beacons.shadowsocks_tuning" in fleet_synced[MINION]["beacons"], fleet_synced[MINION]
    ret = fleet_salt_cli.run("state.apply", "shadowsocks.tuning.sysctl", minion_tgt=MINION)
    assert ret.returncode == 0, ret
    return fleet_tuning_sandbox(MINION)


@pytest.fixture(scope="module")
def seen():
    events = []
    yield events
    if EVENTS_OUT:
        with open(EVENTS_OUT, "w") as handle:
            json.dump(events, handle, indent=1, sort_keys=True)


def beacon_events(listener, master, kind="*", after=None):
    return sorted(listener.get_events([(master.id, TAG + kind)], after_time=after), key=lambda e: e.stamp)


def wait_for(listener, master, kind, after, match, timeout=60):
    """The first event of ``kind`` after ``after`` whose data satisfies ``match``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in beacon_events(listener, master, kind, after):
            if match(event.data):
                return event
        time.sleep(0.2)
    found = [e.data for e in beacon_events(listener, master, "*", after)]
    raise AssertionError(f"no {kind} event within {timeout} s; beacon events seen: {found}")


def wait_for_job(listener, master, fun, after, timeout=120):
    """The return of the first job of ``fun`` the minion ran after ``after`` (a reactor's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in sorted(listener.get_events([(master.id, f"salt/job/*/ret/{MINION}")], after_time=after),
                            key=lambda e: e.stamp):
            if event.data.get("fun") == fun:
                return event.data
        time.sleep(0.5)
    raise AssertionError(f"the minion ran no {fun} within {timeout} s")


def persisted(config, key):
    for line in config.read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return " ".join(value.split())
    return None


def test_a_drifted_sysctl_fires_once_and_nothing_fires_while_nothing_changes(
        applied, fleet_master, fleet_net, event_listener, seen):
    node = fleet_net.node(MINION)
    applied_value = persisted(applied.config, DRIFT_KEY)
    assert applied_value and node.read_sysctl(DRIFT_KEY) == applied_value

    start = time.time()
    node.exec("sysctl", "-q", "-w", f"{DRIFT_KEY}=7000")
    drifted = node.read_sysctl(DRIFT_KEY)  # read now: the reactor below soon puts it back
    event = wait_for(event_listener, fleet_master, "drift", start, lambda d: d.get("key") == DRIFT_KEY)
    seen.append({"tag": event.tag, "data": event.data})
    data = event.data
    assert data["id"] == MINION  # Salt's own field: the reactor targets it
    assert data["evidence"] == {"value": drifted, "applied": applied_value}
    assert data["pillar"] == f"shadowsocks:tuning:sysctls:{DRIFT_KEY}"
    assert data["severity"] == "warning" and "state.apply shadowsocks.tuning" in data["fix"]

    # The reactor of docs/watching.md re-applies shadowsocks.tuning: the value comes back.
    job = wait_for_job(event_listener, fleet_master, "state.apply", start)
    kwargs = [{k: v for k, v in a.items() if k != "__kwarg__"} for a in job["fun_args"] if isinstance(a, dict)]
    assert job["retcode"] == 0 and kwargs == [{"mods": "shadowsocks.tuning"}], job["fun_args"]
    assert node.read_sysctl(DRIFT_KEY) == applied_value

    # Nothing changes now: several looks, no event at all (the drift cleared silently).
    quiet_from = time.time()
    time.sleep(QUIET)
    assert beacon_events(event_listener, fleet_master, "*", quiet_from) == []
    assert len(beacon_events(event_listener, fleet_master, "drift", start)) == 1


def socks_connection(local_port, echo_port, number):
    """One connection through ss-local to the echo server, proven by an echo."""
    sock = socket.create_connection((ssrig.HOST, local_port), timeout=10)
    sock.sendall(b"\x05\x01\x00")
    assert sock.recv(2) == b"\x05\x00"
    sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(ssrig.HOST) + echo_port.to_bytes(2, "big"))
    reply = b""
    while len(reply) < 10:
        chunk = sock.recv(10 - len(reply))
        assert chunk, "ss-local closed the connection"
        reply += chunk
    assert reply[1] == 0, reply
    payload = b"beacon %06d\n" % number
    sock.sendall(payload)
    echoed = b""
    while len(echoed) < len(payload):
        chunk = sock.recv(len(payload))
        assert chunk, "no echo"
        echoed += chunk
    return sock


def test_ss_server_past_80_percent_of_its_fds_fires_one_event_with_the_numbers(
        applied, fleet_master, event_listener, seen):
    try:
        for binary in ("ss-server", "ss-local", "supervisord"):
            ssrig.require_binary(binary)
    except ssrig.MissingBinaryError as exc:
        pytest.skip(str(exc))
    held = []
    with ssrig.loopback_rig(nofile=NOFILE, minfds=NOFILE, max_seconds=300) as rig:
        pid = rig.ss.pid()
        soft, hard = ssrig.read_nofile_limits(pid)
        assert soft == NOFILE, (soft, hard)
        start = time.time()
        try:
            deadline = time.monotonic() + 60
            while ssrig.count_open_fds(pid) * 100 <= soft * 80:
                assert len(held) < MAX_CONNECTIONS and time.monotonic() < deadline, (
                    f"ss-server holds {ssrig.count_open_fds(pid)} fds after {len(held)} connections")
                held.append(socks_connection(rig.local.port, rig.echo.port, len(held)))
            event = wait_for(event_listener, fleet_master, "fd-headroom", start, lambda d: d.get("pid") == pid)
            seen.append({"tag": event.tag, "data": event.data})
            data = event.data
            # the numbers are those of /proc, which hold still while the connections do
            opened = ssrig.count_open_fds(pid)
            assert data["process"] == "ss-server" and data["id"] == MINION
            assert data["evidence"]["open"] == opened
            assert data["evidence"]["headroom_percent"] == round((soft - opened) * 100.0 / soft, 1)
            assert data["limit"] == {"RLIMIT_NOFILE": {"soft": soft, "hard": hard}}
            assert data["severity"] in ("warning", "critical")
            assert data["pillar"] == "shadowsocks:tuning:nofile" and "state.apply shadowsocks.tuning" in data["fix"]
            assert f"uses {opened} of its {soft} open files" in data["symptom"]

            # The alert reactor of docs/watching.md: logger on the minion, the text as one argument, no shell.
            alert = wait_for_job(event_listener, fleet_master, "cmd.run", start)
            (arguments,) = [a for a in alert["fun_args"] if isinstance(a, dict) and "cmd" in a]
            assert arguments["cmd"][:6] == ["logger", "-p", "daemon.crit", "-t", "shadowsocks-tuning",
                                            f"{data['symptom']}; fix: {data['fix']}"], alert
            assert arguments["python_shell"] is False

            # The same condition on later looks: no second event.
            time.sleep(QUIET)
            again = [e for e in beacon_events(event_listener, fleet_master, "fd-headroom", start)
                     if e.data.get("pid") == pid]
            assert len(again) == 1, [e.data for e in again]
            assert ssrig.count_open_fds(pid) == opened
        finally:
            for sock in held:
                sock.close()
    assert not ssrig.pid_alive(pid)
