"""Open-file limits, the engine's pure parts: editing `ulimit -n`, `KEY=value`,
supervisord's `minfds` and systemd drop-ins in odd files, validation, and
reading limits and capabilities from /proc."""

import os
import resource
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from salt.exceptions import CommandExecutionError, SaltInvocationError

import shadowsocks_tuning as engine

SUPERVISOR_DEFAULTS = (
    "# Defaults for supervisor initscript\n"
    "# sourced by /etc/init.d/supervisor\n"
    "\n"
    "# Additional options that are passed to the Daemon.\n"
    'DAEMON_OPTS=""\n'
)
INIT_SCRIPT = (
    "#! /bin/sh -e\n"
    "### BEGIN INIT INFO\n"
    "# Provides:          shadowsocks\n"
    "### END INIT INFO\n"
    "\n"
    "DAEMON=/usr/bin/ssserver\n"
    "case \"$1\" in\n"
    "  start) start-stop-daemon --start --exec $DAEMON -- -d start ;;\n"
    "esac\n"
)
SUPERVISORD_CONF = (
    "; supervisor config file\n"
    "\n"
    "[unix_http_server]\n"
    "file=/var/run/supervisor.sock   ; (the path to the socket file)\n"
    "\n"
    "[supervisord]\n"
    "logfile=/var/log/supervisor/supervisord.log ; (main log file)\n"
    "childlogdir=/var/log/supervisor            ; ('AUTO' child log dir)\n"
    "\n"
    "; the below section must remain in the config file for RPC\n"
    "[rpcinterface:supervisor]\n"
    "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n"
)


@pytest.fixture(autouse=True)
def opts(monkeypatch, tmp_path):
    """The engine reads minion options through __opts__; the defaults are the real system."""
    monkeypatch.setattr(engine, "__opts__", {"shadowsocks_tuning.state_dir": str(tmp_path / "state")}, raising=False)


def ulimit(text, n=16384, placement="end"):
    return engine._render_ulimit(text, n, "/etc/test", placement)


def active_ulimit_lines(text):
    return [line.strip() for line in text.split("\n") if line.strip().startswith("ulimit")]


# --------------------------------------------------------------------------
# ulimit -n in a sourced defaults file
# --------------------------------------------------------------------------
def test_a_missing_ulimit_line_is_appended_and_everything_else_is_kept():
    new, old = ulimit(SUPERVISOR_DEFAULTS)
    assert old is None
    assert new.startswith(SUPERVISOR_DEFAULTS)
    assert new[len(SUPERVISOR_DEFAULTS):] == f"{engine.NOFILE_COMMENT}\nulimit -n 16384\n"
    assert ulimit(new) == (new, "16384"), "the second run changes nothing"


def test_an_existing_line_is_replaced_in_place_never_duplicated():
    text = "A=1\n  ulimit -HSn 51200   # raised for ss\nB=2\n"
    new, old = ulimit(text)
    assert old == "51200"
    assert new == "A=1\n  ulimit -n 16384   # raised for ss\nB=2\n"


def test_later_active_lines_are_dropped_and_commented_ones_kept():
    text = "# ulimit -n 4096\nulimit -n 1024\nX=1\n\tulimit -Sn 2048\n#ulimit -n 9\n"
    new, _ = ulimit(text)
    assert new == "# ulimit -n 4096\nulimit -n 16384\nX=1\n#ulimit -n 9\n"
    assert active_ulimit_lines(new) == ["ulimit -n 16384"]


def test_crlf_endings_survive_and_new_lines_use_them():
    text = "A=1\r\n# ulimit -n 5\r\nB=2\r\n"
    new, _ = ulimit(text)
    assert new == f"A=1\r\n# ulimit -n 5\r\nB=2\r\n{engine.NOFILE_COMMENT}\r\nulimit -n 16384\r\n"


def test_a_file_without_final_newline_keeps_that_shape():
    new, _ = ulimit("A=1\nB=2")
    assert new == f"A=1\nB=2\n{engine.NOFILE_COMMENT}\nulimit -n 16384"
    # ... also when the line it replaces or drops was that last line
    assert ulimit("ulimit -n 1")[0] == "ulimit -n 16384"
    assert ulimit("ulimit -n 1\nulimit -n 2")[0] == "ulimit -n 16384"


def test_an_empty_or_absent_file_gets_just_the_line():
    assert ulimit("")[0] == f"{engine.NOFILE_COMMENT}\nulimit -n 16384\n"
    assert ulimit(None)[0] == f"{engine.NOFILE_COMMENT}\nulimit -n 16384\n"


def test_a_variable_limit_is_replaced_by_the_number():
    assert ulimit('ulimit -n "${MAXFD}"\n')[0] == "ulimit -n 16384\n"


def test_a_query_without_value_is_just_another_line():
    assert ulimit("ulimit -n\n")[0] == f"ulimit -n\n{engine.NOFILE_COMMENT}\nulimit -n 16384\n"


@pytest.mark.parametrize(
    "line",
    ["ulimit -n 4096 && exec foo", "[ -n \"$X\" ] && ulimit -n 4096", "ulimit -c unlimited -n 4096",
     "if true; then ulimit -n 4096; fi"],
)
def test_a_compound_ulimit_line_is_refused_with_its_line_number(line):
    with pytest.raises(CommandExecutionError) as err:
        ulimit(f"A=1\n{line}\n")
    assert str(err.value).startswith("/etc/test:2: ")
    assert "plain `ulimit -n N` line" in str(err.value)


def test_other_ulimit_options_and_mentions_are_left_alone():
    text = 'ulimit -c unlimited\necho "see ulimit -n"\n'
    assert ulimit(text)[0] == text + f"{engine.NOFILE_COMMENT}\nulimit -n 16384\n"


# --------------------------------------------------------------------------
# ulimit -n in an init script
# --------------------------------------------------------------------------
def test_in_an_init_script_the_line_goes_before_anything_runs():
    new, _ = ulimit(INIT_SCRIPT, placement="init")
    lines = new.split("\n")
    end = lines.index("### END INIT INFO")
    assert lines[end + 1:end + 3] == [engine.NOFILE_COMMENT, "ulimit -n 16384"]
    assert new.replace(f"{engine.NOFILE_COMMENT}\nulimit -n 16384\n", "") == INIT_SCRIPT
    assert ulimit(new, placement="init")[0] == new


def test_without_lsb_header_it_goes_after_the_leading_comments():
    text = "#!/bin/bash\n# start ss\n\nexec /usr/bin/ss-server -c /etc/ss.json\n"
    new, _ = ulimit(text, placement="init")
    assert new == f"#!/bin/bash\n# start ss\n\n{engine.NOFILE_COMMENT}\nulimit -n 16384\nexec /usr/bin/ss-server -c /etc/ss.json\n"


def test_an_existing_line_in_an_init_script_stays_where_it_is():
    text = "#!/bin/sh\ndo_start() {\n    ulimit -n ${MAXFD}\n    start-stop-daemon --start\n}\n"
    assert ulimit(text, placement="init")[0] == text.replace("${MAXFD}", "16384")


@pytest.mark.parametrize("shebang", ["#!/usr/bin/python3", "#!/usr/bin/env node", "#!/usr/bin/perl -w"])
def test_a_script_in_another_language_is_refused(shebang):
    with pytest.raises(CommandExecutionError) as err:
        ulimit(f"{shebang}\nprint(1)\n", placement="init")
    assert "not a shell script" in str(err.value) and "/etc/test" in str(err.value)


@pytest.mark.parametrize("shebang", ["#!/bin/sh", "#! /bin/sh -e", "#!/usr/bin/env bash", "#!/lib/init/init-d-script"])
def test_shell_scripts_of_every_flavour_are_accepted(shebang):
    assert "ulimit -n 16384" in ulimit(f"{shebang}\ntrue\n", placement="init")[0]


# Files made of lines that never set a limit: the edit adds exactly one line
# (plus its comment) and keeps every byte of the rest, whatever the endings.
_plain_line = st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=30).filter(
    lambda s: "ulimit" not in s
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_plain_line, st.sampled_from(["\n", "\r\n"])), max_size=12), st.booleans(),
       st.integers(min_value=1, max_value=1048576))
def test_property_one_line_added_the_rest_byte_for_byte(lines, unterminated, n):
    text = "".join(body + end for body, end in lines)
    if unterminated and text:
        text = text[:-1] if text.endswith("\n") else text
    new, old = ulimit(text, n)
    assert old is None
    assert new.startswith(text)
    assert active_ulimit_lines(new[len(text):]) == [f"ulimit -n {n}"]
    assert ulimit(new, n)[0] == new


# --------------------------------------------------------------------------
# KEY=value (MAXFD in /etc/default/shadowsocks-libev)
# --------------------------------------------------------------------------
def test_maxfd_is_set_in_place_keeping_quotes_export_and_comment():
    render = engine._render_assignment
    assert render("A=1\nMAXFD=32768\n", "MAXFD", "16384", "/x") == ("A=1\nMAXFD=16384\n", "32768")
    assert render('export MAXFD="32768"  # fds\n', "MAXFD", "16384", "/x")[0] == 'export MAXFD="16384"  # fds\n'
    assert render("#MAXFD=1\nMAXFD=2\r\nMAXFD=3\r\n", "MAXFD", "9", "/x")[0] == "#MAXFD=1\nMAXFD=9\r\n"
    assert render("A=1", "MAXFD", "9", "/x")[0] == f"A=1\n{engine.NOFILE_COMMENT}\nMAXFD=9"
    assert render("MYMAXFD=1\n", "MAXFD", "9", "/x")[0] == f"MYMAXFD=1\n{engine.NOFILE_COMMENT}\nMAXFD=9\n"


@pytest.mark.parametrize("key, value", [("MAX FD", 1), ("1X", 1), ("MAXFD", "1; rm -rf /"), ("MAXFD", "$(id)"),
                                        ("MAXFD", "a b"), ("MAXFD", True), ("MAXFD", None)])
def test_assignment_refuses_keys_and_values_a_shell_would_misread(tmp_path, key, value):
    path = tmp_path / "f"
    path.write_text("A=1\n")
    with pytest.raises(SaltInvocationError):
        engine.set_assignment(str(path), key, value)
    assert path.read_text() == "A=1\n"


# --------------------------------------------------------------------------
# supervisord minfds
# --------------------------------------------------------------------------
def test_minfds_is_added_after_the_last_setting_of_the_supervisord_section():
    new, old = engine._render_minfds(SUPERVISORD_CONF, 16384, "/x")
    assert old is None
    assert new == SUPERVISORD_CONF.replace(
        "childlogdir=/var/log/supervisor            ; ('AUTO' child log dir)\n",
        "childlogdir=/var/log/supervisor            ; ('AUTO' child log dir)\nminfds=16384\n",
    )
    assert engine._render_minfds(new, 16384, "/x") == (new, "16384")


def test_minfds_is_replaced_in_its_section_only_keeping_case_separator_and_comment():
    text = "[program:x]\nminfds=5\n[supervisord]\nMINFDS : 1024 ; low\nminfds=2048\n[other]\nminfds=7"
    new, old = engine._render_minfds(text, 16384, "/x")
    assert old == "1024"
    assert new == "[program:x]\nminfds=5\n[supervisord]\nMINFDS : 16384 ; low\n[other]\nminfds=7"


def test_minfds_in_a_crlf_file_without_final_newline():
    new, _ = engine._render_minfds("[supervisord]\r\nlogfile=/x", 4096, "/x")
    assert new == "[supervisord]\r\nlogfile=/x\r\nminfds=4096"


def test_a_config_without_supervisord_section_is_refused():
    with pytest.raises(CommandExecutionError) as err:
        engine._render_minfds("[program:ss]\ncommand=ss-server\n", 4096, "/etc/supervisor/conf.d/ss.conf")
    assert "/etc/supervisor/conf.d/ss.conf: no [supervisord] section" in str(err.value)


# --------------------------------------------------------------------------
# systemd drop-ins and the choice of init system
# --------------------------------------------------------------------------
def test_dropin_render_and_paths(monkeypatch, tmp_path):
    monkeypatch.setitem(engine.__opts__, "shadowsocks_tuning.systemd_dir", str(tmp_path))
    assert engine._render_dropin(16384, "supervisor.service").endswith("[Service]\nLimitNOFILE=16384\n")
    assert engine.dropin_path("supervisor") == str(tmp_path / "supervisor.service.d" / engine.DROPIN_NAME)
    assert engine.dropin_path("shadowsocks-libev-server@.service") == str(
        tmp_path / "shadowsocks-libev-server@.service.d" / engine.DROPIN_NAME
    )


@pytest.mark.parametrize("unit", ["../etc/passwd", "a/b.service", "x.socket", "", None, "sup ervisor"])
def test_bad_unit_names_are_refused(unit):
    with pytest.raises(SaltInvocationError):
        engine.dropin_path(unit)


def test_systemd_is_chosen_only_when_it_is_pid_1(monkeypatch, tmp_path):
    marker = tmp_path / "run-systemd-system"
    monkeypatch.setitem(engine.__opts__, "shadowsocks_tuning.systemd_marker", str(marker))
    assert engine.init_system() == "sysvinit"
    marker.mkdir()
    assert engine.init_system() == "systemd"
    assert engine.init_system("sysvinit") == "sysvinit"
    with pytest.raises(SaltInvocationError):
        engine.init_system("upstart")


def test_this_machine_has_no_systemd_as_pid_1():
    assert engine.init_system() == ("systemd" if os.path.isdir("/run/systemd/system") else "sysvinit")


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(51200, 51200), ("16384", 16384), (" 1024 ", 1024), (1, 1)])
def test_nofile_values(value, expected):
    assert engine.validate_nofile(value) == expected


@pytest.mark.parametrize("value", [0, -1, "abc", "12k", 1.5, 16384.0, True, None, [1], "", "1e5"])
def test_bad_nofile_values_are_refused(value):
    with pytest.raises(SaltInvocationError) as err:
        engine.validate_nofile(value, "pillar shadowsocks:tuning:nofile")
    assert str(err.value).startswith("pillar shadowsocks:tuning:nofile: ")
    assert "positive integer" in str(err.value)


def test_nofile_above_nr_open_is_refused():
    nr_open = int(open("/proc/sys/fs/nr_open").read())
    with pytest.raises(SaltInvocationError) as err:
        engine.validate_nofile(nr_open + 1)
    assert f"above fs.nr_open ({nr_open})" in str(err.value)
    assert engine.validate_nofile(nr_open) == nr_open


@pytest.mark.parametrize("path", ["relative/file", "/etc/../etc/shadow", "/etc/x\nulimit", "", None])
def test_paths_must_be_absolute_and_plain(path):
    with pytest.raises(SaltInvocationError):
        engine.set_ulimit(path, 1024)


def test_a_missing_file_fails_or_is_skipped_and_nothing_is_created(tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(CommandExecutionError) as err:
        engine.set_ulimit(str(path), 1024)
    assert str(path) in str(err.value) and "does not exist" in str(err.value)
    assert engine.set_ulimit(str(path), 1024, if_missing="skip")["skipped"] is True
    assert not path.exists()


def test_limits_pillar_errors_are_all_collected(tmp_path):
    report = engine.nofile_check(
        nofile="lots",
        limits={
            "restart": "sometimes",
            "supervisor": {"defaults_file": "etc/default/supervisor", "colour": "red"},
            "init_scripts": [str(tmp_path / "missing")],
            "units": ["bad/unit"],
        },
    )
    text = "\n".join(report["errors"])
    assert not report["ok"]
    for fragment in ("pillar shadowsocks:tuning:nofile: 'lots'", "restart: 'sometimes'", "unknown field(s) colour",
                     "defaults_file: 'etc/default/supervisor'", f"{tmp_path / 'missing'} does not exist",
                     "units[0]: 'bad/unit'"):
        assert fragment in text


# --------------------------------------------------------------------------
# Writing, and the originals kept for `clean`
# --------------------------------------------------------------------------
def test_a_write_keeps_mode_and_clean_puts_the_bytes_back(tmp_path):
    script = tmp_path / "init.d-ss"
    original = b"#!/bin/sh\r\n### END INIT INFO\r\nexec ss-server\r\n"
    script.write_bytes(original)
    script.chmod(0o750)
    predicted = engine.set_ulimit(str(script), 4096, placement="init", test=True)
    assert predicted["changed"] and script.read_bytes() == original
    done = engine.set_ulimit(str(script), 4096, placement="init")
    assert done["changed"] and done["diff"] == predicted["diff"]
    assert b"ulimit -n 4096\r\n" in script.read_bytes()
    assert script.stat().st_mode & 0o777 == 0o750
    assert not engine.set_ulimit(str(script), 4096, placement="init")["changed"]
    engine.set_ulimit(str(script), 8192, placement="init")  # a second change: the first original stays
    engine.clean()
    assert script.read_bytes() == original
    assert script.stat().st_mode & 0o777 == 0o750


# --------------------------------------------------------------------------
# /proc
# --------------------------------------------------------------------------
def test_limits_and_capabilities_of_this_process():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert engine._proc_nofile(os.getpid()) == (soft, hard)
    capeff = next(line for line in open("/proc/self/status") if line.startswith("CapEff:"))
    assert engine._has_cap_sys_resource() == bool(int(capeff.split()[1], 16) & (1 << 24))
    grant = engine.nofile_grantable()
    assert grant["limit"] == (grant["nr_open"] if grant["cap_sys_resource"] else min(hard, grant["nr_open"]))


@pytest.mark.parametrize(
    "comm, argv, expected",
    [
        ("ss-server", ["/usr/bin/ss-server", "-c", "x"], "ss-server"),
        ("supervisord", ["/usr/bin/python3", "/usr/bin/supervisord", "-n"], "supervisord"),
        ("python3", ["/usr/bin/python3", "/usr/local/bin/ssserver", "-c", "x"], "ssserver"),
        ("python3", ["python3", "ssrig.py", "count-wrap", "--", "/usr/bin/ss-server"], None),
        ("less", ["less", "ss-server"], None),
        ("bash", ["bash"], None),
    ],
)
def test_process_names(comm, argv, expected):
    names = {engine.SUPERVISORD_NAME, *engine.SS_PROCESS_NAMES}
    assert engine._match_name(comm, argv, names) == expected


def test_a_low_process_is_reported_with_the_reason(tmp_path):
    """A real process started with soft 256 under a hard limit that allows
    more: the report names it and says it must be started again."""
    fake = tmp_path / "ss-server"
    fake.symlink_to("/bin/sleep")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc = subprocess.Popen([str(fake), "30"], preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        pidfile = tmp_path / "pid"
        pidfile.write_text(f"{proc.pid}\n")
        for _ in range(50):
            if engine._proc_stat(proc.pid) and engine._proc_stat(proc.pid)[0] == "ss-server":
                break
            time.sleep(0.02)
        report = engine.nofile(1024, pidfiles=[str(pidfile)])
        assert not report["ok"]
        (entry,) = report["processes"]
        assert (entry["pid"], entry["name"], entry["soft"], entry["hard"]) == (proc.pid, "ss-server", 256, hard)
        assert "started before the limit was configured" in entry["reason"]
        assert f"ss-server (pid {proc.pid}): soft 256" in report["comment"]
        assert engine.nofile(256, pidfiles=[str(pidfile)])["ok"]
    finally:
        proc.kill()
        proc.wait()


def test_a_capped_process_names_its_parent(tmp_path):
    """Parent without CAP_SYS_RESOURCE and a hard limit below N: the reason
    says so plainly instead of just 'restart it'."""
    if engine._has_cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: nothing caps it here")
    fake = tmp_path / "ss-local"
    fake.symlink_to("/bin/sleep")
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f"ulimit -n 512; {fake} 30 & echo $!; wait"],
        stdout=subprocess.PIPE, text=True,
    )
    child = int(shell.stdout.readline())
    try:
        pidfile = tmp_path / "pid"
        pidfile.write_text(str(shell.pid))
        report = engine.nofile(4096, pidfiles=[str(pidfile)])
        entry = next(p for p in report["processes"] if p["pid"] == child)
        assert entry["hard"] == 512
        assert entry["reason"].startswith(f"capped: its parent sh (pid {shell.pid}) has a hard limit of 512 and no CAP_SYS_RESOURCE")
    finally:
        os.kill(child, 9)
        shell.wait()


def test_a_service_command_whose_daemon_keeps_the_pipe_does_not_hang():
    start = time.monotonic()
    rc, out = engine._run_service(["/bin/sh", "-c", "(sleep 3; echo late) & echo started"], 10)
    assert (rc, out) == (0, "started")
    assert time.monotonic() - start < 2


def test_a_service_command_that_hangs_is_killed():
    with pytest.raises(CommandExecutionError) as err:
        engine._run_service([sys.executable, "-c", "import time; time.sleep(30)"], 1)
    assert "did not finish within 1 s" in str(err.value)


def test_a_higher_limit_already_in_a_file_is_kept_unless_forced(tmp_path):
    # Debian's /etc/default/shadowsocks-libev ships MAXFD=32768: asking for
    # 16384 must not lower it, as capacity sysctls are never lowered.
    defaults = tmp_path / "shadowsocks-libev"
    original = b"# Defaults for shadowsocks initscript\nMAXFD=32768\n"
    defaults.write_bytes(original)
    kept = engine.set_assignment(str(defaults), "MAXFD", 16384)
    assert not kept["changed"] and defaults.read_bytes() == original
    assert kept["comment"].endswith("MAXFD 32768 kept (higher than 16384; force lowers it)")
    assert engine.set_assignment(str(defaults), "MAXFD", 65536)["changed"]  # raising goes through
    lowered = engine.set_assignment(str(defaults), "MAXFD", 16384, force=True)
    assert lowered["changed"] and b"MAXFD=16384\n" in defaults.read_bytes()
    supervisor = tmp_path / "supervisor"
    supervisor.write_bytes(b"ulimit -n 65535\n")
    assert not engine.set_ulimit(str(supervisor), 51200)["changed"]
    assert engine.set_ulimit(str(supervisor), 51200, force=True)["changed"]
    engine.clean()
    assert defaults.read_bytes() == original
