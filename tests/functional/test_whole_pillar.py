"""`state.apply shadowsocks.tuning` as users run it, with the whole pillar:
one bad value anywhere stops every state before anything is written, pillar
text never breaks the SLS, and test=True says what the real run will do.

Everything is real: a real salt-call in a fresh network namespace (its
sysctls are written for real, the host's never), copies of Debian's
supervisor and shadowsocks-libev files in a temporary root, and small init
scripts in a temporary init.d (minion option shadowsocks_tuning.init_dir)
that start a real process and record every call they get. Each salt-call
also runs in a private mount namespace whose /etc/default, /etc/supervisor
and /etc/sysctl.d are copies, so even a pillar that falls back to the
default paths cannot reach the host's files.
"""

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import pytest

import sstuning_catalogue as catalogue  # the flat engine files (pytest.ini puts _utils on sys.path)
import sstuning_procfs as procfs
from support.common import FAKE_INIT, kill_started_from

SYSCTL = "shadowsocks-tuning-sysctl"
NOFILE = "shadowsocks-tuning-nofile"
VERIFY = "shadowsocks-tuning-nofile-verify"
EVERY_STATE = {SYSCTL, NOFILE, VERIFY}
SLS = "shadowsocks.tuning"
OLD_CONF = b"# owned by ops\nnet.core.somaxconn = 1024\n"


# Bind copies over the host directories a default pillar path would name.
GUARDED_DIRS = ("/etc/default", "/etc/supervisor", "/etc/sysctl.d")


def text_or(path, fallback):
    try:
        return pathlib.Path(path).read_text()
    except OSError:
        return fallback


def live_values(netns):
    """Every catalogue key inside the namespace, normalised; None where absent."""
    code = (
        "import json, sys\nout = {}\nfor key in sys.argv[1:]:\n"
        "    try:\n        out[key] = ' '.join(open('/proc/sys/' + key.replace('.', '/')).read().split())\n"
        "    except OSError:\n        out[key] = None\nprint(json.dumps(out))"
    )
    proc = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, *sorted(catalogue.CATALOGUE)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


class Box:
    """A temporary root with supervisor-like and shadowsocks-like files and
    init scripts, the masterless minion that manages them, and the private
    copies of the host directories that minion sees."""

    def __init__(self, root, make_masterless):
        self.root = root
        for sub in ("etc/default", "etc/supervisor", "init.d", "run", "bin", "guard"):
            (root / sub).mkdir(parents=True)
        self.calls = root / "calls.log"
        self.calls.write_text("")
        self.supervisor_defaults = root / "etc/default/supervisor"
        self.supervisord_conf = root / "etc/supervisor/supervisord.conf"
        self.sslibev_defaults = root / "etc/default/shadowsocks-libev"
        # Debian's file plus an old limit that the tuning would raise.
        self.supervisor_defaults.write_text(text_or("/etc/default/supervisor", 'DAEMON_OPTS=""\n') + "ulimit -n 1024\n")
        self.supervisord_conf.write_text(text_or("/etc/supervisor/supervisord.conf", "[supervisord]\nlogfile=/x\n"))
        self.sslibev_defaults.write_text(text_or("/etc/default/shadowsocks-libev", "MAXFD=32768\n"))
        for daemon in ("supervisord", "ssserver"):
            (root / "bin" / daemon).symlink_to("/bin/sleep")
        self.init("fake-supervisor", "supervisord", self.supervisor_defaults)
        self.fakess = self.init("fakess", "ssserver", root / "etc/default/none")

        script = ["set -e"]
        for directory in GUARDED_DIRS:
            copy = root / "guard" / directory.strip("/").replace("/", "-")
            if os.path.isdir(directory):
                shutil.copytree(directory, copy, symlinks=True)
            else:
                copy.mkdir()
            (copy / ".sst-guard").write_text("a copy, mounted over the host directory\n")
            script.append(f"[ -d {directory} ] && mount --bind {copy} {directory}")
        script.append('exec "$@"')
        wrap = ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh"]
        self.minion = make_masterless(wrap=wrap, **{"shadowsocks_tuning.init_dir": str(root / "init.d")})
        self.config = self.minion.config
        self.config.write_bytes(OLD_CONF)

    def init(self, name, daemon, defaults, directory=None):
        path = (directory or self.root / "init.d") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE_INIT.format(name=name, root=self.root, daemon=daemon, defaults=defaults, calls=self.calls))
        path.chmod(0o755)
        return path

    def pidfile(self, name):
        return self.root / "run" / f"{name}.pid"

    def pid(self, name):
        return procfs.pid_from(str(self.pidfile(name)))

    def start(self, name):
        """Start a fake service by hand (its defaults file says `ulimit -n 1024`),
        wait until the daemon runs, and forget the call."""
        subprocess.run([str(self.root / "init.d" / name), "start"], check=True, timeout=10,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096)))
        pid = self.pid(name)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (procfs.proc_argv(pid) or [""])[0].startswith(str(self.root / "bin")):
            time.sleep(0.02)
        self.calls.write_text("")
        return pid

    def limits(self, **extra):
        limits = {
            "supervisor": {
                "service": "fake-supervisor",
                "pidfile": str(self.pidfile("fake-supervisor")),
                "defaults_file": str(self.supervisor_defaults),
                "config": str(self.supervisord_conf),
            },
            "shadowsocks_libev": {
                "service": "fake-sslibev",  # not installed, not running: never started
                "pidfile": str(self.pidfile("fake-sslibev")),
                "defaults_file": str(self.sslibev_defaults),
            },
            "verify": {"pidfiles": [str(self.pidfile("fake-supervisor"))], "wait": 5},
            "timeout": 10,
        }
        limits.update(extra)
        return limits

    def pillar(self, **tuning):
        self.minion.pillar({"config": str(self.config), "nofile": 4096, "limits": self.limits(), **tuning})

    def raw_pillar(self, text):
        """Pillar file text as a user might write it, not built from a mapping."""
        (self.minion.root / "pillar" / "shadowsocks.sls").write_text(text)

    def files(self):
        """Every file the tuning could write, the guarded copies included: bytes and mode."""
        paths = [self.supervisor_defaults, self.supervisord_conf, self.sslibev_defaults, self.fakess, self.config]
        paths += sorted(p for p in (self.root / "guard").rglob("*") if p.is_file() and not p.is_symlink())
        return {str(p): (p.read_bytes(), p.stat().st_mode) for p in paths}

    def apply(self, *args, sls=SLS):
        result = self.minion.run("state.apply", sls, *args)
        assert isinstance(result.data, dict), f"no state output:\n{result.stdout}\n{result.stderr}"
        return {ret["__id__"]: ret for ret in result.data.values()}

    def stop_all(self):
        kill_started_from(self.root / "bin")


@pytest.fixture
def box(make_masterless, tmp_path):
    made = Box(tmp_path / "box", make_masterless)
    try:
        yield made
    finally:
        made.stop_all()


def assert_nothing_done(box, files, sysctls, pid):
    assert box.files() == files, "a file changed"
    assert live_values(box.minion.netns) == sysctls, "a sysctl changed"
    assert box.calls.read_text() == "", "an init script was called"
    assert box.pid("fake-supervisor") == pid and procfs.alive(pid), "supervisor was restarted"
    assert not (box.minion.root / "state" / "originals.json").exists(), "originals were recorded"


# --------------------------------------------------------------------------
# (a) one typo stops everything
# --------------------------------------------------------------------------
@pytest.mark.parametrize("test_mode", [False, True], ids=["apply", "test"])
def test_a_misspelt_profile_fails_every_state_and_changes_nothing(box, test_mode):
    pid = box.start("fake-supervisor")
    files, sysctls = box.files(), live_values(box.minion.netns)
    box.pillar(profile="bbrr")
    # The open-file part on its own would change the defaults file (1024 -> 4096).
    assert "ulimit -n 1024" in box.supervisor_defaults.read_text().splitlines()

    states = box.apply(*(["test=True"] if test_mode else []))

    assert set(states) == EVERY_STATE
    for sid, ret in states.items():
        assert ret["result"] is False, (sid, ret["comment"])
        assert not ret["changes"], sid
        assert "pillar shadowsocks:tuning:profile: unknown profile 'bbrr'" in ret["comment"], (sid, ret["comment"])
        assert "Nothing was changed" in ret["comment"], sid
    assert_nothing_done(box, files, sysctls, pid)


# --------------------------------------------------------------------------
# (b) a pillar of the wrong shape
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    ["shadowsocks:\n  tuning: bbr\n", "shadowsocks:\n  tuning: [bbr]\n", "shadowsocks: bbr\n"],
    ids=["tuning-string", "tuning-list", "shadowsocks-string"],
)
def test_a_pillar_that_is_not_a_mapping_fails_every_state_with_a_message(box, text):
    pid = box.start("fake-supervisor")
    files, sysctls = box.files(), live_values(box.minion.netns)
    box.raw_pillar(text)
    # The defaults name the host's /etc files: salt-call sees the copies.
    for directory in GUARDED_DIRS:
        assert box.minion.run("file.file_exists", f"{directory}/.sst-guard").data is True, directory

    result = box.minion.run("state.apply", SLS)

    assert result.returncode != 0
    output = result.stdout + result.stderr
    for symptom in ("Rendering SLS", "Traceback", "jinja", "Jinja"):
        assert symptom not in output, output
    states = {ret["__id__"]: ret for ret in result.data.values()}
    assert set(states) == EVERY_STATE
    for sid, ret in states.items():
        assert ret["result"] is False and not ret["changes"], sid
        assert "pillar shadowsocks:tuning must be a mapping" in ret["comment"], (sid, ret["comment"])
        assert "Nothing was changed" in ret["comment"], sid
    assert_nothing_done(box, files, sysctls, pid)


# --------------------------------------------------------------------------
# (c) a missing init script stops the kernel half too
# --------------------------------------------------------------------------
def test_a_missing_init_script_fails_every_state_and_no_sysctl_changes(box):
    pid = box.start("fake-supervisor")
    files, sysctls = box.files(), live_values(box.minion.netns)
    # Without the missing script the same pillar would change sysctls here.
    box.pillar()
    diff = box.minion.run("shadowsocks_tuning.diff").data
    assert diff["changes"] and not diff["errors"], diff
    missing = box.root / "init.d" / "shadowsocks-rust"
    box.pillar(limits=box.limits(init_scripts=[{"path": str(missing)}]))

    states = box.apply()

    assert set(states) == EVERY_STATE
    expected = f"pillar shadowsocks:tuning:limits:init_scripts[0]:path: {missing} does not exist"
    for sid in EVERY_STATE - {VERIFY}:
        ret = states[sid]
        assert ret["result"] is False and not ret["changes"], (sid, ret["comment"])
        assert ret["comment"].startswith(expected) and "Nothing was changed" in ret["comment"], (sid, ret["comment"])
    # The proof state reports what runs: supervisord, never restarted, still at its old limit.
    assert states[VERIFY]["result"] is False
    assert f"supervisord (pid {pid}): soft 1024, hard 1024" in states[VERIFY]["comment"]
    assert_nothing_done(box, files, sysctls, pid)


# --------------------------------------------------------------------------
# (d) pillar text never breaks the SLS
# --------------------------------------------------------------------------
def show_sls(box):
    result = box.minion.run("state.show_sls", SLS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(result.data) == EVERY_STATE, result.data
    return result.data


def test_a_service_name_with_a_newline_renders_and_fails_cleanly(box):
    pid = box.start("fake-supervisor")
    files, sysctls = box.files(), live_values(box.minion.netns)
    limits = box.limits()
    limits["supervisor"]["service"] = "fake-supervisor\nrm -rf /"
    box.pillar(limits=limits)

    show_sls(box)
    states = box.apply()

    assert set(states) == EVERY_STATE
    for sid, ret in states.items():
        assert ret["result"] is False and not ret["changes"], sid
        assert "pillar shadowsocks:tuning:limits:supervisor:service: 'fake-supervisor\\nrm -rf /' is not a service name" \
            in ret["comment"], (sid, ret["comment"])
    assert_nothing_done(box, files, sysctls, pid)


def test_paths_with_hash_and_scripts_with_one_name_in_two_dirs_are_all_managed(box):
    """`#` starts a comment in YAML and sysctl files, and an init script's file
    name was once part of a state ID: neither may matter any more."""
    hashed = box.root / "etc#ops" / "default" / "supervisor"
    hashed.parent.mkdir(parents=True)
    shutil.copy(box.supervisor_defaults, hashed)
    twins = [box.init("fakess", "ssserver", box.root / "etc/default/none", box.root / side / "init.d")
             for side in ("a", "b")]
    limits = box.limits(init_scripts=[
        # Not running (no pidfile yet): written, left stopped.
        {"path": str(path), "pidfile": str(box.root / "run" / f"twin-{i}.pid")} for i, path in enumerate(twins)
    ])
    limits["supervisor"]["defaults_file"] = str(hashed)
    box.pillar(limits=limits)
    before = hashed.read_text()

    show_sls(box)
    states = box.apply()

    assert all(ret["result"] is True for ret in states.values()), {k: v["comment"] for k, v in states.items()}
    assert hashed.read_text() == before.replace("ulimit -n 1024", "ulimit -n 4096")
    assert str(hashed) in states[NOFILE]["changes"]
    for path in twins:
        lines = path.read_text().split("\n")
        assert lines[lines.index("### END INIT INFO") + 2] == "ulimit -n 4096", path
        assert os.access(path, os.X_OK)
        assert str(path) in states[NOFILE]["changes"]
    assert not [key for key in states[NOFILE]["changes"] if key.startswith("service ")]  # nothing runs: no restart


# --------------------------------------------------------------------------
# (e) test=True tells the truth, and a second run is quiet
# --------------------------------------------------------------------------
def test_test_mode_predicts_the_real_run_and_a_second_run_changes_nothing(box):
    """With `restart: running` (the policy of earlier releases), a service
    whose file changed is stopped and started; supervisord already runs at
    the limit, so the default policy (live) would leave it running."""
    pid = box.start("fake-supervisor")
    files = box.files()
    box.pillar(limits=box.limits(restart="running",
                                 init_scripts=[{"path": str(box.fakess), "pidfile": str(box.pidfile("fakess"))}]))

    predicted = box.apply("test=True")
    assert box.files() == files and box.calls.read_text() == "", "test=True changed something"
    assert box.pid("fake-supervisor") == pid

    applied = box.apply()
    assert all(ret["result"] is True for ret in applied.values()), {k: v["comment"] for k, v in applied.items()}
    assert set(applied[NOFILE]["changes"]) == set(predicted[NOFILE]["changes"])
    for key, change in predicted[NOFILE]["changes"].items():
        if key.startswith("service "):
            assert change["new"] == "stopped and started", key
        else:  # a file: exactly the edit predicted
            assert applied[NOFILE]["changes"][key] == change, key
    # What the prediction named did happen: supervisor stopped and started
    # (the init script's own log says so), the limits written; fakess is not
    # running: no restart.
    assert set(predicted[NOFILE]["changes"]) == {
        str(box.supervisor_defaults), str(box.supervisord_conf), str(box.sslibev_defaults), str(box.fakess),
        "service fake-supervisor"}
    assert box.calls.read_text().split() == ["stop", "start"]
    new_pid = box.pid("fake-supervisor")
    assert new_pid != pid and procfs.proc_nofile(new_pid) == (4096, 4096)
    assert "every process runs with at least 4096 open files" in applied[VERIFY]["comment"]
    assert applied[SYSCTL]["changes"] and set(applied[SYSCTL]["changes"]) == set(predicted[SYSCTL]["changes"])

    box.calls.write_text("")
    after = box.files()
    again = box.apply()
    assert all(ret["result"] is True and not ret["changes"] for ret in again.values()), again
    assert box.files() == after and box.calls.read_text() == ""
    assert box.pid("fake-supervisor") == new_pid

    # And clean puts every file back byte for byte.
    assert box.minion.run("state.apply", "shadowsocks.tuning.clean").returncode == 0
    assert box.files() == files
