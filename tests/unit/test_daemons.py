"""The daemon registry (``sstuning_daemons``): every built-in kind has the
fields its docstring documents, of the documented types; every program is a
name a process can go by and is found by under that name; the lookups
``program_names``, ``server_names`` and ``kind_of``; and settings resolve the
registry as it is, with no problem to report."""

import os
import re

import pytest

import sstuning_daemons as daemons
import sstuning_procfs as procfs
import sstuning_settings as settings_mod

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")  # what pillar accepts as a program name
VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
KINDS = sorted(daemons.KINDS)


def names(value):
    return isinstance(value, list) and value and all(isinstance(v, str) and NAME.match(v) for v in value)


def absolute(value):
    return isinstance(value, str) and os.path.isabs(value) and os.path.normpath(value) == value


@pytest.mark.parametrize("name", KINDS)
def test_every_field_of_a_built_in_kind_is_of_its_documented_type(name):
    kind = daemons.KINDS[name]
    assert set(kind) <= set(daemons.FIELDS), set(kind) - set(daemons.FIELDS)
    assert isinstance(kind["description"], str) and kind["description"] and "\n" not in kind["description"]
    assert names(kind["programs"])
    checks = {
        "plugins": names,
        "service": lambda v: isinstance(v, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9@._+:-]*", v),
        "pidfile": absolute,
        "units": lambda v: isinstance(v, list) and v and all(
            isinstance(u, str) and settings_mod.validate_unit(u, name) == u for u in v),
        "defaults_file": absolute,
        "defaults_limit": lambda v: v == "ulimit" or (isinstance(v, str) and VARIABLE.match(v)),
        "minfds": absolute,
        "config_limit": lambda v: isinstance(v, str) and VARIABLE.match(v),
        "raises_soft": lambda v: v is True or v is False,
        "needs_ports": lambda v: v is True or v is False,
        "port_options": lambda v: isinstance(v, list) and v and all(
            isinstance(o, str) and re.fullmatch(r"--?[A-Za-z0-9][A-Za-z0-9-]*", o) for o in v),
        "children": lambda v: v == "inherit",
        "configs": lambda v: isinstance(v, dict) and set(v) == {"paths", "format", "ports"}
        and all(absolute(p) for p in v["paths"]) and v["format"] in settings_mod.CONFIG_FORMATS
        and all(isinstance(f, str) and f for f in v["ports"]),
    }
    for field, check in checks.items():
        if field in kind:
            assert check(kind[field]), (name, field, kind[field])
    # A defaults file says how it sets the limit; a pidfile belongs to a service.
    assert ("defaults_file" in kind) == ("defaults_limit" in kind), name
    assert "pidfile" not in kind or "service" in kind, name


@pytest.mark.parametrize("name", KINDS)
def test_every_program_is_found_as_a_process_under_its_name(name):
    """The kernel keeps the first 15 bytes of a program's name as its comm
    (outline-ss-server runs as outline-ss-serv): each program and plugin is
    still found under its full name, by comm or by its command line."""
    kind = daemons.KINDS[name]
    everything = daemons.program_names()
    for program in kind["programs"] + kind.get("plugins", []):
        comm = program[:procfs.COMM_LENGTH]
        assert procfs.match_name(comm, [f"/usr/bin/{program}", "-c", "/etc/x.json"], everything) == program
        assert daemons.kind_of(program) in (name, *[k for k in KINDS if program in daemons.KINDS[k].get("plugins", [])])


def test_no_program_belongs_to_two_kinds():
    seen = {}
    for name in KINDS:
        for program in daemons.KINDS[name]["programs"]:
            assert program not in seen, f"{program} is a program of {seen.get(program)} and {name}"
            seen[program] = name


def test_program_names_server_names_and_kind_of():
    everything = daemons.program_names()
    assert {"supervisord", "ss-server", "ssserver", "outline-ss-server", "xray", "v2ray", "sing-box"} <= everything
    assert set(daemons.PLUGINS) <= everything
    # The servers that start SIP003 plugins as children.
    assert daemons.server_names() == set(daemons.KINDS["shadowsocks_libev"]["programs"]) | set(
        daemons.KINDS["shadowsocks_rust"]["programs"])
    assert daemons.kind_of("ss-server") == "shadowsocks_libev"
    assert daemons.kind_of("ssservice") == "shadowsocks_rust"
    assert daemons.kind_of("supervisord") == "supervisor"
    assert daemons.kind_of("obfs-server") == "shadowsocks_libev"  # the first kind that lists the plugin
    assert daemons.kind_of("sshd") is None
    # Of other kinds (pillar's): the same lookups.
    own = {"mine": {"programs": ["my-ss"], "plugins": ["my-plugin"]}, "other": {"programs": ["other-ss"]}}
    assert daemons.program_names(own) == {"my-ss", "my-plugin", "other-ss"}
    assert daemons.server_names(own) == {"my-ss"}
    assert daemons.kind_of("my-plugin", own) == "mine" and daemons.kind_of("ss-server", own) is None


def test_settings_resolve_the_registry_as_it_is():
    kinds = settings_mod.resolve({})["limits"]["kinds"]
    assert list(kinds) == list(daemons.KINDS)
    for name, kind in kinds.items():
        builtin = daemons.KINDS[name]
        for field in daemons.FIELDS:
            if field in builtin:
                assert kind[field] == builtin[field], (name, field)
