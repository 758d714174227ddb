"""
Kernel and open-file tuning for shadowsocks servers: the engine.

This execution module reads, probes and writes sysctls straight through
``/proc/sys`` (no subprocess per key), resolves the tuning profiles, persists
the result to a sysctl.d file without touching foreign lines, verifies live and
persisted values, and reports the open-file limits of running daemons.

The state module ``shadowsocks_tuning`` and the SLS files under
``salt/shadowsocks`` only call into this module; :data:`CATALOGUE` and
:data:`PROFILES` are the single source of truth for per-key knowledge and for
profiles.

Minion options (all optional; the defaults are the real system):

.. code-block:: yaml

    shadowsocks_tuning.proc_root: /proc/sys            # another root, for kernels this one cannot show
    shadowsocks_tuning.state_dir: /var/lib/shadowsocks_tuning   # originals kept for `clean`
    shadowsocks_tuning.sysctl_dirs: [/etc/sysctl.d, /run/sysctl.d, /usr/local/lib/sysctl.d, /usr/lib/sysctl.d, /lib/sysctl.d]
    shadowsocks_tuning.sysctl_conf: /etc/sysctl.conf
    shadowsocks_tuning.modules_load_dir: /etc/modules-load.d
"""

import base64
import contextlib
import difflib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile

from salt.exceptions import CommandExecutionError, SaltInvocationError

log = logging.getLogger(__name__)

__virtualname__ = "shadowsocks_tuning"
__func_alias__ = {"set_": "set"}


def __virtual__():
    if not sys.platform.startswith("linux"):
        return (
            False,
            f"shadowsocks_tuning: needs a Linux kernel (/proc/sys); this is {sys.platform}",
        )
    return __virtualname__


# --------------------------------------------------------------------------
# The catalogue: everything this package knows about a key.
#
#   type      int | triple | range | word
#   scope     netns (per network namespace) | global (host only; a container
#             sees it absent or read-only)
#   min, max  bounds of each integer field
#   capacity  never lowered unless forced; for a triple only its max field
#   removed   kernel (major, minor) that removed the key
#   refuse    {value: why} values refused outright
#   module    word value -> kernel module prefix that provides it
#   doc       what it does, shown by `catalogue` and in the README
# --------------------------------------------------------------------------
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1


def _key(type_, scope, doc, lo=0, hi=INT_MAX, **extra):
    spec = {"type": type_, "scope": scope, "min": lo, "max": hi, "doc": doc}
    spec.update(extra)
    return spec


CATALOGUE = {
    "fs.file-max": _key("int", "global", "system-wide maximum of open files", 1, LONG_MAX, capacity=True),
    "fs.nr_open": _key("int", "global", "per-process ceiling for RLIMIT_NOFILE", 1024, INT_MAX, capacity=True),
    "net.core.rmem_max": _key("int", "global", "maximum socket receive buffer (bytes)", 4096, INT_MAX, capacity=True),
    "net.core.wmem_max": _key("int", "global", "maximum socket send buffer (bytes)", 4096, INT_MAX, capacity=True),
    "net.core.rmem_default": _key("int", "global", "default socket receive buffer (bytes)", 4096, INT_MAX),
    "net.core.wmem_default": _key("int", "global", "default socket send buffer (bytes)", 4096, INT_MAX),
    "net.core.netdev_max_backlog": _key("int", "global", "maximum processor input queue", 1, INT_MAX, capacity=True),
    "net.core.somaxconn": _key("int", "netns", "maximum listen() backlog", 1, INT_MAX, capacity=True),
    "net.core.default_qdisc": _key("word", "global", "queueing discipline of new interfaces", module="sch_"),
    "net.ipv4.tcp_syncookies": _key("int", "netns", "SYN cookies against SYN floods", 0, 2),
    "net.ipv4.tcp_tw_reuse": _key("int", "netns", "reuse TIME-WAIT sockets for new outbound connections", 0, 2),
    "net.ipv4.tcp_tw_recycle": _key(
        "int", "netns", "fast TIME-WAIT recycling (removed in Linux 4.12)", 0, 1,
        removed=(4, 12),
        refuse={"1": "it drops connections from clients behind NAT; the key was removed in Linux 4.12"},
    ),
    "net.ipv4.tcp_fin_timeout": _key("int", "netns", "seconds an orphaned connection stays in FIN-WAIT-2", 1, INT_MAX),
    "net.ipv4.tcp_keepalive_time": _key("int", "netns", "seconds before the first keepalive probe", 1, 32767),
    "net.ipv4.ip_local_port_range": _key("range", "netns", "ports used for outbound connections", 1, 65535),
    "net.ipv4.tcp_max_syn_backlog": _key("int", "netns", "queue of half-open connections", 1, INT_MAX, capacity=True),
    "net.ipv4.tcp_max_tw_buckets": _key("int", "netns", "maximum TIME-WAIT sockets", 0, INT_MAX),
    "net.ipv4.tcp_fastopen": _key("int", "netns", "TCP Fast Open (1 client, 2 server, 3 both)", 0, 0xFFFF),
    "net.ipv4.tcp_rmem": _key("triple", "netns", "TCP receive buffer: min default max (bytes)", 1, INT_MAX, capacity=True),
    "net.ipv4.tcp_wmem": _key("triple", "netns", "TCP send buffer: min default max (bytes)", 1, INT_MAX, capacity=True),
    "net.ipv4.tcp_mtu_probing": _key("int", "netns", "packetization-layer path MTU discovery", 0, 2),
    "net.ipv4.tcp_congestion_control": _key("word", "netns", "congestion control of new connections", module="tcp_"),
}

CONGESTION_KEY = "net.ipv4.tcp_congestion_control"

# --------------------------------------------------------------------------
# Profiles: data with `include`. Pillar may add profiles of its own
# (shadowsocks:tuning:profiles) in the same shape.
# --------------------------------------------------------------------------
RECIPE = {
    "fs.file-max": 51200,
    "net.core.rmem_max": 67108864,
    "net.core.wmem_max": 67108864,
    "net.core.rmem_default": 65536,
    "net.core.wmem_default": 65536,
    "net.core.netdev_max_backlog": 4096,
    "net.core.somaxconn": 4096,
    "net.ipv4.tcp_syncookies": 1,
    "net.ipv4.tcp_tw_reuse": 1,
    "net.ipv4.tcp_tw_recycle": 0,
    "net.ipv4.tcp_fin_timeout": 30,
    "net.ipv4.tcp_keepalive_time": 1200,
    "net.ipv4.ip_local_port_range": "10000 65000",
    "net.ipv4.tcp_max_syn_backlog": 4096,
    "net.ipv4.tcp_max_tw_buckets": 5000,
    "net.ipv4.tcp_fastopen": 3,
    "net.ipv4.tcp_rmem": "4096 87380 67108864",
    "net.ipv4.tcp_wmem": "4096 65536 67108864",
    "net.ipv4.tcp_mtu_probing": 1,
    "net.ipv4.tcp_congestion_control": "hybla",
}

PROFILES = {
    "high-latency": {
        "description": "the Optimizing Shadowsocks recipe as written, with hybla for long, lossy paths",
        "sysctls": RECIPE,
    },
    "low-latency": {
        "description": "the recipe with cubic, the kernel default, for short paths",
        "include": "high-latency",
        "sysctls": {CONGESTION_KEY: "cubic"},
    },
    "low-memory": {
        "description": "low-latency with 4 MiB buffer ceilings instead of 64 MiB, for small VPSes",
        "include": "low-latency",
        "sysctls": {
            # 4 MiB per socket still fills a 100 Mbit/s path at 300 ms RTT
            # while a thousand busy sockets stay under 4 GiB of kernel memory.
            "net.core.rmem_max": 4194304,
            "net.core.wmem_max": 4194304,
            # The kernel's own defaults for the min and default fields.
            "net.ipv4.tcp_rmem": "4096 87380 4194304",
            "net.ipv4.tcp_wmem": "4096 16384 4194304",
            # Half the recipe's queues: fewer pending sockets held in RAM.
            "net.core.netdev_max_backlog": 2048,
            "net.ipv4.tcp_max_syn_backlog": 2048,
        },
    },
    "bbr": {
        "description": "low-latency with BBR and the fq qdisc it is paced with (Linux >= 4.9)",
        "include": "low-latency",
        "sysctls": {"net.core.default_qdisc": "fq", CONGESTION_KEY: "bbr"},
    },
}
DEFAULT_PROFILE = "low-latency"

DEFAULTS = {
    "proc_root": "/proc/sys",
    "state_dir": "/var/lib/shadowsocks_tuning",
    "sysctl_dirs": ["/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d"],
    "sysctl_conf": "/etc/sysctl.conf",
    "modules_load_dir": "/etc/modules-load.d",
    "config": "/etc/sysctl.d/local.conf",
}
POLICIES = ("warn", "strict")
PILLAR = "shadowsocks:tuning"
MANAGED_HEADER = "# Managed by Salt (shadowsocks_tuning); other lines are left as they are."
MODULES_LOAD_NAME = "shadowsocks-tuning.conf"

# Dot-separated segments; the kernel's own names (interfaces under conf/,
# neigh/) may hold capitals, '@', ':' and '+'. No '/', no '..', no blanks.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@:+-]*$")
_TOP_LEVEL = ("abi", "crypto", "debug", "dev", "fs", "kernel", "net", "sunrpc", "user", "vm")
_WORD = re.compile(r"^[a-z0-9_]{1,32}$")
_INT = re.compile(r"^[+]?[0-9]{1,20}$")


# --------------------------------------------------------------------------
# Options and small helpers
# --------------------------------------------------------------------------
def _opt(name):
    return __opts__.get(f"shadowsocks_tuning.{name}", DEFAULTS[name])


def _plain(data):
    """Deep copy of pillar data as plain dicts and lists (Salt 3008 masks the
    repr of pillar containers, which would leak into comments)."""
    if isinstance(data, dict):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_plain(v) for v in data]
    return data


def _pillar_tuning():
    """shadowsocks:tuning from pillar, by item access (pillar.get masks values
    inside modules on Salt 3008)."""
    pillar = globals().get("__pillar__") or {}
    try:
        data = pillar["shadowsocks"]["tuning"]
    except (KeyError, TypeError):
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SaltInvocationError(f"pillar {PILLAR} must be a mapping, got {type(data).__name__}")
    return _plain(data)


def _kernel_version():
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def validate_key(key):
    """
    Check that ``key`` is a well-formed sysctl name and return it.

    Dot-separated segments of letters, digits, ``_``, ``-`` (plus ``@ : +``
    found in kernel interface names) under a known top-level directory; never
    ``/``, ``..``, blanks or control characters, so a key can never name a path
    outside ``/proc/sys``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.validate_key net.core.somaxconn
    """
    if not isinstance(key, str) or not key:
        raise SaltInvocationError(f"sysctl key {key!r}: must be a non-empty string such as net.core.somaxconn")
    if len(key) > 255:
        raise SaltInvocationError(f"sysctl key {key[:40]!r}...: longer than 255 characters")
    segments = key.split(".")
    if not all(_SEGMENT.match(seg) for seg in segments) or len(segments) < 2:
        raise SaltInvocationError(
            f"sysctl key {key!r}: malformed; use dot-separated names of letters, digits, '_' and '-' "
            "(e.g. net.ipv4.tcp_fastopen), without '/', '..' or spaces"
        )
    if segments[0] not in _TOP_LEVEL:
        raise SaltInvocationError(
            f"sysctl key {key!r}: unknown top-level '{segments[0]}' (expected one of {', '.join(_TOP_LEVEL)})"
        )
    return key


def _path(key):
    return os.path.join(_opt("proc_root"), *validate_key(key).split("."))


def _normalise_live(text):
    return " ".join(text.split())


def _read(key):
    with open(_path(key), encoding="ascii", errors="replace") as handle:
        return _normalise_live(handle.read())


def _ints(key, value, count, spec, where):
    if isinstance(value, bool):
        raise SaltInvocationError(f"{where}{key}: {value!r} is a boolean; expected {spec['type']}")
    if isinstance(value, int):
        fields = [str(value)]
    elif isinstance(value, (list, tuple)):
        fields = [str(v) if not isinstance(v, bool) else "x" for v in value]
    elif isinstance(value, str):
        fields = value.split()
    else:
        raise SaltInvocationError(f"{where}{key}: {value!r} is not a number")
    shape = {1: "an integer", 2: "two integers 'low high'", 3: "three integers 'min default max'"}[count]
    if len(fields) != count or not all(_INT.match(f) for f in fields):
        raise SaltInvocationError(f"{where}{key}: {value!r} is not {shape}")
    numbers = [int(f) for f in fields]
    for number in numbers:
        if not spec["min"] <= number <= spec["max"]:
            raise SaltInvocationError(
                f"{where}{key}: {number} is out of range ({spec['min']}..{spec['max']})"
            )
    if numbers != sorted(numbers):
        names = "low <= high" if count == 2 else "min <= default <= max"
        raise SaltInvocationError(f"{where}{key}: {value!r} breaks the rule {names}")
    return numbers


def normalise(key, value, where=""):
    """
    Validate ``value`` for ``key`` against the catalogue and return it in the
    kernel's canonical text form (``4096 87380 67108864``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.normalise net.ipv4.tcp_rmem '[4096, 87380, 67108864]'
    """
    validate_key(key)
    spec = CATALOGUE.get(key)
    if spec is None:
        return _normalise_foreign(key, value, where)
    kind = spec["type"]
    if isinstance(value, str) and any(ord(c) < 32 and c != "\t" for c in value):
        # A newline could add a line of its own to a sysctl.d file.
        raise SaltInvocationError(f"{where}{key}: {value!r} contains a newline or control character")
    if kind == "word":
        if not isinstance(value, str) or not _WORD.match(value.strip()):
            raise SaltInvocationError(f"{where}{key}: {value!r} is not a name like 'cubic' (a-z, 0-9, _)")
        text = value.strip()
    else:
        count = {"int": 1, "range": 2, "triple": 3}[kind]
        text = " ".join(str(n) for n in _ints(key, value, count, spec, where))
    refused = spec.get("refuse", {}).get(text)
    if refused:
        raise SaltInvocationError(f"{where}{key}: refusing {text}: {refused}")
    return text


def _normalise_foreign(key, value, where):
    """Keys outside the catalogue: any value the kernel could take as text,
    without anything that could add a line to a sysctl.d file."""
    if isinstance(value, bool) or value is None:
        raise SaltInvocationError(f"{where}{key}: {value!r} is not a sysctl value")
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    text = _normalise_live(str(value))
    if not text or len(text) > 1024 or not all(32 < ord(c) < 127 or c == " " for c in text) or "=" in text or "#" in text:
        raise SaltInvocationError(
            f"{where}{key}: {value!r} is not a plain printable value (no newlines, '=', '#' or control characters)"
        )
    return text


# --------------------------------------------------------------------------
# Reading and writing live values
# --------------------------------------------------------------------------
def _keys_arg(keys):
    if keys is None:
        return list(CATALOGUE)
    if isinstance(keys, str):
        keys = [k.strip() for k in keys.split(",") if k.strip()]
    if isinstance(keys, dict):
        return list(keys)
    return list(keys)


def get(*keys):
    """
    Return the live value of a sysctl, normalised (``4096\\t87380`` becomes
    ``4096 87380``). Several keys, or a list, give a ``{key: value}`` dict;
    a key the kernel lacks maps to ``None`` there.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.get net.core.somaxconn
        salt-call shadowsocks_tuning.get net.core.somaxconn net.ipv4.tcp_rmem
        salt-call shadowsocks_tuning.get '[net.core.somaxconn, net.ipv4.tcp_rmem]'
    """
    if not keys:
        raise SaltInvocationError("get: name at least one sysctl key, e.g. net.core.somaxconn")
    if len(keys) == 1 and isinstance(keys[0], str) and "," not in keys[0]:
        key = keys[0]
        try:
            return _read(key)
        except FileNotFoundError:
            raise CommandExecutionError(f"{key}: not present on this kernel ({_path(key)} does not exist)")
        except OSError as exc:
            raise CommandExecutionError(f"{key}: cannot read: {exc.strerror}")
    wanted = []
    for key in keys:
        wanted.extend(_keys_arg(key))
    result = {}
    for key in wanted:
        try:
            result[key] = _read(key)
        except OSError:
            result[key] = None
    return result


def _write(key, text):
    """Write one value and read it back. Raises OSError from the kernel."""
    path = _path(key)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # O_TRUNC: harmless on procfs, needed for a proc_root tree of plain files
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)
    stored = _read(key)
    if stored != text:
        raise OSError(errno.EINVAL, f"the kernel stored '{stored}' instead")
    return stored


def _write_error(key, text, exc):
    reason = exc.strerror or str(exc)
    if key == CONGESTION_KEY and exc.errno == errno.ENOENT:
        reason = f"'{text}' is not an available congestion control ({_available_cc_text()})"
    elif exc.errno == errno.EPERM and key == CONGESTION_KEY:
        reason = f"'{text}' is not allowed in this network namespace (allowed: {_read_or(_ALLOWED_CC, '?')})"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"{reason}: the key is read-only here"
    return f"{key}: cannot set '{text}': {reason}"


def set_(key, value, force=False):
    """
    Write a sysctl through /proc/sys, read it back and return
    ``{"old": ..., "new": ...}``. A capacity key (see ``catalogue``) is never
    lowered unless ``force=True``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set net.core.somaxconn 8192
        salt-call shadowsocks_tuning.set net.ipv4.tcp_rmem '4096 87380 67108864'
    """
    text = normalise(key, value)
    try:
        old = _read(key)
    except FileNotFoundError:
        if _absent_is_satisfied(key, text):
            return {"old": None, "new": None, "comment": _probe_one(key)["reason"]}
        raise CommandExecutionError(f"{key}: cannot set '{text}': {_probe_one(key)['reason']}")
    if key == CONGESTION_KEY and text != old:
        cc = _congestion(text, None, False, _in_child_netns())
        if cc["value"] is None:
            raise CommandExecutionError(cc["error"] or cc["problem"])
    target, kept = _effective(key, text, old, bool(force))
    if kept:
        raise SaltInvocationError(f"{key}: refusing to lower {old} to {text}: it is a capacity limit; pass force=True")
    if old == target:
        return {"old": old, "new": old}
    try:
        new = _write(key, target)
    except OSError as exc:
        raise CommandExecutionError(_write_error(key, target, exc))
    return {"old": old, "new": new}


# --------------------------------------------------------------------------
# Probe: what can be done with each key here, and why not
# --------------------------------------------------------------------------
_AVAILABLE_CC = "net.ipv4.tcp_available_congestion_control"
_ALLOWED_CC = "net.ipv4.tcp_allowed_congestion_control"


def _read_or(key, default=None):
    try:
        return _read(key)
    except OSError:
        return default


def _available_cc_text():
    return "available: " + (_read_or(_AVAILABLE_CC) or "none listed")


def _in_child_netns():
    # netdev_max_backlog lives in the kernel's init-namespace-only table,
    # somaxconn in the per-namespace one: one without the other means a
    # child network namespace (a container).
    root = _opt("proc_root")
    return os.path.exists(os.path.join(root, "net/core/somaxconn")) and not os.path.exists(
        os.path.join(root, "net/core/netdev_max_backlog")
    )


def _absent_is_satisfied(key, text):
    spec = CATALOGUE.get(key, {})
    return "removed" in spec and text == "0"


def _probe_one(key, wanted=None, child=None):
    path = _path(key)
    spec = CATALOGUE.get(key, {})
    if child is None:
        child = _in_child_netns()
    if not os.path.exists(path):
        if "removed" in spec and _kernel_version() >= spec["removed"]:
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
        available = (_read_or(_AVAILABLE_CC) or "").split()
        allowed = (_read_or(_ALLOWED_CC) or "").split()
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
    return {"status": "writable", "reason": "writable"}


def probe(keys=None):
    """
    Classify each key as ``writable``, ``absent`` (the kernel lacks it: removed,
    or its module is not loaded), ``read-only`` (a global key inside a child
    network namespace, or a read-only /proc/sys) or ``restricted`` (a
    congestion control that is not available or not allowed here), each with
    a reason a person can act on. ``keys`` is a list, or a ``{key: wanted
    value}`` mapping so that values are checked too; every catalogue key when
    omitted.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.probe
        salt-call shadowsocks_tuning.probe '[net.core.rmem_max, net.ipv4.tcp_fastopen]'
        salt-call shadowsocks_tuning.probe '{net.ipv4.tcp_congestion_control: hybla}'
    """
    wanted = keys if isinstance(keys, dict) else {}
    names = _keys_arg(keys)
    for key in names:
        validate_key(key)
    child = _in_child_netns()
    return {key: _probe_one(key, wanted.get(key), child) for key in names}


def catalogue():
    """
    Return the per-key knowledge this package works from: value type,
    namespace scope, bounds, capacity keys, removed keys and modules.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.catalogue
    """
    out = {}
    for key, spec in CATALOGUE.items():
        entry = dict(spec)
        if "removed" in entry:
            entry["removed"] = "%d.%d" % entry["removed"]
        out[key] = entry
    return out


# --------------------------------------------------------------------------
# Profiles and settings
# --------------------------------------------------------------------------
def _all_profiles(extra):
    profiles = {name: dict(body) for name, body in PROFILES.items()}
    if extra is None:
        return profiles
    if not isinstance(extra, dict):
        raise SaltInvocationError(f"pillar {PILLAR}:profiles must be a mapping of profile name to profile")
    for name, body in extra.items():
        if not isinstance(body, dict):
            raise SaltInvocationError(f"pillar {PILLAR}:profiles:{name} must be a mapping with 'include' and/or 'sysctls'")
        unknown = set(body) - {"include", "sysctls", "description"}
        if unknown:
            raise SaltInvocationError(
                f"pillar {PILLAR}:profiles:{name}: unknown field(s) {', '.join(sorted(unknown))} (allowed: include, sysctls, description)"
            )
        profiles[name] = body
    return profiles


def _resolve_profile(name, profiles):
    """Walk `include` from the root down; returns (chain, {key: (value, source)})."""
    chain = []
    current = name
    while current is not None:
        if not isinstance(current, str) or current not in profiles:
            where = f"pillar {PILLAR}:profile" if not chain else f"pillar {PILLAR}:profiles:{chain[-1]}:include"
            raise SaltInvocationError(
                f"{where}: unknown profile {current!r} (known: {', '.join(sorted(profiles))})"
            )
        if current in chain:
            raise SaltInvocationError(
                f"pillar {PILLAR}:profiles: include cycle {' -> '.join(chain + [current])}"
            )
        chain.append(current)
        current = profiles[current].get("include")
    merged = {}
    for profile_name in reversed(chain):
        sysctls = profiles[profile_name].get("sysctls") or {}
        if not isinstance(sysctls, dict):
            raise SaltInvocationError(f"pillar {PILLAR}:profiles:{profile_name}:sysctls must be a mapping of key to value")
        for key, value in sysctls.items():
            merged[key] = (value, f"profile {profile_name}")
    return chain, merged


def _settings(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, pillar=None):
    """One resolver for every entry point: explicit arguments win over pillar
    shadowsocks:tuning, which wins over the defaults. Validates everything
    before anything is read from the kernel."""
    data = _pillar_tuning() if pillar is None else _plain(pillar)
    profiles = _all_profiles(data.get("profiles"))
    profile = profile or data.get("profile") or DEFAULT_PROFILE
    chain, merged = _resolve_profile(profile, profiles)

    where_overrides = "argument sysctls" if sysctls is not None else f"pillar {PILLAR}:sysctls"
    overrides = sysctls if sysctls is not None else data.get("sysctls") or {}
    overrides = _plain(overrides)
    if not isinstance(overrides, dict):
        raise SaltInvocationError(f"{where_overrides} must be a mapping of sysctl key to value")
    for key, value in overrides.items():
        merged[key] = (value, where_overrides)

    wanted = {}
    for key, (value, source) in merged.items():
        where = f"{source}: " if source.startswith(("argument", "pillar")) else f"{source} (pillar {PILLAR}:profiles): "
        try:
            validate_key(key)
        except SaltInvocationError as exc:
            raise SaltInvocationError(f"{where}{exc}")
        if value is None:  # `key: null` in pillar drops a key a profile set
            continue
        wanted[key] = normalise(key, value, where)

    config = config or data.get("config") or DEFAULTS["config"]
    if not isinstance(config, str) or not os.path.isabs(config) or "\n" in config or "\0" in config or ".." in config.split("/"):
        raise SaltInvocationError(f"pillar {PILLAR}:config: {config!r} must be an absolute file path without '..'")

    force = force if force is not None else data.get("force", [])
    if force is True:
        force = list(wanted)
    if isinstance(force, str):
        force = [force]
    if not isinstance(force, (list, tuple)) or not all(isinstance(k, str) for k in force):
        raise SaltInvocationError(f"pillar {PILLAR}:force must be a list of sysctl keys (or true for all)")

    policy = _plain(policy if policy is not None else data.get("policy", {})) or {}
    if not isinstance(policy, dict):
        raise SaltInvocationError(f"pillar {PILLAR}:policy must be a mapping (unavailable, override, keys)")
    unknown = set(policy) - {"unavailable", "override", "keys"}
    if unknown:
        raise SaltInvocationError(f"pillar {PILLAR}:policy: unknown field(s) {', '.join(sorted(unknown))} (allowed: unavailable, override, keys)")
    per_key = policy.get("keys") or {}
    checks = [("unavailable", policy.get("unavailable", "warn")), ("override", policy.get("override", "warn"))]
    checks += [(f"keys:{k}", v) for k, v in per_key.items()] if isinstance(per_key, dict) else [("keys", per_key)]
    for field, value in checks:
        if value not in POLICIES:
            raise SaltInvocationError(f"pillar {PILLAR}:policy:{field}: {value!r} must be one of {', '.join(POLICIES)}")

    fallback = congestion_fallback if congestion_fallback is not None else data.get("congestion_fallback")
    if fallback is not None:
        fallback = normalise(CONGESTION_KEY, fallback, f"pillar {PILLAR}:congestion_fallback: ")

    return {
        "profile": profile,
        "chain": chain,
        "sysctls": wanted,
        "sources": {k: merged[k][1] for k in wanted},
        "config": config,
        "force": list(force),
        "policy": {
            "unavailable": policy.get("unavailable", "warn"),
            "override": policy.get("override", "warn"),
            "keys": dict(per_key),
        },
        "congestion_fallback": fallback,
    }


def profile(name=None, sysctls=None):
    """
    Show the settings a profile resolves to after ``include`` and pillar
    overrides (``shadowsocks:tuning``): each key's value and where it came from.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.profile
        salt-call shadowsocks_tuning.profile bbr
    """
    settings = _settings(profile=name, sysctls=sysctls)
    return {
        "profile": settings["profile"],
        "include_chain": settings["chain"],
        "sysctls": settings["sysctls"],
        "sources": settings["sources"],
        "config": settings["config"],
    }


def profiles():
    """
    List the known profiles (built in and from pillar) with their descriptions.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.profiles
    """
    known = _all_profiles(_pillar_tuning().get("profiles"))
    return {name: body.get("description", f"custom profile (include: {body.get('include')})") for name, body in known.items()}


# --------------------------------------------------------------------------
# Capacity keys and congestion control
# --------------------------------------------------------------------------
def _effective(key, wanted, live, force):
    """The value to aim for: `wanted`, except that a capacity limit already
    above it is kept. Returns (target, kept_note or None)."""
    spec = CATALOGUE.get(key, {})
    if not spec.get("capacity") or force or live is None:
        return wanted, None
    try:
        want = [int(x) for x in wanted.split()]
        have = [int(x) for x in live.split()]
    except ValueError:
        return wanted, None
    if spec["type"] == "triple" and len(have) == 3:
        if have[2] > want[2]:
            target = f"{want[0]} {want[1]} {have[2]}"
            return target, f"{key}: kept max {have[2]} (higher than {want[2]})"
        return wanted, None
    if len(have) == 1 and have[0] > want[0]:
        return live, f"{key}: kept {live} (higher than {wanted})"
    return wanted, None


def _modprobe(module, dry_run):
    """Load a kernel module; returns (ok, message). No shell, fixed argv."""
    if not re.match(r"^[a-z0-9_]{1,64}$", module):
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


def _congestion(wanted, fallback, test, child):
    """Make sure a congestion control can be set. Returns a dict with the
    value to set (or None), whether a module is (to be) loaded, notes, and an
    error when it cannot be made available and there is no usable fallback."""
    out = {"value": wanted, "module": None, "notes": [], "error": None, "status": "writable"}
    available = (_read_or(_AVAILABLE_CC) or "").split()
    allowed = (_read_or(_ALLOWED_CC) or "").split()

    def usable(name):
        return name in available and (not child or name in allowed)

    if wanted not in available:
        module = f"tcp_{wanted}"
        ok, message = _modprobe(module, dry_run=test)
        out["notes"].append(message)
        if ok:
            out["module"] = module
            if not test:
                available = (_read_or(_AVAILABLE_CC) or "").split()
            else:
                available = available + [wanted]
    if wanted in available and usable(wanted):
        return out
    if wanted in available:
        problem = (
            f"'{wanted}' is available but not allowed inside this network namespace "
            f"(allowed: {' '.join(allowed)}); set it on the host"
        )
        out["status"] = "restricted"
    else:
        problem = (
            f"'{wanted}' is not available (available: {' '.join(available)}); "
            f"{out['notes'][-1] if out['notes'] else ''}"
        ).rstrip("; ")
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
# The persisted sysctl.d file
# --------------------------------------------------------------------------
_ASSIGNMENT = re.compile(r"^\s*-?\s*([^\s=#;]+)\s*=\s*(.*?)\s*$")


def _conf_key(raw):
    # sysctl.d(5): when the first separator is '/', '/' separates and '.' is literal.
    if "/" in raw and (raw.find("/") < raw.find(".") or "." not in raw):
        return raw.strip("/").replace(".", "\0").replace("/", ".").replace("\0", "/")
    return raw


def _parse_conf(text):
    """[(line_index, key, value)] for every assignment in a sysctl.d file."""
    found = []
    for index, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = _ASSIGNMENT.match(line)
        if match:
            found.append((index, _conf_key(match.group(1)), _normalise_live(match.group(2))))
    return found


def _read_text(path):
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return None


def _render_conf(old, values, dropped, profile_name):
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


def _atomic_write(path, text, mode=None):
    """Temporary file in the same directory, fsync, rename, fsync the
    directory: the old file or the new one, never half of either. ``mode``
    None keeps the mode and owner of the file replaced (0644 for a new one),
    so that an init script stays executable."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous = os.stat(path)
    if mode is None:
        mode = previous.st_mode & 0o7777 if previous else 0o644
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.sst-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
            handle.flush()
            os.fsync(handle.fileno())
        if previous is not None and (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(tmp, previous.st_uid, previous.st_gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_stray_temporaries(path):
    """Temporary files left by a run that died between write and rename."""
    directory = os.path.dirname(path) or "."
    prefix = f".{os.path.basename(path)}.sst-"
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(prefix):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, entry))


def _boot_order(config=None):
    """Files `sysctl --system` reads, in order: *.conf from the sysctl.d
    directories merged by name (the first directory wins a clash), sorted by
    name, then /etc/sysctl.conf. `config` counts as present even before it
    is first written."""
    by_name = {}
    for directory in _opt("sysctl_dirs"):
        entries = []
        with contextlib.suppress(OSError):
            entries = os.listdir(directory)
        if config and os.path.dirname(config) == directory.rstrip("/"):
            entries.append(os.path.basename(config))
        for entry in entries:
            if entry.endswith(".conf") and entry not in by_name:
                by_name[entry] = os.path.join(directory, entry)
    order = [by_name[name] for name in sorted(by_name)]
    conf = _opt("sysctl_conf")
    if os.path.exists(conf):
        order.append(conf)
    return order


def _overrides(config, values):
    """{key: (file, line_no, value)} for files read after `config` at boot
    that set a managed key to another value (the last one wins)."""
    order = _boot_order(config)
    real = os.path.realpath(config)
    paths = [os.path.realpath(p) for p in order]
    if real not in paths:
        return {}, f"{config} is not read by `sysctl --system` at boot (not in {', '.join(_opt('sysctl_dirs'))})"
    later = order[paths.index(real) + 1:]
    winners = {}
    for path in later:
        text = _read_text(path) or ""
        for index, key, value in _parse_conf(text):
            if key in values:
                winners[key] = (path, index + 1, value)
    return {k: w for k, w in winners.items() if w[2] != values[k]}, None


# --------------------------------------------------------------------------
# Originals, so that `clean` can put back what it found
# --------------------------------------------------------------------------
def _originals_path():
    return os.path.join(_opt("state_dir"), "originals.json")


def _load_originals():
    text = _read_text(_originals_path())
    if not text:
        return {"sysctls": {}, "files": {}}
    try:
        return json.loads(text)
    except ValueError:
        raise CommandExecutionError(f"{_originals_path()} is corrupt; move it away and run again")


def _remember(originals, sysctls=None, files=None):
    changed = False
    for key, value in (sysctls or {}).items():
        if key not in originals["sysctls"]:
            originals["sysctls"][key] = value
            changed = True
    for path in files or ():
        if path not in originals["files"]:
            raw = None
            with contextlib.suppress(FileNotFoundError):
                with open(path, "rb") as handle:
                    raw = base64.b64encode(handle.read()).decode()
            originals["files"][path] = raw
            changed = True
    if changed:
        os.makedirs(_opt("state_dir"), mode=0o700, exist_ok=True)
        _atomic_write(_originals_path(), json.dumps(originals, indent=1, sort_keys=True), mode=0o600)


@contextlib.contextmanager
def _lock():
    """One apply at a time per box: concurrent runs queue, never interleave."""
    os.makedirs(_opt("state_dir"), mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(_opt("state_dir"), "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Plan and apply
# --------------------------------------------------------------------------
def _policy_for(settings, key):
    return settings["policy"]["keys"].get(key, settings["policy"]["unavailable"])


def _plan(settings, test):
    """Compare wanted and live values; decide, per key, what to write, what is
    kept higher, what is skipped and why. Reads only (modprobe aside, which
    is only dry-run under test)."""
    wanted = settings["sysctls"]
    force = set(settings["force"])
    child = _in_child_netns()
    plan = {
        "writes": {},      # key -> (old, new)
        "values": {},      # key -> value to persist
        "dropped": {},     # key -> why its line is commented out
        "kept": [], "skipped": [], "satisfied": [], "notes": [], "errors": [],
        "module": None, "live": {},
    }
    for key, text in wanted.items():
        status = _probe_one(key, None, child)
        if status["status"] == "absent" and key not in CATALOGUE:
            plan["errors"].append(
                f"{key}: unknown key: not in this package's catalogue and not on this kernel "
                f"({settings['sources'][key]}); check the spelling (`salt-call shadowsocks_tuning.catalogue`)"
            )
            continue
        if status["status"] == "absent" and _absent_is_satisfied(key, text):
            plan["satisfied"].append(f"{key}: wanted {text}, and the kernel has no such key ({status['reason']})")
            plan["dropped"][key] = "absent on this kernel"
            continue
        if status["status"] == "writable" and key == CONGESTION_KEY:
            cc = _congestion(text, settings["congestion_fallback"], test, child)
            plan["notes"].extend(n for n in cc["notes"] if "using fallback" in n or "loaded" in n or "would load" in n)
            if cc["error"]:
                plan["errors"].append(cc["error"])
                continue
            if cc["value"] is None:
                status = {"status": "restricted", "reason": cc["problem"].split(": ", 1)[1]}
            else:
                text = cc["value"]
                plan["module"] = cc["module"]
        if status["status"] != "writable":
            message = f"{key}: {status['status']}: {status['reason']}"
            if _policy_for(settings, key) == "strict":
                plan["errors"].append(message + f" (policy strict; set pillar {PILLAR}:policy:keys:{key}: warn to skip it)")
            else:
                plan["skipped"].append(message)
                plan["dropped"][key] = status["status"]
            continue
        live = _read(key)
        plan["live"][key] = live
        target, kept = _effective(key, text, live, key in force)
        if kept:
            plan["kept"].append(kept)
        plan["values"][key] = target
        if live != target:
            plan["writes"][key] = (live, target)
    return plan


def _file_change(path, new_text):
    old_text = _read_text(path)
    if old_text == new_text:
        return None
    diff = "".join(
        difflib.unified_diff(
            (old_text or "").splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=path if old_text is not None else "/dev/null", tofile=path,
        )
    )
    return {"old": old_text, "new": new_text, "diff": diff}


def _modules_load(module):
    if not module:
        return None, None
    path = os.path.join(_opt("modules_load_dir"), MODULES_LOAD_NAME)
    old = _read_text(path) or ""
    if module in old.split():
        return path, None
    new = old + ("" if not old or old.endswith("\n") else "\n") + f"{module}\n"
    return path, new


def _summary(plan, overridden, boot_note):
    parts = []
    if plan["writes"]:
        parts.append(f"{len(plan['writes'])} sysctl(s) to change")
    parts.extend(plan["notes"])
    if plan["kept"]:
        parts.append("capacity kept higher: " + "; ".join(plan["kept"]))
    if plan["satisfied"]:
        parts.append("satisfied: " + "; ".join(plan["satisfied"]))
    if plan["skipped"]:
        parts.append("skipped: " + "; ".join(plan["skipped"]))
    for key, (path, line, value) in overridden.items():
        parts.append(f"overridden at boot: {key} = {value} in {path}:{line} wins over the managed file")
    if boot_note:
        parts.append(boot_note)
    return parts


def diff(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, test=True):
    """
    Compute what applying the tuning would change, without writing anything:
    ``{"changes": {key: {old, new}, <config file>: {diff}}, "comment": [...],
    "errors": [...]}``. Arguments left out come from pillar
    ``shadowsocks:tuning``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.diff
        salt-call shadowsocks_tuning.diff profile=bbr
    """
    settings = _settings(profile, sysctls, config, force, policy, congestion_fallback)
    return _changes(settings, test=True)[0]


def _changes(settings, test):
    plan = _plan(settings, test)
    changes = {key: {"old": old, "new": new} for key, (old, new) in plan["writes"].items()}
    config = settings["config"]
    new_conf = _render_conf(_read_text(config), plan["values"], plan["dropped"], settings["profile"])
    conf_change = _file_change(config, new_conf)
    if conf_change:
        changes[config] = {"diff": conf_change["diff"]}
    modules_path, modules_text = _modules_load(plan["module"])
    if modules_text is not None:
        changes[modules_path] = {"diff": _file_change(modules_path, modules_text)["diff"]}
    overridden, boot_note = _overrides(config, plan["values"])
    errors = list(plan["errors"])
    if overridden and settings["policy"]["override"] == "strict":
        errors.extend(
            f"{key}: {path}:{line} sets {value} and is read after {config} at boot (policy override: strict)"
            for key, (path, line, value) in overridden.items()
        )
    result = {
        "changes": changes,
        "comment": _summary(plan, overridden, boot_note),
        "errors": errors,
        "profile": settings["profile"],
    }
    return result, plan, new_conf, modules_path, modules_text


def apply(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None):
    """
    Apply the tuning: write every sysctl that differs in one pass, then
    persist the managed file atomically. All or nothing: if the kernel
    rejects one value, the keys already written are put back and nothing is
    persisted. Arguments left out come from pillar ``shadowsocks:tuning``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.apply
        salt-call shadowsocks_tuning.apply profile=bbr config=/etc/sysctl.d/60-shadowsocks.conf
    """
    settings = _settings(profile, sysctls, config, force, policy, congestion_fallback)
    with _lock():
        _remove_stray_temporaries(settings["config"])
        result, plan, new_conf, modules_path, modules_text = _changes(settings, test=False)
        if result["errors"]:
            raise CommandExecutionError("; ".join(result["errors"]))
        if not result["changes"]:
            return result
        originals = _load_originals()
        files = [settings["config"]] + ([modules_path] if modules_text is not None else [])
        _remember(originals, {k: old for k, (old, _) in plan["writes"].items()}, files)
        written = []
        try:
            for key, (old, new) in plan["writes"].items():
                try:
                    _write(key, new)
                except OSError as exc:
                    raise CommandExecutionError(_write_error(key, new, exc))
                written.append((key, old))
            if settings["config"] in result["changes"]:
                _atomic_write(settings["config"], new_conf)
            if modules_text is not None:
                _atomic_write(modules_path, modules_text)
        except (CommandExecutionError, OSError) as exc:
            failed = _rollback(written)
            message = exc if isinstance(exc, CommandExecutionError) else f"cannot persist {settings['config']}: {exc}"
            tail = f"; could not put back: {', '.join(failed)}" if failed else ""
            raise CommandExecutionError(
                f"{message}. Put back {len(written) - len(failed)} key(s) already written; nothing persisted{tail}"
            )
        return result


def _rollback(written):
    failed = []
    for key, old in reversed(written):
        try:
            _write(key, old)
        except OSError:
            failed.append(key)
    return failed


# --------------------------------------------------------------------------
# Verify and clean
# --------------------------------------------------------------------------
def verify(profile=None, sysctls=None, config=None, force=None):
    """
    Compare live values and the persisted file with the resolved profile and
    pillar. Per key: ``ok``, ``drift`` (live or persisted value differs),
    ``absent``, ``read-only``, ``restricted`` or ``overridden`` (a file read
    later at boot wins). salt-call exits non-zero when anything drifted or is
    overridden, so this serves monitoring.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.verify
        salt '*' shadowsocks_tuning.verify
    """
    settings = _settings(profile, sysctls, config, force)
    force_keys = set(settings["force"])
    child = _in_child_netns()
    persisted = {key: value for _, key, value in _parse_conf(_read_text(settings["config"]) or "")}
    report = {}
    expected_file = {}
    for key, text in settings["sysctls"].items():
        status = _probe_one(key, None, child)
        if status["status"] != "writable":
            satisfied = status["status"] == "absent" and _absent_is_satisfied(key, text)
            report[key] = {"status": "ok" if satisfied else status["status"], "wanted": text, "live": None, "reason": status["reason"]}
            continue
        live = _read(key)
        target, _ = _effective(key, text, live, key in force_keys)
        if key == CONGESTION_KEY and settings["congestion_fallback"] and live == settings["congestion_fallback"] and live != target:
            available = (_read_or(_AVAILABLE_CC) or "").split()
            if text not in available:
                target = live
        expected_file[key] = target
        entry = {"status": "ok", "wanted": target, "live": live, "persisted": persisted.get(key)}
        if live != target:
            entry.update(status="drift", reason=f"live value {live} differs from {target}")
        elif persisted.get(key) != target:
            entry.update(status="drift", reason=f"{settings['config']} has {persisted.get(key)!r}, expected {target}")
        report[key] = entry
    overridden, _ = _overrides(settings["config"], expected_file)
    for key, (path, line, value) in overridden.items():
        report[key].update(status="overridden", reason=f"{path}:{line} sets {value} and is read later at boot")
    bad = sorted(k for k, v in report.items() if v["status"] in ("drift", "overridden"))
    if bad:
        __context__["retcode"] = 1
    return {"ok": not bad, "problems": bad, "keys": report}


def clean(test=False):
    """
    Undo what this package did: put back the live values it found before its
    first change, restore the files it changed byte for byte (removing those it
    created), and forget the saved originals. ``test=True`` only reports.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.clean test=True
        salt-call shadowsocks_tuning.clean
    """
    with _lock():
        originals = _load_originals()
        changes, failed = {}, []
        for key, value in originals["sysctls"].items():
            current = _read_or(key)
            if current is None or current == value:
                continue
            changes[key] = {"old": current, "new": value}
            if not test:
                try:
                    _write(key, value)
                except OSError as exc:
                    failed.append(f"{key}: {exc.strerror or exc}")
        for path, raw in originals["files"].items():
            current = _read_text(path)
            if raw is None:
                if current is not None:
                    changes[path] = {"old": "managed", "new": "removed (it did not exist before)"}
                    if not test:
                        os.unlink(path)
                continue
            content = base64.b64decode(raw).decode("utf-8", errors="surrogateescape")
            if current != content:
                changes[path] = {"diff": _file_change(path, content)["diff"]}
                if not test:
                    _atomic_write(path, content)
        if failed:
            raise CommandExecutionError("clean: could not put back " + "; ".join(failed))
        if not test:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_originals_path())
        return changes
