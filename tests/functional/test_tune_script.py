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
        assert f"using --nofile {hard}" in done.stdout
        assert f"./tune --apply --nofile {hard}" in last
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
