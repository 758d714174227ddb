"""Settings: profiles and their includes, and `resolve`, the one function that
turns pillar shadowsocks:tuning and explicit arguments into validated settings
for both halves, naming every bad pillar path at once."""

import pathlib

import pytest
import yaml
from salt.exceptions import SaltInvocationError

import sstuning_daemons as daemons
import sstuning_settings as settings_mod
from sstuning_catalogue import CATALOGUE, PROFILES, RECIPE, normalise
from sstuning_settings import DEFAULTS, resolve
from support.common import REPO

NR_OPEN = int(pathlib.Path("/proc/sys/fs/nr_open").read_text())


def refused(tuning, **kwargs):
    with pytest.raises(SaltInvocationError) as err:
        resolve(tuning, **kwargs)
    return str(err.value)


def files_of(parts, part):
    return [f for group in parts[part] for f in group["files"]]


# --------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------
def test_profiles_resolve_through_include():
    chain, merged, _, _ = settings_mod.resolve_profile("bbr", PROFILES)
    assert chain == ["bbr", "low-latency", "high-latency"]
    assert merged["net.ipv4.tcp_congestion_control"] == ("bbr", "profile bbr")
    assert merged["net.core.default_qdisc"] == ("fq", "profile bbr")
    assert merged["net.core.somaxconn"] == (4096, "profile high-latency")


def test_high_latency_is_the_recipe_corrected_only_where_it_is_wrong_on_any_kernel():
    _, merged, _, _ = settings_mod.resolve_profile("high-latency", PROFILES)
    values = {k: v for k, (v, _) in merged.items()}
    # Same parity at both ends makes the kernel warn; reserved ports are added.
    assert {k for k in values if values[k] != RECIPE.get(k)} == {
        "net.ipv4.ip_local_port_range", "net.ipv4.ip_local_reserved_ports"}
    assert set(RECIPE) <= set(values)
    assert RECIPE["net.ipv4.tcp_congestion_control"] == "hybla"


def test_every_profile_value_is_valid_for_its_key():
    for name in PROFILES:
        _, merged, _, _ = settings_mod.resolve_profile(name, PROFILES)
        for key, (value, _) in merged.items():
            assert key in CATALOGUE, (name, key)
            normalise(key, value)


def test_settings_merge_pillar_profile_include_and_overrides():
    pillar = {
        "profile": "edge",
        "profiles": {"edge": {"include": "bbr", "sysctls": {"net.core.somaxconn": 16384}}},
        "sysctls": {"net.ipv4.tcp_fin_timeout": 15, "net.ipv4.tcp_mtu_probing": None},
    }
    settings = resolve(pillar)
    assert settings["chain"] == ["edge", "bbr", "low-latency", "high-latency"]
    assert settings["sysctls"]["net.core.somaxconn"] == "16384"
    assert settings["sources"]["net.core.somaxconn"] == "profile edge"
    assert settings["sysctls"]["net.ipv4.tcp_fin_timeout"] == "15"
    assert settings["sources"]["net.ipv4.tcp_fin_timeout"] == "pillar shadowsocks:tuning:sysctls"
    assert "net.ipv4.tcp_mtu_probing" not in settings["sysctls"]
    assert settings["config"] == "/etc/sysctl.d/local.conf"
    assert settings["profiles"]["edge"] == "custom profile (include: bbr)"


@pytest.mark.parametrize(
    "pillar, message",
    [
        ({"profile": "nope"}, "unknown profile 'nope' (known: bbr, high-latency, low-latency, low-memory)"),
        ({"profile": "a", "profiles": {"a": {"include": "b"}, "b": {"include": "a"}}}, "include cycle a -> b -> a"),
        ({"profile": "a", "profiles": {"a": {"include": "gone"}}}, "shadowsocks:tuning:profiles:a:include: unknown profile 'gone'"),
        ({"sysctls": {"net.ipv4.tcp_tw_recycle": 1}}, "pillar shadowsocks:tuning:sysctls: net.ipv4.tcp_tw_recycle: refusing 1"),
        ({"sysctls": {"net/../../etc/shadow": 1}}, "pillar shadowsocks:tuning:sysctls: sysctl key 'net/../../etc/shadow': malformed"),
        ({"sysctls": {"net/../../etc/shadow": None}}, "pillar shadowsocks:tuning:sysctls: sysctl key 'net/../../etc/shadow': malformed"),
        ({"sysctls": {"net.core.somaxconn": "many"}}, "pillar shadowsocks:tuning:sysctls: net.core.somaxconn: 'many' is not an integer"),
        ({"profiles": {"x": {"sysctls": {"net.ipv4.tcp_rmem": "9 8 7"}}}, "profile": "x"}, "profile x (pillar shadowsocks:tuning:profiles): net.ipv4.tcp_rmem"),
        ({"profiles": {"x": {"colour": "red"}}}, "pillar shadowsocks:tuning:profiles:x: unknown field(s) colour"),
        ({"config": "relative.conf"}, "shadowsocks:tuning:config: 'relative.conf' must be an absolute file path"),
        ({"config": "/etc/sysctl.d/../passwd"}, "shadowsocks:tuning:config"),
        ({"policy": {"unavailable": "ignore"}}, "shadowsocks:tuning:policy:unavailable: 'ignore' must be one of warn, strict"),
        ({"policy": {"keys": {"net.core.rmem_max": "loud"}}}, "policy:keys:net.core.rmem_max"),
        ({"congestion_fallback": "bbr\n"}, "bbr"),
        ({"force": [1]}, "shadowsocks:tuning:force"),
        ({"sysctl": {"net.core.somaxconn": 1}}, "pillar shadowsocks:tuning: unknown key(s) sysctl (allowed: profile,"),
    ],
)
def test_bad_pillar_names_the_path_and_the_rule(pillar, message):
    text = refused(pillar)
    assert message in text
    assert text.endswith("Nothing was changed: fix the pillar (or arguments) above")


# --------------------------------------------------------------------------
# resolve: the whole pillar, checked once
# --------------------------------------------------------------------------
def test_an_unknown_profile_names_its_pillar_path_and_the_known_ones():
    text = refused({"profile": "bbrr"})
    assert "pillar shadowsocks:tuning:profile: unknown profile 'bbrr'" in text
    for name in PROFILES:
        assert name in text.split("(known: ", 1)[1]


def test_a_pillar_profile_is_listed_among_the_known_ones():
    text = refused({"profile": "edg", "profiles": {"edge": {"include": "bbr"}}})
    assert "(known: bbr, edge, high-latency, low-latency, low-memory)" in text


@pytest.mark.parametrize("tuning", ["bbr", ["profile", "bbr"], 7])
def test_tuning_that_is_not_a_mapping_is_refused(tuning):
    assert "pillar shadowsocks:tuning must be a mapping" in refused(tuning)


def test_pillar_tuning_takes_shadowsocks_tuning_out_of_the_whole_pillar():
    assert settings_mod.pillar_tuning({}) == {}
    assert settings_mod.pillar_tuning({"shadowsocks": None}) == {}
    assert settings_mod.pillar_tuning({"shadowsocks": {"tuning": None}}) == {}
    assert settings_mod.pillar_tuning({"shadowsocks": {"tuning": {"nofile": 4096}}}) == {"nofile": 4096}
    # Not a mapping: handed on as it is, for resolve to name.
    assert "pillar shadowsocks:tuning must be a mapping" in refused(
        settings_mod.pillar_tuning({"shadowsocks": {"tuning": "bbr"}}))


@pytest.mark.parametrize(
    "limits, limits_fragments",
    [
        ("everything", ["pillar shadowsocks:tuning:limits must be a mapping (init_system, restart, timeout,"]),
        ({"supervisor": ["defaults_file"], "init_scripts": [{"path": "/etc/init.d/ss", "colour": "red"}]},
         ["pillar shadowsocks:tuning:limits:supervisor must be a mapping",
          "pillar shadowsocks:tuning:limits:init_scripts[0]: unknown key(s) colour (allowed: path, service, pidfile)"]),
    ],
)
def test_every_problem_is_reported_at_once_with_its_pillar_path(limits, limits_fragments):
    text = refused({
        "sysctl": {"net.core.somaxconn": 1},                       # typo of `sysctls`
        "sysctls": {"net.core.somaxconn": "many"},
        "nofile": -1,
        "limits": limits,
    })
    for fragment in [
        "pillar shadowsocks:tuning: unknown key(s) sysctl",
        "pillar shadowsocks:tuning:sysctls: net.core.somaxconn: 'many' is not an integer",
        "pillar shadowsocks:tuning:nofile: -1 is not a positive integer",
        *limits_fragments,
    ]:
        assert fragment in text, (fragment, text)
    assert len(text.splitlines()) == 3 + len(limits_fragments) + 1  # one line each, then "Nothing was changed"


def test_limits_pillar_errors_are_all_collected():
    text = refused({
        "nofile": "lots",
        "limits": {
            "restart": "sometimes",
            "supervisor": {"defaults_file": "etc/default/supervisor", "colour": "red"},
            "units": ["bad/unit"],
        },
    })
    for fragment in ("pillar shadowsocks:tuning:nofile: 'lots'",
                     "pillar shadowsocks:tuning:limits:restart: 'sometimes'",
                     "pillar shadowsocks:tuning:limits:supervisor: unknown key(s) colour",
                     "pillar shadowsocks:tuning:limits:supervisor:defaults_file: 'etc/default/supervisor'",
                     "pillar shadowsocks:tuning:limits:units[0]: 'bad/unit'"):
        assert fragment in text, (fragment, text)


def test_defaults_come_from_defaults_and_the_registry():
    settings = resolve({})
    limits = settings["limits"]
    assert settings["nofile"] == DEFAULTS["nofile"]
    assert limits["verify"] == {"pidfiles": [], "wait": DEFAULTS["limits"]["verify"]["wait"]}
    assert settings["profile"] == DEFAULTS["profile"]
    assert settings["config"] == DEFAULTS["config"]
    assert limits["restart"] == DEFAULTS["limits"]["restart"] == "live"
    assert limits["timeout"] == DEFAULTS["limits"]["timeout"]
    # Every kind of daemon the registry knows is managed unless pillar turns it off.
    assert list(limits["kinds"]) == list(daemons.KINDS)
    supervisor, libev = daemons.KINDS["supervisor"], daemons.KINDS["shadowsocks_libev"]
    sup_files = files_of(limits["parts"], "supervisor")
    assert [(f["kind"], f["path"]) for f in sup_files] == [
        ("ulimit", supervisor["defaults_file"]), ("minfds", supervisor["minfds"])]
    assert limits["parts"]["supervisor"][0]["restart"] == {"name": supervisor["service"],
                                                           "pidfile": supervisor["pidfile"]}
    (ssl,) = limits["parts"]["shadowsocks_libev"]
    assert [(f["kind"], f["path"], f["key"]) for f in ssl["files"]] == [
        ("assignment", libev["defaults_file"], "MAXFD")]
    assert ssl["restart"] == {"name": libev["service"], "pidfile": libev["pidfile"]}
    assert limits["parts"]["init_scripts"] == [] and limits["parts"]["units"] == []
    # Go servers have units only: nothing for them without systemd.
    assert limits["parts"]["xray"] == []
    # Each file names the pillar path that put it there, for messages.
    assert sup_files[0]["where"] == "pillar shadowsocks:tuning:limits:supervisor:defaults_file"


def test_resolve_gives_plain_data_for_every_part():
    # Plain data: it survives a round trip through YAML (what salt-call prints).
    settings = resolve({})
    assert yaml.safe_load(yaml.safe_dump(settings)) == settings
    assert set(settings["limits"]["parts"]) == set(daemons.KINDS) | set(settings_mod.EXTRA_PARTS)


def test_null_turns_a_kind_off_or_drops_one_file():
    off = resolve({"limits": {"supervisor": None}})
    assert "supervisor" not in off["limits"]["parts"] and "supervisor" not in off["limits"]["kinds"]
    assert off["limits"]["parts"]["shadowsocks_libev"]  # the other parts stay
    one = resolve({"limits": {"supervisor": {"defaults_file": None}}})
    assert [f["path"] for f in files_of(one["limits"]["parts"], "supervisor")] == [
        daemons.KINDS["supervisor"]["minfds"]]
    assert one["limits"]["parts"]["supervisor"][0]["restart"]["name"] == daemons.KINDS["supervisor"]["service"]
    # The names of earlier releases: `config` is the minfds file, `unit` its one unit.
    old = resolve({"limits": {"supervisor": {"config": "/srv/supervisord.conf", "unit": "sup.service"}}},
                  box={"systemd": True})
    assert old["limits"]["kinds"]["supervisor"]["minfds"] == "/srv/supervisord.conf"
    assert old["limits"]["kinds"]["supervisor"]["units"] == ["sup.service"]


def test_pillar_adds_a_kind_of_its_own_in_the_registry_shape():
    settings = resolve({"limits": {"my_server": {"programs": ["my-ss"], "units": ["my-ss"], "raises_soft": True,
                                                 "configs": {"paths": ["/etc/my-ss/*.json"], "format": "json5",
                                                             "ports": ["listen_port"]}}}},
                       box={"systemd": True})
    kind = settings["limits"]["kinds"]["my_server"]
    assert kind["programs"] == ["my-ss"] and kind["raises_soft"] is True
    assert kind["configs"] == {"paths": ["/etc/my-ss/*.json"], "format": "json5", "ports": ["listen_port"]}
    (group,) = settings["limits"]["parts"]["my_server"]
    assert group["files"][0]["unit"] == "my-ss.service" and group["restart"]["name"] == "my-ss.service"
    # A name that is neither a setting nor a kind, and has no programs: a typo, named.
    text = refused({"limits": {"supervsor": {"defaults_file": "/etc/default/supervisor"}}})
    assert "pillar shadowsocks:tuning:limits:supervsor: unknown key: not a setting of limits" in text
    assert "a kind of your own needs `programs: [...]`" in text
    assert "limits:my:programs: [] must be a list of process names" in refused(
        {"limits": {"my": {"programs": []}}})
    assert "limits:my:port_options: 'p' must be a list of command-line options such as -p" in refused(
        {"limits": {"my": {"programs": ["x"], "port_options": "p"}}})
    assert resolve({"limits": {"my": {"programs": ["x"], "port_options": ["--listen"]}}},
                   box={"systemd": True})["limits"]["kinds"]["my"]["port_options"] == ["--listen"]
    formats = ", ".join(settings_mod.CONFIG_FORMATS)  # every format sstuning_configs reads
    assert f"limits:my:configs:format: 'toml' must be one of {formats}" in refused(
        {"limits": {"my": {"programs": ["x"], "configs": {"paths": ["/etc/x.toml"], "format": "toml"}}}})


def test_an_unset_nofile_is_the_recipes_or_what_the_box_can_grant():
    assert resolve({})["nofile"] == settings_mod.RECIPE_NOFILE
    capped = resolve({}, box={"grantable": {"sysvinit": 20000, "systemd": 20000}})
    assert capped["nofile"] == 20000
    assert any(note.startswith("nofile 20000: the most this box can grant") for note in capped["notes"])
    # Asked for in pillar or as an argument, it is what was asked (planning says if it cannot be granted).
    assert resolve({"nofile": 51200}, box={"grantable": {"sysvinit": 20000, "systemd": 20000}})["nofile"] == 51200
    assert resolve({}, {"nofile": 30000}, box={"grantable": {"sysvinit": 20000, "systemd": 20000}})["nofile"] == 30000
    # Under systemd, what PID 1 can grant decides.
    box = {"systemd": True, "grantable": {"sysvinit": 20000, "systemd": 524288}}
    assert resolve({}, box=box)["nofile"] == settings_mod.RECIPE_NOFILE


def test_init_system_decides_systemd_once():
    pillar = {"limits": {"units": ["shadowsocks-rust-extra"]}}
    on = resolve(pillar, box={"systemd": True})
    assert on["limits"]["init_system"] == "systemd"
    parts = on["limits"]["parts"]
    dropins = [f["unit"] for part in parts for f in files_of(parts, part) if f["kind"] == "dropin"]
    expected = [unit for kind in daemons.KINDS.values() for unit in kind.get("units", [])]
    assert dropins == expected + ["shadowsocks-rust-extra.service"]
    # Under systemd a unit is restarted, not the init script's service.
    assert [g["restart"]["name"] for g in parts["supervisor"] if g["restart"]] == daemons.KINDS["supervisor"]["units"]
    assert parts["units"][0]["restart"]["name"] == "shadowsocks-rust-extra.service"

    off = resolve(pillar, box={"systemd": False})
    assert off["limits"]["init_system"] == "sysvinit"
    assert not [f for part in off["limits"]["parts"] for f in files_of(off["limits"]["parts"], part)
                if f["kind"] == "dropin"]
    assert off["limits"]["parts"]["units"] == []

    # Pillar can choose; it wins over what the box says.
    assert resolve({"limits": {"init_system": "sysvinit"}}, box={"systemd": True})["limits"]["init_system"] == "sysvinit"
    assert resolve({"limits": {"init_system": "systemd"}}, box={"systemd": False})["limits"]["init_system"] == "systemd"
    assert "pillar shadowsocks:tuning:limits:init_system: 'upstart' must be one of auto, systemd, sysvinit" in refused(
        {"limits": {"init_system": "upstart"}})


def test_arguments_win_over_pillar_and_are_named_in_errors():
    pillar = {"nofile": 1000, "profile": "bbr"}
    assert resolve(pillar, {"nofile": 2000})["nofile"] == 2000
    assert resolve(pillar, {"nofile": None})["nofile"] == 1000  # None: not given
    assert resolve(pillar, {"profile": "low-memory"})["chain"] == ["low-memory", "low-latency", "high-latency"]
    text = refused(pillar, arguments={"nofile": "lots", "profile": "bbrr"})
    assert "argument nofile: 'lots' is not a positive integer" in text
    assert "argument profile: unknown profile 'bbrr'" in text
    assert "pillar shadowsocks:tuning:nofile" not in text


def test_nofile_is_checked_against_nr_open():
    assert resolve({"nofile": NR_OPEN}, box={"nr_open": NR_OPEN})["nofile"] == NR_OPEN
    assert f"pillar shadowsocks:tuning:nofile: {NR_OPEN + 1} is above fs.nr_open ({NR_OPEN})" in refused(
        {"nofile": NR_OPEN + 1}, box={"nr_open": NR_OPEN})


def test_force_a_list_of_keys_nofile_or_everything():
    listed = resolve({"force": ["nofile", "fs.file-max"]})
    assert listed["force_nofile"] is True and listed["force"] == ["fs.file-max"]
    only_sysctls = resolve({"force": ["net.core.somaxconn"]})
    assert only_sysctls["force_nofile"] is False and only_sysctls["force"] == ["net.core.somaxconn"]
    everything = resolve({"force": True})
    assert everything["force_nofile"] is True and everything["force"] == list(everything["sysctls"])
    assert resolve({})["force"] == [] and resolve({})["force_nofile"] is False
    assert "pillar shadowsocks:tuning:force must be a list" in refused({"force": {"nofile": True}})


def test_pillar_example_is_valid_and_resolves():
    tuning = yaml.safe_load((REPO / "pillar.example").read_text())["shadowsocks"]["tuning"]
    # Any init script it names need not exist here: only planning looks at files.
    settings = resolve(tuning, box={"nr_open": NR_OPEN})
    assert settings["profile"] == "bbr"
    assert settings["sysctls"]["net.ipv4.tcp_rmem"] == "4096 87380 33554432"
    assert "net.ipv4.tcp_mtu_probing" not in settings["sysctls"]
    assert settings["nofile"] == tuning["nofile"]
    assert [f["path"] for f in files_of(settings["limits"]["parts"], "init_scripts")] == (
        tuning["limits"]["init_scripts"])
    assert settings_mod.resolve_profile("edge", settings_mod.all_profiles(tuning["profiles"]))[0] == [
        "edge", "bbr", "low-latency", "high-latency"]


def test_resolution_does_not_look_at_files(tmp_path):
    """A missing init script is found when planning (which names its pillar
    path), not when resolving: `settings` still shows what the pillar says."""
    missing = str(tmp_path / "init.d" / "shadowsocks")
    settings = resolve({"limits": {"init_scripts": [missing]}})
    (group,) = settings["limits"]["parts"]["init_scripts"]
    assert group["files"][0]["path"] == missing and group["files"][0]["required"] is True
    assert group["restart"] == {"name": "shadowsocks", "pidfile": None}


def test_options_default_to_the_real_system():
    assert settings_mod.options({}.get) == settings_mod.OPTIONS
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    assert settings_mod.OPTIONS["systemd_marker"] == "/run/systemd/system"
    assert settings_mod.OPTIONS["proc_root"] == "/proc/sys"
    given = settings_mod.options({"shadowsocks_tuning.state_dir": "/srv/state", "state_dir": "/wrong"}.get)
    assert given["state_dir"] == "/srv/state" and given["init_dir"] == "/etc/init.d"


# --------------------------------------------------------------------------
# Validators
# --------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(51200, 51200), ("16384", 16384), (" 1024 ", 1024), (1, 1)])
def test_nofile_values(value, expected):
    assert settings_mod.validate_nofile(value, NR_OPEN) == expected


@pytest.mark.parametrize("value", [0, -1, "abc", "12k", 1.5, 16384.0, True, None, [1], "", "1e5"])
def test_bad_nofile_values_are_refused(value):
    with pytest.raises(SaltInvocationError) as err:
        settings_mod.validate_nofile(value, NR_OPEN, "pillar shadowsocks:tuning:nofile")
    assert str(err.value).startswith("pillar shadowsocks:tuning:nofile: ")
    assert "positive integer" in str(err.value)


def test_nofile_above_nr_open_is_refused():
    with pytest.raises(SaltInvocationError) as err:
        settings_mod.validate_nofile(NR_OPEN + 1, NR_OPEN)
    assert f"above fs.nr_open ({NR_OPEN})" in str(err.value)
    assert settings_mod.validate_nofile(NR_OPEN, NR_OPEN) == NR_OPEN


@pytest.mark.parametrize("path", ["relative/file", "/etc/../etc/shadow", "/etc/x\nulimit", "", None])
def test_paths_must_be_absolute_and_plain(path):
    with pytest.raises(SaltInvocationError) as err:
        settings_mod.validate_path(path, "path")
    assert str(err.value).startswith("path: ")


def test_a_plain_path_is_normalised():
    assert settings_mod.validate_path("/etc//default/./supervisor", "path") == "/etc/default/supervisor"


@pytest.mark.parametrize("unit, expected", [
    ("supervisor", "supervisor.service"), ("supervisor.service", "supervisor.service"),
    ("shadowsocks-libev-server@.service", "shadowsocks-libev-server@.service"),
    ("shadowsocks-libev-server@config", "shadowsocks-libev-server@config.service"),
])
def test_unit_names(unit, expected):
    assert settings_mod.validate_unit(unit, "unit") == expected


@pytest.mark.parametrize("unit", ["../etc/passwd", "a/b.service", "x.socket", "", None, "sup ervisor"])
def test_bad_unit_names_are_refused(unit):
    with pytest.raises(SaltInvocationError) as err:
        settings_mod.validate_unit(unit, "unit")
    assert str(err.value).startswith("unit: ")


@pytest.mark.parametrize("name", ["../supervisor", "a/b", "", None, "sup ervisor", "-x"])
def test_bad_service_names_are_refused(name):
    with pytest.raises(SaltInvocationError):
        settings_mod.validate_service(name, "service")


@pytest.mark.parametrize("value", [0, 601, True, "30", None])
def test_seconds_are_a_number_in_range(value):
    with pytest.raises(SaltInvocationError):
        settings_mod.validate_seconds(value, "timeout")
    assert settings_mod.validate_seconds(0, "wait", 0, 600) == 0


def test_profile_auto_chooses_from_the_box_and_says_why():
    small = {"memory": 1 << 30, "congestion": {"available": ["reno", "bbr", "cubic"], "allowed": ["reno", "bbr"],
                                               "child": False}}
    chosen = resolve({"profile": "auto"}, box=small)
    assert chosen["profile"] == "low-memory"
    assert any(note.startswith("auto: 1.0 GiB of memory, under 2 GiB: low-memory") for note in chosen["notes"])
    big = dict(small, memory=24 << 30)
    assert resolve({"profile": "auto"}, box=big)["profile"] == "bbr"
    # In a container whose namespace may not choose bbr, and on a kernel without it: low-latency.
    child = dict(big, congestion={"available": ["reno", "bbr"], "allowed": ["reno"], "child": True})
    assert resolve({"profile": "auto"}, box=child)["profile"] == "low-latency"
    without = dict(big, congestion={"available": ["reno", "cubic"], "allowed": ["reno", "cubic"], "child": False})
    note = next(n for n in resolve({"profile": "auto"}, box=without)["notes"] if n.startswith("auto:"))
    assert "bbr is not available here (available: reno cubic): low-latency" in note
    # The default stays what it was; a pillar profile named auto is that profile.
    assert resolve({})["profile"] == DEFAULTS["profile"] == "low-latency"
    mine = {"profile": "auto", "profiles": {"auto": {"include": "bbr"}}}
    assert resolve(mine, box=small)["chain"] == ["auto", "bbr", "low-latency", "high-latency"]


def test_a_profile_gives_its_reason_per_key_and_a_later_value_drops_it():
    resolved = resolve({"profile": "low-memory"})
    assert "stops reading upstream for a slow client" in resolved["reasons"]["net.ipv4.tcp_notsent_lowat"]
    mine = resolve({"profile": "mine", "profiles": {"mine": {"include": "low-memory", "sysctls": {
        "net.ipv4.tcp_notsent_lowat": 131072}}}})
    assert "net.ipv4.tcp_notsent_lowat" not in mine["reasons"]
    assert "reasons must be a mapping" in refused({"profile": "x", "profiles": {"x": {"reasons": ["why"]}}})
