"""Parsing, normalising, validation and file rendering: the engine's pure parts."""

import pytest
from salt.exceptions import SaltInvocationError

import shadowsocks_tuning as engine


@pytest.mark.parametrize(
    "key",
    ["net.core.somaxconn", "net.ipv4.conf.eth0.rp_filter", "net.ipv6.conf.br-lan.forwarding", "fs.file-max",
     "net.ipv4.neigh.veth@if3.gc_stale_time"],
)
def test_valid_keys_pass(key):
    assert engine.validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["net/../../etc/shadow", "..", "net..core", "/etc/passwd", "net.core/somaxconn", "net.core.some maxconn",
     "net.core.x\nfs.file-max", "net.core.\0x", "", "somaxconn", "etc.shadow", "net.ipv4.tcp_rmem=1", None, 7],
)
def test_malformed_keys_are_refused_before_any_file_access(key):
    with pytest.raises(SaltInvocationError) as err:
        engine.validate_key(key)
    assert str(err.value).startswith("sysctl key")


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("net.ipv4.tcp_rmem", "4096\t87380\t67108864", "4096 87380 67108864"),
        ("net.ipv4.tcp_rmem", [4096, 87380, 67108864], "4096 87380 67108864"),
        ("net.ipv4.tcp_rmem", " 4096  87380 67108864 ", "4096 87380 67108864"),
        ("net.ipv4.ip_local_port_range", "10000 65000", "10000 65000"),
        ("net.ipv4.ip_local_port_range", [10000, 65000], "10000 65000"),
        ("net.core.somaxconn", 4096, "4096"),
        ("net.core.somaxconn", "4096", "4096"),
        ("net.core.somaxconn", "+4096", "4096"),
        ("net.ipv4.tcp_congestion_control", "bbr", "bbr"),
        ("net.ipv4.tcp_tw_recycle", 0, "0"),
        ("vm.swappiness", 10, "10"),  # outside the catalogue: plain printable text
    ],
)
def test_values_are_normalised_to_the_kernel_form(key, value, expected):
    assert engine.normalise(key, value) == expected


@pytest.mark.parametrize(
    "key, value, rule",
    [
        ("net.ipv4.tcp_rmem", "4096 87380", "three integers"),
        ("net.ipv4.tcp_rmem", "67108864 87380 4096", "min <= default <= max"),
        ("net.ipv4.ip_local_port_range", "65000 10000", "low <= high"),
        ("net.ipv4.ip_local_port_range", "0 70000", "out of range"),
        ("net.core.somaxconn", -1, "not an integer"),
        ("net.core.somaxconn", 2**40, "out of range"),
        ("net.core.somaxconn", "4096\nfs.file-max = 1", "newline"),
        ("net.core.somaxconn", "4096\n", "newline"),
        ("net.core.somaxconn", True, "boolean"),
        ("net.core.somaxconn", "lots", "not an integer"),
        ("net.ipv4.tcp_syncookies", 3, "out of range"),
        ("net.ipv4.tcp_congestion_control", "bbr\nfs.file-max=1", "newline"),
        ("net.ipv4.tcp_congestion_control", 5, "not a name"),
        ("net.ipv4.tcp_tw_recycle", 1, "behind NAT"),
        ("vm.swappiness", "10\nkernel.panic = 1", "plain printable"),
        ("vm.swappiness", "a=b", "plain printable"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(key, value, rule):
    with pytest.raises(SaltInvocationError) as err:
        engine.normalise(key, value)
    assert key in str(err.value) and rule in str(err.value)


def test_profiles_resolve_through_include():
    chain, merged = engine._resolve_profile("bbr", engine.PROFILES)
    assert chain == ["bbr", "low-latency", "high-latency"]
    assert merged["net.ipv4.tcp_congestion_control"] == ("bbr", "profile bbr")
    assert merged["net.core.default_qdisc"] == ("fq", "profile bbr")
    assert merged["net.core.somaxconn"] == (4096, "profile high-latency")


def test_high_latency_is_the_recipe_as_written():
    _, merged = engine._resolve_profile("high-latency", engine.PROFILES)
    assert {k: v for k, (v, _) in merged.items()} == engine.RECIPE
    assert engine.RECIPE["net.ipv4.tcp_congestion_control"] == "hybla"


def test_every_profile_value_is_valid_for_its_key():
    for name in engine.PROFILES:
        _, merged = engine._resolve_profile(name, engine.PROFILES)
        for key, (value, _) in merged.items():
            assert key in engine.CATALOGUE, (name, key)
            engine.normalise(key, value)


def test_settings_merge_pillar_profile_include_and_overrides():
    pillar = {
        "profile": "edge",
        "profiles": {"edge": {"include": "bbr", "sysctls": {"net.core.somaxconn": 16384}}},
        "sysctls": {"net.ipv4.tcp_fin_timeout": 15, "net.ipv4.tcp_mtu_probing": None},
    }
    settings = engine._settings(pillar=pillar)
    assert settings["chain"] == ["edge", "bbr", "low-latency", "high-latency"]
    assert settings["sysctls"]["net.core.somaxconn"] == "16384"
    assert settings["sources"]["net.core.somaxconn"] == "profile edge"
    assert settings["sysctls"]["net.ipv4.tcp_fin_timeout"] == "15"
    assert settings["sources"]["net.ipv4.tcp_fin_timeout"] == "pillar shadowsocks:tuning:sysctls"
    assert "net.ipv4.tcp_mtu_probing" not in settings["sysctls"]
    assert settings["config"] == "/etc/sysctl.d/local.conf"


@pytest.mark.parametrize(
    "pillar, message",
    [
        ({"profile": "nope"}, "unknown profile 'nope' (known: bbr, high-latency, low-latency, low-memory)"),
        ({"profile": "a", "profiles": {"a": {"include": "b"}, "b": {"include": "a"}}}, "include cycle a -> b -> a"),
        ({"profile": "a", "profiles": {"a": {"include": "gone"}}}, "shadowsocks:tuning:profiles:a:include: unknown profile 'gone'"),
        ({"sysctls": {"net.ipv4.tcp_tw_recycle": 1}}, "pillar shadowsocks:tuning:sysctls: net.ipv4.tcp_tw_recycle: refusing 1"),
        ({"sysctls": {"net/../../etc/shadow": 1}}, "pillar shadowsocks:tuning:sysctls: sysctl key 'net/../../etc/shadow': malformed"),
        ({"sysctls": {"net.core.somaxconn": "many"}}, "pillar shadowsocks:tuning:sysctls: net.core.somaxconn: 'many' is not an integer"),
        ({"profiles": {"x": {"sysctls": {"net.ipv4.tcp_rmem": "9 8 7"}}}, "profile": "x"}, "profile x (pillar shadowsocks:tuning:profiles): net.ipv4.tcp_rmem"),
        ({"config": "relative.conf"}, "shadowsocks:tuning:config: 'relative.conf' must be an absolute file path"),
        ({"config": "/etc/sysctl.d/../passwd"}, "shadowsocks:tuning:config"),
        ({"policy": {"unavailable": "ignore"}}, "shadowsocks:tuning:policy:unavailable: 'ignore' must be one of warn, strict"),
        ({"policy": {"keys": {"net.core.rmem_max": "loud"}}}, "policy:keys:net.core.rmem_max"),
        ({"congestion_fallback": "bbr\n"}, "bbr"),
        ({"force": [1]}, "shadowsocks:tuning:force"),
        ({"sysctl": {"net.core.somaxconn": 1}}, "pillar shadowsocks:tuning: unknown key(s) sysctl (known: config,"),
    ],
)
def test_bad_pillar_names_the_path_and_the_rule(pillar, message):
    with pytest.raises(SaltInvocationError) as err:
        engine._settings(pillar=pillar)
    assert message in str(err.value)


def test_capacity_keys_are_only_raised_unless_forced():
    assert engine._effective("fs.file-max", "51200", "2466177", False) == (
        "2466177", "fs.file-max: kept 2466177 (higher than 51200)")
    assert engine._effective("fs.file-max", "51200", "2466177", True) == ("51200", None)
    assert engine._effective("fs.file-max", "51200", "8192", False) == ("51200", None)
    # Only the max field of a buffer triple is a capacity.
    assert engine._effective("net.ipv4.tcp_rmem", "4096 87380 4194304", "4096 131072 33554432", False) == (
        "4096 87380 33554432", "net.ipv4.tcp_rmem: kept max 33554432 (higher than 4194304)")
    # Not a capacity key: lowered as asked.
    assert engine._effective("net.ipv4.tcp_fin_timeout", "30", "60", False) == ("30", None)


FOREIGN = (
    "# my own settings\r\n"
    "vm.swappiness = 10\r\n"
    "net.core.somaxconn=128\r\n"
    "; a semicolon comment\r\n"
    "net/ipv4/tcp_fastopen = 1\r\n"
    "net.core.somaxconn = 256\r\n"
    "net.ipv4.tcp_tw_recycle = 0\r\n"
    "kernel.panic = 5"
)


def test_render_keeps_foreign_lines_byte_for_byte():
    values = {"net.core.somaxconn": "4096", "net.ipv4.tcp_fastopen": "3", "net.ipv4.tcp_fin_timeout": "30"}
    out = engine._render_conf(FOREIGN, values, {"net.ipv4.tcp_tw_recycle": "absent on this kernel"}, "low-latency")
    lines = out.split("\r\n")
    assert lines[0] == "# my own settings"
    assert lines[1] == "vm.swappiness = 10"
    assert lines[2] == "net.core.somaxconn = 4096"  # first occurrence set in place
    assert lines[3] == "; a semicolon comment"
    assert lines[4] == "net.ipv4.tcp_fastopen = 3"  # slash form recognised
    assert "net.core.somaxconn = 256" not in out  # later duplicate would win at boot: removed
    assert lines[5].startswith("# net.ipv4.tcp_tw_recycle = 0  # disabled by shadowsocks_tuning")
    assert lines[6] == "kernel.panic = 5"  # the unterminated last line, now ended
    assert lines[7] == engine.MANAGED_HEADER
    assert "net.ipv4.tcp_fin_timeout = 30" in lines
    # A second render of its own output changes nothing.
    assert engine._render_conf(out, values, {"net.ipv4.tcp_tw_recycle": "absent on this kernel"}, "low-latency") == out


def test_parse_conf_reads_what_sysctl_reads():
    parsed = engine._parse_conf(FOREIGN)
    assert [(k, v) for _, k, v in parsed] == [
        ("vm.swappiness", "10"), ("net.core.somaxconn", "128"), ("net.ipv4.tcp_fastopen", "1"),
        ("net.core.somaxconn", "256"), ("net.ipv4.tcp_tw_recycle", "0"), ("kernel.panic", "5"),
    ]
    assert engine._parse_conf("-net.core.somaxconn = 5\n")[0][1:] == ("net.core.somaxconn", "5")


def test_pillar_example_is_valid_and_resolves():
    import yaml
    from support.common import REPO

    tuning = yaml.safe_load((REPO / "pillar.example").read_text())["shadowsocks"]["tuning"]
    settings = engine._settings(pillar=tuning)
    assert settings["profile"] == "bbr"
    assert settings["sysctls"]["net.ipv4.tcp_rmem"] == "4096 87380 33554432"
    assert "net.ipv4.tcp_mtu_probing" not in settings["sysctls"]
    assert engine._resolve_profile("edge", engine._all_profiles(tuning["profiles"]))[0] == [
        "edge", "bbr", "low-latency", "high-latency"]


def test_every_public_function_documents_a_cli_example():
    import importlib.util
    import inspect

    from support.common import REPO

    spec = importlib.util.spec_from_file_location("sst_state", REPO / "_states" / "shadowsocks_tuning.py")
    state = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(state)
    missing = []
    for module in (engine, state):
        for name, func in inspect.getmembers(module, inspect.isfunction):
            if name.startswith("_") or func.__module__ != module.__name__:
                continue
            if "CLI Example:" not in (func.__doc__ or ""):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"public functions without a CLI Example (salt-call sys.doc shows it): {missing}"
