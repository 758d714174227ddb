"""
The sysctl engine: probe each key (writable, absent, read-only, restricted,
write-only, a directory), make a congestion control available, decide per
key what to do against the live kernel (``decide``: one decision per key,
its reason as data, shared by ``plan``, ``verify``, ``explain`` and the
container engine), apply the writes in one pass with rollback, persist the
managed sysctl.d file, and verify live and persisted values.

Every function takes resolved settings (``sstuning_settings.resolve``) and
the minion options (``sstuning_settings.options``) as plain values.
"""

import contextlib
import errno
import os
import re
import shutil
import stat
import subprocess

from salt.exceptions import CommandExecutionError, SaltInvocationError

import sstuning_journal as journal
import sstuning_ports as ports
import sstuning_procfs as procfs
import sstuning_sysctld as sysctld
from sstuning_catalogue import (
    CATALOGUE, CONGESTION_KEY, RECIPE, RESERVED_PORTS_KEY, absent_is_satisfied, keep_higher, kept_note, parse_ports,
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
    control too; ``present`` says the caller already read a value from it."""
    path = procfs.sysctl_path(root, key)
    spec = CATALOGUE.get(key, {})
    if child is None:
        child = procfs.in_child_netns(root)
    if not present:
        try:
            info = os.stat(path)
        except OSError:
            info = None
        if info is None:
            if "removed" in spec and procfs.kernel_version() >= spec["removed"]:
                major, minor = spec["removed"]
                return {"status": "absent",
                        "reason": f"removed from the kernel in Linux {major}.{minor}; this is {os.uname().release}"}
            if spec.get("scope") == "global" and child:
                return {"status": "read-only",
                        "reason": "global key, not visible inside this network namespace (container): set it on the host"}
            return {"status": "absent", "reason": f"this kernel has no {path} (feature or module not loaded)"}
        if stat.S_ISDIR(info.st_mode):
            return {"status": "directory",
                    "reason": f"{path} is a directory of sysctls, not a setting: name a key inside it "
                              f"({key}.KEY, e.g. {key}.{_first_entry(path)})"}
        if not info.st_mode & 0o444:
            return {"status": "write-only",
                    "reason": f"{path} can only be written (mode {stat.S_IMODE(info.st_mode):o}): it is a trigger "
                              "that acts when written, not a setting with a value to keep; remove it from pillar"}
    if not os.access(path, os.W_OK):
        if spec.get("scope") == "global" and child:
            return {"status": "read-only",
                    "reason": "global key, read-only inside this network namespace (container): set it on the host"}
        return {"status": "read-only", "reason": f"{path} is not writable (read-only /proc/sys or missing privilege)"}
    if key == CONGESTION_KEY:
        available, allowed = _cc_lists(root)
        if wanted is not None and wanted not in available:
            return {"status": "restricted",
                    "reason": f"'{wanted}' is not available (available: {' '.join(available)}); load tcp_{wanted}"}
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


def _first_entry(path):
    try:
        return sorted(os.listdir(path))[0]
    except (OSError, IndexError):
        return "NAME"


# Statuses a key can have that are not a value to set: a write-only key or a
# directory can never be one, whatever the policy.
NOT_SETTINGS = ("write-only", "directory")


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


def choose_congestion(wanted, fallback, available, allowed, child, load_failure=""):
    """Which congestion control can be set, from the lists the kernel offers
    (pure: the apply path loads a module first, a container cannot):
    ``{"value", "status", "problem", "fallback"}``; ``value`` None when
    neither the wanted one nor the fallback is usable, ``status`` then
    ``unavailable`` (not on this kernel) or ``restricted`` (not allowed in
    this namespace)."""

    def usable(name):
        return name in available and (not child or name in allowed)

    if usable(wanted):
        return {"value": wanted, "status": "writable", "problem": None, "fallback": None}
    if wanted in available:
        problem = (f"'{wanted}' is available but not allowed inside this network namespace "
                   f"(allowed: {' '.join(allowed)}); set it on the host")
        status = "restricted"
    else:
        problem = f"'{wanted}' is not available (available: {' '.join(available)}); {load_failure}".rstrip("; ")
        status = "unavailable"
    if fallback and usable(fallback):
        return {"value": fallback, "status": "writable", "problem": problem, "fallback": fallback}
    if fallback:
        problem += f"; fallback '{fallback}' is not usable either"
    return {"value": None, "status": status, "problem": problem, "fallback": None}


def congestion(root, wanted, fallback, test, child):
    """``choose_congestion`` after trying to load the wanted module (only a
    dry run under ``test``): adds ``module`` (loaded or to load) and
    ``notes``."""
    available, allowed = _cc_lists(root)
    module, notes, load_failure = None, [], ""
    if wanted not in available:
        ok, message = modprobe(f"tcp_{wanted}", dry_run=test)
        if ok:
            notes.append(message)
            module = f"tcp_{wanted}"
            available = _cc_lists(root)[0] if not test else available + [wanted]
        else:
            load_failure = message
    choice = choose_congestion(wanted, fallback, available, allowed, child, load_failure)
    choice["module"] = module if choice["value"] == wanted else None
    choice["notes"] = notes
    return choice


# --------------------------------------------------------------------------
# One decision per key
# --------------------------------------------------------------------------
def decide(key, text, live, probe, settings, persisted=None, cc=None, found=None):
    """What to do with one key, and why, as data: ``{"key", "action",
    "live", "wanted", "target", "persist", "why", "detail"}``.

    ``action``: ``set`` (the live value changes), ``in place``, ``kept``
    (the kernel's value stays: it beats the profile's, ``why``
    ``kernel-higher``, or the admin chose it where the profile only asks for
    the kernel's default, ``admin-choice``), ``merged`` (reserved ports),
    ``satisfied`` (a removed key wanted at 0), the probe's status (``absent``,
    ``read-only``, ``restricted``) when the key is skipped, or ``error``.
    ``persist``: the value belongs in the managed file. ``probe`` is
    ``probe_key``'s answer; ``persisted`` the value the managed file holds;
    ``cc`` the congestion choice for the congestion key; ``found`` the
    ports shadowsocks listens on ({port: where}) for the reserved ports.
    Pure: ``plan`` and the container engine read the kernel and call it."""
    out = {"key": key, "action": None, "live": live, "wanted": text, "target": None, "persist": False,
           "why": None, "detail": {}}

    def done(action, target=None, persist=False, why=None, **detail):
        out.update(action=action, target=target, persist=persist, why=why, detail=detail)
        return out

    status, forced = probe["status"], key in settings["force"]
    if status == "absent" and key not in CATALOGUE:
        return done("error", why="unknown-key", message=(
            f"{key}: unknown key: not in this package's catalogue and not on this kernel "
            f"({settings['sources'].get(key, 'pillar')}); check the spelling (`salt-call shadowsocks_tuning.catalogue`)"))
    if status in NOT_SETTINGS:
        return done("error", why=status, message=f"{key}: {status}: {probe['reason']}")
    if status == "absent" and absent_is_satisfied(key, text):
        return done("satisfied", why="removed", reason=probe["reason"])
    if status == "writable" and key in settings["kernel_default"] and live != text and not forced:
        return done("kept", live, why="admin-choice")
    if status == "writable" and key == CONGESTION_KEY and cc is not None:
        if cc["value"] is None and cc["status"] == "unavailable":
            return done("error", why="congestion", message=(
                f"{CONGESTION_KEY}: {cc['problem']}. Load tcp_{text}, choose another profile (low-latency uses "
                f"cubic), or set pillar {PILLAR}:congestion_fallback"))
        if cc["value"] is None:
            probe = {"status": "restricted", "reason": cc["problem"]}
            status = "restricted"
        else:
            out["wanted"] = text = cc["value"]
    if status != "writable":
        if settings["policy"]["keys"].get(key, settings["policy"]["unavailable"]) == "strict":
            return done("error", why="strict", message=(
                f"{key}: {status}: {probe['reason']} (policy strict; set pillar {PILLAR}:policy:keys:{key}: "
                "warn to skip it)"))
        return done(status, why="skipped", reason=probe["reason"])
    fallback = {"fallback": cc["fallback"], "problem": cc["problem"]} if cc and cc.get("fallback") else {}
    if key == RESERVED_PORTS_KEY:
        found = found or {}
        merged = parse_ports(live or "") | parse_ports(text) | set(found)
        target = ports_text(merged)
        # An empty list needs no line (and `key =` with nothing after it is no value for sysctl).
        return done("merged", target, persist=bool(target), why="ports", found=dict(found),
                    added=ports_text(set(found) - parse_ports(live or "")))
    if forced:
        return done("in place" if live == text else "set", text, persist=True, why="forced")
    lower = settings["lower"].get(key)
    target, kept = keep_higher(key, text, live, lower=bool(lower))
    if kept and target == live and persisted != target:
        # The kernel's own (often RAM-derived) value wins: no line pins it for
        # the next boot. A line this package wrote earlier stays managed.
        return done("kept", live, why="kernel-higher", kept=list(kept))
    lowered = bool(lower) and live is not None and target != keep_higher(key, target, live)[0]
    why = "lowered" if lowered else ("partly-kept" if kept else ("fallback" if fallback else None))
    return done("in place" if live == target else "set", target, persist=True, why=why, kept=list(kept),
                lower=lower if lowered else None, **fallback)


def describe(decision):
    """A decision's reason in words (what `explain` and the comments show)."""
    key, action, why, detail = decision["key"], decision["action"], decision["why"], decision["detail"]
    live, wanted, target = decision["live"], decision["wanted"], decision["target"]
    spec = CATALOGUE.get(key, {})
    if action == "error":
        return detail["message"].split(f"{key}: ", 1)[-1] if detail["message"].startswith(f"{key}: ") \
            else detail["message"]
    if why == "admin-choice":
        return (f"kept {live} (the profile asks only for the kernel default {wanted}; name it in pillar sysctls "
                "to replace it)")
    if why == "kernel-higher":
        return kept_note(wanted, live, live, detail["kept"])
    if action == "satisfied" or why == "skipped":
        return detail["reason"]
    if why == "ports":
        found = detail["found"]
        text = "merged with what is there"
        if found:
            text += "; shadowsocks ports: " + ", ".join(f"{port} ({found[port]})" for port in sorted(found))
        if detail["added"]:
            text += f"; adds {detail['added']}"
        return text
    parts = []
    if why == "forced":
        parts.append("forced in pillar")
    if detail.get("kept"):
        parts.append(kept_note(wanted, live, target, detail["kept"]))
    if detail.get("lower"):
        parts.append(f"lowered on purpose: {detail['lower']}")
    if detail.get("fallback"):
        parts.append(f"{detail['problem']}; using fallback '{detail['fallback']}'")
    if not parts and action == "set":
        verb = "raises" if spec.get("more") else "changes"
        parts.append(f"{verb} {live}: {spec.get('doc', 'set by pillar')}")
    return "; ".join(parts) or spec.get("doc", "")


# --------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------
def config_ports(options, kinds):
    """{port: "path (field)"} from the configs of every kind of daemon."""
    found = {}
    for name, kind in kinds.items():
        kind_configs = ports.kind_configs(options, name, kind)
        if not kind_configs:
            continue
        for port, where in ports.kind_config_ports(kind_configs).items():
            found.setdefault(port, where)
    return found


def _found_ports(settings, options, live_range, kinds, table, live_reserved=None):
    """Every port shadowsocks listens on or is configured for, {port: where}:
    the configs of every kind of daemon, and the listening sockets of its
    processes inside the outbound range (the wider of the live and the
    wanted one: outbound connections take ports from it)."""
    found = config_ports(options, kinds)
    wanted_range = settings["sysctls"].get("net.ipv4.ip_local_port_range", "").split() or live_range
    low = min(int(live_range[0]), int(wanted_range[0]))
    high = max(int(live_range[1]), int(wanted_range[1]))
    names, port_options = set(), {}
    for kind in kinds.values():
        names.update(kind["programs"])
        port_options.update(dict.fromkeys(kind["programs"], kind.get("port_options") or ()))
    # A port already reserved needs no owner: the merge keeps what the kernel has.
    known = set(found)
    with contextlib.suppress(SaltInvocationError):
        known |= parse_ports(live_reserved or "")
    for port, where in ports.listening_ports(names, (low, high), table, known, port_options).items():
        found.setdefault(port, where)
    return found


def box(options):
    """The facts ``profile: auto`` chooses from: memory, and the congestion
    controls this kernel (and this network namespace) offers."""
    root = options["proc_root"]
    memory = 1 << 34
    try:
        with open("/proc/meminfo", "rb") as handle:
            memory = int(handle.readline().split()[1]) * 1024  # MemTotal: N kB
    except (OSError, ValueError, IndexError):
        pass
    available, allowed = _cc_lists(root)
    return {"memory": memory, "congestion": {"available": available, "allowed": allowed,
                                             "child": procfs.in_child_netns(root)}}


def check_config(settings, options):
    """The persisted file must be one that the boot-time readers read
    (``sysctl --system`` and ``systemd-sysctl``: ``*.conf`` directly in one of
    their directories) and that no other program owns (a package's conffile):
    otherwise the file is refused before anything is written, unless pillar
    ``config_outside_boot`` says it is meant to be read some other way."""
    config = settings["config"]
    where = f"pillar {PILLAR}:config"
    if settings.get("config_outside_boot"):
        return [], [f"{config} is outside the files `sysctl --system` reads at boot (config_outside_boot: true): "
                    "the tuning is live now and persisted only for whatever reads that file"]
    directory = os.path.dirname(config)
    admin = options["sysctl_dirs"][0] if options["sysctl_dirs"] else "/etc/sysctl.d"
    if os.path.normpath(directory) != os.path.normpath(admin):
        return [f"{where}: {config} is not read at boot: `sysctl --system` and systemd-sysctl read *.conf files "
                f"directly in {', '.join(options['sysctl_dirs'])} (and {options['sysctl_conf']}); the admin's "
                f"directory is {admin}: put it there (e.g. {admin}/local.conf), or set pillar "
                f"{PILLAR}:config_outside_boot: true to persist it in a file boot does not read"], []
    owner = journal.package_conffile(config)
    if owner:
        return [f"{where}: {config} belongs to the {owner} package (a conffile its upgrades manage): pick a file "
                f"of your own in {admin}, e.g. {admin}/local.conf"], []
    return [], []


def plan(settings, options, test, kinds=None, table=None):
    """Everything ``apply`` would do, read but not written: ``{"decisions",
    "changes", "comment", "errors", "profile", "writes", "config_text",
    "modules_load"}``. ``kinds``: the kinds of daemon whose ports are
    reserved (every kind the settings know by default); ``table``: the process table of this
    run (``procfs.process_table``), read when needed and not given."""
    root, config = options["proc_root"], settings["config"]
    kinds = settings["daemons"] if kinds is None else kinds
    errors, notes = check_config(settings, options)
    old_conf = None
    # Following a link would copy the target's lines into a 0644 file (and a
    # link in a world-writable directory can point anywhere).
    for path, where in ((config, f"pillar {PILLAR}:config"),
                        (os.path.join(options["modules_load_dir"], MODULES_LOAD_NAME),
                         "minion option shadowsocks_tuning.modules_load_dir")):
        try:
            text = journal.read_managed(path)
        except (CommandExecutionError, OSError) as exc:
            errors.append(f"{where}: {journal.describe_error(path, exc)}")
            continue
        if path == config:
            old_conf = text
    if errors:
        return {"errors": errors, "changes": {}, "comment": notes, "profile": settings["profile"], "decisions": {},
                "writes": {}, "config_text": None, "modules_load": None}
    persisted = {key: value for _, key, value in sysctld.parse_conf(old_conf or "")}
    child = procfs.in_child_netns(root)
    # A read-only /proc/sys mount says nothing about the kernel that reads the
    # file at boot: its keys are reported, their persisted lines left alone.
    proc_read_only = procfs.read_only_mount(root)
    decisions, module = {}, None
    for key, text in settings["sysctls"].items():
        try:
            live = procfs.read(root, key)
        except OSError:
            live = None
        probe = probe_key(root, key, None, child, present=live is not None)
        cc = found = None
        if probe["status"] == "writable" and key == CONGESTION_KEY:
            cc = congestion(root, text, settings["congestion_fallback"], test, child)
            notes.extend(cc["notes"])
            module = cc["module"]
        if probe["status"] == "writable" and key == RESERVED_PORTS_KEY:
            live_range = procfs.read_or(root, "net.ipv4.ip_local_port_range", "1 65535").split()
            found = _found_ports(settings, options, live_range, kinds, table, live)
        decisions[key] = decide(key, text, live, probe, settings, persisted.get(key), cc, found)
    writes = {k: (d["live"], d["target"]) for k, d in decisions.items()
              if d["target"] is not None and d["live"] is not None and d["live"] != d["target"]}
    values = {k: d["target"] for k, d in decisions.items() if d["persist"]}
    dropped = {}
    for key, d in decisions.items():
        if d["action"] == "satisfied":
            dropped[key] = "absent on this kernel"
        elif d["why"] == "skipped" and not proc_read_only:
            dropped[key] = d["action"]
    errors.extend(d["detail"]["message"] for d in decisions.values() if d["action"] == "error")
    changes = {key: {"old": old, "new": new} for key, (old, new) in writes.items()}
    new_conf = sysctld.render_conf(old_conf, values, dropped, settings["profile"])
    # Nothing to persist and no file yet: do not create an empty one.
    conf_change = journal.file_change(config, new_conf, old_conf) if new_conf or old_conf is not None else None
    if conf_change:
        changes[config] = {"diff": conf_change["diff"]}
    modules_path, modules_text = _modules_load(options["modules_load_dir"], module)
    if modules_text is not None:
        changes[modules_path] = {"diff": journal.file_change(modules_path, modules_text)["diff"]}
    overridden, boot_note = sysctld.overrides(options["sysctl_dirs"], options["sysctl_conf"], config, values)
    if overridden and settings["policy"]["override"] == "strict":
        errors.extend(
            f"{key}: {path}:{line} sets {value} and is read after {config} at boot (policy override: strict)"
            for key, (path, line, value) in overridden.items()
        )
    return {
        "decisions": decisions,
        "changes": changes,
        "comment": summary(decisions, notes, overridden, boot_note, len(writes)),
        "errors": errors,
        "profile": settings["profile"],
        "writes": writes,
        "config_text": new_conf if conf_change else None,
        "modules_load": (modules_path, modules_text) if modules_text is not None else None,
    }


def managed_paths(settings, options):
    """The files the sysctl half manages (``clean`` puts back no other)."""
    return {settings["config"], os.path.join(options["modules_load_dir"], MODULES_LOAD_NAME)}


def _modules_load(modules_load_dir, module):
    """(path, new text) of the modules-load.d file that loads `module` at boot; text None: nothing to add."""
    if not module:
        return None, None
    path = os.path.join(modules_load_dir, MODULES_LOAD_NAME)
    old = journal.read_managed(path) or ""
    if module in old.split():
        return path, None
    return path, old + ("" if not old or old.endswith("\n") else "\n") + f"{module}\n"


def summary(decisions, notes, overridden, boot_note, writes):
    """The comment lines of a plan, from its decisions."""
    parts = [f"{writes} sysctl(s) to change"] if writes else []
    parts.extend(notes)
    kept = [f"{k}: {describe(d)}" for k, d in decisions.items() if d["action"] == "kept" or d["why"] == "partly-kept"]
    lowered = [f"{k}: {d['live']} -> {d['target']}: {d['detail']['lower']}" for k, d in decisions.items()
               if d["why"] == "lowered"]
    satisfied = [f"{k}: wanted {d['wanted']}, and the kernel has no such key ({d['detail']['reason']})"
                 for k, d in decisions.items() if d["action"] == "satisfied"]
    skipped = [f"{k}: {d['action']}: {d['detail']['reason']}" for k, d in decisions.items() if d["why"] == "skipped"]
    fallback = [f"{k}: {d['detail']['problem']}; using fallback '{d['detail']['fallback']}'"
                for k, d in decisions.items() if d["detail"].get("fallback")]
    parts.extend(fallback)
    if kept:
        parts.append("kept, never made worse than this kernel has it (not persisted): " + "; ".join(kept))
    if lowered:
        parts.append("lowered on purpose: " + "; ".join(lowered))
    if satisfied:
        parts.append("satisfied: " + "; ".join(satisfied))
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    for key, (path, line, value) in overridden.items():
        parts.append(f"overridden at boot: {key} = {value} in {path}:{line} wins over the managed file")
    if boot_note:
        parts.append(boot_note)
    return parts


def apply(settings, options, planned, originals=None):
    """Write what ``plan`` found, in one pass, then persist atomically. All
    or nothing: if the kernel rejects one value, the keys already written are
    put back and nothing is persisted. Call under the journal lock;
    ``originals``: the record as ``journal.load_originals`` read it under
    that lock (read here when not given)."""
    root, state_dir, config = options["proc_root"], options["state_dir"], settings["config"]
    if not planned["changes"]:
        return planned
    files = [config] + ([planned["modules_load"][0]] if planned["modules_load"] else [])
    written = {config: planned["config_text"]} if planned["config_text"] is not None else {}
    if planned["modules_load"]:
        written[planned["modules_load"][0]] = planned["modules_load"][1]
    journal.remember(state_dir, journal.load_originals(state_dir) if originals is None else originals,
                     {k: old for k, (old, _) in planned["writes"].items()}, files, written)
    done = []
    try:
        for key, (old, new) in planned["writes"].items():
            try:
                procfs.write(root, key, new)
            except OSError as exc:
                raise CommandExecutionError(write_error(root, key, new, exc))
            done.append((key, old))
        # Root-owned 0644 whatever the files were: their lines run as root at
        # boot. Not fsynced: the saved originals are (they alone cannot be
        # recomputed); these files are rewritten by the next run, and a power
        # cut before the journal commit brings back the old (or no) file,
        # whose values the kernel then boots with.
        for path, text in written.items():
            try:
                journal.atomic_write(path, text, mode=0o644, durable=False)
            except OSError as exc:
                raise CommandExecutionError(f"cannot persist {journal.describe_error(path, exc)}")
    except CommandExecutionError as exc:
        failed = _rollback(root, done)
        tail = f"; could not put back: {', '.join(failed)}" if failed else ""
        raise CommandExecutionError(
            f"{exc}. Put back {len(done) - len(failed)} key(s) already written; nothing persisted{tail}"
        )
    return planned


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
    probe = probe_key(root, key)
    if probe["status"] in NOT_SETTINGS:
        raise CommandExecutionError(f"{key}: cannot set '{text}': {probe['reason']}")
    try:
        old = procfs.read(root, key)
    except FileNotFoundError:
        if absent_is_satisfied(key, text):
            return {"old": None, "new": None, "comment": probe["reason"]}
        raise CommandExecutionError(f"{key}: cannot set '{text}': {probe['reason']}")
    except OSError as exc:
        raise CommandExecutionError(f"{key}: cannot read it: {exc.strerror or exc}")
    if key == CONGESTION_KEY and text != old:
        cc = congestion(root, text, None, False, procfs.in_child_netns(root))
        if cc["value"] is None:
            raise CommandExecutionError(f"{CONGESTION_KEY}: {cc['problem']}")
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
def verify(settings, options, planned=None):
    """Per key ``ok``, ``drift``, ``absent``, ``read-only``, ``restricted``
    or ``overridden``, judged by the same decisions ``apply`` follows:
    ``{"ok", "problems", "keys"}``."""
    config = settings["config"]
    planned = planned or plan(settings, options, test=True)
    persisted = {key: value for _, key, value in sysctld.parse_conf(journal.read_managed(config) or "")}
    report = {}
    for key, decision in planned["decisions"].items():
        action, live, target = decision["action"], decision["live"], decision["target"]
        entry = {"status": "ok", "wanted": target if target is not None else settings["sysctls"][key], "live": live,
                 "reason": describe(decision)}
        if action in ("absent", "read-only", "restricted", "error"):
            entry["status"] = action if action != "error" else "restricted"
        elif action != "satisfied" and live != target:
            entry.update(status="drift", reason=f"live value {live} differs from {target}")
        elif decision["persist"]:
            entry["persisted"] = persisted.get(key)
            if persisted.get(key) != target:
                entry.update(status="drift", reason=f"{config} has {persisted.get(key)!r}, expected {target}")
        report[key] = entry
    values = {k: d["target"] for k, d in planned["decisions"].items() if d["persist"]}
    overridden, _ = sysctld.overrides(options["sysctl_dirs"], options["sysctl_conf"], config, values)
    for key, (path, line, value) in overridden.items():
        report[key].update(status="overridden", reason=f"{path}:{line} sets {value} and is read later at boot")
    bad = sorted(k for k, v in report.items() if v["status"] in ("drift", "overridden"))
    return {"ok": not bad, "problems": bad, "keys": report}


def explain(settings, options, planned=None):
    """Per key of the recipe and the profile: the recipe's value, the live
    value, what the profile does here and why (a dry run: nothing written)."""
    planned = planned or plan(settings, options, test=True)
    out = {}
    for key in list(RECIPE) + [k for k in settings["sysctls"] if k not in RECIPE]:
        decision = planned["decisions"].get(key)
        if decision is None:
            live = procfs.read_or(options["proc_root"], key)
            out[key] = {"recipe": RECIPE.get(key), "live": live, "profile": None, "action": "not managed",
                        "result": live, "reason": f"profile {settings['profile']} does not set it"}
            continue
        out[key] = {
            "recipe": RECIPE.get(key), "live": decision["live"], "profile": settings["sysctls"].get(key),
            "action": decision["action"],
            "result": decision["target"] if decision["target"] is not None else decision["live"],
            "reason": "; ".join(filter(None, [describe(decision), settings.get("reasons", {}).get(key)])),
            "persisted": decision["persist"],
        }
    return out
