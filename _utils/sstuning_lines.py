"""
One toolkit for editing line-oriented files owned by others: shell files
(``ulimit -n N``, ``KEY=value``), supervisord's INI file (``minfds=N``) and
systemd drop-ins. Text in and text out: every line this package does not
manage keeps its bytes, its line ending (CRLF too) and the file's missing
final newline. Each renderer makes the value the file's reader ends up with
(dash sourcing a shell file, configparser reading supervisord.conf) exactly
the one asked for, or refuses before anything is written; ``ulimit_values``,
``assignment_value`` and ``minfds_value`` say what a file sets now. The only
process started is ``sh -n`` (``sstuning_shell.check_shell``), which parses
and runs nothing. Errors say what is wrong with the file; the caller adds
which pillar path named it.
"""

import os
import re

from salt.exceptions import CommandExecutionError

import sstuning_shell as shell
import sstuning_shellforms as shellforms
from sstuning_sysctld import split_lines as _split_lines
from sstuning_shell import check_shell  # noqa: F401 (part of this toolkit's interface)

NOFILE_COMMENT = "# Open-file limit, managed by Salt (shadowsocks_tuning)"
SHELLS = ("sh", "dash", "bash", "ash", "ksh", "mksh", "zsh", "busybox", "init-d-script")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # \Z: `$` would let a trailing newline through
# Printable, and nothing a shell would expand or split when it sources the file.
ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]{0,256}\Z")
_INI_SECTION = re.compile(r"^[ \t]*\[(?P<name>[^\]]+)\][ \t]*(?:[;#].*)?$")
_MINFDS = re.compile(r"^(?P<key>minfds)(?P<sep>[ \t]*[=:][ \t]*)(?P<value>[^;#\s]*)(?P<tail>.*)$", re.IGNORECASE)


# "\n" only, so CRLF endings, stray control characters and a missing final
# newline all survive byte for byte.
# --------------------------------------------------------------------------
def _rewrite_first(lines, entries, replace):
    """(lines, first): the first managed line (``entries``, in order) given
    by ``replace(entry, ending)`` as [(body, ending)], the later ones
    dropped (the first now says it all), every other line kept; first is
    None when there is none."""
    managed = {entry["line"]: entry for entry in entries}
    first = entries[0]["line"] if entries else None
    out = []
    for number, (body, ending) in enumerate(lines, 1):
        if number == first:
            out.extend(replace(managed[number], ending))
        elif number not in managed:
            out.append((body, ending))
    return out, first


def _join(lines):
    return "".join(body + ending for body, ending in lines)


def _eol(lines):
    return next((ending for _, ending in lines if ending), "\n")


def _insert_lines(lines, index, bodies, eol):
    """Insert new lines before `index`; at the end, a file without a final
    newline keeps that shape (the separator goes before the new lines)."""
    lines = list(lines)
    if index < len(lines):
        lines[index:index] = [(body, eol) for body in bodies]
        return lines
    unterminated = bool(lines) and lines[-1][1] == ""
    if unterminated:
        lines[-1] = (lines[-1][0], eol)
    lines.extend((body, eol) for body in bodies)
    if unterminated:
        lines[-1] = (lines[-1][0], "")
    return lines


def _keep_final_newline(before, after):
    """A dropped last line must not give the file a final newline it lacked."""
    if before and before[-1][1] == "" and after and after[-1][1] != "":
        after[-1] = (after[-1][0], "")
    return after


def _is_comment(body):
    return body.lstrip().startswith("#")


def refuse_binary(text, path):
    """A NUL byte means a program, not a shell file: writing a line into it
    would destroy it."""
    if text and "\0" in text:
        raise CommandExecutionError(
            f"{path}: a binary file (it holds NUL bytes), not a shell script; `ulimit -n` can only go in a shell "
            "script: set the limit where this daemon is started instead, or remove it from pillar"
        )


def check_shell_script(lines, path):
    first = lines[0][0] if lines else ""
    if not first.startswith("#!"):
        return  # no interpreter line: the kernel hands it to /bin/sh
    words = first[2:].split()
    program = os.path.basename(words[0]) if words else ""
    if program == "env":
        program = os.path.basename(next((w for w in words[1:] if not w.startswith("-")), ""))
    if program not in SHELLS:
        raise CommandExecutionError(
            f"{path}: not a shell script ({first.strip()}); `ulimit -n` only works in a shell script: "
            "set the limit where this daemon is started instead, or remove it from pillar"
        )


def _init_insert_index(lines):
    """Where a new `ulimit` line runs before anything else in an init script:
    right after the LSB header, else after the leading comments."""
    for index, (body, _) in enumerate(lines):
        if body.strip() == "### END INIT INFO":
            return index + 1
    index = 0
    while index < len(lines) and (not lines[index][0].strip() or _is_comment(lines[index][0])):
        index += 1
    return index


# --------------------------------------------------------------------------
# Shell files: ulimit -n and KEY=value
#
# What a file sets is what its plain top-level lines set, read as dash reads
# them (``sstuning_shellforms``); any managed line elsewhere (in an if, a case,
# a loop, a function, a subshell, a continued line) or in a form this module
# cannot edit is refused, naming path:line, before anything is written. Lines
# this module writes end in "\n" even in a CRLF file: dash takes the CR
# before a newline as part of the last word (`ulimit -n 16384\r` fails with
# "bad number"). Every edited text is checked before it is returned: it
# parses (`sh -n`) and reads back as exactly the value asked for.
# --------------------------------------------------------------------------
def _read_shell(text, path, placement="end", key=None, parse=True):
    """The managed lines of a shell file (see sstuning_shellforms.Reader), after
    refusing a binary, a script in another language and (``parse``) a file
    that does not parse as it is (``sh -n``, a process: a read that only
    reports what the file sets leaves it to the reader, which refuses what
    it cannot follow; every edit runs it)."""
    refuse_binary(text, path)
    if placement == "init":
        check_shell_script(_split_lines(text), path)
    if parse:
        shell.check_original(text or "", path)
    return shellforms.Reader(text or "", path, key)


def _verify(new, path, read, expected, old):
    """The edited text parses (one `sh -n`, a process) and reads back as
    `expected`, or nothing is written. When it does not parse, the file as
    it was is checked too, so that a file broken before any edit is named
    as such."""
    try:
        shell.check_shell(new, path)
        got = read(new)
    except CommandExecutionError as exc:
        shell.check_original(old or "", path)
        raise CommandExecutionError(
            f"{path}: the edited file would not be one this package can read back ({exc}); nothing was written: "
            "set the limit by hand, and report this file layout to shadowsocks_tuning"
        )
    if got != expected:
        raise CommandExecutionError(
            f"{path}: the edited file would give {got!r}, not {expected!r}; nothing was written: set the limit by "
            "hand, and report this file layout to shadowsocks_tuning"
        )


def _limit_value(value, what, path):
    """An open-file limit: an int >= 0 or "unlimited"."""
    if value == "unlimited":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"[0-9]+", str(value)):
        raise CommandExecutionError(f"{path}: {what} limit {value!r} is not a number >= 0 or 'unlimited'")
    return int(value)


def _rank(value):
    return float("inf") if value == "unlimited" else value


def ulimit_values(text, path, placement="end"):
    """(soft, hard) open-file limits that sourcing the file leaves, each an
    int, "unlimited", or None when this file does not set it: `ulimit -n N`
    sets both, `-Sn` the soft one, `-Hn` the hard one; later lines win. A
    line dash cannot run (a CR left in its value) sets nothing. Refuses, with
    path:line, a file it cannot read that way; with ``placement`` "init",
    first one that is no shell script at all (a Python init script)."""
    return _read_shell(text, path, placement, parse=False).ulimit_values()


def _ulimit_bodies(soft, hard):
    """The lines that leave exactly (soft, hard). `ulimit -n H` first sets
    both to H in one setrlimit() call, valid whatever the inherited soft
    limit (a bare `ulimit -Hn H` fails with EINVAL when the inherited soft
    limit is above H); then `-Sn S` lowers the soft one, never above the hard
    one at that moment."""
    if soft == hard:
        return [f"ulimit -n {hard}"]
    return [f"ulimit -n {hard}", f"ulimit -Sn {soft}"]


def _render_ulimit(text, soft, hard, path, placement):
    soft, hard = _limit_value(soft, "soft", path), _limit_value(hard, "hard", path)
    if _rank(soft) > _rank(hard):
        raise CommandExecutionError(f"{path}: soft limit {soft} is above the hard limit {hard}; no shell can set that")
    reader = _read_shell(text, path, placement, parse=False)  # _verify runs sh -n
    lines = _split_lines(text)
    bodies = _ulimit_bodies(soft, hard)
    def replace(entry, ending):
        new = [entry["indent"] + bodies[0] + entry["tail"]] + [entry["indent"] + b for b in bodies[1:]]
        # A last line without newline keeps that shape.
        return [(line, "\n") for line in new[:-1]] + [(new[-1], "\n" if ending else "")]

    out, first = _rewrite_first(lines, reader.ulimits, replace)
    if first is None:
        index = _init_insert_index(out) if placement == "init" else len(out)
        out = _insert_lines(out, index, [NOFILE_COMMENT] + bodies, "\n")
    new_text = _join(_keep_final_newline(lines, out))
    _verify(new_text, path, lambda t: shellforms.Reader(t, path).ulimit_values(), (soft, hard), text)
    return new_text, reader.ulimit_values()


def render_ulimit_values(text, soft, hard, path, placement="end"):
    """New text whose effective open-file limits are exactly (soft, hard)
    (each an int or "unlimited", soft <= hard): one `ulimit -n N` line when
    they are equal, else `ulimit -n HARD` then `ulimit -Sn SOFT`. The first
    existing top-level `ulimit -n` line is rewritten in place (indentation
    and trailing comment kept), later ones are dropped, commented-out ones
    and every other byte kept. Without one, the lines go at the end (a
    sourced defaults file) or before the first command (placement "init":
    an init script)."""
    return _render_ulimit(text, soft, hard, path, placement)[0]


def render_ulimit(text, nofile, path, placement="end"):
    """`render_ulimit_values` with soft = hard = `nofile`. Returns (new_text,
    old): old is the soft limit the file set before, as a string ("unlimited"
    too), or None when it set none: the soft limit is the one a daemon gets
    (a file with `ulimit -Hn 19000` then `ulimit -Sn 1024` gives "1024")."""
    new_text, (soft, _) = _render_ulimit(text, nofile, nofile, path, placement)
    return new_text, None if soft is None else str(soft)


def assignment_value(text, key, path):
    """The value sourcing the file gives `key` (the last plain top-level
    `KEY=value` or `export KEY=value`, quotes removed; a CR left by a CRLF
    line end is part of it, as in dash), or None when the file does not set
    it. Refuses, with path:line, a file that sets it in a form it cannot read."""
    return _read_shell(text, path, key=key, parse=False).assignment_value()


def render_assignment(text, key, value, path):
    """Exactly one active `KEY=value` line (`export KEY=...` too): the first
    is rewritten in place, keeping its quotes and trailing comment; later
    ones are dropped; missing, it is appended. Returns (new_text, old): old is
    the value the file gave KEY before (``assignment_value``), or None when it
    gave none, or one no shell reads as written (a CR from a CRLF line end)."""
    if not ENV_KEY.match(key or ""):
        raise CommandExecutionError(f"{path}: {key!r} is not a shell variable name such as MAXFD")
    value = str(value)
    if not ENV_VALUE.match(value):
        raise CommandExecutionError(f"{path}: {key} value {value!r} is not a plain value a shell reads as written")
    reader = _read_shell(text, path, key=key, parse=False)  # _verify runs sh -n
    lines = _split_lines(text)
    def replace(entry, ending):
        quote = entry["quote"]
        return [(f"{entry['indent']}{entry['export']}{key}={quote}{value}{quote}{entry['tail']}",
                 "\n" if ending else "")]

    out, first = _rewrite_first(lines, reader.assignments, replace)
    if first is None:
        out = _insert_lines(out, len(out), [NOFILE_COMMENT, f"{key}={value}"], "\n")
    new_text = _join(_keep_final_newline(lines, out))
    _verify(new_text, path, lambda t: shellforms.Reader(t, path, key).assignment_value(), value, text)
    old = reader.assignment_value()
    return new_text, None if old is None or "\r" in old else old


# --------------------------------------------------------------------------
# supervisord.conf: minfds
#
# supervisord reads it with configparser (strict=False, inline comments ; and
# #): sections of the same name merge, a later option wins, a section name is
# not stripped, and an indented line continues the value before it.
# --------------------------------------------------------------------------
def _minfds_lines(lines, path):
    """[(index, match)] of every minfds line in a [supervisord] section."""
    found, section, last = [], None, None
    for index, (body, _) in enumerate(lines):
        header = _INI_SECTION.match(body)
        if header:
            section, last = header.group("name"), None
            continue
        stripped = body.strip()
        if not stripped or stripped[0] in ";#":
            continue
        if body[0] in " \t":
            if last is not None:
                raise CommandExecutionError(
                    f"{path}:{index + 1}: {stripped!r} is indented, so supervisord reads it as more of the minfds "
                    f"value of line {last + 1}: remove its indentation (or the line) and run again"
                )
            continue
        match = _MINFDS.match(body) if section == "supervisord" else None
        last = index if match else None
        if match:
            found.append((index, match))
    return found


def minfds_value(text, path):
    """The minfds supervisord reads from this file (the last one of its
    [supervisord] sections), or None."""
    found = _minfds_lines(_split_lines(text), path)
    return found[-1][1].group("value") if found else None


def render_minfds(text, nofile, path):
    """`minfds=<nofile>` in the [supervisord] section of a supervisord config:
    the first one rewritten in place, later ones in that section (or another
    [supervisord] section, which configparser merges) dropped; missing, it
    goes after the first [supervisord] section's last setting. Returns
    (new_text, old): old is the minfds supervisord read before (the last
    one), or None."""
    lines = _split_lines(text)
    found = dict(_minfds_lines(lines, path))
    first = min(found) if found else None
    out = []
    section, in_first, anchor = None, False, None  # anchor: index in `out` to insert after
    for index, (body, ending) in enumerate(lines):
        header = _INI_SECTION.match(body)
        if header:
            section = header.group("name")
            in_first = section == "supervisord" and anchor is None
            if in_first:
                anchor = len(out)
            out.append((body, ending))
            continue
        if index in found:
            if index == first:
                match = found[index]
                out.append((f"{match.group('key')}{match.group('sep')}{nofile}{match.group('tail')}", ending))
            continue
        stripped = body.strip()
        if in_first and stripped and stripped[0] not in ";#":
            anchor = len(out)
        out.append((body, ending))
    if anchor is None:
        raise CommandExecutionError(
            f"{path}: no [supervisord] section, so this is not supervisord's main configuration; point pillar "
            "at that file (Debian: /etc/supervisor/supervisord.conf)"
        )
    if first is None:
        out = _insert_lines(out, anchor + 1, [f"minfds={nofile}"], _eol(lines))
    old = found[max(found)].group("value") if found else None
    return _join(_keep_final_newline(lines, out)), old


def render_dropin(nofile, unit):
    return (
        f"# Open-file limit of {unit}, managed by Salt (shadowsocks_tuning).\n"
        f"[Service]\nLimitNOFILE={nofile}\n"
    )




def dropin_limit(text):
    """The LimitNOFILE value of a drop-in's text, or None."""
    match = re.search(r"^LimitNOFILE=(\S*)", text or "", re.MULTILINE)
    return match.group(1) if match else None
