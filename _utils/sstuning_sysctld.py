"""
The sysctl.d side: parse a sysctl.d file, render the managed file with every
foreign line kept byte for byte, and know the order in which
``sysctl --system`` reads files at boot, to find a later file that overrides
a managed key. Pure text functions; the boot order takes its directories as
arguments.
"""

import contextlib
import os
import re

from sstuning_catalogue import normalise_live
from sstuning_journal import NotRegularFile, read_text

MANAGED_HEADER = "# Managed by Salt (shadowsocks_tuning); other lines are left as they are."

_ASSIGNMENT = re.compile(r"^\s*-?\s*([^\s=#;]+)\s*=\s*(.*?)\s*$")


def _conf_key(raw):
    # sysctl.d(5): when the first separator is '/', '/' separates and '.' is literal.
    if "/" in raw and (raw.find("/") < raw.find(".") or "." not in raw):
        return raw.strip("/").replace(".", "\0").replace("/", ".").replace("\0", "/")
    return raw


def parse_conf(text):
    """[(line_index, key, value)] for every assignment in a sysctl.d file."""
    found = []
    for index, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = _ASSIGNMENT.match(line)
        if match:
            found.append((index, _conf_key(match.group(1)), normalise_live(match.group(2))))
    return found



def render_conf(old, values, dropped, profile_name):
    """New file text: managed keys set in place (first line kept, later
    duplicates removed), keys that cannot be set here commented out, missing
    keys appended. Every other line, its bytes and line ending, is kept."""
    old = old or ""
    lines = old.splitlines(keepends=True)
    eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    seen = set()
    out = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        match = _ASSIGNMENT.match(line) if stripped and stripped[0] not in "#;" else None
        key = _conf_key(match.group(1)) if match else None
        ending = line[len(line.rstrip("\r\n")):]
        if key in values:
            if key in seen:
                continue
            seen.add(key)
            out.append(f"{key} = {values[key]}{ending}")
        elif key in dropped:
            out.append(f"# {line.rstrip(chr(13) + chr(10))}  # disabled by shadowsocks_tuning: {dropped[key]}{ending}")
        else:
            out.append(line)
    missing = [k for k in values if k not in seen]
    if missing:
        if out and not out[-1].endswith(("\n", "\r")):
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
        for index, key, value in parse_conf(text):
            if key in values:
                winners[key] = (path, index + 1, value)
    note = f"not read (sysctl --system cannot read it either): {'; '.join(unreadable)}" if unreadable else None
    return {k: w for k, w in winners.items() if w[2] != values[k]}, note


