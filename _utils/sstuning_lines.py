"""
One toolkit for editing line-oriented files owned by others: shell files
(``ulimit -n N``, ``KEY=value``), supervisord's INI file (``minfds=N``) and
systemd drop-ins. Pure functions, text in and text out: every line this
package does not manage keeps its bytes, its line ending (CRLF too) and the
file's missing final newline. Errors say what is wrong with the file; the
caller adds which pillar path named it.
"""

import os
import re

from salt.exceptions import CommandExecutionError

NOFILE_COMMENT = "# Open-file limit, managed by Salt (shadowsocks_tuning)"
SHELLS = ("sh", "dash", "bash", "ash", "ksh", "mksh", "zsh", "busybox", "init-d-script")
ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # \Z: `$` would let a trailing newline through
# Printable, and nothing a shell would expand or split when it sources the file.
ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]{0,256}\Z")
# `ulimit -n N`, `ulimit -SHn N`, `ulimit -S -n "$MAXFD"  # why`: a line of its own.
_ULIMIT_LINE = re.compile(
    r"^(?P<indent>[ \t]*)ulimit(?:[ \t]+-[SH]+)*[ \t]+-[SH]*n[SH]*[ \t]+(?P<value>[^\s;&|#]+)(?P<tail>[ \t]*(?:#.*)?)$"
)
_ULIMIT_QUERY = re.compile(r"^[ \t]*ulimit(?:[ \t]+-[SH]+)*[ \t]+-[SH]*n[SH]*[ \t]*(?:#.*)?$")
# `ulimit ... -n` anywhere a command can start: compound forms this module does not rewrite.
_ULIMIT_ANY = re.compile(r"(?:^|[;&|({]|\b(?:then|do|else)\b)[ \t]*ulimit\b[^;&|#]*[ \t]-[A-Za-z]*n")
_INI_SECTION = re.compile(r"^[ \t]*\[(?P<name>[^\]]*)\][ \t]*(?:[;#].*)?$")
_MINFDS = re.compile(r"^(?P<key>minfds)(?P<sep>[ \t]*[=:][ \t]*)(?P<value>[^;#\s]*)(?P<tail>.*)$", re.IGNORECASE)


# "\n" only, so CRLF endings, stray control characters and a missing final
# newline all survive byte for byte.
# --------------------------------------------------------------------------
def _split_lines(text):
    """[(body, ending)]: ending is "\\n", "\\r\\n" or "" (a last line without newline)."""
    parts = (text or "").split("\n")
    last = parts.pop()
    lines = [(part[:-1], "\r\n") if part.endswith("\r") else (part, "\n") for part in parts]
    if last:
        lines.append((last, ""))
    return lines


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


def render_ulimit(text, nofile, path, placement="end"):
    """Exactly one active `ulimit -n <nofile>` line: the first existing one is
    rewritten in place (indentation and trailing comment kept), later ones are
    dropped, commented-out ones are left alone. Without one, a new line goes at
    the end (a sourced defaults file) or before the first command (an init
    script). Returns (new_text, old_value or None)."""
    refuse_binary(text, path)
    lines = _split_lines(text)
    if placement == "init":
        check_shell_script(lines, path)
    wanted = f"ulimit -n {nofile}"
    out, old = [], None
    for number, (body, ending) in enumerate(lines, 1):
        if _is_comment(body):
            out.append((body, ending))
            continue
        match = _ULIMIT_LINE.match(body)
        if match:
            if old is None:
                old = match.group("value")
                out.append((f"{match.group('indent')}{wanted}{match.group('tail')}", ending))
            continue
        if _ULIMIT_ANY.search(body) and not _ULIMIT_QUERY.match(body):
            raise CommandExecutionError(
                f"{path}:{number}: {body.strip()!r} sets the open-file limit in a form this module does not "
                "rewrite; make it a plain `ulimit -n N` line of its own (or remove it) and run again"
            )
        out.append((body, ending))
    if old is None:
        index = _init_insert_index(out) if placement == "init" else len(out)
        out = _insert_lines(out, index, [NOFILE_COMMENT, wanted], _eol(lines))
    return _join(_keep_final_newline(lines, out)), old


_ASSIGNMENTS = {}


def _assignment_pattern(key):
    """`KEY=value` and `export KEY=value`, compiled once per key."""
    if key not in _ASSIGNMENTS:
        _ASSIGNMENTS[key] = re.compile(
            r"^(?P<indent>[ \t]*)(?P<export>export[ \t]+)?" + re.escape(key)
            + r"=(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&|#]*)(?P<tail>.*)$"
        )
    return _ASSIGNMENTS[key]


_assignment_pattern("MAXFD")  # the one key the SLS manages, ready before the first apply


def render_assignment(text, key, value, path):
    """Exactly one active `KEY=value` line (`export KEY=...` too): the first is
    rewritten in place, keeping its quotes and trailing comment; later ones are
    dropped; missing, it is appended. Returns (new_text, old_value or None)."""
    refuse_binary(text, path)
    pattern = _assignment_pattern(key)
    lines = _split_lines(text)
    out, old = [], None
    for body, ending in lines:
        match = None if _is_comment(body) else pattern.match(body)
        if not match:
            out.append((body, ending))
            continue
        if old is None:
            raw = match.group("value")
            quote = raw[0] if raw[:1] in ("'", '"') else ""
            old = raw[1:-1] if quote else raw
            new = f"{match.group('indent')}{match.group('export') or ''}{key}={quote}{value}{quote}{match.group('tail')}"
            out.append((new, ending))
    if old is None:
        out = _insert_lines(out, len(out), [NOFILE_COMMENT, f"{key}={value}"], _eol(lines))
    return _join(_keep_final_newline(lines, out)), old


def render_minfds(text, nofile, path):
    """`minfds=<nofile>` in the [supervisord] section of a supervisord config:
    the first one rewritten in place, later ones in that section dropped;
    missing, it goes after the first [supervisord] section's last setting.
    Returns (new_text, old_value or None)."""
    lines = _split_lines(text)
    out, old = [], None
    section, first, anchor = None, False, None  # anchor: index in `out` to insert after
    for body, ending in lines:
        header = _INI_SECTION.match(body)
        if header:
            section = header.group("name").strip()
            first = section == "supervisord" and anchor is None
            if first:
                anchor = len(out)
            out.append((body, ending))
            continue
        match = _MINFDS.match(body) if section == "supervisord" else None
        if match:
            if old is None:
                old = match.group("value")
                out.append((f"{match.group('key')}{match.group('sep')}{nofile}{match.group('tail')}", ending))
            continue
        stripped = body.strip()
        if first and stripped and stripped[0] not in ";#":
            anchor = len(out)
        out.append((body, ending))
    if anchor is None:
        raise CommandExecutionError(
            f"{path}: no [supervisord] section, so this is not supervisord's main configuration; point pillar "
            "at that file (Debian: /etc/supervisor/supervisord.conf)"
        )
    if old is None:
        out = _insert_lines(out, anchor + 1, [f"minfds={nofile}"], _eol(lines))
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
