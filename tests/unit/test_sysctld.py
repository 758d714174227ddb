"""The persisted sysctl.d file: parsed as `sysctl` reads it, rendered with every
foreign line kept byte for byte, and the boot order that finds a later file
overriding a managed key."""

import sstuning_sysctld as sysctld

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
    dropped = {"net.ipv4.tcp_tw_recycle": "absent on this kernel"}
    out = sysctld.render_conf(FOREIGN, values, dropped, "low-latency")
    lines = out.split("\r\n")
    assert lines[0] == "# my own settings"
    assert lines[1] == "vm.swappiness = 10"
    assert lines[2] == "net.core.somaxconn = 4096"  # first occurrence set in place
    assert lines[3] == "; a semicolon comment"
    assert lines[4] == "net.ipv4.tcp_fastopen = 3"  # slash form recognised
    assert "net.core.somaxconn = 256" not in out  # later duplicate would win at boot: removed
    assert lines[5].startswith("# net.ipv4.tcp_tw_recycle = 0  # disabled by shadowsocks_tuning")
    assert lines[6] == "kernel.panic = 5"  # the unterminated last line, now ended
    assert lines[7] == sysctld.MANAGED_HEADER
    assert lines[8] == "# profile: low-latency"
    assert "net.ipv4.tcp_fin_timeout = 30" in lines
    # A second render of its own output changes nothing.
    assert sysctld.render_conf(out, values, dropped, "low-latency") == out


def test_a_new_file_is_the_header_and_the_values():
    out = sysctld.render_conf(None, {"net.core.somaxconn": "4096"}, {}, "bbr")
    assert out == f"{sysctld.MANAGED_HEADER}\n# profile: bbr\nnet.core.somaxconn = 4096\n"


def test_parse_conf_reads_what_sysctl_reads():
    parsed = sysctld.parse_conf(FOREIGN)
    assert [(k, v) for _, k, v in parsed] == [
        ("vm.swappiness", "10"), ("net.core.somaxconn", "128"), ("net.ipv4.tcp_fastopen", "1"),
        ("net.core.somaxconn", "256"), ("net.ipv4.tcp_tw_recycle", "0"), ("kernel.panic", "5"),
    ]
    assert [index for index, _, _ in parsed] == [1, 2, 4, 5, 6, 7]
    assert sysctld.parse_conf("-net.core.somaxconn = 5\n")[0][1:] == ("net.core.somaxconn", "5")
    assert sysctld.parse_conf("net.ipv4.tcp_rmem = 4096\t87380  6291456\n")[0][2] == "4096 87380 6291456"


def test_boot_order_merges_directories_by_name_then_sysctl_conf(tmp_path):
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (etc / "99-late.conf").write_text("")
    (etc / "10-same.conf").write_text("")
    (lib / "10-same.conf").write_text("")  # shadowed by /etc's file of the same name
    (lib / "50-lib.conf").write_text("")
    (lib / "README").write_text("")  # not *.conf: not read
    conf = tmp_path / "sysctl.conf"
    conf.write_text("")
    config = str(etc / "local.conf")  # counts before it is first written
    # By name across directories: "99-late.conf" sorts before "local.conf".
    assert sysctld.boot_order([str(etc), str(lib)], str(conf), config) == [
        str(etc / "10-same.conf"), str(lib / "50-lib.conf"), str(etc / "99-late.conf"), config, str(conf)]


def test_a_later_file_that_sets_a_managed_key_is_found(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    # Read before local.conf (by name, "99" sorts before "l"): the managed file wins.
    (etc / "99-early.conf").write_text("net.core.somaxconn = 1\nnet.ipv4.tcp_fin_timeout = 5\n")
    (etc / "zz-late.conf").write_text("# x\nnet.core.somaxconn = 128\nnet.ipv4.tcp_fastopen = 3\n")
    conf = tmp_path / "sysctl.conf"
    conf.write_text("vm.swappiness = 1\nnet.ipv4.tcp_fin_timeout = 15\n")
    values = {"net.core.somaxconn": "4096", "net.ipv4.tcp_fastopen": "3", "net.ipv4.tcp_fin_timeout": "30"}
    found, note = sysctld.overrides([str(etc)], str(conf), str(etc / "local.conf"), values)
    assert note is None
    assert found == {
        "net.core.somaxconn": (str(etc / "zz-late.conf"), 2, "128"),
        "net.ipv4.tcp_fin_timeout": (str(conf), 2, "15"),
    }  # tcp_fastopen: the same value, no conflict


def test_a_config_outside_the_boot_directories_is_said_to_be_unread(tmp_path):
    found, note = sysctld.overrides([str(tmp_path / "etc")], str(tmp_path / "sysctl.conf"),
                                    str(tmp_path / "elsewhere" / "local.conf"), {"net.core.somaxconn": "4096"})
    assert found == {}
    assert "is not read by `sysctl --system` at boot" in note
