"""A real master and three real minions with the real package.

The master serves this repository's salt/ tree (SLS plus the _modules,
_states and _utils links) as file_roots; a pillar top.sls gives each minion its
own profile and overrides; `saltutil.sync_all` brings the custom modules and
the engine files to the minions. Each minion runs inside its own network
namespace, so each really holds its own per-namespace sysctls; the tests read
them from inside each namespace.

Minions share the host's filesystem: every path the package writes (the
sysctl.d file, the engine's state dir, the supervisor / shadowsocks-libev
files of the open-file-limit part) points into a per-minion sandbox, through
minion options and pillar (see TuningSandbox in support/fleet.py). No service
is stopped or started, no host sysctl or file under /etc changes.
"""

import json
import os
import re
import statistics
import time
from pathlib import Path

import pytest
import yaml

from support.common import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fleet_sources("repo", extra_sls={"fleet/empty.sls": ""}),
]

SYSCTL_ID = "shadowsocks_tuning_|-shadowsocks-tuning-sysctl_|-shadowsocks-tuning-sysctl_|-tuned"
# The engine files in _utils/, flat modules the execution module imports by name.
ENGINES = sorted(path.stem for path in (REPO / "_utils").glob("sstuning_*.py"))
MINIONS = ("ss-bbr", "ss-lowmem", "ss-edge")
# Per-minion pillar shadowsocks:tuning (the sandbox adds config and limits).
TUNING = {
    "ss-bbr": {"nofile": 4096, "profile": "bbr"},
    "ss-lowmem": {
        "nofile": 2048,
        "profile": "low-memory",
        "sysctls": {"net.core.somaxconn": 8192},
    },
    "ss-edge": {
        "nofile": 3072,
        "profile": "edge",
        "profiles": {"edge": {"description": "bbr with a deeper accept queue", "include": "bbr",
                              "sysctls": {"net.core.somaxconn": 16384, "net.ipv4.tcp_fin_timeout": 15}}},
        "sysctls": {"net.ipv4.tcp_keepalive_time": 600},
    },
}
# What each namespace must hold afterwards (per-namespace keys that tell them apart).
EXPECT = {
    "ss-bbr": {
        "net.core.somaxconn": "4096", "net.ipv4.tcp_congestion_control": "bbr",
        "net.ipv4.tcp_fin_timeout": "30", "net.ipv4.tcp_keepalive_time": "1200",
        "net.ipv4.tcp_wmem": "4096 65536 67108864",
    },
    # low-memory only asks for the kernel's default congestion control: the
    # one the namespace inherited stays (checked with the unchanged keys).
    "ss-lowmem": {
        "net.core.somaxconn": "8192",
        "net.ipv4.tcp_fin_timeout": "30", "net.ipv4.tcp_keepalive_time": "1200",
        "net.ipv4.tcp_wmem": "4096 16384 8388608",
    },
    "ss-edge": {
        "net.core.somaxconn": "16384", "net.ipv4.tcp_congestion_control": "bbr",
        "net.ipv4.tcp_fin_timeout": "15", "net.ipv4.tcp_keepalive_time": "600",
        "net.ipv4.tcp_wmem": "4096 65536 67108864",
    },
}
# Per-network-namespace keys of the catalogue (tcp_tw_recycle is gone since 4.12).
NETNS_KEYS = (
    "net.core.somaxconn", "net.ipv4.tcp_syncookies", "net.ipv4.tcp_tw_reuse", "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.ip_local_port_range", "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_max_tw_buckets", "net.ipv4.tcp_fastopen", "net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_mtu_probing", "net.ipv4.tcp_congestion_control",
)


@pytest.fixture(scope="module")
def fleet_minion_ids():
    return list(MINIONS)


@pytest.fixture(scope="module")
def fleet_minion_overrides(fleet_tuning_sandbox):
    return {mid: fleet_tuning_sandbox(mid).opts for mid in MINIONS}


@pytest.fixture(scope="module")
def fleet_pillar(fleet_tuning_sandbox):
    return {mid: fleet_tuning_sandbox(mid).pillar(**TUNING[mid]) for mid in MINIONS}


@pytest.fixture(scope="module")
def synced(fleet_minions, fleet_salt_cli, request):
    """What the minions had before `salt '*' saltutil.sync_all` (their
    shadowsocks_tuning functions, and what `state.apply shadowsocks.tuning`
    said on one of them), and the sync's return."""
    before = fleet_salt_cli.run("sys.list_functions", "shadowsocks_tuning", minion_tgt="*")
    assert before.returncode == 0, before
    unsynced = fleet_salt_cli.run("state.apply", "shadowsocks.tuning", "test=True", minion_tgt="ss-bbr")
    return before.data, unsynced, request.getfixturevalue("fleet_synced")


def snapshot(node):
    return {key: " ".join(node.read_sysctl(key).split()) for key in NETNS_KEYS}


def minion_states(ret, expected_ids=MINIONS):
    assert isinstance(ret.data, dict), ret
    assert set(ret.data) == set(expected_ids), ret
    for mid, states in ret.data.items():
        assert isinstance(states, dict) and states, (mid, states)
    return ret.data


def changes_of(states):
    return {sid: r["changes"] for sid, r in states.items() if r["changes"]}


def apply(cli, *args):
    return cli.run("state.apply", "shadowsocks.tuning", *args, minion_tgt="*")


def test_custom_modules_reach_the_minions_through_sync_all(synced):
    before, unsynced, after = synced
    assert before == {mid: [] for mid in MINIONS}, "the minions had the module before any sync"
    # `state.apply <sls>` does not sync by itself (only a highstate does): forgetting
    # sync_all fails, naming the missing state
    assert unsynced.returncode != 0, unsynced
    states = unsynced.data.get("ss-bbr", unsynced.data) if isinstance(unsynced.data, dict) else {}
    comments = [ret.get("comment", "") for ret in states.values() if isinstance(ret, dict)]
    assert any("State 'shadowsocks_tuning.tuned' was not found" in c for c in comments), unsynced.stdout[-2000:]
    assert ENGINES
    for mid, ret in after.items():
        assert "modules.shadowsocks_tuning" in ret["modules"], (mid, ret)
        assert "states.shadowsocks_tuning" in ret["states"], (mid, ret)
        assert {f"utils.{name}" for name in ENGINES} <= set(ret["utils"]), (mid, ret)


def test_each_minion_gets_its_own_pillar(fleet_salt_cli, synced):
    ret = fleet_salt_cli.run("pillar.get", "shadowsocks:tuning:profile", "unmask=True", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert ret.data == {mid: TUNING[mid]["profile"] for mid in MINIONS}
    shown = fleet_salt_cli.run("shadowsocks_tuning.profile", minion_tgt="*")
    assert shown.returncode == 0, shown
    assert shown.data["ss-edge"]["include_chain"] == ["edge", "bbr", "low-latency", "high-latency"]
    assert shown.data["ss-lowmem"]["sources"]["net.core.somaxconn"] == "pillar shadowsocks:tuning:sysctls"


def test_the_sls_touches_nothing_outside_each_minions_sandbox(
        fleet_salt_cli, synced, fleet_tuning_sandbox, fleet_paths_outside, fleet_settings_outside):
    ret = fleet_salt_cli.run("state.show_sls", "shadowsocks.tuning", minion_tgt="*")
    assert ret.returncode == 0, ret
    # The states name no path: each resolves pillar and minion options itself.
    # What they act on is in the resolved settings and the open-file check.
    settings = fleet_salt_cli.run("shadowsocks_tuning.settings", minion_tgt="*")
    assert settings.returncode == 0, settings
    checked = fleet_salt_cli.run("shadowsocks_tuning.nofile_check", minion_tgt="*")
    assert checked.returncode == 0, checked
    options = fleet_salt_cli.run("config.items", minion_tgt="*")
    assert options.returncode == 0, options
    for mid in MINIONS:
        sandbox = fleet_tuning_sandbox(mid)
        rendered = ret.data[mid]
        assert isinstance(rendered, dict), (mid, rendered)
        assert fleet_paths_outside(rendered, sandbox.root) == [], mid
        functions = sorted(f for body in rendered.values() for f in body["shadowsocks_tuning"]
                           if isinstance(f, str))
        # the open-file-limit half is there (one state for all its parts), then the /proc check
        assert functions == ["limits_applied", "nofile_reached", "tuned"], (mid, functions)
        # every file written, every pidfile followed: in the sandbox; no service restarted
        assert fleet_settings_outside(settings.data[mid], sandbox.root) == [], (mid, settings.data[mid])
        assert settings.data[mid]["nofile"] == TUNING[mid]["nofile"]
        report = checked.data[mid]
        assert report["ok"] is True and report["errors"] == [], (mid, report)
        assert report["manage"] == [str(sandbox.limit_file(name))
                                    for name in ("supervisor", "supervisord.conf", "shadowsocks-libev")], mid
        assert report["skipped"] == [], (mid, report)
        # where the engine keeps its originals and lock, and the modules-load.d file
        for option in ("state_dir", "modules_load_dir"):
            path = options.data[mid][f"shadowsocks_tuning.{option}"]
            assert path.startswith(str(sandbox.root) + "/"), (mid, option, path)


def test_test_mode_predicts_the_real_run_which_is_idempotent_and_verified(
        fleet_salt_cli, synced, fleet_net, fleet_tuning_sandbox, fleet_paths_outside):
    nodes = {mid: fleet_net.node(mid) for mid in MINIONS}
    before = {mid: snapshot(node) for mid, node in nodes.items()}

    predicted = apply(fleet_salt_cli, "test=True")
    assert predicted.returncode == 0, predicted
    predicted_states = minion_states(predicted)
    for mid in MINIONS:
        assert predicted_states[mid][SYSCTL_ID]["result"] is None, predicted_states[mid][SYSCTL_ID]
        assert snapshot(nodes[mid]) == before[mid], f"{mid}: test=True wrote the kernel"
        assert not fleet_tuning_sandbox(mid).config.exists(), f"{mid}: test=True wrote the file"

    real = apply(fleet_salt_cli)
    assert real.returncode == 0, real
    real_states = minion_states(real)
    after = {mid: snapshot(node) for mid, node in nodes.items()}
    for mid in MINIONS:
        states = real_states[mid]
        assert all(r["result"] is True for r in states.values()), (mid, states)
        assert fleet_paths_outside(states, fleet_tuning_sandbox(mid).root) == [], mid
        # exactly the changes test=True announced, state by state
        assert changes_of(states) == changes_of(predicted_states[mid]), mid
        sysctl_changes = states[SYSCTL_ID]["changes"]
        assert any(not key.startswith("/") for key in sysctl_changes), (mid, sysctl_changes)
        for key in NETNS_KEYS:
            if key in sysctl_changes:
                assert sysctl_changes[key]["old"] == before[mid][key], (mid, key)
                assert after[mid][key] == sysctl_changes[key]["new"], (mid, key)
            else:
                assert after[mid][key] == before[mid][key], (mid, key)
        for key, value in EXPECT[mid].items():
            assert after[mid][key] == value, (mid, key, after[mid][key])
        sandbox = fleet_tuning_sandbox(mid)
        assert str(sandbox.config) in sysctl_changes
        assert f"net.core.somaxconn = {EXPECT[mid]['net.core.somaxconn']}" in sandbox.config.read_text()
        nofile = TUNING[mid]["nofile"]
        assert f"ulimit -n {nofile}" in sandbox.limit_file("supervisor").read_text()
        assert f"minfds={nofile}" in sandbox.limit_file("supervisord.conf").read_text()
        assert f"MAXFD={nofile}" in sandbox.limit_file("shadowsocks-libev").read_text()
    # three namespaces, three different sets of sysctls, at the same time
    assert len({json.dumps(snap, sort_keys=True) for snap in after.values()}) == 3

    again = apply(fleet_salt_cli)
    assert again.returncode == 0, again
    for mid, states in minion_states(again).items():
        assert all(r["result"] is True for r in states.values()), (mid, states)
        assert changes_of(states) == {}, (mid, changes_of(states))
    assert {mid: snapshot(node) for mid, node in nodes.items()} == after

    verify = fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*")
    assert verify.returncode == 0, verify
    assert {mid: (r["ok"], r["problems"]) for mid, r in verify.data.items()} == {
        mid: (True, []) for mid in MINIONS}


def test_verify_reports_drift_made_behind_salts_back(fleet_salt_cli, synced, fleet_net):
    verify = fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*")
    if verify.returncode != 0:  # run on its own: apply first
        assert apply(fleet_salt_cli).returncode == 0
        verify = fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*")
    assert verify.returncode == 0, verify

    node = fleet_net.node("ss-lowmem")
    node.exec("sysctl", "-q", "-w", "net.ipv4.tcp_fin_timeout=45")
    others = [fleet_net.node(mid) for mid in ("ss-bbr", "ss-edge")]
    assert [n.read_sysctl("net.ipv4.tcp_fin_timeout") for n in others] == ["30", "15"]

    drift = fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*")
    assert drift.returncode != 0, drift
    assert set(drift.data) == set(MINIONS), drift
    assert drift.data["ss-lowmem"]["problems"] == ["net.ipv4.tcp_fin_timeout"], drift.data["ss-lowmem"]
    entry = drift.data["ss-lowmem"]["keys"]["net.ipv4.tcp_fin_timeout"]
    assert (entry["status"], entry["live"], entry["wanted"]) == ("drift", "45", "30")
    assert drift.data["ss-bbr"]["ok"] is True and drift.data["ss-edge"]["ok"] is True

    fixed = apply(fleet_salt_cli)
    assert fixed.returncode == 0, fixed
    assert {mid: changes_of(states) for mid, states in minion_states(fixed).items()} == {
        "ss-bbr": {}, "ss-edge": {},
        "ss-lowmem": {SYSCTL_ID: {"net.ipv4.tcp_fin_timeout": {"old": "45", "new": "30"}}},
    }
    assert fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*").returncode == 0


@pytest.fixture
def edge_pillar_names_an_unknown_profile(fleet_pillar_roots, fleet_pillar, fleet_salt_cli):
    """ss-edge's pillar file on the master names profile 'turbo'; put back after."""
    path = Path(fleet_pillar_roots) / ("fleet_node_" + re.sub(r"[^A-Za-z0-9_]", "_", "ss-edge") + ".sls")
    original = path.read_text()
    assert yaml.safe_load(original) == fleet_pillar["ss-edge"]
    bad = yaml.safe_load(original)
    bad["shadowsocks"]["tuning"]["profile"] = "turbo"
    path.write_text(yaml.safe_dump(bad))
    try:
        yield
    finally:
        path.write_text(original)
        fleet_salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt="ss-edge")


def test_an_unknown_profile_fails_that_minion_alone(fleet_salt_cli, synced, fleet_net, fleet_tuning_sandbox,
                                                    edge_pillar_names_an_unknown_profile):
    # Give the other two something to do: a value changed behind Salt's back.
    for mid in ("ss-bbr", "ss-lowmem"):
        fleet_net.node(mid).exec("sysctl", "-q", "-w", "net.ipv4.tcp_keepalive_time=7200")
    edge = fleet_net.node("ss-edge")
    edge.exec("sysctl", "-q", "-w", "net.ipv4.tcp_keepalive_time=7200")
    edge_before = snapshot(edge)
    # ...and ss-edge an open-file limit to put back, in both halves.
    supervisor = fleet_tuning_sandbox("ss-edge").limit_file("supervisor")
    supervisor.write_text(fleet_tuning_sandbox("ss-edge").LIMIT_FILES["supervisor"])
    edge_file = supervisor.read_bytes()

    ret = apply(fleet_salt_cli)
    assert ret.returncode != 0, ret  # one minion failed
    states = minion_states(ret)

    # The whole pillar is checked first: every state of ss-edge fails with the
    # same message, naming the pillar path, and nothing is written anywhere.
    message = (
        "pillar shadowsocks:tuning:profile: unknown profile 'turbo' "
        "(known: bbr, edge, high-latency, low-latency, low-memory)\n"
        "Nothing was changed: fix the pillar (or arguments) above"
    )
    assert states["ss-edge"][SYSCTL_ID]["result"] is False
    for sid, failed in states["ss-edge"].items():
        assert failed["result"] is False and failed["changes"] == {}, (sid, failed)
        assert failed["comment"] == message, (sid, failed["comment"])
    assert len(states["ss-edge"]) == 3, list(states["ss-edge"])
    assert snapshot(edge) == edge_before, "the failing minion changed its kernel"
    assert supervisor.read_bytes() == edge_file, "the failing minion changed an open-file limit"

    for mid in ("ss-bbr", "ss-lowmem"):
        assert all(r["result"] is True for r in states[mid].values()), (mid, states[mid])
        assert changes_of(states[mid]) == {
            SYSCTL_ID: {"net.ipv4.tcp_keepalive_time": {"old": "7200", "new": "1200"}}}, mid
        assert fleet_net.node(mid).read_sysctl("net.ipv4.tcp_keepalive_time") == "1200"


def test_edge_recovers_once_its_pillar_is_fixed(fleet_salt_cli, synced, fleet_net, fleet_tuning_sandbox):
    ret = apply(fleet_salt_cli)
    assert ret.returncode == 0, ret
    assert fleet_net.node("ss-edge").read_sysctl("net.ipv4.tcp_keepalive_time") == "600"
    supervisor = fleet_tuning_sandbox("ss-edge").limit_file("supervisor")
    assert f"ulimit -n {TUNING['ss-edge']['nofile']}" in supervisor.read_text()
    assert fleet_salt_cli.run("shadowsocks_tuning.verify", minion_tgt="*").returncode == 0


# --------------------------------------------------------------------------
# Cost (bench/fleet_cost runs this; skipped unless FLEET_COST=1)
# --------------------------------------------------------------------------
@pytest.mark.skipif(os.environ.get("FLEET_COST") != "1", reason="set FLEET_COST=1 (bench/fleet_cost)")
def test_fleet_cost(fleet_salt_cli, synced, fleet_net):
    """Wall time of `salt '*' state.apply shadowsocks.tuning` (a first apply
    after `shadowsocks_tuning.clean`, and a re-run) next to `salt '*'
    state.apply fleet.empty` (an empty SLS), and a re-run of the sysctl part
    alone (shadowsocks.tuning.sysctl): medians over FLEET_COST_RUNS."""
    runs = int(os.environ.get("FLEET_COST_RUNS", "5"))
    records = []

    def timed(kind, *args):
        start = time.perf_counter()
        ret = fleet_salt_cli.run(*args, minion_tgt="*")
        wall = time.perf_counter() - start
        assert isinstance(ret.data, dict) and set(ret.data) == set(MINIONS), ret
        records.append({"kind": kind, "wall_s": wall, "returncode": ret.returncode})
        return ret

    for _ in range(runs):
        assert fleet_salt_cli.run("shadowsocks_tuning.clean", minion_tgt="*").returncode == 0
        first = timed("first", "state.apply", "shadowsocks.tuning")
        assert first.returncode == 0 and all(changes_of(s) for s in first.data.values()), first
        rerun = timed("rerun", "state.apply", "shadowsocks.tuning")
        assert rerun.returncode == 0 and not any(changes_of(s) for s in rerun.data.values()), rerun
        timed("sysctl_only", "state.apply", "shadowsocks.tuning.sysctl")  # re-run, without nofile.sls
        timed("empty", "state.apply", "fleet.empty")
    _report("salt '*' (3 minions)", records)


def _report(label, records):
    medians = {kind: statistics.median(r["wall_s"] for r in records if r["kind"] == kind)
               for kind in ("first", "rerun", "sysctl_only", "empty")}
    out = os.environ.get("FLEET_COST_JSON")
    if out:
        data = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        data[label] = {"medians": medians, "records": records}
        Path(out).write_text(json.dumps(data, indent=1))
    print(f"\nCOST {label}: " + ", ".join(f"{k} {v:.2f}s" for k, v in medians.items()))
