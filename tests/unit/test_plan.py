"""One run's plan (``sstuning_plan``), made from a real pillar against this
box: the kernel read through the real /proc/sys (a plan writes nothing, and
every run here is a dry run, so no module is loaded either), every file under
tmp_path. Made twice from the same inputs it agrees; it turns stale when a
file it read or the record of originals changes under it, and fresh again
once this run's own write is taken in; ``remake`` updates the very object
the run's other states hold; a bad pillar gives a plan of errors only."""

import pytest
from salt.exceptions import CommandExecutionError

import sstuning_daemons as daemons
import sstuning_journal as journal
import sstuning_plan as plan_mod
import sstuning_settings as settings_mod

OFF = {name: None for name in daemons.KINDS}  # no host daemon is looked at


@pytest.fixture
def opts(tmp_path):
    for name in ("sysctl.d", "modules-load.d", "init.d", "systemd"):
        (tmp_path / name).mkdir()
    return settings_mod.options({
        "shadowsocks_tuning.state_dir": str(tmp_path / "state"),
        "shadowsocks_tuning.sysctl_dirs": [str(tmp_path / "sysctl.d")],
        "shadowsocks_tuning.sysctl_conf": str(tmp_path / "sysctl.conf"),
        "shadowsocks_tuning.modules_load_dir": str(tmp_path / "modules-load.d"),
        "shadowsocks_tuning.init_dir": str(tmp_path / "init.d"),
        "shadowsocks_tuning.systemd_dir": str(tmp_path / "systemd"),
        "shadowsocks_tuning.unit_dirs": [str(tmp_path / "systemd")],
        "shadowsocks_tuning.systemd_marker": str(tmp_path / "no-systemd"),
        "shadowsocks_tuning.ss_config_dir": str(tmp_path / "ss"),
    }.get)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "init.d" / "ss"
    path.write_text("#!/bin/sh\n### BEGIN INIT INFO\n### END INIT INFO\nexit 0\n")
    return path


@pytest.fixture
def pillar(tmp_path, script):
    """A profile of two per-namespace keys (no congestion control, no port
    reservation: nothing the plan would load or scan), one init script."""
    return {"shadowsocks": {"tuning": {
        "profile": "tiny",
        "profiles": {"tiny": {"sysctls": {"net.core.somaxconn": 4096, "net.ipv4.tcp_fin_timeout": 30}}},
        "config": str(tmp_path / "sysctl.d" / "local.conf"),
        "nofile": 1024,
        "limits": {**OFF, "init_scripts": [str(script)]},
    }}}


def test_a_plan_made_twice_from_the_same_inputs_agrees(opts, pillar, tmp_path):
    first = plan_mod.make(opts, pillar, {}, test=True)
    second = plan_mod.make(opts, pillar, {}, test=True)
    assert first["ok"] and first["errors"] == [], first["errors"]
    assert dict(first) == dict(second)
    assert first.settings == second.settings and first.stamps == second.stamps
    assert first.sysctl["config_text"] == second.sysctl["config_text"]
    (item,) = first["limits"]["files"]
    assert item["path"] == str(pillar["shadowsocks"]["tuning"]["limits"]["init_scripts"][0]) and item["changed"]
    assert not first.stale() and first.used == set()
    assert not (tmp_path / "sysctl.d" / "local.conf").exists() and not (tmp_path / "state").exists()


def test_arguments_go_over_pillar(opts, pillar):
    planned = plan_mod.make(opts, pillar, {"nofile": 2048, "profile": None}, test=True)
    assert planned.settings["nofile"] == 2048 and planned.settings["profile"] == "tiny"
    assert planned.arguments == {"nofile": 2048}  # None: not given


def test_stale_turns_true_when_a_file_it_read_changes_and_false_after_written(opts, pillar, script):
    planned = plan_mod.make(opts, pillar, {}, test=True)
    config = planned.settings["config"]
    assert config in planned.stamps and str(script) in planned.stamps
    # Another run writes the sysctl file.
    with open(config, "w") as handle:
        handle.write("net.core.somaxconn = 4096\n")
    assert planned.stale()
    # This run's own write: taken in, the plan is fresh again, and that half is spent.
    planned.written("sysctl")
    assert not planned.stale()
    assert not planned.fresh_for("sysctl") and planned.fresh_for("limits:init_scripts")
    assert planned.fresh_for("processes")
    # A managed file of the other half.
    script.write_text(script.read_text() + "# edited\n")
    assert planned.stale()
    # Writing files (or raising limits in place) keeps every pid: the
    # process table is still good; a restart spends it.
    planned.written("limits:init_scripts")
    assert not planned.stale() and planned.fresh_for("processes")
    planned.written("limits:init_scripts", processes=True)
    assert not planned.fresh_for("processes")


def test_the_record_of_originals_changing_makes_the_plan_stale(opts, pillar, script):
    planned = plan_mod.make(opts, pillar, {}, test=True)
    assert journal.originals_path(opts["state_dir"]) in planned.stamps
    assert journal.restarts_path(opts["state_dir"]) in planned.stamps
    plan_mod.remember_limits(planned)  # the original of the init script goes on record
    assert planned.stale()
    assert str(script) in journal.load_originals(opts["state_dir"])["files"]
    planned.written("limits:init_scripts")
    assert not planned.stale()
    journal.begin_restart(opts["state_dir"], "ss", "sysvinit", None, 0)  # another run's restart
    assert planned.stale()


def test_another_runs_write_makes_the_plan_stale_even_when_no_file_changed(opts, pillar):
    # Two runs planned before either took the lock; the first writes only
    # live values (nothing a file's stamp would show) and counts its write.
    waiting = plan_mod.make(opts, pillar, {}, test=True)
    first = plan_mod.make(opts, pillar, {}, test=True)
    assert not waiting.stale()
    first.written("sysctl", changed=True)
    assert journal.generation(opts["state_dir"]) == 1
    assert waiting.stale() and not first.stale()
    # A write that changed nothing is not counted.
    plan_mod.remake(waiting, pillar, test=True)
    first.written("sysctl", changed=False)
    assert not waiting.stale() and journal.generation(opts["state_dir"]) == 1


def test_the_plan_looks_at_its_files_before_it_reads_them(opts, pillar, monkeypatch):
    # A write that lands while the plan is reading (after it read the file,
    # before it is done) must make it stale: the stamps come first.
    real = plan_mod.sysctl.plan

    def plan_then_another_run_writes(settings, options_, test, table=None):
        half = real(settings, options_, test, table=table)
        with open(settings["config"], "w") as handle:
            handle.write("net.core.somaxconn = 4096\n")
        return half

    monkeypatch.setattr(plan_mod.sysctl, "plan", plan_then_another_run_writes)
    assert plan_mod.make(opts, pillar, {}, test=True).stale()


def test_remake_updates_the_object_in_place(opts, pillar):
    planned = plan_mod.make(opts, pillar, {}, test=True)
    held = planned  # what the run's other states hold
    planned.written("sysctl")
    pillar["shadowsocks"]["tuning"]["nofile"] = 2048
    again = plan_mod.remake(planned, pillar, test=True)
    assert again is held
    assert held.settings["nofile"] == 2048 and held.used == set() and held.fresh_for("sysctl")
    assert dict(held) == dict(plan_mod.make(opts, pillar, {}, test=True))
    assert "2048" in held["limits"]["files"][0]["comment"]


def test_a_bad_pillar_gives_a_plan_of_errors_and_no_halves(opts, pillar):
    pillar["shadowsocks"]["tuning"]["nofile"] = "lots"
    pillar["shadowsocks"]["tuning"]["limits"]["restart"] = "sometimes"
    planned = plan_mod.make(opts, pillar, {}, test=True)
    assert not planned["ok"]
    (error,) = planned.errors  # one message naming every problem
    assert "pillar shadowsocks:tuning:nofile: 'lots' is not a positive integer" in error
    assert "pillar shadowsocks:tuning:limits:restart: 'sometimes' must be one of live, running, always, never" in error
    assert planned.settings is None and planned.sysctl is None and planned.limits is None
    assert planned["sysctl"] is None and planned["limits"] is None and planned["notes"] == []
    assert planned.stamps == {} and not planned.stale()
    with pytest.raises(CommandExecutionError) as err:
        plan_mod.fail(planned)
    # Said once: the pillar's own message already says nothing was changed, and what to fix.
    assert str(err.value).endswith("\nNothing was changed: fix the pillar (or arguments) above")
    assert str(err.value).count("Nothing was changed") == 1


def test_a_broken_record_of_originals_is_an_error_of_the_plan(opts, pillar, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "originals.json").write_text("[1, 2]")
    planned = plan_mod.make(opts, pillar, {}, test=True)
    assert not planned["ok"] and planned.sysctl is not None and planned.limits is not None
    assert any(e.startswith(f"{state / 'originals.json'} is not a valid record of originals") for e in planned.errors)
