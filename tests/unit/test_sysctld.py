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


# --------------------------------------------------------------------------
# Line separators and whitespace, as the boot readers see them
# --------------------------------------------------------------------------
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import pytest  # noqa: E402

KEEPALIVE = "net.ipv4.tcp_keepalive_time"
INTVL = "net.ipv4.tcp_keepalive_intvl"
PROBES = "net.ipv4.tcp_keepalive_probes"
# Keys of the network namespace only: `sysctl -p` in `unshare -n` writes them
# there for real and never touches the host's.
PER_NAMESPACE = (KEEPALIVE, INTVL, PROBES)
SYSTEMD_SYSCTL = next((p for p in ("/lib/systemd/systemd-sysctl", "/usr/lib/systemd/systemd-sysctl")
                       if os.access(p, os.X_OK)), None)

# Characters Python's splitlines() and strip() treat as line ends or blanks
# that neither boot reader does.
NOT_SEPARATORS = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("char", NOT_SEPARATORS)
def test_a_character_python_splits_on_does_not_end_a_comment(char):
    text = f"# note{char}{KEEPALIVE} = 7000\n"
    assert sysctld.parse_conf(text) == [] and sysctld.parse_conf(text, either=True) == []
    out = sysctld.render_conf(text, {KEEPALIVE: "1200"}, {}, "p")
    assert out.startswith(text)  # the comment, byte for byte
    assert sysctld.parse_conf(out) == [(3, KEEPALIVE, "1200")]


def test_a_byte_order_mark_is_not_stripped_the_first_key_is_not_the_managed_one():
    text = f"\ufeff{KEEPALIVE} = 7000\n{INTVL} = 30\n"
    assert sysctld.parse_conf(text) == [(0, f"\ufeff{KEEPALIVE}", "7000"), (1, INTVL, "30")]
    out = sysctld.render_conf(text, {KEEPALIVE: "1200", INTVL: "60"}, {}, "p")
    assert out == f"\ufeff{KEEPALIVE} = 7000\n{INTVL} = 60\n{sysctld.MANAGED_HEADER}\n# profile: p\n{KEEPALIVE} = 1200\n"


# (text, what procps reads, what systemd-sysctl reads): each checked against
# the real readers below.
DISPUTED = [
    (f"# a\r{KEEPALIVE} = 1003\n", None, [(KEEPALIVE, "1003")]),  # a lone CR ends a line for systemd
    (f"# a\0{KEEPALIVE} = 1004\n", None, [(KEEPALIVE, "1004")]),  # so does a NUL; procps stops reading there
    (f"\f{KEEPALIVE} = 1009\n", (KEEPALIVE, "1009"), [(f"\f{KEEPALIVE}", "1009")]),  # isspace() vs WHITESPACE
    (f"{KEEPALIVE}\f= 1012\n", (KEEPALIVE, "1012"), [(f"{KEEPALIVE}\f", "1012")]),
    (f"{KEEPALIVE} = 1013\f\n", (KEEPALIVE, "1013"), [(KEEPALIVE, "1013\f")]),
    (f"{KEEPALIVE} = 1014\r5\n", (KEEPALIVE, "1014\r5"), [(KEEPALIVE, "1014")]),
    (f"- {KEEPALIVE} = 1015\n", (f" {KEEPALIVE}", "1015"), [(KEEPALIVE, "1015")]),  # systemd strips after '-'
    (f"{INTVL} = 36\r{KEEPALIVE} = 1033\r", (INTVL, f"36\r{KEEPALIVE} = 1033"), [(INTVL, "36"), (KEEPALIVE, "1033")]),
]
AGREED = [
    (f"\r{KEEPALIVE} = 1011\n", (KEEPALIVE, "1011")),
    (f"-{KEEPALIVE}\t=\t1016\r\n", (KEEPALIVE, "1016")),
    (f"net/ipv4/tcp_keepalive_time = 1025", (KEEPALIVE, "1025")),
]


@pytest.mark.parametrize("text, pair", AGREED)
def test_a_line_both_readers_read_alike_sets_the_key(text, pair):
    assert [(k, v) for _, k, v in sysctld.parse_conf(text)] == [pair]
    assert sysctld.render_conf(text, {KEEPALIVE: "1200"}, {}, "p").split("\n")[0].rstrip("\r") == f"{KEEPALIVE} = 1200"


@pytest.mark.parametrize("text, procps, systemd", DISPUTED)
def test_a_line_the_readers_disagree_on_sets_nothing_and_is_disabled(text, procps, systemd):
    ((_, got_procps, got_systemd),) = sysctld.readings(text)
    assert (got_procps, got_systemd) == (procps, systemd)
    assert sysctld.parse_conf(text) == []  # verify does not count it as persisted
    assert {k for _, k, _ in sysctld.parse_conf(text, either=True)} & {KEEPALIVE, INTVL}  # it may override
    out = sysctld.render_conf(text, {KEEPALIVE: "1200"}, {}, "p")
    first = out.split("\n")[0]
    assert first.startswith("# ") and "# disabled by shadowsocks_tuning: sysctl --system reads" in first
    assert all(procps is None and systemd == [] for _, procps, systemd in sysctld.readings(first))
    assert [(k, v) for _, k, v in sysctld.parse_conf(out, either=True)] == [(KEEPALIVE, "1200")]
    assert sysctld.render_conf(out, {KEEPALIVE: "1200"}, {}, "p") == out


def test_foreign_bytes_are_kept_byte_for_byte_even_when_not_utf8():
    raw = b"# caf\xe9 \x0c\xc2\x85 ok\r\nvm.x = 1\x0b\nkernel.y=2"
    text = raw.decode("utf-8", "surrogateescape")
    out = sysctld.render_conf(text, {KEEPALIVE: "1200"}, {}, "p")
    assert out.encode("utf-8", "surrogateescape").startswith(raw + b"\r\n")
    assert [(k, v) for _, k, v in sysctld.parse_conf(text)] == [("kernel.y", "2")]  # `1\v`: systemd keeps the \v


def _run_readers(tmp_path, text):
    """{reader: {key: value}} of the per-namespace keys after the real
    procps `sysctl -p FILE` and `systemd-sysctl FILE` each read `text` in a
    fresh network namespace (values read back from /proc/sys there)."""
    unknown = {k for _, k, _ in sysctld.parse_conf(text, either=True)
               if k not in PER_NAMESPACE and os.path.isfile("/proc/sys/" + k.replace(".", "/"))}
    assert not unknown, f"the test text would write the host's {unknown}"  # guard: never a global key
    path = tmp_path / "t.conf"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    show = "; ".join(f"cat /proc/sys/{k.replace('.', '/')}" for k in PER_NAMESPACE)
    readers = {"procps": ["sysctl", "-q", "-p"]}
    if SYSTEMD_SYSCTL:
        readers["systemd"] = [SYSTEMD_SYSCTL]
    got = {}
    for name, argv in readers.items():
        proc = subprocess.run(["unshare", "-n", "sh", "-c", f'"$@" >/dev/null 2>&1; {show}', "sh", *argv, str(path)],
                              capture_output=True, timeout=20, check=True)
        got[name] = dict(zip(PER_NAMESPACE, proc.stdout.decode().split()))
    return got


needs_readers = pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("sysctl"),
                                   reason="needs unshare and procps sysctl")


@needs_readers
@pytest.mark.parametrize("text, procps, systemd", DISPUTED + [(text, pair, [pair]) for text, pair in AGREED])
def test_the_model_of_each_reader_is_what_the_real_reader_does(tmp_path, text, procps, systemd):
    fresh = _run_readers(tmp_path, "")["procps"]
    got = _run_readers(tmp_path, text)

    def expect(pairs):
        # A value the kernel rejects (`1014\r5`, `1013\f`) leaves the fresh value.
        return {k: v for k, v in pairs if k in PER_NAMESPACE and v.isdigit()}

    assert {k: v for k, v in got["procps"].items() if v != fresh[k]} == expect([procps] if procps else [])
    if "systemd" in got:
        assert {k: v for k, v in got["systemd"].items() if v != fresh[k]} == expect(systemd)


HOSTILE = [text for text, _, _ in DISPUTED] + [text for text, _ in AGREED] + [
    "".join(f"# note{c}{KEEPALIVE} = 7000\n" for c in NOT_SEPARATORS),
    f"\ufeff{KEEPALIVE} = 7000\n",
    f"{KEEPALIVE} = 7000\r\n{PROBES} = 4\r\n# caf\udce9\r\n{KEEPALIVE} = 7001",
]


@needs_readers
@pytest.mark.parametrize("text", HOSTILE)
def test_the_rendered_file_sets_the_managed_keys_in_both_real_readers(tmp_path, text):
    """The file `render_conf` writes, read by the real `sysctl -p` (and
    `systemd-sysctl`) in a fresh network namespace, sets exactly the managed
    values: no managed key is hidden in a comment or overridden by a line the
    two readers split differently."""
    values = {KEEPALIVE: "1234", INTVL: "56"}
    out = sysctld.render_conf(text, values, {}, "p")
    for reader, got in _run_readers(tmp_path, out).items():
        assert {k: got[k] for k in values} == values, (reader, out)
    assert {k: v for _, k, v in sysctld.parse_conf(out) if k in values} == values
