"""The pure parts of the systemd-in-a-container harness (tests/support/
systemd_*.py): the stand-in launcher's JSON5 reading, which host paths a
host-mode box sees, the host snapshot diff, and the launcher's shell syntax.
The harness itself is exercised end to end in
tests/integration/test_systemd_harness.py."""

import subprocess

import pytest

from support import systemd_box, systemd_standin, systemd_units
from support.systemd_fixtures import host_changes


def test_json5_as_shadowsocks_rust_configs_use_it():
    conf = systemd_standin.json5_loads(systemd_units.SHADOWSOCKS_RUST["/etc/shadowsocks-rust/extra.json"], "extra")
    assert conf["servers"][0]["server_port"] == systemd_units.SSRUST_INSTANCE_PORT
    text = '{"a": "x // not, a comment", "b": "q\\"/*", "c": [1, 2, ], /* c */ "d": "e,}", // end\n}'
    assert systemd_standin.json5_loads(text, "t") == {"a": "x // not, a comment", "b": 'q"/*', "c": [1, 2], "d": "e,}"}


def test_json5_error_names_the_file(capsys):
    with pytest.raises(SystemExit):
        systemd_standin.json5_loads('{"a": }', "/etc/shadowsocks-rust/bad.json")
    assert "/etc/shadowsocks-rust/bad.json: not JSON5" in capsys.readouterr().err


def test_packaged_configs_parse():
    for text in (systemd_units.SHADOWSOCKS_RUST["/etc/shadowsocks-rust/config.json"],
                 systemd_units.XRAY["/usr/local/etc/xray/config.json"],
                 systemd_units.SINGBOX["/etc/sing-box/config.json"], systemd_units.V2RAY_CONFIG):
        assert systemd_standin.json5_loads(text, "config")


def test_what_a_host_mode_box_sees():
    assert systemd_box.visible_in_host_mode("/")
    assert not systemd_box.visible_in_host_mode("/tmp")          # a tmpfs of its own inside
    assert not systemd_box.visible_in_host_mode("/tmp/pytest-of-root/x")
    assert not systemd_box.visible_in_host_mode("/proc/self")    # another mount: the bind is not recursive


def test_host_changes_names_only_what_changed():
    before = {"mounts": ["a"], "sysctls": {"fs/x": "1", "fs/y": "2"}}
    after = {"mounts": ["a"], "sysctls": {"fs/x": "1", "fs/y": "3"}}
    assert host_changes(before, after) == {"sysctls": {"fs/y": ("2", "3")}}
    assert host_changes(before, before) == {}


def test_launcher_is_valid_sh():
    subprocess.run(["sh", "-n", "-c", systemd_box._LAUNCHER], check=True)
