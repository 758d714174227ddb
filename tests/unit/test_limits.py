"""The open-file-limit engine on real files in a temporary tree: planning reads
and checks everything and writes nothing, a write keeps the file's mode and
records the original, `restore` puts the bytes back, and a higher limit
already in a file is kept unless forced."""

import os
import pathlib
import resource

import pytest
from salt.exceptions import CommandExecutionError

import sstuning_journal as journal
import sstuning_limits as limits
import sstuning_settings as settings_mod
from sstuning_lines import NOFILE_COMMENT

NR_OPEN = int(pathlib.Path("/proc/sys/fs/nr_open").read_text())
# The host's real supervisor and shadowsocks-libev files stay out of these tests.
OFF = {"supervisor": None, "shadowsocks_libev": None}


@pytest.fixture
def opts(tmp_path):
    """Minion options with every path this engine writes under tmp_path."""
    (tmp_path / "units").mkdir()
    (tmp_path / "init.d").mkdir()
    return settings_mod.options({
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.systemd_dir": str(tmp_path / "systemd"),
        "shadowsocks_tuning.unit_dirs": [str(tmp_path / "units")],
        "shadowsocks_tuning.init_dir": str(tmp_path / "init.d"),
    }.get)


def restore(opts, test=False):
    """``clean`` of the engine, with every recorded file managed."""
    with journal.lock(opts["state_dir"]):
        managed = set(journal.load_originals(opts["state_dir"])["files"])
        return journal.restore(opts["state_dir"], opts["proc_root"], managed, test)


def write(opts, planned):
    with journal.lock(opts["state_dir"]):
        return limits.write_file(opts, planned)


def ulimit_target(path, placement="end", required=True):
    return {"kind": "ulimit", "path": str(path), "placement": placement, "required": required}


# --------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------
def test_dropin_paths(opts):
    assert limits.dropin_path(opts, "supervisor.service") == os.path.join(
        opts["systemd_dir"], "supervisor.service.d", limits.DROPIN_NAME)
    assert limits.dropin_path(opts, "shadowsocks-libev-server@.service") == os.path.join(
        opts["systemd_dir"], "shadowsocks-libev-server@.service.d", limits.DROPIN_NAME)
    # Sorts after `override.conf` (systemctl edit): the later drop-in wins.
    assert limits.DROPIN_NAME > "override.conf"


def test_a_dropin_is_written_only_for_an_installed_unit(opts, tmp_path):
    target = {"kind": "dropin", "path": None, "unit": "shadowsocks-libev-server@.service"}
    skipped = limits.plan_file(opts, target, 16384, False)
    assert skipped["skipped"] and "is not installed" in skipped["comment"]
    (tmp_path / "units" / "shadowsocks-libev-server@.service").write_text("[Service]\nExecStart=/bin/true\n")
    # An instance is found through its template.
    assert limits.unit_file(opts, "shadowsocks-libev-server@cfg.service") == str(
        tmp_path / "units" / "shadowsocks-libev-server@.service")
    planned = limits.plan_file(opts, target, 16384, False)
    assert planned["changed"] and planned["path"] == limits.dropin_path(opts, target["unit"])
    assert not os.path.exists(planned["path"])  # planned, not written
    write(opts, planned)
    assert pathlib.Path(planned["path"]).read_text().endswith("[Service]\nLimitNOFILE=16384\n")
    assert not limits.plan_file(opts, target, 16384, False)["changed"]
    restore(opts)
    assert not os.path.exists(planned["path"])  # created by us: removed


def test_a_missing_file_fails_or_is_skipped_and_nothing_is_created(opts, tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(CommandExecutionError) as err:
        limits.plan_file(opts, ulimit_target(path), 1024, False)
    assert str(path) in str(err.value) and "does not exist" in str(err.value)
    assert limits.plan_file(opts, ulimit_target(path, required=False), 1024, False)["skipped"] is True
    assert not path.exists()


def test_a_write_keeps_mode_and_restore_puts_the_bytes_back(opts, tmp_path):
    script = tmp_path / "init.d-ss"
    original = b"#!/bin/sh\r\n### END INIT INFO\r\nexec ss-server\r\n"
    script.write_bytes(original)
    script.chmod(0o750)
    predicted = limits.plan_file(opts, ulimit_target(script, "init"), 4096, False)
    assert predicted["changed"] and script.read_bytes() == original
    # The lines written end in LF: dash would read `4096\r` as a bad number.
    assert f"+{NOFILE_COMMENT}\n+ulimit -n 4096\n" in predicted["diff"]
    write(opts, predicted)
    assert script.read_bytes() == original.replace(
        b"INFO\r\n", f"INFO\r\n{NOFILE_COMMENT}\nulimit -n 4096\n".encode())
    assert script.stat().st_mode & 0o777 == 0o750
    assert not limits.plan_file(opts, ulimit_target(script, "init"), 4096, False)["changed"]
    write(opts, limits.plan_file(opts, ulimit_target(script, "init"), 8192, False))  # the first original stays
    assert b"ulimit -n 8192\n" in script.read_bytes()
    assert str(script) in restore(opts, test=True) and b"8192" in script.read_bytes()  # test: only reported
    restore(opts)
    assert script.read_bytes() == original
    assert script.stat().st_mode & 0o777 == 0o750
    assert not os.path.exists(journal.originals_path(opts["state_dir"]))


def test_a_higher_limit_already_in_a_file_is_kept_unless_forced(opts, tmp_path):
    # Debian's /etc/default/shadowsocks-libev ships MAXFD=32768: asking for
    # 16384 must not lower it, as capacity sysctls are never lowered.
    defaults = tmp_path / "shadowsocks-libev"
    original = b"# Defaults for shadowsocks initscript\nMAXFD=32768\n"
    defaults.write_bytes(original)
    target = {"kind": "assignment", "path": str(defaults), "key": "MAXFD", "required": True}
    kept = limits.plan_file(opts, target, 16384, False)
    assert not kept["changed"] and defaults.read_bytes() == original
    assert kept["comment"].endswith("MAXFD 32768 kept (higher than 16384; force lowers it)")
    assert limits.plan_file(opts, target, 65536, False)["changed"]  # raising goes through
    write(opts, limits.plan_file(opts, target, 16384, True))
    assert b"MAXFD=16384\n" in defaults.read_bytes()
    supervisor = tmp_path / "supervisor"
    supervisor.write_bytes(b"ulimit -n 65535\n")
    assert not limits.plan_file(opts, ulimit_target(supervisor), 51200, False)["changed"]
    assert limits.plan_file(opts, ulimit_target(supervisor), 51200, True)["changed"]
    restore(opts)
    assert defaults.read_bytes() == original


# --------------------------------------------------------------------------
# Everything planned before anything is written
# --------------------------------------------------------------------------
def test_plan_names_a_missing_or_unusable_init_script_by_its_pillar_path(opts, tmp_path):
    python = tmp_path / "init.d" / "pyserver"
    python.write_text("#!/usr/bin/python3\nprint(1)\n")
    missing = tmp_path / "init.d" / "missing"
    settings = settings_mod.resolve(
        {"nofile": 1024, "limits": {**OFF, "init_scripts": [str(missing), {"path": str(python)}]}}, nr_open=NR_OPEN)
    planned = limits.plan(settings, opts)
    text = "\n".join(planned["errors"])
    assert f"pillar shadowsocks:tuning:limits:init_scripts[0]:path: {missing} does not exist" in text
    assert f"pillar shadowsocks:tuning:limits:init_scripts[1]:path: {python}: not a shell script" in text
    assert python.read_text() == "#!/usr/bin/python3\nprint(1)\n" and not missing.exists()


def test_plan_refuses_a_limit_this_process_cannot_grant(opts, tmp_path):
    granted = limits.grantable(opts["proc_root"])
    if granted["limit"] >= NR_OPEN:
        pytest.skip("salt could grant up to fs.nr_open here: no lower cap to hit")
    script = tmp_path / "init.d" / "ss"
    script.write_text("#!/bin/sh\ntrue\n")
    pillar = {"limits": {**OFF, "init_scripts": [str(script)]}}
    over = settings_mod.resolve({**pillar, "nofile": granted["limit"] + 1}, nr_open=NR_OPEN)
    (error,) = limits.plan(over, opts)["errors"]
    assert error.startswith(f"pillar shadowsocks:tuning:nofile: {granted['limit'] + 1} cannot be granted here")
    assert f"lower it to {granted['limit']} or less" in error
    at_cap = settings_mod.resolve({**pillar, "nofile": granted["limit"]}, nr_open=NR_OPEN)
    assert limits.plan(at_cap, opts)["errors"] == []
    # Nothing to manage: nothing to grant, so no error either.
    nothing = settings_mod.resolve({"limits": OFF, "nofile": granted["limit"] + 1}, nr_open=NR_OPEN)
    assert limits.plan(nothing, opts)["errors"] == []
    assert script.read_text() == "#!/bin/sh\ntrue\n"


def test_a_part_is_written_and_a_stopped_service_left_stopped(opts, tmp_path):
    """A real init script whose `status` says "not running": the file gets
    the limit, the service is not started behind the operator's back."""
    script = tmp_path / "init.d" / "ss"
    text = '#!/bin/sh\n### BEGIN INIT INFO\n### END INIT INFO\ncase "$1" in status) exit 3 ;; *) exit 1 ;; esac\n'
    script.write_text(text)
    script.chmod(0o755)
    settings = settings_mod.resolve({"nofile": 1024, "limits": {**OFF, "init_scripts": [str(script)]}},
                                    nr_open=NR_OPEN)
    planned = limits.plan(settings, opts)
    assert planned["errors"] == [] and planned["manage"] == [str(script)]
    files, restarts, failed = limits.apply_part(settings, opts, planned["parts"]["init_scripts"], test=True)
    assert failed == []
    assert files[0]["changed"] and script.read_text() == text  # test: nothing written
    with journal.lock(opts["state_dir"]):
        files, restarts, failed = limits.apply_part(settings, opts, planned["parts"]["init_scripts"], test=False)
        assert failed == []
    assert "ulimit -n 1024\n" in script.read_text()
    (restarted,) = restarts
    assert restarted["name"] == "ss" and not restarted["changed"]
    assert restarted["comment"] == "ss is not running: left stopped (it gets the new limit when it starts)"
    restore(opts)
    assert script.read_text() == text


def test_grantable_is_the_hard_limit_without_cap_sys_resource():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    granted = limits.grantable("/proc/sys")
    assert granted["nr_open"] == NR_OPEN and granted["soft"] == soft
    capeff = next(line for line in open("/proc/self/status") if line.startswith("CapEff:"))
    assert granted["cap_sys_resource"] == bool(int(capeff.split()[1], 16) & (1 << 24))
    hard = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    assert granted["limit"] == (NR_OPEN if granted["cap_sys_resource"] else min(hard, NR_OPEN))
