"""pytest fixtures around SystemdBox (tests/support/systemd_box.py): a real
systemd 252 as PID 1 in a container, and servers in it under units in the
exact shape their own packaging ships (texts in systemd_units.py).
tests/integration/conftest.py imports them by name.

  systemd_box_safety_net  session: at the end, removes what boxes of THIS run
                          left (processes, cgroups, state dirs) and fails if
                          there was anything to remove
  host_snapshot           module: the host's mounts, cgroups, sysctls, unit
                          dirs before the module's box boots
  systemd_box             module: one booted box (override it to change
                          keep_units or binds); down at module end, test
                          failures or not
  box_salt                module: SaltInBox, salt-call --local inside
  libev_units, supervisor_program, v2ray_shadowsocks, shadowsocks_rust_units,
  outline_unit, high_limit_units
                          module: one packaging shape each, running; they
                          return a Server (or a dict of them)

Every server fixture's docstring says what is real and what is a stand-in.
Anything a fixture starts lives inside the box and dies with it at down().
"""

import collections
import glob
import json
import os
import sys

import pytest

from support import systemd_units as units
from support.common import REPO
from support.systemd_box import CGROUP_ROOTS, PREFIX, BoxError, SystemdBox, sweep_run, visible_in_host_mode

# unit: the systemd unit; port, password, method: its shadowsocks listener
Server = collections.namedtuple("Server", "unit port password method")

DEFAULT_KEEP_UNITS = ("shadowsocks-libev.service", "supervisor.service")
SYSCTL_PREFIXES = ("fs/", "kernel/", "net/core/")
# Values the kernel changes by itself (counters, random, pids).
SYSCTL_VOLATILE = ("fs/dentry-state", "fs/file-nr", "fs/inode-nr", "fs/inode-state", "fs/quota/",
                   "kernel/random/", "kernel/ns_last_pid", "kernel/pty/nr", "kernel/sched_domain/",
                   "kernel/perf_event_max_sample_rate", "kernel/tainted")


def _sysctls():
    values = {}
    for prefix in SYSCTL_PREFIXES:
        for dirpath, _, files in os.walk("/proc/sys/" + prefix):
            for name in files:
                path = os.path.join(dirpath, name)
                key = path[len("/proc/sys/"):]
                if key.startswith(SYSCTL_VOLATILE):
                    continue
                try:
                    with open(path) as f:
                        values[key] = f.read()
                except OSError:
                    pass
    return values


def snapshot_host():
    """What a box must not change on the host. Mounts of named network
    namespaces (/run/netns) are left out: other test runs on this machine
    create and remove them at any time."""
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(" ".join(line.split()[3:5]) for line in f if " /run/netns" not in line)
    return {
        "mounts": mounts,
        "cgroups": sorted(glob.glob(os.path.join(CGROUP_ROOTS[0], PREFIX + "*"))
                          + glob.glob(os.path.join(CGROUP_ROOTS[1], PREFIX + "*"))),
        "sysctls": _sysctls(),
        "etc_systemd": sorted(glob.glob("/etc/systemd/system/**", recursive=True)),
        "run_nspawn": os.path.exists("/run/systemd/nspawn"),
        "machine_id": open("/etc/machine-id").read() if os.path.exists("/etc/machine-id") else None,
    }


def host_changes(before, after):
    """{what: (before, after)} for every part of the snapshot that changed;
    sysctls reduced to the keys that differ."""
    changed = {}
    for key in before:
        if key == "sysctls":
            diff = {k: (before[key].get(k), after[key].get(k))
                    for k in set(before[key]) | set(after[key]) if before[key].get(k) != after[key].get(k)}
            if diff:
                changed[key] = diff
        elif before[key] != after[key]:
            changed[key] = (before[key], after[key])
    return changed


def binds_for(*paths):
    """Of the given host paths, those a host-mode box would not see (under
    /tmp, or on another mount): they must be bound in."""
    return tuple(p for p in dict.fromkeys(str(p) for p in paths) if not visible_in_host_mode(p))


@pytest.fixture(scope="session")
def systemd_box_safety_net():
    """Session safety net, like the shell recipe's teardown.sh: at the end of
    the session, down any box of this run still up, kill leftover container
    PID 1s / nspawns in this run's sstest-* cgroups, remove those cgroups and
    state dirs. Only this run's (the cgroup names carry its id). Anything it
    had to do means a teardown failed: reported as an error."""
    yield
    done = sweep_run()
    assert not done, "systemd boxes left things behind (removed now):\n" + "\n".join(done)


@pytest.fixture(scope="module")
def host_snapshot():
    return snapshot_host()


@pytest.fixture(scope="module")
def box_pillar_dir(tmp_path_factory):
    """Pillar dir for salt-call inside the box, on the host (bound in)."""
    path = tmp_path_factory.mktemp("box-pillar")
    (path / "top.sls").write_text("base:\n  '*': []\n")
    return path


@pytest.fixture(scope="module")
def systemd_box(systemd_box_safety_net, host_snapshot, box_pillar_dir):
    """One booted SystemdBox for the module (keep_units: Debian's
    shadowsocks-libev and supervisor; binds: the pillar dir, and this venv
    and its Python if a host-mode box could not see them). Downed at module
    end even when tests failed; a teardown that leaves anything fails."""
    box = SystemdBox("it", keep_units=DEFAULT_KEEP_UNITS, binds_rw=binds_for(box_pillar_dir),
                     binds_ro=binds_for(sys.prefix, os.path.realpath(sys.base_prefix), REPO))
    box.up()
    try:
        yield box
    finally:
        box.down()


@pytest.fixture(scope="module")
def box_salt(systemd_box, box_pillar_dir):
    """salt-call --local inside the box (real Salt 3008 from this venv,
    file_roots on this repository's salt/)."""
    return units.SaltInBox(systemd_box, REPO, box_pillar_dir)


def start(box, unit, port, timeout=30):
    """reset-failed (tests restart units often: systemd's start limit is 5 in
    10 s), start, wait for active and for the port to listen."""
    box.reset_failed(unit)
    box.systemctl("start", unit)
    box.wait_active(unit, timeout)
    box.wait_listening(port, timeout, unit=unit)


@pytest.fixture(scope="module")
def libev_units(systemd_box):
    """Debian 12's shadowsocks-libev, all real: the package's own
    shadowsocks-libev.service (LimitNOFILE=32768, EnvironmentFile=
    /etc/default/shadowsocks-libev) and shadowsocks-libev-server@.service as
    installed on the host, its /etc/shadowsocks-libev/config.json, the real
    ss-server. The default unit is enabled on the host, so it started at boot.
    Returns {"default": Server, "instance": Server} where the instance
    shadowsocks-libev-server@sstest.service has its own config (port 8394)."""
    box = systemd_box
    for unit in ("shadowsocks-libev.service", "shadowsocks-libev-server@.service"):
        units.check_debian_unit(box, unit)
    conf = json.loads(box.read("/etc/shadowsocks-libev/config.json"))
    default = Server("shadowsocks-libev.service", int(conf["server_port"]), conf["password"], conf["method"])
    box.wait_active(default.unit)
    box.wait_listening(default.port, unit=default.unit)
    instance = Server("shadowsocks-libev-server@sstest.service", 8394, units.PASSWORD, units.METHOD)
    box.write("/etc/shadowsocks-libev/sstest.json", json.dumps({
        "server": "127.0.0.1", "server_port": instance.port, "password": instance.password,
        "method": instance.method, "timeout": 60}))
    start(box, instance.unit, instance.port)
    return {"default": default, "instance": instance}


@pytest.fixture(scope="module")
def supervisor_program(systemd_box):
    """Debian 12's supervisor.service (real, as installed) running Debian's
    supervisord.conf, with one real program under it: ss-server on port
    8390 from /etc/supervisor/conf.d/sstest.conf. Returns Server for the
    program (unit = supervisor.service)."""
    box = systemd_box
    units.check_debian_unit(box, "supervisor.service")
    box.write("/etc/supervisor/conf.d/sstest.conf", units.SUPERVISOR_PROGRAM)
    # Debian's supervisor: stop, then start (not restart: see REFERENCE.md)
    box.systemctl("stop", "supervisor.service")
    start(box, "supervisor.service", units.SUPERVISOR_PORT)
    return Server("supervisor.service", units.SUPERVISOR_PORT, units.PASSWORD, units.METHOD)


def supervised_pid(box, program="shadowsocks"):
    """Container PID of a supervisord program (supervisorctl pid)."""
    out = box.run(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "pid", program],
                  check=True).stdout.strip()
    if not out.isdigit() or out == "0":
        raise BoxError("supervisorctl pid %s: %r" % (program, out))
    return int(out)


@pytest.fixture(scope="module")
def v2ray_shadowsocks(systemd_box):
    """Debian 12's v2ray 4.34 package, all real: its v2ray.service as
    installed (DynamicUser, no LimitNOFILE), the real Go binary, and
    /etc/v2ray/config.json in Debian's layout with a shadowsocks inbound on
    127.0.0.1:8488 instead of the postinst's vmess one."""
    box = systemd_box
    units.check_debian_unit(box, "v2ray.service")
    # The host enables v2ray.service (its postinst does), so the box masked
    # it at boot; unmask removes only that /dev/null link.
    box.systemctl("unmask", "v2ray.service")
    box.write("/etc/v2ray/config.json", units.V2RAY_CONFIG)
    box.daemon_reload()
    server = Server("v2ray.service", units.V2RAY_PORT, units.PASSWORD, units.METHOD)
    start(box, server.unit, server.port)
    return server


@pytest.fixture(scope="module")
def shadowsocks_rust_units(systemd_box):
    """shadowsocks-rust in the shape of its Debian packaging (debian/ of the
    shadowsocks-rust repository): /etc/default/shadowsocks-rust (CONFFILE,
    MAXFD, which systemd ignores), shadowsocks-rust.service (`ssservice
    server -c ${CONFFILE}`, LimitNOFILE=32768, DynamicUser=yes),
    shadowsocks-rust-server@.service (`%i.json`, no LimitNOFILE), the
    packaged config.json and a JSON5 instance config. Unit files and configs:
    exact shape. Daemon: STAND-IN (Debian 12 has no shadowsocks-rust): the
    real ss-server binary, copied as /usr/lib/sstest-standin/ssservice and
    exec'd by a small launcher at /usr/bin/ssservice that first raises the
    soft open-files limit to the hard one, as shadowsocks-rust does since
    1.14.3 (systemd_standin.py). MainPID is that ss-server, comm `ssservice`.
    Returns {"default": Server, "instance": Server}."""
    box = systemd_box
    units.install(box, units.SHADOWSOCKS_RUST, units.SHADOWSOCKS_RUST_STANDINS)
    default = Server("shadowsocks-rust.service", units.SSRUST_PORT, units.PASSWORD, units.METHOD)
    instance = Server("shadowsocks-rust-server@extra.service", units.SSRUST_INSTANCE_PORT,
                      units.PASSWORD, units.METHOD)
    for server in (default, instance):
        start(box, server.unit, server.port)
    return {"default": default, "instance": instance}


@pytest.fixture(scope="module")
def outline_unit(systemd_box):
    """outline-ss-server as packaged with a systemd unit (the RPM of
    theraphim/outline-ss-server: Type=notify, DynamicUser, LimitNOFILE=655360,
    ConfigurationDirectory=outline-ss-server; upstream ships no unit) with
    upstream's YAML `keys:` config. Unit and config: exact shape. Daemon:
    STAND-IN: the real v2ray 4.34 Go binary copied as outline-ss-server,
    launched with the YAML's keys as shadowsocks inbounds; its Go runtime
    raises soft to hard, as outline's does. comm is `outline-ss-serv` (15
    characters, as for the real one). Returns Server (key user-0)."""
    box = systemd_box
    units.install(box, units.OUTLINE, units.OUTLINE_STANDINS)
    server = Server("outline-ss-server.service", units.OUTLINE_PORT, "Secret0", units.METHOD)
    start(box, server.unit, server.port)
    return server


@pytest.fixture(scope="module")
def high_limit_units(systemd_box):
    """Units asking for more than any box can give: xray.service as
    Xray-install writes it (LimitNOFILE=1000000, User=nobody, plus its
    10-donot_touch_single_conf.conf drop-in) and sing-box.service as sing-box
    ships it (LimitNOFILE=infinity, User=sing-box made by its sysusers file).
    Units, drop-in, configs: exact shape. Daemons: STAND-INS: the real v2ray
    4.34 Go binary copied as xray / sing-box, reading the same shadowsocks
    inbound (systemd_standin.py). Returns {"xray": Server, "sing-box": Server}."""
    box = systemd_box
    units.install(box, units.XRAY, units.XRAY_STANDINS)
    units.install(box, units.SINGBOX, units.SINGBOX_STANDINS, units.SINGBOX_AFTER_INSTALL)
    servers = {"xray": Server("xray.service", units.XRAY_PORT, units.PASSWORD, units.METHOD),
               "sing-box": Server("sing-box.service", units.SINGBOX_PORT, units.PASSWORD, units.METHOD)}
    for server in servers.values():
        start(box, server.unit, server.port)
    return servers
