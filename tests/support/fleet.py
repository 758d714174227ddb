"""Helpers of the fleet harness (the fixtures are in tests/integration/conftest.py):
Salt factories that run inside a network namespace (``NetnsSaltCall``,
``NetnsSaltMinion``, ``NetnsSshd``), the bridge + per-node namespaces
(``fleet_network``, ``FleetNet``, ``FleetNode``, ``cleanup_stale_fleet_netns``),
the master's file_roots / pillar_roots (``FleetSources``,
``write_placeholder_sources``, ``build_file_roots``, ``build_pillar_roots``),
a node's sandbox for ``shadowsocks.tuning`` (``TuningSandbox``) with the checks
``paths_outside`` / ``settings_outside``, and small helpers of the fixtures
(``_in_parallel``, ``_unused_loopback_port``, ``FleetRoster``)."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import attr
import yaml
from pytestshellutils.exceptions import FactoryNotStarted
from saltfactories.cli.call import SaltCall
from saltfactories.daemons.minion import SaltMinion
from saltfactories.daemons.sshd import Sshd

import sstuning_daemons as daemons

REPO_ROOT = Path(__file__).resolve().parents[2]
FLEET_SUPERNET = "10.213"  # /16 the per-run /24 is carved from

_NETNS_RE = re.compile(r"^sfleet-(\d+)-\d+$")
_LINK_RE = re.compile(r"^sfl([0-9a-z]+)(?:br|h\d+)$")


# --------------------------------------------------------------------------
# Minion factory that lives inside a network namespace
# --------------------------------------------------------------------------
@attr.s(kw_only=True, slots=True)
class NetnsSaltCall(SaltCall):
    """salt-call run inside the minion's network namespace."""

    netns = attr.ib()

    def cmdline(self, *args, **kwargs):  # pylint: disable=arguments-differ
        return ["ip", "netns", "exec", self.netns, *SaltCall.cmdline(self, *args, **kwargs)]


@attr.s(kw_only=True, slots=True)
class NetnsSaltMinion(SaltMinion):
    """A ``SaltMinion`` whose process is exec'd by ``ip netns exec <netns>``.

    ``ip netns exec`` setns()+execvp()s, so the PID pytest-salt-factories
    tracks (and kills on teardown) is the salt-minion itself.
    """

    netns = attr.ib()
    address = attr.ib(default=None)

    def cmdline(self, *args):
        return ["ip", "netns", "exec", self.netns, *SaltMinion.cmdline(self, *args)]

    def salt_call_cli(self, factory_class=NetnsSaltCall, **factory_class_kwargs):
        if issubclass(factory_class, NetnsSaltCall):
            factory_class_kwargs.setdefault("netns", self.netns)
        return SaltMinion.salt_call_cli(self, factory_class=factory_class, **factory_class_kwargs)


@attr.s(kw_only=True, slots=True)
class NetnsSshd(Sshd):
    """An sshd exec'd by ``ip netns exec <netns>``: every session it forks, and
    so salt-ssh's remote ``salt-call``, runs inside that network namespace.

    The base class checks readiness by connecting to ``localhost:<port>`` and,
    on teardown, kills *any* process listening on that port number; both are
    wrong for a daemon in another namespace, so the port lists are emptied and
    readiness is a TCP connect to ``listen_address`` (reachable over the bridge).
    """

    netns = attr.ib()

    def __attrs_post_init__(self):
        Sshd.__attrs_post_init__(self)
        self.check_ports = []
        self.listen_ports.clear()
        self.start_check(self._check_netns_listening)

    def cmdline(self, *args):
        return ["ip", "netns", "exec", self.netns, *Sshd.cmdline(self, *args)]

    def _check_netns_listening(self, timeout_at):
        while time.time() <= timeout_at:
            if not self.is_running():
                raise FactoryNotStarted(f"{self} is no longer running")
            with contextlib.suppress(OSError):
                socket.create_connection((self.listen_address, self.listen_port), timeout=1).close()
                return True
            time.sleep(0.2)
        return False


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------
def _ip(*args, check=True):
    cmd = ["ip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _b36(num: int) -> str:
    chars = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        num, rem = divmod(num, 36)
        out = chars[rem] + out
        if not num:
            return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale_fleet_netns():
    """Remove namespaces/links left by an earlier run whose pytest died hard
    (SIGKILL, machine stop).  Only objects named by this harness whose owning
    pytest PID is gone are touched; processes still inside such a namespace
    (orphaned minions) are killed by PID first."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NETNS_RE.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        for pid in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", name, check=False)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@")[0]
        match = _LINK_RE.match(name)
        if match and not _pid_alive(int(match.group(1), 36)):
            _ip("link", "del", name, check=False)


def _pick_subnet() -> ipaddress.IPv4Network:
    used = []
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        # "10.0.0.0/8 dev ..." or "local 10.1.2.3 dev ..." / "broadcast ..."
        for token in line.split()[:2]:
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(token, strict=False))
                break
    start = os.getpid() % 250
    for step in range(250):
        net = ipaddress.ip_network(f"{FLEET_SUPERNET}.{1 + (start + step) % 250}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError(f"no free /24 in {FLEET_SUPERNET}.0.0/16")


@dataclass
class FleetNode:
    index: int
    minion_id: str
    netns: str
    host_if: str
    address: str
    sysctls: Dict[str, str] = field(default_factory=dict)

    def exec(self, *cmd, check=True):
        """Run a command inside this node's namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd], capture_output=True, text=True, check=check
        )

    def read_sysctl(self, key: str) -> str:
        path = Path("/proc/sys") / key.replace(".", "/")
        return self.exec("cat", str(path)).stdout.strip()

    @property
    def netns_inode(self) -> str:
        return "net:[%d]" % os.stat(f"/run/netns/{self.netns}").st_ino


@dataclass
class FleetNet:
    bridge: str
    subnet: ipaddress.IPv4Network
    host_ip: str
    nodes: List[FleetNode]  # one per minion
    box: Optional[FleetNode] = None  # the salt-ssh target's namespace (fleet_ssh_netns)

    def node(self, minion_id: str) -> FleetNode:
        return next(n for n in self.nodes + [self.box] if n is not None and n.minion_id == minion_id)

    @property
    def minion_ids(self) -> List[str]:
        return [n.minion_id for n in self.nodes]


def _teardown_net(net_bridge, nodes):
    for node in nodes:
        # Anything still inside (should be nothing: minions stop first).
        for pid in _ip("netns", "pids", node.netns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", node.netns, check=False)
        _ip("link", "del", node.host_if, check=False)  # usually gone with the netns
    if net_bridge:
        _ip("link", "del", net_bridge, check=False)


@contextlib.contextmanager
def fleet_network(minion_ids: List[str], sysctls: Dict[str, Dict[str, str]],
                  box_id: Optional[str] = None):
    """Create bridge + one netns/veth per minion (plus one for ``box_id``, the
    salt-ssh target, when given); always removes them."""
    cleanup_stale_fleet_netns()
    pid = os.getpid()
    tok = _b36(pid)
    subnet = _pick_subnet()
    hosts = list(subnet.hosts())
    host_ip = str(hosts[0])
    bridge = f"sfl{tok}br"
    nodes: List[FleetNode] = []
    created_bridge = None
    try:
        _ip("link", "add", bridge, "type", "bridge")
        created_bridge = bridge
        _ip("addr", "add", f"{host_ip}/{subnet.prefixlen}", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for idx, minion_id in enumerate(list(minion_ids) + ([box_id] if box_id else []), start=1):
            node = FleetNode(
                index=idx,
                minion_id=minion_id,
                netns=f"sfleet-{pid}-{idx}",
                host_if=f"sfl{tok}h{idx}",
                address=str(hosts[9 + idx]),
                sysctls=dict(sysctls.get(minion_id, {})),
            )
            nodes.append(node)
            _ip("netns", "add", node.netns)
            _ip("link", "add", node.host_if, "type", "veth", "peer", "name", "eth0",
                "netns", node.netns)
            _ip("link", "set", node.host_if, "master", bridge)
            _ip("link", "set", node.host_if, "up")
            _ip("-n", node.netns, "link", "set", "lo", "up")
            _ip("-n", node.netns, "addr", "add", f"{node.address}/{subnet.prefixlen}",
                "dev", "eth0")
            _ip("-n", node.netns, "link", "set", "eth0", "up")
            for key, value in node.sysctls.items():
                res = node.exec("sysctl", "-q", "-w", f"{key}={value}", check=False)
                if res.returncode:
                    raise RuntimeError(f"{node.netns}: sysctl {key}={value}: {res.stderr.strip()}")
        net = FleetNet(bridge=bridge, subnet=subnet, host_ip=host_ip,
                       nodes=nodes[:len(minion_ids)], box=nodes[-1] if box_id else None)
        _wait_reachable(net)
        yield net
    finally:
        _teardown_net(created_bridge, nodes)


def _wait_reachable(net: FleetNet, timeout=10.0):
    """Fail early (not as a minion start timeout) if a namespace cannot reach
    the bridge address: TCP connect to a throwaway listener from each netns."""
    srv = socket.socket()
    srv.bind((net.host_ip, 0))
    srv.listen(16)
    port = srv.getsockname()[1]
    try:
        for node in net.nodes + ([net.box] if net.box else []):
            deadline = time.monotonic() + timeout
            code = (
                "import socket,sys;s=socket.socket();s.settimeout(1);"
                f"sys.exit(s.connect_ex(({net.host_ip!r},{port})))"
            )
            while True:
                if node.exec(sys.executable, "-c", code, check=False).returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{node.netns} cannot reach {net.host_ip}")
                time.sleep(0.2)
    finally:
        srv.close()


# --------------------------------------------------------------------------
# file_roots / pillar_roots
# --------------------------------------------------------------------------
@dataclass
class FleetSources:
    """Where the master's file_roots come from.

    sls_dirs: directories whose *contents* are SLS trees (each becomes a
        file_roots entry, in order);
    modules_dir / states_dir: linked as ``_modules`` / ``_states`` in a
        generated root that is listed first (so ``saltutil.sync_all`` and
        salt-ssh's ext_mods find them).
    """

    sls_dirs: List[Path]
    modules_dir: Optional[Path] = None
    states_dir: Optional[Path] = None

    @classmethod
    def from_repo(cls, root: Path = REPO_ROOT) -> "FleetSources":
        root = Path(root)
        sls = root / "salt"

        def _extra(name):
            # salt/ may already carry _modules/_states (symlinks): don't list twice
            if (sls / name).exists() or not (root / name).is_dir():
                return None
            return root / name

        return cls(sls_dirs=[sls], modules_dir=_extra("_modules"), states_dir=_extra("_states"))


PLACEHOLDER_MODULE = '''\
"""Placeholder execution module: what network namespace am I in?"""
import os


def read():
    with open("/proc/sys/net/core/somaxconn") as fh:
        somaxconn = fh.read().strip()
    return {"somaxconn": int(somaxconn), "netns": os.readlink("/proc/self/ns/net")}


def sysctl(name):
    with open("/proc/sys/" + name.replace(".", "/")) as fh:
        return fh.read().strip()
'''

PLACEHOLDER_STATE = '''\
"""Placeholder state module: set one sysctl of *this* network namespace."""


def sysctl(name, value):
    ret = {"name": name, "changes": {}, "result": True, "comment": ""}
    path = "/proc/sys/" + name.replace(".", "/")
    current = __salt__["nsprobe.sysctl"](name)
    value = str(value)
    if current == value:
        ret["comment"] = "{} already {}".format(name, value)
        return ret
    if __opts__["test"]:
        ret["result"] = None
        ret["changes"] = {"old": current, "new": value}
        ret["comment"] = "{} would be set to {}".format(name, value)
        return ret
    with open(path, "w") as fh:
        fh.write(value)
    ret["changes"] = {"old": current, "new": __salt__["nsprobe.sysctl"](name)}
    ret["comment"] = "{} set to {}".format(name, value)
    return ret


def noted(name):
    """Touches nothing; reports what nsprobe.read sees (proves custom state ->
    custom module calls work, e.g. under salt-ssh)."""
    probe = __salt__["nsprobe.read"]()
    return {"name": name, "changes": {}, "result": True, "comment": "netns={netns} somaxconn={somaxconn}".format(**probe)}
'''

PLACEHOLDER_SLS = {
    "fleet/empty.sls": "",
    "fleet/nop.sls": "fleet_nop:\n  test.nop: []\n",
    "fleet/fail.sls": "fleet_fail:\n  test.fail_without_changes: []\n",
    "fleet/probe.sls": textwrap.dedent(
        """\
        {%- set probe = salt['nsprobe.read']() %}
        fleet_probe_file:
          file.managed:
            - name: {{ opts['cachedir'] }}/fleet_probe.txt
            - contents: |
                role={{ pillar['fleet']['role'] }}
                netns={{ probe['netns'] }}

        fleet_fin_timeout:
          nsprobe.sysctl:
            - name: net.ipv4.tcp_fin_timeout
            - value: {{ pillar['fleet']['fin_timeout'] }}
        """
    ),
    "fleet/ssh_probe.sls": textwrap.dedent(
        """\
        {%- set probe = salt['nsprobe.read']() %}
        fleet_ssh_probe_file:
          file.managed:
            - name: {{ opts['cachedir'] }}/fleet_ssh_probe.txt
            - contents: |
                role={{ pillar['fleet']['role'] }}
                netns={{ probe['netns'] }}

        fleet_ssh_noted:
          nsprobe.noted:
            - name: probe
        """
    ),
}


def write_placeholder_sources(base: Path) -> FleetSources:
    """A tiny stand-in for the package: _modules/nsprobe.py, _states/nsprobe.py
    and SLS under fleet/ (probe, ssh_probe, empty, nop, fail)."""
    (base / "_modules").mkdir(parents=True, exist_ok=True)
    (base / "_states").mkdir(parents=True, exist_ok=True)
    (base / "_modules" / "nsprobe.py").write_text(PLACEHOLDER_MODULE)
    (base / "_states" / "nsprobe.py").write_text(PLACEHOLDER_STATE)
    sls_root = base / "sls"
    for rel, text in PLACEHOLDER_SLS.items():
        path = sls_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return FleetSources(sls_dirs=[sls_root], modules_dir=base / "_modules",
                        states_dir=base / "_states")


def build_file_roots(dest: Path, sources: FleetSources) -> List[str]:
    """Return the ``file_roots: base:`` list: a generated dir holding
    ``_modules``/``_states`` symlinks, followed by the SLS dirs."""
    dest.mkdir(parents=True, exist_ok=True)
    if sources.modules_dir is not None:
        (dest / "_modules").symlink_to(Path(sources.modules_dir).resolve())
    if sources.states_dir is not None:
        (dest / "_states").symlink_to(Path(sources.states_dir).resolve())
    return [str(dest)] + [str(Path(p).resolve()) for p in sources.sls_dirs]


def build_pillar_roots(dest: Path, pillar: Dict[str, dict], common: Optional[dict] = None) -> str:
    """top.sls gives every id in ``pillar`` its own SLS (plus ``common`` for '*')."""
    dest.mkdir(parents=True, exist_ok=True)
    top = {"base": {}}
    if common:
        (dest / "fleet_common.sls").write_text(yaml.safe_dump(common, default_flow_style=False))
        top["base"]["*"] = ["fleet_common"]
    for minion_id, data in pillar.items():
        sls = "fleet_node_" + re.sub(r"[^A-Za-z0-9_]", "_", minion_id)
        (dest / f"{sls}.sls").write_text(yaml.safe_dump(data, default_flow_style=False))
        top["base"][minion_id] = [sls]
    (dest / "top.sls").write_text(yaml.safe_dump(top, default_flow_style=False))
    return str(dest)


# --------------------------------------------------------------------------
# A node's sandbox for shadowsocks.tuning, and what would touch the host
# --------------------------------------------------------------------------
@dataclass
class TuningSandbox:
    """Where one node's ``shadowsocks.tuning`` writes, all under ``root``.

    Nodes share the host's filesystem (only the network is namespaced), so
    every path the package writes goes here: ``opts`` are the minion options
    (``shadowsocks_tuning.state_dir``/``sysctl_dirs``/``sysctl_conf``/
    ``modules_load_dir``), ``pillar(...)`` builds pillar
    ``shadowsocks:tuning`` with ``config`` here and the open-file-limit part
    (``nofile.sls``) pointed at copies of the supervisor / shadowsocks-libev
    files here: no host file under /etc is edited, no service is stopped or
    started, and its /proc check looks at no host daemon."""

    root: Path

    LIMIT_FILES = {
        "supervisor": "# Defaults for supervisor initscript\nDAEMON_OPTS=\"\"\n",
        "supervisord.conf": "[unix_http_server]\nfile=/var/run/supervisor.sock\n\n"
                            "[supervisord]\nlogfile=/var/log/supervisor/supervisord.log\n",
        # Debian ships MAXFD=32768; a lower start so that the (lower, grantable
        # here) nofile of a test is a raise, not a limit kept higher
        "shadowsocks-libev": "START=yes\nCONFFILE=\"/etc/shadowsocks-libev/config.json\"\nMAXFD=1024\n",
    }

    def __post_init__(self):
        for sub in ("sysctl.d", "usr-lib-sysctl.d", "state", "modules-load.d", "limits"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for name, text in self.LIMIT_FILES.items():
            (self.root / "limits" / name).write_text(text)

    @property
    def config(self) -> Path:
        return self.root / "sysctl.d" / "local.conf"

    def limit_file(self, name) -> Path:
        return self.root / "limits" / name

    @property
    def opts(self) -> dict:
        return {
            "shadowsocks_tuning.state_dir": str(self.root / "state"),
            "shadowsocks_tuning.sysctl_dirs": [str(self.root / "sysctl.d"), str(self.root / "usr-lib-sysctl.d")],
            "shadowsocks_tuning.sysctl_conf": str(self.root / "sysctl.conf"),
            "shadowsocks_tuning.modules_load_dir": str(self.root / "modules-load.d"),
        }

    def pillar(self, nofile=4096, **tuning) -> dict:
        limits = self.root / "limits"
        data = {
            "config": str(self.config),
            "nofile": nofile,
            "limits": {
                "init_system": "sysvinit",
                "restart": "never",
                "supervisor": {"service": None, "pidfile": None, "unit": None,
                               "defaults_file": str(limits / "supervisor"),
                               "config": str(limits / "supervisord.conf")},
                "shadowsocks_libev": {"service": None, "pidfile": None, "units": [],
                                      "defaults_file": str(limits / "shadowsocks-libev")},
                # The other kinds of the registry are the host's (they share its /etc): left alone.
                **{kind: None for kind in daemons.KINDS if kind not in ("supervisor", "shadowsocks_libev")},
                "init_scripts": [],
                "units": [],
                # a pidfile no daemon writes: the /proc check sees no host process
                "verify": {"pidfiles": [str(self.root / "no-daemon.pid")], "wait": 0},
            },
        }
        data.update(tuning)
        return {"shadowsocks": {"tuning": data}}


def paths_outside(data, root):
    """Absolute paths that ``state.show_sls`` output or ``state.apply``
    returns name outside ``root``: arguments of every state (show_sls), the
    ``name`` and the ``changes`` keys of every state return. Dunder keys
    (``__sls__``, ``__env__``...) are not arguments and are skipped."""
    root = str(root).rstrip("/") + "/"
    found = set()

    def walk(obj):
        if isinstance(obj, str):
            if obj.startswith("/") and not obj.startswith(root):
                found.add(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    for body in (data or {}).values():
        if not isinstance(body, dict):
            raise AssertionError(f"not a state: {body!r}")
        if "changes" in body and "result" in body:  # a state return
            walk(body.get("name"))
            walk(list(body.get("changes") or {}))
        else:  # a state declaration (show_sls)
            walk({k: v for k, v in body.items() if not k.startswith("__")})
    return sorted(found)


def settings_outside(settings, root):
    """What the resolved settings of a node (``shadowsocks_tuning.settings``)
    would act on outside ``root``: the persisted sysctl file, every file of
    every part of the open-file limits (a systemd drop-in, which goes to the
    host's systemd dir, counts as outside), the pidfiles the /proc check
    follows, and every service it would stop and start. The states' own
    arguments name no path: the settings are where the paths are."""
    root = str(root).rstrip("/") + "/"
    found = []

    def check(path, what):
        if not isinstance(path, str) or not path.startswith(root):
            found.append(f"{what}: {path}")

    check(settings["config"], "config")
    limits = settings["limits"]
    for pidfile in limits["verify"]["pidfiles"]:
        check(pidfile, "verify pidfile")
    for part, groups in limits["parts"].items():
        for group in groups:
            for target in group["files"]:
                if target["path"] is None:
                    found.append(f"{part}: systemd drop-in for {target.get('unit')}")
                else:
                    check(target["path"], f"{part} {target['kind']}")
            if group["restart"] and limits["restart"] != "never":
                found.append(f"{part}: stops and starts {group['restart']['name']}")
    return found


# --------------------------------------------------------------------------
# Small helpers of the fixtures
# --------------------------------------------------------------------------
def _in_parallel(func, items):
    """Run func(item) in one thread per item; return [(item_id, exc), ...]."""
    errors = []

    def _run(item):
        try:
            func(item)
        except Exception as exc:  # noqa: BLE001
            errors.append((getattr(item, "id", item), exc))

    threads = [threading.Thread(target=_run, args=(item,)) for item in items]
    for thr in threads:
        thr.start()
    for thr in threads:
        thr.join()
    return errors


def _unused_loopback_port():
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class FleetRoster:
    path: Path
    target: str  # reachable roster id (the loopback sshd)
    ghost: str  # roster id at a loopback port with nothing listening
    ghost_port: int
