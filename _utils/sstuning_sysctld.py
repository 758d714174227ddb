"""
The sysctl.d side: parse a sysctl.d file as the two boot readers read it,
render the managed file with every foreign line kept byte for byte, and know
the order in which ``sysctl --system`` reads files at boot, to find a later
file that overrides a managed key. Pure text functions; the boot order takes
its directories as arguments.

The two readers, from their sources and checked by running them in a fresh
network namespace (tests/unit/test_sysctld.py):

- procps-ng ``sysctl -p FILE`` / ``sysctl --system`` (``Preload()`` and
  ``parse_setting_line()``, procps-ng 4.0.2 here): ``getline()`` lines, split
  on "\n" only; a NUL ends the line's text (C strings); the line and then the
  key and value are stripped with C ``isspace()``: blank, \t, \n, \v, \f, \r;
  a line shorter than 2 characters, or starting (after blanks) with ``#`` or
  ``;``, is skipped; the key is what precedes the first ``=``; a leading ``-``
  (ignore failures) is removed and not followed by more stripping.
- systemd ``systemd-sysctl`` (``parse_file()`` with ``read_line()`` and
  ``strstrip()``, systemd 252 here): lines end at "\n", at a lone "\r" and at
  a NUL; whitespace is only blank, \t, \n, \r (``WHITESPACE``); the key is
  stripped again after its ``-``.

Neither strips a UTF-8 byte order mark, and neither splits at a form feed,
vertical tab, \x1c-\x1e, \x85 or U+2028/U+2029 (Python's ``splitlines()``
does). Where the two disagree (a CR or NUL inside a line, a form feed or
vertical tab at an edge, a blank after ``-``), a line counts as setting a key
only if both would set it to the same value (``parse_conf``); the renderer
comments such a line out when it touches a managed key, so that neither
reader sets it behind the managed line's back.
"""

import contextlib
import os
import re

from sstuning_catalogue import normalise_live
from sstuning_journal import NotRegularFile, read_text

MANAGED_HEADER = "# Managed by Salt (shadowsocks_tuning); other lines are left as they are."

PROCPS_SPACE = " \t\n\v\f\r"  # C isspace() (C and UTF-8 locales alike: no byte >= 0x80 is a space)
SYSTEMD_SPACE = " \t\n\r"  # systemd's WHITESPACE
_SYSTEMD_LINE_END = re.compile("[\r\0]")  # read_line() ends a line there too ("\r\n" is one end)


def _conf_key(raw):
    # sysctl.d(5): when the first separator is '/', '/' separates and '.' is literal.
    if "/" in raw and (raw.find("/") < raw.find(".") or "." not in raw):
        return raw.strip("/").replace(".", "\0").replace("/", ".").replace("\0", "/")
    return raw


def _procps(body, terminated):
    """(key, value) that procps-ng sysctl reads from one "\n" line, or None."""
    if len(body) + terminated < 2:  # getline() length, newline included
        return None
    line = body.split("\0", 1)[0].lstrip(PROCPS_SPACE)
    if len(line) < 2 or line[0] in "#;" or "=" not in line:
        return None  # a comment, or no assignment (a `-key` exclusion, or a syntax warning)
    key, value = line.split("=", 1)
    key = key[1:] if key.startswith("-") else key
    return _conf_key(key.rstrip(PROCPS_SPACE)), value.strip(PROCPS_SPACE)


def _systemd(body):
    """[(key, value)] that systemd-sysctl reads from the same text (it may
    see several lines in it)."""
    found = []
    for part in _SYSTEMD_LINE_END.split(body):
        line = part.strip(SYSTEMD_SPACE)
        if not line or line[0] in "#;\n" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip(SYSTEMD_SPACE)
        key = key[1:].strip(SYSTEMD_SPACE) if key.startswith("-") else key
        found.append((_conf_key(key), value.strip(SYSTEMD_SPACE)))
    return found


def split_lines(text):
    """[(body, ending)] split on "\n" only, where sysctl --system, systemd-sysctl
    and dash split (CRLF endings, stray control characters and a missing final
    newline survive byte for byte); ending is "\n", "\r\n" or ""."""
    parts = (text or "").split("\n")
    last = parts.pop()
    lines = [(part[:-1], "\r\n") if part.endswith("\r") else (part, "\n") for part in parts]
    if last:
        lines.append((last, ""))
    return lines


def readings(text):
    """[(line_index, procps, systemd)] for every "\n" line: procps is
    (key, value) or None, systemd a list of (key, value)."""
    out = []
    for index, (body, ending) in enumerate(split_lines(text)):
        raw = body + ("\r" if ending == "\r\n" else "")
        out.append((index, _procps(raw, bool(ending)), _systemd(raw)))
    return out


def _agreed(procps, systemd):
    return procps if procps is not None and systemd == [procps] else None


def parse_conf(text, either=False):
    """[(line_index, key, value)] for every line that sets a key: one both
    boot readers read the same way, or (``either``) one that either of them
    reads (to find every line that may override a key at boot)."""
    found = []
    for index, procps, systemd in readings(text or ""):
        if either:
            pairs = list(dict.fromkeys(([procps] if procps else []) + systemd))
        else:
            pairs = [_agreed(procps, systemd)] if _agreed(procps, systemd) else []
        found.extend((index, key, normalise_live(value)) for key, value in pairs)
    return found


def _as_one_comment(body):
    """The line as text after `# `: a CR or NUL inside it (a line end for
    systemd-sysctl) becomes a blank, so both readers see one comment."""
    return _SYSTEMD_LINE_END.sub(" ", body)


def _said(pair):
    """`key = value` as a reader reads it, control characters escaped (a CR
    in the comment would end it for systemd-sysctl)."""
    return f"`{repr(pair[0])[1:-1]} = {repr(pair[1])[1:-1]}`" if pair else "nothing"


def _disputed(procps, systemd):
    return (f"sysctl --system reads {_said(procps)} here, systemd-sysctl reads "
            f"{', '.join(_said(p) for p in systemd) or 'nothing'}")


def render_conf(old, values, dropped, profile_name):
    """New file text: managed keys set in place (first line kept, later
    duplicates removed), keys that cannot be set here commented out, missing
    keys appended. A line the two boot readers read differently that would
    set a managed or dropped key for either is commented out (both then read
    it as a comment) and the key set on a line of its own. Every other line,
    its bytes and line ending, is kept."""
    old = old or ""
    lines = split_lines(old)
    eol = "\r\n" if lines and lines[0][1] == "\r\n" else "\n"
    touched_keys = set(values) | set(dropped)
    seen = set()
    out = []
    for (index, procps, systemd), (body, ending) in zip(readings(old), lines):
        agreed = _agreed(procps, systemd)
        key = agreed[0] if agreed else None
        touched = {pair[0] for pair in ([procps] if procps else []) + systemd} & touched_keys
        if key in values:
            if key not in seen:
                seen.add(key)
                out.append(f"{key} = {values[key]}{ending}")
        elif key in dropped:
            out.append(f"# {_as_one_comment(body)}  # disabled by shadowsocks_tuning: {dropped[key]}{ending}")
        elif touched:
            out.append(f"# {_as_one_comment(body)}  # disabled by shadowsocks_tuning: "
                       f"{_disputed(procps, systemd)}{ending}")
        else:
            out.append(body + ending)
    missing = [k for k in values if k not in seen]
    if missing:
        if out and not out[-1].endswith("\n"):  # only "\n" ends a line for both readers
            out[-1] += eol
        if MANAGED_HEADER not in old:
            out.append(f"{MANAGED_HEADER}{eol}")
            out.append(f"# profile: {profile_name}{eol}")
        out.extend(f"{key} = {values[key]}{eol}" for key in missing)
    return "".join(out)


def boot_order(sysctl_dirs, sysctl_conf, config=None):
    """Files `sysctl --system` reads, in order: *.conf from the sysctl.d
    directories merged by name (the first directory wins a clash), sorted by
    name, then /etc/sysctl.conf. `config` counts as present even before it
    is first written."""
    by_name = {}
    for directory in sysctl_dirs:
        entries = []
        with contextlib.suppress(OSError):
            entries = os.listdir(directory)
        if config and os.path.dirname(config) == directory.rstrip("/"):
            entries.append(os.path.basename(config))
        for entry in entries:
            if entry.endswith(".conf") and entry not in by_name:
                by_name[entry] = os.path.join(directory, entry)
    order = [by_name[name] for name in sorted(by_name)]
    if os.path.exists(sysctl_conf):
        order.append(sysctl_conf)
    return order


def overrides(sysctl_dirs, sysctl_conf, config, values):
    """{key: (file, line_no, value)} for files read after `config` at boot
    that set a managed key to another value (the last one wins)."""
    order = boot_order(sysctl_dirs, sysctl_conf, config)
    paths = [os.path.normpath(p) for p in order]
    where = os.path.normpath(config)
    if where not in paths:
        # Only a linked directory makes the same file look different: resolve then.
        paths, where = [os.path.realpath(p) for p in order], os.path.realpath(config)
    if where not in paths:
        return {}, f"{config} is not read by `sysctl --system` at boot (not in {', '.join(sysctl_dirs)})"
    later = order[paths.index(where) + 1:]
    winners, unreadable = {}, []
    for path in later:
        try:
            text = read_text(path) or ""
        except (NotRegularFile, OSError) as exc:
            unreadable.append(str(exc))
            continue
        for index, key, value in parse_conf(text, either=True):
            if key in values:
                winners[key] = (path, index + 1, value)
    note = f"not read (sysctl --system cannot read it either): {'; '.join(unreadable)}" if unreadable else None
    return {k: w for k, w in winners.items() if w[2] != values[k]}, note


