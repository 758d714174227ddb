"""Helpers shared by test modules. They live here, not in conftest.py:
tests/conftest.py and tests/integration/conftest.py are both module `conftest`,
so `from conftest import ...` would pick whichever pytest loaded last."""

import json
import os
import pathlib
import signal
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent.parent


def in_netns(name, *argv, **kwargs):
    """Run a command inside a network namespace made by the `netns` fixture."""
    return subprocess.run(["ip", "netns", "exec", name, *argv], capture_output=True, text=True, **kwargs)


def read_in_netns(name, key):
    return in_netns(name, "cat", "/proc/sys/" + key.replace(".", "/"), check=True).stdout.split()


def state_of(result):
    """The one state return of a state.apply / state.single run."""
    assert isinstance(result.data, dict), f"no JSON state output:\n{result.stdout}\n{result.stderr}"
    (ret,) = result.data.values()
    return ret


def live_values(netns, keys):
    """Live values inside the namespace, normalised like the engine does;
    None for a key the namespace does not have."""
    code = (
        "import json, sys\nout = {}\nfor key in sys.argv[1:]:\n"
        "    try:\n        out[key] = ' '.join(open('/proc/sys/' + key.replace('.', '/')).read().split())\n"
        "    except OSError:\n        out[key] = None\nprint(json.dumps(out))"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code, *keys], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout)


def no_temporaries(root):
    """True when no `.<name>.sst-XXXX` file of an interrupted write is left."""
    return not list(pathlib.Path(root).rglob(".*.sst-*"))


# An init script in the shape of Debian's /etc/init.d/supervisor: it sources a
# defaults file, then starts a daemon that writes a pidfile. Every call is
# appended to {calls} (/dev/null when a test does not look).
FAKE_INIT = """#!/bin/sh
### BEGIN INIT INFO
# Provides:          {name}
### END INIT INFO
echo "$1" >> {calls}
PIDFILE={root}/run/{name}.pid
[ -f {defaults} ] && . {defaults}
running() {{ [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }}
case "$1" in
  start)
    running && exit 0
    {root}/bin/{daemon} 300 </dev/null >/dev/null 2>&1 &
    echo $! > "$PIDFILE"
    ;;
  stop)
    running && kill "$(cat "$PIDFILE")"
    rm -f "$PIDFILE"
    ;;
  status)
    running || exit 3
    ;;
  *) exit 3 ;;
esac
exit 0
"""


def kill_started_from(directory):
    """SIGKILL every process whose program lies in ``directory`` (the fake
    daemons a test started there, found by their unique path)."""
    prefix = str(directory).rstrip("/") + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                program = handle.read().split(b"\0", 1)[0].decode("utf-8", "replace")
            if program.startswith(prefix):
                os.kill(int(entry), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
