"""
Diagnose: what a busy shadowsocks server is short of, told by the kernel's
own numbers, each with the limit involved and the pillar key that raises it.

Reads (nothing is written but the sample): open files of every shadowsocks
process (and its plugin children) and supervisord against their soft
``RLIMIT_NOFILE``; ``fs.file-nr`` against ``fs.file-max``; the TcpExt
counters of ``/proc/net/netstat`` and the Udp ones of ``/proc/net/snmp``;
the TCP memory of ``/proc/net/sockstat`` against ``net.ipv4.tcp_mem``;
conntrack entries against ``nf_conntrack_max``; managed sysctls against the
value the package applied (``originals.json`` says which keys it changed,
the managed sysctl.d file the value it set).

A counter's change needs an earlier sample: ``diagnose`` keeps the last one
in ``<state_dir>/diagnose.json`` (written atomically, links refused, read
back validated); the beacon keeps its own in memory. Per-namespace counters
come from ``<proc_root>/../net``, so inside a container (a network
namespace) the numbers are the container's. No Salt here: plain values in,
plain values out.
"""

import json
import os
import time

import sstuning_journal as journal
import sstuning_procfs as procfs
import sstuning_sysctld as sysctld
import sstuning_daemons as daemons
from sstuning_settings import PILLAR

SAMPLE_NAME = "diagnose.json"
SAMPLE_VERSION = 1
SEVERITIES = ("ok", "warning", "critical")
HEADROOM = 20  # percent of a limit left under which a finding is a warning
CRITICAL_HEADROOM = 5  # ... and critical

_NOFILE = f"{PILLAR}:nofile"
_APPLY = "then state.apply shadowsocks.tuning"


def _sysctl(key):
    return f"{PILLAR}:sysctls:{key}"


# Counters whose rise means clients are being hurt: (file section, name) ->
# what it means, the limit behind it, the pillar key that addresses it, and
# the severity of a rise.
COUNTERS = {
    ("TcpExt", "ListenOverflows"): {
        "symptom": "a listen queue was full: new connections were dropped before the daemon accepted them",
        "limits": ("net.core.somaxconn",), "pillar": _sysctl("net.core.somaxconn"), "rise": "critical",
        "fix": "raise net.core.somaxconn (the daemon's own listen backlog caps it too)"},
    ("TcpExt", "ListenDrops"): {
        "symptom": "connection requests to a listening socket were dropped",
        "limits": ("net.core.somaxconn", "net.ipv4.tcp_max_syn_backlog"),
        "pillar": _sysctl("net.ipv4.tcp_max_syn_backlog"), "rise": "critical",
        "fix": "raise net.ipv4.tcp_max_syn_backlog and net.core.somaxconn"},
    ("TcpExt", "TCPTimeWaitOverflow"): {
        "symptom": "time wait bucket table overflow: connections closed without TIME-WAIT",
        "limits": ("net.ipv4.tcp_max_tw_buckets",), "pillar": _sysctl("net.ipv4.tcp_max_tw_buckets"),
        "rise": "warning",
        "fix": "raise net.ipv4.tcp_max_tw_buckets (the recipe's 5000 lowers the kernel's RAM-derived value)"},
    ("TcpExt", "TCPMemoryPressures"): {
        "symptom": "TCP entered memory pressure: socket buffers were shrunk",
        "limits": ("net.ipv4.tcp_mem",), "pillar": _sysctl("net.ipv4.tcp_mem"), "rise": "warning",
        "fix": "raise net.ipv4.tcp_mem, or lower the buffer ceilings with profile low-memory"},
    ("TcpExt", "TCPAbortOnMemory"): {
        "symptom": "connections were aborted for lack of TCP memory",
        "limits": ("net.ipv4.tcp_mem",), "pillar": _sysctl("net.ipv4.tcp_mem"), "rise": "critical",
        "fix": "raise net.ipv4.tcp_mem, or lower the buffer ceilings with profile low-memory"},
    ("TcpExt", "TCPFastOpenBlackhole"): {
        "symptom": "TCP Fast Open was turned off after a middlebox dropped its packets (blackhole)",
        "limits": ("net.ipv4.tcp_fastopen",), "pillar": _sysctl("net.ipv4.tcp_fastopen"), "rise": "warning",
        "fix": "set net.ipv4.tcp_fastopen to 2 (server only) if clients sit behind such middleboxes"},
    ("TcpExt", "TCPFastOpenActiveFail"): {
        "symptom": "outgoing TCP Fast Open attempts fell back to a normal handshake",
        "limits": ("net.ipv4.tcp_fastopen",), "pillar": _sysctl("net.ipv4.tcp_fastopen"), "rise": "warning",
        "fix": "the path drops SYN data: set net.ipv4.tcp_fastopen without the client bit (2)"},
    ("TcpExt", "TCPFastOpenPassiveFail"): {
        "symptom": "incoming TCP Fast Open requests fell back to a normal handshake",
        "limits": ("net.ipv4.tcp_fastopen",), "pillar": _sysctl("net.ipv4.tcp_fastopen"), "rise": "warning",
        "fix": "bad or stale cookies: check net.ipv4.tcp_fastopen on server and clients"},
    ("TcpExt", "TCPFastOpenListenOverflow"): {
        "symptom": "the TCP Fast Open queue of a listener was full: those requests fell back",
        "limits": ("net.ipv4.tcp_fastopen",), "pillar": _sysctl("net.ipv4.tcp_fastopen"), "rise": "warning",
        "fix": "the daemon's fast-open queue length caps it (ss-server --fast-open)"},
    ("Udp", "RcvbufErrors"): {
        "symptom": "UDP datagrams were dropped: a socket receive buffer was full",
        "limits": ("net.core.rmem_default", "net.core.rmem_max"), "pillar": _sysctl("net.core.rmem_default"),
        "rise": "warning", "fix": "raise net.core.rmem_default (a global key: set it on the host)"},
    ("Udp", "SndbufErrors"): {
        "symptom": "UDP datagrams were dropped: a socket send buffer was full",
        "limits": ("net.core.wmem_default", "net.core.wmem_max"), "pillar": _sysctl("net.core.wmem_default"),
        "rise": "warning", "fix": "raise net.core.wmem_default (a global key: set it on the host)"},
    ("Udp", "InErrors"): {
        "symptom": "UDP datagrams were dropped on receipt (full buffers or bad checksums)",
        "limits": ("net.core.rmem_default",), "pillar": _sysctl("net.core.rmem_default"), "rise": "warning",
        "fix": "raise net.core.rmem_default if RcvbufErrors rises with it"},
}


# --------------------------------------------------------------------------
# Parsing (pure)
# --------------------------------------------------------------------------
def parse_pairs(text, sections=None):
    """``/proc/net/netstat`` and ``/proc/net/snmp``: a header line of names
    and a line of values per section -> ``{section: {name: int}}`` (only
    ``sections`` when given). Lines that do not pair up are skipped."""
    out, header = {}, {}
    for line in (text or "").splitlines():
        section, _, rest = line.partition(":")
        if sections is not None and section not in sections:
            continue
        fields = rest.split()
        if not section or not fields:
            continue
        if section in header:
            names = header.pop(section)
            try:
                values = [int(f) for f in fields]
            except ValueError:  # a second header line: the first had no values
                header[section] = fields
                continue
            if len(names) == len(values):
                out[section] = dict(zip(names, values))
        else:
            header[section] = fields
    return out


def parse_sockstat(text):
    """``/proc/net/sockstat``: ``TCP: inuse 3 orphan 0 tw 4 alloc 3 mem 1`` ->
    ``{"TCP": {"inuse": 3, ..., "mem": 1}}``."""
    out = {}
    for line in (text or "").splitlines():
        section, _, rest = line.partition(":")
        fields = rest.split()
        values = {}
        for name, value in zip(fields[::2], fields[1::2]):
            if value.isdigit():
                values[name] = int(value)
        if values:
            out[section.strip()] = values
    return out


def parse_ints(text, count):
    """``fs.file-nr`` (``allocated unused max``), ``net.ipv4.tcp_mem``
    (``low pressure high``): ``count`` integers, or None."""
    fields = (text or "").split()
    if len(fields) != count or not all(f.isdigit() for f in fields):
        return None
    return [int(f) for f in fields]


def headroom(used, limit):
    """Percent of ``limit`` still free (None: no limit)."""
    if not limit:
        return None
    return round(max(limit - used, 0) * 100.0 / limit, 1)


def severity_of_headroom(free, warn=HEADROOM, critical=CRITICAL_HEADROOM):
    if free is None or free >= warn:
        return "ok"
    return "critical" if free < critical else "warning"


def worst(severities):
    return max(severities, key=SEVERITIES.index, default="ok")


# --------------------------------------------------------------------------
# Reading the box
# --------------------------------------------------------------------------
def net_dir(proc_root):
    """The per-namespace ``/proc/net`` next to ``proc_root`` (``/proc/sys``)."""
    return os.path.join(os.path.dirname(proc_root.rstrip("/")) or "/", "net")


def _read(path, size=16384):
    """The whole text of a /proc file, or None."""
    data = procfs.read_bytes(path, size)
    return None if data is None else data.decode("ascii", "replace")


def processes(names, parents):
    """``{pid: (name, parent pid or None)}`` of every process going by one of
    ``names`` and of each child of one of ``parents`` (a plugin such as
    obfs-server or v2ray-plugin, under its own name; the parent is named)."""
    table = procfs.process_table()
    named = procfs.named_processes(table, names, parents)
    return {pid: (name, table[pid][2] if named.get(table[pid][2]) in parents else None)
            for pid, name in named.items()}


def open_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def drift(proc_root, state_dir, config):
    """``{key: {"live", "applied"}}`` of every key this package changed
    (``originals.json``) whose live value differs from the one it persisted in
    ``config``, and a note when that cannot be told."""
    try:
        originals = journal.load_originals(state_dir)
        persisted = {key: value for _, key, value in sysctld.parse_conf(journal.read_managed(config) or "")}
    except Exception as exc:  # noqa: BLE001 - a bad file is a note here, never a traceback
        return {}, 0, f"drift not checked: {exc}"
    managed = [key for key in originals.get("sysctls") or {} if key in persisted]
    out = {}
    for key in managed:
        live = procfs.read_or(proc_root, key)
        if live is not None and live != persisted[key]:
            out[key] = {"live": live, "applied": persisted[key]}
    return out, len(managed), None


def sample(proc_root, names, parents=()):
    """Every raw number one look at the box gives: plain JSON-able values."""
    net = net_dir(proc_root)
    wanted = {section for section, _ in COUNTERS}
    pairs = parse_pairs(_read(os.path.join(net, "netstat")), wanted)
    for section, values in parse_pairs(_read(os.path.join(net, "snmp")), wanted).items():
        pairs.setdefault(section, {}).update(values)
    counters = {f"{section}:{name}": pairs[section][name] for section, name in COUNTERS
                if name in pairs.get(section, {})}
    fds = {}
    for pid, (name, parent) in sorted(processes(names, parents).items()):
        count, limits = open_fds(pid), procfs.proc_nofile(pid)
        if count is None or limits is None:
            continue  # gone meanwhile
        fds[str(pid)] = {"name": name, "parent": parent, "open": count, "soft": limits[0], "hard": limits[1]}
    sockstat = parse_sockstat(_read(os.path.join(net, "sockstat")))
    conntrack = [procfs.read_or(proc_root, f"net.netfilter.nf_conntrack_{n}") for n in ("count", "max")]
    return {
        "version": SAMPLE_VERSION,
        "time": time.time(),
        "boot_id": procfs.read_or(proc_root, "kernel.random.boot_id"),
        "netns": _netns(),
        "counters": counters,
        "fds": fds,
        "file_nr": parse_ints(procfs.read_or(proc_root, "fs.file-nr"), 3),
        "tcp_mem": parse_ints(procfs.read_or(proc_root, "net.ipv4.tcp_mem"), 3),
        "tcp_mem_pages": sockstat.get("TCP", {}).get("mem"),
        "conntrack": [int(v) for v in conntrack] if all(v and v.isdigit() for v in conntrack) else None,
    }


def _netns():
    try:
        return os.readlink("/proc/thread-self/ns/net")
    except OSError:
        return None


# --------------------------------------------------------------------------
# The sample kept between calls
# --------------------------------------------------------------------------
def sample_path(state_dir):
    return os.path.join(state_dir, SAMPLE_NAME)


def _valid_sample(data):
    """Why ``data`` is not a sample of this version, or None when it is."""
    if not isinstance(data, dict) or data.get("version") != SAMPLE_VERSION:
        return "not a sample of this version"
    if not isinstance(data.get("time"), (int, float)) or isinstance(data.get("time"), bool):
        return "no time"
    counters, fds = data.get("counters"), data.get("fds")
    if not isinstance(counters, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in counters.items()):
        return "bad counters"
    if not isinstance(fds, dict) or not all(
            isinstance(k, str) and k.isdigit() and isinstance(v, dict) and type(v.get("open")) is int
            for k, v in fds.items()):
        return "bad process entries"
    for key in ("file_nr", "tcp_mem", "conntrack"):
        value = data.get(key)
        if value is not None and not (isinstance(value, list) and all(type(v) is int for v in value)):
            return f"bad {key}"
    if data.get("tcp_mem_pages") is not None and type(data.get("tcp_mem_pages")) is not int:
        return "bad tcp_mem_pages"
    return None


def load_sample(state_dir):
    """(previous sample or None, note or None). A missing file is no baseline;
    a link, a hard-linked file, unreadable or malformed content is no
    baseline with a note saying why, never an exception."""
    path = sample_path(state_dir)
    try:
        text = journal.read_managed(path)
    except Exception as exc:  # noqa: BLE001
        return None, f"{path} not used ({exc}); no baseline"
    if text is None:
        return None, None
    try:
        data = json.loads(text)
    except ValueError:
        return None, f"{path} is not valid JSON; no baseline (it is replaced by this sample)"
    why = _valid_sample(data)
    if why:
        return None, f"{path}: {why}; no baseline (it is replaced by this sample)"
    return data, None


def save_sample(state_dir, data):
    """Write the sample atomically (0600); a note when it could not be."""
    path = sample_path(state_dir)
    umask = os.umask(0o022)
    try:
        journal.read_managed(path)  # a planted link or hard link is refused, not replaced
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        journal.atomic_write(path, json.dumps(data, sort_keys=True), mode=0o600, durable=False)
    except Exception as exc:  # noqa: BLE001
        return f"could not save the sample to {path}: {getattr(exc, 'strerror', None) or exc}"
    finally:
        os.umask(umask)
    return None


def comparable(previous, current):
    """Why ``previous`` cannot serve as a baseline for ``current``, or None."""
    if previous is None:
        return "no baseline yet: this is the first sample; changes are shown from the next call"
    if previous.get("boot_id") != current.get("boot_id"):
        return "the previous sample is from another boot; no baseline"
    if previous.get("netns") != current.get("netns"):
        return "the previous sample is from another network namespace; no baseline"
    if previous["time"] > current["time"]:
        return "the previous sample is from the future; no baseline"
    if any(current["counters"].get(k, v) < v for k, v in previous["counters"].items()):
        return "a counter went down since the previous sample (counters were reset); no baseline"
    return None


# --------------------------------------------------------------------------
# Findings
# --------------------------------------------------------------------------
def _finding(condition, check, severity, symptom, evidence, limit, pillar, fix, **extra):
    # `condition` names what is measured: the beacon announces each once
    # (not `id`: Salt puts the minion id there in a beacon event).
    out = {"condition": condition, "check": check, "severity": severity, "symptom": symptom, "evidence": evidence,
           "limit": limit, "pillar": pillar, "fix": fix}
    out.update(extra)
    return out


def _change(now, before):
    return None if before is None or now is None else now - before


def _fd_findings(current, previous, warn, critical, nofile):
    out = []
    before = previous["fds"] if previous else {}
    for pid, entry in current["fds"].items():
        name, soft, used = entry["name"], entry["soft"], entry["open"]
        free = headroom(used, soft)
        severity = severity_of_headroom(free, warn, critical)
        what = f"{name} (pid {pid}{', plugin of pid %s' % entry['parent'] if entry['parent'] else ''})"
        if severity == "ok":
            symptom = f"{what} uses {used} of {soft or 'unlimited'} open files"
        else:
            symptom = f"{what} uses {used} of its {soft} open files ({free} % left): near `too many open files`"
        prev = before.get(pid)
        prev_open = prev["open"] if prev and prev.get("name") == name else None
        wanted = f" (wanted: {nofile})" if nofile else ""
        fix = (f"raise pillar {_NOFILE}{wanted}, {_APPLY}: the running daemon is raised in place (restart: "
               "live), restarted only where that cannot reach it"
               if soft is None or nofile is None or soft < nofile else
               f"the daemon already has {_NOFILE} ({nofile}): raise it, {_APPLY}")
        out.append(_finding(
            f"fds:{name}:{pid}", "open files", severity, symptom,
            {"open": used, "change": _change(used, prev_open), "headroom_percent": free},
            {"RLIMIT_NOFILE": {"soft": soft, "hard": entry["hard"]}}, _NOFILE, fix,
            process=name, pid=int(pid)))
    return out


def _capacity(condition, check, used, limit, before, warn, critical, symptom, limit_name, pillar, fix):
    free = headroom(used, limit)
    severity = severity_of_headroom(free, warn, critical)
    text = f"{symptom}: {used} of {limit} ({free} % left)"
    return _finding(condition, check, severity, text, {"value": used, "change": _change(used, before),
                                                  "headroom_percent": free},
                    {limit_name: limit}, pillar, fix)


def findings(current, previous, warn=HEADROOM, critical=CRITICAL_HEADROOM, nofile=None, limits=None,
             drifted=None, managed=0):
    """Every finding of one look (``previous`` None: no baseline). ``limits``:
    {sysctl key: live value} shown as the limit of a counter."""
    limits = limits or {}
    out = _fd_findings(current, previous, warn, critical, nofile)
    if current["file_nr"]:
        allocated, _, maximum = current["file_nr"]
        out.append(_capacity(
            "file-nr", "system open files", allocated, maximum,
            previous["file_nr"][0] if previous and previous.get("file_nr") else None, warn, critical,
            "open files of the whole system (fs.file-nr)", "fs.file-max", _sysctl("fs.file-max"),
            f"raise fs.file-max, {_APPLY}"))
    for (section, name), spec in COUNTERS.items():
        key = f"{section}:{name}"
        value = current["counters"].get(key)
        if value is None:
            continue
        change = _change(value, previous["counters"].get(key) if previous else None)
        if change:
            severity = spec["rise"]
            symptom = f"{section} {name} rose by {change}: {spec['symptom']}"
        elif change is None and value:
            severity = "warning"
            symptom = f"{section} {name} is {value} since boot (no baseline to tell whether it still rises): " \
                      f"{spec['symptom']}"
        else:
            severity, symptom = "ok", f"{section} {name}: {value}, no rise"
        out.append(_finding(f"counter:{key}", f"{section} {name}", severity, symptom,
                            {"value": value, "change": change},
                            {k: limits.get(k) for k in spec["limits"]}, spec["pillar"], f"{spec['fix']}, {_APPLY}"))
    pages, tcp_mem = current["tcp_mem_pages"], current["tcp_mem"]
    if pages is not None and tcp_mem:
        low, pressure, high = tcp_mem
        severity = "critical" if pages >= high else "warning" if pages >= pressure else "ok"
        out.append(_finding(
            "tcp-mem", "TCP memory", severity,
            f"TCP sockets hold {pages} pages (pressure at {pressure}, limit {high})",
            {"value": pages, "change": _change(pages, previous.get("tcp_mem_pages") if previous else None)},
            {"net.ipv4.tcp_mem": f"{low} {pressure} {high}"}, _sysctl("net.ipv4.tcp_mem"),
            f"raise net.ipv4.tcp_mem, or lower the buffer ceilings with profile low-memory, {_APPLY}"))
    if current["conntrack"]:
        count, maximum = current["conntrack"]
        out.append(_capacity(
            "conntrack", "conntrack table", count, maximum,
            previous["conntrack"][0] if previous and previous.get("conntrack") else None, warn, critical,
            "connection tracking entries", "net.netfilter.nf_conntrack_max", _sysctl("net.netfilter.nf_conntrack_max"),
            f"raise net.netfilter.nf_conntrack_max, {_APPLY}"))
    for key, values in sorted((drifted or {}).items()):
        out.append(_finding(
            f"drift:{key}", "managed sysctl", "warning",
            f"{key} is {values['live']}, not the {values['applied']} this package applied",
            {"value": values["live"], "applied": values["applied"]}, {key: values["applied"]}, _sysctl(key),
            f"state.apply shadowsocks.tuning puts it back; to keep {values['live']}, set it in pillar "
            f"{_sysctl(key)}", key=key))
    if managed and not drifted:
        out.append(_finding("drift", "managed sysctls", "ok", f"all {managed} sysctls this package applied hold",
                            {"value": managed, "change": None}, {}, f"{PILLAR}:sysctls", "nothing to do"))
    return out


def report(proc_root, state_dir, config, names=None, warn=HEADROOM, critical=CRITICAL_HEADROOM, nofile=None,
           previous=None, save=True, notes=(), parents=None):
    """One diagnosis. ``previous`` None with ``save``: the sample kept in
    ``state_dir`` is the baseline and this one replaces it; ``save`` False:
    ``previous`` (a ``sample`` an earlier call returned) is the baseline and
    the new sample is returned under ``sample`` for the caller to keep."""
    notes = list(notes)
    # The registry's programs by default: supervisord, every shadowsocks server, their plugins.
    names = set(names) if names else daemons.program_names()
    current = sample(proc_root, names, daemons.server_names() if parents is None else set(parents))
    if save:
        previous, note = load_sample(state_dir)
        if note:
            notes.append(note)
    elif previous is not None and _valid_sample(previous):
        notes.append(f"the sample passed in is not usable ({_valid_sample(previous)})")
        previous = None
    why = comparable(previous, current)
    if why:
        notes.append(why)
        previous = None
    drifted, managed, note = drift(proc_root, state_dir, config)
    if note:
        notes.append(note)
    keys = {k for spec in COUNTERS.values() for k in spec["limits"]}
    limits = {key: procfs.read_or(proc_root, key) for key in keys}
    found = findings(current, previous, warn, critical, nofile, limits, drifted, managed)
    if save:
        note = save_sample(state_dir, current)
        if note:
            notes.append(note)
    if not current["fds"]:
        notes.append("no supervisord or shadowsocks process is running: no open-file headroom to check")
    result = {
        "severity": worst(f["severity"] for f in found),
        "problems": [f"{f['severity']}: {f['symptom']}" for f in found if f["severity"] != "ok"],
        "baseline": {"time": previous["time"], "seconds": round(current["time"] - previous["time"], 1)}
        if previous else None,
        "findings": found,
        "notes": notes,
    }
    if not save:
        result["sample"] = current
    return result
