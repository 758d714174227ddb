"""`state.apply shadowsocks.tuning` through a real salt-call with file_roots on
this repository, inside a fresh network namespace, with real kernel writes."""

import os

import pytest

from support.common import in_netns, read_in_netns

SYSCTL_ID = "shadowsocks_tuning_|-shadowsocks-tuning-sysctl_|-shadowsocks-tuning-sysctl_|-tuned"
# Per-namespace keys of the recipe: writable in the test's namespace.
PER_NS = {
    "net.core.somaxconn": "4096",
    "net.ipv4.tcp_fin_timeout": "30",
    "net.ipv4.tcp_keepalive_time": "1200",
    "net.ipv4.ip_local_port_range": "10000 65001",
    "net.ipv4.tcp_fastopen": "3",
    "net.ipv4.tcp_mtu_probing": "1",
}


def sysctl_state(result):
    assert isinstance(result.data, dict), result.stdout + result.stderr
    return result.data[SYSCTL_ID]


def apply(minion, *args):
    return minion.run("state.apply", "shadowsocks.tuning", *args)


def tuning_pillar(minion, **extra):
    pillar = {"config": str(minion.config)}
    pillar.update(extra)
    minion.pillar(pillar)


def test_test_mode_predicts_the_real_run_and_the_second_run_is_clean(masterless):
    tuning_pillar(masterless, profile="bbr")
    predicted = sysctl_state(apply(masterless, "test=True"))
    assert predicted["result"] is None
    assert not masterless.config.exists(), "test=True wrote the file"
    assert read_in_netns(masterless.netns, "net.ipv4.tcp_fin_timeout") != ["30"], "test=True wrote the kernel"

    real = sysctl_state(apply(masterless))
    assert real["result"] is True, real["comment"]
    assert real["changes"] == predicted["changes"]
    for key, value in PER_NS.items():
        assert masterless.read(key) == value, key
        if key in real["changes"]:
            assert real["changes"][key]["new"] == value
    assert str(masterless.config) in real["changes"]
    assert masterless.read("net.ipv4.tcp_congestion_control") == "bbr"
    assert "net.ipv4.tcp_congestion_control = bbr" in masterless.config.read_text()
    assert oct(os.stat(masterless.config).st_mode & 0o777) == "0o644"

    again = sysctl_state(apply(masterless))
    assert again["result"] is True and again["changes"] == {}
    test_again = sysctl_state(apply(masterless, "test=True"))
    assert test_again["result"] is True and test_again["changes"] == {}


def test_the_container_view_is_reported_not_failed(masterless):
    tuning_pillar(masterless, profile="bbr")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True
    comment = ret["comment"]
    # global keys are skipped with the reason, tw_recycle is satisfied, file-max kept
    assert "net.core.rmem_max: read-only: global key" in comment
    assert "net.core.default_qdisc: read-only" in comment
    assert "net.ipv4.tcp_tw_recycle: wanted 0, and the kernel has no such key" in comment
    text = masterless.config.read_text()
    assert "tcp_tw_recycle" not in text and "rmem_max" not in text  # `sysctl --system` keeps exiting 0
    check = in_netns(masterless.netns, "sysctl", "-p", str(masterless.config))
    assert check.returncode == 0, check.stderr


def test_profile_inheritance_and_overrides_from_pillar(masterless):
    tuning_pillar(
        masterless,
        profile="edge",
        profiles={"edge": {"include": "bbr", "sysctls": {"net.ipv4.tcp_fin_timeout": 20}}},
        sysctls={"net.core.somaxconn": 16384, "net.ipv4.tcp_keepalive_time": 600},
    )
    shown = masterless.run("shadowsocks_tuning.profile").data
    assert shown["include_chain"] == ["edge", "bbr", "low-latency", "high-latency"]
    assert shown["sysctls"]["net.ipv4.tcp_fin_timeout"] == "20"
    assert shown["sources"]["net.core.somaxconn"] == "pillar shadowsocks:tuning:sysctls"
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True, ret["comment"]
    assert masterless.read("net.ipv4.tcp_fin_timeout") == "20"
    assert masterless.read("net.core.somaxconn") == "16384"
    assert masterless.read("net.ipv4.tcp_keepalive_time") == "600"
    assert masterless.read("net.ipv4.tcp_congestion_control") == "bbr"


def test_state_single_takes_arguments_like_the_sls_takes_pillar(masterless):
    config = masterless.config.parent / "60-single.conf"  # read at boot: in the admin's sysctl.d
    ret = masterless.run("state.single", "shadowsocks_tuning.tuned", "name=x", "profile=bbr", f"config={config}").data
    (only,) = ret.values()
    assert only["result"] is True and str(config) in only["changes"]
    assert masterless.read("net.ipv4.tcp_congestion_control") == "bbr"


def test_foreign_lines_of_an_existing_local_conf_survive(masterless):
    original = (
        "# my notes\n"
        "vm.swappiness = 10\n"
        "net.core.somaxconn = 1024\n"
        "kernel.panic=5\n"
        "net.ipv4.tcp_tw_recycle = 0\n"
    )
    masterless.config.write_text(original)
    tuning_pillar(masterless, profile="bbr")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True
    lines = masterless.config.read_text().splitlines()
    assert lines[:4] == ["# my notes", "vm.swappiness = 10", "net.core.somaxconn = 4096", "kernel.panic=5"]
    assert lines[4].startswith("# net.ipv4.tcp_tw_recycle = 0  # disabled by shadowsocks_tuning")
    # and `clean` gives the user's file back byte for byte
    undo = masterless.run("state.apply", "shadowsocks.tuning.clean").data
    assert all(s["result"] for s in undo.values())
    assert masterless.config.read_text() == original


def test_hybla_unavailable_fails_clearly_and_writes_nothing(masterless):
    tuning_pillar(masterless, profile="high-latency")
    before = masterless.read("net.ipv4.tcp_fin_timeout")
    for args in (("test=True",), ()):
        ret = sysctl_state(apply(masterless, *args))
        assert ret["result"] is False
        assert "'hybla' is not available (available: reno bbr cubic)" in ret["comment"]
        assert "modprobe tcp_hybla failed" in ret["comment"]
        assert "congestion_fallback" in ret["comment"]
    assert not masterless.config.exists()
    assert masterless.read("net.ipv4.tcp_fin_timeout") == before


def test_hybla_falls_back_to_the_pillar_named_fallback(masterless):
    # cubic is not allowed inside a child namespace here, bbr is.
    tuning_pillar(masterless, profile="high-latency", congestion_fallback="bbr")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True, ret["comment"]
    assert "using fallback 'bbr'" in ret["comment"]
    assert masterless.read("net.ipv4.tcp_congestion_control") == "bbr"
    assert not list((masterless.root / "modules-load.d").iterdir()), "bbr is built in: no module to persist"


def test_restricted_congestion_control_follows_the_policy(masterless):
    # cubic named in pillar: available here, but not allowed in a child namespace.
    cubic = {"net.ipv4.tcp_congestion_control": "cubic"}
    tuning_pillar(masterless, profile="low-latency", sysctls=cubic)
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True
    assert "net.ipv4.tcp_congestion_control: restricted" in ret["comment"]
    tuning_pillar(masterless, profile="low-latency", sysctls=cubic,
                  policy={"keys": {"net.ipv4.tcp_congestion_control": "strict"}})
    masterless.run("shadowsocks_tuning.set", "net.ipv4.tcp_fin_timeout", "60")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is False and "not allowed inside this network namespace" in ret["comment"]
    assert masterless.read("net.ipv4.tcp_fin_timeout") == "60", "a failed plan wrote a key"


def test_strict_policy_fails_on_read_only_keys_before_writing(masterless):
    tuning_pillar(masterless, profile="bbr", policy={"unavailable": "strict"})
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is False
    assert "net.core.rmem_max: read-only" in ret["comment"] and "policy strict" in ret["comment"]
    assert not masterless.config.exists()
    assert masterless.read("net.ipv4.tcp_fin_timeout") != "30"


def test_capacity_kept_higher_unless_forced(masterless):
    masterless.run("shadowsocks_tuning.set", "net.core.somaxconn", "8192")
    tuning_pillar(masterless, profile="bbr")
    ret = sysctl_state(apply(masterless))
    assert "net.core.somaxconn: kept 8192 (the profile's 4096 would be less)" in ret["comment"]
    assert masterless.read("net.core.somaxconn") == "8192"
    tuning_pillar(masterless, profile="bbr", force=["net.core.somaxconn"])
    ret = sysctl_state(apply(masterless))
    assert ret["changes"]["net.core.somaxconn"] == {"old": "8192", "new": "4096"}


@pytest.mark.parametrize(
    "pillar, message",
    [
        ({"profile": "fast"}, "unknown profile 'fast' (known: bbr, high-latency, low-latency, low-memory)"),
        ({"profile": "a", "profiles": {"a": {"include": "b"}, "b": {"include": "a"}}}, "include cycle a -> b -> a"),
        ({"sysctls": {"net.ipv4.tcp_tw_recycle": 1}}, "shadowsocks:tuning:sysctls: net.ipv4.tcp_tw_recycle: refusing 1"),
        ({"sysctls": {"net.ipv4.tcp_fastopn": 3}}, "net.ipv4.tcp_fastopn: unknown key"),
        ({"sysctls": {"net.ipv4.tcp_rmem": "4096 87380"}}, "shadowsocks:tuning:sysctls: net.ipv4.tcp_rmem"),
    ],
)
def test_bad_pillar_fails_before_touching_anything(masterless, pillar, message):
    tuning_pillar(masterless, **pillar)
    before = masterless.read("net.ipv4.tcp_fin_timeout")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is False
    assert message in ret["comment"]
    assert not masterless.config.exists()
    assert masterless.read("net.ipv4.tcp_fin_timeout") == before


def test_a_later_sysctl_file_that_overrides_is_named(masterless):
    later = masterless.root / "usr-lib-sysctl.d" / "zz-vendor.conf"
    later.write_text("# vendor\nnet.core.somaxconn = 1024\n")
    tuning_pillar(masterless, profile="bbr")
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is True
    assert f"overridden at boot: net.core.somaxconn = 1024 in {later}:2" in ret["comment"]
    report = masterless.run("shadowsocks_tuning.verify")
    assert report.returncode != 0
    assert report.data["keys"]["net.core.somaxconn"]["status"] == "overridden"
    tuning_pillar(masterless, profile="bbr", policy={"override": "strict"})
    ret = sysctl_state(apply(masterless))
    assert ret["result"] is False and "zz-vendor.conf:2" in ret["comment"]


def test_verify_is_clean_after_apply_and_catches_drift(masterless):
    tuning_pillar(masterless, profile="bbr")
    apply(masterless)
    report = masterless.run("shadowsocks_tuning.verify")
    assert report.returncode == 0 and report.data["ok"] is True
    assert report.data["keys"]["net.core.rmem_max"]["status"] == "read-only"
    assert report.data["keys"]["net.ipv4.tcp_tw_recycle"]["status"] == "ok"
    in_netns(masterless.netns, "sh", "-c", "echo 45 > /proc/sys/net/ipv4/tcp_fin_timeout", check=True)
    report = masterless.run("shadowsocks_tuning.verify")
    assert report.returncode != 0
    assert report.data["problems"] == ["net.ipv4.tcp_fin_timeout"]
    assert report.data["keys"]["net.ipv4.tcp_fin_timeout"]["status"] == "drift"


def test_clean_puts_back_live_values_and_removes_the_created_file(masterless):
    tuning_pillar(masterless, profile="bbr")
    before = {key: masterless.read(key) for key in PER_NS}
    apply(masterless)
    assert masterless.config.exists()
    predicted = masterless.run("state.apply", "shadowsocks.tuning.clean", "test=True").data
    (pred,) = predicted.values()
    assert pred["result"] is None and pred["changes"]
    undo = masterless.run("state.apply", "shadowsocks.tuning.clean").data
    (ret,) = undo.values()
    assert ret["result"] is True and ret["changes"] == pred["changes"]
    assert {key: masterless.read(key) for key in PER_NS} == before
    assert not masterless.config.exists()


def test_a_loaded_congestion_module_is_persisted_for_the_next_boot(make_masterless, tmp_path):
    """This kernel has no loadable modules, so nothing real can load tcp_hybla
    here. Stand-ins, and only these: a copied /proc/sys tree (proc_root) and a
    modprobe that 'loads' hybla by adding it to the tree's available list,
    bind-mounted over /usr/sbin/modprobe in a private mount namespace."""
    fake = tmp_path / "proc-sys"
    for rel, text in {
        "net/core/somaxconn": "4096", "net/core/netdev_max_backlog": "1000",
        "net/ipv4/tcp_available_congestion_control": "reno cubic",
        "net/ipv4/tcp_allowed_congestion_control": "reno cubic",
        "net/ipv4/tcp_congestion_control": "cubic",
    }.items():
        (fake / rel).parent.mkdir(parents=True, exist_ok=True)
        (fake / rel).write_text(text + "\n")
    modprobe = tmp_path / "modprobe"
    modprobe.write_text(
        "#!/bin/sh\n"
        '[ "$1" = "--dry-run" ] && exit 0\n'
        f'[ "$2" = tcp_hybla ] && echo "reno cubic hybla" > {fake}/net/ipv4/tcp_available_congestion_control && exit 0\n'
        'echo "modprobe: FATAL: Module $2 not found" >&2; exit 1\n'
    )
    modprobe.chmod(0o755)
    wrap = ["unshare", "-m", "sh", "-c", f'mount --bind {modprobe} /usr/sbin/modprobe && exec "$@"', "sh"]
    minion = make_masterless(wrap=wrap, **{"shadowsocks_tuning.proc_root": str(fake)})
    tuning_pillar(minion, profile="hybla-only",
                  profiles={"hybla-only": {"sysctls": {"net.ipv4.tcp_congestion_control": "hybla"}}})
    modules_load = minion.root / "modules-load.d" / "shadowsocks-tuning.conf"

    predicted = sysctl_state(apply(minion, "test=True"))
    assert predicted["result"] is None and "modprobe tcp_hybla: would load" in predicted["comment"]
    assert not modules_load.exists()

    ret = sysctl_state(apply(minion))
    assert ret["result"] is True, ret["comment"]
    assert "modprobe tcp_hybla: loaded" in ret["comment"]
    assert ret["changes"]["net.ipv4.tcp_congestion_control"] == {"old": "cubic", "new": "hybla"}
    assert modules_load.read_text() == "tcp_hybla\n"
    assert str(modules_load) in ret["changes"]
    assert sysctl_state(apply(minion))["changes"] == {}
