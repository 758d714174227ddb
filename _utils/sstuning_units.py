"""
systemd units: which unit file and drop-ins systemd reads for a unit, in
systemd's order, and the ``LimitNOFILE`` they give it, so that this
package's own drop-in is written only where it raises the effective value
and never lowers it (an admin's ``override.conf`` from ``systemctl edit``
sorts before it; a ``zz-*.conf`` after it, and wins). Where systemd runs,
``systemctl show`` is the authority for what it merged.

systemd.unit(5): drop-ins ``UNIT.d/*.conf`` from every unit directory are
merged by file name (a name in /etc hides the same name in /run and
/usr/lib; an instance's ``foo@bar.service.d`` hides its template's
``foo@.service.d`` of the same name) and applied in file-name order after
the unit file; for ``LimitNOFILE=`` the last assignment wins, an empty one
resets it to ``DefaultLimitNOFILE`` (systemd-system.conf(5): 1024:524288
since systemd 240). ``infinity`` is the kernel's ceiling, ``fs.nr_open``.
"""

import contextlib
import os
import re

import sstuning_journal as journal

# Named to sort after `override.conf` (systemctl edit), before `zz-*.conf`.
DROPIN_NAME = "shadowsocks-tuning-nofile.conf"
DEFAULT_LIMIT = "1024:524288"
SYSTEM_CONF = ("/etc/systemd/system.conf", "/etc/systemd/system.conf.d")

_SECTION = re.compile(r"^\s*\[(?P<name>[^\]]*)\]\s*$")
_LIMIT = re.compile(r"^\s*(?P<key>LimitNOFILE|DefaultLimitNOFILE)\s*=\s*(?P<value>.*?)\s*$")


def dropin_path(systemd_dir, unit):
    return os.path.join(systemd_dir, f"{unit}.d", DROPIN_NAME)


def template_of(unit):
    """``foo@.service`` for an instance ``foo@bar.service``, else None."""
    if "@" in unit and not unit.endswith("@.service"):
        return unit.split("@", 1)[0] + "@.service"
    return None


def unit_file(unit_dirs, unit):
    """The unit file systemd loads for ``unit`` (its template for an instance), or None."""
    for name in filter(None, (unit, template_of(unit))):
        for directory in unit_dirs:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def _names(unit):
    """The names whose ``NAME.d`` directories systemd (since 246) reads for
    ``unit``, most specific first: the unit, its template, then each prefix
    ending in a dash (``shadowsocks-.service`` for ``shadowsocks-libev.service``)."""
    names = [unit] + [t for t in (template_of(unit),) if t]
    stem, _, suffix = unit.rpartition(".")
    base = stem.split("@", 1)[0]
    for index in range(len(base) - 1, 0, -1):
        if base[index] == "-":
            names.append(f"{base[:index + 1]}.{suffix}")
    return names


def dropins(unit_dirs, unit, extra=()):
    """The drop-in files systemd applies to ``unit``, in the order it applies
    them. Checked against systemd 252: a file name seen first wins, looking
    through the unit directories in order and, in each, the unit's own
    ``.d``, its template's, its dash prefixes'; the type-wide ``service.d``
    of every directory comes last. ``extra``: drop-ins systemd itself names
    (``systemctl show -p DropInPaths``), which win their file name: they may
    lie where ``unit_dirs`` does not look (``system.control``, generators)."""
    by_name = {}
    for path in extra:
        if os.path.isfile(path):
            by_name.setdefault(os.path.basename(path), path)
    suffix = unit.rpartition(".")[2]
    dirs = [os.path.join(d, f"{name}.d") for d in unit_dirs for name in _names(unit)]
    dirs += [os.path.join(d, f"{suffix}.d") for d in unit_dirs]
    for directory in dirs:
        entries = []
        with contextlib.suppress(OSError):
            entries = os.listdir(directory)
        for entry in entries:
            if entry.endswith(".conf") and entry not in by_name:
                by_name[entry] = os.path.join(directory, entry)
    return [by_name[name] for name in sorted(by_name)]


def parse_limit(value, nr_open):
    """``(soft, hard)`` of a ``LimitNOFILE=`` value (``infinity`` is
    ``nr_open``), None for an empty one (a reset), or raises ValueError."""
    value = value.strip()
    if not value:
        return None
    fields = value.split(":")
    if len(fields) > 2:
        raise ValueError(f"{value!r} is not N, SOFT:HARD or infinity")
    numbers = []
    for field in fields:
        if field == "infinity":
            numbers.append(nr_open)
        elif field.isdigit():
            numbers.append(int(field))
        else:
            raise ValueError(f"{value!r} is not N, SOFT:HARD or infinity")
    return (numbers[0], numbers[-1])


def assignments(text, key="LimitNOFILE", section="Service"):
    """Every ``key=`` value of ``section`` in a unit file or drop-in, in order."""
    found, current = [], None
    for line in (text or "").split("\n"):
        header = _SECTION.match(line)
        if header:
            current = header.group("name").strip()
            continue
        match = _LIMIT.match(line) if current == section else None
        if match and match.group("key") == key:
            found.append(match.group("value"))
    return found


def default_limit(nr_open, system_conf=SYSTEM_CONF):
    """systemd's DefaultLimitNOFILE: system.conf, then system.conf.d in name order."""
    conf, conf_dir = system_conf
    paths = [conf]
    with contextlib.suppress(OSError):
        paths += [os.path.join(conf_dir, n) for n in sorted(os.listdir(conf_dir)) if n.endswith(".conf")]
    value = parse_limit(DEFAULT_LIMIT, nr_open)
    for path in paths:
        with contextlib.suppress(OSError, journal.NotRegularFile, ValueError):
            for raw in assignments(journal.read_text(path, 1 << 20), "DefaultLimitNOFILE", "Manager"):
                value = parse_limit(raw, nr_open) or parse_limit(DEFAULT_LIMIT, nr_open)
    return value


def effective(unit_dirs, unit, nr_open, default, skip=None, extra=()):
    """What the unit file and its drop-ins give ``unit`` around ``skip``
    (this package's own drop-in, left out): ``{"before": (soft, hard)`` in
    force where ``skip`` is read, and ``"before_source"`` (a path or
    ``DefaultLimitNOFILE``); ``"limit"`` and ``"source"``: what they give
    in the end without ``skip``; ``"after"``: ``[(path, (soft, hard))]`` of
    the drop-ins read after ``skip`` that set LimitNOFILE (the last wins
    over it); ``"files"``: every file read}``. ``extra``: see ``dropins``.
    A value systemd could not parse is an error naming the file."""
    limit, source, after = default, "DefaultLimitNOFILE", []
    before, before_source = None, None
    own = os.path.basename(skip) if skip else None
    fragment = unit_file(unit_dirs, unit)
    files = ([fragment] if fragment else []) + dropins(unit_dirs, unit, extra)
    for path in files:
        name = os.path.basename(path)
        if name == own:
            continue
        # Drop-ins are applied in file-name order: one named after ours is read after it.
        if own and before is None and path != fragment and name > own:
            before, before_source = limit, source
        try:
            values = assignments(journal.read_text(path, 1 << 20))
        except journal.NotRegularFile:
            continue
        for raw in values:
            try:
                parsed = parse_limit(raw, nr_open)
            except ValueError as exc:
                raise ValueError(f"{path}: LimitNOFILE={raw}: {exc}") from None
            limit, source = (parsed or default), path
            if before is not None:
                after.append((path, limit))
    if before is None:
        before, before_source = limit, source
    return {"limit": limit, "source": source, "before": before, "before_source": before_source, "after": after,
            "files": files}


def clamp(pair, ceiling):
    """What systemd really gives for a configured (soft, hard): it clamps
    each field to the hard limit it has itself (without CAP_SYS_RESOURCE),
    silently (``systemctl show`` keeps the configured value)."""
    return tuple(None if v is None else min(v, ceiling) for v in pair)


def render_dropin(soft, hard, unit):
    value = str(soft) if soft == hard else f"{soft}:{hard}"
    return (f"# Open-file limit of {unit}, managed by Salt (shadowsocks_tuning): never below what the unit\n"
            f"# and the drop-ins read before this one give it.\n[Service]\nLimitNOFILE={value}\n")


def show(run, systemctl, units, nr_open):
    """``{unit: {"limit": (soft, hard), "dropins": [paths], "fragment": path,
    "reload": bool}}`` as the running systemd has them merged (``systemctl
    show -p Id,LoadState,LimitNOFILESoft,LimitNOFILE,DropInPaths,
    FragmentPath,NeedDaemonReload``, one call for all): the configured
    values, not what systemd could grant; ``reload``: the files changed
    since systemd read them. Templates and units systemd does not know are
    left out. ``run(argv)`` gives ``(rc, output)``."""
    names = [u for u in units if not u.endswith("@.service")]
    if not names:
        return {}
    rc, output = run([systemctl, "show", "--property=Id,LoadState,LimitNOFILESoft,LimitNOFILE,DropInPaths,"
                      "FragmentPath,NeedDaemonReload", "--", *names])
    if rc != 0:
        return {}
    found = {}
    for block in output.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.strip().splitlines() if "=" in line)
        if fields.get("LoadState") != "loaded" or "Id" not in fields:
            continue
        with contextlib.suppress(KeyError, ValueError):
            found[fields["Id"]] = {
                "limit": (_number(fields["LimitNOFILESoft"], nr_open), _number(fields["LimitNOFILE"], nr_open)),
                "dropins": fields.get("DropInPaths", "").split(),
                "fragment": fields.get("FragmentPath") or None,
                "reload": fields.get("NeedDaemonReload") == "yes",
            }
    return found


def _number(text, nr_open):
    # systemctl show prints infinity as the largest unsigned 64-bit value.
    return nr_open if text in ("infinity", str(2**64 - 1)) else int(text)


def unit_of(pid):
    """The systemd unit a process runs in, from its cgroup, or None."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cgroup", "rb") as handle:
            text = handle.read(4096).decode("utf-8", "replace")
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            for part in reversed(path.split("/")):
                if part.endswith(".service"):
                    return part
    return None
