"""Editing files owned by others, text in and text out: one `ulimit -n N`
line in a sourced defaults file or an init script, `KEY=value`, supervisord's
`minfds` and systemd drop-ins. Every line not managed keeps its bytes, its
ending (CRLF too) and a missing final newline."""

import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from salt.exceptions import CommandExecutionError

import sstuning_lines as sst_lines

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


def ulimit(text, n=16384, placement="end"):
    return sst_lines.render_ulimit(text, n, "/etc/test", placement)


def active_ulimit_lines(text):
    return [line.strip() for line in text.split("\n") if line.strip().startswith("ulimit")]


# --------------------------------------------------------------------------
# ulimit -n in a sourced defaults file
# --------------------------------------------------------------------------
def test_a_missing_ulimit_line_is_appended_and_everything_else_is_kept():
    new, old = ulimit(SUPERVISOR_DEFAULTS)
    assert old is None
    assert new.startswith(SUPERVISOR_DEFAULTS)
    assert new[len(SUPERVISOR_DEFAULTS):] == f"{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"
    assert ulimit(new) == (new, "16384"), "the second run changes nothing"


def test_an_existing_line_is_replaced_in_place_never_duplicated():
    text = "A=1\n  ulimit -Sn 51200   # raised for ss\nB=2\n"
    new, old = ulimit(text)
    assert old == "51200"
    assert new == "A=1\n  ulimit -n 16384   # raised for ss\nB=2\n"


def test_later_active_lines_are_dropped_and_commented_ones_kept():
    text = "# ulimit -n 4096\nulimit -n 1024\nX=1\n\tulimit -Sn 2048\n#ulimit -n 9\n"
    new, _ = ulimit(text)
    assert new == "# ulimit -n 4096\nulimit -n 16384\nX=1\n#ulimit -n 9\n"
    assert active_ulimit_lines(new) == ["ulimit -n 16384"]


def test_crlf_endings_survive_and_new_lines_end_in_lf():
    # dash reads the CR before a newline as part of the last word: `ulimit -n
    # 16384\r` fails with "bad number". Foreign lines keep their CRLF; the
    # lines written end in LF, so they work.
    text = "A=1\r\n# ulimit -n 5\r\nB=2\r\n"
    new, _ = ulimit(text)
    assert new == f"A=1\r\n# ulimit -n 5\r\nB=2\r\n{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"
    # A CRLF ulimit line never set anything in dash: the old value is None, and it is rewritten with LF.
    assert ulimit("A=1\r\nulimit -n 32768\r\n") == ("A=1\r\nulimit -n 16384\n", None)
    # ... while a trailing comment keeps the CR out of the value: that one worked.
    assert ulimit("ulimit -n 32768 # x\r\n") == ("ulimit -n 16384 # x\n", "32768")


def test_a_file_without_final_newline_keeps_that_shape():
    new, _ = ulimit("A=1\nB=2")
    assert new == f"A=1\nB=2\n{sst_lines.NOFILE_COMMENT}\nulimit -n 16384"
    # ... also when the line it replaces or drops was that last line
    assert ulimit("ulimit -n 1")[0] == "ulimit -n 16384"
    assert ulimit("ulimit -n 1\nulimit -n 2")[0] == "ulimit -n 16384"


def test_an_empty_or_absent_file_gets_just_the_line():
    assert ulimit("")[0] == f"{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"
    assert ulimit(None)[0] == f"{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"


def test_a_variable_limit_is_refused_naming_the_line():
    # The value the daemon gets comes from elsewhere: replacing it by a number would hide that.
    with pytest.raises(CommandExecutionError, match=r"^/etc/test:1: 'ulimit -n \"\$\{MAXFD\}\"' is not a plain"):
        ulimit('ulimit -n "${MAXFD}"\n')


def test_a_query_without_value_is_just_another_line():
    assert ulimit("ulimit -n\n")[0] == f"ulimit -n\n{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"


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
    assert ulimit(text)[0] == text + f"{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n"


# --------------------------------------------------------------------------
# ulimit -n in an init script
# --------------------------------------------------------------------------
def test_in_an_init_script_the_line_goes_before_anything_runs():
    new, _ = ulimit(INIT_SCRIPT, placement="init")
    lines = new.split("\n")
    end = lines.index("### END INIT INFO")
    assert lines[end + 1:end + 3] == [sst_lines.NOFILE_COMMENT, "ulimit -n 16384"]
    assert new.replace(f"{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\n", "") == INIT_SCRIPT
    assert ulimit(new, placement="init")[0] == new


def test_without_lsb_header_it_goes_after_the_leading_comments():
    text = "#!/bin/bash\n# start ss\n\nexec /usr/bin/ss-server -c /etc/ss.json\n"
    new, _ = ulimit(text, placement="init")
    assert new == f"#!/bin/bash\n# start ss\n\n{sst_lines.NOFILE_COMMENT}\nulimit -n 16384\nexec /usr/bin/ss-server -c /etc/ss.json\n"


def test_a_ulimit_line_inside_a_function_of_an_init_script_is_refused():
    # Debian's /etc/init.d/shadowsocks-libev has exactly this: the limit comes
    # from MAXFD (manage it in /etc/default/shadowsocks-libev instead).
    text = "#!/bin/sh\ndo_start() {\n    ulimit -n ${MAXFD}\n    start-stop-daemon --start\n}\n"
    with pytest.raises(CommandExecutionError) as err:
        ulimit(text, placement="init")
    assert str(err.value).startswith("/etc/test:3: 'ulimit -n ${MAXFD}' is inside the body of function do_start() (line 2)")


@pytest.mark.parametrize("shebang", ["#!/usr/bin/python3", "#!/usr/bin/env node", "#!/usr/bin/perl -w"])
def test_a_script_in_another_language_is_refused(shebang):
    with pytest.raises(CommandExecutionError) as err:
        ulimit(f"{shebang}\nprint(1)\n", placement="init")
    assert "not a shell script" in str(err.value) and "/etc/test" in str(err.value)


@pytest.mark.parametrize("shebang", ["#!/bin/sh", "#! /bin/sh -e", "#!/usr/bin/env bash", "#!/lib/init/init-d-script"])
def test_shell_scripts_of_every_flavour_are_accepted(shebang):
    assert "ulimit -n 16384" in ulimit(f"{shebang}\ntrue\n", placement="init")[0]


# Files made of lines that never set a limit: the edit adds exactly one line
# (plus its comment) and keeps every byte of the rest, whatever the endings;
# or, when the file does not parse as shell as it is (`sh -n`), it is refused
# as broken before the edit. (NUL bytes make a binary file, which is refused:
# see the test below.)
_any_text = st.text(alphabet=st.characters(blacklist_characters="\n\0", blacklist_categories=("Cs",)), max_size=30)
_plain_line = st.one_of(
    _any_text, _any_text.map(lambda s: "#" + s), st.from_regex(r"\A[A-Z_]{1,8}=[a-z0-9./-]{0,12}\Z"),
).filter(lambda s: "ulimit" not in s)


def _parses(text):
    return subprocess.run(["/bin/sh", "-n"], input=text.encode("utf-8", "surrogateescape"), capture_output=True,
                          timeout=10).returncode == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_plain_line, st.sampled_from(["\n", "\r\n"])), max_size=12), st.booleans(),
       st.integers(min_value=1, max_value=1048576))
def test_property_one_line_added_the_rest_byte_for_byte(lines, unterminated, n):
    text = "".join(body + end for body, end in lines)
    if unterminated and text:
        text = text[:-1] if text.endswith("\n") else text
    if not _parses(text):
        # Refused, naming the file: by the reader when it cannot follow it, else by sh -n.
        with pytest.raises(CommandExecutionError, match="does not parse as a shell script as it is now|cannot follow"):
            ulimit(text, n)
        return
    try:
        new, old = ulimit(text, n)
    except CommandExecutionError as exc:
        # A line ending in `\` continues onto the appended line: refused, never written.
        assert "would not be one this package can read back" in str(exc) or "cannot follow" in str(exc)
        return
    assert old is None
    assert new.startswith(text)
    assert active_ulimit_lines(new[len(text):]) == [f"ulimit -n {n}"]
    assert ulimit(new, n)[0] == new


# --------------------------------------------------------------------------
# KEY=value (MAXFD in /etc/default/shadowsocks-libev)
# --------------------------------------------------------------------------
def test_maxfd_is_set_in_place_keeping_quotes_export_and_comment():
    render = sst_lines.render_assignment
    assert render("A=1\nMAXFD=32768\n", "MAXFD", "16384", "/x") == ("A=1\nMAXFD=16384\n", "32768")
    assert render('export MAXFD="32768"  # fds\n', "MAXFD", "16384", "/x")[0] == 'export MAXFD="16384"  # fds\n'
    # The lines written end in LF (dash would keep a CR in the value); the old value is the last one.
    assert render("#MAXFD=1\nMAXFD=2\r\nMAXFD=3 # c\r\n", "MAXFD", "9", "/x") == ("#MAXFD=1\nMAXFD=9\n", "3")
    assert render("A=1", "MAXFD", "9", "/x")[0] == f"A=1\n{sst_lines.NOFILE_COMMENT}\nMAXFD=9"
    assert render("MYMAXFD=1\n", "MAXFD", "9", "/x")[0] == f"MYMAXFD=1\n{sst_lines.NOFILE_COMMENT}\nMAXFD=9\n"


@pytest.mark.parametrize("key", ["MAX FD", "1X", "MAXFD=1", "MAXFD\n", "", "A" * 65])
def test_a_key_a_shell_would_misread_is_not_a_variable_name(key):
    assert not sst_lines.ENV_KEY.match(key)


@pytest.mark.parametrize("value", ["1; rm -rf /", "$(id)", "`id`", "a b", "1\n2", '"1"', "1&", "1|x", "x" * 257])
def test_a_value_a_shell_would_expand_or_split_is_not_plain(value):
    assert not sst_lines.ENV_VALUE.match(value)


@pytest.mark.parametrize("key, value", [("MAXFD", "51200"), ("DAEMON_ARGS", "-u"), ("CONF", "/etc/ss.json")])
def test_plain_keys_and_values_pass(key, value):
    assert sst_lines.ENV_KEY.match(key) and sst_lines.ENV_VALUE.match(value)
# --------------------------------------------------------------------------
# supervisord minfds
# --------------------------------------------------------------------------
def test_minfds_is_added_after_the_last_setting_of_the_supervisord_section():
    new, old = sst_lines.render_minfds(SUPERVISORD_CONF, 16384, "/x")
    assert old is None
    assert new == SUPERVISORD_CONF.replace(
        "childlogdir=/var/log/supervisor            ; ('AUTO' child log dir)\n",
        "childlogdir=/var/log/supervisor            ; ('AUTO' child log dir)\nminfds=16384\n",
    )
    assert sst_lines.render_minfds(new, 16384, "/x") == (new, "16384")


def test_minfds_is_replaced_in_its_section_only_keeping_case_separator_and_comment():
    text = "[program:x]\nminfds=5\n[supervisord]\nMINFDS : 1024 ; low\nminfds=2048\n[other]\nminfds=7"
    new, old = sst_lines.render_minfds(text, 16384, "/x")
    assert old == "2048"  # what supervisord reads: configparser (strict=False) keeps the last one
    assert new == "[program:x]\nminfds=5\n[supervisord]\nMINFDS : 16384 ; low\n[other]\nminfds=7"


def test_minfds_in_a_crlf_file_without_final_newline():
    new, _ = sst_lines.render_minfds("[supervisord]\r\nlogfile=/x", 4096, "/x")
    assert new == "[supervisord]\r\nlogfile=/x\r\nminfds=4096"


def test_a_config_without_supervisord_section_is_refused():
    with pytest.raises(CommandExecutionError) as err:
        sst_lines.render_minfds("[program:ss]\ncommand=ss-server\n", 4096, "/etc/supervisor/conf.d/ss.conf")
    assert "/etc/supervisor/conf.d/ss.conf: no [supervisord] section" in str(err.value)


# --------------------------------------------------------------------------
# systemd drop-ins
# --------------------------------------------------------------------------
def test_a_dropin_sets_limitnofile_in_the_service_section():
    text = sst_lines.render_dropin(16384, "supervisor.service")
    assert text.startswith("# ") and "supervisor.service" in text.splitlines()[0]
    assert text.endswith("[Service]\nLimitNOFILE=16384\n")
    assert sst_lines.dropin_limit(text) == "16384"
    assert sst_lines.dropin_limit(None) is None
    assert sst_lines.dropin_limit("[Service]\n# LimitNOFILE=1\n") is None


def test_a_binary_file_is_refused_before_a_line_is_written_into_it():
    binary = "\x7fELF\x02\x01\x01\0\0\0\0ulimit\n"
    for render in (lambda t: sst_lines.render_ulimit(t, 4096, "/etc/init.d/ssd", "init"),
                   lambda t: sst_lines.render_ulimit(t, 4096, "/etc/default/ssd", "end"),
                   lambda t: sst_lines.render_assignment(t, "MAXFD", "4096", "/etc/default/ssd")):
        with pytest.raises(CommandExecutionError, match=r"a binary file \(it holds NUL bytes\), not a shell script"):
            render(binary)
