"""
The sysctl engine: probe each key (writable, absent, read-only, restricted),
make a congestion control available, plan what to write against the live
kernel, apply it in one pass with rollback, persist the managed sysctl.d file,
and verify live and persisted values.

Every function takes resolved settings (``sstuning_settings.resolve``) and
the minion options (``sstuning_settings.options``) as plain values.
"""

import errno
import os
import re
import shutil
import subprocess

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_journal as journal
import sstuning_ports as ports
import sstuning_procfs as procfs
import sstuning_sysctld as sysctld
from sstuning_catalogue import (
    CATALOGUE, CONGESTION_KEY, RECIPE, RESERVED_PORTS_KEY, SS_PROCESS_NAMES, absent_is_satisfied, keep_higher, parse_ports,
    ports_text,
)
from sstuning_settings import PILLAR

MODULES_LOAD_NAME = "shadowsocks-tuning.conf"


def _cc_lists(root):
    available = (procfs.read_or(root, procfs.AVAILABLE_CC) or "").split()
    allowed = (procfs.read_or(root, procfs.ALLOWED_CC) or "").split()
    return available, allowed


def write_error(root, key, text, exc):
    """The message for a write the kernel refused, with what to do."""
    reason = exc.strerror or str(exc)
    if key == CONGESTION_KEY and exc.errno == errno.ENOENT:
        available = procfs.read_or(root, procfs.AVAILABLE_CC) or "none listed"
        reason = f"'{text}' is not an available congestion control (available: {available})"
    elif exc.errno == errno.EPERM and key == CONGESTION_KEY:
        allowed = procfs.read_or(root, procfs.ALLOWED_CC, "?")
        reason = f"'{text}' is not allowed in this network namespace (allowed: {allowed})"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"{reason}: the key is read-only here"
    return f"{key}: cannot set '{text}': {reason}"


# --------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------
def probe_key(root, key, wanted=None, child=None, present=None):
    """``{"status", "reason"}`` for one key; ``wanted`` checks a congestion
    control too; ``present`` says the caller already knows the file exists."""
    path = procfs.sysctl_path(root, key)
    spec = CATALOGUE.get(key, {})
    if child is None:
        child = procfs.in_child_netns(root)
    if not (present or os.path.exists(path)):
        if "removed" in spec and procfs.kernel_version() >= spec["removed"]:
            major, minor = spec["removed"]
            return {"status": "absent", "reason": f"removed from the kernel in Linux {major}.{minor}; this is {os.uname().release}"}
        if spec.get("scope") == "global" and child:
            return {"status": "read-only", "reason": "global key, not visible inside this network namespace (container): set it on the host"}
        return {"status": "absent", "reason": f"this kernel has no {path} (feature or module not loaded)"}
    if not os.access(path, os.W_OK):
        if spec.get("scope") == "global" and child:
            return {"status": "read-only", "reason": "global key, read-only inside this network namespace (container): set it on the host"}
        return {"status": "read-only", "reason": f"{path} is not writable (read-only /proc/sys or missing privilege)"}
    if key == CONGESTION_KEY:
        available, allowed = _cc_lists(root)
        if wanted is not None and wanted not in available:
            return {"status": "restricted", "reason": f"'{wanted}' is not available (available: {' '.join(available)}); load tcp_{wanted}"}
        if wanted is not None and child and wanted not in allowed:
            return {
                "status": "restricted",
                "reason": f"'{wanted}' is not allowed inside this network namespace (allowed: {' '.join(allowed)}); "
                "set it on the host or add it to net.ipv4.tcp_allowed_congestion_control there",
            }
        note = f"available: {' '.join(available)}"
        if child:
            note += f"; allowed in this namespace: {' '.join(allowed)}"
        return {"status": "writable", "reason": note}
    if spec.get("scope") == "global" and child:
        return {"status": "writable", "reason": "writable, but global: from this namespace it changes the whole host"}
    return {"status": "writable", "reason": "writable"}


# --------------------------------------------------------------------------
# Congestion control
# --------------------------------------------------------------------------
def modprobe(module, dry_run):
    """Load a kernel module; returns (ok, message). No shell, fixed argv."""
    if not re.match(r"^[a-z0-9_]{1,64}\Z", module):
        return False, f"refusing to load module {module!r}"
    binary = shutil.which("modprobe", path="/usr/sbin:/sbin:/usr/bin:/bin")
    if binary is None:
        return False, "modprobe not found (install the kmod package)"
    argv = [binary] + (["--dry-run", "--quiet"] if dry_run else []) + ["--", module]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"modprobe {module} could not run: {exc}"
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        return False, f"modprobe {module} failed: {detail[-1] if detail else f'exit {proc.returncode}'}"
    return True, f"modprobe {module}: {'would load' if dry_run else 'loaded'}"


def congestion(root, wanted, fallback, test, child):
    """Make sure a congestion control can be set. Returns a dict with the
    value to set (or None), whether a module is (to be) loaded, notes, and an
    error when it cannot be made available and there is no usable fallback."""
    out = {"value": wanted, "module": None, "notes": [], "error": None, "status": "writable"}
    available, allowed = _cc_lists(root)

    def usable(name):
        return name in available and (not child or name in allowed)

    load_failure = ""  # said in the problem, not as a note of its own
    if wanted not in available:
        module = f"tcp_{wanted}"
        ok, message = modprobe(module, dry_run=test)
        if ok:
            out["notes"].append(message)
            out["module"] = module
            available = _cc_lists(root)[0] if not test else available + [wanted]
        else:
            load_failure = message
    if usable(wanted):
        return out
    if wanted in available:
        problem = (
            f"'{wanted}' is available but not allowed inside this network namespace "
            f"(allowed: {' '.join(allowed)}); set it on the host"
        )
        out["status"] = "restricted"
    else:
        problem = f"'{wanted}' is not available (available: {' '.join(available)}); {load_failure}".rstrip("; ")
        out["status"] = "unavailable"
    out["module"] = None
    if fallback and usable(fallback):
        out["value"] = fallback
        out["notes"].append(f"{CONGESTION_KEY}: {problem}; using fallback '{fallback}'")
        out["status"] = "writable"
        return out
    if fallback:
        problem += f"; fallback '{fallback}' is not usable either"
    out["value"] = None
    out["problem"] = f"{CONGESTION_KEY}: {problem}"
    if out["status"] == "unavailable":
        out["error"] = (
            f"{out['problem']}. Load tcp_{wanted}, choose another profile (low-latency uses cubic), "
            f"or set pillar {PILLAR}:congestion_fallback"
        )
    return out


# --------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------
def _decide(plan, key, action, live, target=None, reason="", persist=False):
    """Record what happens to one key (what `explain` shows) and, for a
    value this package stands behind, the line to persist."""
    plan["decisions"][key] = {"action": action, "live": live, "target": target, "reason": reason}
    if persist:
        plan["values"][key] = target
    if target is not None and live is not None and live != target:
        plan["writes"][key] = (live, target)


def _reserved_ports(settings, opts, live, text):
    """Live reserved ports, those the settings name, and every port
    shadowsocks listens on or is configured for: (target, reason)."""
    found = ports.config_ports(opts["ss_config_dir"])
    port_range = procfs.read_or(opts["proc_root"], "net.ipv4.ip_local_port_range", "1 65535").split()
    wanted_range = settings["sysctls"].get("net.ipv4.ip_local_port_range", "").split() or port_range
    # Outbound connections take ports from the wider of the live and the wanted range.
    low, high = min(int(port_range[0]), int(wanted_range[0])), max(int(port_range[1]), int(wanted_range[1]))
    found.update(ports.listening_ports(set(SS_PROCESS_NAMES), (low, high)))
    merged = parse_ports(live or "") | parse_ports(text) | set(found)
    added = sorted(set(found) - parse_ports(live or ""))
    reason = "merged with what is there"
    if found:
        reason += "; shadowsocks ports: " + ", ".join(f"{port} ({found[port]})" for port in sorted(found))
    if added:
        reason += f"; adds {ports_text(added)}"
    return ports_text(merged), reason


def _plan(settings, opts, test):
    """Compare wanted and live values; decide, per key, what to write, what is
    kept and why, what is skipped and why. Reads only (modprobe aside, which
    is only dry-run under test)."""
    root = opts["proc_root"]
    force = set(settings["force"])
    child = procfs.in_child_netns(root)
    config = settings["config"]
    try:
        persisted = {key: value for _, key, value in sysctld.parse_conf(journal.read_managed(config) or "")}
    except CommandExecutionError:
        persisted = {}  # prepare reports it
    # A read-only /proc/sys mount says nothing about the kernel that reads the
    # file at boot: its keys are reported, their persisted lines left alone.
    proc_read_only = procfs.read_only_mount(root)
    plan = {
        "writes": {},      # key -> (old, new)
        "values": {},      # key -> value to persist
        "dropped": {},     # key -> why its line is commented out
        "decisions": {},   # key -> {action, live, target, reason}
        "kept": [], "lowered": [], "skipped": [], "satisfied": [], "notes": [], "errors": [],
        "module": None,
    }
    for key, text in settings["sysctls"].items():
        try:
            live = procfs.read(root, key)
        except OSError:
            live = None
        status = probe_key(root, key, None, child, present=live is not None)
        if status["status"] == "absent" and key not in CATALOGUE:
            message = (f"{key}: unknown key: not in this package's catalogue and not on this kernel "
                       f"({settings['sources'][key]}); check the spelling (`salt-call shadowsocks_tuning.catalogue`)")
            plan["errors"].append(message)
            _decide(plan, key, "error", live, reason=message)
            continue
        if status["status"] == "absent" and absent_is_satisfied(key, text):
            plan["satisfied"].append(f"{key}: wanted {text}, and the kernel has no such key ({status['reason']})")
            plan["dropped"][key] = "absent on this kernel"
            _decide(plan, key, "satisfied", live, reason=status["reason"])
            continue
        if status["status"] == "writable" and key in settings["kernel_default"] and live != text and key not in force:
            # The profile only asks for the kernel's default; this value was someone's choice.
            note = f"{key}: kept {live} (the profile asks only for the kernel default {text}; name it in pillar sysctls to replace it)"
            plan["kept"].append(note)
            _decide(plan, key, "kept", live, live, note.split(": ", 1)[1])
            continue
        if status["status"] == "writable" and key == CONGESTION_KEY:
            cc = congestion(root, text, settings["congestion_fallback"], test, child)
            plan["notes"].extend(cc["notes"])
            if cc["error"]:
                plan["errors"].append(cc["error"])
                _decide(plan, key, "error", live, reason=cc["error"])
                continue
            if cc["value"] is None:
                status = {"status": "restricted", "reason": cc["problem"].split(": ", 1)[1]}
            else:
                text = cc["value"]
                plan["module"] = cc["module"]
        if status["status"] != "writable":
            message = f"{key}: {status['status']}: {status['reason']}"
            if settings["policy"]["keys"].get(key, settings["policy"]["unavailable"]) == "strict":
                plan["errors"].append(message + f" (policy strict; set pillar {PILLAR}:policy:keys:{key}: warn to skip it)")
            else:
                plan["skipped"].append(message)
                if not proc_read_only:
                    plan["dropped"][key] = status["status"]
            _decide(plan, key, status["status"], live, reason=status["reason"])
            continue
        if key == RESERVED_PORTS_KEY:
            target, reason = _reserved_ports(settings, opts, live, text)
            # An empty list needs no line (and `key =` with nothing after it is no value for sysctl).
            _decide(plan, key, "merged", live, target, reason, persist=bool(target))
            continue
        if key in force:
            _decide(plan, key, "set", live, text, "forced in pillar", persist=True)
            continue
        lower = settings["lower"].get(key)
        target, kept = keep_higher(key, text, live, lower=bool(lower))
        if kept and target == live and persisted.get(key) != target:
            # The kernel's own (often RAM-derived) value wins: no line pins it
            # for the next boot. A line this package wrote earlier stays managed.
            plan["kept"].append(kept)
            _decide(plan, key, "kept", live, live, kept.split(": ", 1)[1])
            continue
        if kept:
            plan["kept"].append(kept)
        reason = kept.split(": ", 1)[1] if kept else ""
        if lower and live is not None and target != keep_higher(key, target, live)[0]:
            plan["lowered"].append(f"{key}: {live} -> {target}: {lower}")
            reason = "; ".join(filter(None, [reason, f"lowered on purpose: {lower}"]))
        _decide(plan, key, "set", live, target, reason, persist=True)
    return plan


def managed_paths(settings, opts):
    """The files the sysctl half manages (``clean`` puts back no other)."""
    return {settings["config"], os.path.join(opts["modules_load_dir"], MODULES_LOAD_NAME)}


def _modules_load(modules_load_dir, module):
    """(path, new text) of the modules-load.d file that loads `module` at boot; text None: nothing to add."""
    if not module:
        return None, None
    path = os.path.join(modules_load_dir, MODULES_LOAD_NAME)
    old = journal.read_managed(path) or ""
    if module in old.split():
        return path, None
    return path, old + ("" if not old or old.endswith("\n") else "\n") + f"{module}\n"


def _summary(plan, overridden, boot_note):
    parts = []
    if plan["writes"]:
        parts.append(f"{len(plan['writes'])} sysctl(s) to change")
    parts.extend(plan["notes"])
    if plan["kept"]:
        parts.append("kept, never made worse than this kernel has it (not persisted): " + "; ".join(plan["kept"]))
    if plan["lowered"]:
        parts.append("lowered on purpose: " + "; ".join(plan["lowered"]))
    if plan["satisfied"]:
        parts.append("satisfied: " + "; ".join(plan["satisfied"]))
    if plan["skipped"]:
        parts.append("skipped: " + "; ".join(plan["skipped"]))
    for key, (path, line, value) in overridden.items():
        parts.append(f"overridden at boot: {key} = {value} in {path}:{line} wins over the managed file")
    if boot_note:
        parts.append(boot_note)
    return parts


def prepare(settings, opts, test):
    """Everything apply would do, read but not written: ``{"changes",
    "comment", "errors", "profile", ...}`` plus the texts to write."""
    config = settings["config"]
    # Following a link would copy the target's lines into a 0644 file (and a
    # link in a world-writable directory can point anywhere).
    errors = []
    for path, where in ((config, f"pillar {PILLAR}:config"),
                        (os.path.join(opts["modules_load_dir"], MODULES_LOAD_NAME),
                         "minion option shadowsocks_tuning.modules_load_dir")):
        try:
            text = journal.read_managed(path)
        except CommandExecutionError as exc:
            errors.append(f"{where}: {exc}")
        if path == config:
            old_conf = None if errors else text
    if errors:
        return {"errors": errors, "changes": {}, "comment": [], "profile": settings["profile"]}
    plan = _plan(settings, opts, test)
    changes = {key: {"old": old, "new": new} for key, (old, new) in plan["writes"].items()}
    new_conf = sysctld.render_conf(old_conf, plan["values"], plan["dropped"], settings["profile"])
    # Nothing to persist and no file yet: do not create an empty one.
    conf_change = journal.file_change(config, new_conf, old_conf) if new_conf or old_conf is not None else None
    if conf_change:
        changes[config] = {"diff": conf_change["diff"]}
    modules_path, modules_text = _modules_load(opts["modules_load_dir"], plan["module"])
    if modules_text is not None:
        changes[modules_path] = {"diff": journal.file_change(modules_path, modules_text)["diff"]}
    overridden, boot_note = sysctld.overrides(opts["sysctl_dirs"], opts["sysctl_conf"], config, plan["values"])
    errors = list(plan["errors"])
    if overridden and settings["policy"]["override"] == "strict":
        errors.extend(
            f"{key}: {path}:{line} sets {value} and is read after {config} at boot (policy override: strict)"
            for key, (path, line, value) in overridden.items()
        )
    return {
        "changes": changes,
        "comment": _summary(plan, overridden, boot_note),
        "errors": errors,
        "profile": settings["profile"],
        "writes": plan["writes"],
        "config_text": new_conf if conf_change else None,
        "modules_load": (modules_path, modules_text) if modules_text is not None else None,
    }


def apply(settings, opts, prepared, originals=None):
    """Write what ``prepare`` found, in one pass, then persist atomically. All
    or nothing: if the kernel rejects one value, the keys already written are
    put back and nothing is persisted. Call under the journal lock;
    ``originals``: the record as ``journal.load_originals`` read it under
    that lock (read here when not given)."""
    root, state_dir, config = opts["proc_root"], opts["state_dir"], settings["config"]
    if not prepared["changes"]:
        return prepared
    files = [config] + ([prepared["modules_load"][0]] if prepared["modules_load"] else [])
    try:
        written = {config: prepared["config_text"]} if prepared["config_text"] is not None else {}
        if prepared["modules_load"]:
            written[prepared["modules_load"][0]] = prepared["modules_load"][1]
        journal.remember(state_dir, journal.load_originals(state_dir) if originals is None else originals,
                         {k: old for k, (old, _) in prepared["writes"].items()}, files, written)
    except OSError as exc:
        raise CommandExecutionError(
            f"cannot save the original values in {state_dir}: {exc.strerror or exc}; nothing was changed"
        )
    written = []
    try:
        for key, (old, new) in prepared["writes"].items():
            try:
                procfs.write(root, key, new)
            except OSError as exc:
                raise CommandExecutionError(write_error(root, key, new, exc))
            written.append((key, old))
        # Root-owned 0644 whatever the files were: their lines run as root at
        # boot. Not fsynced: the saved originals are (they alone cannot be
        # recomputed); these files are rewritten by the next run, and a power
        # cut before the journal commit brings back the old (or no) file,
        # whose values the kernel then boots with.
        if prepared["config_text"] is not None:
            journal.atomic_write(config, prepared["config_text"], mode=0o644, durable=False)
        if prepared["modules_load"]:
            journal.atomic_write(*prepared["modules_load"], mode=0o644, durable=False)
    except (CommandExecutionError, OSError) as exc:
        failed = _rollback(root, written)
        message = exc if isinstance(exc, CommandExecutionError) else f"cannot persist {config}: {exc}"
        tail = f"; could not put back: {', '.join(failed)}" if failed else ""
        raise CommandExecutionError(
            f"{message}. Put back {len(written) - len(failed)} key(s) already written; nothing persisted{tail}"
        )
    return prepared


def _rollback(root, written):
    failed = []
    for key, old in reversed(written):
        try:
            procfs.write(root, key, old)
        except OSError:
            failed.append(key)
    return failed


def set_key(root, key, text, force):
    """Write one normalised value now (not persisted): ``{"old", "new"}``.
    A capacity key is not lowered unless ``force``."""
    try:
        old = procfs.read(root, key)
    except FileNotFoundError:
        if absent_is_satisfied(key, text):
            return {"old": None, "new": None, "comment": probe_key(root, key)["reason"]}
        raise CommandExecutionError(f"{key}: cannot set '{text}': {probe_key(root, key)['reason']}")
    if key == CONGESTION_KEY and text != old:
        cc = congestion(root, text, None, False, procfs.in_child_netns(root))
        if cc["value"] is None:
            raise CommandExecutionError(cc["error"] or cc["problem"])
    target, kept = keep_higher(key, text, old)
    if kept and not force:
        raise SaltInvocationError(f"{key}: refusing to lower {old} to {text}: it is a capacity limit; pass force=True")
    target = text if force else target
    if old == target:
        return {"old": old, "new": old}
    try:
        return {"old": old, "new": procfs.write(root, key, target)}
    except OSError as exc:
        raise CommandExecutionError(write_error(root, key, target, exc))


# --------------------------------------------------------------------------
# Verify
# --------------------------------------------------------------------------
def verify(settings, opts):
    """Per key ``ok``, ``drift``, ``absent``, ``read-only``, ``restricted``,
    ``error`` or ``overridden``, judged by the same plan ``apply`` follows:
    ``{"ok", "problems", "keys"}``."""
    config = settings["config"]
    plan = _plan(settings, opts, test=True)
    persisted = {key: value for _, key, value in sysctld.parse_conf(journal.read_managed(config) or "")}
    report = {}
    for key, decision in plan["decisions"].items():
        action, live, target = decision["action"], decision["live"], decision["target"]
        entry = {"status": "ok", "wanted": target if target is not None else settings["sysctls"][key], "live": live,
                 "reason": decision["reason"]}
        if action in ("absent", "read-only", "restricted", "error"):
            entry["status"] = action if action != "error" else "restricted"
        elif action != "satisfied" and live != target:
            entry.update(status="drift", reason=f"live value {live} differs from {target}")
        elif key in plan["values"]:
            entry["persisted"] = persisted.get(key)
            if persisted.get(key) != target:
                entry.update(status="drift", reason=f"{config} has {persisted.get(key)!r}, expected {target}")
        report[key] = entry
    overridden, _ = sysctld.overrides(opts["sysctl_dirs"], opts["sysctl_conf"], config, plan["values"])
    for key, (path, line, value) in overridden.items():
        report[key].update(status="overridden", reason=f"{path}:{line} sets {value} and is read later at boot")
    bad = sorted(k for k, v in report.items() if v["status"] in ("drift", "overridden"))
    return {"ok": not bad, "problems": bad, "keys": report}


def explain(settings, opts):
    """Per key of the recipe and the profile: the recipe's value, the live
    value, what the profile does here and why (a dry run: nothing written)."""
    plan = _plan(settings, opts, test=True)
    out = {}
    for key in list(RECIPE) + [k for k in settings["sysctls"] if k not in RECIPE]:
        decision = plan["decisions"].get(key)
        if decision is None:
            live = procfs.read_or(opts["proc_root"], key)
            out[key] = {"recipe": RECIPE.get(key), "live": live, "profile": None, "action": "not managed",
                        "result": live, "reason": f"profile {settings['profile']} does not set it"}
            continue
        action, reason = decision["action"], decision["reason"]
        if action == "set" and decision["live"] == decision["target"]:
            action = "in place"
        elif action == "set" and not reason:
            verb = "raises" if CATALOGUE.get(key, {}).get("more") else "changes"
            reason = f"{verb} {decision['live']}: {CATALOGUE.get(key, {}).get('doc', 'set by pillar')}"
        out[key] = {
            "recipe": RECIPE.get(key), "live": decision["live"], "profile": settings["sysctls"].get(key),
            "action": action, "result": decision["target"] if decision["target"] is not None else decision["live"],
            "reason": reason or CATALOGUE.get(key, {}).get("doc", ""),
            "persisted": key in plan["values"],
        }
    return out
