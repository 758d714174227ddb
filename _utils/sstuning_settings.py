"""
Settings: every default once, and the one function that turns minion
options, pillar ``shadowsocks:tuning`` and explicit arguments into validated,
plain settings for both halves of the package (kernel sysctls and open-file
limits).

Nothing here reads Salt's dunders or the kernel: the caller passes the pillar
data, the option getter and the two facts that depend on the box (``nr_open``,
and whether systemd is PID 1). Every problem anywhere in the pillar is
collected, so one message names them all, with their pillar paths, before
anything is written.
"""

import os
import re

from salt.exceptions import SaltInvocationError

import sstuning_daemons as daemons
from sstuning_catalogue import (
    CONGESTION_KEY, DEFAULT_PROFILE, PROFILES, RESERVED_PORTS_KEY, normalise, parse_ports, validate_key,
)

PILLAR = "shadowsocks:tuning"
LIMITS = f"{PILLAR}:limits"

# Minion options `shadowsocks_tuning.<name>`: where the package reads and writes.
OPTIONS = {
    "proc_root": "/proc/sys",
    "state_dir": "/var/lib/shadowsocks_tuning",
    "sysctl_dirs": ["/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d"],
    "sysctl_conf": "/etc/sysctl.conf",
    "modules_load_dir": "/etc/modules-load.d",
    "init_dir": "/etc/init.d",
    "service_cmd": "service",
    "systemctl": "systemctl",
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    "systemd_marker": "/run/systemd/system",
    "systemd_dir": "/etc/systemd/system",
    "unit_dirs": ["/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                  "/usr/lib/systemd/system", "/lib/systemd/system"],
    # shadowsocks-libev's JSON configs: their ports are reserved from outbound use.
    "ss_config_dir": "/etc/shadowsocks-libev",
}

# Pillar `shadowsocks:tuning`: every key and its default. A pillar mapping is
# merged over its default; a list or value replaces it; `null` turns a part
# of `limits` off.
DEFAULTS = {
    "profile": DEFAULT_PROFILE,
    "profiles": {},
    "sysctls": {},
    "config": "/etc/sysctl.d/local.conf",
    "force": [],
    "policy": {"unavailable": "warn", "override": "warn", "keys": {}},
    "congestion_fallback": None,
    "reserved_ports": [],  # more ports to keep out of ip_local_port_range: 8388 or "9000-9010"
    "config_outside_boot": False,  # allow a config that `sysctl --system` does not read at boot
    "nofile": 51200,  # the recipe's `ulimit -n 51200`; unset: that, or the most this box can grant
    "limits": {
        "init_system": "auto",
        "restart": "live",
        "timeout": 30,
        "grace": 2,  # seconds a restarted daemon must stay up: one that dies at once is a failure
        "init_scripts": [],
        "units": [],
        "verify": {"pidfiles": [], "wait": 5},
        # Each kind of daemon of the registry (sstuning_daemons.KINDS), by name:
        # pillar sets its fields, `null` leaves that kind alone.
    },
}
INIT_SCRIPT_FIELDS = ("path", "service", "pidfile")
PROFILE_FIELDS = ("description", "include", "sysctls", "lower", "kernel_default", "reasons")
# The parts of `limits` a run manages, in order: each kind of daemon, then
# the init scripts and units pillar names.
EXTRA_PARTS = ("init_scripts", "units")
POLICIES = ("warn", "strict")
INIT_SYSTEMS = ("auto", "systemd", "sysvinit")
# live: raise running daemons in place, restart only those that cannot be
# raised; running: stop and start running services whose file changed;
# always: also start stopped ones; never: write the files only.
RESTART_WHEN = ("live", "running", "always", "never")
# What the recipe asks for; an unset `nofile` is this, or the most this box can grant.
RECIPE_NOFILE = 51200
# Where an unset box fact comes from, for tests: any process may get fs.nr_open.
DEFAULT_BOX = {"nr_open": 1048576, "systemd": False, "grantable": {"sysvinit": 1048576, "systemd": 1048576},
               "memory": 1 << 34, "congestion": {"available": ["reno", "cubic"], "allowed": ["reno", "cubic"],
                                                 "child": False}}
# profile: auto. Below this much memory a box is a small VPS: low-memory.
AUTO_SMALL_MEMORY = 2 << 30

_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._+:-]{0,254}\Z")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.service\Z")


# Built-in profile values in the kernel's text form, checked once at import:
# every apply resolves them, and they never change.
_BUILTIN_TEXT = {
    (f"profile {name}", key, value): normalise(key, value)
    for name, body in PROFILES.items() for key, value in body["sysctls"].items() if type(value) in (str, int)
}


def options(get):
    """The minion options, each read once through ``get`` (``__opts__.get``)."""
    return {name: get(f"shadowsocks_tuning.{name}", default) for name, default in OPTIONS.items()}


# --------------------------------------------------------------------------
# Validators: return the clean value or raise SaltInvocationError naming `where`
# --------------------------------------------------------------------------
def validate_nofile(value, nr_open, where="nofile"):
    """A positive whole number no higher than ``fs.nr_open``, the kernel's
    ceiling for any process's RLIMIT_NOFILE."""
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and re.fullmatch(r"[ \t]*\+?[0-9]{1,19}[ \t]*", value):
        number = int(value)
    if number is None or number < 1:
        raise SaltInvocationError(
            f"{where}: {value!r} is not a positive integer; give the open-file limit the daemons should get, e.g. 51200"
        )
    if number > nr_open:
        raise SaltInvocationError(
            f"{where}: {number} is above fs.nr_open ({nr_open}), the kernel's ceiling for a process's open-file "
            "limit; lower it, or raise fs.nr_open first"
        )
    return number


def validate_path(path, where):
    if (
        not isinstance(path, str) or not os.path.isabs(path) or any(c in path for c in "\0\n\r")
        or ".." in path.split("/")
    ):
        raise SaltInvocationError(f"{where}: {path!r} must be an absolute path without '..', e.g. /etc/default/supervisor")
    return os.path.normpath(path)


def validate_choice(value, allowed, where):
    if value not in allowed:
        raise SaltInvocationError(f"{where}: {value!r} must be one of {', '.join(allowed)}")
    return value


def validate_service(name, where):
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        raise SaltInvocationError(
            f"{where}: {name!r} is not a service name (letters, digits, '@._+:-', no '/'), e.g. supervisor"
        )
    return name


def validate_unit(unit, where):
    """`supervisor` -> `supervisor.service`; template units keep their `@`."""
    name = unit
    if isinstance(name, str) and not name.endswith(".service") and "." not in name.rsplit("@", 1)[-1]:
        name += ".service"
    if not isinstance(name, str) or not _UNIT_NAME.match(name):
        raise SaltInvocationError(
            f"{where}: {unit!r} is not a systemd service unit such as supervisor.service or "
            "shadowsocks-libev-server@.service"
        )
    return name


def validate_seconds(value, where, low=1, high=600):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SaltInvocationError(f"{where}: {value!r} must be a number of seconds from {low} to {high}")
    return value


def validate_grace(value, where):
    return validate_seconds(value, where, low=0, high=60)


def validate_config(config, where):
    # Only *.conf: the engine rewrites this file 0644, so a path such as
    # /etc/shadow must never be taken (and `sysctl --system` reads only *.conf).
    if (not isinstance(config, str) or not os.path.isabs(config) or "\n" in config or "\0" in config
            or ".." in config.split("/") or not config.endswith(".conf")):
        raise SaltInvocationError(f"{where}: {config!r} must be an absolute file path ending in .conf, without '..'")
    return config


# --------------------------------------------------------------------------
# Pillar data
# --------------------------------------------------------------------------
def plain(data):
    """Deep copy as plain dicts and lists (Salt 3008 masks the repr of pillar
    containers, which would leak into messages)."""
    if isinstance(data, dict):
        return {str(k): plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [plain(v) for v in data]
    return data


def pillar_tuning(pillar):
    """``shadowsocks:tuning`` out of the whole pillar (the mapping's own
    ``get``: the ``pillar.get`` function masks values inside modules on Salt
    3008; item access on Salt 3008's pillar deep-copies all of it first).
    Anything but a mapping is returned as it is, for ``resolve`` to report."""
    try:
        shadowsocks = pillar.get("shadowsocks")
    except (AttributeError, TypeError):
        return {}
    if shadowsocks is None:
        return {}
    if not isinstance(shadowsocks, dict):
        return shadowsocks  # reported by resolve, with the path
    data = shadowsocks.get("tuning")
    return {} if data is None else plain(data)


def _merge(default, override):
    if isinstance(default, dict) and isinstance(override, dict):
        merged = dict(default)
        for key, value in override.items():
            merged[key] = _merge(default.get(key), value) if key in default else value
        return merged
    return override


class _Errors(list):
    """Collects every problem instead of stopping at the first."""

    def call(self, func, *args):
        try:
            return func(*args)
        except SaltInvocationError as exc:
            self.append(str(exc))
            return None

    def unknown(self, data, allowed, where):
        extra = sorted(str(k) for k in set(data) - set(allowed))
        if extra:
            self.append(f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(allowed)}); see pillar.example")


# --------------------------------------------------------------------------
# The resolution
# --------------------------------------------------------------------------
def resolve(tuning, arguments=None, box=None):
    """
    Validated settings from pillar ``shadowsocks:tuning`` (``tuning``, as
    returned by ``pillar_tuning``) and explicit ``arguments`` (``{name:
    value}``; None means "not given"), over ``DEFAULTS``. ``box`` holds the
    facts of this box that settings depend on (``DEFAULT_BOX``'s keys:
    ``nr_open``, whether ``systemd`` is PID 1, and the highest open-file limit
    a restart can give per init system, ``grantable``). Raises
    SaltInvocationError naming every problem with its pillar path (or
    argument); returns plain data.
    """
    box = dict(DEFAULT_BOX, **(box or {}))
    errors = _Errors()
    if not isinstance(tuning, dict):
        raise SaltInvocationError(
            f"pillar {PILLAR} must be a mapping (profile: ..., nofile: ..., limits: ...), got "
            f"{type(tuning).__name__} {tuning!r}; see pillar.example. Nothing was changed"
        )
    errors.unknown(tuning, DEFAULTS, f"pillar {PILLAR}")
    given = {k: v for k, v in (arguments or {}).items() if v is not None}

    def pick(name):
        """(value, where) of a top-level setting: argument, else pillar, else default."""
        if name in given:
            return plain(given[name]), f"argument {name}"
        if name in tuning and tuning[name] is not None:
            return tuning[name], f"pillar {PILLAR}:{name}"
        return DEFAULTS[name], f"pillar {PILLAR}:{name}"

    settings = {"notes": []}
    _resolve_sysctls(settings, pick, errors, box)
    _resolve_limits(settings, pick, errors, box, given.get("nofile", tuning.get("nofile")) is None)
    if errors:
        raise SaltInvocationError("\n".join(errors) + "\nNothing was changed: fix the pillar (or arguments) above")
    return settings


def choose_profile(box):
    """(profile, why) for ``profile: auto``, from what the box has."""
    gib = box["memory"] / (1 << 30)
    cc = box["congestion"]
    if box["memory"] < AUTO_SMALL_MEMORY:
        return "low-memory", (f"auto: {gib:.1f} GiB of memory, under {AUTO_SMALL_MEMORY >> 30} GiB: low-memory keeps "
                              "the kernel buffers busy clients hold small")
    if "bbr" in cc["available"] and (not cc["child"] or "bbr" in cc["allowed"]):
        return "bbr", f"auto: {gib:.1f} GiB of memory, and bbr is available here: bbr"
    return "low-latency", (f"auto: {gib:.1f} GiB of memory, and bbr is not available here (available: "
                           f"{' '.join(cc['available'])}): low-latency")


def _resolve_sysctls(settings, pick, errors, box):
    extra, where = pick("profiles")
    known = errors.call(all_profiles, extra, where) or {name: dict(body) for name, body in PROFILES.items()}
    settings["profiles"] = {
        name: body.get("description") or f"custom profile (include: {body.get('include')})" for name, body in known.items()
    }
    name, where = pick("profile")
    if name == "auto" and "auto" not in known:
        name, why = choose_profile(box)
        settings["notes"].append(why)
    chain, merged, lower, kernel_default = errors.call(resolve_profile, name, known, where) or ([], {}, {}, set())
    reasons = {}
    for profile_name in reversed(chain):  # the profile that sets a key last gives its reason
        body = known[profile_name]
        given = body.get("reasons") or {}
        if not isinstance(given, dict) or not all(isinstance(v, str) and v for v in given.values()):
            errors.append(f"pillar {PILLAR}:profiles:{profile_name}:reasons must be a mapping of sysctl key to why")
            given = {}
        for key in body.get("sysctls") or {}:
            reasons.pop(key, None)
            if key in given:
                reasons[key] = f"{given[key]} (profile {profile_name})"
    settings["profile"] = name if chain else str(name)
    settings["chain"] = chain

    overrides, where_overrides = pick("sysctls")
    if not isinstance(overrides, dict):
        errors.append(f"{where_overrides} must be a mapping of sysctl key to value")
        overrides = {}
    for key, value in overrides.items():
        merged[key] = (value, where_overrides)
        lower.pop(key, None)  # a value named in pillar is the admin's own
        kernel_default.discard(key)
    ports, where_ports = pick("reserved_ports")
    if ports:
        extra = errors.call(parse_ports, ports, where_ports)
        if extra:
            have = merged.get(RESERVED_PORTS_KEY, ([], ""))[0]
            have = errors.call(parse_ports, have or [], f"{where_ports} (with {RESERVED_PORTS_KEY})") or set()
            merged[RESERVED_PORTS_KEY] = (sorted(have | extra), where_ports)
    wanted, sources = {}, {}
    for key, (value, source) in merged.items():
        where = f"{source}: " if source.startswith(("argument", "pillar")) else f"{source} (pillar {PILLAR}:profiles): "
        if value is None:  # `key: null` in pillar drops a key a profile set
            if errors.call(validate_key, key) is None:
                errors[-1] = where + errors[-1]
            continue
        text = _BUILTIN_TEXT.get((source, key, value)) if type(value) in (str, int) else None  # not bool
        if text is None:
            text = errors.call(normalise, key, value, where)  # validates the key too
        if text is not None:
            wanted[key], sources[key] = text, source
    settings["sysctls"], settings["sources"] = wanted, sources
    settings["lower"] = {k: v for k, v in lower.items() if k in wanted}
    settings["kernel_default"] = sorted(k for k in kernel_default if k in wanted)
    settings["reasons"] = {k: v for k, v in reasons.items() if k in wanted}

    config, where = pick("config")
    settings["config"] = errors.call(validate_config, config, where)
    outside, where = pick("config_outside_boot")
    if not isinstance(outside, bool):
        errors.append(f"{where}: {outside!r} must be true or false")
    settings["config_outside_boot"] = outside is True

    force, where = pick("force")
    settings["force"] = []
    settings["force_nofile"] = force is True
    if force is True:
        settings["force"] = list(wanted)
    else:
        force = [force] if isinstance(force, str) else force
        if not isinstance(force, list) or not all(isinstance(k, str) for k in force):
            errors.append(f"{where} must be a list of sysctl keys and/or `nofile` (or true for all)")
        else:
            settings["force"] = [k for k in force if k != "nofile"]
            settings["force_nofile"] = "nofile" in force

    policy, where = pick("policy")
    settings["policy"] = dict(DEFAULTS["policy"])
    if not isinstance(policy, dict):
        errors.append(f"{where} must be a mapping (unavailable, override, keys)")
    else:
        errors.unknown(policy, DEFAULTS["policy"], where)
        per_key = policy.get("keys") or {}
        if not isinstance(per_key, dict):
            errors.append(f"{where}:keys: {per_key!r} must be a mapping of sysctl key to warn or strict")
            per_key = {}
        checks = [(f"{where}:{field}", policy.get(field, "warn")) for field in ("unavailable", "override")]
        checks += [(f"{where}:keys:{k}", v) for k, v in per_key.items()]
        for field, value in checks:
            errors.call(validate_choice, value, POLICIES, field)
        settings["policy"] = {
            "unavailable": policy.get("unavailable", "warn"),
            "override": policy.get("override", "warn"),
            "keys": dict(per_key),
        }

    fallback, where = pick("congestion_fallback")
    settings["congestion_fallback"] = None
    if fallback is not None:
        settings["congestion_fallback"] = errors.call(normalise, CONGESTION_KEY, fallback, f"{where}: ")


def all_profiles(extra, where=f"pillar {PILLAR}:profiles"):
    """The built-in profiles plus those of pillar, checked for shape."""
    profiles = {name: dict(body) for name, body in PROFILES.items()}
    if not extra:
        return profiles
    if not isinstance(extra, dict):
        raise SaltInvocationError(f"{where} must be a mapping of profile name to profile")
    for name, body in extra.items():
        # The name is written into the persisted file (`# profile: NAME`): a
        # newline in it would add a live line there.
        if not isinstance(name, str) or not _PROFILE_NAME.match(name):
            raise SaltInvocationError(f"{where}: profile name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if not isinstance(body, dict):
            raise SaltInvocationError(f"{where}:{name} must be a mapping with 'include' and/or 'sysctls'")
        unknown = set(body) - set(PROFILE_FIELDS)
        if unknown:
            raise SaltInvocationError(
                f"{where}:{name}: unknown field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(PROFILE_FIELDS)})"
            )
        profiles[name] = body
    return profiles


def resolve_profile(name, profiles, where=f"pillar {PILLAR}:profile"):
    """Walk `include` from the root down; returns (chain, {key: (value,
    source)}, {key: why it is lowered on purpose}, {keys that only ask for
    the kernel's default})."""
    chain = []
    current = name
    while current is not None:
        if not isinstance(current, str) or current not in profiles:
            at = where if not chain else f"pillar {PILLAR}:profiles:{chain[-1]}:include"
            raise SaltInvocationError(f"{at}: unknown profile {current!r} (known: {', '.join(sorted(profiles))})")
        if current in chain:
            raise SaltInvocationError(f"pillar {PILLAR}:profiles: include cycle {' -> '.join(chain + [current])}")
        chain.append(current)
        current = profiles[current].get("include")
    merged, lower, kernel_default = {}, {}, set()
    for profile_name in reversed(chain):
        body = profiles[profile_name]
        at = f"pillar {PILLAR}:profiles:{profile_name}"
        sysctls = body.get("sysctls") or {}
        if not isinstance(sysctls, dict):
            raise SaltInvocationError(f"{at}:sysctls must be a mapping of key to value")
        reasons = body.get("lower") or {}
        if not isinstance(reasons, dict) or not all(isinstance(v, str) and v for v in reasons.values()):
            raise SaltInvocationError(f"{at}:lower must be a mapping of sysctl key to the reason it is lowered")
        defaults = body.get("kernel_default") or []
        if not isinstance(defaults, list) or not all(isinstance(k, str) for k in defaults):
            raise SaltInvocationError(f"{at}:kernel_default must be a list of sysctl keys")
        for key, value in sysctls.items():
            # The flags belong to the value: a profile that sets the key again drops them.
            merged[key] = (value, f"profile {profile_name}")
            lower.pop(key, None)
            kernel_default.discard(key)
            if key in reasons:
                lower[key] = f"{reasons[key]} (profile {profile_name})"
            if key in defaults:
                kernel_default.add(key)
    return chain, merged, lower, kernel_default


def _resolve_limits(settings, pick, errors, box, nofile_unset):
    """Open-file limits: N, and per part of `limits` (each kind of daemon of
    the registry, the init scripts, the units) groups of {files, restart}: a
    group's service is stopped and started when one of its files changed
    (restart running/always), or when a daemon of it cannot be raised in
    place (restart live)."""
    raw, where = pick("limits")
    if not isinstance(raw, dict):
        errors.append(f"{where} must be a mapping ({', '.join(DEFAULTS['limits'])}, or a kind of daemon)")
        raw = {}
    limits = _merge(DEFAULTS["limits"], {k: v for k, v in raw.items() if k in DEFAULTS["limits"]})
    init = errors.call(validate_choice, limits["init_system"], INIT_SYSTEMS, f"{where}:init_system")
    use_systemd = init == "systemd" or (init == "auto" and box["systemd"])
    resolved = {
        "init_system": "systemd" if use_systemd else "sysvinit",
        "restart": errors.call(validate_choice, limits["restart"], RESTART_WHEN, f"{where}:restart"),
        "timeout": errors.call(validate_seconds, limits["timeout"], f"{where}:timeout"),
        "grace": errors.call(validate_grace, limits["grace"], f"{where}:grace"),
    }

    value, at = pick("nofile")
    granted = box["grantable"][resolved["init_system"]]
    if nofile_unset and granted < RECIPE_NOFILE:
        value = granted
        settings["notes"].append(
            f"nofile {granted}: the most this box can grant ({resolved['init_system']}); the recipe's "
            f"{RECIPE_NOFILE} would fail here. Set pillar {PILLAR}:nofile to choose another value")
    settings["nofile"] = errors.call(validate_nofile, value, box["nr_open"], at)
    # What was asked before this box's ceiling: a container definition is for another box.
    settings["nofile_asked"] = RECIPE_NOFILE if nofile_unset else settings["nofile"]

    parts, kinds, known = {}, {}, {}
    for name in list(daemons.KINDS) + sorted(k for k in raw if k not in DEFAULTS["limits"] and k not in daemons.KINDS):
        off = name in raw and raw[name] is None  # its limit is left alone; its ports are still reserved
        kind = _resolve_kind(name, {} if off else raw.get(name, {}), f"{where}:{name}", errors)
        if kind is not None:
            known[name] = kind
            if not off:
                kinds[name] = kind
                parts[name] = _kind_groups(kind, use_systemd, f"{where}:{name}")
    parts["init_scripts"] = _init_script_groups(limits.get("init_scripts"), f"{where}:init_scripts", errors)
    extra = _units(limits.get("units"), f"{where}:units", errors)
    parts["units"] = [{"files": [_target("dropin", None, None, unit=unit)], "restart": {"name": unit, "pidfile": None}}
                      for unit in extra] if use_systemd else []
    resolved["kinds"], resolved["parts"] = kinds, parts
    settings["daemons"] = known  # every kind of daemon, managed or not: their ports, diagnose, container

    verify = limits.get("verify")
    if not isinstance(verify, dict):
        errors.append(f"{where}:verify must be a mapping (pidfiles, wait)")
        verify = {}
    errors.unknown(verify, DEFAULTS["limits"]["verify"], f"{where}:verify")
    pidfiles = verify.get("pidfiles") or []
    if not isinstance(pidfiles, list):
        errors.append(f"{where}:verify:pidfiles must be a list of pidfile paths")
        pidfiles = []
    resolved["verify"] = {
        "pidfiles": [p for p in (errors.call(validate_path, p, f"{where}:verify:pidfiles[{i}]")
                                 for i, p in enumerate(pidfiles)) if p],
        "wait": errors.call(validate_seconds, verify.get("wait", DEFAULTS["limits"]["verify"]["wait"]),
                            f"{where}:verify:wait", 0, 600),
    }
    settings["limits"] = resolved


_PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_OPTION = re.compile(r"--?[A-Za-z0-9][A-Za-z0-9-]{0,63}\Z")
CONFIG_FORMATS = ("json", "json5", "jsonc", "yaml")


def _target(kind, path, where, **extra):
    return dict(kind=kind, path=path, where=where, **extra)


def _resolve_kind(name, data, where, errors):
    """One kind of daemon: the registry's entry with pillar's fields over it,
    each checked; a name the registry lacks is a kind of pillar's own and
    needs ``programs``. None when it is unusable (the error is recorded)."""
    builtin = daemons.KINDS.get(name)
    if not isinstance(data, dict):
        errors.append(f"{where} must be a mapping of the fields of a kind of daemon ({', '.join(daemons.FIELDS)}) "
                      "or null")
        return None
    if builtin is None and "programs" not in data:
        errors.append(
            f"{where}: unknown key: not a setting of limits ({', '.join(DEFAULTS['limits'])}) nor a kind of daemon "
            f"this package knows ({', '.join(daemons.KINDS)}); a kind of your own needs `programs: [...]` "
            "(see pillar.example)")
        return None
    data = {daemons.ALIASES.get(k, k): v for k, v in data.items()}
    errors.unknown(data, daemons.FIELDS, where)
    kind = {field: None for field in daemons.FIELDS}
    kind.update(builtin or {})
    kind.update({k: v for k, v in data.items() if k in daemons.FIELDS})
    kind["name"] = name

    def names(field, required=False):
        value = kind[field] or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and _PROGRAM.match(v) for v in value) \
                or (required and not value):
            errors.append(f"{where}:{field}: {kind[field]!r} must be a list of process names such as ss-server")
            return []
        return list(value)

    kind["programs"] = names("programs", required=True)
    kind["plugins"] = names("plugins")
    if kind["service"]:
        kind["service"] = errors.call(validate_service, kind["service"], f"{where}:service")
    for field in ("pidfile", "defaults_file", "minfds"):
        if kind[field]:
            kind[field] = errors.call(validate_path, kind[field], f"{where}:{field}")
    kind["units"] = _units(kind["units"], f"{where}:units", errors)
    how = kind["defaults_limit"] or "ulimit"
    if how != "ulimit" and not (isinstance(how, str) and _FIELD.match(how)):
        errors.append(f"{where}:defaults_limit: {how!r} must be ulimit or a shell variable name such as MAXFD")
    kind["defaults_limit"] = how
    if kind["config_limit"] is not None and not (isinstance(kind["config_limit"], str) and _FIELD.match(kind["config_limit"])):
        errors.append(f"{where}:config_limit: {kind['config_limit']!r} must be a config key such as nofile")
    for field in ("raises_soft", "needs_ports"):
        if not isinstance(kind[field] or False, bool):
            errors.append(f"{where}:{field}: {kind[field]!r} must be true or false")
        kind[field] = kind[field] is True
    options = kind["port_options"] or []
    if not isinstance(options, list) or not all(isinstance(o, str) and _OPTION.match(o) for o in options):
        errors.append(f"{where}:port_options: {kind['port_options']!r} must be a list of command-line options "
                      "such as -p or --server-addr")
        options = []
    kind["port_options"] = list(options)
    if kind["children"] not in (None, "inherit"):
        errors.append(f"{where}:children: {kind['children']!r} must be inherit or null")
    kind["configs"] = _configs(kind["configs"], (builtin or {}).get("configs"), f"{where}:configs", errors)
    if kind["description"] is None:
        kind["description"] = f"{name} (pillar)"
    return kind


def _configs(value, builtin, where, errors):
    """{paths, format, ports} of a kind's configs; a list of paths keeps the
    registry's format and fields."""
    if value is None:
        return None
    if isinstance(value, list) and builtin:
        value = dict(builtin, paths=value)
    if not isinstance(value, dict) or set(value) - {"paths", "format", "ports"}:
        errors.append(f"{where} must be a mapping (paths, format, ports), a list of paths, or null")
        return None
    paths = value.get("paths") or []
    if not isinstance(paths, list):
        errors.append(f"{where}:paths must be a list of absolute paths (globs allowed)")
        paths = []
    paths = [p for p in (errors.call(validate_path, p, f"{where}:paths[{i}]") for i, p in enumerate(paths)) if p]
    fmt = errors.call(validate_choice, value.get("format", "json"), CONFIG_FORMATS, f"{where}:format")
    fields = value.get("ports") or []
    if not isinstance(fields, list) or not all(isinstance(f, str) and f for f in fields):
        errors.append(f"{where}:ports must be a list of field paths such as server_port or servers[].server_port")
        fields = []
    return {"paths": paths, "format": fmt, "ports": fields}


def _units(data, where, errors):
    if not data:
        return []
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list):
        errors.append(f"{where} must be a list of unit names")
        return []
    return [u for u in (errors.call(validate_unit, unit, f"{where}[{i}]") for i, unit in enumerate(data)) if u]


def _kind_groups(kind, use_systemd, where):
    """The files of one kind and what to restart when they change."""
    shell = []
    if kind["defaults_file"]:
        how = kind["defaults_limit"]
        shell.append(_target("ulimit", kind["defaults_file"], f"{where}:defaults_file", placement="end", required=False)
                     if how == "ulimit" else
                     _target("assignment", kind["defaults_file"], f"{where}:defaults_file", key=how, required=False))
    minfds = [_target("minfds", kind["minfds"], f"{where}:minfds", required=False)] if kind["minfds"] else []
    if not use_systemd:
        restart = {"name": kind["service"], "pidfile": kind["pidfile"]} if kind["service"] else None
        return [{"files": shell + minfds, "restart": restart}] if shell or minfds else []
    # Under systemd the defaults file is not read for the limit (its units
    # carry it), supervisord's minfds is: it goes with the kind's first unit.
    for target in shell:
        target["enforced"] = False  # no `ulimit -n` runs from it: a value above the box's ceiling fails nothing
    groups = [{"files": shell, "restart": None}] if shell else []
    for index, unit in enumerate(kind["units"]):
        files = (minfds if index == 0 else []) + [_target("dropin", None, f"{where}:units", unit=unit)]
        groups.append({"files": files, "restart": {"name": unit, "pidfile": None}})
    return groups


def _init_script_groups(scripts, where, errors):
    scripts = scripts or []
    if not isinstance(scripts, list):
        errors.append(f"{where} must be a list of paths or {{path, service, pidfile}} mappings")
        return []
    groups = []
    for index, item in enumerate(scripts):
        at = f"{where}[{index}]"
        item = item if isinstance(item, dict) else {"path": item}
        errors.unknown(item, INIT_SCRIPT_FIELDS, at)
        script = errors.call(validate_path, item.get("path"), f"{at}:path")
        service = item.get("service") or (os.path.basename(script) if script else None)
        service = errors.call(validate_service, service, f"{at}:service") if service else None
        pidfile = errors.call(validate_path, item["pidfile"], f"{at}:pidfile") if item.get("pidfile") else None
        if script:
            groups.append({"files": [_target("ulimit", script, f"{at}:path", placement="init", required=True)],
                           "restart": {"name": service, "pidfile": pidfile} if service else None})
    return groups
