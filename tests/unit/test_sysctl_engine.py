"""The sysctl engine against a proc_root of plain files (the option for
kernels this one cannot show): what it plans to write, capacity keys kept
higher unless forced, and a single write through `set_key`. Nothing here
touches the real /proc/sys."""

import pytest
from salt.exceptions import SaltInvocationError

import sstuning_settings as settings_mod
import sstuning_sysctl as sysctl

LIVE = {
    "fs/file-max": "2466177",
    "net/ipv4/tcp_rmem": "4096\t131072\t33554432",
    "net/ipv4/tcp_fin_timeout": "60",
    "net/core/somaxconn": "4096",
    "net/core/netdev_max_backlog": "1000",  # present: not a child network namespace
}
MINI = {"profile": "mini", "profiles": {"mini": {"sysctls": {
    "fs.file-max": 51200, "net.ipv4.tcp_rmem": "4096 87380 4194304", "net.ipv4.tcp_fin_timeout": 30}}}}


@pytest.fixture
def opts(tmp_path):
    root = tmp_path / "proc-sys"
    for rel, value in LIVE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(value + "\n")
    (tmp_path / "sysctl.d").mkdir()
    return settings_mod.options({
        "shadowsocks_tuning.proc_root": str(root),
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.sysctl_dirs": [str(tmp_path / "sysctl.d")],
        "shadowsocks_tuning.sysctl_conf": str(tmp_path / "sysctl.conf"),
        "shadowsocks_tuning.modules_load_dir": str(tmp_path / "modules-load.d"),
    }.get)


def settings_for(opts, **pillar):
    config = opts["sysctl_dirs"][0] + "/local.conf"
    return settings_mod.resolve({**MINI, "config": config, **pillar})


def test_no_field_is_made_worse_than_the_kernel_has_it_and_kept_values_are_not_persisted(opts):
    planned = sysctl.plan(settings_for(opts), opts, test=True)
    assert planned["errors"] == []
    assert planned["writes"] == {"net.ipv4.tcp_fin_timeout": ("60", "30")}
    kept = next(line for line in planned["comment"] if line.startswith("kept, never made worse"))
    assert "fs.file-max: kept 2466177 (the profile's 51200 would be less)" in kept
    assert "net.ipv4.tcp_rmem: kept 4096 131072 33554432" in kept
    # Boot keeps the kernel's own values: no line pins them.
    assert "fs.file-max" not in planned["config_text"]
    assert "tcp_rmem" not in planned["config_text"]
    assert "net.ipv4.tcp_fin_timeout = 30\n" in planned["config_text"]


def test_a_profile_lowers_a_ceiling_only_where_it_says_why(opts):
    why = {"profile": "mini", "profiles": {"mini": {**MINI["profiles"]["mini"],
                                                     "lower": {"net.ipv4.tcp_rmem": "small box"}}}}
    planned = sysctl.plan(settings_for(opts, **why), opts, test=True)
    # The max goes down on purpose; the default field stays at the kernel's higher value.
    assert planned["writes"]["net.ipv4.tcp_rmem"] == ("4096 131072 33554432", "4096 131072 4194304")
    lowered = next(line for line in planned["comment"] if line.startswith("lowered on purpose: "))
    assert "net.ipv4.tcp_rmem: 4096 131072 33554432 -> 4096 131072 4194304: small box (profile mini)" in lowered


def test_force_lowers_the_keys_it_names_or_all(opts):
    one = sysctl.plan(settings_for(opts, force=["fs.file-max"]), opts, test=True)
    assert one["writes"]["fs.file-max"] == ("2466177", "51200")
    assert "net.ipv4.tcp_rmem" not in one["writes"]
    everything = sysctl.plan(settings_for(opts, force=True), opts, test=True)
    assert everything["writes"]["net.ipv4.tcp_rmem"] == ("4096 131072 33554432", "4096 87380 4194304")
    assert everything["writes"]["fs.file-max"] == ("2466177", "51200")


def test_plan_writes_nothing(opts, tmp_path):
    sysctl.plan(settings_for(opts, force=True), opts, test=True)
    assert (tmp_path / "proc-sys" / "fs" / "file-max").read_text() == "2466177\n"
    assert list((tmp_path / "sysctl.d").iterdir()) == []
    assert not (tmp_path / "state").exists()


def test_set_key_refuses_to_lower_a_capacity_unless_forced(opts, tmp_path):
    root = opts["proc_root"]
    with pytest.raises(SaltInvocationError) as err:
        sysctl.set_key(root, "fs.file-max", "51200", False)
    assert "fs.file-max: refusing to lower 2466177 to 51200" in str(err.value)
    assert sysctl.set_key(root, "fs.file-max", "51200", True) == {"old": "2466177", "new": "51200"}
    assert (tmp_path / "proc-sys" / "fs" / "file-max").read_text() == "51200"
    assert sysctl.set_key(root, "net.ipv4.tcp_fin_timeout", "30", False) == {"old": "60", "new": "30"}
    assert sysctl.set_key(root, "net.core.somaxconn", "4096", False) == {"old": "4096", "new": "4096"}


def test_a_removed_key_wanted_at_zero_is_already_satisfied(opts):
    # tcp_tw_recycle is not in this tree, as on every kernel since 4.12.
    done = sysctl.set_key(opts["proc_root"], "net.ipv4.tcp_tw_recycle", "0", False)
    assert done["old"] is None and done["new"] is None
    assert done["comment"] == sysctl.probe_key(opts["proc_root"], "net.ipv4.tcp_tw_recycle")["reason"]


@pytest.mark.parametrize("name", ["tcp_x\n", "tcp_bbr; reboot", "-r", "../tcp_bbr", "TCP_BBR", ""])
def test_modprobe_refuses_any_name_that_is_not_a_plain_module_name(name):
    assert sysctl.modprobe(name, dry_run=True) == (False, f"refusing to load module {name!r}")
