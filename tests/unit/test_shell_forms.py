"""Shell files the package edits (/etc/default/supervisor,
/etc/default/shadowsocks-libev, init scripts) in every form that can hide what
a line does: if/else, case, loops, { }, ( ), function bodies, here-documents,
quoted strings across lines, `\\` continuations, expansions, CRLF. Each form is
either refused naming path:line before anything is written, or the edited text
passes `sh -n` and, sourced by the real /bin/sh (dash here) in a child
process, gives exactly the open-file limits (or MAXFD) the toolkit reports.
Debian 12's own files (tests/support/debian, copied from the packages) are
edited and sourced the way their init scripts source them."""

import pathlib
import resource
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from salt.exceptions import CommandExecutionError

import sstuning_lines as sst_lines
import sstuning_shell as sst_shell
import sstuning_shellforms as sst_forms
from sstuning_catalogue import keep_higher

DEBIAN = pathlib.Path(__file__).resolve().parent.parent / "support" / "debian"
PATH = "/etc/default/test"
# What a child of this process can get: its hard limit (20000 on the project's
# machines, no CAP_SYS_RESOURCE to raise it).
HARD = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 20000)
# The soft limit starts at the hard one: the state in which `ulimit -Hn H`
# with H below it fails (EINVAL), so a renderer that wrote that first is caught.
SOFT_AT_HARD = 'ulimit -Sn "$(ulimit -Hn)"'


def debian(name):
    return (DEBIAN / name).read_text()


def run_sh(tmp_path, text, script, name="sourced", raw=False):
    """Write `text` to a file and run `script` (which reads it as "$1") with
    the real /bin/sh in a child process; its output words (`raw`: its output)."""
    target = tmp_path / name
    target.write_bytes(text.encode("utf-8", "surrogateescape"))
    proc = subprocess.run(["/bin/sh", "-c", script, "sh", str(target)], capture_output=True, timeout=10,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    if raw:
        return proc.stdout.decode()
    return [int(w) if w.isdigit() else w for w in proc.stdout.decode().split()]


def sourced_limits(tmp_path, text, prelude=SOFT_AT_HARD):
    """(soft, hard) after `. FILE` in a real /bin/sh (the file's own output discarded)."""
    soft, hard = run_sh(tmp_path, text, f'{prelude}\n. "$1" >/dev/null\nulimit -Sn; ulimit -Hn')
    return soft, hard


def parses(text):
    sst_shell.check_shell(text, PATH)  # raises with sh's message
    return True


def refused(call, line):
    with pytest.raises(CommandExecutionError) as err:
        call()
    message = str(err.value)
    assert message.startswith(f"{PATH}:{line}: "), message
    assert "run again" in message, message  # and it says what to do
    return message


# --------------------------------------------------------------------------
# The shell itself
# --------------------------------------------------------------------------
def test_check_shell_gives_sh_s_own_message_with_path_and_line():
    assert parses("if true; then\n  A=1\nelse\n  A=2\nfi\n")
    with pytest.raises(CommandExecutionError) as err:
        sst_shell.check_shell("if true; then\n  A=1\nelse\nfi\n", PATH)
    assert str(err.value) == f'{PATH}:4: Syntax error: "fi" unexpected (`sh -n`)'


def test_a_file_broken_before_any_edit_is_refused_and_named():
    # What the old renderer left of `ulimit -n` in both branches: it no longer parses.
    broken = 'if [ -n "$X" ]; then\n  ulimit -n 4096\nelse\nfi\n'
    # A file the reader can follow, broken all the same: the edit's `sh -n`
    # fails, and the file as it was is named with sh's own complaint.
    broken_after = 'ulimit -n 4096\nMAXFD=1\nif [ -n "$X" ]; then\n  :\nelse\nfi\n'
    for call in (lambda: sst_lines.render_ulimit(broken_after, 1024, PATH),
                 lambda: sst_lines.render_assignment(broken_after, "MAXFD", "1024", PATH)):
        with pytest.raises(CommandExecutionError) as err:
            call()
        assert str(err.value).startswith(f'{PATH}:6: Syntax error: "fi" unexpected'), str(err.value)
        assert "does not parse as a shell script as it is now, before any edit by this package" in str(err.value)
    # Reading what a file sets starts no process: the reader refuses what it cannot follow, naming the line.
    for call in (lambda: sst_lines.ulimit_values(broken, PATH),
                 lambda: sst_lines.ulimit_values("ulimit -n 4096\nif true; then\n  :\n", PATH),
                 lambda: sst_lines.assignment_value('MAXFD=4096\ncase "$1" in\n', "MAXFD", PATH)):
        with pytest.raises(CommandExecutionError) as err:
            call()
        assert str(err.value).startswith(f"{PATH}:"), str(err.value)


# --------------------------------------------------------------------------
# Forms refused, naming the line, before anything is written
# --------------------------------------------------------------------------
REFUSED_ULIMIT = [
    # (text, line named, words of the reason)
    ("if [ -f /x ]; then\n  ulimit -n 4096\nelse\n  ulimit -n 2048\nfi\n", 2, "inside an if (line 1)"),
    ("if false; then :\nelif true; then ulimit -n 700; fi\n", 2, "inside an if (line 1)"),
    ('case "$1" in\n  start) ulimit -n 700 ;;\nesac\n', 2, "inside a case (line 1)"),
    ("while false; do\n  ulimit -n 700\ndone\n", 2, "inside a while loop (line 1)"),
    ("until true; do ulimit -n 700; done\n", 1, "inside an until loop (line 1)"),
    ("for i in 1 2; do\n  ulimit -n 700\ndone\n", 2, "inside a for loop (line 1)"),
    ("{\n  ulimit -n 700\n} >/dev/null\n", 2, "inside a { } group (line 1)"),
    ("(\n  ulimit -n 700\n)\n", 2, "a subshell cannot change the value"),
    ("x=$(\n  ulimit -n 700\n)\n", 2, "a command substitution"),
    ("do_start()\n{\n    ulimit -n 700\n}\n", 3, "the body of function do_start() (line 1)"),
    ("raise() ulimit -n 700\n", 1, "the body of function raise() (line 1)"),
    ("f() {\n  if true; then\n    ulimit -n 700\n  fi\n}\n", 3, "an if (line 2) in the body of function f() (line 1)"),
    ("ulimit -n \\\n4096\n", 1, "continues onto line 2"),
    ("echo a \\\nulimit -n 700\n", 2, "continues the command of line 1"),
    ('X="one\nulimit -n 700\n"\n', 2, "continues the command of line 1"),
    ("X='one\n  ulimit -n 700'\n", 2, "continues the command of line 1"),
    ("ulimit -n $X\n", 1, "its value comes from an expansion"),
    ('ulimit -n "${MAXFD}"\n', 1, "its value comes from an expansion"),
    ("ulimit -n $(nproc)\n", 1, "its value comes from an expansion"),
    ("ulimit -n 700 && echo ok\n", 1, "shares its line with other commands (`&&`)"),
    ("true || ulimit -n 700\n", 1, "shares its line with other commands (`||`)"),
    ("A=1; ulimit -n 700\n", 1, "shares its line with other commands (`;`)"),
    ("ulimit -n 700 &\n", 1, "shares its line with other commands (`&`)"),
    ("echo | ulimit -n 700\n", 1, "shares its line with other commands (`|`)"),
    # A pipeline or an and-or list goes on past a newline: the ulimit runs in it.
    ("echo |\nulimit -n 700\n", 2, "shares its line with other commands (`|`)"),
    ("true &&\n\nulimit -n 700\n", 3, "shares its line with other commands (`&&`)"),
    ("! ulimit -n 700\n", 1, "shares its line with other commands (`!`)"),
    ("ulimit -n 700 2>/dev/null\n", 1, "has redirections or more words"),
    ("ulimit -SHn 700\n", 1, "combines -S and -H: dash (Debian's /bin/sh) applies only the last one named (here "
                              "the hard limit)"),
    ("ulimit -HSn 700\n", 1, "here the soft limit"),
    ("ulimit -S -H -n 700\n", 1, "combines -S and -H"),
    ("ulimit -c -n 700\n", 1, "names other limits too (-c)"),
    ("ulimit -c 0 -n 700\n", 1, "is not a plain `ulimit -n N` line"),
    ("ulimit -n 700 -c 0\n", 1, "is not a plain `ulimit -n N` line"),
    ("ulimit -n hard\n", 1, "is not a plain `ulimit -n N` line"),
    ("ulimit $OPTS\n", 1, "a limit named by an expansion"),
    ("command ulimit -n 700\n", 1, "through `command`"),
    ("eval 'ulimit -n 700'\n", 1, "evaluates text"),
]


@pytest.mark.parametrize("text, line, why", REFUSED_ULIMIT)
def test_a_ulimit_form_that_cannot_be_edited_safely_is_refused_naming_the_line(text, line, why):
    assert parses(text)
    for call in (lambda: sst_lines.render_ulimit(text, 1024, PATH), lambda: sst_lines.ulimit_values(text, PATH),
                 lambda: sst_lines.render_ulimit_values(text, 512, 1024, PATH, "init")):
        assert why in refused(call, line)


REFUSED_MAXFD = [
    ("if true; then\n  MAXFD=4096\nelse\n  MAXFD=2048\nfi\n", 2, "inside an if (line 1)"),
    ("[ -r /x ] && MAXFD=4096\n", 1, "shares its line with other commands (`&&`)"),
    ("MAXFD=\\\n4096\n", 1, "continues onto line 2"),
    ("export \\\n  MAXFD=4096\n", 1, "continues onto line 2"),
    ("echo a \\\nMAXFD=4096\n", 2, "continues the command of line 1"),
    ("MAXFD=$(nproc)\n", 1, "its value comes from an expansion"),
    ('MAXFD="$X"\n', 1, "its value comes from an expansion"),
    ("MAXFD=`nproc`\n", 1, "its value comes from an expansion"),
    ("MAXFD=~/x\n", 1, "characters a shell would expand"),
    ("MAXFD=1 OTHER=2\n", 1, "there are more words"),
    ("export MAXFD=1 OTHER=2\n", 1, "there are more words"),
    ("MAXFD=4096 true\n", 1, "sets MAXFD only for the command 'true'"),
    ("MAXFD=4096\nreadonly MAXFD\n", 2, "`readonly MAXFD` changes how MAXFD can be set"),
    ("readonly MAXFD=4096\n", 1, "`readonly MAXFD` changes how MAXFD can be set"),
    ("unset MAXFD\n", 1, "`unset` changes MAXFD"),
    ("read MAXFD </dev/null\n", 1, "`read` changes MAXFD"),
    ("for MAXFD in 1 2; do :; done\n", 1, "a for loop over MAXFD"),
    (": $((MAXFD = 5))\n", 1, "assigns MAXFD inside $(( ))"),
    ("eval MAXFD=5\n", 1, "evaluates text"),
    ("MAXFD=4096 \r\n", 1, "sets MAXFD only for the command '\\r'"),  # CRLF after a blank: the CR is a command
    (": ${MAXFD:=4096}\n", 1, "sets MAXFD only when it is unset"),
    ('echo "${MAXFD=4096}"\n', 1, "sets MAXFD only when it is unset"),
]


@pytest.mark.parametrize("text, line, why", REFUSED_MAXFD)
def test_a_maxfd_form_that_cannot_be_edited_safely_is_refused_naming_the_line(text, line, why):
    assert parses(text)
    for call in (lambda: sst_lines.render_assignment(text, "MAXFD", "1024", PATH),
                 lambda: sst_lines.assignment_value(text, "MAXFD", PATH)):
        assert why in refused(call, line)


# --------------------------------------------------------------------------
# Forms that are edited: the result parses and gives exactly what is reported
# --------------------------------------------------------------------------
EDITABLE = [
    "",
    "# only a comment, no final newline",
    "A=1\n# ulimit -n 5\nulimit -c 0\nulimit -n\n",  # comment, another limit, a query
    'echo "ulimit -n 5" >/dev/null\nx=`ulimit -n 5`\ny=$(ulimit -Sn)\n',  # text, and subshells that set nothing here
    "cat >/dev/null <<EOF\nulimit -n 100\nif\nEOF\n",  # here-document text is not a command
    "cat >/dev/null <<-'EOF'\n\tulimit -n 100\n\tEOF\nulimit -n 900\n",
    "cat >/dev/null <<A; cat >/dev/null <<B\nulimit -n 1\nA\nulimit -n 2\nB\nulimit -n 900\n",
    "if true; then :; fi\nulimit -n 900\ncase x in x) : ;; esac\nf() { :; }\n",
    'X="two\nlines"\nY=a\\\nb\nulimit -Sn 300\n',  # continuations that hold no limit
    "  ulimit -n 900   # raised for ss\nulimit -Sn 800\n",
    "ulimit -Hn 900\nulimit -Sn 300\nA=1",
    "A=1\r\nulimit -n 900\r\nB=2\r\n",  # CRLF: the ulimit line failed in dash ("bad number")
    "ulimit -n 900 # x\r\nB=2",
    "ulimit -n unlimited\n",
]


@pytest.mark.parametrize("text", EDITABLE)
@pytest.mark.parametrize("share", [(1, 1), (1, 2), (2, 3)])
def test_an_edited_file_parses_and_gives_exactly_the_reported_limits(tmp_path, text, share):
    assert parses(text)
    soft, hard = HARD * share[0] // 4, HARD * share[1] // 4
    new = sst_lines.render_ulimit_values(text, soft, hard, PATH)
    assert parses(new)
    assert sst_lines.ulimit_values(new, PATH) == (soft, hard)
    assert sourced_limits(tmp_path, new) == (soft, hard)
    # every line that set no limit is still there, byte for byte, in order
    managed = {entry["line"] for entry in sst_forms.Reader(text, PATH).ulimits}
    kept = [line for number, line in enumerate(text.split("\n"), 1) if number not in managed]
    remaining = iter(new.split("\n"))
    assert all(any(line == other for other in remaining) for line in kept)
    assert sst_lines.render_ulimit_values(new, soft, hard, PATH) == new


def test_soft_below_hard_is_written_hard_first_and_works_from_any_inherited_soft_limit(tmp_path):
    new = sst_lines.render_ulimit_values("A=1\n", HARD // 4, HARD // 2, PATH)
    assert new == f"A=1\n{sst_lines.NOFILE_COMMENT}\nulimit -n {HARD // 2}\nulimit -Sn {HARD // 4}\n"
    # `ulimit -Hn H` first would fail here: the inherited soft limit is above H.
    assert sourced_limits(tmp_path, new, prelude=SOFT_AT_HARD) == (HARD // 4, HARD // 2)
    assert sourced_limits(tmp_path, new, prelude="ulimit -Sn 64") == (HARD // 4, HARD // 2)
    with pytest.raises(CommandExecutionError, match="soft limit 2 is above the hard limit 1"):
        sst_lines.render_ulimit_values("", 2, 1, PATH)


# A hard limit, then a lower soft one: a test prelude that keeps every line valid.
READ_BACK = [
    ("ulimit -Hn {b}\nulimit -Sn {a}\n", ("a", "b")),  # the brief's "19000 kept (higher)" file, scaled
    ("ulimit -n {b}\nulimit -Sn {a}\n", ("a", "b")),
    ("ulimit -Sn {a}\nulimit -n {b}\n", ("b", "b")),  # later lines win
    ("ulimit -n {b}\nulimit -n {a}\n", ("a", "a")),
    ("ulimit -Sn {a}\n", ("a", None)),
    ("ulimit -Hn {b}\n", (None, "b")),
    ("ulimit -n {b}\r\n", (None, None)),  # dash: "bad number" (the CR is part of the value)
    ("ulimit -n {b} # CRLF, but the comment takes the CR\r\n", ("b", "b")),
    ("ulimit -n\n", (None, None)),
]


@pytest.mark.parametrize("template, expected", READ_BACK)
def test_the_values_read_are_what_sourcing_gives(tmp_path, template, expected):
    a, b = HARD // 8, HARD // 2
    text = template.format(a=a, b=b)
    wanted = tuple({"a": a, "b": b}.get(x) for x in expected)
    assert sst_lines.ulimit_values(text, PATH) == wanted
    start = run_sh(tmp_path, "", "ulimit -Sn 64; ulimit -Sn; ulimit -Hn")
    got = sourced_limits(tmp_path, text, prelude="ulimit -Sn 64")
    assert got == tuple(w if w is not None else s for w, s in zip(wanted, start))


def test_a_soft_limit_below_a_higher_hard_one_is_not_kept_as_higher():
    # Before: "19000 kept (higher)" while the soft limit, the one a daemon
    # gets, stayed 1024. The old value reported is the soft one.
    text = f"ulimit -Hn {min(19000, HARD)}\nulimit -Sn 1024\n"
    new, old = sst_lines.render_ulimit(text, 4096, PATH)
    assert old == "1024"
    assert keep_higher(None, "4096", old) == ("4096", ())  # the rule sstuning_limits applies: raised
    assert new == "ulimit -n 4096\n"
    assert sst_lines.render_ulimit("ulimit -n unlimited\n", 4096, PATH)[1] == "unlimited"


def test_unlimited_is_a_value():
    new = sst_lines.render_ulimit_values("", 4096, "unlimited", PATH)
    assert new.endswith("ulimit -n unlimited\nulimit -Sn 4096\n") and parses(new)
    assert sst_lines.ulimit_values(new, PATH) == (4096, "unlimited")


# --------------------------------------------------------------------------
# MAXFD
# --------------------------------------------------------------------------
MAXFD_EDITABLE = [
    ("", None),
    ("MAXFD=1\nMAXFD=2\n", "2"),  # the last one wins
    ("export MAXFD='32768'   # fds\n", "32768"),
    ('MAXFD="32768"\r\n', "32768\r"),  # dash keeps the CR in the value
    ("MAXFD=5 # the comment takes the CR\r\n", "5"),
    ("cat >/dev/null <<EOF\nMAXFD=1\nEOF\n", None),
    ("MYMAXFD=1\nexport MAXFD\n: ${MAXFD:-7} ${MAXFD+x}\n", None),
    ("f() { :; }\nMAXFD=3\nif true; then :; fi\n", "3"),
]


@pytest.mark.parametrize("text, value", MAXFD_EDITABLE)
def test_maxfd_is_read_as_dash_reads_it_and_set_exactly(tmp_path, text, value):
    assert parses(text)
    assert sst_lines.assignment_value(text, "MAXFD", PATH) == value
    show = '. "$1" >/dev/null; printf "[%s]" "${MAXFD-unset}"'
    assert run_sh(tmp_path, text, show, raw=True) == f"[{'unset' if value is None else value}]"
    new, old = sst_lines.render_assignment(text, "MAXFD", "4096", PATH)
    assert old == (None if value is None or "\r" in value else value)  # a CR value is no usable old value
    assert parses(new) and sst_lines.assignment_value(new, "MAXFD", PATH) == "4096"
    assert run_sh(tmp_path, new, show, raw=True) == "[4096]"


# --------------------------------------------------------------------------
# Debian's own files, sourced the way their init scripts source them
# --------------------------------------------------------------------------
def init_excerpt(script, start, end, defaults, path):
    """The init script's own lines from the one containing `start` to the
    one containing `end`, reading `path` instead of /etc/default/..."""
    lines = debian(script).split("\n")
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if i >= first and end in line)
    excerpt = "\n".join(lines[first:last + 1])
    return excerpt.replace(defaults, str(path)) if defaults else excerpt


def test_debian_supervisor_defaults_get_the_limit_its_init_script_applies(tmp_path):
    original = debian("default-supervisor")
    assert sst_lines.ulimit_values(original, PATH) == (None, None)
    new, old = sst_lines.render_ulimit(original, HARD // 2, PATH)
    assert old is None and new.startswith(original) and parses(new)
    target = tmp_path / "supervisor"
    target.write_text(new)
    # /etc/init.d/supervisor: "if [ -f /etc/default/supervisor ] ; then . /etc/default/supervisor; fi"
    excerpt = init_excerpt("init.d-supervisor", "# Include supervisor defaults", "fi", "/etc/default/supervisor",
                           target)
    assert ". " in excerpt and "if [ -f" in excerpt
    got = run_sh(tmp_path, "", f"{SOFT_AT_HARD}\n{excerpt}\nulimit -Sn; ulimit -Hn; echo $DAEMON_OPTS.")
    assert got == [HARD // 2, HARD // 2, "."]
    assert sst_lines.render_ulimit(new, HARD // 2, PATH) == (new, str(HARD // 2))


def test_debian_shadowsocks_libev_defaults_give_the_maxfd_its_init_script_applies(tmp_path):
    original = debian("default-shadowsocks-libev")
    assert sst_lines.assignment_value(original, "MAXFD", PATH) == "32768"
    new, old = sst_lines.render_assignment(original, "MAXFD", str(HARD // 2), PATH)
    assert old == "32768" and parses(new)
    assert new == original.replace("MAXFD=32768\n", f"MAXFD={HARD // 2}\n")
    target = tmp_path / "shadowsocks-libev"
    target.write_text(new)
    # "[ -r /etc/default/$NAME ] && . /etc/default/$NAME", then do_start()'s "ulimit -n ${MAXFD}"
    sourcing = init_excerpt("init.d-shadowsocks-libev", ". /etc/default/$NAME", ". /etc/default/$NAME",
                            "/etc/default/$NAME", target)
    raising = init_excerpt("init.d-shadowsocks-libev", "ulimit -n ${MAXFD}", "ulimit -n ${MAXFD}", "", target)
    got = run_sh(tmp_path, "", f"{sourcing}\n{raising}\nulimit -Sn; ulimit -Hn; echo $USER $CONFFILE")
    assert got == [HARD // 2, HARD // 2, "nobody", "/etc/shadowsocks-libev/config.json"]


def test_debian_init_scripts_one_edited_before_anything_runs_one_refused():
    supervisor = debian("init.d-supervisor")
    new = sst_lines.render_ulimit_values(supervisor, 1024, 1024, "/etc/init.d/supervisor", "init")
    lines = new.split("\n")
    end = lines.index("### END INIT INFO")
    assert lines[end + 1:end + 3] == [sst_lines.NOFILE_COMMENT, "ulimit -n 1024"]
    assert parses(new) and sst_lines.ulimit_values(new, PATH) == (1024, 1024)
    # shadowsocks-libev raises the limit inside do_start() from MAXFD: that is the file to manage.
    with pytest.raises(CommandExecutionError) as err:
        sst_lines.render_ulimit(debian("init.d-shadowsocks-libev"), 1024, "/etc/init.d/shadowsocks-libev", "init")
    assert str(err.value).startswith(
        "/etc/init.d/shadowsocks-libev:46: 'ulimit -n ${MAXFD}' is inside the body of function do_start() (line 43)")


# --------------------------------------------------------------------------
# Any mix of forms: refused naming a line that holds a refused form, or exact
# --------------------------------------------------------------------------
# (lines, index of the line to be named within them or None)
_BLOCKS = [
    (["A=1"], None), (["# ulimit -n 5"], None), (["ulimit -c 0"], None), (["ulimit -n"], None),
    (["cat >/dev/null <<EOF", "ulimit -n 7", "EOF"], None), (['X="a', 'b"'], None), (["f() { :; }"], None),
    (["if true; then :; fi"], None), (["ulimit -n {v}"], None), (["ulimit -Sn {v}"], None),
    (["  ulimit -n {v}  # c"], None), (["ulimit -n {v}\r"], None),
    (["if true; then", "  ulimit -n {v}", "else", "  ulimit -n {v}", "fi"], 1),
    (['case "$1" in', "  *) ulimit -n {v} ;;", "esac"], 1), (["while false; do ulimit -n {v}; done"], 0),
    (["f() {", "  ulimit -n {v}", "}"], 1), (["( ulimit -n {v} )"], 0), (["ulimit -n \\", "{v}"], 0),
    (["echo \\", "ulimit -n {v}"], 1), (['Y="', "ulimit -n {v}", '"'], 1), (["ulimit -n $V"], 0),
    (["ulimit -n {v} && :"], 0), (["ulimit -SHn {v}"], 0),
]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(_BLOCKS))), st.integers(64, 4096)), max_size=6),
       st.integers(1, 4), st.integers(0, 3))
def test_property_any_mix_is_refused_at_a_refused_line_or_edited_exactly(tmp_path_factory, blocks, h, s):
    lines, named = [], set()
    for choice, value in blocks:
        body, bad = _BLOCKS[choice]
        if bad is not None:
            named.add(len(lines) + bad + 1)
        lines.extend(line.replace("{v}", str(min(value, HARD))) for line in body)
    text = "\n".join(lines) + ("\n" if lines else "")
    hard = HARD * h // 4
    soft = hard * s // 4 or hard
    try:
        new = sst_lines.render_ulimit_values(text, soft, hard, PATH)
    except CommandExecutionError as exc:
        assert named, f"refused although every form is editable: {exc}"
        assert int(str(exc).split(":")[1]) in named, str(exc)
        return
    assert not named, "a refused form was edited"
    assert parses(new)
    assert sst_lines.ulimit_values(new, PATH) == (soft, hard)
    assert sourced_limits(tmp_path_factory.mktemp("mix"), new) == (soft, hard)
