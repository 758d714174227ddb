"""Hostile and malformed input through a real `salt-call` inside a fresh
network namespace: a refused input writes nothing (no file, no saved
originals, no live value changed), from pillar and from the command line.
The property-based side of the same rule is tests/unit/test_fuzz.py;
tests/FAULTS.md is the table of these rows."""


from sstuning_catalogue import CATALOGUE  # the flat engine file (pytest.ini puts _utils on sys.path)
from support import common
from support.common import no_temporaries, state_of

SLS = "shadowsocks.tuning.sysctl"
KEYS = sorted(CATALOGUE)


def live_values(netns, keys=KEYS):
    return common.live_values(netns, keys)

SALT_CALL_CASES = [
    ({"sysctls": {"net/../../etc/shadow": 1}}, "'net/../../etc/shadow': malformed"),
    ({"sysctls": {"net.core.somaxconn": "4096\nkernel.core_pattern = |/bin/sh"}}, "net.core.somaxconn: '4096\\nkernel.core_pattern = |/bin/sh'"),
    ({"sysctls": {"net.ipv4.tcp_fin_timeout": 30, "kernel.pid_max": "1=2"}}, "kernel.pid_max: '1=2' is not a plain printable value"),
    ({"sysctls": {"net.ipv4.tcp_fin_timeout": -5}}, "net.ipv4.tcp_fin_timeout: -5 is not an integer"),
    ({"profile": "x\nkernel.core_pattern = |/tmp/evil",
      "profiles": {"x\nkernel.core_pattern = |/tmp/evil": {"include": "low-latency"}}}, "'x\\nkernel.core_pattern = |/tmp/evil'"),
    # The open-file half of the pillar stops the sysctl state too.
    ({"limits": {"init_scripts": ["/etc/init.d/ss\nreboot"]}},
     "pillar shadowsocks:tuning:limits:init_scripts[0]:path: '/etc/init.d/ss\\nreboot' must be an absolute path"),
    ({"nofile": "51200; reboot"}, "pillar shadowsocks:tuning:nofile: '51200; reboot' is not a positive integer"),
]


def test_hostile_input_through_salt_call_writes_nothing(masterless):
    before = live_values(masterless.netns)
    for tuning, message in SALT_CALL_CASES:
        masterless.pillar({"config": str(masterless.config), **tuning})
        ret = state_of(masterless.run("state.apply", SLS))
        assert ret["result"] is False and ret["changes"] == {}, ret
        assert message in ret["comment"], (message, ret["comment"])
    dry = state_of(masterless.run("state.apply", SLS, "test=True"))  # test mode refuses it alike
    assert dry["result"] is False and message in dry["comment"]
    # From the command line: keys that try to leave /proc/sys, a config path
    # that points at a file that is not a sysctl.d file.
    secret = masterless.root / "shadow"
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    masterless.pillar({"config": str(masterless.config)})
    for args, message in [
        (("shadowsocks_tuning.get", "../../../etc/shadow"), "sysctl key '../../../etc/shadow': malformed"),
        (("shadowsocks_tuning.set", "net/../../etc/shadow", "1"), "sysctl key 'net/../../etc/shadow': malformed"),
        (("shadowsocks_tuning.apply", f"config={secret}"), f"{str(secret)!r} must be an absolute file path"),
        (("state.single", "shadowsocks_tuning.tuned", "name=x", f"config={secret}"), f"{str(secret)!r} must be an absolute file path"),
    ]:
        result = masterless.run(*args)
        assert result.returncode != 0, result
        assert message in result.stdout + result.stderr, (message, result.stdout, result.stderr)
    assert secret.read_text() == "root:$6$hash:19000:0:99999:7:::\n" and secret.stat().st_mode & 0o777 == 0o600
    assert not masterless.config.exists()
    assert not (masterless.root / "state" / "originals.json").exists()
    assert no_temporaries(masterless.root)
    assert live_values(masterless.netns) == before


def test_set_assignment_refuses_keys_and_values_a_shell_would_misread(masterless):
    """MAXFD=N lands in a file an init script sources as root: a key or value
    the shell would split, expand or run is refused and the file is untouched."""
    defaults = masterless.root / "shadowsocks-libev"
    defaults.write_text("A=1\n")
    for key, value in [("MAX FD", "1"), ("1X", "1"), ("MAXFD", "1; rm -rf /"), ("MAXFD", "$(id)"),
                       ("MAXFD", "a b"), ("MAXFD", "True"), ("MAXFD", "null")]:
        result = masterless.run("shadowsocks_tuning.set_assignment", str(defaults), key, value)
        assert result.returncode != 0, (key, value, result.stdout)
        named = key if key != "MAXFD" else "MAXFD: "
        assert named in result.stdout + result.stderr, (key, value, result.stdout, result.stderr)
        assert defaults.read_text() == "A=1\n", (key, value)
    assert not (masterless.root / "state" / "originals.json").exists()
    # A plain value goes through, and is the only change.
    assert masterless.run("shadowsocks_tuning.set_assignment", str(defaults), "MAXFD", "4096").returncode == 0
    assert defaults.read_text().endswith("\nMAXFD=4096\n") and defaults.read_text().startswith("A=1\n")
