"""The systemd harness itself, end to end: one container with Debian 12's real
systemd 252 as PID 1 (tests/support/systemd_box.py), the servers in it under
units in their packagings' exact shapes (fixtures in systemd_fixtures.py, each
saying what is real and what is a stand-in), and what systemd really gives
them: limits read from /proc/PID/limits inside, never from systemctl alone.

Expected limits are derived from this box's own ceiling (the hard limit of its
PID 1, which no unit can exceed: systemd there lacks CAP_SYS_RESOURCE), read
from the kernel, and systemd's DefaultLimitNOFILE, read from the manager.
The module's last test downs the box and checks the host is as before.
"""

import pytest

from support import systemd_units as units
from support.systemd_box import is_container_init, nspawn_available
from support.systemd_fixtures import host_changes, snapshot_host, supervised_pid

from sstuning_daemons import program_names
from sstuning_units import DROPIN_NAME, render_dropin

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not nspawn_available(), reason=(
        "systemd-nspawn is not installed: apt-get install --no-install-recommends systemd-container "
        "(./run-tests installs it)")),
]


def both(n, box):
    """soft = hard = N, or the box's ceiling when N is above it."""
    return (min(n, box.ceiling),) * 2


def default_limits(box):
    """What a unit without LimitNOFILE= gets: DefaultLimitNOFILESoft, and
    DefaultLimitNOFILE clamped to the ceiling."""
    manager = box.systemctl("show", "-p", "DefaultLimitNOFILESoft,DefaultLimitNOFILE").stdout
    values = dict(line.split("=", 1) for line in manager.splitlines())
    soft, hard = int(values["DefaultLimitNOFILESoft"]), int(values["DefaultLimitNOFILE"])
    return min(soft, box.ceiling), min(hard, box.ceiling)


def restart_with(box, unit, nofile, name="nofile.conf", text=None, restart=None):
    """Drop-in LimitNOFILE=nofile (or `text`) for `unit` (a template too),
    daemon-reload, reset-failed, restart `restart` (default: unit); its new MainPID."""
    restart = restart or unit
    units.dropin(box, unit, text or units.limit_dropin(nofile), name)
    box.daemon_reload()
    box.reset_failed(restart)
    box.restart(restart)
    box.wait_active(restart)
    return box.main_pid(restart)


def comm(box, pid):
    return box.read("/proc/%d/comm" % pid).strip()


def test_pid1_is_systemd(systemd_box):
    box = systemd_box
    assert comm(box, 1) == "systemd"
    assert box.run(["readlink", "/proc/1/exe"]).stdout.strip() == "/usr/lib/systemd/systemd"
    assert box.boot_state in ("running", "degraded"), box.boot_state
    version = box.systemctl("--version").stdout.split()[1]
    assert version == "252", box.systemctl("--version").stdout


def test_salt_call_inside_sees_systemd(box_salt, libev_units):
    init, proc = box_salt("grains.get", "init")
    assert init == "systemd", proc.stdout + proc.stderr
    running, proc = box_salt("service.status", libev_units["default"].unit)
    assert running is True, proc.stdout + proc.stderr


def test_shadowsocks_libev_runs_at_the_box_ceiling(systemd_box, libev_units):
    box, server = systemd_box, libev_units["default"]
    pid = box.main_pid(server.unit)
    assert comm(box, pid) == "ss-server"
    assert box.show(server.unit, "LimitNOFILE")["LimitNOFILE"] == "32768"  # the package's unit
    assert box.limits(pid) == both(32768, box)
    assert units.shadowsocks_roundtrip(box, server.port, server.password, server.method)["held"] == 3


def test_dropin_16384_reaches_the_daemon(systemd_box, libev_units):
    box, unit = systemd_box, libev_units["default"].unit
    pid = restart_with(box, unit, 16384)
    assert box.limits(pid) == both(16384, box)


def test_dropin_above_the_ceiling_is_clamped_silently(systemd_box, libev_units):
    """systemctl keeps saying 51200; only /proc shows what the daemon got."""
    box, unit = systemd_box, libev_units["default"].unit
    pid = restart_with(box, unit, 51200)
    assert box.show(unit, "LimitNOFILE", "LimitNOFILESoft") == {"LimitNOFILE": "51200",
                                                                "LimitNOFILESoft": "51200"}
    assert box.limits(pid) == both(51200, box)  # here: the ceiling, not 51200
    assert box.systemctl("is-active", unit).stdout.strip() == "active"  # no failure either


def test_tuning_dropin_wins_over_systemctl_edit_override(systemd_box, libev_units):
    """An admin's `systemctl edit` (override.conf) and this package's drop-in
    (DROPIN_NAME, as the package renders it): the package's sorts later and wins."""
    box, unit = systemd_box, libev_units["default"].unit
    box.remove("/etc/systemd/system/%s.d/nofile.conf" % unit)
    box.daemon_reload()  # systemctl edit reads the drop-ins systemd knows of
    override = units.systemctl_edit(box, unit, units.limit_dropin(8192))
    assert "LimitNOFILE=8192" in box.read(override)
    box.reset_failed(unit)
    box.restart(unit)
    assert box.limits(box.main_pid(unit)) == both(8192, box)
    pid = restart_with(box, unit, 12288, DROPIN_NAME, text=render_dropin(12288, 12288, unit))
    assert box.limits(pid) == both(12288, box)
    assert box.show(unit, "LimitNOFILE")["LimitNOFILE"] == "12288"


def test_template_dropin_and_instance_dropin(systemd_box, libev_units):
    """A drop-in on the template reaches its instances; an instance drop-in of
    the same file name replaces the template's."""
    box, instance = systemd_box, libev_units["instance"]
    pid = restart_with(box, "shadowsocks-libev-server@.service", 12345, restart=instance.unit)
    assert box.limits(pid) == both(12345, box)
    pid = restart_with(box, instance.unit, 11111)
    assert box.limits(pid) == both(11111, box)
    box.wait_listening(instance.port, unit=instance.unit)
    assert units.shadowsocks_roundtrip(box, instance.port)["held"] == 3


def test_supervisor_and_its_program(systemd_box, supervisor_program):
    """Debian's supervisor.service has no LimitNOFILE: supervisord and its
    program get systemd's defaults; a drop-in reaches both."""
    box, server = systemd_box, supervisor_program
    supervisord = box.main_pid(server.unit)
    assert comm(box, supervisord) == "supervisord"
    assert box.limits(supervisord) == default_limits(box)
    assert box.limits(supervised_pid(box)) == default_limits(box)
    assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3
    box.systemctl("stop", server.unit)  # Debian's supervisor: stop, then start
    units.dropin(box, server.unit, units.limit_dropin(16384))
    box.daemon_reload()
    box.reset_failed(server.unit)
    box.systemctl("start", server.unit)
    box.wait_active(server.unit)
    box.wait_listening(server.port, unit=server.unit)
    assert box.limits(box.main_pid(server.unit)) == both(16384, box)
    assert box.limits(supervised_pid(box)) == both(16384, box)


def test_v2ray_serves_shadowsocks_inside(systemd_box, v2ray_shadowsocks):
    """Debian's v2ray: no LimitNOFILE in its unit, and Go raises soft to hard."""
    box, server = systemd_box, v2ray_shadowsocks
    assert box.listening(server.port)
    pid = box.main_pid(server.unit)
    assert comm(box, pid) == "v2ray"
    hard = default_limits(box)[1]
    assert box.limits(pid) == (hard, hard)
    assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3


def test_shadowsocks_rust_shaped_units(systemd_box, shadowsocks_rust_units):
    """The default unit's LimitNOFILE=32768 (clamped), the template's none:
    the daemon raises its soft limit to whatever hard limit it got."""
    box = systemd_box
    default, instance = shadowsocks_rust_units["default"], shadowsocks_rust_units["instance"]
    pid = box.main_pid(default.unit)
    assert comm(box, pid) == "ssservice" and "ssservice" in program_names()
    assert box.limits(pid) == both(32768, box)
    pid = box.main_pid(instance.unit)
    hard = default_limits(box)[1]
    assert box.limits(pid) == (hard, hard)
    for server in (default, instance):
        assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3


def test_outline_shaped_unit(systemd_box, outline_unit):
    box, server = systemd_box, outline_unit
    assert box.show(server.unit, "Type", "LimitNOFILE") == {"Type": "notify", "LimitNOFILE": "655360"}
    pid = box.main_pid(server.unit)
    assert comm(box, pid) == "outline-ss-serv"  # comm is cut at 15 characters
    assert box.limits(pid) == both(655360, box)
    assert units.shadowsocks_roundtrip(box, server.port, server.password)["held"] == 3


def test_million_and_infinity_are_clamped(systemd_box, high_limit_units):
    box = systemd_box
    for name, configured in (("xray", "1000000"), ("sing-box", "infinity")):
        server = high_limit_units[name]
        assert box.show(server.unit, "LimitNOFILE")["LimitNOFILE"] == configured
        pid = box.main_pid(server.unit)
        assert comm(box, pid) == name
        assert box.limits(pid) == (box.ceiling, box.ceiling), name
        assert units.shadowsocks_roundtrip(box, server.port)["held"] == 3


def test_start_limit_hit_and_reset_failed(systemd_box, libev_units):
    """More than 5 starts in 10 s (systemd's StartLimitBurst and
    StartLimitIntervalSec defaults): the next restart is refused with
    start-limit-hit; reset-failed clears it."""
    box, unit = systemd_box, libev_units["instance"].unit
    show = box.show(unit, "StartLimitBurst", "StartLimitIntervalUSec")
    burst = int(show["StartLimitBurst"])
    box.reset_failed(unit)
    refused = None
    for attempt in range(1, burst + 2):
        if box.systemctl("restart", unit, check=False).returncode != 0:
            refused = attempt
            break
    assert refused is not None, "restarted %d times within %s without start-limit-hit" % (
        burst + 1, show["StartLimitIntervalUSec"])
    assert box.show(unit, "Result", "ActiveState") == {"Result": "start-limit-hit", "ActiveState": "failed"}
    box.reset_failed(unit)
    assert box.show(unit, "Result", "ActiveState") == {"Result": "success", "ActiveState": "inactive"}
    box.systemctl("start", unit)
    box.wait_active(unit)


def test_down_leaves_the_host_as_before(systemd_box, host_snapshot):
    """Last in the module: down() now (the fixture's own down is then a no-op)."""
    box = systemd_box
    nspawn, pid1 = box.proc, box.pid1
    box.down()
    assert nspawn.poll() is not None  # reaped
    assert not is_container_init(pid1)  # the container's PID 1 is gone
    assert host_changes(host_snapshot, snapshot_host()) == {}
