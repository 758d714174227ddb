"""One rule for what the package reads and rewrites: a managed path that is a
symbolic link, a file with several hard links, a directory or a named pipe
is refused with a message, never followed, read into output or hung on; the
boot-order scan reads regular files only and says which it skipped."""

import os
import threading

import pytest

import sstuning_journal as journal
import sstuning_sysctld as sysctld


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_text("password = hunter2\n")
    path.chmod(0o600)
    return path


def test_a_symlinked_managed_file_is_refused_and_its_target_never_read(tmp_path, secret):
    link = tmp_path / "supervisor"
    link.symlink_to(secret)
    with pytest.raises(journal.NotRegularFile, match=r"is a symbolic link .*refusing to follow it") as caught:
        journal.read_managed(str(link))
    assert "hunter2" not in str(caught.value)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(journal.NotRegularFile):
        journal.read_managed(str(dangling))


def test_a_hard_linked_managed_file_is_refused(tmp_path, secret):
    other = tmp_path / "local.conf"
    os.link(secret, other)
    with pytest.raises(journal.NotRegularFile, match=r"has 2 hard links; refusing to rewrite it"):
        journal.read_managed(str(other))


def test_a_directory_or_a_named_pipe_is_refused_without_blocking(tmp_path):
    directory = tmp_path / "x.conf"
    directory.mkdir()
    with pytest.raises(journal.NotRegularFile, match=r"is a directory"):
        journal.read_managed(str(directory))
    fifo = tmp_path / "y.conf"
    os.mkfifo(fifo)
    outcome = {}

    def read():
        try:
            journal.read_text(str(fifo))
        except journal.NotRegularFile as exc:
            outcome["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a named pipe blocked"
    assert "is a named pipe" in outcome["error"]


def test_the_lock_is_never_created_through_a_planted_link(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(Exception, match=r"cannot take the lock"):
        with journal.lock(str(state)):
            pass
    assert not (tmp_path / "elsewhere").exists()


def test_a_later_file_that_is_not_regular_is_reported_not_read(tmp_path):
    first, later = tmp_path / "etc", tmp_path / "lib"
    first.mkdir(), later.mkdir()
    (first / "local.conf").write_text("net.core.somaxconn = 4096\n")
    (later / "zz-dir.conf").mkdir()
    os.mkfifo(later / "zz-pipe.conf")
    (later / "zz-real.conf").write_text("net.core.somaxconn = 1024\n")
    found, note = sysctld.overrides([str(first), str(later)], str(tmp_path / "sysctl.conf"),
                                    str(first / "local.conf"), {"net.core.somaxconn": "4096"})
    assert found["net.core.somaxconn"][0] == str(later / "zz-real.conf")
    assert "zz-dir.conf is a directory" in note and "zz-pipe.conf is a named pipe" in note
