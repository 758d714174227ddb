"""The rules that keep every profile from making today's kernel worse, as
pure functions: directions per field, reserved-port sets, profile flags, and
the ports found in shadowsocks-libev configs."""

import json

import pytest
from salt.exceptions import SaltInvocationError

import sstuning_ports as ports
import sstuning_settings as settings
from sstuning_catalogue import CATALOGUE, PROFILES, RECIPE, keep_higher, parse_ports, ports_text
import sstuning_daemons
import sstuning_settings
import sstuning_sysctl

def libev_dir_ports(config_dir):
    """The ports of shadowsocks-libev's configs in ``config_dir`` (minion
    option ss_config_dir), as a run finds them."""
    options = sstuning_settings.options({"shadowsocks_tuning.ss_config_dir": str(config_dir)}.get)
    kinds = {"shadowsocks_libev": sstuning_daemons.KINDS["shadowsocks_libev"]}
    return sstuning_sysctl.config_ports(options, kinds)



def test_every_field_of_a_directed_key_has_a_direction():
    fields = {"int": 1, "range": 2, "triple": 3}
    for key, spec in CATALOGUE.items():
        if "more" in spec:
            assert len(spec["more"]) == fields[spec["type"]], key


@pytest.mark.parametrize(
    "key, wanted, live, target",
    [
        ("net.ipv4.tcp_max_tw_buckets", "5000", "131072", "131072"),
        ("net.ipv4.tcp_max_tw_buckets", "262144", "131072", "262144"),
        ("net.ipv4.tcp_rmem", "4096 87380 67108864", "4096 131072 33554432", "4096 131072 67108864"),
        ("net.ipv4.ip_local_port_range", "10000 65001", "32768 60999", "10000 65001"),
        ("net.ipv4.ip_local_port_range", "40000 50001", "32768 60999", "32768 60999"),
        ("net.ipv4.ip_local_port_range", "40000 61001", "32768 60999", "32768 61001"),
        ("net.ipv4.tcp_fin_timeout", "30", "60", "30"),  # no direction: the profile's value
    ],
)
def test_each_field_keeps_the_more_capable_value(key, wanted, live, target):
    assert keep_higher(key, wanted, live)[0] == target


def test_a_documented_lowering_moves_only_the_ceiling():
    target, note = keep_higher("net.ipv4.tcp_rmem", "4096 87380 4194304", "4096 131072 33554432", lower=True)
    assert target == "4096 131072 4194304"  # the default field is still kept
    assert "default 131072" in note


def test_port_sets_read_and_write_the_kernels_form():
    assert parse_ports("8388,9000-9002") == {8388, 9000, 9001, 9002}
    assert parse_ports([8388, "9000-9001"]) == {8388, 9000, 9001}
    assert ports_text({9002, 9000, 9001, 8388, 1}) == "1,8388,9000-9002"
    assert ports_text(set()) == ""
    for bad in ("0", "65536", "9-8", "a", [True], None, "1-2-3"):
        with pytest.raises(SaltInvocationError):
            parse_ports(bad)


def test_low_memory_says_why_for_every_key_it_lowers_and_low_latency_asks_only_for_the_default():
    resolved = settings.resolve({"profile": "low-memory"})
    assert set(resolved["lower"]) == set(PROFILES["low-memory"]["lower"])
    assert all(reason for reason in resolved["lower"].values())
    assert resolved["kernel_default"] == ["net.ipv4.tcp_congestion_control"]
    assert settings.resolve({"profile": "bbr"})["kernel_default"] == []
    # A value named in pillar is the admin's own: neither lowered-on-purpose nor "just the default".
    mine = settings.resolve({"profile": "low-memory", "sysctls": {
        "net.core.rmem_max": 1048576, "net.ipv4.tcp_congestion_control": "cubic"}})
    assert "net.core.rmem_max" not in mine["lower"] and mine["kernel_default"] == []


def test_profiles_fix_the_recipes_port_range_parity_and_reserve_ports():
    low, high = (int(x) for x in RECIPE["net.ipv4.ip_local_port_range"].split())
    assert low % 2 == high % 2  # the recipe as written
    for name in PROFILES:
        resolved = settings.resolve({"profile": name})
        low, high = (int(x) for x in resolved["sysctls"]["net.ipv4.ip_local_port_range"].split())
        assert low % 2 != high % 2, name
        assert "net.ipv4.ip_local_reserved_ports" in resolved["sysctls"], name
    assert settings.resolve({"profile": "bbr"})["sysctls"]["net.ipv4.tcp_notsent_lowat"] == "16384"


def test_pillar_reserved_ports_join_the_profiles_and_bad_ones_are_named():
    resolved = settings.resolve({"reserved_ports": [8388, "9000-9001"]})
    assert resolved["sysctls"]["net.ipv4.ip_local_reserved_ports"] == "8388,9000-9001"
    with pytest.raises(SaltInvocationError, match=r"pillar shadowsocks:tuning:reserved_ports: '70000'"):
        settings.resolve({"reserved_ports": ["70000"]})


def test_profile_flags_are_checked_for_shape():
    with pytest.raises(SaltInvocationError, match=r"profiles:mine:lower must be a mapping"):
        settings.resolve({"profile": "mine", "profiles": {"mine": {"include": "bbr", "lower": ["x"]}}})
    with pytest.raises(SaltInvocationError, match=r"profiles:mine:kernel_default must be a list"):
        settings.resolve({"profile": "mine", "profiles": {"mine": {"include": "bbr", "kernel_default": "x"}}})


def test_config_ports_come_from_every_json_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"server_port": 8388, "local_port": "1080"}))
    (tmp_path / "manager.json").write_text(json.dumps({
        "port_password": {"8001": "a", "8002": "b"}, "manager_address": "127.0.0.1:6001"}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.txt").write_text(json.dumps({"server_port": 9999}))
    found = libev_dir_ports(str(tmp_path))
    assert set(found) == {8388, 1080, 8001, 8002, 6001}
    assert "config.json (server_port)" in found[8388]
    assert libev_dir_ports(str(tmp_path / "missing")) == {}
