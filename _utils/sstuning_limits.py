"""
The open-file-limit engine. For every kind of daemon of the registry
(``sstuning_daemons``) and every init script and unit pillar names, it plans:

- the files that set the limit for the next start (``ulimit -n`` lines,
  ``MAXFD=``, supervisord's ``minfds``, systemd ``LimitNOFILE`` drop-ins),
  each judged against the value the box really gives now (the file's own
  value, or the unit file and every other drop-in in systemd's order), per
  field, never lower unless pillar forces it, and never above what the box
  can grant;
- every running process of those kinds (``/proc/PID/limits``) and what
  happens to it: ``in place``, ``raise`` (in place, ``prlimit(2)``, no
  connection cut), ``restart`` (its service is stopped and started: what a
  raise in place cannot reach), or ``left`` (said why).

``apply`` raises in place first, then writes the files, then restarts; the
proof is ``/proc/PID/limits`` read back. Every function takes resolved
settings and the minion options as plain values; ``plan`` reads everything
and checks everything before ``apply`` writes anything.
"""

import contextlib
import functools
import os
import resource
import time

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_configs as configs
import sstuning_journal as journal
import sstuning_lines as lines
import sstuning_ports as ports
import sstuning_procfs as procfs
import sstuning_services as services
import sstuning_units as units
from sstuning_catalogue import LIMIT_FIELDS, UP, keep_higher
from sstuning_settings import LIMITS, PILLAR

WHAT = {"ulimit": "ulimit -n", "minfds": "minfds", "assignment": "MAXFD", "dropin": "LimitNOFILE"}


# --------------------------------------------------------------------------
# What this box can grant
# --------------------------------------------------------------------------
def grantable(proc_root, init_system="sysvinit"):
    """The highest open-file limit a service started here can get: under
    sysvinit this process starts it, under systemd PID 1 does. Either grants
    up to ``fs.nr_open`` with CAP_SYS_RESOURCE, else up to its own hard limit
    (``ulimit -n N`` above it fails with "Operation not permitted"; systemd
    clamps a larger ``LimitNOFILE`` silently)."""
    nr_open = procfs.nr_open(proc_root)
    who = "1" if init_system == "systemd" else "self"
    if who == "self":
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        hard = nr_open if hard == resource.RLIM_INFINITY else hard
    else:
        hard = (procfs.proc_nofile(1) or (None, None))[1]
        hard = nr_open if hard is None else hard
    cap = procfs.has_cap_sys_resource(who)
    name = "salt" if who == "self" else "systemd (PID 1)"
    if cap:
        return {"limit": nr_open, "hard": hard, "cap_sys_resource": True, "nr_open": nr_open,
                "reason": f"{name} has CAP_SYS_RESOURCE, so it can grant up to fs.nr_open ({nr_open})"}
    limit = min(hard, nr_open)
    return {"limit": limit, "hard": hard, "cap_sys_resource": False, "nr_open": nr_open,
            "reason": f"{name} runs with a hard open-file limit of {hard} and without CAP_SYS_RESOURCE (CapEff bit "
                      f"{procfs.CAP_SYS_RESOURCE}), so a service it starts can get at most {limit}"}


def box(options):
    """The facts settings depend on: ``fs.nr_open``, whether systemd is PID 1,
    and what a restart can grant under each init system."""
    systemd = os.path.isdir(options["systemd_marker"])
    sysv = grantable(options["proc_root"], "sysvinit")["limit"]
    return {"nr_open": procfs.nr_open(options["proc_root"]), "systemd": systemd,
            "grantable": {"sysvinit": sysv,
                          "systemd": grantable(options["proc_root"], "systemd")["limit"] if systemd else sysv}}


def managed_paths(settings, options):
    """Every file the open-file-limit settings manage (``clean`` puts back no other)."""
    return {target["path"] or units.dropin_path(options["systemd_dir"], target["unit"])
            for groups in settings["limits"]["parts"].values() for group in groups for target in group["files"]}


def read_managed(path):
    """A managed file's text, None when missing; a link, a hard-linked file,
    a directory or anything but a regular file is an error."""
    try:
        return journal.read_managed(path)
    except CommandExecutionError:
        raise
    except OSError as exc:
        raise CommandExecutionError(f"{path}: cannot read: {exc.strerror or exc}")


# --------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------
def _pair(value):
    """(soft, hard) of a file's value: a number, ``unlimited``, None."""
    if isinstance(value, tuple):
        return value
    return (value, value)


def _number(value, nr_open):
    if value is None:
        return None
    if str(value) == "unlimited":
        return nr_open + 1  # no process can have it: above any ceiling
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def target_pair(current, nofile, ceiling, raises_soft, force):
    """Per field (soft, hard): at least ``nofile`` and never below what is
    there (the one never-worse rule, ``keep_higher``) unless ``force``, and
    never above ``ceiling``: a value no process can get gives at most the
    ceiling (systemd clamps it silently; a ``ulimit -n`` above it fails and
    the daemon keeps the hard limit it inherits, the ceiling), so it counts
    as the ceiling and is replaced by it, never by a lower ``nofile``. For
    a daemon that raises its soft limit to its hard limit by itself, only
    the hard limit is raised. Returns (target, notes): what was kept or
    replaced, in words."""
    notes, have, clamped = [], list(current), set()
    for index, value in enumerate(have):
        if value is not None and value > ceiling:
            notes.append(f"{LIMIT_FIELDS[index]} {value} cannot be granted here (at most {ceiling}): it gives "
                         f"{ceiling} at most, so {ceiling} is kept")
            have[index] = ceiling
            clamped.add(index)
    want = [nofile, nofile]
    if raises_soft and have[0] is not None:
        want[0] = have[0]  # the daemon raises it to its hard limit itself
    if force or None in have:
        target = [w if h is None or force else max(w, h) for w, h in zip(want, have)]
    else:
        text, kept = keep_higher(None, f"{want[0]} {want[1]}", f"{have[0]} {have[1]}", directions=(UP, UP))
        target = [int(v) for v in text.split()]
        notes.extend(f"{LIMIT_FIELDS[i]} {have[i]} kept (higher)" for i in range(2)
                     if target[i] > want[i] and i not in clamped)
    soft, hard = target
    return (min(soft, hard), hard), notes


def plan_file(options, target, nofile, force, ceiling, raises_soft=False, shown=None):
    """What managing one file would do, read but not written: ``{"path",
    "what", "changed", "skipped", "old", "new", "diff", "text", "comment",
    "overridden"}``."""
    kind = target["kind"]
    if isinstance(nofile, str) and nofile.strip().isdigit():
        nofile = int(nofile)  # set_assignment passes its value as text; it is compared with numbers
    what = target.get("key") if kind == "assignment" else WHAT[kind]
    path = target["path"] or units.dropin_path(options["systemd_dir"], target["unit"])
    result = {"path": path, "what": what, "changed": False, "skipped": False, "old": None, "new": None,
              "diff": "", "text": None, "overridden": [], "notes": []}
    nr_open = procfs.nr_open(options["proc_root"])
    if kind == "dropin":
        return _plan_dropin(options, target, result, nofile, force, ceiling, raises_soft, nr_open,
                            (shown or {}).get(target["unit"]))
    text = read_managed(path)
    if text is None:
        if target.get("required"):
            raise CommandExecutionError(
                f"{path} does not exist; install that service's init script, or remove it from pillar "
                f"{LIMITS}:init_scripts"
            )
        result.update(skipped=True, comment=f"{path} does not exist: nothing to manage")
        return result
    if kind == "ulimit":
        soft, hard = lines.ulimit_values(text, path, target.get("placement", "end"))
        current = (_number(soft, nr_open), _number(hard, nr_open))
    elif kind == "assignment":
        current = _pair(_number(lines.assignment_value(text, target["key"], path), nr_open))
    else:
        current = _pair(_number(lines.minfds_value(text, path), nr_open))
    # A file value sets soft and hard alike (ulimit -n, MAXFD, minfds): only the ulimit form splits them.
    wanted, notes = target_pair(current, nofile, ceiling, raises_soft and kind == "ulimit", force)
    if kind != "ulimit":  # one value for both fields: say it once
        wanted = (max(wanted), max(wanted))
        notes = sorted({note.split(" ", 1)[1] for note in notes})
    old = _show(current)
    result.update(old=old, new=_show(wanted))
    if wanted == current:
        result["comment"] = f"{path}: {what} {_show(wanted)} is in place" + (f" ({'; '.join(notes)})" if notes else "")
        return result
    if kind == "ulimit":
        # Each render checks the file as it is and as it would be with `sh -n`,
        # and that it reads back as the target.
        new_text = lines.render_ulimit_values(text, wanted[0], wanted[1], path, target.get("placement", "end"))
    elif kind == "assignment":
        new_text = lines.render_assignment(text, target["key"], str(wanted[1]), path)[0]
    else:
        new_text = lines.render_minfds(text, wanted[1], path)[0]
    return _changed(result, what, wanted, old or "not set", text, new_text, notes)


def _show(pair):
    if pair is None or pair == (None, None):
        return None
    soft, hard = pair
    return str(soft) if soft == hard else f"{soft}:{hard}"


def dropin_pair(configured, nofile, ceiling, raises_soft, force):
    """Per field (soft, hard), what this package's drop-in sets over the
    ``configured`` value it is read after. systemd clamps every value to
    ``ceiling`` (its own hard limit, without CAP_SYS_RESOURCE) silently, so a
    field is compared as clamped but kept as configured: it is never
    lowered, and a box that can grant more later (the unit moved out of a
    container) gives it. A field is raised to ``nofile`` only where its
    clamped value is below; for a daemon that raises its soft limit to its
    hard limit by itself, only the hard one. ``force``: exactly ``nofile``.
    Returns (target, notes): the fields capped here, in words."""
    soft, hard = configured
    if force:
        target = [soft if raises_soft else nofile, nofile]
    else:
        target = [soft, hard]
        if not raises_soft and min(soft, ceiling) < nofile:
            target[0] = nofile
        if min(hard, ceiling) < nofile:
            target[1] = nofile
    target[0] = min(target)
    notes = [f"{LIMIT_FIELDS[i]} {v} is capped: systemd gives at most {ceiling} here, silently"
             for i, v in enumerate(target) if v > ceiling]
    return tuple(target), notes


def _enough(pair, nofile, ceiling, raises_soft):
    """Whether a configured (soft, hard) gives a daemon ``nofile`` once clamped."""
    soft, hard = units.clamp(pair, ceiling)
    return hard >= nofile and (raises_soft or soft >= nofile)


def _plan_dropin(options, target, result, nofile, force, ceiling, raises_soft, nr_open, shown):
    unit = target["unit"]
    if units.unit_file(options["unit_dirs"], unit) is None:
        result.update(skipped=True, comment=f"{unit} is not installed: nothing to manage")
        return result
    path = result["path"]
    text = read_managed(path)
    default = units.default_limit(nr_open)
    # The drop-ins systemd itself read, when its view is current: they may lie
    # where unit_dirs does not look.
    extra = shown["dropins"] if shown and not shown["reload"] else ()
    try:
        base = units.effective(options["unit_dirs"], unit, nr_open, default, skip=path, extra=extra)
        # With ours: only compared with what systemctl show says, when it said anything.
        now = units.effective(options["unit_dirs"], unit, nr_open, default, extra=extra) if shown else None
    except ValueError as exc:
        raise CommandExecutionError(f"{exc}: systemd ignores it; fix that line")
    configured = base["before"]
    wanted, notes = dropin_pair(configured, nofile, ceiling, raises_soft, force)
    ours = units.assignments(text)
    result["old"] = f"{_show(configured)} (from {base['before_source']})"
    result["new"] = _show(wanted)
    result["overridden"] = []
    if base["after"]:
        winner, value = base["after"][-1]
        if not _enough(value, nofile, ceiling, raises_soft):
            result["overridden"].append(
                f"{winner} sets LimitNOFILE={_show(value)} and is read after {path}: it wins, so {unit} gets "
                f"{_show(units.clamp(value, ceiling))}, below {nofile}; raise it there or remove it")
    result["warnings"] = []
    if shown and shown["limit"] != now["limit"]:
        said = (f"systemctl show says {unit} has LimitNOFILE={_show(shown['limit'])}, its files give "
                f"{_show(now['limit'])}")
        unknown = [p for p in shown["dropins"] if p not in now["files"]]
        if shown["reload"]:
            said += ": systemd has not read them since they changed (NeedDaemonReload=yes)"
        elif unknown:
            said += f": systemd also read {', '.join(unknown)}, which is gone or not where unit_dirs looks"
        result["warnings"].append(said + "; systemd starts the unit with what it says")
    # A drop-in read after ours that already gives enough makes ours useless.
    covered = bool(base["after"]) and not force and _enough(base["limit"], nofile, ceiling, raises_soft)
    if (wanted == configured or covered) and not ours:
        given, source = (base["limit"], base["source"]) if covered else (configured, base["before_source"])
        capped = f"; systemd gives {_show(units.clamp(given, ceiling))} here: capped at the box's ceiling " \
                 f"{ceiling}" if units.clamp(given, ceiling) != given else ""
        result["comment"] = (f"{unit}: LimitNOFILE {_show(given)} from {source} is in place; "
                             f"no drop-in needed{capped}")
        if result["overridden"]:
            result["comment"] += f"; but {result['overridden'][0]}"
        return result
    new_text = units.render_dropin(wanted[0], wanted[1], unit)
    return _changed(result, "LimitNOFILE", wanted, result["old"], text, new_text, notes)


def _changed(result, what, wanted, old, text, new_text, notes):
    """The end of every file's plan: in place, or the change with its comment."""
    path = result["path"]
    change = journal.file_change(path, new_text, text)
    if change is None:
        result["comment"] = f"{path}: {what} {_show(wanted)} is in place" + (f" ({'; '.join(notes)})" if notes else "")
        return result
    result.update(changed=True, diff=change["diff"], text=new_text, notes=notes,
                  comment=f"{path}: {what} would be set to {_show(wanted)} (now {old})"
                          + (f"; {'; '.join(notes)}" if notes else ""))
    return result


def write_file(options, planned):
    """Write one planned file atomically (its original is already on record,
    see ``apply``). Call under the journal lock."""
    path = planned["path"]
    try:
        journal.atomic_write(path, planned["text"])
    except OSError as exc:
        raise CommandExecutionError(f"cannot write {journal.describe_error(path, exc)}; the file is unchanged")
    # Why a value was kept or replaced (one that could never be granted is
    # lowered): said as the prediction said it.
    notes = planned.get("notes") or []
    planned["comment"] = (f"{path}: {planned['what']} set to {planned['new']} (was {planned['old'] or 'not set'})"
                          + (f"; {'; '.join(notes)}" if notes else ""))
    return planned


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------
def not_serving(options, name, kind):
    """Why a multi-protocol server (``needs_ports``: xray, v2ray, sing-box)
    is left alone: none of its configs has a shadowsocks inbound, or None."""
    found = kind.get("needs_ports") and ports.kind_configs(options, name, kind)
    if not found or ports.kind_config_ports(found):
        return None
    return (f"{name}: no config in {', '.join(found['paths'])} has a shadowsocks inbound: its open-file limit is "
            f"left alone (pillar {LIMITS}:{name}:configs names other paths)")


def serving(options, kinds):
    """``kinds`` without the multi-protocol servers that serve no shadowsocks here (``not_serving``)."""
    return {name: kind for name, kind in kinds.items() if not not_serving(options, name, kind)}


def _present(options, kind, table):
    """Whether a kind is on this box at all: a unit installed, a program running."""
    # By comm alone (the kernel's first 15 bytes of the name): one pass, no argv read.
    names = {name[:15] for name in kind["programs"]}
    return (any(comm in names for comm, _, _ in table.values())
            or any(units.unit_file(options["unit_dirs"], unit) for unit in kind.get("units") or ()))


def config_limits(options, name, kind, nofile):
    """What a kind's own configs set its limit to at start (``config_limit``:
    shadowsocks-libev's and shadowsocks-rust's ``nofile`` key, with which
    the server sets both its limits when it starts), where that is below
    ``nofile``: [note]. Such a value wins over every file this package
    writes at the daemon's next start; it is read, never written."""
    key, found = kind.get("config_limit"), ports.kind_configs(options, name, kind)
    if not key or not found:
        return []
    return [f"{path} sets {key} {value}: {name} sets its open-file limit to it when it starts, below nofile "
            f"{nofile}; raise it there or remove it (this package never writes a server's config)"
            for path, value in configs.config_values(found["paths"], found["format"], key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value < nofile]


def processes(table, kinds, extra=()):
    """Every running process of ``kinds``, and the processes ``extra`` (pids:
    the trees of the init scripts pillar names, whatever their names):
    ``{pid: {"pid", "name", "kind", "ppid", "soft", "hard"}}`` (plugins and
    ss-manager's servers included)."""
    names, parents, owner = set(), set(), {}
    for kind_name, kind in kinds.items():
        for name in kind["programs"] + kind["plugins"]:
            names.add(name)
            owner.setdefault(name, kind_name)
        if kind["plugins"]:
            parents.update(kind["programs"])
    found = {}
    named = procfs.named_processes(table, names, parents)
    for pid in extra:
        if pid in table:
            named.setdefault(pid, table[pid][0])
    for pid, name in named.items():
        limits = procfs.proc_nofile(pid)
        if limits is None:
            continue
        kind = owner.get(name) or owner.get(named.get(table[pid][2]))
        found[pid] = {"pid": pid, "name": name, "kind": kind, "ppid": table[pid][2],
                      "soft": limits[0], "hard": limits[1]}
    return found


def _members(table, settings, parts, found):
    """{pid: (part, group index)}: the restart group each process belongs to
    (its pidfile's tree under sysvinit, its unit's cgroup under systemd)."""
    members = {}
    systemd = settings["limits"]["init_system"] == "systemd"
    for part, groups in parts.items():
        for index, group in enumerate(groups):
            restart = group["restart"]
            if not restart or not restart.get("name"):
                continue
            if systemd:
                unit = restart["name"]
                for pid in found:
                    now = units.unit_of(pid)
                    if now and (now == unit or (unit.endswith("@.service") and units.template_of(now) == unit)):
                        members.setdefault(pid, (part, index))
            elif restart.get("pidfile"):
                root = procfs.pid_from(restart["pidfile"])
                if root:
                    for pid in procfs.subtree(table, [root]) & set(found):
                        members.setdefault(pid, (part, index))
    return members


def decide_process(proc, nofile, cap, may, policy, member):
    """What happens to one running process: ``{"action", "target", "why"}``.
    ``cap``: this process has CAP_SYS_RESOURCE; ``may``: it may set the
    other's limits at all (prlimit's rule; a function, asked only when it
    matters: it reads /proc/PID/status); ``member``: the restart group
    it belongs to, or None."""
    soft, hard = proc["soft"], proc["hard"]
    if soft is None or (soft >= nofile and (hard is None or hard >= nofile)):
        return {"action": "in place", "target": (soft, hard), "why": None}
    target = (max(soft, nofile), hard if hard is None else max(hard, nofile))
    if policy == "live":
        if not (may() if callable(may) else may):
            why = "it runs as another user and salt lacks CAP_SYS_RESOURCE, which prlimit needs then"
        elif target[1] is not None and target[1] > hard and not cap:
            why = f"its hard limit {hard} is below {nofile}, and raising a hard limit needs CAP_SYS_RESOURCE"
        else:
            return {"action": "raise", "target": target, "why": None}
        if member is None:
            return {"action": "left", "target": None,
                    "why": f"cannot be raised in place ({why}), and no service this package manages started it: "
                           "restart it yourself"}
        return {"action": "restart", "target": None, "why": f"cannot be raised in place: {why}"}
    return {"action": "left", "target": None, "why": None}  # running/always/never: the files decide


# --------------------------------------------------------------------------
# Everything, checked before anything is written
# --------------------------------------------------------------------------
def plan(settings, options, table=None):
    """Every file of every part, read and rendered; every running process
    and what happens to it; every restart; every problem:
    ``{"parts": {part: [{"files", "restart", "restart_why"}]}, "processes",
    "errors", "notes", "manage", "skipped"}``. Writes nothing."""
    limits = settings["limits"]
    nofile, force = settings["nofile"], settings["force_nofile"]
    errors, notes, manage, skipped = [], [], [], []
    granted = grantable(options["proc_root"], limits["init_system"])
    nr_open = procfs.nr_open(options["proc_root"])
    shown = {}
    if limits["init_system"] == "systemd":
        shown = show_units(options, [t["unit"] for groups in limits["parts"].values() for g in groups
                                     for t in g["files"] if t["kind"] == "dropin"], nr_open, limits["timeout"])
    table = procfs.process_table() if table is None else table
    parts, kinds, held = {}, dict(limits["kinds"]), {}
    for part, groups in limits["parts"].items():
        kind = limits["kinds"].get(part, {})
        parts[part] = []
        idle = not_serving(options, part, kind)
        if idle:
            # A multi-protocol server with no shadowsocks inbound is not ours.
            del kinds[part]
            if _present(options, kind, table):
                notes.append(idle)
            continue
        held[part] = config_limits(options, part, kind, nofile)
        notes.extend(held[part])
        for group in groups:
            planned = []
            for target in group["files"]:
                # A file nothing reads for the limit under this init system (a
                # defaults file under systemd) fails with no value: one above
                # the box's ceiling is kept, never lowered.
                ceiling = nr_open if target.get("enforced") is False else granted["limit"]
                try:
                    item = plan_file(options, target, nofile, force, ceiling, kind.get("raises_soft", False),
                                     shown)
                except CommandExecutionError as exc:
                    where = target["where"] or f"pillar {LIMITS}:{part}"
                    errors.append(f"{where}: {exc}")
                    continue
                (skipped if item["skipped"] else manage).append(item["path"])
                notes.extend(item["overridden"] + item.get("warnings", []))
                planned.append(item)
            parts[part].append({"files": planned, "restart": group["restart"], "restart_why": None})
    # The whole tree of every service named by a pidfile (a kind's, an init
    # script's), whatever its programs are called: a raise in place must
    # reach what its restart would (supervisord's programs inherit its
    # limits), and verify judges that whole tree.
    roots = [procfs.pid_from(g["restart"]["pidfile"]) for groups in limits["parts"].values() for g in groups
             if g["restart"] and g["restart"].get("pidfile")]
    found = processes(table, kinds, procfs.subtree(table, [pid for pid in roots if pid]))
    members = _members(table, settings, parts, found)
    cap = procfs.has_cap_sys_resource("self")
    for pid, proc in sorted(found.items()):
        member = members.get(pid)
        decision = decide_process(proc, nofile, cap, functools.partial(procfs.may_set_limits, pid, cap),
                                  limits["restart"], member)
        blocked = member and ([o for item in parts[member[0]][member[1]]["files"] for o in item["overridden"]]
                              + held.get(member[0], []))
        if decision["action"] == "restart" and blocked:
            # A restart would cut its connections and still start it below nofile.
            decision = {"action": "left", "target": None,
                        "why": f"{decision['why']}, and a restart would not help: {blocked[0]}"}
        proc.update(decision, member=member)
        if decision["action"] == "restart":
            group = parts[member[0]][member[1]]
            group["restart_why"] = group["restart_why"] or f"{proc['name']} (pid {pid}) {decision['why']}"
    policy = limits["restart"]
    for part, groups in parts.items():
        for group in groups:
            changed = any(item["changed"] for item in group["files"])
            if policy in ("running", "always") and changed and group["restart"]:
                group["restart_why"] = f"its file changed (restart: {policy})"
            elif policy == "never" and changed and group["restart"]:
                # Not restarted, but said: apply names the service to stop and start by hand.
                group["restart_why"] = "its file changed"
    if nofile > granted["limit"] and (manage or found):
        errors.append(
            f"pillar {PILLAR}:nofile: {nofile} cannot be granted here: {granted['reason']}: `ulimit -n {nofile}` "
            f"fails in the services it restarts, supervisord refuses minfds={nofile} above its hard limit and "
            f"systemd clamps LimitNOFILE silently; lower it to {granted['limit']} or less, or give salt (or systemd) "
            "CAP_SYS_RESOURCE")
    return {"parts": parts, "processes": found, "errors": errors, "notes": notes, "manage": manage,
            "skipped": skipped, "grantable": granted, "table": table, "kinds": kinds}


def show_units(options, names, nr_open, timeout):
    """``sstuning_units.show`` for ``names`` through this box's systemctl:
    what the running systemd merged; {} where it cannot tell."""
    binary = services.find_systemctl(options)
    if binary is None or not names:
        return {}
    try:
        return units.show(lambda argv: services.run_service(argv, timeout), binary, sorted(set(names)), nr_open)
    except CommandExecutionError:
        return {}


def restart(options, name, pidfile, when, init_system, timeout, grace, test):
    """Stop and start one service (or restart one unit) so it gets the limit,
    and check that it stays up for ``grace`` seconds."""
    if init_system == "systemd":
        return services.systemd_restart(options, name, when, timeout, grace, test)
    return services.sysv_stop_start(options, name, pidfile, when, timeout, grace, test)


def raise_live(processes_, test):
    """Raise each process planned ``raise`` in place; the proof is
    ``/proc/PID/limits`` read back. Returns one result per process."""
    out = []
    for proc in processes_:
        if proc["action"] != "raise":
            continue
        soft, hard = proc["target"]
        label = f"{proc['name']} (pid {proc['pid']})"
        before = f"{proc['soft']}:{proc['hard']}"
        if test:
            out.append({"pid": proc["pid"], "changed": True, "ok": True, "old": before, "new": f"{soft}:{hard}",
                        "comment": f"{label} would be raised in place from {before} to {soft}:{hard} (prlimit; "
                                   "no connection is cut)"})
            continue
        try:
            now = procfs.raise_nofile(proc["pid"], soft, hard if hard is not None else resource.RLIM_INFINITY)
        except ProcessLookupError:
            out.append({"pid": proc["pid"], "changed": False, "ok": True, "old": before, "new": None,
                        "comment": f"{label} exited before it could be raised: nothing to do"})
            continue
        except OSError as exc:
            out.append({"pid": proc["pid"], "changed": False, "ok": False, "old": before, "new": None,
                        "comment": f"{label} could not be raised in place: {exc.strerror or exc}"})
            continue
        ok = now[0] is None or now[0] >= soft
        out.append({"pid": proc["pid"], "changed": True, "ok": ok, "old": before, "new": f"{now[0]}:{now[1]}",
                    "comment": f"{label} raised in place from {before} to {now[0]}:{now[1]} (read back from "
                               f"/proc/{proc['pid']}/limits; no connection was cut)"})
    return out


def apply(settings, options, planned, part, test):
    """One part: raise its processes in place, write its changed files (call
    under the journal lock; their originals must be on record), then restart
    each group that needs it. Returns ``{"files", "raised", "restarts",
    "errors"}``; each group is independent: one failed restart does not stop
    the next."""
    limits = settings["limits"]
    files, restarts, errors = [], [], []
    mine = [p for p in planned["processes"].values() if p["member"] and p["member"][0] == part
            or p["member"] is None and p["kind"] == part]
    raised = raise_live(mine, test)
    errors.extend(r["comment"] for r in raised if not r["ok"])
    reload_needed = False
    for group in planned["parts"][part]:
        for item in group["files"]:
            if item["changed"] and not test:
                write_file(options, item)
                item["written"] = True
                reload_needed = reload_needed or item["what"] == "LimitNOFILE"
            files.append(item)
    if reload_needed and limits["init_system"] == "systemd":
        # systemd reads a new drop-in only after daemon-reload: the next start needs it.
        services.systemd_reload(options, limits["timeout"])
    for group in planned["parts"][part]:
        why, target = group["restart_why"], group["restart"]
        if not (why and target):
            continue
        if limits["restart"] == "never":
            restarts.append({"name": target["name"], "changed": False, "old": None, "new": None,
                             "comment": f"{target['name']}: restart is off (restart: never); stop and start it "
                                        f"yourself for the new limit ({why})"})
            continue
        when = "always" if limits["restart"] == "always" else "running"
        try:
            done = restart(options, target["name"], target["pidfile"], when, limits["init_system"],
                           limits["timeout"], limits["grace"], test)
            done["comment"] = f"{done['comment']} (why: {why})"
            restarts.append(done)
        except CommandExecutionError as exc:
            errors.append(str(exc))
    return {"files": files, "raised": raised, "restarts": restarts, "errors": errors}


def reload_after_clean(settings, options, changes, test):
    """After ``clean`` put back or removed drop-ins: systemd reads them only
    at daemon-reload (until then ``systemctl show`` keeps the removed
    values, and the next start of the unit would still get them). Adds the
    reload to ``changes``."""
    if settings["limits"]["init_system"] != "systemd":
        return changes
    dropins = sorted(p for p in changes if os.path.basename(p) == units.DROPIN_NAME)
    if not dropins:
        return changes
    if not test:
        services.systemd_reload(options, settings["limits"]["timeout"])
    changes["systemctl daemon-reload"] = {"old": f"{len(dropins)} drop-in(s) put back",
                                          "new": "would be run" if test else "run"}
    return changes


def written(planned_part):
    """The files of a part that ``apply`` has written so far."""
    return [item for group in planned_part for item in group["files"] if item.get("written")]


def changed_files(planned):
    """Every file of the plan that would change: its originals go on record first."""
    return [item for groups in planned["parts"].values() for group in groups for item in group["files"]
            if item["changed"]]


# --------------------------------------------------------------------------
# What the daemons really got
# --------------------------------------------------------------------------
def _why_low(entry, wanted, table, nr_open, unit=None, shown=None):
    soft, hard = entry["soft"], entry["hard"]
    if wanted > nr_open:
        return f"fs.nr_open is {nr_open}: no process can have {wanted}"
    if unit and shown:
        return _why_low_unit(entry, wanted, unit, shown)
    if hard is not None and hard < wanted:
        ppid = table.get(entry["pid"], (None, None, None))[2]
        parent = procfs.proc_nofile(ppid) if ppid else None
        if parent and parent[1] is not None and parent[1] < wanted and not procfs.has_cap_sys_resource(ppid):
            pname = table.get(ppid, ("?",))[0]
            return (
                f"capped: its parent {pname} (pid {ppid}) has a hard limit of {parent[1]} and no CAP_SYS_RESOURCE, "
                f"so `ulimit -n {wanted}` could not raise it; start it from a parent that can grant {wanted}, "
                f"or lower nofile to {parent[1]}"
            )
        if not entry["cap_sys_resource"]:
            return (
                f"its hard limit is {hard} and it has no CAP_SYS_RESOURCE to raise it: it was started with a "
                "lower limit; stop and start it so the configured limit applies"
            )
        return f"it was started with a hard limit of {hard}; stop and start it so the configured limit applies"
    return (
        f"its soft limit {soft} is below {wanted} although its hard limit {hard} allows it: it was started "
        "before the limit was configured, or not through the configured path; stop and start it"
    )


def _why_low_unit(entry, wanted, unit, shown):
    """Why a process systemd started is below ``wanted``, from what systemd
    says the unit is configured with (``systemctl show``) and what systemd
    itself can grant (PID 1's hard limit: it clamps a larger value silently)."""
    field = 1 if entry["hard"] is not None and entry["hard"] < wanted else 0
    configured = shown["limit"][field]
    said = f"{unit} is configured LimitNOFILE={_show(shown['limit'])} (systemctl show)"
    if configured is not None and configured < wanted:
        source = None
        for path in [shown["fragment"]] + shown["dropins"]:
            with contextlib.suppress(OSError, journal.NotRegularFile):
                if path and units.assignments(journal.read_text(path, 1 << 20)):
                    source = path
        if source is None:
            return (f"{said}, systemd's DefaultLimitNOFILE (no LimitNOFILE= in its files): its "
                    f"{LIMIT_FIELDS[field]} limit is below {wanted}; state.apply shadowsocks.tuning writes a drop-in "
                    f"for the units it manages (pillar {LIMITS}:units for others)")
        return (f"{said}, set last by {source}: its {LIMIT_FIELDS[field]} limit is below {wanted}; raise it there "
                "or remove it")
    ceiling = (procfs.proc_nofile(1) or (None, None))[1]
    if ceiling is not None and ceiling < wanted and not procfs.has_cap_sys_resource("1"):
        return (f"capped: {said}, but systemd (PID 1) has a hard limit of {ceiling} and no CAP_SYS_RESOURCE, so "
                f"it gave {ceiling}, silently; lower nofile to {ceiling}, or raise PID 1's hard limit (the "
                "container's, from outside)")
    return f"{said}, but it was started before that: systemctl restart {unit}"


def report(proc_root, wanted, names, pidfiles, parents=None, table=None, systemctl=None):
    """One look at /proc: the open-file limits of every process going by one
    of ``names`` (and the children of ``parents``), or, with ``pidfiles``,
    of every process in those daemons' trees. ``systemctl``: systemd is PID
    1; a process below ``wanted`` in a unit is explained from what ``systemctl
    show`` says of that unit."""
    table = procfs.process_table() if table is None else table
    scope = None
    if pidfiles:
        roots = [pid for pid in (procfs.pid_from(p) for p in pidfiles) if pid]
        scope = procfs.subtree(table, roots)
    nr_open = procfs.nr_open(proc_root)
    named = procfs.named_processes(table, names, parents if parents is not None else names)
    for pid in scope or ():  # the daemons named by pidfile, whatever their names are
        named.setdefault(pid, table[pid][0])
    processes_, low = [], []
    for pid in sorted(table):
        if scope is not None and pid not in scope:
            continue
        name = named.get(pid)
        limits = procfs.proc_nofile(pid) if name else None
        if limits is None:
            continue
        soft, hard = limits
        entry = {"pid": pid, "name": name, "soft": soft, "hard": hard, "ok": soft is None or soft >= wanted}
        if not entry["ok"]:
            # Only a process below says why: /proc/PID/status costs a scan of 300 servers 4 ms.
            entry["cap_sys_resource"] = procfs.has_cap_sys_resource(pid)
            low.append(entry)
        processes_.append(entry)
    in_units = {entry["pid"]: units.unit_of(entry["pid"]) for entry in low} if systemctl else {}
    shown = {}
    if any(in_units.values()):
        shown = units.show(lambda argv: services.run_service(argv, 30), systemctl,
                           sorted({u for u in in_units.values() if u}), nr_open)
    problems = []
    for entry in low:
        unit = in_units.get(entry["pid"])
        entry["reason"] = _why_low(entry, wanted, table, nr_open, unit, shown.get(unit))
        if unit:
            entry["unit"] = unit
        problems.append(f"{entry['name']} (pid {entry['pid']}{', ' + unit if unit else ''}): soft {entry['soft']}, "
                        f"hard {entry['hard']}: {entry['reason']}")
    granted = grantable(proc_root, "systemd" if systemctl else "sysvinit")
    return {
        "wanted": wanted,
        "ok": not problems,
        "processes": processes_,
        "problems": problems,
        "grantable": granted,
        "comment": _comment(wanted, processes_, problems, granted, pidfiles),
    }


def verify(proc_root, wanted, names, pidfiles, wait, parents=None, table=None, systemctl=None):
    """``report``, again every half second for up to ``wait`` seconds until
    every process is at ``wanted``. ``table``: a process table read this run
    (only the first look uses it)."""
    deadline = time.monotonic() + wait
    while True:
        result = report(proc_root, wanted, names, pidfiles, parents, table, systemctl)
        if result["ok"] or time.monotonic() >= deadline:
            return result
        table = None
        time.sleep(0.5)


def _comment(wanted, processes_, problems, granted, pidfiles):
    where = f" under {', '.join(pidfiles)}" if pidfiles else ""
    if not processes_:
        return f"no supervisord or shadowsocks process is running{where}: nothing to check"
    seen = ", ".join(f"{p['name']}[{p['pid']}] {p['soft']}/{p['hard']}" for p in processes_)
    if not problems:
        return f"every process runs with at least {wanted} open files{where}: {seen}"
    out = [f"{len(problems)} of {len(processes_)} process(es){where} run with an open-file limit below {wanted}:"]
    out.extend(f"- {p}" for p in problems)
    if granted["limit"] < wanted:
        out.append(f"Cap here: {granted['reason']}.")
    return "\n".join(out)


def process_names(names, kinds):
    """Process names to look for: every program of ``kinds`` by default."""
    if names is None:
        found = set()
        for kind in kinds.values():
            found.update(kind["programs"] + kind["plugins"])
        return found
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise SaltInvocationError(f"names: {names!r} must be a list of process names, e.g. [ss-server]")
    return set(names)


def parent_names(kinds):
    """The programs whose children are plugins with limits of their own."""
    return {name for kind in kinds.values() if kind["plugins"] for name in kind["programs"]}
