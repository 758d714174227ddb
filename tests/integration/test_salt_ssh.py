"""salt-ssh on a single box, no minion installed: `salt-ssh box state.apply
shadowsocks.tuning` with this repository's salt/ tree in the master config's
file_roots, pillar from the master's pillar_roots, and the custom modules
and the flat engine files of _utils/ shipped by salt-ssh itself (no
saltutil.sync_all, no package installed on the box).

The box is a network namespace: its sshd is started by `ip netns exec` (the
harness's fleet_ssh_netns), so salt-ssh's remote salt-call and every sysctl
it writes live there; the host's sysctls are never touched (and the autouse
guard of tests/conftest.py checks it). Files go to a per-box sandbox (roster
minion_opts + pillar)."""

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from support.common import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fleet_sources("repo", extra_sls={"fleet/empty.sls": ""}),
]

HOST_NETNS = os.readlink("/proc/self/ns/net")
SYSCTL_ID = "shadowsocks_tuning_|-shadowsocks-tuning-sysctl_|-shadowsocks-tuning-sysctl_|-tuned"
# The engine files in _utils/, flat modules the execution module imports by name.
ENGINES = sorted(path.stem for path in (REPO / "_utils").glob("sstuning_*.py"))
# What the box's pillar asks for (profile bbr + overrides), per-namespace keys.
BOX_WANTS = {
    "net.core.somaxconn": "8192",
    "net.ipv4.tcp_fin_timeout": "20",
    "net.ipv4.tcp_keepalive_time": "1200",
    "net.ipv4.ip_local_port_range": "10000 65001",
    "net.ipv4.tcp_fastopen": "3",
    "net.ipv4.tcp_congestion_control": "bbr",
}


@pytest.fixture(scope="module")
def fleet_size():
    return 0  # salt-ssh only: no minion daemons


@pytest.fixture(scope="module")
def fleet_ssh_netns():
    return True


@pytest.fixture(scope="module")
def fleet_netns_sysctls():
    # Start the box away from what the tuning wants, so the first run has work.
    return {"box": {"net.core.somaxconn": "1024", "net.ipv4.tcp_fin_timeout": "60"}}


@pytest.fixture(scope="module")
def box_sandbox(fleet_tuning_sandbox):
    return fleet_tuning_sandbox("box")


@pytest.fixture(scope="module")
def fleet_ssh_minion_opts(box_sandbox):
    # roster minion_opts: where the engine keeps its state and reads sysctl.d
    return box_sandbox.opts


@pytest.fixture(scope="module")
def fleet_pillar(box_sandbox):
    return {"box": box_sandbox.pillar(
        nofile=2048, profile="bbr",
        sysctls={"net.core.somaxconn": 8192, "net.ipv4.tcp_fin_timeout": 20},
    )}


@pytest.fixture(scope="module")
def box(fleet_net):
    return fleet_net.box


def _states(ret):
    assert isinstance(ret.data, dict), f"salt-ssh gave no state data (exit {ret.returncode}): {ret}"
    return ret.data


def _changes(states):
    return {sid: r["changes"] for sid, r in states.items() if r["changes"]}


def _snapshot(box):
    return {key: " ".join(box.read_sysctl(key).split()) for key in BOX_WANTS}


def test_the_box_is_its_own_network_namespace(fleet_salt_ssh_cli, box):
    ret = fleet_salt_ssh_cli.run("shadowsocks_tuning.get", "net.core.somaxconn")
    assert ret.returncode == 0, ret
    assert ret.data == box.read_sysctl("net.core.somaxconn") == "1024"
    ret = fleet_salt_ssh_cli.run("file.readlink", "/proc/self/ns/net")
    assert ret.returncode == 0, ret
    assert ret.data == box.netns_inode != HOST_NETNS


def test_state_apply_through_salt_ssh(fleet_salt_ssh_cli, box, box_sandbox, fleet_paths_outside):
    rendered = fleet_salt_ssh_cli.run("state.show_sls", "shadowsocks.tuning")
    assert rendered.returncode == 0, rendered
    assert fleet_paths_outside(_states(rendered), box_sandbox.root) == []

    before = _snapshot(box)
    predicted = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning", "test=True")
    states = _states(predicted)
    assert predicted.returncode == 0, predicted
    assert states[SYSCTL_ID]["result"] is None, states[SYSCTL_ID]
    # The states name no path: what they would write is in their predicted
    # changes, all in the sandbox, the open-file-limit files included.
    assert fleet_paths_outside(states, box_sandbox.root) == []
    predicted_paths = {key for ret in states.values() for key in ret["changes"]}
    assert {str(box_sandbox.limit_file(name)) for name in ("supervisor", "supervisord.conf", "shadowsocks-libev")} \
        <= predicted_paths, predicted_paths
    assert _snapshot(box) == before, "test=True wrote the kernel"
    assert not box_sandbox.config.exists(), "test=True wrote the file"

    real = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning")
    states = _states(real)
    assert real.returncode == 0, real
    assert all(r["result"] is True for r in states.values()), states
    assert fleet_paths_outside(states, box_sandbox.root) == []
    assert _changes(states) == _changes(_states(predicted))
    assert _snapshot(box) == BOX_WANTS
    changed = states[SYSCTL_ID]["changes"]
    assert changed["net.core.somaxconn"] == {"old": "1024", "new": "8192"}
    assert str(box_sandbox.config) in changed
    assert "net.core.somaxconn = 8192" in box_sandbox.config.read_text()
    # the open-file-limit part edited the sandbox copies only
    assert "ulimit -n 2048" in box_sandbox.limit_file("supervisor").read_text()
    assert "MAXFD=2048" in box_sandbox.limit_file("shadowsocks-libev").read_text()

    again = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning")
    assert again.returncode == 0, again
    assert _changes(_states(again)) == {}
    check = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning", "test=True")
    assert check.returncode == 0, check
    assert _changes(_states(check)) == {}
    assert all(r["result"] is True for r in _states(check).values())


def test_drift_is_reported_through_salt_ssh(fleet_salt_ssh_cli, box, box_sandbox):
    # verify takes the pillar's settings as arguments (see the next test)
    verify_args = ["shadowsocks_tuning.verify", "profile=bbr", f"config={box_sandbox.config}",
                   'sysctls={"net.core.somaxconn": 8192, "net.ipv4.tcp_fin_timeout": 20}']
    clean = fleet_salt_ssh_cli.run(*verify_args)
    if clean.returncode != 0:  # run on its own: apply first
        fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning")
        clean = fleet_salt_ssh_cli.run(*verify_args)
    assert clean.returncode == 0, clean
    assert clean.data["ok"] is True, clean.data

    box.exec("sysctl", "-q", "-w", "net.ipv4.tcp_fin_timeout=45")  # behind Salt's back
    try:
        # the state, test=True: carries the master pillar, names the drifted key
        check = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning", "test=True")
        assert check.returncode == 0, check
        states = _states(check)
        assert _changes(states) == {SYSCTL_ID: {"net.ipv4.tcp_fin_timeout": {"old": "45", "new": "20"}}}
        assert states[SYSCTL_ID]["result"] is None
        # verify, with the pillar's settings as arguments: non-zero exit, key named
        drift = fleet_salt_ssh_cli.run(*verify_args)
        assert drift.returncode != 0, drift
        assert isinstance(drift.data, dict), drift  # a report, not a connection error
        assert drift.data["problems"] == ["net.ipv4.tcp_fin_timeout"], drift.data
        assert drift.data["keys"]["net.ipv4.tcp_fin_timeout"]["live"] == "45"
    finally:
        fixed = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning")
    assert _changes(_states(fixed)) == {
        SYSCTL_ID: {"net.ipv4.tcp_fin_timeout": {"old": "45", "new": "20"}}}
    assert box.read_sysctl("net.ipv4.tcp_fin_timeout") == "20"


def test_the_engines_are_shipped_as_flat_utils_files(fleet_salt_ssh_cli, fleet_workdir):
    """salt-ssh copies _utils/*.py to the box with the modules (there is no
    saltutil.sync_all), and the execution module works from those copies:
    the box has no installed package to fall back on."""
    loaded = fleet_salt_ssh_cli.run("shadowsocks_tuning.settings")
    assert loaded.returncode == 0, loaded  # the module loaded: its engines were importable
    # The default (plain calls get no pillar, see below): the recipe's 51200,
    # or the most this box can grant, said in the notes.
    nofile = loaded.data["nofile"]
    assert nofile == 51200 or (nofile < 51200 and any(
        note.startswith(f"nofile {nofile}: the most this box can grant") for note in loaded.data["notes"])), loaded.data

    extmods = fleet_salt_ssh_cli.run("config.get", "extension_modules")
    assert extmods.returncode == 0, extmods
    utils = Path(extmods.data) / "utils"
    thin = fleet_workdir / "thin_box"
    assert utils.is_relative_to(thin), (utils, thin)  # the box's copy, not this checkout
    assert sorted(p.stem for p in utils.glob("sstuning_*.py")) == ENGINES
    for name in ENGINES:
        assert (utils / f"{name}.py").read_bytes() == (REPO / "_utils" / f"{name}.py").read_bytes(), name

    # Nothing else could have served them: no pip-installed copy in the thin
    # or in the Python that runs it on the box.
    assert not list(thin.rglob("saltext_shadowsocks_tuning*")), "the thin carries the pip package"
    python = fleet_salt_ssh_cli.run("grains.get", "pythonexecutable")
    assert python.returncode == 0 and python.data, python
    # (from /, so that this checkout's own directory is not on its path)
    probe = subprocess.run([python.data, "-c", "import saltext_shadowsocks_tuning"], capture_output=True, text=True,
                           cwd="/")
    assert probe.returncode != 0 and "No module named" in probe.stderr, probe


def test_plain_module_calls_do_not_get_the_master_pillar(fleet_salt_ssh_cli):
    """A Salt limitation (saltstack/salt#61637, #28503 "won't fix"): salt-ssh
    hands the master's pillar to states and wrapper functions, but a custom
    execution module called directly (`salt-ssh box shadowsocks_tuning.X`)
    runs with an empty pillar: it falls back to the default profile. Hence
    the README's salt-ssh recipe: `state.apply ... test=True` to check, or
    pass the settings as arguments."""
    assert fleet_salt_ssh_cli.run("pillar.get", "shadowsocks:tuning:profile").data == "bbr"
    shown = fleet_salt_ssh_cli.run("shadowsocks_tuning.profile")
    assert shown.returncode == 0, shown
    assert shown.data["profile"] == "low-latency", shown.data  # the default, not the pillar's bbr
    assert shown.data["config"] == "/etc/sysctl.d/local.conf"
    assert fleet_salt_ssh_cli.run("shadowsocks_tuning.profile", "bbr").data["profile"] == "bbr"


def test_unreachable_target_is_a_connection_error(fleet_salt_ssh_cli, fleet_roster):
    ret = fleet_salt_ssh_cli.run("state.apply", "shadowsocks.tuning", minion_tgt=fleet_roster.ghost)
    # salt-ssh exits 20 for this as for a failed state: the data tells them apart
    assert ret.returncode == 20, ret
    assert isinstance(ret.data, str), ret  # a string: could not connect, no state ran
    assert ret.data == f"ssh: connect to host 127.0.0.1 port {fleet_roster.ghost_port}: Connection refused"

    both = fleet_salt_ssh_cli.run("-L", "state.apply", "shadowsocks.tuning",
                                  minion_tgt=f"{fleet_roster.target},{fleet_roster.ghost}")
    assert both.returncode == 20, both
    assert isinstance(both.data[fleet_roster.ghost], str) and "Connection refused" in both.data[fleet_roster.ghost]
    box_states = both.data[fleet_roster.target]
    assert isinstance(box_states, dict) and SYSCTL_ID in box_states, both
    assert all(r["result"] is True for r in box_states.values()), box_states


# --------------------------------------------------------------------------
# Cost (bench/fleet_cost runs this; skipped unless FLEET_COST=1)
# --------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("FLEET_COST") != "1", reason="set FLEET_COST=1 (bench/fleet_cost)")
def test_salt_ssh_cost(fleet_salt_ssh_cli):
    """Wall time of `salt-ssh box state.apply shadowsocks.tuning` (a first
    apply after `shadowsocks_tuning.clean`, and a re-run) next to `salt-ssh box
    state.apply fleet.empty`, and a re-run of shadowsocks.tuning.sysctl alone:
    medians over FLEET_COST_RUNS. The thin and the
    ssh connection (ControlMaster) are warm: a warm-up run comes first."""
    runs = int(os.environ.get("FLEET_COST_RUNS", "5"))
    records = []

    def timed(kind, *args):
        start = time.perf_counter()
        ret = fleet_salt_ssh_cli.run(*args)
        wall = time.perf_counter() - start
        assert isinstance(ret.data, dict), ret  # a string would be a connection error
        records.append({"kind": kind, "wall_s": wall, "returncode": ret.returncode})
        return ret

    fleet_salt_ssh_cli.run("state.apply", "fleet.empty")  # warm-up: thin deployed, connection up
    for _ in range(runs):
        assert fleet_salt_ssh_cli.run("shadowsocks_tuning.clean").returncode == 0
        first = timed("first", "state.apply", "shadowsocks.tuning")
        assert first.returncode == 0 and _changes(first.data), first
        rerun = timed("rerun", "state.apply", "shadowsocks.tuning")
        assert rerun.returncode == 0 and not _changes(rerun.data), rerun
        timed("sysctl_only", "state.apply", "shadowsocks.tuning.sysctl")  # re-run, without nofile.sls
        timed("empty", "state.apply", "fleet.empty")
    medians = {kind: statistics.median(r["wall_s"] for r in records if r["kind"] == kind)
               for kind in ("first", "rerun", "sysctl_only", "empty")}
    out = os.environ.get("FLEET_COST_JSON")
    if out:
        data = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        data["salt-ssh box"] = {"medians": medians, "records": records}
        Path(out).write_text(json.dumps(data, indent=1))
    print("\nCOST salt-ssh box: " + ", ".join(f"{k} {v:.2f}s" for k, v in medians.items()))
