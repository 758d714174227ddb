"""
What this package knows about sysctls, and its profiles: the one source of
truth that the settings, the engines, the states and the docs all read.

Pure data and pure functions (no Salt dunders, no I/O): validate a key name,
bring a value into the kernel's text form, and the one "never worse than what
is there" rule that both sysctls and open-file limits follow.
"""

import re

from salt.exceptions import SaltInvocationError

# The catalogue: everything this package knows about a key.
#
#   type      int | triple | range | word
#   scope     netns (per network namespace) | global (host only; a container
#             sees it absent or read-only)
#   min, max  bounds of each integer field
#   more      per field, which way is more capacity: "up" (higher is more)
#             or "down" (the low end of a port range). A key with `more` is
#             never made worse than the running kernel has it, unless a
#             profile lowers it on purpose (`lower`) or pillar forces it.
#   removed   kernel (major, minor) that removed the key
#   refuse    {value: why} values refused outright
#   module    word value -> kernel module prefix that provides it
#   doc       what it does, shown by `catalogue` and `explain`
#   source    where the kernel's behaviour behind `more` is documented
# --------------------------------------------------------------------------
INT_MAX = 2**31 - 1
LONG_MAX = 2**63 - 1


def _key(type_, scope, doc, lo=0, hi=INT_MAX, **extra):
    spec = {"type": type_, "scope": scope, "min": lo, "max": hi, "doc": doc}
    spec.update(extra)
    return spec


UP, DOWN = "up", "down"
TRIPLE_UP = (UP, UP, UP)

CATALOGUE = {
    "fs.file-max": _key("int", "global", "system-wide maximum of open files", 1, LONG_MAX, more=(UP,),
                        source="RAM-derived by the kernel (files_maxfiles_init); systemd may set LONG_MAX"),
    "fs.nr_open": _key("int", "global", "per-process ceiling for RLIMIT_NOFILE", 1024, INT_MAX, more=(UP,)),
    "net.core.rmem_max": _key("int", "global", "maximum socket receive buffer an application may ask for (bytes)",
                              4096, INT_MAX, more=(UP,), source="socket(7): caps SO_RCVBUF; TCP autotuning follows tcp_rmem"),
    "net.core.wmem_max": _key("int", "global", "maximum socket send buffer an application may ask for (bytes)",
                              4096, INT_MAX, more=(UP,), source="socket(7): caps SO_SNDBUF; TCP autotuning follows tcp_wmem"),
    "net.core.rmem_default": _key("int", "global", "default socket receive buffer, UDP relay sockets included (bytes)",
                                  4096, INT_MAX, more=(UP,), source="socket(7)"),
    "net.core.wmem_default": _key("int", "global", "default socket send buffer, UDP relay sockets included (bytes)",
                                  4096, INT_MAX, more=(UP,), source="socket(7)"),
    "net.core.netdev_max_backlog": _key("int", "global", "maximum processor input queue", 1, INT_MAX, more=(UP,)),
    "net.core.somaxconn": _key("int", "netns", "maximum listen() backlog", 1, INT_MAX, more=(UP,),
                               source="4096 by default since Linux 5.4 (Documentation/networking/ip-sysctl.rst)"),
    "net.core.default_qdisc": _key("word", "global", "queueing discipline of new interfaces", module="sch_"),
    "net.ipv4.tcp_syncookies": _key("int", "netns", "SYN cookies against SYN floods", 0, 2),
    "net.ipv4.tcp_tw_reuse": _key("int", "netns", "reuse TIME-WAIT sockets for new outbound connections "
                                  "(2: loopback only, the default; 1: all)", 0, 2),
    "net.ipv4.tcp_tw_recycle": _key(
        "int", "netns", "fast TIME-WAIT recycling (removed in Linux 4.12)", 0, 1,
        removed=(4, 12),
        refuse={"1": "it drops connections from clients behind NAT; the key was removed in Linux 4.12"},
    ),
    "net.ipv4.tcp_fin_timeout": _key("int", "netns", "seconds an orphaned connection stays in FIN-WAIT-2", 1, INT_MAX),
    "net.ipv4.tcp_keepalive_time": _key("int", "netns", "seconds before the first keepalive probe", 1, 32767),
    "net.ipv4.ip_local_port_range": _key("range", "netns", "ports used for outbound connections", 1, 65535,
                                         more=(DOWN, UP),
                                         source="ends of different parity let connect() and bind() split the range "
                                                "(kernel commit ed2dfd900992, cited, not checked here)"),
    "net.ipv4.ip_local_reserved_ports": _key("ports", "netns", "ports never picked for outbound connections: the "
                                             "ports shadowsocks listens on", 1, 65535),
    "net.ipv4.tcp_max_syn_backlog": _key("int", "netns", "queue of half-open connections", 1, INT_MAX, more=(UP,)),
    "net.ipv4.tcp_max_tw_buckets": _key("int", "netns", "maximum TIME-WAIT sockets", 0, INT_MAX, more=(UP,),
                                        source="scales with RAM (tcp_init); lower gives 'time wait bucket table overflow'"),
    "net.ipv4.tcp_fastopen": _key("int", "netns", "TCP Fast Open (1 client, 2 server, 3 both)", 0, 0xFFFF),
    "net.ipv4.tcp_rmem": _key("triple", "netns", "TCP receive buffer: min default max (bytes)", 1, INT_MAX,
                              more=TRIPLE_UP, source="the default field is 131072 on recent kernels"),
    "net.ipv4.tcp_wmem": _key("triple", "netns", "TCP send buffer: min default max (bytes)", 1, INT_MAX,
                              more=TRIPLE_UP),
    "net.ipv4.tcp_mtu_probing": _key("int", "netns", "packetization-layer path MTU discovery", 0, 2),
    "net.ipv4.tcp_notsent_lowat": _key("int", "netns", "unsent bytes a socket may queue before it is not writable; "
                                       "16384 is BBR's usual companion", 1, 2**32 - 1),
    "net.ipv4.tcp_congestion_control": _key("word", "netns", "congestion control of new connections", module="tcp_"),
}

CONGESTION_KEY = "net.ipv4.tcp_congestion_control"
RESERVED_PORTS_KEY = "net.ipv4.ip_local_reserved_ports"

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

# The recipe, corrected only where a 2014 line is wrong on any kernel: the
# port range gets ends of different parity (the kernel warns on the same
# parity), and the ports shadowsocks listens on are reserved from it.
BASE = dict(RECIPE, **{
    "net.ipv4.ip_local_port_range": "10000 65001",
    "net.ipv4.ip_local_reserved_ports": [],  # merged with what is there and the shadowsocks ports found
})

# A profile: `sysctls`, optionally `include` (a parent), `lower` ({key: why}:
# this profile lowers that key below the running kernel on purpose; for a
# triple only its max field) and `kernel_default` (keys whose value is just
# the kernel's default: a different live value chosen by the admin is kept).
PROFILES = {
    "high-latency": {
        "description": "the Optimizing Shadowsocks recipe, with hybla for long, lossy paths",
        "sysctls": BASE,
    },
    "low-latency": {
        "description": "the recipe with the kernel's default congestion control (cubic), for short paths",
        "include": "high-latency",
        "sysctls": {CONGESTION_KEY: "cubic"},
        "kernel_default": [CONGESTION_KEY],
    },
    "low-memory": {
        "description": "low-latency with tcp_notsent_lowat 16384 and an 8 MiB send ceiling: about a third of the "
                       "kernel buffer memory busy slow clients hold; many streams on a lossy path lose up to a fifth "
                       "of their throughput (bench/effect)",
        "include": "low-latency",
        "sysctls": {
            "net.core.rmem_max": 4194304,
            "net.core.wmem_max": 4194304,
            "net.ipv4.tcp_notsent_lowat": 16384,
            "net.ipv4.tcp_wmem": "4096 16384 8388608",
        },
        "lower": {
            # Global caps on what a program asks for with SO_RCVBUF/SO_SNDBUF
            # (ss-server asks for none; TCP autotuning follows tcp_rmem/tcp_wmem).
            "net.core.rmem_max": "4 MiB ceiling for buffers a program asks for: bounds kernel memory on a small VPS",
            "net.core.wmem_max": "4 MiB ceiling for buffers a program asks for: bounds kernel memory on a small VPS",
            # Measured (bench/effect): 8 MiB fills one stream at 100 ms; 16 MiB or
            # more let 8 BBR flows overfill a 400 Mbit/s bottleneck.
            "net.ipv4.tcp_wmem": "8 MiB send ceiling: enough for one stream at 100 ms, not so much that many streams "
                                 "overfill the path",
        },
        "reasons": {
            # Where the memory of busy slow clients goes: data ss-server has
            # read from upstream and not yet sent (about 650 KB a connection
            # with the kernel's defaults).
            "net.ipv4.tcp_notsent_lowat": "a socket with more than 16 KiB unsent stops being writable, so ss-server "
                                          "stops reading upstream for a slow client: about 38 KB a busy connection "
                                          "instead of about 650 KB (bench/effect)",
            "net.ipv4.tcp_wmem": "the kernel's default field, 16384: a socket grows its buffer when it needs to",
        },
    },
    "bbr": {
        "description": "low-latency with BBR, the fq qdisc it is paced with, and tcp_notsent_lowat 16384 (Linux >= 4.9)",
        "include": "low-latency",
        "sysctls": {"net.core.default_qdisc": "fq", CONGESTION_KEY: "bbr", "net.ipv4.tcp_notsent_lowat": 16384},
    },
}
DEFAULT_PROFILE = "low-latency"

# What each built-in profile buys, as measured by bench/effect (client ->
# ss-local -> a 50-100 ms delay line -> ss-server, 1000 busy slow clients,
# 2000 idle ones): the `what_it_buys` lines of bench/results/effect.json, which
# tests/unit/test_catalogue.py holds this table to. `explain` shows them.
EFFECTS_MEASURED = "bench/effect, 2026-12-05 15:48 UTC, commit 833d32c"
EFFECTS = {
    "high-latency": ("not applied here: 'hybla' is not available (available: reno bbr cubic); modprobe tcp_hybla"
        " failed: exit 1. Load tcp_hybla, choose another profile (low-latency uses cubic), or set "
        "pillar shadowsocks:tuning:congestion_fallback"),
    "low-latency": ("1.6x single-stream throughput at 100 ms, 0.97x 8-stream throughput at 100 ms, 1.2x the "
        "kernel socket memory of ss-server with 1000 busy clients, ss-server RSS 1x, ss-server RSS "
        "0.98x with 2000 idle connections"),
    "low-memory": ("1.6x single-stream throughput at 100 ms, 0.96x 8-stream throughput at 100 ms, 0.34x the "
        "kernel socket memory of ss-server with 1000 busy clients, ss-server RSS 1x, ss-server RSS "
        "0.98x with 2000 idle connections"),
    "bbr": ("1.5x single-stream throughput at 100 ms, 0.93x 8-stream throughput at 100 ms, 0.3x the "
        "kernel socket memory of ss-server with 1000 busy clients, ss-server RSS 1x, ss-server RSS "
        "1x with 2000 idle connections"),
}

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
    elif kind == "ports":
        text = ports_text(parse_ports(value, f"{where}{key}"))
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
    if isinstance(value, dict):
        # Nested YAML under a directory of sysctls: each setting needs its full name.
        first = next(iter(value), "KEY")
        raise SaltInvocationError(
            f"{where}{key}: {value!r} is a mapping, not a value: name each setting in full, e.g. "
            f"{key}.{first}: {value.get(first)!r}")
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    text = normalise_live(str(value))
    if not text or len(text) > 1024 or not all(32 < ord(c) < 127 or c == " " for c in text) or "=" in text or "#" in text:
        raise SaltInvocationError(
            f"{where}{key}: {value!r} is not a plain printable value (no newlines, '=', '#' or control characters)"
        )
    return text




_PORT_ITEM = re.compile(r"^([0-9]{1,5})(?:-([0-9]{1,5}))?\Z")


def parse_ports(value, where="ports"):
    """A set of ports from ``8388``, ``"8388,9000-9010"`` (the kernel's form)
    or a list of ports and ``"a-b"`` ranges."""
    if isinstance(value, bool) or value is None:
        raise SaltInvocationError(f"{where}: {value!r} is not a port list such as [8388, '9000-9010']")
    if isinstance(value, int):
        items = [str(value)]
    elif isinstance(value, str):
        items = [item.strip() for item in value.replace(" ", ",").split(",") if item.strip()]
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise SaltInvocationError(f"{where}: {item!r} is not a port or a range 'a-b'")
            items.append(str(item).strip())
    else:
        raise SaltInvocationError(f"{where}: {value!r} is not a port list such as [8388, '9000-9010']")
    ports = set()
    for item in items:
        match = _PORT_ITEM.match(item)
        low = int(match.group(1)) if match else 0
        high = int(match.group(2) or low) if match else 0
        if not match or not 1 <= low <= high <= 65535:
            raise SaltInvocationError(f"{where}: {item!r} is not a port (1..65535) or a range 'a-b' with a <= b")
        ports.update(range(low, high + 1))
    return ports


def ports_text(ports):
    """The kernel's form of a port set: ``8388,9000-9010`` (empty: ``""``)."""
    out, ordered = [], sorted(ports)
    start = prev = None
    for port in ordered + [None]:
        if port is not None and prev is not None and port == prev + 1:
            prev = port
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = port
    return ",".join(out)


def absent_is_satisfied(key, text):
    """Wanting `0` of a key the kernel removed (tcp_tw_recycle) is already true."""
    return "removed" in CATALOGUE.get(key, {}) and text == "0"


def keep_higher(key, wanted, live, lower=False, directions=None):
    """The one "never worse than what is there" rule, for sysctls and open-file
    limits in files alike: returns ``(target, kept)``. Each field of
    ``wanted`` that would give less capacity than ``live`` (by the
    catalogue's `more` directions) is kept at its live value; ``kept`` names
    those fields (``("default 131072",)``; a plain number: ``("32768",)``),
    empty when none was kept. ``lower`` lets the ceiling field go down (a
    profile's documented choice): the max of a triple, the value of a plain
    key. ``key`` None means plain numbers, higher is more, unless
    ``directions`` says otherwise (an open-file limit: soft and hard).
    ``kept_note`` words the result."""
    if wanted == live:  # the usual re-run: nothing to weigh
        return wanted, ()
    if directions is None:
        directions = CATALOGUE.get(key, {}).get("more") if key else (UP,) * len(str(wanted).split())
    if not directions or live is None:
        return wanted, ()
    try:
        want = [int(x) for x in str(wanted).split()]
        have = [int(x) for x in str(live).split()]
    except ValueError:
        return wanted, ()
    if len(want) != len(directions) or len(have) != len(directions):
        return wanted, ()
    target, kept = [], []
    for index, (w, h, more) in enumerate(zip(want, have, directions)):
        ceiling = index == len(directions) - 1
        worse = (w < h) if more == UP else (w > h)
        if worse and not (lower and ceiling):
            target.append(h)
            kept.append(f"{_FIELDS.get(len(directions), ('',))[index]}{h}".strip())
        else:
            target.append(w)
    if not kept:
        return wanted, ()
    return " ".join(str(n) for n in target), tuple(kept)


def kept_note(wanted, live, target, kept):
    """What ``keep_higher`` kept, in words: ``kept 2466177 (the profile's
    51200 would be less)`` or ``kept default 131072 of 4096 131072 33554432
    (...)``."""
    if target == str(live):
        return f"kept {live} (the profile's {wanted} would be less)"
    return f"kept {', '.join(kept)} of {live} (the profile's {wanted} would be less)"


_FIELDS = {1: ("",), 2: ("low ", "high "), 3: ("min ", "default ", "max ")}
LIMIT_FIELDS = ("soft", "hard")


def describe():
    """The catalogue as plain data for output: removal versions as text, and
    `capacity` (never made worse than the kernel has it) where `more` is set."""
    out = {}
    for key, spec in CATALOGUE.items():
        entry = dict(spec)
        if "removed" in entry:
            entry["removed"] = "%d.%d" % entry["removed"]
        if "more" in entry:
            entry["more"] = list(entry["more"])
            entry["capacity"] = True
        out[key] = entry
    return out
