"""
Reading the kernel: sysctls under a ``/proc/sys`` root (read, write and read
back) and processes under ``/proc`` (state, parent, argv, open-file limits,
capabilities). No Salt here: every function takes the root it reads from.
"""

import functools
import os
import re
import resource
import stat

from sstuning_catalogue import CATALOGUE, normalise_live, validate_key

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
    """(soft, hard) 'Max open files' of a process (None = unlimited), or None when it is gone.
    Asked with prlimit(2) first: one call, no file to open and parse (20
    times cheaper; a scan of 300 servers reads it for each). The kernel
    answers only for a process of the caller's own user ids, or with
    CAP_SYS_RESOURCE; for any other /proc/<pid>/limits says the same."""
    try:
        soft, hard = resource.prlimit(int(pid), resource.RLIMIT_NOFILE)
        return tuple(None if v == resource.RLIM_INFINITY else v for v in (soft, hard))
    except (OSError, ValueError):
        pass
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


# The kernel keeps the first 15 bytes of a program's name as its `comm`.
COMM_LENGTH = 15


def match_name(comm, argv, names):
    """The name in ``names`` a process goes by, or None. ``argv`` gives its
    command line (a list, or a function that reads it): it is looked at only
    where ``comm`` cannot tell, a name the kernel cut to 15 bytes
    (``outline-ss-serv``) or a Python program (ssserver, supervisord) started
    as ``python3 /usr/bin/NAME``."""
    if comm in names:
        return comm
    python = comm.startswith(("python", "pypy"))
    if not python and not (len(comm) == COMM_LENGTH and any(n.startswith(comm) for n in names)):
        return None
    argv = argv() if callable(argv) else argv
    candidates = argv[1:2] if argv and os.path.basename(argv[0]).startswith(("python", "pypy")) else argv[:1]
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
    """The pid a pidfile names, or None. Opened without blocking and read
    only when it is a regular file: a named pipe there would hang the run."""
    try:
        fd = os.open(pidfile, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return int(os.read(fd, 64).split()[0])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        os.close(fd)


def option_values(argv, names):
    """The values ``argv`` gives the options in ``names``, in order:
    ``-p 8388`` and ``--server-addr=[::]:8388`` alike."""
    values = []
    for index, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if arg in names and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif equals and name in names:
            values.append(value)
    return values


def _option(argv, name):
    """The first value ``argv`` gives option ``name``, or None."""
    return next(iter(option_values(argv, (name,))), None)


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


def pid_namespace(pid):
    """The PID namespace of a process (``pid:[4026531836]``), or None when it
    is gone or not readable."""
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def in_this_pid_namespace(pid, own=None):
    """False for a process of another PID namespace: a container's (nspawn,
    docker, lxc) daemons belong to its own service manager and its own
    files, which this box's salt neither reads nor restarts, so it must not
    raise or judge them either. True when either side cannot be read.
    ``own``: this process's, when the caller read it once for many."""
    own, other = own or pid_namespace("self"), pid_namespace(pid)
    return own is None or other is None or own == other


def named_processes(table, names, parents=()):
    """{pid: name} of every process of this PID namespace called one of
    ``names`` (a container's are not this box's: ``in_this_pid_namespace``),
    and of every child of a process called one of ``parents`` (the servers
    that start SIP003 plugins such as obfs-server): a plugin, under whatever
    name, has limits of its own and holds the clients' connections."""
    named, own = {}, pid_namespace("self")
    for pid, (comm, _, _) in table.items():
        name = match_name(comm, functools.partial(proc_argv, pid), names)
        if name and in_this_pid_namespace(pid, own):
            named[pid] = name
    servers = {pid for pid, name in named.items() if name in parents}
    for pid, (comm, _, ppid) in table.items():
        if pid not in named and ppid in servers:
            named[pid] = comm
    return named


def ids(pid):
    """((real, effective, saved uid), (real, effective, saved gid)) of a process, or None when it is gone."""
    data = read_bytes(f"/proc/{pid}/status", 2048)
    if not data:
        return None
    found = {}
    for line in data.split(b"\n"):
        if line.startswith((b"Uid:", b"Gid:")):
            found[line[:3]] = tuple(int(v) for v in line.split()[1:4])
    if len(found) != 2:
        return None
    return found[b"Uid"], found[b"Gid"]


def may_set_limits(pid, cap_sys_resource):
    """Whether this process may change another's limits (prlimit(2)):
    CAP_SYS_RESOURCE, or its real uid and gid equal to the other's real,
    effective and saved uids and gids."""
    if cap_sys_resource:
        return True
    found = ids(pid)
    if found is None:
        return False
    uid, gid = os.getuid(), os.getgid()
    return all(u == uid for u in found[0]) and all(g == gid for g in found[1])


def raise_nofile(pid, soft, hard):
    """Set a running process's RLIMIT_NOFILE (prlimit(2)) and read it back
    from /proc/PID/limits: returns what it has now. Raises OSError (EPERM:
    not allowed; ESRCH: it is gone; EINVAL: soft above hard)."""
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    now = proc_nofile(pid)
    if now is None:
        raise ProcessLookupError(3, f"process {pid} is gone")
    return now


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
