"""`shadowsocks_tuning.container` through real salt-call, and its output
applied the way a container runtime applies it: each printed pair written
to /proc/sys inside a fresh network namespace (what runc does for
`--sysctl`). Every write must succeed there (a global key would fail, as
it fails a container's start), and `verify` then finds the tuning in place."""

import json
import subprocess
import sys

import pytest
import yaml

from sstuning_catalogue import CATALOGUE
from support.common import live_values

PROFILES = ("low-latency", "bbr", "low-memory", "high-latency")

WRITE = (
    "import json, sys\n"
    "for key, value in json.loads(sys.argv[1]).items():\n"
    "    with open('/proc/sys/' + key.replace('.', '/'), 'w') as handle:\n"
    "        handle.write(value)\n"
)


def ok(result):
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.data


def write_as_runtime(netns, pairs):
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", WRITE, json.dumps(pairs)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"a printed key could not be set in the namespace:\n{proc.stderr}"


@pytest.fixture
def minion(make_masterless, tmp_path):
    """A minion whose shadowsocks-libev config (server 8388, local 1080) is the test's own."""
    config_dir = tmp_path / "shadowsocks-libev"
    config_dir.mkdir()
    (config_dir / "config.json").write_text(json.dumps({"server_port": 8388, "local_port": 1080}))
    return make_masterless(**{"shadowsocks_tuning.ss_config_dir": str(config_dir)})


@pytest.mark.parametrize("profile", PROFILES)
def test_printed_keys_set_in_a_fresh_namespace_pass_verify(minion, profile):
    before = live_values(minion.netns, list(CATALOGUE))
    out = ok(minion.run("shadowsocks_tuning.container", f"profile={profile}"))
    assert live_values(minion.netns, list(CATALOGUE)) == before, "container wrote to the kernel"
    printed = out["sysctls"]
    assert printed and not set(printed) & set(out["host_only"])
    assert all(CATALOGUE[key]["scope"] == "netns" for key in printed)
    assert printed["net.ipv4.ip_local_reserved_ports"] == "1080,8388"
    if profile == "high-latency":  # hybla cannot be loaded here, so no runtime could set it
        assert "'hybla' is not available" in out["left_out"]["net.ipv4.tcp_congestion_control"]
    drifted = minion.run("shadowsocks_tuning.verify", f"profile={profile}")
    assert drifted.returncode != 0 and not drifted.data["ok"]

    write_as_runtime(minion.netns, printed)
    assert live_values(minion.netns, list(printed)) == printed
    report = minion.run("shadowsocks_tuning.verify", f"profile={profile}").data
    for key, value in printed.items():
        entry = report["keys"][key]
        assert entry["live"] == entry["wanted"] == value, (key, entry)
        # all that is left is the managed file of a host, which a container does not have
        assert entry["status"] == "ok" or entry["reason"] == f"{minion.config} has None, expected {value}", entry
    for key in out["host_only"]:
        assert report["keys"][key]["status"] in ("read-only", "ok"), (key, report["keys"][key])

    # With the printed lines as the persisted file too, verify passes outright.
    minion.config.write_text("".join(f"{key} = {value}\n" for key, value in printed.items()))
    verified = minion.run("shadowsocks_tuning.verify", f"profile={profile}")
    assert verified.returncode == 0 and verified.data["ok"], verified.data["problems"]


def test_compose_and_kubernetes_snippets_parse(minion):
    minion.pillar({"config": str(minion.config), "nofile": 16384})
    compose = ok(minion.run("shadowsocks_tuning.container", "format=compose", "profile=bbr"))
    assert yaml.safe_load(compose["text"]) == {"services": {"shadowsocks": {
        "sysctls": compose["sysctls"], "ulimits": {"nofile": {"soft": 16384, "hard": 524288}}}}}  # never below the runtime default hard limit
    kube = ok(minion.run("shadowsocks_tuning.container", "format=kubernetes", "profile=bbr"))
    assert kube["sysctls"] == compose["sysctls"]
    assert yaml.safe_load(kube["text"]) == {"securityContext": {"sysctls": [
        {"name": key, "value": value} for key, value in kube["sysctls"].items()]}}
    assert "net.core.somaxconn" in kube["unsafe_in_kubernetes"]
    assert "net.ipv4.ip_local_port_range" not in kube["unsafe_in_kubernetes"]
    docker = ok(minion.run("shadowsocks_tuning.container", "format=docker", "profile=bbr"))
    assert "--ulimit nofile=16384:524288" in docker["text"]


def test_bad_arguments_are_named(minion):
    result = minion.run("shadowsocks_tuning.container", "format=podman")
    assert result.returncode != 0
    assert "format: 'podman' must be one of compose, docker, kubernetes" in result.stdout + result.stderr
    result = minion.run("shadowsocks_tuning.container", "profile=nope")
    assert result.returncode != 0 and "argument profile: unknown profile 'nope'" in result.stdout + result.stderr
