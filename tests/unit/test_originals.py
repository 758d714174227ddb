"""The record of originals (`<state_dir>/originals.json`) is this package's
own file, but `clean` writes and deletes what it names: a record of the
wrong shape, or one naming a file the settings do not manage, is refused
whole with one message, and lines added to a managed file since the package
wrote it are kept (a file it created) or named (a file that existed). Real
files in a temporary tree; sysctls under a proc_root of plain files."""

import base64
import json
import os

import pytest
from salt.exceptions import CommandExecutionError

import sstuning_journal as journal


@pytest.fixture
def tree(tmp_path):
    """state_dir, a proc_root of plain files with one key, and a managed directory."""
    (tmp_path / "proc" / "net" / "core").mkdir(parents=True)
    (tmp_path / "proc" / "net" / "core" / "somaxconn").write_text("8192\n")
    (tmp_path / "etc").mkdir()
    return tmp_path


def b64(text):
    return base64.b64encode(text.encode()).decode()


def write_record(tree, document):
    state = tree / "state"
    state.mkdir(exist_ok=True)
    (state / "originals.json").write_text(document if isinstance(document, str) else json.dumps(document))
    return str(state)


def clean(tree, managed, test=False, force=False):
    return journal.restore(str(tree / "state"), str(tree / "proc"), set(managed), test, force)


def snapshot(tree):
    return {str(p): (p.read_bytes() if p.is_file() else "dir") for p in sorted(tree.rglob("*"))}


@pytest.mark.parametrize("document, problem", [
    ("[]", "the document is list, not a mapping"),
    ("null", "the document is null, not a mapping"),
    ("{not json", "not JSON"),
    ({"files": []}, "'files' is list, not a mapping"),
    ({"sysctls": {"net/../../etc/shadow": "1"}}, "is not a sysctl name"),
    ({"sysctls": {"net.core.somaxconn": 4096}}, "is not a sysctl value"),
    ({"files": {"/etc/../etc/shadow": None}}, "is not an absolute, normalised path"),
    ({"files": {"etc/passwd": None}}, "is not an absolute, normalised path"),
    ({"files": {"/etc/x.conf": "***not base64***"}}, "the saved content is not base64"),
    ({"files": {"/etc/x.conf": 7}}, "the saved content is not a text"),
    ({"written": {"/etc/x.conf": b64("x")}}, "written: /etc/x.conf has no original"),
    ({"sysctls": {}, "files": {}, "extra": 1}, "unknown entry 'extra'"),
])
def test_a_record_of_the_wrong_shape_is_refused_with_one_message(tree, document, problem):
    state_dir = write_record(tree, document)
    before = snapshot(tree)
    for call in (lambda: journal.load_originals(state_dir), lambda: clean(tree, ["/etc/x.conf"])):
        with pytest.raises(CommandExecutionError) as error:
            call()
        message = str(error.value)
        assert problem in message and "is not a valid record of originals" in message
        assert f"mv {state_dir}/originals.json" in message
    assert message.startswith("clean: ") and message.endswith("Nothing was changed")
    assert snapshot(tree) == before


def test_a_record_that_is_a_directory_or_a_link_is_refused(tree, tmp_path):
    state = tree / "state"
    (state / "originals.json").mkdir(parents=True)
    with pytest.raises(CommandExecutionError, match="is a directory.*own record"):
        journal.load_originals(str(state))
    (state / "originals.json").rmdir()
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"files": {}, "sysctls": {}}))
    (state / "originals.json").symlink_to(secret)
    with pytest.raises(CommandExecutionError, match="symbolic link"):
        journal.load_originals(str(state))


def test_clean_refuses_a_path_the_settings_do_not_manage_and_changes_nothing(tree):
    victim = tree / "etc" / "passwd"
    victim.write_text("root:x:0:0\n")
    managed = tree / "etc" / "local.conf"
    managed.write_text("net.core.somaxconn = 8192\n")
    write_record(tree, {"sysctls": {"net.core.somaxconn": "4096"},
                        "files": {str(victim): None, str(managed): None}})
    before = snapshot(tree)
    for test in (True, False):
        with pytest.raises(CommandExecutionError) as error:
            clean(tree, [str(managed)], test=test)
        assert f"lists {victim}, which the current settings do not manage" in str(error.value)
        assert snapshot(tree) == before  # not the victim, not the managed file, not the sysctl


def test_a_file_the_settings_no_longer_name_is_put_back_while_it_holds_what_was_written(tree):
    moved = tree / "etc" / "old-local.conf"  # the pillar moved `config` since this file was written
    moved.write_text("before\nours\n")
    write_record(tree, {"files": {str(moved): b64("before\n")}, "written": {str(moved): b64("before\nours\n")}})
    clean(tree, [], test=True)
    clean(tree, [])
    assert moved.read_text() == "before\n"
    moved.write_text("before\nours\nsomeone else's\n")  # changed since: no longer provably ours
    write_record(tree, {"files": {str(moved): b64("before\n")}, "written": {str(moved): b64("before\nours\n")}})
    with pytest.raises(CommandExecutionError, match="does not hold what this package wrote there"):
        clean(tree, [])
    assert moved.read_text() == "before\nours\nsomeone else's\n"


def test_clean_checks_every_file_before_it_writes_anything(tree):
    first, second = tree / "etc" / "a.conf", tree / "etc" / "b.conf"
    first.write_text("ours\n")
    second.mkdir()  # a directory where the record says a file was
    write_record(tree, {"sysctls": {"net.core.somaxconn": "4096"},
                        "files": {str(first): None, str(second): b64("before\n")}})
    before = snapshot(tree)
    with pytest.raises(CommandExecutionError, match=f"{second} is a directory"):
        clean(tree, [str(first), str(second)])
    assert snapshot(tree) == before


def test_lines_added_to_a_file_it_created_are_kept(tree):
    conf = tree / "etc" / "local.conf"
    ours = "# managed\nnet.core.somaxconn = 8192\n"
    conf.write_text(ours + "vm.swappiness = 10\n")  # the admin's line, added after the apply
    write_record(tree, {"files": {str(conf): None}, "written": {str(conf): b64(ours)}})
    predicted = clean(tree, [str(conf)], test=True)
    assert "1 line(s) added since" in predicted[str(conf)]["kept"] and "vm.swappiness = 10" in predicted[str(conf)]["kept"]
    assert conf.read_text() == ours + "vm.swappiness = 10\n"  # test: only reported
    clean(tree, [str(conf)])
    assert conf.read_text() == "vm.swappiness = 10\n"
    assert not (tree / "state" / "originals.json").exists()


def test_a_file_it_created_and_nobody_edited_is_removed(tree):
    conf = tree / "etc" / "local.conf"
    conf.write_text("# managed\n")
    write_record(tree, {"files": {str(conf): None}, "written": {str(conf): b64("# managed\n")}})
    assert clean(tree, [str(conf)])[str(conf)]["new"] == "removed (it did not exist before)"
    assert not conf.exists()


def test_lines_added_to_a_file_that_existed_are_named_and_force_puts_the_original_back(tree):
    defaults = tree / "etc" / "supervisor"
    original = "DAEMON_OPTS=\n"
    ours = original + "ulimit -n 51200\n"
    defaults.write_text(ours + "export TZ=UTC\n")
    write_record(tree, {"files": {str(defaults): b64(original)}, "written": {str(defaults): b64(ours)}})
    before = snapshot(tree)
    for test in (True, False):
        with pytest.raises(CommandExecutionError) as error:
            clean(tree, [str(defaults)], test=test)
        assert f"{defaults} changed since this package wrote it" in str(error.value)
        assert "'export TZ=UTC'" in str(error.value) and "force=True" in str(error.value)
    assert snapshot(tree) == before
    changes = clean(tree, [str(defaults)], force=True)
    assert "export TZ=UTC" in changes[str(defaults)]["lost"]
    assert defaults.read_text() == original


@pytest.mark.parametrize("original, written, current, expected", [
    (None, "a\n", "a\n", (None, [], [])),                       # ours, untouched: removed
    (None, "a\n", "a\nb\n", ("b\n", ["b\n"], [])),              # a line added: kept
    (None, "a\n", "\na\n", (None, [], [])),                     # only a blank line added: removed
    ("o\n", "o\na\n", "o\na\n", ("o\n", [], [])),               # ours, untouched: the original back
    ("o\n", "o\na\n", "o\n", ("o\n", [], [])),                  # our line removed by hand: the original
    ("o\n", "o\na\n", "o\na\nb\n", ("o\n", [], ["b\n"])),       # a line added: lost unless forced
    ("o\n", None, "o\nb\n", ("o\n", [], [])),                   # nothing recorded (an older record)
    ("o\n", "o\na\n", None, ("o\n", [], [])),                   # deleted since: the original back
])
def test_put_back(original, written, current, expected):
    assert journal.put_back(original, written, current) == expected
