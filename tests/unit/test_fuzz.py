"""Hostile and malformed input, property-based (hypothesis).

The engine's pure functions - validate_key, normalise, resolve with a pillar
dict, and the rendering of the persisted file - get fuzzed keys, values,
profile names and paths. The rule they check: every input is either refused
with a SaltInvocationError that names the offending key, value, profile or
path, or it is harmless (a key that stays inside /proc/sys, a value that
cannot add a line to local.conf).

A few representative cases go through a real `salt-call` in
tests/functional/test_fuzz_salt_call.py, to show that a refused input writes
nothing. tests/FAULTS.md is the table of these rows.
"""

import os
import re

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from salt.exceptions import SaltInvocationError

import sstuning_sysctl as sysctl
import sstuning_sysctld as sysctld
from sstuning_catalogue import CATALOGUE, normalise, validate_key
from sstuning_settings import resolve

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# What a safe key looks like once accepted: dot-separated ASCII names under a
# known top level, so that the /proc/sys path built from it has no '..', no
# '/', no blank and no control character in any component.
SAFE_KEY = re.compile(r"(abi|crypto|debug|dev|fs|kernel|net|sunrpc|user|vm)(\.[A-Za-z0-9_][A-Za-z0-9_@:+-]*)+\Z")
CANONICAL = {
    "int": re.compile(r"[0-9]+\Z"),
    "range": re.compile(r"[0-9]+ [0-9]+\Z"),
    "triple": re.compile(r"[0-9]+ [0-9]+ [0-9]+\Z"),
    "word": re.compile(r"[a-z0-9_]{1,32}\Z"),
    "ports": re.compile(r"(?:[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*)?\Z"),
}

# Fragments an attacker (or a typo) puts in a key, a value or a name.
HOSTILE = [
    "/", "..", "../", "/etc/shadow", "\0", "\n", "\r", "\r\n", "\t", " ", "=", "#", ";",
    "\u2028", "\x85", "\u3002", "\uff0e", "\u0131", "\u00e9", "\U0001f600", "$(id)", "`id`", "|",
]
hostile = st.sampled_from(HOSTILE)
# Free text, and text glued from the pieces that matter here.
any_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.lists(
    st.sampled_from(list("net.core/_-=#@:+ \n\r\t\0.") + ["somaxconn", "ipv4"] + HOSTILE), max_size=12
).map("".join)
catalogue_key = st.sampled_from(sorted(CATALOGUE))
json_scalar = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | any_text
fuzz_value = json_scalar | st.lists(json_scalar, max_size=4) | st.dictionaries(any_text, json_scalar, max_size=2)


def refused(call, *args, **kwargs):
    with pytest.raises(SaltInvocationError) as err:
        call(*args, **kwargs)
    return str(err.value)


def names_key(message, key):
    """validate_key quotes the key (its first 40 characters when it is long)."""
    return (repr(key) if len(key) <= 255 else repr(key[:40])) in message


def inside_proc_sys(key):
    path = os.path.normpath(os.path.join("/proc/sys", *key.split(".")))
    return path.startswith("/proc/sys/") and all(part not in ("", ".", "..") for part in key.split("."))


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------
@FUZZ
@given(key=any_text)
@example(key="net/../../etc/shadow")
@example(key="..")
@example(key="/etc/shadow")
@example(key="net.core.somaxconn\n")
@example(key="net.core\n.somaxconn")
@example(key="net.core.somaxconn\0")
def test_any_key_is_refused_by_name_or_stays_inside_proc_sys(key):
    try:
        accepted = validate_key(key)
    except SaltInvocationError as exc:
        assert names_key(str(exc), key)
        return
    assert accepted == key
    assert SAFE_KEY.match(key), key
    assert inside_proc_sys(key)
    assert key.isascii() and key.isprintable()


@FUZZ
@given(prefix=st.sampled_from(["net.core.", "net.ipv4.", "fs.", "net.ipv4.conf.", ""]), bad=hostile, suffix=any_text)
def test_keys_with_traversal_separators_controls_or_unicode_are_refused(prefix, bad, suffix):
    key = prefix + "somaxconn" + bad + suffix
    assert names_key(refused(validate_key, key), key)


@FUZZ
@given(key=st.text(max_size=300).filter(lambda k: len(k) > 255))
def test_overlong_keys_are_refused(key):
    assert "longer than 255 characters" in refused(validate_key, key)


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------
@FUZZ
@given(key=catalogue_key, value=fuzz_value)
@example(key="net.core.somaxconn", value="4096\nkernel.core_pattern = |/bin/sh")
@example(key="net.core.somaxconn", value="4096 = 1")
@example(key="net.ipv4.tcp_rmem", value="4096 87380 67108864\n")
@example(key="net.ipv4.tcp_congestion_control", value="bbr\nkernel.core_pattern=|/bin/sh")
@example(key="fs.file-max", value=2**63)
@example(key="fs.file-max", value=-1)
@example(key="net.core.somaxconn", value="\u0664\u0660\u0669\u0666")  # Arabic-Indic 4096
@example(key="net.core.somaxconn", value=["4096\n"])
def test_catalogue_values_are_refused_by_key_or_canonical(key, value):
    spec = CATALOGUE[key]
    try:
        text = normalise(key, value)
    except SaltInvocationError as exc:
        assert key in str(exc)
        return
    assert CANONICAL[spec["type"]].match(text), (key, value, text)
    if spec["type"] == "ports":
        assert all(spec["min"] <= int(n) <= spec["max"] for n in re.split(r"[,-]", text) if n)
    elif spec["type"] != "word":
        numbers = [int(n) for n in text.split()]
        assert all(spec["min"] <= n <= spec["max"] for n in numbers)
        assert numbers == sorted(numbers)
    assert text not in spec.get("refuse", {})


@FUZZ
@given(key=catalogue_key.filter(lambda k: CATALOGUE[k]["type"] not in ("word", "ports")),
       number=st.integers(min_value=-(2**70), max_value=2**70))
def test_huge_and_negative_numbers_are_refused_outside_the_kernel_range(key, number):
    spec = CATALOGUE[key]
    count = {"int": 1, "range": 2, "triple": 3}[spec["type"]]
    value = " ".join([str(number)] * count)
    if 0 <= number and spec["min"] <= number <= spec["max"] and value not in spec.get("refuse", {}):
        assert normalise(key, value) == value
    else:
        assert key in refused(normalise, key, value)


@FUZZ
@given(key=st.sampled_from(["net.ipv4.conf.all.rp_filter", "kernel.pid_max", "vm.swappiness"]), value=fuzz_value)
@example(key="kernel.pid_max", value="65536\nkernel.core_pattern = |/bin/sh")
@example(key="kernel.pid_max", value="a=b")
@example(key="kernel.pid_max", value="1 # comment")
def test_foreign_values_cannot_add_a_line_or_a_comment(key, value):
    try:
        text = normalise(key, value)
    except SaltInvocationError as exc:
        assert key in str(exc)
        return
    assert text and text.isascii() and text.isprintable()
    assert not set(text) & set("=#\n\r\0")


@FUZZ
@given(key=catalogue_key, value=fuzz_value)
def test_an_accepted_value_renders_as_exactly_one_line(key, value):
    try:
        text = normalise(key, value)
    except SaltInvocationError:
        return
    rendered = sysctld.render_conf("# ops\nvm.swappiness = 10\n", {key: text}, {}, "low-latency")
    assert sysctld.parse_conf(rendered) == [(1, "vm.swappiness", "10"), (4, key, text)]


# --------------------------------------------------------------------------
# Whole pillars: profiles, include, config paths, policies
# --------------------------------------------------------------------------
def assert_every_problem_names_its_pillar_path(message):
    *problems, last = message.split("\n")
    assert last.startswith("Nothing was changed")
    for problem in problems:
        assert "shadowsocks:tuning" in problem.split(": ")[0] or problem.startswith("profile "), problem


profile_name = st.sampled_from(["high-latency", "low-latency", "bbr", "custom", "x\nkernel.core_pattern = |/tmp/evil"]) | any_text
pillar_strategy = st.fixed_dictionaries(
    {},
    optional={
        "profile": profile_name | st.integers(),
        "profiles": st.dictionaries(
            profile_name,
            st.fixed_dictionaries({}, optional={
                "include": profile_name,
                "sysctls": st.dictionaries(catalogue_key | any_text, fuzz_value, max_size=3),
                "description": any_text,
            }),
            max_size=3,
        ),
        "sysctls": st.dictionaries(catalogue_key | any_text, fuzz_value, max_size=4),
        "config": st.sampled_from(["/etc/sysctl.d/local.conf", "/etc/shadow", "rel.conf", "/etc/sysctl.d/../x.conf"])
        | any_text.map(lambda s: "/etc/sysctl.d/" + s),
        "force": st.booleans() | st.lists(any_text, max_size=2) | any_text,
        "policy": st.dictionaries(
            st.sampled_from(["unavailable", "override", "keys", "other"]),
            st.sampled_from(["warn", "strict"]) | json_scalar | st.dictionaries(catalogue_key, st.sampled_from(["warn", "strict"]) | json_scalar, max_size=2),
            max_size=2,
        ),
        "congestion_fallback": json_scalar,
    },
)


@FUZZ
@given(pillar=pillar_strategy)
@example(pillar={"profile": "evil", "profiles": {"evil": {"include": "low-latency", "sysctls": {"kernel.core_pattern": "|/tmp/x"}}}})
@example(pillar={"profile": "x\nkernel.core_pattern = |/tmp/evil",
                 "profiles": {"x\nkernel.core_pattern = |/tmp/evil": {"include": "low-latency"}}})
@example(pillar={"config": "/etc/shadow"})
@example(pillar={"config": "/etc/sysctl.d/local.conf\nx"})
def test_a_fuzzed_pillar_is_refused_or_renders_only_its_own_keys(pillar):
    try:
        resolved = resolve(pillar)
    except SaltInvocationError as exc:
        event("refused")
        assert_every_problem_names_its_pillar_path(str(exc))
        return
    event("accepted")
    config = resolved["config"]
    assert os.path.isabs(config) and config.endswith(".conf")
    assert not set(config) & {"\0", "\n", "\r"} and ".." not in config.split("/")
    for key in resolved["sysctls"]:
        assert SAFE_KEY.match(key) and inside_proc_sys(key)
    # Whatever the pillar says, the file it leads to holds only its own keys
    # (a profile name or a value must not smuggle in a line of its own).
    rendered = sysctld.render_conf(None, resolved["sysctls"], {}, resolved["profile"])
    assert {key: value for _, key, value in sysctld.parse_conf(rendered)} == resolved["sysctls"]
    assert len(sysctld.parse_conf(rendered)) == len(resolved["sysctls"])


@pytest.mark.parametrize(
    "pillar, named",
    [
        ({"sysctls": {"net/../../etc/shadow": 1}}, "'net/../../etc/shadow'"),
        ({"sysctls": {"..": 1}}, "'..'"),
        ({"sysctls": {"/etc/shadow": 1}}, "'/etc/shadow'"),
        ({"sysctls": {"net.core.somaxconn\0": 1}}, "'net.core.somaxconn\\x00'"),
        ({"sysctls": {"net.core.somaxconn\n": 1}}, "'net.core.somaxconn\\n'"),
        ({"sysctls": {"net.core.somaxconn": "4096\nkernel.core_pattern = |/bin/sh"}}, "net.core.somaxconn"),
        ({"sysctls": {"kernel.pid_max": "65536\nkernel.core_pattern = |/bin/sh"}}, "kernel.pid_max"),
        ({"sysctls": {"kernel.pid_max": "a=b"}}, "kernel.pid_max"),
        ({"sysctls": {"net.core.somaxconn": -1}}, "net.core.somaxconn"),
        ({"sysctls": {"fs.file-max": 2**64}}, "fs.file-max"),
        ({"sysctls": {"net.core.somaxconn": "\u0664\u0660\u0669\u0666"}}, "net.core.somaxconn"),
        ({"profile": "x\nkernel.core_pattern = |/tmp/evil",
          "profiles": {"x\nkernel.core_pattern = |/tmp/evil": {"include": "low-latency"}}}, "'x\\nkernel.core_pattern = |/tmp/evil'"),
        ({"profile": "../../etc/shadow"}, "'../../etc/shadow'"),
        ({"config": "relative.conf"}, "'relative.conf'"),
        ({"config": "/etc/sysctl.d/../shadow.conf"}, "'/etc/sysctl.d/../shadow.conf'"),
        ({"config": "/etc/shadow"}, "'/etc/shadow'"),
        ({"config": "/etc/sysctl.d/local.conf\0"}, "'/etc/sysctl.d/local.conf\\x00'"),
        ({"config": "/etc/sysctl.d/a.conf\n/etc/b.conf"}, "'/etc/sysctl.d/a.conf\\n/etc/b.conf'"),
        ({"congestion_fallback": "bbr;reboot"}, "bbr;reboot"),
        ({"policy": {"keys": "warn"}}, "shadowsocks:tuning:policy:keys"),
    ],
)
def test_each_hostile_pillar_is_refused_naming_what_is_wrong(pillar, named):
    assert named in refused(resolve, pillar)


@FUZZ
@given(name=any_text | hostile)
@example(name="tcp_x\n")
@example(name="tcp_bbr; reboot")
@example(name="-r")
def test_modprobe_refuses_any_name_that_is_not_a_plain_module_name(name):
    if re.fullmatch(r"[a-z0-9_]{1,64}", name):
        return  # a plain name would really run modprobe; the argv is fixed and ends in '--', name
    ok, message = sysctl.modprobe(name, dry_run=True)
    assert not ok and message == f"refusing to load module {name!r}"


# --------------------------------------------------------------------------
# Whole pillars: the open-file half (nofile, limits)
# --------------------------------------------------------------------------
path_text = st.sampled_from(["/etc/default/supervisor", "/etc/init.d/ss", "relative", "/etc/../shadow", "/x\ny", ""]) | any_text
name_text = st.sampled_from(["supervisor", "ss@x.service", "../x", "a/b", "x.socket"]) | any_text
limits_strategy = st.fixed_dictionaries({}, optional={
    "init_system": st.sampled_from(["auto", "systemd", "sysvinit"]) | json_scalar,
    "restart": st.sampled_from(["live", "running", "always", "never"]) | json_scalar,
    "timeout": st.integers(-5, 700) | json_scalar,
    "supervisor": st.none() | json_scalar | st.fixed_dictionaries({}, optional={
        "service": name_text, "pidfile": path_text, "defaults_file": path_text, "config": path_text,
        "unit": name_text, "colour": json_scalar}),
    "shadowsocks_libev": st.none() | st.fixed_dictionaries({}, optional={
        "service": name_text, "defaults_file": path_text, "units": st.lists(name_text, max_size=2) | json_scalar,
        "defaults_limit": st.sampled_from(["ulimit", "MAXFD", "MAX FD", "X;reboot"]) | json_scalar}),
    # A kind of pillar's own: only `programs` is required.
    "my_server": st.none() | json_scalar | st.fixed_dictionaries({}, optional={
        "programs": st.lists(name_text, max_size=2) | json_scalar, "plugins": st.lists(name_text, max_size=1),
        "service": name_text, "pidfile": path_text, "defaults_file": path_text, "units": st.lists(name_text, max_size=2),
        "raises_soft": json_scalar, "children": json_scalar}),
    "init_scripts": st.lists(path_text | st.fixed_dictionaries({"path": path_text}, optional={
        "service": name_text, "pidfile": path_text, "colour": json_scalar}), max_size=2) | json_scalar,
    "units": st.lists(name_text, max_size=2) | json_scalar,
    "verify": st.none() | st.fixed_dictionaries({}, optional={
        "pidfiles": st.lists(path_text, max_size=2) | json_scalar, "wait": st.integers(-1, 700) | json_scalar}),
})
SERVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+:-]*\Z")
UNIT = re.compile(r"[A-Za-z0-9:_.\\-]+(@[A-Za-z0-9:_.\\-]*)?\.service\Z")


def plain_absolute(path):
    return (isinstance(path, str) and os.path.isabs(path) and ".." not in path.split("/")
            and not set(path) & {"\0", "\n", "\r"})


# Pillars made only of values that should be accepted, so that the checks
# on accepted settings below see many of them (the free strategy above is
# refused most of the time).
good_path = st.sampled_from(["/etc/default/supervisor", "/etc/init.d/ss", "/srv/x y/defaults", "/run/ss.pid"])
good_unit = st.sampled_from(["supervisor", "ss@x.service", "ss-server@.service", "a.b-c_d.service"])
good_limits = st.fixed_dictionaries({}, optional={
    "init_system": st.sampled_from(["auto", "systemd", "sysvinit"]),
    "restart": st.sampled_from(["live", "running", "always", "never"]),
    "timeout": st.integers(1, 600),
    "supervisor": st.none() | st.fixed_dictionaries({}, optional={
        "service": st.sampled_from(["supervisor", "sup.er@v"]), "pidfile": good_path, "defaults_file": good_path,
        "config": good_path, "unit": good_unit}),
    "my_server": st.none() | st.fixed_dictionaries({"programs": st.lists(
        st.sampled_from(["my-ss", "ss_2", "x.y+z"]), min_size=1, max_size=2)}, optional={
        "defaults_file": good_path, "defaults_limit": st.sampled_from(["ulimit", "MAXFD", "NOFILE_2"]),
        "units": st.lists(good_unit, max_size=2), "service": st.sampled_from(["my-ss"]), "raises_soft": st.booleans()}),
    "init_scripts": st.lists(good_path | st.fixed_dictionaries({"path": good_path}, optional={
        "service": st.sampled_from(["ss", "ss-2"]), "pidfile": good_path}), max_size=2),
    "units": st.lists(good_unit, max_size=2),
    "verify": st.fixed_dictionaries({}, optional={"pidfiles": st.lists(good_path, max_size=2),
                                                  "wait": st.integers(0, 600)}),
})
PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


@FUZZ
@given(nofile=st.integers(-2, 2**21) | st.integers(1, 1048576) | json_scalar, limits=limits_strategy | good_limits,
       systemd=st.booleans())
@example(nofile=51200, limits={"init_scripts": [{"path": "/etc/init.d/ss\nreboot"}]}, systemd=False)
@example(nofile=51200, limits={"units": ["../../etc/passwd"]}, systemd=True)
@example(nofile="51200; reboot", limits={}, systemd=False)
@example(nofile=51200, limits={"my_server": {"programs": ["../bin/sh"]}}, systemd=False)
@example(nofile=51200, limits={"shadowsocks_libev": {"defaults_limit": "X;reboot"}}, systemd=False)
def test_a_fuzzed_limits_pillar_is_refused_by_path_or_gives_plain_targets(nofile, limits, systemd):
    try:
        resolved = resolve({"nofile": nofile, "limits": limits}, None, {"nr_open": 1048576, "systemd": systemd})
    except SaltInvocationError as exc:
        event("refused")
        assert_every_problem_names_its_pillar_path(str(exc))
        return
    event("accepted")
    assert isinstance(resolved["nofile"], int) and 1 <= resolved["nofile"] <= 1048576
    settings_ = resolved["limits"]
    assert settings_["restart"] in ("live", "running", "always", "never")
    for name, kind in settings_["kinds"].items():
        assert kind["programs"] and all(PROGRAM.match(p) for p in kind["programs"] + kind["plugins"]), kind
        assert kind["defaults_limit"] == "ulimit" or VARIABLE.match(kind["defaults_limit"]), kind
        assert all(UNIT.match(u) for u in kind["units"]), kind
        assert isinstance(kind["raises_soft"], bool)
    for groups in settings_["parts"].values():
        for group in groups:
            for target in group["files"]:
                if target["kind"] == "dropin":
                    assert settings_["init_system"] == "systemd"
                    assert UNIT.match(target["unit"]), target
                else:
                    assert plain_absolute(target["path"]), target
                if target["kind"] == "assignment":
                    assert VARIABLE.match(target["key"]), target
            if group["restart"]:
                assert SERVICE.match(group["restart"]["name"]), group
                assert group["restart"]["pidfile"] is None or plain_absolute(group["restart"]["pidfile"])
    assert all(plain_absolute(p) for p in settings_["verify"]["pidfiles"])
