"""`./tune`, the README's first command, run for real as a dry run inside a
fresh network namespace: it ends with the command that applies it, carries
the open-file limit this box can grant, and reports bad input in its own words.
TUNE_PYTHON points it at this test run's Python (Salt installed) instead of
building .venv-tune."""

import os
import resource
import subprocess
import sys

from support.common import REPO


def tune(netns, *args):
    return subprocess.run(
        ["ip", "netns", "exec", netns, str(REPO / "tune"), *args],
        capture_output=True, text=True, timeout=300, env={"TUNE_PYTHON": sys.executable, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )


def test_the_dry_run_ends_with_the_command_that_applies_it(netns, tmp_path):
    state_dir = "/var/lib/shadowsocks_tuning"
    existed = os.path.exists(state_dir)
    before = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/sys/net/ipv4/tcp_fin_timeout"],
                            capture_output=True, text=True, check=True).stdout
    done = tune(netns)
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("tune: dry run, nothing changed. Apply: ./tune --apply"), last
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 51200:
        # The settings decide it, as for any Salt user: the apply command needs no flag.
        assert f"nofile {hard}: the most this box can grant" in done.stdout
        assert last.startswith("tune: dry run, nothing changed. Apply: ./tune --apply   Undo later"), last
    state_dir_made = not existed and os.path.exists(state_dir)
    after = subprocess.run(["ip", "netns", "exec", netns, "cat", "/proc/sys/net/ipv4/tcp_fin_timeout"],
                           capture_output=True, text=True, check=True).stdout
    assert after == before, "the dry run wrote the kernel"
    assert not state_dir_made, "the dry run created /var/lib/shadowsocks_tuning"


def test_bad_arguments_and_a_bad_pillar_are_reported_plainly(netns, tmp_path):
    assert "--nofile needs a whole number" in tune(netns, "--nofile", "lots").stderr
    assert "--pillar needs a file" in tune(netns, "--pillar").stderr
    bad = tmp_path / "bad.sls"
    bad.write_text("shadowsocks: {tuning: {profile: bbrr}}\n")
    done = tune(netns, "--pillar", str(bad))
    assert done.returncode != 0
    assert "pillar shadowsocks:tuning:profile: unknown profile 'bbrr'" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("tune: a state failed")


def test_a_missing_or_wrong_pillar_argument_is_said_before_anything_runs(netns, tmp_path):
    for args, said in [
        (["--pillar"], "tune: --pillar needs a file: ./tune --pillar my.sls"),
        (["--pillar", "--apply"], "tune: --pillar needs a file, got the option '--apply'"),
        (["--pillar", str(tmp_path / "nowhere.sls")], f"tune: --pillar {tmp_path / 'nowhere.sls'}: no such readable file"),
        (["--pillar", str(tmp_path)], f"tune: --pillar {tmp_path}: no such readable file"),
    ]:
        done = tune(netns, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == "" and done.stderr.splitlines() == [done.stderr.strip()], (args, done.stderr)
        assert done.stderr.startswith(said), (args, done.stderr)


def test_a_pillar_file_with_a_yaml_error_is_one_line_naming_the_file_and_the_line(netns, tmp_path):
    """Salt itself answers such a file with two tracebacks and "see master
    log" (over 100 lines): ./tune says it in one line, and runs no state."""
    cases = {
        # file text: what the one line says after "tune: FILE"
        "shadowsocks:\n  tuning:\n    profile: bbr\n    reserved_ports: [8388\n":
            ", line 5, column 1: did not find expected ',' or ']' (while parsing a flow sequence that starts at line 4)",
        "shadowsocks:\n  tuning:\n    nofile: 20000\n    nofile: 30000\n":
            ", line 4, column 5: found conflicting ID 'nofile' (while constructing a mapping that starts at line 3)",
        "shadowsocks:\n\ttuning: {}\n":
            ", line 2, column 1: found character that cannot start any token (a tab: YAML indents with spaces)",
        "tuning:\n  nofile: 20000\n":
            " holds no 'shadowsocks:' key at the top",
        # Jinja is rendered by Salt first; its error, with the line, in one line too.
        "shadowsocks:\n  tuning:\n    nofile: {{ 20000\n":
            " did not render: Jinja syntax error: unexpected end of template, expected 'end of print statement'.; line 3",
    }
    for number, (text, said) in enumerate(cases.items()):
        bad = tmp_path / f"bad{number}.sls"
        bad.write_text(text)
        done = tune(netns, "--pillar", str(bad))
        assert done.returncode == 2, (text, done.stdout, done.stderr)
        assert done.stdout == "", (text, done.stdout)
        assert done.stderr.splitlines() == [done.stderr.strip()], (text, done.stderr)
        assert done.stderr.startswith(f"tune: {bad}{said}"), (text, done.stderr)
        assert done.stderr.strip().endswith("; nothing was changed"), done.stderr
