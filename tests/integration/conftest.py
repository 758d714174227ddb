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

A real systemd in a container (tests/support/systemd_fixtures.py, imported
below): systemd_box, box_salt, host_snapshot, systemd_box_safety_net and one
fixture per packaging shape (libev_units, supervisor_program,
v2ray_shadowsocks, shadowsocks_rust_units, outline_unit, high_limit_units).

The classes and helpers these fixtures use (the namespace-aware factories, the
fleet network, file_roots/pillar_roots, TuningSandbox, paths_outside,
settings_outside) live in tests/support/fleet.py.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from support.fleet import (
    REPO_ROOT, FleetRoster, FleetSources, NetnsSaltMinion, NetnsSshd, TuningSandbox,
    _in_parallel, _unused_loopback_port, build_file_roots, build_pillar_roots, fleet_network,
    paths_outside, settings_outside, write_placeholder_sources,
)

from support.systemd_fixtures import (  # noqa: F401  (fixtures, found by name)
    box_pillar_dir, box_salt, high_limit_units, host_snapshot, libev_units, outline_unit,
    shadowsocks_rust_units, supervisor_program, systemd_box, systemd_box_safety_net, v2ray_shadowsocks,
)

log = logging.getLogger(__name__)

SSH_SET_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SSH_TARGET_ID = "box"  # salt-ssh roster id of the reachable loopback target
SSH_GHOST_ID = "ghost"  # salt-ssh roster id of a loopback port with nothing listening


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
