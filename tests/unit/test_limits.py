"""The open-file-limit engine on real files in a temporary tree: planning
reads and checks everything and writes nothing; each kind of file (``ulimit
-n`` lines, ``MAXFD=``, supervisord's ``minfds``, systemd drop-ins) is judged
per field (soft, hard) against what is there, never lowered unless forced,
never set above what this box can grant; a write keeps the file's mode and
records the original, and ``clean`` puts the bytes back. Edited shell files
are sourced by the real /bin/sh to show the limits they give."""

import os
import pathlib
import resource
import subprocess

import pytest
from salt.exceptions import CommandExecutionError

import sstuning_daemons as daemons
import sstuning_journal as journal
import sstuning_limits as limits
import sstuning_lines as lines
import sstuning_procfs as procfs
import sstuning_settings as settings_mod
import sstuning_units as units
from sstuning_lines import NOFILE_COMMENT

NR_OPEN = int(pathlib.Path("/proc/sys/fs/nr_open").read_text())
# What a shell started by this process can set: its hard limit (20000 on the
# project's machines, no CAP_SYS_RESOURCE to go above it).
_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
HARD = NR_OPEN if _HARD == resource.RLIM_INFINITY else min(_HARD, NR_OPEN)
# The host's real daemons and their files stay out of these tests.
OFF = {name: None for name in daemons.KINDS}


@pytest.fixture
def opts(tmp_path):
    """Minion options with every path this engine reads or writes under tmp_path."""
    for name in ("units", "init.d", "systemd"):
        (tmp_path / name).mkdir()
    return settings_mod.options({
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.systemd_dir": str(tmp_path / "systemd"),
        "shadowsocks_tuning.unit_dirs": [str(tmp_path / "systemd"), str(tmp_path / "units")],
        "shadowsocks_tuning.init_dir": str(tmp_path / "init.d"),
        "shadowsocks_tuning.systemd_marker": str(tmp_path / "no-systemd"),
    }.get)


def resolve(opts, tuning, arguments=None):
    return settings_mod.resolve(tuning, arguments, limits.box(opts))


def restore(opts, test=False):
    """``clean`` of the engine, with every recorded file managed."""
    with journal.lock(opts["state_dir"]):
        managed = set(journal.load_originals(opts["state_dir"])["files"])
        return journal.restore(opts["state_dir"], opts["proc_root"], managed, test)


def write(opts, planned):
    """What ``apply`` does for one file: its original on record, then the write."""
    with journal.lock(opts["state_dir"]):
        originals = journal.load_originals(opts["state_dir"])
        journal.remember(opts["state_dir"], originals, files=[planned["path"]],
                         written={planned["path"]: planned["text"]})
        return limits.write_file(opts, planned)


def ulimit_target(path, placement="end", required=True):
    return {"kind": "ulimit", "path": str(path), "placement": placement, "required": required}


def maxfd_target(path):
    return {"kind": "assignment", "path": str(path), "key": "MAXFD", "required": False}


def minfds_target(path):
    return {"kind": "minfds", "path": str(path), "required": False}


def dropin_target(unit):
    return {"kind": "dropin", "path": None, "unit": unit}


def sourced(path):
    """(soft, hard) a real /bin/sh has after sourcing ``path``."""
    proc = subprocess.run(["/bin/sh", "-c", '. "$1" >/dev/null; ulimit -Sn; ulimit -Hn', "sh", str(path)],
                          capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return tuple(int(word) for word in proc.stdout.split())


# --------------------------------------------------------------------------
# target_pair: the one rule, per field
# --------------------------------------------------------------------------
@pytest.mark.parametrize("current, nofile, raises_soft, force, target", [
    ((None, None), 4096, False, False, (4096, 4096)),  # nothing set: the target
    ((1024, 1024), 4096, False, False, (4096, 4096)),  # lower: raised
    ((8192, 8192), 4096, False, False, (8192, 8192)),  # higher: kept
    ((1024, 19000), 4096, False, False, (4096, 19000)),  # per field: soft raised, hard kept
    ((None, 19000), 4096, False, False, (4096, 19000)),  # only a hard limit set: kept, soft set
    ((8192, 8192), 4096, False, True, (4096, 4096)),  # force lowers both
    ((1024, 1024), 4096, True, False, (1024, 4096)),  # the daemon raises its soft limit itself: only hard
    ((None, None), 4096, True, False, (4096, 4096)),
    ((30000, 30000), 4096, False, False, (20000, 20000)),  # above the ceiling: what it really gives
    ((1024, 30000), 4096, False, False, (4096, 20000)),
    ((1048577, 1048577), 4096, True, False, (20000, 20000)),  # `unlimited` is read as fs.nr_open + 1
])
def test_target_pair(current, nofile, raises_soft, force, target):
    assert limits.target_pair(current, nofile, 20000, raises_soft, force)[0] == target


def test_target_pair_says_what_it_kept_and_what_could_not_be_granted():
    assert limits.target_pair((1024, 19000), 4096, 20000, False, False)[1] == ["hard 19000 kept (higher)"]
    assert limits.target_pair((1024, 1024), 4096, 20000, False, False)[1] == []
    (note,) = limits.target_pair((4096, 30000), 4096, 20000, False, False)[1]
    assert note.startswith("hard 30000 cannot be granted here (at most 20000)")


# --------------------------------------------------------------------------
# One file of each kind
# --------------------------------------------------------------------------
def test_a_soft_limit_below_a_higher_hard_one_is_raised_and_the_hard_one_kept(opts, tmp_path):
    """`ulimit -Hn 19000` + `ulimit -Sn 1024` asking for 4096: the soft limit,
    the one a daemon gets, is raised; the higher hard limit is kept."""
    high = min(19000, HARD)
    nofile = min(4096, high)
    path = tmp_path / "supervisor"
    path.write_text(f"ulimit -Hn {high}\nulimit -Sn 1024\n")
    planned = limits.plan_file(opts, ulimit_target(path), nofile, False, HARD)
    assert planned["changed"] and (planned["old"], planned["new"]) == (f"1024:{high}", f"{nofile}:{high}")
    assert path.read_text() == f"ulimit -Hn {high}\nulimit -Sn 1024\n"  # planned, not written
    write(opts, planned)
    assert sourced(path) == (nofile, high)
    assert lines.ulimit_values(path.read_text(), str(path)) == (nofile, high)
    assert not limits.plan_file(opts, ulimit_target(path), nofile, False, HARD)["changed"]


def test_a_higher_limit_in_each_kind_of_file_is_kept_unless_forced(opts, tmp_path):
    """Debian's /etc/default/shadowsocks-libev ships MAXFD=32768: asking for
    less must not lower it (the highest this box can grant stands in for it)."""
    high, low = HARD, HARD // 2
    files = {
        "ulimit": (tmp_path / "supervisor", f"ulimit -n {high}\n", ulimit_target),
        "MAXFD": (tmp_path / "shadowsocks-libev", f"# Defaults for shadowsocks initscript\nMAXFD={high}\n",
                  maxfd_target),
        "minfds": (tmp_path / "supervisord.conf", f"[unix_http_server]\nfile=/x\n\n[supervisord]\nminfds={high}\n",
                   minfds_target),
    }
    for what, (path, text, target) in files.items():
        path.write_text(text)
        kept = limits.plan_file(opts, target(path), low, False, HARD)
        assert not kept["changed"] and kept["new"] == str(high), what
        assert kept["comment"].startswith(f"{path}: ") and f"{high} kept (higher)" in kept["comment"], kept
        assert limits.plan_file(opts, target(path), high, False, HARD)["changed"] is False  # the same: in place
        forced = limits.plan_file(opts, target(path), low, True, HARD)
        assert forced["changed"] and forced["new"] == str(low), what
        write(opts, forced)
        assert limits.plan_file(opts, target(path), low, True, HARD)["changed"] is False
    assert sourced(files["ulimit"][0]) == (low, low)
    assert f"\nMAXFD={low}\n" in files["MAXFD"][0].read_text()
    assert f"\nminfds={low}\n" in files["minfds"][0].read_text()
    restore(opts)
    assert all(path.read_text() == text for path, text, _ in files.values())


def test_a_lower_limit_in_each_kind_of_file_is_raised(opts, tmp_path):
    nofile = min(4096, HARD)
    cases = [
        (ulimit_target, "ulimit -n 1024\n", lambda p: sourced(p) == (nofile, nofile)),
        (maxfd_target, "MAXFD=1024\n", lambda p: p.read_text() == f"MAXFD={nofile}\n"),
        (minfds_target, "[supervisord]\nminfds=1024\n", lambda p: p.read_text() == f"[supervisord]\nminfds={nofile}\n"),
    ]
    for index, (target, text, check) in enumerate(cases):
        path = tmp_path / f"file{index}"
        path.write_text(text)
        planned = limits.plan_file(opts, target(path), nofile, False, HARD)
        assert planned["changed"] and planned["old"] == "1024" and planned["new"] == str(nofile)
        write(opts, planned)
        assert check(path), path.read_text()


def test_a_value_above_the_ceiling_is_replaced_by_what_it_really_gives(opts, tmp_path):
    """`ulimit -n 30000` under a hard limit of 20000 fails in every start
    ("Operation not permitted"): it never took effect, and the daemon runs with
    the hard limit it inherits. It is replaced by the ceiling, never by a lower
    nofile. `unlimited` is above any ceiling (no process gets more than
    fs.nr_open)."""
    ceiling = HARD
    cases = [(ulimit_target, f"ulimit -n {ceiling + 1}\n"), (ulimit_target, "ulimit -n unlimited\n"),
             (maxfd_target, f"MAXFD={ceiling + 1}\n"), (minfds_target, f"[supervisord]\nminfds={ceiling + 1}\n")]
    for index, (target, text) in enumerate(cases):
        path = tmp_path / f"file{index}"
        path.write_text(text)
        planned = limits.plan_file(opts, target(path), min(4096, ceiling), False, ceiling)
        assert planned["changed"] and planned["new"] == str(ceiling), (text, planned)
        assert f"cannot be granted here (at most {ceiling})" in planned["comment"]
    if not procfs.has_cap_sys_resource():  # sh fails on it now...
        proc = subprocess.run(["/bin/sh", "-c", f". {tmp_path / 'file0'}"], capture_output=True, text=True, timeout=10)
        assert "ulimit" in proc.stderr, proc
    write(opts, limits.plan_file(opts, ulimit_target(tmp_path / "file0"), min(4096, ceiling), False, ceiling))
    assert sourced(tmp_path / "file0") == (ceiling, ceiling)  # ...and gets the most it can after


def test_raises_soft_only_raises_the_hard_limit_of_a_ulimit_file(opts, tmp_path):
    """A Go daemon or shadowsocks-rust raises its soft limit to its hard limit
    at start: only the hard limit matters. A MAXFD or minfds value sets both
    alike, so raises_soft changes nothing there."""
    nofile = min(4096, HARD)
    path = tmp_path / "go-server"
    path.write_text("ulimit -n 1024\n")
    planned = limits.plan_file(opts, ulimit_target(path), nofile, False, HARD, raises_soft=True)
    assert planned["new"] == f"1024:{nofile}"
    write(opts, planned)
    assert sourced(path) == (1024, nofile)
    maxfd = tmp_path / "maxfd"
    maxfd.write_text("MAXFD=1024\n")
    assert limits.plan_file(opts, maxfd_target(maxfd), nofile, False, HARD, raises_soft=True)["new"] == str(nofile)


def test_a_missing_file_fails_or_is_skipped_and_nothing_is_created(opts, tmp_path):
    path = tmp_path / "absent"
    with pytest.raises(CommandExecutionError) as err:
        limits.plan_file(opts, ulimit_target(path), 1024, False, HARD)
    assert str(path) in str(err.value) and "does not exist" in str(err.value)
    assert limits.plan_file(opts, ulimit_target(path, required=False), 1024, False, HARD)["skipped"] is True
    assert not path.exists()


def test_a_write_keeps_mode_and_restore_puts_the_bytes_back(opts, tmp_path):
    script = tmp_path / "init.d-ss"
    original = b"#!/bin/sh\r\n### END INIT INFO\r\nexec ss-server\r\n"
    script.write_bytes(original)
    script.chmod(0o750)
    predicted = limits.plan_file(opts, ulimit_target(script, "init"), 4096, False, HARD)
    assert predicted["changed"] and script.read_bytes() == original
    # The lines written end in LF: dash would read `4096\r` as a bad number.
    assert f"+{NOFILE_COMMENT}\n+ulimit -n 4096\n" in predicted["diff"]
    write(opts, predicted)
    assert script.read_bytes() == original.replace(
        b"INFO\r\n", f"INFO\r\n{NOFILE_COMMENT}\nulimit -n 4096\n".encode())
    assert script.stat().st_mode & 0o777 == 0o750
    assert not limits.plan_file(opts, ulimit_target(script, "init"), 4096, False, HARD)["changed"]
    write(opts, limits.plan_file(opts, ulimit_target(script, "init"), 8192, False, HARD))  # the first original stays
    assert b"ulimit -n 8192\n" in script.read_bytes()
    assert str(script) in restore(opts, test=True) and b"8192" in script.read_bytes()  # test: only reported
    restore(opts)
    assert script.read_bytes() == original
    assert script.stat().st_mode & 0o777 == 0o750
    assert not os.path.exists(journal.originals_path(opts["state_dir"]))


# --------------------------------------------------------------------------
# systemd drop-ins: judged against the unit and every other drop-in
# --------------------------------------------------------------------------
def unit(tmp_path, name, body="", where="units"):
    path = tmp_path / where / name
    path.write_text(f"[Unit]\nDescription={name}\n[Service]\nExecStart=/bin/true\n{body}")
    return path


def dropin(tmp_path, name, conf, value, where="systemd"):
    directory = tmp_path / where / f"{name}.d"
    directory.mkdir(exist_ok=True)
    (directory / conf).write_text(f"[Service]\nLimitNOFILE={value}\n")
    return directory / conf


def test_dropin_paths(opts):
    assert units.dropin_path(opts["systemd_dir"], "supervisor.service") == os.path.join(
        opts["systemd_dir"], "supervisor.service.d", units.DROPIN_NAME)
    assert units.dropin_path(opts["systemd_dir"], "shadowsocks-libev-server@.service") == os.path.join(
        opts["systemd_dir"], "shadowsocks-libev-server@.service.d", units.DROPIN_NAME)
    # Sorts after `override.conf` (systemctl edit) and before `zz-*.conf`: the later drop-in wins.
    assert "override.conf" < units.DROPIN_NAME < "zz-limits.conf"


def test_a_dropin_is_written_only_for_an_installed_unit(opts, tmp_path):
    """Without a LimitNOFILE of its own the unit gets DefaultLimitNOFILE
    (1024:524288, clamped by what PID 1 can grant): the drop-in raises the
    soft limit and never lowers the hard one below that."""
    target = dropin_target("shadowsocks-libev-server@.service")
    skipped = limits.plan_file(opts, target, 16384, False, HARD)
    assert skipped["skipped"] and "is not installed" in skipped["comment"]
    template = unit(tmp_path, "shadowsocks-libev-server@.service")
    # An instance is found through its template.
    assert units.unit_file(opts["unit_dirs"], "shadowsocks-libev-server@cfg.service") == str(template)
    nofile = min(16384, HARD)
    planned = limits.plan_file(opts, target, nofile, False, HARD)
    default_soft, default_hard = units.default_limit(NR_OPEN)
    hard = max(nofile, default_hard)  # the configured hard is kept: systemd clamps it itself
    assert planned["changed"] and planned["path"] == units.dropin_path(opts["systemd_dir"], target["unit"])
    assert planned["new"] == (str(nofile) if hard == nofile else f"{nofile}:{hard}")
    assert not os.path.exists(planned["path"])  # planned, not written
    write(opts, planned)
    assert pathlib.Path(planned["path"]).read_text().endswith(f"[Service]\nLimitNOFILE={planned['new']}\n")
    assert not limits.plan_file(opts, target, nofile, False, HARD)["changed"]
    restore(opts)
    assert not os.path.exists(planned["path"])  # created by us: removed
    assert not os.path.exists(os.path.dirname(planned["path"]))  # and its UNIT.d, left empty


@pytest.mark.parametrize("value", ["1000000", "infinity"])
@pytest.mark.parametrize("ceiling", [HARD, NR_OPEN])
def test_a_dropin_never_lowers_a_unit_of_a_million_or_infinity(opts, tmp_path, value, ceiling):
    """xray's unit ships LimitNOFILE=1000000, sing-box's infinity; systemd
    clamps either to what PID 1 can grant (20000 here), which is still above
    nofile: no drop-in, under either ceiling."""
    unit(tmp_path, "xray.service", f"LimitNOFILE={value}\n")
    planned = limits.plan_file(opts, dropin_target("xray.service"), 4096, False, ceiling, raises_soft=True)
    assert not planned["changed"] and planned["text"] is None, planned
    assert "no drop-in needed" in planned["comment"] and planned["overridden"] == []
    # Forced, the drop-in says nofile.
    forced = limits.plan_file(opts, dropin_target("xray.service"), 4096, True, ceiling)
    assert forced["changed"] and forced["text"].endswith("LimitNOFILE=4096\n")


def test_a_dropin_is_judged_after_override_conf_and_names_a_later_one_that_wins(opts, tmp_path):
    unit(tmp_path, "ss.service", "LimitNOFILE=1024\n")
    dropin(tmp_path, "ss.service", "override.conf", "8192")  # systemctl edit: read before ours
    planned = limits.plan_file(opts, dropin_target("ss.service"), 4096, False, NR_OPEN)
    assert not planned["changed"] and "8192 from" in planned["comment"] and "override.conf" in planned["comment"]
    planned = limits.plan_file(opts, dropin_target("ss.service"), 16384, False, NR_OPEN)
    assert planned["changed"] and planned["new"] == "16384" and planned["overridden"] == []
    late = dropin(tmp_path, "ss.service", "zz-limits.conf", "2048")  # read after ours: it wins
    planned = limits.plan_file(opts, dropin_target("ss.service"), 16384, False, NR_OPEN)
    assert planned["changed"] and planned["new"] == "16384"
    (note,) = planned["overridden"]
    assert note == (f"{late} sets LimitNOFILE=2048 and is read after {planned['path']}: it wins, so ss.service "
                    f"gets 2048, below 16384; raise it there or remove it")
    # A later drop-in that already gives enough: nothing to write.
    late.write_text("[Service]\nLimitNOFILE=65536\n")
    planned = limits.plan_file(opts, dropin_target("ss.service"), 16384, False, NR_OPEN)
    assert not planned["changed"] and planned["overridden"] == [] and str(late) in planned["comment"]


def test_a_million_unit_with_a_lower_later_dropin_gets_no_lower_dropin(opts, tmp_path):
    unit(tmp_path, "xray.service", "LimitNOFILE=1000000\n")
    late = dropin(tmp_path, "xray.service", "zz-low.conf", "1024")
    planned = limits.plan_file(opts, dropin_target("xray.service"), 4096, False, NR_OPEN, raises_soft=True)
    assert not planned["changed"], planned
    (note,) = planned["overridden"]
    assert note.startswith(f"{late} sets LimitNOFILE=1024 and is read after")


def test_a_unit_value_systemd_cannot_parse_is_an_error_naming_the_file(opts, tmp_path):
    bad = dropin(tmp_path, "ss.service", "override.conf", "lots")
    unit(tmp_path, "ss.service")
    with pytest.raises(CommandExecutionError) as err:
        limits.plan_file(opts, dropin_target("ss.service"), 4096, False, NR_OPEN)
    assert str(err.value).startswith(f"{bad}: LimitNOFILE=lots: ") and "fix that line" in str(err.value)


# --------------------------------------------------------------------------
# Everything planned before anything is written
# --------------------------------------------------------------------------
def test_plan_names_a_missing_or_unusable_init_script_by_its_pillar_path(opts, tmp_path):
    python = tmp_path / "init.d" / "pyserver"
    python.write_text("#!/usr/bin/python3\nprint(1)\n")
    missing = tmp_path / "init.d" / "missing"
    settings = resolve(opts, {"nofile": 1024, "limits": {**OFF, "init_scripts": [str(missing), {"path": str(python)}]}})
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
    over = resolve(opts, {**pillar, "nofile": granted["limit"] + 1})
    (error,) = limits.plan(over, opts)["errors"]
    assert error.startswith(f"pillar shadowsocks:tuning:nofile: {granted['limit'] + 1} cannot be granted here")
    assert f"lower it to {granted['limit']} or less" in error
    at_cap = resolve(opts, {**pillar, "nofile": granted["limit"]})
    assert limits.plan(at_cap, opts)["errors"] == []
    # Nothing to manage: nothing to grant, so no error either.
    nothing = resolve(opts, {"limits": OFF, "nofile": granted["limit"] + 1})
    assert limits.plan(nothing, opts)["errors"] == []
    assert script.read_text() == "#!/bin/sh\ntrue\n"


STOPPED_INIT = '#!/bin/sh\n### BEGIN INIT INFO\n### END INIT INFO\ncase "$1" in status) exit 3 ;; *) exit 1 ;; esac\n'


@pytest.mark.parametrize("restart", [None, "running"])
def test_a_part_is_written_and_a_stopped_service_left_stopped(opts, tmp_path, restart):
    """A real init script whose `status` says "not running": the file gets the
    limit, the service is not started behind the operator's back. The default
    policy (restart: live) restarts only a daemon that cannot be raised in
    place, so a changed file alone asks for no restart; restart: running
    looks and leaves the stopped service alone."""
    script = tmp_path / "init.d" / "ss"
    script.write_text(STOPPED_INIT)
    script.chmod(0o755)
    tuning = {"nofile": 1024, "limits": {**OFF, "init_scripts": [str(script)]}}
    if restart:
        tuning["limits"]["restart"] = restart
    settings = resolve(opts, tuning)
    assert settings["limits"]["restart"] == (restart or "live")
    planned = limits.plan(settings, opts)
    assert planned["errors"] == [] and planned["manage"] == [str(script)]
    dry = limits.apply(settings, opts, planned, "init_scripts", test=True)
    assert dry["errors"] == [] and dry["files"][0]["changed"] and script.read_text() == STOPPED_INIT
    with journal.lock(opts["state_dir"]):
        journal.remember(opts["state_dir"], journal.load_originals(opts["state_dir"]), files=[str(script)])
        done = limits.apply(settings, opts, planned, "init_scripts", test=False)
    assert done["errors"] == [] and done["raised"] == []
    assert limits.written(planned["parts"]["init_scripts"]) == done["files"]
    assert "ulimit -n 1024\n" in script.read_text()
    if restart is None:
        assert done["restarts"] == []
    else:
        (restarted,) = done["restarts"]
        assert restarted["name"] == "ss" and not restarted["changed"]
        assert restarted["comment"] == ("ss is not running: left stopped (it gets the new limit when it starts) "
                                        "(why: its file changed (restart: running))")
    restore(opts)
    assert script.read_text() == STOPPED_INIT


def test_grantable_is_the_hard_limit_without_cap_sys_resource():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    granted = limits.grantable("/proc/sys")
    assert granted["nr_open"] == NR_OPEN
    capeff = next(line for line in open("/proc/self/status") if line.startswith("CapEff:"))
    assert granted["cap_sys_resource"] == bool(int(capeff.split()[1], 16) & (1 << 24))
    hard = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    assert granted["hard"] == hard
    assert granted["limit"] == (NR_OPEN if granted["cap_sys_resource"] else min(hard, NR_OPEN))


def test_a_limit_given_as_text_is_judged_as_the_number(opts, tmp_path):
    """shadowsocks_tuning.set_assignment passes its value as text."""
    path = tmp_path / "shadowsocks-libev"
    path.write_text(f"MAXFD={HARD + 1}\n")
    as_text = limits.plan_file(opts, maxfd_target(path), str(min(8192, HARD)), False, HARD)
    assert as_text == limits.plan_file(opts, maxfd_target(path), min(8192, HARD), False, HARD)
    assert as_text["new"] == str(HARD)
