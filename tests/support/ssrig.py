"""Real-parts harness: a shadowsocks data path on loopback.

Pieces (all on 127.0.0.1, all stopped and cleaned up by their context managers):

* ``EchoServer``        - selectors echo server in a child process (thousands of
                          connections; raises its own soft RLIMIT_NOFILE to hard).
* ``CountedProcess``    - runs a daemon behind a small wrapper that reads the
                          daemon's stdout+stderr through a pipe and only *counts*
                          lines (and ``too many open files`` lines) into a small
                          JSON status file.  ss-server at a low fd limit retries
                          accept() in a tight loop and would otherwise write
                          gigabytes of log.
* ``SsServerProgram``   - ss-server wrapped as above, as a supervisord program.
* ``PrivateSupervisor`` - a private supervisord (temp config, socket, pidfile,
                          logs) started under a chosen ``ulimit -n`` and ``minfds``.
* ``SystemSupervisor``  - Debian's real ``/etc/init.d/supervisor`` with a temporary
                          program file in ``/etc/supervisor/conf.d``; restores every
                          file it touches byte for byte and leaves supervisord
                          running/stopped as it found it.
* ``SsLocal``           - ss-local (SOCKS5) pointing at the ss-server.
* ``socks5_ramp()``     - K concurrent SOCKS5 CONNECTs through ss-local to the
                          echo server, all held open at once, each checked by echo.
* ``loopback_rig()``    - everything above in one ``with`` block.

Run as a script, this module also provides the two helper processes it starts:
``python ssrig.py echo-server ...`` and ``python ssrig.py count-wrap ...``.

Observed here (Debian 12, supervisor 4.2.5-1, shadowsocks-libev 3.3.5, hard
RLIMIT_NOFILE 20000, no CAP_SYS_RESOURCE, PID 1 is not systemd):

* /etc/init.d/supervisor sources /etc/default/supervisor with ``.`` *before* its
  ``set -e``, in dash.  ``ulimit -n N`` there sets soft *and* hard to N for
  supervisord and every program (ss-server inherits it).  A value above the hard
  limit (``ulimit -n 51200``) prints ``/etc/init.d/supervisor: 12: ulimit: error
  setting limit (Operation not permitted)`` on stderr, the script goes on and exits
  0, and the daemon keeps the inherited 20000/20000.  The line is also run (and
  errors) on ``stop``.
* ``init stop`` only sends SIGTERM and returns at once; supervisord is still alive
  (stopping its programs).  An immediate ``init start`` then sees it running,
  exits 1 printing just "Starting supervisor: ", and a moment later supervisord is
  gone: back-to-back stop/start leaves supervisor DOWN.  ``SystemSupervisor.stop``
  waits until the pid is gone.
* ``init restart`` stops (with --retry, waiting) and never starts; exits 0.  If the
  old daemon lingers as a zombie, start-stop-daemon counts it as alive: restart
  then takes 35 s (TERM/30/KILL/5) and exits 2.  PID 1 here reaps orphans only
  every second or so, so a stopped daemonized supervisord shows as
  ``[supervisord] <defunct>`` for ~1-2 s.
* supervisord ``minfds`` raises its *soft* limit to minfds when the hard limit
  allows (logs "Increased RLIMIT_NOFILE limit to N"; ss-server inherits it); above
  the hard limit supervisord refuses to start (exit 2) with a message that
  misleadingly says the environment "will only allow you to open <minfds>".
* ``ss-server -n N`` sets its own soft and hard to N when N <= hard; otherwise it
  logs "insufficient permission to change NOFILE" and keeps the inherited limit.
"""

import contextlib
import ctypes
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

try:
    import resource
except ImportError:  # pragma: no cover - Linux only harness
    resource = None

HOST = "127.0.0.1"
DEFAULT_METHOD = "chacha20-ietf-poly1305"
DEFAULT_PASSWORD = "ssrig-loopback-password"
FD_ERROR_TEXT = b"too many open files"  # matched case-insensitively

# binary -> Debian package that ships it
BINARY_PACKAGES = {
    "ss-server": "shadowsocks-libev",
    "ss-local": "shadowsocks-libev",
    "supervisord": "supervisor",
    "supervisorctl": "supervisor",
}

THIS_FILE = os.path.abspath(__file__)
_SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/local/bin",
     "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


# --------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------

class RigError(RuntimeError):
    """A part of the rig could not be started or used."""


class MissingBinaryError(RigError):
    """A needed program is not installed (message names the Debian package)."""


class PortInUseError(RigError):
    """The requested loopback port is already taken."""


class DaemonExitedError(RigError):
    """A daemon exited (or never became ready); message has its last output lines."""


# --------------------------------------------------------------------------
# small helpers: binaries, ports, limits, /proc
# --------------------------------------------------------------------------

def require_binary(name, package=None):
    """Return the absolute path of ``name`` or raise MissingBinaryError naming the package."""
    path = shutil.which(name, path=_SEARCH_PATH)
    if path is None:
        package = package or BINARY_PACKAGES.get(name, "?")
        raise MissingBinaryError(
            f"{name!r} not found; install the Debian package {package!r} "
            f"(apt-get update && apt-get install -y {package})")
    return path


def free_port(host=HOST):
    """Return a TCP port on ``host`` that is free right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port, host=HOST):
    """True when ``host:port`` can be bound (nothing listens or lingers there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def check_port_free(port, host=HOST, what="daemon"):
    """Raise PortInUseError when ``host:port`` is taken."""
    if not port_is_free(port, host):
        raise PortInUseError(f"cannot start {what}: {host}:{port} is already in use")


def is_listening(port):
    """True when some socket in this network namespace LISTENs on TCP ``port`` (/proc/net/tcp)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(want) and fields[3] == "0A":
                        return True
        except FileNotFoundError:
            continue
    return False


def raise_nofile_soft_limit():
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def read_nofile_limits(pid):
    """Return (soft, hard) 'Max open files' of ``pid`` from /proc/<pid>/limits (None = unlimited)."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line[len("Max open files"):].split()[:2]
                conv = (lambda v: None if v == "unlimited" else int(v))
                return conv(soft), conv(hard)
    raise RigError(f"no 'Max open files' line in /proc/{pid}/limits")


def read_rss_kb(pid):
    """Return VmRSS of ``pid`` in kB from /proc/<pid>/status (None if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def count_open_fds(pid):
    """Number of open file descriptors of ``pid`` (None if gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_state(pid):
    """One-letter state of ``pid`` from /proc ('R', 'S', 'Z', ...) or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid):
    """True when ``pid`` exists and is not a zombie."""
    return pid is not None and process_state(pid) not in (None, "Z")


def process_comm(pid):
    """/proc/<pid>/comm or None."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def find_pids(comm):
    """PIDs of live processes whose /proc/<pid>/comm equals ``comm`` (e.g. 'ss-server')."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and process_comm(int(entry)) == comm and pid_alive(int(entry)):
            pids.append(int(entry))
    return sorted(pids)


def tail_text(path, lines=20, max_bytes=64 * 1024):
    """Last ``lines`` lines of a text file ('' when missing); reads at most ``max_bytes``."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _die_with_parent():
    """preexec_fn: SIGTERM this child if the harness process dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:  # best effort only
        pass


def _stop_popen(proc, timeout=5.0):
    """SIGTERM ``proc`` (a Popen), wait up to ``timeout`` s, then SIGKILL; always reaps."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _wait_until(predicate, timeout, interval=0.05):
    """Poll ``predicate`` until true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --------------------------------------------------------------------------
# echo server
# --------------------------------------------------------------------------

def _run_echo_server(host, port):
    """Child-process body: selectors echo server; prints 'READY <port>'; exits on stdin EOF."""
    raise_nofile_soft_limit()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {lsock.getsockname()[1]}", flush=True)
    pending = {}  # sock -> bytes not yet echoed back
    emfile = 0
    while True:
        for key, mask in sel.select(timeout=1.0):
            if key.data == "stdin":
                if not os.read(key.fd, 4096):
                    return
            elif key.data == "listen":
                for _ in range(256):
                    try:
                        conn, _ = lsock.accept()
                    except BlockingIOError:
                        break
                    except OSError as exc:
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            emfile += 1
                            if emfile <= 3:
                                print(f"echo-server accept: {exc}", file=sys.stderr, flush=True)
                            time.sleep(0.01)  # never spin on EMFILE
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                conn = key.fileobj
                if mask & selectors.EVENT_READ:
                    try:
                        data = conn.recv(65536)
                    except ConnectionError:
                        data = b""
                    if not data:
                        sel.unregister(conn)
                        pending.pop(conn, None)
                        conn.close()
                        continue
                    pending[conn] = pending.get(conn, b"") + data
                if pending.get(conn):
                    try:
                        sent = conn.send(pending[conn])
                    except (BlockingIOError, InterruptedError):
                        sent = 0
                    except ConnectionError:
                        sel.unregister(conn)
                        pending.pop(conn, None)
                        conn.close()
                        continue
                    pending[conn] = pending[conn][sent:]
                    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending[conn] else 0)
                    sel.modify(conn, events, "conn")


class EchoServer:
    """Echo server on 127.0.0.1 in a child process.  ``with EchoServer() as echo: echo.port``.

    Holds several thousand concurrent connections (selectors; the child raises its
    own soft RLIMIT_NOFILE to the hard limit).  ``port=0`` picks a free port.
    """

    def __init__(self, port=0, host=HOST, startup_timeout=10.0):
        self.host, self.port, self.startup_timeout = host, port, startup_timeout
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self):
        if self.port:
            check_port_free(self.port, self.host, "echo server")
        self.proc = subprocess.Popen(
            [sys.executable, THIS_FILE, "echo-server", "--host", self.host, "--port", str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent, start_new_session=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(self.startup_timeout)
        sel.close()
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line.startswith("READY "):
            _stop_popen(self.proc)
            err = self.proc.stderr.read().decode(errors="replace")[-2000:]
            self.proc = None
            raise DaemonExitedError(f"echo server did not start: {line!r}\n{err}")
        self.port = int(line.split()[1])
        return self

    def stop(self):
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()  # the child exits on stdin EOF
            self.proc.wait(timeout=3)
        except (subprocess.TimeoutExpired, BrokenPipeError):
            pass
        _stop_popen(self.proc)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# counting wrapper (keeps floods of log lines out of files)
# --------------------------------------------------------------------------

def _run_count_wrapper(status_path, max_seconds, argv, keep_lines=20):
    """Wrapper-process body: run ``argv`` with stdout+stderr into a pipe and count lines.

    Writes ``status_path`` (JSON, atomically, every 0.25 s at most) with: child_pid,
    lines, fd_errors (lines containing 'too many open files', any case), first_lines,
    last_lines, exited, returncode, watchdog.  Only the first ``keep_lines`` lines and a
    final summary reach the wrapper's own stdout.  SIGTERM/SIGINT/SIGHUP are forwarded
    to the child; after ``max_seconds`` (0 = never) the child is terminated (watchdog).
    The wrapper always reaps the child, so nothing is left orphaned.
    """
    rfd, wfd = os.pipe()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=wfd, stderr=wfd)
    os.close(wfd)

    def forward(signum, _frame):
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)

    status = {"child_pid": child.pid, "argv": argv, "lines": 0, "fd_errors": 0,
              "first_lines": [], "last_lines": [], "exited": False, "returncode": None,
              "watchdog": False}

    def write_status():
        tmp = status_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f)
        os.replace(tmp, status_path)

    write_status()
    deadline = time.monotonic() + max_seconds if max_seconds else None
    partial = b""
    last_write = 0.0
    dirty = False
    while True:
        ready = selectors.DefaultSelector()
        ready.register(rfd, selectors.EVENT_READ)
        events = ready.select(0.25)
        ready.close()
        if events:
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                break
            data = partial + chunk
            complete, sep, partial = data.rpartition(b"\n")
            if len(partial) > 4096:  # a runaway line without newline: count it as one
                complete, partial, sep = data, b"", b"\n"
            if sep:
                n = complete.count(b"\n") + 1
                status["lines"] += n
                status["fd_errors"] += complete.lower().count(FD_ERROR_TEXT)
                if len(status["first_lines"]) < keep_lines:
                    head = complete[:keep_lines * 512].decode("utf-8", "replace").splitlines()
                    for line in head[:keep_lines - len(status["first_lines"])]:
                        status["first_lines"].append(line[:300])
                        print(line[:300], flush=True)
                tail = complete[-keep_lines * 512:].decode("utf-8", "replace").splitlines()
                status["last_lines"] = (status["last_lines"] + [x[:300] for x in tail])[-keep_lines:]
                dirty = True
        now = time.monotonic()
        if deadline and now > deadline and not status["watchdog"]:
            status["watchdog"] = True
            dirty = True
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        if dirty and now - last_write >= 0.25:
            write_status()
            last_write, dirty = now, False
    os.close(rfd)
    try:
        rc = child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        child.kill()
        rc = child.wait()
    if partial:
        status["lines"] += 1
        status["fd_errors"] += partial.lower().count(FD_ERROR_TEXT)
    status["exited"], status["returncode"] = True, rc
    write_status()
    print(f"ssrig count-wrap: child {child.pid} exited rc={rc}; lines={status['lines']} "
          f"too_many_open_files={status['fd_errors']} watchdog={status['watchdog']}", flush=True)
    return 0 if rc == 0 else (128 - rc if rc < 0 else rc)


def count_wrap_argv(status_path, argv, max_seconds=600):
    """argv that runs ``argv`` behind the counting wrapper (see _run_count_wrapper)."""
    return [sys.executable, THIS_FILE, "count-wrap", "--status", status_path,
            "--max-seconds", str(max_seconds), "--", *argv]


def read_output_status(status_path):
    """Parsed wrapper status JSON, or {} when not written yet."""
    try:
        with open(status_path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _describe_output(status):
    if not status:
        return "(the wrapped program never started)"
    lines = status.get("last_lines") or status.get("first_lines") or []
    return (f"exited={status.get('exited')} returncode={status.get('returncode')} "
            f"lines={status.get('lines')} too_many_open_files={status.get('fd_errors')}\n"
            "last output lines:\n  " + "\n  ".join(lines or ["(none)"]))


class CountedProcess:
    """A daemon started directly (no supervisor) behind the counting wrapper.

    ``nofile``: None keeps the inherited limits; an int N sets soft=hard=N (what a
    shell's ``ulimit -n N`` does); a tuple (soft, hard) sets both explicitly.
    ``pid`` is the wrapper, ``child_pid()`` the real daemon.
    """

    def __init__(self, argv, workdir, name, nofile=None, max_seconds=600):
        self.argv, self.workdir, self.name = list(argv), workdir, name
        self.nofile, self.max_seconds = nofile, max_seconds
        self.status_path = os.path.join(workdir, f"{name}.status.json")
        self.log_path = os.path.join(workdir, f"{name}.wrapper.log")
        self.proc = None

    def _preexec(self):
        _die_with_parent()
        if self.nofile is not None:
            soft, hard = (self.nofile, self.nofile) if isinstance(self.nofile, int) else self.nofile
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    def start(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                count_wrap_argv(self.status_path, self.argv, self.max_seconds),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=self._preexec, start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def status(self):
        return read_output_status(self.status_path)

    def child_pid(self):
        pid = self.status().get("child_pid")
        return pid if pid_alive(pid) else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def describe(self):
        return (_describe_output(self.status()) + "\nwrapper log:\n  "
                + tail_text(self.log_path, 10).replace("\n", "\n  "))

    def stop(self):
        _stop_popen(self.proc)
        self.proc = None


# --------------------------------------------------------------------------
# ss-server as a supervisord program
# --------------------------------------------------------------------------

class SsServerProgram:
    """ss-server (behind the counting wrapper) described as a supervisord program.

    ``supervisor_section()`` gives the ``[program:NAME]`` text; the wrapper's
    status JSON and log live in ``workdir``.  ``pid()`` is the real ss-server.
    """

    def __init__(self, workdir, port=None, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 name="ssrig-ss-server", max_seconds=600, extra_args=()):
        self.ss_server = require_binary("ss-server")
        self.workdir = workdir
        self.port = port or free_port()
        self.password, self.method, self.name = password, method, name
        self.max_seconds, self.extra_args = max_seconds, list(extra_args)
        self.status_path = os.path.join(workdir, f"{name}.status.json")
        self.log_path = os.path.join(workdir, f"{name}.log")

    def argv(self):
        """The ss-server command line (without wrapper)."""
        return [self.ss_server, "-s", HOST, "-p", str(self.port), "-k", self.password,
                "-m", self.method, *self.extra_args]

    def supervisor_section(self):
        """``[program:NAME]`` text; output goes only through the counting wrapper."""
        command = " ".join(_shell_word(a) for a in count_wrap_argv(
            self.status_path, self.argv(), self.max_seconds))
        return "\n".join([
            f"[program:{self.name}]",
            "command=" + command.replace("%", "%%"),
            "autostart=true",
            "autorestart=false",
            "startsecs=1",
            "startretries=0",
            "stopasgroup=true",
            "killasgroup=true",
            "stopwaitsecs=5",
            "redirect_stderr=true",
            f"stdout_logfile={self.log_path}",
            "stdout_logfile_maxbytes=1MB",
            "stdout_logfile_backups=0",
            "",
        ])

    def reset(self):
        """Forget the previous run's status (call before (re)starting the program)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.status_path)

    def status(self):
        """Wrapper status dict (lines, fd_errors, first/last lines, exited, ...)."""
        return read_output_status(self.status_path)

    def pid(self):
        """PID of the running ss-server (None when not running)."""
        pid = self.status().get("child_pid")
        return pid if pid_alive(pid) and process_comm(pid) == "ss-server" else None

    def nofile_limits(self):
        """(soft, hard) 'Max open files' of the running ss-server."""
        pid = self.pid()
        if pid is None:
            raise RigError("ss-server is not running\n" + _describe_output(self.status()))
        return read_nofile_limits(pid)

    def fd_error_count(self):
        """'too many open files' lines ss-server has written so far (0.25 s lag)."""
        return self.status().get("fd_errors", 0)

    def wait_ready(self, timeout, owner_alive=lambda: True, owner_info=lambda: ""):
        """Wait until ss-server listens on its port; raise DaemonExitedError otherwise."""
        deadline = time.monotonic() + timeout
        reason = f"did not listen within {timeout} s"
        while time.monotonic() < deadline:
            if self.status().get("exited"):
                reason = "exited early"
                break
            if self.pid() and is_listening(self.port):
                return self.pid()
            if not owner_alive():
                reason = "not started: its supervisord exited early"
                break
            time.sleep(0.05)
        raise DaemonExitedError(
            f"ss-server on {HOST}:{self.port} {reason}\n"
            + _describe_output(self.status()) + "\n"
            + "program log:\n  " + tail_text(self.log_path, 10).replace("\n", "\n  ")
            + owner_info())


def _shell_word(word):
    """Quote for supervisord's shlex-style command parsing."""
    if word and all(c.isalnum() or c in "@%+=:,./-_" for c in word):
        return word
    return "'" + word.replace("'", "'\"'\"'") + "'"


def _ulimit_shell(nofile):
    """sh fragment for ``nofile`` (int -> 'ulimit -n N', tuple -> -Hn/-Sn, None -> '')."""
    if nofile is None:
        return ""
    if isinstance(nofile, int):
        return f"ulimit -n {nofile}; "
    soft, hard = nofile
    return f"ulimit -Hn {hard}; ulimit -Sn {soft}; "


class PrivateSupervisor:
    """A private supervisord running ss-server, all state in a temp dir.

    ``nofile``  - applied by ``sh -c 'ulimit -n N; exec supervisord -n -c CONF'``
                  exactly like a line in /etc/default/supervisor: an int sets soft
                  *and* hard (dash semantics), a (soft, hard) tuple sets them apart,
                  None inherits the harness's limits.  A failing ulimit (e.g. above
                  the hard limit) prints an error and supervisord starts anyway.
    ``minfds``  - supervisord's ``minfds`` (None = its default, 1024).  supervisord
                  raises its *soft* limit to minfds when the hard limit allows, and
                  refuses to start otherwise (DaemonExitedError with its message).
    Attributes: ``ss`` (SsServerProgram), ``port``, ``pid`` (supervisord), ``tempdir``.
    """

    def __init__(self, nofile=None, minfds=None, port=None, password=DEFAULT_PASSWORD,
                 method=DEFAULT_METHOD, startup_timeout=10.0, max_seconds=600,
                 extra_ss_args=()):
        self.nofile, self.minfds, self.startup_timeout = nofile, minfds, startup_timeout
        self.supervisord = require_binary("supervisord")
        self.supervisorctl = require_binary("supervisorctl")
        require_binary("ss-server")
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-sup-")
        self.tempdir = self._tmp.name
        self.ss = SsServerProgram(self.tempdir, port=port, password=password, method=method,
                                  max_seconds=max_seconds, extra_args=extra_ss_args)
        self.conf_path = os.path.join(self.tempdir, "supervisord.conf")
        self.sock_path = os.path.join(self.tempdir, "supervisor.sock")
        self.log_path = os.path.join(self.tempdir, "supervisord.log")
        self.stderr_path = os.path.join(self.tempdir, "supervisord.stderr")
        self.proc = None

    @property
    def port(self):
        return self.ss.port

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def config_text(self):
        minfds = f"minfds={self.minfds}\n" if self.minfds is not None else ""
        user = "user=root\n" if os.geteuid() == 0 else ""  # silences a CRIT line
        return (
            f"[unix_http_server]\nfile={self.sock_path}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={self.log_path}\nlogfile_maxbytes=1MB\nlogfile_backups=0\n"
            f"pidfile={os.path.join(self.tempdir, 'supervisord.pid')}\n"
            f"childlogdir={self.tempdir}\nnodaemon=true\nsilent=true\n{user}{minfds}\n"
            "[rpcinterface:supervisor]\n"
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{self.sock_path}\n\n"
            + self.ss.supervisor_section())

    def start(self):
        """Write the config, start supervisord under ``nofile``, wait for ss-server to listen."""
        try:
            check_port_free(self.port, what="ss-server")
            with open(self.conf_path, "w") as f:
                f.write(self.config_text())
            self.ss.reset()
            script = f"{_ulimit_shell(self.nofile)}exec {self.supervisord} -n -c {self.conf_path}"
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(
                    ["/bin/sh", "-c", script], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, preexec_fn=_die_with_parent, start_new_session=True)
            self.ss.wait_ready(self.startup_timeout, owner_alive=lambda: self.proc.poll() is None,
                               owner_info=self._describe)
        except BaseException:
            self.stop()
            raise
        return self

    def _describe(self):
        rc = self.proc.poll() if self.proc else None
        return (f"\nsupervisord (rc={rc}) stderr:\n  "
                + tail_text(self.stderr_path, 10).replace("\n", "\n  ")
                + "\nsupervisord log:\n  " + tail_text(self.log_path, 10).replace("\n", "\n  "))

    def ctl(self, *args, timeout=15):
        """Run supervisorctl against this supervisord; returns CompletedProcess (text)."""
        return subprocess.run([self.supervisorctl, "-c", self.conf_path, *args],
                              capture_output=True, text=True, timeout=timeout)

    def supervisord_nofile_limits(self):
        """(soft, hard) 'Max open files' of supervisord itself."""
        return read_nofile_limits(self.pid)

    def stop(self):
        """Stop supervisord (it stops ss-server) and remove the temp dir."""
        if self.proc is not None:
            _stop_popen(self.proc, timeout=15)
            self.proc = None
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# the system supervisord through Debian's init script
# --------------------------------------------------------------------------

class FileGuard:
    """Snapshot files (content, mode, owner, times, or absence); ``restore()`` puts them back
    byte for byte (rewriting in place, so the inode stays) or deletes files that did not
    exist, then resets the times of directories given to ``guard_dir_times()``."""

    def __init__(self):
        self._saved = {}
        self._dir_times = {}

    def guard_dir_times(self, path):
        """Remember a directory's atime/mtime (changed when files appear/vanish in it)."""
        st = os.stat(path)
        self._dir_times.setdefault(os.path.abspath(path), (st.st_atime_ns, st.st_mtime_ns))

    def guard(self, path, max_bytes=16 << 20):
        """Snapshot ``path`` (no-op if already guarded).  Files above ``max_bytes`` are
        treated as append-only logs: only their length is kept and restore truncates."""
        path = os.path.abspath(path)
        if path in self._saved:
            return
        try:
            st = os.stat(path)
            if st.st_size > max_bytes:
                self._saved[path] = (st.st_size, st)
            else:
                with open(path, "rb") as f:
                    self._saved[path] = (f.read(), st)
        except FileNotFoundError:
            self._saved[path] = None

    def is_guarded(self, path):
        return os.path.abspath(path) in self._saved

    def restore(self):
        for path, saved in self._saved.items():
            if saved is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                continue
            data, st = saved
            if isinstance(data, int):  # big append-only log: cut what was appended
                os.truncate(path, data)
            else:
                with open(path, "wb") as f:
                    f.write(data)
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        for path, times in self._dir_times.items():
            with contextlib.suppress(FileNotFoundError):
                os.utime(path, ns=times)

    def changed(self):
        """Guarded paths whose current state differs from the snapshot."""
        out = []
        for path, saved in self._saved.items():
            try:
                with open(path, "rb") as f:
                    now = f.read()
            except FileNotFoundError:
                now = None
            if saved and isinstance(saved[0], int):
                if now is None or len(now) != saved[0]:
                    out.append(path)
            elif now != (saved[0] if saved else None):
                out.append(path)
        return out


class SystemSupervisor:
    """Debian's real supervisord via ``/etc/init.d/supervisor``, running ss-server.

    On enter: remembers whether supervisord runs; snapshots /etc/default/supervisor,
    the temporary program file ``/etc/supervisor/conf.d/<program>.conf`` (absent) and
    every file in /var/log/supervisor; writes the program file; appends
    ``defaults_lines`` (e.g. ``["ulimit -n 16384"]``) to /etc/default/supervisor; then,
    if ``start``, stops supervisord (waiting until it is really gone) and starts it.
    On exit: stops it, restores every snapshotted file byte for byte (and any extra
    path passed to ``guard()``), then starts it again only if it was running before.

    Init-script behaviour observed on Debian 12: see the module docstring.
    """

    INIT_SCRIPT = "/etc/init.d/supervisor"
    DEFAULTS = "/etc/default/supervisor"
    CONF_D = "/etc/supervisor/conf.d"
    PIDFILE = "/var/run/supervisord.pid"
    LOG_DIR = "/var/log/supervisor"

    def __init__(self, port=None, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 defaults_lines=(), start=True, startup_timeout=15.0, max_seconds=600,
                 extra_ss_args=()):
        if not os.access(self.INIT_SCRIPT, os.X_OK):
            raise MissingBinaryError(f"{self.INIT_SCRIPT} missing; install the Debian package 'supervisor'")
        require_binary("supervisord")
        require_binary("ss-server")
        self.defaults_lines, self.auto_start = list(defaults_lines), start
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-syssup-")
        self.tempdir = self._tmp.name
        name = f"ssrig-{os.getpid()}-{os.path.basename(self.tempdir)[-8:]}"
        name = "".join(c if c.isalnum() or c == "-" else "-" for c in name)
        self.ss = SsServerProgram(self.tempdir, port=port, password=password, method=method,
                                  name=name, max_seconds=max_seconds, extra_args=extra_ss_args)
        self.program_path = os.path.join(self.CONF_D, f"{name}.conf")
        self.files = FileGuard()
        self.was_running = None
        self.init_log = []  # (action, returncode, stdout, stderr) of every init-script call

    @property
    def port(self):
        return self.ss.port

    # -- init script -------------------------------------------------------
    def init_script(self, action, timeout=60):
        """Run ``/etc/init.d/supervisor ACTION`` with a clean env like ``service`` does."""
        env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": os.environ.get("LANG", "C")}
        result = subprocess.run([self.INIT_SCRIPT, action], capture_output=True, text=True,
                                env=env, timeout=timeout)
        self.init_log.append((action, result.returncode, result.stdout, result.stderr))
        return result

    def supervisord_pid(self):
        """PID from /var/run/supervisord.pid when that process is a live supervisord."""
        try:
            with open(self.PIDFILE) as f:
                pid = int(f.read().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except FileNotFoundError:
            return None
        return pid if b"supervisord" in cmdline and pid_alive(pid) else None

    def is_running(self):
        return self.supervisord_pid() is not None

    def supervisord_nofile_limits(self):
        pid = self.supervisord_pid()
        if pid is None:
            raise RigError("system supervisord is not running")
        return read_nofile_limits(pid)

    def stop(self, timeout=30.0):
        """``init stop`` and wait until the daemon is really gone (init stop does not wait)."""
        pid = self.supervisord_pid()
        result = self.init_script("stop")
        if pid and not _wait_until(lambda: not pid_alive(pid), timeout):
            raise RigError(f"supervisord {pid} still alive {timeout} s after 'stop'")
        return result

    def start(self, wait_program=True):
        """``init start``; then (optionally) wait until our ss-server listens."""
        self.ss.reset()
        result = self.init_script("start")
        if not _wait_until(self.is_running, 5):
            raise DaemonExitedError(
                f"{self.INIT_SCRIPT} start failed (rc={result.returncode}): "
                f"{result.stdout.strip()} {result.stderr.strip()}\nsupervisord log:\n  "
                + tail_text(os.path.join(self.LOG_DIR, "supervisord.log"), 10).replace("\n", "\n  "))
        if wait_program:
            self.ss.wait_ready(self.startup_timeout, owner_alive=self.is_running,
                               owner_info=lambda: "\ninit start: " + result.stdout + result.stderr)
        return result

    def restart(self):
        """stop (waiting until gone) then start: what Debian's 'restart' should have been."""
        self.stop()
        return self.start()

    def guard(self, path):
        """Snapshot another file now; it is restored byte for byte on exit."""
        self.files.guard(path)

    def _log_files(self):
        if not os.path.isdir(self.LOG_DIR):
            return []
        paths = (os.path.join(self.LOG_DIR, e) for e in os.listdir(self.LOG_DIR))
        return [p for p in paths if os.path.isfile(p)]

    # -- context -----------------------------------------------------------
    def __enter__(self):
        self.was_running = self.is_running()
        try:
            if os.path.exists(self.program_path):
                raise RigError(f"{self.program_path} already exists")
            check_port_free(self.port, what="ss-server")
        except BaseException:
            self._tmp.cleanup()
            raise
        for path in (self.DEFAULTS, self.program_path):
            self.files.guard(path)
        for path in self._log_files():
            self.files.guard(path)
        for path in (self.CONF_D, self.LOG_DIR):
            if os.path.isdir(path):
                self.files.guard_dir_times(path)
        try:
            with open(self.program_path, "w") as f:
                f.write(self.ss.supervisor_section())
            if self.defaults_lines:
                with open(self.DEFAULTS, "a") as f:
                    f.write("\n".join(self.defaults_lines) + "\n")
            if self.auto_start:
                if self.was_running:
                    self.stop()
                self.start()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc):
        try:
            pid = self.supervisord_pid()
            if pid:
                self.stop()
                # PID 1 here reaps orphans only every second or so: wait (bounded)
                # until the zombie is gone so 'ps' shows nothing left behind.
                _wait_until(lambda: process_state(pid) is None, 5)
            for path in self._log_files():  # created by supervisord while we ran
                if not self.files.is_guarded(path):
                    os.unlink(path)
            self.files.restore()
            if self.was_running:
                self.start(wait_program=False)
        finally:
            self._tmp.cleanup()


# --------------------------------------------------------------------------
# ss-local
# --------------------------------------------------------------------------

class SsLocal:
    """ss-local (SOCKS5 on 127.0.0.1) pointing at an ss-server on ``server_port``.

    Output goes through the counting wrapper.  ``nofile`` as in CountedProcess;
    the default raises soft to hard so ss-local (2 fds per connection) is never
    the bottleneck.  Attributes: ``port`` (SOCKS5), ``pid()`` (real ss-local).
    """

    def __init__(self, server_port, password=DEFAULT_PASSWORD, method=DEFAULT_METHOD,
                 port=None, nofile="hard", startup_timeout=5.0, max_seconds=600):
        self.binary = require_binary("ss-local")
        self.server_port, self.password, self.method = server_port, password, method
        self.port = port or free_port()
        if nofile == "hard":
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            nofile = None if hard == resource.RLIM_INFINITY else (hard, hard)
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ssrig-local-")
        self.proc = CountedProcess(
            [self.binary, "-s", HOST, "-p", str(server_port), "-b", HOST, "-l", str(self.port),
             "-k", password, "-m", method],
            self._tmp.name, "ss-local", nofile=nofile, max_seconds=max_seconds)

    def pid(self):
        return self.proc.child_pid()

    def fd_error_count(self):
        return self.proc.status().get("fd_errors", 0)

    def start(self):
        try:
            check_port_free(self.port, what="ss-local")
            self.proc.start()
            ok = _wait_until(lambda: (self.pid() and is_listening(self.port))
                             or not self.proc.alive() or self.proc.status().get("exited"),
                             self.startup_timeout)
            if not (ok and self.pid() and is_listening(self.port)):
                raise DaemonExitedError(
                    f"ss-local on {HOST}:{self.port} did not become ready\n" + self.proc.describe())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self):
        self.proc.stop()
        self._tmp.cleanup()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# --------------------------------------------------------------------------
# SOCKS5 client ramp
# --------------------------------------------------------------------------

_CONNECTING, _GREETING, _REQUEST, _ECHO, _HELD, _FAILED = range(6)
_SOCKS5_GREETING = b"\x05\x01\x00"  # version 5, one method: no authentication


class _RampFailure(Exception):
    """One connection failed; the argument is the reason counted in 'failures'."""


class _Conn:
    """One client connection of the ramp: a small SOCKS5 + echo state machine."""

    def __init__(self, sock, request, payload):
        self.sock, self.request, self.payload = sock, request, payload
        self.state, self.out, self.inbuf = _CONNECTING, b"", b""

    def events(self):
        return selectors.EVENT_WRITE if self.state == _CONNECTING or self.out else selectors.EVENT_READ

    def send_pending(self):
        if self.out:
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self.out = self.out[self.sock.send(self.out):]

    def step(self, mask):
        """Handle one readiness event; return True when the state advanced."""
        if self.state == _CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise _RampFailure(f"connect_{errno.errorcode.get(err, err)}")
            self.state, self.out = _GREETING, _SOCKS5_GREETING
            self.send_pending()
            return True
        if mask & selectors.EVENT_WRITE:
            self.send_pending()
            return False
        data = self.sock.recv(4096)
        if not data:
            raise _RampFailure(f"eof_in_{('greeting', 'request', 'echo')[self.state - _GREETING]}")
        self.inbuf += data
        if self.state == _GREETING and len(self.inbuf) >= 2:
            if self.inbuf[:2] != b"\x05\x00":
                raise _RampFailure("socks_greeting_rejected")
            self.state, self.inbuf, self.out = _REQUEST, self.inbuf[2:], self.request
        elif self.state == _REQUEST and len(self.inbuf) >= 5:
            # reply: VER REP RSV ATYP BND.ADDR BND.PORT; length depends on ATYP
            size = {1: 10, 4: 22, 3: 7 + self.inbuf[4]}.get(self.inbuf[3], 10)
            if len(self.inbuf) < size:
                return False
            if self.inbuf[1] != 0:
                raise _RampFailure(f"socks_reply_{self.inbuf[1]}")
            self.state, self.inbuf, self.out = _ECHO, self.inbuf[size:], self.payload
        elif self.state == _ECHO and len(self.inbuf) >= len(self.payload):
            if self.inbuf[:len(self.payload)] != self.payload:
                raise _RampFailure("echo_mismatch")
            self.state = _HELD
            return True
        else:
            return False
        self.send_pending()
        return True


def socks5_ramp(socks_port, target_port, count, ss=None, timeout=30.0, stall_timeout=3.0,
                batch=256, hold_seconds=0.3, target_host=HOST):
    """Open ``count`` concurrent SOCKS5 CONNECTs via ``socks_port`` to ``target_host:target_port``.

    Every connection does the SOCKS5 handshake (no auth, CONNECT IPv4), sends a
    unique small payload and must get it echoed back; echoed connections stay
    open until the ramp ends, are measured, then all are closed.  The ramp ends
    when every connection is held or failed, at ``timeout`` seconds overall, or when
    nothing progressed for ``stall_timeout`` seconds (connections stuck behind an
    fd-starved ss-server never progress).  ``batch`` caps new sockets per loop turn.
    ``ss`` (an SsServerProgram) adds ss-server measurements.  Raises the caller's
    soft RLIMIT_NOFILE to hard (non-blocking sockets + selectors: thousands are fine).

    Returns a dict: requested, attempted, held, failed, seconds (start -> last echo),
    elapsed, timed_out, stalled, failures (reason -> count), and with ``ss``:
    ss_server_pid, ss_server_nofile (soft, hard), ss_server_open_fds, rss_kb
    (VmRSS while all were held), too_many_open_files (lines during the ramp),
    too_many_open_files_total.
    """
    raise_nofile_soft_limit()
    request = b"\x05\x01\x00\x01" + socket.inet_aton(target_host) + target_port.to_bytes(2, "big")
    fd_before = ss.fd_error_count() if ss else 0
    sel = selectors.DefaultSelector()
    conns, failures = [], {}
    held = pending = 0
    start = last_progress = time.monotonic()
    last_echo = None
    timed_out = stalled = False

    def fail(conn, reason, n=1):
        nonlocal pending
        failures[reason] = failures.get(reason, 0) + n
        if conn is not None:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(conn.sock)
            conn.sock.close()
            conn.state = _FAILED
            pending -= 1

    try:
        while True:
            # 1. open up to `batch` new connections
            opened = 0
            while len(conns) < count and opened < batch:
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as exc:  # the client itself ran out of fds
                    fail(None, f"client_socket_{errno.errorcode.get(exc.errno, exc.errno)}", count - len(conns))
                    count_left = 0
                    break
                sock.setblocking(False)
                conn = _Conn(sock, request, b"ssrig %08d\n" % len(conns))
                conns.append(conn)
                opened += 1
                pending += 1
                sel.register(sock, selectors.EVENT_WRITE, conn)
                rc = sock.connect_ex((HOST, socks_port))
                if rc not in (0, errno.EINPROGRESS):
                    fail(conn, f"connect_{errno.errorcode.get(rc, rc)}")
            else:
                count_left = count - len(conns)
            # 2. stop conditions
            now = time.monotonic()
            if opened:
                last_progress = now
            if pending == 0 and count_left == 0:
                break
            if now - start >= timeout:
                timed_out = True
                break
            if now - last_progress >= stall_timeout:
                stalled = True
                break
            # 3. advance connections that are ready
            for key, mask in sel.select(timeout=0 if count_left else 0.1):
                conn = key.data
                try:
                    if not conn.step(mask):
                        continue
                except _RampFailure as exc:
                    fail(conn, exc.args[0])
                    continue
                except OSError as exc:
                    fail(conn, f"error_{errno.errorcode.get(exc.errno, type(exc).__name__)}")
                    continue
                last_progress = time.monotonic()
                if conn.state == _HELD:
                    sel.unregister(conn.sock)
                    held += 1
                    pending -= 1
                    last_echo = last_progress
                else:
                    sel.modify(conn.sock, conn.events(), conn)
        elapsed = time.monotonic() - start
        stuck = sum(1 for c in conns if c.state not in (_HELD, _FAILED))
        if stuck:
            fail(None, "no_echo_in_time", stuck)
        if len(conns) < count and not any(k.startswith("client_socket") for k in failures):
            fail(None, "not_attempted", count - len(conns))
        result = {
            "requested": count,
            "attempted": len(conns),
            "held": held,
            "failed": count - held,
            "seconds": round((last_echo - start) if last_echo else 0.0, 3),
            "elapsed": round(elapsed, 3),
            "timed_out": timed_out,
            "stalled": stalled,
            "failures": failures,
        }
        if ss is not None:
            time.sleep(hold_seconds)  # everything still held; lets the counter flush
            pid = ss.pid()
            result.update({
                "ss_server_pid": pid,
                "ss_server_nofile": read_nofile_limits(pid) if pid else None,
                "ss_server_open_fds": count_open_fds(pid) if pid else None,
                "rss_kb": read_rss_kb(pid) if pid else None,
                "too_many_open_files": ss.fd_error_count() - fd_before,
                "too_many_open_files_total": ss.fd_error_count(),
            })
        return result
    finally:
        for conn in conns:
            if conn.state != _FAILED:
                conn.sock.close()
        sel.close()


# --------------------------------------------------------------------------
# everything together
# --------------------------------------------------------------------------

class Rig:
    """Handle yielded by loopback_rig(): ``echo``, ``server`` (PrivateSupervisor or
    SystemSupervisor; ``server.ss`` is the SsServerProgram), ``local`` (SsLocal)."""

    def __init__(self, echo, server, local):
        self.echo, self.server, self.local = echo, server, local

    @property
    def ss(self):
        return self.server.ss

    def ramp(self, count, **kwargs):
        """socks5_ramp() through this rig's ss-local to its echo server."""
        return socks5_ramp(self.local.port, self.echo.port, count, ss=self.server.ss, **kwargs)


@contextlib.contextmanager
def loopback_rig(nofile=None, minfds=None, system=False, defaults_lines=(),
                 password=DEFAULT_PASSWORD, method=DEFAULT_METHOD, max_seconds=600):
    """Echo server + supervised ss-server + ss-local, all torn down on exit.

    ``system=False``: PrivateSupervisor(nofile, minfds).  ``system=True``:
    SystemSupervisor(defaults_lines) through /etc/init.d/supervisor (``nofile`` and
    ``minfds`` are then ignored; put e.g. 'ulimit -n 16384' in defaults_lines).
    """
    with contextlib.ExitStack() as stack:
        echo = stack.enter_context(EchoServer())
        if system:
            server = stack.enter_context(SystemSupervisor(
                password=password, method=method, defaults_lines=defaults_lines,
                max_seconds=max_seconds))
        else:
            server = stack.enter_context(PrivateSupervisor(
                nofile=nofile, minfds=minfds, password=password, method=method,
                max_seconds=max_seconds))
        local = stack.enter_context(SsLocal(server.port, password=password, method=method))
        yield Rig(echo, server, local)


def _main(argv):
    import argparse
    parser = argparse.ArgumentParser(description="ssrig helper processes")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_echo = sub.add_parser("echo-server")
    p_echo.add_argument("--host", default=HOST)
    p_echo.add_argument("--port", type=int, default=0)
    p_wrap = sub.add_parser("count-wrap")
    p_wrap.add_argument("--status", required=True)
    p_wrap.add_argument("--max-seconds", type=float, default=600)
    p_wrap.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.cmd == "echo-server":
        return _run_echo_server(args.host, args.port) or 0
    child = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    return _run_count_wrapper(args.status, args.max_seconds, child)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
