"""Fleet harness: a real Salt master, N real minions each in its own network
namespace, and salt-ssh to a loopback sshd.

Layout (all built per test module, torn down at module end, even on failure):

    host netns                                      child netns  sfleet-<pid>-<i>
    ----------                                      -------------------------------
    bridge sfl<tok>br 10.213.<o>.1/24  <-- veth --> eth0  10.213.<o>.(10+i)/24
       salt-master binds 10.213.<o>.1                  salt-minion (ip netns exec)
       pytest event listener / log server (0.0.0.0)    lo up, no default route
    sshd on 127.0.0.1:<port> for salt-ssh

The namespaces have no default route: a minion can only reach the bridge
subnet, so nothing it does can leave the machine.

Plugging in the real package (file_roots = <gen dir>, /work/main/salt; the
_modules/_states/_utils symlinks inside salt/ are what sync_all and salt-ssh ship)::

    pytestmark = pytest.mark.fleet_sources("repo")    # or root="/other/checkout"

then override, per test module, as needed:
  fleet_pillar            {minion_id: pillar dict} (also key "box" for salt-ssh)
  fleet_minion_overrides  {minion_id: minion config}; the minions share the
                          host filesystem, so redirect file writes here
  fleet_ssh_minion_opts   roster minion_opts for "box"
  fleet_master_overrides  master config
  fleet_netns_sysctls     {minion_id: {sysctl: value}} set at netns creation
  fleet_size              number of minions (default 3; 0 is fine for salt-ssh only)
  fleet_ssh_netns         True: the salt-ssh target's sshd runs inside its own
                          network namespace on the bridge (see fleet_sshd), so
                          whatever salt-ssh changes in the kernel stays there

Marker kwarg ``extra_sls={"path/x.sls": "text"}`` adds a file_roots entry with
those files (e.g. an empty SLS to time against) after the sources.

Fixtures (all module-scoped):
  fleet_net        FleetNet: bridge, subnet, host_ip, nodes[FleetNode]
  fleet_master     started SaltMaster (interface = fleet_net.host_ip, auto_accept)
  fleet_minions    [NetnsSaltMinion], started in parallel, keys accepted
  fleet_salt_cli   `salt` CLI factory (timeout 120)
  fleet_synced     {minion_id: saltutil.sync_all return}
  fleet_sshd       started Sshd on 127.0.0.1, or NetnsSshd on fleet_net.box
  fleet_roster     FleetRoster(path, target="box", ghost="ghost", ghost_port)
  fleet_salt_ssh_cli  `salt-ssh` CLI factory, default target "box"
  fleet_tuning_sandbox  factory: node id -> TuningSandbox (per-node minion opts
                   and pillar that keep every file shadowsocks.tuning writes
                   in a temp dir, no service restarted)
  fleet_paths_outside   paths_outside(state data, root): paths a rendered SLS
                   or a state run touches outside a node's sandbox
  fleet_settings_outside  settings_outside(settings, root): what the resolved
                   settings (`shadowsocks_tuning.settings`) would write, check
                   or restart outside a node's sandbox
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import attr
import pytest
import yaml
from pytestshellutils.exceptions import FactoryNotStarted
from saltfactories.cli.call import SaltCall
from saltfactories.daemons.minion import SaltMinion
from saltfactories.daemons.sshd import Sshd

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
FLEET_SUPERNET = "10.213"  # /16 the per-run /24 is carved from
SSH_SET_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SSH_TARGET_ID = "box"  # salt-ssh roster id of the reachable loopback target
SSH_GHOST_ID = "ghost"  # salt-ssh roster id of a loopback port with nothing listening

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
# Fixtures
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def salt_factories_config():
    """Short root dir (unix socket paths must stay < 108 chars); removed at the end."""
    root = tempfile.mkdtemp(prefix="sfleet-")
    yield {"root_dir": root}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet_size():
    return 3


@pytest.fixture(scope="module")
def fleet_minion_ids(fleet_size):
    return [f"fleet-m{i}" for i in range(1, fleet_size + 1)]


@pytest.fixture(scope="module")
def fleet_netns_sysctls(fleet_minion_ids):
    """Per-namespace sysctls written right after each netns is created."""
    return {mid: {"net.core.somaxconn": str(1000 + 111 * i)}
            for i, mid in enumerate(fleet_minion_ids, start=1)}


@pytest.fixture(scope="module")
def fleet_ssh_netns():
    """False: the salt-ssh target ``box`` is an sshd on the host's 127.0.0.1
    (salt-ssh then changes the host: only for states that touch nothing).
    True: ``box`` is its own network namespace on the bridge (fleet_net.box),
    its sshd started there, so salt-ssh's remote side writes that namespace's
    sysctls, never the host's."""
    return False


@pytest.fixture(scope="module")
def fleet_net(fleet_minion_ids, fleet_netns_sysctls, fleet_ssh_netns):
    box_id = SSH_TARGET_ID if fleet_ssh_netns else None
    with fleet_network(fleet_minion_ids, fleet_netns_sysctls, box_id=box_id) as net:
        yield net


@pytest.fixture(scope="module")
def fleet_workdir():
    """Per-module work dir (file_roots, pillar_roots, roster, thin dirs, and
    whatever a test module puts there), removed at module end."""
    path = Path(tempfile.mkdtemp(prefix="sfleet-work-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "fleet_sources(kind='placeholder', root=None, extra_sls=None): what the fleet master "
        "serves as file_roots: 'placeholder' (nsprobe module/state + fleet/*.sls) or 'repo' "
        "(root/salt, root/_modules, root/_states; root defaults to this repository); "
        "extra_sls {relative path: text} adds a file_roots entry holding those files",
    )


@pytest.fixture(scope="module")
def fleet_sources(request, fleet_workdir):
    """What becomes the master's file_roots.  One line in a test module picks
    the real package::

        pytestmark = pytest.mark.fleet_sources("repo")

    (or override this fixture; it may return a FleetSources or a dict with
    the same fields)."""
    marker = request.node.get_closest_marker("fleet_sources")
    kind = "placeholder"
    root = REPO_ROOT
    extra = {}
    if marker is not None:
        kind = marker.kwargs.get("kind", marker.args[0] if marker.args else kind)
        root = Path(marker.kwargs.get("root") or root)
        extra = marker.kwargs.get("extra_sls") or {}
    if kind == "repo":
        sources = FleetSources.from_repo(root)
    elif kind == "placeholder":
        sources = write_placeholder_sources(fleet_workdir / "placeholder")
    else:
        raise pytest.UsageError(f"fleet_sources: unknown kind {kind!r}")
    if extra:
        extra_root = fleet_workdir / "extra_sls"
        for rel, text in extra.items():
            path = extra_root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        sources.sls_dirs.append(extra_root)
    return sources


@pytest.fixture(scope="module")
def fleet_file_roots(fleet_workdir, fleet_sources):
    """The master's ``file_roots: base:`` list."""
    if isinstance(fleet_sources, dict):
        fleet_sources = FleetSources(**fleet_sources)
    return build_file_roots(fleet_workdir / "file_root", fleet_sources)


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
    for pidfile in settings["verify"]["pidfiles"]:
        check(pidfile, "verify pidfile")
    for part, groups in settings["limits"].items():
        for group in groups:
            for target in group["files"]:
                if target["path"] is None:
                    found.append(f"{part}: systemd drop-in for {target.get('unit')}")
                else:
                    check(target["path"], f"{part} {target['kind']}")
            if group["restart"] and settings["restart"] != "never":
                found.append(f"{part}: stops and starts {group['restart']['name']}")
    return found


@pytest.fixture(scope="module")
def fleet_settings_outside():
    """``settings_outside(settings, root)``: what a node's resolved settings
    would write, check or restart outside its sandbox (must be nothing)."""
    return settings_outside


@pytest.fixture(scope="module")
def fleet_paths_outside():
    """``paths_outside(data, root)``: what a state run or a rendered SLS would
    touch outside a node's sandbox (must be nothing: nodes share the host's
    filesystem)."""
    return paths_outside


@pytest.fixture(scope="module")
def fleet_tuning_sandbox(fleet_workdir):
    """Factory: ``fleet_tuning_sandbox(node_id)`` -> TuningSandbox under the
    module's work dir (the same object for the same id)."""
    made = {}

    def make(node_id):
        if node_id not in made:
            made[node_id] = TuningSandbox(fleet_workdir / "sandbox" / node_id)
        return made[node_id]

    return make


@pytest.fixture(scope="module")
def fleet_pillar(fleet_minion_ids):
    """{id: pillar} for each minion and the salt-ssh target; override freely."""
    data = {
        mid: {"fleet": {"role": f"node-{i}", "fin_timeout": 30 + i}}
        for i, mid in enumerate(fleet_minion_ids, start=1)
    }
    data[SSH_TARGET_ID] = {"fleet": {"role": "ssh-box", "fin_timeout": 60}}
    return data


@pytest.fixture(scope="module")
def fleet_pillar_common():
    return {"fleet_common": {"harness": "fleet"}}


@pytest.fixture(scope="module")
def fleet_pillar_roots(fleet_workdir, fleet_pillar, fleet_pillar_common):
    return build_pillar_roots(fleet_workdir / "pillar_root", fleet_pillar, fleet_pillar_common)


@pytest.fixture(scope="module")
def fleet_master_overrides():
    """Extra master config, merged last (top-level keys replace ours)."""
    return {}


@pytest.fixture(scope="module")
def fleet_minion_overrides(fleet_minion_ids):
    """{minion_id: extra minion config}.  The minions share the host's
    filesystem (only the network is namespaced): point anything a state writes
    (e.g. ``shadowsocks_tuning.sysctl_dirs``) at a per-minion temp dir here."""
    return {mid: {} for mid in fleet_minion_ids}


@pytest.fixture(scope="module")
def fleet_ssh_minion_opts():
    """Extra ``minion_opts`` for the salt-ssh target ``box`` (roster)."""
    return {}


@pytest.fixture(scope="module")
def fleet_master(salt_factories, fleet_net, fleet_file_roots, fleet_pillar_roots,
                 fleet_master_overrides):
    root = Path(salt_factories.root_dir)
    overrides = {
        "interface": fleet_net.host_ip,
        "auto_accept": True,
        "file_roots": {"base": fleet_file_roots},
        "pillar_roots": {"base": [fleet_pillar_roots]},
        # salt-ssh bits (salt-ssh reads the master config)
        "ssh_log_file": str(root / "salt-ssh.log"),
        "known_hosts_file": str(root / "known_hosts"),
    }
    overrides.update(fleet_master_overrides)
    master = salt_factories.salt_master_daemon(
        f"fleet-master-{os.getpid()}", overrides=overrides
    )
    with master.started():
        yield master


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


@pytest.fixture(scope="module")
def fleet_minions(fleet_master, fleet_net, fleet_minion_overrides):
    """Started minions (``NetnsSaltMinion``), one per namespace, in parallel."""
    minions = []
    for node in fleet_net.nodes:
        overrides = {
            "master": fleet_net.host_ip,
            "enable_fqdns_grains": False,
            # the pytest engine / log handler must reach the host's listeners
            # (bound to 0.0.0.0) through the bridge, not the netns loopback
            "pytest-minion": {
                "returner_address": {"host": fleet_net.host_ip},
                "log": {"host": fleet_net.host_ip},
            },
        }
        overrides.update(fleet_minion_overrides.get(node.minion_id) or {})
        minions.append(
            fleet_master.salt_minion_daemon(
                node.minion_id,
                overrides=overrides,
                factory_class=NetnsSaltMinion,
                netns=node.netns,
                address=node.address,
            )
        )
    try:
        errors = _in_parallel(lambda m: m.start(), minions)
        if errors:
            raise RuntimeError(f"minions failed to start: {errors}")
        yield minions
    finally:
        # A minion takes ~5 s to exit on SIGTERM: stop them side by side.
        _in_parallel(lambda m: m.terminate(), minions)


@pytest.fixture(scope="module")
def fleet_salt_cli(fleet_master):
    return fleet_master.salt_cli(timeout=120)


@pytest.fixture(scope="module")
def fleet_synced(fleet_minions, fleet_salt_cli):
    """``salt '*' saltutil.sync_all`` once; yields its per-minion return."""
    ret = fleet_salt_cli.run("saltutil.sync_all", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert set(ret.data) == {m.id for m in fleet_minions}, ret
    return ret.data


@pytest.fixture(scope="module")
def fleet_sshd(salt_factories, fleet_net, fleet_ssh_netns):
    """sshd for the salt-ssh target: on the host's 127.0.0.1, or (with
    fleet_ssh_netns) started by ``ip netns exec`` inside fleet_net.box and
    listening on the box's bridge address."""
    # sshd's privilege-separation dir (Debian's init script makes it); left in
    # place afterwards: other sshd users on the machine may rely on it.
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    config = {
        "Subsystem": "sftp /usr/lib/openssh/sftp-server",
        "StrictModes": "no",
        "UsePAM": "no",
    }
    if fleet_ssh_netns:
        box = fleet_net.box
        sshd = salt_factories.get_sshd_daemon(
            display_name=f"fleet-sshd[{box.netns}]",
            listen_address=box.address,
            sshd_config_dict=config,
            factory_class=NetnsSshd,
            netns=box.netns,
        )
    else:
        sshd = salt_factories.get_sshd_daemon(display_name="fleet-sshd", sshd_config_dict=config)
    with sshd.started():
        yield sshd


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


@pytest.fixture(scope="module")
def fleet_ssh_multiplex():
    """Reuse one ssh connection for the ~4 ssh/scp calls each salt-ssh run
    makes to ``box`` (ControlMaster; ~2 s saved per call here).  The master
    connection is closed at module teardown (and exits by itself after
    ControlPersist seconds idle).  Override with False to disable."""
    return True


@pytest.fixture(scope="module")
def fleet_roster(salt_factories, fleet_master, fleet_sshd, fleet_workdir, fleet_ssh_multiplex,
                 fleet_ssh_minion_opts):
    """Roster with ``box`` (the loopback sshd) and ``ghost`` (closed port)."""
    known_hosts = Path(fleet_master.config["known_hosts_file"])
    known_hosts.write_text("\n".join(fleet_sshd.get_host_keys()) + "\n")
    common = {
        "host": "127.0.0.1",  # ghost: a closed loopback port
        "user": "root",
        "priv": str(fleet_sshd.client_key),
        "set_path": SSH_SET_PATH,
    }
    ghost_port = _unused_loopback_port()
    roster = {
        SSH_TARGET_ID: {
            **common,
            "host": fleet_sshd.listen_address,
            "port": fleet_sshd.listen_port,
            "thin_dir": str(fleet_workdir / "thin_box"),
            "minion_opts": {"fleet_roster_opt": "from-roster", **fleet_ssh_minion_opts},
        },
        SSH_GHOST_ID: {
            **common,
            "port": ghost_port,
            "thin_dir": str(fleet_workdir / "thin_ghost"),
            "timeout": 5,
        },
    }
    control_path = None
    if fleet_ssh_multiplex:
        # short path: unix socket, %C is a 40-char hash
        control_path = f"{salt_factories.root_dir}/cm-{os.getpid()}-%C"
        roster[SSH_TARGET_ID]["ssh_options"] = [
            "ControlMaster=auto", f"ControlPath={control_path}", "ControlPersist=30",
        ]
    path = fleet_workdir / "roster"
    path.write_text(yaml.safe_dump(roster, default_flow_style=False))
    yield FleetRoster(path=path, target=SSH_TARGET_ID, ghost=SSH_GHOST_ID, ghost_port=ghost_port)
    if control_path:
        subprocess.run(
            ["ssh", "-o", f"ControlPath={control_path}", "-O", "exit",
             "-p", str(fleet_sshd.listen_port), f"root@{fleet_sshd.listen_address}"],
            capture_output=True, check=False, timeout=30,
        )


@pytest.fixture(scope="module")
def fleet_salt_ssh_cli(fleet_master, fleet_sshd, fleet_roster):
    """salt-ssh CLI bound to the roster; default target ``box``."""
    return fleet_master.salt_ssh_cli(
        timeout=180,
        roster_file=str(fleet_roster.path),
        client_key=str(fleet_sshd.client_key),
        target_host=fleet_roster.target,
    )
