"""
The open-file-limit engine: put N where each service manager reads it
(``ulimit -n N`` in /etc/default/supervisor and init scripts, ``MAXFD=N`` for
shadowsocks-libev, ``minfds=N`` in supervisord.conf, ``LimitNOFILE=N`` in
systemd drop-ins), stop and start each service whose file changed, and read
``/proc/<pid>/limits`` to show whether the limit reached the daemons.

Every function takes resolved settings (``sstuning_settings.resolve``) and
the minion options as plain values. ``plan`` reads every file and checks
everything before ``apply_part`` writes anything.
"""

import os
import resource
import time

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_journal as journal
import sstuning_lines as lines
import sstuning_procfs as procfs
import sstuning_services as services
from sstuning_catalogue import SS_PROCESS_NAMES, SUPERVISORD_NAME, keep_higher
from sstuning_settings import LIMITS, PILLAR

# Named to sort after `override.conf` (systemctl edit): a later drop-in wins.
DROPIN_NAME = "shadowsocks-tuning-nofile.conf"
WHAT = {"ulimit": "ulimit -n", "minfds": "minfds", "assignment": "MAXFD", "dropin": "LimitNOFILE"}


def dropin_path(opts, unit):
    return os.path.join(opts["systemd_dir"], f"{unit}.d", DROPIN_NAME)


def unit_file(opts, unit):
    """The unit file systemd would load for `unit` (a template for an instance), or None."""
    names = [unit]
    if "@" in unit and not unit.endswith("@.service"):
        names.append(unit.split("@", 1)[0] + "@.service")
    for directory in opts["unit_dirs"]:
        for name in names:
            if os.path.isfile(os.path.join(directory, name)):
                return os.path.join(directory, name)
    return None


def managed_paths(settings, opts):
    """Every file the open-file-limit settings manage (``clean`` puts back no other)."""
    return {target["path"] or dropin_path(opts, target["unit"])
            for groups in settings["limits"].values() for group in groups for target in group["files"]}


def read_managed(path):
    """A managed file's text, None when missing; a link, a hard-linked file,
    a directory or anything but a regular file is an error (see
    ``journal.read_managed``)."""
    try:
        return journal.read_managed(path)
    except CommandExecutionError:
        raise
    except OSError as exc:
        raise CommandExecutionError(f"{path}: cannot read: {exc.strerror or exc}")


# --------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------
def render(kind, text, nofile, path, placement="end", key="MAXFD", unit=None):
    """(new_text, old value or None) of one managed file."""
    if kind == "ulimit":
        return lines.render_ulimit(text, nofile, path, placement)
    if kind == "minfds":
        return lines.render_minfds(text, nofile, path)
    if kind == "assignment":
        return lines.render_assignment(text, key, str(nofile), path)
    return lines.render_dropin(nofile, unit), lines.dropin_limit(text)


def plan_file(opts, target, nofile, force):
    """What managing one file would do, read but not written: ``{"path",
    "what", "changed", "skipped", "old", "new", "diff", "text", "comment"}``.
    A limit already higher in the file is kept unless ``force``."""
    kind = target["kind"]
    what = target.get("key") if kind == "assignment" else WHAT[kind]
    path = target["path"] or dropin_path(opts, target["unit"])
    result = {"path": path, "what": what, "changed": False, "skipped": False, "old": None, "new": None,
              "diff": "", "text": None}
    if kind == "dropin" and unit_file(opts, target["unit"]) is None:
        result.update(skipped=True, comment=f"{target['unit']} is not installed: nothing to manage")
        return result
    text = read_managed(path)
    if text is None and kind != "dropin":
        if target.get("required"):
            raise CommandExecutionError(
                f"{path} does not exist; install that service's init script, or remove it from pillar "
                f"{LIMITS}:init_scripts"
            )
        result.update(skipped=True, comment=f"{path} does not exist: nothing to manage")
        return result
    new_text, old_value = render(kind, text, nofile, path, target.get("placement", "end"),
                                 target.get("key", "MAXFD"), target.get("unit"))
    new_value = str(nofile)
    kept_value, kept = keep_higher(None, new_value, old_value) if not force else (new_value, None)
    if kept:
        result.update(old=old_value, new=kept_value,
                      comment=f"{path}: {what} {old_value} kept (higher than {new_value}; force lowers it)")
        return result
    result.update(old=old_value, new=new_value)
    change = journal.file_change(path, new_text, text)
    if change is None:
        result["comment"] = f"{path}: {what} {new_value} is in place"
        return result
    result.update(changed=True, diff=change["diff"], text=new_text,
                  comment=f"{path}: {what} would be set to {new_value} (now {old_value or 'not set'})")
    return result


def write_file(opts, planned):
    """Write one planned file atomically after recording its original, so
    `clean` can put it back byte for byte. Call under the journal lock."""
    path = planned["path"]
    journal.remember(opts["state_dir"], journal.load_originals(opts["state_dir"]), files=[path],
                     written={path: planned["text"]})
    try:
        journal.atomic_write(path, planned["text"])
    except OSError as exc:
        raise CommandExecutionError(f"{path}: cannot write: {exc.strerror or exc}; the file is unchanged")
    planned["comment"] = f"{path}: {planned['what']} set to {planned['new']} (was {planned['old'] or 'not set'})"
    return planned


# --------------------------------------------------------------------------
# Everything, checked before anything is written
# --------------------------------------------------------------------------
def grantable(proc_root):
    """The highest open-file limit a service started from this process can
    get: ``fs.nr_open`` with CAP_SYS_RESOURCE, else this process's own hard
    limit (``ulimit -n N`` above it fails with "Operation not permitted")."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = procfs.nr_open(proc_root)
    cap = procfs.has_cap_sys_resource("self")
    hard_value = nr_open if hard == resource.RLIM_INFINITY else hard
    if cap:
        limit = nr_open
        reason = f"salt has CAP_SYS_RESOURCE, so it can grant up to fs.nr_open ({nr_open})"
    else:
        limit = min(hard_value, nr_open)
        reason = (
            f"salt runs with a hard open-file limit of {hard_value} and without CAP_SYS_RESOURCE (CapEff bit "
            f"{procfs.CAP_SYS_RESOURCE}), so a service it starts can get at most {limit}"
        )
    return {"limit": limit, "soft": soft, "hard": hard_value, "cap_sys_resource": cap, "nr_open": nr_open,
            "reason": reason}


def plan(settings, opts):
    """Every file of every part of `limits`, read and rendered, and every
    problem: ``{"parts": {part: [{"files": [planned], "restart"}]},
    "errors", "manage", "skipped"}``. Writes nothing."""
    errors, manage, skipped = [], [], []
    nofile, force = settings["nofile"], settings["force_nofile"]
    parts = {}
    for part, groups in settings["limits"].items():
        parts[part] = []
        for group in groups:
            planned = []
            for target in group["files"]:
                try:
                    item = plan_file(opts, target, nofile, force)
                except CommandExecutionError as exc:
                    # `where` already says "pillar ..." (or "argument limits...").
                    where = target["where"] or f"pillar {LIMITS}:{part}"
                    errors.append(f"{where}: {exc}")
                    continue
                (skipped if item["skipped"] else manage).append(item["path"])
                planned.append(item)
            parts[part].append({"files": planned, "restart": group["restart"]})
    # The cap matters only where this process starts the daemons itself.
    granted = grantable(opts["proc_root"]) if settings["init_system"] == "sysvinit" and manage else None
    if granted and nofile > granted["limit"]:
        errors.append(
            f"pillar {PILLAR}:nofile: {nofile} cannot be granted here: {granted['reason']}: `ulimit -n {nofile}` "
            f"fails in the services it restarts and supervisord refuses minfds={nofile} above its hard limit; "
            f"lower it to {granted['limit']} or less, or run salt with CAP_SYS_RESOURCE"
        )
    return {"parts": parts, "errors": errors, "manage": manage, "skipped": skipped}


def restart(opts, name, pidfile, when, init_system, timeout, grace, test):
    """Stop and start one service (or restart one unit) so it gets the limit,
    and check that it stays up for ``grace`` seconds."""
    if init_system == "systemd":
        return services.systemd_restart(opts, name, when, timeout, grace, test)
    return services.sysv_stop_start(opts, name, pidfile, when, timeout, grace, test)


def apply_part(settings, opts, planned_part, test):
    """Write the changed files of one part (call under the journal lock),
    then stop and start each service whose file changed. Returns the file
    results, the restart results and the services that failed to come back
    (each group is independent: one failed restart does not stop the next)."""
    files, restarts, errors = [], [], []
    for group in planned_part:
        changed = False
        for item in group["files"]:
            if item["changed"] and not test:
                write_file(opts, item)
                item["written"] = True
            changed = changed or item["changed"]
            files.append(item)
        if changed and group["restart"]:
            try:
                restarts.append(restart(opts, group["restart"]["name"], group["restart"]["pidfile"],
                                        settings["restart"], settings["init_system"], settings["timeout"],
                                        settings["grace"], test))
            except CommandExecutionError as exc:
                errors.append(str(exc))
    return files, restarts, errors


def written(planned_part):
    """The files of a part that ``apply_part`` has written so far."""
    return [item for group in planned_part for item in group["files"] if item.get("written")]


# --------------------------------------------------------------------------
# What the daemons really got
# --------------------------------------------------------------------------
def _why_low(entry, wanted, table, nr_open):
    soft, hard = entry["soft"], entry["hard"]
    if wanted > nr_open:
        return f"fs.nr_open is {nr_open}: no process can have {wanted}"
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


def report(proc_root, wanted, names, pidfiles):
    """One look at /proc: the open-file limits of every matching process."""
    table = procfs.process_table()
    scope = None
    if pidfiles:
        roots = [pid for pid in (procfs.pid_from(p) for p in pidfiles) if pid]
        scope = procfs.subtree(table, roots)
    nr_open = procfs.nr_open(proc_root)
    named = procfs.named_processes(table, names)  # plugins (children of shadowsocks processes) included
    processes, problems = [], []
    for pid in sorted(table):
        if scope is not None and pid not in scope:
            continue
        name = named.get(pid)
        limits = procfs.proc_nofile(pid) if name else None
        if limits is None:
            continue
        soft, hard = limits
        entry = {"pid": pid, "name": name, "soft": soft, "hard": hard,
                 "cap_sys_resource": procfs.has_cap_sys_resource(pid)}
        entry["ok"] = soft is None or soft >= wanted
        if not entry["ok"]:
            entry["reason"] = _why_low(entry, wanted, table, nr_open)
            problems.append(f"{name} (pid {pid}): soft {soft}, hard {hard}: {entry['reason']}")
        processes.append(entry)
    granted = grantable(proc_root)
    return {
        "wanted": wanted,
        "ok": not problems,
        "processes": processes,
        "problems": problems,
        "grantable": granted,
        "comment": _comment(wanted, processes, problems, granted, pidfiles),
    }


def watch(proc_root, wanted, names, pidfiles, wait):
    """``report``, again every half second for up to ``wait`` seconds until every process is at ``wanted``."""
    deadline = time.monotonic() + wait
    while True:
        result = report(proc_root, wanted, names, pidfiles)
        if result["ok"] or time.monotonic() >= deadline:
            return result
        time.sleep(0.5)


def _comment(wanted, processes, problems, granted, pidfiles):
    where = f" under {', '.join(pidfiles)}" if pidfiles else ""
    if not processes:
        return f"no supervisord or shadowsocks process is running{where}: nothing to check"
    seen = ", ".join(f"{p['name']}[{p['pid']}] {p['soft']}/{p['hard']}" for p in processes)
    if not problems:
        return f"every process runs with at least {wanted} open files{where}: {seen}"
    out = [f"{len(problems)} of {len(processes)} process(es){where} run with an open-file limit below {wanted}:"]
    out.extend(f"- {p}" for p in problems)
    if granted["limit"] < wanted:
        out.append(f"Cap here: {granted['reason']}.")
    return "\n".join(out)


def process_names(names):
    """Process names to look for: supervisord and the shadowsocks programs by default."""
    if names is None:
        return {SUPERVISORD_NAME, *SS_PROCESS_NAMES}
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise SaltInvocationError(f"names: {names!r} must be a list of process names, e.g. [ss-server]")
    return set(names)
