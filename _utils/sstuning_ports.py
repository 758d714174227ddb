"""
The sockets of shadowsocks. The ports it listens on, so they can be
reserved from the local port range (``net.ipv4.ip_local_reserved_ports``):
an outbound connection that picks a server's port before the server binds
it keeps the server from starting; found in shadowsocks-libev's JSON
configs (read by sstuning_configs) and in the sockets running shadowsocks
processes listen on. And the live connections a restart would cut. Reads
files, /proc and sock_diag only.
"""

import contextlib
import functools
import glob
import os
import socket
import struct

import sstuning_configs as configs
import sstuning_procfs as procfs
from sstuning_settings import OPTIONS

# linux/sock_diag.h, linux/inet_diag.h, linux/netlink.h
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCP_ESTABLISHED, _TCP_LISTEN, _TCP_CLOSE = 1, 10, 7  # a bound UDP socket shows as TCP_CLOSE


def kind_configs(options, name, kind):
    """The configs of one kind of daemon (``{paths, format, ports}`` of the
    registry or pillar) on this box, or None."""
    found = kind.get("configs")
    if found and name == "shadowsocks_libev" and options["ss_config_dir"] != OPTIONS["ss_config_dir"]:
        # The minion option of earlier releases moves libev's config directory.
        found = dict(found, paths=[os.path.join(glob.escape(options["ss_config_dir"]), "*.json")])
    return found


def kind_config_ports(kind_configs):
    """{port: "path (field)"} from the configs of one kind of daemon."""
    return configs.config_ports(kind_configs["paths"], kind_configs["format"], kind_configs["ports"])


def _diag_dump(sock, family, protocol, states):
    """{inode: port} from one NETLINK_SOCK_DIAG dump (inet_diag_req_v2)."""
    request = struct.pack("=BBBBI", family, protocol, 0, 0, states) + bytes(48)  # an empty inet_diag_sockid
    sock.send(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
              + request)
    found = {}
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind in (_NLMSG_DONE, _NLMSG_ERROR) or length < 16:
                return found
            # inet_diag_msg: family, state, timer, retrans, then the sockid (sport first,
            # big-endian); the inode sits after the sockid and four u32 fields.
            port = struct.unpack_from("!H", data, offset + 16 + 4)[0]
            inode = struct.unpack_from("=I", data, offset + 16 + 4 + 48 + 16)[0]
            found[inode] = port
            offset += (length + 3) & ~3
        if not data:
            return found


def listening_sockets():
    """{inode: port} of listening TCP and bound UDP sockets in this network
    namespace, asked of the kernel through sock_diag: it walks only the
    listening tables, where reading /proc/net/tcp walks every hash bucket
    (milliseconds on a large machine, even when nothing listens)."""
    found = {}
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(2)
            for family in (socket.AF_INET, socket.AF_INET6):
                found.update(_diag_dump(sock, family, socket.IPPROTO_TCP, 1 << _TCP_LISTEN))
                found.update(_diag_dump(sock, family, socket.IPPROTO_UDP, 1 << _TCP_CLOSE))
    except OSError:
        return {}
    return found


def established_sockets():
    """The inodes of established TCP sockets in this network namespace (sock_diag)."""
    found = set()
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
            sock.settimeout(2)
            for family in (socket.AF_INET, socket.AF_INET6):
                found.update(_diag_dump(sock, family, socket.IPPROTO_TCP, 1 << _TCP_ESTABLISHED))
    except OSError:
        return set()
    return found


def _socket_inodes(pid):
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(int(link[8:-1]))
    return inodes


def live_connections(root_pid):
    """How many established TCP connections a daemon and every process below
    it hold (a proxied connection counts twice: client side and server side):
    what stopping it cuts."""
    established = established_sockets()
    if not established:
        return 0
    held = set()
    for pid in procfs.subtree(procfs.process_table(), [root_pid]):
        held |= _socket_inodes(pid) & established
    return len(held)


def declared_ports(argv, options):
    """The ports ``argv`` names after one of ``options`` (``-p 8388``,
    ``--server-addr=[::]:8388``, ``-s 0.0.0.0:8388``); a value that is no
    port (a path, a host name) names none."""
    found = set()
    for value in procfs.option_values(argv, options):
        value = value.rpartition(":")[2]  # host:port, [v6]:port, or a bare port
        if value.isdigit() and 0 < int(value) < 65536:
            found.add(int(value))
    return found


def listening_ports(names, wanted_range=None, table=None, known=(), port_options=None):
    """{port: "ss-server (pid N)"} for every socket a process called one of
    ``names`` (in this network namespace) listens on. Only sockets whose
    port lies in ``wanted_range`` (low, high) need an owner: ports outside the
    local port range are never picked for outbound connections anyway; nor
    do ports in ``known`` (already reserved, or from a config): with none
    left, no process is looked at (a re-run on a box of many servers).
    ``port_options``: {name: the options whose value is a port it listens
    on}; a process whose every such port is listening owns those and is not
    searched socket by socket (readlink of each descriptor: two thirds of a
    first plan on a box of 300 servers)."""
    listening = listening_sockets()
    low, high = wanted_range or (1, 65535)
    sockets = {inode: port for inode, port in listening.items() if low <= port <= high and port not in known}
    if not sockets:
        return {}
    listening, wanted = set(listening.values()), set(sockets.values())
    port_options = port_options or {}
    own_netns = os.readlink("/proc/self/ns/net")
    found = {}
    for pid, (comm, _, _) in (procfs.process_table() if table is None else table).items():
        name = procfs.match_name(comm, functools.partial(procfs.proc_argv, pid), names)
        if not name:
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/net") != own_netns:
                continue
            options = port_options.get(name)
            declared = declared_ports(procfs.proc_argv(pid), options) if options else set()
            if declared and declared <= listening:
                owned = declared & wanted
            else:
                owned = {sockets[inode] for inode in _socket_inodes(pid) & sockets.keys()}
            for port in sorted(owned):
                found.setdefault(port, f"{name} (pid {pid})")
        if len(found) == len(wanted):
            break  # every port has its owner
    return found
