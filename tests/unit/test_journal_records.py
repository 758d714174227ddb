"""The journal's records and refusals on real files in a temporary tree: the
record of restarts in progress (on record before a stop, off it once the
service runs again) round-trips, and a broken one is refused naming the file
and what to do; the size ceiling on files this package edits; a state_dir
that is no directory; and which Debian package owns a file as a conffile,
against a dpkg info directory of the test's own."""

import os
import stat

import pytest
from salt.exceptions import CommandExecutionError

import sstuning_journal as journal


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


# --------------------------------------------------------------------------
# Restarts in progress
# --------------------------------------------------------------------------
def test_restart_records_round_trip(state):
    assert journal.pending_restarts(state) == []
    journal.begin_restart(state, "supervisor", "sysvinit", "/run/supervisord.pid", 1700000000.5)
    journal.begin_restart(state, "ss@a.service", "systemd", None, 1700000001.0)
    journal.begin_restart(state, "supervisor", "sysvinit", "/run/supervisord.pid", 1700000002.0)  # again: replaced
    assert journal.pending_restarts(state) == [
        {"name": "ss@a.service", "init_system": "systemd", "pidfile": None, "since": 1700000001.0},
        {"name": "supervisor", "init_system": "sysvinit", "pidfile": "/run/supervisord.pid", "since": 1700000002.0},
    ]
    path = journal.restarts_path(state)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(state).st_mode) == 0o700
    journal.end_restart(state, "supervisor")
    assert [item["name"] for item in journal.pending_restarts(state)] == ["ss@a.service"]
    journal.end_restart(state, "never-begun")  # nothing on record: nothing to do
    journal.end_restart(state, "ss@a.service")
    assert journal.pending_restarts(state) == [] and not os.path.exists(path)  # the last one off: no file


@pytest.mark.parametrize("text", [
    "not json", "{}", "[1]", "[{}]", '[{"name": "x"}]', '[{"name": 1, "init_system": "sysvinit"}]',
    '[{"name": "x", "init_system": "upstart"}]',
])
def test_a_broken_restart_record_is_refused_naming_the_file_and_what_to_do(state, text):
    os.makedirs(state)
    path = journal.restarts_path(state)
    with open(path, "w") as handle:
        handle.write(text)
    with pytest.raises(CommandExecutionError) as err:
        journal.pending_restarts(state)
    assert str(err.value) == (f"{path} is not a valid record of restarts in progress; check that the services it "
                              f"names run, then move it away (mv {path} {path}.bad)")
    # Nothing is stopped on top of a record that cannot be kept: begin refuses, the file stays.
    with pytest.raises(CommandExecutionError):
        journal.begin_restart(state, "supervisor", "sysvinit", None, 0)
    with open(path) as handle:
        assert handle.read() == text


def test_a_restart_record_that_is_a_directory_or_a_link_is_refused(state, tmp_path):
    os.makedirs(journal.restarts_path(state))
    with pytest.raises(CommandExecutionError) as err:
        journal.pending_restarts(state)
    assert "is a directory" in str(err.value) and f"mv {journal.restarts_path(state)}" in str(err.value)
    os.rmdir(journal.restarts_path(state))
    (tmp_path / "elsewhere.json").write_text("[]")
    os.symlink(tmp_path / "elsewhere.json", journal.restarts_path(state))
    with pytest.raises(CommandExecutionError) as err:
        journal.pending_restarts(state)
    assert "is a symbolic link" in str(err.value)


def test_a_state_dir_that_is_a_file_is_named(tmp_path):
    state = tmp_path / "state"
    state.write_text("")
    for read, record in ((journal.pending_restarts, "restarts.json"), (journal.load_originals, "originals.json")):
        with pytest.raises(CommandExecutionError) as err:
            read(str(state))
        assert str(err.value).startswith(f"cannot read {state / record}: Not a directory")
        assert "shadowsocks_tuning.state_dir" in str(err.value)
    with pytest.raises(CommandExecutionError):
        journal.begin_restart(str(state), "supervisor", "sysvinit", None, 0)


# --------------------------------------------------------------------------
# The size ceiling
# --------------------------------------------------------------------------
def test_a_file_over_max_managed_is_refused_unread(tmp_path):
    path = tmp_path / "supervisord.conf"
    with open(path, "wb") as handle:
        handle.truncate(journal.MAX_MANAGED)  # sparse: no disk used
    assert len(journal.read_managed(str(path))) == journal.MAX_MANAGED  # at the ceiling: read
    with open(path, "ab") as handle:
        handle.write(b"x")
    with pytest.raises(journal.NotRegularFile) as err:
        journal.read_managed(str(path))
    assert str(err.value).startswith(f"{path} is 4.0 MiB, over the {journal.MAX_MANAGED >> 20} MiB this package edits")
    assert "see what filled it, or point the setting at another file" in str(err.value)
    # The record of originals is refused the same way: never loaded into memory.
    state = tmp_path / "state"
    state.mkdir()
    os.rename(path, state / "originals.json")
    with pytest.raises(CommandExecutionError) as err:
        journal.load_originals(str(state))
    assert "MiB this package edits" in str(err.value) and "mv " in str(err.value)


# --------------------------------------------------------------------------
# Conffiles of Debian packages
# --------------------------------------------------------------------------
@pytest.fixture
def dpkg(tmp_path):
    """A dpkg info directory of the test's own, listing files under tmp_path."""
    info = tmp_path / "info"
    info.mkdir()
    etc = tmp_path / "etc"
    etc.mkdir()
    conf = etc / "local.conf"
    conf.write_text("vm.swappiness = 10\n")
    (info / "procps.conffiles").write_text(f"/etc/init.d/procps\n{conf}\n")
    (info / "procps.list").write_text(f"{etc / 'listed-only.conf'}\n")  # installed, not a conffile
    (etc / "listed-only.conf").write_text("x\n")
    (info / "libfoo:amd64.conffiles").write_text(f"{etc / 'foo.conf'}")  # multi-arch, no final newline
    (etc / "foo.conf").write_text("x\n")
    return info, etc


def test_package_conffile(dpkg, tmp_path):
    info, etc = dpkg
    assert journal.package_conffile(str(etc / "local.conf"), str(info)) == "procps"
    assert journal.package_conffile(str(etc / "foo.conf"), str(info)) == "libfoo"  # the :arch left out
    assert journal.package_conffile(str(etc / "listed-only.conf"), str(info)) is None
    assert journal.package_conffile(str(etc / "absent.conf"), str(info)) is None  # no file: nothing to ask
    (etc / "mine.conf").write_text("x\n")
    assert journal.package_conffile(str(etc / "mine.conf"), str(info)) is None
    assert journal.package_conffile(str(etc / "local.conf"), str(tmp_path / "no-dpkg")) is None


def test_a_conffile_is_matched_by_its_whole_line(dpkg):
    """/etc/default/x is not a conffile because a package lists
    /usr/local/etc/default/x."""
    info, etc = dpkg
    inner = etc / "inner.conf"
    inner.write_text("x\n")
    (info / "other.conffiles").write_text(f"/srv{inner}\n{inner}.dpkg-dist\n")
    assert journal.package_conffile(str(inner), str(info)) is None


def test_a_file_this_package_already_wrote_is_not_looked_up(dpkg):
    info, etc = dpkg
    (etc / "local.conf").write_text("# managed by Salt (shadowsocks_tuning)\nvm.swappiness = 10\n")
    assert journal.package_conffile(str(etc / "local.conf"), str(info)) is None


def test_describe_error_says_what_to_do():
    assert journal.describe_error("/etc/x", OSError(28, "No space left on device")) == (
        "/etc/x: no space left on that file system: free some and run again")
    assert journal.describe_error("/etc/x", OSError(30, "Read-only file system")).startswith(
        "/etc/x: the file system is read-only: remount it read-write")
    assert journal.describe_error("/etc/x", OSError(5, "Input/output error")) == "/etc/x: Input/output error"
    assert journal.describe_error("/etc/x", CommandExecutionError("already named")) == "already named"


def test_stamp_tells_a_changed_file(tmp_path):
    path = tmp_path / "local.conf"
    assert journal.stamp(str(path)) is None
    path.write_text("a = 1\n")
    first = journal.stamp(str(path))
    journal.atomic_write(str(path), "a = 1\n")  # the same text through a new inode
    assert journal.stamp(str(path)) != first
    second = journal.stamp(str(path))
    before = os.stat(path)
    path.write_text("a = 2\n")  # the same size, in place
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1000))
    assert journal.stamp(str(path)) != second
