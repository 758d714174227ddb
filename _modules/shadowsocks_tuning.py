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
    shadowsocks_tuning.init_dir: /etc/init.d           # sysvinit scripts (open-file limits)
    shadowsocks_tuning.service_cmd: service            # used when init_dir is /etc/init.d
    shadowsocks_tuning.systemctl: systemctl
    shadowsocks_tuning.systemd_marker: /run/systemd/system   # exists <=> systemd is PID 1
    shadowsocks_tuning.systemd_dir: /etc/systemd/system      # where drop-ins go
    shadowsocks_tuning.unit_dirs: [/etc/systemd/system, /run/systemd/system, /usr/local/lib/systemd/system, /usr/lib/systemd/system, /lib/systemd/system]
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
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time

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
    # open-file limits
    "init_dir": "/etc/init.d",
    "service_cmd": "service",
    "systemctl": "systemctl",
    # sd_booted(3): systemd is PID 1 exactly when this directory exists.
    "systemd_marker": "/run/systemd/system",
    "systemd_dir": "/etc/systemd/system",
    "unit_dirs": ["/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                  "/usr/lib/systemd/system", "/lib/systemd/system"],
}
POLICIES = ("warn", "strict")
PILLAR_KEYS = {"profile", "profiles", "sysctls", "config", "force", "policy", "congestion_fallback", "nofile", "limits"}
PILLAR = "shadowsocks:tuning"
MANAGED_HEADER = "# Managed by Salt (shadowsocks_tuning); other lines are left as they are."
MODULES_LOAD_NAME = "shadowsocks-tuning.conf"

# Dot-separated segments; the kernel's own names (interfaces under conf/,
# neigh/) may hold capitals, '@', ':' and '+'. No '/', no '..', no blanks.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@:+-]*\Z")  # \Z: `$` would let a trailing newline through
_TOP_LEVEL = ("abi", "crypto", "debug", "dev", "fs", "kernel", "net", "sunrpc", "user", "vm")
_WORD = re.compile(r"^[a-z0-9_]{1,32}\Z")
_INT = re.compile(r"^[+]?[0-9]{1,20}\Z")


# --------------------------------------------------------------------------
# Options and small helpers
# --------------------------------------------------------------------------
def _opt(name):
    opts = globals().get("__opts__") or {}  # absent when imported outside Salt (unit tests, benchmarks)
    return opts.get(f"shadowsocks_tuning.{name}", DEFAULTS[name])


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


_PATHS = {}  # (proc_root, key) -> path: validation runs once per key and root


def _path(key):
    root = _opt("proc_root")
    try:
        return _PATHS[root, key]
    except (KeyError, TypeError):
        path = os.path.join(root, *validate_key(key).split("."))
        _PATHS[root, key] = path
        return path


def _normalise_live(text):
    return " ".join(text.split())


def _read(key):
    # Unbuffered bytes: a text wrapper per read costs more than the read.
    with open(_path(key), "rb", buffering=0) as handle:
        return _normalise_live(handle.read().decode("ascii", "replace"))


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
    if spec.get("scope") == "global" and child:
        return {"status": "writable", "reason": "writable, but global: from this namespace it changes the whole host"}
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
        # The name is written into the persisted file (`# profile: NAME`): a
        # newline in it would add a live line there.
        if not re.match(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", name):
            raise SaltInvocationError(
                f"pillar {PILLAR}:profiles: profile name {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
            )
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
    unknown = sorted(set(data) - PILLAR_KEYS)
    if unknown:
        # A misspelt key would otherwise be ignored in silence.
        raise SaltInvocationError(
            f"pillar {PILLAR}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(PILLAR_KEYS))}); see pillar.example"
        )
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
    # Only *.conf: the engine rewrites this file 0644, so a path such as
    # /etc/shadow must never be taken (and `sysctl --system` reads only *.conf).
    if (not isinstance(config, str) or not os.path.isabs(config) or "\n" in config or "\0" in config
            or ".." in config.split("/") or not config.endswith(".conf")):
        raise SaltInvocationError(
            f"pillar {PILLAR}:config: {config!r} must be an absolute file path ending in .conf, without '..'"
        )

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
    if not isinstance(per_key, dict):
        raise SaltInvocationError(f"pillar {PILLAR}:policy:keys: {per_key!r} must be a mapping of sysctl key to warn or strict")
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


def _congestion(wanted, fallback, test, child):
    """Make sure a congestion control can be set. Returns a dict with the
    value to set (or None), whether a module is (to be) loaded, notes, and an
    error when it cannot be made available and there is no usable fallback."""
    out = {"value": wanted, "module": None, "notes": [], "error": None, "status": "writable"}
    available = (_read_or(_AVAILABLE_CC) or "").split()
    allowed = (_read_or(_ALLOWED_CC) or "").split()

    def usable(name):
        return name in available and (not child or name in allowed)

    load_failure = ""  # said in the problem, not as a note of its own
    if wanted not in available:
        module = f"tcp_{wanted}"
        ok, message = _modprobe(module, dry_run=test)
        if ok:
            out["notes"].append(message)
            out["module"] = module
            if not test:
                available = (_read_or(_AVAILABLE_CC) or "").split()
            else:
                available = available + [wanted]
        else:
            load_failure = message
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
            f"'{wanted}' is not available (available: {' '.join(available)}); {load_failure}"
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
    """Temporary file in the same directory, fsync, rename: the old file or
    the new one, never half of either. The directory is not fsynced: that
    would only make the new name durable before the next journal commit (a
    power cut in between brings back the old, complete file) and costs a
    journal flush, most of an apply's time under load. ``mode``
    None keeps the mode and owner of the file replaced (0644 for a new one),
    so that an init script stays executable."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    previous = None
    with contextlib.suppress(FileNotFoundError):
        previous = os.stat(path)
    keep_owner = mode is None  # an explicit mode means a root-owned file with that mode
    if mode is None:
        mode = previous.st_mode & 0o7777 if previous else 0o644
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.sst-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8", errors="surrogateescape"))
            handle.flush()
            os.fsync(handle.fileno())
        if keep_owner and previous is not None and (previous.st_uid, previous.st_gid) != (os.geteuid(), os.getegid()):
            os.chown(tmp, previous.st_uid, previous.st_gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
    """One apply at a time per box: concurrent runs queue, never interleave.
    Under umask 022 whatever the caller's: os.makedirs gives the parents it
    creates 0777 & ~umask, world-writable under umask 000."""
    umask = os.umask(0o022)
    try:
        os.makedirs(_opt("state_dir"), mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(_opt("state_dir"), "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        os.umask(umask)
        raise CommandExecutionError(
            f"cannot take the lock in {_opt('state_dir')}: {exc.strerror or exc}; nothing was changed "
            "(shadowsocks_tuning.state_dir must be a writable directory)"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
        os.umask(umask)


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
    # A read-only /proc/sys mount says nothing about the kernel that reads the
    # file at boot: its keys are reported, their persisted lines left alone.
    proc_read_only = bool(os.statvfs(_opt("proc_root")).f_flag & os.ST_RDONLY)
    plan = {
        "writes": {},      # key -> (old, new)
        "values": {},      # key -> value to persist
        "dropped": {},     # key -> why its line is commented out
        "kept": [], "skipped": [], "satisfied": [], "notes": [], "errors": [],
        "module": None,
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
            plan["notes"].extend(cc["notes"])
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
                if not proc_read_only:
                    plan["dropped"][key] = status["status"]
            continue
        live = _read(key)
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
    # Bytes that are not UTF-8 (held as surrogates to be written back as they
    # were) break Salt's msgpack and JSON output: show them as \xe9.
    diff = diff.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
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


def diff(profile=None, sysctls=None, config=None, force=None, policy=None, congestion_fallback=None, test=True):  # noqa: ARG001
    """
    Compute what applying the tuning would change, without writing anything:
    ``{"changes": {key: {old, new}, <config file>: {diff}}, "comment": [...],
    "errors": [...]}``. Arguments left out come from pillar
    ``shadowsocks:tuning``; ``test`` is accepted and ignored (nothing is ever written).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.diff
        salt-call shadowsocks_tuning.diff profile=bbr
    """
    settings = _settings(profile, sysctls, config, force, policy, congestion_fallback)
    return _changes(settings, test=True)[0]


def _changes(settings, test):
    config = settings["config"]
    if os.path.islink(config):
        # Following it would copy the target's lines into a 0644 file (and a
        # link in a world-writable directory can point anywhere).
        raise CommandExecutionError(
            f"{config} is a symbolic link (to {os.readlink(config)}); refusing to follow it: "
            f"point pillar {PILLAR}:config at a regular file"
        )
    plan = _plan(settings, test)
    changes = {key: {"old": old, "new": new} for key, (old, new) in plan["writes"].items()}
    new_conf = _render_conf(_read_text(config), plan["values"], plan["dropped"], settings["profile"])
    # Nothing to persist and no file yet: do not create an empty one.
    conf_change = _file_change(config, new_conf) if new_conf or os.path.lexists(config) else None
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
        for path in (settings["config"], _originals_path(), os.path.join(_opt("modules_load_dir"), MODULES_LOAD_NAME)):
            _remove_stray_temporaries(path)
        result, plan, new_conf, modules_path, modules_text = _changes(settings, test=False)
        if result["errors"]:
            raise CommandExecutionError("; ".join(result["errors"]))
        if not result["changes"]:
            return result
        originals = _load_originals()
        files = [settings["config"]] + ([modules_path] if modules_text is not None else [])
        try:
            _remember(originals, {k: old for k, (old, _) in plan["writes"].items()}, files)
        except OSError as exc:
            raise CommandExecutionError(
                f"cannot save the original values in {_opt('state_dir')}: {exc.strerror or exc}; nothing was changed"
            )
        written = []
        try:
            for key, (old, new) in plan["writes"].items():
                try:
                    _write(key, new)
                except OSError as exc:
                    raise CommandExecutionError(_write_error(key, new, exc))
                written.append((key, old))
            if settings["config"] in result["changes"]:
                # root-owned 0644 whatever the file was: its lines run as root at boot
                _atomic_write(settings["config"], new_conf, mode=0o644)
            if modules_text is not None:
                _atomic_write(modules_path, modules_text, mode=0o644)
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
        # The congestion control is probed with its value, as apply does: one
        # that apply skipped as restricted here is reported so, not as drift.
        cc_wanted = text if key == CONGESTION_KEY and not settings["congestion_fallback"] else None
        status = _probe_one(key, cc_wanted, child)
        if status["status"] != "writable":
            satisfied = status["status"] == "absent" and _absent_is_satisfied(key, text)
            report[key] = {"status": "ok" if satisfied else status["status"], "wanted": text, "live": None, "reason": status["reason"]}
            continue
        live = _read(key)
        target, _ = _effective(key, text, live, key in force_keys)
        if key == CONGESTION_KEY and settings["congestion_fallback"] and live == settings["congestion_fallback"] and live != target:
            if _probe_one(key, text, child)["status"] == "restricted":  # unavailable, or not allowed here
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


# ---- Open-file limits ----
#
# The recipe's second half. Sysctls alone do not stop `too many open files`:
# the daemon's own RLIMIT_NOFILE must be raised, and it only changes when the
# daemon is started again by a parent that can grant it. These functions put
# the limit where each service manager reads it (`ulimit -n N` in
# /etc/default/supervisor and init scripts, MAXFD=N for shadowsocks-libev,
# minfds=N in supervisord.conf, LimitNOFILE=N in systemd drop-ins), stop and
# start the service so the limit reaches the daemon, and read /proc to show
# whether it did.
#
# Minion options of this part are listed in the module docstring.

NOFILE_DEFAULT = 51200  # the recipe's value; salt/shadowsocks/defaults.yaml holds the same for the SLS
CAP_SYS_RESOURCE = 24  # capability(7) bit: may raise a hard limit
SUPERVISORD_NAME = "supervisord"
# Server and client programs of shadowsocks-libev, shadowsocks (Python) and
# shadowsocks-rust, by process name.
SS_PROCESS_NAMES = (
    "ss-server", "ss-local", "ss-manager", "ss-redir", "ss-tunnel", "ss-nat",
    "ssserver", "sslocal", "ssmanager", "ssservice", "ssredir", "sstunnel",
)
# Named to sort after `override.conf` (systemctl edit): a later drop-in wins.
DROPIN_NAME = "shadowsocks-tuning-nofile.conf"
NOFILE_COMMENT = "# Open-file limit, managed by Salt (shadowsocks_tuning)"
INIT_SYSTEMS = ("auto", "systemd", "sysvinit")
RESTART_WHEN = ("running", "always", "never")
IF_MISSING = ("fail", "skip")  # what to do when the file (or unit) is not there
LIMITS = f"{PILLAR}:limits"
_LIMITS_FIELDS = {
    "": ("init_system", "restart", "timeout", "supervisor", "shadowsocks_libev", "init_scripts", "units", "verify"),
    "supervisor": ("service", "pidfile", "defaults_file", "config", "unit"),
    "shadowsocks_libev": ("service", "pidfile", "defaults_file", "units"),
    "init_scripts": ("path", "service", "pidfile"),
    "verify": ("pidfiles", "wait"),
}
_SHELLS = ("sh", "dash", "bash", "ash", "ksh", "mksh", "zsh", "busybox", "init-d-script")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._+:-]{0,254}$")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.\\-]+(?:@[A-Za-z0-9:_.\\-]*)?\.service$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Printable, and nothing a shell would expand or split when it sources the file.
_ENV_VALUE = re.compile(r"^[A-Za-z0-9_./:@%+,=-]{0,256}$")
# `ulimit -n N`, `ulimit -SHn N`, `ulimit -S -n "$MAXFD"  # why`: a line of its own.
_ULIMIT_LINE = re.compile(
    r"^(?P<indent>[ \t]*)ulimit(?:[ \t]+-[SH]+)*[ \t]+-[SH]*n[SH]*[ \t]+(?P<value>[^\s;&|#]+)(?P<tail>[ \t]*(?:#.*)?)$"
)
_ULIMIT_QUERY = re.compile(r"^[ \t]*ulimit(?:[ \t]+-[SH]+)*[ \t]+-[SH]*n[SH]*[ \t]*(?:#.*)?$")
# `ulimit ... -n` anywhere a command can start: compound forms this module does not rewrite.
_ULIMIT_ANY = re.compile(r"(?:^|[;&|({]|\b(?:then|do|else)\b)[ \t]*ulimit\b[^;&|#]*[ \t]-[A-Za-z]*n")
_INI_SECTION = re.compile(r"^[ \t]*\[(?P<name>[^\]]*)\][ \t]*(?:[;#].*)?$")
_MINFDS = re.compile(r"^(?P<key>minfds)(?P<sep>[ \t]*[=:][ \t]*)(?P<value>[^;#\s]*)(?P<tail>.*)$", re.IGNORECASE)
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# What `service` gives an init script: no variables of the salt process leak in.
_SERVICE_ENV = {"PATH": _SYSTEM_PATH, "LANG": "C"}


def _nr_open():
    try:
        return int(_read_or("fs.nr_open"))
    except (TypeError, ValueError):
        return 1048576  # the kernel's default


def validate_nofile(nofile, where="nofile"):
    """
    Check an open-file limit and return it as an integer: a positive whole
    number no higher than ``fs.nr_open``, the kernel's ceiling for any
    process's RLIMIT_NOFILE.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.validate_nofile 51200
    """
    number = None
    if isinstance(nofile, int) and not isinstance(nofile, bool):
        number = nofile
    elif isinstance(nofile, str) and re.fullmatch(r"[ \t]*\+?[0-9]{1,19}[ \t]*", nofile):
        number = int(nofile)
    if number is None or number < 1:
        raise SaltInvocationError(
            f"{where}: {nofile!r} is not a positive integer; give the open-file limit the daemons should get, e.g. 51200"
        )
    nr_open = _nr_open()
    if number > nr_open:
        raise SaltInvocationError(
            f"{where}: {number} is above fs.nr_open ({nr_open}), the kernel's ceiling for a process's open-file "
            "limit; lower it, or raise fs.nr_open first"
        )
    return number


def _abs_path(path, where):
    if (
        not isinstance(path, str) or not os.path.isabs(path) or any(c in path for c in "\0\n\r")
        or ".." in path.split("/")
    ):
        raise SaltInvocationError(f"{where}: {path!r} must be an absolute path without '..', e.g. /etc/default/supervisor")
    return os.path.normpath(path)


def _choice(value, allowed, where):
    if value not in allowed:
        raise SaltInvocationError(f"{where}: {value!r} must be one of {', '.join(allowed)}")
    return value


def _service_name(name, where):
    if not isinstance(name, str) or not _SERVICE_NAME.match(name):
        raise SaltInvocationError(
            f"{where}: {name!r} is not a service name (letters, digits, '@._+:-', no '/'), e.g. supervisor"
        )
    return name


def _unit_name(unit, where):
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


def _timeout(value, where, low=1, high=600):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise SaltInvocationError(f"{where}: {value!r} must be a number of seconds from {low} to {high}")
    return value


# --------------------------------------------------------------------------
# Line editing: pure functions, text in and text out. Lines are split on
# "\n" only, so CRLF endings, stray control characters and a missing final
# newline all survive byte for byte.
# --------------------------------------------------------------------------
def _split_lines(text):
    """[(body, ending)]: ending is "\\n", "\\r\\n" or "" (a last line without newline)."""
    parts = (text or "").split("\n")
    last = parts.pop()
    lines = [(part[:-1], "\r\n") if part.endswith("\r") else (part, "\n") for part in parts]
    if last:
        lines.append((last, ""))
    return lines


def _join(lines):
    return "".join(body + ending for body, ending in lines)


def _eol(lines):
    return next((ending for _, ending in lines if ending), "\n")


def _insert_lines(lines, index, bodies, eol):
    """Insert new lines before `index`; at the end, a file without a final
    newline keeps that shape (the separator goes before the new lines)."""
    lines = list(lines)
    if index < len(lines):
        lines[index:index] = [(body, eol) for body in bodies]
        return lines
    unterminated = bool(lines) and lines[-1][1] == ""
    if unterminated:
        lines[-1] = (lines[-1][0], eol)
    lines.extend((body, eol) for body in bodies)
    if unterminated:
        lines[-1] = (lines[-1][0], "")
    return lines


def _keep_final_newline(before, after):
    """A dropped last line must not give the file a final newline it lacked."""
    if before and before[-1][1] == "" and after and after[-1][1] != "":
        after[-1] = (after[-1][0], "")
    return after


def _is_comment(body):
    return body.lstrip().startswith("#")


def _check_shell_script(lines, path):
    first = lines[0][0] if lines else ""
    if not first.startswith("#!"):
        return  # no interpreter line: the kernel hands it to /bin/sh
    words = first[2:].split()
    program = os.path.basename(words[0]) if words else ""
    if program == "env":
        program = os.path.basename(next((w for w in words[1:] if not w.startswith("-")), ""))
    if program not in _SHELLS:
        raise CommandExecutionError(
            f"{path}: not a shell script ({first.strip()}); `ulimit -n` only works in a shell script: "
            "set the limit where this daemon is started instead, or remove it from pillar "
            f"{LIMITS}:init_scripts"
        )


def _init_insert_index(lines):
    """Where a new `ulimit` line runs before anything else in an init script:
    right after the LSB header, else after the leading comments."""
    for index, (body, _) in enumerate(lines):
        if body.strip() == "### END INIT INFO":
            return index + 1
    index = 0
    while index < len(lines) and (not lines[index][0].strip() or _is_comment(lines[index][0])):
        index += 1
    return index


def _render_ulimit(text, nofile, path, placement="end"):
    """Exactly one active `ulimit -n <nofile>` line: the first existing one is
    rewritten in place (indentation and trailing comment kept), later ones are
    dropped, commented-out ones are left alone. Without one, a new line goes at
    the end (a sourced defaults file) or before the first command (an init
    script). Returns (new_text, old_value or None)."""
    lines = _split_lines(text)
    if placement == "init":
        _check_shell_script(lines, path)
    wanted = f"ulimit -n {nofile}"
    out, old = [], None
    for number, (body, ending) in enumerate(lines, 1):
        if _is_comment(body):
            out.append((body, ending))
            continue
        match = _ULIMIT_LINE.match(body)
        if match:
            if old is None:
                old = match.group("value")
                out.append((f"{match.group('indent')}{wanted}{match.group('tail')}", ending))
            continue
        if _ULIMIT_ANY.search(body) and not _ULIMIT_QUERY.match(body):
            raise CommandExecutionError(
                f"{path}:{number}: {body.strip()!r} sets the open-file limit in a form this module does not "
                "rewrite; make it a plain `ulimit -n N` line of its own (or remove it) and run again"
            )
        out.append((body, ending))
    if old is None:
        index = _init_insert_index(out) if placement == "init" else len(out)
        out = _insert_lines(out, index, [NOFILE_COMMENT, wanted], _eol(lines))
    return _join(_keep_final_newline(lines, out)), old


def _render_assignment(text, key, value, path):
    """Exactly one active `KEY=value` line (`export KEY=...` too): the first is
    rewritten in place, keeping its quotes and trailing comment; later ones are
    dropped; missing, it is appended. Returns (new_text, old_value or None)."""
    pattern = re.compile(
        r"^(?P<indent>[ \t]*)(?P<export>export[ \t]+)?" + re.escape(key)
        + r"=(?P<value>\"[^\"]*\"|'[^']*'|[^\s;&|#]*)(?P<tail>.*)$"
    )
    lines = _split_lines(text)
    out, old = [], None
    for body, ending in lines:
        match = None if _is_comment(body) else pattern.match(body)
        if not match:
            out.append((body, ending))
            continue
        if old is None:
            raw = match.group("value")
            quote = raw[0] if raw[:1] in ("'", '"') else ""
            old = raw[1:-1] if quote else raw
            new = f"{match.group('indent')}{match.group('export') or ''}{key}={quote}{value}{quote}{match.group('tail')}"
            out.append((new, ending))
    if old is None:
        out = _insert_lines(out, len(out), [NOFILE_COMMENT, f"{key}={value}"], _eol(lines))
    return _join(_keep_final_newline(lines, out)), old


def _render_minfds(text, nofile, path):
    """`minfds=<nofile>` in the [supervisord] section of a supervisord config:
    the first one rewritten in place, later ones in that section dropped;
    missing, it goes after the first [supervisord] section's last setting.
    Returns (new_text, old_value or None)."""
    lines = _split_lines(text)
    out, old = [], None
    section, first, anchor = None, False, None  # anchor: index in `out` to insert after
    for body, ending in lines:
        header = _INI_SECTION.match(body)
        if header:
            section = header.group("name").strip()
            first = section == "supervisord" and anchor is None
            if first:
                anchor = len(out)
            out.append((body, ending))
            continue
        match = _MINFDS.match(body) if section == "supervisord" else None
        if match:
            if old is None:
                old = match.group("value")
                out.append((f"{match.group('key')}{match.group('sep')}{nofile}{match.group('tail')}", ending))
            continue
        stripped = body.strip()
        if first and stripped and stripped[0] not in ";#":
            anchor = len(out)
        out.append((body, ending))
    if anchor is None:
        raise CommandExecutionError(
            f"{path}: no [supervisord] section, so this is not supervisord's main configuration; set pillar "
            f"{LIMITS}:supervisor:config to that file (Debian: /etc/supervisor/supervisord.conf)"
        )
    if old is None:
        out = _insert_lines(out, anchor + 1, [f"minfds={nofile}"], _eol(lines))
    return _join(_keep_final_newline(lines, out)), old


def _render_dropin(nofile, unit):
    return (
        f"# Open-file limit of {unit}, managed by Salt (shadowsocks_tuning).\n"
        f"[Service]\nLimitNOFILE={nofile}\n"
    )


# --------------------------------------------------------------------------
# Writing one managed file
# --------------------------------------------------------------------------
def _read_managed(path):
    try:
        return _read_text(path)
    except IsADirectoryError:
        raise CommandExecutionError(f"{path} is a directory, not a file; fix the path in pillar {LIMITS}")
    except OSError as exc:
        raise CommandExecutionError(f"{path}: cannot read: {exc.strerror or exc}")


def _manage_file(path, render, what, test, if_missing="fail", force=False):
    """Render the new text of `path` from its current text, and unless `test`
    write it atomically, after recording the original so `clean` can put it
    back byte for byte. `if_missing` may also be `create` (drop-ins, which
    this module owns outright). Like a capacity sysctl, a limit already
    higher than the wanted one is kept unless `force`."""
    result = {"path": path, "what": what, "changed": False, "skipped": False, "old": None, "new": None, "diff": ""}
    with (contextlib.nullcontext() if test else _lock()):
        text = _read_managed(path)
        if text is None and if_missing == "skip":
            result.update(skipped=True, comment=f"{path} does not exist: nothing to manage")
            return result
        if text is None and if_missing == "fail":
            raise CommandExecutionError(
                f"{path} does not exist; install the service it belongs to, or fix or remove the path in pillar {LIMITS}"
            )
        new_text, old_value, new_value = render(text)
        if not force and str(old_value).isdigit() and str(new_value).isdigit() and int(old_value) > int(new_value):
            result.update(old=old_value, new=old_value,
                          comment=f"{path}: {what} {old_value} kept (higher than {new_value}; force lowers it)")
            return result
        result.update(old=old_value, new=new_value)
        change = _file_change(path, new_text)
        if change is None:
            result["comment"] = f"{path}: {what} {new_value} is in place"
            return result
        result.update(changed=True, diff=change["diff"])
        if test:
            result["comment"] = f"{path}: {what} would be set to {new_value} (now {old_value or 'not set'})"
            return result
        _remember(_load_originals(), files=[path])
        try:
            _atomic_write(path, new_text)
        except OSError as exc:
            raise CommandExecutionError(f"{path}: cannot write: {exc.strerror or exc}; the file is unchanged")
        result["comment"] = f"{path}: {what} set to {new_value} (was {old_value or 'not set'})"
        return result


def set_ulimit(path, nofile, placement="end", test=False, if_missing="fail", force=False):
    """
    Give a shell file exactly one active ``ulimit -n <nofile>`` line: an
    existing ``ulimit -n`` line is rewritten in place, never duplicated, and
    every other line (comments, CRLF endings, a missing final newline) stays
    byte for byte. ``placement=end`` appends a new line (a file sourced by an
    init script, such as ``/etc/default/supervisor``); ``placement=init`` puts
    it right after the LSB header, before the script starts anything.
    ``if_missing``: ``fail`` or ``skip``. An existing higher limit is kept
    unless ``force=True``. Returns what changed, with a diff.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_ulimit /etc/default/supervisor 51200 test=True
        salt-call shadowsocks_tuning.set_ulimit /etc/init.d/shadowsocks 51200 placement=init
    """
    path = _abs_path(path, "path")
    nofile = validate_nofile(nofile)
    _choice(placement, ("end", "init"), "placement")
    _choice(if_missing, IF_MISSING, "if_missing")

    def render(text):
        new_text, old = _render_ulimit(text, nofile, path, placement)
        return new_text, old, str(nofile)

    return _manage_file(path, render, "ulimit -n", test, if_missing, force)


def set_assignment(path, key, value, test=False, if_missing="fail", force=False):
    """
    Give a shell-sourced defaults file exactly one active ``KEY=value`` line,
    e.g. ``MAXFD=51200`` in ``/etc/default/shadowsocks-libev`` (its init
    script runs ``ulimit -n ${MAXFD}``). Quotes and a trailing comment of the
    existing line are kept; other lines stay byte for byte. A higher number
    already there is kept unless ``force=True``.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_assignment /etc/default/shadowsocks-libev MAXFD 51200
    """
    path = _abs_path(path, "path")
    if not isinstance(key, str) or not _ENV_KEY.match(key):
        raise SaltInvocationError(f"key: {key!r} is not a shell variable name such as MAXFD")
    _choice(if_missing, IF_MISSING, "if_missing")
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not _ENV_VALUE.match(str(value)):
        raise SaltInvocationError(
            f"{key}: {value!r} is not a plain value (letters, digits and ./:@%+,=- only; nothing a shell would expand)"
        )
    value = str(value)

    def render(text):
        new_text, old = _render_assignment(text, key, value, path)
        return new_text, old, value

    return _manage_file(path, render, key, test, if_missing, force)


def set_minfds(path, nofile, test=False, if_missing="fail", force=False):
    """
    Set ``minfds=<nofile>`` in the ``[supervisord]`` section of supervisord's
    configuration, so supervisord raises its own limit (and its programs') even
    where it is started without ``/etc/default/supervisor``. supervisord
    refuses to start when ``minfds`` is above its hard limit: the SLS checks
    that first (see ``nofile_check``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_minfds /etc/supervisor/supervisord.conf 51200 test=True
    """
    path = _abs_path(path, "path")
    nofile = validate_nofile(nofile)
    _choice(if_missing, IF_MISSING, "if_missing")

    def render(text):
        new_text, old = _render_minfds(text, nofile, path)
        return new_text, old, str(nofile)

    return _manage_file(path, render, "minfds", test, if_missing, force)


def _unit_file(unit):
    """The unit file systemd would load for `unit` (a template for an instance), or None."""
    names = [unit]
    if "@" in unit and not unit.endswith("@.service"):
        names.append(unit.split("@", 1)[0] + "@.service")
    for directory in _opt("unit_dirs"):
        for name in names:
            candidate = os.path.join(directory, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def dropin_path(unit):
    """
    The drop-in file that carries ``LimitNOFILE`` for a unit; for a template
    unit (``name@.service``) it applies to every instance.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.dropin_path shadowsocks-libev-server@.service
    """
    unit = _unit_name(unit, "unit")
    return os.path.join(_opt("systemd_dir"), f"{unit}.d", DROPIN_NAME)


def set_systemd_nofile(unit, nofile, test=False, if_missing="fail"):
    """
    Write a systemd drop-in with ``LimitNOFILE=<nofile>`` for a service unit
    (template units such as ``shadowsocks-libev-server@.service`` included).
    Run ``daemon-reload`` and restart the unit afterwards (``stop_start``).
    ``if_missing`` applies to the unit: ``skip`` leaves units that are not
    installed alone.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.set_systemd_nofile supervisor.service 51200 test=True
    """
    unit = _unit_name(unit, "unit")
    nofile = validate_nofile(nofile)
    _choice(if_missing, IF_MISSING, "if_missing")
    path = dropin_path(unit)
    if _unit_file(unit) is None:
        if if_missing == "skip":
            return {"path": path, "what": "LimitNOFILE", "changed": False, "skipped": True, "old": None,
                    "new": None, "diff": "", "comment": f"{unit} is not installed: nothing to manage"}
        raise CommandExecutionError(
            f"{unit}: no unit file in {', '.join(_opt('unit_dirs'))}; install it, or remove it from pillar {LIMITS}"
        )

    def render(text):
        match = re.search(r"^LimitNOFILE=(\S*)", text or "", re.MULTILINE)
        return _render_dropin(nofile, unit), match.group(1) if match else None, str(nofile)

    return _manage_file(path, render, "LimitNOFILE", test, if_missing="create")


def init_system(prefer="auto"):
    """
    Which service manager to go through: ``systemd`` when it is PID 1
    (``/run/systemd/system`` exists, as sd_booted(3) checks), else
    ``sysvinit`` (``service NAME stop|start`` and /etc/init.d scripts).
    ``prefer`` forces one.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.init_system
    """
    _choice(prefer, INIT_SYSTEMS, f"pillar {LIMITS}:init_system")
    if prefer != "auto":
        return prefer
    return "systemd" if os.path.isdir(_opt("systemd_marker")) else "sysvinit"


# --------------------------------------------------------------------------
# Processes: /proc only
# --------------------------------------------------------------------------
def _proc_stat(pid):
    """(comm, state, ppid) from /proc/<pid>/stat, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return None
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    if len(fields) < 2:
        return None
    return head.split("(", 1)[-1], fields[0], int(fields[1])


def _alive(pid):
    stat = _proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def _proc_nofile(pid):
    """(soft, hard) 'Max open files' of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/limits") as handle:
            for line in handle:
                if line.startswith("Max open files"):
                    soft, hard = line[len("Max open files"):].split()[:2]
                    return tuple(None if v == "unlimited" else int(v) for v in (soft, hard))
    except OSError:
        return None
    return None


def _has_cap_sys_resource(pid="self"):
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    except (OSError, ValueError, IndexError):
        return False
    return False


def _proc_argv(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [a.decode("utf-8", "replace") for a in handle.read().split(b"\0") if a]
    except OSError:
        return []


def _match_name(comm, argv, names):
    if comm in names:
        return comm
    candidates = argv[:1]
    # Python programs (ssserver, supervisord) show as `python3 /usr/bin/NAME` when started that way.
    if argv and os.path.basename(argv[0]).startswith(("python", "pypy")):
        candidates = argv[1:2]
    for arg in candidates:
        base = os.path.basename(arg)
        base = base[:-3] if base.endswith(".py") else base
        if base in names:
            return base
    return None


def _process_table():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[1] != "Z":
                table[int(entry)] = stat
    return table


def _pid_from(pidfile):
    try:
        with open(pidfile, "rb") as handle:
            return int(handle.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _subtree(table, roots):
    children = {}
    for pid, (_, _, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def nofile_grantable():
    """
    The highest open-file limit a service started from this process can get:
    ``fs.nr_open`` with CAP_SYS_RESOURCE, else this process's own hard limit
    (``ulimit -n N`` above it fails with "Operation not permitted").

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_grantable
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    nr_open = _nr_open()
    cap = _has_cap_sys_resource("self")
    hard_value = nr_open if hard == resource.RLIM_INFINITY else hard
    if cap:
        limit = nr_open
        reason = f"salt has CAP_SYS_RESOURCE, so it can grant up to fs.nr_open ({nr_open})"
    else:
        limit = min(hard_value, nr_open)
        reason = (
            f"salt runs with a hard open-file limit of {hard_value} and without CAP_SYS_RESOURCE (CapEff bit "
            f"{CAP_SYS_RESOURCE}), so a service it starts can get at most {limit}"
        )
    return {"limit": limit, "soft": soft, "hard": hard_value, "cap_sys_resource": cap, "nr_open": nr_open,
            "reason": reason}


def _why_low(entry, wanted, table, nr_open):
    soft, hard = entry["soft"], entry["hard"]
    if wanted > nr_open:
        return f"fs.nr_open is {nr_open}: no process can have {wanted}"
    if hard is not None and hard < wanted:
        ppid = table.get(entry["pid"], (None, None, None))[2]
        parent = _proc_nofile(ppid) if ppid else None
        if parent and parent[1] is not None and parent[1] < wanted and not _has_cap_sys_resource(ppid):
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


def nofile(wanted=None, names=None, pidfiles=None, wait=0):
    """
    Report the open-file limits of supervisord and every shadowsocks process
    (``ss-server``, ``ss-local``, ``ss-manager``, ``ss-redir``, ``ssserver``,
    ``sslocal``, ...): soft and hard from ``/proc/<pid>/limits`` against the
    wanted N (pillar ``shadowsocks:tuning:nofile``, else 51200), and for a
    process below N the reason when it can be told (a parent's hard limit
    without CAP_SYS_RESOURCE, ``fs.nr_open``, or a process started before the
    limit was configured). ``pidfiles`` limits the report to the process trees
    of those daemons; ``wait`` seconds gives restarted daemons time to come up.

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile
        salt-call shadowsocks_tuning.nofile 16384 pidfiles='[/var/run/supervisord.pid]'
    """
    where = "wanted"
    if wanted is None:
        wanted, where = _pillar_tuning().get("nofile", NOFILE_DEFAULT), f"pillar {PILLAR}:nofile"
    wanted = validate_nofile(wanted, where)
    if names is None:
        names = (SUPERVISORD_NAME,) + SS_PROCESS_NAMES
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if isinstance(pidfiles, str):
        pidfiles = [pidfiles]
    pidfiles = [_abs_path(p, "pidfiles") for p in (pidfiles or [])]
    wait = _timeout(wait, "wait", 0, 600)
    deadline = time.monotonic() + wait
    while True:
        report = _nofile_report(wanted, set(names), pidfiles)
        if report["ok"] or time.monotonic() >= deadline:
            return report
        time.sleep(0.5)


def _nofile_report(wanted, names, pidfiles):
    table = _process_table()
    scope = None
    if pidfiles:
        roots = [pid for pid in (_pid_from(p) for p in pidfiles) if pid]
        scope = _subtree(table, roots)
    nr_open = _nr_open()
    processes, problems = [], []
    for pid in sorted(table):
        if scope is not None and pid not in scope:
            continue
        name = _match_name(table[pid][0], _proc_argv(pid), names)
        limits = _proc_nofile(pid) if name else None
        if limits is None:
            continue
        soft, hard = limits
        entry = {"pid": pid, "name": name, "soft": soft, "hard": hard,
                 "cap_sys_resource": _has_cap_sys_resource(pid)}
        entry["ok"] = soft is None or soft >= wanted
        if not entry["ok"]:
            entry["reason"] = _why_low(entry, wanted, table, nr_open)
            problems.append(f"{name} (pid {pid}): soft {soft}, hard {hard}: {entry['reason']}")
        processes.append(entry)
    grantable = nofile_grantable()
    return {
        "wanted": wanted,
        "ok": not problems,
        "processes": processes,
        "problems": problems,
        "grantable": grantable,
        "comment": _nofile_comment(wanted, processes, problems, grantable, pidfiles),
    }


def _nofile_comment(wanted, processes, problems, grantable, pidfiles):
    where = f" under {', '.join(pidfiles)}" if pidfiles else ""
    if not processes:
        return f"no supervisord or shadowsocks process is running{where}: nothing to check"
    seen = ", ".join(f"{p['name']}[{p['pid']}] {p['soft']}/{p['hard']}" for p in processes)
    if not problems:
        return f"every process runs with at least {wanted} open files{where}: {seen}"
    lines = [f"{len(problems)} of {len(processes)} process(es){where} run with an open-file limit below {wanted}:"]
    lines.extend(f"- {p}" for p in problems)
    if grantable["limit"] < wanted:
        lines.append(f"Cap here: {grantable['reason']}.")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Services: stop, wait until gone, start (never the init script's `restart`:
# Debian 12's /etc/init.d/supervisor restart only stops supervisord)
# --------------------------------------------------------------------------
def _run_service(argv, timeout):
    """Run one service command with a clean environment; returns (rc, output).
    Output is read through a pipe and kept short; a daemon that keeps the pipe
    open cannot hold this up, as reading stops once the command has exited."""
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=dict(_SERVICE_ENV), close_fds=True, start_new_session=True,
        )
    except OSError as exc:
        raise CommandExecutionError(f"cannot run {' '.join(argv)}: {exc.strerror or exc}")
    kept = bytearray()
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)

    def read():
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return None
        kept.extend(chunk[: max(0, 16384 - len(kept))])
        return chunk

    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise CommandExecutionError(f"`{' '.join(argv)}` did not finish within {timeout} s; it was killed")
            if select.select([fd], [], [], 0.1)[0] and read() == b"":
                # Every writer closed the pipe: just wait for the command itself.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        # The command has exited: take what is already in the pipe, without
        # waiting for a daemon that still holds it (and may write forever).
        for _ in range(64):
            if not select.select([fd], [], [], 0)[0] or not read():
                break
    finally:
        proc.stdout.close()
    return proc.returncode, kept.decode("utf-8", "replace").strip()


def _service_argv(name, action):
    init_dir = _opt("init_dir")
    script = os.path.join(init_dir, name)
    if not os.path.isfile(script):
        raise CommandExecutionError(
            f"service {name}: no init script {script}; install the service, or fix its name in pillar {LIMITS}"
        )
    service = shutil.which(_opt("service_cmd"), path=_SYSTEM_PATH)
    if init_dir == DEFAULTS["init_dir"] and service:
        return [service, name, action]
    return [script, action]


def _sysv_running(name, pidfile):
    """The daemon's pid (from its pidfile), True (status exit 0), or None."""
    if pidfile:
        pid = _pid_from(pidfile)
        return pid if pid and _alive(pid) else None
    rc, _ = _run_service(_service_argv(name, "status"), 30)
    return True if rc == 0 else None


def _sysv_stopped(name, pidfile, old):
    if isinstance(old, int) and not isinstance(old, bool):
        stat = _proc_stat(old)
        # A zombie still named by its pidfile makes start-stop-daemon think it runs.
        return stat is None or (stat[1] == "Z" and _pid_from(pidfile) != old)
    return _sysv_running(name, pidfile) is None


def _wait_for(predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def _describe_run(argv, rc, output):
    return f"`{' '.join(argv)}` exited {rc}" + (f": {output[-600:]}" if output else "")


def _sysv_stop_start(name, pidfile, when, timeout, test):
    running = _sysv_running(name, pidfile)
    old = f"running (pid {running})" if running not in (None, True) else ("running" if running else "stopped")
    result = {"name": name, "changed": False, "old": old, "new": old}
    if when == "never":
        result["comment"] = f"{name}: restart is off (restart: never); stop and start it yourself for the new limit"
        return result
    if running is None and when == "running":
        result["comment"] = f"{name} is not running: left stopped (it gets the new limit when it starts)"
        return result
    if test:
        result.update(changed=True, new="stopped and started",
                      comment=f"{name} would be stopped and started (service {name} stop, then start)")
        return result
    if running is not None:
        argv = _service_argv(name, "stop")
        rc, output = _run_service(argv, timeout)
        if rc != 0:
            raise CommandExecutionError(
                f"service {name} could not be stopped: {_describe_run(argv, rc, output)}; it still runs with its old limit"
            )
        if not _wait_for(lambda: _sysv_stopped(name, pidfile, running), timeout):
            raise CommandExecutionError(
                f"service {name} still runs {timeout} s after `stop`; not started again, check it by hand"
            )
    argv = _service_argv(name, "start")
    rc, output = _run_service(argv, timeout)
    if rc != 0:
        raise CommandExecutionError(f"service {name} failed to start: {_describe_run(argv, rc, output)}")
    now = _wait_for(lambda: _sysv_running(name, pidfile), timeout)
    if not now:
        raise CommandExecutionError(
            f"service {name} failed to start: not running {timeout} s after {_describe_run(argv, rc, output)}"
        )
    result.update(changed=True, new=f"running (pid {now})" if now is not True else "running",
                  comment=f"{name} stopped and started")
    return result


def _systemctl():
    binary = shutil.which(_opt("systemctl"), path=_SYSTEM_PATH)
    if binary is None:
        raise CommandExecutionError("systemctl not found, although systemd was chosen (pillar "
                                    f"{LIMITS}:init_system); set it to sysvinit or auto")
    return binary


def _systemd_restart(unit, when, timeout, test):
    unit = _unit_name(unit, "unit")
    template = unit.endswith("@.service")
    target = unit[: -len("@.service")] + "@*.service" if template else unit
    result = {"name": unit, "changed": False, "old": None, "new": None}
    if when == "never":
        result["comment"] = f"{unit}: restart is off (restart: never); run systemctl daemon-reload and restart it yourself"
        return result
    systemctl = _systemctl()
    if when == "running" and not template:
        rc, _ = _run_service([systemctl, "is-active", "--quiet", "--", unit], timeout)
        if rc != 0:
            argv = [systemctl, "daemon-reload"]
            if not test:
                rc, output = _run_service(argv, timeout)
                if rc != 0:
                    raise CommandExecutionError(f"{unit}: {_describe_run(argv, rc, output)}")
            result["comment"] = f"{unit} is not active: systemd reloaded, unit left stopped"
            return result
    # A template's instances are matched by pattern; only loaded (running) ones restart.
    action = "try-restart" if when == "running" or template else "restart"
    commands = [[systemctl, "daemon-reload"], [systemctl, action, "--", target]]
    if test:
        result.update(changed=True, new="restarted",
                      comment=f"would run: {'; '.join(' '.join(c[1:]) for c in commands)}")
        return result
    for argv in commands:
        rc, output = _run_service(argv, timeout)
        if rc != 0:
            raise CommandExecutionError(f"{unit} failed to restart: {_describe_run(argv, rc, output)}")
    result.update(changed=True, new="restarted", comment=f"{target}: daemon-reload, {action}")
    return result


def stop_start(name, pidfile=None, when="running", init="auto", timeout=30, test=False):
    """
    Stop a service, wait until it is really gone, then start it, so that it
    comes back with the open-file limit now configured. Never the init
    script's ``restart``: Debian 12's ``/etc/init.d/supervisor restart`` only
    stops supervisord. Under systemd: ``daemon-reload`` then ``restart``
    (``try-restart`` for template units, by pattern).

    name
        The service (sysvinit: ``/etc/init.d/NAME``) or unit (systemd).
    pidfile
        The daemon's pidfile: tells whether it runs and when it is gone more
        reliably than an init script's ``status``.
    when
        ``running`` (default: only a running service), ``always`` (start it
        even if it was stopped), ``never``.
    init
        ``auto``, ``systemd`` or ``sysvinit`` (see ``init_system``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.stop_start supervisor pidfile=/var/run/supervisord.pid test=True
    """
    when = _choice(when, RESTART_WHEN, "when")
    timeout = _timeout(timeout, "timeout")
    if pidfile is not None:
        pidfile = _abs_path(pidfile, "pidfile")
    if init_system(init) == "systemd":
        return _systemd_restart(name, when, timeout, test)
    return _sysv_stop_start(_service_name(name, "name"), pidfile, when, timeout, test)


# --------------------------------------------------------------------------
# Everything at once, before anything is written
# --------------------------------------------------------------------------
def _unknown_fields(data, section, where, errors):
    allowed = _LIMITS_FIELDS[section]
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        errors.append(f"{where}: unknown field(s) {', '.join(map(str, unknown))} (allowed: {', '.join(allowed)})")


def _collect(errors, func, *args):
    try:
        return func(*args)
    except (SaltInvocationError, CommandExecutionError) as exc:
        errors.append(str(exc))
        return None


def _limits_targets(limits, errors):
    """Normalise pillar shadowsocks:tuning:limits into the files, units and
    services it names, collecting every error instead of stopping at one."""
    out = {"init": "auto", "files": [], "units": [], "services": []}
    if limits is None:
        return out
    if not isinstance(limits, dict):
        errors.append(f"pillar {LIMITS} must be a mapping (supervisor, shadowsocks_libev, init_scripts, units, ...)")
        return out
    _unknown_fields(limits, "", f"pillar {LIMITS}", errors)
    out["init"] = limits.get("init_system", "auto")
    _collect(errors, init_system, out["init"])
    _collect(errors, _choice, limits.get("restart", "running"), RESTART_WHEN, f"pillar {LIMITS}:restart")
    _collect(errors, _timeout, limits.get("timeout", 30), f"pillar {LIMITS}:timeout")

    def section(name):
        data = limits.get(name) or {}
        if not isinstance(data, dict):
            errors.append(f"pillar {LIMITS}:{name} must be a mapping ({', '.join(_LIMITS_FIELDS[name])})")
            return {}
        _unknown_fields(data, name, f"pillar {LIMITS}:{name}", errors)
        return data

    def service(data, where):
        if data.get("service"):
            _collect(errors, _service_name, data["service"], f"{where}:service")
        if data.get("pidfile"):
            _collect(errors, _abs_path, data["pidfile"], f"{where}:pidfile")

    def add_file(kind, path, where, required, **extra):
        path = _collect(errors, _abs_path, path, where)
        if path:
            out["files"].append(dict(kind=kind, path=path, where=where, required=required, **extra))

    def add_units(units, where):
        if not isinstance(units, list):
            errors.append(f"{where} must be a list of unit names")
            return
        for index, unit in enumerate(units):
            name = _collect(errors, _unit_name, unit, f"{where}[{index}]")
            if name and name not in out["units"]:
                out["units"].append(name)

    sup = section("supervisor")
    where = f"pillar {LIMITS}:supervisor"
    service(sup, where)
    if sup.get("defaults_file"):
        add_file("ulimit", sup["defaults_file"], f"{where}:defaults_file", False, placement="end")
    if sup.get("config"):
        add_file("minfds", sup["config"], f"{where}:config", False)
    if sup.get("unit"):
        add_units([sup["unit"]], f"{where}:unit")

    ssl = section("shadowsocks_libev")
    where = f"pillar {LIMITS}:shadowsocks_libev"
    service(ssl, where)
    if ssl.get("defaults_file"):
        add_file("assignment", ssl["defaults_file"], f"{where}:defaults_file", False, key="MAXFD")
    add_units(ssl.get("units") or [], f"{where}:units")

    scripts = limits.get("init_scripts") or []
    if not isinstance(scripts, list):
        errors.append(f"pillar {LIMITS}:init_scripts must be a list of paths or {{path, service, pidfile}} mappings")
        scripts = []
    for index, item in enumerate(scripts):
        where = f"pillar {LIMITS}:init_scripts[{index}]"
        item = item if isinstance(item, dict) else {"path": item}
        _unknown_fields(item, "init_scripts", where, errors)
        service(item, where)
        add_file("ulimit", item.get("path"), f"{where}:path", True, placement="init")
    add_units(limits.get("units") or [], f"pillar {LIMITS}:units")

    verify = section("verify")
    pidfiles = verify.get("pidfiles") or []
    if not isinstance(pidfiles, list):
        errors.append(f"pillar {LIMITS}:verify:pidfiles must be a list of pidfile paths")
        pidfiles = []
    for index, pidfile in enumerate(pidfiles):
        _collect(errors, _abs_path, pidfile, f"pillar {LIMITS}:verify:pidfiles[{index}]")
    _collect(errors, _timeout, verify.get("wait", 10), f"pillar {LIMITS}:verify:wait", 0, 600)
    return out


def nofile_check(nofile=None, limits=None):
    """
    Validate the open-file-limit settings as a whole before anything is
    written: N (a positive integer, at most ``fs.nr_open``), every path,
    service and unit name, the content of every file to edit (an init script
    that is not a shell script, a ``ulimit`` line too complex to rewrite, a
    supervisord config without ``[supervisord]``), missing init scripts, and
    whether this process can grant N at all to the services it restarts (its
    hard limit without CAP_SYS_RESOURCE). Returns ``{"ok", "nofile",
    "init_system", "manage", "skipped", "errors", "notes"}``; writes nothing.
    Arguments left out come from pillar ``shadowsocks:tuning:nofile`` and
    ``:limits`` (the SLS passes them merged with ``defaults.yaml``).

    CLI Example:

    .. code-block:: bash

        salt-call shadowsocks_tuning.nofile_check
        salt-call shadowsocks_tuning.nofile_check 16384 '{init_scripts: [/etc/init.d/shadowsocks]}'
    """
    errors, notes, manage, skipped = [], [], [], []
    data = _collect(errors, _pillar_tuning) or {}
    if nofile is None:
        nofile = data.get("nofile", NOFILE_DEFAULT)
    if limits is None:
        limits = data.get("limits") or {}
    number = _collect(errors, validate_nofile, nofile, f"pillar {PILLAR}:nofile")
    targets = _limits_targets(_plain(limits), errors)
    system = _collect([], init_system, targets["init"]) or "sysvinit"
    for target in targets["files"]:
        path = target["path"]
        text = _collect(errors, _read_managed, path)
        if text is None:
            if target["required"]:
                errors.append(
                    f"{target['where']}: {path} does not exist; install that service's init script, or remove it "
                    f"from pillar {LIMITS}:init_scripts"
                )
            else:
                skipped.append(f"{path} (not installed)")
            continue
        manage.append(path)
        if number is None:
            continue
        if target["kind"] == "ulimit":
            _collect(errors, _render_ulimit, text, number, path, target["placement"])
        elif target["kind"] == "minfds":
            _collect(errors, _render_minfds, text, number, path)
    if system == "systemd":
        for unit in targets["units"]:
            if _unit_file(unit):
                manage.append(f"{unit} drop-in {dropin_path(unit)}")
            else:
                skipped.append(f"{unit} (not installed)")
    grantable = nofile_grantable()
    if number is not None and system == "sysvinit" and manage and number > grantable["limit"]:
        errors.append(
            f"nofile {number} cannot be granted here: {grantable['reason']}: `ulimit -n {number}` fails in the "
            f"services it restarts and supervisord refuses minfds={number} above its hard limit. Nothing was "
            f"changed; lower pillar {PILLAR}:nofile to {grantable['limit']} or less, or run salt with "
            "CAP_SYS_RESOURCE"
        )
    if skipped:
        notes.append("not installed, left alone: " + ", ".join(skipped))
    return {
        "ok": not errors,
        "nofile": number,
        "init_system": system,
        "grantable": grantable["limit"],
        "manage": manage,
        "skipped": skipped,
        "errors": errors,
        "notes": notes,
    }
