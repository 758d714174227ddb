"""
Reading the kernel: sysctls under a ``/proc/sys`` root (read, write and read
back) and processes under ``/proc`` (state, parent, argv, open-file limits,
capabilities). No Salt here: every function takes the root it reads from.
"""

import os
import re

from sstuning_catalogue import CATALOGUE, SS_PROCESS_NAMES, normalise_live, validate_key

CAP_SYS_RESOURCE = 24  # capability(7) bit: may raise a hard limit
AVAILABLE_CC = "net.ipv4.tcp_available_congestion_control"
ALLOWED_CC = "net.ipv4.tcp_allowed_congestion_control"

_PATHS = {}  # (proc_root, key) -> path: a key is validated once per root


def sysctl_path(proc_root, key):
    """The file of ``key`` under ``proc_root``; the key is validated first, so
    it can never name a path outside that root."""
    try:
        return _PATHS[proc_root, key]
    except (KeyError, TypeError):
        path = os.path.join(proc_root, *validate_key(key).split("."))
        _PATHS[proc_root, key] = path
        return path


# Catalogue keys on the real /proc/sys, ready before the first apply needs them.
for _key in CATALOGUE:
    sysctl_path("/proc/sys", _key)


def read(proc_root, key):
    """The live value, normalised. Raises OSError (FileNotFoundError: no such key)."""
    # Bare file descriptors: a file object per read costs more than the read.
    fd = os.open(sysctl_path(proc_root, key), os.O_RDONLY)
    try:
        return normalise_live(os.read(fd, 65536).decode("ascii", "replace"))
    finally:
        os.close(fd)


def read_or(proc_root, key, default=None):
    try:
        return read(proc_root, key)
    except OSError:
        return default


def write(proc_root, key, text):
    """Write one value and read it back. Raises OSError from the kernel, or
    EINVAL when the kernel stored something else."""
    # O_TRUNC: harmless on procfs, needed for a proc_root tree of plain files.
    fd = os.open(sysctl_path(proc_root, key), os.O_WRONLY | os.O_TRUNC)
    try:
        # An empty list (no reserved ports) is written as a bare newline: a
        # zero-byte write changes nothing.
        os.write(fd, text.encode("ascii") or b"\n")
    finally:
        os.close(fd)
    stored = read(proc_root, key)
    if stored != text:
        raise OSError(22, f"the kernel stored '{stored}' instead")
    return stored


def in_child_netns(proc_root):
    """True inside a child network namespace (a container): netdev_max_backlog
    lives in the kernel's init-namespace-only table, somaxconn in the
    per-namespace one, so one without the other tells."""
    return os.path.exists(os.path.join(proc_root, "net/core/somaxconn")) and not os.path.exists(
        os.path.join(proc_root, "net/core/netdev_max_backlog")
    )


def read_only_mount(proc_root):
    return bool(os.statvfs(proc_root).f_flag & os.ST_RDONLY)


_RELEASE = re.match(r"(\d+)\.(\d+)", os.uname().release)
_KERNEL_VERSION = (int(_RELEASE.group(1)), int(_RELEASE.group(2))) if _RELEASE else (0, 0)


def kernel_version():
    """(major, minor) of the running kernel."""
    return _KERNEL_VERSION


def nr_open(proc_root):
    """fs.nr_open: the ceiling of any process's RLIMIT_NOFILE."""
    try:
        return int(read_or(proc_root, "fs.nr_open"))
    except (TypeError, ValueError):
        return 1048576  # the kernel's default


# --------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------
def read_bytes(path, size=4096):
    """The whole content of a /proc file, or None. A bare descriptor and a
    small first read: a process scan reads hundreds of these, and a file
    object or a large buffer per read costs more than the read itself."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = [os.read(fd, size)]
        while len(chunks[-1]) == size:
            size = 65536
            chunks.append(os.read(fd, size))
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def proc_stat(pid):
    """(comm, state, ppid) from /proc/<pid>/stat, or None when it is gone."""
    data = read_bytes(f"/proc/{pid}/stat", 1024)
    if data is None:
        return None
    head, _, rest = data.decode("utf-8", "replace").rpartition(")")
    fields = rest.split()
    if len(fields) < 2:
        return None
    return head.split("(", 1)[-1], fields[0], int(fields[1])


def alive(pid):
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z"


def proc_nofile(pid):
    """(soft, hard) 'Max open files' of a process (None = unlimited), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/limits") as handle:
            for line in handle:
                if line.startswith("Max open files"):
                    soft, hard = line[len("Max open files"):].split()[:2]
                    return tuple(None if v == "unlimited" else int(v) for v in (soft, hard))
    except OSError:
        return None
    return None


def has_cap_sys_resource(pid="self"):
    data = read_bytes(f"/proc/{pid}/status", 2048)
    start = data.find(b"\nCapEff:") if data else -1
    if start < 0:
        return False
    end = data.find(b"\n", start + 1)
    try:
        return bool(int(data[start + 8:end if end > 0 else None], 16) >> CAP_SYS_RESOURCE & 1)
    except ValueError:
        return False


def proc_argv(pid):
    data = read_bytes(f"/proc/{pid}/cmdline")
    return [a.decode("utf-8", "replace") for a in (data or b"").split(b"\0") if a]


def match_name(comm, argv, names):
    """The name in ``names`` a process goes by, or None."""
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


def process_table():
    """{pid: (comm, state, ppid)} of every live (non-zombie) process."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] != "Z":
                table[int(entry)] = stat
    return table


def pid_from(pidfile):
    try:
        with open(pidfile, "rb") as handle:
            return int(handle.read(64).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _option(argv, name):
    """The value after ``name`` in ``argv`` (``--manager-address X``), or None."""
    for index, arg in enumerate(argv[:-1]):
        if arg == name:
            return argv[index + 1]
    return None


def adopted(table):
    """{ss-server pid: ss-manager pid}. ss-manager starts one ss-server per
    port with ``-f pidfile``: it daemonizes and init adopts it, so only the
    ``--manager-address`` both carry ties it to its manager (a manager that
    reads the address from its config: the only ss-manager running)."""
    managers, servers = {}, []
    for pid, (comm, _, _) in table.items():
        if comm == "ss-manager":
            managers.setdefault(_option(proc_argv(pid), "--manager-address"), pid)
        elif comm == "ss-server":
            servers.append(pid)
    links = {}
    for pid in servers if managers else ():
        address = _option(proc_argv(pid), "--manager-address")
        manager = managers.get(address) or (next(iter(managers.values())) if len(managers) == 1 else None)
        if address and manager:
            links[pid] = manager
    return links


def named_processes(table, names):
    """{pid: name} of every process called one of ``names``, and of every
    child of a shadowsocks process among them: a SIP003 plugin such as
    obfs-server, under its own name, has limits of its own."""
    named = {}
    for pid, (comm, _, _) in table.items():
        name = match_name(comm, proc_argv(pid), names)
        if name:
            named[pid] = name
    parents = {pid for pid, name in named.items() if name in SS_PROCESS_NAMES}
    for pid, (comm, _, ppid) in table.items():
        if pid not in named and ppid in parents:
            named[pid] = comm
    return named


def subtree(table, roots):
    """The pids of ``roots`` and all their descendants, the ss-server
    processes ss-manager started (and init adopted) included."""
    children = {}
    for pid, (_, _, ppid) in table.items():
        children.setdefault(ppid, []).append(pid)
    for pid, manager in adopted(table).items():
        children.setdefault(manager, []).append(pid)
    seen, todo = set(), [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen
