"""
The daemon registry: everything this package knows about each kind of
daemon whose open-file limit it manages, as data. Settings, the plan, the
states, ``nofile``, ``verify``, ``diagnose``, the beacon, port reservation
and ``container`` all read it; nothing else names a program, a unit or a
defaults file. Adding a kind is one entry here (or the same shape in pillar
``shadowsocks:tuning:limits:NAME``) plus its tests.

A kind's fields (all but ``programs`` optional):

  description     one line for people
  programs        process names (``comm``, or the script a Python runs)
  plugins         SIP003 plugins it starts as children; any child of one of
                  its programs is watched too, under whatever name
  service         its sysvinit service (``/etc/init.d/NAME``), stopped and
                  started when a running daemon cannot be raised in place
  pidfile         the pidfile its init script writes: tells whether it runs
  units           its systemd units (templates as ``name@.service``): each
                  gets a ``LimitNOFILE`` drop-in where systemd runs
  defaults_file   the shell file its init script sources, and
  defaults_limit  how the limit is said there: ``ulimit`` (a ``ulimit -n N``
                  line) or a variable name such as ``MAXFD`` (the init
                  script runs ``ulimit -n ${MAXFD}``)
  minfds          supervisord's configuration, whose ``minfds`` supervisord
                  raises its own soft limit to at start
  config_limit    the key of its own config that sets its limit at start
                  (``nofile``): read, never written; a lower value there
                  wins over everything else and is reported
  raises_soft     True when the daemon raises its soft limit to its hard
                  limit by itself at start (the Go runtime since 1.19,
                  shadowsocks-rust since 1.14.3): only the hard limit matters
  children        ``inherit``: the programs it starts get its limits (so a
                  live raise of the parent reaches programs started later)
  configs         ``{paths, format, ports}``: config files (globs), their
                  format (``json``, ``json5``, ``jsonc``, ``yaml``) and the fields that
                  are ports (``sstuning_configs`` reads them); their ports
                  are kept out of the outbound port range
  needs_ports     True for multi-protocol servers (xray, v2ray, sing-box):
                  managed only where a config has a shadowsocks inbound
  port_options    its command-line options whose value is a port it
                  listens on (``-p 8388``, ``-s [::]:8388``): a process
                  whose every such port is listening is not searched
                  socket by socket for its ports
"""

# SIP003 plugins: ss-server / ssserver `--plugin` starts one as a child
# process with limits of its own, and it holds the clients' connections
# (obfs-server listens on the server port).
PLUGINS = ["obfs-server", "obfs-local", "v2ray-plugin", "xray-plugin"]

# The fields of each server's configs that hold the ports it listens on
# (sstuning_configs reads them; a client's server_port names a remote port:
# reserving it here as well costs nothing). Where each comes from:
# shadowsocks-libev: jconf.c and shadowsocks-libev(8) "CONFIG FILE" (ports as
# numbers or strings; ss-manager's port_password, a "host:port"
# manager_address).
_LIBEV_PORTS = ["server_port", "local_port", "manager_address", "port_password.*"]
# shadowsocks-rust: its README "Configuration", read with the json5 crate: the
# single-server keys, servers[] (server_port, or its alias port), locals[]
# (sslocal's listeners, local_udp_port for SOCKS5's UDP), ssmanager's
# manager_address (an IP, a path, or "host:port") with manager_port.
_RUST_PORTS = ["server_port", "local_port", "servers[].server_port", "servers[].port", "locals[].local_port",
               "locals[].local_udp_port", "manager_address", "manager_port"]
# Xray and v2ray InboundObject.port: a number, "1234", a range "5-10" (v2ray),
# a list "80,1000-2000" (Xray); v2ray 4 still reads v3's "inbound" and
# "inboundDetour". Their JSON takes // and /* */ and # comments (jsonc).
_V2RAY_PORTS = ["inbounds[protocol=shadowsocks].port"]

KINDS = {
    "supervisor": {
        "description": "supervisord (Debian's supervisor package); the programs it starts inherit its limits",
        "programs": ["supervisord"],
        "service": "supervisor",
        "pidfile": "/var/run/supervisord.pid",
        "units": ["supervisor.service"],
        "defaults_file": "/etc/default/supervisor",
        "defaults_limit": "ulimit",
        "minfds": "/etc/supervisor/supervisord.conf",
        "children": "inherit",
    },
    "shadowsocks_libev": {
        "description": "shadowsocks-libev (Debian's package): ss-server, ss-local, ss-manager and its servers, plugins",
        "programs": ["ss-server", "ss-local", "ss-manager", "ss-redir", "ss-tunnel", "ss-nat"],
        "plugins": PLUGINS,
        "service": "shadowsocks-libev",
        "pidfile": "/var/run/shadowsocks-libev/shadowsocks-libev.pid",
        "units": ["shadowsocks-libev.service", "shadowsocks-libev-server@.service", "shadowsocks-libev-local@.service",
                  "shadowsocks-libev-redir@.service", "shadowsocks-libev-tunnel@.service"],
        "defaults_file": "/etc/default/shadowsocks-libev",
        "defaults_limit": "MAXFD",
        "config_limit": "nofile",
        "configs": {"paths": ["/etc/shadowsocks-libev/*.json"], "format": "json", "ports": _LIBEV_PORTS},
        # shadowsocks-libev(8): -p server_port, -l local_port, ss-manager's --manager-address.
        "port_options": ["-p", "-l", "--manager-address"],
    },
    "shadowsocks_rust": {
        "description": "shadowsocks-rust (its Debian packaging, template units, the snap): ssserver, ssservice, ...",
        "programs": ["ssserver", "sslocal", "ssmanager", "ssservice", "ssredir", "sstunnel"],
        "plugins": PLUGINS,
        "service": "shadowsocks-rust",
        "pidfile": "/var/run/shadowsocks-rust/shadowsocks-rust.pid",
        "units": ["shadowsocks-rust.service", "shadowsocks-rust-server@.service", "shadowsocks-rust-local@.service",
                  "snap.shadowsocks-rust.ssserver-daemon.service"],
        "defaults_file": "/etc/default/shadowsocks-rust",
        "defaults_limit": "MAXFD",
        "config_limit": "nofile",
        "raises_soft": True,
        "configs": {"paths": ["/etc/shadowsocks-rust/*.json", "/var/snap/shadowsocks-rust/common/etc/*.json",
                              "/var/snap/shadowsocks-rust/common/etc/shadowsocks-rust/*.json"],
                    "format": "json5", "ports": _RUST_PORTS},
        # Its README: ssserver -s "[::]:8388", sslocal -b "127.0.0.1:1080".
        "port_options": ["-s", "--server-addr", "-b", "--local-addr"],
    },
    "outline": {
        "description": "outline-ss-server (Go; its own unit, or Outline's shadowbox state on the host)",
        "programs": ["outline-ss-server"],
        "units": ["outline-ss-server.service"],
        "raises_soft": True,
        "configs": {"paths": ["/etc/outline-ss-server/*.yml", "/etc/outline-ss-server/*.yaml",
                              "/opt/outline/persisted-state/outline-ss-server/config.yml"],
                    # config_example.yml: keys[].port (before v1.7), services[].listeners[].address
                    # (v1.7+), web.servers[].listen[] (v1.9+, the WebSocket server).
                    "format": "yaml", "ports": ["keys[].port", "services[].listeners[].address",
                                                "web.servers[].listen[]"]},
    },
    "xray": {
        "description": "Xray-core (Go) with a shadowsocks inbound",
        "programs": ["xray"],
        "units": ["xray.service", "xray@.service"],
        "raises_soft": True,
        "needs_ports": True,
        "configs": {"paths": ["/usr/local/etc/xray/*.json", "/etc/xray/*.json"], "format": "jsonc",
                    "ports": _V2RAY_PORTS},
    },
    "v2ray": {
        "description": "V2Ray (Go; Debian 12 packages 4.34) with a shadowsocks inbound",
        "programs": ["v2ray"],
        "units": ["v2ray.service", "v2ray@.service"],
        "raises_soft": True,
        "needs_ports": True,
        "configs": {"paths": ["/etc/v2ray/*.json", "/usr/local/etc/v2ray/*.json"], "format": "jsonc",
                    "ports": _V2RAY_PORTS + ["inbound[protocol=shadowsocks].port",
                                             "inboundDetour[protocol=shadowsocks].port"]},
    },
    "sing_box": {
        "description": "sing-box (Go) with a shadowsocks inbound",
        "programs": ["sing-box"],
        "units": ["sing-box.service", "sing-box@.service"],
        "raises_soft": True,
        "needs_ports": True,
        # sing-box configuration/inbound/shadowsocks: the listen fields' listen_port.
        "configs": {"paths": ["/etc/sing-box/*.json"], "format": "jsonc",
                    "ports": ["inbounds[type=shadowsocks].listen_port"]},
    },
}

# The fields of a kind, and the ones pillar may set on a built-in kind
# (paths and names that differ on a box); a kind of pillar's own gives any.
FIELDS = ("description", "programs", "plugins", "service", "pidfile", "units", "defaults_file", "defaults_limit",
          "minfds", "config_limit", "raises_soft", "children", "configs", "needs_ports", "port_options")
# Pillar names kept from earlier releases: limits:supervisor:config is the
# minfds file, limits:supervisor:unit its one unit.
ALIASES = {"config": "minfds", "unit": "units"}


def program_names(kinds=None):
    """Every program name of ``kinds`` (default: the built-in ones), plugins included."""
    names = set()
    for kind in (KINDS if kinds is None else kinds).values():
        names.update(kind.get("programs") or ())
        names.update(kind.get("plugins") or ())
    return names


def server_names(kinds=None):
    """The program names whose children are plugins with limits of their own."""
    return {name for kind in (KINDS if kinds is None else kinds).values() if kind.get("plugins")
            for name in kind["programs"]}


def kind_of(name, kinds=None):
    """The kind a program name belongs to, or None."""
    for kind_name, kind in (KINDS if kinds is None else kinds).items():
        if name in (kind.get("programs") or ()) or name in (kind.get("plugins") or ()):
            return kind_name
    return None
