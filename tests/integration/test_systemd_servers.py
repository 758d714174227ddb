"""`state.apply shadowsocks.tuning` run INSIDE a container whose PID 1 is
Debian 12's real systemd 252 (tests/support/systemd_box.py), by salt-call
--local from this venv (SaltInBox), against the servers there under units in
their packagings' exact shapes. The proof is always /proc/PID/limits read
inside; `systemctl show` is read too, to show where it disagrees with /proc.

What is real: systemd, its drop-in handling, daemon-reload, restarts and start
limits; Debian's shadowsocks-libev (default unit and a server@ instance),
supervisor with a program, and v2ray 4.34 with a shadowsocks inbound; Salt.
What is a stand-in (nothing else can run here): the shadowsocks-rust-,
outline-, xray- and sing-box-shaped services run real binaries (ss-server,
v2ray) under the real servers' unit files and configs (systemd_standin.py:
the rust one raises soft to hard at start as shadowsocks-rust does, the Go
ones through the Go runtime). One box for the whole module; the pillar points
nothing at the host (the box's /etc, /var/lib and /proc/sys/net are its own).

The box's ceiling is its PID 1's hard limit (20000 on this machine, no
CAP_SYS_RESOURCE), read from the kernel: an unset `nofile` resolves to it.
Tests run in file order: the first ones see the box as it booted; each later
scenario puts back what it changed (admin files, the package's own through
`shadowsocks.tuning.clean`, failed units) before the next one.
"""

import glob
import json
import os

import pytest

from support import systemd_units as units
from support.systemd_box import CGROUP_ROOTS, PREFIX, is_container_init, nspawn_available
from support.systemd_fixtures import host_changes, snapshot_host, start, supervised_pid

from sstuning_units import DROPIN_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nspawn_available(), reason=(
        "systemd-nspawn is not installed: apt-get install --no-install-recommends systemd-container "
        "(./run-tests installs it)")),
]

SYSTEMD_DIR = "/etc/systemd/system"
STATE_DIR = "/var/lib/shadowsocks_tuning"  # the package's default, inside the box
RESERVED = "/proc/sys/net/ipv4/ip_local_reserved_ports"
# Files the package may write besides drop-ins; a dry run must leave them byte for byte.
WATCHED = ("/etc/default/supervisor", "/etc/supervisor/supervisord.conf", "/etc/default/shadowsocks-libev",
           "/etc/default/shadowsocks-rust", "/etc/sysctl.d/local.conf")
SYSCTL, NOFILE, VERIFY, CLEAN = ("shadowsocks-tuning-sysctl", "shadowsocks-tuning-nofile",
                                 "shadowsocks-tuning-nofile-verify", "shadowsocks-tuning-clean")


def dropin(unit):
    return "%s/%s.d/%s" % (SYSTEMD_DIR, unit, DROPIN_NAME)


def parse_ports(text):
    ports = set()
    for part in filter(None, text.strip().split(",")):
        low, _, high = part.partition("-")
        ports.update(range(int(low), int(high or low) + 1))
    return ports


class Tuning:
    """The package as a user drives it inside the box, and what to look at."""

    def __init__(self, box, salt, pillar_dir, servers):
        self.box, self.salt, self.pillar_dir, self.servers = box, salt, pillar_dir, servers
        self.ceiling = box.ceiling

    def apply(self, sls="shadowsocks.tuning", test=False, pillar=None):
        """state.apply inside with pillar shadowsocks:tuning = `pillar`;
        {state id: state return}."""
        (self.pillar_dir / "top.sls").write_text("base:\n  '*': [tuning]\n")
        (self.pillar_dir / "tuning.sls").write_text(json.dumps({"shadowsocks": {"tuning": pillar or {}}}) + "\n")
        data, proc = self.salt("state.apply", sls, "test=%s" % test)
        assert isinstance(data, dict), "no state output from salt-call:\n%s\n%s" % (proc.stdout[-3000:],
                                                                                   proc.stderr[-3000:])
        return {key.split("_|-")[1]: ret for key, ret in data.items()}

    def dropins(self):
        """Every drop-in of this package in the box."""
        out = self.box.run(["find", SYSTEMD_DIR, "-name", DROPIN_NAME]).stdout
        return sorted(out.split())

    def pid(self, unit):
        return self.box.main_pid(unit)

    def limits(self, unit):
        return self.box.limits(self.pid(unit))

    def show(self, unit):
        return self.box.show(unit, "LimitNOFILESoft", "LimitNOFILE")

    def digest(self, paths=WATCHED):
        script = 'for f; do [ -e "$f" ] && sha256sum "$f" || echo "absent $f"; done'
        return self.box.run(["sh", "-c", script, "sh", *paths]).stdout

    def reserved(self):
        return parse_ports(self.box.read(RESERVED))

    def look(self):
        """Everything a dry run must not change."""
        running = {u: (self.pid(u), self.limits(u)) for u in self.units()}
        return {"running": running, "dropins": self.dropins(), "files": self.digest(),
                "reserved": self.box.read(RESERVED), "state_dir": self.box.run(["ls", "-a", STATE_DIR]).stdout}

    def units(self):
        return sorted({s.unit for s in self.servers.values()})


@pytest.fixture(scope="module")
def servers(libev_units, supervisor_program, v2ray_shadowsocks, shadowsocks_rust_units, outline_unit,
            high_limit_units):
    return {"libev": libev_units["default"], "libev@": libev_units["instance"], "supervisor": supervisor_program,
            "v2ray": v2ray_shadowsocks, "rust": shadowsocks_rust_units["default"],
            "rust@": shadowsocks_rust_units["instance"], "outline": outline_unit,
            "xray": high_limit_units["xray"], "sing-box": high_limit_units["sing-box"]}


@pytest.fixture(scope="module")
def host_reserved_ports():
    with open(RESERVED) as f:
        return f.read()


@pytest.fixture(scope="module")
def tuning(systemd_box, box_salt, box_pillar_dir, servers, host_reserved_ports):
    synced, proc = box_salt("saltutil.sync_all")
    assert synced and "states.shadowsocks_tuning" in synced["states"], proc.stdout + proc.stderr
    return Tuning(systemd_box, box_salt, box_pillar_dir, servers)


@pytest.fixture
def scenario(tuning):
    """For a test that changes the box: admin files it writes through
    `admin()` are removed afterwards, then daemon-reload, reset-failed (the
    start limit), the package's own changes undone through
    shadowsocks.tuning.clean, and every server unit running again."""
    written = []

    def admin(path, text):
        tuning.box.write(path, text)
        written.append(path)
        return path

    yield admin
    box = tuning.box
    for path in written:
        box.remove(path)
    box.daemon_reload()
    box.systemctl("reset-failed", check=False)
    if box.run(["test", "-e", STATE_DIR + "/originals.json"]).returncode == 0:
        ret = tuning.apply("shadowsocks.tuning.clean")[CLEAN]
        assert ret["result"] is True, ret["comment"]
    for server in tuning.servers.values():
        if box.systemctl("is-active", server.unit, check=False).stdout.strip() != "active":
            start(box, server.unit, server.port)


# ------------------------------------------------------------------ the box as it booted
def test_dry_run_predicts_every_change_and_changes_nothing(tuning):
    box, s = tuning.box, tuning.servers
    before = tuning.look()
    supervisord, program = tuning.pid("supervisor.service"), supervised_pid(box)
    rets = tuning.apply(test=True)
    assert tuning.look() == before, "test=True changed the box"
    assert supervised_pid(box) == program
    nofile = rets[NOFILE]
    assert nofile["result"] is None, nofile["comment"]
    changes = nofile["changes"]
    # The drop-ins that raise an effective value: supervisor (1024:524288 from
    # DefaultLimitNOFILE gives soft 1024) and the libev server template.
    for unit in ("supervisor.service", "shadowsocks-libev-server@.service"):
        assert changes[dropin(unit)]["new"] == "%d:524288" % tuning.ceiling, changes[dropin(unit)]
    # Nothing for a unit whose clamped value is already enough: never lowered.
    for unit in ("shadowsocks-libev.service", "xray.service", "sing-box.service", "outline-ss-server.service",
                 "shadowsocks-rust.service", "shadowsocks-rust-server@.service", "v2ray.service"):
        assert dropin(unit) not in changes, unit
    # Per process: supervisord and its program raised in place (root,
    # soft below a hard limit at the ceiling); the libev instance runs as its
    # DynamicUser, so its template's instances restart.
    limit = "%d:%d" % (tuning.ceiling, tuning.ceiling)
    assert changes["pid %d" % supervisord] == {"old": "1024:%d" % tuning.ceiling, "new": limit}
    assert changes["pid %d" % program]["new"] == limit
    assert changes["service shadowsocks-libev-server@.service"] == {"old": None, "new": "restarted"}
    assert "would be raised in place" in nofile["comment"]
    assert "try-restart -- shadowsocks-libev-server@*.service" in nofile["comment"]
    assert rets[SYSCTL]["result"] is None and "net.ipv4.ip_local_reserved_ports" in rets[SYSCTL]["changes"]
    assert rets[VERIFY]["result"] is None  # below the limit now, reported, not failed


@pytest.fixture(scope="module")
def applied(tuning):
    """The real run on the box as it booted: (state returns, MainPIDs and
    supervised pid before)."""
    before = {u: tuning.pid(u) for u in tuning.units()}
    program = supervised_pid(tuning.box)
    return tuning.apply(), before, program


def test_apply_succeeds_and_every_daemon_has_the_limit(tuning, applied):
    rets, before, _ = applied
    for name in (SYSCTL, NOFILE, VERIFY):
        assert rets[name]["result"] is True, (name, rets[name]["comment"])
    both = (tuning.ceiling, tuning.ceiling)
    for unit in tuning.units():
        assert tuning.limits(unit) == both, unit
    assert "every process runs with at least %d open files" % tuning.ceiling in rets[VERIFY]["comment"]
    # Only the daemon that could not be raised in place was restarted.
    restarted = {u for u in tuning.units() if tuning.pid(u) != before[u]}
    assert restarted == {"shadowsocks-libev-server@sstest.service"}


def test_libev_unit_is_never_lowered_and_reported_capped(tuning, applied):
    """Debian's LimitNOFILE=32768: systemd gives the ceiling; the package
    writes nothing lower and says it is capped."""
    rets = applied[0]
    unit = "shadowsocks-libev.service"
    assert dropin(unit) not in tuning.dropins()
    assert tuning.show(unit) == {"LimitNOFILESoft": "32768", "LimitNOFILE": "32768"}
    assert tuning.limits(unit) == (tuning.ceiling, tuning.ceiling)
    line = [l for l in rets[NOFILE]["comment"].splitlines() if l.startswith(unit + ":")]
    assert line and "LimitNOFILE 32768" in line[0] and "capped at the box's ceiling %d" % tuning.ceiling in line[0]
    # /etc/default/shadowsocks-libev's MAXFD=32768 (read by no ulimit under systemd) is kept too.
    assert "MAXFD=32768" in tuning.box.read("/etc/default/shadowsocks-libev").splitlines()


def test_libev_instance_gets_the_template_dropin(tuning, applied):
    box, server = tuning.box, tuning.servers["libev@"]
    text = box.read(dropin("shadowsocks-libev-server@.service"))
    assert "LimitNOFILE=%d:524288" % tuning.ceiling in text.splitlines()
    assert tuning.show(server.unit) == {"LimitNOFILESoft": str(tuning.ceiling), "LimitNOFILE": "524288"}
    assert tuning.limits(server.unit) == (tuning.ceiling, tuning.ceiling)
    box.wait_listening(server.port, unit=server.unit)
    assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3


def test_supervisor_raised_in_place_and_its_programs_inherit(tuning, applied):
    box, server = tuning.box, tuning.servers["supervisor"]
    _, before, program = applied
    both = (tuning.ceiling, tuning.ceiling)
    assert tuning.pid(server.unit) == before[server.unit]  # raised in place, not restarted
    assert supervised_pid(box) == program and box.limits(program) == both
    assert "minfds=%d" % tuning.ceiling in box.read("/etc/supervisor/supervisord.conf").splitlines()
    # A program started now by the raised supervisord inherits its limit.
    box.run(["supervisorctl", "-c", "/etc/supervisor/supervisord.conf", "restart", "shadowsocks"], check=True)
    assert supervised_pid(box) != program and box.limits(supervised_pid(box)) == both
    box.wait_listening(server.port, unit=server.unit)
    assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3


def test_config_ports_are_reserved_in_the_box_only(tuning, applied, host_reserved_ports):
    """v2ray's shadowsocks inbound (Debian's real v2ray), shadowsocks-rust's
    JSON and JSON5 `servers` list, outline's YAML `keys`, xray's and
    sing-box's inbounds: in the box's own ip_local_reserved_ports."""
    reserved = tuning.reserved()
    for port in (units.V2RAY_PORT, units.SSRUST_PORT, units.SSRUST_INSTANCE_PORT, units.OUTLINE_PORT,
                 units.XRAY_PORT, units.SINGBOX_PORT, tuning.servers["libev"].port, tuning.servers["libev@"].port):
        assert port in reserved, (port, sorted(reserved))
    with open(RESERVED) as f:
        assert f.read() == host_reserved_ports  # the container's namespace, not the host's


def test_million_infinity_and_stand_ins_are_never_lowered(tuning, applied):
    """xray's 1000000, sing-box's infinity, outline's 655360 and
    shadowsocks-rust's 32768 (stand-in daemons) are clamped by systemd to the
    ceiling: no drop-in, the configured value stays, the comment says capped."""
    rets = applied[0]
    for unit, configured in (("xray.service", "1000000"), ("sing-box.service", "infinity"),
                             ("outline-ss-server.service", "655360"), ("shadowsocks-rust.service", "32768")):
        assert dropin(unit) not in tuning.dropins(), unit
        assert tuning.show(unit)["LimitNOFILE"] == configured, unit
        assert tuning.limits(unit) == (tuning.ceiling, tuning.ceiling), unit
        line = [l for l in rets[NOFILE]["comment"].splitlines() if l.startswith(unit + ":")]
        assert line and "no drop-in needed" in line[0] and "capped" in line[0], (unit, line)


def test_rerun_changes_nothing(tuning, applied):
    pids = {u: tuning.pid(u) for u in tuning.units()}
    rets = tuning.apply()
    for name in (SYSCTL, NOFILE, VERIFY):
        assert rets[name]["result"] is True and rets[name]["changes"] == {}, (name, rets[name])
    assert {u: tuning.pid(u) for u in tuning.units()} == pids


def test_clean_removes_the_dropins_and_systemd_forgets_them(tuning, applied):
    box = tuning.box
    assert tuning.dropins()
    ret = tuning.apply("shadowsocks.tuning.clean")[CLEAN]
    assert ret["result"] is True, ret["comment"]
    assert ret["changes"]["systemctl daemon-reload"]["new"] == "run"
    assert tuning.dropins() == []
    assert tuning.show("supervisor.service") == {"LimitNOFILESoft": "1024", "LimitNOFILE": "524288"}
    assert box.show("supervisor.service", "NeedDaemonReload") == {"NeedDaemonReload": "no"}
    assert "minfds" not in box.read("/etc/supervisor/supervisord.conf")
    assert box.run(["test", "-e", "/etc/sysctl.d/local.conf"]).returncode != 0


# ------------------------------------------------------------------ scenarios
def test_nofile_above_the_ceiling_fails_every_state_naming_the_cap(tuning):
    """systemd would clamp 51200 silently (systemctl show keeps the
    configured value, /proc has the ceiling): the package refuses it up front,
    in every state, and writes nothing."""
    before = tuning.look()
    rets = tuning.apply(pillar={"nofile": 51200})
    for name in (SYSCTL, NOFILE, VERIFY):
        assert rets[name]["result"] is False, name
        assert rets[name]["changes"] == {}, name
        assert "51200 cannot be granted here" in rets[name]["comment"], name
        assert "at most %d" % tuning.ceiling in rets[name]["comment"], name
    assert tuning.look() == before
    verify = rets[VERIFY]["comment"]
    assert tuning.show("xray.service")["LimitNOFILE"] == "1000000"
    assert tuning.limits("xray.service") == (tuning.ceiling, tuning.ceiling)
    assert "capped: xray.service is configured LimitNOFILE=1000000 (systemctl show)" in verify
    assert "so it gave %d, silently" % tuning.ceiling in verify


def test_systemctl_show_is_the_authority_where_it_disagrees(tuning, scenario):
    """A prefix drop-in (shadowsocks-.service.d, read by systemd for every
    shadowsocks-* unit) is read like systemd reads it; a drop-in systemd has
    not loaded yet (no daemon-reload) is said to disagree with systemctl show."""
    box = tuning.box
    prefix = scenario(SYSTEMD_DIR + "/shadowsocks-.service.d/10-sstest.conf", units.limit_dropin(8192))
    box.daemon_reload()
    assert tuning.show("shadowsocks-libev.service")["LimitNOFILE"] == "8192"  # systemd reads it
    unloaded = scenario(SYSTEMD_DIR + "/v2ray.service.d/50-sstest.conf", units.limit_dropin(8192))
    before = tuning.look()
    rets = tuning.apply(test=True)
    assert tuning.look() == before
    comment, changes = rets[NOFILE]["comment"], rets[NOFILE]["changes"]
    assert changes[dropin("shadowsocks-libev.service")]["old"] == "8192 (from %s)" % prefix
    assert changes[dropin("shadowsocks-libev.service")]["new"] == str(tuning.ceiling)
    assert ("systemctl show says v2ray.service has LimitNOFILE=1024:524288, its files give 8192: systemd has not "
            "read them since they changed (NeedDaemonReload=yes)") in comment, comment
    assert changes[dropin("v2ray.service")]["old"] == "8192 (from %s)" % unloaded


def test_admin_override_is_respected_and_a_later_dropin_named(tuning, scenario):
    """`systemctl edit supervisor.service` asking 1024:30000: the package
    raises the soft field and keeps the admin's hard 30000 (capped to the
    ceiling by systemd, never lowered). A zz-*.conf read after the package's
    drop-in with 4096: named, and its daemon left, not restarted for nothing."""
    box = tuning.box
    override = units.systemctl_edit(box, "supervisor.service", "[Service]\nLimitNOFILE=1024:30000\n")
    scenario(override, box.read(override))  # removed afterwards like the other admin files
    zz = scenario(SYSTEMD_DIR + "/shadowsocks-libev.service.d/zz-sstest.conf", units.limit_dropin(4096))
    box.daemon_reload()
    libev = tuning.servers["libev"]
    box.reset_failed(libev.unit)
    box.restart(libev.unit)
    box.wait_listening(libev.port, unit=libev.unit)
    pid = tuning.pid(libev.unit)
    assert box.limits(pid) == (4096, 4096)
    rets = tuning.apply()
    nofile, verify = rets[NOFILE], rets[VERIFY]
    assert nofile["result"] is True, nofile["comment"]
    assert "LimitNOFILE=%d:30000" % tuning.ceiling in box.read(dropin("supervisor.service")).splitlines()
    assert box.read(override).splitlines()[-1] == "LimitNOFILE=1024:30000"
    assert "%s sets LimitNOFILE=4096 and is read after %s: it wins" % (zz, dropin(libev.unit)) in nofile["comment"]
    assert tuning.pid(libev.unit) == pid  # left: a restart would not reach the limit
    assert verify["result"] is False
    assert "set last by %s" % zz in verify["comment"], verify["comment"]


def test_dynamic_user_daemons_restarted_with_only_the_hard_limit_raised(tuning, scenario):
    """shadowsocks-rust.service and outline-ss-server.service (stand-in
    daemons) run as their DynamicUser: salt, without CAP_SYS_RESOURCE, cannot
    prlimit them, so they are restarted. Both raise soft to hard at start, so
    the drop-in raises only the hard field of an admin's 1024:4096."""
    box = tuning.box
    rust, outline = tuning.servers["rust"], tuning.servers["outline"]
    for server in (rust, outline):
        path = units.systemctl_edit(box, server.unit, "[Service]\nLimitNOFILE=1024:4096\n")
        scenario(path, box.read(path))
        box.reset_failed(server.unit)
        box.restart(server.unit)
        box.wait_listening(server.port, unit=server.unit)
        assert tuning.limits(server.unit) == (4096, 4096), server.unit  # soft raised to hard by the daemon
    pids = {s.unit: tuning.pid(s.unit) for s in (rust, outline)}
    predicted = tuning.apply(test=True)[NOFILE]
    assert {s.unit: tuning.pid(s.unit) for s in (rust, outline)} == pids
    for server in (rust, outline):
        assert predicted["changes"][dropin(server.unit)]["new"] == "1024:%d" % tuning.ceiling
        assert predicted["changes"]["service " + server.unit] == {"old": None, "new": "restarted"}
        assert "pid %d" % pids[server.unit] not in predicted["changes"]
    rets = tuning.apply()
    assert rets[NOFILE]["result"] is True and rets[VERIFY]["result"] is True, rets[NOFILE]["comment"]
    for server in (rust, outline):
        assert tuning.pid(server.unit) != pids[server.unit]
        assert "LimitNOFILE=1024:%d" % tuning.ceiling in box.read(dropin(server.unit)).splitlines()
        assert tuning.show(server.unit) == {"LimitNOFILESoft": "1024", "LimitNOFILE": str(tuning.ceiling)}
        assert tuning.limits(server.unit) == (tuning.ceiling, tuning.ceiling), server.unit
        box.wait_listening(server.port, unit=server.unit)
        assert units.shadowsocks_roundtrip(box, server.port, server.password)["held"] == 3


def test_start_limit_hit_is_a_failure_naming_the_unit(tuning, scenario):
    """A unit whose start limit is used up (here StartLimitBurst=2 in 300 s,
    an admin's drop-in, then two restarts) refuses the restart the package
    needs: the state fails at once, naming the unit, start-limit-hit and that
    it is down. To need that restart without writing a file (daemon-reload
    resets start limits in systemd 252), supervisord's limit is lowered under
    it with prlimit (root may lower its own processes' limits; raising the
    hard one again needs CAP_SYS_RESOURCE, which nobody here has)."""
    box, server = tuning.box, tuning.servers["supervisor"]
    assert tuning.apply()[NOFILE]["result"] is True  # its drop-in in place, loaded
    scenario(SYSTEMD_DIR + "/supervisor.service.d/sstest-startlimit.conf",
             "[Unit]\nStartLimitIntervalSec=300\nStartLimitBurst=2\n")
    box.daemon_reload()
    box.reset_failed(server.unit)
    for _ in range(2):
        box.restart(server.unit)
    box.wait_listening(server.port, unit=server.unit)
    pid = tuning.pid(server.unit)
    box.run(["prlimit", "--pid", str(pid), "--nofile=4096:4096"], check=True)
    assert box.limits(pid) == (4096, 4096)
    rets = tuning.apply()
    nofile = rets[NOFILE]
    assert nofile["result"] is False
    assert "supervisor.service failed to restart" in nofile["comment"], nofile["comment"]
    assert "start-limit-hit" in nofile["comment"] and "DOWN now" in nofile["comment"]
    assert box.show(server.unit, "Result", "ActiveState") == {"Result": "start-limit-hit", "ActiveState": "failed"}


def test_box_down_leaves_the_host_as_before(systemd_box, host_snapshot):
    """Last in the module: down() now; no mount, cgroup or nspawn of it left."""
    box = systemd_box
    nspawn, pid1, cgroup = box.proc, box.pid1, box.cgroup
    box.down()
    assert nspawn.poll() is not None and not is_container_init(pid1)
    assert host_changes(host_snapshot, snapshot_host()) == {}
    assert not [d for root in CGROUP_ROOTS for d in glob.glob(os.path.join(root, PREFIX + "*"))], cgroup
