"""Rows 2-6 of tests/FAULTS.md: faults during apply, two runs at once, config files owned
by others, drift and rollback, permissions.

Everything here is real: a fresh network namespace per test (its kernel values
are written for real, the host's never), real files in temporary directories,
and real faults made inside a private mount namespace around one `salt-call`
(a read-only /proc/sys, a full or read-only directory, an over-mounted
`modprobe`), or a real SIGKILL. tests/FAULTS.md is the table of these rows;
keep the two in step.
"""

import ast
import fcntl
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import attr
import pytest
from saltfactories.cli.call import SaltCall

import sstuning_catalogue as catalogue  # the flat engine files (pytest.ini puts _utils on sys.path)
import sstuning_sysctld as sysctld
from support import common
from support.common import REPO, no_temporaries, state_of

# Every Python file that runs on the minion: the Salt faces and the engines.
SOURCES = [*sorted((REPO / "_modules").glob("*.py")), REPO / "_states" / "shadowsocks_tuning.py",
           *sorted((REPO / "_utils").glob("sstuning_*.py"))]
KEYS = sorted(catalogue.CATALOGUE)
# The sysctl part of `shadowsocks.tuning` (which includes it). The open-file
# part (shadowsocks.tuning.nofile) has its own tests (test_nofile_states.py,
# test_whole_pillar.py); the pillar of these minions turns it off.
SLS = "shadowsocks.tuning.sysctl"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
@attr.s(kw_only=True, slots=True)
class SaltCallWithFault(SaltCall):
    """salt-call inside the test's network namespace and a private mount
    namespace: `setup` (shell lines, run as root) makes the fault, `after`
    copies out what only that mount namespace can see. Nothing leaks to the
    host: `--propagation private`."""

    netns = attr.ib()
    setup = attr.ib(default="")
    after = attr.ib(default="")

    def cmdline(self, *args, **kwargs):
        salt_call = super().cmdline(*args, **kwargs)
        script = f'set -e\n{self.setup}\nset +e\n"$@"\nrc=$?\n{self.after}\nexit $rc'
        return [
            "ip", "netns", "exec", self.netns,
            "unshare", "--mount", "--propagation", "private",
            "sh", "-c", script, "sh", *salt_call,
        ]


def with_fault(minion, setup, after=""):
    """A salt-call for `minion` (the conftest `masterless`) run under a fault."""
    if not minion.synced:
        assert minion.run("saltutil.sync_all").returncode == 0
    return minion.factory.salt_call_cli(
        factory_class=SaltCallWithFault, netns=minion.netns, setup=setup, after=after, timeout=120
    )


def live_values(netns, keys=KEYS):
    return common.live_values(netns, keys)


def sysctl_behind_salts_back(netns, key, value):
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", f"{key}={value}"], check=True)


def wanted_values(minion):
    """What the applied profile persists in this namespace (keys the kernel
    lets it write and that are not kept at the kernel's own value), from the
    engine's own verify."""
    report = minion.run("shadowsocks_tuning.verify").data
    return {key: entry["wanted"] for key, entry in report["keys"].items() if "persisted" in entry}


# Patterns of shelling out, which no minion-side source may contain.
SHELL_PATTERNS = ("shell=True", "os.system", "os.popen", "python_shell=True", "cmd.shell", "getoutput", "getstatusoutput", "pty.spawn")


# --------------------------------------------------------------------------
# Row 2: faults during apply
# --------------------------------------------------------------------------
OLD_CONF = b"# owned by ops\nvm.swappiness = 10\nnet.core.somaxconn = 1024\n"


def test_kernel_rejects_a_value_halfway_everything_put_back_nothing_persisted(masterless):
    # The validator takes any port range within 1..65535; the kernel refuses a
    # range that starts below net.ipv4.ip_unprivileged_port_start (1024 here).
    assert catalogue.normalise("net.ipv4.ip_local_port_range", "100 65000") == "100 65000"
    assert live_values(masterless.netns, ["net.ipv4.ip_unprivileged_port_start"]) == {"net.ipv4.ip_unprivileged_port_start": "1024"}
    masterless.config.write_bytes(OLD_CONF)
    before = live_values(masterless.netns)
    masterless.pillar({"config": str(masterless.config), "sysctls": {"net.ipv4.ip_local_port_range": "100 65000"}})

    ret = state_of(masterless.run("state.apply", SLS))

    assert ret["result"] is False and ret["changes"] == {}
    assert "net.ipv4.ip_local_port_range: cannot set '100 65000': Invalid argument" in ret["comment"]
    assert "nothing persisted" in ret["comment"]
    # tcp_tw_reuse, tcp_fin_timeout and tcp_keepalive_time come before the
    # range in the profile: they were written, then put back.
    put_back = int(re.search(r"Put back (\d+) key\(s\) already written", ret["comment"]).group(1))
    assert put_back >= 3
    assert live_values(masterless.netns) == before
    assert masterless.config.read_bytes() == OLD_CONF
    assert no_temporaries(masterless.root)


def test_read_only_proc_sys_gives_a_per_key_report_and_keeps_the_file(masterless):
    read_only_proc = with_fault(masterless, "mount --bind /proc/sys /proc/sys\nmount -o remount,bind,ro /proc/sys")
    # First run on a read-only /proc/sys: nothing to persist, so no file at all.
    ret = state_of(read_only_proc.run("--local", "state.apply", SLS))
    assert ret["result"] is True and ret["changes"] == {}, ret
    assert not masterless.config.exists()

    assert state_of(masterless.run("state.apply", SLS))["result"] is True
    persisted = masterless.config.read_bytes()
    before = live_values(masterless.netns)
    probe = masterless.run("shadowsocks_tuning.probe").data
    writable = [k for k in masterless.run("shadowsocks_tuning.profile").data["sysctls"] if probe[k]["status"] == "writable"]
    masterless.pillar({"config": str(masterless.config), "sysctls": {"net.core.somaxconn": 8192}})

    # Default policy (warn): nothing can be set; each key is named with the reason.
    ret = state_of(read_only_proc.run("--local", "state.apply", SLS))
    assert ret["result"] is True and ret["changes"] == {}, ret
    for key in writable:
        assert f"{key}: read-only: " in ret["comment"], key
    assert "/proc/sys/net/core/somaxconn is not writable (read-only /proc/sys or missing privilege)" in ret["comment"]
    assert masterless.config.read_bytes() == persisted  # a read-only mount is no reason to comment lines out
    assert live_values(masterless.netns) == before

    # Policy strict: the state fails, naming every key and how to skip it.
    masterless.pillar({"config": str(masterless.config), "sysctls": {"net.core.somaxconn": 8192}, "policy": {"unavailable": "strict"}})
    ret = state_of(read_only_proc.run("--local", "state.apply", SLS))
    assert ret["result"] is False
    for key in writable:
        assert f"{key}: read-only: " in ret["comment"] and f"policy:keys:{key}: warn" in ret["comment"]
    assert masterless.config.read_bytes() == persisted
    assert live_values(masterless.netns) == before


def test_persist_dir_full_or_read_only_puts_live_values_back_and_keeps_the_old_file(masterless, tmp_path):
    masterless.config.write_bytes(OLD_CONF)
    before = live_values(masterless.netns)
    conf_dir = masterless.config.parent
    stash, seen = tmp_path / "stash", tmp_path / "seen"
    seen.mkdir()
    faults = {
        # A 16 KiB tmpfs over the sysctl.d directory, holding the old file, then filled up;
        # what the tmpfs holds afterwards is copied out to `seen`.
        "no space left on that file system: free some and run again": with_fault(
            masterless,
            setup=f"cp -a {conf_dir} {stash}\nmount -t tmpfs -o size=16k,mode=755 tmpfs {conf_dir}\n"
            f"cp -a {stash}/. {conf_dir}/\ndd if=/dev/zero of={conf_dir}/filler bs=4k 2>/dev/null || true",
            after=f"cp -a {conf_dir}/. {seen}/",
        ),
        "the file system is read-only: remount it read-write, or point the setting elsewhere": with_fault(
            masterless,
            setup=f"mount --bind {conf_dir} {conf_dir}\nmount -o remount,bind,ro {conf_dir}",
            after=f"cp -a {conf_dir}/. {seen}/",
        ),
    }
    for error, salt_call in faults.items():
        ret = state_of(salt_call.run("--local", "state.apply", SLS))
        assert ret["result"] is False and ret["changes"] == {}
        assert f"cannot persist {masterless.config}: {error}" in ret["comment"]
        # Keys were written before the file failed, and put back.
        assert re.search(r"Put back [1-9]\d* key\(s\) already written; nothing persisted", ret["comment"])
        assert live_values(masterless.netns) == before
        assert (seen / "local.conf").read_bytes() == OLD_CONF
        assert no_temporaries(seen) and no_temporaries(masterless.root)
        (seen / "local.conf").unlink()
    assert masterless.config.read_bytes() == OLD_CONF


def test_state_dir_read_only_or_full_fails_before_writing_anything(masterless):
    masterless.config.write_bytes(OLD_CONF)
    before = live_values(masterless.netns)
    state = masterless.root / "state"
    faults = {
        "Read-only file system": f"mount --bind {state} {state}\nmount -o remount,bind,ro {state}",
        # The lock can be taken (its file exists), the originals cannot be saved.
        "no space left on that file system: free some and run again":
            f"mount -t tmpfs -o size=4k tmpfs {state}\ntouch {state}/lock\n"
        f"dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null || true",
    }
    for error, fault in faults.items():
        ret = state_of(with_fault(masterless, fault).run("--local", "state.apply", SLS))
        assert ret["result"] is False and ret["changes"] == {}
        assert error in ret["comment"] and str(state) in ret["comment"], ret["comment"]
        assert "nothing was changed" in ret["comment"] and "Traceback" not in ret["comment"]
        assert live_values(masterless.netns) == before
        assert masterless.config.read_bytes() == OLD_CONF


def test_missing_modprobe_is_named_and_missing_sysctl_is_not_needed(masterless):
    before = live_values(masterless.netns)
    # modprobe and sysctl are symlinks to kmod / procps binaries: cover the real files.
    no_binaries = with_fault(
        masterless,
        'for b in modprobe sysctl; do mount --bind /dev/null "$(readlink -f /usr/sbin/$b)"; done\n'
        "if [ -x /usr/sbin/modprobe ] || [ -x /usr/sbin/sysctl ]; then exit 99; fi",
    )
    masterless.pillar({"config": str(masterless.config), "profile": "high-latency"})
    ret = state_of(no_binaries.run("--local", "state.apply", SLS))
    assert ret["result"] is False and ret["changes"] == {}
    assert (
        "net.ipv4.tcp_congestion_control: 'hybla' is not available (available: reno bbr cubic); "
        "modprobe not found (install the kmod package)"
    ) in ret["comment"]
    assert "set pillar shadowsocks:tuning:congestion_fallback" in ret["comment"]
    assert live_values(masterless.netns) == before and not masterless.config.exists()

    # The engine writes /proc/sys itself: without the sysctl binary a profile
    # that needs no module applies in full.
    masterless.pillar({"config": str(masterless.config), "profile": "low-latency"})
    ret = state_of(no_binaries.run("--local", "state.apply", SLS))
    assert ret["result"] is True and ret["changes"]
    assert masterless.run("shadowsocks_tuning.verify").returncode == 0


CRASHING_APPLY = r"""
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])  # the flat engine files, as Salt syncs them into extmods/utils
import sstuning_journal as journal
import sstuning_plan as plan
import sstuning_sysctl as sysctl
opts = plan.options(json.loads(sys.argv[2]).get)
tuning = json.loads(sys.argv[3])
victim = sys.argv[4]
real_replace = os.replace
def replace(src, dst):
    if os.path.basename(src).startswith(f".{victim}.sst-"):
        os.kill(os.getpid(), signal.SIGKILL)  # the temporary file is complete; the rename never comes
    real_replace(src, dst)
os.replace = replace
# What shadowsocks_tuning.apply does: plan both halves under the lock, write.
with journal.lock(opts["state_dir"]):
    planned = plan.make(opts, {"shadowsocks": {"tuning": tuning}}, {}, False)
    assert not planned.errors, planned.errors
    sysctl.apply(planned.settings, opts, planned.sysctl)
"""


def test_kill_9_between_writing_the_temporary_file_and_renaming_it(masterless):
    """The engines themselves, in a process killed with SIGKILL right after the
    temporary file is written (and, for the originals, fsynced), before its
    rename: once while saving the originals (before any kernel write), once
    while persisting local.conf (after them)."""
    masterless.config.write_bytes(OLD_CONF)
    before = live_values(masterless.netns)
    root = masterless.root
    opts = {
        "shadowsocks_tuning.state_dir": str(root / "state"),
        "shadowsocks_tuning.sysctl_dirs": [str(root / "sysctl.d"), str(root / "usr-lib-sysctl.d")],
        "shadowsocks_tuning.sysctl_conf": str(root / "sysctl.conf"),
        "shadowsocks_tuning.modules_load_dir": str(root / "modules-load.d"),
    }
    # The open-file part stays off the host's supervisor and shadowsocks-libev files.
    tuning = {"config": str(masterless.config), "limits": {"supervisor": None, "shadowsocks_libev": None}}
    for victim in ("originals.json", "local.conf"):
        crashed = subprocess.run(
            ["ip", "netns", "exec", masterless.netns, sys.executable, "-c", CRASHING_APPLY,
             str(REPO / "_utils"), json.dumps(opts), json.dumps(tuning), victim],
            capture_output=True, text=True,
        )
        assert crashed.returncode == -signal.SIGKILL, crashed.stderr
        assert masterless.config.read_bytes() == OLD_CONF
        assert len(list(root.rglob(f".{victim}.sst-*"))) == 1  # the exact artefact of the crash
        if victim == "originals.json":
            assert live_values(masterless.netns) == before  # died before the first kernel write

        ret = state_of(masterless.run("state.apply", SLS))
        assert ret["result"] is True
        assert no_temporaries(root)
        assert masterless.run("shadowsocks_tuning.verify").returncode == 0
        # Nothing lost: clean still knows the values and the file from before the crash.
        assert state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))["result"] is True
        assert live_values(masterless.netns) == before
        assert masterless.config.read_bytes() == OLD_CONF


# --------------------------------------------------------------------------
# Row 3: two runs at once on one box
# --------------------------------------------------------------------------
def _start(minion, *args):
    return subprocess.Popen(minion.cli.cmdline("--local", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, json.loads(out) if out.strip().startswith("{") else out, err


def test_concurrent_applies_queue_on_the_lock_and_never_interleave(masterless):
    before = live_values(masterless.netns)
    assert masterless.run("saltutil.sync_all").returncode == 0

    # A run waits while another holds the lock in state_dir.
    lock = os.open(masterless.root / "state" / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = _start(masterless, "state.apply", SLS)
        time.sleep(3)
        assert waiting.poll() is None, "the run did not wait for the lock"
        assert live_values(masterless.netns) == before and not masterless.config.exists()
    finally:
        os.close(lock)
    code, out, err = _finish(waiting)
    assert code == 0, (out, err)
    state_before = masterless.config.read_bytes()

    # Two full state runs at once (concurrent=True turns off Salt's own
    # one-state-run-at-a-time check, so only the module's lock is left).
    masterless.pillar({"config": str(masterless.config), "sysctls": {"net.ipv4.tcp_fin_timeout": 33}})
    runs = [_start(masterless, "state.apply", SLS, "concurrent=True") for _ in range(2)]
    changed = 0
    for proc in runs:
        code, out, err = _finish(proc)
        assert code == 0, (out, err)
        (ret,) = out["local"].values()
        assert ret["result"] is True
        changed += bool(ret["changes"])
    assert changed == 1  # the second run found the first one's work done
    assert masterless.config.read_bytes() == state_before.replace(b"tcp_fin_timeout = 30", b"tcp_fin_timeout = 33")
    assert masterless.run("shadowsocks_tuning.verify").returncode == 0

    # Four execution-module applies with different values at once: each run
    # is all or nothing, so live values and the file hold one run's pair, never
    # a mix. (Two keys that are not capacity limits: a capacity limit would
    # rightly be kept at the highest value any run set.)
    runs = [
        _start(masterless, "shadowsocks_tuning.apply",
               f'sysctls={{"net.ipv4.tcp_keepalive_time": {1000 + i}, "net.ipv4.tcp_fin_timeout": {40 + i}}}')
        for i in range(1, 5)
    ]
    for proc in runs:
        code, out, err = _finish(proc)
        assert code == 0, (out, err)
    now = live_values(masterless.netns, ["net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout"])
    winner = int(now["net.ipv4.tcp_keepalive_time"]) - 1000
    assert 1 <= winner <= 4 and int(now["net.ipv4.tcp_fin_timeout"]) == 40 + winner, now
    text = masterless.config.read_text()
    assert text.count(f"\nnet.ipv4.tcp_keepalive_time = {1000 + winner}\n") == 1 and text.count("tcp_keepalive_time") == 1
    assert text.count(f"\nnet.ipv4.tcp_fin_timeout = {40 + winner}\n") == 1 and text.count("tcp_fin_timeout") == 1
    assert text.count(sysctld.MANAGED_HEADER) == 1
    assert no_temporaries(masterless.root)
    # The originals saved are the ones from before any run.
    assert state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))["result"] is True
    assert live_values(masterless.netns) == before


# --------------------------------------------------------------------------
# Row 4: local.conf owned by someone else
# --------------------------------------------------------------------------
ODD_CRLF = (
    b"# tuning owned by ops\r\n"
    b"; a semicolon comment\r\n"
    b"vm.swappiness=10\r\n"
    b"net.core.somaxconn = 1024\r\n"
    b"  # indented comment, latin-1 \xe9t\xe9\r\n"
    b"net/ipv4/tcp_fastopen = 1\r\n"
    b"\r\n"
    b"net.core.somaxconn = 2048\r\n"
    b"-net.ipv4.tcp_mtu_probing = 0\r\n"
    b"kernel.pid_max = 65536"
)
ODD_CRLF_AFTER = (
    b"# tuning owned by ops\r\n"
    b"; a semicolon comment\r\n"
    b"vm.swappiness=10\r\n"
    b"net.core.somaxconn = 4096\r\n"
    b"  # indented comment, latin-1 \xe9t\xe9\r\n"
    b"net.ipv4.tcp_fastopen = 3\r\n"
    b"\r\n"
    b"net.ipv4.tcp_mtu_probing = 1\r\n"
    b"kernel.pid_max = 65536\r\n"
)
ODD_LF = b"# ops\nnet.ipv4.tcp_keepalive_time = 600\nvm.overcommit_memory = 1"
ODD_LF_AFTER = b"# ops\nnet.ipv4.tcp_keepalive_time = 1200\nvm.overcommit_memory = 1\n"


def _appended(data, prefix, eol):
    """The lines the engine appended after the user's own, split by `eol`."""
    assert data.startswith(prefix), data
    lines = data[len(prefix):].decode().split(eol)
    assert lines[-1] == "" and not any("\r" in line or "\n" in line for line in lines), lines
    return lines[:-1]


def test_foreign_local_conf_only_managed_lines_change_and_clean_restores_it(masterless):
    before = live_values(masterless.netns)
    crlf, lf = masterless.config, masterless.config.parent / "90-ops.conf"
    crlf.write_bytes(ODD_CRLF)
    lf.write_bytes(ODD_LF)

    ret = state_of(masterless.run("state.apply", SLS))
    assert ret["result"] is True, ret
    tail = _appended(crlf.read_bytes(), ODD_CRLF_AFTER, "\r\n")
    assert tail[:2] == [sysctld.MANAGED_HEADER, "# profile: low-latency"]
    assert all(re.fullmatch(r"[a-z0-9_.-]+ = [0-9a-z ,-]+", line) for line in tail[2:])  # `,-`: reserved ports
    wanted = wanted_values(masterless)
    managed = {k: v for _, k, v in sysctld.parse_conf(crlf.read_bytes().decode("utf-8", "surrogateescape"))}
    assert {k: managed[k] for k in wanted} == wanted
    assert {k: v for k, v in managed.items() if k not in wanted} == {"vm.swappiness": "10", "kernel.pid_max": "65536"}

    masterless.pillar({"config": str(lf)})
    ret = state_of(masterless.run("state.apply", SLS))
    assert ret["result"] is True and list(ret["changes"]) == [str(lf)], ret
    assert _appended(lf.read_bytes(), ODD_LF_AFTER, "\n")[:2] == [sysctld.MANAGED_HEADER, "# profile: low-latency"]

    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))
    assert ret["result"] is True
    assert crlf.read_bytes() == ODD_CRLF and lf.read_bytes() == ODD_LF
    assert live_values(masterless.netns) == before


# --------------------------------------------------------------------------
# Row 5: drift, a later file, and rollback
# --------------------------------------------------------------------------
def test_verify_catches_drift_and_a_later_file_and_clean_puts_everything_back(masterless):
    before = live_values(masterless.netns)
    assert state_of(masterless.run("state.apply", SLS))["result"] is True
    verify = masterless.run("shadowsocks_tuning.verify")
    assert verify.returncode == 0 and verify.data["ok"] is True, verify.data

    # A live value changed behind Salt's back.
    sysctl_behind_salts_back(masterless.netns, "net.ipv4.tcp_keepalive_time", 7000)
    verify = masterless.run("shadowsocks_tuning.verify")
    assert verify.returncode != 0
    assert verify.data["problems"] == ["net.ipv4.tcp_keepalive_time"]
    assert verify.data["keys"]["net.ipv4.tcp_keepalive_time"]["status"] == "drift"
    assert list(state_of(masterless.run("state.apply", SLS))["changes"]) == ["net.ipv4.tcp_keepalive_time"]

    # The persisted file edited by hand.
    text = masterless.config.read_text()
    masterless.config.write_text(text.replace("net.ipv4.tcp_fastopen = 3", "net.ipv4.tcp_fastopen = 1"))
    verify = masterless.run("shadowsocks_tuning.verify")
    assert verify.returncode != 0 and verify.data["problems"] == ["net.ipv4.tcp_fastopen"]
    assert str(masterless.config) in verify.data["keys"]["net.ipv4.tcp_fastopen"]["reason"]
    masterless.config.write_text(text)

    # A file read after local.conf at boot that sets a managed key otherwise.
    later = masterless.root / "usr-lib-sysctl.d" / "zz-late.conf"
    later.write_text("# vendor defaults\nnet.ipv4.tcp_fin_timeout = 60\n")
    verify = masterless.run("shadowsocks_tuning.verify")
    assert verify.returncode != 0 and verify.data["problems"] == ["net.ipv4.tcp_fin_timeout"]
    entry = verify.data["keys"]["net.ipv4.tcp_fin_timeout"]
    assert entry["status"] == "overridden" and f"{later}:2 sets 60" in entry["reason"]

    # Rollback: the clean SLS puts back the live values and the file it found.
    sysctl_behind_salts_back(masterless.netns, "net.ipv4.tcp_keepalive_time", 7000)
    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))
    assert ret["result"] is True and ret["changes"]
    assert live_values(masterless.netns) == before
    assert not masterless.config.exists()  # it did not exist before
    assert later.read_text() == "# vendor defaults\nnet.ipv4.tcp_fin_timeout = 60\n"  # not ours: left alone
    assert not (masterless.root / "state" / "originals.json").exists()
    again = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))
    assert again["result"] is True and again["changes"] == {}


# --------------------------------------------------------------------------
# Row 6: permissions, temporary files, no shell
# --------------------------------------------------------------------------
def test_written_files_are_root_0644_originals_0600_nothing_world_writable(masterless):
    # A world-writable local.conf owned by nobody, and a run under umask 000.
    masterless.config.write_bytes(OLD_CONF)
    os.chown(masterless.config, 65534, 65534)
    masterless.config.chmod(0o666)
    nested = masterless.root / "sysctl.d" / "new" / "deeper" / "60-shadowsocks.conf"
    open_umask = with_fault(masterless, "umask 000")

    assert state_of(open_umask.run("--local", "state.apply", SLS))["result"] is True
    # A directory boot does not read: refused, unless pillar opts in.
    masterless.pillar({"config": str(nested)})
    refused = state_of(open_umask.run("--local", "state.apply", SLS))
    assert refused["result"] is False and "is not read at boot" in refused["comment"] and not nested.exists()
    masterless.pillar({"config": str(nested), "config_outside_boot": True})
    assert state_of(open_umask.run("--local", "state.apply", SLS))["result"] is True

    for path in (masterless.config, nested):
        info = path.stat()
        assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (0, 0, 0o644), path
    for directory in (nested.parent, nested.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
    for name in ("originals.json", "lock"):
        assert stat.S_IMODE((masterless.root / "state" / name).stat().st_mode) == 0o600
    for path in masterless.root.rglob("*"):
        if not path.is_symlink():
            assert not path.stat().st_mode & stat.S_IWOTH, path
    assert no_temporaries(masterless.root)


def test_a_symlinked_config_is_refused_and_its_target_not_copied(masterless, tmp_path):
    # /tmp-like directory: anyone may plant a link where root will write.
    drop = tmp_path / "drop"
    drop.mkdir()
    drop.chmod(0o1777)
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    link = drop / "t.conf"
    link.symlink_to(secret)
    before = live_values(masterless.netns)
    masterless.pillar({"config": str(link)})

    for args in (("state.apply", SLS), ("state.apply", SLS, "test=True")):
        ret = state_of(masterless.run(*args))
        assert ret["result"] is False and ret["changes"] == {}
        assert f"{link} is a symbolic link" in ret["comment"]
    assert link.is_symlink() and secret.read_text().startswith("root:") and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not (masterless.root / "state" / "originals.json").exists()
    assert live_values(masterless.netns) == before


# --------------------------------------------------------------------------
# Row 8: its own record of originals, and edits made after an apply
# --------------------------------------------------------------------------
def test_clean_keeps_a_line_added_to_the_file_it_created(masterless):
    before = live_values(masterless.netns)
    assert state_of(masterless.run("state.apply", SLS))["result"] is True
    with masterless.config.open("a") as handle:
        handle.write("vm.swappiness = 10\n")  # the admin's own line, after the apply
    predicted = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean", "test=True"))
    assert predicted["result"] is None, predicted
    assert f"{masterless.config}: kept 1 line(s) added since this package wrote it: 'vm.swappiness = 10'" in (
        predicted["comment"])
    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))
    assert ret["result"] is True, ret
    assert masterless.config.read_text() == "vm.swappiness = 10\n"
    assert live_values(masterless.netns) == before


@pytest.mark.parametrize("record, problem", [
    ("[]", "the document is list, not a mapping"),
    ("null", "the document is null, not a mapping"),
    ('{"files": {"/etc/../etc/shadow": null}}', "'/etc/../etc/shadow' is not an absolute, normalised path"),
    ('{"files": {"/etc/x.conf": "%%%"}}', "the saved content is not base64"),
    ('{"sysctls": ["net.core.somaxconn"]}', "'sysctls' is list, not a mapping"),
])
def test_a_broken_record_fails_apply_and_clean_with_one_message_and_changes_nothing(masterless, record, problem):
    (masterless.root / "state" / "originals.json").write_text(record)
    before = live_values(masterless.netns)
    for args in (("state.apply", SLS), ("state.apply", SLS, "test=True"),
                 ("state.apply", "shadowsocks.tuning.clean"), ("state.apply", "shadowsocks.tuning.clean", "test=True")):
        result = masterless.run(*args)
        ret = state_of(result)
        assert ret["result"] is False and ret["changes"] == {}, (args, ret)
        assert problem in ret["comment"] and "is not a valid record of originals" in ret["comment"], ret
        assert "Traceback" not in result.stdout + result.stderr
    assert live_values(masterless.netns) == before
    assert not masterless.config.exists()
    assert (masterless.root / "state" / "originals.json").read_text() == record


def test_clean_refuses_a_record_naming_a_file_it_does_not_manage(masterless, tmp_path):
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert state_of(masterless.run("state.apply", SLS))["result"] is True
    record_path = masterless.root / "state" / "originals.json"
    record = json.loads(record_path.read_text())
    record["files"][str(victim)] = None  # clean would delete it: it "did not exist before"
    record_path.write_text(json.dumps(record))
    tuned = live_values(masterless.netns)
    ret = state_of(masterless.run("state.apply", "shadowsocks.tuning.clean"))
    assert ret["result"] is False and f"lists {victim}, which the current settings do not manage" in ret["comment"]
    assert victim.read_text().startswith("root:") and masterless.config.exists()
    assert live_values(masterless.netns) == tuned  # nothing put back either: all or nothing


def test_nothing_runs_through_a_shell():
    for source in SOURCES:
        text = source.read_text()
        for pattern in SHELL_PATTERNS:
            assert pattern not in text, f"{source.name}: {pattern}"
        # Every subprocess call takes an argv list built in code, never a string.
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                if node.func.value.id == "subprocess":
                    argv = node.args[0] if node.args else next(kw.value for kw in node.keywords if kw.arg == "args")
                    assert not isinstance(argv, (ast.Constant, ast.JoinedStr)), ast.dump(node)
                    assert all(kw.arg != "shell" for kw in node.keywords)
    # The one kernel-side command: modprobe with a fixed argv and '--' before the name.
    assert re.search(r'\["--", module\]', (REPO / "_utils" / "sstuning_sysctl.py").read_text())
