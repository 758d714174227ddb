"""Every built-in profile on today's kernel, for real, in a fresh network
namespace: no per-namespace value gets worse than the kernel had it unless
the profile says why, an admin's congestion control is kept, kept values are
not persisted, and the ports shadowsocks listens on are reserved."""

import json
import shutil
import subprocess
import time

import pytest

from sstuning_catalogue import CATALOGUE, PROFILES, UP, parse_ports
from support.common import in_netns, read_in_netns

SYSCTL_ID = "shadowsocks_tuning_|-shadowsocks-tuning-sysctl_|-shadowsocks-tuning-sysctl_|-tuned"
DIRECTED = sorted(key for key, spec in CATALOGUE.items() if spec.get("more"))


def live_values(netns):
    values = {}
    for key in DIRECTED:
        done = in_netns(netns, "cat", "/proc/sys/" + key.replace(".", "/"))
        values[key] = done.stdout.split() if done.returncode == 0 else None
    return values


def apply_sysctls(minion, *args):
    result = minion.run("state.apply", "shadowsocks.tuning.sysctl", *args)
    assert isinstance(result.data, dict), result.stdout + result.stderr
    return result.data[SYSCTL_ID]


def allowed_congestion(netns):
    return read_in_netns(netns, "net.ipv4.tcp_allowed_congestion_control")


@pytest.fixture
def minion(make_masterless, tmp_path):
    # An empty shadowsocks config dir: only what a test puts there counts.
    configs = tmp_path / "ss-configs"
    configs.mkdir()
    made = make_masterless(**{"shadowsocks_tuning.ss_config_dir": str(configs)})
    made.ss_configs = configs
    return made


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_no_value_gets_worse_than_the_kernel_unless_the_profile_says_why(minion, profile):
    # hybla cannot be loaded here: the fallback keeps high-latency applicable.
    minion.pillar({"config": str(minion.config), "profile": profile, "congestion_fallback": "bbr"})
    settings = minion.run("shadowsocks_tuning.settings").data
    lowered_on_purpose = set(settings["lower"])
    before = live_values(minion.netns)
    ret = apply_sysctls(minion)
    assert ret["result"] is True, ret["comment"]
    after = live_values(minion.netns)
    for key in DIRECTED:
        if before[key] is None or CATALOGUE[key]["scope"] != "netns":
            continue
        directions = CATALOGUE[key]["more"]
        for index, (old, new, more) in enumerate(zip(before[key], after[key], directions)):
            worse = int(new) < int(old) if more == UP else int(new) > int(old)
            ceiling = index == len(directions) - 1
            if worse:
                assert key in lowered_on_purpose and ceiling, f"{profile}: {key} field {index} went {old} -> {new}"
                assert f"{key}: " in ret["comment"] and "lowered on purpose" in ret["comment"]
    for key in lowered_on_purpose:
        assert PROFILES.get(profile, {}).get("lower", {}).get(key) or profile != "low-memory"


def test_an_admins_congestion_control_is_kept_under_low_latency(minion):
    allowed = allowed_congestion(minion.netns)
    chosen = next((cc for cc in allowed if cc != "cubic"), None)
    if chosen is None:
        pytest.skip(f"this namespace allows only {allowed}: no congestion control other than the kernel default")
    assert in_netns(minion.netns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={chosen}").returncode == 0
    minion.pillar({"config": str(minion.config), "profile": "low-latency"})
    ret = apply_sysctls(minion)
    assert ret["result"] is True, ret["comment"]
    assert minion.read("net.ipv4.tcp_congestion_control") == chosen
    assert f"net.ipv4.tcp_congestion_control: kept {chosen}" in ret["comment"]
    assert "tcp_congestion_control" not in minion.config.read_text()
    # A congestion control named in pillar is the admin's own word: it replaces.
    minion.pillar({"config": str(minion.config), "profile": "low-latency",
                   "sysctls": {"net.ipv4.tcp_congestion_control": "reno"}})
    ret = apply_sysctls(minion)
    assert ret["result"] is True, ret["comment"]
    assert minion.read("net.ipv4.tcp_congestion_control") == "reno"
    # verify agrees with what apply did
    assert minion.run("shadowsocks_tuning.verify").returncode == 0


def test_kept_values_are_not_persisted(minion):
    file_max = int(read_in_netns(minion.netns, "fs.file-max")[0])
    tw_buckets = int(read_in_netns(minion.netns, "net.ipv4.tcp_max_tw_buckets")[0])
    if file_max <= 51200 and tw_buckets <= 5000:
        pytest.skip("this kernel's own values are below the recipe's: nothing is kept")
    minion.pillar({"config": str(minion.config), "profile": "bbr"})
    ret = apply_sysctls(minion)
    assert ret["result"] is True, ret["comment"]
    text = minion.config.read_text()
    if file_max > 51200:
        assert "fs.file-max" not in text
        assert f"fs.file-max: kept {file_max}" in ret["comment"]
    if tw_buckets > 5000:
        assert "tcp_max_tw_buckets" not in text
        assert minion.read("net.ipv4.tcp_max_tw_buckets") == str(tw_buckets)
    assert minion.run("shadowsocks_tuning.verify").returncode == 0


def test_the_port_range_has_ends_of_different_parity(minion):
    minion.pillar({"config": str(minion.config)})
    assert apply_sysctls(minion)["result"] is True
    low, high = (int(x) for x in minion.read("net.ipv4.ip_local_port_range").split())
    assert low % 2 != high % 2


def _free_port_in(netns, low, high):
    for port in range(low + 1234, high, 97):
        probe = in_netns(netns, "python3", "-c",
                         f"import socket; s=socket.socket(); s.bind(('127.0.0.1', {port}))")
        if probe.returncode == 0:
            return port
    raise AssertionError("no free port in the range")


def test_a_listening_ss_server_port_is_reserved(minion, tmp_path):
    server = shutil.which("ss-server")
    if server is None:
        pytest.skip("ss-server (shadowsocks-libev) is not installed")
    in_netns(minion.netns, "ip", "link", "set", "lo", "up", check=True)
    port = _free_port_in(minion.netns, 10000, 65001)
    configured = _free_port_in(minion.netns, 20000, 30001)
    (minion.ss_configs / "server.json").write_text(json.dumps({"server_port": configured, "password": "x"}))
    proc = subprocess.Popen(
        ["ip", "netns", "exec", minion.netns, server, "-s", "127.0.0.1", "-p", str(port), "-k", "test-password",
         "-m", "chacha20-ietf-poly1305"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            listening = in_netns(minion.netns, "ss", "-Htln", f"sport = :{port}").stdout
            if str(port) in listening:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"ss-server never listened on {port}")
        before = parse_ports(" ".join(read_in_netns(minion.netns, "net.ipv4.ip_local_reserved_ports")) or "")
        minion.pillar({"config": str(minion.config), "reserved_ports": [65000]})
        # Before the apply, explain names the process the port comes from (after
        # it, the port is in the kernel's list and needs no owner looked up).
        assert f"{port} (ss-server" in json.dumps(minion.run("shadowsocks_tuning.explain").data["keys"])
        ret = apply_sysctls(minion)
        assert ret["result"] is True, ret["comment"]
        reserved = parse_ports(minion.read("net.ipv4.ip_local_reserved_ports"))
        assert {port, configured, 65000} | before <= reserved
        assert "net.ipv4.ip_local_reserved_ports" in minion.config.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
