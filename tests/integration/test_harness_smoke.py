"""Smoke test for the fleet harness (see conftest.py): a master in the host
namespace, three minions each in its own network namespace, and salt-ssh to a
loopback sshd.  Uses the placeholder nsprobe module/state and fleet/*.sls."""
import os
import statistics
import time

import pytest

pytestmark = pytest.mark.slow

HOST_NETNS = os.readlink("/proc/self/ns/net")


def _read_host(key):
    with open("/proc/sys/" + key.replace(".", "/")) as fh:
        return fh.read().strip()


def _all_ok(state_ret):
    """state_ret: {state_id: {...}} -> list of failed ids."""
    assert isinstance(state_ret, dict) and state_ret, state_ret
    return [sid for sid, r in state_ret.items() if r.get("result") is not True]


def test_namespaces_are_isolated(fleet_net):
    inodes = {n.netns_inode for n in fleet_net.nodes}
    assert len(inodes) == len(fleet_net.nodes) >= 3
    assert HOST_NETNS not in inodes
    for node in fleet_net.nodes:
        # only the bridge subnet is reachable: no default route in the namespace
        assert node.exec("ip", "route", "show", "default").stdout.strip() == ""
        assert node.address in node.exec("ip", "-4", "addr", "show", "eth0").stdout


def test_keys_accepted(fleet_master, fleet_minions):
    ret = fleet_master.salt_key_cli().run("-L")
    assert ret.returncode == 0, ret
    assert sorted(ret.data["minions"]) == sorted(m.id for m in fleet_minions)
    assert not ret.data["minions_pre"]


def test_sync_all_ships_custom_modules(fleet_synced):
    for minion_id, synced in fleet_synced.items():
        assert "modules.nsprobe" in synced["modules"], (minion_id, synced)
        assert "states.nsprobe" in synced["states"], (minion_id, synced)


def test_each_minion_sees_its_own_namespace(fleet_salt_cli, fleet_synced, fleet_net,
                                            fleet_netns_sysctls):
    host_somaxconn = _read_host("net.core.somaxconn")
    ret = fleet_salt_cli.run("nsprobe.read", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert set(ret.data) == set(fleet_net.minion_ids)
    seen = {mid: r["netns"] for mid, r in ret.data.items()}
    assert len(set(seen.values())) == len(fleet_net.nodes), seen
    for node in fleet_net.nodes:
        assert seen[node.minion_id] == node.netns_inode
        want = fleet_netns_sysctls[node.minion_id]["net.core.somaxconn"]
        assert ret.data[node.minion_id]["somaxconn"] == int(want)
    assert _read_host("net.core.somaxconn") == host_somaxconn


def test_salt_call_runs_inside_the_namespace(fleet_minions, fleet_synced, fleet_net):
    minion = fleet_minions[0]
    ret = minion.salt_call_cli(timeout=60).run("nsprobe.read")
    assert ret.returncode == 0, ret
    assert ret.data["netns"] == fleet_net.node(minion.id).netns_inode


def test_per_minion_pillar(fleet_salt_cli, fleet_minions, fleet_pillar):
    # Salt 3008 masks pillar values on output unless unmask=True.
    masked = fleet_salt_cli.run("pillar.get", "fleet", minion_tgt="*")
    assert masked.returncode == 0, masked
    assert all(v["role"] == "**********" for v in masked.data.values()), masked.data
    ret = fleet_salt_cli.run("pillar.get", "fleet", "unmask=True", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert ret.data == {m.id: fleet_pillar[m.id]["fleet"] for m in fleet_minions}
    roles = {v["role"] for v in ret.data.values()}
    assert len(roles) == len(fleet_minions)


def test_state_apply_on_all_minions(fleet_salt_cli, fleet_synced, fleet_net, fleet_pillar):
    host_fin = _read_host("net.ipv4.tcp_fin_timeout")
    ret = fleet_salt_cli.run("state.apply", "fleet.probe", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert set(ret.data) == set(fleet_net.minion_ids)
    for node in fleet_net.nodes:
        assert _all_ok(ret.data[node.minion_id]) == [], ret.data[node.minion_id]
        want = str(fleet_pillar[node.minion_id]["fleet"]["fin_timeout"])
        assert node.read_sysctl("net.ipv4.tcp_fin_timeout") == want
    assert _read_host("net.ipv4.tcp_fin_timeout") == host_fin

    again = fleet_salt_cli.run("state.apply", "fleet.probe", minion_tgt="*")
    assert again.returncode == 0, again
    for minion_id, states in again.data.items():
        assert _all_ok(states) == [], states
        assert all(not r["changes"] for r in states.values()), (minion_id, states)


def test_salt_ssh_state_apply_with_custom_module(fleet_salt_ssh_cli):
    ret = fleet_salt_ssh_cli.run("state.apply", "fleet.ssh_probe")
    assert ret.returncode == 0, ret
    assert _all_ok(ret.data) == [], ret.data
    noted = next(r for sid, r in ret.data.items() if sid.startswith("nsprobe_|-"))
    assert f"netns={HOST_NETNS}" in noted["comment"]


def test_salt_ssh_module_pillar_and_roster_opts(fleet_salt_ssh_cli, fleet_pillar, fleet_roster):
    ret = fleet_salt_ssh_cli.run("nsprobe.read")
    assert ret.returncode == 0, ret
    assert ret.data["netns"] == HOST_NETNS
    ret = fleet_salt_ssh_cli.run("pillar.get", "fleet")  # salt-ssh: not masked
    assert ret.returncode == 0, ret
    assert ret.data == fleet_pillar[fleet_roster.target]["fleet"]
    ret = fleet_salt_ssh_cli.run("config.get", "fleet_roster_opt")  # roster minion_opts
    assert ret.returncode == 0, ret
    assert ret.data == "from-roster"


def test_salt_ssh_unreachable_target(fleet_salt_ssh_cli, fleet_roster):
    ret = fleet_salt_ssh_cli.run("test.ping", minion_tgt=fleet_roster.ghost)
    # Observed: retcode 20, stdout {"ghost": "ssh: connect to host 127.0.0.1
    # port N: Connection refused"}, empty stderr.
    assert ret.returncode == 20, ret
    assert isinstance(ret.data, str) and "Connection refused" in ret.data, ret
    assert ret.data == (
        f"ssh: connect to host 127.0.0.1 port {fleet_roster.ghost_port}: Connection refused"), ret


def test_failed_state_retcodes(fleet_salt_cli, fleet_minions, fleet_salt_ssh_cli):
    ret = fleet_salt_cli.run("state.apply", "fleet.fail", minion_tgt="*")
    assert ret.returncode == 1, ret  # stderr: "ERROR: Minions returned with non-zero exit code"
    assert set(ret.data) == {m.id for m in fleet_minions}
    for states in ret.data.values():
        assert [r["result"] for r in states.values()] == [False]
    ret = fleet_salt_ssh_cli.run("state.apply", "fleet.fail")
    assert ret.returncode == 20, ret  # same 20 as an unreachable target: look at ret.data
    assert [r["result"] for r in ret.data.values()] == [False]


@pytest.mark.skipif(os.environ.get("FLEET_TIMINGS") != "1", reason="set FLEET_TIMINGS=1")
def test_timings(fleet_salt_cli, fleet_synced, fleet_salt_ssh_cli, capsys):
    def median(fn, runs=5):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), times

    fleet_salt_ssh_cli.run("test.ping")  # thin already deployed by earlier tests; warm anyway
    results = {
        "salt '*' state.apply fleet.empty": median(
            lambda: fleet_salt_cli.run("state.apply", "fleet.empty", minion_tgt="*")),
        "salt '*' state.apply fleet.nop": median(
            lambda: fleet_salt_cli.run("state.apply", "fleet.nop", minion_tgt="*")),
        "salt-ssh box state.apply fleet.empty": median(
            lambda: fleet_salt_ssh_cli.run("state.apply", "fleet.empty")),
        "salt-ssh box state.apply fleet.nop": median(
            lambda: fleet_salt_ssh_cli.run("state.apply", "fleet.nop")),
    }
    with capsys.disabled():
        for name, (med, times) in results.items():
            print(f"\nTIMING {name}: median {med:.2f}s runs {[round(t, 2) for t in times]}")
