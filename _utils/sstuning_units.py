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


def dropins(unit_dirs, unit):
    """The drop-in files systemd applies to ``unit``, in the order it
    applies them: from ``UNIT.d``, the template's ``foo@.service.d``, every
    dash prefix's ``foo-.service.d`` (systemd >= 239: ``a-b-c.service``
    reads ``a-b-.service.d`` and ``a-.service.d``) and the type's
    ``service.d``; a more specific directory hides a same-named file of a
    less specific one."""
    names = [unit] + [t for t in (template_of(unit),) if t]
    stem = unit[: -len(".service")] if unit.endswith(".service") else unit
    stem = stem.split("@", 1)[0]
    parts = stem.split("-")
    names += ["-".join(parts[:i]) + "-.service" for i in range(len(parts) - 1, 0, -1)] + ["service"]
    by_name = {}
    for directory in unit_dirs:  # the first directory (/etc) wins a file name
        for name in names:  # the instance's own directory before its template's
            entries = []
            with contextlib.suppress(OSError):
                entries = os.listdir(os.path.join(directory, f"{name}.d"))
            for entry in entries:
                if entry.endswith(".conf") and entry not in by_name:
                    by_name[entry] = os.path.join(directory, f"{name}.d", entry)
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


def effective(unit_dirs, unit, nr_open, default, skip=None):
    """What the unit file and its drop-ins give ``unit``, leaving ``skip``
    (this package's own drop-in) out: ``{"limit": (soft, hard), "source":
    path or "DefaultLimitNOFILE", "after": [(path, (soft, hard))]}``.
    ``limit`` is what the unit file and the drop-ins read before ``skip``
    give (the value this package's drop-in must never go below); ``after``
    lists the drop-ins that set LimitNOFILE and are read after ``skip``, in
    order: the last one wins over it. Without ``skip``, ``limit`` is what
    they all give. A value systemd could not parse is an error naming the
    file."""
    limit, source, after = default, "DefaultLimitNOFILE", []
    own = os.path.basename(skip) if skip else None
    for path in filter(None, [unit_file(unit_dirs, unit)] + dropins(unit_dirs, unit)):
        name = os.path.basename(path)
        if name == own:
            continue
        try:
            values = assignments(journal.read_text(path, 1 << 20))
        except journal.NotRegularFile:
            continue
        # A drop-in named after this package's own is read after it, and wins.
        later = bool(own) and path.endswith(".conf") and os.path.basename(os.path.dirname(path)).endswith(".d") \
            and name > own
        for raw in values:
            try:
                parsed = parse_limit(raw, nr_open)
            except ValueError as exc:
                raise ValueError(f"{path}: LimitNOFILE={raw}: {exc}") from None
            if later:
                after.append((path, parsed or default))
            else:
                limit, source = (parsed or default), path
    return {"limit": limit, "source": source, "after": after}


def render_dropin(soft, hard, unit):
    value = str(soft) if soft == hard else f"{soft}:{hard}"
    return (f"# Open-file limit of {unit}, managed by Salt (shadowsocks_tuning): never below what the unit\n"
            f"# and the drop-ins read before this one give it.\n[Service]\nLimitNOFILE={value}\n")


def show(run, systemctl, units, nr_open):
    """``{unit: (soft, hard)}`` as the running systemd merged them
    (``systemctl show -p Id,LimitNOFILESoft,LimitNOFILE``, one call for all);
    templates and units systemd does not know are left out. ``run(argv)``
    gives ``(rc, output)``."""
    names = [u for u in units if not u.endswith("@.service")]
    if not names:
        return {}
    rc, output = run([systemctl, "show", "--property=Id,LoadState,LimitNOFILESoft,LimitNOFILE", "--", *names])
    if rc != 0:
        return {}
    found = {}
    for block in output.split("\n\n"):
        fields = dict(line.split("=", 1) for line in block.strip().splitlines() if "=" in line)
        if fields.get("LoadState") != "loaded" or "Id" not in fields:
            continue
        with contextlib.suppress(KeyError, ValueError):
            found[fields["Id"]] = (_number(fields["LimitNOFILESoft"], nr_open), _number(fields["LimitNOFILE"], nr_open))
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
