"""
What this package knows about sysctls, and its profiles: the one source of
truth that the settings, the engines, the states and the docs all read.

Pure data and pure functions (no Salt dunders, no I/O): validate a key name,
bring a value into the kernel's text form, and the one "keep the higher value"
rule that both sysctls and open-file limits follow.
"""

import re

from salt.exceptions import SaltInvocationError

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

# Dot-separated segments; the kernel's own names (interfaces under conf/,
# neigh/) may hold capitals, '@', ':' and '+'. No '/', no '..', no blanks.
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_@:+-]*\Z")  # \Z: `$` would let a trailing newline through
_TOP_LEVEL = ("abi", "crypto", "debug", "dev", "fs", "kernel", "net", "sunrpc", "user", "vm")
_WORD = re.compile(r"^[a-z0-9_]{1,32}\Z")
_INT = re.compile(r"^[+]?[0-9]{1,20}\Z")



def validate_key(key):
    """
    Check that ``key`` is a well-formed sysctl name and return it.

    Dot-separated segments of letters, digits, ``_``, ``-`` (plus ``@ : +``
    found in kernel interface names) under a known top-level directory; never
    ``/``, ``..``, blanks or control characters, so a key can never name a path
    outside ``/proc/sys``.
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


def normalise_live(text):
    """The kernel's text with runs of blanks and tabs folded: `4096\t87380` -> `4096 87380`."""
    return " ".join(text.split())


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
    kernel's canonical text form (``4096 87380 67108864``). ``where`` prefixes
    every message (``pillar shadowsocks:tuning:sysctls: ``).
    """
    spec = CATALOGUE.get(key)
    if spec is None:  # catalogue keys are well-formed by definition
        try:
            validate_key(key)
        except SaltInvocationError as exc:
            raise SaltInvocationError(f"{where}{exc}") from None
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
    text = normalise_live(str(value))
    if not text or len(text) > 1024 or not all(32 < ord(c) < 127 or c == " " for c in text) or "=" in text or "#" in text:
        raise SaltInvocationError(
            f"{where}{key}: {value!r} is not a plain printable value (no newlines, '=', '#' or control characters)"
        )
    return text




def absent_is_satisfied(key, text):
    """Wanting `0` of a key the kernel removed (tcp_tw_recycle) is already true."""
    return "removed" in CATALOGUE.get(key, {}) and text == "0"


def keep_higher(key, wanted, live):
    """The one "keep the higher value" rule, for capacity sysctls and open-file
    limits alike: returns (target, note). ``target`` is ``wanted``, except
    that a limit already above it is kept (for a triple only its max field);
    ``note`` says what was kept, or is None. ``key`` None means a plain
    number (an open-file limit in a file)."""
    spec = CATALOGUE.get(key, {}) if key else {"capacity": True, "type": "int"}
    if not spec.get("capacity") or live is None:
        return wanted, None
    try:
        want = [int(x) for x in str(wanted).split()]
        have = [int(x) for x in str(live).split()]
    except ValueError:
        return wanted, None
    label = f"{key}: " if key else ""
    if spec["type"] == "triple" and len(have) == 3 and len(want) == 3:
        if have[2] > want[2]:
            return f"{want[0]} {want[1]} {have[2]}", f"{label}kept max {have[2]} (higher than {want[2]})"
        return wanted, None
    if len(have) == 1 and len(want) == 1 and have[0] > want[0]:
        return str(live), f"{label}kept {live} (higher than {wanted})"
    return wanted, None


def describe():
    """The catalogue as plain data for output: removal versions as text."""
    out = {}
    for key, spec in CATALOGUE.items():
        entry = dict(spec)
        if "removed" in entry:
            entry["removed"] = "%d.%d" % entry["removed"]
        out[key] = entry
    return out
